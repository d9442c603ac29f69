"""The daemon's bookkeeping on the in-memory backend: fast, exact, no broker.

Re-learning after a checkpoint that lags the committed offsets, skipping what is already
published, a batch left pending by a broker failure, refused records, and the broker quirks:
each run of :class:`streamgmm.service.Daemon` here takes well under a second
(:mod:`streamgmm.io.memory`). The integration tests (``test_recovery.py``, ``test_faults.py``)
check the same promises against real brokers and real ``kill -9``.
"""

from __future__ import annotations

import random
from collections import Counter

import orjson
import pytest

from streamgmm.checkpoint import read_state
from streamgmm.config import load_config
from streamgmm.io.base import Backend, Sink, Source, TopicPartition
from streamgmm.io.memory import Killed, MemoryBackend, MemoryBroker
from streamgmm.messages import source_of_dead_letter, source_of_output
from streamgmm.service import CHECKPOINT_KIND, CHECKPOINT_VERSION, Daemon

N_EVENTS = 1500


class Crash(Exception):
    """Stands for ``kill -9``: the loop ends without its final checkpoint."""


def make_events(n: int = N_EVENTS, seed: int = 1) -> list[bytes]:
    """Normal events, ~2% unscorable and, after the warm-up, ~1% obvious anomalies."""
    rng = random.Random(seed)
    values = []
    for i in range(n):
        u = rng.random()
        if u < 0.02:
            values.append(rng.choice([b"{broken", b'{"x": "high", "y": 1}', b"[]"]))
        elif u < 0.03 and i > 600:
            values.append(orjson.dumps({"i": i, "x": 1e4, "y": -1e4}))
        else:
            values.append(orjson.dumps({"i": i, "x": rng.gauss(0, 1), "y": rng.gauss(5, 2)}))
    return values


def n_valid(values) -> int:
    return sum(1 for v in values if v.startswith(b'{"i"'))


@pytest.fixture
def broker():
    broker = MemoryBroker()
    broker.create_topic("in", partitions=2)
    for topic in ("out", "dlq"):
        broker.create_topic(topic)
    return broker


def config_for(tmp_path, quirks="tansu", delivery="exactly-once", interval=3600.0):
    return load_config(env={
        "STREAMGMM_KAFKA__INPUT_TOPIC": "in", "STREAMGMM_KAFKA__OUTPUT_TOPIC": "out",
        "STREAMGMM_KAFKA__DEAD_LETTER_TOPIC": "dlq", "STREAMGMM_KAFKA__DELIVERY": delivery,
        "STREAMGMM_KAFKA__BROKER_QUIRKS": quirks,
        "STREAMGMM_FEATURES__FIELDS": "x,y", "STREAMGMM_BATCH__MAX_RECORDS": "50",
        "STREAMGMM_BATCH__MAX_WAIT_MS": "0", "STREAMGMM_MODEL__N_COMPONENTS": "1",
        "STREAMGMM_MODEL__RANDOM_STATE": "0", "STREAMGMM_THRESHOLD__WARMUP_EVENTS": "300",
        "STREAMGMM_CHECKPOINT__PATH": str(tmp_path / "ck.npz"),
        "STREAMGMM_CHECKPOINT__INTERVAL_SECONDS": str(interval),
    })


def fill(broker, values, start=0):
    for i, value in enumerate(values):
        broker.produce("in", value, key=b"%d" % (start + i), partition=(start + i) % 2)


def daemon_on(broker, config, **kwargs) -> Daemon:
    daemon = Daemon(config, backend=MemoryBackend(broker, config.kafka), **kwargs)
    daemon.max_backoff = 0.05
    return daemon


def crash_after(batches: int):
    seen = [0]

    def on_batch(*_):
        seen[0] += 1
        if seen[0] >= batches:
            raise Crash

    return on_batch


