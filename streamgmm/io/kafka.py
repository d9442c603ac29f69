"""Kafka edges of the daemon on kafka-python: a batch source, a sink and dead-letter headers.

:class:`KafkaSource` is a consumer-group member that hands out micro-batches of raw records
(bytes in; decoding is :mod:`streamgmm.features`' job, so a bad record can reach the dead-letter
topic instead of blowing up inside the client). :class:`KafkaSink` publishes a batch's anomalies and
dead letters together with the batch's input offsets:

* ``delivery="exactly-once"`` (default): one transaction per batch — records, then
  ``send_offsets_to_transaction`` for the consumer group, then commit. Readers of the output use
  ``isolation_level="read_committed"``.
* ``delivery="at-least-once"``: records are sent with ``acks="all"``, every send future is awaited
  (``flush()`` does not raise on failure), and only then are the offsets committed.

:func:`read_published_sources` reads back the tail of the output and dead-letter topics and returns
the ``(topic, partition, offset)`` of every input event already published. The daemon uses it on
recovery so that nothing is published twice even where the broker is weaker than Kafka: Tansu makes
the records of an aborted or abandoned transaction visible to ``read_committed`` readers.

Every dead letter carries both the Kafka Connect and the Spring Kafka header conventions, so
existing tooling can route and replay it (:func:`dead_letter_headers`).

Examples
--------
>>> headers = dict(dead_letter_headers("invalid_json", "Expecting value", "events", 2, 41))
>>> headers["__connect.errors.offset"], headers["kafka_dlt-original-topic"]
(b'41', b'events')
>>> source_of_dead_letter(list(headers.items()))
('events', 2, 41)
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as kafka_errors
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.structs import OffsetAndMetadata

__all__ = [
    "DELIVERY_MODES",
    "OutgoingRecord",
    "GroupMember",
    "KafkaSource",
    "BatchSink",
    "KafkaSink",
    "KafkaUnavailable",
    "CallTimedOut",
    "RecordRejected",
    "bounded_call",
    "abandoned_clients",
    "dead_letter_headers",
    "record_size",
    "fit_record",
    "source_of_dead_letter",
    "source_of_output",
    "read_published_sources",
    "OffsetsReader",
    "ensure_topics",
    "broker_reachable",
]

logger = logging.getLogger(__name__)

DELIVERY_MODES = ("exactly-once", "at-least-once")

#: Client settings for fast group joins and bounded waits (seconds, not minutes, on broker loss).
CONSUMER_DEFAULTS: dict[str, Any] = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 500,
    "enable_auto_commit": False,
    "request_timeout_ms": 10000,
    "bootstrap_timeout_ms": 5000,
    "reconnect_backoff_max_ms": 2000,
    # How long the broker may hold a fetch that found too little data. kafka-python's 500 ms
    # default stalled a group member's polls for ~400 ms every few batches on the embedded broker
    # (a third of the daemon's time; measured with scripts/bench_daemon.py); short waits remove
    # the stalls and cost a few idle fetch requests per second.
    "fetch_max_wait_ms": 20,
}
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "linger_ms": 5,
    "request_timeout_ms": 10000,
    "delivery_timeout_ms": 30000,
    "max_block_ms": 15000,
    "bootstrap_timeout_ms": 5000,
    "reconnect_backoff_max_ms": 2000,
    # Kafka's transaction coordinator answers CONCURRENT_TRANSACTIONS while it still writes the
    # previous transaction's markers; the client retries after retry_backoff_ms (100 ms by
    # default; Kafka's Java client retries that one after 20 ms). Measured on Apache Kafka 4.4.0
    # (records + offsets per transaction): 121 ms per transaction at 100 ms, 24 ms at 10 ms.
    # Reconnecting to a lost broker keeps its own backoff (reconnect_backoff_max_ms).
    "retry_backoff_ms": 10,
}

#: Deadline of the consumer calls that have none by default (committed, position, close), ms.
CALL_TIMEOUT_MS = 10_000

# Kafka Connect and Spring Kafka dead-letter header names.
_CONNECT = "__connect.errors."
_SPRING = "kafka_dlt-"


class KafkaUnavailable(ConnectionError):
    """The Kafka cluster cannot be reached or a Kafka operation failed; retry later."""


class CallTimedOut(KafkaUnavailable):
    """A client call did not return by its deadline; the client is abandoned, not reused."""


class RecordRejected(Exception):
    """The producer or the broker refused some records for what they are (too large for a topic's
    ``max.message.bytes``): a fault of those messages, not of the broker. Nothing of the batch was
    published; replace the records and publish again.

    Attributes
    ----------
    rejected : dict of int to str
        Position in the batch of each refused record, and why.
    """

    def __init__(self, rejected: Mapping[int, str]) -> None:
        self.rejected = dict(rejected)
        super().__init__(f"{len(self.rejected)} records refused: "
                         f"{next(iter(self.rejected.values()))}")


#: kafka-python's errors that refuse one record for what it is.
RECORD_ERRORS = (kafka_errors.MessageSizeTooLargeError, kafka_errors.RecordListTooLargeError,
                 kafka_errors.InvalidRecordError)


# Clients one of whose calls never returned. They stay referenced (destroying a client that is
# blocked inside a call blocks too) until the process ends; see abandoned_clients().
_ABANDONED: list[Any] = []


def abandoned_clients() -> int:
    """How many clients were abandoned in a blocked call (the process should end by ``os._exit``:
    destroying them at interpreter exit would block)."""
    return len(_ABANDONED)


#: Seconds a blocking call still gets once the daemon is stopping.
STOP_GRACE_SECONDS = 2.0


class _Deadline:
    """``seconds`` from now, or :data:`STOP_GRACE_SECONDS` after ``cancel`` is set if sooner."""

    def __init__(self, seconds: float, cancel: threading.Event | None) -> None:
        self._ends = time.monotonic() + seconds
        self._cancel = cancel
        self.cancelled = False

    def passed(self) -> bool:
        now = time.monotonic()
        if not self.cancelled and self._cancel is not None and self._cancel.is_set():
            self.cancelled = True
            self._ends = min(self._ends, now + STOP_GRACE_SECONDS)
        return now > self._ends


def bounded_call(what: str, deadline: float, call, *args: Any, client: Any = None,
                 cancel: threading.Event | None = None) -> Any:
    """``call(*args)``, given up after ``deadline`` seconds even if the call itself never returns.

    The call runs on a thread of its own. A call that returns in time returns (or raises) as if
    called directly. One that does not is left running, ``client`` (the object it blocks in) is
    kept from being destroyed, and :class:`CallTimedOut` is raised: build a new client and retry.
    Once ``cancel`` is set (the daemon is stopping) the call gets :data:`STOP_GRACE_SECONDS` more
    at most: a stop does not wait for a call that may never return (what it was publishing is
    published after the restart, once).
    librdkafka's transaction calls can block past their own timeout (seen: a broker that restarted
    empty while ``send_offsets_to_transaction`` waited), and a blocked main thread cannot even run
    the signal handler.

    Examples
    --------
    >>> bounded_call("adding", 1.0, lambda a, b: a + b, 2, 3)
    5
    >>> bounded_call("sleeping", 0.05, time.sleep, 1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    streamgmm.io.kafka.CallTimedOut: sleeping did not return within 0.05 s; the client is ...
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call(*args)
        except BaseException as exc:  # handed to the caller's thread as it is
            outcome["error"] = exc

    worker = threading.Thread(target=run, name=f"streamgmm-{what}", daemon=True)
    worker.start()
    ends = _Deadline(deadline, cancel)
    while worker.is_alive() and not ends.passed():
        worker.join(0.1)
    if worker.is_alive():
        if client is not None:
            _ABANDONED.append(client)
        if ends.cancelled:
            raise CallTimedOut(f"{what} given up: stopping")
        raise CallTimedOut(f"{what} did not return within {deadline:g} s; the client is "
                           "abandoned and rebuilt")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@dataclass(frozen=True)
class OutgoingRecord:
    """One record to publish: an anomaly on the output topic or a dead letter."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    source: tuple[str, int, int] | None = None
    """(topic, partition, offset) of the input event this record was made from."""


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


#: Bytes a record needs on the wire beyond its key, value and headers (a generous bound).
RECORD_FRAMING_BYTES = 512


def record_size(record: OutgoingRecord) -> int:
    """Bytes ``record`` takes against a producer's message limit (an upper bound)."""
    headers = sum(len(name) + len(value) for name, value in record.headers)
    return (len(record.value or b"") + len(record.key or b"") + headers
            + RECORD_FRAMING_BYTES)


def fit_record(record: OutgoingRecord, max_bytes: int) -> OutgoingRecord:
    """``record``, its value truncated so that it fits in ``max_bytes``.

    A record that fits is returned as it is. Otherwise the value keeps its first bytes and the
    headers say what was cut: ``streamgmm.truncated`` (``true``), ``streamgmm.original-size``
    and ``streamgmm.original-sha256`` (of the whole value), so that the original can be matched
    with its source (the dead-letter headers name its topic, partition and offset).

    Examples
    --------
    >>> letter = OutgoingRecord("dlq", b"x" * 5000, headers=[("streamgmm.reason", b"oversize")])
    >>> fitted = fit_record(letter, 2000)
    >>> record_size(fitted) <= 2000, dict(fitted.headers)["streamgmm.original-size"]
    (True, b'5000')
    >>> fit_record(letter, 10_000) is letter
    True
    """
    if record_size(record) <= max_bytes:
        return record
    value = record.value or b""
    headers = [*record.headers, ("streamgmm.truncated", b"true"),
               ("streamgmm.original-size", str(len(value)).encode()),
               ("streamgmm.original-sha256", hashlib.sha256(value).hexdigest().encode())]
    cut = OutgoingRecord(record.topic, b"", record.key, headers, record.source)
    room = max(0, max_bytes - record_size(cut))
    return OutgoingRecord(record.topic, value[:room], record.key, headers, record.source)


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


def broker_reachable(bootstrap_servers: str | Sequence[str], timeout: float = 1.0) -> bool:
    """True if a TCP connection to any bootstrap server succeeds (a cheap liveness probe)."""
    servers = (
        bootstrap_servers.split(",") if isinstance(bootstrap_servers, str) else bootstrap_servers
    )
    for server in servers:
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout):
                return True
        except (OSError, ValueError):
            continue
    return False


