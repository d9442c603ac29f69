"""Detector: warm-up, decisions, missing features (exact marginal), explanations, state."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from streamgmm import _synthetic as syn
from streamgmm.checkpoint import CheckpointError, read_state
from streamgmm.detector import Detector


def _stream(n=6000, seed=0):
    X, _ = syn.mixture_with_outliers(n, n_features=3, contamination=0.0, seed=seed)
    return X


def _warm(det, X, batch=200):
    results = [det.process(b) for b in np.array_split(X, max(len(X) // batch, 1))]
    return results


def test_warm_up_is_visible_and_nothing_is_flagged_meanwhile():
    det = Detector(n_components=2, warmup_events=1000, false_alarm_rate=0.01, random_state=0)
    X = _stream(3000)
    X[100] = 1e6  # an absurd event inside the model's warm-up
    X[700] = 1e6  # and one inside the threshold's warm-up
    results = _warm(det, X, batch=100)
    warming = np.concatenate([r.warming_up for r in results])
    flags = np.concatenate([r.is_anomaly for r in results])
    score = np.concatenate([r.score for r in results])
    component = np.concatenate([r.component for r in results])
    assert warming[:1000].all() and not warming[1000:].any()
    assert not flags[:1000].any()
    # the model's warm-up is scored by the predictive of the events before (not decided)
    assert np.isnan(score[:2]).all() and np.isfinite(score[2:]).all()
    assert (component[:500] == -1).all() and (component[500:] >= 0).all()
    assert np.isnan(results[0].anomaly_score).all() and results[0].explain(0) == []
    assert not det.warming_up
    assert det.process(np.full((1, 3), 1e6)).is_anomaly.all()


def test_a_batch_larger_than_the_warm_up_is_decided_after_it():
    X, _ = syn.mixture_with_outliers(5000, seed=3)
    det = Detector(n_components=2, warmup_events=1000, random_state=0)
    res = det.process(X)  # one batch of 5000: warm-up must not swallow it all
    assert len(res) == 5000 and res.warming_up[:900].all()
    assert not res.warming_up[1000:].any()
    assert np.isfinite(res.score[1000:]).all() and np.isfinite(res.threshold[1000:]).all()
    assert res.is_anomaly[1000:].sum() > 0 and not res.is_anomaly[:900].any()
    assert det.n_events_learned == 5000


@pytest.mark.parametrize("score", ["tail", "density"])
def test_result_fields_are_consistent(score):
    # The batch is another mixture, a shift of the whole stream: with the shift rule on, the
    # batch would be cut where it begins (test_a_batch_in_which_the_stream_shifts_is_cut...)
    # and its later events scored by a model that differs from score_samples' before.
    det = Detector(n_components=3, false_alarm_rate=0.01, random_state=1, score=score,
                   shift_fraction=1.0)
    _warm(det, _stream(5000))
    batch = _stream(500, seed=1)
    before = det.score_samples(batch)  # scores without learning: what process will report
    res = det.process(batch)
    assert np.allclose(res.score, before)
    if score == "density":
        assert np.allclose(res.score, -res.log_likelihood)
    else:  # -log of a probability mass; the model's log-likelihoods are still reported
        assert (res.score >= 0).all() and np.isfinite(res.log_likelihood).all()
    assert np.array_equal(res.is_anomaly, res.score > res.threshold)
    assert np.array_equal(res.is_anomaly, res.anomaly_score > 1.0)
    assert ((res.tail_probability > 0) & (res.tail_probability <= 1)).all()
    order = np.argsort(res.score)
    assert np.all(np.diff(res.tail_probability[order]) <= 1e-12)
    assert res.drift.target_anomaly_rate == 0.01
    assert res.drift.n_drifts == det.drift.n_drifts
    assert len(res) == 500 and det.n_events_learned == 5500


def test_a_batch_in_which_the_stream_shifts_is_cut_where_the_shift_rule_fires():
    # One batch of 2000 from another mixture: decided by the old model throughout, it was
    # flagged throughout. Cut where most of it is flagged, the part after it is decided by the
    # model that adopted the new regime -- as if the caller had cut the batch there.
    X = _stream(2000, seed=1)
    det = Detector(n_components=3, false_alarm_rate=0.01, random_state=1)
    _warm(det, _stream(5000))
    clone = Detector.from_state(*det.get_state())
    before = det.score_samples(X)
    res = det.process(X)
    assert det.n_shifts == 1 and det.n_adoptions >= 1
    cut = int(np.argmax(~np.isclose(res.score, before)))
    assert 120 < cut <= 1000 and np.allclose(res.score[:cut], before[:cut])
    assert res.is_anomaly[:cut].mean() > 0.5 and res.is_anomaly[-1000:].mean() < 0.1
    parts = [clone.process(X[:cut]), clone.process(X[cut:])]
    assert np.array_equal(res.score, np.concatenate([p.score for p in parts]))
    assert np.array_equal(res.is_anomaly, np.concatenate([p.is_anomaly for p in parts]))
    assert res.drift.drift_detected == any(p.drift.drift_detected for p in parts)
    assert det.n_events_learned == clone.n_events_learned == 7000


def test_drift_is_reported_for_a_changed_stream_and_not_for_a_stationary_one():
    stationary = Detector(n_components=3, false_alarm_rate=0.01, random_state=1)
    reports = [r.drift for r in _warm(stationary, _stream(20000))]
    assert stationary.drift.n_drifts == 0 and not any(r.drift_detected for r in reports)
    changed = Detector(n_components=3, false_alarm_rate=0.01, random_state=1)
    _warm(changed, _stream(5000))
    report = changed.process(_stream(500, seed=1)).drift  # another mixture: log p(x) drops
    assert report.drift_detected and report.n_drifts == changed.drift.n_drifts == 1


def test_drift_summaries_can_be_skipped_without_changing_anything_else():
    X = np.r_[_stream(4000), _stream(2000, seed=1)]  # a change: drifts and re-snapshots
    full = Detector(n_components=3, false_alarm_rate=0.01, random_state=1)
    lean = Detector(n_components=3, false_alarm_rate=0.01, random_state=1)
    for batch in np.array_split(X, 30):
        a, b = full.process(batch), lean.process(batch, drift_summaries=False)
        np.testing.assert_array_equal(a.score, b.score)
        np.testing.assert_array_equal(a.is_anomaly, b.is_anomaly)
        kept = {k: v for k, v in a.drift.as_dict().items()
                if k not in ("kl_divergence", "mean_displacement", "weight_entropy")}
        assert kept == {k: b.drift.as_dict()[k] for k in kept}
        assert math.isnan(b.drift.kl_divergence) and math.isnan(b.drift.weight_entropy)
    assert full.drift.n_drifts == lean.drift.n_drifts >= 1
    assert math.isfinite(a.drift.kl_divergence) and math.isfinite(a.drift.mean_displacement)
    np.testing.assert_array_equal(full.model.means_, lean.model.means_)


def test_missing_features_are_marginalised_exactly():
    det = Detector(n_components=3, false_alarm_rate=0.01, random_state=2)
    _warm(det, _stream(5000))
    w, mu, cov = det.model.weights_, det.model.means_, det.model.covariances_
    learned = det.n_events_learned
    X = _stream(20, seed=3)
    X[0, 1] = np.nan
    X[1, [0, 2]] = np.nan
    X[2] = [np.nan, mu[0, 1], np.nan]
    res = det.process(X)
    for i in range(3):
        o = ~np.isnan(X[i])
        exact = logsumexp([
            math.log(w[k]) + multivariate_normal(mu[k][o], cov[k][np.ix_(o, o)]).logpdf(X[i, o])
            for k in range(len(w))
        ])
        assert res.log_likelihood[i] == pytest.approx(exact, rel=1e-9, abs=1e-9)
    assert det.n_events_learned == learned + 17  # incomplete events are not learned
    # On the complete-event scale: a far value in the one observed feature is flagged.
    far = det.process(np.array([[np.nan, mu[0, 1] + 50 * math.sqrt(cov[0, 1, 1]), np.nan]]))
    assert far.is_anomaly[0] and far.score[0] > far.threshold[0]
    assert far.explain(0)[0]["feature"] == "x1"
    assert {e["direction"] for e in far.explain(0)} == {"high", "missing"}


def test_incomplete_scores_share_the_threshold_calibration():
    # Normal events with a feature missing are flagged at about the rate complete ones are.
    det = Detector(n_components=3, false_alarm_rate=0.02, random_state=3)
    X = _stream(46_000)
    _warm(det, X[:6000])
    X = X[6000:].copy()
    incomplete = np.random.default_rng(4).random(len(X)) < 0.5
    X[incomplete, 2] = np.nan
    flags = np.concatenate([det.process(b).is_anomaly for b in np.array_split(X, 200)])
    assert 0.012 < flags[~incomplete].mean() < 0.03
    assert 0.012 < flags[incomplete].mean() < 0.03


def test_explanations_add_up_and_give_conditional_expectations():
    det = Detector(n_components=2, false_alarm_rate=0.01, random_state=4,
                   feature_names=["a", "b", "c"])
    _warm(det, _stream(5000))
    mu_before, cov_before = det.model.means_.copy(), det.model.covariances_.copy()
    x = mu_before[0] + np.array([0.0, 8.0, -1.0]) * np.sqrt(np.diag(cov_before[0]))
    res = det.process(np.vstack([x, mu_before[1]]))
    for i in range(2):
        items = res.explain(i)
        assert [it["feature"] for it in items] != [] and len(items) == 3
        total = sum(it["contribution"] for it in items)
        assert total == pytest.approx(res.score[i] - res.typical_score[i], abs=1e-9)
        assert all(abs(items[j]["contribution"]) >= abs(items[j + 1]["contribution"])
                   for j in range(2))
    k = res.component[0]
    mu, cov = mu_before[k], cov_before[k]
    for item in res.explain(0):
        j = ["a", "b", "c"].index(item["feature"])
        rest = [r for r in range(3) if r != j]
        cond = mu[j] + cov[j, rest] @ np.linalg.solve(cov[np.ix_(rest, rest)], x[rest] - mu[rest])
        assert item["expected"] == pytest.approx(cond)
        assert item["value"] == x[j]
    assert res.explain(0)[0]["feature"] == "b" and res.explain(0)[0]["direction"] == "high"
    assert res.is_anomaly[0] and not res.is_anomaly[1]


def test_fixed_threshold():
    det = Detector(n_components=3, fixed_threshold=15.0, random_state=5)
    results = _warm(det, _stream(4000))
    res = results[-1]
    assert (res.threshold == 15.0).all()
    assert np.array_equal(res.is_anomaly, res.score > 15.0)


@pytest.mark.parametrize("cut", [7000, 7600])  # before the shift at 7200, and during it
def test_state_round_trip_continues_identically(tmp_path, cut):
    X, _ = syn.abrupt_drift(12_000, n_features=3, at=0.6, seed=6)
    det = Detector(n_components="auto", false_alarm_rate=0.01, random_state=6)
    _warm(det, X[:cut])
    det.save(tmp_path / "det.npz")
    clone = Detector.load(tmp_path / "det.npz")
    for batch in np.array_split(X[cut:], 25):
        a, b = det.process(batch), clone.process(batch)
        assert np.array_equal(a.score, b.score, equal_nan=True)
        assert np.array_equal(a.is_anomaly, b.is_anomaly)
        assert a.drift == b.drift
    assert det.n_adoptions == clone.n_adoptions
    assert det.n_shifts == clone.n_shifts
    (tmp_path / "bad.npz").write_bytes(b"not a state")
    with pytest.raises(CheckpointError):
        Detector.load(tmp_path / "bad.npz")


DATA = Path(__file__).parent / "data"


def _expect_v2_continuation(det):
    """The batch after the version-2 state, decided as the code that wrote it decided it."""
    expected = np.load(DATA / "detector_v2_next.npz")
    res = det.process(expected["X"])
    np.testing.assert_allclose(res.score, expected["score"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(res.typical_score, expected["typical"], rtol=1e-9, atol=1e-9)
    assert np.array_equal(res.is_anomaly, expected["is_anomaly"])
    assert det.n_adoptions == expected["n_adoptions"] and det.n_shifts == expected["n_shifts"]
    assert det.model.min_step == expected["min_step"]


def test_a_version_2_state_loads_and_carries_on(tmp_path):
    # Written by streamgmm before the adoption policy had a state of its own (commit 384574f,
    # tests/data/make_detector_v2.py): saved just after an adoption, during the faster forgetting.
    det = Detector.load(DATA / "detector_v2.npz")
    assert det.n_adoptions == 1 and det.n_shifts == 1
    assert det.adoption.boost_remaining == 200 and det.model.min_step == 0.05
    _expect_v2_continuation(det)
    # The same state nested in a daemon checkpoint (no version of its own), and re-saved.
    arrays, meta = read_state(DATA / "detector_v2.npz", "Detector", 3)
    meta.pop("version")
    nested = Detector.from_state(arrays, meta)
    nested.save(tmp_path / "current.npz")
    assert read_state(tmp_path / "current.npz", "Detector", 4)[1]["version"] == 4
    _expect_v2_continuation(Detector.load(tmp_path / "current.npz"))


def test_a_version_2_state_from_before_the_shift_rule_loads():
    arrays, meta = read_state(DATA / "detector_v2.npz", "Detector", 3)
    for name in ("shift_remaining", "shift_start", "n_shifts"):
        del meta["detector"][name]
    det = Detector.from_state(arrays, meta)
    assert det.n_shifts == 0 and det.adoption.shift_remaining == 0 and det.n_adoptions == 1
    del meta["detector"]["rate_since"]  # a field every version 2 state has
    with pytest.raises(ValueError, match="rate_since"):
        Detector.from_state(arrays, meta)


def test_state_round_trip_during_warm_up():
    det = Detector(n_components=2, random_state=7)
    det.process(_stream(300))
    clone = Detector.from_state(*det.get_state())
    X = _stream(3000, seed=8)
    for batch in np.array_split(X, 10):
        assert np.array_equal(det.process(batch).score, clone.process(batch).score,
                              equal_nan=True)


@pytest.mark.parametrize(
    "X, message",
    [
        (np.zeros((2, 2, 2)), "2-D"),
        (np.array([[1.0, np.inf]]), "inf"),
        (np.array([[1.0, -1e200]]), r"row 0, feature 1.*beyond ±1e\+150"),
        (np.array([["a", "b"]]), "numeric"),
    ],
)
def test_bad_input_is_refused_with_a_reason(X, message):
    with pytest.raises(ValueError, match=message):
        Detector().process(X)


def test_one_value_too_large_to_square_is_refused_before_it_reaches_the_model():
    # 1e200 squared overflows a float64: learned, it left the covariances infinite (every later
    # score NaN, the warm-up never over: nothing flagged again) or made every later batch raise
    # LinAlgError. It is refused with its batch, and the detector goes on as if it never came.
    X = np.random.default_rng(1).normal(size=(3000, 3))
    det, clean = Detector(random_state=0), Detector(random_state=0)
    for i in range(0, 3000, 250):
        batch = X[i : i + 250]
        if i in (250, 2000):  # in the warm-up, and after it
            bad = batch.copy()
            bad[7, 0] = 1e200
            with pytest.raises(ValueError, match="beyond ±1e\\+150"):
                det.process(bad)
        assert np.array_equal(det.process(batch).score, clean.process(batch).score,
                              equal_nan=True)
    assert np.isfinite(det.model.covariances_).all() and not det.threshold.warming_up
    edge = X[:250].copy()
    edge[3, 1] = -1e150  # the largest magnitude accepted: learned without overflow
    assert det.process(edge).is_anomaly[3] and np.isfinite(det.model.covariances_).all()


@pytest.mark.parametrize("value", [1e6, 1e10])
def test_one_gross_error_in_the_warm_up_does_not_blind_the_detector(value):
    # One value of 1e6 or 1e10 in the warm-up (N(0, 1) data) set every component's
    # regularisation floor to ~1950 (or 2e11) along its feature: no 7-sigma anomaly along it
    # was ever flagged again (recall 0 of 40). The daemon learns no flagged event after the
    # warm-up, so there a gross error costs nothing.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4000, 3))
    X[60, 0] = value
    later = np.arange(2000, 4000, 50)
    X[later, 0] += 7.0
    det = Detector(random_state=0)
    flags = np.concatenate([det.process(X[i : i + 250]).is_anomaly for i in range(0, 4000, 250)])
    assert flags[later].mean() > 0.9 and flags[2000:].sum() - flags[later].sum() <= 10


def test_feature_count_must_not_change():
    det = Detector(n_components=1, warmup_events=20)
    det.process(np.random.default_rng(0).normal(size=(30, 2)))
    with pytest.raises(ValueError, match="3 features"):
        det.process(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="feature_names"):
        Detector(feature_names=["a"]).process(np.zeros((1, 2)))


def test_a_stream_shorter_than_the_warm_up_is_ranked_by_the_predictive():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    X = rng.normal([5.0, -3.0, 100.0], [1.0, 2.0, 10.0], (300, 3))
    y = np.zeros(300, dtype=int)
    y[[60, 120, 180, 240, 290]] = 1
    X[y == 1] += [6.0, -10.0, 60.0]
    det = Detector(warmup_events=1000, random_state=0)
    results = [det.process(X[i : i + 50]) for i in range(0, 300, 50)]
    score = np.concatenate([r.score for r in results])
    assert np.concatenate([r.warming_up for r in results]).all()
    assert not np.concatenate([r.is_anomaly for r in results]).any()
    assert roc_auc_score(y[2:], score[2:]) > 0.99


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_before_the_mixture_exists_an_event_that_breaks_a_correlation_is_ranked(seed):
    """10 features driven by two latent factors; the anomalies keep every feature within its
    normal range but break the correlations. The diagonal predictive alone cannot see them
    (ROC-AUC 0.5-0.7); with the full one's tail (its correlations shrunk by the OAS rule) the
    warm-up ranks them as the mixture would."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    loadings = rng.normal(size=(2, 10))
    X = rng.normal(size=(400, 2)) @ loadings + 0.1 * rng.normal(size=(400, 10))
    y = np.zeros(400, dtype=int)
    y[rng.choice(np.arange(40, 400), 12, replace=False)] = 1
    X[y == 1] = rng.permuted(X[y == 1], axis=0) * rng.choice([-1.0, 1.0], (12, 10))
    det = Detector(warmup_events=1000, random_state=0)
    score = np.concatenate([det.process(X[i : i + 100]).score for i in range(0, 400, 100)])
    assert np.isfinite(score[3:]).all()
    assert roc_auc_score(y[3:], score[3:]) > 0.95


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_before_the_mixture_exists_an_event_between_two_normal_modes_is_ranked(seed):
    """4 features, two normal modes 6 standard deviations apart, anomalies between them. One
    Gaussian over the modes puts its mean where the anomalies are (ROC-AUC 0.003-0.02); the
    warm-up scores by the mixture BIC prefers (0.97-0.995)."""
    from sklearn.metrics import roc_auc_score

    X, y = syn.anomalies_between_modes(400, seed=seed)
    det = Detector(warmup_events=1000, random_state=0)
    score = np.concatenate([det.process(X[i : i + 100]).score for i in range(0, 400, 100)])
    assert np.isfinite(score[3:]).all()
    assert roc_auc_score(y[3:], score[3:]) > 0.95


