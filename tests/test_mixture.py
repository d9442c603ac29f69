"""OnlineGaussianMixture against scikit-learn, on streams, and on awkward input."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture

from streamgmm import OnlineGaussianMixture
from streamgmm.checkpoint import CheckpointError, read_state, write_state
from streamgmm.mixture import _winsorised_variance

COV_TYPES = ["full", "tied", "diag", "spherical"]


def random_mixture(seed: int, k: int, d: int, separation: float = 6.0):
    """A random well-separated mixture and a sampler for it."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, separation, (k, d))
    covs = []
    for _ in range(k):
        a = rng.normal(size=(d, d)) / np.sqrt(d)
        covs.append(a @ a.T + 0.3 * np.eye(d))
    weights = rng.dirichlet(np.full(k, 5.0))

    def draw(n: int) -> np.ndarray:
        counts = rng.multinomial(n, weights)
        X = np.vstack(
            [rng.multivariate_normal(means[j], covs[j], size=c) for j, c in enumerate(counts)]
        )
        return X[rng.permutation(n)]

    return draw


def stream(model: OnlineGaussianMixture, X: np.ndarray, batch: int = 250) -> None:
    for start in range(0, len(X), batch):
        model.partial_fit(X[start : start + batch])


def state_equal(a: OnlineGaussianMixture, b: OnlineGaussianMixture) -> bool:
    sa, ma = a.get_state()
    sb, mb = b.get_state()
    return sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa) and ma == mb


# ----------------------------------------------------------------------------- vs scikit-learn


@pytest.mark.parametrize("covariance_type", COV_TYPES)
def test_same_parameters_give_sklearns_scores_and_posteriors(covariance_type):
    X = random_mixture(0, 3, 4)(3000)
    sk = GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(X)
    ours = OnlineGaussianMixture.from_parameters(
        sk.weights_, sk.means_, sk.covariances_, covariance_type
    )
    Y = random_mixture(1, 3, 4)(500) * 2.0
    np.testing.assert_allclose(ours.score_samples(Y), sk.score_samples(Y), rtol=0, atol=1e-8)
    np.testing.assert_allclose(ours.predict_proba(Y), sk.predict_proba(Y), rtol=0, atol=1e-8)
    np.testing.assert_array_equal(ours.predict(Y), sk.predict(Y))
    np.testing.assert_allclose(ours.precisions_cholesky_, sk.precisions_cholesky_, rtol=1e-10)
    np.testing.assert_allclose(ours.precisions_, sk.precisions_, rtol=1e-8, atol=1e-10)
    assert ours.bic(Y) == pytest.approx(sk.bic(Y), rel=1e-10)
    assert ours.aic(Y) == pytest.approx(sk.aic(Y), rel=1e-10)


@pytest.mark.parametrize("covariance_type", COV_TYPES)
def test_batch_fit_from_the_same_start_reaches_sklearns_likelihood(covariance_type):
    X = random_mixture(2, 3, 3)(4000)
    X = (X - X.mean(0)) / X.std(0)  # unit variances: relative and absolute reg_covar coincide
    start = {
        "weights_init": [0.3, 0.3, 0.4],
        "means_init": X[[0, 1000, 2000]],
        "precisions_init": {
            "full": np.repeat(np.eye(3)[None], 3, axis=0),
            "tied": np.eye(3),
            "diag": np.ones((3, 3)),
            "spherical": np.ones(3),
        }[covariance_type],
    }
    sk = GaussianMixture(
        3, covariance_type=covariance_type, tol=1e-6, max_iter=500, **start
    ).fit(X)
    ours = OnlineGaussianMixture(
        3, covariance_type=covariance_type, tol=1e-6, max_iter=500, **start
    ).fit(X)
    assert ours.converged_
    assert ours.score(X) == pytest.approx(sk.score(X), abs=1e-4)
    assert ours.lower_bound_ == pytest.approx(sk.lower_bound_, abs=1e-4)


