"""The daemon loop: Kafka in, anomalies and dead letters out, exactly once, with checkpoints.

One iteration of :meth:`Daemon.run`:

1. poll a micro-batch of raw records (``[batch] max_records``, ``max_wait_ms``);
2. decode, validate, score and learn (:class:`streamgmm.pipeline.BatchPipeline`, the same path
   as ``streamgmm replay``): bad records become dead letters, every event is scored by the model
   *before* it learns from it;
4. publish the anomalies, the dead letters and the batch's input offsets together
   (:func:`streamgmm.io.base.publish_batch`: one transaction in exactly-once mode);
5. update the metrics, and now and then write a checkpoint.

Recovery
--------
The checkpoint holds the detector, the input offsets it has learned up to, and the positions of the
output and dead-letter topics when it was written; it is written atomically and only when every
event the detector has learned has also been published and committed. After a crash the daemon:

* restores the checkpoint (or starts fresh when there is none);
* joins the group and reads the committed offsets; events between the checkpoint's offsets and the
  committed ones are re-learned *without* being published (their output is already out);
* reads back the output and dead-letter topics from the saved positions and collects the
  ``source`` (topic, partition, offset) of everything already there, so that an event whose output
  became visible without its offsets being committed — a transaction cut by ``kill -9`` on a broker
  that does not abort it (Tansu), or an at-least-once crash between send and commit — is not
  published twice.

So every valid event is learned exactly once and every anomaly and dead letter appears once.

The cluster is a :class:`streamgmm.io.base.Backend` (the configured one,
:func:`streamgmm.io.backend.open_backend`, or any given to :class:`Daemon`: the unit tests use
:class:`streamgmm.io.memory.MemoryBackend`), and the broker's quirks are named in
:class:`streamgmm.io.quirks.BrokerQuirks` (``[kafka] broker_quirks``).

Broker loss: any Kafka failure closes the clients, keeps the unpublished batch in memory, and
reconnects with an exponential back-off (capped at :attr:`Daemon.max_backoff` seconds); the daemon
never exits because the broker is away. A client call that blocks past its deadline
(:func:`streamgmm.io.base.bounded_call`) abandons that client and reconnects the same way; should
the loop still make no progress for ``[watchdog] stall_seconds``, the watchdog
(:mod:`streamgmm.watchdog`) ends the process with exit code 4. ``streamgmm_broker_up`` comes from a
probe on a thread of its own (:mod:`streamgmm.io.probe`), so it is true while the loop blocks.
``SIGTERM``/``SIGINT`` (:meth:`Daemon.request_stop`) finish the current batch, publish, commit,
checkpoint and return.

Message faults: an event or a message that cannot be handled is that message's problem. It goes to
the dead-letter topic with its reason (truncated to fit the producer's limit, with its original
size and SHA-256 in headers), an anomaly message too large for the limit leaves out its event, and
every message is strict JSON (:func:`streamgmm.messages.encode`); the rest of the batch goes on.

Disk faults: a checkpoint that cannot be written is logged and counted
(``streamgmm_checkpoint_failures_total``); detection goes on and the last good checkpoint stays.

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
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamgmm.checkpoint import CheckpointError, read_state, write_state
from streamgmm.config import Config
from streamgmm.io.base import (
    Backend,
    KafkaUnavailable,
    OutgoingRecord,
    RecordRejected,
    Sink,
    Source,
    TopicPartition,
    fit_record,
    publish_batch,
)
from streamgmm.io.quirks import BrokerQuirks
from streamgmm.messages import anomaly_message, dead_letter_headers
from streamgmm.pipeline import BatchPipeline

__all__ = ["Daemon", "DaemonStats", "CHECKPOINT_KIND", "CHECKPOINT_VERSION"]

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "streamgmm-daemon"
#: 2: ``written_at`` (when the checkpoint was written) is always there; version 1 files, which
#: may lack it, are still read.
CHECKPOINT_VERSION = 2


def _next_offsets(records) -> dict[TopicPartition, int]:
    """The next offset to read per partition after ``records`` (grouped per partition, in order).

    Looks at the last record of each partition's run only: no per-record Python work.
    """
    offsets: dict[TopicPartition, int] = {}
    start, n = 0, len(records)
    while start < n:
        first = records[start]
        topic, partition = first.topic, first.partition
        # Records of one partition are contiguous and ascending; find where the run ends.
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
        tp = TopicPartition(topic, partition)
        offsets[tp] = max(offsets.get(tp, 0), records[end - 1].offset + 1)
        start = end
    return offsets


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
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)


class Daemon:
    """The streamgmm service: consume, detect, publish, commit, checkpoint.

    Parameters
    ----------
    config : streamgmm.config.Config
        The validated configuration.
    metrics : streamgmm.metrics.Metrics, optional
        Where to export the Prometheus metrics; ``None`` exports nothing.
    detector_factory : callable, optional
        ``() -> Detector`` for a fresh start; defaults to
        ``Detector(**config.detector_kwargs())``.
    on_batch : callable, optional
        ``on_batch(daemon, records, extraction, result)`` after each published batch (the demo's
        live console uses it); must be quick.
    create_topics : bool
        Create missing input/output/dead-letter topics on connect (handy with the embedded broker).
    watchdog : streamgmm.watchdog.Watchdog, optional
        Told (:meth:`~streamgmm.watchdog.Watchdog.beat`) whenever the loop makes progress.
    backend : streamgmm.io.base.Backend, optional
        The cluster's client library; defaults to the configured one
        (:func:`streamgmm.io.backend.open_backend`).

    Attributes
    ----------
    detector : Detector
        The live detector.
    stats : DaemonStats
        What happened so far.
    """

    #: Longest wait between two reconnection attempts, seconds.
    max_backoff: float = 10.0

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
        # The largest record to publish: what the producer takes, less room for the framing.
        limit, _ = kafka.max_message_bytes
        self._max_record_bytes = limit - 1024
        self.stats = DaemonStats()
        self._stop = threading.Event()
        self._source: Source | None = None
        self._sink: Sink | None = None
        # What the detector has learned up to (next offset per partition).
        self._learned: dict[TopicPartition, int] = {}
        # Below these offsets events are re-learned but not published (their output is out).
        self._publish_from: dict[TopicPartition, int] = {}
        # Input events whose anomaly / dead letter is already on the output topics.
        self._already_published: set[tuple[str, int, int]] = set()
        # Where the next read-back of the output topics starts (saved in the checkpoint).
        self._output_positions: dict[TopicPartition, int] = {}
        # A batch learned but not yet published (the broker failed while publishing it).
        self._pending: tuple[list[OutgoingRecord], dict[TopicPartition, int]] | None = None
        # What the detector had learned before the pending batch (None: nothing of that
        # partition), the part of _learned the group should have committed.
        self._before_pending: dict[TopicPartition, int | None] = {}
        self._last_checkpoint = time.monotonic()
        self._last_checkpoint_wall: float | None = None
        self._broker_up = False
        self._pipeline = BatchPipeline.from_config(config, self._restore_or_create())

    @property
    def detector(self):
        """The live detector."""
        return self._pipeline.detector

    # -- lifecycle -------------------------------------------------------------------------

    def _default_detector(self):
        from streamgmm.detector import Detector

        return Detector(**self.config.detector_kwargs())

    def request_stop(self, *_: Any) -> None:
        """Ask the loop to finish the current batch, commit, checkpoint and return."""
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
        """
        backoff = 0.5
        last_record = time.monotonic()
        probe = self._start_probe()
        try:
            while not self._stop.is_set():
                try:
                    self._connect()
                    self._progress()
                    self._recover()
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
                except KafkaUnavailable as exc:
                    logger.warning("Kafka unavailable (%s); reconnecting in %.1f s", exc, backoff)
                    self._close_clients()
                    self.stats.reconnects += 1
                    self._progress()  # retrying is the loop at work, not a stuck loop
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
            self._finish()
        finally:
            self._close_clients()
            if probe is not None:
                probe.stop()
        return 0

    def _finish(self) -> None:
        """Clean stop: the last batch is published already; write the final checkpoint."""
        if self._pending is not None:
            logger.warning("stopping with an unpublished batch (the broker is away); the last "
                           "checkpoint stays, the batch is re-processed on the next start")
            return
        if self._source is not None:
            self._write_checkpoint()

    # -- connection and recovery -----------------------------------------------------------

    def _connect(self) -> None:
        kafka = self.config.kafka
        if self.create_topics:
            try:
                self.backend.ensure_topics(
                    [kafka.input_topic, kafka.output_topic, kafka.dead_letter_topic])
            except Exception as exc:
                raise KafkaUnavailable(f"cannot create topics: {exc}") from exc
        # The sink first: an exactly-once sink settles a previous instance's open transaction
        # before the output topics are read back.
        self._sink = self.backend.open_sink(cancel=self._stop)
        self._source = self.backend.open_source()

    def _close_clients(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None
        if self._sink is not None:
            self._sink.close(timeout=1.0)
            self._sink = None

    def _recover(self) -> None:
        """Align the consumer with what the detector learned and what is already published."""
        source, kafka = self._source, self.config.kafka
        assigned = source.wait_for_assignment()
        self._progress()
        committed = source.committed()
        beginnings = source.beginning_offsets()
        self._progress()
        for tp in sorted(assigned):
            c, learned = committed.get(tp), self._learned.get(tp)
            begin = beginnings.get(tp, 0)
            # The pending batch is learned but not committed: only what came before it counts.
            confirmed = (self._before_pending.get(tp) if self._pending is not None
                         and tp in self._before_pending else learned)
            if confirmed is not None and c is None and confirmed > begin:
                # A checkpoint is only written once what it learned is committed, so a group
                # without commits means the broker lost its state (or the group was deleted).
                logger.warning("%s: the group has no committed offset although the model learned "
                               "up to %d; the broker lost its data or the group was deleted. "
                               "Continuing from auto_offset_reset", tp.key(), learned)
                learned = None
            if learned is None:
                if c is not None and c >= begin:
                    start = c
                else:
                    start = begin if kafka.auto_offset_reset == "earliest" else source.position(tp)
                learned = start
            if c is not None and c > learned:
                logger.info("%s: re-learning offsets %d..%d (after the checkpoint, already "
                            "published) without publishing", tp.key(), learned, c - 1)
                self._publish_from[tp] = c
            self._learned[tp] = learned
            source.seek(tp, learned)
        published, ends_out = self.backend.read_published_sources(
            kafka.output_topic, kafka.dead_letter_topic, start_positions=self._output_positions,
            until_silence=self.quirks.readback_until_silence)
        self._already_published |= published
        self._progress()
        if not self._output_positions:
            self._output_positions = {tp: 0 for tp in ends_out}
        if self._pending is not None:
            records, offsets = self._pending
            fresh = [r for r in records if r.source not in self._already_published]
            self.stats.skipped_duplicates += len(records) - len(fresh)
            self._deliver(fresh, offsets)
            self.stats.published += len(fresh)
            self._pending = None
            logger.info("published the batch that was pending when the broker failed")
        # A checkpoint right away: from now on recovery starts from here.
        self._write_checkpoint()

    # -- one batch --------------------------------------------------------------------------

    def _step(self) -> int:
        batch = self.config.batch
        records = self._source.poll(batch.max_records, batch.max_wait_ms)
        if not records:
            self._probe_broker()
            self._maybe_checkpoint()
            self._report_lag()
            return 0
        started = time.perf_counter()
        outgoing, extraction, result = self.process_batch(records)
        n_anomalies = len(outgoing) - len(extraction.dead_letters)
        offsets = _next_offsets(records)
        self._before_pending = {tp: self._learned.get(tp) for tp in offsets}
        self._learned.update(offsets)
        to_publish = [r for r in outgoing if self._should_publish(r.source)]
        self.stats.skipped_duplicates += len(outgoing) - len(to_publish)
        commit = {tp: o for tp, o in offsets.items() if o > self._publish_from.get(tp, -1)}
        if self._publish_from:
            self.stats.relearned += sum(
                1 for r in records
                if r.offset < self._publish_from.get(TopicPartition(r.topic, r.partition), -1))
        # Processed (and learned) now, whether or not the broker takes the output yet.
        self.stats.batches += 1
        self.stats.events += len(records)
        self.stats.anomalies += n_anomalies
        self.stats.dead_letters += len(extraction.dead_letters)
        for reason, count in extraction.reason_counts().items():
            self.stats.dead_letter_reasons[reason] = (
                self.stats.dead_letter_reasons.get(reason, 0) + count)
        self._pending = (to_publish, commit)
        to_publish = self._publish(to_publish, commit)
        self._pending = None
        for tp in commit:
            self._publish_from.pop(tp, None)
        self.stats.published += len(to_publish)
        duration = time.perf_counter() - started
        self._report_batch(records, extraction, result, n_anomalies, duration)
        if self.on_batch is not None:
            self.on_batch(self, records, extraction, result)
        self._maybe_checkpoint()
        return len(records)

    def _publish(self, records: list[OutgoingRecord], commit) -> list[OutgoingRecord]:
        """Publish a batch; a record the broker refuses becomes a reason-only dead letter.

        Returns what was published. A refusal that remains after the replacement (a broker that
        refuses even a reason-only record) is a fault of the environment: KafkaUnavailable.

        Kafka judges the size of a whole record batch, so a reason-only dead letter sent in one
        produce request with a still-oversized record is refused with it; it is kept as it is
        (replacing it again would describe an empty value) and the request is tried again.
        """
        replaced: set[int] = set()
        while True:
            try:
                self._deliver(records, commit)
                return records
            except RecordRejected as exc:
                new = {i: why for i, why in exc.rejected.items() if i not in replaced}
                if not new:
                    raise KafkaUnavailable("the broker refuses even reason-only dead letters; "
                                           "check the dead-letter topic's configuration") from exc
                logger.warning("the broker refused %d records of the batch (%s); sending "
                               "reason-only dead letters in their place", len(new), exc)
                records = [self._reason_only(r, new[i]) if i in new else r
                           for i, r in enumerate(records)]
                replaced |= set(new)
                self._pending = (records, commit)
                if self.metrics is not None:
                    self.metrics.dead_letters({"oversize": len(new)})

    def _deliver(self, records: Sequence[OutgoingRecord],
                 offsets: Mapping[TopicPartition, int]) -> None:
        publish_batch(self._source, self._sink, records, offsets,
                      plain_commit_when_empty=self.quirks.plain_commit_when_nothing_to_publish)

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

    def process_batch(self, records: Sequence[Any]):
        """Decode, score, decide and learn one batch of consumed records; no I/O.

        Parameters
        ----------
        records : sequence
            Consumed records: ``value``, ``key``, ``headers``, ``topic``, ``partition``,
            ``offset``.

        Returns
        -------
        outgoing : list of OutgoingRecord
            The batch's dead letters, then its anomaly messages, each within the producer's
            message limit.
        extraction : streamgmm.features.Extraction
        result : detector batch result, or None when no record could be scored
        """
        outcome = self._pipeline.process([r.value for r in records])
        extraction, result = outcome.extraction, outcome.result
        outgoing = [self._dead_letter(records[letter.index], letter)
                    for letter in outcome.dead_letters]
        for index, row in outcome.anomalies:
            outgoing.append(self._anomaly(records[index], extraction.events[row], result, row,
                                          outcome.model_events))
        return outgoing, extraction, result

    @property
    def max_record_bytes(self) -> int:
        """The largest record the daemon publishes (the producer's limit less framing room)."""
        return self._max_record_bytes

    def _should_publish(self, source: tuple[str, int, int] | None) -> bool:
        if source is None:
            return True
        topic, partition, offset = source
        if offset < self._publish_from.get(TopicPartition(topic, partition), -1):
            return False
        return source not in self._already_published

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

    # -- checkpoints ------------------------------------------------------------------------

    def _maybe_checkpoint(self) -> None:
        interval = self.config.checkpoint.interval_seconds
        if time.monotonic() - self._last_checkpoint >= interval:
            self._write_checkpoint()

    def _write_checkpoint(self) -> None:
        """Write the checkpoint (only when everything learned is published and committed)."""
        if self._pending is not None:
            return
        # Forget duplicates we have passed; while some are ahead, keep the old read-back start.
        self._already_published = {
            s for s in self._already_published
            if s[2] >= self._learned.get(TopicPartition(s[0], s[1]), 0)
        }
        if not self._already_published and not self._publish_from:
            try:
                self._output_positions = self._source.high_watermarks(
                    (self.config.kafka.output_topic, self.config.kafka.dead_letter_topic))
            except KafkaUnavailable:
                raise
            except Exception as exc:
                raise KafkaUnavailable(f"cannot read output positions: {exc}") from exc
        arrays, meta = self.detector.get_state()
        state_arrays = {f"detector/{k}": v for k, v in arrays.items()}
        state_meta = {
            "detector": meta,
            "learned_offsets": {tp.key(): o for tp, o in self._learned.items()},
            "output_positions": {tp.key(): o for tp, o in self._output_positions.items()},
            "input_topic": self.config.kafka.input_topic,
            "fields": list(self.config.features.fields),
            "events_learned": int(self.detector.n_events_learned),
            "written_at": time.time(),
        }
        self._last_checkpoint = time.monotonic()  # after a failure too: retry at the interval
        try:
            write_state(self.config.checkpoint.path, CHECKPOINT_KIND, CHECKPOINT_VERSION,
                        state_arrays, state_meta)
        except OSError as exc:  # the disk, not the stream: keep detecting
            self.stats.checkpoint_failures += 1
            if self.metrics is not None:
                self.metrics.checkpoint_failed()
            logger.error("cannot write the checkpoint %s (%s); detection goes on and the last "
                         "good checkpoint stays. Free space or fix the permissions of its "
                         "directory (docs/operations.md, StreamgmmCheckpointFailing)",
                         self.config.checkpoint.path, exc)
            return
        self._last_checkpoint_wall = time.time()
        self.stats.checkpoints += 1
        if self.metrics is not None:
            self.metrics.checkpoint_written(self._last_checkpoint_wall)
        logger.debug("checkpoint written to %s", self.config.checkpoint.path)

    def _restore_or_create(self):
        path = self.config.checkpoint.path
        if not os.path.exists(path):
            logger.info("no checkpoint at %s; starting with a fresh model", path)
            return self._detector_factory()
        arrays, meta = read_state(path, CHECKPOINT_KIND, CHECKPOINT_VERSION)
        fields = list(self.config.features.fields)
        if meta.get("fields") != fields:
            raise CheckpointError(
                f"{path}: made for features {meta.get('fields')} but the configuration has "
                f"{fields}; delete the checkpoint (or set checkpoint.path elsewhere) to start "
                "fresh")
        if meta.get("input_topic") != self.config.kafka.input_topic:
            raise CheckpointError(
                f"{path}: made for input topic {meta.get('input_topic')!r}, not "
                f"{self.config.kafka.input_topic!r}; delete it or set checkpoint.path elsewhere")
        detector = _restore_detector(path, arrays, meta, len(fields))
        self._learned = _offsets_of(path, meta, "learned_offsets")
        self._output_positions = _offsets_of(path, meta, "output_positions")
        written_at = meta["written_at"] if meta["version"] >= 2 else meta.get("written_at")
        if meta["version"] >= 2 and not isinstance(written_at, int | float):
            raise CheckpointError(f"{path}: 'written_at' is {written_at!r}, not a time")
        # Version 1 files may lack it: they count as written now.
        self._last_checkpoint_wall = (float(written_at) if isinstance(written_at, int | float)
                                      else time.time())
        logger.info("restored checkpoint %s: %d events learned, offsets %s", path,
                    detector.n_events_learned, meta["learned_offsets"])
        return detector

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
        if self.metrics is not None and self._source is not None:
            self.metrics.set_consumer_lag(self._source.lag(self._learned))

    def _report_batch(self, records, extraction, result, n_anomalies, duration) -> None:
        if self.metrics is None:
            return
        if result is not None:
            self.metrics.observe_batch(result, duration)
        self.metrics.dead_letters(extraction.reason_counts())
        self.metrics.set_model(self.detector)
        self._report_lag()


def _offsets_of(path, meta: Mapping[str, Any], key: str) -> dict[TopicPartition, int]:
    """The ``{"topic:partition": offset}`` table ``key`` of a checkpoint, checked.

    Raises
    ------
    CheckpointError
        If it is missing, or holds anything but ``"topic:partition"`` names with offsets that
        are integers of at least 0.
    """
    table = meta.get(key)
    if not isinstance(table, Mapping):
        raise CheckpointError(f"{path}: {key!r} is {'missing' if table is None else 'not a table'}"
                              "; the file was not written by this daemon or was edited")
    offsets = {}
    for name, offset in table.items():
        topic, _, partition = str(name).rpartition(":")
        if not topic or not partition.isdigit():
            raise CheckpointError(f"{path}: {key} names {name!r}, not a \"topic:partition\"")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise CheckpointError(f"{path}: {key}[{name!r}] is {offset!r}, not an offset (an "
                                  "integer of at least 0)")
        offsets[TopicPartition(topic, int(partition))] = offset
    return offsets


def _restore_detector(path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                      n_features: int):
    """The detector of a checkpoint, checked: finite model arrays that it can score with.

    Raises
    ------
    CheckpointError
        If the detector's state is missing, inconsistent (wrong array shapes) or not finite.
    """
    from streamgmm.detector import Detector

    det_arrays = {k[len("detector/"):]: v for k, v in arrays.items()
                  if k.startswith("detector/")}
    for name, array in det_arrays.items():
        # The model and the drift reference are numbers; NaN there poisons every score. (The
        # threshold's window holds NaN where it has no score yet.)
        if name.startswith(("model/", "drift/")) and array.dtype.kind == "f" \
                and not np.isfinite(array).all():
            raise CheckpointError(f"{path}: the array detector/{name} holds NaN or infinity")
    if not isinstance(meta.get("detector"), Mapping):
        raise CheckpointError(f"{path}: holds no detector state")
    try:
        detector = Detector.from_state(det_arrays, meta["detector"])
        detector.score_samples(np.zeros((1, n_features)))
    except Exception as exc:  # whatever a malformed state breaks in the detector's code
        raise CheckpointError(f"{path}: the detector state is inconsistent ({type(exc).__name__}: "
                              f"{exc})") from exc
    return detector