def published_sources(broker) -> Counter:
    found = Counter(source_of_output(r.value) for r in broker.records("out"))
    found.update(source_of_dead_letter(r.headers) for r in broker.records("dlq"))
    return found


def assert_each_once(broker, values):
    """Every unscorable event has one dead letter, no source is published twice, and the
    committed offsets are at the end of the input."""
    sources = published_sources(broker)
    assert None not in sources
    assert all(n == 1 for n in sources.values()), [s for s, n in sources.items() if n > 1]
    letters = {source_of_dead_letter(r.headers) for r in broker.records("dlq")}
    expected = {(r.topic, r.partition, r.offset) for r in broker.records("in")
                if not r.value.startswith(b'{"i"')}
    assert letters == expected
    for tp in broker.partitions("in"):
        assert broker.committed("streamgmm", tp) == broker.end(tp)


def learned(tmp_path) -> dict:
    _, meta = read_state(tmp_path / "ck.npz", CHECKPOINT_KIND, CHECKPOINT_VERSION)
    return meta


def test_the_memory_backend_keeps_the_contract(broker, tmp_path):
    backend = MemoryBackend(broker, config_for(tmp_path).kafka)
    assert isinstance(backend.open_source(), Source) and isinstance(backend.open_sink(), Sink)
    assert isinstance(backend, Backend)


def test_a_run_learns_every_event_once_and_publishes_every_dead_letter_once(broker, tmp_path):
    values = make_events()
    fill(broker, values)
    daemon = daemon_on(broker, config_for(tmp_path))
    assert daemon.run(max_events=len(values)) == 0
    assert_each_once(broker, values)
    assert learned(tmp_path)["events_learned"] == n_valid(values)
    assert daemon.stats.events == len(values) and daemon.stats.relearned == 0
    assert len(broker.records("out")) == daemon.stats.anomalies > 0


def test_after_a_crash_the_events_past_the_checkpoint_are_relearned_not_republished(
        broker, tmp_path):
    values = make_events()
    fill(broker, values)
    config = config_for(tmp_path)  # the checkpoint of the first run: only the one at start
    with pytest.raises(Crash):
        daemon_on(broker, config, on_batch=crash_after(12)).run()
    assert learned(tmp_path)["events_learned"] == 0
    committed = sum(broker.committed("streamgmm", tp) or 0 for tp in broker.partitions("in"))
    assert committed == 12 * 50
    out_before = len(broker.records("out")) + len(broker.records("dlq"))

    daemon = daemon_on(broker, config)
    daemon.run(max_events=len(values))
    assert daemon.stats.relearned == committed  # learned again, for the model
    outputs = published_sources(broker)
    assert sum(outputs.values()) == out_before + daemon.stats.published
    assert_each_once(broker, values)
    assert learned(tmp_path)["events_learned"] == n_valid(values)


def test_a_transaction_visible_without_its_offsets_is_not_published_twice(broker, tmp_path):
    """Tansu's dead producer: the records are out, the offsets not committed, the process dies.
    The next instance re-reads those events, learns them, and skips what is already out."""
    values = make_events()
    fill(broker, values)
    config = config_for(tmp_path)
    first = daemon_on(broker, config, on_batch=crash_after(14))
    with pytest.raises(Crash):
        first.run()
    for _ in range(3):  # the next transactions that carry records die half done
        broker.inject("visible-transact")
    daemon = daemon_on(broker, config)
    daemon.run(max_events=len(values))
    assert daemon.stats.skipped_duplicates > 0
    assert daemon.stats.reconnects >= 1
    assert_each_once(broker, values)
    assert learned(tmp_path)["events_learned"] == n_valid(values)