@pytest.mark.parametrize(
    "seed,k,d,covariance_type",
    [(0, 3, 2, "full"), (1, 4, 5, "full"), (2, 5, 8, "full"), (3, 4, 6, "diag"), (4, 3, 4, "tied")],
)
@pytest.mark.slow
def test_one_streamed_pass_is_within_002_nats_of_batch_em(seed, k, d, covariance_type):
    draw = random_mixture(seed, k, d)
    X, held_out = draw(100_000), draw(20_000)
    online = OnlineGaussianMixture(k, covariance_type=covariance_type, random_state=seed)
    stream(online, X, batch=300)
    batch = GaussianMixture(k, covariance_type=covariance_type, n_init=3, random_state=seed).fit(X)
    gap = batch.score(held_out) - online.score(held_out)
    assert gap < 0.02, f"online is {gap:.4f} nats/event behind batch EM"


def test_sample_draws_from_the_mixture():
    model = OnlineGaussianMixture.from_parameters(
        [0.2, 0.8], [[-10.0, 0.0], [10.0, 0.0]], [[1.0, 1.0], [4.0, 4.0]], "diag", random_state=0
    )
    X, labels = model.sample(20_000)
    assert X.shape == (20_000, 2) and labels.shape == (20_000,)
    assert np.mean(labels == 1) == pytest.approx(0.8, abs=0.02)
    assert X[labels == 1].var(axis=0) == pytest.approx([4.0, 4.0], rel=0.05)


# ----------------------------------------------------------------------------- online behaviour


def test_score_partial_fit_scores_before_learning_and_counts_events():
    X = random_mixture(5, 2, 3)(3000)
    model = OnlineGaussianMixture(2, random_state=0).fit(X[:1000])
    before = model.score_samples(X[1000:1300])
    ll = model.score_partial_fit(X[1000:1300])
    np.testing.assert_array_equal(ll, before)
    assert not np.allclose(model.score_samples(X[1000:1300]), before)
    assert model.n_events_learned_ == 1300


def test_callable_weights_see_the_scores_and_zero_weight_rows_teach_nothing():
    X = random_mixture(6, 2, 2)(2000)
    model = OnlineGaussianMixture(2, random_state=0).fit(X)
    reference = OnlineGaussianMixture.from_state(*model.get_state())
    outliers = np.full((50, 2), 1e3)
    seen = []

    def weights(ll):
        seen.append(ll.copy())
        return np.zeros_like(ll)

    ll = model.score_partial_fit(outliers, sample_weight=weights)
    np.testing.assert_array_equal(seen[0], ll)
    np.testing.assert_array_equal(model.means_, reference.means_)
    assert model.n_events_learned_ == reference.n_events_learned_ + 50


def test_partial_fit_warms_up_then_initialises():
    X = random_mixture(7, 3, 2)(3000)
    model = OnlineGaussianMixture(3, warmup_size=600, random_state=0)
    ll = model.score_partial_fit(X[:400])
    assert np.isnan(ll).all() and not model.is_fitted and model.warmup_remaining == 200
    model.partial_fit(X[400:700])
    assert model.is_fitted and model.warmup_remaining == 0
    assert np.isfinite(model.score_partial_fit(X[700:800])).all()


def test_one_component_is_fitted_once_and_leaves_the_random_stream_where_n_init_starts_would():
    # Every start of a single Gaussian ends in the same fit, so it is fitted once; but each
    # start still draws its seed row, so that the fits after it (refits, K chosen on splits)
    # see the random numbers they saw when every start ran.
    X = random_mixture(5, 1, 3)(300)
    fitted = {n: OnlineGaussianMixture(1, n_init=n, random_state=0).fit(X) for n in (1, 4)}
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_array_equal(getattr(fitted[1], name), getattr(fitted[4], name))
    starts = np.random.default_rng(0)
    for _ in range(4):
        starts.choice(len(X), p=np.full(len(X), 1.0 / len(X)))
    assert fitted[4]._rng.random() == starts.random()


def test_auto_chooses_the_number_of_components_on_held_out_likelihood():
    X = random_mixture(8, 4, 2, separation=10.0)(4000)
    model = OnlineGaussianMixture("auto", random_state=0).fit(X)
    assert model.n_components_ == 4


