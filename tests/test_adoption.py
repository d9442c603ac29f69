"""Adoption policy: parameters, the faster forgetting after an adoption, its state."""

from __future__ import annotations

import numpy as np
import pytest

from streamgmm.adoption import AdoptionParameters, AdoptionPolicy
from streamgmm.detector import Detector
from streamgmm.mixture import OnlineGaussianMixture


def _adopting_run(persistence=400, batches=10):
    rng = np.random.default_rng(0)
    model = OnlineGaussianMixture(1, random_state=0).fit(rng.normal(0, 1, (2000, 2)))
    policy = AdoptionPolicy(AdoptionParameters(window=2000, persistence=persistence),
                            false_alarm_rate=0.01, forgetting=0.002)
    now, floors = 0, []
    for _ in range(batches):
        X = rng.normal(8, 1, (40, 2))  # every event from a new mode: a shift, then adopted
        now += len(X)
        flagged = -model.score_samples(X) > 6.0
        policy.update(model, X, np.ones(len(X), bool), flagged, now, threshold=6.0)
        policy.advance(model, len(X))
        floors.append(model.min_step)
    return model, policy, floors


def test_after_an_adoption_the_model_forgets_faster_for_persistence_events_only():
    model, policy, floors = _adopting_run(persistence=400, batches=30)
    assert policy.n_adoptions == 1 and policy.n_shifts == 1
    # The floor, raised after the adopting batch, holds until 400 events have passed since it
    # (the adopting batch's 40 included): 9 batches of 40, in one stretch.
    boosted = np.flatnonzero(np.array(floors) == 0.05)
    assert boosted.size == 400 // 40 - 1 and np.all(np.diff(boosted) == 1)
    assert floors[-1] == 0.002 and policy.boost_remaining == 0


def test_policy_state_round_trip():
    model, policy, _ = _adopting_run()
    arrays, meta = policy.get_state()
    clone = AdoptionPolicy(policy.parameters, 0.01, 0.002)
    clone.set_state(arrays, meta)
    assert clone.get_state()[1] == meta
    for name, value in arrays.items():
        assert np.array_equal(clone.get_state()[0][name], value)
    del meta["shift_start"]
    with pytest.raises(KeyError, match="shift_start"):
        clone.set_state(arrays, meta)


@pytest.mark.parametrize(("params", "message"), [
    ({"shift_window": 0}, "shift_window"),
    ({"shift_fraction": 0.0}, "shift_fraction"),
    ({"shift_fraction": 1.5}, "shift_fraction"),
])
def test_invalid_parameters_are_refused_by_name(params, message):
    with pytest.raises(ValueError, match=message):
        AdoptionParameters(**params)
    with pytest.raises(ValueError, match=message):
        Detector(**params)


def test_defaults_scale_with_the_number_of_features():
    p = AdoptionParameters()
    assert p.min_events_for(3) == 30 and p.min_events_for(20) == 42
    assert p.shift_window_for(3) == 120
    assert AdoptionParameters(shift_window=50).shift_window_for(3) == 50


def test_the_engine_checks_its_step_floor():
    model = OnlineGaussianMixture(1)
    model.set_min_step(0.1)
    assert model.min_step == 0.1
    with pytest.raises(ValueError, match="min_step"):
        model.set_min_step(1.0)


def test_a_shift_flagged_throughout_one_large_batch_is_adopted_from_it():
    # One batch of 5000, every event from a new regime: the buffer (60 here, 500 by default)
    # must be a sample of the window's flags, and the shift began where the flags became the
    # majority. The buffer used to be thinned before the events older than the window left
    # (24 of 60 kept), and a shift to begin at the first flag of the last shift_window (120)
    # events (4 of them buffered): either left fewer than min_events (30) to cluster, and the
    # regime was flagged batch after batch.
    rng = np.random.default_rng(0)
    model = OnlineGaussianMixture(1, random_state=0).fit(rng.normal(0, 1, (2000, 2)))
    policy = AdoptionPolicy(AdoptionParameters(buffer=60, window=2000, persistence=1000),
                            false_alarm_rate=0.001, forgetting=0.002)
    X = rng.normal(8, 1, (5000, 2))
    flagged = -model.score_samples(X) > 6.0
    assert flagged.all()
    policy.update(model, X, np.ones(len(X), bool), flagged, 5000, threshold=6.0)
    assert policy.n_shifts == 1
    assert policy.n_adoptions == 1 and len(model.weights_) == 2


def test_attempts_on_scattered_flags_back_off_and_a_dense_new_mode_is_still_adopted(monkeypatch):
    # Scattered anomalies that keep coming (River's Shuttle: 7 % of the events) are never dense
    # enough to adopt; each attempt that finds no dense cluster doubles the flags the next one
    # waits for (they fitted a mixture to the buffer every min_events flags: a quarter of
    # GMMDetector's time on Shuttle). A dense new mode still gets its attempts and is adopted.
    rng = np.random.default_rng(0)
    model = OnlineGaussianMixture(1, random_state=0).fit(rng.normal(0, 1, (2000, 2)))
    policy = AdoptionPolicy(AdoptionParameters(window=2000, persistence=400),
                            false_alarm_rate=0.01, forgetting=0.002)
    attempts = []
    groups = policy._candidate_groups
    monkeypatch.setattr(policy, "_candidate_groups",
                        lambda *a: attempts.append(1) or groups(*a))
    now = 0
    for _ in range(100):  # 4000 events, 10 % of them scattered far out (min_events 30)
        X = rng.normal(0, 1, (40, 2))
        X[:4] = rng.uniform(-40, 40, (4, 2))
        now += len(X)
        flagged = -model.score_samples(X) > 8.0
        policy.update(model, X, np.ones(len(X), bool), flagged, now, threshold=8.0)
    assert policy.n_adoptions == 0
    assert 3 <= len(attempts) <= 6  # every 30 flags: 12 attempts
    for _ in range(40):  # now a dense mode at (8, 8) as well, 25 % of the traffic
        X = rng.normal(0, 1, (40, 2))
        X[:4] = rng.uniform(-40, 40, (4, 2))
        X[4:14] = rng.normal(8, 0.5, (10, 2))
        now += len(X)
        flagged = -model.score_samples(X) > 8.0
        policy.update(model, X, np.ones(len(X), bool), flagged, now, threshold=8.0)
        policy.advance(model, len(X))
    assert policy.n_adoptions >= 1
    state = policy.get_state()[1]
    assert "attempt_wait" in state
    del state["attempt_wait"]  # a state from before the rule loads, with no wait
    policy.set_state(policy.get_state()[0], state)
    assert policy.attempt_wait == 0
