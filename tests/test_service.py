"""The daemon end to end: clean stop on SIGTERM, and surviving a broker that goes away.

What a daemon has learned is read from its state topic (``<group_id>-state``) by an independent
client (:func:`conftest.newest_states`); the daemon runs with no disk of its own."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import orjson
import pytest
from conftest import newest_states, produce, read_topic, start_broker, unique_name
from test_recovery import committed_total, write_config
from waiting import wait_for

from streamgmm.io.base import TopicPartition
from streamgmm.io.kafka import ensure_topics


def _joined(log_path, proc) -> None:
    """Wait for the daemon's ``replica … joined group`` line: it has restored its partitions."""
    wait_for(lambda: b"joined group" in log_path.read_bytes(), "the daemon to join its group",
             120, [("the daemon", proc)])


def _states(bootstrap, group):
    """The newest state of each input partition in ``group``'s state topic."""
    return newest_states(bootstrap, f"{group}-state", ["x", "y"])


def _state(bootstrap, group, topic):
    """The newest state of partition 0 of ``topic``, the only one with a state."""
    states = _states(bootstrap, group)
    assert set(states) == {TopicPartition(topic, 0)}, states
    return states[TopicPartition(topic, 0)]


def _events(n, start=0):
    import random

    rng = random.Random(start)
    return [orjson.dumps({"i": start + i, "x": rng.gauss(0, 1), "y": rng.gauss(0, 1)})
            for i in range(n)]


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["kafka-python", "confluent-kafka"])
@pytest.mark.parametrize(("kind", "comeback"), [("tansu", "empty"), ("apache", "with-data"),
                                                ("apache", "empty")])
def test_broker_gone_and_back_the_daemon_reconnects_and_continues(tmp_path, kind, comeback,
                                                                  backend):
    """The broker crashes (``SIGKILL``), stays away a few seconds and returns on the same port.

    Tansu keeps nothing in memory, so it always comes back empty; Apache Kafka comes back with its
    data (the common outage), or — its log directory wiped — empty like Tansu. With the data kept
    the result is exact: every event learned once and each dead letter published once. An empty
    broker lost the committed offsets and outputs, so only bounds hold.
    """
    broker = start_broker(kind, tmp_path / "broker")
    bootstrap = broker.bootstrap_servers
    topics = ("in", "out", "dlq")
    config = tmp_path / "c.toml"
    write_config(config, bootstrap, topics, "g", backend=backend,
                 quirks="none" if kind == "apache" else "tansu")
    ensure_topics(bootstrap, topics, partitions=1)
    produce(bootstrap, "in", _events(500) + [b"bad json 1"])
    log_path = tmp_path / "daemon.log"
    log = open(log_path, "ab")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sys.executable, "-m", "streamgmm.cli", "run", "--config",
                             str(config), "--create-topics"], stdout=log, stderr=subprocess.STDOUT)
    try:
        _joined(log_path, proc)
        wait_for(lambda: len(read_topic(bootstrap, "dlq", idle=0.3, timeout=2)) == 1,
                 "the first dead letter", 60, [("the daemon", proc)])
        # The state of all 501 events is in the state topic, and the daemon follows that topic
        # (it reads it every second): what it knows of its partition when the broker dies.
        wait_for(lambda: _states(bootstrap, "g").get(TopicPartition("in", 0), None) is not None
                 and _states(bootstrap, "g")[TopicPartition("in", 0)].learned == 501,
                 "the state of the first events", 30, [("the daemon", proc)])
        time.sleep(2.5)  # two and a half of the daemon's reads of its state topic
        broker.kill()
        wait_for(lambda: b"Kafka unavailable" in log_path.read_bytes(),
                 "the daemon to notice", 60, [("the daemon", proc)])
        assert proc.poll() is None, "the daemon must not exit when the broker goes away"
        if kind == "tansu":
            broker.start()
        else:
            broker.restart(empty=comeback == "empty")
        # into the partition the daemon knew, which an empty broker has made again from scratch
        produce(bootstrap, "in", _events(300, start=1000) + [b"bad json 2"], partition=0)
        wait_for(lambda: any(m.value() == b"bad json 2"
                             for m in read_topic(bootstrap, "dlq", idle=0.3, timeout=2)),
                 "the daemon to consume from the returned broker", 90, [("the daemon", proc)])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        letters = [m.value() for m in read_topic(bootstrap, "dlq", idle=0.5)]
        if comeback == "with-data":
            state = _state(bootstrap, "g", "in")
            assert letters == [b"bad json 1", b"bad json 2"]
            assert state.events_learned == 800
            assert state.learned == 802
        else:
            # The returned broker lost everything, the state topic too (and the input topic, which
            # --create-topics made again with the backend's partition count): the partitions
            # started from fresh models and learned what the refilled broker holds, once.
            assert letters[-1] == b"bad json 2"
            states = _states(bootstrap, "g").values()
            assert sum(s.events_learned for s in states) == 300
            assert sum(s.learned for s in states) == 301
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        broker.kill()


