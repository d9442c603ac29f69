"""The confluent-kafka backend (librdkafka): the default, fast one, on confluent-kafka alone.

The same :class:`~streamgmm.io.base.Source` and :class:`~streamgmm.io.base.Sink` as
:mod:`streamgmm.io.kafka` — same records, same transaction per batch — on librdkafka, whose C
client is the faster of the two (the README's performance table measures both side by side,
``scripts/bench_daemon.py``). :class:`ConfluentBackend` also creates topics
(:func:`ensure_topics`), reads first and end offsets (:class:`OffsetsReader`) and reads the
output topics back on recovery (:func:`read_published_sources`), all on librdkafka.
``kafka.backend = "kafka-python"`` selects :mod:`streamgmm.io.kafka` instead.

Settings: the ``[kafka]`` security keys and ``[kafka.librdkafka]``, translated and checked by
:mod:`streamgmm.io.librdkafka_settings` (which needs no client library).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import confluent_kafka as ck
from confluent_kafka.admin import AdminClient, NewTopic

from streamgmm.io.base import (
    STATE_TOPIC_MAX_MESSAGE_BYTES,
    CallTimedOut,
    GroupMember,
    KafkaUnavailable,
    OutgoingRecord,
    PartitionsLost,
    RebalanceListener,
    RecordRejected,
    TopicPartition,
    bounded_call,
    broker_reachable,
    check_delivery,
    collect_published,
    read_to_end,
)
from streamgmm.io.librdkafka_settings import CLASSIC_PROTOCOL_ONLY, librdkafka_security
from streamgmm.io.quirks import BrokerQuirks

__all__ = [
    "ConfluentBackend",
    "ConfluentSource",
    "ConfluentSink",
    "ConfluentStateReader",
    "OffsetsReader",
    "read_published_sources",
    "ensure_topics",
    "ensure_state_topic",
]

logger = logging.getLogger(__name__)
_librdkafka_log = logging.getLogger("streamgmm.librdkafka")

#: Consumer settings: the kafka-python backend's choices, in librdkafka's names.
CONSUMER_DEFAULTS: dict[str, Any] = {
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 500,
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "isolation.level": "read_committed",
    "fetch.wait.max.ms": 20,
    "socket.timeout.ms": 10000,
    "reconnect.backoff.max.ms": 2000,
}
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "linger.ms": 5,
    "message.timeout.ms": 30000,
    "socket.timeout.ms": 10000,
    "reconnect.backoff.max.ms": 2000,
    # Kafka's transaction coordinator answers CONCURRENT_TRANSACTIONS while it still writes the
    # previous transaction's markers, and librdkafka retries after retry.backoff.ms (100 ms by
    # default; Kafka's own Java client retries that one after 20 ms): a quarter of the time per
    # transaction on Apache Kafka at 10 ms (the README's broker table has the numbers).
    # The backoff still grows exponentially to retry.backoff.max.ms (1 s) while a broker is down.
    "retry.backoff.ms": 10,
    # A partition's state record (up to the state topic's max.message.bytes, plus framing) must
    # pass the producer (librdkafka's default is 1,000,000 bytes); the output topics keep the
    # broker's own limit, and the daemon fits its records to kafka.max_message_bytes first.
    "message.max.bytes": STATE_TOPIC_MAX_MESSAGE_BYTES + 65_536,
}

#: The session timeout of a KIP-848 member, seconds: Apache Kafka's default of the broker's
#: ``group.consumer.session.timeout.ms`` (the client cannot set it).
CONSUMER_PROTOCOL_SESSION_TIMEOUT = 45.0

#: librdkafka's errors that say the group moved on without this member (stale generation,
#: member id, instance id or member epoch): offsets sent with its metadata are refused.
_STALE_MEMBER_ERRORS = frozenset({
    ck.KafkaError.ILLEGAL_GENERATION, ck.KafkaError.UNKNOWN_MEMBER_ID,
    ck.KafkaError.FENCED_INSTANCE_ID, ck.KafkaError.REBALANCE_IN_PROGRESS,
    ck.KafkaError.FENCED_MEMBER_EPOCH, ck.KafkaError.STALE_MEMBER_EPOCH,
    ck.KafkaError._ASSIGNMENT_LOST})

#: librdkafka's errors that refuse one record for what it is.
_RECORD_ERRORS = frozenset({ck.KafkaError.MSG_SIZE_TOO_LARGE, ck.KafkaError.RECORD_LIST_TOO_LARGE,
                            ck.KafkaError.INVALID_RECORD})




class _ScopeFilter(logging.Filter):
    """Drop librdkafka's note that a property applies to the other client only.

    One ``[kafka.librdkafka]`` table configures both the consumer and the producer; each uses the
    properties that apply to it, which is expected, not worth a warning.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be ignored by this" not in record.getMessage()


_librdkafka_log.addFilter(_ScopeFilter())


