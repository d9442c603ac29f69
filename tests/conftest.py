"""Shared fixtures: one embedded Kafka-protocol broker (Tansu) for the whole test session.

The broker is started lazily, by the first test that asks for it, on a free loopback port, and
killed with ``SIGKILL`` when the session ends (Tansu ignores ``SIGTERM`` for several seconds and
keeps nothing on disk). Tests isolate themselves with unique topic and group names
(:func:`unique_name`), not with separate brokers.
"""

from __future__ import annotations

import itertools
import os
import uuid

import pytest

from streamgmm.embedded import EmbeddedBroker

_counter = itertools.count()


def unique_name(prefix: str) -> str:
    """A topic/group name no other test uses: ``<prefix>-<n>-<random>``."""
    return f"{prefix}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """A running :class:`~streamgmm.embedded.EmbeddedBroker`; killed at the end of the session."""
    log = tmp_path_factory.mktemp("tansu") / "broker.log"
    broker = EmbeddedBroker(log_path=log).start()
    try:
        yield broker
    finally:
        if broker.pid is not None:
            try:
                os.kill(broker.pid, 9)
            except ProcessLookupError:
                pass
        broker.kill()


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
    without ``expect``, until nothing new came for ``idle`` seconds; returns confluent messages.
    """
    import time

    import confluent_kafka

    consumer = confluent_kafka.Consumer({
        "bootstrap.servers": bootstrap, "group.id": unique_name("reader"),
        "isolation.level": "read_committed", "enable.auto.commit": False,
    })
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = sorted(metadata.topics[topic].partitions) if topic in metadata.topics else []
        consumer.assign([confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING)
                         for p in partitions])
        messages: list = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            msg = consumer.poll(0.1)
            now = time.monotonic()
            if msg is not None and not msg.error():
                messages.append(msg)
                last_new = now
                continue
            reached = expect is None or len(messages) >= expect
            if reached and now - last_new >= idle:
                break
        return messages
    finally:
        consumer.close()
