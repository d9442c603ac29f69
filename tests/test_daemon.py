"""The daemon's bookkeeping on the in-memory backend: fast, exact, no broker.

Re-learning after a state that lags the committed offsets, skipping what is already published,
a batch lost with the broker, refused records, the broker quirks, and replicas that share a
group: partitions that move, a zombie that wakes up, a broker that fences stale group metadata
or does not. Each run of :class:`streamgmm.service.Daemon` here takes about a second
(:mod:`streamgmm.io.memory`). The integration tests (``test_recovery.py``, ``test_faults.py``,
``test_scale_out.py``) check the same promises against real brokers, ``kill -9`` and ``SIGSTOP``.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import orjson
import pytest
from waiting import wait_for

from streamgmm.config import load_config
from streamgmm.io.base import Backend, Sink, Source, StateReader, TopicPartition
from streamgmm.io.memory import Killed, MemoryBackend, MemoryBroker
from streamgmm.messages import source_of_dead_letter, source_of_output
from streamgmm.partition_state import decode_state
from streamgmm.service import Daemon

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


def config_for(tmp_path, quirks="tansu", delivery="exactly-once", interval=3600.0, replica="a"):
    return load_config(env={
        "STREAMGMM_KAFKA__INPUT_TOPIC": "in", "STREAMGMM_KAFKA__OUTPUT_TOPIC": "out",
        "STREAMGMM_KAFKA__DEAD_LETTER_TOPIC": "dlq", "STREAMGMM_KAFKA__DELIVERY": delivery,
        "STREAMGMM_KAFKA__BROKER_QUIRKS": quirks, "STREAMGMM_KAFKA__REPLICA_ID": replica,
        "STREAMGMM_FEATURES__FIELDS": "x,y", "STREAMGMM_BATCH__MAX_RECORDS": "50",
        "STREAMGMM_BATCH__MAX_WAIT_MS": "0", "STREAMGMM_MODEL__N_COMPONENTS": "1",
        "STREAMGMM_MODEL__RANDOM_STATE": "0", "STREAMGMM_THRESHOLD__WARMUP_EVENTS": "300",
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
    """An ``on_batch`` that crashes after ``batches`` calls (one per partition of a batch)."""
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


def states(broker, fields=("x", "y")) -> dict:
    """The newest state of each input partition in the state topic."""
    newest = {}
    for r in broker.records("streamgmm-state"):
        newest[r.key] = decode_state(r.value, r.key, list(fields))
    return {state.partition: state for state in newest.values()}


def events_learned(broker) -> int:
    return sum(state.events_learned for state in states(broker).values())


def assert_learned_once(broker, values):
    """The state of each partition has learned each of its valid events once, up to its end."""
    found = states(broker)
    assert set(found) == set(broker.partitions("in"))
    for tp, state in found.items():
        mine = [r.value for r in broker.records("in") if r.partition == tp.partition]
        assert state.events_learned == n_valid(mine), tp
        assert state.learned == broker.end(tp)


def test_the_memory_backend_keeps_the_contract(broker, tmp_path):
    backend = MemoryBackend(broker, config_for(tmp_path).kafka)
    assert isinstance(backend.open_source(), Source) and isinstance(backend.open_sink(), Sink)
    assert isinstance(backend.open_state_reader("s"), StateReader)
    assert isinstance(backend, Backend)


def test_a_run_learns_every_event_once_and_publishes_every_dead_letter_once(broker, tmp_path):
    values = make_events()
    fill(broker, values)
    daemon = daemon_on(broker, config_for(tmp_path))
    assert daemon.run(max_events=len(values)) == 0
    assert_each_once(broker, values)
    assert_learned_once(broker, values)
    assert daemon.stats.events == len(values) and daemon.stats.relearned == 0
    assert len(broker.records("out")) == daemon.stats.anomalies > 0
    assert {s.replica for s in states(broker).values()} == {"a"}


def test_after_a_crash_the_events_past_the_state_are_relearned_not_republished(
        broker, tmp_path):
    values = make_events()
    fill(broker, values)
    config = config_for(tmp_path)  # states of the first run: those of its first batches only
    crashed = daemon_on(broker, config, on_batch=crash_after(12))
    with pytest.raises(Crash):
        crashed.run()
    written = sum(s.learned for s in states(broker).values())
    committed = sum(broker.committed("streamgmm", tp) or 0 for tp in broker.partitions("in"))
    assert committed == crashed.stats.events == 6 * 50 > written > 0
    out_before = len(broker.records("out")) + len(broker.records("dlq"))

    daemon = daemon_on(broker, config)
    daemon.run(max_events=len(values) - written)
    assert daemon.stats.relearned == committed - written  # learned again, for the model
    outputs = published_sources(broker)
    assert sum(outputs.values()) == out_before + daemon.stats.published
    assert_each_once(broker, values)
    assert_learned_once(broker, values)


@pytest.mark.parametrize("interval", [3600.0, 0.05], ids=["without-state", "with-state"])
def test_a_transaction_visible_without_its_offsets_is_not_published_twice(broker, tmp_path,
                                                                         interval):
    """Tansu's dead producer: the records are out, the offsets not committed, the process dies.
    The next instance re-reads those events, learns them, and skips what is already out; when
    the transaction carried the partition's state, the state says so and nothing is re-read."""
    values = make_events()
    fill(broker, values)
    config = config_for(tmp_path, interval=interval)
    first = daemon_on(broker, config, on_batch=crash_after(14))
    with pytest.raises(Crash):
        first.run()
    for _ in range(3):  # the next transactions that carry records die half done
        broker.inject("visible-transact")
    daemon = daemon_on(broker, config)
    daemon.run(idle_exit_seconds=0.3)
    if interval > 1:
        assert daemon.stats.skipped_duplicates > 0
    assert daemon.stats.reconnects >= 1
    assert_each_once(broker, values)
    assert_learned_once(broker, values)


