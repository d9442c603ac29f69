"""The Kafka edges against the real embedded broker, checked with an independent client."""

from __future__ import annotations

import socket

import orjson
import pytest
from conftest import produce, read_topic, unique_name

from streamgmm.embedded import BrokerError, EmbeddedBroker
from streamgmm.io import confluent, kafka
from streamgmm.io.base import (
    KafkaUnavailable,
    OutgoingRecord,
    Sink,
    Source,
    TopicPartition,
    broker_reachable,
    publish_batch,
)
from streamgmm.io.kafka import KafkaSink, KafkaSource, ensure_topics
from streamgmm.messages import dead_letter_headers, source_of_dead_letter, source_of_output

BACKENDS = {
    "kafka-python": (KafkaSource, KafkaSink),
    "confluent-kafka": (confluent.ConfluentSource, confluent.ConfluentSink),
}
READ_BACK = {"kafka-python": kafka.read_published_sources,
             "confluent-kafka": confluent.read_published_sources}


def test_each_backend_imports_only_its_own_client_library():
    import subprocess
    import sys

    for module, other in (("streamgmm.io.kafka", "confluent_kafka"),
                          ("streamgmm.io.confluent", "kafka"),
                          ("streamgmm.service", "kafka"), ("streamgmm.service", "confluent_kafka"),
                          ("streamgmm.config", "kafka"), ("streamgmm.config", "confluent_kafka")):
        code = (f"import sys, {module}, streamgmm.io.backend as b; "
                f"sys.exit({other!r} in sys.modules)")
        assert subprocess.run([sys.executable, "-c", code]).returncode == 0, (module, other)


def test_kafka_python_internals_are_what_its_public_api_does():
    """The kafka-python sink's private calls live in ``_Transactions`` only, and are the bodies
    of kafka-python's own public transactional methods: a release that changes them fails here."""
    import inspect

    from kafka import KafkaProducer
    from kafka.producer.transaction_manager import TransactionalRequestResult

    public = {name: inspect.getsource(getattr(KafkaProducer, name)) for name in (
        "send_offsets_to_transaction", "commit_transaction", "abort_transaction")}
    assert "self._transaction_manager.send_offsets_to_transaction(offsets, group_metadata)" \
        in public["send_offsets_to_transaction"]
    assert "self._transaction_manager.begin_commit()" in public["commit_transaction"]
    assert "self._transaction_manager.begin_abort()" in public["abort_transaction"]
    for source in public.values():
        assert "self._sender.wakeup()" in source and "result.wait()" in source
    assert "timeout_ms" in inspect.signature(TransactionalRequestResult.wait).parameters
    # The rebalance bridge waits on kafka-python's I/O loop with the loop's own sleep.
    from kafka.net.selector import KernelEvent, NetworkSelector

    assert isinstance(NetworkSelector.sleep(None, 0.01), KernelEvent)
    assert "self._net = self._manager._net" in inspect.getsource(kafka.KafkaConsumer.__init__)
    module = inspect.getsource(kafka)
    internals = (inspect.getsource(kafka._Transactions)
                 + inspect.getsource(kafka._RebalanceBridge))
    outside = module
    for part in (inspect.getsource(kafka._Transactions), inspect.getsource(kafka._RebalanceBridge)):
        outside = outside.replace(part, "")
    assert "consumer._net.sleep" in internals
    for private in ("._transaction_manager", "._sender", "._client", "._coordinator", "._net"):
        assert private not in outside, private
    # The bridge's lost-join guard reads the coordinator's join task: the loop that awaits it
    # runs only while the coordinator says it needs to rejoin (kafka-python 3.0.12).
    from kafka.coordinator.base import BaseCoordinator

    join = inspect.getsource(BaseCoordinator.join_group_async)
    assert "while self.need_rejoin():" in join
    assert "self._join_task is None or self._join_task.is_done" in join
    assert "self.rejoin_needed = True" in inspect.getsource(BaseCoordinator.request_rejoin)


