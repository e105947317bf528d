"""Named pause points that let crash-safety tests kill a command at a chosen moment, deterministically.

With FHIRSYNTH_PAUSE_AT=NAME in the environment, the first call of pause_point(NAME) writes the process id to the
file FHIRSYNTH_PAUSE_MARKER (when set) and sleeps FHIRSYNTH_PAUSE_SECONDS (default 600), long enough for the test
to SIGKILL it; then it carries on. Without the variable it costs one dict lookup. Never set it in production.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_fired: set[str] = set()


def pause_point(name: str) -> None:
    if os.environ.get("FHIRSYNTH_PAUSE_AT") != name or name in _fired:
        return
    _fired.add(name)
    marker = os.environ.get("FHIRSYNTH_PAUSE_MARKER")
    if marker:
        Path(marker).write_text(str(os.getpid()))
    time.sleep(float(os.environ.get("FHIRSYNTH_PAUSE_SECONDS", "600")))
