"""Bulk-export style NDJSON: one file per resource type, split when a file reaches a size limit.

Parts are written under hidden temp names while streaming; finish() renames them to `<Type>.ndjson`
(or `<Type>.<k>.ndjson` for k = 1.. when a type needed several parts) and returns the manifest outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from fhirsynth.export.atomic import AtomicWriter

DEFAULT_MAX_FILE_BYTES = 512 << 20  # uncompressed bytes per file before a new part is started


class NdjsonWriter:
    def __init__(self, out_dir: Path, *, gzip_output: bool = False, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        if max_file_bytes <= 0:
            raise ValueError("max_file_bytes must be positive")
        self.out_dir = Path(out_dir)
        self.gzip = gzip_output
        self.max_file_bytes = max_file_bytes
        self._open: dict[str, AtomicWriter] = {}
        self._parts: dict[str, list[tuple[AtomicWriter, int]]] = {}  # type -> [(closed writer, count)]
        self._counts: dict[str, int] = {}

    def _writer(self, rtype: str) -> AtomicWriter:
        w = self._open.get(rtype)
        if w is not None and w.bytes_written >= self.max_file_bytes:
            self._parts[rtype].append((w, self._counts.pop(rtype)))
            w.finish()
            w = None
        if w is None:
            k = len(self._parts.setdefault(rtype, [])) + 1
            w = self._open[rtype] = AtomicWriter(self.out_dir / f"{rtype}.{k}{self._suffix}", gzip_output=self.gzip)
            self._counts[rtype] = 0
        return w

    @property
    def _suffix(self) -> str:
        return ".ndjson.gz" if self.gzip else ".ndjson"

    def write_resources(self, resources: list[dict[str, Any]]) -> int:
        """Append resources; consecutive resources of one type are joined into one write."""
        dumps = orjson.dumps
        i, n = 0, len(resources)
        while i < n:
            rtype = resources[i]["resourceType"]
            j = i + 1
            while j < n and resources[j]["resourceType"] == rtype:
                j += 1
            w = self._writer(rtype)
            w.write(b"\n".join(dumps(r) for r in resources[i:j]) + b"\n")
            self._counts[rtype] += j - i
            i = j
        return n

    def finish(self) -> list[dict[str, Any]]:
        """Rename every part into place; returns manifest `output` items (Patient first, then by type name)."""
        for rtype, w in list(self._open.items()):
            self._parts[rtype].append((w, self._counts.pop(rtype)))
        self._open.clear()
        outputs: list[dict[str, Any]] = []
        for rtype in sorted(self._parts, key=lambda t: (t != "Patient", t)):
            parts = self._parts[rtype]
            for k, (w, count) in enumerate(parts, start=1):
                name = f"{rtype}{self._suffix}" if len(parts) == 1 else f"{rtype}.{k}{self._suffix}"
                w.commit(self.out_dir / name)
                outputs.append({"type": rtype, "url": name, "count": count})
        self._parts.clear()
        return outputs

    def abort(self) -> None:
        for w in self._open.values():
            w.abort()
        for parts in self._parts.values():
            for w, _ in parts:
                w.abort()
        self._open.clear()
        self._parts.clear()
