"""JSON events to feature vectors, with precise reasons for the events that cannot be scored.

This is the daemon's hot path: every consumed record passes through
:meth:`FeatureExtractor.extract`. Records are decoded with orjson; the common case (a JSON object
whose fields are all present and numeric) takes a fast path of a few C calls per record, and only
records that fail it are examined again to say exactly what is wrong with them.

A record that cannot be scored becomes a :class:`DeadLetter` with one of the :data:`REASONS`:

=================  ==========================================================================
``invalid_json``   not decodable JSON (or not UTF-8, or no value at all, e.g. a tombstone)
``not_object``     valid JSON, but not an object (``[1, 2]``, ``"text"``, ``3``)
``missing_field``  a configured field is absent or ``null`` (with ``missing="marginalize"``:
                   only when *all* of them are)
``non_numeric``    a field holds a string, a boolean, a list or an object (booleans and numeric
                   strings are not numbers)
``non_finite``     a field is ``NaN``, ``Infinity`` or beyond ±1e150 (too large to square)
``oversize``       the record is longer than ``max_event_bytes``
=================  ==========================================================================

Examples
--------
>>> extractor = FeatureExtractor(["latency_ms", "http.bytes"])
>>> out = extractor.extract([
...     b'{"latency_ms": 12.5, "http": {"bytes": 512}}',
...     b'{"latency_ms": "slow", "http": {"bytes": 1}}',
...     b'{"latency_ms": 3, "http": {}}',
...     b'not json',
...     b'{"latency_ms": 7, "http": {"bytes": 64}, "user": "ada"}',
... ])
>>> out.features
array([[ 12.5, 512. ],
       [  7. ,  64. ]])
>>> out.indices.tolist()
[0, 4]
>>> out.events[1]["user"]
'ada'
>>> for letter in out.dead_letters:
...     print(letter.index, letter.reason, letter.message)
1 non_numeric field "latency_ms": expected a number, got "slow"
2 missing_field field "http.bytes": "bytes" is missing
3 invalid_json invalid JSON: Expecting value: line 1 column 1 (char 0)
>>> out.reason_counts()
{'non_numeric': 1, 'missing_field': 1, 'invalid_json': 1}
"""

from __future__ import annotations

import json
import math
import operator
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from streamgmm._covariance import MAX_MAGNITUDE

__all__ = ["FeatureExtractor", "Extraction", "DeadLetter", "REASONS"]

#: Every reason a record can be dead-lettered for (the ``reason`` label of the metrics).
REASONS: tuple[str, ...] = (
    "invalid_json",
    "not_object",
    "missing_field",
    "non_numeric",
    "non_finite",
    "oversize",
)

_MISSING_POLICIES = ("dead-letter", "marginalize")
_NUMBER_TYPES = (int, float)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that cannot be scored.

    Attributes
    ----------
    index : int
        Position of the record in the batch given to :meth:`FeatureExtractor.extract`.
    reason : str
        One of :data:`REASONS`.
    message : str
        What exactly is wrong, for people (e.g. ``field "b.c": expected a number, got "abc"``).
    """

    index: int
    reason: str
    message: str


@dataclass(frozen=True)
class Extraction:
    """The result of :meth:`FeatureExtractor.extract` for one batch of records.

    Attributes
    ----------
    features : ndarray of shape (n_ok, n_features), float64
        One row per good record, columns in the order of the extractor's fields. ``NaN`` marks a
        missing field (only with ``missing="marginalize"``).
    indices : ndarray of shape (n_ok,), int64
        Position in the batch of each good record (row ``k`` of ``features`` is record
        ``indices[k]``).
    events : list of dict
        The decoded JSON object of each good record, to embed in output messages.
    dead_letters : list of DeadLetter
        The records that cannot be scored, in batch order.
    """

    features: np.ndarray
    indices: np.ndarray
    events: list[dict[str, Any]]
    dead_letters: list[DeadLetter] = field(default_factory=list)

    @property
    def X(self) -> np.ndarray:  # noqa: N802 - the usual name of a feature matrix
        """Alias of :attr:`features`."""
        return self.features

    @property
    def n_records(self) -> int:
        """Number of records in the batch (good and bad)."""
        return len(self.indices) + len(self.dead_letters)

    def reason_counts(self) -> dict[str, int]:
        """Dead letters per reason (only reasons that occurred), e.g. for the metrics."""
        return dict(Counter(letter.reason for letter in self.dead_letters))


def _describe(value: Any) -> str:
    """A short, exact rendering of a JSON value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return json.dumps(shown, ensure_ascii=False)
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def _compile_getter(path: tuple[str, ...]) -> Callable[[dict], Any]:
    if len(path) == 1:
        return operator.itemgetter(path[0])
    if len(path) == 2:
        first, second = path
        return lambda obj: obj[first][second]

    def get(obj):
        for part in path:
            obj = obj[part]
        return obj

    return get


