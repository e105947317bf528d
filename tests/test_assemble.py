"""Assembler: every resource valid (both validators), linked, tagged, deterministic, profile-shaped."""

from __future__ import annotations

import random
from collections import Counter
from datetime import date, datetime, timezone

import pytest

from fhirsynth.export.bundles import iter_references
from fhirsynth.fhir.validate import validate_resource
from fhirsynth.timeline.assembler import HTEST, GeneratorInfo, assemble_patient, fhir_datetime
from fhirsynth.timeline.samples import LOINC, SNOMED, random_timelines
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

GEN = GeneratorInfo(model_hash="0f" * 32, epsilon=4.0, delta=1e-5, recorded="2026-01-02T03:04:05+00:00")
T0 = datetime(2020, 5, 6, 7, 8, 9, tzinfo=timezone.utc)


def _assemble_all(timelines, profile, seed=7):
    return [assemble_patient(tl, profile=profile, seed=seed, index=i, generator=GEN) for i, tl in enumerate(timelines)]


@pytest.mark.parametrize("profile", ["us-core", "ips"])
def test_thousands_of_resources_all_valid(profile):
    # Edge-case timelines: partial dates, missing values/units/encounters, odd statuses, deaths, no sex.
    timelines = random_timelines(45, seed=11 if profile == "us-core" else 12, visits=6, edge_cases=True)
    patients = _assemble_all(timelines, profile)
    resources = [r for rs in patients for r in rs]
    counts = Counter(r["resourceType"] for r in resources)
    assert len(resources) >= 2000, counts
    assert set(counts) == {"Patient", "Encounter", "Condition", "Observation", "Provenance"}
    failures = [(r["resourceType"], r["id"], p) for r in resources if (p := validate_resource(r))]
    assert failures == [], failures[:5]


def test_every_resource_tagged_htest_and_references_resolve():
    for resources in _assemble_all(random_timelines(20, seed=3, edge_cases=True), "us-core"):
        ids = {f"{r['resourceType']}/{r['id']}" for r in resources}
        assert len(ids) == len(resources), "duplicate ids"
        assert resources[0]["resourceType"] == "Patient" and resources[-1]["resourceType"] == "Provenance"
        for r in resources:
            assert HTEST in r["meta"]["security"] and HTEST in r["meta"]["tag"], r["id"]
            for ref in iter_references(r):
                assert ref in ids, (r["resourceType"], ref)
            if r["resourceType"] in ("Condition", "Observation", "Encounter"):
                assert r["subject"]["reference"] == f"Patient/{resources[0]['id']}"


def test_deterministic_by_seed_and_index():
    tls = random_timelines(5, seed=4)
    a = _assemble_all(tls, "us-core", seed=1)
    b = _assemble_all(tls, "us-core", seed=1)
    c = _assemble_all(tls, "us-core", seed=2)
    assert a == b
    assert a[0][0]["id"] != c[0][0]["id"]
    assert a[0][0]["name"] != c[0][0]["name"] or a[0][0]["identifier"] != c[0][0]["identifier"]
    all_ids = [r["id"] for rs in a + c for r in rs]
    assert len(all_ids) == len(set(all_ids)), "ids collide across patients or seeds"


def test_identity_is_made_up_not_copied():
    tl = Timeline(PatientInfo(patient_id="REAL-MRN-12345", sex="female", birth_date=date(1970, 1, 1)), [])
    res = assemble_patient(tl, profile="us-core", seed=1, index=0, generator=GEN)
    text = str(res)
    assert "REAL-MRN-12345" not in text
    patient = res[0]
    assert patient["name"][0]["family"] and patient["name"][0]["given"]
    assert patient["identifier"][0]["value"].startswith("SYN")


def _one(events, profile="us-core", **patient):
    info = PatientInfo(patient_id="x", **({"sex": "male", "birth_date": date(1960, 2, 3)} | patient))
    return assemble_patient(Timeline(info, events), profile=profile, seed=1, index=0, generator=GEN)


def _enc(eid="e1", t=T0):
    return Event(time=t, kind="encounter", system="http://terminology.hl7.org/CodeSystem/v3-ActCode", code="AMB",
                 display="ambulatory", value_system=SNOMED, value_code="185349003", value_display="Check up",
                 encounter_id=eid, end_time=t.replace(hour=9))


