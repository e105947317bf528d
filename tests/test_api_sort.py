"""Several _sort keys (`_sort=birthdate,-_id`): order, paging forward and back across ties, bad keys, cursors."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient

from fhirsynth.api.app import create_app
from fhirsynth.api.settings import ServerSettings
from fhirsynth.store.dates import date_range
from fhirsynth.store.loader import build_store


@pytest.fixture(scope="module")
def patients(fixtures_dir: Path) -> list[dict]:
    lines = (fixtures_dir / "server" / "export" / "Patient.ndjson").read_bytes().splitlines()
    return [orjson.loads(x) for x in lines if x.strip()]


@pytest.fixture(scope="module")
def client(tmp_path_factory, fixtures_dir: Path):
    db = tmp_path_factory.mktemp("sort") / "store.db"
    store, _ = build_store(fixtures_dir / "server" / "export", db)
    with TestClient(create_app(ServerSettings(db_path=db), store=store)) as c:
        yield c


def _get(client: TestClient, url: str, params=None, status: int = 200) -> dict:
    r = client.get(url.replace("http://testserver", ""), params=params)
    assert r.status_code == status, r.text
    return r.json()


def _link(bundle: dict, rel: str) -> str | None:
    return next((lk["url"] for lk in bundle["link"] if lk["relation"] == rel), None)


def _expected(patients: list[dict], birth_desc: bool, id_desc: bool) -> list[str]:
    # two stable passes: secondary key first, then the primary
    rows = sorted(patients, key=lambda p: p["id"], reverse=id_desc)
    rows = sorted(rows, key=lambda p: date_range(p["birthDate"])[0], reverse=birth_desc)
    return [p["id"] for p in rows]


@pytest.mark.parametrize("sort,birth_desc,id_desc", [("birthdate,-_id", False, True), ("-birthdate,_id", True, False),
                                                     ("birthdate,_id", False, False)])
def test_two_keys_paged_forward_and_back(client, patients, sort, birth_desc, id_desc):
    births = [date_range(p["birthDate"])[0] for p in patients]
    assert len(set(births)) < len(births)  # the fixture has ties, so the second key matters
    want = _expected(patients, birth_desc, id_desc)
    pages, url = [], None
    bundle = _get(client, "/Patient", {"_sort": sort, "_count": 2})
    while True:
        pages.append([e["resource"]["id"] for e in bundle.get("entry", [])])
        assert bundle["total"] == len(patients)
        url = _link(bundle, "next")
        if url is None:
            break
        assert "_sort=" in url
        bundle = _get(client, url)
    assert [i for p in pages for i in p] == want
    # walk back from the last page with the previous links: the same pages in reverse
    back = [pages[-1]]
    while (url := _link(bundle, "previous")) is not None:
        bundle = _get(client, url)
        back.append([e["resource"]["id"] for e in bundle["entry"]])
    assert back[::-1] == pages


def test_second_key_breaks_ties_only(client, patients):
    one = [e["resource"]["id"] for e in _get(client, "/Patient", {"_sort": "birthdate", "_count": 50})["entry"]]
    two = [e["resource"]["id"] for e in _get(client, "/Patient", {"_sort": "birthdate,-_id",
                                                                   "_count": 50})["entry"]]
    birth = {p["id"]: date_range(p["birthDate"])[0] for p in patients}
    assert [birth[i] for i in one] == [birth[i] for i in two]  # same primary order
    assert one != two  # ties resolved differently (rid order vs descending id)


def test_bad_sort_lists(client):
    for bad in ("_id,-_id", "birthdate,", ",_id", "birthdate,gender"):
        oo = _get(client, "/Patient", {"_sort": bad}, status=400)
        assert oo["resourceType"] == "OperationOutcome" and oo["issue"][0]["expression"] == ["_sort"]


def test_cursor_from_another_sort_is_a_400(client):
    first = _get(client, "/Patient", {"_sort": "birthdate,-_id", "_count": 2})
    cursor = _link(first, "next").split("_cursor=")[1]
    # the same cursor under a single-key sort, and a forged one with the wrong number of keys
    _get(client, "/Patient", {"_sort": "birthdate", "_count": 2, "_cursor": cursor}, status=400)
    raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    raw[1] = raw[1][:1]
    forged = base64.urlsafe_b64encode(json.dumps(raw).encode()).decode().rstrip("=")
    _get(client, "/Patient", {"_sort": "birthdate,-_id", "_count": 2, "_cursor": forged}, status=400)
