"""Shared fixtures: two real Kafka-protocol brokers, each started once for the whole session.

Every test that takes ``bootstrap`` (or ``kafka_broker``) runs twice, once on each broker, and its
id names the broker (``[tansu-…]``, ``[apache-…]``):

* ``tansu`` — the embedded broker (:mod:`streamgmm.embedded`), in memory, killed with ``SIGKILL``
  when the session ends (it ignores ``SIGTERM`` for seconds and keeps nothing on disk);
* ``apache`` — a real single-node Apache Kafka in KRaft mode (:mod:`streamgmm.apache_kafka`), the
  broker users run. Without Java or its jars its tests are skipped, except under ``CI=true``,
  where that is a failure.

Each broker is started lazily, by the first test that asks for it, on free loopback ports. Tests
isolate themselves with unique topic and group names (:func:`unique_name`), not with separate
brokers; a test that stops or restarts a broker starts its own with :func:`start_broker`.

Under pytest-xdist (``./scripts/test`` runs 4 workers) each worker is a session of its own: it
starts its own brokers, lazily, on free ports, with files in its own temporary folder, so a test
that kills, freezes or fills a broker can only touch its own. Tests that share a costly
module-scoped fixture share a worker with ``@pytest.mark.xdist_group`` (``--dist loadgroup``).
"""

from __future__ import annotations

import itertools
import os
import uuid

import pytest

from streamgmm.apache_kafka import ApacheKafka
from streamgmm.embedded import BrokerError, EmbeddedBroker

_counter = itertools.count()

#: The brokers every broker test runs on.
BROKERS = ("tansu", "apache")


def _cost_rank(item) -> int:
    """0 for the tests that take tens of seconds (daemons killed, brokers of their own frozen
    and restarted), 1 for the other integration tests, 2 for the rest (seconds or less)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "kind" in params or item.path.name == "test_recovery.py":
        return 0
    return 1 if item.get_closest_marker("integration") else 2


#: How often a failed integration test runs again (pytest-rerunfailures; the summary lists each
#: rerun with its first failure): they wait on real brokers and daemons on two shared cores.
INTEGRATION_RERUNS = 1


@pytest.hookimpl(trylast=True)  # after pytest's own grouping by fixture parameters
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the longest tests first (a stable sort): the workers take tests as
    they finish one, so the short ones fill in at the end instead of a worker left running a
    60 s test alone. A run in one process keeps pytest's order (tests grouped by broker).
    Integration tests run once more when they fail (:data:`INTEGRATION_RERUNS`)."""
    if hasattr(config, "workerinput"):
        items.sort(key=_cost_rank)
    if not config.pluginmanager.hasplugin("rerunfailures"):  # -p no:rerunfailures
        return
    for item in items:
        if item.get_closest_marker("integration") and not item.get_closest_marker("flaky"):
            item.add_marker(pytest.mark.flaky(reruns=INTEGRATION_RERUNS, reruns_delay=1))


_reruns: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    """Keep why each rerun test failed the first time (pytest-rerunfailures lists only names)."""
    if report.outcome == "rerun":
        errors = [line for line in str(report.longrepr or "").splitlines()
                  if line.startswith("E ")]
        _reruns.append((report.nodeid, " / ".join(e[1:].strip() for e in errors[:2])[:300]))


def pytest_terminal_summary(terminalreporter):
    if _reruns:
        terminalreporter.section("why the rerun tests failed the first time")
        for nodeid, why in _reruns:
            terminalreporter.line(f"{nodeid}: {why}")


def unique_name(prefix: str) -> str:
    """A topic/group name no other test uses: ``<prefix>-<n>-<random>``."""
    return f"{prefix}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


def start_broker(kind: str, workdir, port: int | None = None, **options):
    """Start a broker of ``kind`` (``"tansu"`` or ``"apache"``) whose files go to ``workdir``.

    ``options`` go to :class:`~streamgmm.apache_kafka.ApacheKafka`. An Apache Kafka that cannot
    start (no Java, no jars) skips the test, or fails it under ``CI=true``, where every broker
    must run.
    """
    if kind == "tansu":
        return EmbeddedBroker(port=port, log_path=workdir / "broker.log").start()
    try:
        return ApacheKafka(workdir=workdir, port=port, **options).start()
    except BrokerError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Apache Kafka must run in CI: {exc}", pytrace=False)
        pytest.skip(f"no Apache Kafka here ({exc}); scripts/_setup.sh resolves it")