def test_blood_pressure_components_reassembled_into_one_panel():
    bp = dict(kind="observation", system=LOINC, unit="mm[Hg]", category="vital-signs", encounter_id="e1",
              panel_system=LOINC, panel_code="85354-9", panel_display="Blood pressure panel")
    events = [_enc(), Event(time=T0, code="8480-6", value=120.0, **bp), Event(time=T0, code="8462-4", value=80.0, **bp),
              Event(time=T0.replace(year=2021), code="8480-6", value=130.0, **bp)]
    res = _one(events)
    panels = [r for r in res if r["resourceType"] == "Observation"]
    assert len(panels) == 2
    first = panels[0]
    assert first["code"]["coding"][0]["code"] == "85354-9"
    assert [c["code"]["coding"][0]["code"] for c in first["component"]] == ["8480-6", "8462-4"]
    assert first["component"][0]["valueQuantity"] == {
        "value": 120.0, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}
    assert first["meta"]["profile"] == ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-blood-pressure"]
    assert first["encounter"]["reference"] == f"Encounter/{res[1]['id']}"
    # the 2021 panel lacks its diastolic half: present but marked absent so the BP profile still holds
    second = panels[1]
    assert second["component"][1]["dataAbsentReason"]["coding"][0]["code"] == "unknown"
    for r in res:
        assert validate_resource(r) == []


def test_condition_fields_and_status_invariant():
    events = [
        _enc(),
        Event(time=T0, kind="condition", system=SNOMED, code="44054006", display="Diabetes", encounter_id="e1",
              status="active", category="encounter-diagnosis"),
        Event(time=T0, kind="condition", system=SNOMED, code="10509002", display="Bronchitis", encounter_id="e1",
              status="active", end_time=T0.replace(month=7), category="problem-list-item", time_precision="day"),
    ]
    res = _one(events)
    active, abated = [r for r in res if r["resourceType"] == "Condition"]
    assert active["clinicalStatus"]["coding"][0]["code"] == "active"
    assert active["verificationStatus"]["coding"][0]["code"] == "confirmed"
    assert active["category"][0]["coding"][0]["code"] == "encounter-diagnosis"
    assert active["onsetDateTime"] == fhir_datetime(T0)
    assert active["meta"]["profile"][0].endswith("us-core-condition-encounter-diagnosis")
    # an abated condition cannot stay active (FHIR con-4)
    assert abated["clinicalStatus"]["coding"][0]["code"] == "resolved"
    assert abated["onsetDateTime"] == "2020-05-06" and abated["abatementDateTime"] == "2020-07-06"


def test_observation_values_and_missing_value():
    ev = dict(kind="observation", system=LOINC, encounter_id="e1", category="laboratory")
    events = [_enc(), Event(time=T0, code="2339-0", value=101.5, unit="mg/dL", **ev),
              Event(time=T0, code="5767-9", value_system=SNOMED, value_code="300828003", value_display="Clear", **ev),
              Event(time=T0, code="2093-3", **ev),
              Event(time=T0, code="2339-0", value=99.0, unit="mg/dL", end_time=T0.replace(hour=9), **ev)]
    q, cc, missing, interval = [r for r in res if r["resourceType"] == "Observation"] if (res := _one(events)) else []
    assert interval["effectivePeriod"] == {"start": fhir_datetime(T0), "end": fhir_datetime(T0.replace(hour=9))}
    assert "effectiveDateTime" not in interval and validate_resource(interval) == []
    assert q["valueQuantity"]["code"] == "mg/dL" and q["valueQuantity"]["system"] == "http://unitsofmeasure.org"
    assert q["category"][0]["coding"][0] == {"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                             "code": "laboratory"}
    assert q["effectiveDateTime"] == "2020-05-06T07:08:09+00:00"
    assert cc["valueCodeableConcept"]["coding"][0]["code"] == "300828003"
    assert "dataAbsentReason" in missing and not any(k.startswith("value") for k in missing)


def test_event_without_known_encounter_links_to_covering_visit_or_none():
    ev = dict(kind="observation", system=LOINC, code="8867-4", value=70.0, unit="/min", category="vital-signs")
    events = [_enc("e1"), Event(time=T0.replace(hour=8), encounter_id="ghost", **ev),
              Event(time=T0.replace(year=2022), encounter_id="ghost", **ev),
              Event(time=T0.replace(hour=8), encounter_id=None, **ev)]
    res = _one(events)
    covered, orphan, unlinked = [r for r in res if r["resourceType"] == "Observation"]
    assert covered["encounter"]["reference"] == f"Encounter/{res[1]['id']}"
    assert "encounter" not in orphan and "encounter" not in unlinked


def test_patient_demographics_us_core():
    res = _one([], sex="female", birth_date=date(1955, 4, 3), death_date=T0, race_code="2106-3", race_display="White",
               ethnicity_code="2186-5", ethnicity_display="Not Hispanic or Latino", country="US", language="en-US")
    p = res[0]
    assert p["gender"] == "female" and p["birthDate"] == "1955-04-03"
    assert p["deceasedDateTime"] == fhir_datetime(T0)
    urls = {e["url"]: e for e in p["extension"]}
    race = urls["http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"]
    assert race["extension"][0]["valueCoding"]["code"] == "2106-3" and race["extension"][1]["valueString"] == "White"
    assert "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity" in urls
    assert p["address"][0]["country"] == "US"
    assert p["communication"][0]["language"]["coding"][0]["code"] == "en-US"
    assert p["meta"]["profile"] == ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]


