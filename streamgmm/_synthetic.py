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
    "anomalies_between_modes",
]


def anomalies_between_modes(n: int, n_features: int = 4, n_anomalies: int = 12,
                            first: int = 40, apart: float = 6.0, seed: int = 0):
    """Two equally likely normal modes ``apart`` standard deviations apart in every feature,
    and ``n_anomalies`` events (from event ``first`` on) at the point between them: where one
    Gaussian over the modes has its mean, so it scores them as the most normal events.

    >>> X, y = anomalies_between_modes(200, seed=0)
    >>> X.shape, int(y.sum()), bool(abs(X[y == 1].mean() - 3.0) < 0.3)
    ((200, 4), 12, True)
    """
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_features))
    X[rng.random(n) < 0.5] += apart
    y = np.zeros(n, dtype=int)
    y[rng.choice(np.arange(first, n), n_anomalies, replace=False)] = 1
    X[y == 1] = apart / 2 + 0.5 * rng.normal(size=(n_anomalies, n_features))
    return X, y


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


# -- wide streams (20-100 features) for the evaluation's held-out suite ------------------------
#
# Each generator draws normal events with one particular shape (correlated, low-rank, heavy
# tails, discrete, constant features, several modes, drift) and replaces a fraction of them,
# after the first 10 %, with anomalies made by :func:`_subtle_anomalies`: half shift a few
# features by 4-6 of their standard deviations, half break the correlations (each feature taken
# from a different normal event, so every marginal stays normal). Neither kind is far outside
# the data's range, so the streams rank detectors rather than all being solved.

__all__ += [
    "correlated",
    "low_rank",
    "heavy_tails",
    "discrete",
    "constant_features",
    "multimodal",
    "wide_abrupt_drift",
    "wide_gradual_drift",
    "WIDE_STREAMS",
]


def _random_covariance(d: int, rng: np.random.Generator, condition: float = 100.0) -> np.ndarray:
    """A random correlation-rich covariance with eigenvalues spread over ``condition``."""
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    eig = np.geomspace(1.0, 1.0 / condition, d)
    cov = (q * eig) @ q.T
    sd = np.sqrt(np.diag(cov))
    return cov / np.outer(sd, sd)  # unit variances: the structure is in the correlations