def test_a_process_killed_inside_a_visible_transaction_publishes_nothing_twice(broker,
                                                                              tmp_path):
    values = make_events()
    fill(broker, values)
    config = config_for(tmp_path, interval=0.1)
    for _ in range(2):  # two instances die inside a transaction whose records stay visible
        broker.inject("visible-transact", kill=True)
        with pytest.raises(Killed):
            daemon_on(broker, config).run()
    assert len(broker.records("dlq")) > 0
    daemon = daemon_on(broker, config)
    daemon.run(max_events=len(values))
    assert daemon.stats.skipped_duplicates > 0
    assert_each_once(broker, values)
    assert learned(tmp_path)["events_learned"] == n_valid(values)


def test_a_batch_pending_while_the_broker_is_away_is_published_once_on_return(broker, tmp_path):
    values = make_events()
    fill(broker, values)
    broker.inject("transact", times=3)  # three publishing attempts fail
    broker.inject("commit", times=2)
    daemon = daemon_on(broker, config_for(tmp_path))
    daemon.run(max_events=len(values))
    assert daemon.stats.reconnects >= 5
    assert_each_once(broker, values)
    assert learned(tmp_path)["events_learned"] == n_valid(values)


def test_a_checkpoint_is_written_only_when_everything_learned_is_committed(broker, tmp_path):
    values = make_events()
    fill(broker, values)
    config = config_for(tmp_path, interval=0.1)
    broker.inject("transact", times=2)
    daemon = daemon_on(broker, config)
    daemon.run(max_events=len(values))
    meta = learned(tmp_path)
    assert meta["version"] == CHECKPOINT_VERSION and isinstance(meta["written_at"], float)
    offsets = {TopicPartition.from_key(k): o for k, o in meta["learned_offsets"].items()}
    assert offsets == {tp: broker.committed("streamgmm", tp) for tp in offsets}


def test_a_record_the_broker_refuses_becomes_a_reason_only_dead_letter(broker, tmp_path):
    broker.max_record_bytes = 3000
    values = make_events(400) + [b'{"x": "' + b"p" * 2500 + b'"}']
    fill(broker, values)
    daemon = daemon_on(broker, config_for(tmp_path))
    daemon.run(max_events=len(values))
    refused = [r for r in broker.records("dlq") if dict(r.headers).get("streamgmm.truncated")]
    assert len(refused) == 1 and refused[0].value == b""
    assert dict(refused[0].headers)["streamgmm.reason"] == b"oversize"
    assert_each_once(broker, values)


@pytest.mark.parametrize(("quirks", "delivery", "path"), [
    ("tansu", "exactly-once", "commit"), ("none", "exactly-once", "transact"),
    ("none", "at-least-once", "commit")])
def test_batches_with_nothing_to_publish_commit_by_the_quirks(broker, tmp_path, quirks,
                                                              delivery, path):
    values = [orjson.dumps({"i": i, "x": 0.1 * (i % 7), "y": 1.0}) for i in range(200)]
    fill(broker, values)
    daemon = daemon_on(broker, config_for(tmp_path, quirks=quirks, delivery=delivery))
    daemon.run(max_events=len(values))
    assert broker.records("out") == [] and broker.records("dlq") == []
    assert broker.calls.get(path, 0) >= 4
    assert sum(broker.calls.values()) == broker.calls[path]
    assert_each_once(broker, values)


def test_an_old_version_1_checkpoint_without_written_at_is_read(broker, tmp_path):
    from streamgmm.checkpoint import write_state

    values = make_events(500)
    fill(broker, values)
    config = config_for(tmp_path)
    daemon_on(broker, config).run(max_events=len(values))
    arrays, meta = read_state(tmp_path / "ck.npz", CHECKPOINT_KIND, CHECKPOINT_VERSION)
    meta = {k: v for k, v in meta.items() if k not in ("version", "written_at")}
    write_state(tmp_path / "ck.npz", CHECKPOINT_KIND, 1, arrays, meta)
    restored = daemon_on(broker, config)
    assert restored.detector.n_events_learned == n_valid(values)
    write_state(tmp_path / "ck.npz", CHECKPOINT_KIND, 2, arrays, meta)
    with pytest.raises(Exception, match="written_at"):
        daemon_on(broker, config)
