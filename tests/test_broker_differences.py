"""Where the embedded broker (Tansu 0.6) and Apache Kafka 4.x differ, each shown on both.

Every test runs on both brokers and states what each one does. On Apache Kafka they show that
the daemon's broker workarounds are *unnecessary* there (not merely harmless); on Tansu they show
the quirk each workaround exists for, so a Tansu release that fixes one makes its test fail and
the workaround can go:

* records of aborted and of abandoned transactions are visible to ``read_committed`` readers on
  Tansu → the daemon reads back its output topics on recovery and skips what is already there
  (``Backend.read_published_sources``; at-least-once delivery needs it on every broker);
* a transaction holding only offsets (other than a producer's first) loses them on Tansu, with
  either client → batches with nothing to publish commit their offsets with a plain commit
  (``BrokerQuirks.plain_commit_when_nothing_to_publish``, :mod:`streamgmm.io.quirks`);
* end offsets count record *batches*, not records, on Tansu (ListOffsets, for either client;
  the high watermark in fetch responses is right) → the read-back reads until a second of
  silence rather than to the end offsets (``BrokerQuirks.readback_until_silence``);
* Tansu does not fence a stale group generation (KIP-447), not even a zombie's (a member frozen
  past its session timeout, resumed after another took its partitions): its transaction's
  offsets rewind the group → ``BrokerQuirks.fences_stale_group_metadata`` is False there, and
  the daemon checks its ownership itself (a lease) instead of relying on the broker; on Apache
  Kafka the sinks raise ``PartitionsLost``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import confluent_kafka as ck
import pytest
from conftest import produce, read_topic, unique_name
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata
from waiting import wait_for

from streamgmm.io.kafka import OffsetsReader, ensure_topics
from streamgmm.io.quirks import QUIRK_SETS

pytestmark = pytest.mark.integration


def _joined_consumer(bootstrap: str, topic: str, group: str) -> ck.Consumer:
    consumer = ck.Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                            "enable.auto.commit": False, "session.timeout.ms": 6000,
                            "heartbeat.interval.ms": 500, "auto.offset.reset": "earliest",
                            "isolation.level": "read_committed"})
    consumer.subscribe([topic])

    def assigned():
        consumer.poll(0.1)
        return consumer.assignment()

    wait_for(assigned, f"an assignment in group {group}", 30)
    return consumer


def _committed(bootstrap: str, group: str, topic: str) -> int | None:
    consumer = ck.Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        (tp,) = consumer.committed([ck.TopicPartition(topic, 0)], timeout=10)
    finally:
        consumer.close()
    return tp.offset if tp.offset >= 0 else None


def _transactional_producer(bootstrap: str) -> ck.Producer:
    producer = ck.Producer({"bootstrap.servers": bootstrap, "transactional.id": unique_name("tx"),
                            "transaction.timeout.ms": 60000})
    producer.init_transactions(30)
    return producer


def test_end_offsets_count_records_not_batches(kafka_broker):
    """Tansu's ListOffsets answers the last *batch*'s base offset + 1, whichever client asks.

    So the daemon's kafka-python :class:`~streamgmm.io.kafka.OffsetsReader` gets the same wrong
    end offset on Tansu as librdkafka's watermark query; only the high watermark of a fetch
    response (what the lag metric uses) is right there. On Kafka every answer is right.
    """
    bootstrap, topic = kafka_broker.bootstrap_servers, unique_name("ends")
    ensure_topics(bootstrap, [topic], partitions=1)
    producer = ck.Producer({"bootstrap.servers": bootstrap, "linger.ms": 200})
    for i in range(10):
        producer.produce(topic, value=b"%d" % i, partition=0)
    assert producer.flush(10) == 0  # one batch of ten records
    tp = TopicPartition(topic, 0)
    consumer = ck.Consumer({"bootstrap.servers": bootstrap, "group.id": unique_name("g"),
                            "isolation.level": "read_committed"})
    kafka_python = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    reader = OffsetsReader(bootstrap)
    try:
        asked = {
            "librdkafka watermarks": consumer.get_watermark_offsets(
                ck.TopicPartition(topic, 0), timeout=10, cached=False)[1],
            "kafka-python end_offsets, read_committed": kafka_python.end_offsets([tp])[tp],
            "OffsetsReader (read_uncommitted)": reader.ends([tp])[tp],
        }
        consumer.assign([ck.TopicPartition(topic, 0, 0)])
        fetched = 0
        deadline = time.monotonic() + 10
        while fetched < 10 and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            fetched += message is not None and message.error() is None
        assert fetched == 10
        fetch_high_watermark = consumer.get_watermark_offsets(ck.TopicPartition(topic, 0),
                                                              cached=True)[1]
    finally:
        consumer.close()
        kafka_python.close()
        reader.close()
    expected = {"apache": 10, "tansu": 1}[kafka_broker.kind]
    assert asked == dict.fromkeys(asked, expected)
    assert fetch_high_watermark == 10


def test_records_of_an_aborted_transaction_stay_invisible_to_read_committed(kafka_broker):
    bootstrap, topic = kafka_broker.bootstrap_servers, unique_name("abort")
    ensure_topics(bootstrap, [topic], partitions=1)
    producer = _transactional_producer(bootstrap)
    producer.begin_transaction()
    for _ in range(5):
        producer.produce(topic, value=b"aborted", partition=0)
    producer.flush(10)
    producer.abort_transaction(30)
    producer.begin_transaction()
    for _ in range(3):
        producer.produce(topic, value=b"committed", partition=0)
    producer.commit_transaction(30)
    seen = [m.value() for m in read_topic(bootstrap, topic, expect=3, idle=0.5)]
    expected = {"apache": [b"committed"] * 3,
                "tansu": [b"aborted"] * 5 + [b"committed"] * 3}[kafka_broker.kind]
    assert seen == expected


_ABANDONING_PRODUCER = """
import sys, time, confluent_kafka as ck
producer = ck.Producer({"bootstrap.servers": sys.argv[1], "transactional.id": sys.argv[2],
                        "transaction.timeout.ms": 60000})
