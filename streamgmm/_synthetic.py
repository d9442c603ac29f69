"""Small labelled synthetic streams for tests and evaluation (``y = 1`` marks an anomaly).

Every generator takes a seed and returns ``(X, y)`` in arrival order.

Examples
--------
>>> X, y = mixture_with_outliers(1000, seed=0)
>>> X.shape, int(y.sum())
((1000, 4), 10)
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "random_mixture",
    "mixture_with_outliers",
    "bursts",
    "new_mode",
    "abrupt_drift",
    "gradual_drift",
]


def random_mixture(n_features: int, n_components: int, rng: np.random.Generator):
    """Means ~6 sd apart, random full covariances, unequal weights (one rare mode at 5 %)."""
    means = rng.normal(0.0, 6.0, (n_components, n_features))
    covs = []
    for _ in range(n_components):
        a = rng.normal(size=(n_features, n_features)) / np.sqrt(n_features)
        covs.append(a @ a.T + 0.3 * np.eye(n_features))
    weights = rng.dirichlet(np.full(n_components, 5.0))
    if n_components > 1:
        weights[-1] = 0.05
        weights[:-1] *= 0.95 / weights[:-1].sum()
    return weights, means, np.array(covs)


def _draw(n: int, weights, means, covs, rng: np.random.Generator) -> np.ndarray:
    comp = rng.choice(len(weights), size=n, p=weights)
    X = np.empty((n, means.shape[1]))
    for k in range(len(weights)):
        idx = comp == k
        X[idx] = rng.multivariate_normal(means[k], covs[k], idx.sum())
    return X


def _outliers(n: int, X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Points uniform in a box twice the data's range (far from the modes, mostly)."""
    lo, hi = X.min(axis=0), X.max(axis=0)
    centre, half = (lo + hi) / 2, (hi - lo)
    return centre + rng.uniform(-1.0, 1.0, (n, X.shape[1])) * half


def mixture_with_outliers(
    n: int, n_features: int = 4, n_components: int = 3, contamination: float = 0.01,
    seed: int = 0,
):
    """A stationary mixture with isolated outliers at rate ``contamination``."""
    rng = np.random.default_rng(seed)
    params = random_mixture(n_features, n_components, rng)
    X = _draw(n, *params, rng)
    y = np.zeros(n, dtype=int)
    idx = rng.choice(np.arange(n // 10, n), size=int(round(contamination * n)), replace=False)
    idx = np.sort(idx) if len(idx) else idx
    X[idx] = _outliers(len(idx), X, rng)
    y[idx] = 1
    return X, y


def bursts(n: int, n_features: int = 4, n_bursts: int = 3, burst_length: int = 50, seed: int = 0):
    """Stationary mixture; a few short bursts of anomalies packed around one far point each."""
    rng = np.random.default_rng(seed)
    params = random_mixture(n_features, 3, rng)
    X = _draw(n, *params, rng)
    y = np.zeros(n, dtype=int)
    starts = np.linspace(n // 3, n - 4 * burst_length, n_bursts).astype(int)
    for s in starts:
        centre = _outliers(1, X, rng)[0]
        pick = s + np.sort(rng.choice(3 * burst_length, burst_length, replace=False))
        X[pick] = centre + 0.3 * rng.normal(size=(burst_length, n_features))
        y[pick] = 1
    return X, y


def new_mode(
    n: int, n_features: int = 4, start: float = 0.5, share: float = 0.2, label_events: int = 0,
    seed: int = 0,
):
    """A new, persistent mode appears at ``start * n`` and takes ``share`` of the traffic.

    Its first ``label_events`` events are labelled anomalous (novel), the rest normal.
    """
    rng = np.random.default_rng(seed)
    weights, means, covs = random_mixture(n_features, 3, rng)
    X = _draw(n, weights, means, covs, rng)
    y = np.zeros(n, dtype=int)
    t0 = int(start * n)
    new_mean = means.mean(axis=0) + rng.choice([-1.0, 1.0], n_features) * 12.0
    in_new = np.flatnonzero(rng.random(n - t0) < share) + t0
    X[in_new] = rng.multivariate_normal(new_mean, covs[0], len(in_new))
    y[in_new[:label_events]] = 1
    return X, y


def abrupt_drift(n: int, n_features: int = 4, at: float = 0.5, shift: float = 10.0,
                 contamination: float = 0.0, seed: int = 0):
    """All modes jump by ``shift`` at ``at * n``; optional isolated outliers throughout."""
    rng = np.random.default_rng(seed)
    weights, means, covs = random_mixture(n_features, 3, rng)
    X = _draw(n, weights, means, covs, rng)
    t0 = int(at * n)
    X[t0:] += shift
    y = np.zeros(n, dtype=int)
    if contamination:
        idx = rng.choice(np.arange(n // 10, n), size=int(contamination * n), replace=False)
        X[idx] = _outliers(len(idx), X, rng)
        y[idx] = 1
    return X, y


def gradual_drift(n: int, n_features: int = 4, total_shift: float = 10.0,
                  contamination: float = 0.0, seed: int = 0):
    """All modes move linearly by ``total_shift`` (in each feature) over the stream."""
    rng = np.random.default_rng(seed)
    weights, means, covs = random_mixture(n_features, 3, rng)
    X = _draw(n, weights, means, covs, rng)
    X += np.linspace(0.0, total_shift, n)[:, None]
    y = np.zeros(n, dtype=int)
    if contamination:
        idx = rng.choice(np.arange(n // 10, n), size=int(contamination * n), replace=False)
        for i in idx:
            X[i] = X[i] + rng.choice([-1.0, 1.0], n_features) * rng.uniform(15, 30, n_features)
        y[idx] = 1
    return X, y
