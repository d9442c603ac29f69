"""An in-memory cluster and backend: the daemon's bookkeeping tested in milliseconds.

:class:`MemoryBroker` keeps topics (lists of records per partition) and committed offsets per
consumer group; :class:`MemoryBackend` gives the daemon a :class:`~streamgmm.io.base.Source` and
a :class:`~streamgmm.io.base.Sink` on it that keep the same contract as the Kafka backends
(records per partition in offset order, only committed transactions visible, offsets committed
with the records or not at all). It is a real implementation, not a mock: the daemon's unit tests
(``tests/test_daemon.py``) run :class:`streamgmm.service.Daemon` on it unchanged.

Faults are injected by name (:meth:`MemoryBroker.inject`): a call that fails, a broker that is
away, and Tansu's quirk of a transaction whose records become visible although its offsets are
never committed (a producer killed inside a transaction).

Examples
--------
>>> broker = MemoryBroker()
>>> broker.create_topic("in", partitions=2)
>>> broker.produce("in", b"a", partition=1)
0
>>> [(r.partition, r.offset, r.value) for r in broker.records("in")]
[(1, 0, b'a')]
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamgmm.io.base import (
    KafkaUnavailable,
    OutgoingRecord,
    PartitionsLost,
    RebalanceListener,
    RecordRejected,
    TopicPartition,
    check_delivery,
    collect_published,
    record_size,
)

__all__ = ["MemoryBroker", "MemoryBackend", "MemorySource", "MemorySink", "MemoryRecord",
           "MemoryStateReader", "Killed"]

#: The fault names :meth:`MemoryBroker.inject` takes.
FAULTS = ("transact", "send", "commit", "poll", "connect", "visible-transact")


class Killed(BaseException):
    """The process "died" inside a call (``inject(..., kill=True)``): like ``kill -9``, nothing
    in the daemon handles it, so its loop ends without a final checkpoint."""


@dataclass(frozen=True, slots=True)
class MemoryRecord:
    """A stored record (a :class:`~streamgmm.io.base.ConsumedRecord`)."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: list[tuple[str, bytes]] | None = None


