"""Drift statistics: KL approximation, displacement, entropy, the CUSUM and the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamgmm._covariance import full_covariances
from streamgmm.checkpoint import dumps_state, loads_state
from streamgmm.drift import (
    DriftMonitor,
    gaussian_kl_matrix,
    mean_displacement,
    mixture_kl_variational,
    weight_entropy,
)


def _monte_carlo_kl(w_f, mu_f, cov_f, w_g, mu_g, cov_g, n=200_000, seed=0):
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(seed)
    comp = rng.choice(len(w_f), size=n, p=w_f)
    x = np.empty((n, mu_f.shape[1]))
    for k in range(len(w_f)):
        idx = comp == k
        x[idx] = rng.multivariate_normal(mu_f[k], cov_f[k], idx.sum())

    def logpdf(w, mu, cov):
        parts = [np.log(w[k]) + multivariate_normal(mu[k], cov[k]).logpdf(x) for k in range(len(w))]
        return logsumexp(np.stack(parts), axis=0)

    return float(np.mean(logpdf(w_f, mu_f, cov_f) - logpdf(w_g, mu_g, cov_g)))


def test_gaussian_kl_matches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 3))
    cov0, cov1 = a @ a.T + np.eye(3), np.diag([1.0, 2.0, 3.0])
    mu0, mu1 = np.zeros(3), np.array([1.0, -1.0, 0.5])
    inv1 = np.linalg.inv(cov1)
    expected = 0.5 * (np.trace(inv1 @ cov0) + (mu1 - mu0) @ inv1 @ (mu1 - mu0) - 3
                      + np.log(np.linalg.det(cov1) / np.linalg.det(cov0)))
    got = gaussian_kl_matrix(mu0[None], cov0[None], mu1[None], cov1[None])[0, 0]
    assert got == pytest.approx(expected)


@pytest.mark.slow
def test_variational_kl_is_zero_for_equal_mixtures_and_close_to_monte_carlo():
    w = np.array([0.3, 0.7])
    # well-separated components: there the approximation is close (it is looser under overlap)
    mu = np.array([[0.0, 0.0], [8.0, 2.0]])
    cov = np.stack([np.eye(2), np.array([[2.0, 0.5], [0.5, 1.0]])])
    assert mixture_kl_variational(w, mu, cov, w, mu, cov) == pytest.approx(0.0, abs=1e-12)
    mu_g = mu + np.array([[0.5, 0.0], [0.0, -0.5]])
    w_g = np.array([0.5, 0.5])
    approx = mixture_kl_variational(w, mu, cov, w_g, mu_g, cov)
    exact = _monte_carlo_kl(w, mu, cov, w_g, mu_g, cov)
    assert approx == pytest.approx(exact, rel=0.1, abs=0.01)


def test_covariance_shapes_become_full():
    assert full_covariances("diag", np.ones((2, 2)), 2, 2).shape == (2, 2, 2)
    tied = full_covariances("tied", np.array([[2.0, 0.1], [0.1, 1.0]]), 3, 2)
    assert tied.shape == (3, 2, 2) and tied[2, 0, 1] == 0.1
    with pytest.raises(ValueError, match="covariance_type"):
        full_covariances("banana", np.ones(2), 2, 1)


def test_displacement_in_standard_deviations_and_entropy():
    covs = np.stack([4.0 * np.eye(2), np.eye(2)])
    means_ref = np.array([[0.0, 0.0], [10.0, 10.0]])
    moved = means_ref + np.array([[2.0, 0.0], [0.0, 0.0]])
    # component 0 moved by 2 units = 1 sd (variance 4); weight 0.5
    assert mean_displacement(np.array([0.5, 0.5]), moved, means_ref, covs) == pytest.approx(0.5)
    assert weight_entropy(np.full(4, 0.25)) == pytest.approx(math.log(4))
    assert weight_entropy(np.array([1.0, 0.0])) == 0.0


def _params(shift=0.0, weights=(0.5, 0.5)):
    return dict(
        weights=np.array(weights),
        means=np.array([[0.0, 0.0], [5.0 + shift, 0.0]]),
        covariances=np.array([1.0, 1.0]),
        covariance_type="spherical",
    )


def test_no_drift_on_a_stationary_stream_and_reference_snapshot_at_start():
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(target_anomaly_rate=0.01)
    flags = np.zeros(500, bool)
    for _ in range(400):
        ll = -2.8 - rng.chisquare(2, 500) / 2
        report = monitor.update(ll, flags, **_params())
    assert report.n_drifts == 0 and not report.drift_detected
    assert report.kl_divergence == pytest.approx(0.0, abs=1e-12)
    assert report.weight_entropy == pytest.approx(math.log(2))
    assert report.reference_log_likelihood == pytest.approx(-3.8, abs=0.1)
    assert report.log_likelihood_ewma == pytest.approx(-3.8, abs=0.1)
    assert report.anomaly_rate == 0.0 and report.target_anomaly_rate == 0.01


def test_level_shift_in_log_likelihood_raises_one_drift_then_reference_moves():
    rng = np.random.default_rng(2)
    monitor = DriftMonitor(target_anomaly_rate=0.01, settle_events=2000)
    flags = np.zeros(100, bool)
    for _ in range(60):
        monitor.update(rng.normal(-3.0, 1.0, 100), flags, **_params())
    reports = [monitor.update(rng.normal(-3.5, 1.0, 100), flags, **_params(shift=2.0))
               for _ in range(60)]
    detected = [i for i, r in enumerate(reports) if r.drift_detected]
    assert detected and detected[0] * 100 < 1500, detected
    first = reports[detected[0]]
    assert first.kl_divergence > 0.5 and first.mean_displacement == pytest.approx(1.0)
    assert first.reference_log_likelihood == pytest.approx(-3.0, abs=0.1)
    last = reports[-1]
    assert last.n_drifts == 1
    assert last.kl_divergence == pytest.approx(0.0, abs=1e-12)  # re-snapshotted
    assert last.reference_log_likelihood < -3.3


def test_isolated_outliers_do_not_fake_a_drift_when_floored():
    rng = np.random.default_rng(3)
    monitor = DriftMonitor()
    for _ in range(300):
        ll = rng.normal(-3.0, 1.0, 500)
        outliers = rng.random(500) < 0.01
        ll[outliers] = -1e4 * rng.random(outliers.sum())
        report = monitor.update(ll, outliers, log_likelihood_floor=-10.0)
    assert report.n_drifts == 0
    assert report.anomaly_rate == pytest.approx(0.01, abs=0.005)
    assert report.log_likelihood_ewma > -3.2


def test_batching_does_not_change_the_statistics():
    rng = np.random.default_rng(4)
    ll = np.r_[rng.normal(-3, 1, 10_000), rng.normal(-4, 1, 5000)]
    flags = np.zeros(ll.size, bool)
    a, b = DriftMonitor(), DriftMonitor()
    ra = [a.update(chunk, flags[: chunk.size]) for chunk in np.array_split(ll, 150)]
    rb = [b.update(chunk, flags[: chunk.size]) for chunk in np.array_split(ll, 37)]
    assert ra[-1].n_drifts == rb[-1].n_drifts == 1
    assert a._cusum_pos == pytest.approx(b._cusum_pos)
    assert a._burn_mean == pytest.approx(b._burn_mean)


def test_no_model_means_nan_model_figures():
    report = DriftMonitor().update(np.array([np.nan, np.nan]), np.zeros(2, bool))
    assert math.isnan(report.kl_divergence) and math.isnan(report.mean_log_likelihood)
    assert math.isnan(report.anomaly_rate)
    assert set(report.as_dict()) >= {"kl_divergence", "n_drifts", "target_anomaly_rate"}


def test_state_round_trip():
    rng = np.random.default_rng(5)
    monitor = DriftMonitor()
    for _ in range(50):
        monitor.update(rng.normal(-3, 1, 77), np.zeros(77, bool), **_params())
    arrays, meta = monitor.get_state()
    arrays, meta = loads_state(dumps_state("DriftMonitor", 1, arrays, meta), "DriftMonitor", 1)
    clone = DriftMonitor.from_state(arrays, meta)
    batch = rng.normal(-3.5, 1, 300)
    r1 = monitor.update(batch, np.zeros(300, bool), **_params(shift=1.0))
    r2 = clone.update(batch, np.zeros(300, bool), **_params(shift=1.0))
    assert r1 == r2