def _unavailable(what: str, exc: BaseException,
                 kind: type[KafkaUnavailable] = KafkaUnavailable) -> KafkaUnavailable:
    error = exc.args[0] if exc.args else exc
    text = error.str() if hasattr(error, "str") else str(error)
    return kind(f"{what}: {text}")


def _stale_member(exc: BaseException) -> bool:
    """Whether the librdkafka error of ``exc`` says the member's group metadata is stale."""
    error = exc.args[0] if isinstance(exc, ck.KafkaException) and exc.args else None
    return hasattr(error, "code") and error.code() in _STALE_MEMBER_ERRORS


def _log_error(error) -> None:
    """librdkafka's error callback: errors it recovers from by itself are logged, not raised."""
    _librdkafka_log.warning("librdkafka: %s", error.str())


def _to_confluent(tp: TopicPartition, offset: int | None = None):
    if offset is None:
        return ck.TopicPartition(tp.topic, tp.partition)
    return ck.TopicPartition(tp.topic, tp.partition, offset)


class ConsumedRecord:
    """A consumed record with kafka-python's attribute names, read lazily from a librdkafka message.

    Only ``value`` is read for every record; the rest is read for the few records that become
    anomalies or dead letters.
    """

    __slots__ = ("_message",)

    def __init__(self, message) -> None:
        self._message = message

    @property
    def value(self) -> bytes | None:
        return self._message.value()

    @property
    def key(self) -> bytes | None:
        return self._message.key()

    @property
    def topic(self) -> str:
        return self._message.topic()

    @property
    def partition(self) -> int:
        return self._message.partition()

    @property
    def offset(self) -> int:
        return self._message.offset()

    @property
    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._message.headers()

    def __repr__(self) -> str:
        return f"ConsumedRecord({self.topic}:{self.partition}@{self.offset})"


