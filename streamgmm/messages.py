"""The output messages: one JSON document per anomaly, and file dead letters.

The Kafka daemon and ``streamgmm replay`` publish the same anomaly schema, so that consumers of
the output topic and readers of a replay's output file share one parser:

``event``
    the original JSON event, unchanged
``score``
    under the model before it learned the event (nats; higher is stranger): ``-log`` of the
    mixture's probability mass further out than the event (``detector.score = "tail"``, the
    default), or ``-log p(x)`` (``"density"``)
``anomaly_score``
    the score relative to the threshold: ``> 1`` is anomalous, its meaning never changes
``threshold``
    the threshold on ``score`` in force for this event
``log_likelihood``
    ``log p(x)`` (``-score`` when scoring by density)
``tail_probability``
    the estimated fraction of normal events at least this strange
``component``
    the most likely mixture component
``explanation``
    the features that drove the score: ``[{feature, value, expected, contribution, direction}]``
    sorted by ``|contribution|``
``source``
    where the event came from: ``{topic, partition, offset}`` from Kafka, ``{file, line}`` from
    a file (recovery uses it to avoid duplicates)
``detected_at``
    when it was scored: ISO 8601 UTC with milliseconds, e.g. ``"2026-11-25T10:15:30.123Z"``
``model_events``
    how many events the model had learned from (after the event's batch)
``event_omitted``
    only when the event was too large to embed (``event`` is then ``null``): why

Numbers that are not finite (an infinite score) are written as ``null``, since JSON has no
infinity. Every message is strict UTF-8 JSON whatever the event held (:func:`encode`): lone
surrogates become U+FFFD and nesting deeper than :data:`MAX_DEPTH` levels is left out.

Dead letters on Kafka keep the original value unchanged and carry the reason and source in
headers (:func:`dead_letter_headers`, in both the Kafka Connect and the Spring Kafka conventions,
so that existing tooling can route and replay them). A file has no headers, so a replay writes
each dead letter as a JSON line of its own (:func:`dead_letter_record`).

Each writer has its reader here too: :func:`source_of_output` reads an anomaly message's
``source``, :func:`source_of_dead_letter` a dead letter's headers (recovery reads back what is
already published with them).

Examples
--------
>>> from types import SimpleNamespace
>>> import numpy as np
>>> result = SimpleNamespace(
...     score=np.array([3.2, 41.0]), anomaly_score=np.array([0.1, 1.9]),
...     threshold=np.array([21.5, 21.5]), log_likelihood=np.array([-3.2, -41.0]),
...     tail_probability=np.array([0.4, 1e-5]), component=np.array([0, 1]),
...     explain=lambda i: [{"feature": "latency_ms", "value": 950.0, "expected": 20.0,
...                         "contribution": 37.5, "direction": "high"}])
>>> record = anomaly_record({"latency_ms": 950}, result, 1,
...                         source={"topic": "events", "partition": 0, "offset": 7},
...                         model_events=5000, detected_at=1764065730.1234)
>>> record["anomaly_score"], record["component"], record["detected_at"]
(1.9, 1, '2025-11-25T10:15:30.123Z')
>>> record["explanation"][0]["feature"]
'latency_ms'
>>> anomaly_message({"latency_ms": 950}, result, 1, source=("events", 0, 7),
...                 model_events=5000, detected_at=0.0)[:60]
b'{"event":{"latency_ms":950},"score":41.0,"anomaly_score":1.9'
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

__all__ = [
    "anomaly_record",
    "anomaly_message",
    "dead_letter_record",
    "dead_letter_message",
    "format_timestamp",
    "encode",
    "dead_letter_headers",
    "source_of_dead_letter",
    "source_of_output",
]

logger = logging.getLogger(__name__)

# Kafka Connect and Spring Kafka dead-letter header names.
_CONNECT = "__connect.errors."
_SPRING = "kafka_dlt-"

Source = Mapping[str, Any] | tuple[str, int, int]


def format_timestamp(seconds: float | None = None) -> str:
    """Unix seconds (default: now) as ISO 8601 UTC with milliseconds.

    Examples
    --------
    >>> format_timestamp(0)
    '1970-01-01T00:00:00.000Z'
    """
    seconds = time.time() if seconds is None else float(seconds)
    moment = _dt.datetime.fromtimestamp(seconds, tz=_dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _plain(value: Any) -> Any:
    """numpy scalars to Python, non-finite floats to ``None``, recursively."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return _number(value)
    return value


#: Deepest nesting kept in an output message; deeper parts are replaced by :data:`TOO_DEEP`.
MAX_DEPTH = 64
TOO_DEEP = f"(nested deeper than {MAX_DEPTH} levels; left out)"


