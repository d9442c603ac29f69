"""GMMDetector under River: River's own checks (offline data), pipelines, filters, conventions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from river import anomaly, checks, compose, datasets, metrics, preprocessing

from streamgmm import _synthetic as syn
from streamgmm.anomaly import GMMDetector


class _OfflineMixture:
    """A labelled stream that needs no download: 6 features, 3 modes, 5 % outliers.

    (River's own AnomalySine has only 2 features, and River's HalfSpaceTrees fails
    check_emerging_features on it, which drops 3 features from every event.)
    """

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        X, y = syn.mixture_with_outliers(self.n, n_features=6, contamination=0.05, seed=7)
        for row, label in zip(X, y, strict=True):
            yield {f"x{j}": float(v) for j, v in enumerate(row)}, bool(label)


def _offline_datasets(model, scale: int = 1):
    """Stands in for River's dataset generator (its CreditCard needs a download)."""
    yield _OfflineMixture(1000 * scale)


def _river_checks(model):
    return [(check.__name__, check) for check in checks.yield_checks(model)]


def _skips(model):
    return model._unit_test_skips() if hasattr(model, "_unit_test_skips") else set()


@pytest.fixture
def offline_river_data(monkeypatch):
    monkeypatch.setattr(checks, "_yield_datasets", _offline_datasets)


def _estimators():
    for params in GMMDetector._unit_test_params():
        yield GMMDetector(**params)


@pytest.mark.parametrize(
    "model", list(_estimators()), ids=["defaults", "unit-test-params", "diagonal-mixture"]
)
def test_river_checks_pass_with_none_skipped(model, offline_river_data):
    assert _skips(model) == set()  # we opt out of nothing
    names = [name for name, _ in _river_checks(model)]
    assert "check_roc_auc" in names and "check_emerging_features" in names
    failures = {}
    for name, check in _river_checks(model):
        try:
            check(model.clone())
        except Exception as exc:  # noqa: BLE001 - report every failing check at once
            failures[name] = f"{type(exc).__name__}: {exc}"
    assert not failures, failures
    # River's own detector passes the same checks on the same data, so the swap is fair.
    hst = anomaly.HalfSpaceTrees(seed=1)
    assert _skips(hst) == set()
    # (GMMDetector is seeded, so it also gets check_seeding_is_idempotent: 27 checks vs 26)
    assert set(n for n, _ in _river_checks(hst)) <= set(names)
    for _, check in _river_checks(hst):
        check(hst.clone())


def _sine(n=3000, anomalies=100, seed=1):
    return list(datasets.synth.AnomalySine(n_samples=n, n_anomalies=anomalies, seed=seed))


def test_works_with_defaults_in_a_pipeline_and_beats_half_space_trees():
    aucs = {}
    for name, model in {
        "gmm": preprocessing.StandardScaler() | GMMDetector(seed=0),
        "hst": preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(seed=0),
    }.items():
        auc = metrics.ROCAUC()
        for x, y in _sine():
            score = model.score_one(x)
            assert 0.0 <= score <= 1.0
            auc.update(y, score)
            model.learn_one(x)
        aucs[name] = auc.get()
    assert aucs["gmm"] > 0.9 and aucs["gmm"] > aucs["hst"]


def test_threshold_filter_at_one_minus_target_flags_at_the_target_rate():
    # GMMDetector protects its own learning, so it learns every event (the filter only
    # classifies). In River 0.26 the filter's own learn_one either withholds flagged events
    # (protect_anomaly_detector=True, which hides the scores' upper tail from the calibration)
    # or learns nothing at all (False).
    flt = anomaly.ThresholdFilter(GMMDetector(false_alarm_rate=0.02, seed=0), threshold=0.98)
    flags = []
    for x, _ in _sine(n=20_000, anomalies=1, seed=3):
        flags.append(flt.classify(flt.score_one(x)))
        flt.anomaly_detector.learn_one(x)
    rate = np.mean(flags[2000:])
    assert 0.016 < rate < 0.024