def _anomaly_rows(n: int, contamination: float, rng: np.random.Generator) -> np.ndarray:
    k = max(5, int(round(contamination * n)))
    return np.sort(rng.choice(np.arange(n // 10, n), size=min(k, n - n // 10), replace=False))


def _subtle_anomalies(X: np.ndarray, idx: np.ndarray, rng: np.random.Generator,
                      varying: np.ndarray | None = None) -> np.ndarray:
    """Anomalies near the data: feature shifts (first half) and broken correlations (second half).

    ``varying`` (boolean mask) restricts both kinds to features that are not constant.
    """
    d = X.shape[1]
    cols = np.flatnonzero(varying) if varying is not None else np.arange(d)
    normal = np.setdiff1d(np.arange(len(X)), idx)
    sd = X[normal].std(axis=0)
    out = X[idx].copy()
    half = len(idx) // 2
    k = max(2, len(cols) // 10)
    for i in range(half):
        j = rng.choice(cols, size=min(k, len(cols)), replace=False)
        out[i, j] += rng.choice([-1.0, 1.0], len(j)) * rng.uniform(4.0, 6.0, len(j)) * sd[j]
    for i in range(half, len(idx)):
        donors = rng.choice(normal, size=d)
        out[i, cols] = X[donors[cols], cols]
    return out


def correlated(n: int, n_features: int = 30, contamination: float = 0.02, seed: int = 0):
    """One Gaussian with a random, strongly correlated covariance (condition number 100)."""
    rng = np.random.default_rng(seed)
    cov = _random_covariance(n_features, rng)
    X = rng.multivariate_normal(rng.normal(0, 3, n_features), cov, n)
    y = np.zeros(n, dtype=int)
    idx = _anomaly_rows(n, contamination, rng)
    X[idx] = _subtle_anomalies(X, idx, rng)
    y[idx] = 1
    return X, y


def low_rank(n: int, n_features: int = 30, contamination: float = 0.02, seed: int = 0):
    """Low-rank signal plus noise: ``z @ W`` with ``rank = max(2, d // 10)``, noise sd 0.1."""
    rng = np.random.default_rng(seed)
    rank = max(2, n_features // 10)
    W = rng.normal(size=(rank, n_features))
    X = rng.normal(size=(n, rank)) @ W + 0.1 * rng.normal(size=(n, n_features))
    X += rng.normal(0, 5, n_features)
    y = np.zeros(n, dtype=int)
    idx = _anomaly_rows(n, contamination, rng)
    X[idx] = _subtle_anomalies(X, idx, rng)
    y[idx] = 1
    return X, y


def heavy_tails(n: int, n_features: int = 30, contamination: float = 0.02, seed: int = 0,
                df: float = 3.0):
    """Multivariate Student-t (``df = 3``) with a random correlated scale matrix.

    Normal events reach far out (all features at once); anomalies are Gaussian events with a
    few features at 4-6 marginal sd, or with their correlations broken.
    """
    rng = np.random.default_rng(seed)
    cov = _random_covariance(n_features, rng, condition=20.0)
    g = rng.multivariate_normal(np.zeros(n_features), cov, n)
    w = np.sqrt(df / rng.chisquare(df, size=n))[:, None]
    X = g * w + rng.normal(0, 3, n_features)
    y = np.zeros(n, dtype=int)
    idx = _anomaly_rows(n, contamination, rng)
    light = g + rng.normal(0, 3, n_features)  # the same events without the heavy tail
    X[idx] = light[idx]
    X[idx] = _subtle_anomalies(X, idx, rng)
    y[idx] = 1
    return X, y


def discrete(n: int, n_features: int = 30, contamination: float = 0.02, seed: int = 0):
    """Integer features only: counts (Poisson), binary flags and 3-5-level codes, two regimes.

    Anomalies take a few counts at four times their rate and set a few rare flags, or mix the
    two regimes feature by feature.
    """
    rng = np.random.default_rng(seed)
    n_counts, n_flags = int(0.4 * n_features), int(0.3 * n_features)
    n_levels = n_features - n_counts - n_flags
    lam = rng.uniform(1, 20, (2, n_counts))
    p = rng.uniform(0.02, 0.5, (2, n_flags))
    levels = rng.integers(3, 6, n_levels)
    probs = [[rng.dirichlet(np.ones(L) * 2) for L in levels] for _ in range(2)]
    regime = (rng.random(n) < 0.3).astype(int)

    def draw(r: np.ndarray) -> np.ndarray:
        m = len(r)
        counts = rng.poisson(lam[r])
        flags = (rng.random((m, n_flags)) < p[r]).astype(float)
        codes = np.column_stack([
            [rng.choice(L, p=probs[ri][j]) for ri in r] for j, L in enumerate(levels)
        ]) if n_levels else np.empty((m, 0))
        return np.column_stack([counts, flags, codes]).astype(float)

    X = draw(regime)
    y = np.zeros(n, dtype=int)
    idx = _anomaly_rows(n, contamination, rng)
    half = len(idx) // 2
    for i in idx[:half]:
        r = regime[i]
        j = rng.choice(n_counts, size=max(1, n_counts // 8), replace=False)
        X[i, j] = rng.poisson(4 * lam[r, j])
        rare = np.argsort(p[r])[: max(1, n_flags // 5)]
        X[i, n_counts + rare] = 1.0
    other = draw(1 - regime[idx[half:]])
    mix = rng.random(other.shape) < 0.5
    X[idx[half:]] = np.where(mix, other, X[idx[half:]])
    y[idx] = 1
    return X, y


def constant_features(n: int, n_features: int = 30, contamination: float = 0.02, seed: int = 0):
    """A third of the features never change (0 or another constant); the rest: two modes.

    A quarter of the anomalies differ from normal events only in one constant feature (by 1).
    """
    rng = np.random.default_rng(seed)
    n_const = n_features // 3
    varying = np.ones(n_features, dtype=bool)
    const_cols = rng.choice(n_features, n_const, replace=False)
    varying[const_cols] = False
    d = int(varying.sum())
    means = rng.normal(0, 4 / np.sqrt(d), (2, d)) * 3
    covs = [_random_covariance(d, rng, condition=30.0) for _ in range(2)]
    comp = (rng.random(n) < 0.35).astype(int)
    X = np.empty((n, n_features))
    X[:, const_cols] = np.where(rng.random(n_const) < 0.5, 0.0, rng.integers(1, 100, n_const))
    inner = np.empty((n, d))
    for k in range(2):
        inner[comp == k] = rng.multivariate_normal(means[k], covs[k], int((comp == k).sum()))
    X[:, varying] = inner
    y = np.zeros(n, dtype=int)
    idx = _anomaly_rows(n, contamination, rng)
    X[idx] = _subtle_anomalies(X, idx, rng, varying=varying)
    quarter = idx[: max(1, len(idx) // 4)]
    for i in quarter:
        X[i] = X[rng.choice(np.setdiff1d(np.arange(n), idx))]
        X[i, rng.choice(const_cols)] += 1.0
    y[idx] = 1
    return X, y


def multimodal(n: int, n_features: int = 30, contamination: float = 0.02, seed: int = 0,
               n_modes: int = 5):
    """Five correlated Gaussian modes about 6 sd apart, unequal weights (the rarest at 4 %)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 4.0 / np.sqrt(n_features), (n_modes, n_features)) * 1.5
    covs = [_random_covariance(n_features, rng, condition=30.0) for _ in range(n_modes)]
    weights = rng.dirichlet(np.full(n_modes, 3.0))
    weights[-1] = 0.04
    weights[:-1] *= 0.96 / weights[:-1].sum()
    comp = rng.choice(n_modes, n, p=weights)
    X = np.empty((n, n_features))
    for k in range(n_modes):
        X[comp == k] = rng.multivariate_normal(means[k], covs[k], int((comp == k).sum()))
    y = np.zeros(n, dtype=int)
    idx = _anomaly_rows(n, contamination, rng)
    X[idx] = _subtle_anomalies(X, idx, rng)
    y[idx] = 1
    return X, y


def _wide_modes(n: int, d: int, rng: np.random.Generator):
    means = rng.normal(0, 4.0 / np.sqrt(d), (3, d)) * 1.5
    covs = [_random_covariance(d, rng, condition=30.0) for _ in range(3)]
    comp = rng.choice(3, n, p=[0.5, 0.35, 0.15])
    X = np.empty((n, d))
    for k in range(3):
        X[comp == k] = rng.multivariate_normal(means[k], covs[k], int((comp == k).sum()))
    return X


def wide_abrupt_drift(n: int, n_features: int = 30, contamination: float = 0.02, seed: int = 0):
    """Three correlated modes; at mid-stream 30 % of the features jump by 2 sd (stays normal)."""
    rng = np.random.default_rng(seed)
    X = _wide_modes(n, n_features, rng)
    y = np.zeros(n, dtype=int)
    idx = _anomaly_rows(n, contamination, rng)
    X[idx] = _subtle_anomalies(X, idx, rng)
    cols = rng.choice(n_features, max(1, int(0.3 * n_features)), replace=False)
    X[n // 2 :, cols] += rng.choice([-2.0, 2.0], len(cols))
    y[idx] = 1
    return X, y


def wide_gradual_drift(n: int, n_features: int = 30, contamination: float = 0.02, seed: int = 0):
    """Three correlated modes moving linearly by 3 sd in every feature over the stream."""
    rng = np.random.default_rng(seed)
    X = _wide_modes(n, n_features, rng)
    y = np.zeros(n, dtype=int)
    idx = _anomaly_rows(n, contamination, rng)
    X[idx] = _subtle_anomalies(X, idx, rng)
    X += np.linspace(0.0, 3.0, n)[:, None] * rng.choice([-1.0, 1.0], n_features)
    y[idx] = 1
    return X, y


WIDE_STREAMS = {
    "correlated": correlated,
    "low-rank": low_rank,
    "heavy tails": heavy_tails,
    "discrete": discrete,
    "constant features": constant_features,
    "multimodal": multimodal,
    "wide abrupt drift": wide_abrupt_drift,
    "wide gradual drift": wide_gradual_drift,
}
