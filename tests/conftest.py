"""Shared test fixtures. Tests that need ../shared/data use `shared_data` and skip cleanly without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "fixtures"
SHARED_DATA = Path(os.environ.get("FHIRSYNTH_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "us" / "ndjson").is_dir():
        pytest.skip(f"shared cohorts not present at {SHARED_DATA}")
    return SHARED_DATA