def test_quantile_filter():
    flt = anomaly.QuantileFilter(GMMDetector(seed=0), q=0.95, protect_anomaly_detector=False)
    flagged = []
    for x, y in _sine(n=4000, anomalies=100, seed=4):
        score = flt.score_one(x)
        flagged.append((flt.classify(score), y))
        flt.learn_one(x)
    hits = [f for f, y in flagged[1000:] if y]
    assert np.mean(hits) > 0.5


def test_buffering_learned_events_count_after_the_batch_fills():
    model = GMMDetector(batch_size=50, warmup_events=100, seed=0)
    data = [x for x, _ in _sine(n=1000, anomalies=1)]
    for x in data[:15]:
        model.learn_one(x)
    assert model.detector is None  # still buffered: the first batch holds 16 events
    model.learn_one(data[15])
    assert model.detector is not None and model.detector.n_events_seen == 16
    for x in data[16:400]:  # from 8 * 50 learned events on, batches hold 50
        model.learn_one(x)
    model.flush()
    assert model.is_warm and model.detector.n_events_seen == 400
    probe = data[400]
    before = model.score_one(probe)
    for x in data[401:450]:  # 49 more: the buffer holds 49 of 50
        model.learn_one(x)
    assert model.score_one(probe) == before
    model.learn_one(data[450])
    assert model.detector.n_events_seen == 450
    assert model.score_one(probe) != before


def test_learn_one_learns_early_when_most_scored_events_are_flagged():
    # After a shift of the whole stream, score_one flags nearly everything: learn_one then hands
    # the buffer to the detector at 16 events instead of waiting for a full batch.
    rng = np.random.default_rng(0)
    model = GMMDetector(seed=0)
    for x in rng.normal(size=(3000, 2)):
        model.learn_one({"a": x[0], "b": x[1]})
    model.flush()
    seen = model.detector.n_events_seen
    for x in rng.normal(size=(200, 2)):  # normal traffic: no batch fills
        event = {"a": x[0], "b": x[1]}
        model.score_one(event)
        model.learn_one(event)
    assert model.detector.n_events_seen == seen
    shifted = 0
    while model.detector.n_events_seen == seen and shifted < 40:  # shifted: all flagged
        x = rng.normal(size=2) + 20.0
        event = {"a": x[0], "b": x[1]}
        model.score_one(event)
        model.learn_one(event)
        shifted += 1
    # learned once 17 of the last 32 scored events were flagged (the buffer then holds 217)
    assert shifted == 17 and model.detector.n_events_seen == seen + 200 + 17


