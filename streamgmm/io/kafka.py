"""The kafka-python backend: the daemon's edges on kafka-python and nothing else.

:class:`KafkaSource` (a :class:`~streamgmm.io.base.Source`) is a consumer-group member that
hands out micro-batches of raw records (bytes in; decoding is :mod:`streamgmm.features`' job, so
a bad record can reach the dead-letter topic instead of blowing up inside the client).
:class:`KafkaSink` (a :class:`~streamgmm.io.base.Sink`) publishes records, in one transaction
with a batch's input offsets in exactly-once mode; in at-least-once mode every send future is
awaited (``flush()`` does not raise on failure). :class:`KafkaPythonBackend` builds them and
creates topics (:func:`ensure_topics`), reads first and end offsets (:class:`OffsetsReader`)
and reads the output topics back on recovery (:func:`read_published_sources`), all on
kafka-python. Settings passed through from ``[kafka.client]``, ``[kafka.consumer]`` and
``[kafka.producer]`` are checked by :func:`check_passthrough_settings`.

``kafka.backend = "confluent-kafka"`` (the default) selects :mod:`streamgmm.io.confluent`
instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka import TopicPartition as _KafkaTopicPartition
from kafka import errors as kafka_errors
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from streamgmm.io.base import (
    STATE_TOPIC_MAX_MESSAGE_BYTES,
    CallTimedOut,
    Deadline,
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
from streamgmm.io.quirks import BrokerQuirks

__all__ = [
    "KafkaPythonBackend",
    "KafkaSource",
    "KafkaSink",
    "KafkaStateReader",
    "OffsetsReader",
    "read_published_sources",
    "ensure_topics",
    "ensure_state_topic",
    "check_passthrough_settings",
    "CONSUMER_DEFAULTS",
    "PRODUCER_DEFAULTS",
]

logger = logging.getLogger(__name__)

#: Client settings for fast group joins and bounded waits (seconds, not minutes, on broker loss).
CONSUMER_DEFAULTS: dict[str, Any] = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 500,
    "enable_auto_commit": False,
    "request_timeout_ms": 10000,
    "bootstrap_timeout_ms": 5000,
    "reconnect_backoff_max_ms": 2000,
    # How long the broker may hold a fetch that found too little data. kafka-python's 500 ms
    # default stalls a group member's polls every few batches on the embedded broker (README,
    # "Daemon speed"); short waits remove the stalls and cost a few idle fetches per second.
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
    # default; Kafka's Java client retries that one after 20 ms): a fifth of the time per
    # transaction on Apache Kafka at 10 ms (the README's broker table has the numbers).
    # Reconnecting to a lost broker keeps its own backoff (reconnect_backoff_max_ms).
    "retry_backoff_ms": 10,
    # A partition's state record (up to the state topic's max.message.bytes) must pass the
    # producer; the output topics keep the broker's limit (oversized records come back refused,
    # and the daemon fits its records to kafka.max_message_bytes before sending).
    "max_request_size": STATE_TOPIC_MAX_MESSAGE_BYTES,
}

#: Deadline of the consumer calls that have none by default (committed, position, close), ms.
CALL_TIMEOUT_MS = 10_000
#: Milliseconds a poll waits at least while the consumer has a join to complete (see
#: :meth:`_RebalanceBridge.poll_timeout_ms`).
JOIN_POLL_MS = 1000

#: kafka-python's errors that say the group moved on without this member (its generation,
#: member id or instance id is stale): offsets sent with its metadata are refused.
STALE_MEMBER_ERRORS = (kafka_errors.CommitFailedError, kafka_errors.IllegalGenerationError,
                       kafka_errors.UnknownMemberIdError, kafka_errors.FencedInstanceIdError,
                       kafka_errors.RebalanceInProgressError)

#: kafka-python's errors that refuse one record for what it is.
RECORD_ERRORS = (kafka_errors.MessageSizeTooLargeError, kafka_errors.RecordListTooLargeError,
                 kafka_errors.InvalidRecordError)


def _client_error(what: str, exc: Exception) -> KafkaUnavailable:
    return KafkaUnavailable(f"{what}: {type(exc).__name__}: {exc}")


def _stale_member(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the member's group metadata is stale."""
    while exc is not None:
        if isinstance(exc, STALE_MEMBER_ERRORS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _kafka_partitions(partitions: Iterable[TopicPartition]) -> list[_KafkaTopicPartition]:
    """kafka-python's ``TopicPartition`` of each partition (its API checks the type)."""
    return [_KafkaTopicPartition(tp.topic, tp.partition) for tp in partitions]


def ensure_topics(
    bootstrap_servers: str, topics: Iterable[str], partitions: int = 1, **client_options: Any
) -> None:
    """Create the topics that do not exist yet (replication factor 1 on a single broker).

    The admin client gets the daemon's short bootstrap timeout and reconnect backoff, so that a
    daemon reconnecting to a restarting Kafka finds it within seconds of its return
    (kafka-python's defaults wait 30 s each).
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


def ensure_state_topic(bootstrap_servers: str, topic: str, **client_options: Any) -> None:
    """Create the compacted state topic ``topic`` if it does not exist yet.

    One partition, ``cleanup.policy=compact``, ``max.message.bytes``
    :data:`~streamgmm.io.base.STATE_TOPIC_MAX_MESSAGE_BYTES`.

    Raises
    ------
    KafkaUnavailable
        If the broker cannot be reached or refuses to create it.
    """
    options = {key: CONSUMER_DEFAULTS[key] for key in
               ("bootstrap_timeout_ms", "reconnect_backoff_max_ms", "request_timeout_ms")}
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers,
                                 **{**options, **client_options})
    except kafka_errors.KafkaError as exc:
        raise _client_error("cannot connect to create the state topic", exc) from exc
    try:
        if topic in set(admin.list_topics()):
            return
        try:
            admin.create_topics([NewTopic(topic, 1, 1, topic_configs={
                "cleanup.policy": "compact",
                "max.message.bytes": str(STATE_TOPIC_MAX_MESSAGE_BYTES)})])
        except kafka_errors.TopicAlreadyExistsError:
            pass
    except kafka_errors.KafkaError as exc:
        raise _client_error(f"cannot create the state topic {topic!r}", exc) from exc
    finally:
        admin.close()


def _plain_consumer(bootstrap_servers: str, what: str, **client_options: Any) -> KafkaConsumer:
    """A ``read_committed`` consumer outside any group (it reads by ``assign``)."""
    options = {**CONSUMER_DEFAULTS, **client_options}
    for managed in ("session_timeout_ms", "heartbeat_interval_ms", "group_id",
                    "auto_offset_reset", "isolation_level", "group_instance_id"):
        options.pop(managed, None)
    try:
        return KafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None,
                             isolation_level="read_committed", auto_offset_reset="earliest",
                             **options)
    except kafka_errors.KafkaError as exc:
        raise _client_error(f"cannot connect to {what}", exc) from exc


def _partitions_of(consumer: KafkaConsumer, topics: Iterable[str]) -> list[_KafkaTopicPartition]:
    return [_KafkaTopicPartition(topic, p) for topic in topics
            for p in sorted(consumer.partitions_for_topic(topic) or ())]


def _read_assigned_to_end(consumer: KafkaConsumer, parts: list[_KafkaTopicPartition],
                          on_record, may_under_report: bool, timeout: float, what: str) -> None:
    """Read ``parts`` (assigned, positioned) until everything written before the call is read,
    handing each record to ``on_record`` (:func:`~streamgmm.io.base.read_to_end`)."""
    ours = {TopicPartition(*tp): tp for tp in parts}

    def fetch() -> set[TopicPartition]:
        batches = consumer.poll(timeout_ms=100, max_records=5000)
        for tp in sorted(batches, key=lambda t: (t.topic, t.partition)):
            for record in batches[tp]:
                on_record(record)
        return {TopicPartition(*tp) for tp, records in batches.items() if records}

    def positions() -> dict[TopicPartition, int]:
        found = {tp: consumer.position(ktp, timeout_ms=CALL_TIMEOUT_MS) for tp, ktp in ours.items()}
        unknown = sorted(tp.key() for tp, position in found.items() if position is None)
        if unknown:  # kafka-python answers None when the position is not known in time
            raise KafkaUnavailable(f"reading {what}: no position of {', '.join(unknown)} within "
                                   f"{CALL_TIMEOUT_MS} ms")
        return found

    def query_ends(partitions: set[TopicPartition]) -> dict[TopicPartition, int]:
        # A read_committed consumer's end offsets are the last stable offsets.
        found = consumer.end_offsets([ours[tp] for tp in partitions])
        return {TopicPartition(*tp): o for tp, o in found.items()}

    read_to_end(query_ends(set(ours)), may_under_report, fetch, positions, query_ends, timeout,
                what)


class KafkaStateReader:
    """A :class:`~streamgmm.io.base.StateReader` on kafka-python: every partition of ``topic``,
    from its beginning, ``read_committed``, by ``assign`` (no group).

    Parameters
    ----------
    bootstrap_servers, topic
        The cluster and the (state) topic.
    may_under_report
        Whether the broker's end offsets may be too low
        (:attr:`~streamgmm.io.quirks.BrokerQuirks.readback_until_silence`); :meth:`catch_up`
        then reads by :class:`~streamgmm.io.base.EndOffsetWatch`'s rule.
    client_options
        Extra kafka-python settings (security).

    Raises
    ------
    KafkaUnavailable
        If the broker cannot be reached or the topic does not exist.
    """

    def __init__(self, bootstrap_servers: str, topic: str, may_under_report: bool = True,
                 **client_options: Any) -> None:
        self.topic = topic
        self.may_under_report = may_under_report
        self._consumer = _plain_consumer(bootstrap_servers, f"read the topic {topic!r}",
                                         **client_options)
        try:
            self._parts = _partitions_of(self._consumer, [topic])
            if not self._parts:
                raise KafkaUnavailable(f"the topic {topic!r} does not exist")
            self._consumer.assign(self._parts)
            self._consumer.seek_to_beginning(*self._parts)
        except kafka_errors.KafkaError as exc:
            self.close()
            raise _client_error(f"cannot read the topic {topic!r}", exc) from exc
        except KafkaUnavailable:
            self.close()
            raise

    def poll(self, timeout_ms: int) -> list:
        """The committed records not returned yet (ordered per partition); ``[]`` if none."""
        try:
            batches = self._consumer.poll(timeout_ms=timeout_ms, max_records=5000)
        except kafka_errors.KafkaError as exc:
            raise _client_error(f"reading {self.topic!r} failed", exc) from exc
        return [record for tp in sorted(batches, key=lambda t: t.partition)
                for record in batches[tp]]

    def catch_up(self, timeout: float) -> list:
        """Every record written before this call that :meth:`poll` has not returned yet."""
        records: list = []
        try:
            _read_assigned_to_end(self._consumer, self._parts, records.append,
                                  self.may_under_report, timeout, f"catching up on {self.topic!r}")
        except kafka_errors.KafkaError as exc:
            raise _client_error(f"reading {self.topic!r} failed", exc) from exc
        return records

    def close(self) -> None:
        try:
            self._consumer.close()
        except Exception as exc:  # a dead broker; nothing to do
            logger.debug("closing the state reader: %s", exc)


class OffsetsReader:
    """First and end offsets of partitions, read by a kafka-python client at ``read_uncommitted``.

    On Tansu no end offset from ListOffsets is right once a batch holds several records
    (:attr:`~streamgmm.io.quirks.BrokerQuirks.readback_until_silence`), so the daemon uses these
    ends only where too low is harmless: as the start of the next read-back (which then reads a
    little more).

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
            return {TopicPartition(*tp): o for tp, o in call(*args).items()}
        except kafka_errors.KafkaError as exc:
            raise _client_error(f"reading {what} failed", exc) from exc

    def beginnings(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """First available offset of each partition."""
        return self._query("beginning offsets", self._consumer.beginning_offsets,
                           _kafka_partitions(partitions))

    def ends(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """High watermark of each partition."""
        return self._query("end offsets", self._consumer.end_offsets,
                           _kafka_partitions(partitions))

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
    until_silence: bool = True,
    timeout: float = 60.0,
    **client_options: Any,
) -> tuple[set[tuple[str, int, int]], dict[TopicPartition, int]]:
    """Sources of everything already published on the output and dead-letter topics.

    Reads both topics with ``read_committed`` from ``start_positions`` (partitions not listed are
    read from their beginning) up to their end offsets, or, ``until_silence``
    (:attr:`~streamgmm.io.quirks.BrokerQuirks.readback_until_silence`: the ends may be too
    low), by :class:`~streamgmm.io.base.EndOffsetWatch`'s rule: until nothing new arrives for
    :data:`~streamgmm.io.base.READBACK_SILENCE_SECONDS`, or past a fresh end above the first,
    so that it ends while another replica keeps publishing.

    Returns
    -------
    sources : set of (topic, partition, offset)
        The input events that already have an anomaly message or a dead letter.
    reached : dict of TopicPartition to int
        Where reading stopped, per partition.

    Raises
    ------
    KafkaUnavailable
        If the broker fails, or reading takes longer than ``timeout`` seconds.
    """
    start_positions = dict(start_positions or {})
    consumer = _plain_consumer(bootstrap_servers, "read back the output topics", **client_options)
    sources: set[tuple[str, int, int]] = set()
    try:
        parts = _partitions_of(consumer, (output_topic, dead_letter_topic))
        reached: dict[TopicPartition, int] = {}
        if parts:
            consumer.assign(parts)
            for tp in parts:
                consumer.seek(tp, start_positions.get(TopicPartition(*tp), 0))

            def collect(record) -> None:
                collect_published(sources, output_topic, record.topic, record.value,
                                  record.headers)

            _read_assigned_to_end(consumer, parts, collect, until_silence, timeout,
                                  "reading back the output topics")
            reached = {TopicPartition(*tp): consumer.position(tp) for tp in parts}
        logger.info("read back %d published sources from %s and %s",
                    len(sources), output_topic, dead_letter_topic)
        return sources, reached
    except kafka_errors.KafkaError as exc:
        raise _client_error("reading back the output topics failed", exc) from exc
    finally:
        consumer.close()


class _RebalanceBridge(AsyncConsumerRebalanceListener):
    """Hands kafka-python's rebalance callbacks to a :class:`~streamgmm.io.base.RebalanceListener`.

    kafka-python 3.0 calls its listeners on its I/O thread, inside the join that the caller's
    ``poll`` waits for, and a blocking consumer call made there raises (the I/O thread cannot
    wait for itself). So each callback runs the listener on a helper thread while the I/O loop
    keeps serving heartbeats and the listener's own requests (``committed``, ``commit``), and the
    caller's thread stays blocked inside ``poll``: the listener never runs alongside the
    caller's code. The loop waits for the helper in short sleeps of its own (``_net.sleep``: a
    kafka-python internal, like those of :class:`_Transactions`;
    ``tests/test_kafka_io.py::test_kafka_python_internals_are_what_its_public_api_does`` checks
    it). The starting offsets ``partitions_assigned`` returns are applied by ``seek``
    before the join completes, so before any record of those partitions is fetched. An
    exception of the listener is kept in :attr:`error` for the source to raise once ``poll``
    returns. Nothing is called with no partitions, nor once the source is closing, nor without
    a listener.

    It also guards against a lost join of kafka-python 3.0.12. A join runs as a task that
    ``poll`` awaits; when the poll's timeout ends first, the task is left for the next poll to
    await again, but only if the coordinator still says it needs to rejoin. A rejoin caused by
    new topic metadata stops saying so as soon as the leader has computed the assignment, so a
    join that finishes after such a timeout is never completed: the member stays in the group
    with no partition, forever (seen after a restart: a first join before the topic's metadata,
    then a rejoin inside a 20 ms batch poll). :meth:`before_poll` asks for a new join when it
    finds one lost, and :meth:`poll_timeout_ms` makes the loss rare by giving a poll during a
    join at least :data:`JOIN_POLL_MS`.
    """

    def __init__(self, consumer: KafkaConsumer, listener: RebalanceListener | None) -> None:
        self._consumer = consumer
        self._listener = listener
        self._sleep = consumer._net.sleep
        self.error: BaseException | None = None
        self.closing = False

    def poll_timeout_ms(self, timeout_ms: int) -> int:
        """``timeout_ms``, or at least :data:`JOIN_POLL_MS` while a join is pending."""
        coordinator = self._consumer._coordinator
        if coordinator.need_rejoin() or coordinator._join_task is not None:
            return max(timeout_ms, JOIN_POLL_MS)
        return timeout_ms

    def before_poll(self) -> None:
        """Ask for a new join when the last one finished with no poll to complete it."""
        coordinator = self._consumer._coordinator
        task = coordinator._join_task
        if task is not None and task.is_done and not coordinator.need_rejoin():
            logger.info("kafka-python finished a join that no poll completed; joining again")
            coordinator.request_rejoin()

    async def _run(self, call, partitions) -> Any:
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["value"] = call({TopicPartition(*tp) for tp in partitions})
            except BaseException as exc:  # raised again on the caller's thread, by poll()
                outcome["error"] = exc

        helper = threading.Thread(target=run, name="streamgmm-rebalance", daemon=True)
        helper.start()
        while helper.is_alive():
            await self._sleep(0.005)
        if "error" in outcome and self.error is None:
            self.error = outcome["error"]
        return outcome.get("value")

    def _listening(self, partitions) -> bool:
        return bool(partitions) and self._listener is not None and not self.closing

    async def on_partitions_revoked(self, revoked) -> None:
        if self._listening(revoked):
            await self._run(self._listener.partitions_revoked, revoked)

    async def on_partitions_lost(self, lost) -> None:
        if self._listening(lost):
            await self._run(self._listener.partitions_lost, lost)

    async def on_partitions_assigned(self, assigned) -> None:
        if not self._listening(assigned):
            return
        starts = await self._run(self._listener.partitions_assigned, assigned) or {}
        for tp, offset in starts.items():
            self._consumer.seek(_KafkaTopicPartition(*tp), offset)


class KafkaSource(GroupMember):
    """A consumer-group member that yields micro-batches of raw records (a
    :class:`~streamgmm.io.base.Source`).

    Parameters
    ----------
    bootstrap_servers, topic, group_id
        Where to read from and the consumer group whose offsets record progress.
    auto_offset_reset
        ``"earliest"`` or ``"latest"``: where to start without a committed offset.
    listener
        A :class:`~streamgmm.io.base.RebalanceListener` told of every assignment, revocation
        and loss (kafka-python has only the eager protocol; a lost generation, e.g. a session
        that expired while the process was frozen, is reported as ``partitions_lost``).
    group_instance_id
        Static membership (``group.instance.id``): a member that restarts within the session
        timeout gets its partitions back without a rebalance.
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
        listener: RebalanceListener | None = None,
        group_instance_id: str | None = None,
        **client_options: Any,
    ) -> None:
        self.topic = topic
        self.group_id = group_id
        options = {**CONSUMER_DEFAULTS, **client_options}
        if group_instance_id is not None:
            options["group_instance_id"] = group_instance_id
        self.session_timeout = options["session_timeout_ms"] / 1000
        self.max_poll_interval = options.get(
            "max_poll_interval_ms", KafkaConsumer.DEFAULT_CONFIG["max_poll_interval_ms"]) / 1000
        self._bridge: _RebalanceBridge | None = None
        try:
            self._consumer = KafkaConsumer(
                bootstrap_servers=bootstrap_servers, group_id=group_id,
                auto_offset_reset=auto_offset_reset, isolation_level="read_committed", **options,
            )
            # The topic's metadata before the first join: a member that joins without it is
            # assigned nothing, and kafka-python may not rejoin when the metadata arrives (seen
            # on Apache Kafka with a topic created just before).
            self._consumer.partitions_for_topic(topic)
            self._bridge = _RebalanceBridge(self._consumer, listener)
            self._consumer.subscribe([topic], listener=self._bridge)
        except kafka_errors.KafkaError as exc:
            raise _client_error(f"cannot connect a consumer to {bootstrap_servers}", exc) from exc
        try:
            self._offsets = OffsetsReader(bootstrap_servers, **client_options)
        except KafkaUnavailable:
            self._consumer.close(autocommit=False)
            raise

    def poll(self, max_records: int, timeout_ms: int) -> list:
        """Up to ``max_records`` records, waiting at most ``timeout_ms``; ordered per partition."""
        self._bridge.before_poll()
        try:
            batches = self._consumer.poll(timeout_ms=self._bridge.poll_timeout_ms(timeout_ms),
                                          max_records=max_records)
        except kafka_errors.KafkaError as exc:
            self._raise_listener_error()
            raise _client_error("poll failed", exc) from exc
        self._raise_listener_error()
        records: list = []
        for tp in sorted(batches, key=lambda t: t.partition):
            records.extend(batches[tp])
        return records

    def _raise_listener_error(self) -> None:
        """Raise what the rebalance listener raised (once), on the caller's thread."""
        if self._bridge is not None and self._bridge.error is not None:
            error, self._bridge.error = self._bridge.error, None
            raise error

    def _serve_group(self) -> None:
        # A long poll: kafka-python 3.0.12 can lose a join that completes while no poll waits
        # for it (_RebalanceBridge), so the less time spent between polls the better; the poll
        # returns as soon as the join is done.
        self._bridge.before_poll()
        try:
            self._consumer.poll(timeout_ms=JOIN_POLL_MS, max_records=1, update_offsets=False)
        except kafka_errors.KafkaError as exc:
            self._raise_listener_error()
            raise _client_error("joining the group failed", exc) from exc
        self._raise_listener_error()

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(*tp) for tp in self._consumer.assignment()}

    def committed(self, partitions: Iterable[TopicPartition] | None = None
                  ) -> dict[TopicPartition, int | None]:
        """The group's committed offset of each of ``partitions`` (default: the assigned ones),
        ``None`` where there is none."""
        wanted = (self._consumer.assignment() if partitions is None
                  else _kafka_partitions(partitions))
        try:
            return {TopicPartition(*tp): self._consumer.committed(tp, timeout_ms=CALL_TIMEOUT_MS)
                    for tp in wanted}
        except kafka_errors.KafkaError as exc:
            raise _client_error("reading committed offsets failed", exc) from exc

    def position(self, tp: TopicPartition) -> int:
        try:
            return self._consumer.position(_KafkaTopicPartition(*tp), timeout_ms=CALL_TIMEOUT_MS)
        except kafka_errors.KafkaError as exc:
            raise _client_error("reading the position failed", exc) from exc

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._consumer.seek(_KafkaTopicPartition(*tp), offset)

    def _last_seen_end(self, tp: TopicPartition) -> int | None:
        return self._consumer.highwater(_KafkaTopicPartition(*tp))

    def group_metadata(self):
        """The member's group metadata now, for a transaction's offsets.

        Raises :class:`~streamgmm.io.base.PartitionsLost` once the client knows that it left
        the group (no generation): the broker would take offsets without a generation from a
        transactional producer as a non-member's and accept them, even for partitions another
        member owns now.
        """
        metadata = self._consumer.group_metadata()
        if metadata.generation_id < 0 or not metadata.member_id:
            raise PartitionsLost(f"this consumer is not a member of the group {self.group_id!r} "
                                 "(its session expired or it was fenced)")
        return metadata

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit ``offsets`` (next offset to read, per partition) synchronously."""
        try:
            self._consumer.commit({_KafkaTopicPartition(*tp): OffsetAndMetadata(o, "", -1)
                                   for tp, o in offsets.items()})
        except kafka_errors.KafkaError as exc:
            if _stale_member(exc):
                raise PartitionsLost(f"offset commit refused, the group moved on: "
                                     f"{type(exc).__name__}: {exc}") from exc
            raise _client_error("offset commit failed", exc) from exc

    def close(self) -> None:
        """Leave the group (a static member does not: it keeps its partitions for the session
        timeout) without committing and without calling the listener."""
        if self._bridge is not None:
            self._bridge.closing = True
        self._offsets.close()
        try:
            self._consumer.close(autocommit=False, timeout_ms=CALL_TIMEOUT_MS)
        except Exception as exc:  # closing a consumer of a dead broker may fail; nothing to do
            logger.debug("closing the consumer: %s", exc)


class _Transactions:
    """The one place that uses kafka-python internals: a transaction's steps without blocking.

    Why: kafka-python's public ``send_offsets_to_transaction``, ``commit_transaction`` and
    ``abort_transaction`` each wait for their answer without a deadline, and the public offsets
    call blocks before the records' own wait can start. Run under threads to bound them, a
    transaction took about twice as long on the embedded broker (thread start-up and GIL
    contention with the sender thread; ``scripts/bench_daemon.py``, kafka-python backend).
    These are the public methods' own bodies without their final ``result.wait()``: each returns
    kafka-python's ``TransactionalRequestResult`` so that the sink waits with a deadline, and
    the offsets travel while the records are produced.

    ``tests/test_kafka_io.py::test_kafka_python_internals_are_what_its_public_api_does`` fails
    when a kafka-python release changes them (the pin is ``kafka-python>=3.0.11,<3.1``).
    """

    def __init__(self, producer: KafkaProducer) -> None:
        self._producer = producer
        self._manager = producer._transaction_manager

    def _started(self, result):
        self._producer._sender.wakeup()
        return result

    def send_offsets(self, offsets, group_metadata):
        return self._started(self._manager.send_offsets_to_transaction(offsets, group_metadata))

    def commit(self):
        return self._started(self._manager.begin_commit())

    def abort(self):
        return self._started(self._manager.begin_abort())

    def wake(self) -> None:
        """Send what is waiting now rather than after ``linger_ms``."""
        self._producer._sender.wakeup()


class KafkaSink:
    """Publishes records, alone or in one transaction with a batch's input offsets (a
    :class:`~streamgmm.io.base.Sink`).

    The transaction's steps go through :class:`_Transactions`, each awaited with a deadline of
    ``operation_timeout`` seconds (shortened once the daemon stops).

    Parameters
    ----------
    bootstrap_servers
        The cluster.
    delivery
        ``"exactly-once"`` (transactions) or ``"at-least-once"`` (``acks=all``).
    transactional_id
        Required for exactly-once; one per daemon instance, stable across restarts so that a new
        instance fences the old one.
    operation_timeout
        Seconds a publishing call may take.
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
        check_delivery(delivery, transactional_id)
        self.delivery = delivery
        self.operation_timeout = operation_timeout
        self.cancel: threading.Event | None = None
        options = {**PRODUCER_DEFAULTS, **client_options}
        if delivery == "exactly-once":
            options["transactional_id"] = transactional_id
        self._producer: KafkaProducer | None = None
        try:
            self._producer = KafkaProducer(bootstrap_servers=bootstrap_servers, **options)
            if delivery == "exactly-once":
                self._producer.init_transactions()  # bounded by max_block_ms
                self._transactions = _Transactions(self._producer)
        except kafka_errors.KafkaError as exc:
            raise _client_error(f"cannot start a producer on {bootstrap_servers}", exc) from exc

    def _wait(self, result, what: str) -> None:
        """Wait for a transactional step, at most ``operation_timeout`` (or the stop's grace)."""
        ends = Deadline(self.operation_timeout, self.cancel)
        while not result.wait(timeout_ms=100):
            if ends.passed():
                if ends.cancelled:
                    raise KafkaUnavailable(f"{what} given up: stopping")
                raise KafkaUnavailable(
                    f"{what} did not finish within {self.operation_timeout:g} s")

    def _live(self) -> KafkaProducer:
        if self._producer is None:
            raise KafkaUnavailable("the producer was abandoned in a blocked call; rebuild the sink")
        return self._producer

    def _send(self, records: Sequence[OutgoingRecord], futures: list) -> list:
        """Send ``records``; their futures are appended to ``futures`` as they go."""
        producer = self._live()
        for i, r in enumerate(records):
            try:
                futures.append(producer.send(r.topic, value=r.value, key=r.key,
                                             headers=r.headers or None))
            except RECORD_ERRORS as exc:  # refused before sending: too large for the producer
                raise RecordRejected({i: f"{type(exc).__name__}: {exc}"}) from exc
        return futures

    def _await_sends(self, futures: list) -> None:
        if not futures:
            return
        # flush() sends at once instead of after linger_ms; it does not raise on failure, the
        # futures do.
        self._live().flush(timeout=self.operation_timeout)
        rejected = {}
        for i, fut in enumerate(futures):
            try:
                fut.get(timeout=self.operation_timeout)
            except RECORD_ERRORS as exc:  # the broker refused this record, not the batch
                rejected[i] = f"{type(exc).__name__}: {exc}"
        if rejected:
            raise RecordRejected(rejected)

    def send(self, records: Sequence[OutgoingRecord]) -> None:
        """Publish ``records``; return once every one is acknowledged."""
        try:
            self._await_sends(self._send(records, []))
        except kafka_errors.KafkaError as exc:
            raise _client_error("publishing a batch failed", exc) from exc

    @staticmethod
    def _refused(futures: list) -> dict[int, str]:
        """The records among settled sends that the broker refused for what they are."""
        refused = {}
        for i, fut in enumerate(futures):
            if fut.is_done and fut.failed() and isinstance(fut.exception, RECORD_ERRORS):
                refused[i] = f"{type(fut.exception).__name__}: {fut.exception}"
        return refused

    def transact(self, records: Sequence[OutgoingRecord], offsets: Mapping[TopicPartition, int],
                 group_metadata: Any) -> None:
        """Publish ``records`` and commit ``offsets`` for the group in one transaction."""
        producer, steps = self._live(), self._transactions
        futures: list = []
        try:
            producer.begin_transaction()
            self._send(records, futures)
            # The offsets travel to the group coordinator while the records are produced;
            # nothing is visible before the commit, and a failed send aborts both.
            offsets_sent = None
            if offsets:
                offsets_sent = steps.send_offsets(
                    {_KafkaTopicPartition(*tp): OffsetAndMetadata(o, "", -1)
                     for tp, o in offsets.items()}, group_metadata)
            self._await_sends(futures)
            if offsets_sent is not None:
                self._wait(offsets_sent, "send_offsets_to_transaction")
            self._wait(steps.commit(), "commit_transaction")
        except Exception as exc:
            try:
                self._wait(steps.abort(), "abort_transaction")
            except Exception as abort_exc:  # the broker may be gone; the next one fences us
                logger.debug("abort after a failed transaction: %s", abort_exc)
            # A refused record puts the transaction in error, so a later call (the offsets, the
            # commit) raises a generic error: the record's own future says what happened.
            refused = {} if isinstance(exc, RecordRejected) else self._refused(futures)
            if refused:
                raise RecordRejected(refused) from exc
            if _stale_member(exc):
                raise PartitionsLost("the transaction's offsets were refused, the group moved "
                                     f"on: {type(exc).__name__}: {exc}") from exc
            if isinstance(exc, kafka_errors.KafkaError):
                raise _client_error("publishing a batch failed", exc) from exc
            raise

    def close(self, timeout: float = 2.0) -> None:
        if self._producer is None:
            return
        try:
            self._producer.close(timeout=timeout)
        except Exception as exc:  # closing a producer of a dead broker may fail; nothing to do
            logger.debug("closing the producer: %s", exc)
        self._producer = None