def test_auto_tries_only_mixtures_with_fewer_parameters_than_a_fitting_half_has_rows():
    # 6 features, full covariances: K = 2 has 2 * 21 + 2 * 6 + 1 = 55 free parameters.
    X = random_mixture(9, 2, 6, separation=20.0)(2000)
    assert OnlineGaussianMixture("auto", random_state=0).fit(X[:108]).n_components_ == 1
    assert OnlineGaussianMixture("auto", random_state=0).fit(X[:110]).n_components_ == 2


def test_auto_keeps_one_component_unless_more_are_better_by_a_standard_error():
    # The first 128 events of River's AnomalySine: one non-Gaussian blob, on which the best
    # held-out mean chose 2 components for 3 seeds in 8 (by chance, and at a cost in ROC-AUC).
    from river import datasets

    rows = [x for x, _ in datasets.synth.AnomalySine(n_samples=10_000, n_anomalies=333, seed=0)]
    X = np.array([[row[k] for k in sorted(row)] for row in rows[:128]])
    chosen = [OnlineGaussianMixture("auto", random_state=s).fit(X).n_components_
              for s in range(8)]
    assert chosen == [1] * 8
    # well-separated modes are still found on as few rows
    Y = random_mixture(10, 3, 2, separation=12.0)(128)
    assert OnlineGaussianMixture("auto", random_state=0).fit(Y).n_components_ == 3


def test_only_fit_warns_when_em_does_not_converge(caplog):
    # The internal fits -- held-out fits of the choice of K, the warm-up fit, refits -- run
    # in a live stream, where a warning per fit is noise the user can do nothing about.
    X = random_mixture(12, 3, 8, separation=2.0)(600)
    with caplog.at_level(logging.WARNING, logger="streamgmm.mixture"):
        model = OnlineGaussianMixture(
            "auto", max_iter=2, tol=1e-12, warmup_size=200, refit_size=600, random_state=0
        )
        for batch in np.array_split(X, 6):
            model.partial_fit(batch)
    assert model.n_refits_ >= 1 and not model.converged_
    assert "did not converge" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="streamgmm.mixture"):
        OnlineGaussianMixture(3, max_iter=2, tol=1e-12, random_state=0).fit(X)
    assert "did not converge" in caplog.text


def test_a_discrete_feature_gets_at_least_its_rounding_variance():
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.normal(0.0, 3.0, 5000), rng.integers(0, 4, 5000) * 0.5])
    cov = OnlineGaussianMixture(1, random_state=0).fit(X).covariances_[0]
    # the continuous feature: 1e-6 of its variance (with its 1 % most extreme values at each
    # end clipped), as before
    unit = _winsorised_variance(X, np.ones(len(X)))[0]
    assert 0.95 * X[:, 0].var() < unit < X[:, 0].var()
    assert cov[0, 0] == pytest.approx(X[:, 0].var() + 1e-6 * unit, rel=1e-9)
    # values 0, 0.5, 1, 1.5: a grid of step 0.5, rounding variance 0.25 / 12
    assert cov[1, 1] == pytest.approx(X[:, 1].var() + 0.25 / 12, rel=1e-9)


@pytest.mark.parametrize("value", [1e6, 1e10])
def test_one_far_outlier_does_not_set_the_regularisation(value):
    # One value of 1e6 among 512 N(0, 1) rows: the rows' variance (~2e9) was the unit of
    # reg_covar (1e-6), so every component, the bulk's too, got a variance of at least ~1950
    # along that feature. The unit is now the variance with the 1 % most extreme values at each
    # end clipped. (At 1e12 the rounding variance's tie tolerance, 1e-12 of the largest
    # magnitude, makes every gap of N(0, 1) data a tie: README, *Why the defaults*.)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(512, 3))
    X[60, 0] = value
    gmm = OnlineGaussianMixture(2, random_state=0).fit(X)
    bulk = int(np.argmax(gmm.weights_))
    assert gmm.covariances_[bulk, 0, 0] == pytest.approx(1.0, abs=0.1)
    assert gmm.covariances_[1 - bulk, 0, 0] < 1e-3 and gmm.means_[1 - bulk, 0] == value
    for batch in np.array_split(rng.normal(size=(2000, 3)), 8):
        gmm.partial_fit(batch)  # the outlier's component fades and is re-seeded from the bulk
    assert (gmm.covariances_[:, 0, 0] < 1.5).all()
    assert gmm.score_tail_samples([[7.0, 0.0, 0.0]])[0] < math.log(1e-6)