def test_features_appearing_and_disappearing():
    model = GMMDetector(batch_size=32, warmup_events=200, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(600):
        a, b = rng.normal(size=2)
        model.learn_one({"a": a, "b": b + a})
    assert model.features == ["a", "b"]
    # a missing feature is marginalised: a typical "a" alone is unremarkable, a far one is not
    assert model.score_one({"a": 0.0}) < 0.9
    assert model.score_one({"a": 8.0}) > 0.999
    # b is judged against a: b = 5 is anomalous when a = 0 (the mixture learned b ~ a)
    assert model.score_one({"a": 0.0, "b": 5.0}) > 0.99
    # a new feature is ignored (the model's dimension is fixed at the first batch)
    assert model.score_one({"a": 0.0, "b": 0.0, "c": 1e9}) == model.score_one({"a": 0.0, "b": 0.0})
    assert model.score_one({}) == 0.0 and model.score_one({"c": 1.0}) == 0.0
    model.learn_one({"a": None, "b": 1.0})  # None is missing
    with pytest.raises(ValueError, match="non-numeric"):
        model.learn_one({"a": "high", "b": 1.0})


@pytest.mark.parametrize("scaler", [None, preprocessing.StandardScaler])
def test_a_value_too_large_to_square_is_refused_and_the_stream_goes_on(scaler):
    # 1e200 once: before, a ValueError-free OverflowError in the warm-up, or (behind a scaler)
    # learned, the covariances infinite and a LinAlgError from a later learn_one. Now score_one
    # refuses it, so a caller that skips the event leaves detector and scaler untouched.
    rng = np.random.default_rng(3)
    events = [{"a": a, "b": b} for a, b in rng.normal(size=(2000, 2))]

    def build():
        return GMMDetector(seed=0) if scaler is None else scaler() | GMMDetector(seed=0)

    model, clean = build(), build()
    for i, x in enumerate(events):
        if i in (50, 1500):
            for bad in ({"a": 1e200, "b": 0.0}, {"a": 0.0, "b": -1e160}):
                with pytest.raises(ValueError, match="beyond ±1e\\+150"):
                    model.score_one(bad)
                if scaler is None:
                    with pytest.raises(ValueError, match="beyond ±1e\\+150"):
                        model.learn_one(bad)
        assert model.score_one(x) == clean.score_one(x)
        model.learn_one(x)
        clean.learn_one(x)


def test_learn_many_and_score_many_match_the_one_at_a_time_scores():
    data = [x for x, _ in _sine(n=2000, anomalies=50)]
    frame = pd.DataFrame(data)
    model = GMMDetector(seed=0)
    model.learn_many(frame.iloc[:1500])
    many = model.score_many(frame.iloc[1500:])
    one = [model.score_one(x) for x in data[1500:]]
    assert isinstance(many, pd.Series) and list(many.index) == list(frame.index[1500:])
    assert np.allclose(many.to_numpy(), one, atol=1e-12)
    frame.loc[1600, "sine"] = np.nan  # a missing value in a frame: marginalised
    assert math.isfinite(model.score_many(frame.iloc[1600:1601]).iloc[0])


@pytest.mark.parametrize("score", ["density", "tail"])
@pytest.mark.parametrize(("n_components", "covariance_type"),
                         [(1, "full"), (2, "full"), (3, "full"), (3, "diag"), (2, "spherical")])
def test_the_per_event_fast_path_scores_as_the_detector(n_components, covariance_type, score):
    # score_one scores complete events with cached whitening maps (GMMDetector._fast_parts),
    # score_many by the detector's batch path: the same numbers
    X, _ = syn.mixture_with_outliers(3000, n_features=5, contamination=0.02, seed=3)
    data = [{f"x{j}": float(v) for j, v in enumerate(row)} for row in X]
    model = GMMDetector(n_components=n_components, covariance_type=covariance_type, score=score,
                        seed=0)
    for x in data[:2000]:
        model.score_one(x)
        model.learn_one(x)
    assert model.detector.model.means_.shape[0] >= n_components  # adoptions may add some
    one = [model.score_one(x) for x in data[2000:]]
    many = model.score_many(pd.DataFrame(data[2000:])).to_numpy()
    np.testing.assert_allclose(one, many, rtol=1e-9, atol=1e-12)
    rows = np.array([[x[f"x{j}"] for j in range(5)] for x in data[2000:2300]])
    fast = [model._score_complete_row(row) for row in rows]
    np.testing.assert_allclose(fast, model.detector.score_samples(rows), rtol=1e-9)


def test_the_per_event_tail_helpers_equal_the_array_versions():
    from streamgmm.anomaly import _unit_from_log_tail, _unit_from_log_tail_one
    from streamgmm.threshold import AdaptiveThreshold

    rng = np.random.default_rng(0)
    thr = AdaptiveThreshold(false_alarm_rate=0.01, warmup_events=500)
    for _ in range(20):
        thr.update(rng.standard_exponential(256))
    frozen = thr.frozen_tail_probability_one()
    scores = np.r_[rng.uniform(-1.0, 12.0, 500), thr._sorted[::50], thr.threshold, 40.0, 1e4]
    for s in scores.tolist():
        assert frozen(s) == thr.tail_probability_one(s) == thr.tail_probability(s)[0]
        assert thr.log_tail_probability_one(s) == thr.log_tail_probability(s)[0]
    assert math.isnan(frozen(math.nan)) and math.isnan(thr.log_tail_probability_one(math.nan))
    thr.update(rng.standard_exponential(256))
    assert frozen(5.0) != thr.tail_probability_one(5.0)  # frozen: the window has moved on
    log_tails = np.r_[0.5, 0.0, -1e-300, np.linspace(-20.0, 0.0, 2001), -math.log(1e-6), -1e5]
    for lt in log_tails.tolist():
        assert _unit_from_log_tail_one(lt) == _unit_from_log_tail(lt)


def test_scores_before_the_mixture_exists():
    model = GMMDetector(seed=0)
    assert model.score_one({"a": 1.0}) == 0.0
    for x, _ in itertools.islice(_sine(), 20):
        model.learn_one(x)
    assert not model.is_warm
    assert 0.0 <= model.score_one({"sine": 0.0, "cosine": 0.0}) < 0.9
    assert model.score_one({"sine": 50.0, "cosine": 0.0}) > 0.999
    assert model.threshold == math.inf


def test_scores_before_the_mixture_exist_follow_correlations():
    # Warm-up scores: the geometric mean of the predictive tails of a full (OAS-shrunk) and a
    # diagonal Gaussian of the events so far. An event that breaks a strong correlation is
    # unusual although each of its features is ordinary (the diagonal alone: 0.66 and 0.68).
    rng = np.random.default_rng(0)
    X = rng.multivariate_normal([0.0, 0.0], [[1.0, 0.95], [0.95, 1.0]], size=60)
    model = GMMDetector(seed=0)
    for a, b in X:
        model.learn_one({"a": float(a), "b": float(b)})
    assert not model.is_warm
    along, across = model.score_one({"a": 1.0, "b": 1.0}), model.score_one({"a": 1.0, "b": -1.0})
    assert along < 0.7 < 0.99 < across
    # ...and the diagonal keeps counting every feature an event moves along the correlation:
    # tail 1.3e-3 (the full Gaussian alone: 8.7e-3)
    assert model.score_one({"a": 3.0, "b": 3.0}) > 0.998
    # an event with a missing feature is scored by the diagonal predictive of the others
    assert 0.0 < model.score_one({"a": 1.0, "b": None}) < 0.9
    # learn_many feeds the same statistics as learn_one
    batch = GMMDetector(seed=0)
    batch.learn_many(pd.DataFrame(X, columns=["a", "b"]))
    assert batch.score_one({"a": 1.0, "b": -1.0}) == pytest.approx(across, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_before_the_mixture_exists_an_event_between_two_normal_modes_is_ranked(seed):
    # 110 events, all before the mixture initialises (128): scored by one Gaussian, the
    # anomalies between the modes were the most normal events (ROC-AUC 0.02-0.03); under the
    # mixture BIC prefers once it has as many rows as free parameters (29), 0.97-1.00.
    X, y = syn.anomalies_between_modes(110, n_anomalies=5, first=30, seed=seed)
    data = [{f"x{j}": float(v) for j, v in enumerate(row)} for row in X]
    model = GMMDetector(seed=0)
    assert _prequential_auc(model, data, y) > 0.95
    assert not model.is_warm


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_with_many_features_the_warm_up_separates_the_modes_with_diagonal_covariances(seed):
    # 30 features, 300 events, all in the warm-up (warmup_events=1000): two full components
    # need 991 rows, so the full Gaussians stay one, whose mean is where the anomalies are
    # (ROC-AUC 0.007); a diagonal mixture fits from 121 rows (1.00; 0.90-0.96 with the modes
    # 3 standard deviations apart instead of 4)
    X, y = syn.anomalies_between_modes(300, 30, n_anomalies=8, first=150, apart=4.0, seed=seed)
    data = [{f"x{j}": float(v) for j, v in enumerate(row)} for row in X]
    model = GMMDetector(warmup_events=1000, seed=0)
    assert _prequential_auc(model, data, y) > 0.95
    assert not model.is_warm


def test_far_anomalies_before_the_mixture_exist_stay_ranked():
    # 120 events of 9 features: the warm-up's F(9, 119) tail underflows from about 1e4
    # standard deviations on, where its log was -inf and every such event scored 1.0 (tied);
    # the tail's power law ranks them, as the daemon's warm-up scores do
    rng = np.random.default_rng(0)
    model = GMMDetector(seed=0)
    for row in rng.normal(size=(120, 9)):
        model.learn_one({f"f{i}": float(v) for i, v in enumerate(row)})
    assert not model.is_warm
    scores = [model.score_one({f"f{i}": far * (i == 0) for i in range(9)})
              for far in (1e2, 1e4, 1e6, 1e8)]
    assert all(a < b < 1.0 for a, b in itertools.pairwise(scores))


def test_a_feature_that_has_not_varied_yet_does_not_outweigh_the_others():
    # Before the mixture exists: ten of 30 features have been 0 in every event so far (pixels
    # at a digit's border). An ordinary event that lights one of them once scored 0.99999999
    # -- above an event three deviations out on ten features -- as their variance of 0 made
    # its value infinitely far; it now counts as the first of 101 values to differ
    rng = np.random.default_rng(0)
    model = GMMDetector(seed=0)
    d = 30
    for row in rng.normal(size=(100, d)):
        row[20:] = 0.0
        model.learn_one({f"f{i}": float(v) for i, v in enumerate(row)})
    assert not model.is_warm
    normal = rng.normal(size=d)
    normal[20:] = 0.0
    rare, shifted = normal.copy(), normal.copy()
    rare[25] = 3.0
    shifted[:10] += 3.0
    score = {name: model.score_one({f"f{i}": float(v) for i, v in enumerate(x)})
             for name, x in (("normal", normal), ("rare", rare), ("shifted", shifted))}
    assert score["normal"] < score["rare"] < 0.9 < 0.999 < score["shifted"]


def test_pipeline_learn_many_with_a_batch_scaler():
    frame = pd.DataFrame([x for x, _ in _sine(n=1000, anomalies=1)])
    model = compose.Pipeline(preprocessing.StandardScaler(), GMMDetector(seed=0))
    model.learn_many(frame)
    assert model.steps["GMMDetector"].is_warm


def _prequential_auc(model, data, y):
    from sklearn.metrics import roc_auc_score

    scores = []
    for x in data:
        scores.append(model.score_one(x))
        model.learn_one(x)
    return roc_auc_score(y, scores)


@pytest.mark.parametrize("seed", [0, 4, 16])
def test_shuttle_warm_up_anomalies_get_no_component_of_their_own(seed):
    # River's Shuttle, no scaler: 7 % anomalies, a tight cluster, all learned at full weight
    # during the warm-ups (no threshold exists yet). Refitted to them, the mixture gave them a
    # component and the density called them normal: the first 10,000 events' ROC-AUC was 0.52
    # with seed 16 (0.96-0.98 with seeds 0 and 4). Judged again at each refit, they are not.
    events, labels = zip(*itertools.islice(datasets.Shuttle(), 10_000), strict=True)
    assert _prequential_auc(GMMDetector(seed=seed), events, labels) > 0.98


@pytest.mark.parametrize(("scaler", "seed"), [(preprocessing.StandardScaler, 1),
                                             (preprocessing.MinMaxScaler, 0),
                                             (preprocessing.MinMaxScaler, 3)])
def test_a_refit_judges_its_rows_again_with_the_model_it_fits(scaler, seed):
    # River's Shuttle behind a scaler: a refit judged by the model before it alone (one fit)
    # was judged by a mixture that had given the warm-up's anomalies a component of their own
    # (K = 2 for events 324-517 with StandardScaler and seed 1), so nothing was flagged and the
    # single Gaussian that refitted next learned them at full weight: twice as wide along some
    # features for good, ROC-AUC 0.986 / 0.982 / 0.986 on the first 10,000 events (0.991
    # with the other seeds). Refits now take the initialisation's concentration steps too.
    events, labels = zip(*itertools.islice(datasets.Shuttle(), 10_000), strict=True)
    assert _prequential_auc(scaler() | GMMDetector(seed=seed), events, labels) > 0.989


def _classes_and_a_class_between(seed, n=1500, d=20):
    """Three normal classes at corners of a 20-dimensional cube, and 30 anomalies of a tight
    class at their common centre (after the first 300 events)."""
    rng = np.random.default_rng(seed)
    corners = rng.choice([-2.0, 2.0], size=(3, d))
    X = corners[rng.integers(0, 3, n)] + rng.normal(size=(n, d))
    y = np.zeros(n, dtype=bool)
    y[rng.choice(np.arange(300, n), 30, replace=False)] = True
    X[y] = 0.5 * rng.normal(size=(30, d))
    return [{f"x{j:02d}": float(v) for j, v in enumerate(row)} for row in X], y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_anomaly_class_between_normal_classes_is_found_with_many_features(seed):
    # With 20 features two full components have more parameters than the refits' rows can
    # estimate, so the full mixture is one Gaussian, and the class at the centre of the normal
    # classes is what that Gaussian finds most normal. The diagonal mixture separates them.
    data, y = _classes_and_a_class_between(seed)
    model = GMMDetector(seed=0)
    assert _prequential_auc(model, data, y) > 0.98
    assert model.expert_kept is True and model.detector.model.n_components_ == 1
    alone = _prequential_auc(GMMDetector(seed=0, diagonal_components=None), data, y)
    assert alone < 0.8


def test_the_diagonal_mixture_is_dropped_where_it_describes_the_data_worse():
    # correlated features: a diagonal mixture's median log-likelihood is below the full
    # Gaussian's, and it is dropped after its trial (so it costs nothing afterwards)
    X, _ = syn.correlated(2000, 30, seed=11)
    model = GMMDetector(seed=0)
    for row in X:
        x = {f"x{j:02d}": float(v) for j, v in enumerate(row)}
        model.score_one(x)
        model.learn_one(x)
    assert model.expert_kept is False and model.expert is None


def test_no_diagonal_mixture_where_the_full_one_can_have_several_components():
    X, _ = syn.mixture_with_outliers(1000, n_features=9, contamination=0.02, seed=3)
    model = GMMDetector(seed=0)
    model.learn_many(pd.DataFrame(X, columns=[f"x{j}" for j in range(9)]))
    assert model.is_warm and model.expert is None and model.expert_kept is None


def test_with_the_diagonal_mixture_score_one_and_score_many_agree():
    data, _ = _classes_and_a_class_between(0)
    model = GMMDetector(seed=0)
    for x in data[:1200]:
        model.score_one(x)
        model.learn_one(x)
    assert model.expert_kept
    one = [model.score_one(x) for x in data[1200:]]
    many = model.score_many(pd.DataFrame(data[1200:])).to_numpy()
    np.testing.assert_allclose(one, many, rtol=1e-9, atol=1e-12)
    # and each is the rarer of the two mixtures' scores
    rows = np.array([list(x.values()) for x in data[1200:]])
    full = GMMDetector._unit_scores(model.detector, rows)
    assert (np.asarray(one) >= full - 1e-12).all() and (np.asarray(one) > full + 1e-6).any()


def test_a_trial_without_complete_events_ends_and_frees_its_batches():
    # every event misses one of its 20 features: the trial's diagonal mixture never gets the
    # complete events to be judged on, and the kept batches must not grow with the stream
    rng = np.random.default_rng(0)
    model = GMMDetector(seed=0)
    for i in range(3000):
        x = {f"x{j:02d}": float(v) for j, v in enumerate(rng.normal(size=20))}
        x[f"x{i % 20:02d}"] = None
        model.score_one(x)
        model.learn_one(x)
    assert model.expert_kept is False and model._trial is None
