"""Search semantics parameter by parameter, on a small hand-made store built to separate every case.

Each query's expected set comes from an independent evaluation over the fixture's JSON (plain Python: the FHIR R4
rules for prefixes, precision, modifiers and references written out again here, not the store's index), and is
neither empty nor everything, so a search that ignored the parameter, a prefix, a modifier or one element of the
resource would fail. The store is the real SQLite store and the search runs through the API's own parse_search /
run_search, without HTTP (the mutation runner reruns these tests for every mutant).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from fhirsynth.api.search import parse_search, run_search
from fhirsynth.api.settings import ServerSettings
from fhirsynth.store.query import SearchError
from fhirsynth.store.sqlite import Store

HTEST = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST"}
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SCT = "http://snomed.info/sct"


def _res(rtype: str, rid: str, updated: str, **fields) -> dict:
    return {"resourceType": rtype, "id": rid, "meta": {"security": [HTEST], "lastUpdated": updated}, **fields}


def _patients() -> list[dict]:
    return [
        _res("Patient", "pa", "2020-01-01T00:00:00Z", gender="female", birthDate="1970-05-10", deceasedBoolean=True,
             name=[{"family": "García", "given": ["Ana", "María"], "prefix": ["Dr."], "suffix": ["PhD"]}],
             identifier=[{"system": "urn:a", "value": "A1"}, {"value": "X9"}],
             address=[{"city": "Springfield", "country": "US"}]),
        _res("Patient", "pb", "2021-06-01T12:00:00Z", gender="male", birthDate="1980",
             deceasedDateTime="2019-03-04",
             name=[{"family": "Smith", "given": ["John"], "text": "Johnny Smith"}],
             identifier=[{"system": "urn:b", "value": "A1"}],
             address=[{"city": "Shelbyville", "country": "CA"}]),
        _res("Patient", "pc", "2022-01-01T00:00:00Z", gender="female", birthDate="1990-12", deceasedBoolean=False,
             name=[{"text": "Zoë Ng"}], address=[{"city": "Springfield", "country": "CA"}]),
        _res("Patient", "pd", "2023-03-03T00:00:00Z", birthDate="2000-01-01",
             name=[{"given": ["Bob"], "prefix": ["Mr."], "suffix": ["Jr."], "family": "Lee_Jones"}],
             identifier=[{"system": "urn:a", "value": ""}, {"system": "urn:a", "value": "B2"}]),
        _res("Patient", "pe", "2024-01-01T00:00:00.500Z", gender="other",
             name=[{"family": "LeeXJones", "given": ["50%"]}]),
        _res("Patient", "pf", "2024-02-02T00:00:00Z", gender="male", birthDate="1955-07-07",
             name=[{"family": "smithson", "given": ["a\\b"]}],
             identifier=[{"system": "urn:a", "value": "C|3"}]),  # the first "|" separates system and code
    ]


def _cond(rid: str, subject: str, onset: dict, **fields) -> dict:
    return _res("Condition", rid, "2020-05-05T00:00:00Z", subject={"reference": subject}, **onset, **fields)


def _conditions() -> list[dict]:
    cat = "http://terminology.hl7.org/CodeSystem/condition-category"
    enc_dx = [{"coding": [{"system": cat, "code": "encounter-diagnosis"}]}]
    problem = [{"coding": [{"system": cat, "code": "problem-list-item", "display": "Problem List Item"}]}]
    diabetes = {"coding": [{"system": SCT, "code": "44054006", "display": "Diabetes mellitus type 2"}],
                "text": "Diabetes"}
    asthma = {"coding": [{"system": SCT, "code": "195967001", "display": "Asthma"}]}
    flu = {"coding": [{"code": "flu", "display": "Grippe"}, {"display": "code-less coding"}], "text": "Influenza"}
    return [
        _cond("c1", "Patient/pa", {"onsetDateTime": "2010-01-10T09:10:00Z"}, code=diabetes, category=enc_dx,
              encounter={"reference": "Encounter/e1"}, abatementDateTime="2012"),
        _cond("c2", "http://h/fhir/Patient/pa/_history/3", {"onsetDateTime": "2010-01"}, code=asthma,
              category=problem),
        _cond("c3", "Patient/pb", {"onsetDateTime": "2010"}, code=flu, category=enc_dx,
              encounter={"reference": "Encounter/e2"}),
        _cond("c4", "Patient/pb", {"onsetPeriod": {"start": "2009-12-15", "end": "2010-01-20"}}, code=diabetes,
              category=problem, abatementDateTime="2011-06-01"),
        _cond("c5", "Patient/pc", {"onsetPeriod": {"start": "2010-01-10"}}, code=asthma, category=enc_dx),
        _cond("c6", "Patient/pc", {"onsetDateTime": "2010-01-11"}, code=diabetes, category=enc_dx,
              encounter={"reference": "http://h/fhir/Encounter/e1"}),
        _cond("c7", "Group/pa", {"onsetDateTime": "2010-02-01"}, code=flu),  # same id, another type
        _cond("c8", "urn:uuid:0a0b", {"onsetPeriod": {"end": "2009-06-30"}}, code=asthma),
        _cond("c9", "#contained", {"onsetDateTime": "2010-01-10T23:59:59+02:00"}, code=asthma, category=problem),
        _cond("c10", "Patient/pd", {"onsetDateTime": "2011-03-04T05:06:07.25Z"}, code=diabetes, category=enc_dx),
    ]


def _obs(rid: str, subject: str, when: dict, **fields) -> dict:
    return _res("Observation", rid, "2020-05-05T00:00:00Z", **{"status": "final", **fields},
                subject={"reference": subject}, **when)


def _q(value: float, unit: str | None = None, code: str | None = None, system: str | None = UCUM) -> dict:
    q: dict = {"value": value}
    for key, v in (("unit", unit), ("code", code), ("system", system)):
        if v is not None:
            q[key] = v
    return q


def _observations() -> list[dict]:
    glucose = {"coding": [{"system": LOINC, "code": "2339-0", "display": "Glucose"}]}
    bp = {"coding": [{"system": LOINC, "code": "85354-9", "display": "Blood pressure"}]}
    sys_code = {"coding": [{"system": LOINC, "code": "8480-6", "display": "Systolic"}]}
    dia_code = {"coding": [{"system": LOINC, "code": "8462-4", "display": "Diastolic"}]}
    smoke = {"coding": [{"system": LOINC, "code": "72166-2"}]}
    return [
        _obs("o1", "Patient/pa", {"effectiveDateTime": "2015-03-01"}, code=glucose,
             valueQuantity=_q(5.4, "mmol/L", "mmol/L"), encounter={"reference": "Encounter/e1"}),
        _obs("o2", "Patient/pa", {"effectiveDateTime": "2015-03-02"}, code=glucose,
             valueQuantity=_q(5.35, "mmol/L", "mmol/L")),
        _obs("o3", "Patient/pb", {"effectivePeriod": {"start": "2016-01-01", "end": "2016-01-02"}}, code=glucose,
             valueQuantity=_q(5.45, "mmol/L", "mmol/L")),
        _obs("o4", "Patient/pb", {"effectiveInstant": "2017-07-07T07:07:07Z"}, code=glucose,
             valueQuantity=_q(98, "mg/dL", "mg/dL")),
        _obs("o5", "Patient/pc", {"effectiveDateTime": "2018"}, code=glucose,
             valueQuantity=_q(5, "mmol/L", None, None)),  # unit only, no system/code
        _obs("o6", "Patient/pc", {"effectiveDateTime": "2018-02"}, code=glucose,
             valueQuantity=_q(6, None, "mmol/L", "http://other.org")),
        _obs("o7", "Patient/pd", {"effectiveDateTime": "2019-01-01"}, code=bp,
             component=[{"code": sys_code, "valueQuantity": _q(120, "mm[Hg]", "mm[Hg]")},
                        {"code": dia_code, "valueQuantity": _q(80, "mm[Hg]", "mm[Hg]")}, "junk"]),
        _obs("o8", "Patient/pd", {"effectiveDateTime": "2019-01-02"}, code=bp,
             component=[{"code": sys_code, "valueQuantity": _q(140, "mm[Hg]", "mm[Hg]")},
                        {"code": dia_code, "valueQuantity": _q(95, "mm[Hg]", "mm[Hg]")}]),
        _obs("o9", "Patient/pe", {"effectiveDateTime": "2020-01-01"}, code=smoke,
             valueCodeableConcept={"coding": [{"system": SCT, "code": "266919005", "display": "Never smoker"}]},
             encounter={"reference": "Encounter/e2"}),
        _obs("o10", "Patient/pe", {}, code=glucose, valueQuantity={"value": "7", "unit": "mmol/L"},
             status="preliminary"),  # a string value is no quantity
    ]


def _encounters() -> list[dict]:
    act = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
    return [
        _res("Encounter", "e1", "2020-05-05T00:00:00Z", status="finished", subject={"reference": "Patient/pa"},
             period={"start": "2010-01-10T09:00:00Z", "end": "2010-01-10T10:00:00Z"},
             **{"class": {"system": act, "code": "AMB"}}, type=[{"coding": [{"system": SCT, "code": "185349003"}]}]),
        _res("Encounter", "e2", "2020-05-05T00:00:00Z", status="in-progress", subject={"reference": "Patient/pb"},
             period={"start": "2010-06-01"}, **{"class": {"system": act, "code": "EMER"}}),
        _res("Encounter", "e3", "2020-05-05T00:00:00Z", status="finished", subject={"reference": "Patient/pb"},
             period={"start": "2011-01-01", "end": "2011-01-03"}, **{"class": {"system": act, "code": "AMB"}},
             type=[{"coding": [{"system": SCT, "code": "50849002"}]}]),
    ]


def _provenances() -> list[dict]:
    return [
        # the same patient twice (two versions): a join on the target index would repeat this Provenance
        _res("Provenance", "v1", "2020-05-05T00:00:00Z", recorded="2020-05-05T00:00:00Z",
             target=[{"reference": "Patient/pa"}, {"reference": "http://h/fhir/Patient/pa/_history/2"},
                     {"reference": "Condition/c1"}]),
        _res("Provenance", "v2", "2020-05-05T00:00:00Z", recorded="2021-01-01T00:00:00Z",
             target=[{"reference": "Condition/c3"}, {"reference": "Patient/pb"}]),
    ]


def _groups() -> list[dict]:
    return [_res("Group", "g1", "2020-05-05T00:00:00Z", type="person", actual=True,
                 member=[{"entity": {"reference": "Patient/pa"}}, {"entity": {"reference": "Patient/pa"}},
                         {"entity": {"reference": "Patient/pb"}}]),
            _res("Group", "g2", "2020-05-05T00:00:00Z", type="person", actual=True,
                 member=[{"entity": {"reference": "Patient/pc"}}])]


SETTINGS = ServerSettings(db_path=Path("unused"), max_count=1000, default_count=1000)


@pytest.fixture()
def store_data(tmp_path) -> tuple[Store, dict[str, list[dict]]]:
    """A fresh store per test (a few ms): built inside each test, every test covers the extraction code it relies
    on, which is how the mutation runner picks the tests to run against a mutant of it."""
    resources = _patients() + _conditions() + _observations() + _encounters() + _provenances() + _groups()
    store = Store(tmp_path / "store.db")
    store.add(orjson.loads(orjson.dumps(r)) for r in resources)
    data: dict[str, list[dict]] = {}  # as stored: the store adds Group/all
    for (body,) in store.query("SELECT body FROM resources ORDER BY rid"):
        r = orjson.loads(body)
        data.setdefault(r["resourceType"], []).append(r)
    yield store, data
    store.close()


def search(store: Store, rtype: str, items: list[tuple[str, str]]) -> list[str]:
    """Ids of the matches, in the order (and with the repetitions) the searchset holds them; checks total too."""
    req = parse_search(rtype, items, settings=SETTINGS, lenient=False)
    bundle = orjson.loads(run_search(store, req, "http://test/fhir", SETTINGS))
    ids = [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]
    assert bundle["total"] == len(ids), "total disagrees with the matches"
    return ids


# ---------------------------------------------------------------- the independent evaluation

def norm(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn").casefold()


def span(value: str) -> tuple[datetime, datetime]:
    """[start, end) of a FHIR date/dateTime at its precision, written out without the store's dates module."""
    if len(value) == 4:
        y = int(value)
        return datetime(y, 1, 1, tzinfo=timezone.utc), datetime(y + 1, 1, 1, tzinfo=timezone.utc)
    if len(value) == 7:
        y, m = int(value[:4]), int(value[5:7])
        end = datetime(y + m // 12, m % 12 + 1, 1, tzinfo=timezone.utc)
        return datetime(y, m, 1, tzinfo=timezone.utc), end
    if len(value) == 10:
        start = datetime.fromisoformat(value).replace(tzinfo=timezone.utc)
        return start, datetime.fromtimestamp(start.timestamp() + 86400, tz=timezone.utc)
    start = datetime.fromisoformat(value.replace("Z", "+00:00"))
    step = 1.0 if "." not in value else 10.0 ** -len(value.split(".")[1].rstrip("Z").split("+")[0])
    return start, datetime.fromtimestamp(start.timestamp() + step, tz=timezone.utc)


LOW, HIGH = datetime(1, 1, 1, tzinfo=timezone.utc), datetime(9999, 1, 1, tzinfo=timezone.utc)


def element_span(r: dict, *keys: str) -> tuple[datetime, datetime] | None:
    for k in keys:
        v = r.get(k)
        if isinstance(v, str):
            return span(v)
        if isinstance(v, dict):
            return (span(v["start"])[0] if v.get("start") else LOW, span(v["end"])[1] if v.get("end") else HIGH)
    return None


# FHIR R4 3.1.1.4.1: the resource's range (lo, hi) against the search value's range (qlo, qhi).
DATE_PREFIX: dict[str, Callable[[datetime, datetime, datetime, datetime], bool]] = {
    "eq": lambda lo, hi, qlo, qhi: lo >= qlo and hi <= qhi,
    "ne": lambda lo, hi, qlo, qhi: not (lo >= qlo and hi <= qhi),
    "gt": lambda lo, hi, qlo, qhi: hi > qhi,
    "lt": lambda lo, hi, qlo, qhi: lo < qlo,
    "ge": lambda lo, hi, qlo, qhi: hi > qhi or (lo >= qlo and hi <= qhi),
    "le": lambda lo, hi, qlo, qhi: lo < qlo or (lo >= qlo and hi <= qhi),
    "sa": lambda lo, hi, qlo, qhi: lo >= qhi,
    "eb": lambda lo, hi, qlo, qhi: hi <= qlo,
}


def date_matches(r: dict, keys: tuple[str, ...], query: str) -> bool:
    prefix, raw = (query[:2], query[2:]) if query[:2].isalpha() else ("eq", query)
    have = element_span(r, *keys)
    return have is not None and DATE_PREFIX[prefix](*have, *span(raw))


def quantity_matches(q: object, query: str) -> bool:
    """FHIR R4 3.1.1.4.2: implicit precision for eq/ne, plain comparison otherwise; system|code narrows."""
    if not isinstance(q, dict) or not isinstance(q.get("value"), (int, float)):
        return False
    prefix, raw = (query[:2], query[2:]) if query[:2].isalpha() else ("eq", query)
    number, system, code = (raw.split("|") + ["", ""])[:3]
    d, v = Decimal(number), Decimal(str(q["value"]))
    half = Decimal(1).scaleb(d.as_tuple().exponent) / 2
    ok = {"eq": d - half <= v < d + half, "ne": not (d - half <= v < d + half), "gt": v > d, "sa": v > d,
          "lt": v < d, "eb": v < d, "ge": v >= d, "le": v <= d}[prefix]
    if system and q.get("system") != system:
        return False
    if code and (q.get("code") != code if system else code not in (q.get("code"), q.get("unit"))):
        return False
    return ok


def codes(cc: object) -> list[tuple[str | None, str | None, str | None]]:
    out = []
    for one in cc if isinstance(cc, list) else [cc]:
        if isinstance(one, dict):
            out += [(c.get("system"), c.get("code"), c.get("display")) for c in one.get("coding", []) if c.get("code")]
    return out


def token_matches(cc: object, query: str) -> bool:
    if "|" not in query:
        return any(code == query for _, code, _ in codes(cc))
    system, code = query.split("|")
    if not code:
        return any((s or "") == system for s, _, _ in codes(cc))
    return any((s or "") == system and c == code for s, c, _ in codes(cc))


def ref(r: dict, key: str) -> tuple[str, str] | None:
    """(type, id) of a literal reference, ignoring a base URL and a version; None for urn: and #contained."""
    value = (r.get(key) or {}).get("reference", "")
    if value.startswith(("urn:", "#")) or "/" not in value:
        return None
    parts = value.split("/")
    if "_history" in parts:
        parts = parts[:parts.index("_history")]
    return parts[-2], parts[-1]


def name_parts(p: dict) -> list[str]:
    out = []
    for n in p.get("name", []):
        out += [n[k] for k in ("family", "text") if n.get(k)] + n.get("given", []) + n.get("prefix", []) \
            + n.get("suffix", [])
    return out


# ---------------------------------------------------------------- the queries

Query = tuple[str, list[tuple[str, str]], Callable[[dict], bool]]

PATIENT_QUERIES: list[Query] = [
    ("Patient", [("deceased", "true")], lambda r: r.get("deceasedBoolean") is True or "deceasedDateTime" in r),
    ("Patient", [("deceased", "false")], lambda r: not (r.get("deceasedBoolean") or "deceasedDateTime" in r)),
    ("Patient", [("death-date", "ge2019")], lambda r: date_matches(r, ("deceasedDateTime",), "ge2019")),
    ("Patient", [("death-date:missing", "false")], lambda r: "deceasedDateTime" in r),
    ("Patient", [("gender:missing", "true")], lambda r: "gender" not in r),
    ("Patient", [("gender", "male,other")], lambda r: r.get("gender") in ("male", "other")),
    ("Patient", [("gender", "http://hl7.org/fhir/administrative-gender|female")],
     lambda r: r.get("gender") == "female"),
    ("Patient", [("identifier", "A1")], lambda r: any(i.get("value") == "A1" for i in r.get("identifier", []))),
    ("Patient", [("identifier", "urn:a|A1")],
     lambda r: {"system": "urn:a", "value": "A1"} in r.get("identifier", [])),
    ("Patient", [("identifier", "urn:a|C|3")],
     lambda r: {"system": "urn:a", "value": "C|3"} in r.get("identifier", [])),
    ("Patient", [("identifier", "|X9")],
     lambda r: any(i.get("value") == "X9" and "system" not in i for i in r.get("identifier", []))),
    ("Patient", [("identifier", "urn:a|")],
     lambda r: any(i.get("system") == "urn:a" and i.get("value") for i in r.get("identifier", []))),
    ("Patient", [("identifier:missing", "true")],
     lambda r: not any(i.get("value") for i in r.get("identifier", []))),
    ("Patient", [("identifier:not", "A1")], lambda r: all(i.get("value") != "A1" for i in r.get("identifier", []))),
    ("Patient", [("family", "smith")], lambda r: any(norm(n.get("family", "")).startswith("smith")
                                                     for n in r.get("name", []))),
    ("Patient", [("family", "garcia")], lambda r: any(norm(n.get("family", "")).startswith("garcia")
                                                      for n in r.get("name", []))),
    ("Patient", [("family:exact", "Smith")], lambda r: any(n.get("family") == "Smith" for n in r.get("name", []))),
    ("Patient", [("family:exact", "smithson")], lambda r: any(n.get("family") == "smithson" for n in r.get("name", []))),
    ("Patient", [("family:contains", "e_j")], lambda r: any("e_j" in norm(n.get("family", ""))
                                                            for n in r.get("name", []))),
    ("Patient", [("family:contains", "ITH")], lambda r: any("ith" in norm(n.get("family", ""))
                                                            for n in r.get("name", []))),
    ("Patient", [("name:contains", "0%")], lambda r: any("0%" in norm(s) for s in name_parts(r))),
    ("Patient", [("name:contains", "a\\b")], lambda r: any("a\\b" in norm(s) for s in name_parts(r))),
    ("Patient", [("address-city", "spring")], lambda r: any(norm(a.get("city", "")).startswith("spring")
                                                            for a in r.get("address", []))),
    ("Patient", [("address-country", "ca")], lambda r: any(norm(a.get("country", "")).startswith("ca")
                                                           for a in r.get("address", []))),
    ("Patient", [("_lastUpdated", "lt2022")], lambda r: r["meta"]["lastUpdated"] < "2022"),
    ("Patient", [("_lastUpdated", "ge2023-03-03")], lambda r: r["meta"]["lastUpdated"] >= "2023-03-03"),
    ("Patient", [("_lastUpdated", "eq2024-01-01T00:00:00Z")],
     lambda r: r["meta"]["lastUpdated"].startswith("2024-01-01T00:00:00")),
    ("Patient", [("_id", "pa,pc")], lambda r: r["id"] in ("pa", "pc")),
    ("Patient", [("birthdate:missing", "true")], lambda r: "birthDate" not in r),
] + [("Patient", [("name", q)], lambda r, q=q: any(norm(s).startswith(norm(q)) for s in name_parts(r)))
     for q in ("dr", "phd", "jr", "maría", "johnny", "zoe", "bob", "smith", "ana")] \
  + [("Patient", [("birthdate", f"{p}{v}")], lambda r, p=p, v=v: date_matches(r, ("birthDate",), f"{p}{v}"))
     for p in DATE_PREFIX for v in ("1980", "1990-12", "1970-05-10")]

ONSET = ("onsetDateTime", "onsetPeriod")
CONDITION_QUERIES: list[Query] = [
    ("Condition", [("onset-date", f"{p}{v}")], lambda r, p=p, v=v: date_matches(r, ONSET, f"{p}{v}"))
    for p in DATE_PREFIX for v in ("2010-01", "2010-01-10", "2010")
] + [
    ("Condition", [("abatement-date", "lt2012")], lambda r: date_matches(r, ("abatementDateTime",), "lt2012")),
    ("Condition", [("abatement-date:missing", "true")], lambda r: "abatementDateTime" not in r),
    ("Condition", [("code", "44054006")], lambda r: token_matches(r["code"], "44054006")),
    ("Condition", [("code", f"{SCT}|")], lambda r: token_matches(r["code"], f"{SCT}|")),
    ("Condition", [("code", "|flu")], lambda r: token_matches(r["code"], "|flu")),
    ("Condition", [("code", f"{SCT}|195967001,|flu")],
     lambda r: token_matches(r["code"], f"{SCT}|195967001") or token_matches(r["code"], "|flu")),
    ("Condition", [("code:not", "195967001")], lambda r: not token_matches(r["code"], "195967001")),
    ("Condition", [("code:text", "diab")],
     lambda r: any("diab" in norm(d or "") for _, _, d in codes(r["code"])) or "diab" in norm(r["code"].get("text", ""))),
    ("Condition", [("code:text", "influ")], lambda r: "influ" in norm(r["code"].get("text", ""))),
    ("Condition", [("code:text", "grip")], lambda r: any("grip" in norm(d or "") for _, _, d in codes(r["code"]))),
    ("Condition", [("code:text", "code-less")], lambda r: False),  # a coding without a code is not indexed
    ("Condition", [("category", "problem-list-item")], lambda r: token_matches(r.get("category"), "problem-list-item")),
    ("Condition", [("category:missing", "true")], lambda r: "category" not in r),
    ("Condition", [("category:text", "problem list")],
     lambda r: any("problem list" in norm(d or "") for _, _, d in codes(r.get("category")))),
    ("Condition", [("patient", "pa")], lambda r: ref(r, "subject") == ("Patient", "pa")),
    ("Condition", [("patient", "Patient/pb")], lambda r: ref(r, "subject") == ("Patient", "pb")),
    ("Condition", [("patient", "pa,pb")], lambda r: ref(r, "subject") in (("Patient", "pa"), ("Patient", "pb"))),
    ("Condition", [("patient", "http://elsewhere/fhir/Patient/pa/_history/9")],
     lambda r: ref(r, "subject") == ("Patient", "pa")),
    ("Condition", [("subject", "pa")], lambda r: (ref(r, "subject") or ("", ""))[1] == "pa"),
    ("Condition", [("subject", "Group/pa")], lambda r: ref(r, "subject") == ("Group", "pa")),
    ("Condition", [("subject:Patient", "pa")], lambda r: ref(r, "subject") == ("Patient", "pa")),
    ("Condition", [("subject:Group", "pa")], lambda r: ref(r, "subject") == ("Group", "pa")),
    ("Condition", [("subject:missing", "true")], lambda r: ref(r, "subject") is None),
    ("Condition", [("patient:missing", "false")], lambda r: (ref(r, "subject") or ("",))[0] == "Patient"),
    ("Condition", [("encounter", "e1")], lambda r: ref(r, "encounter") == ("Encounter", "e1")),
    ("Condition", [("encounter", "Encounter/e2")], lambda r: ref(r, "encounter") == ("Encounter", "e2")),
    ("Condition", [("patient", "pa"), ("code", "44054006")],
     lambda r: ref(r, "subject") == ("Patient", "pa") and token_matches(r["code"], "44054006")),
    ("Condition", [("patient", "pb"), ("category", "problem-list-item")],
     lambda r: ref(r, "subject") == ("Patient", "pb") and token_matches(r.get("category"), "problem-list-item")),
    ("Condition", [("_id", "c1,c7,nope")], lambda r: r["id"] in ("c1", "c7")),
    ("Condition", [("_id", "c2"), ("patient", "pa")], lambda r: r["id"] == "c2"),
]

OBSERVATION_QUERIES: list[Query] = [
    ("Observation", [("value-quantity", q)], lambda r, q=q: quantity_matches(r.get("valueQuantity"), q))
    for q in ("5.4", "5", "5.40", "ne5.4", "gt5.4", "sa5.4", "lt5.4", "eb5.4", "ge5.4", "le5.4", "gt5.35",
              f"5.4|{UCUM}|mmol/L", "ge5|http://other.org|mmol/L", "ge5||mmol/L", "ge5||mg/dL",
              "le6||mmol/L", "5.45", "98")
] + [
    ("Observation", [("component-value-quantity", "gt100")],
     lambda r: any(quantity_matches(c.get("valueQuantity"), "gt100") for c in r.get("component", [])
                   if isinstance(c, dict))),
    ("Observation", [("component-value-quantity", "80")],
     lambda r: any(quantity_matches(c.get("valueQuantity"), "80") for c in r.get("component", [])
                   if isinstance(c, dict))),
    ("Observation", [("combo-value-quantity", "gt90")],
     lambda r: quantity_matches(r.get("valueQuantity"), "gt90") or any(
         quantity_matches(c.get("valueQuantity"), "gt90") for c in r.get("component", []) if isinstance(c, dict))),
    ("Observation", [("component-code", "8480-6")], lambda r: any(token_matches(c.get("code"), "8480-6")
                                                                  for c in r.get("component", []) if isinstance(c, dict))),
    ("Observation", [("combo-code", "8462-4,72166-2")],
     lambda r: token_matches(r["code"], "72166-2") or any(token_matches(c.get("code"), "8462-4")
                                                          for c in r.get("component", []) if isinstance(c, dict))),
    ("Observation", [("value-concept", "266919005")],
     lambda r: token_matches(r.get("valueCodeableConcept"), "266919005")),
    ("Observation", [("value-quantity:missing", "true")],
     lambda r: not isinstance((r.get("valueQuantity") or {}).get("value"), (int, float))),
    ("Observation", [("status", "preliminary")], lambda r: r["status"] == "preliminary"),
    ("Observation", [("date", "ge2017")],
     lambda r: date_matches(r, ("effectiveDateTime", "effectivePeriod", "effectiveInstant"), "ge2017")),
    ("Observation", [("date", "eq2016-01")],
     lambda r: date_matches(r, ("effectiveDateTime", "effectivePeriod", "effectiveInstant"), "eq2016-01")),
    ("Observation", [("date", "lt2017-07-07T07:07:08Z")],
     lambda r: date_matches(r, ("effectiveDateTime", "effectivePeriod", "effectiveInstant"), "lt2017-07-07T07:07:08Z")),
    ("Observation", [("date:missing", "true")],
     lambda r: not any(k in r for k in ("effectiveDateTime", "effectivePeriod", "effectiveInstant"))),
    ("Observation", [("encounter", "e2")], lambda r: ref(r, "encounter") == ("Encounter", "e2")),
    ("Observation", [("patient", "pd")], lambda r: ref(r, "subject") == ("Patient", "pd")),
    ("Observation", [("code", f"{LOINC}|2339-0"), ("value-quantity", "lt6")],
     lambda r: token_matches(r["code"], f"{LOINC}|2339-0") and quantity_matches(r.get("valueQuantity"), "lt6")),
]

OTHER_QUERIES: list[Query] = [
    ("Encounter", [("class", "AMB")], lambda r: r["class"]["code"] == "AMB"),
    ("Encounter", [("type", "50849002")], lambda r: token_matches(r.get("type"), "50849002")),
    ("Encounter", [("status", "finished")], lambda r: r["status"] == "finished"),
    ("Encounter", [("date", "ge2011")], lambda r: date_matches(r, ("period",), "ge2011")),
    ("Encounter", [("date", "eq2010-01-10")], lambda r: date_matches(r, ("period",), "eq2010-01-10")),
    ("Encounter", [("patient", "pb")], lambda r: ref(r, "subject") == ("Patient", "pb")),
    ("Provenance", [("recorded", "lt2021")], lambda r: r["recorded"] < "2021"),
    ("Provenance", [("target", "Condition/c3")], lambda r: {"reference": "Condition/c3"} in r["target"]),
    ("Group", [("member", "Patient/pc")], lambda r: {"entity": {"reference": "Patient/pc"}} in r["member"]),
]

ALL_QUERIES = PATIENT_QUERIES + CONDITION_QUERIES + OBSERVATION_QUERIES + OTHER_QUERIES


def _qid(q: Query) -> str:
    return f"{q[0]}?" + "&".join(f"{k}={v}" for k, v in q[1])


@pytest.mark.parametrize("rtype,items,pred", ALL_QUERIES, ids=[_qid(q) for q in ALL_QUERIES])
def test_query_matches_independent_evaluation(store_data, rtype, items, pred):
    store, data = store_data
    everything = {r["id"] for r in data[rtype]}
    expected = {r["id"] for r in data[rtype] if pred(r)}
    if _qid((rtype, items, pred)) != "Condition?code:text=code-less":
        assert expected and expected != everything, "the fixture does not separate this query"
    found = search(store, rtype, items)
    assert sorted(found) == sorted(expected)  # as lists: a resource listed twice fails too


@pytest.mark.parametrize("rtype,items,reference", [
    ("Provenance", [("patient", "pa")], "Patient/pa"),  # v1's target lists Patient/pa twice (two versions)
    ("Group", [("member", "Patient/pa")], "Patient/pa"),  # pa is a member of g1 twice
])
def test_many_valued_references_return_each_resource_once(store_data, rtype, items, reference):
    store, data = store_data
    expected = {r["id"] for r in data[rtype] if reference in orjson.dumps(r).decode()}
    assert expected and expected != {r["id"] for r in data[rtype]}
    found = search(store, rtype, items)
    assert len(found) == len(set(found)) and set(found) == expected


AP = "the 'ap' (approximately) prefix is not supported"
MISSING = ":missing takes true or false"
WHOLE_MESSAGES = (AP, MISSING, "empty reference", "empty value", "empty _id")


@pytest.mark.parametrize("rtype,items,fragment", [
    ("Patient", [("birthdate", "ap1980")], AP),
    ("Observation", [("value-quantity", "ap5")], AP),
    ("Observation", [("value-quantity", "5|x")], "[prefix]number[|system|code]"),
    ("Observation", [("value-quantity", "five")], "not a number"),
    ("Observation", [("value-quantity", "lt100|")], "[prefix]number[|system|code]"),
    ("Observation", [("value-quantity", "Infinity")], "not a number"),
    ("Patient", [("birthdate", "1980-13")], "1980-13"),
    ("Patient", [("identifier", "|")], "empty token"),
    ("Condition", [("patient", " ")], "empty reference"),
    ("Condition", [("patient", "Group/pa")], "Patient resources, not Group"),
    ("Condition", [("encounter:Patient", "pa")], "Encounter resources, not Patient"),
    ("Condition", [("subject:Patient", "Group/pa")], "contradicts the :Patient modifier"),
    ("Condition", [("code", "a,")], "empty value"),
    ("Condition", [("_id", "c1,")], "empty _id"),
    ("Condition", [("code:missing", "maybe")], MISSING),
    ("Condition", [("code:missing", "true,false")], MISSING),
    ("Condition", [("onset-date:text", "x")], "modifier :text is not supported for date parameter onset-date"),
    ("Condition", [("code:exact", "x")], "modifier :exact is not supported for token parameter code"),
    ("Condition", [("subject:patient", "pa")], "modifier :patient is not supported for reference parameter subject"),
    ("Condition", [("_id:missing", "true")], "modifier :missing is not supported for id parameter _id"),
])
def test_bad_values_are_search_errors_naming_the_parameter(store_data, rtype, items, fragment):
    with pytest.raises(SearchError) as err:
        search(store_data[0], rtype, items)
    label = items[0][0]
    assert fragment in err.value.message
    if fragment in WHOLE_MESSAGES:
        assert err.value.message == fragment
    assert err.value.param == label
    assert err.value.where == f"search parameter {label!r}"
    assert str(err.value) == f"search parameter {label!r}: {err.value.message}"


# ---------------------------------------------------------------- what the store keeps per resource

def test_patient_compartment_of_each_resource(store_data):
    """resources.patient (the $everything / Patient/$export compartment) against the references in the JSON."""
    store, data = store_data
    stored = dict(((t, i), p) for t, i, p in store.query("SELECT type, id, patient FROM resources"))
    for rtype, resources in data.items():
        for r in resources:
            if rtype == "Patient":
                want = r["id"]
            elif rtype == "Provenance":
                targets = [ref({"t": t}, "t") for t in r["target"]]
                want = next((i for t, i in filter(None, targets) if t == "Patient"), None)
            elif rtype == "Group":
                want = None
            else:
                subject = ref(r, "subject")
                want = subject[1] if subject and subject[0] == "Patient" else None
            assert stored[(rtype, r["id"])] == want, f"{rtype}/{r['id']}"
    assert {p for p in stored.values()} - {None} == {"pa", "pb", "pc", "pd", "pe", "pf"}
    assert stored[("Condition", "c7")] is None and stored[("Provenance", "v2")] == "pb"


def test_sort_date_is_the_start_of_each_types_date(store_data):
    """resources.sort_date (what _sort=birthdate / date / onset-date orders by) is the start of the type's date."""
    store, data = store_data
    stored = dict(((t, i), d) for t, i, d in store.query("SELECT type, id, sort_date FROM resources"))
    keys = {"Patient": ("birthDate",), "Condition": ONSET, "Observation": ("effectiveDateTime", "effectivePeriod",
                                                                           "effectiveInstant"),
            "Encounter": ("period",), "Provenance": ("recorded",)}
    missing = []
    for rtype, resources in data.items():
        for r in resources:
            have = element_span(r, *keys[rtype]) if rtype in keys else None
            if have is None or have[0] == LOW:
                missing.append(f"{rtype}/{r['id']}")
                assert stored[(rtype, r["id"])] < -1e17, f"{rtype}/{r['id']} has no start"
            else:
                assert stored[(rtype, r["id"])] == pytest.approx(have[0].timestamp()), f"{rtype}/{r['id']}"
    assert sorted(missing) == ["Condition/c8", "Group/all", "Group/g1", "Group/g2", "Observation/o10", "Patient/pe"]


@pytest.mark.parametrize("sort", ["birthdate", "-birthdate"])
def test_sort_by_birthdate_follows_the_json(store_data, sort):
    store, data = store_data
    dated = sorted((r for r in data["Patient"] if "birthDate" in r), key=lambda r: span(r["birthDate"])[0],
                   reverse=sort.startswith("-"))
    found = search(store, "Patient", [("birthdate:missing", "false"), ("_sort", sort)])
    assert found == [r["id"] for r in dated]


@pytest.mark.parametrize("rtype,name,values,modifier,joins", [
    ("Condition", "patient", ["pa"], None, True),
    ("Observation", "subject", ["Patient/pa"], "Patient", True),
    ("Condition", "encounter", ["e1"], None, True),
    ("Condition", "patient", ["pa", "pb"], None, False),  # one index row per value: the join would drop pb
    ("Condition", "patient", ["true"], "missing", False),
    ("Provenance", "patient", ["pa"], None, False),  # many targets: a join would repeat a Provenance
    ("Group", "member", ["Patient/pa"], None, False),
    ("Condition", "code", ["pa"], None, False),
])
def test_index_join_only_for_single_reference_elements(store_data, rtype, name, values, modifier, joins):
    """compile_join drives patient=X from idx_reference (10x faster at p99); where it applies, the join alone
    selects exactly the resources the JSON says, in rid order."""
    from fhirsynth.store.params import PARAMS
    from fhirsynth.store.query import Clause, compile_join

    store, data = store_data
    join = compile_join(Clause(name, PARAMS[rtype][name], modifier, values))
    assert (join is not None) == joins
    if join is None:
        return
    rows = store.query(f"SELECT r.id FROM idx_reference x JOIN resources r ON r.rid = x.rid WHERE {join[0]} "
                       "AND r.type = ? ORDER BY x.rid", [*join[1], rtype])
    key = "encounter" if name == "encounter" else "subject"
    want_type = "Encounter" if name == "encounter" else "Patient"
    expected = [r["id"] for r in data[rtype] if ref(r, key) == (want_type, values[0].split("/")[-1])]
    assert expected and [i for (i,) in rows] == expected


def test_subject_type_modifier_narrows_the_index_join(store_data):
    """subject:Patient=pa must not match Condition c7, whose subject is Group/pa (same id, other type)."""
    store, data = store_data
    found = search(store, "Condition", [("subject:Patient", "pa")])
    assert "c7" not in found and set(found) == {"c1", "c2"}
    assert "c7" in search(store, "Condition", [("subject", "pa")])
