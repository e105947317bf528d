"""SQLite store with FHIR search-parameter index tables (see sqlite.py, params.py, query.py, loader.py)."""