def test_a_covariance_that_factors_but_whose_precision_does_not_is_repaired():
    # A refit buffer of digits behind River's StandardScaler (the rows of one held-out half and
    # their judged weights): two blank pixels take the values 0 and -6.9e-18, a variance of
    # 3e-37. Its covariance factored but its precision did not (NaN held-out likelihoods).
    from pathlib import Path

    data = np.load(Path(__file__).parent / "data" / "round_off_constant_features.npz")
    X, w = data["X"], data["w"]
    assert 0 < np.sort(X.var(axis=0))[6] < 1e-30
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = OnlineGaussianMixture(1, covariance_shrinkage="oas", random_state=0)
        ll = model.fit(X, sample_weight=w).score_samples(X)
    assert np.isfinite(ll).all() and np.isfinite(model.precisions_cholesky_).all()


def test_a_factor_whose_lu_meets_an_exact_zero_pivot_still_gives_a_precision():
    # Three features constant but for round-off (variances 2e-69 to 2e-67) next to four of ~1:
    # the covariance factors, with 5e-35 on the factor's diagonal, but LU with partial pivoting
    # (np.linalg.solve) finds the factor singular. From digits, behind River's StandardScaler.
    from pathlib import Path

    from streamgmm import _covariance as cv

    cov = np.load(Path(__file__).parent / "data" / "factor_with_an_exact_zero_lu_pivot.npy")
    prec = cv.precision_cholesky("full", cov[None])
    assert np.isfinite(prec).all() and (np.diagonal(prec, axis1=1, axis2=2) > 0).all()


@pytest.mark.parametrize("seed", [22, 25])
def test_a_constant_feature_gets_a_variance_floor_whatever_the_weights(seed):
    # A constant feature's weighted mean missed its value by round-off: the "variance"
    # (1e-16 |value|)**2, times reg_covar, was its floor, 1e-70 next to features of variance 1,
    # and fitting raised LinAlgError (2 seeds in 40 of these). Constant features share the
    # others' mean unit, as they do with unit weights.
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(325, 64))
    X[:, [3, 7, 11]] = -7.632783294297951e-17 * np.array([3, 7, 11])
    w = rng.choice([1.0, 0.1, 0.37], size=len(X))
    model = OnlineGaussianMixture(1, random_state=0).fit(X, sample_weight=w)
    assert (model.covariances_[0][[3, 7, 11], [3, 7, 11]] > 1e-7).all()
    assert np.isfinite(model.score_samples(X)).all()


@pytest.mark.slow
def test_forgetting_recovers_after_abrupt_drift_and_plain_stepwise_em_is_slower():
    before, after = random_mixture(9, 3, 3), random_mixture(10, 3, 3)
    held_out = after(5000)
    oracle = GaussianMixture(3, n_init=3, random_state=0).fit(after(50_000)).score(held_out)

    def events_to_recover(min_step: float) -> int:
        model = OnlineGaussianMixture(3, min_step=min_step, random_state=0)
        stream(model, before(40_000))
        new = after(100_000)
        for start in range(0, len(new), 250):
            model.partial_fit(new[start : start + 250])
            if model.score(held_out) > oracle - 0.1:
                return start + 250
        return len(new) + 1

    # Measured: ~5 memory lengths (batch_size / min_step events each) to come within 0.1 nats
    # of an oracle fitted on the new distribution: 22k-40k events at min_step=0.05, 14k at 0.1,
    # against 48k-51k (and >100k for some seeds) without forgetting.
    forgetting = events_to_recover(0.05)
    plain = events_to_recover(0.0)
    assert forgetting <= 50_000, f"forgetting model needed {forgetting} events to recover"
    assert forgetting < plain