def test_the_warm_up_mixture_is_fitted_once_per_refit_point_however_small_the_batches(
        monkeypatch):
    """A daemon polling at a low rate hands the warm-up batches of a few events: the mixture
    is fitted at the fixed refit points only (30 for 400 rows, not one per batch), the scores
    do not depend on how the stream was cut into batches, and a detector restored from its
    state mid-warm-up scores on as the one that ran through."""
    from streamgmm import mixture

    X, _ = syn.anomalies_between_modes(400, seed=0)
    fits = []
    real = mixture.mixture_predictive
    monkeypatch.setattr(mixture, "mixture_predictive",
                        lambda rows, *args: fits.append(len(rows)) or real(rows, *args))
    det = Detector(warmup_events=1000, random_state=0)
    small = np.concatenate([det.process(X[i : i + 5]).score for i in range(0, 400, 5)])
    points = mixture.refit_points(400, *mixture._MODES_GRID)
    assert fits == points
    whole = Detector(warmup_events=1000, random_state=0).process(X).score
    np.testing.assert_allclose(small, whole, rtol=1e-9)  # however the stream was cut
    head = Detector(warmup_events=1000, random_state=0)
    head.process(X[:203])
    restored = Detector.from_state(*head.get_state())
    np.testing.assert_array_equal(restored.process(X[203:]).score, small[203:])