producer.init_transactions(30)
producer.begin_transaction()
for _ in range(4):
    producer.produce(sys.argv[3], value=b"abandoned", partition=0)
producer.flush(10)
print("sent", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("client", ["confluent-kafka", "kafka-python"])
def test_a_new_producer_aborts_a_killed_producers_open_transaction(kafka_broker, client):
    """The records a producer sent before ``kill -9``, inside a transaction, never show up."""
    bootstrap, topic = kafka_broker.bootstrap_servers, unique_name("abandoned")
    tx = unique_name("tx")
    ensure_topics(bootstrap, [topic], partitions=1)
    dead = subprocess.Popen([sys.executable, "-c", _ABANDONING_PRODUCER, bootstrap, tx, topic],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert dead.stdout.readline().strip() == "sent"
    finally:
        dead.kill()
        dead.wait()
    if client == "confluent-kafka":
        producer = ck.Producer({"bootstrap.servers": bootstrap, "transactional.id": tx})
        producer.init_transactions(30)
        producer.begin_transaction()
        producer.produce(topic, value=b"next", partition=0)
        producer.commit_transaction(30)
    else:
        producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=tx)
        producer.init_transactions()
        producer.begin_transaction()
        producer.send(topic, value=b"next", partition=0)
        producer.commit_transaction()
        producer.close()
    seen = [m.value() for m in read_topic(bootstrap, topic, expect=1, idle=0.5)]
    expected = {"apache": [b"next"], "tansu": [b"abandoned"] * 4 + [b"next"]}[kafka_broker.kind]
    assert seen == expected


@pytest.mark.parametrize("client", ["confluent-kafka", "kafka-python"])
def test_a_transaction_that_holds_only_offsets_commits_them(kafka_broker, client):
    """What the daemon's plain commit of record-less batches works around (Tansu).

    One producer, two transactions: records and offsets 2, then offsets 4 alone. Tansu keeps
    a producer's *first* offsets-only transaction but drops the offsets of any later one (seen:
    2, 4, 6 in a row leave 2 committed), with either client; Kafka keeps them all.
    """
    bootstrap, topic, group = (kafka_broker.bootstrap_servers, unique_name("offsets"),
                               unique_name("g"))
    ensure_topics(bootstrap, [topic], partitions=1)
    produce(bootstrap, topic, [b"%d" % i for i in range(5)], partition=0)
    out = unique_name("out")
    consumer = _joined_consumer(bootstrap, topic, group)
    try:
        if client == "confluent-kafka":
            producer = _transactional_producer(bootstrap)
            for offset, records in ((2, [b"output"]), (4, [])):
                producer.begin_transaction()
                for value in records:
                    producer.produce(out, value=value)
                producer.send_offsets_to_transaction([ck.TopicPartition(topic, 0, offset)],
                                                     consumer.consumer_group_metadata(), 30)
                producer.commit_transaction(30)
        else:
            producer = KafkaProducer(bootstrap_servers=bootstrap,
                                     transactional_id=unique_name("tx"))
            producer.init_transactions()
            for offset, records in ((2, [b"output"]), (4, [])):
                producer.begin_transaction()
                for value in records:
                    producer.send(out, value=value)
                producer.send_offsets_to_transaction(
                    {TopicPartition(topic, 0): OffsetAndMetadata(offset, "", -1)}, group)
                producer.commit_transaction()
            producer.close()
    finally:
        consumer.close()
    assert _committed(bootstrap, group, topic) == {"apache": 4, "tansu": 2}[kafka_broker.kind]


def test_a_stale_group_generation_cannot_commit_in_a_transaction(kafka_broker):
    """KIP-447: offsets sent with the metadata of a member that left the group are refused."""
    bootstrap, topic, group = (kafka_broker.bootstrap_servers, unique_name("fence"),
                               unique_name("g"))
    ensure_topics(bootstrap, [topic], partitions=1)
    produce(bootstrap, topic, [b"%d" % i for i in range(5)], partition=0)
    zombie = _joined_consumer(bootstrap, topic, group)
    stale = zombie.consumer_group_metadata()
    zombie.close()  # its partitions go to the next member, in a new generation
    successor = _joined_consumer(bootstrap, topic, group)
    producer = _transactional_producer(bootstrap)
    try:
        producer.begin_transaction()
        producer.produce(topic, value=b"zombie output", partition=0)
        try:
            producer.send_offsets_to_transaction([ck.TopicPartition(topic, 0, 4)], stale, 30)
            producer.commit_transaction(30)
            fenced = False
        except ck.KafkaException as exc:
            fenced = True
            error = exc.args[0]
            assert error.txn_requires_abort() or error.fatal(), error
    finally:
        successor.close()
    assert fenced == (kafka_broker.kind == "apache")
    assert _committed(bootstrap, group, topic) == (None if fenced else 4)


_ZOMBIE = """
import sys
from streamgmm.config import KafkaConfig
from streamgmm.io.backend import open_backend
from streamgmm.io.base import OutgoingRecord, PartitionsLost, TopicPartition

bootstrap, backend, topic, group, out = sys.argv[1:6]
cluster = open_backend(KafkaConfig(bootstrap_servers=bootstrap, backend=backend, input_topic=topic,
                                   group_id=group, transactional_id=group + "-zombie"))
sink = cluster.open_sink()
source = cluster.open_source()
source.wait_for_assignment()
records = []
while len(records) < 5:
    records += source.poll(5, 200)
stale = source.group_metadata()  # the metadata of the poll that returned the batch
print("polled", flush=True)
sys.stdin.readline()  # frozen here; the line comes once it runs again
try:
    sink.transact([OutgoingRecord(out, b"zombie output")], {TopicPartition(topic, 0): 3}, stale)
    print("accepted", flush=True)
except PartitionsLost as exc:
    print("PartitionsLost", exc, flush=True)
"""


@pytest.mark.parametrize("backend", ["confluent-kafka", "kafka-python"])
def test_a_zombie_cannot_commit_with_its_stale_group_metadata(kafka_broker, backend):
    """A member polls a batch, is frozen (``SIGSTOP``) past its 6 s session timeout, B takes the
    partition and commits offset 10; A resumes and publishes its batch with offsets 3 and the
    group metadata of its poll. Apache Kafka refuses the offsets (the sink raises
    ``PartitionsLost``, nothing is published, 10 stays committed); Tansu accepts them and the
    group's committed offset goes back to 3 (``BrokerQuirks.fences_stale_group_metadata``)."""
    bootstrap, topic, group = (kafka_broker.bootstrap_servers, unique_name("zombie"),
                               unique_name("g"))
    out = unique_name("out")
    ensure_topics(bootstrap, [topic, out], partitions=1)
    produce(bootstrap, topic, [b"%d" % i for i in range(20)], partition=0)
    zombie = subprocess.Popen([sys.executable, "-c", _ZOMBIE, bootstrap, backend, topic, group,
                               out], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    successor = None
    try:
        assert zombie.stdout.readline().strip() == "polled"
        os.kill(zombie.pid, signal.SIGSTOP)
        successor = _joined_consumer(bootstrap, topic, group)  # once A's session expired
        successor.commit(offsets=[ck.TopicPartition(topic, 0, 10)], asynchronous=False)
        os.kill(zombie.pid, signal.SIGCONT)
        zombie.stdin.write("go\n")
        zombie.stdin.flush()
        outcome = zombie.stdout.readline().strip()
        assert zombie.wait(30) == 0
    finally:
        if zombie.poll() is None:
            os.kill(zombie.pid, signal.SIGCONT)
            zombie.kill()
            zombie.wait()
        if successor is not None:
            successor.close()
    fences = QUIRK_SETS[{"apache": "none", "tansu": "tansu"}[kafka_broker.kind]
                        ].fences_stale_group_metadata
    assert fences == (kafka_broker.kind == "apache")
    if fences:
        assert outcome.startswith("PartitionsLost"), outcome
        assert _committed(bootstrap, group, topic) == 10
        assert read_topic(bootstrap, out, idle=0.5) == []
    else:
        assert outcome == "accepted"
        assert _committed(bootstrap, group, topic) == 3  # the group went back by 7 events
        assert [m.value() for m in read_topic(bootstrap, out, expect=1)] == [b"zombie output"]


def test_data_survives_a_broker_restart_only_on_apache_kafka(tmp_path):
    """Tansu keeps everything in memory; Apache Kafka's log directory survives a restart.

    The broker-loss tests of the daemon (``test_service.py``) run both kinds of comeback on
    Apache Kafka: with its data, and empty like Tansu.
    """
    from conftest import start_broker

    for kind in ("tansu", "apache"):
        broker = start_broker(kind, tmp_path / kind)
        try:
            bootstrap, topic = broker.bootstrap_servers, unique_name("kept")
            ensure_topics(bootstrap, [topic], partitions=1)
            produce(bootstrap, topic, [b"a", b"b"])
            if kind == "tansu":
                broker.kill()
                broker.start()
            else:
                broker.restart()
            started = time.monotonic()
            kept = read_topic(bootstrap, topic, idle=0.5, timeout=10)
            assert [m.value() for m in kept] == ([b"a", b"b"] if kind == "apache" else []), kind
            assert time.monotonic() - started < 10
        finally:
            broker.kill()


def test_the_kip848_consumer_protocol_assigns_partitions(kafka_broker):
    """``group.protocol=consumer`` (KIP-848): Kafka assigns in about a second, Tansu never.

    Tansu answers with no error and no assignment, so a client configured for the new protocol
    silently consumes nothing there. The daemon uses the classic protocol on both.
    """
    bootstrap, topic = kafka_broker.bootstrap_servers, unique_name("kip848")
    ensure_topics(bootstrap, [topic], partitions=2)
    consumer = ck.Consumer({"bootstrap.servers": bootstrap, "group.id": unique_name("g"),
                            "group.protocol": "consumer"})
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + (20 if kafka_broker.kind == "apache" else 6)
        while not consumer.assignment() and time.monotonic() < deadline:
            consumer.poll(0.2)
        assigned = {tp.partition for tp in consumer.assignment()}
    finally:
        consumer.close()
    assert assigned == ({0, 1} if kafka_broker.kind == "apache" else set())