@pytest.mark.slow
def test_a_rare_normal_mode_survives_forgetting():
    rng = np.random.default_rng(11)
    n = 300_000
    rare = rng.random(n) < 0.01
    X = rng.normal(0, 1, (n, 2))
    X[rare] = rng.normal([8.0, 8.0], 0.5, (rare.sum(), 2))
    model = OnlineGaussianMixture(2, min_step=0.02, random_state=0)
    stream(model, X, batch=200)
    j = int(np.argmin(model.weights_))
    assert model.weights_[j] == pytest.approx(0.01, abs=0.004)
    np.testing.assert_allclose(model.means_[j], [8.0, 8.0], atol=0.1)
    np.testing.assert_allclose(np.diag(model.covariances_[j]), [0.25, 0.25], rtol=0.25)
    rare_points = rng.normal([8.0, 8.0], 0.5, (2000, 2))
    truth = np.log(0.01) + multivariate_normal([8.0, 8.0], 0.25 * np.eye(2)).logpdf(rare_points)
    assert np.mean(truth - model.score_samples(rare_points)) < 0.15


def test_merging_two_halves_is_close_to_learning_the_whole():
    draw = random_mixture(12, 3, 3)
    X, held_out = draw(40_000), draw(10_000)
    seed_model = OnlineGaussianMixture(3, random_state=0).fit(X[:2000])
    a = OnlineGaussianMixture.from_state(*seed_model.get_state())
    b = OnlineGaussianMixture.from_state(*seed_model.get_state())
    stream(a, X[2000:21_000])
    stream(b, X[21_000:])
    whole = OnlineGaussianMixture.from_state(*seed_model.get_state())
    stream(whole, X[2000:])
    merged = a.merge(b)
    assert merged.n_events_learned_ == a.n_events_learned_ + b.n_events_learned_
    assert abs(merged.score(held_out) - whole.score(held_out)) < 0.02


def test_spawn_and_prune_components():
    X = random_mixture(13, 2, 2)(2000)
    model = OnlineGaussianMixture(2, max_components=3, random_state=0).fit(X)
    new_mode = np.random.default_rng(0).normal(50.0, 1.0, (30, 2))
    index = model.spawn_component(new_mode)
    assert index == 2 and model.n_components_ == 3
    assert model.predict(new_mode).tolist() == [2] * 30
    assert model.spawn_component(new_mode + 100.0) in (0, 1, 2) and model.n_components_ == 3
    kept = model.prune_components(0.3)
    assert len(kept) == model.n_components_ and np.isclose(model.weights_.sum(), 1.0)


# ----------------------------------------------------------------------------- missing features


@pytest.mark.parametrize("covariance_type", COV_TYPES)
def test_missing_features_are_marginalised_exactly(covariance_type):
    X = random_mixture(14, 2, 3)(3000)
    model = OnlineGaussianMixture(2, covariance_type=covariance_type, random_state=0).fit(X)
    row = np.array([[X[0, 0], np.nan, X[0, 2]]])
    ll, resp = model.marginal_score_samples(row)
    full = model.covariances_
    if covariance_type == "tied":
        full = np.repeat(full[None], 2, axis=0)
    elif covariance_type == "diag":
        full = np.stack([np.diag(v) for v in full])
    elif covariance_type == "spherical":
        full = np.stack([np.eye(3) * v for v in full])
    obs = [0, 2]
    parts = [
        np.log(model.weights_[j])
        + multivariate_normal(model.means_[j, obs], full[j][np.ix_(obs, obs)]).logpdf(row[0, obs])
        for j in range(2)
    ]
    assert ll[0] == pytest.approx(np.logaddexp(*parts), abs=1e-10)
    np.testing.assert_allclose(resp[0], np.exp(np.array(parts) - ll[0]), atol=1e-10)
    complete, _ = model.marginal_score_samples(X[:5])
    np.testing.assert_allclose(complete, model.score_samples(X[:5]), atol=1e-12)


# ----------------------------------------------------------------------------- persistence


def test_save_load_round_trip_is_exact(tmp_path):
    X = random_mixture(15, 3, 3)(5000)
    model = OnlineGaussianMixture(3, min_step=0.01, random_state=0)
    stream(model, X[:3000])
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = OnlineGaussianMixture.load(path)
    assert state_equal(model, loaded)
    np.testing.assert_array_equal(model.score_samples(X), loaded.score_samples(X))
    stream(model, X[3000:])
    stream(loaded, X[3000:])
    assert state_equal(model, loaded)
    np.testing.assert_array_equal(model.sample(5)[0], loaded.sample(5)[0])


