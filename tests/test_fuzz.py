"""A fuzzer over event payloads: decode → detect → message never crashes, whatever arrives.

Hypothesis generates hostile payloads (random bytes, JSON with lone surrogates, deep nesting,
huge integers, NaN and infinities, wrong types, oversized values) around events whose features are
extreme enough to be anomalies, and feeds them through the daemon's own per-partition batch path
(``Daemon._process_run``: the code between ``poll`` and ``publish`` for one owned partition,
scoring with the merged model of the replica's two warmed-up partitions). For every input record
it asserts:

* it is either scored or dead-lettered, never both, never neither;
* every anomaly message is strict UTF-8 JSON naming its source;
* every record to publish fits the producer's message limit.

Bounded for CI: a fixed number of examples with a per-example deadline.
"""

from __future__ import annotations

import json
from datetime import timedelta
from types import SimpleNamespace

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamgmm.config import load_config
from streamgmm.io.base import TopicPartition, record_size
from streamgmm.messages import source_of_dead_letter, source_of_output
from streamgmm.partition_state import PartitionState
from streamgmm.pipeline import BatchPipeline
from streamgmm.service import Daemon, _Task

EXAMPLES = 300

# Strings with anything in them, lone surrogates included.
texts = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=40)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([1e4, -1e4, 1e300, -1e300, 0]),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, texts),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(texts, inner, max_size=4)),
    max_leaves=20,
)


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def payloads(draw) -> bytes:
    """One record value: mostly events with extreme features and hostile extra fields."""
    kind = draw(st.sampled_from(["event", "event", "event", "raw", "deep", "big"]))
    if kind == "raw":
        return draw(st.binary(max_size=200))
    event = {"x": draw(st.one_of(numbers, json_values)),
             "y": draw(st.one_of(numbers, json_values))}
    event.update(draw(st.dictionaries(texts, json_values, max_size=3)))
    # Python's json writes lone surrogates as \\ud800 escapes, NaN as NaN, huge ints in full:
    # the kinds of text a careless producer sends.
    text = json.dumps(event)
    if kind == "deep":
        text = text[:-1] + f', "meta": {deep(draw(st.integers(100, 1500)))}}}'
    elif kind == "big":
        text = text[:-1] + f', "pad": "{"p" * draw(st.integers(3000, 9000))}"}}'
    return text.encode()


@pytest.fixture(scope="module")
def daemon():
    """A daemon owning two partitions whose models have warmed up on normal events (no broker:
    only the batch path between poll and publish runs)."""
    config = load_config(env={
        "STREAMGMM_FEATURES__FIELDS": "x,y",
        "STREAMGMM_FEATURES__MAX_EVENT_BYTES": "4000",
        "STREAMGMM_KAFKA__LIBRDKAFKA__MESSAGE_MAX_BYTES": "70000",
        "STREAMGMM_THRESHOLD__WARMUP_EVENTS": "200",
        "STREAMGMM_MODEL__N_COMPONENTS": "1",
        "STREAMGMM_MODEL__RANDOM_STATE": "0",
    })
    daemon = Daemon(config)
    import random

    rng = random.Random(0)
    for partition, centre in ((0, 0.0), (1, 3.0)):
        tp = TopicPartition("in", partition)
        detector = daemon._default_detector()
        daemon._tasks[tp] = _Task(PartitionState(tp, detector, learned=0),
                                  BatchPipeline.from_config(config, detector), publish_from=0)
        warm = [orjson.dumps({"x": rng.gauss(centre, 1), "y": rng.gauss(0, 1)})
                for _ in range(400)]
        process(daemon, records(warm, partition=partition))
        assert not detector.warming_up
    assert daemon._reference() is not None, "the two partitions' models are merged"
    return daemon


def records(values, start: int = 0, partition: int = 0) -> list:
    return [SimpleNamespace(value=v, key=None, headers=None, topic="in", partition=partition,
                            offset=start + i) for i, v in enumerate(values)]


def process(daemon, batch):
    """Score, decide and learn ``batch`` (one partition's records) as the daemon's loop does."""
    task = daemon._tasks[TopicPartition(batch[0].topic, batch[0].partition)]
    task.publish_from, task.published = batch[0].offset, set()  # every example is new
    return daemon._process_run(task, batch)


@settings(max_examples=EXAMPLES, deadline=timedelta(seconds=2),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(st.lists(payloads(), min_size=1, max_size=8), st.sampled_from([0, 1]))
def test_every_payload_is_scored_or_dead_lettered_and_every_message_is_valid(daemon, values,
                                                                              partition):
    batch = records(values, partition=partition)
    outgoing, extraction, result = process(daemon, batch)
    scored = {int(i) for i in extraction.indices}
    dead = {letter.index for letter in extraction.dead_letters}
    assert scored.isdisjoint(dead)
    assert scored | dead == set(range(len(batch)))
    for record in outgoing:
        assert record_size(record) <= daemon.max_record_bytes
        assert record.source[:2] == ("in", partition)
        if record.topic == daemon.config.kafka.output_topic:
            document = json.loads(record.value.decode("utf-8"))  # strict UTF-8
            orjson.loads(record.value)  # no lone surrogate escapes, no NaN
            assert source_of_output(record.value) == record.source
            # An infinite score (a feature near 1e154 overflows the squares) is written null.
            assert int(record.source[2]) in scored and "score" in document
        else:
            assert source_of_dead_letter(record.headers) == record.source
            assert record.source[2] in dead
    letters = {r.source[2] for r in outgoing if r.topic == daemon.config.kafka.dead_letter_topic}
    assert letters == dead, "every unscorable record has its dead letter to publish"
