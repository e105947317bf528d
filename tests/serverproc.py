"""A real `fhirsynth serve` process on a free loopback port, for tests that need a live server."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, base: str, proc: subprocess.Popen) -> None:
        self.base = base
        self.proc = proc
        self.stderr = ""  # filled in when the server has stopped


@contextmanager
def serving(proc: subprocess.Popen, probe_url: str, *, start_timeout_s: float = 30) -> Iterator[None]:
    """Wait until probe_url answers 200 (the test fails if the process ends or the wait times out, with the
    process's stderr), and stop the process when the block ends. The process's stderr must be a pipe."""
    deadline = time.monotonic() + start_timeout_s
    while True:
        try:
            if httpx.get(probe_url, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.stderr.read().decode(errors='replace')[-2000:]}")
        time.sleep(0.2)
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def running_server(serve_args: Sequence[str | Path], env: dict[str, str], *,
                   start_timeout_s: float = 30) -> Iterator[ServerProcess]:
    """Start `fhirsynth -q serve ARGS --port P`, wait for /metadata, stop it on exit (stderr kept for checks)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fhirsynth", "-q", "serve", *map(str, serve_args),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    server = ServerProcess(f"http://127.0.0.1:{port}", proc)
    try:
        with serving(proc, f"{server.base}/metadata", start_timeout_s=start_timeout_s):
            yield server
    finally:
        server.stderr = proc.stderr.read().decode(errors="replace")
