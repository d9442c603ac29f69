"""Fault injection: the daemon never stalls or dies on one message, a bad state or a broker restart.

Every test runs real ``streamgmm run`` processes against a real broker (the ``bootstrap`` fixture,
or a broker of its own when the test restarts it) and reads the outputs with an independent
client (confluent-kafka, ``read_committed``). Each is bounded in time: waits have deadlines and a
daemon still running at the end is killed.

The rule under test: a fault tied to one message is that message's problem (it is dead-lettered
with a reason and the rest of its batch goes on; a state record that cannot be read is skipped);
a fault of the environment is retried, reported truthfully and loses nothing; nothing hangs. Every
daemon runs in an empty working directory of its own: a replica needs no disk, its partitions'
states live in the state topic (read back with :func:`conftest.newest_states`).
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import time
import tomllib

import orjson
import pytest
import tomli_w
from conftest import newest_states, produce, read_topic, start_broker, unique_name
from test_recovery import committed_total, write_config
from waiting import wait_for

from streamgmm.io.kafka import ensure_topics
from streamgmm.messages import source_of_dead_letter, source_of_output

BACKENDS = ["confluent-kafka", "kafka-python"]
BROKERS = ["tansu", "apache"]  # for tests that freeze, kill and restart a broker of their own


def own_tracebacks(log: str) -> list[str]:
    """Tracebacks in a daemon's log that pass through streamgmm's code (kafka-python logs some
    of its own connection races with a traceback, e.g. a socket closed under a read)."""
    chunks = log.split("Traceback (most recent call last):")[1:]
    return [c for c in chunks if "/streamgmm/" in c.split("\n20", 1)[0]]


def own_broker(kind: str, workdir):
    """A broker of ``kind`` for one test, its files in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    return start_broker(kind, workdir)


def restart_empty(broker, kind: str, workdir):
    """Kill ``broker`` and bring it back on the same port without its data (as Tansu always
    comes back; Apache Kafka with its log directory wiped)."""
    if kind == "tansu":
        broker.kill()
        workdir.mkdir(parents=True, exist_ok=True)
        return start_broker(kind, workdir, port=broker.port)
    return broker.restart(empty=True, hard=True)


def discard(broker) -> None:
    """Kill a test's own broker and remove what it kept."""
    getattr(broker, "cleanup", broker.kill)()
#: Each backend's default producer limit on one message.
PRODUCER_LIMIT = {"confluent-kafka": 1_000_000, "kafka-python": 1_048_576}


def normal_events(n: int, seed: int = 0, start: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [orjson.dumps({"i": start + i, "x": rng.gauss(0, 1), "y": rng.gauss(0, 1)})
            for i in range(n)]


def configure(path, bootstrap, topics, group, backend, **sections) -> None:
    """``write_config``'s daemon configuration with some keys replaced (``features={...}``)."""
    write_config(path, bootstrap, topics, group, backend=backend)
    config = tomllib.loads(path.read_text())
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(tomli_w.dumps(config))


def create_input_topic(bootstrap: str, topic: str, partitions: int,
                       max_bytes: int = 10_000_000) -> None:
    """A topic that takes records of up to ``max_bytes`` (outputs keep the broker's default)."""
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1,
                                      topic_configs={"max.message.bytes": str(max_bytes)})])
    finally:
        admin.close()