class FeatureExtractor:
    """Turn raw JSON records into a float64 feature matrix and dead letters.

    Parameters
    ----------
    fields : sequence of str
        Numeric fields, as dotted paths into nested objects (``"http.bytes"`` reads
        ``{"http": {"bytes": 512}}``). Their order is the column order of the features.
    missing : {"dead-letter", "marginalize"}, default "dead-letter"
        What to do with a record whose field is absent or ``null``: dead-letter it
        (``missing_field``), or give ``NaN`` for that feature so that the detector marginalises it
        out. A record with none of the fields is dead-lettered either way.
    max_event_bytes : int, default 1 MiB
        Records longer than this are dead-lettered (``oversize``) without being decoded.

    Examples
    --------
    >>> extractor = FeatureExtractor(["a", "b"], missing="marginalize")
    >>> out = extractor.extract([b'{"a": 1, "b": 2}', b'{"a": 3}', b'{"c": 1}', None])
    >>> out.features
    array([[ 1.,  2.],
           [ 3., nan]])
    >>> [(d.index, d.reason) for d in out.dead_letters]
    [(2, 'missing_field'), (3, 'invalid_json')]
    >>> FeatureExtractor(["a"], max_event_bytes=8).extract([b'{"a": 123456}']).dead_letters[0]
    DeadLetter(index=0, reason='oversize', message='the record is 13 bytes, more than \
max_event_bytes = 8; shrink the event or raise features.max_event_bytes')
    """

    def __init__(self, fields: Sequence[str], missing: str = "dead-letter",
                 max_event_bytes: int = 1_048_576):
        if isinstance(fields, str):
            raise TypeError(f"fields must be a list of field names, got the string {fields!r}; "
                            f"write [{fields!r}]")
        fields = tuple(fields)
        if not fields:
            raise ValueError("fields is empty; list at least one numeric JSON field")
        for name in fields:
            if not isinstance(name, str) or not name or any(p == "" for p in name.split(".")):
                raise ValueError(f"field {name!r} is not a dotted path like 'a' or 'b.c'")
        if len(set(fields)) != len(fields):
            raise ValueError(f"fields lists a name twice: {list(fields)}")
        if missing not in _MISSING_POLICIES:
            raise ValueError(f"missing must be one of {_MISSING_POLICIES}, got {missing!r}")
        if int(max_event_bytes) < 1:
            raise ValueError(f"max_event_bytes must be positive, got {max_event_bytes!r}")
        self.fields = fields
        self.missing = missing
        self.max_event_bytes = int(max_event_bytes)
        self._paths = tuple(tuple(name.split(".")) for name in fields)
        self._getters = tuple(_compile_getter(p) for p in self._paths)
        flat = all(len(p) == 1 for p in self._paths)
        if flat and len(fields) > 1:
            self._get_row = operator.itemgetter(*fields)  # one C call returns a tuple
        elif flat:
            only = fields[0]
            self._get_row = lambda obj: (obj[only],)
        else:
            getters = self._getters
            self._get_row = lambda obj: tuple(g(obj) for g in getters)

    @property
    def n_features(self) -> int:
        """Number of features (columns of the feature matrix)."""
        return len(self.fields)

    def __repr__(self) -> str:
        return (f"FeatureExtractor(fields={list(self.fields)!r}, missing={self.missing!r}, "
                f"max_event_bytes={self.max_event_bytes})")

    def extract(self, values: Sequence[bytes | str | None]) -> Extraction:
        """Decode and validate a batch of records.

        Parameters
        ----------
        values : sequence of bytes (or str, or None)
            Raw record values, e.g. the values of a Kafka poll. ``None`` (a tombstone) is
            dead-lettered as ``invalid_json``.

        Returns
        -------
        Extraction
        """
        loads = orjson.loads
        decode_error = orjson.JSONDecodeError
        get_row = self._get_row
        max_bytes = self.max_event_bytes
        number_types = _NUMBER_TYPES
        flat_values: list = []
        good: list[int] = []
        events: list[dict] = []
        dead: list[DeadLetter] = []
        for index, raw in enumerate(values):
            if raw is None:
                dead.append(DeadLetter(index, "invalid_json",
                                       "the record has no value (null, e.g. a tombstone); "
                                       "expected a JSON object"))
                continue
            if len(raw) > max_bytes:
                dead.append(self._oversize(index, raw))
                continue
            try:
                obj = loads(raw)
            except decode_error:
                # orjson is strict; the standard library also reads NaN/Infinity and huge
                # numbers (so those become non_finite rather than invalid_json) and its
                # messages locate the error.
                obj, letter = self._decode_leniently(index, raw)
                if letter is not None:
                    dead.append(letter)
                    continue
                lenient = True
            else:
                lenient = False
            if type(obj) is not dict:
                dead.append(DeadLetter(index, "not_object",
                                       f"expected a JSON object, got {_json_type(obj)}"))
                continue
            if not lenient:
                try:
                    row = get_row(obj)
                except (KeyError, TypeError):
                    pass
                else:
                    for value in row:
                        if type(value) not in number_types:
                            break
                    else:
                        flat_values.extend(row)
                        good.append(index)
                        events.append(obj)
                        continue
            row, letter = self._diagnose(index, obj)
            if letter is not None:
                dead.append(letter)
            else:
                flat_values.extend(row)
                good.append(index)
                events.append(obj)
        try:
            features = np.array(flat_values, dtype=np.float64)
        except OverflowError:  # an integer beyond float range slipped through; cannot happen
            features = np.array([float(v) for v in flat_values], dtype=np.float64)
        features = features.reshape(len(good), len(self.fields))
        big = (np.abs(features) > MAX_MAGNITUDE).any(axis=1)  # valid JSON, yet too large
        if big.any():
            dead += [self._diagnose(good[r], events[r])[1] for r in np.flatnonzero(big)]
            dead.sort(key=lambda letter: letter.index)
            kept = np.flatnonzero(~big)
            features, good, events = features[kept], [good[r] for r in kept], [
                events[r] for r in kept]
        return Extraction(features=features, indices=np.asarray(good, dtype=np.int64),
                          events=events, dead_letters=dead)

    # -- slow paths: only for records that failed the fast path -------------------------------

    def _oversize(self, index: int, raw) -> DeadLetter:
        unit = "bytes" if isinstance(raw, bytes | bytearray | memoryview) else "characters"
        return DeadLetter(index, "oversize",
                          f"the record is {len(raw)} {unit}, more than max_event_bytes = "
                          f"{self.max_event_bytes}; shrink the event or raise "
                          "features.max_event_bytes")

    @staticmethod
    def _decode_leniently(index: int, raw) -> tuple[Any, DeadLetter | None]:
        try:
            text = raw.decode("utf-8") if not isinstance(raw, str) else raw
        except UnicodeDecodeError as exc:
            return None, DeadLetter(index, "invalid_json", f"not valid UTF-8: {exc}")
        try:
            return json.loads(text), None
        except (json.JSONDecodeError, RecursionError, ValueError) as exc:
            return None, DeadLetter(index, "invalid_json", f"invalid JSON: {exc}")

    def _diagnose(self, index: int, obj: dict) -> tuple[list[float] | None, DeadLetter | None]:
        """Resolve every field of ``obj`` carefully; return the row or the first problem."""
        row: list[float] = []
        problems: list[tuple[str, str]] = []
        n_missing = 0
        for name, path in zip(self.fields, self._paths, strict=True):
            value, problem = _resolve(obj, name, path)
            if problem is None and value is None:
                problem = f'field "{name}" is null'
            if problem is not None:
                n_missing += 1
                if self.missing == "marginalize":
                    row.append(math.nan)
                else:
                    problems.append(("missing_field", problem))
                continue
            if type(value) not in _NUMBER_TYPES:
                problems.append(("non_numeric",
                                 f'field "{name}": expected a number, got {_describe(value)}'))
                continue
            try:
                number = float(value)
            except OverflowError:
                problems.append(("non_finite",
                                 f'field "{name}": {_describe(value)[:20]}... is too large '
                                 "for a 64-bit float"))
                continue
            if not math.isfinite(number):
                problems.append(("non_finite",
                                 f'field "{name}": expected a finite number, '
                                 f"got {_describe(number)}"))
                continue
            if abs(number) > MAX_MAGNITUDE:  # its square would overflow the model's statistics
                problems.append(("non_finite",
                                 f'field "{name}": {number:g} is beyond ±{MAX_MAGNITUDE:g}, '
                                 "too large to square in a 64-bit float"))
                continue
            row.append(number)
        if not problems and n_missing == len(self.fields):
            names = ", ".join(f'"{n}"' for n in self.fields)
            return None, DeadLetter(index, "missing_field",
                                    f"none of the fields is present ({names})")
        if problems:
            reason, message = problems[0]
            if len(problems) > 1:
                message += f" (and {len(problems) - 1} more bad field"
                message += "s)" if len(problems) > 2 else ")"
            return None, DeadLetter(index, reason, message)
        return row, None


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return f"a string ({_describe(value)})"
    if isinstance(value, bool) or value is None:
        return _describe(value)
    return f"a number ({_describe(value)})"


def _resolve(obj: dict, name: str, path: tuple[str, ...]) -> tuple[Any, str | None]:
    """Follow ``path`` into ``obj``; return ``(value, None)`` or ``(None, why it is missing)``."""
    current: Any = obj
    for depth, part in enumerate(path):
        if not isinstance(current, dict):
            parent = ".".join(path[:depth])
            return None, (f'field "{name}": "{parent}" is {_describe(current)}, not an object')
        if part not in current:
            if len(path) == 1:
                return None, f'field "{name}" is missing'
            return None, f'field "{name}": "{part}" is missing'
        current = current[part]
    return current, None
