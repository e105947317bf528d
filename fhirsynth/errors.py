"""One exception hierarchy. The CLI catches FhirsynthError once and turns it into one stderr line + exit 2."""

from __future__ import annotations


class FhirsynthError(Exception):
    """Base of every error that is the user's input or environment, not a bug.

    `where` names the place (file:line, resource id, parameter) so the message says what and where.
    """

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class UsageError(FhirsynthError):
    """Bad command-line usage (flag values, missing paths)."""


class InputError(FhirsynthError):
    """Bad input data (unreadable file, invalid JSON, not FHIR, ...)."""


class StrictModeError(InputError):
    """--strict was given and some resources were skipped."""


class MappingError(FhirsynthError):
    """A mapping TOML file is invalid. Carries every problem found, not just the first."""

    def __init__(self, problems: list[str], *, where: str | None = None) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems), where=where)


class ModelDirError(FhirsynthError):
    """A model directory is missing files, corrupt, or from an incompatible version."""


class PrivacyBudgetError(FhirsynthError):
    """Privacy parameters are invalid or the requested budget cannot be met."""


class ValidationError(FhirsynthError):
    """An emitted FHIR resource failed validation (a bug in assembly, reported with the resource id)."""


class ExportError(FhirsynthError):
    """Writing an export failed."""


class LoadError(FhirsynthError):
    """Loading bundles into a remote FHIR server failed for some bundles."""


class StoreError(FhirsynthError):
    """The SQLite store refused a resource or could not be opened."""
