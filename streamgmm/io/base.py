"""What the daemon needs from a Kafka client library, written down: the edge's contract.

:class:`Source` (a consumer-group member that hands out micro-batches of raw records) and
:class:`Sink` (publishes a batch's anomalies and dead letters with the batch's input offsets) are
the protocols every backend implements: :mod:`streamgmm.io.kafka` on kafka-python,
:mod:`streamgmm.io.confluent` on confluent-kafka (librdkafka), :mod:`streamgmm.io.memory` in
memory for the daemon's unit tests. :class:`Backend` builds them and does the rest of what the
daemon asks of a cluster (creating topics, reading its own output back on recovery);
:func:`streamgmm.io.backend.open_backend` picks the configured one.

Nothing here imports a client library: partitions are streamgmm's own :class:`TopicPartition`,
records are anything with the attributes of :class:`ConsumedRecord`, and the errors are
:class:`KafkaUnavailable` (retry later) and :class:`RecordRejected` (the records' own fault).

The delivery rule (:func:`publish_batch`):

* ``delivery="exactly-once"``: one transaction per batch — the records, the batch's offsets for
  the consumer group (:meth:`Sink.transact`), commit. Readers of the output use
  ``isolation_level="read_committed"``.
* ``delivery="at-least-once"``: every record acknowledged (:meth:`Sink.send`), then the offsets
  committed (:meth:`Source.commit`).

Examples
--------
>>> TopicPartition("events", 2)
TopicPartition(topic='events', partition=2)
>>> fit_record(OutgoingRecord("dlq", b"x" * 5000), 2000).value[:3]
b'xxx'
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from streamgmm.messages import source_of_dead_letter, source_of_output

__all__ = [
    "TopicPartition",
    "ConsumedRecord",
    "OutgoingRecord",
    "Source",
    "Sink",
    "Backend",
    "DELIVERY_MODES",
    "publish_batch",
    "check_delivery",
    "KafkaUnavailable",
    "CallTimedOut",
    "PartitionsLost",
    "RecordRejected",
    "RebalanceListener",
    "StateReader",
    "bounded_call",
    "Deadline",
    "abandoned_clients",
    "record_size",
    "fit_record",
    "broker_reachable",
    "GroupMember",
    "collect_published",
]

DELIVERY_MODES = ("exactly-once", "at-least-once")


class TopicPartition(NamedTuple):
    """A partition of a topic; the daemon's own, whatever the client library.

    A tuple, so it equals (and hashes like) kafka-python's ``TopicPartition`` of the same
    partition; each backend converts at its client's boundary.
    """

    topic: str
    partition: int

    def key(self) -> str:
        """``"topic:partition"``, the form checkpoints store.

        Examples
        --------
        >>> TopicPartition("a:b", 3).key(), TopicPartition.from_key("a:b:3")
        ('a:b:3', TopicPartition(topic='a:b', partition=3))
        """
        return f"{self.topic}:{self.partition}"

    @classmethod
    def from_key(cls, key: str) -> TopicPartition:
        topic, _, partition = key.rpartition(":")
        return cls(topic, int(partition))


class ConsumedRecord(Protocol):
    """A record a :class:`Source` hands out (the attributes the daemon reads)."""

    @property
    def value(self) -> bytes | None: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]] | None: ...
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...


class KafkaUnavailable(ConnectionError):
    """The Kafka cluster cannot be reached or a Kafka operation failed; retry later."""


class CallTimedOut(KafkaUnavailable):
    """A client call did not return by its deadline; the client is abandoned, not reused."""


class PartitionsLost(KafkaUnavailable):
    """The group moved on without this member: its group metadata is stale (fenced by the broker:
    ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID, FENCED_INSTANCE_ID, REBALANCE_IN_PROGRESS on a
    TxnOffsetCommit/OffsetCommit, or librdkafka's equivalent), or the daemon's lease on its
    partitions ran out (a frozen process). Nothing of the transaction was committed."""


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



# Clients one of whose calls never returned. They stay referenced (destroying a client that is
# blocked inside a call blocks too) until the process ends; see abandoned_clients().
_ABANDONED: list[Any] = []


def abandoned_clients() -> int:
    """How many clients were abandoned in a blocked call (the process should end by ``os._exit``:
    destroying them at interpreter exit would block)."""
    return len(_ABANDONED)


#: Seconds a blocking call still gets once the daemon is stopping.
STOP_GRACE_SECONDS = 2.0


class Deadline:
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
    streamgmm.io.base.CallTimedOut: sleeping did not return within 0.05 s; the client is ...
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call(*args)
        except BaseException as exc:  # handed to the caller's thread as it is
            outcome["error"] = exc

    worker = threading.Thread(target=run, name=f"streamgmm-{what}", daemon=True)
    worker.start()
    ends = Deadline(deadline, cancel)
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



class RebalanceListener(Protocol):
    """What a :class:`Source` tells its owner about partitions that come and go.

    The source calls it on the caller's thread, inside :meth:`Source.poll` and
    :meth:`Source.wait_for_assignment`.

    Notes
    -----
    ``partitions_assigned(new) -> Mapping[TopicPartition, int]``
        ``new`` are this member's now. Returns the offset to start reading from for each (the
        listener may call :meth:`Source.committed` for them); the source applies them before any
        record of those partitions is fetched. A partition left out starts from the group's
        committed offset (or ``auto_offset_reset``).
    ``partitions_revoked(gone)``
        Called *before* ``gone`` is released, while this member's generation is still valid: the
        listener may publish a transaction or commit offsets for them inside it.
    ``partitions_lost(gone)``
        Already gone (the session expired, the member was fenced): the listener must not publish
        for them.

    With the eager protocol every rebalance revokes all partitions and assigns all new ones;
    with the cooperative one only the partitions that move.
    """

    def partitions_assigned(self, partitions: set[TopicPartition]
                            ) -> Mapping[TopicPartition, int]: ...
    def partitions_revoked(self, partitions: set[TopicPartition]) -> None: ...
    def partitions_lost(self, partitions: set[TopicPartition]) -> None: ...


@runtime_checkable
class StateReader(Protocol):
    """Reads a (compacted) state topic: every partition of it, from its beginning, committed
    records only (``read_committed``), without a consumer group.

    Notes
    -----
    ``poll(timeout_ms) -> list[ConsumedRecord]``
        The records that arrived since the last call, in offset order per partition; waits at
        most ``timeout_ms`` when there are none.
    ``catch_up(timeout) -> list[ConsumedRecord]``
        Every record written before this call that :meth:`poll` has not returned yet (correct
        on brokers whose end offsets are too low, and while others keep writing); raises
        :class:`KafkaUnavailable` after ``timeout`` seconds.
    ``close()``
        Release the client; never raises.
    """

    def poll(self, timeout_ms: int) -> list[ConsumedRecord]: ...
    def catch_up(self, timeout: float) -> list[ConsumedRecord]: ...
    def close(self) -> None: ...


@runtime_checkable
class Source(Protocol):
    """A consumer-group member of one input topic that hands out micro-batches of raw records.

    The daemon calls it from one thread only. Every method that talks to the cluster raises
    :class:`KafkaUnavailable` on failure; the daemon then closes it and builds a new one.

    Attributes
    ----------
    topic, group_id : str
        The input topic and the consumer group whose committed offsets record progress.

    Notes
    -----
    Contract, method by method:

    ``wait_for_assignment(timeout=30.0) -> set[TopicPartition]``
        Serve the group protocol, consuming nothing, until partitions are assigned; raise
        :class:`KafkaUnavailable` after ``timeout`` seconds without any.
    ``assignment() -> set[TopicPartition]``
        The partitions assigned now (no I/O).
    ``committed(partitions=None) -> dict[TopicPartition, int | None]``
        The group's committed offset (next offset to read) of each of ``partitions`` (default:
        the assigned ones), ``None`` where there is none.
    ``beginning_offsets() -> dict[TopicPartition, int]``
        The first available offset of each assigned partition.
    ``position(tp) -> int``
        The next offset :meth:`poll` would hand out for ``tp`` (a pending :meth:`seek` counts).
    ``seek(tp, offset)``
        Read ``tp`` from ``offset`` on; takes effect at the next :meth:`poll` at the latest.
    ``poll(max_records, timeout_ms) -> list[ConsumedRecord]``
        Up to ``max_records`` records, waiting at most ``timeout_ms`` for the first; the records
        of each partition are contiguous and in offset order (the daemon relies on it). Only
        committed records (``read_committed``). Polling does not commit anything.
    ``high_watermarks(topics) -> dict[TopicPartition, int]``
        End offsets of every partition of ``topics`` (any topic, e.g. the outputs). A broker may
        answer too low (:class:`streamgmm.io.quirks.BrokerQuirks`); callers use them only where
        too low is harmless.
    ``lag(next_offsets) -> int``
        Events behind the ends of the assigned partitions last seen by the fetcher, given the
        next offset to process per partition; no I/O.
    ``group_metadata() -> object``
        The consumer's group metadata for :meth:`Sink.transact` (opaque; the same backend's
        sink knows what it is). Read afresh for each transaction, so that a member that lost
        its partitions cannot commit for them (KIP-447).
    ``commit(offsets)``
        Commit ``offsets`` (next offset to read, per partition) synchronously, outside any
        transaction.
    ``close()``
        Leave the group without committing; never raises.
    ``session_timeout``, ``max_poll_interval``
        The consumer's effective session timeout and poll interval, in seconds: a member that
        was frozen for longer may have lost its partitions (the daemon's lease).
    """

    topic: str
    group_id: str
    session_timeout: float
    max_poll_interval: float

    def wait_for_assignment(self, timeout: float = 30.0) -> set[TopicPartition]: ...
    def assignment(self) -> set[TopicPartition]: ...
    def committed(self, partitions: Iterable[TopicPartition] | None = None
                  ) -> dict[TopicPartition, int | None]: ...
    def beginning_offsets(self) -> dict[TopicPartition, int]: ...
    def position(self, tp: TopicPartition) -> int: ...
    def seek(self, tp: TopicPartition, offset: int) -> None: ...
    def poll(self, max_records: int, timeout_ms: int) -> list[ConsumedRecord]: ...
    def high_watermarks(self, topics: Iterable[str]) -> dict[TopicPartition, int]: ...
    def lag(self, next_offsets: Mapping[TopicPartition, int]) -> int: ...
    def group_metadata(self) -> Any: ...
    def commit(self, offsets: Mapping[TopicPartition, int]) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class Sink(Protocol):
    """Publishes records, alone or in one transaction with a consumer group's offsets.

    Attributes
    ----------
    delivery : {"exactly-once", "at-least-once"}
        Exactly-once sinks are transactional (their ``transactional_id`` fences a previous
        instance when the sink is built, aborting its open transaction on Apache Kafka).
    cancel : threading.Event or None
        Set by the daemon when it stops: a blocking call then gives up within a few seconds.

    Notes
    -----
    ``transact(records, offsets, group_metadata)``
        One transaction: ``records`` and ``offsets`` (next offset to read, per partition, for
        the group of ``group_metadata``, from :meth:`Source.group_metadata`) become visible
        together or not at all. On failure the transaction is aborted (best effort).
    ``send(records)``
        Publish ``records`` and return once every one is acknowledged (``acks=all``).
    ``close(timeout=2.0)``
        Flush what can be flushed within ``timeout`` seconds and release the client; never
        raises.

    Both publishing calls raise :class:`RecordRejected` when records were refused for what they
    are (too large for their topic; in a transaction nothing was published: replace them and
    publish again) and :class:`KafkaUnavailable` for anything else (nothing should be assumed
    published, or not: rebuild the sink and retry).
    """

    delivery: str
    cancel: threading.Event | None

    def transact(self, records: Sequence[OutgoingRecord], offsets: Mapping[TopicPartition, int],
                 group_metadata: Any) -> None: ...
    def send(self, records: Sequence[OutgoingRecord]) -> None: ...
    def close(self, timeout: float = 2.0) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """A client library's way to everything the daemon asks of the cluster.

    ``open_sink()`` is called before ``open_source()`` on every (re)connection: building an
    exactly-once sink settles a previous instance's open transaction before the source joins
    the group and the outputs are read back.

    Notes
    -----
    ``name``
        ``"kafka-python"``, ``"confluent-kafka"`` or ``"memory"``.
    ``ensure_topics(topics)``
        Create the topics that do not exist yet.
    ``open_sink(cancel) -> Sink`` and ``open_source(listener=None) -> Source``
        New clients, connected (raise :class:`KafkaUnavailable` when the cluster cannot be
        reached); the source tells ``listener`` (a :class:`RebalanceListener`) about its
        partitions.
    ``ensure_state_topic(topic)``
        Create the compacted state topic if it does not exist (one partition,
        ``cleanup.policy=compact``, records up to 8 MB).
    ``open_state_reader(topic) -> StateReader``
        A :class:`StateReader` of ``topic``.
    ``read_published_sources(output_topic, dead_letter_topic, start_positions, until_silence)``
        ``(sources, reached)``: the ``(topic, partition, offset)`` of every input event that
        already has an anomaly message or a dead letter, read with ``read_committed`` from
        ``start_positions`` (partitions not listed: from their beginning), and where reading
        stopped per partition. Reads to the end offsets, or — ``until_silence``, for brokers
        whose end offsets are wrong — until nothing new arrives for a second.
    ``reachable(timeout) -> bool``
        Whether a broker accepts connections now (a cheap check for idle polls).
    ``probe(report)``
        A started :class:`streamgmm.io.probe.BrokerProbe`-like object (``stop()``) that calls
        ``report(up)`` from its own thread, or ``None``.
    """

    name: str

    def ensure_topics(self, topics: Iterable[str]) -> None: ...
    def open_sink(self, cancel: threading.Event | None = None) -> Sink: ...
    def open_source(self, listener: RebalanceListener | None = None) -> Source: ...
    def ensure_state_topic(self, topic: str) -> None: ...
    def open_state_reader(self, topic: str) -> StateReader: ...
    def read_published_sources(
        self, output_topic: str, dead_letter_topic: str,
        start_positions: Mapping[TopicPartition, int] | None = None, until_silence: bool = True,
    ) -> tuple[set[tuple[str, int, int]], dict[TopicPartition, int]]: ...
    def reachable(self, timeout: float = 0.5) -> bool: ...
    def probe(self, report: Any) -> Any: ...


def check_delivery(delivery: str, transactional_id: str | None) -> None:
    """Refuse an unknown delivery mode, and exactly-once without a transactional id."""
    if delivery not in DELIVERY_MODES:
        raise ValueError(f"delivery must be one of {DELIVERY_MODES}, got {delivery!r}")
    if delivery == "exactly-once" and not transactional_id:
        raise ValueError("exactly-once delivery needs a transactional_id")


def publish_batch(source: Source, sink: Sink, records: Sequence[OutgoingRecord],
                  offsets: Mapping[TopicPartition, int], plain_commit_when_empty: bool) -> None:
    """Publish a batch's ``records`` and commit its input ``offsets``, by the sink's delivery.

    Exactly-once: one transaction. At-least-once: every record acknowledged, then the offsets
    committed. ``plain_commit_when_empty`` (a broker quirk,
    :attr:`streamgmm.io.quirks.BrokerQuirks.plain_commit_when_nothing_to_publish`) commits the
    offsets of an exactly-once batch with nothing to publish by a plain offset commit instead
    of a transaction that holds only offsets.

    Raises
    ------
    RecordRejected, KafkaUnavailable
        As :class:`Sink`'s calls.
    """
    if sink.delivery == "exactly-once" and (records or not plain_commit_when_empty):
        if records or offsets:
            sink.transact(records, offsets, source.group_metadata())
        return
    if records:
        sink.send(records)
    if offsets:
        source.commit(offsets)


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




class GroupMember:
    """What the Kafka sources share: joining the group, first and end offsets, the lag.

    Subclasses set ``topic``, ``group_id`` and ``_offsets`` (an object with
    ``beginnings(partitions)`` and ``high_watermarks(topics)``) and implement ``assignment()``,
    ``_serve_group()`` (one short round of the group protocol that consumes nothing) and
    ``_last_seen_end(tp)`` (the high watermark the fetcher last saw, or ``None``).
    """

    topic: str
    group_id: str
    _offsets: Any

    def assignment(self) -> set[TopicPartition]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _serve_group(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _last_seen_end(self, tp: TopicPartition) -> int | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def beginning_offsets(self) -> dict[TopicPartition, int]:
        """First available offset of each assigned partition."""
        return self._offsets.beginnings(self.assignment())

    def high_watermarks(self, topics: Iterable[str]) -> dict[TopicPartition, int]:
        """End offsets of every partition of ``topics`` (e.g. the output topics)."""
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


def collect_published(sources: set[tuple[str, int, int]], output_topic: str, topic: str,
                      value: bytes | None, headers: Any) -> None:
    """Add the input event a read-back record was made from to ``sources`` (if it names one)."""
    src = source_of_output(value) if topic == output_topic else source_of_dead_letter(headers)
    if src is not None:
        sources.add(src)


#: How long a read-back waits for more once nothing arrives, with ``until_silence``.
READBACK_SILENCE_SECONDS = 1.0

# ---- TEMPORARY (ops-port trial of the rebalance WIP; never committed) ----
STATE_TOPIC_MAX_MESSAGE_BYTES = 8 * 1024 * 1024


#: Seconds between two end-offset queries of a read that watches for a fresh end
#: (:class:`EndOffsetWatch`).
FRESH_END_INTERVAL_SECONDS = 0.2


class EndOffsetWatch:
    """When a read that must return everything written before it began may stop, per partition.

    The read starts at some position and reads on; ``ends`` are the end offsets reported when
    it began. A partition is done once its position reached its end. If the broker may report
    ends too low (``may_under_report``: Tansu answers the last record *batch*'s base offset + 1,
    :attr:`streamgmm.io.quirks.BrokerQuirks.readback_until_silence`), reaching it is not enough:
    the read goes on until either nothing new arrived on the partition for ``silence`` seconds,
    or a fresh end query reported an end ``r2`` above the first one and the position passed
    ``r2 - 1``. That fresh end is the base offset (+ 1) of a batch that began after the read
    did, so everything written before the read has been read; the first such ``r2`` is kept,
    so the read ends while another producer keeps writing (it only has to read faster than
    the producer writes).

    The clock is the caller's (``now`` arguments, e.g. ``time.monotonic()``): no I/O here.

    Parameters
    ----------
    ends : mapping of TopicPartition to int
        End offsets reported when the read began (on a ``read_committed`` client, the last
        stable offsets).
    may_under_report : bool
        Whether those ends may be too low.
    now : float
        When the read began.
    silence : float
        Seconds without a new record after which an under-reporting broker's partition is
        taken as read to its end.

    Examples
    --------
    A broker that reports ends right: done at the end.

    >>> tp = TopicPartition("state", 0)
    >>> watch = EndOffsetWatch({tp: 10}, may_under_report=False, now=0.0)
    >>> watch.pending({tp: 9}, now=0.1), watch.pending({tp: 10}, now=0.2)
    ({TopicPartition(topic='state', partition=0)}, set())

    A broker that under-reports, with a producer writing all along: the first fresh end above
    the reported one is where the read may stop, silence or not.

    >>> watch = EndOffsetWatch({tp: 10}, may_under_report=True, now=0.0)
    >>> watch.wants_fresh_ends()
    {TopicPartition(topic='state', partition=0)}
    >>> watch.fresh_ends({tp: 10}); watch.fresh_ends({tp: 25}); watch.fresh_ends({tp: 40})
    >>> watch.progressed(tp, now=0.5)
    >>> watch.pending({tp: 24}, now=0.6), watch.pending({tp: 25}, now=0.7)
    ({TopicPartition(topic='state', partition=0)}, set())

    Without writers: a second of silence after the reported end.

    >>> watch = EndOffsetWatch({tp: 10}, may_under_report=True, now=0.0)
    >>> watch.pending({tp: 12}, now=0.9), watch.pending({tp: 12}, now=1.0)
    ({TopicPartition(topic='state', partition=0)}, set())
    """

    def __init__(self, ends: Mapping[TopicPartition, int], may_under_report: bool, now: float,
                 silence: float = READBACK_SILENCE_SECONDS) -> None:
        self.ends = dict(ends)
        self.may_under_report = may_under_report
        self.silence = silence
        self._last_progress = dict.fromkeys(self.ends, now)
        self._targets: dict[TopicPartition, int] = {}

    def progressed(self, tp: TopicPartition, now: float) -> None:
        """New records of ``tp`` arrived at ``now``."""
        self._last_progress[tp] = now

    def wants_fresh_ends(self) -> set[TopicPartition]:
        """The partitions whose fresh end offsets the reader should query (and pass to
        :meth:`fresh_ends`); empty when the broker's ends are right."""
        if not self.may_under_report:
            return set()
        return {tp for tp in self.ends if tp not in self._targets}

    def fresh_ends(self, ends: Mapping[TopicPartition, int]) -> None:
        """End offsets queried after the read began."""
        for tp, end in ends.items():
            if tp in self.ends and tp not in self._targets and end > self.ends[tp]:
                self._targets[tp] = end

    def done(self, tp: TopicPartition, position: int, now: float) -> bool:
        """Whether ``tp``, read up to ``position`` (the next offset to read), is read far enough."""
        if position < self.ends[tp]:
            return False
        if not self.may_under_report:
            return True
        if tp in self._targets and position >= self._targets[tp]:
            return True
        return now - self._last_progress[tp] >= self.silence

    def pending(self, positions: Mapping[TopicPartition, int], now: float
                ) -> set[TopicPartition]:
        """The partitions not read far enough yet, given each one's position."""
        return {tp for tp in self.ends if not self.done(tp, positions[tp], now)}


def read_to_end(ends: Mapping[TopicPartition, int], may_under_report: bool,
                fetch: Callable[[], Iterable[TopicPartition]],
                positions: Callable[[], Mapping[TopicPartition, int]],
                query_ends: Callable[[set[TopicPartition]], Mapping[TopicPartition, int]],
                timeout: float, what: str) -> None:
    """Read until everything written before the call has been read (:class:`EndOffsetWatch`).

    The read loop both backends share: ``fetch()`` reads what has arrived (waiting briefly) and
    returns the partition of each record it handed on; ``positions()`` is the next offset to
    read of every partition of ``ends``; ``query_ends(partitions)`` asks the broker for fresh end
    offsets (at most every :data:`FRESH_END_INTERVAL_SECONDS`, only on a broker that may
    under-report).

    Raises
    ------
    KafkaUnavailable
        If the read is not done within ``timeout`` seconds (``what`` names it in the message).
    """
    started = time.monotonic()
    watch = EndOffsetWatch(ends, may_under_report, started)
    last_query = started
    while True:
        now = time.monotonic()
        pending = watch.pending(positions(), now)
        if not pending:
            return
        if now - started > timeout:
            raise KafkaUnavailable(f"{what} took over {timeout:g} s")
        fresh = watch.wants_fresh_ends() & pending
        if fresh and now - last_query >= FRESH_END_INTERVAL_SECONDS:
            watch.fresh_ends(query_ends(fresh))
            last_query = now
        arrived = set(fetch())
        now = time.monotonic()
        for tp in arrived:
            watch.progressed(tp, now)