def test_a_join_that_no_poll_completed_is_asked_for_again():
    """kafka-python 3.0.12 leaves a join task for the next poll only while the coordinator
    needs a rejoin; the bridge finds a finished join that was never completed and asks for a new
    one, and gives polls during a join a long timeout."""
    from types import SimpleNamespace

    class Coordinator:
        def __init__(self, task, rejoin):
            self._join_task, self.rejoin = task, rejoin

        def need_rejoin(self):
            return self.rejoin

        def request_rejoin(self):
            self.rejoin = True

    def bridge(task, rejoin):
        consumer = SimpleNamespace(_coordinator=Coordinator(task, rejoin),
                                   _net=SimpleNamespace(sleep=None))
        return kafka._RebalanceBridge(consumer, listener=None), consumer._coordinator

    lost, coordinator = bridge(SimpleNamespace(is_done=True), rejoin=False)
    assert lost.poll_timeout_ms(20) == kafka.JOIN_POLL_MS  # a join task is still there
    lost.before_poll()
    assert coordinator.rejoin
    in_flight, coordinator = bridge(SimpleNamespace(is_done=False), rejoin=False)
    in_flight.before_poll()
    assert not coordinator.rejoin  # the next poll awaits it
    stable, coordinator = bridge(None, rejoin=False)
    stable.before_poll()
    assert not coordinator.rejoin and stable.poll_timeout_ms(20) == 20


def test_dead_letter_headers_name_reason_and_source_in_both_conventions():
    headers = dead_letter_headers("non_numeric", 'field "a": expected a number', "in", 3, 99)
    found = dict(headers)
    assert found["streamgmm.reason"] == b"non_numeric"
    assert found["__connect.errors.topic"] == b"in"
    assert found["__connect.errors.partition"] == b"3"
    assert found["__connect.errors.exception.message"].startswith(b'field "a"')
    assert found["kafka_dlt-original-offset"] == b"99"
    assert source_of_dead_letter(headers) == ("in", 3, 99)
    spring_only = [(k, v) for k, v in headers if k.startswith("kafka_dlt-")]
    assert source_of_dead_letter(spring_only) == ("in", 3, 99)
    assert source_of_dead_letter([("other", b"x")]) is None


def test_source_of_output_reads_the_source_field_and_refuses_garbage():
    value = orjson.dumps({"source": {"topic": "in", "partition": 1, "offset": 5}})
    assert source_of_output(value) == ("in", 1, 5)
    assert source_of_output(b'{"source": 3}') is None
    assert source_of_output(None) is None


def test_embedded_broker_refuses_a_taken_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(BrokerError, match="already in use"):
            EmbeddedBroker(port=port).start()


def test_an_apache_kafka_that_cannot_start_fails_the_run_in_ci_and_is_skipped_elsewhere(
        tmp_path, monkeypatch):
    from conftest import start_broker

    from streamgmm.apache_kafka import ApacheKafka

    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-java-here"))
    with pytest.raises(BrokerError, match="needs Java 17"):
        ApacheKafka(workdir=tmp_path / "k", jars=tmp_path).start()
    monkeypatch.setenv("STREAMGMM_KAFKA_JARS", str(tmp_path / "jars"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="must run in CI"):
        start_broker("apache", tmp_path / "ci")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="scripts/_setup.sh"):
        start_broker("apache", tmp_path / "dev")


def test_source_without_broker_raises_kafka_unavailable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        assert not broker_reachable(f"127.0.0.1:{port}", timeout=0.2)
        with pytest.raises(KafkaUnavailable, match="cannot connect"):
            KafkaSource(f"127.0.0.1:{port}", "t", "g", bootstrap_timeout_ms=500)
        with pytest.raises(KafkaUnavailable, match="cannot connect"):
            confluent.ConfluentSource(f"127.0.0.1:{port}", "t", "g", connect_timeout=0.5)


