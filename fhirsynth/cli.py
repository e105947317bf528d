"""The `fhirsynth` command. Each subcommand lives in fhirsynth/commands/<name>.py and exposes
`add_parser(subparsers) -> argparse.ArgumentParser` that sets `func=run` where run(args) -> int.
Command modules import heavy libraries (torch, fastapi) inside run() so `--help` stays fast.

Errors: FhirsynthError -> one line on stderr, exit 2. KeyboardInterrupt -> exit 130. Anything else is a bug:
one line plus a hint to rerun with -v for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from fhirsynth import __version__
from fhirsynth.errors import FhirsynthError
from fhirsynth.logs import configure_logging

COMMANDS: tuple[str, ...] = ("ingest", "train", "generate", "serve", "evaluate", "load", "demo")

log = logging.getLogger("fhirsynth")


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one clear line (argparse's default also exits 2 but prints usage first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"fhirsynth {self.prog.split()[-1]}: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fhirsynth", description="Differentially private synthetic FHIR R4 patients.")
    parser.add_argument("--version", action="version", version=f"fhirsynth {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v: debug, tracebacks)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"fhirsynth.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"fhirsynth.commands.{name}":
                continue  # command not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    configure_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except FhirsynthError as exc:
        if args.verbose:
            log.exception("failed")
        sys.stderr.write(f"fhirsynth {args.command}: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"fhirsynth {args.command}: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - the one place bugs are turned into a readable line
        if args.verbose:
            log.exception("internal error")
        sys.stderr.write(
            f"fhirsynth {args.command}: internal error: {type(exc).__name__}: {exc} (rerun with -v for details)\n"
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