@dataclass
class MemoryBroker:
    """Topics and committed offsets in memory, thread-safe.

    Attributes
    ----------
    up : bool
        Whether the broker answers; every client call raises :class:`KafkaUnavailable` while it
        does not.
    max_record_bytes : int
        Records larger than this (:func:`~streamgmm.io.base.record_size`) are refused.
    calls : dict of str to int
        How often each publishing path ran: ``"transact"``, ``"send"``, ``"commit"``.
    fences_stale_group_metadata : bool
        Refuse (:class:`~streamgmm.io.base.PartitionsLost`) a transaction whose group metadata
        is of a member that left the group or an older generation, as Apache Kafka does
        (KIP-447); Tansu does not.

    Consumer groups: each :class:`MemorySource` of a group is a member. Partitions are spread
    over the members round-robin (in joining order); a rebalance revokes a member's partitions
    at its next poll (eager), and a partition goes to its new owner only once the old one has
    revoked it or left. :meth:`expire` removes a member as a session timeout would: it learns
    at its next poll that its partitions are lost.
    """

    up: bool = True
    max_record_bytes: int = 1_000_000
    calls: dict[str, int] = field(default_factory=dict)
    fences_stale_group_metadata: bool = True
    _topics: dict[str, list[list[MemoryRecord]]] = field(default_factory=dict)
    _committed: dict[tuple[str, TopicPartition], int] = field(default_factory=dict)
    _faults: list[tuple[str, bool]] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _groups: dict[str, _Group] = field(default_factory=dict)

    def create_topic(self, topic: str, partitions: int = 1) -> None:
        """Create ``topic`` with ``partitions`` partitions (nothing if it exists)."""
        with self._lock:
            self._topics.setdefault(topic, [[] for _ in range(partitions)])

    def produce(self, topic: str, value: bytes | None, key: bytes | None = None,
                headers: Sequence[tuple[str, bytes]] | None = None, partition: int = 0) -> int:
        """Append a record (creating the topic if needed); returns its offset."""
        with self._lock:
            self.create_topic(topic)
            log = self._topics[topic][partition]
            log.append(MemoryRecord(topic, partition, len(log), value, key,
                                    list(headers) if headers else None))
            return len(log) - 1

    def records(self, topic: str) -> list[MemoryRecord]:
        """Every record of ``topic``, partition by partition."""
        with self._lock:
            return [r for log in self._topics.get(topic, []) for r in log]

    def partitions(self, topic: str) -> list[TopicPartition]:
        with self._lock:
            return [TopicPartition(topic, p) for p in range(len(self._topics.get(topic, [])))]

    def end(self, tp: TopicPartition) -> int:
        with self._lock:
            return len(self._topics[tp.topic][tp.partition])

    def committed(self, group: str, tp: TopicPartition) -> int | None:
        with self._lock:
            return self._committed.get((group, tp))

    def inject(self, fault: str, times: int = 1, kill: bool = False) -> None:
        """Make the next ``times`` calls of kind ``fault`` fail (:data:`FAULTS`).

        They raise :class:`KafkaUnavailable`, or with ``kill`` :class:`Killed` (the process
        dies in the call). ``"visible-transact"`` is Tansu's quirk: the transaction's records
        become visible, its offsets are not committed, and the call fails as if the producer had
        died.
        """
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")
        with self._lock:
            self._faults += [(fault, kill)] * times

    def clear_faults(self) -> None:
        """Drop the injected faults that have not struck yet."""
        with self._lock:
            self._faults.clear()

    def _check(self, call: str) -> None:
        """Raise for a broker that is away or a fault injected for ``call``."""
        with self._lock:
            if not self.up:
                raise KafkaUnavailable(f"{call}: the memory broker is down")
            self._fail_if(call)

    def _fail_if(self, call: str) -> None:
        for i, (fault, kill) in enumerate(self._faults):
            if fault == call:
                del self._faults[i]
                raise (Killed if kill else KafkaUnavailable)(f"{call}: injected fault")

    def _count(self, call: str) -> None:
        with self._lock:
            self.calls[call] = self.calls.get(call, 0) + 1

    def _commit(self, group: str, offsets: Mapping[TopicPartition, int]) -> None:
        with self._lock:
            for tp, offset in offsets.items():
                self._committed[(group, TopicPartition(*tp))] = int(offset)

    # -- consumer groups -----------------------------------------------------------------

    def _group(self, group: str) -> _Group:
        return self._groups.setdefault(group, _Group())

    def _join(self, source: MemorySource) -> None:
        with self._lock:
            group = self._group(source.group_id)
            group.members.append(source)
            group.generation += 1
            group.joins += 1
            source.member_id = f"{source.group_id}-{group.joins}"

    def _leave(self, source: MemorySource, release: bool = True) -> None:
        with self._lock:
            group = self._group(source.group_id)
            if source in group.members:
                group.members.remove(source)
                group.generation += 1
            if release:
                for tp, owner in list(group.owners.items()):
                    if owner is source:
                        del group.owners[tp]

    def expire(self, source: MemorySource) -> None:
        """Remove ``source`` from its group as a session timeout would (its partitions go to
        the others; it finds out at its next poll)."""
        self._leave(source)

    def members(self, group: str) -> list[MemorySource]:
        """The members of ``group``, in joining order."""
        with self._lock:
            return list(self._group(group).members)

    def _target(self, source: MemorySource) -> set[TopicPartition]:
        """The partitions the current generation gives ``source`` (round-robin)."""
        group = self._group(source.group_id)
        if source not in group.members:
            return set()
        parts = self.partitions(source.topic)
        i, n = group.members.index(source), len(group.members)
        return {tp for j, tp in enumerate(parts) if j % n == i}

    def _stale(self, metadata: Any) -> bool:
        """Whether a transaction's group metadata is of a member that left the group (expired,
        closed, or joined again since). A member that is being rebalanced still commits, as in
        Kafka: its generation ends when the rebalance completes."""
        _, group_id, member_id = metadata
        with self._lock:
            return member_id not in {m.member_id for m in self._group(group_id).members}


@dataclass
class _Group:
    """A consumer group: its members, its generation, who holds which partition now."""

    members: list[MemorySource] = field(default_factory=list)
    generation: int = 0
    joins: int = 0
    owners: dict[TopicPartition, MemorySource] = field(default_factory=dict)


