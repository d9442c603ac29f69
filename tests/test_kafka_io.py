"""The Kafka edges against the real embedded broker, checked with an independent client."""

from __future__ import annotations

import socket

import orjson
import pytest
from conftest import produce, read_topic, unique_name
from kafka import TopicPartition

from streamgmm.embedded import BrokerError, EmbeddedBroker
from streamgmm.io.confluent import ConfluentSink, ConfluentSource
from streamgmm.io.kafka import (
    KafkaSink,
    KafkaSource,
    KafkaUnavailable,
    OutgoingRecord,
    broker_reachable,
    dead_letter_headers,
    ensure_topics,
    read_published_sources,
    source_of_dead_letter,
    source_of_output,
)

BACKENDS = {
    "kafka-python": (KafkaSource, KafkaSink),
    "confluent-kafka": (ConfluentSource, ConfluentSink),
}


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
            ConfluentSource(f"127.0.0.1:{port}", "t", "g", connect_timeout=0.5)


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
def test_batch_is_published_and_its_offsets_committed(bootstrap, delivery, backend):
    source_class, sink_class = BACKENDS[backend]
    topic, out, dlq, group = (unique_name(p) for p in ("in", "out", "dlq", "group"))
    ensure_topics(bootstrap, [topic, out, dlq], partitions=2)
    produce(bootstrap, topic, [orjson.dumps({"i": i}) for i in range(50)],
            keys=[str(i).encode() for i in range(50)])
    assert broker_reachable(bootstrap)

    source = source_class(bootstrap, topic, group)
    sink = sink_class(bootstrap, delivery=delivery, transactional_id=unique_name("tx"))
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
        sink.publish(outgoing, offsets, source)
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

    sources, ends = read_published_sources(bootstrap, out, dlq)
    assert len(sources) == 50
    assert sources == {(r.topic, r.partition, r.offset) for r in records}
    # reading from the end positions finds nothing new
    again, _ = read_published_sources(bootstrap, out, dlq, start_positions=ends)
    assert again == set()


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_restarted_consumer_resumes_at_the_committed_offsets(bootstrap, backend):
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
    sink.publish([], {TopicPartition(topic, 0): records[-1].offset + 1}, source)
    source.close()
    sink.close()

    source = source_class(bootstrap, topic, group)
    try:
        source.wait_for_assignment()
        rest = _consume_all(source, 20)
        assert [orjson.loads(r.value)["i"] for r in rest] == list(range(10, 30))
    finally:
        source.close()
