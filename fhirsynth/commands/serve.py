"""`fhirsynth serve (--data EXPORT_DIR | --model MODEL_DIR -n N) [--db PATH] [--host] [--port]`: the FHIR server."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from fhirsynth.errors import ModelDirError, UsageError

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve synthetic patients over a read-only FHIR R4 REST API")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", type=Path, metavar="EXPORT_DIR", help="load an export dir (NDJSON + manifest.json)")
    src.add_argument("--model", type=Path, metavar="MODEL_DIR",
                     help="generate -n patients from this model at start; also enables POST /Patient/$synthesize")
    p.add_argument("-n", type=int, default=None, help="patients to generate at start with --model")
    p.add_argument("--seed", type=int, default=1, help="sampling seed for --model (default 1)")
    p.add_argument("--db", type=Path, default=None,
                   help="SQLite database file (default: a temporary file); rebuilt when --data/--model is given, "
                        "served as is otherwise")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--token", default=os.environ.get("FHIRSYNTH_SERVER_TOKEN"),
                   help="require 'Authorization: Bearer TOKEN' (default: env FHIRSYNTH_SERVER_TOKEN; none = open)")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; '*' for any)")
    p.add_argument("--report", type=Path, default=None, metavar="REPORT_DIR",
                   help="a `fhirsynth evaluate` output dir, published at GET /$privacy-report")
    p.add_argument("--max-count", type=int, default=1000, help="largest _count; larger values are clamped")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fhirsynth.api.errors import ApiError
    from fhirsynth.api.settings import ServerSettings
    from fhirsynth.api.synthesize import SynthesizeRequest, synthesize_into
    from fhirsynth.store.loader import build_store
    from fhirsynth.store.sqlite import Store

    if args.model is not None and not args.n:
        raise UsageError("--model needs -n N (patients to generate at start)", where="-n")
    if args.model is None and args.n:
        raise UsageError("-n only goes with --model", where="-n")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"port must be 1-65535, got {args.port}", where="--port")
    _check_bind(args.host, args.port)
    tmpdir = None
    db = args.db
    if db is None:
        if args.data is None and args.model is None:
            raise UsageError("give --data EXPORT_DIR, --model MODEL_DIR -n N, or --db of an existing store")
        tmpdir = tempfile.TemporaryDirectory(prefix="fhirsynth-serve-")
        db = Path(tmpdir.name) / "store.sqlite"
    try:
        if args.data is not None:
            store, summary = build_store(args.data, db)
            log.info("loaded %s from %s", summary["loaded"], args.data)
        elif args.model is not None:
            if not args.model.is_dir():
                raise ModelDirError("model directory does not exist", where=str(args.model))
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            store = Store(db)
            try:
                bodies = synthesize_into(store, args.model, SynthesizeRequest(count=args.n, seed=args.seed))
            except ApiError as exc:
                raise ModelDirError(exc.message, where=str(args.model)) from None
            log.info("generated %d resources for %d patients", len(bodies), args.n)
        else:
            if not db.is_file():
                raise UsageError("no such store database (give --data or --model to build one)", where=str(db))
            store = Store(db)
        settings = ServerSettings(db_path=db, model_dir=args.model, token=args.token, cors_origins=args.cors,
                                  max_count=args.max_count, report_dir=args.report)
        _run_server(settings, store, args.host, args.port)
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()
    return 0


def _check_bind(host: str, port: int) -> None:
    """Fail before loading anything when the address is taken (uvicorn would only log and exit 1)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve {host!r}: {exc}", where="--host") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}", where="--port") from None


def _run_server(settings, store, host: str, port: int) -> None:
    import uvicorn

    from fhirsynth.api.app import create_app

    app = create_app(settings, store=store)
    log.info("serving FHIR R4 at http://%s:%d/ (store %s)", host, port, settings.db_path)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def serve_export(export_dir: Path, *, db: Path, host: str = "127.0.0.1", port: int = 8080,
                 model_dir: Path | None = None, token: str | None = None, report_dir: Path | None = None) -> None:
    """Build a store from an export dir (atomically, at db) and serve it until interrupted (used by `demo`)."""
    from fhirsynth.api.settings import ServerSettings
    from fhirsynth.store.loader import build_store

    store, summary = build_store(export_dir, db)
    log.info("loaded %s from %s", summary["loaded"], export_dir)
    _run_server(ServerSettings(db_path=Path(db), model_dir=model_dir, token=token, report_dir=report_dir), store,
                host, port)