def _text(value: str) -> str:
    """``value`` with every lone surrogate (not encodable as UTF-8) replaced by U+FFFD."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _json_safe(value: Any, depth: int = 0) -> Any:
    """What strict JSON can hold of ``value``: like :func:`_plain`, and also lone surrogates
    replaced, nesting cut at :data:`MAX_DEPTH`, integers beyond a double's range as strings."""
    if isinstance(value, dict | list | tuple) and depth >= MAX_DEPTH:
        return TOO_DEEP
    if isinstance(value, dict):
        return {_text(str(k)): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, depth + 1) for v in value]
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, bool | np.bool_) or value is None:
        return None if value is None else bool(value)
    if isinstance(value, int | np.integer):
        value = int(value)
        if value.bit_length() <= 1024:  # within a double's range: every JSON reader takes it
            return value
        try:  # beyond it, a number that many readers refuse: its digits, as a string
            return str(value)
        except ValueError:  # Python writes at most 4300 digits
            return f"(an integer of {value.bit_length()} bits; left out)"
    if isinstance(value, float | np.floating):
        return _number(value)
    return _text(str(value))


def _source(source: Source) -> dict[str, Any]:
    if isinstance(source, tuple):
        topic, partition, offset = source
        return {"topic": str(topic), "partition": int(partition), "offset": int(offset)}
    return _plain(dict(source))


