"""Made-up names, addresses, phone numbers and identifiers for synthetic patients.

Everything here comes from small built-in lists and a seeded RNG, never from the training data, so no
identifying field of a real record can leak through assembly. Values are deliberately fake-looking where a
real-world format exists (US SSN-like numbers are not emitted at all; phone numbers use the 555 range).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

IDENTIFIER_SYSTEM = "urn:fhirsynth:synthetic-mrn"

_GIVEN = {
    "us": {
        "female": ("Mary", "Linda", "Susan", "Karen", "Emily", "Grace", "Olivia", "Ava", "Chloe", "Nora",
                   "Ruth", "Alice", "Hazel", "Irene", "Joan", "Lucy", "Maya", "Paige", "Rosa", "Tessa"),
        "male": ("James", "John", "Robert", "Michael", "David", "Owen", "Liam", "Noah", "Ethan", "Caleb",
                 "Frank", "George", "Henry", "Isaac", "Jack", "Leo", "Miles", "Oscar", "Paul", "Ray"),
    },
    "es": {
        "female": ("Lucia", "Maria", "Carmen", "Elena", "Paula", "Sara", "Marta", "Julia", "Irene", "Laura",
                   "Ana", "Rocio", "Nerea", "Pilar", "Rosa", "Ines", "Alba", "Clara", "Sofia", "Teresa"),
        "male": ("Antonio", "Jose", "Manuel", "Javier", "Daniel", "Pablo", "Diego", "Sergio", "Hugo", "Mario",
                 "Alvaro", "Andres", "Carlos", "Jorge", "Luis", "Miguel", "Raul", "Ruben", "Tomas", "Victor"),
    },
}
_FAMILY = {
    "us": ("Smith", "Johnson", "Brown", "Taylor", "Miller", "Wilson", "Moore", "Clark", "Hall", "Young",
           "Allen", "King", "Wright", "Scott", "Green", "Baker", "Adams", "Nelson", "Hill", "Carter"),
    "es": ("Garcia", "Fernandez", "Gonzalez", "Rodriguez", "Lopez", "Martinez", "Sanchez", "Perez", "Gomez",
           "Martin", "Jimenez", "Ruiz", "Hernandez", "Diaz", "Moreno", "Alvarez", "Romero", "Navarro",
           "Torres", "Dominguez"),
}
_STREETS = {
    "us": ("Maple Street", "Oak Avenue", "Pine Road", "Cedar Lane", "Elm Street", "Lake Drive",
           "Hill Road", "Park Avenue", "River Road", "Sunset Boulevard"),
    "es": ("Calle Mayor", "Calle del Sol", "Avenida de la Paz", "Calle Nueva", "Plaza de Espana",
           "Calle del Carmen", "Avenida del Mar", "Calle Real", "Paseo del Prado", "Calle de la Luna"),
}
# (city, state/province, postal-code prefix)
_CITIES = {
    "us": (("Springfield", "MA", "011"), ("Riverton", "MA", "021"), ("Fairview", "MA", "017"),
           ("Greenville", "MA", "013"), ("Salem", "MA", "019")),
    "es": (("Valdemoro", "Madrid", "283"), ("Alcala", "Madrid", "288"), ("Getafe", "Madrid", "289"),
           ("Sagunto", "Valencia", "465"), ("Ronda", "Malaga", "294")),
}
_COUNTRY = {"us": "US", "es": "ES"}
_PHONE = {"us": "555-{a:03d}-{b:04d}", "es": "+34 555 {a:03d} {b:03d}"}


@dataclass(slots=True)
class FakeIdentity:
    family: str
    given: list[str]
    line: str
    city: str
    state: str
    postal_code: str
    country: str
    phone: str
    mrn: str


def locale_for(country: str | None, default: str) -> str:
    """Pick the name locale from the patient's country when we have lists for it."""
    c = (country or "").upper()
    if c in ("US", "USA"):
        return "us"
    if c in ("ES", "ESP"):
        return "es"
    return default


def make_identity(rng: random.Random, sex: str | None, locale: str) -> FakeIdentity:
    loc = locale if locale in _GIVEN else "us"
    gender = sex if sex in ("female", "male") else rng.choice(("female", "male"))
    given = [rng.choice(_GIVEN[loc][gender])]
    if rng.random() < 0.25:
        given.append(rng.choice(_GIVEN[loc][gender]))
    family = rng.choice(_FAMILY[loc])
    if loc == "es":  # Spanish naming: two family names
        family = f"{family} {rng.choice(_FAMILY[loc])}"
    city, state, prefix = rng.choice(_CITIES[loc])
    number = rng.randint(1, 999)
    street = rng.choice(_STREETS[loc])
    line = f"{number} {street}" if loc == "us" else f"{street}, {number}"
    postal = prefix + f"{rng.randint(0, 99):02d}"
    if loc == "us":
        phone = _PHONE[loc].format(a=rng.randint(100, 199), b=rng.randint(0, 9999))
    else:
        phone = _PHONE[loc].format(a=rng.randint(100, 999), b=rng.randint(0, 999))
    mrn = f"SYN{rng.randint(0, 10**9 - 1):09d}"
    return FakeIdentity(family, given, line, city, state, postal, _COUNTRY[loc], phone, mrn)
