"""The daemon loop: Kafka in, anomalies and dead letters out, exactly once, state in Kafka.

A replica is a member of the consumer group of the input topic. Every input partition it owns
has a *task*: the partition's :class:`~streamgmm.partition_state.PartitionState` (its own
detector and the offset it has learned up to) and the bookkeeping of what is already published.
One iteration of :meth:`Daemon.run`:

1. poll a micro-batch of raw records (``[batch] max_records``, ``max_wait_ms``); rebalances
   happen inside the poll (:meth:`Daemon.partitions_assigned` and the others, below);
2. per partition of the batch: decode, validate, score and learn
   (:class:`streamgmm.pipeline.BatchPipeline`, the same path as ``streamgmm replay``), every
   event scored *before* it is learned, by the **merged model** of every partition of the
   stream (:mod:`streamgmm.fleet`), decided by the partition's own threshold and learned by its
   own detector;
3. publish the anomalies, the dead letters, the states that are due (every
   ``[checkpoint] interval_seconds`` per partition) and the batch's input offsets together
   (:func:`streamgmm.io.base.publish_batch`: one transaction in exactly-once mode, carrying the
   consumer's current group metadata) — only while the replica's :class:`~streamgmm.lease.Lease`
   holds: a process that was frozen past half the session timeout drops the batch and rejoins;
4. update the metrics.

State in Kafka
--------------
A partition's state is one record of the compacted state topic (``[checkpoint] topic``, key
``"topic:partition"``). In exactly-once mode it shares its transaction with the outputs of the
events it has learned, so on every broker a visible state comes with its visible outputs (Apache
Kafka shows neither of an aborted transaction, Tansu both); at-least-once, it is sent once those
outputs are acknowledged. Either way, a state says: every event before ``learned`` has been
learned *and* has its outputs out. No local disk is involved: a new container with an empty
filesystem takes over any partition.

Rebalances
----------
* **Assigned** partitions are restored before their first event is scored: the replica reads
  the state topic up to its end, takes each partition's newest state (or, for a partition that
  has none, a copy of the most experienced partition's, never a cold model), starts reading at
  the state's ``learned`` offset, re-learns the events up to the group's committed offset
  without publishing them (their outputs are out), and reads the output topics back from the
  positions saved in the state to skip events whose outputs became visible without their offsets
  being committed (a transaction cut by ``kill -9`` on a broker that does not abort it; an
  at-least-once crash between send and commit).
* **Revoked** partitions are finished before they are released: their states are written with
  their offsets, in one transaction.
* **Lost** partitions (the session expired) are dropped: the new owner restores them.

So every valid event is learned exactly once by the state of its partition and every anomaly
and dead letter appears once, however partitions move.

The cluster is a :class:`streamgmm.io.base.Backend` (the configured one,
:func:`streamgmm.io.backend.open_backend`, or any given to :class:`Daemon`: the unit tests use
:class:`streamgmm.io.memory.MemoryBackend`), and the broker's quirks are named in
:class:`streamgmm.io.quirks.BrokerQuirks` (``[kafka] broker_quirks``).

Broker loss: any Kafka failure drops the tasks (whatever they learned since their last state is
learned again), closes the clients, and reconnects with an exponential back-off (capped at
:attr:`Daemon.max_backoff` seconds); the daemon never exits because the broker is away. A client
call that blocks past its deadline (:func:`streamgmm.io.base.bounded_call`) abandons that client
and reconnects the same way; should the loop still make no progress for ``[watchdog]
stall_seconds``, the watchdog (:mod:`streamgmm.watchdog`) ends the process with exit code 4.
``streamgmm_broker_up`` comes from a probe on a thread of its own (:mod:`streamgmm.io.probe`).
``SIGTERM``/``SIGINT`` (:meth:`Daemon.request_stop`) finish the current batch, publish, write
every state with its offsets and return.

Message faults: an event or a message that cannot be handled is that message's problem. It goes to
the dead-letter topic with its reason (truncated to fit the producer's limit, with its original
size and SHA-256 in headers), an anomaly message too large for the limit leaves out its event, and
every message is strict JSON (:func:`streamgmm.messages.encode`); the rest of the batch goes on.
A state record that cannot be read is skipped and logged (:class:`streamgmm.fleet.FleetView`); a
state the broker refuses is counted (``streamgmm_checkpoint_failures_total``) and the last good
one stays.

Examples
--------
The loop needs a broker; with the embedded one (see ``streamgmm demo`` for a complete run)::

    from streamgmm.config import load_config
    from streamgmm.service import Daemon
    daemon = Daemon(load_config("config/streamgmm.toml"))
    daemon.run()                      # until SIGTERM (with install_signal_handlers) or stop
"""

from __future__ import annotations

import hashlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamgmm.checkpoint import CheckpointError
from streamgmm.config import Config
from streamgmm.fleet import FleetView
from streamgmm.io.base import (
    Backend,
    KafkaUnavailable,
    OutgoingRecord,
    PartitionsLost,
    RecordRejected,
    Sink,
    Source,
    StateReader,
    TopicPartition,
    fit_record,
    publish_batch,
)
from streamgmm.io.quirks import BrokerQuirks
from streamgmm.lease import Lease
from streamgmm.messages import anomaly_message, dead_letter_headers
from streamgmm.partition_state import PartitionState, encode_state, state_key
from streamgmm.pipeline import BatchPipeline

__all__ = ["Daemon", "DaemonStats"]

logger = logging.getLogger(__name__)

#: Seconds a restore may take to read the state topic to its end.
STATE_CATCH_UP_SECONDS = 30.0
#: Seconds between two reads of the state topic for the merged model.
FLEET_REFRESH_SECONDS = 1.0
#: How often a restore reads the state topic again for a partition with offsets but no state.
STATE_VISIBLE_RETRIES = 3


def _partition_runs(records) -> list[tuple[TopicPartition, int, int]]:
    """``(partition, start, end)`` of each run of one partition's records in ``records``
    (grouped per partition, in offset order, as :meth:`Source.poll` hands them out).

    Looks at the ends of the runs only (by bisection): no per-record Python work.
    """
    runs: list[tuple[TopicPartition, int, int]] = []
    start, n = 0, len(records)
    while start < n:
        first = records[start]
        topic, partition = first.topic, first.partition
        end = n
        last = records[-1]
        if last.partition != partition or last.topic != topic:
            lo, hi = start, n - 1
            while lo < hi:  # the last index of the run, by bisection
                mid = (lo + hi + 1) // 2
                rec = records[mid]
                if rec.partition == partition and rec.topic == topic:
                    lo = mid
                else:
                    hi = mid - 1
            end = lo + 1
        runs.append((TopicPartition(topic, partition), start, end))
        start = end
    return runs


