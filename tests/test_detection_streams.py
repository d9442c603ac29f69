"""Protected learning and adoption on labelled synthetic streams (score first, then learn).

Point anomalies and bursts must be flagged and never learned as normal; a persistent new mode and
an abrupt or gradual shift of the whole stream must be adopted, so that the false-alarm rate
returns to its target instead of locking in at 100 %.
"""

from __future__ import annotations

import numpy as np
import pytest

from streamgmm import _synthetic as syn
from streamgmm.detector import Detector

N = 40_000


def _run(X, target, batch=100, **kw):
    det = Detector(false_alarm_rate=target, **{"random_state": 0, **kw})
    results = [det.process(b) for b in np.array_split(X, len(X) // batch)]
    flags = np.concatenate([r.is_anomaly for r in results])
    decided = ~np.concatenate([r.warming_up for r in results])
    return det, flags, decided, results


@pytest.mark.parametrize("target", [0.01, 0.001])
def test_point_anomalies_are_flagged_and_the_false_alarm_rate_is_kept(target):
    # With 1 % anomalies against a 0.1 % target, anomalies that score just above the threshold
    # can inflate it (threshold.py) and halve the realised rate for some initialisations; the
    # rate is checked on average over three seeds of the engine.
    X, y = syn.mixture_with_outliers(N, contamination=0.01, seed=1)
    rates = []
    for seed in range(3):
        det, flags, decided, _ = _run(X, target, random_state=seed)
        normal = decided & (y == 0)
        assert flags[decided & (y == 1)].mean() >= 0.95
        assert det.n_adoptions == 0
        rates.append(flags[normal].mean() / target)
    assert abs(np.mean(rates) - 1.0) < 0.25, rates


@pytest.mark.parametrize("target", [0.01, 0.001])
def test_bursts_are_flagged_and_not_adopted(target):
    X, y = syn.bursts(N, seed=2)
    det, flags, decided, _ = _run(X, target)
    assert flags[decided & (y == 1)].mean() >= 0.95
    assert det.n_adoptions == 0
    assert det.n_shifts == 0  # a third of the traffic in a burst is not a shift of the stream
    assert flags[decided & (y == 0)].mean() < 1.5 * target


@pytest.mark.parametrize("target", [0.01, 0.001])
def test_a_persistent_new_mode_is_adopted(target):
    X, _ = syn.new_mode(N, start=0.5, share=0.2, seed=3)
    det, flags, decided, _ = _run(X, target)
    assert det.n_adoptions >= 1
    first_new = N // 2
    # it is flagged at first (it is new) ...
    assert flags[first_new : first_new + 500].mean() > 0.1
    # ... and then learned: the last quarter is back at the target rate
    assert flags[-N // 4 :].mean() < 2.0 * target


def test_a_new_mode_is_not_adopted_early_by_borrowing_the_span_of_older_flags():
    # A trickle of rare events (0.3 %) where a mode later appears: clustered together with the
    # new mode's first events, they used to give it a span of thousands of events at once.
    rng = np.random.default_rng(7)
    n, start = 12_000, 8000
    X = rng.normal(size=(n, 4))
    centre = np.full(4, 8.0)
    trickle = np.flatnonzero(rng.random(n) < 0.003)
    trickle = trickle[(trickle > 2000) & (trickle < start)]
    new = start + np.flatnonzero(rng.random(n - start) < 0.2)
    X[trickle] = centre + rng.normal(size=(len(trickle), 4))
    X[new] = centre + rng.normal(size=(len(new), 4))
    det = Detector(false_alarm_rate=0.01, random_state=0)
    adopted_at = None
    for i in range(0, n, 50):
        det.process(X[i : i + 50])
        if det.n_adoptions and adopted_at is None:
            adopted_at = i + 50
    assert adopted_at is not None
    assert adopted_at - start >= 0.8 * det.adoption_persistence


@pytest.mark.parametrize("target", [0.01, 0.001])
def test_abrupt_shift_is_adopted_and_outliers_are_still_caught_after_it(target):
    X, y = syn.abrupt_drift(N, at=0.5, shift=10.0, contamination=0.005, seed=4)
    det, flags, decided, results = _run(X, target)
    assert det.n_adoptions >= 1
    last = slice(-N // 4, None)
    assert flags[last][y[last] == 0].mean() < 2.0 * target
    assert flags[last][y[last] == 1].mean() >= 0.9
    assert results[-1].drift.n_drifts >= 1


@pytest.mark.parametrize("target", [0.01, 0.001])
def test_a_shift_of_the_whole_stream_is_adopted_without_waiting_for_persistence(target):
    # When most events are flagged the old normal is gone: the new regime is adopted within a
    # few hundred events, not after most of adoption_persistence (1000) events flagged at 100 %.
    X, y = syn.abrupt_drift(N, at=0.5, shift=10.0, contamination=0.005, seed=4)
    after = slice(N // 2 + 250, N // 2 + 750)
    normal_after = y[after] == 0
    det, flags, _, _ = _run(X, target)
    assert det.n_shifts == 1 and det.n_adoptions >= 1
    assert flags[after][normal_after].mean() < 0.15
    assert flags[-N // 4 :][y[-N // 4 :] == 1].mean() >= 0.9  # outliers are still caught
    waiting, flags, _, _ = _run(X, target, shift_fraction=1.0)  # the rule off
    assert waiting.n_shifts == 0
    assert flags[after][normal_after].mean() > 0.9


@pytest.mark.parametrize("target", [0.01, 0.001])
def test_gradual_drift_is_followed(target):
    X, y = syn.gradual_drift(N, total_shift=10.0, contamination=0.005, seed=5)
    det, flags, decided, _ = _run(X, target)
    assert flags[decided & (y == 0)].mean() < 1.5 * target
    assert flags[decided & (y == 1)].mean() >= 0.9


def test_without_protection_anomalies_are_learned_as_normal():
    # A recurring anomaly pattern at 2 % of the traffic: protection keeps it anomalous (it is
    # scattered over a cluster too sparse to be a mode); without it the model absorbs it.
    X, y = syn.mixture_with_outliers(N, contamination=0.03, seed=6)
    _, protected, decided, _ = _run(X, 0.001)
    _, unprotected, _, _ = _run(X, 0.001, protect=False)
    late = decided & (np.arange(N) > N // 2) & (y == 1)
    assert protected[late].mean() > 0.95
    assert protected[late].mean() > unprotected[late].mean() + 0.05


@pytest.mark.parametrize(("seed", "batch"), [(0, 5000), (4, 5000), (4, 256)])
def test_a_shift_inside_one_large_batch_is_adopted_after_it(seed, batch):
    # Batches of 5000 (the replay path's): the shift at 10,000 is decided by the old model in
    # one batch, flagged throughout. The shift rule then clustered only what was flagged in the
    # last shift_window events -- in a buffer thinned to 500 of the batch's 5000 flags, a dozen,
    # too few to adopt -- and every later batch was flagged at 100 %. (In batches of 256, a
    # batch cut as soon as the shift rule fired gave the new regime one broad component, and
    # the outliers after it were missed: recall 0.)
    X, y = syn.abrupt_drift(20_000, at=0.5, shift=10.0, contamination=0.005, seed=seed)
    det = Detector(false_alarm_rate=0.001, random_state=0)
    flags = np.concatenate([det.process(X[i : i + batch]).is_anomaly
                            for i in range(0, len(X), batch)])
    assert det.n_shifts >= 1 and det.n_adoptions >= 1
    later = slice(15_000, None)
    assert flags[later][y[later] == 0].mean() < 0.1
    assert flags[later][y[later] == 1].mean() >= 0.9  # outliers are still caught


@pytest.mark.parametrize("seed", [0, 1])
def test_gradual_drift_in_one_large_batch_is_followed_to_its_end(seed):
    # The replay path: one batch of 5000 (decided after the 1000-event warm-up) drifting by
    # 10 in every feature. Cut where most events are flagged, the first adoption covers part
    # of where the stream has gone; while each part adopts, the rest is cut again, and the
    # last 1000 events are decided by a model that followed (flagged: 67 % and 36 % when only
    # the first cut was made).
    X, y = syn.gradual_drift(5000, total_shift=10.0, contamination=0.01, seed=seed)
    det = Detector(false_alarm_rate=0.001, random_state=0)
    flags = det.process(X).is_anomaly
    assert det.n_adoptions >= 2
    last = slice(-1000, None)
    assert flags[last][y[last] == 0].mean() < 0.25  # 0.0 and 0.20
    assert flags[last][y[last] == 1].mean() >= 0.8