class Daemon:
    """A ``streamgmm run`` process with its log, on fresh topics of ``bootstrap``."""

    def __init__(self, tmp_path, bootstrap, backend, partitions=1, output_limit=None,
                 **sections):
        self.bootstrap = bootstrap
        self.topics = tuple(unique_name(p) for p in ("in", "out", "dlq"))
        self.group = unique_name("group")
        if output_limit is None:
            ensure_topics(bootstrap, self.topics[1:], partitions=partitions)
        else:
            for topic in self.topics[1:]:
                create_input_topic(bootstrap, topic, partitions, output_limit)
        create_input_topic(bootstrap, self.topics[0], partitions)
        self.state_topic = f"{self.group}-state"
        self.fields = ["x", "y"]
        self.config = tmp_path / "streamgmm.toml"
        configure(self.config, bootstrap, self.topics, self.group, backend, **sections)
        self.log_path = tmp_path / "daemon.log"
        self.log_path.touch()
        self.workdir = tmp_path / "replica"  # the working directory: empty, nothing uses it
        self.workdir.mkdir()
        self.proc: subprocess.Popen | None = None

    def start(self, *args: str, wait: bool = True, cwd=None, env=None) -> subprocess.Popen:
        """``streamgmm run``; with ``wait``, until it says it joined its group (its partitions'
        states restored)."""
        import os

        joined = self.log_path.read_bytes().count(b"joined group")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamgmm.cli", "run", "--config", str(self.config),
                 *args], stdout=log, stderr=subprocess.STDOUT, cwd=cwd or self.workdir,
                env={**os.environ, **(env or {})})
        if wait:
            wait_for(lambda: self.log_path.read_bytes().count(b"joined group") > joined,
                     "the daemon to join its group", 120, [("the daemon", self.proc)])
        return self.proc

    def log(self, since: int = 0) -> str:
        """The log (from character ``since`` on)."""
        return self.log_path.read_text(errors="replace")[since:]

    def states(self) -> dict:
        """The newest state of each input partition in the state topic."""
        return newest_states(self.bootstrap, self.state_topic, self.fields)

    def wait_committed(self, n: int, timeout: float = 90) -> None:
        wait_for(lambda: committed_total(self.bootstrap, self.group, self.topics[0]) >= n,
                 f"{n} input events committed", timeout, [("the daemon", self.proc)])

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)  # the watchdog ends it within stop_seconds (20 s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            dumps = self.log().count("most recent call first")
            self.proc.send_signal(signal.SIGUSR1)  # its threads' stacks into its log
            try:
                wait_for(lambda: self.log().count("most recent call first") > dumps,
                         "the daemon's thread stacks", 2.0, interval=0.05)
            except AssertionError:
                pass  # a daemon too stuck to write them is killed all the same
            self.proc.kill()
            self.proc.wait()

    def outputs(self, **kw) -> list:
        return read_topic(self.bootstrap, self.topics[1], **kw)

    def dead_letters(self, **kw) -> list:
        return read_topic(self.bootstrap, self.topics[2], **kw)


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.kill()


def strict_json(value: bytes):
    """Parse as strictly as a careful consumer would: UTF-8, no NaN, no lone surrogates."""
    text = value.decode("utf-8")  # strict: a lone surrogate encoded in UTF-8 is refused here
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    orjson.loads(value)  # orjson refuses escaped lone surrogates too
    return doc


# -- case 2: any input gives valid JSON output, the daemon never crashes on one message --------

HOSTILE = {
    "lone_surrogate": b'{"x": 10000, "y": 10000, "note": "bad \\ud800 here"}',
    "deep_nesting": b'{"x": 10000, "y": -10000, "meta": ' + b"[" * 500 + b"]" * 500 + b"}",
    "huge_integer": b'{"x": -10000, "y": 10000, "id": ' + b"9" * 400 + b"}",
    "nan_elsewhere": b'{"x": -10000, "y": -10000, "ratio": NaN, "limit": Infinity}',
}
# valid JSON and a finite number, but its square overflows a float: learned, it left the
# covariances infinite (nothing flagged again) or made every later batch raise LinAlgError
TOO_LARGE = b'{"x": 1e200, "y": 10000}'


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_anomalies_are_published_as_valid_json_and_the_daemon_goes_on(
        tmp_path, bootstrap, backend, daemons):
    daemon = Daemon(tmp_path, bootstrap, backend)
    daemons.append(daemon)
    values = normal_events(400) + list(HOSTILE.values()) + [TOO_LARGE] + normal_events(
        100, seed=1, start=400) + [TOO_LARGE] + normal_events(100, seed=3, start=500) + [
        b'{"x": 10000, "y": -10000}']
    produce(bootstrap, daemon.topics[0], values)
    daemon.start()
    daemon.wait_committed(len(values))
    outputs = daemon.outputs()
    letters = daemon.dead_letters(idle=2.0)
    assert daemon.stop() == 0, daemon.log()[-3000:]
    too_large = {400 + len(HOSTILE), 501 + len(HOSTILE)}
    reasons = {source_of_dead_letter(m.headers())[2]: dict(m.headers())["streamgmm.reason"]
               for m in letters}
    assert {reasons.get(offset) for offset in too_large} == {b"non_finite"}, reasons
    assert len(values) - 1 in {source_of_output(m.value())[2] for m in outputs}, \
        "the model still flags after the values too large to learn"
    hostile_offsets = set(range(400, 400 + len(HOSTILE)))
    published = {source_of_output(m.value())[2]: m for m in outputs}
    dead = {source_of_dead_letter(m.headers())[2] for m in letters}
    for name, offset in zip(HOSTILE, sorted(hostile_offsets), strict=True):
        assert offset in published or offset in dead, f"{name}: neither published nor dead-lettered"
    for m in outputs:
        doc = strict_json(m.value())
        assert doc["score"] > doc["threshold"]
    assert hostile_offsets <= set(published), "hostile but valid anomalies are still anomalies"
    assert not own_tracebacks(daemon.log())