@dataclass
class DaemonStats:
    """Counters of one daemon run (also exported as Prometheus metrics)."""

    events: int = 0
    anomalies: int = 0
    dead_letters: int = 0
    published: int = 0
    skipped_duplicates: int = 0
    relearned: int = 0
    batches: int = 0
    reconnects: int = 0
    checkpoints: int = 0
    checkpoint_failures: int = 0
    assigned: int = 0
    revoked: int = 0
    lost: int = 0
    dropped_batches: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class _Task:
    """An owned input partition: its state and what of it is already published."""

    state: PartitionState
    pipeline: BatchPipeline
    #: Below this offset events are re-learned, not published (their outputs are out).
    publish_from: int
    #: Offsets (at or past ``publish_from``) whose anomaly or dead letter is already out.
    published: set[int] = field(default_factory=set)
    #: Where the read-back that found ``published`` started (an output partition not named:
    #: at 0). A state written while some of them are at or past its ``learned`` sends the next
    #: read-back there, not to the end of the outputs, which is beyond them.
    published_after: dict[TopicPartition, int] = field(default_factory=dict)
    #: ``time.monotonic()`` of the last state write (-inf: never written by this replica).
    written: float = -math.inf
    #: The state learned something since it was last written.
    unwritten: bool = True
    #: ``time.monotonic()`` of the assignment, until the first event is scored.
    assigned_at: float | None = None

    @property
    def detector(self):
        return self.pipeline.detector

    def should_publish(self, offset: int) -> bool:
        return offset >= self.publish_from and offset not in self.published

    def read_back_positions(self, ends: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Where the read-back of a state written now must start, given the outputs' ``ends``.

        The ends, unless outputs of events the state has not learned yet are already out (a
        dead producer's, found when the partition was assigned): they lie before the ends, and
        a read-back from there would miss them and publish them again.
        """
        if any(o >= self.state.learned for o in self.published):
            return {tp: min(end, self.published_after.get(tp, 0)) for tp, end in ends.items()}
        return dict(ends)


class Daemon:
    """The streamgmm service: consume, detect, publish, commit, keep each partition's state.

    Parameters
    ----------
    config : streamgmm.config.Config
        The validated configuration.
    metrics : streamgmm.metrics.Metrics, optional
        Where to export the Prometheus metrics; ``None`` exports nothing.
    detector_factory : callable, optional
        ``() -> Detector`` for a partition that starts from nothing; defaults to
        ``Detector(**config.detector_kwargs())``.
    on_batch : callable, optional
        ``on_batch(daemon, records, extraction, result)`` after each published batch, once per
        partition of it (the demo's live console uses it); must be quick.
    create_topics : bool
        Create missing input/output/dead-letter topics on connect (handy with the embedded broker).
        The state topic is always created when missing.
    watchdog : streamgmm.watchdog.Watchdog, optional
        Told (:meth:`~streamgmm.watchdog.Watchdog.beat`) whenever the loop makes progress.
    backend : streamgmm.io.base.Backend, optional
        The cluster's client library; defaults to the configured one
        (:func:`streamgmm.io.backend.open_backend`).

    Attributes
    ----------
    stats : DaemonStats
        What happened so far.
    replica_id : str
        This replica's name (``[kafka] replica_id``, by default the host name).
    state_topic : str
        Where the partitions' states live.
    """

    #: Longest wait between two reconnection attempts, seconds.
    max_backoff: float = 10.0
    #: Seconds a joining replica waits for partitions before it goes on polling without any.
    join_seconds: float = 30.0
    #: Seconds of one slice of that wait (a stop request is looked at between two).
    join_slice_seconds: float = 1.0

    def __init__(
        self,
        config: Config,
        metrics: Any = None,
        detector_factory: Callable[[], Any] | None = None,
        on_batch: Callable[..., None] | None = None,
        create_topics: bool = False,
        watchdog: Any = None,
        backend: Backend | None = None,
    ) -> None:
        self.config = config
        self.watchdog = watchdog
        self.metrics = metrics
        self.on_batch = on_batch
        self.create_topics = create_topics
        self._detector_factory = detector_factory or self._default_detector
        kafka = config.kafka
        if backend is None:
            from streamgmm.io.backend import open_backend

            backend = open_backend(kafka)
        self.backend = backend
        self.quirks = BrokerQuirks.named(kafka.broker_quirks)
        self.replica_id = kafka.effective_replica_id
        self.state_topic = config.checkpoint.state_topic(kafka.group_id)
        if config.checkpoint.path:
            logger.warning("checkpoint.path (%s) is no longer used: each partition's state lives "
                           "in the state topic %r", config.checkpoint.path, self.state_topic)
        # The largest record to publish: what the producer takes, less room for the framing.
        limit, _ = kafka.max_message_bytes
        self._max_record_bytes = limit - 1024
        self.stats = DaemonStats()
        self._stop = threading.Event()
        self._source: Source | None = None
        self._sink: Sink | None = None
        self._reader: StateReader | None = None
        self._lease: Lease | None = None
        self._fleet = FleetView(config.features.fields)
        self._fleet_read = -math.inf
        self._tasks: dict[TopicPartition, _Task] = {}
        # An error raised inside a rebalance callback (client libraries may swallow them).
        self._callback_error: BaseException | None = None
        self._joined = False
        self._broker_up = False

    # -- what the replica holds ------------------------------------------------------------

    @property
    def partitions(self) -> set[TopicPartition]:
        """The input partitions this replica owns now."""
        return set(self._tasks)

    @property
    def states(self) -> dict[TopicPartition, PartitionState]:
        """The state of each owned partition."""
        return {tp: task.state for tp, task in self._tasks.items()}

    @property
    def detector(self):
        """The detector of the owned partition that has learned the most (``None`` without one)."""
        if not self._tasks:
            return None
        return max(self._tasks.values(), key=lambda t: t.detector.n_events_learned).detector

    @property
    def events_learned(self) -> int:
        """Valid events of the owned partitions their states have learned."""
        return sum(task.state.events_learned for task in self._tasks.values())

    # -- lifecycle -------------------------------------------------------------------------

    def _default_detector(self):
        from streamgmm.detector import Detector

        return Detector(**self.config.detector_kwargs())

    def request_stop(self, *_: Any) -> None:
        """Ask the loop to finish the current batch, write the states and return."""
        if not self._stop.is_set():
            logger.info("stop requested; finishing the current batch")
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        """Make ``SIGTERM`` and ``SIGINT`` call :meth:`request_stop` (main thread only)."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self, max_events: int | None = None, idle_exit_seconds: float | None = None) -> int:
        """Run until stopped; returns 0.

        Parameters
        ----------
        max_events
            Stop after this many input records (valid or not) were processed; for tests and demos.
        idle_exit_seconds
            Stop when no record arrived for this long; for demos and replays of a finite topic.

        Raises
        ------
        streamgmm.checkpoint.CheckpointError
            If the state topic holds states made for other features.
        """
        backoff = 0.5
        last_record = time.monotonic()
        probe = self._start_probe()
        try:
            while not self._stop.is_set():
                try:
                    self._connect()
                    self._progress()
                    self._join()
                    backoff = 0.5
                    while not self._stop.is_set():
                        n = self._step()
                        self._progress()
                        now = time.monotonic()
                        if n:
                            last_record = now
                        if max_events is not None and self.stats.events >= max_events:
                            self._stop.set()
                        elif (idle_exit_seconds is not None
                              and now - last_record > idle_exit_seconds):
                            logger.info("no event for %.1f s; stopping", idle_exit_seconds)
                            self._stop.set()
                    self._finish()
                except KafkaUnavailable as exc:
                    if isinstance(exc, PartitionsLost):
                        logger.warning("%s; dropping what was learned since the last states and "
                                       "rejoining the group", exc)
                    else:
                        logger.warning("Kafka unavailable (%s); reconnecting in %.1f s", exc,
                                       backoff)
                    self._drop_tasks()
                    self._close_clients()
                    self.stats.reconnects += 1
                    self._progress()  # retrying is the loop at work, not a stuck loop
                    self._stop.wait(0.1 if isinstance(exc, PartitionsLost) else backoff)
                    backoff = min(backoff * 2, self.max_backoff)
        finally:
            self._close_clients()
            if probe is not None:
                probe.stop()
        return 0

    def _finish(self) -> None:
        """Clean stop: every batch is published already; write every state with its offsets."""
        try:
            self._write_states(list(self._tasks), offsets=True)
        except KafkaUnavailable as exc:
            logger.warning("could not write the final states (%s); the next owner re-learns the "
                           "events since the last ones", exc)

    # -- connection --------------------------------------------------------------------------

    def _connect(self) -> None:
        kafka = self.config.kafka
        if self.create_topics:
            try:
                self.backend.ensure_topics(
                    [kafka.input_topic, kafka.output_topic, kafka.dead_letter_topic])
            except Exception as exc:
                raise KafkaUnavailable(f"cannot create topics: {exc}") from exc
        try:
            self.backend.ensure_state_topic(self.state_topic)
        except KafkaUnavailable:
            raise
        except Exception as exc:
            raise KafkaUnavailable(f"cannot create the state topic {self.state_topic!r}: "
                                   f"{exc}") from exc
        # The sink first: an exactly-once sink settles a previous instance's open transaction
        # before the output topics are read back.
        self._sink = self.backend.open_sink(cancel=self._stop)
        self._reader = self.backend.open_state_reader(self.state_topic)
        # Read afresh on every connection: a broker that came back empty has lost its states.
        self._fleet = FleetView(self.config.features.fields)
        self._read_fleet(catch_up=True)
        if self._fleet.foreign is not None:
            raise CheckpointError(str(self._fleet.foreign))
        self._joined = False  # until the first partitions are restored
        self._source = self.backend.open_source(listener=self)
        self._lease = Lease(self._source.session_timeout, self._source.max_poll_interval)

    def _close_clients(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._sink is not None:
            self._sink.close(timeout=1.0)
            self._sink = None
        if self._lease is not None:
            self._lease.stop()
            self._lease = None

    def _drop_tasks(self) -> None:
        """Forget the owned partitions (their states in the state topic stay)."""
        self._tasks.clear()
        if self.metrics is not None:
            self.metrics.partitions_owned.set(0)

    def _read_fleet(self, catch_up: bool = False) -> None:
        """Take the state topic's new records into the fleet view (all of them: ``catch_up``)."""
        records = (self._reader.catch_up(STATE_CATCH_UP_SECONDS) if catch_up
                   else self._reader.poll(0))
        self._fleet.ingest(records)
        self._fleet_read = time.monotonic()

    def _join(self) -> None:
        """Join the group. A replica that gets no partition (more replicas than partitions)
        stays a member and waits, polling, for one to come its way: leaving and joining again
        would move the others' partitions for nothing.

        The wait is cut in slices of :attr:`join_slice_seconds`, between which a stop request
        ends it: a replica told to stop while the group rebalances (a member that died inside
        the rebalance holds it up to its session timeout) stops within seconds, not after the
        whole :attr:`join_seconds`."""
        deadline = time.monotonic() + self.join_seconds
        while True:
            remaining = deadline - time.monotonic()
            try:
                self._source.wait_for_assignment(
                    timeout=max(0.0, min(self.join_slice_seconds, remaining)))
                break
            except KafkaUnavailable as exc:
                if isinstance(exc, PartitionsLost) or not self.backend.reachable(timeout=1.0):
                    raise
                if self._stop.is_set():
                    return
                if deadline - time.monotonic() > 0:
                    self._progress()
                    continue
                logger.info("replica %s has no partition of %r after %g s (does the topic "
                            "exist and is another member holding it?); waiting as a member of "
                            "the group", self.replica_id, self.config.kafka.input_topic,
                            self.join_seconds)
                return
        self._raise_callback_error()

    def _lease_lost(self, when: str) -> PartitionsLost:
        """The error that drops a batch whose lease ran out ``when`` (:mod:`streamgmm.lease`)."""
        return PartitionsLost(f"this replica stood still for {self._lease.frozen_for():.1f} s "
                              f"{when} (more than half the session timeout of "
                              f"{self._lease.session_timeout:g} s): its partitions may have "
                              "moved")

    def _raise_callback_error(self) -> None:
        error, self._callback_error = self._callback_error, None
        if error is not None:
            raise error

    # -- rebalances (streamgmm.io.base.RebalanceListener) -------------------------------------

    def partitions_assigned(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int]:
        """Restore the states of ``partitions``; returns where each starts reading."""
        try:
            return self._restore(set(partitions))
        except Exception as exc:  # raised again after the poll: the loop reconnects
            logger.warning("restoring %s failed: %s",
                           ", ".join(tp.key() for tp in sorted(partitions)), exc)
            self._callback_error = exc if isinstance(exc, KafkaUnavailable | CheckpointError) \
                else KafkaUnavailable(f"restoring partitions failed: {exc}")
            return {}

    def partitions_revoked(self, partitions: set[TopicPartition]) -> None:
        """Write the states of ``partitions`` with their offsets, then let them go."""
        owned = [tp for tp in sorted(partitions) if tp in self._tasks]
        if self._lease is not None and not self._lease.valid():
            logger.warning("partitions %s revoked after this replica stood still for %.1f s: "
                           "treating them as lost", ", ".join(tp.key() for tp in owned),
                           self._lease.frozen_for())
            self.partitions_lost(partitions)
            return
        try:
            self._write_states(owned, offsets=True)
        except KafkaUnavailable as exc:
            logger.warning("could not write the states of the revoked partitions (%s); their "
                           "next owner re-learns the events since their last states", exc)
        for tp in owned:
            del self._tasks[tp]
        self.stats.revoked += len(owned)
        self._changed("revoked", owned)

    def partitions_lost(self, partitions: set[TopicPartition]) -> None:
        """Drop ``partitions`` without publishing anything for them."""
        owned = [tp for tp in sorted(partitions) if tp in self._tasks]
        for tp in owned:
            del self._tasks[tp]
        self.stats.lost += len(owned)
        self._changed("lost", owned)

    def _changed(self, change: str, partitions: Sequence[TopicPartition]) -> None:
        if not partitions:
            return
        logger.info("replica %s: %s %s; owns %s", self.replica_id, change,
                    ", ".join(tp.key() for tp in partitions),
                    ", ".join(tp.key() for tp in sorted(self._tasks)) or "nothing")
        if self.metrics is not None:
            self.metrics.partitions_changed(change, len(partitions), len(self._tasks))

    def _restore(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int]:
        started, assigned_at = time.perf_counter(), time.monotonic()
        # The committed offsets first: on Apache Kafka they are answered once the transaction
        # that wrote them is complete, and a partition's newest state shares that transaction.
        committed = self._source.committed(partitions)
        self._read_fleet(catch_up=True)
        for _ in range(STATE_VISIBLE_RETRIES):
            # Offsets without a state: the state of the same transaction may not be readable
            # yet (its commit marker lands on each partition in its own time); look again.
            if all(c is None or tp in self._fleet.partitions() for tp, c in committed.items()):
                break
            self._stop.wait(0.5)
            self._read_fleet(catch_up=True)
        starts: dict[TopicPartition, int] = {}
        restored_bytes = 0
        read_back: dict[TopicPartition, int] | None = {}
        restored = False
        new: dict[TopicPartition, _Task] = {}
        for tp in sorted(partitions):
            c = committed.get(tp)
            candidates = self._fleet.candidates(tp)
            if candidates:
                restored = True
                state = candidates[0]
                restored_bytes += self._fleet.size(tp)
                how = (f"restored the state of {state.events_learned} events learned up to "
                       f"offset {state.learned} (written by {state.replica or '?'})")
                if read_back is not None:
                    for out_tp, position in state.output_positions.items():
                        read_back[out_tp] = min(position, read_back.get(out_tp, position))
            else:
                seed = self._fleet.most_experienced(exclude=[tp])
                fresh = PartitionState(tp, None, c if c is not None else -1)
                if seed is not None:
                    state = fresh.started_from(seed)
                    how = f"no state: starting from the model of {seed.partition.key()}"
                else:
                    fresh.detector = self._detector_factory()
                    state = fresh
                    how = "no state: starting with a fresh model"
                if c is not None:  # outputs of an earlier run may be anywhere
                    read_back = None
            state.replica = self.replica_id
            publish_from = max(state.learned, c if c is not None else -1)
            if state.learned >= 0:
                starts[tp] = state.learned
            if c is not None and c > state.learned >= 0:
                how += f"; re-learning offsets {state.learned}..{c - 1} without publishing"
            logger.info("%s: %s", tp.key(), how)
            task = _Task(state, BatchPipeline.from_config(self.config, state.detector),
                         publish_from, assigned_at=assigned_at)
            if candidates:  # its state is in the topic: due again an interval from now
                task.written, task.unwritten = time.monotonic(), False
            new[tp] = task
        # Nothing to read back only for a partition set that never committed and has no state:
        # a state without committed offsets is a dead producer's (Tansu shows its transaction),
        # and that producer's outputs may be out too.
        if restored or any(c is not None for c in committed.values()):
            sources = self._read_back(read_back)
            for tp, task in new.items():
                task.published = {o for t, p, o in sources
                                  if t == tp.topic and p == tp.partition and o >= task.publish_from}
                task.published_after = dict(read_back or {})
        self._tasks.update(new)
        self.stats.assigned += len(new)
        self._changed("assigned", sorted(new))
        if not self._joined:
            self._joined = True
            logger.info("replica %s joined group %r with partitions %s", self.replica_id,
                        self.config.kafka.group_id, ", ".join(tp.key() for tp in sorted(new)))
        if self.metrics is not None:
            self.metrics.state_restored(time.perf_counter() - started, restored_bytes)
        self._progress()
        return starts

    def _read_back(self, positions: dict[TopicPartition, int] | None) -> set[tuple[str, int, int]]:
        """Sources of the outputs already published, read from ``positions`` (``None``: from the
        beginning of the output topics)."""
        kafka = self.config.kafka
        sources, _ = self.backend.read_published_sources(
            kafka.output_topic, kafka.dead_letter_topic, start_positions=positions or {},
            until_silence=self.quirks.readback_until_silence)
        self._progress()
        return sources

    # -- one batch --------------------------------------------------------------------------

    def _step(self) -> int:
        batch = self.config.batch
        if time.monotonic() - self._fleet_read >= FLEET_REFRESH_SECONDS:
            self._read_fleet()
        records = self._source.poll(batch.max_records, batch.max_wait_ms)
        self._raise_callback_error()
        if self._tasks and not self._lease.valid():
            # Frozen inside the poll: it may return records fetched before the group moved on
            # (the client has not heard of it yet), and a poll that returns is no proof that the
            # group still counts this member. Neither the batch nor a state goes out.
            self.stats.dropped_batches += bool(records)
            raise self._lease_lost("during its poll")
        self._lease.renew()
        if not records:
            self._probe_broker()
            self._write_due_states()
            self._report_lag()
            return 0
        started = time.perf_counter()
        outgoing: list[OutgoingRecord] = []
        offsets: dict[TopicPartition, int] = {}
        done = []
        for tp, begin, end in _partition_runs(records):
            task = self._tasks.get(tp)
            if task is None:
                raise PartitionsLost(f"the consumer handed out records of {tp.key()}, which this "
                                     "replica does not own")
            run = records[begin:end]
            if run[0].offset < task.state.learned:
                # The client handed out records this state has learned already (seen with
                # confluent-kafka on Apache Kafka after a short SIGSTOP: the partition read
                # again from where it was assigned). Learning or publishing them again would
                # break exactly-once; they are skipped.
                fresh = [r for r in run if r.offset >= task.state.learned]
                logger.warning("%s: the consumer handed out offsets %d..%d again, which its "
                               "state has learned already (up to %d); skipping them",
                               tp.key(), run[0].offset, run[-1].offset if not fresh
                               else fresh[0].offset - 1, task.state.learned)
                self.stats.skipped_duplicates += len(run) - len(fresh)
                if not fresh:
                    continue
                run = fresh
            published, extraction, result = self._process_run(task, run)
            outgoing += published
            next_offset = run[-1].offset + 1
            if next_offset > task.publish_from:
                offsets[tp] = next_offset
            done.append((tp, run, extraction, result, len(published)))
        states = self._due_states()
        if not self._lease.valid():
            self.stats.dropped_batches += 1
            raise self._lease_lost("since its last poll")
        self._publish(outgoing, states, offsets)
        for tp, run, extraction, result, n_out in done:
            task = self._tasks[tp]
            task.published = {o for o in task.published if o >= task.state.learned}
            self._report_batch(task, extraction, result,
                               n_out - len(extraction.dead_letters), time.perf_counter() - started)
            if self.on_batch is not None:
                self.on_batch(self, run, extraction, result)
        self._report_lag()
        return len(records)

    def _process_run(self, task: _Task, run: Sequence[Any]):
        """Score, decide and learn one partition's records of a batch; returns what to publish."""
        outcome = task.pipeline.process([r.value for r in run], reference=self._reference())
        if task.assigned_at is not None:
            logger.info("%s: first event scored %.3f s after its assignment",
                        task.state.partition.key(), time.monotonic() - task.assigned_at)
            task.assigned_at = None
        extraction, result = outcome.extraction, outcome.result
        outgoing = [self._dead_letter(run[letter.index], letter)
                    for letter in outcome.dead_letters]
        for index, row in outcome.anomalies:
            outgoing.append(self._anomaly(run[index], extraction.events[row], result, row,
                                          outcome.model_events))
        to_publish = [r for r in outgoing if task.should_publish(r.source[2])]
        self.stats.skipped_duplicates += sum(
            1 for r in outgoing if r.source[2] >= task.publish_from and r.source[2] in
            task.published)
        self.stats.relearned += sum(1 for r in run if r.offset < task.publish_from)
        task.state.learned = run[-1].offset + 1
        task.state.events_learned += outcome.n_scored
        task.unwritten = True
        self.stats.batches += 1
        self.stats.events += len(run)
        self.stats.anomalies += outcome.n_anomalies
        self.stats.dead_letters += len(extraction.dead_letters)
        for reason, count in extraction.reason_counts().items():
            self.stats.dead_letter_reasons[reason] = (
                self.stats.dead_letter_reasons.get(reason, 0) + count)
        return to_publish, extraction, result

    def _reference(self):
        """The merged model of every partition, or ``None`` while there is one model."""
        return self._fleet.reference({tp: t.detector for tp, t in self._tasks.items()})

    # -- states --------------------------------------------------------------------------------

    def _due_states(self, partitions: Sequence[TopicPartition] | None = None
                    ) -> list[OutgoingRecord]:
        """State records of the owned partitions whose state is due (or of ``partitions``)."""
        now = time.monotonic()
        interval = self.config.checkpoint.interval_seconds
        if partitions is None:
            partitions = [tp for tp, t in self._tasks.items()
                          if t.unwritten and now - t.written >= interval and t.state.learned >= 0]
        if not partitions:
            return []
        kafka = self.config.kafka
        try:
            positions = self._source.high_watermarks((kafka.output_topic, kafka.dead_letter_topic))
        except KafkaUnavailable:
            raise
        except Exception as exc:
            raise KafkaUnavailable(f"cannot read output positions: {exc}") from exc
        fields = list(self.config.features.fields)
        records = []
        for tp in partitions:
            task = self._tasks[tp]
            if task.state.learned < 0:
                continue
            task.state.output_positions = task.read_back_positions(positions)
            task.state.written_at = time.time()
            records.append(OutgoingRecord(self.state_topic, encode_state(task.state, fields),
                                          state_key(tp)))
            task.written, task.unwritten = now, False
        return records

    def _write_due_states(self) -> None:
        states = self._due_states()
        if states:
            self._publish([], states, {})

    def _write_states(self, partitions: Sequence[TopicPartition], offsets: bool) -> None:
        """Write the states of ``partitions`` that learned something since their last write,
        now (with their offsets: ``offsets``)."""
        if self._source is None or self._sink is None:
            return
        partitions = [tp for tp in partitions if self._tasks[tp].unwritten]
        states = self._due_states(partitions)
        commit = {}
        if offsets:
            commit = {tp: self._tasks[tp].state.learned for tp in partitions
                      if self._tasks[tp].state.learned >= max(self._tasks[tp].publish_from, 0)}
        if states or commit:
            self._publish([], states, commit)

    # -- publishing --------------------------------------------------------------------------

    def _publish(self, outputs: list[OutgoingRecord], states: list[OutgoingRecord],
                 offsets: Mapping[TopicPartition, int]) -> None:
        """Publish a batch's outputs, the states that are due and the batch's offsets.

        Exactly-once: one transaction. At-least-once: the outputs, once acknowledged the states
        (a state never runs ahead of its outputs), then the offsets.
        """
        if self._sink.delivery == "exactly-once":
            sent = self._deliver(outputs + states, offsets)
        else:
            sent = self._deliver(outputs, {}) + self._deliver(states, offsets)
        n_states = sum(1 for r in sent if r.topic == self.state_topic)
        self.stats.published += len(sent) - n_states
        if n_states:
            self.stats.checkpoints += n_states
            if self.metrics is not None:
                self.metrics.checkpoint_written()
                self.metrics.state_bytes.set(max(len(r.value) for r in sent
                                                 if r.topic == self.state_topic))

    def _deliver(self, records: list[OutgoingRecord],
                 offsets: Mapping[TopicPartition, int]) -> list[OutgoingRecord]:
        """Publish ``records`` (and commit ``offsets``); a record the broker refuses becomes a
        reason-only dead letter (a state: is left out, and the last good one stays).

        Returns what was published. A refusal that remains after the replacement (a broker that
        refuses even a reason-only record) is a fault of the environment: KafkaUnavailable.

        Kafka judges the size of a whole record batch, so a reason-only dead letter sent in one
        produce request with a still-oversized record is refused with it; it is kept as it is
        (replacing it again would describe an empty value) and the request is tried again.
        """
        replaced: set[int] = set()  # id() of the reason-only dead letters put in
        while True:
            try:
                publish_batch(self._source, self._sink, records, offsets,
                              plain_commit_when_empty=self.quirks.plain_commit_when_nothing_to_publish)
                return records
            except RecordRejected as exc:
                new = {i: why for i, why in exc.rejected.items() if id(records[i]) not in replaced}
                if not new:
                    raise KafkaUnavailable("the broker refuses even reason-only dead letters; "
                                           "check the dead-letter topic's configuration") from exc
                states = {i for i in new if records[i].topic == self.state_topic}
                outputs = {i: why for i, why in new.items() if i not in states}
                if states:
                    self.stats.checkpoint_failures += len(states)
                    if self.metrics is not None:
                        for _ in states:
                            self.metrics.checkpoint_failed()
                    logger.error("the broker refused %d records of the state topic %r (%s); "
                                 "detection goes on and the last good states stay. Raise the "
                                 "topic's max.message.bytes", len(states), self.state_topic,
                                 new[min(states)])
                if outputs:
                    logger.warning("the broker refused %d records of the batch (%s); sending "
                                   "reason-only dead letters in their place", len(outputs), exc)
                    if self.metrics is not None:
                        self.metrics.dead_letters({"oversize": len(outputs)})
                kept = []
                for i, record in enumerate(records):
                    if i in outputs:
                        record = self._reason_only(record, outputs[i])
                        replaced.add(id(record))
                    if i not in states:
                        kept.append(record)
                records = kept
                if self._sink.delivery == "exactly-once":
                    # A record the broker refused inside a transaction leaves the producer in
                    # need of a new epoch (librdkafka: skipped sequence numbers; kafka-python:
                    # BUMPING_PRODUCER_EPOCH): the replacement goes out on a fresh one.
                    self._sink.close(timeout=1.0)
                    self._sink = None
                    self._sink = self.backend.open_sink(cancel=self._stop)

    def _reason_only(self, record: OutgoingRecord, why: str) -> OutgoingRecord:
        """A dead letter without the value the broker refused: the reason, the source and the
        original's size and SHA-256 in headers."""
        topic, partition, offset = record.source or ("", -1, -1)
        value = record.value or b""
        kind = "anomaly message" if record.topic == self.config.kafka.output_topic else "record"
        headers = dead_letter_headers(
            "oversize", f"the broker refused the {kind} of {len(value)} bytes ({why}); raise the "
            f"topic's max.message.bytes or lower features.max_event_bytes", topic, partition,
            offset)
        headers += [("streamgmm.truncated", b"true"),
                    ("streamgmm.original-size", str(len(value)).encode()),
                    ("streamgmm.original-sha256", hashlib.sha256(value).hexdigest().encode())]
        return OutgoingRecord(self.config.kafka.dead_letter_topic, b"", record.key, headers,
                              record.source)

    @property
    def max_record_bytes(self) -> int:
        """The largest record the daemon publishes (the producer's limit less framing room)."""
        return self._max_record_bytes

    def _dead_letter(self, rec, letter) -> OutgoingRecord:
        """The dead letter of ``rec``: its value (truncated to fit) with the reason in headers."""
        headers = list(rec.headers or ()) + dead_letter_headers(
            letter.reason, letter.message, rec.topic, rec.partition, rec.offset)
        record = OutgoingRecord(self.config.kafka.dead_letter_topic, rec.value, rec.key, headers,
                                source=(rec.topic, rec.partition, rec.offset))
        return fit_record(record, self._max_record_bytes)

    def _anomaly(self, rec, event: dict, result, row: int, model_events: int) -> OutgoingRecord:
        room = self._max_record_bytes - len(rec.key or b"") - 512
        value = anomaly_message(event, result, row, source=(rec.topic, rec.partition, rec.offset),
                                model_events=model_events, max_bytes=room)
        return OutgoingRecord(self.config.kafka.output_topic, value, rec.key,
                              source=(rec.topic, rec.partition, rec.offset))

    # -- metrics ----------------------------------------------------------------------------

    def _progress(self) -> None:
        """The loop is at work: tell the watchdog and the progress metric."""
        if self.watchdog is not None:
            self.watchdog.beat()
        if self.metrics is not None:
            self.metrics.progressed(time.time())

    def _set_broker_up(self, up: bool) -> None:
        """What the broker probe found (on its thread): the metric, and a log line on change."""
        if up != self._broker_up:
            logger.info("broker %s", "answers" if up else "does not answer")
        self._broker_up = up
        if self.metrics is not None:
            self.metrics.set_broker_up(up)

    def _start_probe(self):
        """Probe the broker from a thread of its own, for a ``broker_up`` that stays true while
        the main thread blocks (only with metrics: the probe exists for them)."""
        if self.metrics is None:
            return None
        return self.backend.probe(self._set_broker_up)

    def _probe_broker(self) -> None:
        """An idle poll says nothing about the broker: check that it can be reached at all."""
        if not self.backend.reachable(timeout=0.5):
            raise KafkaUnavailable("no broker answers at "
                                   f"{','.join(self.config.kafka.bootstrap_servers)}")

    def _report_lag(self) -> None:
        """The consumer lag and the merged model's make-up (after every poll)."""
        if self.metrics is None or self._source is None:
            return
        self.metrics.set_consumer_lag(self._source.lag(
            {tp: t.state.learned for tp, t in self._tasks.items() if t.state.learned >= 0}))
        live = {tp: t.detector for tp, t in self._tasks.items()}
        self.metrics.set_merged_model(len(self._fleet.merged_partitions(live)),
                                      self._fleet.age(exclude=self._tasks))

    def _report_batch(self, task: _Task, extraction, result, n_anomalies, duration) -> None:
        if self.metrics is None:
            return
        if result is not None:
            self.metrics.observe_batch(result, duration)
        self.metrics.dead_letters(extraction.reason_counts())
        self.metrics.set_model(task.detector)
