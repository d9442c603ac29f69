"""The fleet view of the state topic and the partition-state records (pure logic, no broker)."""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import numpy as np
import pytest

from streamgmm.checkpoint import CheckpointError
from streamgmm.detector import Detector
from streamgmm.fleet import FleetView, merge_models
from streamgmm.io.base import TopicPartition
from streamgmm.mixture import OnlineGaussianMixture
from streamgmm.partition_state import PartitionState, decode_state, encode_state, state_key

FIELDS = ["a", "b"]


def trained(n: int, centre: float, seed: int = 0) -> Detector:
    det = Detector(n_components=1, warmup_events=200, random_state=0)
    det.process(np.random.default_rng(seed).normal(centre, 1.0, size=(n, 2)))
    return det


def record(tp: TopicPartition, detector, learned: int, fields=FIELDS):
    state = PartitionState(tp, detector, learned, learned, {TopicPartition("out", 0): 7}, "r1")
    return SimpleNamespace(key=state_key(tp), value=encode_state(state, fields))


def test_a_state_record_round_trips_and_refuses_what_is_not_its_own():
    tp = TopicPartition("in", 2)
    rec = record(tp, trained(500, 0.0), 500)
    state = decode_state(rec.value, rec.key, FIELDS)
    assert (state.partition, state.learned, state.replica) == (tp, 500, "r1")
    assert state.output_positions == {TopicPartition("out", 0): 7}
    with pytest.raises(CheckpointError, match="not of its key"):
        decode_state(rec.value, b"in:3", FIELDS)
    with pytest.raises(CheckpointError, match="made for features"):
        decode_state(rec.value, rec.key, ["a", "c"])
    with pytest.raises(CheckpointError, match="not a compressed state"):
        decode_state(b"garbage", rec.key, FIELDS)
    with pytest.raises(CheckpointError, match="uncompressed"):  # a zlib bomb
        decode_state(zlib.compress(b"\0" * (80 << 20)), rec.key, FIELDS)
    with pytest.raises(CheckpointError, match="empty"):
        decode_state(b"", rec.key, FIELDS)


def test_the_merged_model_is_the_mixture_of_the_partitions_mixtures():
    a = OnlineGaussianMixture.from_parameters([1.0], [[0.0, 0.0]], [np.eye(2)])
    b = OnlineGaussianMixture.from_parameters([0.5, 0.5], [[5.0, 0.0], [0.0, 5.0]],
                                              [np.eye(2), np.eye(2)])
    merged = merge_models([(a, 1.0), (b, 3.0)])
    X = np.random.default_rng(0).normal(size=(20, 2)) * 3
    expected = np.logaddexp(np.log(0.25) + a.score_samples(X), np.log(0.75) + b.score_samples(X))
    assert np.allclose(merged.score_samples(X), expected)


def test_the_fleet_keeps_the_newest_states_skips_bad_records_and_merges_the_rest():
    fleet = FleetView(FIELDS)
    p0, p1, p2 = (TopicPartition("in", p) for p in range(3))
    old, new = trained(400, 0.0), trained(900, 0.0, seed=1)
    bad = SimpleNamespace(key=b"in:9", value=b"not a state")
    n = fleet.ingest([record(p0, old, 400), record(p0, new, 900),
                      record(p1, trained(300, 9.0), 300), bad,
                      SimpleNamespace(key=None, value=b"x")])
    assert n == 3 and fleet.rejected == 2 and fleet.foreign is None
    assert [s.learned for s in fleet.candidates(p0)] == [900, 400]
    assert fleet.most_experienced().partition == p0
    assert fleet.most_experienced(exclude=[p0]).partition == p1
    assert fleet.reference({}).n_components_ == 2
    # this replica's live model of p1 counts instead of its written state
    live = trained(300, 20.0)
    merged = fleet.reference({p1: live})
    assert np.isclose(merged.means_[:, 0], 20.0, atol=0.5).any()
    # a single model is no merge
    assert FleetView(FIELDS).reference({p2: live}) is None
    fleet.ingest([SimpleNamespace(key=state_key(p1), value=None)])  # a tombstone
    assert fleet.partitions() == {p0}
    other = FleetView(FIELDS)
    other.ingest([record(p0, old, 400, fields=["x", "y"])])
    assert other.foreign is not None and other.partitions() == set()