def _session_broker(kind, tmp_path_factory):
    broker = start_broker(kind, tmp_path_factory.mktemp(kind))
    try:
        yield broker
    finally:
        if isinstance(broker, EmbeddedBroker):
            broker.kill()
        else:
            broker.cleanup()


@pytest.fixture(scope="session")
def tansu_broker(tmp_path_factory):
    """The session's :class:`~streamgmm.embedded.EmbeddedBroker`."""
    yield from _session_broker("tansu", tmp_path_factory)


@pytest.fixture(scope="session")
def apache_broker(tmp_path_factory):
    """The session's :class:`~streamgmm.apache_kafka.ApacheKafka`."""
    yield from _session_broker("apache", tmp_path_factory)


@pytest.fixture(scope="session", params=BROKERS)
def kafka_broker(request):
    """The session's broker of each kind in turn (``.kind`` says which)."""
    return request.getfixturevalue(f"{request.param}_broker")


@pytest.fixture(scope="session")
def bootstrap(kafka_broker) -> str:
    """``host:port`` of the session's broker."""
    return kafka_broker.bootstrap_servers


# -- a second, independent Kafka client (confluent-kafka / librdkafka) for producing and reading --


def produce(bootstrap: str, topic: str, values, keys=None, partition: int | None = None) -> None:
    """Produce ``values`` (bytes) to ``topic`` with confluent-kafka and wait for every ack."""
    import confluent_kafka

    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "acks": "all",
                                         "linger.ms": 5})
    errors = []

    def on_delivery(err, _msg):
        if err is not None:
            errors.append(err)

    keys = list(keys) if keys is not None else [None] * len(values)
    for value, key in zip(values, keys, strict=True):
        kwargs = {"partition": partition} if partition is not None else {}
        producer.produce(topic, value=value, key=key, on_delivery=on_delivery, **kwargs)
        producer.poll(0)
    remaining = producer.flush(30)
    assert remaining == 0 and not errors, f"produce failed: {errors or remaining}"


def read_topic(bootstrap: str, topic: str, *, expect: int | None = None, timeout: float = 20.0,
               idle: float = 1.0) -> list:
    """Every committed record of ``topic`` (all partitions) read with ``read_committed``.

    Reads until ``expect`` records arrived (then ``idle`` seconds more, to catch duplicates) or,
    without ``expect``, until nothing new came for ``idle`` seconds -- in both cases only once
    every partition has been read to its end since its last record, or ``timeout``; returns
    confluent messages. (Idle alone stopped early on a loaded machine: a fetch that took longer
    than ``idle`` ended the read with part of a topic, and the kill -9 test on Apache Kafka
    reported published anomalies as lost.)
    """
    import time

    import confluent_kafka

    consumer = confluent_kafka.Consumer({
        "bootstrap.servers": bootstrap, "group.id": unique_name("reader"),
        "isolation.level": "read_committed", "enable.auto.commit": False,
        "enable.partition.eof": True,
    })
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = sorted(metadata.topics[topic].partitions) if topic in metadata.topics else []
        consumer.assign([confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING)
                         for p in partitions])
        messages: list = []
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            msg = consumer.poll(0.1)
            now = time.monotonic()
            if msg is not None and not msg.error():
                messages.append(msg)
                at_end.discard(msg.partition())
                last_new = now
                continue
            if msg is not None and msg.error().code() == confluent_kafka.KafkaError._PARTITION_EOF:
                at_end.add(msg.partition())
            reached = expect is None or len(messages) >= expect
            if reached and now - last_new >= idle and len(at_end) == len(partitions):
                break
        return messages
    finally:
        consumer.close()


def newest_states(bootstrap: str, state_topic: str, fields) -> dict:
    """The newest state of each input partition in ``state_topic`` (read ``read_committed`` by
    the reference client), as :class:`streamgmm.partition_state.PartitionState` by partition."""
    from streamgmm.partition_state import decode_state

    newest = {}
    for message in read_topic(bootstrap, state_topic, idle=0.5):
        newest[message.key()] = message.value()
    states = (decode_state(value, key, list(fields)) for key, value in newest.items() if value)
    return {state.partition: state for state in states}