def encode(record: Mapping[str, Any]) -> bytes:
    """A record as compact, strict JSON bytes, whatever it holds.

    orjson writes the common case. What it refuses is written by the standard library after
    :func:`_json_safe`: integers beyond 64 bits are kept (as strings of digits beyond a double's
    range, which many readers refuse as numbers); non-finite numbers become ``null``;
    lone surrogates (``"\\ud800"`` read from an event) become U+FFFD; nesting deeper than
    :data:`MAX_DEPTH` is replaced by a note. So every output is valid UTF-8 JSON.

    Examples
    --------
    >>> encode({"a": float("inf"), "b": 2 ** 70})
    b'{"a":null,"b":1180591620717411303424}'
    >>> encode({"s": "x\\ud800"}).decode()
    '{"s":"x\ufffd"}'
    >>> deep = []
    >>> for _ in range(500):
    ...     deep = [deep]
    >>> message = encode({"deep": deep})  # the record is level 0, its lists 1 to 63
    >>> message.count(b"["), TOO_DEEP.encode() in message
    (63, True)
    """
    try:
        return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:
        return json.dumps(_json_safe(record), separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode()


def anomaly_record(event: Mapping[str, Any], result: Any, row: int, source: Source,
                   model_events: int, detected_at: float | None = None) -> dict[str, Any]:
    """The output document for row ``row`` of a detector batch result.

    Parameters
    ----------
    event : dict
        The decoded input event (embedded unchanged).
    result : detector.BatchResult
        Read: ``score``, ``anomaly_score``, ``threshold``, ``log_likelihood``,
        ``tail_probability``, ``component`` (arrays) and ``explain(row)``.
    row : int
        The event's row in ``result``.
    source : dict or (topic, partition, offset)
        Where the event came from: ``{"topic", "partition", "offset"}`` or ``{"file", "line"}``.
    model_events : int
        The model's learned-event count.
    detected_at : float, optional
        Unix seconds of detection (default: now).

    Returns
    -------
    dict
        JSON-ready (Python scalars, ``None`` for non-finite numbers).
    """
    try:
        explanation = _plain(list(result.explain(row)))
    except Exception as exc:  # an explanation is a courtesy: never lose the anomaly over it
        logger.warning("could not explain row %d of the batch (%s: %s); publishing the anomaly "
                       "without an explanation", row, type(exc).__name__, exc)
        explanation = []
    tail = getattr(result, "tail_probability", None)
    return {
        "event": event,
        "score": _number(result.score[row]),
        "anomaly_score": _number(result.anomaly_score[row]),
        "threshold": _number(result.threshold[row]),
        "log_likelihood": _number(result.log_likelihood[row]),
        "tail_probability": None if tail is None else _number(tail[row]),
        "component": int(result.component[row]),
        "explanation": explanation,
        "source": _source(source),
        "detected_at": format_timestamp(detected_at),
        "model_events": int(model_events),
    }


def anomaly_message(event: Mapping[str, Any], result: Any, row: int, source: Source,
                    model_events: int, detected_at: float | None = None,
                    max_bytes: int | None = None) -> bytes:
    """:func:`anomaly_record` as JSON bytes, the value of an output-topic message.

    When the message would be longer than ``max_bytes``, its ``event`` is ``null`` and
    ``event_omitted`` says why (the message's ``source`` locates the original event); the
    scores and the explanation stay.
    """
    record = anomaly_record(event, result, row, source, model_events, detected_at)
    message = encode(record)
    if max_bytes is not None and len(message) > max_bytes:
        record["event"] = None
        record["event_omitted"] = (f"the event made this message {len(message)} bytes, more "
                                   f"than the {max_bytes} an output message may take")
        message = encode(record)
    return message


def dead_letter_record(value: bytes | str | None, dead_letter: Any, source: Source,
                       detected_at: float | None = None) -> dict[str, Any]:
    """A dead letter as a JSON document (for files; Kafka keeps the value and uses headers).

    Parameters
    ----------
    value : bytes or None
        The record as it was read. Written unchanged as ``value`` when it is UTF-8 text, else
        base64-encoded as ``value_base64``; ``None`` (a tombstone) gives ``"value": null``.
    dead_letter : features.DeadLetter
        Read: ``reason`` and ``message``.
    source : dict or (topic, partition, offset)
        Where the record came from.
    detected_at : float, optional
        Unix seconds (default: now).

    Examples
    --------
    >>> from streamgmm.features import DeadLetter
    >>> letter = DeadLetter(0, "non_numeric", 'field "a": expected a number, got "x"')
    >>> dead_letter_record(b'{"a": "x"}', letter, {"file": "in.jsonl", "line": 3}, 0)
    ... # doctest: +NORMALIZE_WHITESPACE
    {'reason': 'non_numeric', 'message': 'field "a": expected a number, got "x"',
     'source': {'file': 'in.jsonl', 'line': 3}, 'detected_at': '1970-01-01T00:00:00.000Z',
     'value': '{"a": "x"}'}
    >>> dead_letter_record(b"\\xff", letter, {"file": "f", "line": 1}, 0)["value_base64"]
    '/w=='
    """
    record: dict[str, Any] = {
        "reason": dead_letter.reason,
        "message": dead_letter.message,
        "source": _source(source),
        "detected_at": format_timestamp(detected_at),
    }
    if value is None or isinstance(value, str):
        record["value"] = value
    else:
        try:
            record["value"] = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            record["value_base64"] = base64.b64encode(bytes(value)).decode("ascii")
    return record


def dead_letter_message(value: bytes | str | None, dead_letter: Any, source: Source,
                        detected_at: float | None = None) -> bytes:
    """:func:`dead_letter_record` as JSON bytes (one line of a dead-letter file)."""
    return encode(dead_letter_record(value, dead_letter, source, detected_at))


def dead_letter_headers(
    reason: str, message: str, topic: str, partition: int, offset: int,
    exception_class: str = "streamgmm.features.InvalidEvent",
) -> list[tuple[str, bytes]]:
    """Headers of a dead letter, in both Kafka Connect and Spring Kafka conventions.

    Parameters
    ----------
    reason
        Machine-readable reason (``invalid_json``, ``missing_field``, …), also in
        ``streamgmm.reason``.
    message
        Human-readable explanation.
    topic, partition, offset
        Where the event was read from.
    """
    text = message.encode("utf-8", "replace")
    return [
        ("streamgmm.reason", reason.encode()),
        (_CONNECT + "topic", topic.encode()),
        (_CONNECT + "partition", str(partition).encode()),
        (_CONNECT + "offset", str(offset).encode()),
        (_CONNECT + "exception.class.name", exception_class.encode()),
        (_CONNECT + "exception.message", text),
        (_SPRING + "original-topic", topic.encode()),
        (_SPRING + "original-partition", str(partition).encode()),
        (_SPRING + "original-offset", str(offset).encode()),
        (_SPRING + "exception-message", text),
    ]


def source_of_dead_letter(
    headers: Sequence[tuple[str, bytes]] | None,
) -> tuple[str, int, int] | None:
    """``(topic, partition, offset)`` named by a dead letter's headers, or ``None``.

    Reads the Kafka Connect headers, falling back to Spring Kafka's.
    """
    found = dict(headers or ())
    for prefix, names in ((_CONNECT, ("topic", "partition", "offset")),
                          (_SPRING, ("original-topic", "original-partition", "original-offset"))):
        try:
            topic, part, off = (found[prefix + n] for n in names)
            return topic.decode(), int(part), int(off)
        except (KeyError, ValueError, UnicodeDecodeError):
            continue
    return None


def source_of_output(value: bytes | None) -> tuple[str, int, int] | None:
    """``(topic, partition, offset)`` in an anomaly message's ``source`` field, or ``None``.

    Examples
    --------
    >>> source_of_output(b'{"score": 9.1, "source": {"topic": "t", "partition": 0, "offset": 7}}')
    ('t', 0, 7)
    >>> source_of_output(b'not json') is None
    True
    """
    try:
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:  # valid JSON orjson refuses (a 400-digit number)
            doc = json.loads(value)
        src = doc["source"]
        return str(src["topic"]), int(src["partition"]), int(src["offset"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
