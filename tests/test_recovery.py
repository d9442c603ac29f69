"""``kill -9`` at random points, inside transactions too: nothing lost, nothing published twice.

The daemon runs as a real ``streamgmm run`` process against each broker; the input is produced
and the outputs are read by an independent client (confluent-kafka, ``read_committed``). After
every kill a new daemon, in an empty working directory, restores the partitions' states from the
state topic, re-learns what its predecessor had learned after them without publishing, reads back
the output topics, and carries on. At the end:

* every unscorable event has exactly one dead letter, and nothing else has one;
* every injected (obvious) anomaly has exactly one anomaly message; no source appears twice;
* each partition's state has learned each of its valid events exactly once.
"""

from __future__ import annotations

import collections
import random
import signal
import subprocess
import sys

import orjson
import pytest
from conftest import newest_states, produce, read_topic, unique_name
from waiting import wait_for

from streamgmm.io.kafka import ensure_topics
from streamgmm.messages import source_of_dead_letter, source_of_output

N_EVENTS = 6000
N_KILLS = 3


def make_events(n: int, seed: int = 3) -> tuple[list[bytes], list[str]]:
    """JSON events ``{"i", "x", "y"}``; ~2% unscorable, obvious anomalies in the second half."""
    rng = random.Random(seed)
    values, kinds = [], []
    for i in range(n):
        u = rng.random()
        if u < 0.02:
            values.append(rng.choice([b"{broken", b'{"x": "high", "y": 1}', b'{"x": 1}', b"[]"]))
            kinds.append("invalid")
        elif u < 0.03 and i > n // 2:
            values.append(orjson.dumps({"i": i, "x": rng.choice([-1, 1]) * 1e4, "y": 1e4}))
            kinds.append("anomaly")
        else:
            values.append(orjson.dumps({"i": i, "x": rng.gauss(0, 1), "y": rng.gauss(5, 2)}))
            kinds.append("normal")
    return values, kinds


def write_config(path, bootstrap, topics, group, delivery="exactly-once",
                 backend="kafka-python", quirks="tansu", interval=0.7, max_records=25) -> None:
    inp, out, dlq = topics
    path.write_text(f"""
[kafka]
bootstrap_servers = ["{bootstrap}"]
input_topic = "{inp}"
output_topic = "{out}"
dead_letter_topic = "{dlq}"
group_id = "{group}"
delivery = "{delivery}"
backend = "{backend}"
broker_quirks = "{quirks}"
[batch]
max_records = {max_records}
max_wait_ms = 100
[features]
fields = ["x", "y"]
[model]
n_components = 2
random_state = 0
[threshold]
warmup_events = 300
[metrics]
enabled = false
[checkpoint]
interval_seconds = {interval}
""")


