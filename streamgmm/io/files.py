"""File edges: JSONL and CSV sources read in batches, and a JSONL sink (replay without Kafka).

A source yields :class:`FileBatch` es of raw records (bytes, as a Kafka record value would be)
with their 1-based line numbers, so that :class:`streamgmm.features.FeatureExtractor` sees exactly
what the daemon sees and every output can name its ``{file, line}``.

- **JSONL** (``.jsonl``, ``.ndjson``, ``.json``): one JSON value per line, passed on unchanged.
  Blank lines are skipped (and counted); anything else, valid or not, is a record.
- **CSV** (``.csv``): a header row names the fields; each row becomes a JSON object. Cells that
  read as numbers become numbers, empty cells are left out (a missing field), other cells stay
  strings. A dotted column name (``http.bytes``) becomes a nested object, so the same
  ``features.fields`` work for both formats.

Either may be gzip-compressed (``.jsonl.gz``, ``.csv.gz``).

Examples
--------
>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "events.csv")
>>> _ = open(path, "w").write("latency_ms,http.bytes,host\\n12.5,512,web-1\\n,64,web-2\\n")
>>> with open_source(path) as source:
...     batches = list(source.batches(10))
>>> for value in batches[0].values:
...     print(value.decode())
{"latency_ms":12.5,"http":{"bytes":512},"host":"web-1"}
{"http":{"bytes":64},"host":"web-2"}
>>> batches[0].lines
[2, 3]
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

__all__ = ["FileBatch", "JsonlSource", "CsvSource", "JsonlSink", "open_source", "FORMATS"]

logger = logging.getLogger(__name__)

#: File name endings and the format they mean.
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}


@dataclass(frozen=True)
class FileBatch:
    """Raw records read from a file.

    Attributes
    ----------
    values : list of bytes
        The records, as the feature extractor takes them.
    lines : list of int
        The 1-based line number of each record (for CSV: the line where its row ends).
    position : int
        Bytes of the (possibly compressed) file consumed so far, for progress bars.
    """

    values: list[bytes]
    lines: list[int]
    position: int


class _Source:
    """Shared plumbing: opening (gzip or not), progress position, context management."""

    format = ""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._raw: IO[bytes] = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        except FileNotFoundError:
            raise FileNotFoundError(f"input file {self.path} does not exist; "
                                    "check the path") from None
        self.size = os.fstat(self._raw.fileno()).st_size
        self._stream: IO[bytes] = (gzip.GzipFile(fileobj=self._raw, mode="rb")
                                   if self.path.suffix == ".gz" else self._raw)
        self.records = 0
        self.blank_lines = 0

    @property
    def position(self) -> int:
        """Bytes of the file on disk consumed so far."""
        try:
            return self._raw.tell()
        except (ValueError, OSError):  # closed
            return self.size

    def batches(self, batch_size: int) -> Iterator[FileBatch]:
        """Yield batches of at most ``batch_size`` records (as JSON bytes)."""
        batch_size = _check_batch_size(batch_size)
        values: list[bytes] = []
        lines: list[int] = []
        for number, record in self._records():
            values.append(record)
            lines.append(number)
            if len(values) >= batch_size:
                self.records += len(values)
                yield FileBatch(values, lines, self.position)
                values, lines = [], []
        if values:
            self.records += len(values)
            yield FileBatch(values, lines, self.position)

    def _records(self) -> Iterator[tuple[int, bytes]]:  # pragma: no cover - abstract
        """``(line number, JSON bytes)`` of each record; blank lines counted and skipped."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._stream is not self._raw:
            self._stream.close()
        self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