class ConfluentSource(GroupMember):
    """A consumer-group member that yields micro-batches of raw records (librdkafka).

    A :class:`~streamgmm.io.base.Source`. Newly assigned partitions are held (paused) until the
    next :meth:`poll`, so that the daemon can :meth:`seek` them first; seeks take effect at the
    next :meth:`poll`. A ``listener`` is called from librdkafka's rebalance callbacks, which run
    on the caller's thread inside :meth:`poll` and :meth:`wait_for_assignment`.

    Parameters
    ----------
    bootstrap_servers, topic, group_id, auto_offset_reset
        As for :class:`~streamgmm.io.kafka.KafkaSource`.
    connect_timeout
        Seconds to wait for the broker's first answer.
    listener
        A :class:`~streamgmm.io.base.RebalanceListener`; the offsets its
        ``partitions_assigned`` returns are given to ``assign``/``incremental_assign``, so no
        record of those partitions is fetched from anywhere else.
    rebalance
        ``"eager"`` (every rebalance revokes everything) or ``"cooperative"``
        (``cooperative-sticky``: only the partitions that move are revoked, with
        ``incremental_unassign``/``incremental_assign``; the others keep flowing).
    group_instance_id
        Static membership (``group.instance.id``).
    group_protocol
        ``"classic"`` or ``"consumer"`` (KIP-848: the broker assigns, incrementally; librdkafka
        then refuses the classic protocol's properties,
        :data:`~streamgmm.io.librdkafka_settings.CLASSIC_PROTOCOL_ONLY`, which are left out).
    settings
        Extra librdkafka properties (security included), already in librdkafka's names.

    Raises
    ------
    KafkaUnavailable
        If the broker cannot be reached within ``connect_timeout`` seconds.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        group_id: str,
        auto_offset_reset: str = "earliest",
        connect_timeout: float = 5.0,
        listener: RebalanceListener | None = None,
        rebalance: str = "eager",
        group_instance_id: str | None = None,
        group_protocol: str = "classic",
        **settings: Any,
    ) -> None:
        self.topic = topic
        self.group_id = group_id
        self.group_protocol = group_protocol
        self._listener = listener
        self._listener_error: BaseException | None = None
        self._closing = False
        # KIP-848 assignments are incremental whatever the assignor.
        self._incremental = rebalance == "cooperative" or group_protocol == "consumer"
        self._held = False  # partitions assigned and paused, waiting for the next poll
        self._starts: dict[TopicPartition, int] = {}  # seeks to apply at the next poll
        common = {"bootstrap.servers": bootstrap_servers, "logger": _librdkafka_log,
                  "error_cb": _log_error, **settings}
        conf = {**CONSUMER_DEFAULTS, **common, "group.id": group_id,
                "auto.offset.reset": auto_offset_reset}
        if rebalance == "cooperative":
            conf["partition.assignment.strategy"] = "cooperative-sticky"
        if group_instance_id is not None:
            conf["group.instance.id"] = group_instance_id
        if group_protocol == "consumer":
            conf["group.protocol"] = "consumer"
            for name in CLASSIC_PROTOCOL_ONLY:
                conf.pop(name, None)
            self.session_timeout = CONSUMER_PROTOCOL_SESSION_TIMEOUT
        else:
            self.session_timeout = int(conf["session.timeout.ms"]) / 1000
        self.max_poll_interval = int(conf.get("max.poll.interval.ms", 300_000)) / 1000
        try:
            self._consumer = ck.Consumer(conf)
            self._consumer.list_topics(topic, timeout=connect_timeout)
            self._consumer.subscribe([topic], on_assign=self._on_assign,
                                     on_revoke=self._on_revoke, on_lost=self._on_lost)
        except ck.KafkaException as exc:
            self.close()
            raise _unavailable(f"cannot connect a consumer to {bootstrap_servers}", exc) from exc
        try:
            self._offsets = OffsetsReader(bootstrap_servers, **settings)
        except KafkaUnavailable:
            self.close()
            raise

    def _call_listener(self, method: str, partitions) -> Any:
        """The listener's ``method`` for ``partitions``; an exception is kept for :meth:`poll`."""
        if self._listener is None or self._closing or not partitions:
            return None
        try:
            return getattr(self._listener, method)(
                {TopicPartition(tp.topic, tp.partition) for tp in partitions})
        except BaseException as exc:  # raised again by poll(), once librdkafka is done
            if self._listener_error is None:
                self._listener_error = exc
            return None

    def _raise_listener_error(self) -> None:
        if self._listener_error is not None:
            error, self._listener_error = self._listener_error, None
            raise error

    def _on_assign(self, consumer, partitions) -> None:
        starts = self._call_listener("partitions_assigned", partitions) or {}
        given = [ck.TopicPartition(tp.topic, tp.partition, starts.get(
            TopicPartition(tp.topic, tp.partition), ck.OFFSET_STORED)) for tp in partitions]
        if self._incremental:
            consumer.incremental_assign(given)
        else:
            consumer.assign(given)
        if given:
            consumer.pause(given)
            self._held = True

    def _on_revoke(self, consumer, partitions) -> None:
        self._call_listener("partitions_revoked", partitions)
        self._forget(consumer, partitions)

    def _on_lost(self, consumer, partitions) -> None:
        self._call_listener("partitions_lost", partitions)
        self._forget(consumer, partitions)

    def _forget(self, consumer, partitions) -> None:
        for tp in partitions:
            self._starts.pop(TopicPartition(tp.topic, tp.partition), None)
        if self._incremental:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    def _release(self) -> None:
        """Start fetching the held partitions, from where :meth:`seek` put them.

        A seek is applied as an assignment with explicit offsets: librdkafka's own ``seek`` is
        lost when it races the committed-offset lookup that follows an assignment.
        """
        consumer = self._consumer
        assigned = consumer.assignment()
        if self._starts:
            ours = self.assignment()
            sought = [ck.TopicPartition(tp.topic, tp.partition, self._starts[tp])
                      for tp in self._starts if tp in ours]
            if self._incremental:
                consumer.incremental_unassign(sought)
                consumer.incremental_assign(sought)
            else:
                consumer.assign([
                    ck.TopicPartition(tp.topic, tp.partition, self._starts.get(
                        TopicPartition(tp.topic, tp.partition), ck.OFFSET_STORED))
                    for tp in assigned])
            self._starts = {}
        consumer.resume(consumer.assignment())
        self._held = False

    def poll(self, max_records: int, timeout_ms: int) -> list[ConsumedRecord]:
        """Up to ``max_records`` records that have arrived, waiting at most ``timeout_ms`` for the
        first; ordered per partition."""
        try:
            if self._held or self._starts:
                self._release()
            # What has arrived, without waiting for a full batch (librdkafka's consume() waits
            # until it has max_records or the timeout passed: 130 ms p50 latency at a light
            # load); wait only for the first record.
            messages = self._consumer.consume(max_records, 0)
            if not messages:
                first = self._consumer.poll(timeout_ms / 1000)
                if first is None:
                    return []
                messages = [first]
                if max_records > 1:
                    messages += self._consumer.consume(max_records - 1, 0)
        except ck.KafkaException as exc:
            self._raise_listener_error()
            raise _unavailable("poll failed", exc) from exc
        self._raise_listener_error()
        for message in messages:
            error = message.error()
            if error is not None and error.code() != ck.KafkaError._PARTITION_EOF:
                raise KafkaUnavailable(f"poll failed: {error.str()}")
        # librdkafka interleaves partitions; the daemon wants each partition's records together.
        # The sort is stable (offsets stay ascending) and linear on runs that are already sorted.
        messages.sort(key=ck.Message.partition)
        return [ConsumedRecord(m) for m in messages]

    def _serve_group(self) -> None:
        # Assigned partitions are paused at once (_on_assign): this consumes nothing.
        try:
            message = self._consumer.poll(0.1)
        except ck.KafkaException as exc:
            self._raise_listener_error()
            raise _unavailable("joining the group failed", exc) from exc
        self._raise_listener_error()
        if message is not None and message.error() is not None:
            logger.debug("while joining: %s", message.error().str())

    def wait_for_assignment(self, timeout: float = 30.0) -> set[TopicPartition]:
        """As :meth:`GroupMember.wait_for_assignment`; with ``group_protocol="consumer"`` the
        error says that the broker may not offer KIP-848 (Tansu answers without assigning)."""
        try:
            return super().wait_for_assignment(timeout)
        except KafkaUnavailable as exc:
            if self.group_protocol != "consumer" or isinstance(exc, PartitionsLost):
                raise
            raise KafkaUnavailable(
                f"{exc} With group_protocol = \"consumer\" the broker must offer the KIP-848 "
                "consumer group protocol (Apache Kafka 4 does, the embedded Tansu broker "
                "assigns nothing): set kafka.group_protocol = \"classic\" for it.") from exc

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def committed(self, partitions: Iterable[TopicPartition] | None = None
                  ) -> dict[TopicPartition, int | None]:
        """The group's committed offset of each of ``partitions`` (default: the assigned ones),
        ``None`` where there is none."""
        wanted = (self._consumer.assignment() if partitions is None
                  else [_to_confluent(tp) for tp in partitions])
        if not wanted:
            return {}
        try:
            found = self._consumer.committed(wanted, timeout=10)
        except ck.KafkaException as exc:
            raise _unavailable("reading committed offsets failed", exc) from exc
        return {TopicPartition(tp.topic, tp.partition): tp.offset if tp.offset >= 0 else None
                for tp in found}

    def position(self, tp: TopicPartition) -> int:
        """The next offset to fetch; the end of the partition if nothing was fetched yet."""
        if tp in self._starts:
            return self._starts[tp]
        (found,) = self._consumer.position([_to_confluent(tp)])
        return found.offset if found.offset >= 0 else self._offsets.ends([tp])[tp]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` on (applied at the next :meth:`poll`)."""
        self._starts[tp] = offset

    def _last_seen_end(self, tp: TopicPartition) -> int | None:
        _, end = self._consumer.get_watermark_offsets(_to_confluent(tp), cached=True)
        return end if end >= 0 else None

    def group_metadata(self):
        """The member's group metadata now, for a transaction's offsets.

        Raises :class:`~streamgmm.io.base.PartitionsLost` once librdkafka knows that it left the
        group (no member id): offsets without a member from a transactional producer would be
        taken as a non-member's and accepted, even for partitions another member owns now.
        """
        if not self._consumer.memberid():
            raise PartitionsLost(f"this consumer is not a member of the group {self.group_id!r} "
                                 "(its session expired or it was fenced)")
        return self._consumer.consumer_group_metadata()

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit ``offsets`` (next offset to read, per partition) synchronously."""
        try:
            self._consumer.commit(offsets=[_to_confluent(tp, o) for tp, o in offsets.items()],
                                  asynchronous=False)
        except ck.KafkaException as exc:
            if _stale_member(exc):
                raise _unavailable("offset commit refused, the group moved on", exc,
                                   PartitionsLost) from exc
            raise _unavailable("offset commit failed", exc) from exc

    def close(self) -> None:
        """Leave the group (a static member does not: it keeps its partitions for the session
        timeout) without committing and without calling the listener."""
        self._closing = True
        offsets, consumer = getattr(self, "_offsets", None), getattr(self, "_consumer", None)
        self._offsets = self._consumer = None
        if offsets is not None:
            offsets.close()
        if consumer is not None:
            try:
                consumer.close()
            except Exception as exc:  # a dead broker; nothing to do
                logger.debug("closing the consumer: %s", exc)


def ensure_topics(bootstrap_servers: str, topics: Iterable[str], partitions: int = 1,
                  timeout: float = 10.0, **settings: Any) -> None:
    """Create the topics that do not exist yet (replication factor 1 on a single broker).

    Raises
    ------
    KafkaUnavailable
        If the broker cannot be reached or refuses to create a topic.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap_servers, "logger": _librdkafka_log,
                         "error_cb": _log_error, "reconnect.backoff.max.ms": 2000,
                         "socket.timeout.ms": 10000, **settings})
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
        new = [NewTopic(t, partitions, 1) for t in dict.fromkeys(topics) if t not in existing]
        for topic, future in (admin.create_topics(new, request_timeout=timeout).items()
                              if new else ()):
            try:
                future.result(timeout)
            except ck.KafkaException as exc:
                if exc.args[0].code() != ck.KafkaError.TOPIC_ALREADY_EXISTS:
                    raise _unavailable(f"cannot create topic {topic!r}", exc) from exc
    except ck.KafkaException as exc:
        raise _unavailable("cannot create topics", exc) from exc


class OffsetsReader:
    """First and end offsets of partitions, read by a librdkafka client at ``read_uncommitted``.

    On Tansu no end offset from ListOffsets is right once a batch holds several records
    (:attr:`~streamgmm.io.quirks.BrokerQuirks.readback_until_silence`), so the daemon uses these
    ends only where too low is harmless: as the start of the next read-back (which then reads a
    little more).

    Raises
    ------
    KafkaUnavailable
        If a query fails.
    """

    def __init__(self, bootstrap_servers: str, timeout: float = 10.0, **settings: Any) -> None:
        self.timeout = timeout
        self._consumer = ck.Consumer({
            **settings, "bootstrap.servers": bootstrap_servers, "logger": _librdkafka_log,
            "error_cb": _log_error, "group.id": "streamgmm-offsets-reader",
            "enable.auto.commit": False, "isolation.level": "read_uncommitted"})

    def _watermarks(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, tuple]:
        try:
            return {tp: self._consumer.get_watermark_offsets(_to_confluent(tp), self.timeout,
                                                             cached=False)
                    for tp in partitions}
        except ck.KafkaException as exc:
            raise _unavailable("reading offsets failed", exc) from exc

    def beginnings(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """First available offset of each partition."""
        return {tp: low for tp, (low, _) in self._watermarks(partitions).items()}

    def ends(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """High watermark of each partition."""
        return {tp: high for tp, (_, high) in self._watermarks(partitions).items()}

    def high_watermarks(self, topics: Iterable[str]) -> dict[TopicPartition, int]:
        """High watermarks of every partition of ``topics``."""
        return self.ends(_partitions_of(self._consumer, topics, self.timeout))

    def close(self) -> None:
        try:
            self._consumer.close()
        except Exception as exc:  # a dead broker; nothing to do
            logger.debug("closing the offsets reader: %s", exc)


def _partitions_of(client, topics: Iterable[str], timeout: float) -> list[TopicPartition]:
    """Every partition of the ``topics`` that exist."""
    parts = []
    for topic in topics:
        try:
            meta = client.list_topics(topic, timeout=timeout).topics.get(topic)
        except ck.KafkaException as exc:
            raise _unavailable("reading topic metadata failed", exc) from exc
        if meta is not None and meta.error is None:
            parts += [TopicPartition(topic, p) for p in sorted(meta.partitions)]
    return parts


def ensure_state_topic(bootstrap_servers: str, topic: str, timeout: float = 10.0,
                       **settings: Any) -> None:
    """Create the compacted state topic ``topic`` if it does not exist yet.

    One partition, ``cleanup.policy=compact``, ``max.message.bytes``
    :data:`~streamgmm.io.base.STATE_TOPIC_MAX_MESSAGE_BYTES`.

    Raises
    ------
    KafkaUnavailable
        If the broker cannot be reached or refuses to create it.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap_servers, "logger": _librdkafka_log,
                         "error_cb": _log_error, "reconnect.backoff.max.ms": 2000,
                         "socket.timeout.ms": 10000, **settings})
    try:
        if topic in admin.list_topics(timeout=timeout).topics:
            return
        new = NewTopic(topic, 1, 1, config={
            "cleanup.policy": "compact",
            "max.message.bytes": str(STATE_TOPIC_MAX_MESSAGE_BYTES)})
        future = admin.create_topics([new], request_timeout=timeout)[topic]
        try:
            future.result(timeout)
        except ck.KafkaException as exc:
            if exc.args[0].code() != ck.KafkaError.TOPIC_ALREADY_EXISTS:
                raise _unavailable(f"cannot create the state topic {topic!r}", exc) from exc
    except ck.KafkaException as exc:
        raise _unavailable(f"cannot create the state topic {topic!r}", exc) from exc


class _AssignedReader:
    """A ``read_committed`` librdkafka consumer of assigned partitions (no group membership),
    that knows how far it has read each: from its records and from the end-of-partition events
    (which also cover the markers of transactions, that no record shows)."""

    def __init__(self, bootstrap_servers: str, what: str, **settings: Any) -> None:
        self.what = what
        try:
            self.consumer = ck.Consumer({
                **CONSUMER_DEFAULTS, **settings, "bootstrap.servers": bootstrap_servers,
                "logger": _librdkafka_log, "error_cb": _log_error,
                "group.id": "streamgmm-assigned-reader", "enable.partition.eof": True})
        except ck.KafkaException as exc:
            raise _unavailable(f"cannot connect to {what}", exc) from exc
        self.reached: dict[TopicPartition, int] = {}

    def assign(self, starts: Mapping[TopicPartition, int]) -> None:
        self.reached = dict(starts)
        self.consumer.assign([_to_confluent(tp, o) for tp, o in starts.items()])

    def fetch(self, timeout: float, on_message) -> set[TopicPartition]:
        """Read what has arrived (waiting up to ``timeout`` seconds), each record to
        ``on_message``; returns the partitions that had records."""
        arrived = set()
        # What has arrived, waiting only for the first (consume() alone waits for all 5000).
        messages = self.consumer.consume(5000, 0)
        if not messages:
            first = self.consumer.poll(timeout)
            messages = [] if first is None else [first, *self.consumer.consume(4999, 0)]
        for message in messages:
            tp = TopicPartition(message.topic(), message.partition())
            error = message.error()
            if error is not None:
                if error.code() != ck.KafkaError._PARTITION_EOF:
                    raise KafkaUnavailable(f"{self.what} failed: {error.str()}")
                self.reached[tp] = max(self.reached[tp], message.offset())
                continue
            self.reached[tp] = message.offset() + 1
            arrived.add(tp)
            on_message(message)
        return arrived

    def ends(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.consumer.get_watermark_offsets(_to_confluent(tp), 10.0, cached=False)[1]
                for tp in partitions}

    def read_to_end(self, on_message, may_under_report: bool, timeout: float) -> None:
        """Read until everything written before the call is read
        (:func:`~streamgmm.io.base.read_to_end`)."""
        read_to_end(self.ends(self.reached), may_under_report,
                    lambda: self.fetch(0.1, on_message), lambda: self.reached, self.ends,
                    timeout, self.what)

    def close(self) -> None:
        try:
            self.consumer.close()
        except Exception as exc:  # a dead broker; nothing to do
            logger.debug("closing a reader: %s", exc)


class ConfluentStateReader:
    """A :class:`~streamgmm.io.base.StateReader` on librdkafka: every partition of ``topic``,
    from its beginning, ``read_committed``, by ``assign`` (no group).

    Parameters
    ----------
    bootstrap_servers, topic, may_under_report, settings
        As for :class:`streamgmm.io.kafka.KafkaStateReader` (``settings`` in librdkafka's names).

    Raises
    ------
    KafkaUnavailable
        If the broker cannot be reached or the topic does not exist.
    """

    def __init__(self, bootstrap_servers: str, topic: str, may_under_report: bool = True,
                 **settings: Any) -> None:
        self.topic = topic
        self.may_under_report = may_under_report
        self._reader = _AssignedReader(bootstrap_servers, f"reading the topic {topic!r}",
                                       **settings)
        try:
            parts = _partitions_of(self._reader.consumer, [topic], 10.0)
            if not parts:
                raise KafkaUnavailable(f"the topic {topic!r} does not exist")
            self._reader.assign({tp: ck.OFFSET_BEGINNING for tp in parts})
            self._reader.reached = dict.fromkeys(parts, 0)
        except (ck.KafkaException, KafkaUnavailable) as exc:
            self.close()
            if isinstance(exc, KafkaUnavailable):
                raise
            raise _unavailable(f"cannot read the topic {topic!r}", exc) from exc

    def _read(self, call, *args) -> list[ConsumedRecord]:
        records: list = []
        try:
            call(*args, lambda m: records.append(ConsumedRecord(m)))
        except ck.KafkaException as exc:
            raise _unavailable(f"reading {self.topic!r} failed", exc) from exc
        records.sort(key=lambda r: r.partition)  # stable: offsets stay ascending
        return records

    def poll(self, timeout_ms: int) -> list[ConsumedRecord]:
        """The committed records not returned yet (ordered per partition); ``[]`` if none."""
        return self._read(self._reader.fetch, timeout_ms / 1000)

    def catch_up(self, timeout: float) -> list[ConsumedRecord]:
        """Every record written before this call that :meth:`poll` has not returned yet."""
        def read(on_message) -> None:
            self._reader.read_to_end(on_message, self.may_under_report, timeout)

        return self._read(read)

    def close(self) -> None:
        self._reader.close()


def read_published_sources(
    bootstrap_servers: str,
    output_topic: str,
    dead_letter_topic: str,
    start_positions: Mapping[TopicPartition, int] | None = None,
    until_silence: bool = True,
    timeout: float = 60.0,
    **settings: Any,
) -> tuple[set[tuple[str, int, int]], dict[TopicPartition, int]]:
    """Sources of everything already published on the output and dead-letter topics.

    As :func:`streamgmm.io.kafka.read_published_sources`, on librdkafka: read with
    ``read_committed`` from ``start_positions`` (partitions not listed: from their beginning)
    to the end offsets, or, ``until_silence`` (the ends may be too low), by
    :class:`~streamgmm.io.base.EndOffsetWatch`'s rule, which ends while another replica keeps
    publishing.

    Raises
    ------
    KafkaUnavailable
        If the broker fails, or reading takes longer than ``timeout`` seconds.
    """
    start_positions = dict(start_positions or {})
    reader = _AssignedReader(bootstrap_servers, "reading back the output topics", **settings)
    sources: set[tuple[str, int, int]] = set()

    def collect(message) -> None:
        collect_published(sources, output_topic, message.topic(), message.value(),
                          message.headers())

    try:
        parts = _partitions_of(reader.consumer, (output_topic, dead_letter_topic), 10.0)
        if parts:
            reader.assign({tp: start_positions.get(tp, 0) for tp in parts})
            reader.read_to_end(collect, until_silence, timeout)
        logger.info("read back %d published sources from %s and %s",
                    len(sources), output_topic, dead_letter_topic)
        return sources, dict(reader.reached)
    except ck.KafkaException as exc:
        raise _unavailable("reading back the output topics failed", exc) from exc
    finally:
        reader.close()


class ConfluentSink:
    """Publishes records, alone or in one transaction with a batch's input offsets (librdkafka).

    A :class:`~streamgmm.io.base.Sink`, with the same guarantees as
    :class:`streamgmm.io.kafka.KafkaSink`. librdkafka's transaction calls can block past their
    own timeout (seen: a broker that restarted empty while ``send_offsets_to_transaction``
    waited), so each runs under :func:`~streamgmm.io.base.bounded_call`.

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
        **settings: Any,
    ) -> None:
        check_delivery(delivery, transactional_id)
        self.delivery = delivery
        self.operation_timeout = operation_timeout
        self.cancel: threading.Event | None = None
        conf = {**PRODUCER_DEFAULTS, "bootstrap.servers": bootstrap_servers,
                "logger": _librdkafka_log, "error_cb": _log_error, **settings}
        if delivery == "exactly-once":
            conf["transactional.id"] = transactional_id
        self._producer = None
        try:
            self._producer = ck.Producer(conf)
            if delivery == "exactly-once":
                self._bounded("init_transactions", self._producer.init_transactions,
                              operation_timeout)
        except ck.KafkaException as exc:
            raise _unavailable(f"cannot start a producer on {bootstrap_servers}", exc) from exc

    def _produce(self, records: Sequence[OutgoingRecord], on_delivery=None) -> dict[int, str]:
        """Produce ``records``; returns the records refused, filled in as deliveries report.

        ``on_delivery(error, message)`` is called for every delivery. A record refused for what
        it is (too large) is noted in the returned mapping, by its position in ``records``.
        """
        producer, rejected = self._live(), {}

        def reporter(index):
            def report(error, message) -> None:
                if error is not None and error.code() in _RECORD_ERRORS:
                    rejected[index] = error.str()
                if on_delivery is not None:
                    on_delivery(error, message)
            return report

        for i, r in enumerate(records):
            while True:
                try:
                    producer.produce(r.topic, value=r.value, key=r.key,
                                     headers=r.headers or None, on_delivery=reporter(i))
                    break
                except BufferError:  # the local queue is full: let deliveries drain it
                    producer.poll(0.05)
                except ck.KafkaException as exc:
                    if exc.args and exc.args[0].code() in _RECORD_ERRORS:
                        raise RecordRejected({i: exc.args[0].str()}) from exc
                    raise
        return rejected

    def _live(self):
        if self._producer is None:
            raise KafkaUnavailable("the producer was abandoned in a blocked call; rebuild the sink")
        return self._producer

    def send(self, records: Sequence[OutgoingRecord]) -> None:
        """Publish ``records``; return once every one is acknowledged."""
        try:
            self._send_all(records)
        except ck.KafkaException as exc:
            raise _unavailable("publishing a batch failed", exc) from exc

    def _send_all(self, records: Sequence[OutgoingRecord]) -> None:
        failures: list = []

        def on_delivery(error, _message) -> None:
            if error is not None:
                failures.append(error)

        rejected = self._produce(records, on_delivery)
        remaining = self._live().flush(self.operation_timeout)
        if rejected:
            raise RecordRejected(rejected)
        if failures:
            raise KafkaUnavailable(f"{len(failures)} records were not delivered: "
                                   f"{failures[0].str()}")
        if remaining:
            raise KafkaUnavailable(f"{remaining} records not acknowledged within "
                                   f"{self.operation_timeout:g} s")

    def _bounded(self, what: str, call, timeout: float, *args: Any) -> Any:
        """``call(*args, timeout)``, abandoning the producer if it blocks well past ``timeout``."""
        try:
            return bounded_call(what, timeout + 5.0, call, *args, timeout,
                                client=self._producer, cancel=self.cancel)
        except CallTimedOut:
            self._producer = None  # blocked inside librdkafka: never flushed, closed or reused
            raise

    def transact(self, records: Sequence[OutgoingRecord], offsets: Mapping[TopicPartition, int],
                 group_metadata: Any) -> None:
        """Publish ``records`` and commit ``offsets`` for the group in one transaction.

        Raises :class:`~streamgmm.io.base.PartitionsLost` when the broker refuses the offsets
        because ``group_metadata`` is stale (the transaction is aborted)."""
        try:
            self._transact(records, offsets, group_metadata)
        except ck.KafkaException as exc:
            if _stale_member(exc):
                raise _unavailable("the transaction's offsets were refused, the group moved on",
                                   exc, PartitionsLost) from exc
            raise _unavailable("publishing a batch failed", exc) from exc

    def _transact(self, records, offsets, group_metadata) -> None:
        producer, timeout = self._live(), self.operation_timeout
        producer.begin_transaction()
        rejected: dict[int, str] = {}
        try:
            rejected = self._produce(records)
            if offsets:
                self._bounded("send_offsets_to_transaction", producer.send_offsets_to_transaction,
                              timeout, [_to_confluent(tp, o) for tp, o in offsets.items()],
                              group_metadata)
            self._bounded("commit_transaction", producer.commit_transaction, timeout)
        except Exception as exc:
            if self._producer is not None:
                try:
                    self._bounded("abort_transaction", producer.abort_transaction,
                                  min(timeout, 5.0))
                except Exception as abort_exc:  # the broker may be gone; the next one fences us
                    logger.debug("abort after a failed transaction: %s", abort_exc)
            if rejected and not isinstance(exc, RecordRejected):
                raise RecordRejected(rejected) from exc
            raise

    def close(self, timeout: float = 2.0) -> None:
        if self._producer is None:
            return
        try:
            self._producer.flush(timeout)
        except Exception as exc:  # a dead broker; nothing to do
            logger.debug("closing the producer: %s", exc)
        self._producer = None


class ConfluentBackend:
    """The confluent-kafka backend (a :class:`~streamgmm.io.base.Backend`) for a ``[kafka]``
    section.

    Parameters
    ----------
    kafka : streamgmm.config.KafkaConfig
    """

    name = "confluent-kafka"

    def __init__(self, kafka: Any) -> None:
        self.kafka = kafka
        self.bootstrap = ",".join(kafka.bootstrap_servers)
        self._settings = {**librdkafka_security(kafka.security_kwargs()), **kafka.librdkafka}

    def ensure_topics(self, topics: Iterable[str]) -> None:
        ensure_topics(self.bootstrap, topics, **librdkafka_security(self.kafka.security_kwargs()))

    def ensure_state_topic(self, topic: str) -> None:
        ensure_state_topic(self.bootstrap, topic,
                           **librdkafka_security(self.kafka.security_kwargs()))

    def open_state_reader(self, topic: str) -> ConfluentStateReader:
        quirks = BrokerQuirks.named(self.kafka.broker_quirks)
        return ConfluentStateReader(self.bootstrap, topic, quirks.readback_until_silence,
                                    **librdkafka_security(self.kafka.security_kwargs()))

    def open_sink(self, cancel: threading.Event | None = None) -> ConfluentSink:
        sink = ConfluentSink(self.bootstrap, delivery=self.kafka.delivery,
                             transactional_id=self.kafka.effective_transactional_id,
                             **self._settings)
        sink.cancel = cancel
        return sink

    def open_source(self, listener: RebalanceListener | None = None) -> ConfluentSource:
        kafka = self.kafka
        return ConfluentSource(self.bootstrap, kafka.input_topic, kafka.group_id,
                               auto_offset_reset=kafka.auto_offset_reset, listener=listener,
                               rebalance=getattr(kafka, "rebalance", "eager"),
                               group_instance_id=getattr(kafka, "group_instance_id", None),
                               group_protocol=getattr(kafka, "group_protocol", "classic"),
                               **self._settings)

    def reachable(self, timeout: float = 0.5) -> bool:
        return broker_reachable(self.bootstrap, timeout)

    def read_published_sources(self, output_topic: str, dead_letter_topic: str,
                               start_positions: Mapping[TopicPartition, int] | None = None,
                               until_silence: bool = True):
        security = librdkafka_security(self.kafka.security_kwargs())
        return read_published_sources(self.bootstrap, output_topic, dead_letter_topic,
                                      start_positions, until_silence, **security)

    def probe(self, report: Any, interval: float = 2.0, timeout: float = 2.0):
        """A started :class:`streamgmm.io.probe.BrokerProbe` on a librdkafka client of its own."""
        from streamgmm.io.probe import BrokerProbe

        client = ck.Producer({**self._settings, "bootstrap.servers": self.bootstrap,
                              "logger": _probe_log,
                              "socket.timeout.ms": max(10, int(timeout * 1000))})
        return BrokerProbe(lambda t: client.list_topics(timeout=t), report, interval,
                           timeout).start()


_probe_log = logging.getLogger("streamgmm.librdkafka.probe")
_probe_log.propagate = False
_probe_log.addHandler(logging.NullHandler())
