"""A fuzzer over event payloads: decode → detect → message never crashes, whatever arrives.

Hypothesis generates hostile payloads (random bytes, JSON with lone surrogates, deep nesting,
huge integers, NaN and infinities, wrong types, oversized values) around events whose features are
extreme enough to be anomalies, and feeds them through the daemon's own batch path
(:meth:`streamgmm.service.Daemon.process_batch`, the code between ``poll`` and ``publish``). For
every input record it asserts:

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
from streamgmm.io.base import record_size
from streamgmm.messages import source_of_dead_letter, source_of_output
from streamgmm.service import Daemon

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
def daemon(tmp_path_factory):
    """A daemon whose model has warmed up on normal events (no broker: process_batch only)."""
    checkpoint = tmp_path_factory.mktemp("fuzz") / "none.npz"
    config = load_config(env={
        "STREAMGMM_FEATURES__FIELDS": "x,y",
        "STREAMGMM_FEATURES__MAX_EVENT_BYTES": "4000",
        "STREAMGMM_KAFKA__LIBRDKAFKA__MESSAGE_MAX_BYTES": "70000",
        "STREAMGMM_THRESHOLD__WARMUP_EVENTS": "200",
        "STREAMGMM_MODEL__N_COMPONENTS": "1",
        "STREAMGMM_MODEL__RANDOM_STATE": "0",
        "STREAMGMM_CHECKPOINT__PATH": str(checkpoint),
    })
    daemon = Daemon(config)
    import random

    rng = random.Random(0)
    warm = [orjson.dumps({"x": rng.gauss(0, 1), "y": rng.gauss(0, 1)}) for _ in range(400)]
    daemon.process_batch(records(warm))
    assert not daemon.detector.warming_up
    return daemon


def records(values, start: int = 0) -> list:
    return [SimpleNamespace(value=v, key=None, headers=None, topic="in", partition=0,
                            offset=start + i) for i, v in enumerate(values)]


@settings(max_examples=EXAMPLES, deadline=timedelta(seconds=2),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(st.lists(payloads(), min_size=1, max_size=8))
def test_every_payload_is_scored_or_dead_lettered_and_every_message_is_valid(daemon, values):
    batch = records(values)
    outgoing, extraction, result = daemon.process_batch(batch)
    scored = {int(i) for i in extraction.indices}
    dead = {letter.index for letter in extraction.dead_letters}
    assert scored.isdisjoint(dead)
    assert scored | dead == set(range(len(batch)))
    for record in outgoing:
        assert record_size(record) <= daemon.max_record_bytes
        if record.topic == daemon.config.kafka.output_topic:
            document = json.loads(record.value.decode("utf-8"))  # strict UTF-8
            orjson.loads(record.value)  # no lone surrogate escapes, no NaN
            assert source_of_output(record.value) == record.source
            # An infinite score (a feature near 1e154 overflows the squares) is written null.
            assert int(record.source[2]) in scored and "score" in document
        else:
            assert source_of_dead_letter(record.headers) == record.source
            assert record.source[2] in dead