class MemorySource:
    """A member of a consumer group on a :class:`MemoryBroker` (a
    :class:`~streamgmm.io.base.Source`); the group's protocol runs inside :meth:`poll`."""

    session_timeout = 6.0
    max_poll_interval = 300.0

    def __init__(self, broker: MemoryBroker, topic: str, group_id: str,
                 auto_offset_reset: str = "earliest",
                 listener: RebalanceListener | None = None) -> None:
        broker._check("connect")
        self.broker, self.topic, self.group_id = broker, topic, group_id
        self._reset = auto_offset_reset
        self._listener = listener
        self._positions: dict[TopicPartition, int] = {}
        self._held: set[TopicPartition] = set()
        self._generation = -1
        self._turn = -1
        self.member_id = ""
        self._closed = False
        broker._join(self)

    def _assigned(self) -> list[TopicPartition]:
        return sorted(self._held)

    def _serve_group(self) -> None:
        """One round of the group protocol: revoke, find out about a loss, take up partitions."""
        broker = self.broker
        with broker._lock:
            group = broker._group(self.group_id)
            if self not in group.members:  # expired: the partitions are already someone's
                lost, self._held = set(self._held), set()
                broker._join(self)
            else:
                lost = set()
            generation = group.generation
        if lost and self._listener is not None:
            self._listener.partitions_lost(lost)
        if generation != self._generation and self._held:  # eager: give everything back
            if self._listener is not None:
                self._listener.partitions_revoked(set(self._held))
            with broker._lock:
                for tp in self._held:
                    if group.owners.get(tp) is self:
                        del group.owners[tp]
            self._held = set()
        self._generation = generation
        with broker._lock:
            free = {tp for tp in broker._target(self)
                    if tp not in self._held and group.owners.get(tp) is None}
            for tp in free:
                group.owners[tp] = self
        if not free:
            return
        self._held |= free
        for tp in free:
            self._positions.pop(tp, None)
        if self._listener is not None:
            for tp, offset in dict(self._listener.partitions_assigned(set(free))).items():
                self._positions[TopicPartition(*tp)] = int(offset)

    def wait_for_assignment(self, timeout: float = 30.0) -> set[TopicPartition]:
        self.broker._check("poll")
        if not self.broker.partitions(self.topic):
            raise KafkaUnavailable(f"no partition of {self.topic!r}: the topic does not exist")
        deadline = time.monotonic() + timeout
        self._serve_group()
        while not self._held:
            if time.monotonic() > deadline:
                raise KafkaUnavailable(f"no partition of {self.topic!r} assigned within "
                                       f"{timeout:g} s")
            time.sleep(0.01)
            self._serve_group()
        return self.assignment()

    def assignment(self) -> set[TopicPartition]:
        return set(self._held)

    def committed(self, partitions=None) -> dict[TopicPartition, int | None]:
        self.broker._check("poll")
        parts = self._assigned() if partitions is None else [TopicPartition(*p)
                                                             for p in partitions]
        return {tp: self.broker.committed(self.group_id, tp) for tp in parts}

    def beginning_offsets(self) -> dict[TopicPartition, int]:
        self.broker._check("poll")
        return dict.fromkeys(self._assigned(), 0)

    def position(self, tp: TopicPartition) -> int:
        tp = TopicPartition(*tp)
        if tp not in self._positions:
            committed = self.broker.committed(self.group_id, tp)
            self._positions[tp] = (committed if committed is not None
                                   else 0 if self._reset == "earliest" else self.broker.end(tp))
        return self._positions[tp]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._positions[TopicPartition(*tp)] = int(offset)

    def poll(self, max_records: int, timeout_ms: int) -> list[MemoryRecord]:
        self.broker._check("poll")
        self._serve_group()
        out: list[MemoryRecord] = []
        with self.broker._lock:
            assigned = self._assigned()
            # a fair share of each partition per poll, starting at the next one each time
            share = max(1, max_records // max(1, len(assigned)))
            self._turn = (self._turn + 1) % max(1, len(assigned))
            for tp in assigned[self._turn:] + assigned[:self._turn]:
                start = self.position(tp)
                taken = self.broker._topics[tp.topic][tp.partition][
                    start:start + min(share, max_records - len(out))]
                out += taken
                self._positions[tp] = start + len(taken)
                if len(out) >= max_records:
                    break
        if not out:  # nothing new: wait a little, as a client's poll would
            time.sleep(min(timeout_ms, 10) / 1000)
        return out

    def high_watermarks(self, topics: Iterable[str]) -> dict[TopicPartition, int]:
        self.broker._check("poll")
        return {tp: self.broker.end(tp) for topic in topics for tp in self.broker.partitions(topic)}

    def lag(self, next_offsets: Mapping[TopicPartition, int]) -> int:
        return sum(max(0, self.broker.end(tp) - next_offsets[tp])
                   for tp in self._assigned() if tp in next_offsets)

    def group_metadata(self) -> Any:
        return ("memory-group", self.group_id, self.member_id)

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.broker._check("commit")
        if self.broker.fences_stale_group_metadata and self.broker._stale(self.group_metadata()):
            raise PartitionsLost("the commit's member left the group (it rebalanced without it)")
        self.broker._count("commit")
        self.broker._commit(self.group_id, offsets)

    def close(self) -> None:
        if not self._closed:
            self.broker._leave(self)
        self._closed = True


class MemoryStateReader:
    """A :class:`~streamgmm.io.base.StateReader` on a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, topic: str) -> None:
        broker._check("connect")
        self.broker, self.topic = broker, topic
        self._positions: dict[TopicPartition, int] = {}

    def poll(self, timeout_ms: int = 0) -> list[MemoryRecord]:
        self.broker._check("poll")
        out: list[MemoryRecord] = []
        with self.broker._lock:
            for tp in self.broker.partitions(self.topic):
                start = self._positions.get(tp, 0)
                taken = self.broker._topics[tp.topic][tp.partition][start:]
                out += taken
                self._positions[tp] = start + len(taken)
        return out

    def catch_up(self, timeout: float = 10.0) -> list[MemoryRecord]:
        return self.poll(0)

    def close(self) -> None:
        pass


class MemorySink:
    """A :class:`~streamgmm.io.base.Sink` on a :class:`MemoryBroker`: a transaction appends its
    records and commits its offsets under one lock, or does neither."""

    def __init__(self, broker: MemoryBroker, delivery: str = "exactly-once",
                 transactional_id: str | None = "memory") -> None:
        check_delivery(delivery, transactional_id)
        broker._check("connect")
        self.broker, self.delivery = broker, delivery
        self.cancel: threading.Event | None = None

    def _refused(self, records: Sequence[OutgoingRecord]) -> None:
        limit = self.broker.max_record_bytes
        too_large = {i: f"record of {record_size(r)} bytes, more than {limit}"
                     for i, r in enumerate(records) if record_size(r) > limit}
        if too_large:
            raise RecordRejected(too_large)

    def _append(self, records: Sequence[OutgoingRecord]) -> None:
        for r in records:
            self.broker.produce(r.topic, r.value, r.key, r.headers)

    def transact(self, records: Sequence[OutgoingRecord], offsets: Mapping[TopicPartition, int],
                 group_metadata: Any) -> None:
        broker = self.broker
        with broker._lock:
            if any(fault == "visible-transact" for fault, _ in broker._faults):
                self._append(records)  # visible, offsets never committed: a dead producer
                broker._fail_if("visible-transact")
            broker._check("transact")
            self._refused(records)
            if offsets and broker.fences_stale_group_metadata and broker._stale(group_metadata):
                raise PartitionsLost("the transaction's group metadata is stale: the group "
                                     "rebalanced without this member")
            broker._count("transact")
            self._append(records)
            broker._commit(group_metadata[1], offsets)

    def send(self, records: Sequence[OutgoingRecord]) -> None:
        with self.broker._lock:
            self.broker._check("send")
            self._refused(records)
            self.broker._count("send")
            self._append(records)

    def close(self, timeout: float = 2.0) -> None:
        pass


class MemoryBackend:
    """A :class:`~streamgmm.io.base.Backend` on a :class:`MemoryBroker`, for a ``[kafka]``
    section (its topics, group and delivery)."""

    name = "memory"

    def __init__(self, broker: MemoryBroker, kafka: Any) -> None:
        self.broker, self.kafka = broker, kafka

    def ensure_topics(self, topics: Iterable[str]) -> None:
        self.broker._check("connect")
        for topic in topics:
            self.broker.create_topic(topic)

    def open_sink(self, cancel: threading.Event | None = None) -> MemorySink:
        sink = MemorySink(self.broker, self.kafka.delivery, self.kafka.effective_transactional_id)
        sink.cancel = cancel
        return sink

    def open_source(self, listener: RebalanceListener | None = None) -> MemorySource:
        return MemorySource(self.broker, self.kafka.input_topic, self.kafka.group_id,
                            self.kafka.auto_offset_reset, listener)

    def ensure_state_topic(self, topic: str) -> None:
        self.broker._check("connect")
        self.broker.create_topic(topic)

    def open_state_reader(self, topic: str) -> MemoryStateReader:
        return MemoryStateReader(self.broker, topic)

    def read_published_sources(self, output_topic: str, dead_letter_topic: str,
                               start_positions: Mapping[TopicPartition, int] | None = None,
                               until_silence: bool = True):
        self.broker._check("poll")
        start_positions = dict(start_positions or {})
        sources: set[tuple[str, int, int]] = set()
        reached = {}
        for topic in (output_topic, dead_letter_topic):
            for tp in self.broker.partitions(topic):
                for r in self.broker._topics[topic][tp.partition][start_positions.get(tp, 0):]:
                    collect_published(sources, output_topic, topic, r.value, r.headers)
                reached[tp] = self.broker.end(tp)
        return sources, reached

    def reachable(self, timeout: float = 0.5) -> bool:
        return self.broker.up

    def probe(self, report: Any) -> None:
        return None