def test_a_state_written_while_re_learning_keeps_the_outputs_ahead_of_it_in_sight(broker,
                                                                               tmp_path):
    """The rare duplicate of the test above, made certain: a state written while its replica
    re-learns, after a dead producer left a dead letter of a later event visible, sent the next
    read-back past that dead letter, and the event was dead-lettered twice."""
    values = make_events()
    fill(broker, values)
    later = ("in", 0, 191)  # unscorable: its dead letter is the one left visible
    assert not values[2 * 191].startswith(b'{"i"')  # partition 0 holds the even events
    with pytest.raises(Crash):  # offsets committed to 175, the newest state at 25
        daemon_on(broker, config_for(tmp_path), on_batch=crash_after(14)).run()
    broker.inject("visible-transact", kill=True)  # the batch 175..199 is out, not committed
    with pytest.raises(Killed):
        daemon_on(broker, config_for(tmp_path)).run()
    assert published_sources(broker)[later] == 1
    # re-learning 25..174 (6 batches of both partitions), writing a state with every batch
    crash = crash_after(12)

    def slowly(*args):
        time.sleep(0.02)  # the states are due again at the next batch
        crash(*args)

    with pytest.raises(Crash):
        daemon_on(broker, config_for(tmp_path, interval=0.01), on_batch=slowly).run()
    assert all(s.learned == 175 for s in states(broker).values())
    assert all(c == 175 for c in (broker.committed("streamgmm", tp)
                                  for tp in broker.partitions("in")))
    daemon_on(broker, config_for(tmp_path)).run(idle_exit_seconds=0.3)
    assert_each_once(broker, values)
    assert_learned_once(broker, values)


def test_outputs_of_a_group_that_never_committed_are_read_back_from_its_state(broker,
                                                                              tmp_path):
    """Found by random fault schedules: the first transaction dies visible (its states are
    out, no offset is committed), the next instance's first batch dies visible too (its dead
    letter is out). With no committed offset the next owner took the group for new and read
    nothing back, so that dead letter went out twice; a state says otherwise."""
    values = make_events()
    values[2 * 30] = b"{broken"  # partition 0, offset 30: a dead letter in the second batch
    fill(broker, values)
    for _ in range(2):
        broker.inject("visible-transact", kill=True)
        with pytest.raises(Killed):
            daemon_on(broker, config_for(tmp_path)).run()
    assert all(broker.committed("streamgmm", tp) is None for tp in broker.partitions("in"))
    assert published_sources(broker)[("in", 0, 30)] == 1
    daemon_on(broker, config_for(tmp_path)).run(idle_exit_seconds=0.3)
    assert_each_once(broker, values)
    assert_learned_once(broker, values)