def test_a_warming_up_model_round_trips(tmp_path):
    model = OnlineGaussianMixture(2, warmup_size=100, random_state=0)
    model.partial_fit(np.random.default_rng(0).normal(size=(40, 2)))
    model.save(tmp_path / "m.npz")
    loaded = OnlineGaussianMixture.load(tmp_path / "m.npz")
    assert not loaded.is_fitted and loaded.warmup_remaining == 60


def test_corrupt_foreign_and_future_files_are_refused(tmp_path):
    X = np.random.default_rng(0).normal(size=(50, 2))
    model = OnlineGaussianMixture(1, random_state=0).fit(X)
    path = tmp_path / "m.npz"
    model.save(path)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(model.get_state()[0]["means"].tobytes())
    assert at > 0
    data[at + 3] ^= 0xFF  # one flipped bit pattern inside the stored means
    (tmp_path / "corrupt.npz").write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        OnlineGaussianMixture.load(tmp_path / "corrupt.npz")
    (tmp_path / "truncated.npz").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        OnlineGaussianMixture.load(tmp_path / "truncated.npz")
    arrays, meta = read_state(path, "OnlineGaussianMixture", 2)
    meta.pop("version")
    write_state(tmp_path / "future.npz", "OnlineGaussianMixture", 99, arrays, meta)
    with pytest.raises(CheckpointError, match="newer"):
        OnlineGaussianMixture.load(tmp_path / "future.npz")
    write_state(tmp_path / "other.npz", "Detector", 1, arrays, meta)
    with pytest.raises(CheckpointError, match="Detector"):
        OnlineGaussianMixture.load(tmp_path / "other.npz")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "X,weights,message",
    [
        (np.zeros(3), None, "2-D"),
        (np.zeros((4, 3)), None, "features"),
        (np.array([[0.0, np.nan]]), None, "NaN"),
        (np.array([[0.0, np.inf]]), None, "inf"),
        (np.zeros((3, 2)), np.array([1.0, -1.0, 1.0]), "sample_weight"),
        (np.zeros((3, 2)), np.ones(4), "shape"),
        (np.array([["a", "b"]]), None, "numeric"),
    ],
)
def test_bad_input_raises_and_leaves_the_model_unchanged(X, weights, message):
    train = np.random.default_rng(0).normal(size=(300, 2))
    model = OnlineGaussianMixture(2, random_state=0).fit(train)
    before = OnlineGaussianMixture.from_state(*model.get_state())
    with pytest.raises(ValueError, match=message):
        model.partial_fit(X, sample_weight=weights)
    assert state_equal(model, before)


def test_invalid_parameters_are_named():
    for kwargs, name in [
        ({"n_components": 0}, "n_components"),
        ({"covariance_type": "banana"}, "covariance_type"),
        ({"step_exponent": 0.4}, "step_exponent"),
        ({"min_step": 1.5}, "min_step"),
        ({"reg_covar": -1.0}, "reg_covar"),
    ]:
        with pytest.raises(ValueError, match=name):
            OnlineGaussianMixture(**kwargs)


# ----------------------------------------------------------------------------- degenerate data


def assert_finite(model: OnlineGaussianMixture) -> None:
    for attribute in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert np.isfinite(getattr(model, attribute)).all(), attribute


@pytest.mark.parametrize("covariance_type", COV_TYPES)
def test_degenerate_streams_never_produce_nan(covariance_type):
    rng = np.random.default_rng(16)
    constant = np.column_stack([rng.normal(size=2000), np.full(2000, 7.0)])
    duplicates = np.repeat(rng.normal(size=(3, 2)), 700, axis=0)
    half_zero = np.hstack([rng.normal(size=(3000, 32)), np.zeros((3000, 32))])
    for X in (constant, duplicates, half_zero):
        model = OnlineGaussianMixture(4, covariance_type=covariance_type, random_state=0)
        stream(model, X, batch=100)
        for _ in range(3):
            model.partial_fit(X[:1])  # batches of one
        assert model.is_fitted
        assert_finite(model)
        assert np.isfinite(model.score_samples(X[:50])).all()