# -- case 1: an oversized event or message is that message's problem ------------------------


def produce_large(bootstrap: str, topic: str, values) -> None:
    """Produce records of up to 10 MB (the input topic accepts them: see ``Daemon``)."""
    import confluent_kafka

    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "acks": "all",
                                         "message.max.bytes": 10_000_000})
    errors = []
    for value in values:
        producer.produce(topic, value=value, on_delivery=lambda e, _m: e and errors.append(e))
        producer.poll(0)
    assert producer.flush(30) == 0 and not errors, errors


def dead_letter_headers_of(message) -> dict[str, bytes]:
    return dict(message.headers() or ())


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_oversized_events_are_dead_lettered_truncated_and_the_batch_goes_on(
        tmp_path, bootstrap, backend, daemons):
    daemon = Daemon(tmp_path, bootstrap, backend, batch={"max_records": 500})
    daemons.append(daemon)
    padding = "p" * 1_010_000  # a valid event above the producer's default message size
    big_valid = orjson.dumps({"x": 10000, "y": 10000, "pad": padding})
    huge = orjson.dumps({"x": 0.1, "y": 0.2, "pad": "q" * 5_000_000})
    over_default = orjson.dumps({"x": 0.1, "y": 0.2, "pad": "r" * 1_050_000})
    values = normal_events(400) + [big_valid, huge, over_default] + normal_events(
        100, seed=2, start=400)
    produce(bootstrap, daemon.topics[0], values[:400])
    daemon.start()
    produce_large(bootstrap, daemon.topics[0], values[400:])
    daemon.wait_committed(len(values), timeout=60)
    letters = daemon.dead_letters(expect=3, idle=1.0)
    outputs = daemon.outputs(idle=1.0)
    assert daemon.stop() == 0, daemon.log()[-3000:]
    by_offset = {source_of_dead_letter(m.headers())[2]: m for m in letters}
    by_offset.update({source_of_output(m.value())[2]: m for m in outputs})
    for offset, original in ((400, big_valid), (401, huge), (402, over_default)):
        assert offset in by_offset, f"offset {offset}: no output nor dead letter\n{daemon.log()}"
        message = by_offset[offset]
        assert len(message.value()) < PRODUCER_LIMIT[backend]
        headers = dead_letter_headers_of(message)
        if message.topic() == daemon.topics[2]:
            assert headers["streamgmm.reason"] == b"oversize"
            if message.value() == original:  # it fits this backend's producer as it is
                continue
            assert int(headers["streamgmm.original-size"]) == len(original)
            assert headers["streamgmm.original-sha256"] == hashlib.sha256(
                original).hexdigest().encode()
            assert original.startswith(message.value())  # truncated, not rewritten
    assert not own_tracebacks(daemon.log())


def broker_enforces_topic_limits(bootstrap: str, topic: str) -> bool:
    """Whether the broker refuses a record above ``topic``'s max.message.bytes (Kafka does;
    Tansu 0.6 takes anything)."""
    import confluent_kafka

    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap,
                                         "message.max.bytes": 10_000_000})
    errors = []
    producer.produce(topic, b"z" * 50_000, on_delivery=lambda e, _m: errors.append(e))
    producer.flush(30)
    return errors[0] is not None


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_record_the_broker_refuses_becomes_a_reason_only_dead_letter(
        tmp_path, bootstrap, backend, daemons):
    daemon = Daemon(tmp_path, bootstrap, backend, output_limit=20_000)
    daemons.append(daemon)
    probe_topic = unique_name("limited")
    create_input_topic(bootstrap, probe_topic, 1, 20_000)
    if not broker_enforces_topic_limits(bootstrap, probe_topic):
        pytest.skip("this broker does not enforce a topic's max.message.bytes")
    big_anomaly = orjson.dumps({"x": 10000, "y": 10000, "pad": "a" * 30_000})
    big_invalid = orjson.dumps({"x": "high", "y": 1, "pad": "b" * 30_000})
    values = normal_events(400) + [big_anomaly, big_invalid] + normal_events(50, 3, 400)
    produce_large(bootstrap, daemon.topics[0], values)
    daemon.start()
    daemon.wait_committed(len(values))
    letters = daemon.dead_letters(expect=2, idle=1.0)
    assert daemon.stop() == 0
    by_offset = {source_of_dead_letter(m.headers())[2]: m for m in letters}
    for offset, original in ((400, big_anomaly), (401, big_invalid)):
        headers = dead_letter_headers_of(by_offset[offset])
        assert by_offset[offset].value() in (b"", None)
        assert b"refused" in headers["__connect.errors.exception.message"]
        assert int(headers["streamgmm.original-size"]) >= len(original)