@pytest.mark.parametrize("seed", [9, 22, 70, 1029, 1041, 7, 13, 2024])
def test_random_fault_schedules_publish_each_output_once(broker, tmp_path, seed):
    """One to five instances in turn, each with a random checkpoint interval, up to three
    injected faults (any kind, killing the process or not) and perhaps a crash at a random
    batch; then one that runs to the end. The first five seeds duplicated outputs before the
    read-back of a group that never committed (the test above)."""
    rng = random.Random(seed)
    values = make_events(n=rng.choice([600, 1000, 1500]), seed=seed)
    fill(broker, values)
    for _ in range(rng.randint(1, 5)):
        interval = rng.choice([0.01, 0.05, 0.2, 3600.0])
        for _ in range(rng.randint(0, 3)):
            fault = rng.choice(["visible-transact", "transact", "commit", "poll", "send"])
            broker.inject(fault, kill=rng.random() < 0.4)
        crash_at = rng.choice([None, rng.randint(1, 40)])
        crash = crash_after(crash_at) if crash_at else None
        sleepy = rng.random() < 0.3

        def on_batch(*args, crash=crash, sleepy=sleepy):
            if sleepy:
                time.sleep(0.012)  # states fall due between batches
            if crash is not None:
                crash(*args)

        try:
            daemon_on(broker, config_for(tmp_path, interval=interval),
                      on_batch=on_batch).run(idle_exit_seconds=0.3)
        except (Crash, Killed):
            pass
    broker.clear_faults()
    daemon_on(broker, config_for(tmp_path, interval=rng.choice([0.05, 3600.0]))).run(
        idle_exit_seconds=0.3)
    assert_each_once(broker, values)
    assert_learned_once(broker, values)


def test_a_process_killed_inside_a_visible_transaction_publishes_nothing_twice(broker,
                                                                              tmp_path):
    values = make_events()
    fill(broker, values)
    # An hour between states: the first instance's transaction carries the partitions' first
    # states, the second one's none (a restored state is due an interval later), so the third
    # instance learns the second one's events again and meets its visible outputs. With 0.1 s,
    # under load the second transaction came more than 0.1 s after the assignment and carried
    # a state, and there was nothing to skip.
    config = config_for(tmp_path, interval=3600.0)
    for _ in range(2):  # two instances die inside a transaction whose records stay visible
        broker.inject("visible-transact", kill=True)
        with pytest.raises(Killed):
            daemon_on(broker, config).run()
    assert len(broker.records("dlq")) > 0
    daemon = daemon_on(broker, config_for(tmp_path, interval=0.1))
    daemon.run(idle_exit_seconds=0.3)
    assert daemon.stats.skipped_duplicates > 0
    assert_each_once(broker, values)
    assert_learned_once(broker, values)


def test_a_batch_lost_with_the_broker_is_learned_again_and_published_once(broker, tmp_path):
    values = make_events()
    fill(broker, values)
    broker.inject("transact", times=3)  # three publishing attempts fail
    broker.inject("commit", times=2)
    daemon = daemon_on(broker, config_for(tmp_path))
    daemon.run(idle_exit_seconds=0.3)
    assert daemon.stats.reconnects >= 5
    assert_each_once(broker, values)
    assert_learned_once(broker, values)


def test_every_state_is_consistent_with_the_committed_offsets(broker, tmp_path):
    values = make_events()
    fill(broker, values)
    config = config_for(tmp_path, interval=0.05)
    broker.inject("transact", times=2)
    daemon_on(broker, config, on_batch=lambda *_: time.sleep(0.01)).run(
        idle_exit_seconds=0.3)
    history = [decode_state(r.value, r.key, ["x", "y"]) for r in broker.records("streamgmm-state")]
    assert len(history) > 6
    # a state is written with the offsets of its events: never ahead of the group
    for state in history:
        assert state.learned <= broker.committed("streamgmm", state.partition)
        assert state.written_at > 0 and state.output_positions


def test_a_record_the_broker_refuses_becomes_a_reason_only_dead_letter(broker, tmp_path):
    broker.max_record_bytes = 600_000  # the states pass, the event does not
    values = make_events(400) + [b'{"x": "' + b"p" * 700_000 + b'"}']
    fill(broker, values)
    daemon = daemon_on(broker, config_for(tmp_path))
    daemon.run(max_events=len(values))
    refused = [r for r in broker.records("dlq") if dict(r.headers).get("streamgmm.truncated")]
    assert len(refused) == 1 and refused[0].value == b""
    assert dict(refused[0].headers)["streamgmm.reason"] == b"oversize"
    assert_each_once(broker, values)