def test_fewer_rows_than_components():
    model = OnlineGaussianMixture(5, warmup_size=20, random_state=0)
    X = np.random.default_rng(0).normal(size=(40, 2))
    for row in X:
        model.partial_fit(row[None])
    assert model.is_fitted
    assert_finite(model)
    with pytest.raises(ValueError, match="at least"):
        OnlineGaussianMixture(5).fit(X[:3])


def test_a_component_that_stops_receiving_mass_is_reseeded():
    rng = np.random.default_rng(17)
    X = np.vstack([rng.normal(-5, 1, (1000, 1)), rng.normal(5, 1, (1000, 1))])
    model = OnlineGaussianMixture(2, min_step=0.05, random_state=0).fit(X)
    for _ in range(400):
        model.partial_fit(rng.normal(5, 1, (250, 1)))
    assert_finite(model)
    assert model.weights_.min() > 1e-5
    assert np.all(np.abs(model.means_ - 5.0) < 3.0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scale=st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6]),
    offset=st.sampled_from([0.0, 1e6]),
    batch=st.sampled_from([1, 2, 7, 64]),
    covariance_type=st.sampled_from(COV_TYPES),
    correlation=st.sampled_from([0.0, 0.999999]),
    seed=st.integers(0, 10_000),
)
def test_awkward_inputs_keep_the_model_finite(
    scale, offset, batch, covariance_type, correlation, seed
):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(400, 1))
    noise = rng.normal(size=(400, 1)) * np.sqrt(1 - correlation**2)
    X = np.hstack([base, correlation * base + noise, rng.normal(size=(400, 1))]) * scale + offset
    model = OnlineGaussianMixture(
        3, covariance_type=covariance_type, warmup_size=100, random_state=seed
    )
    stream(model, X, batch=batch)
    assert_finite(model)
    ll = model.score_samples(X[:20])
    assert np.isfinite(ll).all()
    # a fitted model ranks its own data above a far-away point
    assert ll.mean() > model.score_samples(X[:1] + 1e3 * scale)[0]


# ------------------------------------------------------------- few events, many features


def _low_rank_stream(n: int, d: int, seed: int) -> np.ndarray:
    """Correlated features: a 3-factor model plus noise, d features."""
    rng = np.random.default_rng(seed)
    loadings = rng.normal(size=(3, d))
    return rng.normal(size=(n, 3)) @ loadings + 0.5 * rng.normal(size=(n, d))


def test_oas_shrinkage_generalises_better_with_few_events_and_vanishes_with_many():
    X = _low_rank_stream(2200, 40, seed=0)
    train, test = X[:120], X[200:]
    plain = OnlineGaussianMixture(1, random_state=0).fit(train)
    shrunk = OnlineGaussianMixture(1, covariance_shrinkage="oas", random_state=0).fit(train)
    assert shrunk.score(test) > plain.score(test) + 1.0  # nats per event, held out
    many = X[:2000]
    a = OnlineGaussianMixture(1, random_state=0).fit(many)
    b = OnlineGaussianMixture(1, covariance_shrinkage="oas", random_state=0).fit(many)
    assert abs(a.score(test) - b.score(test)) < 0.05


def test_the_fit_does_not_depend_on_the_features_units():
    X = random_mixture(3, 3, 4)(600)
    scale = np.array([1e-4, 1.0, 1e3, 1e6])
    a = OnlineGaussianMixture(3, random_state=0).fit(X)
    b = OnlineGaussianMixture(3, random_state=0).fit(X * scale)
    # the same partition, and log-likelihoods that differ by the Jacobian only
    assert np.array_equal(a.predict(X), b.predict(X * scale))
    shift = np.log(scale).sum()
    assert np.allclose(a.score_samples(X), b.score_samples(X * scale) + shift, atol=1e-6)