def _check_batch_size(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    return int(batch_size)


class JsonlSource(_Source):
    """Records of a JSON Lines file, one per non-blank line, unchanged.

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "e.jsonl")
    >>> _ = open(path, "wb").write(b'{"a": 1}\\n\\n{"a": 2}\\r\\nnot json\\n')
    >>> with JsonlSource(path) as source:
    ...     for batch in source.batches(2):
    ...         print(batch.values, batch.lines)
    [b'{"a": 1}', b'{"a": 2}'] [1, 3]
    [b'not json'] [4]
    >>> source.records, source.blank_lines
    (3, 1)
    """

    format = "jsonl"

    def _records(self) -> Iterator[tuple[int, bytes]]:
        for number, line in enumerate(self._stream, start=1):
            record = line.rstrip(b"\r\n")
            if not record.strip():
                self.blank_lines += 1
                continue
            yield number, record


_INTEGER = re.compile(r"^[+-]?\d+$")


def _cell(text: str) -> tuple[Any, bool]:
    """A CSV cell as a JSON value; the flag says the number is not finite."""
    stripped = text.strip()
    if _INTEGER.match(stripped):
        return int(stripped), False
    try:
        number = float(stripped)
    except ValueError:
        return text, False
    return number, not math.isfinite(number)


def _nest(row: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "c": 2}`` to ``{"a": {"b": 1}, "c": 2}``."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _check_columns(path: Path, columns: list[str]) -> None:
    if len(set(columns)) != len(columns):
        raise ValueError(f"{path}: the CSV header names a column twice: {columns}; "
                         "rename the duplicates")
    names = set(columns)
    for name in columns:
        parts = name.split(".")
        if any(not p for p in parts):
            raise ValueError(f"{path}: the CSV column {name!r} has an empty part between dots; "
                             "rename it")
        for k in range(1, len(parts)):
            if ".".join(parts[:k]) in names:
                raise ValueError(f"{path}: the CSV columns {'.'.join(parts[:k])!r} and "
                                 f"{name!r} conflict (one would be a number and an object); "
                                 "rename one")


class CsvSource(_Source):
    """Rows of a CSV file with a header, each as a JSON object (see the module docstring).

    Parameters
    ----------
    path : path-like
    delimiter : str, default ","
    encoding : str, default "utf-8-sig" (a byte-order mark is ignored)

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "e.csv")
    >>> _ = open(path, "w").write("a;b\\n1;nan\\n2;x\\n")
    >>> with CsvSource(path, delimiter=";") as source:
    ...     print(next(source.batches(5)).values)
    [b'{"a":1,"b":NaN}', b'{"a":2,"b":"x"}']
    """

    format = "csv"

    def __init__(self, path: str | os.PathLike, delimiter: str = ",",
                 encoding: str = "utf-8-sig"):
        super().__init__(path)
        self._text = io.TextIOWrapper(self._stream, encoding=encoding, newline="")
        self._reader = csv.DictReader(self._text, delimiter=delimiter)
        if self._reader.fieldnames is None:
            self.columns: list[str] = []
        else:
            self.columns = [name.strip() for name in self._reader.fieldnames]
            self._reader.fieldnames = self.columns
            try:
                _check_columns(self.path, self.columns)
            except ValueError:
                self.close()
                raise

    def _records(self) -> Iterator[tuple[int, bytes]]:
        for row in self._reader:
            if not any((v or "").strip() for k, v in row.items() if k is not None):
                self.blank_lines += 1
                continue
            obj: dict[str, Any] = {}
            non_finite = False
            for key, text in row.items():
                if key is None:  # more cells than header columns
                    obj["_extra_cells"] = text
                    continue
                if text is None or text.strip() == "":
                    continue
                obj[key], bad = _cell(text)
                non_finite |= bad
            obj = _nest(obj)
            # orjson would turn NaN into null (a missing field); write it as the JSON extension
            # NaN so that the extractor reports it as non_finite, which it is.
            yield self._reader.line_num, (
                json.dumps(obj, separators=(",", ":")).encode() if non_finite
                else orjson.dumps(obj)
            )

    def close(self) -> None:
        """Close the file (idempotent)."""
        try:
            self._text.detach()
        except (ValueError, AttributeError):
            pass
        super().close()


def open_source(path: str | os.PathLike, format: str | None = None) -> JsonlSource | CsvSource:
    """Open a JSONL or CSV source, choosing by the file name unless ``format`` is given.

    Parameters
    ----------
    path : path-like
        ``.jsonl``, ``.ndjson``, ``.json`` or ``.csv``, optionally followed by ``.gz``.
    format : {"jsonl", "csv"}, optional

    Raises
    ------
    ValueError
        The format cannot be told from the name and was not given.
    FileNotFoundError
        The file does not exist.
    """
    path = Path(path)
    if format is None:
        suffixes = [s.lower() for s in path.suffixes]
        if suffixes and suffixes[-1] == ".gz":
            suffixes.pop()
        format = FORMATS.get(suffixes[-1]) if suffixes else None
        if format is None:
            raise ValueError(f"cannot tell the format of {path} from its name; name it "
                             f"{', '.join(FORMATS)} (optionally .gz) or pass format='jsonl'|'csv'")
    if format == "jsonl":
        return JsonlSource(path)
    if format == "csv":
        return CsvSource(path)
    raise ValueError(f"format must be 'jsonl' or 'csv', got {format!r}")


class JsonlSink:
    """Write JSON documents as lines of a file (created or truncated; parents created).

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "out", "anomalies.jsonl")
    >>> with JsonlSink(path) as sink:
    ...     sink.write({"score": 12.5})
    ...     sink.write(b'{"raw": true}')
    >>> open(path).read().splitlines()
    ['{"score":12.5}', '{"raw": true}']
    >>> sink.count
    2
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self.count = 0

    def write(self, record: Mapping[str, Any] | bytes) -> None:
        """Append one document (a mapping, or JSON bytes written as they are)."""
        if isinstance(record, bytes | bytearray):
            data = bytes(record)
            if b"\n" in data:
                raise ValueError("a JSONL record cannot contain a newline; encode it compactly")
        else:
            from streamgmm.messages import encode

            data = encode(record)
        self._file.write(data + b"\n")
        self.count += 1

    def flush(self) -> None:
        """Flush buffered lines to the operating system."""
        self._file.flush()

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
