"""Raw input files -> (record index, location, text) or a rejection reason.

Formats by suffix: .jsonl (split into byte ranges: a range owns the lines that start in
it), .jsonl.gz / .jsonl.zst (read whole), .parquet (read whole), .txt (one document per
file). Bad records are reported with a reason, never raised and never dropped silently.
Lines longer than `max_line_bytes` are skipped without being held in memory.

A damaged file (a .jsonl.gz/.jsonl.zst cut short or corrupt, a .parquet that cannot be read)
gives one `damaged_file` record naming the file and the damage: the records read before it are
kept, the rest of the file is lost (a parquet file without its footer is rejected whole).
"""
from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

from . import storage

REASONS = ("invalid_json", "not_an_object", "missing_field", "not_text", "not_utf8", "empty_text",
           "blank_line", "line_too_long", "too_short", "damaged_file")
FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl.gz", ".jsonl.zst": "jsonl.zst", ".parquet": "parquet",
           ".txt": "txt"}
SPLITTABLE = {"jsonl"}


def detect_format(url: str) -> str:
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if url.endswith(suffix):
            return FORMATS[suffix]
    raise ValueError(f"{url}: unsupported input format; expected one of {sorted(FORMATS)}")


@dataclass(frozen=True)
class WorkItem:
    url: str
    size: int
    version: str
    fmt: str
    start: int          # byte range [start, end) of a jsonl file; whole file otherwise
    end: int
    first_record: int = 0   # index in the file of the first record this item owns


class Record(NamedTuple):
    index: int                 # index of the record in its file (line number - 1 for jsonl)
    location: str              # "file:line" for people
    text: Optional[str]        # None when rejected
    reason: Optional[str]


class DamagedFile(Exception):
    """The compressed input ends inside a frame, or its data does not decompress."""


class _Decompressed(io.RawIOBase):
    """The bytes of a gzip or zstd stream (any number of members/frames), every good byte first: the
    damage is raised only once everything before it has been read (a buffered reader over gzip.GzipFile
    raises before handing out the lines it already decoded)."""

    def __init__(self, raw, fmt: str):
        self.raw, self.fmt, self.pending, self.fed = raw, fmt, b"", False
        self.decoder = self._new_decoder()

    def _new_decoder(self):
        if self.fmt == "jsonl.gz":
            return zlib.decompressobj(wbits=31)
        import zstandard
        return zstandard.ZstdDecompressor().decompressobj()

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        import zstandard
        while not self.pending:
            data = self.raw.read(1 << 20)
            if not data:
                if self.fed and not self.decoder.eof:
                    raise DamagedFile("the file ends inside a compressed frame (truncated)")
                return 0
            self.fed = True
            out = b""
            try:
                while data:
                    if self.decoder.eof:           # the member/frame before ended: another one follows
                        if not data.strip(b"\0"):  # zero padding after the last gzip member (gzip accepts it)
                            break
                        self.decoder = self._new_decoder()
                    out += self.decoder.decompress(data)
                    data = self.decoder.unused_data if self.decoder.eof else b""
            except (zlib.error, zstandard.ZstdError) as e:
                raise DamagedFile(f"corrupt compressed data ({e})") from None
            self.pending = out
        n = min(len(buf), len(self.pending))
        buf[:n], self.pending = self.pending[:n], self.pending[n:]
        return n


def _damaged(url: str, records_before: int, what: str) -> Record:
    return Record(records_before, f"{url}: {what}; the {records_before} records before it are kept, the rest of "
                                  "the file is lost", None, "damaged_file")


def _skip_rest_of_line(f) -> int:
    skipped = 0
    while True:
        piece = f.readline(1 << 20)
        skipped += len(piece)
        if not piece or piece.endswith(b"\n"):
            return skipped


def _read_line(f, max_line_bytes: int):
    """(line bytes or None if too long, bytes consumed)."""
    line = f.readline(max_line_bytes + 1)
    if len(line) > max_line_bytes and not line.endswith(b"\n"):
        return None, len(line) + _skip_rest_of_line(f)
    return line, len(line)