def test_refits_recalibrate_the_threshold_on_cross_fitted_scores():
    X = _stream(3000, seed=5)
    det = Detector(warmup_events=200, false_alarm_rate=0.01, random_state=0, refit_events=1000)
    results = _warm(det, X, batch=50)
    assert det.model.n_refits_ >= 3
    flags = np.concatenate([r.is_anomaly for r in results])
    decided = ~np.concatenate([r.warming_up for r in results])
    assert 0.005 < flags[decided].mean() < 0.02


def _tight_light_cluster_stream(seed):
    """2-D normal events, 5 % of them replaced -- from the first event on -- by anomalies packed
    in a cluster 100 times tighter than the normal spread."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(4000, 2))
    y = rng.random(4000) < 0.05
    X[y] = [4.0, 4.0] + 0.01 * rng.normal(size=(int(y.sum()), 2))
    return X, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_tight_light_cluster_of_anomalies_stays_ranked_as_anomalous(seed):
    """The warm-up gives the cluster a component; by density its members then score as the
    most normal events there are (ROC-AUC near 0 with seeds 0 and 2; with seed 1 the
    initialisation's second look at its rows keeps the cluster out: 0.999), by tail mass as
    rarer than 95 % of the normal events."""
    from sklearn.metrics import roc_auc_score

    X, y = _tight_light_cluster_stream(seed)
    auc = {}
    for score in ("tail", "density"):
        det = Detector(false_alarm_rate=0.01, warmup_events=500, random_state=seed, score=score)
        scores = np.concatenate([det.process(b).score for b in np.array_split(X, 40)])
        decided = np.isfinite(scores)
        auc[score] = roc_auc_score(y[decided], scores[decided])
    assert auc["tail"] > 0.9, auc
    assert seed == 1 or auc["density"] < 0.5, auc  # the failure that tail mass removes



def test_a_reference_model_scores_and_decides_while_the_own_model_learns():
    """The daemon's merged model (streamgmm.fleet) scores a partition's events; the partition's
    own detector decides with its threshold and learns, protected by those decisions."""
    from streamgmm.mixture import OnlineGaussianMixture

    rng = np.random.default_rng(3)
    det = Detector(n_components=1, warmup_events=400, random_state=0)
    for batch in np.array_split(rng.normal(size=(2000, 2)), 10):
        det.process(batch)
    learned = det.n_events_learned
    # a reference that knows a second mode at (8, 8) that this partition has not seen
    reference = OnlineGaussianMixture.from_parameters(
        [0.5, 0.5], [[0.0, 0.0], [8.0, 8.0]], [np.eye(2), np.eye(2)])
    X = np.array([[0.1, -0.2], [8.0, 8.1]])
    own = det.score_samples(X)
    res = det.process(X, reference=reference)
    assert np.allclose(res.score, -reference.score_tail_samples(X))
    assert np.allclose(res.log_likelihood, reference.score_samples(X))
    assert res.is_anomaly.tolist() == [False, False]  # by its own model, (8, 8) is far out
    assert own[1] > det.threshold.threshold
    assert det.n_events_learned == learned + 2


def test_refits_judge_the_warm_up_rows_again_only_when_scoring_by_density():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(600, 3)), rng.normal(size=(5, 3)) + 25.0])
    for score in ("density", "tail"):
        det = Detector(score=score, warmup_events=200, random_state=0)
        det.process(X[:600])
        w = np.ones(len(X))
        out = det._refit_weights(X, w)
        if score == "density":  # the far rows would be flagged now: protected in the refit
            assert np.all(out[600:] == det.flagged_weight)
            assert out[:600].mean() > 0.98
        else:  # by tail mass a light component cannot pass for normal: weights unchanged
            assert out is w
        again = Detector.from_state(*det.get_state())
        assert again.model.refit_weights == again._refit_weights


def test_the_initialisation_judges_its_rows_again_until_the_judgement_settles():
    # River's Shuttle's first 128 events, 10 anomalies among them in a tight cluster: the
    # mixture fitted to all of them at full weight flagged 4 by its own tail, so a refit to
    # them gave the other 6 weight; refitted without the rows flagged so far until the
    # flagged rows settle, it flags 9 of them.
    import itertools

    from river import datasets

    rows = list(itertools.islice(datasets.Shuttle(), 128))
    X = np.array([[x[k] for k in sorted(x)] for x, _ in rows], dtype=float)
    y = np.array([bool(label) for _, label in rows])
    det = Detector(score="density", warmup_events=256, flagged_weight=0.1,
                   false_alarm_rate=0.01, random_state=0)
    det.process(X)
    assert det.model.is_fitted
    flagged = det._refit_weights(X, np.ones(len(X))) < 1.0
    assert (flagged & y).sum() >= 9 and (flagged & ~y).sum() <= 3


def test_refits_judge_by_the_model_not_by_the_threshold():
    # The threshold is calibrated on scores of another model (before a refit, on cross-fitted
    # scores of half the rows): on a young stream it flagged none of the warm-up's anomalies
    # when asked about the rows in-sample (Shuttle behind StandardScaler, 325 rows: 0 of 25).
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(600, 3)), rng.normal(size=(5, 3)) + 25.0])
    det = Detector(score="density", warmup_events=200, random_state=0)
    det.process(X[:600])
    det.threshold.threshold = 1e9  # a threshold that flags nothing
    out = det._refit_weights(X, np.ones(len(X)))
    assert np.all(out[600:] == det.flagged_weight)