def _client_error(what: str, exc: Exception) -> KafkaUnavailable:
    return KafkaUnavailable(f"{what}: {type(exc).__name__}: {exc}")


def ensure_topics(
    bootstrap_servers: str, topics: Iterable[str], partitions: int = 1, **client_options: Any
) -> None:
    """Create the topics that do not exist yet (replication factor 1 on a single broker).

    The admin client gets the daemon's short bootstrap timeout and reconnect backoff: with
    kafka-python's defaults (30 s each) a daemon reconnecting to a restarting Kafka waited 30 s
    for a broker that had been back for 25.
    """
    options = {key: CONSUMER_DEFAULTS[key] for key in
               ("bootstrap_timeout_ms", "reconnect_backoff_max_ms", "request_timeout_ms")}
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, **{**options, **client_options})
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(t, partitions, 1) for t in dict.fromkeys(topics) if t not in existing]
        if new:
            try:
                admin.create_topics(new)
            except kafka_errors.TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


class OffsetsReader:
    """First and end offsets of partitions, read by a kafka-python client at ``read_uncommitted``.

    Both backends use it. On Tansu 0.6 no end offset from ListOffsets is right once a batch
    holds several records — it answers the last batch's base offset + 1, to kafka-python as to
    librdkafka (``tests/test_broker_differences.py``) — so the daemon uses these ends only where
    too low is harmless: as the start of the read-back (which then reads a little more). On
    Apache Kafka every client's answer is right.

    Raises
    ------
    KafkaUnavailable
        If the broker cannot be reached, or a query fails.
    """

    def __init__(self, bootstrap_servers: str, **client_options: Any) -> None:
        options = {**CONSUMER_DEFAULTS, **client_options}
        for managed in ("session_timeout_ms", "heartbeat_interval_ms", "group_id",
                        "auto_offset_reset", "isolation_level"):
            options.pop(managed, None)
        try:
            self._consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None,
                                           isolation_level="read_uncommitted", **options)
        except kafka_errors.KafkaError as exc:
            raise _client_error("cannot connect to read offsets", exc) from exc

    def _query(self, what: str, call, *args):
        try:
            return dict(call(*args))
        except kafka_errors.KafkaError as exc:
            raise _client_error(f"reading {what} failed", exc) from exc

    def beginnings(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """First available offset of each partition."""
        return self._query("beginning offsets", self._consumer.beginning_offsets,
                           list(partitions))

    def ends(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """High watermark of each partition."""
        return self._query("end offsets", self._consumer.end_offsets, list(partitions))

    def high_watermarks(self, topics: Iterable[str]) -> dict[TopicPartition, int]:
        """High watermarks of every partition of ``topics``."""
        try:
            parts = [TopicPartition(topic, p) for topic in topics
                     for p in sorted(self._consumer.partitions_for_topic(topic) or ())]
        except kafka_errors.KafkaError as exc:
            raise _client_error("reading topic metadata failed", exc) from exc
        return self.ends(parts) if parts else {}

    def close(self) -> None:
        try:
            self._consumer.close()
        except Exception as exc:  # a dead broker; nothing to do
            logger.debug("closing the offsets reader: %s", exc)


def read_published_sources(
    bootstrap_servers: str,
    output_topic: str,
    dead_letter_topic: str,
    start_positions: Mapping[TopicPartition, int] | None = None,
    timeout: float = 60.0,
    idle_seconds: float = 1.0,
    **client_options: Any,
) -> tuple[set[tuple[str, int, int]], dict[TopicPartition, int]]:
    """Sources of everything already published on the output and dead-letter topics.

    Reads both topics with ``read_committed`` from ``start_positions`` (partitions not listed are
    read from their beginning) until nothing new arrives for ``idle_seconds``.

    Returns
    -------
    sources : set of (topic, partition, offset)
        The input events that already have an anomaly message or a dead letter.
    reached : dict of TopicPartition to int
        Where reading stopped, per partition.
    """
    start_positions = dict(start_positions or {})
    options = {**CONSUMER_DEFAULTS, **client_options}
    for managed in ("session_timeout_ms", "heartbeat_interval_ms", "group_id",
                    "auto_offset_reset", "isolation_level"):
        options.pop(managed, None)
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers, isolation_level="read_committed", group_id=None,
        **options,
    )
    sources: set[tuple[str, int, int]] = set()
    try:
        parts = []
        for topic in (output_topic, dead_letter_topic):
            ids = consumer.partitions_for_topic(topic) or set()
            parts += [TopicPartition(topic, p) for p in sorted(ids)]
        reached: dict[TopicPartition, int] = {}
        if parts:
            consumer.assign(parts)
            for tp in parts:
                consumer.seek(tp, start_positions.get(tp, 0))
            deadline = time.monotonic() + timeout
            last_record = time.monotonic()
            # Read until nothing more comes: end offsets from ListOffsets are not trusted
            # (Tansu 0.6 reports them too low), and stopping early would republish outputs.
            while time.monotonic() - last_record < idle_seconds:
                if time.monotonic() > deadline:
                    raise KafkaUnavailable(
                        f"reading back the output topics took over {timeout:g} s")
                batches = consumer.poll(timeout_ms=100, max_records=5000)
                if batches:
                    last_record = time.monotonic()
                for tp, records in batches.items():
                    for rec in records:
                        if tp.topic == output_topic:
                            src = source_of_output(rec.value)
                        else:
                            src = source_of_dead_letter(rec.headers)
                        if src is not None:
                            sources.add(src)
            reached = {tp: consumer.position(tp) for tp in parts}
        logger.info("read back %d published sources from %s and %s",
                    len(sources), output_topic, dead_letter_topic)
        return sources, reached
    except kafka_errors.KafkaError as exc:
        raise _client_error("reading back the output topics failed", exc) from exc
    finally:
        consumer.close()


class GroupMember:
    """What both sources share: joining the consumer group, offsets and the lag.

    Subclasses set ``topic``, ``group_id``, ``_offsets`` (an :class:`OffsetsReader`) and
    implement ``assignment()``, ``_serve_group()`` (one short round of the group protocol that
    consumes nothing) and ``_last_seen_end(tp)`` (the high watermark the fetcher last saw, or
    ``None``).
    """

    topic: str
    group_id: str
    _offsets: OffsetsReader

    def beginning_offsets(self) -> dict[TopicPartition, int]:
        """First available offset of each assigned partition."""
        return self._offsets.beginnings(self.assignment())

    def high_watermarks(self, topics: Iterable[str]) -> dict[TopicPartition, int]:
        """High watermarks of every partition of ``topics`` (e.g. the output topics)."""
        return self._offsets.high_watermarks(topics)

    def wait_for_assignment(self, timeout: float = 30.0) -> set[TopicPartition]:
        """Join the group: serve the group protocol until partitions are assigned.

        Raises
        ------
        KafkaUnavailable
            If no partition was assigned within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while not self.assignment():
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"no partition of {self.topic!r} assigned to group {self.group_id!r} within "
                    f"{timeout:g} s; does the topic exist and is another member holding it?")
            self._serve_group()
        return self.assignment()

    def lag(self, next_offsets: Mapping[TopicPartition, int]) -> int:
        """Events behind the end of the assigned partitions last seen by the fetcher (no I/O).

        ``next_offsets`` is the next offset to process per partition (the caller knows it; asking
        the consumer could block on the network).
        """
        total = 0
        for tp in self.assignment():
            end = self._last_seen_end(tp)
            if end is not None and tp in next_offsets:
                total += max(0, end - next_offsets[tp])
        return total


class KafkaSource(GroupMember):
    """A consumer-group member that yields micro-batches of raw records.

    Parameters
    ----------
    bootstrap_servers, topic, group_id
        Where to read from and the consumer group whose offsets record progress.
    auto_offset_reset
        ``"earliest"`` or ``"latest"``: where to start without a committed offset.
    client_options
        Extra kafka-python settings (security: ``security_protocol``, ``ssl_*``, ``sasl_*``).

    Raises
    ------
    KafkaUnavailable
        If the broker cannot be reached.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        group_id: str,
        auto_offset_reset: str = "earliest",
        **client_options: Any,
    ) -> None:
        self.topic = topic
        self.group_id = group_id
        options = {**CONSUMER_DEFAULTS, **client_options}
        try:
            self._consumer = KafkaConsumer(
                bootstrap_servers=bootstrap_servers, group_id=group_id,
                auto_offset_reset=auto_offset_reset, isolation_level="read_committed", **options,
            )
            self._consumer.subscribe([topic])
        except kafka_errors.KafkaError as exc:
            raise _client_error(f"cannot connect a consumer to {bootstrap_servers}", exc) from exc
        try:
            self._offsets = OffsetsReader(bootstrap_servers, **client_options)
        except KafkaUnavailable:
            self._consumer.close(autocommit=False)
            raise

    @property
    def consumer(self) -> KafkaConsumer:
        """The underlying kafka-python consumer."""
        return self._consumer

    def poll(self, max_records: int, timeout_ms: int) -> list:
        """Up to ``max_records`` records, waiting at most ``timeout_ms``; ordered per partition."""
        try:
            batches = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except kafka_errors.KafkaError as exc:
            raise _client_error("poll failed", exc) from exc
        records: list = []
        for tp in sorted(batches, key=lambda t: t.partition):
            records.extend(batches[tp])
        return records

    def _serve_group(self) -> None:
        self._consumer.poll(timeout_ms=100, max_records=1, update_offsets=False)

    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer.assignment())

    def committed(self) -> dict[TopicPartition, int | None]:
        """The group's committed offset for each assigned partition (``None`` if none)."""
        try:
            return {tp: self._consumer.committed(tp, timeout_ms=CALL_TIMEOUT_MS)
                    for tp in self._consumer.assignment()}
        except kafka_errors.KafkaError as exc:
            raise _client_error("reading committed offsets failed", exc) from exc

    def position(self, tp: TopicPartition) -> int:
        try:
            return self._consumer.position(tp, timeout_ms=CALL_TIMEOUT_MS)
        except kafka_errors.KafkaError as exc:
            raise _client_error("reading the position failed", exc) from exc

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._consumer.seek(tp, offset)

    def _last_seen_end(self, tp: TopicPartition) -> int | None:
        return self._consumer.highwater(tp)

    def group_metadata(self):
        return self._consumer.group_metadata()

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit ``offsets`` (next offset to read, per partition) synchronously."""
        try:
            self._consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        except kafka_errors.KafkaError as exc:
            raise _client_error("offset commit failed", exc) from exc

    def close(self) -> None:
        self._offsets.close()
        try:
            self._consumer.close(autocommit=False, timeout_ms=CALL_TIMEOUT_MS)
        except Exception as exc:  # closing a consumer of a dead broker may fail; nothing to do
            logger.debug("closing the consumer: %s", exc)


class BatchSink:
    """The delivery rule both sinks share; subclasses bring the client.

    Subclasses set :attr:`client_errors` (their client's exception types) and implement
    ``_publish_transaction(records, offsets, source)``, ``_send_all(records)`` and ``close()``.
    """

    #: The client's exception types; :meth:`publish` turns them into :class:`KafkaUnavailable`.
    client_errors: tuple[type[BaseException], ...] = (kafka_errors.KafkaError,)

    def __init__(self, delivery: str, transactional_id: str | None,
                 operation_timeout: float) -> None:
        if delivery not in DELIVERY_MODES:
            raise ValueError(f"delivery must be one of {DELIVERY_MODES}, got {delivery!r}")
        if delivery == "exactly-once" and not transactional_id:
            raise ValueError("exactly-once delivery needs a transactional_id")
        self.delivery = delivery
        self.operation_timeout = operation_timeout
        #: Set when the daemon stops: a blocking call is then given up at once.
        self.cancel: threading.Event | None = None

    @staticmethod
    def _unavailable(what: str, exc: BaseException) -> KafkaUnavailable:
        return _client_error(what, exc)

    def publish(
        self,
        records: Sequence[OutgoingRecord],
        offsets: Mapping[TopicPartition, int],
        source: Any,
    ) -> None:
        """Publish ``records`` and commit ``offsets`` (next offset to read) for ``source``'s group.

        In exactly-once mode both happen in one transaction; on failure the transaction is aborted
        (best effort) and :class:`KafkaUnavailable` is raised — rebuild the sink and retry. A
        batch with nothing to publish (the common case) commits its offsets with a plain,
        synchronous offset commit: atomic by itself, one round trip instead of a transaction's
        three, and the only way that works on Tansu 0.6, which drops the offsets of a
        transaction that holds no records (any but a producer's first, with either client;
        ``tests/test_broker_differences.py`` shows it, and that Kafka keeps them).

        Raises
        ------
        RecordRejected
            If records were refused for what they are (too large for their topic); in
            exactly-once mode nothing was published. Replace them and publish again.
        KafkaUnavailable
            If anything else failed; nothing should be assumed published (or not).
        """
        try:
            if self.delivery == "exactly-once" and records:
                self._publish_transaction(records, offsets, source)
            else:
                self._send_all(records)
                if offsets:
                    source.commit(offsets)
        except self.client_errors as exc:
            raise self._unavailable("publishing a batch failed", exc) from exc


class KafkaSink(BatchSink):
    """Publishes a batch's records and commits its input offsets, atomically or at least once.

    Parameters
    ----------
    bootstrap_servers
        The cluster.
    delivery
        ``"exactly-once"`` (transactions) or ``"at-least-once"`` (``acks=all``, commit after ack).
    transactional_id
        Required for exactly-once; one per daemon instance, stable across restarts so that a new
        instance fences the old one.
    client_options
        Extra kafka-python settings (security).

    Raises
    ------
    KafkaUnavailable
        If the broker cannot be reached or transactions cannot be initialised.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        delivery: str = "exactly-once",
        transactional_id: str | None = None,
        operation_timeout: float = 30.0,
        **client_options: Any,
    ) -> None:
        super().__init__(delivery, transactional_id, operation_timeout)
        options = {**PRODUCER_DEFAULTS, **client_options}
        if delivery == "exactly-once":
            options["transactional_id"] = transactional_id
        try:
            self._producer = KafkaProducer(bootstrap_servers=bootstrap_servers, **options)
            if delivery == "exactly-once":
                self._producer.init_transactions()
        except kafka_errors.KafkaError as exc:
            raise _client_error(f"cannot start a producer on {bootstrap_servers}", exc) from exc

    def _wait(self, result, what: str) -> None:
        self._producer._sender.wakeup()
        ends = _Deadline(self.operation_timeout, self.cancel)
        while not result.wait(timeout_ms=100):
            if ends.passed():
                if ends.cancelled:
                    raise KafkaUnavailable(f"{what} given up: stopping")
                raise KafkaUnavailable(
                    f"{what} did not finish within {self.operation_timeout:g} s")

    def _send(self, records: Sequence[OutgoingRecord], futures: list | None = None) -> list:
        """Send ``records``; their futures are appended to ``futures`` as they go."""
        futures = [] if futures is None else futures
        for i, r in enumerate(records):
            try:
                futures.append(self._producer.send(r.topic, value=r.value, key=r.key,
                                                   headers=r.headers or None))
            except RECORD_ERRORS as exc:  # refused before sending: too large for the producer
                raise RecordRejected({i: f"{type(exc).__name__}: {exc}"}) from exc
        return futures

    def _await_sends(self, futures: list) -> None:
        if not futures:
            return
        # flush() sends at once instead of after linger_ms; it does not raise on failure, the
        # futures do.
        self._producer.flush(timeout=self.operation_timeout)
        rejected = {}
        for i, fut in enumerate(futures):
            try:
                fut.get(timeout=self.operation_timeout)
            except RECORD_ERRORS as exc:  # the broker refused this record, not the batch
                rejected[i] = f"{type(exc).__name__}: {exc}"
        if rejected:
            raise RecordRejected(rejected)

    def _send_all(self, records: Sequence[OutgoingRecord]) -> None:
        self._await_sends(self._send(records))

    @staticmethod
    def _refused(futures: list) -> dict[int, str]:
        """The records among settled sends that the broker refused for what they are."""
        refused = {}
        for i, fut in enumerate(futures):
            if fut.is_done and fut.failed() and isinstance(fut.exception, RECORD_ERRORS):
                refused[i] = f"{type(fut.exception).__name__}: {fut.exception}"
        return refused

    def _publish_transaction(self, records, offsets, source) -> None:
        tm = self._producer._transaction_manager
        self._producer.begin_transaction()
        futures: list = []
        try:
            self._send(records, futures)
            # The offsets travel to the group coordinator while the records are produced;
            # nothing is visible before the commit, and a failed send aborts both.
            offsets_sent = None
            if offsets:
                offsets_sent = tm.send_offsets_to_transaction(
                    {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()},
                    source.group_metadata(),
                )
                self._producer._sender.wakeup()
            self._await_sends(futures)
            if offsets_sent is not None:
                self._wait(offsets_sent, "send_offsets_to_transaction")
            self._wait(tm.begin_commit(), "commit_transaction")
        except Exception as exc:
            try:
                self._wait(tm.begin_abort(), "abort_transaction")
            except Exception as abort_exc:  # the broker may be gone; the next instance fences us
                logger.debug("abort after a failed transaction: %s", abort_exc)
            # A refused record puts the transaction in error, so a later call (the offsets, the
            # commit) raises a generic error: the record's own future says what happened.
            refused = {} if isinstance(exc, RecordRejected) else self._refused(futures)
            if refused:
                raise RecordRejected(refused) from exc
            raise

    def close(self, timeout: float = 2.0) -> None:
        try:
            self._producer.close(timeout=timeout)
        except Exception as exc:  # closing a producer of a dead broker may fail; nothing to do
            logger.debug("closing the producer: %s", exc)