@pytest.mark.integration
def test_sigterm_finishes_the_batch_writes_the_states_commits_and_exits_0(tmp_path, bootstrap):
    topics = tuple(unique_name(p) for p in ("in", "out", "dlq"))
    group = unique_name("g")
    ensure_topics(bootstrap, topics, partitions=1)
    produce(bootstrap, topics[0], _events(400) + [b"not json"])
    config = tmp_path / "c.toml"
    write_config(config, bootstrap, topics, group)
    # Every state write due only at the stop: the final states are what SIGTERM wrote.
    config.write_text(config.read_text().replace("interval_seconds = 0.7",
                                                 "interval_seconds = 3600"))
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streamgmm.cli", "run", "--config",
                                 str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _joined(log_path, proc)
        # Mid-stream: some batches are out, more are coming (25 records per batch).
        wait_for(lambda: committed_total(bootstrap, group, topics[0], partitions=1) >= 100,
                 "the first batches committed", 60, [("the daemon", proc)])
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    state = _state(bootstrap, group, topics[0])
    learned = state.learned
    committed = committed_total(bootstrap, group, topics[0], partitions=1)
    # The batch under way when SIGTERM came was finished: what the final state learned is
    # exactly what the group committed, each valid event learned once.
    assert 100 <= committed == learned <= 401, log_path.read_text()[-3000:]
    assert state.events_learned == learned - (learned == 401)
    letters = read_topic(bootstrap, topics[2], idle=0.5)
    assert [m.value() for m in letters] == ([b"not json"] if learned == 401 else [])


def test_next_offsets_per_partition_from_each_runs_last_record():
    """The daemon commits each run's last offset + 1 (:func:`streamgmm.service._partition_runs`
    finds the runs by bisection)."""
    from types import SimpleNamespace

    from streamgmm.io.base import TopicPartition
    from streamgmm.service import _partition_runs

    def _next_offsets(records):
        return {tp: records[end - 1].offset + 1 for tp, _, end in _partition_runs(records)}

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


def test_a_reason_only_dead_letter_refused_with_an_oversized_neighbour_keeps_its_headers():
    """Seen under load on Apache Kafka: the first publish refused the anomaly message of event
    400; its reason-only dead letter then went in one produce request with event 401's
    oversized dead letter, and the broker refused both. The replacement is kept as it was (its
    ``streamgmm.original-size`` was rewritten to 0 before) and only 401 is replaced."""
    from types import SimpleNamespace

    from streamgmm.io.base import KafkaUnavailable, OutgoingRecord, RecordRejected
    from streamgmm.io.quirks import BrokerQuirks
    from streamgmm.service import Daemon, DaemonStats

    big_anomaly, big_invalid = b"a" * 30_000, b"b" * 30_000
    records = [OutgoingRecord("out", big_anomaly, source=("in", 0, 400)),
               OutgoingRecord("dlq", big_invalid, source=("in", 0, 401)),
               OutgoingRecord("out", b"small", source=("in", 0, 402))]
    attempts = []

    class Sink:
        delivery = "at-least-once"

        def send(self, batch):
            attempts.append(list(batch))
            if len(attempts) == 1:
                raise RecordRejected({0: "MSG_SIZE_TOO_LARGE"})
            if len(attempts) == 2:  # one produce request to the dead-letter topic: both refused
                raise RecordRejected({0: "MSG_SIZE_TOO_LARGE", 1: "MSG_SIZE_TOO_LARGE"})

    daemon = object.__new__(Daemon)
    daemon.config = SimpleNamespace(kafka=SimpleNamespace(output_topic="out",
                                                          dead_letter_topic="dlq"))
    daemon._sink, daemon._source, daemon.metrics = Sink(), None, None
    daemon.quirks = BrokerQuirks.named("none")
    daemon.state_topic, daemon.stats = "state", DaemonStats()
    published = daemon._deliver(records, {})
    assert len(attempts) == 3
    sizes = [dict(r.headers).get("streamgmm.original-size") for r in published]
    assert sizes == [b"30000", b"30000", None]
    assert [r.topic for r in published] == ["dlq", "dlq", "out"] and published[2] is records[2]
    assert published[0] is attempts[1][0]  # the replacement was kept, not replaced again

    class Refusing:  # a topic that refuses even reason-only dead letters
        delivery = "at-least-once"

        def send(self, batch):
            raise RecordRejected({0: "MSG_SIZE_TOO_LARGE"})

    daemon._sink = Refusing()
    with pytest.raises(KafkaUnavailable, match="refuses even reason-only"):
        daemon._deliver(records[:1], {})
