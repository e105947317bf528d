"""Streaming FHIR readers: files and directories of Bundles, NDJSON, their .gz, and bulk-export manifests.

Resources stay plain dicts (orjson) on this hot path. NDJSON is read in large chunks and split into lines, so a
huge file never sits in memory; a Bundle is parsed whole with orjson unless it is larger than
STREAM_BUNDLE_BYTES, in which case it is streamed entry by entry with ijson (two passes: fullUrls first, so
`urn:uuid:` references resolve, then entries).

Problems (invalid JSON, a non-resource object, an unreadable file) are handed to `on_problem(reason, where,
detail)` and reading goes on, so one bad line never hides the rest of the input.

gzip is decompressed with zlib directly (not GzipFile) so a truncated or corrupt .gz still yields every complete
line before the damage; the cut-off line is reported as "truncated_gzip" / "corrupt_gzip" with file:line.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlparse

import orjson

from fhirsynth.errors import InputError
from fhirsynth.fhir.refs import id_from_full_url

log = logging.getLogger(__name__)

BOM = b"\xef\xbb\xbf"
CHUNK = 1 << 22
GZ_READ = 1 << 18  # compressed bytes per read; each yields at most CHUNK decompressed bytes (bounded memory)
STREAM_BUNDLE_BYTES = 256 << 20  # larger Bundles are streamed with ijson (when installed)
_SUFFIXES = (".json", ".ndjson", ".jsonl")

ProblemSink = Callable[[str, str, str], None]


@dataclass(frozen=True, slots=True)
class SourceFile:
    path: Path
    fmt: str  # "ndjson" | "json"

    @property
    def gz(self) -> bool:
        return self.path.name.lower().endswith(".gz")


# One resource and where it came from, as a plain tuple (cheaper than a NamedTuple on the hot path):
# (file_idx, line: 1-based NDJSON line or 0 for a whole-file document, entry: Bundle entry index or -1,
#  resource dict, refs: the enclosing Bundle's fullUrl -> "Type/id" map or None)
Record = tuple[int, int, int, dict, "dict[str, str] | None"]


def _fmt_for(name: str) -> str | None:
    low = name.lower()
    if low.endswith(".gz"):
        low = low[:-3]
    if low.endswith((".ndjson", ".jsonl")):
        return "ndjson"
    if low.endswith(".json"):
        return "json"
    return None


def discover_inputs(inputs: list[str | os.PathLike]) -> list[SourceFile]:
    """Expand files, directories (recursive, hidden entries skipped) and manifest.json into readable files.

    Raises InputError for a missing path, an unreadable manifest or when nothing readable is found.
    """
    out: list[SourceFile] = []
    seen: set[Path] = set()
    ignored = 0

    def add(path: Path, fmt: str) -> None:
        key = path.resolve()
        if key in seen:
            return
        seen.add(key)
        if path.name.lower() == "manifest.json":
            for sub in read_manifest(path):
                add(sub, _fmt_for(sub.name) or "ndjson")
            return
        out.append(SourceFile(path, fmt))

    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise InputError("input path does not exist", where=str(path))
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    fmt = _fmt_for(name)
                    if fmt is None or name.startswith("."):
                        ignored += 1
                        continue
                    add(Path(root) / name, fmt)
        else:
            # an explicitly named file is read whatever its suffix: sniffed as JSON, then NDJSON
            add(path, _fmt_for(path.name) or "json")
    if ignored:
        log.info("ignored %d file(s) without a .json/.ndjson/.jsonl(.gz) suffix", ignored)
    if not out:
        names = ", ".join(str(p) for p in inputs)
        raise InputError("no readable FHIR input (expected *.json, *.ndjson, *.json.gz, *.ndjson.gz or a "
                         "bulk-export manifest.json)", where=names)
    return out


def read_manifest(path: Path) -> list[Path]:
    """Files listed in a bulk-export manifest's output[] (urls relative to the manifest's folder)."""
    try:
        data = orjson.loads(path.read_bytes().removeprefix(BOM))
    except orjson.JSONDecodeError as exc:
        raise InputError(f"invalid JSON in bulk-export manifest: {exc.msg}", where=f"{path}:{exc.lineno}") from None
    except OSError as exc:
        raise InputError(f"cannot read manifest: {exc.strerror}", where=str(path)) from None
    outputs = data.get("output") if isinstance(data, dict) else None
    if not isinstance(outputs, list):
        raise InputError("not a bulk-export manifest: no output[] list", where=str(path))
    files: list[Path] = []
    for i, item in enumerate(outputs):
        url = item.get("url") if isinstance(item, dict) else None
        if not isinstance(url, str) or not url:
            raise InputError(f"output[{i}] has no url", where=str(path))
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https"):
            raise InputError(f"output[{i}].url is remote ({url}); download the files and list them locally",
                             where=str(path))
        local = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(url)
        if not local.is_absolute():
            local = path.parent / local
        if not local.is_file():
            raise InputError(f"output[{i}].url points to a missing file: {local}", where=str(path))
        files.append(local)
    return files


class _Progress:
    """Counts compressed bytes read from each underlying file for the progress bar."""

    def __init__(self, callback: Callable[[int], None] | None) -> None:
        self.callback = callback
        self.last = 0

    def update(self, raw: IO[bytes]) -> None:
        if self.callback is None:
            return
        pos = raw.tell()
        if pos > self.last:
            self.callback(pos - self.last)
            self.last = pos


def _gz_size(path: Path) -> int | None:
    """Uncompressed size from the gzip trailer (mod 2**32; good enough to pick a parse strategy).

    None when the trailer cannot be right: deflate expands at most ~1032:1, so a bigger claim means the file
    is cut short and those 4 bytes are compressed data."""
    try:
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            size = int.from_bytes(fh.read(4), "little")
            return size if size <= 1100 * fh.tell() else None
    except OSError:
        return None


class ResourceReader:
    """Iterate Records over a list of SourceFiles; problems go to `on_problem`."""

    def __init__(
        self,
        files: list[SourceFile],
        on_problem: ProblemSink,
        *,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self.files = files
        self.on_problem = on_problem
        self.on_bytes = on_bytes
        self.bundles = 0
        self.entries_without_resource = 0

    def where(self, file_idx: int, line: int, entry: int) -> str:
        text = str(self.files[file_idx].path)
        if line:
            text += f":{line}"
        if entry >= 0:
            text += f" entry[{entry}]"
        return text

    def __iter__(self) -> Iterator[Record]:
        for idx, src in enumerate(self.files):
            try:
                if src.fmt == "ndjson":
                    yield from self._read_ndjson(idx, src)
                else:
                    yield from self._read_json(idx, src)
            except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
                self.on_problem("unreadable_file", str(src.path), f"{type(exc).__name__}: {exc}")

    # -- NDJSON -------------------------------------------------------------------------------------------
    def _read_ndjson(self, idx: int, src: SourceFile) -> Iterator[Record]:
        prog = _Progress(self.on_bytes)
        with open(src.path, "rb") as raw:
            if not src.gz:
                yield from self._parse_lines(idx, src, _iter_chunks(raw, lambda: prog.update(raw)))
                return
            gz = Gunzip(raw)
            lines = yield from self._parse_lines(idx, src, _iter_chunks(gz, lambda: prog.update(raw), gz.keep_tail))
        if gz.problem is not None:
            self._report_gz(src, gz, lines)

    def _report_gz(self, src: SourceFile, gz: Gunzip, lines: int) -> None:
        """One problem for the damaged end of a .gz, at the first line not read (file:line)."""
        reason, why = gz.problem  # type: ignore[misc]
        kept = f"lines 1-{lines} were read" if lines else "no complete line could be read"
        if gz.partial:
            kept += f"; line {lines + 1} is cut off after {gz.partial} bytes and skipped"
        self.on_problem(reason, f"{src.path}:{lines + 1}", f"{why}; {kept}; anything after it is missing")

    def _report_gz_document(self, src: SourceFile, gz: Gunzip, outcome: str) -> None:
        """The damage of a whole-file .json.gz, at the file (a document has no lines), and what it cost."""
        reason, why = gz.problem  # type: ignore[misc]
        self.on_problem(reason, str(src.path), f"{why}; {outcome}")

    def _parse_lines(self, idx: int, src: SourceFile, chunks: Iterator[list[bytes]]) -> Generator[Record, None, int]:
        """Lines arrive in lists (one per read chunk) so the per-line cost is one loop step, not a generator.

        Returns the number of lines consumed (so a caller can say where a truncated file stops)."""
        loads = orjson.loads
        decode_error = orjson.JSONDecodeError
        lineno = 0
        for lines in chunks:
            for text in lines:
                lineno += 1
                try:
                    obj = loads(text)
                except decode_error as exc:
                    if not text.strip():
                        continue
                    self.on_problem("invalid_json", f"{src.path}:{lineno}", f"column {exc.colno}: {exc.msg}")
                    continue
                rtype = obj.get("resourceType") if type(obj) is dict else None
                if type(rtype) is str and rtype != "Bundle":
                    yield (idx, lineno, -1, obj, None)
                else:
                    yield from self._expand(idx, lineno, obj)
        return lineno

    # -- whole-file JSON ----------------------------------------------------------------------------------
    def _read_json(self, idx: int, src: SourceFile) -> Iterator[Record]:
        size = _gz_size(src.path) if src.gz else src.path.stat().st_size
        if size is not None and size > STREAM_BUNDLE_BYTES and _ijson() is not None:
            yield from self._stream_bundle(idx, src)
            return
        gz: Gunzip | None = None
        with open(src.path, "rb") as raw:
            if src.gz:
                gz = Gunzip(raw)
                data = gz.read()
            else:
                data = raw.read()
            if self.on_bytes:
                self.on_bytes(raw.tell())
        data = data.removeprefix(BOM)
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            # a *.json that is really NDJSON (one resource per line) is read as such
            first, _, rest = data.strip().partition(b"\n")
            if rest and _is_json_object(first):
                lines = data.split(b"\n")
                if gz is not None and gz.problem is not None and not gz.keep_tail(lines[-1]):
                    lines.pop()
                n = yield from self._parse_lines(idx, src, iter([lines]))
                if gz is not None and gz.problem is not None:
                    self._report_gz(src, gz, n)
                return
            if gz is not None and gz.problem is not None:
                # a document cut off mid-way cannot be parsed at all: one problem naming the file and the damage
                self._report_gz_document(src, gz, f"the JSON document ends after {len(data)} decompressed bytes "
                                         "and cannot be read")
                return
            self.on_problem("invalid_json", f"{src.path}:{exc.lineno}", f"column {exc.colno}: {exc.msg}")
            return
        del data
        if gz is not None and gz.problem is not None:
            # only the gzip trailer is damaged: the document itself is whole, so it is read, and the damage reported
            self._report_gz_document(src, gz, "the JSON document itself is complete")
        yield from self._expand(idx, 0, obj)

    def _expand(self, idx: int, line: int, obj: object) -> Iterator[Record]:
        where = self.where(idx, line, -1)
        if type(obj) is not dict or not isinstance(obj.get("resourceType"), str):
            self.on_problem("not_fhir_resource", where, "a JSON value without a resourceType")
            return
        if obj["resourceType"] != "Bundle":
            yield (idx, line, -1, obj, None)
            return
        self.bundles += 1
        entries = obj.get("entry") or []
        if not isinstance(entries, list):
            self.on_problem("not_fhir_resource", where, "Bundle.entry is not a list")
            return
        refs = bundle_refs(entries)
        for i, entry in enumerate(entries):
            res = entry.get("resource") if type(entry) is dict else None
            if res is None:
                self.entries_without_resource += 1  # e.g. a DELETE in a transaction: nothing to read
                continue
            if type(res) is not dict or not isinstance(res.get("resourceType"), str):
                self.on_problem("not_fhir_resource", self.where(idx, line, i), "entry.resource has no resourceType")
                continue
            if res["resourceType"] == "Bundle":
                yield from self._expand(idx, line, res)
                continue
            if not res.get("id"):
                full = entry.get("fullUrl")
                if isinstance(full, str) and (rid := id_from_full_url(full)):
                    res["id"] = rid
            yield (idx, line, i, res, refs)

    def _stream_bundle(self, idx: int, src: SourceFile) -> Iterator[Record]:
        """A Bundle too large for one orjson parse: read fullUrls, then entries, with ijson."""
        ijson = _ijson()
        refs: dict[str, str] = {}
        gz: Gunzip | None = None
        try:
            with open(src.path, "rb") as raw:
                gz = Gunzip(raw) if src.gz else None
                fh: IO[bytes] | Gunzip = gz or raw
                cur: dict[str, str] = {}
                for prefix, event, value in ijson.parse(fh):
                    if prefix == "entry.item" and event == "end_map":
                        _add_ref(refs, cur.get("fullUrl"), cur.get("rt"), cur.get("id"))
                        cur = {}
                    elif prefix == "entry.item.fullUrl":
                        cur["fullUrl"] = value
                    elif prefix == "entry.item.resource.resourceType":
                        cur["rt"] = value
                    elif prefix == "entry.item.resource.id":
                        cur["id"] = value
            self.bundles += 1
            with open(src.path, "rb") as raw:
                prog = _Progress(self.on_bytes)
                gz = Gunzip(raw) if src.gz else None
                fh = gz or raw
                for i, entry in enumerate(ijson.items(fh, "entry.item", use_float=True)):
                    if i % 1000 == 0:
                        prog.update(raw)
                    res = entry.get("resource") if isinstance(entry, dict) else None
                    if res is None:
                        self.entries_without_resource += 1
                        continue
                    if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
                        self.on_problem("not_fhir_resource", self.where(idx, 0, i),
                                        "entry.resource has no resourceType")
                        continue
                    if not res.get("id") and isinstance(entry.get("fullUrl"), str):
                        if rid := id_from_full_url(entry["fullUrl"]):
                            res["id"] = rid
                    yield (idx, 0, i, res, refs)
            if gz is not None and gz.problem is not None:  # only the trailer is missing: entries all read
                self._report_gz_document(src, gz, "the Bundle itself is complete")
        except ijson.JSONError as exc:
            if gz is not None and gz.problem is not None:
                self._report_gz_document(src, gz, "the Bundle is cut off and cannot be read")
            else:
                self.on_problem("invalid_json", str(src.path), f"{exc}")


def bundle_refs(entries: list) -> dict[str, str]:
    """fullUrl -> "Type/id" for every entry, so Bundle-local references resolve."""
    refs: dict[str, str] = {}
    for entry in entries:
        if type(entry) is not dict:
            continue
        res = entry.get("resource")
        if type(res) is dict:
            _add_ref(refs, entry.get("fullUrl"), res.get("resourceType"), res.get("id"))
    return refs


def _add_ref(refs: dict[str, str], full: object, rtype: object, rid: object) -> None:
    if not isinstance(full, str) or not isinstance(rtype, str):
        return
    if not isinstance(rid, str) or not rid:
        rid = id_from_full_url(full)
    if rid:
        refs[full] = f"{rtype}/{rid}"


def _ijson():  # noqa: ANN202 - optional dependency
    try:
        import ijson  # type: ignore[import-not-found]
    except ImportError:
        return None
    return ijson


def _is_json_object(text: bytes) -> bool:
    try:
        return type(orjson.loads(text)) is dict
    except orjson.JSONDecodeError:
        return False


class Gunzip:
    """A read(n)-able decompressed view of a gzip file (all members) that stops instead of raising at damage.

    GzipFile raises EOFError/zlib.error from read() and so throws away everything decoded in that call (up to a
    whole CHUNK of good lines); here each read returns what zlib could decode and the damage is kept in `problem`
    as (reason, detail) for the caller to report once the good data is used. read(n) returns at most n bytes
    (never more than one zlib call's output) and b"" at the end or at the damage.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.problem: tuple[str, str] | None = None
        self.partial = 0  # bytes of a cut-off last line that keep_tail refused
        self._d = zlib.decompressobj(31)  # wbits 31: gzip header + trailer; CRC-32 and size checked by zlib
        self._fresh = True  # no byte of the current member consumed yet (zero padding may be skipped)
        self._input = b""  # bytes after a finished member: the start of the next one
        self._done = False

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            return b"".join(iter(lambda: self.read(CHUNK), b""))
        if n == 0:
            return b""  # ijson probes with read(0): nothing may be consumed
        while not self._done:
            data = self._d.unconsumed_tail  # input left over when the last call hit its output limit
            if not data:
                data, self._input = self._input or self.raw.read(GZ_READ), b""
                if not data:
                    return self._at_eof()
                if self._fresh:
                    data = data.lstrip(b"\0")  # padding between / after members, as gzip allows
                    if not data:
                        continue
                    self._fresh = False
            try:
                out = self._d.decompress(data, n)
            except zlib.error as exc:
                self._stop("corrupt_gzip", f"the compressed data is damaged ({exc})")
                return b""
            if self._d.eof:
                self._next_member()
            if out:
                return out
        return b""

    def _next_member(self) -> None:
        self._input = self._d.unused_data
        self._d = zlib.decompressobj(31)
        self._fresh = True

    def _at_eof(self) -> bytes:
        self._done = True
        if self._fresh:
            return b""
        try:
            out = self._d.flush()  # output zlib still holds for input it has already taken
        except zlib.error as exc:
            self._stop("corrupt_gzip", f"the compressed data is damaged ({exc})")
            return b""
        if not self._d.eof:
            self._stop("truncated_gzip", "the gzip stream ends without its end-of-stream marker (file cut short)")
        return out

    def _stop(self, reason: str, detail: str) -> None:
        self._done = True
        self.problem = (reason, detail)

    def keep_tail(self, tail: bytes) -> bool:
        """Whether the last, newline-less piece is a whole line: always for an intact file; after damage only
        when it still parses as one JSON object (a line cut short never does; a missing trailer alone keeps it)."""
        if self.problem is None or _is_json_object(tail):
            return True
        if tail.strip():
            self.partial = len(tail)
        return False


def _iter_chunks(
    stream: IO[bytes] | Gunzip, tick: Callable[[], None], keep_tail: Callable[[bytes], bool] | None = None
) -> Iterator[list[bytes]]:
    """Lists of complete lines from a binary stream read in big chunks; strips a leading BOM.

    A line longer than a chunk (a one-line Bundle) is collected as pieces and joined once, not re-copied per chunk.
    The last piece without a newline is yielded unless `keep_tail` refuses it (a line cut off by damage).
    """
    pending: list[bytes] = []
    first = True
    while chunk := stream.read(CHUNK):
        tick()
        if first:
            chunk = chunk.removeprefix(BOM)
            first = False
            if not chunk:
                continue
        parts = chunk.split(b"\n")
        if len(parts) == 1:
            pending.append(chunk)
            continue
        if pending:
            pending.append(parts[0])
            parts[0] = b"".join(pending)
            pending = []
        tail = parts.pop()
        if tail:
            pending.append(tail)
        yield parts
    if pending:
        tail = b"".join(pending)
        if keep_tail is None or keep_tail(tail):
            yield [tail]


def iter_resources(
    inputs: list[str | os.PathLike], on_problem: ProblemSink | None = None
) -> Iterator[tuple[str, dict]]:
    """(source location, resource) for every resource in `inputs`; Bundles are opened up.

    Without `on_problem`, problems are logged as warnings.
    """

    def warn(reason: str, where: str, detail: str) -> None:
        log.warning("%s: %s (%s)", where, reason, detail)

    reader = ResourceReader(discover_inputs(inputs), on_problem or warn)
    for fidx, line, entry, res, _refs in reader:
        yield reader.where(fidx, line, entry), res