def test_refits_make_a_young_stream_the_batch_fit_of_everything_seen():
    draw = random_mixture(4, 3, 2, separation=10.0)
    X = draw(600)
    model = OnlineGaussianMixture("auto", warmup_size=16, refit_size=400, random_state=0)
    for batch in np.array_split(X[:16], 1):
        model.partial_fit(batch)
    early_k = model.n_components_
    for batch in np.array_split(X[16:400], 24):
        model.partial_fit(batch)
    assert model.n_refits_ >= 4 and model.n_components_ == 3 and early_k < 3
    batch_fit = OnlineGaussianMixture("auto", random_state=0).fit(X[:400])
    assert abs(model.score(X[400:]) - batch_fit.score(X[400:])) < 0.05
    assert model.held_out_log_likelihood_.shape == (400,)
    # no more refits: the buffer is gone and learning is online
    for batch in np.array_split(X[400:], 10):
        model.partial_fit(batch)
    refits = model.n_refits_
    for batch in np.array_split(draw(200), 4):
        model.partial_fit(batch)
    assert model.n_refits_ == refits and model._buffer == []
    plain = OnlineGaussianMixture("auto", warmup_size=16, random_state=0)
    for batch in np.array_split(X[:400], 25):
        plain.partial_fit(batch)
    assert plain.n_refits_ == 0


def test_warm_up_rows_are_scored_by_the_predictive_of_the_rows_before_them():
    rng = np.random.default_rng(2)
    X = rng.normal(10.0, 2.0, (60, 3))
    model = OnlineGaussianMixture(1, warmup_size=100)
    model.partial_fit(X[:40])
    from scipy import stats

    ll = model.warmup_score_samples(X[40:])
    for i in (0, 7, 19):  # row 40 + i is scored by the 40 + i rows before it
        past = X[: 40 + i]
        n = len(past)
        scale = past.std(axis=0, ddof=1) * np.sqrt(1 + 1 / n)
        expected = stats.t.logpdf(X[40 + i], n - 1, past.mean(axis=0), scale).sum()
        assert ll[i] == pytest.approx(expected, rel=1e-9)
    assert np.isnan(OnlineGaussianMixture(1).warmup_score_samples(X[:2])).all()


def test_a_feature_that_has_not_varied_yet_does_not_outweigh_the_others_in_the_warm_up():
    # feature 3 has been 0 in all 100 buffered rows; its first other value, 5.0, was scored as
    # if infinitely far (-58 nats of tail, -734 when the next row's 5.001 set the feature's
    # resolution to 0.001), beyond a row 8 deviations out on a feature that does vary
    rng = np.random.default_rng(0)
    past = rng.normal(size=(100, 4))
    past[:, 3] = 0.0
    model = OnlineGaussianMixture(2, warmup_size=1000)
    model.partial_fit(past)
    lit, far = rng.normal(size=(2, 4)), rng.normal(size=(1, 4))
    lit[:, 3] = [5.0, 5.001]
    far[0, 0] = 8.0
    _, tail_lit = model.warmup_score_samples(lit, return_tail=True)
    _, tail_far = model.warmup_score_samples(far, return_tail=True)
    assert tail_far[0] < -20.0 < -5.0 < tail_lit[0]


@pytest.mark.parametrize("dfd", [5, 119, 5000])
@pytest.mark.parametrize("dfn", [1, 9, 64])
def test_the_f_tail_continues_where_scipy_underflows(dfn, dfd):
    # The warm-up tails of both paths (GMMDetector, the daemon's Detector) rank far points by
    # this: beyond scipy's float range it is the beta continued fraction, which meets scipy's
    # number where both exist and keeps falling with distance
    from scipy import special

    from streamgmm._covariance import _log_f_tail_far, log_f_tail

    x = special.fdtri(dfn, dfd, 1.0 - 1e-12)  # rough start, then out to a tail of ~1e-240
    while special.fdtrc(dfn, dfd, 2.0 * x) > 1e-240:
        x *= 2.0
    assert _log_f_tail_far(x, dfn, dfd) == pytest.approx(np.log(special.fdtrc(dfn, dfd, x)),
                                                          abs=1e-3)
    far = log_f_tail(x * np.logspace(0, 12, 7), dfn, dfd)
    assert np.isfinite(far).all() and (np.diff(far) < 0).all()
    assert log_f_tail(float(x) * 1e12, dfn, dfd) == pytest.approx(far[-1], rel=1e-12)
