"""The daemon end to end: clean stop on SIGTERM, and surviving a broker that goes away."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import orjson
import pytest
from conftest import produce, read_topic, unique_name
from test_recovery import wait_until_recovered, write_config
from waiting import wait_for

from streamgmm.checkpoint import read_state
from streamgmm.embedded import EmbeddedBroker, free_port
from streamgmm.io.kafka import ensure_topics
from streamgmm.service import CHECKPOINT_KIND, CHECKPOINT_VERSION


def _events(n, start=0):
    import random

    rng = random.Random(start)
    return [orjson.dumps({"i": start + i, "x": rng.gauss(0, 1), "y": rng.gauss(0, 1)})
            for i in range(n)]


@pytest.mark.integration
def test_broker_gone_and_back_the_daemon_reconnects_and_continues(tmp_path):
    port = free_port()
    broker = EmbeddedBroker(port=port, log_path=tmp_path / "broker.log").start()
    bootstrap = broker.bootstrap_servers
    topics = ("in", "out", "dlq")
    checkpoint = tmp_path / "ck.npz"
    config = tmp_path / "c.toml"
    write_config(config, bootstrap, topics, "g", checkpoint)
    ensure_topics(bootstrap, topics, partitions=1)
    produce(bootstrap, "in", _events(500) + [b"bad json 1"])
    log_path = tmp_path / "daemon.log"
    log = open(log_path, "ab")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sys.executable, "-m", "streamgmm.cli", "run", "--config",
                             str(config), "--create-topics"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_recovered(checkpoint, proc)
        wait_for(lambda: len(read_topic(bootstrap, "dlq", idle=0.3, timeout=2)) == 1,
                 "the first dead letter", 60, [("the daemon", proc)])
        broker.kill()  # Tansu keeps nothing: the broker that comes back is empty
        wait_for(lambda: b"Kafka unavailable" in log_path.read_bytes(),
                 "the daemon to notice", 60, [("the daemon", proc)])
        assert proc.poll() is None, "the daemon must not exit when the broker goes away"
        broker = EmbeddedBroker(port=port, log_path=tmp_path / "broker2.log").start()
        produce(bootstrap, "in", _events(300, start=1000) + [b"bad json 2"])
        wait_for(lambda: any(m.value() == b"bad json 2"
                             for m in read_topic(bootstrap, "dlq", idle=0.3, timeout=2)),
                 "the daemon to consume from the returned broker", 90, [("the daemon", proc)])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        _, meta = read_state(checkpoint, CHECKPOINT_KIND, CHECKPOINT_VERSION)
        # it learned from the returned (empty, then refilled) broker too; exact counts across a
        # broker that lost all its data are not defined
        assert 500 < meta["events_learned"] <= 800
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        broker.kill()


@pytest.mark.integration
def test_sigterm_finishes_the_batch_commits_checkpoints_and_exits_0(tmp_path, bootstrap):
    topics = tuple(unique_name(p) for p in ("in", "out", "dlq"))
    ensure_topics(bootstrap, topics, partitions=1)
    produce(bootstrap, topics[0], _events(400))
    checkpoint = tmp_path / "ck.npz"
    config = tmp_path / "c.toml"
    write_config(config, bootstrap, topics, unique_name("g"), checkpoint)
    proc = subprocess.Popen([sys.executable, "-m", "streamgmm.cli", "run", "--config",
                             str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_recovered(checkpoint, proc)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _, meta = read_state(checkpoint, CHECKPOINT_KIND, CHECKPOINT_VERSION)
    learned = sum(meta["learned_offsets"].values())
    assert meta["events_learned"] == learned  # all valid here: learned once each
    assert read_topic(bootstrap, topics[1], idle=0.5) is not None


def test_next_offsets_per_partition_from_each_runs_last_record():
    from types import SimpleNamespace

    from kafka import TopicPartition

    from streamgmm.service import _next_offsets

    def recs(topic, partition, offsets):
        return [SimpleNamespace(topic=topic, partition=partition, offset=o) for o in offsets]

    assert _next_offsets([]) == {}
    assert _next_offsets(recs("t", 0, [5])) == {TopicPartition("t", 0): 6}
    batch = recs("t", 0, range(10, 20)) + recs("t", 1, [3]) + recs("t", 2, range(7, 9))
    assert _next_offsets(batch) == {TopicPartition("t", 0): 20, TopicPartition("t", 1): 4,
                                    TopicPartition("t", 2): 9}
    # The same answer as looking at every record, for runs of every length.
    for sizes in ([1, 1, 1], [3, 1, 4], [1, 5], [6]):
        batch = [r for p, k in enumerate(sizes) for r in recs("t", p, range(100, 100 + k))]
        expected = {}
        for r in batch:
            tp = TopicPartition(r.topic, r.partition)
            expected[tp] = max(expected.get(tp, 0), r.offset + 1)
        assert _next_offsets(batch) == expected


class _FakeSource:
    """Hands out the given batches of raw records, then nothing (no broker needed)."""

    def __init__(self, batches):
        self.batches = list(batches)

    def poll(self, max_records, timeout_ms):
        return self.batches.pop(0) if self.batches else []

    def high_watermarks(self, topics):
        return {}


class _FakeSink:
    """Records what is started and confirmed; ``fail`` makes the n-th confirmation fail."""

    def __init__(self, fail=()):
        self.fail, self.log, self.started = set(fail), [], 0

    def publish_async(self, records, offsets, source):
        from streamgmm.io.kafka import KafkaUnavailable

        n, self.started = self.started, self.started + 1
        self.log.append(("start", n, dict(offsets)))
        sink = self

        class Pending:
            def wait(self):
                sink.log.append(("wait", n))
                if n in sink.fail:
                    raise KafkaUnavailable("commit failed")

        return Pending()


def _pipelined_daemon(tmp_path, batches, sink):
    from types import SimpleNamespace

    from streamgmm.config import load_config
    from streamgmm.service import Daemon

    config = load_config(None, env={
        "STREAMGMM_FEATURES__FIELDS": "x,y", "STREAMGMM_MODEL__N_COMPONENTS": "1",
        "STREAMGMM_CHECKPOINT__PATH": str(tmp_path / "ck.npz"),
        "STREAMGMM_CHECKPOINT__INTERVAL_SECONDS": "3600"})
    seen = []
    daemon = Daemon(config, on_batch=lambda d, records, *_: seen.append(
        [r.offset for r in records]))
    records = [[SimpleNamespace(topic="in", partition=0, offset=o, value=v, key=None, headers=[])
                for o, v in batch] for batch in batches]
    daemon._source, daemon._sink = _FakeSource(records), sink
    return daemon, seen


def test_a_batch_is_published_only_once_its_transaction_commits_one_at_a_time(tmp_path):
    from kafka import TopicPartition

    values = _events(20)
    batches = [list(enumerate(values[:10])), [(10, b"bad json")] + list(enumerate(values[11:],
                                                                                   11))]
    sink = _FakeSink()
    daemon, seen = _pipelined_daemon(tmp_path, batches, sink)
    daemon._step()
    assert seen == [] and sink.log == [("start", 0, {TopicPartition("in", 0): 10})]
    daemon._step()  # processed while batch 0 was in flight; 0 confirmed before 1 starts
    assert sink.log[1:] == [("wait", 0), ("start", 1, {TopicPartition("in", 0): 20})]
    assert seen == [list(range(10))]
    assert not (tmp_path / "ck.npz").exists()  # batch 1 is not committed yet
    daemon._finish()  # the clean stop waits for it, then checkpoints
    assert sink.log[-1] == ("wait", 1) and seen[1] == list(range(10, 20))
    assert daemon.stats.published == 1 and not daemon._pending
    _, meta = read_state(tmp_path / "ck.npz", CHECKPOINT_KIND, CHECKPOINT_VERSION)
    assert meta["learned_offsets"] == {"in:0": 20} and meta["events_learned"] == 19


def test_a_failed_commit_keeps_both_learned_batches_pending_in_order(tmp_path):
    from streamgmm.io.kafka import KafkaUnavailable

    values = _events(20)
    batches = [list(enumerate(values[:10])), [(10, b"bad json")] + list(enumerate(values[11:],
                                                                                   11))]
    daemon, seen = _pipelined_daemon(tmp_path, batches, _FakeSink(fail={0}))
    daemon._step()
    with pytest.raises(KafkaUnavailable):
        daemon._step()  # batch 1 is learned when batch 0's commit turns out to have failed
    assert [[r.offset for r in b.records] for b in daemon._pending] == [
        list(range(10)), list(range(10, 20))]
    assert [len(b.outgoing) for b in daemon._pending] == [0, 1]  # the dead letter waits too
    assert seen == [] and daemon.stats.published == 0
    daemon._write_checkpoint()  # refused: learned events are not committed
    assert not (tmp_path / "ck.npz").exists()