def start_daemon(config, log, workdir) -> subprocess.Popen:
    """``streamgmm run`` in ``workdir``, made empty first: a replica needs no disk."""
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    return subprocess.Popen(
        [sys.executable, "-m", "streamgmm.cli", "run", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, cwd=workdir)


def wait_until_recovered(log_path, proc) -> None:
    """The daemon says when it has joined the group and restored its partitions."""
    seen = log_path.read_bytes().count(b"joined group")
    wait_for(lambda: log_path.read_bytes().count(b"joined group") > seen,
             "the daemon to recover", 120, [("the daemon", proc)])


def committed_total(bootstrap: str, group: str, topic: str, partitions: int = 2) -> int:
    """Sum of the group's committed offsets on ``topic`` (asked without joining the group)."""
    import confluent_kafka

    consumer = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                         "enable.auto.commit": False})
    try:
        committed = consumer.committed(
            [confluent_kafka.TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        consumer.close()
    return sum(tp.offset for tp in committed if tp.offset >= 0)


def learned_total(bootstrap, group) -> int:
    """Sum of the input offsets the partitions' newest states have learned up to."""
    return sum(s.learned for s in newest_states(bootstrap, f"{group}-state", ["x", "y"]).values())


def run_with_kills(tmp_path, bootstrap, delivery: str, seed: int, backend: str, quirks: str):
    rng = random.Random(seed)
    topics = tuple(unique_name(p) for p in ("in", "out", "dlq"))
    group = unique_name("group")
    ensure_topics(bootstrap, topics, partitions=2)
    values, kinds = make_events(N_EVENTS, seed)
    produce(bootstrap, topics[0], values, keys=[str(i % 11).encode() for i in range(N_EVENTS)])
    config = tmp_path / "streamgmm.toml"
    write_config(config, bootstrap, topics, group, delivery, backend, quirks)
    log_path = tmp_path / "daemon.log"
    workdir = tmp_path / "replica"
    with open(log_path, "ab") as log:
        for _ in range(N_KILLS):
            proc = start_daemon(config, log, workdir)
            wait_until_recovered(log_path, proc)
            try:
                proc.wait(timeout=rng.uniform(0.2, 1.5))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
        proc = start_daemon(config, log, workdir)
        try:
            wait_until_recovered(log_path, proc)
            wait_for(lambda: committed_total(bootstrap, group, topics[0]) >= N_EVENTS,
                     "every event committed", 120, [("the daemon", proc)])
            # Committed is not learned: after a kill the new daemon re-learns what its
            # predecessor published after the partitions' last states.
            wait_for(lambda: learned_total(bootstrap, group) >= N_EVENTS,
                     "every event learned", 60, [("the daemon", proc)])
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0, "SIGTERM must exit 0 within seconds"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return topics, group, values, kinds, log_path


def partition_offsets(bootstrap, topic, n):
    """(partition, offset) of each produced event, read back in order by the reference client."""
    messages = read_topic(bootstrap, topic, expect=n)
    index = {}
    for m in messages:
        # the key is i % 11 but not unique; match by value and order per partition instead
        index.setdefault(m.value(), collections.deque()).append((m.partition(), m.offset()))
    return messages, index


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["kafka-python", "confluent-kafka"])
@pytest.mark.parametrize("delivery", ["exactly-once", "at-least-once"])
def test_kill_minus_9_loses_nothing_and_duplicates_nothing(tmp_path, kafka_broker, delivery,
                                                           backend):
    """On Apache Kafka without the Tansu workarounds (``broker_quirks = "none"``: the read-back
    stops at the end offsets, record-less batches commit in a transaction); on Tansu with them."""
    bootstrap = kafka_broker.bootstrap_servers
    quirks = "none" if kafka_broker.kind == "apache" else "tansu"
    seed = (11 if delivery == "exactly-once" else 12) + (backend == "confluent-kafka")
    topics, group, values, kinds, log_path = run_with_kills(
        tmp_path, bootstrap, delivery, seed, backend, quirks)
    inputs = read_topic(bootstrap, topics[0], expect=N_EVENTS)
    assert len(inputs) == N_EVENTS
    kind_of = {}
    for m in inputs:
        if m.value() in (b"{broken", b'{"x": "high", "y": 1}', b'{"x": 1}', b"[]"):
            kind_of[(topics[0], m.partition(), m.offset())] = "invalid"
        else:
            event = orjson.loads(m.value())
            kind_of[(topics[0], m.partition(), m.offset())] = kinds[event["i"]]

    outputs = read_topic(bootstrap, topics[1], idle=3.0)
    letters = read_topic(bootstrap, topics[2], idle=3.0)
    out_sources = [source_of_output(m.value()) for m in outputs]
    dlq_sources = [source_of_dead_letter(m.headers()) for m in letters]
    log = log_path.read_text(errors="replace")[-4000:]
    duplicated = [s for s, c in collections.Counter(out_sources + dlq_sources).items() if c > 1]
    assert not duplicated, f"published twice: {duplicated[:5]}\n{log}"
    invalid = {s for s, k in kind_of.items() if k == "invalid"}
    anomalies = {s for s, k in kind_of.items() if k == "anomaly"}
    assert set(dlq_sources) == invalid, log
    assert anomalies <= set(out_sources), f"lost anomalies {sorted(anomalies - set(out_sources))}"
    assert len(out_sources) < len(anomalies) + 0.01 * N_EVENTS  # false alarms stay rare
    states = newest_states(bootstrap, f"{group}-state", ["x", "y"])
    assert set(states) == {(topics[0], 0), (topics[0], 1)}
    for tp, state in states.items():
        mine = [k for (_, p, _), k in kind_of.items() if p == tp.partition]
        assert state.events_learned == sum(1 for k in mine if k != "invalid"), log
        assert state.learned == len(mine)