class KafkaPythonBackend:
    """The kafka-python backend (a :class:`~streamgmm.io.base.Backend`) for a ``[kafka]``
    section.

    Parameters
    ----------
    kafka : streamgmm.config.KafkaConfig
    """

    name = "kafka-python"

    def __init__(self, kafka: Any) -> None:
        self.kafka = kafka
        self.bootstrap = ",".join(kafka.bootstrap_servers)
        self._security = kafka.security_kwargs()
        common = {**_lists(kafka.client)}
        self._consumer_options = {**self._security, **common, **_lists(kafka.consumer)}
        self._producer_options = {**self._security, **common, **_lists(kafka.producer)}

    def consumer_options(self) -> dict[str, Any]:
        """The ``[kafka]`` settings of its consumers: security, ``[kafka.client]`` and
        ``[kafka.consumer]`` (what streamgmm manages is added by :class:`KafkaSource`)."""
        return dict(self._consumer_options)

    def producer_options(self) -> dict[str, Any]:
        """The ``[kafka]`` settings of its producer: security, ``[kafka.client]`` and
        ``[kafka.producer]``."""
        return dict(self._producer_options)

    def ensure_topics(self, topics: Iterable[str]) -> None:
        ensure_topics(self.bootstrap, topics, **self._security)

    def ensure_state_topic(self, topic: str) -> None:
        ensure_state_topic(self.bootstrap, topic, **self._security)

    def open_state_reader(self, topic: str) -> KafkaStateReader:
        quirks = BrokerQuirks.named(self.kafka.broker_quirks)
        return KafkaStateReader(self.bootstrap, topic, quirks.readback_until_silence,
                                **self._security)

    def open_sink(self, cancel: threading.Event | None = None) -> KafkaSink:
        sink = KafkaSink(self.bootstrap, delivery=self.kafka.delivery,
                         transactional_id=self.kafka.effective_transactional_id,
                         **self._producer_options)
        sink.cancel = cancel
        return sink

    def open_source(self, listener: RebalanceListener | None = None) -> KafkaSource:
        return KafkaSource(self.bootstrap, self.kafka.input_topic, self.kafka.group_id,
                           auto_offset_reset=self.kafka.auto_offset_reset, listener=listener,
                           group_instance_id=getattr(self.kafka, "group_instance_id", None),
                           **self._consumer_options)

    def reachable(self, timeout: float = 0.5) -> bool:
        return broker_reachable(self.bootstrap, timeout)

    def read_published_sources(self, output_topic: str, dead_letter_topic: str,
                               start_positions: Mapping[TopicPartition, int] | None = None,
                               until_silence: bool = True):
        return read_published_sources(self.bootstrap, output_topic, dead_letter_topic,
                                      start_positions, until_silence, **self._security)

    def probe(self, report: Any, interval: float = 2.0, timeout: float = 2.0):
        """A started :class:`streamgmm.io.probe.BrokerProbe` on a kafka-python client of its own
        (built on the probe's thread, again after each failure)."""
        from streamgmm.io.probe import BrokerProbe

        options = {**self._security, "request_timeout_ms": max(10, int(timeout * 1000)),
                   "bootstrap_timeout_ms": max(10, int(timeout * 1000)),
                   "reconnect_backoff_max_ms": 1000}
        clients: list[KafkaConsumer] = []

        def ask(deadline: float) -> None:
            if not clients:
                clients.append(KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                             **options))
            client = clients[0]
            try:  # a metadata request; kafka-python's own wait has no deadline
                bounded_call("broker probe", deadline, client.topics, client=client)
            except CallTimedOut:
                clients.clear()  # abandoned: blocked inside the client
                raise
            except Exception:
                clients.clear()
                try:
                    client.close(timeout_ms=100)
                except Exception as exc:  # a dead broker; nothing to do
                    logger.debug("closing the probe's client: %s", exc)
                raise

        return BrokerProbe(ask, report, interval, timeout).start()