def count_records(item: WorkItem) -> int:
    """Lines that start inside the item's byte range (the records it owns).

    A line starts at p when p == 0 or byte p-1 is a newline, and p < size; so the count is
    [start == 0] plus the newlines at q in [start-1, end-1) with q < size-1."""
    if item.size == 0 or item.start >= min(item.end, item.size):
        return 0
    begin, stop = max(item.start - 1, 0), min(item.end - 1, item.size - 1)
    count = 1 if item.start == 0 else 0
    with storage.open_read(item.url, begin) as f:
        left = stop - begin
        while left > 0:
            block = f.read(min(1 << 22, left))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count


def _parse_json_line(line: bytes, text_field: str):
    if not line.strip():
        return None, "blank_line"
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    try:
        obj = json.loads(decoded)
    except ValueError:
        return None, "invalid_json"
    if not isinstance(obj, dict):
        return None, "not_an_object"
    if text_field not in obj or obj[text_field] is None:
        return None, "missing_field"
    return _check_text(obj[text_field])


def _check_text(value):
    if not isinstance(value, str):
        return None, "not_text"
    if not value.strip():
        return None, "empty_text"
    return value, None


def _jsonl_lines(f, url, first_index, max_line_bytes, text_field, budget=None) -> Iterator[Record]:
    index, consumed = first_index, 0
    while budget is None or consumed < budget:
        line, n = _read_line(f, max_line_bytes)
        if n == 0:
            return
        consumed += n
        text, reason = (None, "line_too_long") if line is None else _parse_json_line(line, text_field)
        yield Record(index, f"{url}:{index + 1}", text, reason)
        index += 1


def iter_records(item: WorkItem, text_field: str, max_line_bytes: int, scratch_dir: str) -> Iterator[Record]:
    if item.fmt == "jsonl":
        if item.start >= min(item.end, item.size):
            return
        f = storage.open_read(item.url, max(item.start - 1, 0))
        with f:
            if item.start > 0 and f.read(1) != b"\n":
                skipped = _skip_rest_of_line(f)              # that line belongs to the previous range
                budget = item.end - item.start - skipped
            else:
                budget = item.end - item.start
            if budget > 0:
                yield from _jsonl_lines(f, item.url, item.first_record, max_line_bytes, text_field, budget)
    elif item.fmt in ("jsonl.gz", "jsonl.zst"):
        read = 0
        with io.BufferedReader(_Decompressed(storage.open_read(item.url), item.fmt), buffer_size=1 << 20) as f:
            try:
                for rec in _jsonl_lines(f, item.url, 0, max_line_bytes, text_field):
                    read += 1
                    yield rec
            except DamagedFile as e:
                yield _damaged(item.url, read, str(e))
    elif item.fmt == "txt":
        with storage.open_read(item.url) as f:
            data = f.read()
        try:
            text, reason = _check_text(data.decode("utf-8"))
        except UnicodeDecodeError:
            text, reason = None, "not_utf8"
        yield Record(0, f"{item.url}:1", text, reason)
    elif item.fmt == "parquet":
        yield from _parquet_records(item.url, text_field, scratch_dir)
    else:
        raise ValueError(f"{item.url}: unknown format {item.fmt}")


def _parquet_records(url: str, text_field: str, scratch_dir: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    index, path = 0, storage.local_copy(url, scratch_dir)     # storage errors are not damage: they propagate
    try:
        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            for i in range(pf.metadata.num_rows):
                yield Record(i, f"{url}:row {i}", None, "missing_field")
            return
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                text, reason = (None, "missing_field") if value is None else _check_text(value)
                yield Record(index, f"{url}:row {index}", text, reason)
                index += 1
    except (pa.ArrowException, OSError) as e:       # no footer (cut short), a corrupt page
        yield _damaged(url, index, f"cannot be read as parquet ({type(e).__name__}: {e})")