def test_patient_ips_nationality_and_unknown_birth_date():
    res = _one([], profile="ips", sex=None, birth_date=None, deceased=True, nationality="ES", country="ES",
               race_code="2106-3")
    p = res[0]
    assert p["meta"]["profile"] == ["http://hl7.org/fhir/uv/ips/StructureDefinition/Patient-uv-ips"]
    assert p["gender"] == "unknown" and p["deceasedBoolean"] is True
    assert "birthDate" not in p and p["_birthDate"]["extension"][0]["valueCode"] == "unknown"
    (nat,) = p["extension"]  # no US race extension in the IPS profile
    assert nat["url"] == "http://hl7.org/fhir/StructureDefinition/patient-nationality"
    assert nat["extension"][0]["valueCodeableConcept"]["coding"][0]["code"] == "ES"
    assert len(p["name"][0]["family"].split()) == 2  # Spanish locale: two family names
    assert validate_resource(p) == []


def test_provenance_names_generator_model_and_privacy():
    res = _one([_enc()])
    prov = res[-1]
    assert prov["resourceType"] == "Provenance"
    assert {t["reference"] for t in prov["target"]} == {f"{r['resourceType']}/{r['id']}" for r in res[:-1]}
    assert prov["recorded"] == GEN.recorded
    assert "fhirsynth 0.1.0" in prov["agent"][0]["who"]["display"]
    what = prov["entity"][0]["what"]
    assert what["identifier"]["value"] == GEN.model_hash
    assert "(4, 1e-05)-differential privacy" in what["display"]
    assert prov["policy"] == ["urn:fhirsynth:privacy:epsilon=4;delta=1e-05"]
    no_dp = assemble_patient(Timeline(PatientInfo("y"), []), profile="us-core", seed=1, index=0,
                             generator=GeneratorInfo(model_hash="aa", epsilon=None, delta=None, recorded=GEN.recorded))
    assert "no differential privacy" in no_dp[-1]["entity"][0]["what"]["display"]


def test_unknown_profile_is_usage_error():
    from fhirsynth.errors import UsageError

    with pytest.raises(UsageError):
        _one([], profile="nope")


def test_random_codes_fuzz_stay_valid():
    # Arbitrary (but well-formed) strings in codes/units/displays must never produce invalid FHIR.
    rng = random.Random(5)
    alphabet = "abcXYZ019-._/[] %"
    events = [_enc()]
    for i in range(60):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))).strip() or "x"
        events.append(Event(time=T0, kind=rng.choice(("observation", "condition")), system="urn:test", code=s,
                            display=s, value=rng.choice((None, float(i), float("nan"))), unit=rng.choice((None, s)),
                            category=rng.choice((None, s, "laboratory")), encounter_id="e1",
                            status=rng.choice((None, s, "final", "active"))))
    for r in _one(events):
        assert validate_resource(r) == [], r


def test_assemble_table_overrides_and_reports_every_problem():
    from fhirsynth.errors import MappingError
    from fhirsynth.timeline.profiles import apply_assemble_table, load_profile

    base = load_profile("us-core")
    custom = apply_assemble_table(base, {"locale": "es", "profiles": {"Patient": "http://example.org/p"}}, "x.toml")
    assert custom.locale == "es" and custom.profiles["Patient"] == "http://example.org/p"
    assert custom.profiles["Encounter"] == base.profiles["Encounter"]  # untouched keys kept
    with pytest.raises(MappingError) as err:
        apply_assemble_table(base, {"locale": "fr", "nationality": "yes", "colour": 1, "profiles": {"P": 2}}, "x.toml")
    assert len(err.value.problems) == 4 and err.value.where == "x.toml"