def test_a_state_the_broker_refuses_is_counted_and_detection_goes_on(broker, tmp_path):
    broker.max_record_bytes = 4_000  # far below a state record
    values = make_events(600)
    fill(broker, values)
    daemon = daemon_on(broker, config_for(tmp_path))
    daemon.run(max_events=len(values))
    assert broker.records("streamgmm-state") == []
    assert daemon.stats.checkpoint_failures >= 1 and daemon.stats.events == len(values)
    assert_each_once(broker, values)


@pytest.mark.parametrize(("quirks", "delivery", "path"), [
    ("tansu", "exactly-once", "commit"), ("none", "exactly-once", "transact"),
    ("none", "at-least-once", "commit")])
def test_batches_with_nothing_to_publish_commit_by_the_quirks(broker, tmp_path, quirks,
                                                              delivery, path):
    values = [orjson.dumps({"i": i, "x": 0.1 * (i % 7), "y": 1.0}) for i in range(400)]
    fill(broker, values)
    daemon = daemon_on(broker, config_for(tmp_path, quirks=quirks, delivery=delivery))
    daemon.run(max_events=len(values))
    assert broker.records("out") == [] and broker.records("dlq") == []
    assert broker.calls.get(path, 0) >= 4
    # the states of the first batches and of the stop travel otherwise
    states_path = "transact" if delivery == "exactly-once" else "send"
    assert sum(broker.calls.values()) == broker.calls[path] + (
        0 if states_path == path else broker.calls[states_path])
    assert_each_once(broker, values)
    assert_learned_once(broker, values)


# -- replicas ----------------------------------------------------------------------------------

def run_in_thread(daemon, **kwargs) -> threading.Thread:
    thread = threading.Thread(target=daemon.run, kwargs=kwargs, daemon=True)
    thread.start()
    return thread


def test_partitions_that_move_to_a_joining_replica_keep_their_state(tmp_path):
    broker = MemoryBroker()
    broker.create_topic("in", partitions=4)
    values = make_events(4000)
    for i, value in enumerate(values):
        broker.produce("in", value, key=b"%d" % i, partition=i % 4)
    slow = lambda *_: time.sleep(0.005)  # noqa: E731
    a = daemon_on(broker, config_for(tmp_path, replica="a", interval=0.2), on_batch=slow)
    b = daemon_on(broker, config_for(tmp_path, replica="b", interval=0.2), on_batch=slow)
    ta = run_in_thread(a, idle_exit_seconds=1.0)
    wait_for(lambda: a.stats.events >= 1200, "a's first events", 30, interval=0.01)
    tb = run_in_thread(b, idle_exit_seconds=1.0)
    ta.join(30)
    tb.join(30)
    assert a.stats.revoked >= 4 and b.stats.assigned >= 2
    assert b.stats.relearned == 0 and a.stats.events + b.stats.events == len(values)
    assert_each_once(broker, values)
    assert_learned_once(broker, values)
    # the moved partitions were restored, not started again
    moved = [s for s in states(broker).values() if s.replica == "b"]
    assert moved and all(s.detector.n_events_learned > 300 for s in moved)


def test_a_new_partition_starts_from_the_most_experienced_model(tmp_path):
    broker = MemoryBroker()
    broker.create_topic("in", partitions=2)
    values = make_events(1500)
    for value in values:
        broker.produce("in", value, partition=0)
    daemon_on(broker, config_for(tmp_path)).run(max_events=len(values))
    for value in make_events(40, seed=3):
        broker.produce("in", value, partition=1)
    daemon = daemon_on(broker, config_for(tmp_path))
    daemon.run(max_events=40)
    new = states(broker)[TopicPartition("in", 1)]
    assert new.events_learned == n_valid(make_events(40, seed=3))  # its own events only
    assert not new.detector.warming_up  # but a model and threshold that are warm


def test_the_merged_model_scores_every_partition_once_there_are_two(tmp_path):
    broker = MemoryBroker()
    broker.create_topic("in", partitions=2)
    values = make_events(3000)
    fill(broker, values)
    daemon = daemon_on(broker, config_for(tmp_path))
    merged = []
    original = daemon._reference
    daemon._reference = lambda: merged.append(original()) or merged[-1]
    daemon.run(max_events=len(values))
    assert merged[0] is None  # nothing fitted yet
    last = merged[-1]
    assert last is not None and last.n_components_ == sum(
        s.detector.model.n_components_ for s in states(broker).values())
    assert_each_once(broker, values)


