"""Named pause points that let tests stop a command at a chosen moment, deterministically.

With FHIRSYNTH_PAUSE_AT=NAME in the environment, the first call of pause_point(NAME) writes the process id to the
file FHIRSYNTH_PAUSE_MARKER (when set), then waits until the file FHIRSYNTH_PAUSE_RELEASE exists (when set) or
FHIRSYNTH_PAUSE_SECONDS (default 600) pass, and carries on. Crash tests SIGKILL the process while it waits;
in-process tests release it. Without the variable it costs one dict lookup. Never set it in production.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_fired: set[tuple[str, str]] = set()  # one pause per (point, marker): a new marker file re-arms a point


def pause_point(name: str) -> None:
    if os.environ.get("FHIRSYNTH_PAUSE_AT") != name:
        return
    marker = os.environ.get("FHIRSYNTH_PAUSE_MARKER", "")
    if (name, marker) in _fired:
        return
    _fired.add((name, marker))
    if marker:
        Path(marker).write_text(str(os.getpid()))
    release = os.environ.get("FHIRSYNTH_PAUSE_RELEASE")
    deadline = time.monotonic() + float(os.environ.get("FHIRSYNTH_PAUSE_SECONDS", "600"))
    while time.monotonic() < deadline:
        if release and Path(release).exists():
            return
        time.sleep(0.02)