def _lists(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


# Settings streamgmm sets itself: overriding them would break the delivery guarantee or decoding.
_MANAGED = frozenset({
    "bootstrap_servers", "group_id", "auto_offset_reset", "enable_auto_commit", "isolation_level",
    "transactional_id", "enable_idempotence", "acks", "key_deserializer", "value_deserializer",
    "key_serializer", "value_serializer", "max_poll_records", "default_offset_commit_callback",
    "group_instance_id",
})
# Settings that take Python objects, which a TOML file cannot express.
_OBJECTS = frozenset({
    "kafka_client", "selector", "ssl_context", "metric_reporters", "partitioner",
    "sasl_oauth_token_provider", "socket_options", "partition_assignment_strategy",
})


def client_defaults() -> tuple[dict[str, Any], dict[str, Any]]:
    """kafka-python's own defaults of its consumer and producer settings (no client built)."""
    return dict(KafkaConsumer.DEFAULT_CONFIG), dict(KafkaProducer.DEFAULT_CONFIG)


def check_passthrough_settings(table: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check the ``[kafka.<table>]`` pass-through settings against kafka-python's own names.

    ``table`` is ``"client"`` (both clients), ``"consumer"`` or ``"producer"``. Returns the
    settings (lists as tuples).

    Raises
    ------
    streamgmm.config.ConfigError
        For the first setting that is managed by streamgmm, takes a Python object, or is not a
        kafka-python setting of that client.
    """
    from streamgmm.config._schema import ConfigError

    consumer_defaults, producer_defaults = client_defaults()
    allowed = {"client": set(consumer_defaults) & set(producer_defaults),
               "consumer": set(consumer_defaults), "producer": set(producer_defaults)}[table]
    out = {}
    for name, value in settings.items():
        key = f"kafka.{table}.{name}"
        if name in _MANAGED:
            raise ConfigError(key, "is managed by streamgmm and cannot be overridden",
                              "remove it (use the [kafka] keys for servers, group and delivery)")
        if name in _OBJECTS:
            raise ConfigError(key, "takes a Python object, which a config file cannot express",
                              "remove it")
        if name not in allowed:
            import difflib

            close = difflib.get_close_matches(name, sorted(allowed), n=1)
            hint = f'did you mean "{close[0]}"? ' if close else ""
            raise ConfigError(key, f"is not a kafka-python {table} setting",
                              hint + "see the KafkaConsumer/KafkaProducer documentation")
        if isinstance(value, Mapping):
            raise ConfigError(key, "expected a value, got a table", "remove the sub-table")
        out[name] = tuple(value) if isinstance(value, list) else value
    return out


def passthrough_default(name: str) -> Any:
    """kafka-python's default of setting ``name`` (its type parses environment strings)."""
    consumer_defaults, producer_defaults = client_defaults()
    return {**producer_defaults, **consumer_defaults}.get(name)