def _consume_all(source, n: int) -> list:
    import time

    records: list = []
    deadline = time.monotonic() + 20
    while len(records) < n and time.monotonic() < deadline:
        records += source.poll(max_records=500, timeout_ms=200)
    return records


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("delivery", ["exactly-once", "at-least-once"])
def test_batch_is_published_and_its_offsets_committed(kafka_broker, delivery, backend):
    """On both brokers, each backend's source and sink keep their contract, and its read-back
    finds every published source: until silence on both brokers, to the end offsets on Kafka."""
    bootstrap = kafka_broker.bootstrap_servers
    source_class, sink_class = BACKENDS[backend]
    topic, out, dlq, group = (unique_name(p) for p in ("in", "out", "dlq", "group"))
    ensure_topics(bootstrap, [topic, out, dlq], partitions=2)
    produce(bootstrap, topic, [orjson.dumps({"i": i}) for i in range(50)],
            keys=[str(i).encode() for i in range(50)])
    assert broker_reachable(bootstrap)

    source = source_class(bootstrap, topic, group)
    sink = sink_class(bootstrap, delivery=delivery, transactional_id=unique_name("tx"))
    assert isinstance(source, Source) and isinstance(sink, Sink)
    try:
        assert len(source.wait_for_assignment()) == 2
        records = _consume_all(source, 50)
        assert sorted(orjson.loads(r.value)["i"] for r in records) == list(range(50))
        outgoing = []
        for r in records:
            src = {"topic": r.topic, "partition": r.partition, "offset": r.offset}
            if r.offset % 5 == 0:
                outgoing.append(OutgoingRecord(dlq, r.value, r.key, dead_letter_headers(
                    "invalid_json", "test", r.topic, r.partition, r.offset)))
            else:
                outgoing.append(OutgoingRecord(out, orjson.dumps({"source": src}), r.key))
        offsets = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
        publish_batch(source, sink, outgoing, offsets, plain_commit_when_empty=True)
        assert source.committed() == offsets
        assert source.lag(offsets) == 0
    finally:
        sink.close()
        source.close()

    n_dead = sum(1 for r in outgoing if r.topic == dlq)
    outputs = read_topic(bootstrap, out, expect=50 - n_dead)
    letters = read_topic(bootstrap, dlq, expect=n_dead)
    assert len(outputs) == 50 - n_dead and len(letters) == n_dead
    # the key is carried through and headers survive the trip
    assert {m.key() for m in outputs} | {m.key() for m in letters} == {
        str(i).encode() for i in range(50)}
    assert all(source_of_dead_letter(m.headers()) is not None for m in letters)

    read_back = READ_BACK[backend]
    modes = [True] + ([False] if kafka_broker.kind == "apache" else [])  # Tansu: ends are wrong
    for until_silence in modes:
        sources, ends = read_back(bootstrap, out, dlq, until_silence=until_silence)
        assert len(sources) == 50
        assert sources == {(r.topic, r.partition, r.offset) for r in records}
        # reading from the end positions finds nothing new
        again, _ = read_back(bootstrap, out, dlq, start_positions=ends,
                             until_silence=until_silence)
        assert again == set()


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("plain_commit", [True, False])
def test_a_restarted_consumer_resumes_at_the_committed_offsets(kafka_broker, backend,
                                                               plain_commit):
    """Offsets of a batch with nothing to publish: committed by a plain commit (Tansu's quirk)
    or, on Apache Kafka, by a transaction that holds only them."""
    bootstrap = kafka_broker.bootstrap_servers
    if kafka_broker.kind == "tansu" and not plain_commit:
        pytest.skip("Tansu drops an offsets-only transaction's offsets (its quirk)")
    source_class, sink_class = BACKENDS[backend]
    topic, out, dlq, group = (unique_name(p) for p in ("in", "out", "dlq", "group"))
    ensure_topics(bootstrap, [topic, out, dlq], partitions=1)
    produce(bootstrap, topic, [orjson.dumps({"i": i}) for i in range(30)])
    tx = unique_name("tx")
    source = source_class(bootstrap, topic, group)
    sink = sink_class(bootstrap, transactional_id=tx)
    source.wait_for_assignment()
    records = []
    while len(records) < 10:
        records += source.poll(max_records=10 - len(records), timeout_ms=200)
    # A first transaction with records: Tansu keeps a producer's first offsets-only one.
    publish_batch(source, sink, [OutgoingRecord(out, b"{}")],
                  {TopicPartition(topic, 0): records[4].offset + 1}, plain_commit)
    publish_batch(source, sink, [], {TopicPartition(topic, 0): records[-1].offset + 1},
                  plain_commit)
    source.close()
    sink.close()

    source = source_class(bootstrap, topic, group)
    try:
        source.wait_for_assignment()
        rest = _consume_all(source, 20)
        assert [orjson.loads(r.value)["i"] for r in rest] == list(range(10, 30))
    finally:
        source.close()


def test_a_position_kafka_python_does_not_know_in_time_is_a_reconnection_not_a_type_error():
    """kafka-python's ``position(tp, timeout_ms)`` answers ``None`` when it cannot find the
    position in time (a replica started during a rebalance on Apache Kafka): reading the state
    topic to its end then failed with ``TypeError`` and the daemon exited 1. It is a
    KafkaUnavailable now, after which the daemon reconnects (real_chaos.py, apache seed 14)."""
    from kafka import TopicPartition as KTP

    from streamgmm.io.base import KafkaUnavailable
    from streamgmm.io.kafka import _read_assigned_to_end

    class Consumer:
        def poll(self, timeout_ms, max_records):
            return {}

        def position(self, tp, timeout_ms):
            return None

        def end_offsets(self, parts):
            return {tp: 5 for tp in parts}

    with pytest.raises(KafkaUnavailable, match="no position of s:0"):
        _read_assigned_to_end(Consumer(), [KTP("s", 0)], lambda r: None, False, 5.0,
                              "the state topic")