def test_an_event_limit_above_the_producer_limit_is_refused_at_start_naming_the_setting(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[features]\nfields = ["x"]\nmax_event_bytes = 1048576\n')
    proc = subprocess.run([sys.executable, "-m", "streamgmm.cli", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "features.max_event_bytes" in proc.stderr
    assert 'kafka.librdkafka."message.max.bytes" = 1000000' in proc.stderr
    assert "at most 934464" in proc.stderr


# -- case 6: a state record that cannot be read is skipped; states of other features exit 3 ----


class StateTopicRun(Daemon):
    """A daemon on two partitions that has written real states, and what was produced so far."""

    def produce(self, values) -> None:
        produce(self.bootstrap, self.topics[0], values,
                keys=[b"%d" % (len(self.produced) + i) for i in range(len(values))])
        self.produced += values

    def states(self) -> dict:
        """The newest state of each input partition (records under other keys, which the tests
        write, are left out; the newest record of each partition must be readable)."""
        from streamgmm.partition_state import decode_state

        keys = {f"{self.topics[0]}:{p}".encode() for p in (0, 1)}
        newest = {m.key(): m.value() for m in read_topic(self.bootstrap, self.state_topic,
                                                         idle=2.0) if m.key() in keys}
        states = (decode_state(value, key, self.fields) for key, value in newest.items())
        return {state.partition: state for state in states}

    def invalid(self) -> list[bytes]:
        return [v for v in self.produced if not v.startswith(b'{"i"')]

    def check_each_once(self, log: str) -> None:
        """Every dead letter once, no output twice, every event learned once by its partition's
        newest state, all of it committed."""
        letters = self.dead_letters(idle=2.0)
        sources = [source_of_dead_letter(m.headers()) for m in letters]
        sources += [source_of_output(m.value()) for m in self.outputs(idle=2.0)]
        assert len(sources) == len(set(sources)), f"published twice\n{log[-3000:]}"
        assert sorted(m.value() for m in letters) == sorted(self.invalid()), log[-3000:]
        states = self.states()
        assert set(states) == {(self.topics[0], 0), (self.topics[0], 1)}
        assert sum(s.learned for s in states.values()) == len(self.produced), log[-3000:]
        assert sum(s.events_learned for s in states.values()) == \
            len(self.produced) - len(self.invalid()), log[-3000:]


@pytest.fixture(scope="module")
def good_states(tmp_path_factory, bootstrap):
    """A daemon's real states in its state topic (and its configuration), to break in many ways."""
    tmp_path = tmp_path_factory.mktemp("good-states")
    daemon = StateTopicRun(tmp_path, bootstrap, "confluent-kafka", partitions=2)
    daemon.produced = []
    daemon.produce(normal_events(400) + [b"not json"])
    try:
        daemon.start()
        daemon.wait_committed(401)
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    daemon.check_each_once(daemon.log())
    return daemon


def _edit_meta(key, value):
    def edit(arrays, meta):
        if value is _DELETE:
            del meta[key]
        else:
            meta[key] = value(meta) if callable(value) else value
    return edit


def _edit_array(name, change):
    def edit(arrays, meta):
        arrays[name] = change(arrays[name])
    return edit


_DELETE = object()
#: Edits of a state's content that keep its digest valid, and what the warning says.
MALFORMED = {
    "no learned offset": (_edit_meta("learned", _DELETE), "learned is None, not a count"),
    "offset not an integer": (_edit_meta("learned", "12x"), "learned is '12x', not a count"),
    "negative offset": (_edit_meta("learned", -5), "learned is -5, not a count"),
    "bad partition name in the output positions": (
        _edit_meta("output_positions", {"no-partition": 3}), "output_positions is malformed"),
    "the state of another partition": (
        _edit_meta("partition", "elsewhere:9"), "holds the state of 'elsewhere:9'"),
    "wrong array shape": (
        _edit_array("detector/model/means", lambda a: a.reshape(-1)[:3].copy()),
        "inconsistent"),
    "NaN model": (
        _edit_array("detector/model/scatter", lambda a: a * float("nan")), "NaN or infinity"),
    "no detector": (_edit_meta("detector", _DELETE), "holds no detector state"),
}
#: Records that are not a state at all, as ``(key, value) -> (key, value)``, and the warning.
NOT_A_STATE = {
    "garbage bytes": (lambda k, v: (k, b"garbage, not a state"), "not a compressed state"),
    "a broken digest": (lambda k, v: (k, _with_header(v, sha256="0" * 64)), "checksum mismatch"),
    "a newer format": (lambda k, v: (k, _with_header(v, version=99)), "written by a newer"),
    "a key that names no partition": (lambda k, v: (b"no-partition", v),
                                      'not "topic:partition"'),
    "a zlib bomb": (lambda k, v: (k, __import__("zlib").compress(b"\0" * (65 << 20), 9)),
                    "bytes uncompressed"),
}


def _with_header(value: bytes, **changes) -> bytes:
    """A state record whose file header says something else (its body unchanged)."""
    import io
    import zlib

    import numpy as np

    from streamgmm.statefile import _META_KEY

    with np.load(io.BytesIO(zlib.decompress(value)), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    doc = json.loads(arrays[_META_KEY].tobytes())
    doc["header"].update(changes)
    arrays[_META_KEY] = np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return zlib.compress(buf.getvalue())


def _broken(key: bytes, value: bytes, case: str) -> tuple[bytes, bytes]:
    import zlib

    from streamgmm.partition_state import STATE_KIND, STATE_VERSION
    from streamgmm.statefile import dumps_state, loads_state

    if case in NOT_A_STATE:
        return NOT_A_STATE[case][0](key, value)
    arrays, meta = loads_state(zlib.decompress(value), STATE_KIND, STATE_VERSION)
    meta.pop("version")
    MALFORMED[case][0](arrays, meta)
    return key, zlib.compress(dumps_state(STATE_KIND, STATE_VERSION, arrays, meta))


@pytest.mark.integration
@pytest.mark.xdist_group("good_states")  # one worker makes the module's states once
@pytest.mark.parametrize("case", list(MALFORMED) + list(NOT_A_STATE))
def test_a_state_record_that_cannot_be_read_is_skipped_and_nothing_is_published_twice(
        good_states, case):
    """The newest state of partition 0, broken (a valid digest over bad content, or not a state
    at all), is written into the state topic. The daemon logs it, restores the partition from
    its last readable state, goes on, and publishes nothing twice."""
    daemon = good_states
    key = f"{daemon.topics[0]}:0".encode()
    newest = [m.value() for m in read_topic(daemon.bootstrap, daemon.state_topic, idle=2.0)
              if m.key() == key][-1]
    bad_key, bad_value = _broken(key, newest, case)
    produce(daemon.bootstrap, daemon.state_topic, [bad_value], keys=[bad_key])
    daemon.produce(normal_events(40, seed=len(daemon.produced)) + [f"bad {case}".encode()])
    since = len(daemon.log())
    try:
        daemon.start()
        daemon.wait_committed(len(daemon.produced))
        assert daemon.stop() == 0, daemon.log(since)[-3000:]
    finally:
        daemon.kill()
    log = daemon.log(since)
    expected = (MALFORMED.get(case) or NOT_A_STATE[case])[1]
    assert "ignoring a state record" in log and expected in log, log[-3000:]
    assert not own_tracebacks(log), log[-3000:]
    assert f"{daemon.topics[0]}:0: restored the state" in log, log[-3000:]
    daemon.check_each_once(log)


@pytest.mark.integration
@pytest.mark.xdist_group("good_states")
def test_a_state_topic_made_for_other_features_exits_3_saying_what_to_do(good_states, tmp_path):
    daemon = good_states
    committed = committed_total(daemon.bootstrap, daemon.group, daemon.topics[0])
    config = tmp_path / "other-features.toml"
    configure(config, daemon.bootstrap, daemon.topics, daemon.group, "confluent-kafka",
              features={"fields": ["x", "z"]})
    proc = subprocess.run([sys.executable, "-m", "streamgmm.cli", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "made for features ['x', 'y'] but the configuration has ['x', 'z']" in proc.stderr
    assert "use another group_id, or delete the state topic" in proc.stderr
    # It refused before it joined the group: nothing consumed, committed or written.
    assert "joined group" not in proc.stderr
    assert committed_total(daemon.bootstrap, daemon.group, daemon.topics[0]) == committed
    assert set(daemon.states()) == {(daemon.topics[0], 0), (daemon.topics[0], 1)}


# -- case 4: a replica needs no disk: a read-only or full working directory changes nothing ------


def metric(port: int, name: str) -> float | None:
    """The value of an unlabelled sample on the daemon's /metrics endpoint."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


@pytest.fixture
def unwritable_dir(tmp_path, request):
    """A working directory the daemon cannot write: a tmpfs remounted read-only, or one filled
    to the last byte (needs root); without root, a read-only directory by its permissions."""
    import os

    fault = request.param
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        if fault == "full" or os.geteuid() == 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
        path.chmod(0o555)
        yield path, fault
        path.chmod(0o755)
        return
    try:
        if fault == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        else:
            with open(path / "filler", "wb") as fh:
                try:
                    fh.write(b"\0" * 1_000_000)
                except OSError:
                    pass
            with pytest.raises(OSError):
                (path / "probe").write_bytes(b"x" * 8192)
        yield path, fault
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _listing(path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*")}


@pytest.mark.integration
@pytest.mark.parametrize("unwritable_dir", ["read-only", "full"], indirect=True)
def test_a_replica_needs_no_disk(tmp_path, bootstrap, unwritable_dir, daemons):
    """Run in a working directory (and HOME, TMPDIR) it cannot write, the daemon detects,
    publishes, writes its states to the state topic and stops cleanly; a restart there
    restores them and goes on."""
    from streamgmm.embedded import free_port

    workdir, _fault = unwritable_dir
    before = _listing(workdir)
    port = free_port()
    daemon = Daemon(tmp_path, bootstrap, "confluent-kafka", partitions=2,
                    metrics={"enabled": True, "host": "127.0.0.1", "port": port},
                    checkpoint={"interval_seconds": 0.3})
    daemons.append(daemon)
    nowhere = {"HOME": str(workdir), "TMPDIR": str(workdir)}
    produce(bootstrap, daemon.topics[0], normal_events(400) + [b"bad 1"],
            keys=[b"%d" % i for i in range(401)])
    daemon.start(cwd=workdir, env=nowhere)
    daemon.wait_committed(401)
    wait_for(lambda: sum(s.learned for s in daemon.states().values()) == 401,
             "the states of every event", 30, [("the daemon", daemon.proc)])
    assert metric(port, "streamgmm_checkpoint_failures_total") == 0
    assert metric(port, "streamgmm_checkpoint_age_seconds") < 30
    assert daemon.stop() == 0
    log = daemon.log()
    assert "Traceback" not in log and "no longer used" not in log, log[-3000:]

    daemon.start(cwd=workdir, env=nowhere)
    produce(bootstrap, daemon.topics[0], [b"bad 2"] + normal_events(50, seed=2, start=400),
            keys=[b"%d" % i for i in range(51)])
    daemon.wait_committed(452)
    assert daemon.stop() == 0
    assert sorted(m.value() for m in daemon.dead_letters(expect=2)) == [b"bad 1", b"bad 2"]
    states = daemon.states()
    assert sum(s.learned for s in states.values()) == 452
    assert sum(s.events_learned for s in states.values()) == 450, "restored, not started over"
    assert _listing(workdir) == before, "the daemon wrote into its working directory"
    assert "Traceback" not in daemon.log()


# -- case 3: a broker that restarts empty inside a transaction does not hang the daemon -------


def mixed_events(n: int, seed: int = 0) -> list[bytes]:
    """Normal events with an unscorable one in every five: every batch publishes something."""
    values = normal_events(n, seed)
    return [b"bad %d" % i if i % 5 == 4 else v for i, v in enumerate(values)]


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", BROKERS)
def test_a_broker_restarting_empty_inside_a_transaction_does_not_hang_the_daemon(
        tmp_path, kind, backend, daemons):
    broker = own_broker(kind, tmp_path / "broker")
    try:
        daemon = Daemon(tmp_path, broker.bootstrap_servers, backend,
                        batch={"max_records": 10, "max_wait_ms": 20})
        daemons.append(daemon)
        produce(broker.bootstrap_servers, daemon.topics[0], mixed_events(20000))
        daemon.start("--create-topics")
        wait_for(lambda: len(daemon.dead_letters(idle=0.2, timeout=2)) >= 50,
                 "transactions under way", 60, [("the daemon", daemon.proc)])
        # inside a transaction: nearly every moment of this daemon is in one
        broker = restart_empty(broker, kind, tmp_path / "broker2")
        restarted = time.monotonic()
        produce(broker.bootstrap_servers, daemon.topics[0], [b"after restart"])
        wait_for(lambda: any(m.value() == b"after restart"
                             for m in daemon.dead_letters(idle=0.3, timeout=3)),
                 "the daemon to work on the restarted broker", 120, [("the daemon", daemon.proc)])
        recovery = time.monotonic() - restarted
        stopping = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - stopping < 15
        print(f"{kind}, {backend}: back to work {recovery:.1f} s after the broker restarted")
    finally:
        discard(broker)


# -- case 5: broker_up and the progress timestamp tell the truth while calls block -----------


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", BROKERS)
def test_broker_up_tells_the_truth_through_a_frozen_and_a_restarted_broker(
        tmp_path, kind, backend, daemons):
    import os

    from streamgmm.embedded import free_port

    metrics_port = free_port()
    broker = own_broker(kind, tmp_path / "broker")
    try:
        daemon = Daemon(tmp_path, broker.bootstrap_servers, backend,
                        batch={"max_records": 10, "max_wait_ms": 20},
                        metrics={"enabled": True, "host": "127.0.0.1", "port": metrics_port})
        daemons.append(daemon)
        produce(broker.bootstrap_servers, daemon.topics[0], mixed_events(20000))
        daemon.start("--create-topics")
        procs = [("the daemon", daemon.proc)]

        def up() -> float | None:
            return metric(metrics_port, "streamgmm_broker_up")

        wait_for(lambda: up() == 1, "broker_up = 1", 30, procs)
        os.kill(broker.pid, signal.SIGSTOP)  # frozen: it accepts connections, answers nothing
        try:
            frozen = time.monotonic()
            # The probe asks every 2 s with a 2 s deadline, whatever the main thread is doing.
            wait_for(lambda: up() == 0, "broker_up = 0 for a frozen broker", 8, procs)
            print(f"{backend}: frozen broker seen after {time.monotonic() - frozen:.1f} s")
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        thawed = time.time()
        wait_for(lambda: up() == 1, "broker_up = 1 once it answers again", 20, procs)
        wait_for(lambda: metric(metrics_port, "streamgmm_last_progress_timestamp_seconds")
                 > thawed, "the loop to make progress again", 60, procs)
        broker.kill()
        wait_for(lambda: up() == 0, "broker_up = 0 for a dead broker", 8, procs)
        broker = restart_empty(broker, kind, tmp_path / "broker2")
        wait_for(lambda: up() == 1, "broker_up = 1 for the restarted broker", 20, procs)
        # While the daemon recovers from the empty broker, broker_up stays 1: it is healthy.
        for _ in range(10):
            assert up() == 1
            time.sleep(0.5)
        # Stopped mid-recovery it ends cleanly, or (kafka-python on Apache Kafka, inside one of
        # its own 30 s transaction waits) is ended by the watchdog without its final states.
        assert daemon.stop() in (0, 4)
    finally:
        discard(broker)


# -- case 7: --print-config shows no secret and has no side effects -------------------------

PRIVATE_KEY = "-----BEGIN PRIVATE KEY-----MIIEvQIBADANBgkqhkiG9w0BAQEFAASC-----END PRIVATE KEY-----"


def print_config(tmp_path, text: str, env=None) -> subprocess.CompletedProcess:
    import os

    config = tmp_path / "c.toml"
    config.write_text(text)
    return subprocess.run([sys.executable, "-m", "streamgmm.cli", "run", "--config", str(config),
                           "--print-config"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_print_config_redacts_every_secret_bearing_setting(tmp_path):
    proc = print_config(tmp_path, f"""
[features]
fields = ["x"]
[kafka]
security_protocol = "SASL_SSL"
sasl_mechanism = "OAUTHBEARER"
sasl_plain_username = "svc-user-7"
ssl_password = "pw-for-the-key-file"
[kafka.librdkafka]
"ssl.key.pem" = "{PRIVATE_KEY}"
"sasl.oauthbearer.config" = "principal=svc scope=all secret=oauth-s3cr3t"
"sasl.oauthbearer.client.secret" = "client-s3cr3t"
"ssl.keystore.password" = "keystore-s3cr3t"
"linger.ms" = 7
""", env={"STREAMGMM_KAFKA__SASL_PLAIN_PASSWORD": "env-s3cr3t"})
    assert proc.returncode == 0, proc.stderr
    for secret in ("BEGIN PRIVATE KEY", "oauth-s3cr3t", "client-s3cr3t", "keystore-s3cr3t",
                   "env-s3cr3t", "svc-user-7", "pw-for-the-key-file"):
        assert secret not in proc.stdout, secret
    assert '"linger.ms" = 7' in proc.stdout and 'sasl_mechanism = "OAUTHBEARER"' in proc.stdout


def test_a_config_error_never_echoes_a_secret(tmp_path):
    proc = print_config(tmp_path, """
[features]
fields = ["x"]
[kafka]
security_protocol = "SASL_SSL"
sasl_mechanism = "PLAIN"
sasl_plain_password = 918273645
""")
    assert proc.returncode == 2
    assert "kafka.sasl_plain_password" in proc.stderr and "918273645" not in proc.stderr
    proc = print_config(tmp_path, """
[features]
fields = ["x"]
[kafka.librdkafka]
"ssl.keystore.password" = ["k1-s3cr3t"]
""")
    assert proc.returncode == 2 and "k1-s3cr3t" not in proc.stderr


def test_checking_the_config_loads_no_plugin_and_builds_no_client(tmp_path):
    # A plugin library that cannot be loaded: building a librdkafka client to check the
    # configuration tried to load it and refused the configuration.
    plugin = tmp_path / "libnot-a-plugin.so"
    plugin.write_bytes(b"not a shared object")
    proc = print_config(tmp_path, f"""
[features]
fields = ["x"]
[kafka.librdkafka]
"plugin.library.paths" = "{plugin}"
""")
    assert proc.returncode == 0, proc.stderr
    assert str(plugin) in proc.stdout
    # A bad name or value is still refused, by librdkafka's documented property list.
    proc = print_config(tmp_path, '[features]\nfields = ["x"]\n[kafka.librdkafka]\n'
                                  '"compression.type" = "brotli"\n')
    assert proc.returncode == 2 and "compression.type" in proc.stderr


# -- the watchdog: a loop stuck past every deadline ends the process with exit code 4 ---------


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", BROKERS)
def test_a_frozen_broker_ends_in_exit_4_or_a_reconnection_and_the_stream_resumes(
        tmp_path, kind, backend, daemons):
    import os

    broker = own_broker(kind, tmp_path / "broker")
    try:
        daemon = Daemon(tmp_path, broker.bootstrap_servers, backend,
                        batch={"max_records": 10, "max_wait_ms": 20},
                        watchdog={"stall_seconds": 10})
        daemons.append(daemon)
        produce(broker.bootstrap_servers, daemon.topics[0], mixed_events(20000))
        daemon.start()
        wait_for(lambda: len(daemon.dead_letters(idle=0.2, timeout=2)) >= 50,
                 "transactions under way", 60, [("the daemon", daemon.proc)])
        since = len(daemon.log())
        os.kill(broker.pid, signal.SIGSTOP)  # every call now waits for its deadline (10-35 s)
        try:
            frozen = time.monotonic()
            try:
                code = daemon.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                code = None
            stuck_for = time.monotonic() - frozen
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        if code is None:
            # Every call the daemon made ended at its deadline (a 10 s read of end offsets, say):
            # it said so and kept reconnecting, and resumes by itself once the broker thaws.
            assert "Kafka unavailable" in daemon.log(since)
        else:
            # A call blocked past stall_seconds (a batch's transaction, 30-35 s): the watchdog
            # fired 10 s after it began, itself up to its own deadline later under load.
            assert code == 4
            assert "made no progress" in daemon.log(since)
            assert 10 <= stuck_for < 40, stuck_for
            # What a supervisor does: start it again (with the default stall_seconds, above the
            # deadlines of a recovery that follows a dead transaction); it resumes from its
            # partitions' states in the state topic.
            configure(daemon.config, broker.bootstrap_servers, daemon.topics, daemon.group,
                      backend, batch={"max_records": 10, "max_wait_ms": 20})
            daemon.start()
        daemon.wait_committed(20000, timeout=120)
        assert daemon.stop() == 0
        letters = daemon.dead_letters(expect=4000, idle=1.0)
        sources = [source_of_dead_letter(m.headers()) for m in letters]
        assert len(sources) == len(set(sources)) == 4000, "each dead letter exactly once"
    finally:
        discard(broker)


def test_an_anomaly_message_over_the_limit_leaves_its_event_out():
    from types import SimpleNamespace

    import numpy as np

    from streamgmm.messages import anomaly_message

    result = SimpleNamespace(
        score=np.array([41.0]), anomaly_score=np.array([1.9]), threshold=np.array([21.5]),
        log_likelihood=np.array([-41.0]), tail_probability=np.array([1e-5]),
        component=np.array([0]), explain=lambda i: [])
    event = {"x": 1e4, "pad": "p" * 5000}
    full = anomaly_message(event, result, 0, ("in", 0, 7), 100, max_bytes=10_000)
    assert orjson.loads(full)["event"] == event
    cut = orjson.loads(anomaly_message(event, result, 0, ("in", 0, 7), 100, max_bytes=2000))
    assert cut["event"] is None and "more than the 2000" in cut["event_omitted"]
    assert cut["score"] == 41.0 and cut["source"] == {"topic": "in", "partition": 0, "offset": 7}