def zombie_and_other(tmp_path, fences):
    """A broker with 3000 events on 2 partitions and two replicas of one group, ``z`` and ``o``."""
    broker = MemoryBroker(fences_stale_group_metadata=fences)
    broker.create_topic("in", partitions=2)
    values = make_events(3000)
    fill(broker, values)
    zombie = daemon_on(broker, config_for(tmp_path, replica="z", interval=0.1))
    other = daemon_on(broker, config_for(tmp_path, replica="o", interval=0.1))
    return broker, values, zombie, other


@pytest.mark.parametrize("fences", [True, False], ids=["fencing-broker", "tansu-like"])
def test_a_zombie_that_wakes_up_after_losing_its_partitions_publishes_nothing(tmp_path, fences):
    """A replica stands still past its session timeout right after a poll; the group gives its
    partitions to another replica, which goes on; the zombie wakes up with its stale batch."""
    broker, values, zombie, other = zombie_and_other(tmp_path, fences)
    woke = threading.Event()
    froze = [False]
    original = zombie._process_run

    def freeze_once(task, run):
        if not froze[0] and zombie.stats.events > 900:
            froze[0] = True
            broker.expire(zombie._source)  # the session times out ...
            run_in_thread(other, idle_exit_seconds=1.5)
            # ... the other replica takes over and goes on
            wait_for(lambda: other.stats.events >= 600, "the other replica", 30, interval=0.01)
            if not fences:  # a frozen process: its lease runs out
                zombie._lease._longest_gap = 60.0
            woke.set()
        return original(task, run)

    zombie._process_run = freeze_once
    zombie.run(idle_exit_seconds=1.5)
    assert woke.is_set() and zombie.stats.reconnects >= 1
    wait_for(lambda: other._source is None, "the other replica to stop", 20, interval=0.05)
    assert_each_once(broker, values)
    assert_learned_once(broker, values)


def test_each_replica_reports_its_partitions_rebalances_restores_and_merged_model(tmp_path):
    from streamgmm.metrics import Metrics

    broker = MemoryBroker()
    broker.create_topic("in", partitions=4)
    values = make_events(4000)
    for i, value in enumerate(values):
        broker.produce("in", value, key=b"%d" % i, partition=i % 4)
    slow = lambda *_: time.sleep(0.005)  # noqa: E731
    ma, mb = Metrics(), Metrics()
    a = daemon_on(broker, config_for(tmp_path, replica="a", interval=0.2), metrics=ma,
                  on_batch=slow)
    b = daemon_on(broker, config_for(tmp_path, replica="b", interval=0.2), metrics=mb,
                  on_batch=slow)
    ta = run_in_thread(a, idle_exit_seconds=1.0)
    wait_for(lambda: a.stats.events >= 1500, "a's first events", 30, interval=0.01)
    assert ma.value("streamgmm_partitions_owned") == 4
    tb = run_in_thread(b, idle_exit_seconds=30)
    wait_for(lambda: b.stats.events >= 800, "b's first events", 30, interval=0.01)
    assert ma.value("streamgmm_partitions_owned") + mb.value("streamgmm_partitions_owned") == 4
    assert ma.value("streamgmm_rebalances_total", change="revoked") == 4
    assert mb.value("streamgmm_rebalances_total", change="assigned") >= 1
    assert mb.value("streamgmm_state_restore_duration_seconds_count") >= 1
    assert mb.value("streamgmm_state_restore_bytes_total") > 10_000  # restored, not started anew
    # b scores with the merged model of all four partitions: its own two and a's, as written
    assert mb.value("streamgmm_merged_model_partitions") == 4
    assert 0 <= mb.value("streamgmm_merged_model_age_seconds") < 5
    assert mb.value("streamgmm_state_bytes") > 10_000
    ta.join(30)
    b.request_stop()
    tb.join(30)


def test_a_replica_without_a_partition_waits_in_the_group_without_moving_the_others(tmp_path):
    broker = MemoryBroker()
    broker.create_topic("in", partitions=2)
    values = make_events(3000)
    fill(broker, values)
    slow = lambda *_: time.sleep(0.01)  # noqa: E731
    daemons = [daemon_on(broker, config_for(tmp_path, replica=r, interval=0.2), on_batch=slow)
               for r in "abc"]
    daemons[2].join_seconds = 0.2
    threads = [run_in_thread(d, idle_exit_seconds=2.0) for d in daemons[:2]]
    wait_for(lambda: sum(d.stats.events for d in daemons) >= 500, "the first events", 30,
             interval=0.01)
    threads.append(run_in_thread(daemons[2], idle_exit_seconds=2.0))
    time.sleep(0.3)
    moved = [d.stats.revoked for d in daemons]
    time.sleep(1.5)  # several join timeouts of the idle replica later
    assert [d.stats.revoked for d in daemons] == moved
    assert daemons[2].stats.reconnects == 0 and daemons[2].partitions == set()
    for t in threads:
        t.join(30)
    assert_each_once(broker, values)
    assert_learned_once(broker, values)


@pytest.mark.parametrize("fences", [True, False], ids=["fencing-broker", "tansu-like"])
def test_a_zombie_frozen_inside_its_poll_publishes_nothing_of_the_batch_it_wakes_up_with(
        tmp_path, fences):
    """The process stands still past its session timeout *inside* a poll, after the client had
    fetched records (a fetch response that arrives as the process resumes, before the client
    learns that the group moved on); the poll returns them. The lease saw the freeze: the
    batch must be dropped, not published because a poll has just returned."""
    broker, values, zombie, other = zombie_and_other(tmp_path, fences)
    woke = threading.Event()

    def connect_with_a_freezing_poll():
        source = zombie._source
        original = source.poll

        def poll(max_records, timeout_ms):
            records = original(max_records, timeout_ms)
            if records and not woke.is_set() and zombie.stats.events > 900:
                broker.expire(source)  # frozen: the session times out ...
                run_in_thread(other, idle_exit_seconds=1.5)
                # ... the other replica takes over and goes on
                wait_for(lambda: other.stats.events >= 600, "the other replica", 30,
                         interval=0.01)
                zombie._lease._longest_gap = 60.0  # what the lease's clock thread saw
                woke.set()
            return records

        source.poll = poll

    original_connect = zombie._connect

    def connect():
        original_connect()
        if not woke.is_set():
            connect_with_a_freezing_poll()

    zombie._connect = connect
    zombie.run(idle_exit_seconds=1.5)
    assert woke.is_set()
    wait_for(lambda: other._source is None, "the other replica to stop", 20, interval=0.05)
    assert_each_once(broker, values)
    assert_learned_once(broker, values)
    assert zombie.stats.dropped_batches >= 1


def test_a_replica_told_to_stop_while_it_waits_for_partitions_stops_within_seconds(tmp_path):
    """SIGTERM while the replica joins a group that gives it nothing yet (a rebalance held up by
    a member that died inside it; here another replica holding the only partition): the wait
    for partitions ends at the stop request, not after ``join_seconds`` (the watchdog would end
    the process with exit code 4 first)."""
    broker = MemoryBroker()
    broker.create_topic("in", partitions=1)
    fill_one = [orjson.dumps({"i": i, "x": 0.0, "y": 5.0}) for i in range(100)]
    for value in fill_one:
        broker.produce("in", value, partition=0)
    holder = daemon_on(broker, config_for(tmp_path, replica="h"))
    run_in_thread(holder)
    wait_for(lambda: holder.partitions, "the first replica to take the partition", 10,
             interval=0.01)
    waiting = daemon_on(broker, config_for(tmp_path, replica="w"))
    waiting.join_seconds = 30.0
    threading.Timer(0.5, waiting.request_stop).start()
    started = time.monotonic()
    assert waiting.run() == 0
    assert time.monotonic() - started < 5.0
    assert not waiting.partitions
    holder.request_stop()
    wait_for(lambda: holder._source is None, "the first replica to stop", 10, interval=0.05)


def test_records_the_consumer_hands_out_again_are_neither_learned_nor_published_twice(
        broker, tmp_path):
    """The client goes back on a partition it still owns (no rebalance; seen with confluent-kafka
    on Apache Kafka after a 2.6 s SIGSTOP: offsets from the assignment's start came again): what
    the partition's state has learned already is skipped, not learned and published again."""
    values = make_events(3000)
    fill(broker, values)
    daemon = daemon_on(broker, config_for(tmp_path, interval=0.1))
    went_back = []

    def on_batch(d, run, *_):
        if not went_back and d.stats.events > 1500:
            tp = TopicPartition(run[0].topic, run[0].partition)
            went_back.append(tp)
            d._source.seek(tp, 10)  # the consumer rewinds by itself

    daemon.on_batch = on_batch
    daemon.run(idle_exit_seconds=1.0)
    assert went_back
    assert_each_once(broker, values)
    assert_learned_once(broker, values)
    assert daemon.stats.skipped_duplicates > 0
