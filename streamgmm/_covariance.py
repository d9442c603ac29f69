"""What differs per covariance type: the Gaussian E-step, the scatter statistics, the parameters.

The mixture keeps, per component, a *centred* scatter ``S_k`` (the covariance of the points it is
responsible for, before regularisation) in one of two layouts:

* ``full`` and ``tied``: ``(K, d, d)`` matrices (``tied`` pools them, weighted by the mixture
  weights, when it forms its one covariance);
* ``diag`` and ``spherical``: ``(K, d)`` variances (``spherical`` averages them over features).

It is also streamgmm's one Gaussian toolbox: log-densities and squared Mahalanobis distances per
component from means and precision Cholesky factors (:func:`log_gaussian_prob`,
:func:`squared_mahalanobis`), their log-determinants, marginals over observed features
(:func:`marginal_parameters`), the expansion of any type to ``(K, d, d)`` matrices
(:func:`full_covariances`) and the stacked whitening map of all components
(:func:`whitening_map`); the detector, the drift monitor and the River adapter use these rather
than inverting covariances of their own.

Every function here is pure numpy; the engine calls them on its internal, centred coordinates,
other callers on the public parameters. The shapes of covariances and precision Cholesky factors
follow scikit-learn's ``GaussianMixture``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from scipy import linalg, special

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
LOG_2PI = float(np.log(2.0 * np.pi))
# The largest magnitude of a value the statistics can hold: squares and their sums stay below
# float64's 1.8e308 (for up to 1e8 features). A larger finite value (one message with 1e200)
# left the covariances infinite -- every later score NaN -- so the inputs refuse it.
MAX_MAGNITUDE = 1e150
# Above this many doubles, the (n, d*d) outer-product matrix of the fused scatter costs more
# memory traffic than a loop over components.
_FUSED_SCATTER_LIMIT = 2_000_000
# Below this an F tail probability is about to lose its precision (subnormal below 1e-308):
# log_f_tail continues it by the incomplete beta function's continued fraction.
_F_TAIL_UNDERFLOW = 1e-250


def is_matrix_type(covariance_type: str) -> bool:
    """Whether scatters are ``(K, d, d)`` matrices (full, tied) or ``(K, d)`` variances."""
    return covariance_type in ("full", "tied")


def n_parameters(covariance_type: str, n_components: int, n_features: int) -> int:
    """Number of free parameters of a mixture, as scikit-learn counts them for BIC/AIC."""
    k, d = n_components, n_features
    cov = {
        "full": k * d * (d + 1) / 2.0,
        "tied": d * (d + 1) / 2.0,
        "diag": k * d,
        "spherical": k,
    }[covariance_type]
    return int(cov + k * d + k - 1)


# --------------------------------------------------------------------------- parameters


def covariances_from_scatter(
    covariance_type: str,
    scatter: np.ndarray,
    weights: np.ndarray,
    reg: np.ndarray,
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """Covariances in scikit-learn's shape, with the per-feature regularisation ``reg`` added.

    With ``counts`` (the number of points behind each component's scatter), ``full`` and
    ``tied`` scatters are first shrunk towards their diagonals (:func:`shrink_to_diagonal`).
    """
    if covariance_type == "full":
        cov = scatter.copy() if counts is None else shrink_to_diagonal(scatter, counts)
        idx = np.arange(cov.shape[-1])
        cov[:, idx, idx] += reg
        return cov
    if covariance_type == "tied":
        cov = np.tensordot(weights / weights.sum(), scatter, axes=1)
        if counts is not None:
            cov = shrink_to_diagonal(cov[None], np.atleast_1d(np.sum(counts)))[0]
        cov[np.diag_indices_from(cov)] += reg
        return cov
    if covariance_type == "diag":
        return scatter + reg
    return (scatter + reg).mean(axis=1)  # spherical


def shrink_to_diagonal(scatter: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Scatters ``(K, d, d)`` shrunk towards their diagonals by the OAS rule, per component.

    Each component's correlation matrix ``R`` (from ``counts[k]`` points) is shrunk towards the
    identity with the Oracle Approximating Shrinkage intensity of Chen, Wiesel, Eldar & Hero
    (2010), ``rho = ((1 - 2/p) tr R^2 + tr^2 R) / ((n + 1 - 2/p) (tr R^2 - tr^2 R / p))``
    clipped to [0, 1]: the variances stay, the correlations fade when few points stand behind
    them (``n`` near or below ``d``) and the shrinkage vanishes as points accrue. Working on
    correlations keeps the estimate invariant to rescaling a feature.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(20, 10))
    >>> S = np.cov(X.T, bias=True)[None]
    >>> few = shrink_to_diagonal(S, np.array([20.0]))[0]
    >>> many = shrink_to_diagonal(S, np.array([1e6]))[0]
    >>> bool(np.allclose(np.diag(few), np.diag(S[0])) and np.allclose(many, S[0], atol=1e-4))
    True
    >>> off = ~np.eye(10, dtype=bool)
    >>> bool(np.abs(few[off]).max() < 0.5 * np.abs(S[0][off]).max())
    True
    """
    d = scatter.shape[-1]
    if d < 2:
        return scatter.copy()
    var = np.diagonal(scatter, axis1=1, axis2=2)
    scale = np.sqrt(np.maximum(var, np.finfo(float).tiny))
    with np.errstate(over="ignore"):
        corr = np.clip(scatter / (scale[:, :, None] * scale[:, None, :]), -1.0, 1.0)
    tr_r = (var > 0).sum(axis=1).astype(float)
    tr_r2 = (corr**2).sum(axis=(1, 2))
    rho = oas_intensity(tr_r, tr_r2, np.maximum(np.asarray(counts, dtype=float), 1.0), d)
    out = (1.0 - rho)[:, None, None] * scatter
    idx = np.arange(d)
    out[:, idx, idx] = var
    return out


def oas_intensity(tr_r: Any, tr_r2: Any, n: Any, d: int) -> np.ndarray:
    """The OAS shrinkage intensity of :func:`shrink_to_diagonal`, in [0, 1], from the traces of a
    ``d x d`` correlation matrix ``R`` and of ``R**2`` estimated from ``n`` points (arrays or
    scalars).

    Examples
    --------
    >>> float(oas_intensity(3.0, 3.0, 50.0, 3))   # R = I: nothing to keep
    1.0
    >>> bool(oas_intensity(3.0, 7.0, 1e6, 3) < 1e-5)    # correlations behind a million points
    True
    """
    num = (1.0 - 2.0 / d) * tr_r2 + tr_r**2
    den = (n + 1.0 - 2.0 / d) * (tr_r2 - tr_r**2 / d)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, np.minimum(np.true_divide(num, den), 1.0), 1.0)


def _repaired_cholesky(cov: np.ndarray) -> np.ndarray:
    """Cholesky factor of a symmetric matrix with its eigenvalues clipped at ``1e-12`` of the
    largest (for one that is not numerically positive definite)."""
    sym = 0.5 * (cov + cov.T)
    vals, vecs = np.linalg.eigh(sym)
    scale = max(float(np.abs(vals).max()), np.finfo(float).tiny)
    vals = np.maximum(vals, scale * 1e-12 + np.finfo(float).tiny)
    return np.linalg.cholesky((vecs * vals) @ vecs.T + np.eye(len(vals)) * scale * 1e-13)


def precision_cholesky(covariance_type: str, covariances: np.ndarray) -> np.ndarray:
    """Cholesky factors of the precisions (scikit-learn's ``precisions_cholesky_``).

    A covariance that is not numerically positive definite is repaired (eigenvalues clipped),
    never raised on: a stream must not stop because one component collapsed. So is one that
    factors but whose precision does not (a feature constant but for round-off: variance 3e-37
    next to 32 behind River's ``StandardScaler``).
    """
    if covariance_type in ("diag", "spherical"):
        return 1.0 / np.sqrt(np.maximum(covariances, np.finfo(float).tiny))
    stack = covariances[None] if covariance_type == "tied" else covariances
    try:
        chol = np.linalg.cholesky(stack)
    except np.linalg.LinAlgError:
        chol = np.stack([_cholesky_or_repaired(c) for c in stack])
    try:
        eye = np.broadcast_to(np.eye(stack.shape[-1]), stack.shape)
        prec = np.swapaxes(np.linalg.solve(chol, eye), -1, -2)
    except np.linalg.LinAlgError:
        # LU's pivoting met an exact 0 in a factor whose diagonal holds 1e-35s (features constant
        # but for round-off); substitution without pivoting does not
        eye = np.eye(stack.shape[-1])
        prec = np.stack([linalg.solve_triangular(c, eye, lower=True, check_finite=False).T
                         for c in chol])
    diagonal = np.diagonal(prec, axis1=1, axis2=2)
    broken = ~(np.isfinite(prec).all(axis=(1, 2)) & (diagonal > 0).all(axis=1))
    for k in np.flatnonzero(broken):
        prec[k] = np.linalg.inv(_repaired_cholesky(stack[k])).T
    return prec[0] if covariance_type == "tied" else prec


def _cholesky_or_repaired(cov: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        return _repaired_cholesky(cov)


def log_det_precision_cholesky(
    covariance_type: str, prec_chol: np.ndarray, n_features: int
) -> np.ndarray | float:
    """``log det`` of each precision Cholesky factor (half the log det of the precision)."""
    if covariance_type == "full":
        return np.log(np.diagonal(prec_chol, axis1=1, axis2=2)).sum(axis=1)
    if covariance_type == "tied":
        return float(np.log(np.diag(prec_chol)).sum())
    if covariance_type == "diag":
        return np.log(prec_chol).sum(axis=1)
    return n_features * np.log(prec_chol)


def log_det_covariances(
    covariance_type: str, prec_chol: np.ndarray, n_components: int, n_features: int
) -> np.ndarray:
    """``log det Sigma_k`` of every component, shape ``(K,)``, from precision Cholesky factors."""
    log_det = log_det_precision_cholesky(covariance_type, prec_chol, n_features)
    return np.broadcast_to(-2.0 * np.asarray(log_det), (n_components,))


def precisions_and_log_dets(covariances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision matrices and ``log det Sigma_k`` of ``(K, d, d)`` covariances."""
    prec_chol = precision_cholesky("full", covariances)
    return prec_chol @ np.swapaxes(prec_chol, 1, 2), -2.0 * log_det_precision_cholesky(
        "full", prec_chol, covariances.shape[-1]
    )


def whitening_map(means: np.ndarray, prec_chol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All components' whitening as one affine map: ``A x - b`` stacks ``L_k^T (x - mu_k)``.

    ``prec_chol`` are ``(K, d, d)`` precision Cholesky factors (:func:`full_covariances` expands
    the other types); ``A`` is ``(K d, d)`` and ``b`` ``(K d,)``, component-major, so the sum of
    squares of the ``k``-th block of ``d`` entries is the squared Mahalanobis distance to ``k``.
    """
    k, d = means.shape
    stacked = prec_chol.transpose(0, 2, 1).reshape(k * d, d)
    offset = np.matmul(means[:, None, :], prec_chol).reshape(k * d)
    return stacked, offset


# --------------------------------------------------------------------------- E-step


def _squared_mahalanobis_by_component(
    covariance_type: str, X: np.ndarray, means: np.ndarray, prec_chol: np.ndarray
) -> np.ndarray:
    """Squared Mahalanobis distances laid out component-major, ``(K, n)`` (may dip below 0)."""
    n, d = X.shape
    k = means.shape[0]
    if covariance_type == "full":
        # [L_k^T | -L_k^T mu_k] @ [x; 1] = L_k^T (x - mu_k): the offsets ride in the product.
        stacked, offset = whitening_map(means, prec_chol)
        augmented = np.empty((k * d, d + 1))
        augmented[:, :d] = stacked
        augmented[:, d] = -offset
        XT = np.empty((d + 1, n))
        XT[:d] = X.T
        XT[d] = 1.0
        y = augmented @ XT
        y *= y
        return y.reshape(k, d, n).sum(axis=1)
    XT = np.ascontiguousarray(X.T)
    if covariance_type == "tied":
        y = prec_chol.T @ XT
        m = means @ prec_chol
        return (y * y).sum(axis=0) - 2.0 * (m @ y) + (m * m).sum(axis=1)[:, None]
    if covariance_type == "diag":
        prec = prec_chol**2
        return prec @ (XT * XT) - 2.0 * ((means * prec) @ XT) + (means**2 * prec).sum(1)[:, None]
    prec = (prec_chol**2)[:, None]
    return ((XT * XT).sum(axis=0) - 2.0 * (means @ XT) + (means**2).sum(1)[:, None]) * prec


def squared_mahalanobis(
    covariance_type: str, X: np.ndarray, means: np.ndarray, prec_chol: np.ndarray
) -> np.ndarray:
    """``(x_i - mu_k)^T Sigma_k^-1 (x_i - mu_k)`` for every row and component, shape ``(n, K)``."""
    maha = _squared_mahalanobis_by_component(covariance_type, X, means, prec_chol)
    np.maximum(maha, 0.0, out=maha)
    return maha.T


def log_gaussian_prob(
    covariance_type: str,
    X: np.ndarray,
    means: np.ndarray,
    prec_chol: np.ndarray,
    log_weights: np.ndarray | None = None,
) -> np.ndarray:
    """``log N(x_i | mu_k, Sigma_k)`` (plus ``log_weights[k]`` if given), shape ``(n, K)``.

    Fused: one stacked matrix product yields all components' whitened residuals, instead of
    scikit-learn's loop over components. The work is laid out component-major (``(K, n)``, so
    every reduction runs along contiguous memory); the result is a transposed view of it.
    """
    d = X.shape[1]
    log_det = log_det_precision_cholesky(covariance_type, prec_chol, d)
    maha = _squared_mahalanobis_by_component(covariance_type, X, means, prec_chol)
    np.maximum(maha, 0.0, out=maha)
    maha *= -0.5
    constant = np.reshape(log_det, (-1, 1)) - 0.5 * d * LOG_2PI
    if log_weights is not None:
        constant = constant + log_weights[:, None]
    maha += constant
    return maha.T


def log_chi2_tail(maha: np.ndarray, dof: int) -> np.ndarray:
    """``log P(chi2_dof >= maha)``, elementwise, without underflow.

    The regularised upper incomplete gamma function ``Q(dof / 2, maha / 2)``; where it
    underflows (far beyond any normal event) its asymptotic expansion
    ``x**(a-1) e**-x / Gamma(a) (1 + (a-1)/x + (a-1)(a-2)/x**2)`` takes over, so far points
    stay ranked by distance.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import stats
    >>> q = np.array([0.5, 3.0, 40.0])
    >>> bool(np.allclose(log_chi2_tail(q, 4), stats.chi2.logsf(q, 4)))
    True
    >>> float(stats.chi2.logsf(3000.0, 4)), round(float(log_chi2_tail(np.array([3000.0]), 4)[0]))
    (-inf, -1493)
    """
    a = 0.5 * dof
    x = 0.5 * np.asarray(maha, dtype=np.float64)
    tail = special.gammaincc(a, x)
    with np.errstate(divide="ignore"):
        out = np.log(tail)
    far = tail < 1e-250
    if np.any(far):
        xf = np.maximum(x[far], 1e-300)
        series = 1.0 + (a - 1.0) / xf + (a - 1.0) * (a - 2.0) / xf**2
        out[far] = (a - 1.0) * np.log(xf) - xf - special.gammaln(a) + np.log(series)
    return out


def unvaried_residual_cap(n_seen: Any) -> Any:
    """Most a feature that has not varied in ``n_seen`` events adds to a squared residual sum.

    Its variance estimate is 0, so any other value is "infinitely" far under a Gaussian -- and
    under a floor of round-off size, a rare but ordinary value (a pixel that has been 0 so far)
    outweighs every other feature and scores as the worst anomaly. What the events do say: by
    exchangeability, the first of ``n_seen + 1`` values to differ from the others does so with
    probability at most ``1 / (n_seen + 1)``. So its squared standardised residual counts as
    the one-degree chi-square quantile at that probability, ``chi2.isf(1 / (n + 1), 1)``:
    6.6 at 100 events.

    Examples
    --------
    >>> from scipy import stats
    >>> round(float(unvaried_residual_cap(99)), 3), round(float(stats.chi2.isf(0.01, 1)), 3)
    (6.635, 6.635)
    """
    return special.chdtri(1.0, 1.0 / (np.asarray(n_seen, dtype=np.float64) + 1.0))


def log_f_tail(statistic: Any, dfn: Any, dfd: Any) -> Any:
    """``log P(F(dfn, dfd) >= statistic)``, elementwise, without underflow (a float for floats).

    ``scipy.special.fdtrc`` (``scipy.stats.f.logsf``'s number without its per-call overhead);
    where it underflows, the tail is the regularised incomplete beta function
    ``I_z(p, q)``, ``z = dfd / (dfd + dfn statistic)``, ``p = dfd / 2``, ``q = dfn / 2``, by the
    first two terms of its continued fraction, ``z**p (1 - z)**q / (p B(p, q) (1 - (p + q) z /
    (p + 1)))`` (within 1e-4 nats of ``fdtrc`` where that reaches 1e-240, for 1-100 and 3-5000
    degrees of freedom), so far points stay ranked by distance instead of tying at ``-inf``.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import stats
    >>> bool(np.isclose(log_f_tail(3.0, 4, 50), stats.f.logsf(3.0, 4, 50)))
    True
    >>> float(stats.f.logsf(1e4, 9, 500)), round(log_f_tail(1e4, 9, 500))
    (-inf, -1283)
    >>> bool(np.all(np.diff(log_f_tail(np.array([1e2, 1e3, 1e4]), 9, 500)) < 0))
    True
    """
    tail = special.fdtrc(dfn, dfd, statistic)
    if np.ndim(tail) == 0:  # the warm-up scores one event at a time: plain floats
        if tail > _F_TAIL_UNDERFLOW:
            return math.log(tail)
        return float(_log_f_tail_far(float(statistic), float(dfn), float(dfd)))
    with np.errstate(divide="ignore"):
        out = np.log(tail)
    far = tail <= _F_TAIL_UNDERFLOW
    if np.any(far):
        s, a, b = np.broadcast_arrays(np.asarray(statistic, np.float64),
                                      np.asarray(dfn, np.float64), np.asarray(dfd, np.float64))
        out[far] = _log_f_tail_far(s[far], a[far], b[far])
    return out


def _log_f_tail_far(statistic: Any, dfn: Any, dfd: Any) -> Any:
    """:func:`log_f_tail` where ``fdtrc`` underflows: two terms of the beta continued fraction
    (the second bounded away from -1, a guard: there it is about -0.8 for 5000 degrees)."""
    p, q = 0.5 * dfd, 0.5 * dfn
    spread = dfd + dfn * statistic
    z = dfd / spread
    first = -(p + q) * z / (p + 1.0)
    return (p * np.log(z) + q * np.log(dfn * statistic / spread) - np.log(p)
            - special.betaln(p, q) - np.log1p(np.maximum(first, -0.9)))


class JointPredictive(NamedTuple):
    """The full Gaussian a young stream's next row is scored under (:func:`joint_predictive`)."""

    n: float
    mean: np.ndarray
    chol: np.ndarray  # lower Cholesky factor of the shrunk covariance
    unvaried: tuple[np.ndarray, np.ndarray, float] | None  # (features, floors, residual cap)


def joint_predictive(n: float, mean: np.ndarray, scatter: np.ndarray) -> JointPredictive | None:
    """The full Gaussian of ``n`` complete rows with this ``mean`` and centred ``scatter``, for
    their predictive tail (:func:`joint_predictive_log_tail`); None while ``n < 3`` or if the
    covariance is not positive definite.

    The covariance ``scatter / (n - 1)`` with its correlations shrunk towards 0 by the OAS rule
    (:func:`shrink_to_diagonal`'s rule for one matrix, inline: the warm-up calls it per event),
    the variances unshrunk. A feature that has not varied yet (variance at most ``1e-12 (1 +
    mean**2)``) stands apart: it has no correlations, unit variance in the factor, and adds its
    residual to the statistic at most :func:`unvaried_residual_cap` times, as the diagonal
    predictive does.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(50, 3)) @ [[1, 0.9, 0], [0, 0.4, 0], [0, 0, 1]]
    >>> fit = joint_predictive(50.0, X.mean(axis=0), np.cov(X.T) * 49)
    >>> along, across = joint_predictive_log_tail(fit, np.array([[2.0, 1.8, 0], [2.0, -1.8, 0]]))
    >>> bool(across < along - 10)    # breaking the correlation is what is rare
    True
    """
    if n < 3:
        return None
    d = len(mean)
    cov = scatter / (n - 1.0)
    floor = 1e-12 * (1.0 + mean * mean)
    unvaried = np.diag(cov) <= floor
    var = np.where(unvaried, 1.0, np.diag(cov))
    if d > 1:
        sd = np.sqrt(np.maximum(np.diag(cov), np.finfo(float).tiny))
        corr = np.clip(cov / np.outer(sd, sd), -1.0, 1.0)
        tr_r = float(np.count_nonzero(np.diag(cov) > 0))
        tr_r2 = float(np.dot(corr.ravel(), corr.ravel()))
        cov = cov * (1.0 - float(oas_intensity(tr_r, tr_r2, n, d)))
    else:
        cov = cov.copy()
    cov[unvaried, :] = 0.0
    cov[:, unvaried] = 0.0
    cov[np.diag_indices(d)] = var
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        return None
    apart = ((np.flatnonzero(unvaried), floor[unvaried], float(unvaried_residual_cap(n)))
             if unvaried.any() else None)
    return JointPredictive(float(n), mean, chol, apart)


def joint_predictive_log_tail(fit: JointPredictive, rows: np.ndarray) -> Any:
    """Log predictive tail of complete rows (``(m, d)``, or one ``(d,)`` row: a float) under
    :func:`joint_predictive`: ``n / (n + 1)`` times the squared Mahalanobis distance over ``d``
    follows about an ``F(d, n - 1)`` distribution (:func:`log_f_tail`), wider than the plug-in
    chi-square while ``n`` is small."""
    residual = rows - fit.mean
    extra: Any = 0.0
    if fit.unvaried is not None:
        at, floor, cap = fit.unvaried
        extra = np.minimum(residual[..., at] ** 2 / floor, cap).sum(axis=-1)
        residual = residual.copy()
        residual[..., at] = 0.0
    z = linalg.solve_triangular(fit.chol, residual.T, lower=True, check_finite=False)
    d = len(fit.mean)
    statistic = fit.n / (fit.n + 1.0) * ((z * z).sum(axis=0) + extra) / d
    return log_f_tail(statistic, d, fit.n - 1.0)


def log_tail_mass(
    log_prob: np.ndarray,
    log_weights: np.ndarray,
    covariance_type: str,
    prec_chol: np.ndarray,
    n_features: int,
) -> np.ndarray:
    """``log sum_k pi_k P(chi2_d >= q_k(x))`` per row: the mixture's mass further out than ``x``.

    ``q_k(x)`` is the squared Mahalanobis distance of ``x`` to component ``k``, recovered from
    ``log_prob`` (``log N(x | k)``, shape ``(n, K)``) and the log determinants of the precision
    Cholesky factors ``prec_chol`` (:func:`log_det_precision_cholesky`). Unlike the density, the
    tail mass does not grow with a component's tightness: a point at the centre of a tight
    component holding 5 % of the events has mass at most 0.05, however high its density.

    Examples
    --------
    >>> import numpy as np
    >>> log_n = np.array([[-0.5 * np.log(2 * np.pi)]])  # x at the mean of N(0, 1)
    >>> unit = np.array([1.0])  # the precision Cholesky factor of N(0, 1)
    >>> round(float(np.exp(log_tail_mass(log_n, np.log([0.05]), "spherical", unit, 1))[0]), 12)
    0.05
    """
    log_det = log_det_precision_cholesky(covariance_type, prec_chol, n_features)
    maha = -2.0 * (log_prob - np.reshape(log_det, (1, -1))) - n_features * LOG_2PI
    np.maximum(maha, 0.0, out=maha)
    return log_sum_exp(log_weights[None, :] + log_chi2_tail(maha, n_features))


def log_sum_exp(a: np.ndarray) -> np.ndarray:
    """Row-wise ``log(sum(exp(a)))``, stable; rows of all ``-inf`` give ``-inf``."""
    return posterior(a)[0]


def posterior(weighted_log_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-likelihood of each row and responsibilities, from ``log pi_k + log N(x | k)`` (n, K).

    One ``exp`` pass serves both; rows whose every entry is ``-inf`` get ``-inf`` and uniform
    responsibilities.
    """
    top = weighted_log_prob.max(axis=1)
    safe = np.where(np.isfinite(top), top, 0.0)
    e = np.exp(weighted_log_prob - safe[:, None])
    total = e.sum(axis=1)
    with np.errstate(divide="ignore"):
        ll = np.log(total) + safe
    empty = total <= 0
    if empty.any():
        e[empty] = 1.0
        total[empty] = e.shape[1]
    e /= total[:, None]
    return ll, e


# --------------------------------------------------------------------------- M-step statistics


def batch_statistics(
    covariance_type: str, X: np.ndarray, resp: np.ndarray, fallback_means: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-component mass, mean and centred scatter of a weighted batch.

    Parameters
    ----------
    X : ndarray of shape (n, d)
        Rows in the model's centred coordinates.
    resp : ndarray of shape (n, K)
        Responsibilities already multiplied by the sample weights.
    fallback_means : ndarray of shape (K, d)
        Means reported for components that received no mass (they then carry no weight).

    Returns
    -------
    mass : (K,), means : (K, d), scatter : (K, d, d) or (K, d) — scatter per unit mass.
    """
    n, d = X.shape
    rT = np.ascontiguousarray(resp.T)
    mass = rT.sum(axis=1)
    has = mass > 10.0 * np.finfo(float).eps
    safe = np.where(has, mass, 1.0)
    means = np.where(has[:, None], (rT @ X) / safe[:, None], fallback_means)
    if is_matrix_type(covariance_type):
        XT = np.ascontiguousarray(X.T)
        if rT.size * d <= _FUSED_SCATTER_LIMIT:
            weighted = (rT[:, None, :] * XT[None]).reshape(-1, n)
            second = (weighted @ X).reshape(-1, d, d) / safe[:, None, None]
        else:
            second = np.stack([(XT * r) @ X for r in rT]) / safe[:, None, None]
        scatter = second - means[:, :, None] * means[:, None, :]
        scatter = 0.5 * (scatter + np.swapaxes(scatter, 1, 2))
        scatter[~has] = 0.0
    else:
        scatter = (rT @ (X * X)) / safe[:, None] - means**2
        np.maximum(scatter, 0.0, out=scatter)
        scatter[~has] = 0.0
    return mass, means, scatter


def combine(
    step: np.ndarray,
    means: np.ndarray,
    scatter: np.ndarray,
    new_means: np.ndarray,
    new_scatter: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate per-component mean and centred scatter (Chan et al.'s pairwise update).

    ``(1 - step_k)`` of the old statistics and ``step_k`` of the new ones, exactly as if the two
    weighted point sets were pooled: the means' displacement enters the scatter as
    ``step (1 - step) delta delta^T``, so no raw second moment ever cancels.
    """
    delta = new_means - means
    s = step[:, None]
    out_means = means + s * delta
    if scatter.ndim == 3:
        cross = (step * (1.0 - step))[:, None, None] * (delta[:, :, None] * delta[:, None, :])
        out_scatter = (1.0 - step)[:, None, None] * scatter + step[:, None, None] * new_scatter
        out_scatter += cross
    else:
        out_scatter = (1.0 - s) * scatter + s * new_scatter + (s * (1.0 - s)) * delta**2
    return out_means, out_scatter


def marginal_parameters(
    covariance_type: str, means: np.ndarray, covariances: np.ndarray, observed: np.ndarray
) -> tuple[str, np.ndarray, np.ndarray]:
    """The Gaussians restricted to the ``observed`` features: ``(type, means, precision Cholesky)``.

    Marginalising a Gaussian drops the rows and columns of the missing features -- exact, no
    imputation. A spherical covariance restricted to some features is returned as ``diag``.
    """
    if covariance_type == "full":
        cov = covariances[:, observed][:, :, observed]
    elif covariance_type == "tied":
        cov = covariances[observed][:, observed]
    elif covariance_type == "diag":
        cov = covariances[:, observed]
    else:
        cov = np.repeat(covariances[:, None], observed.sum(), axis=1)
        covariance_type = "diag"
    return covariance_type, means[:, observed], precision_cholesky(covariance_type, cov)


def marginal_log_gaussian_prob(
    covariance_type: str,
    X: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
    observed: np.ndarray,
) -> np.ndarray:
    """``log N(x_o | mu_o, Sigma_oo)`` for rows sharing one pattern of observed features."""
    marginal_type, means_o, prec_chol_o = marginal_parameters(
        covariance_type, means, covariances, observed
    )
    return log_gaussian_prob(marginal_type, X[:, observed], means_o, prec_chol_o)


def full_covariances(
    covariance_type: str, covariances: np.ndarray, n_components: int, n_features: int
) -> np.ndarray:
    """All components' covariances as ``(K, d, d)`` matrices, whatever the type.

    Precision Cholesky factors have the same per-type shapes, so they expand the same way.

    Examples
    --------
    >>> full_covariances("spherical", np.array([1.0, 4.0]), 2, 2)[1].tolist()
    [[4.0, 0.0], [0.0, 4.0]]
    """
    c = np.asarray(covariances, dtype=np.float64)
    k, d = n_components, n_features
    if covariance_type == "full":
        return c.reshape(k, d, d)
    if covariance_type == "tied":
        return np.repeat(c.reshape(1, d, d), k, axis=0)
    if covariance_type == "diag":
        return c.reshape(k, d)[:, :, None] * np.eye(d)
    if covariance_type == "spherical":
        return c.reshape(k, 1, 1) * np.eye(d)
    raise ValueError(
        f"unknown covariance_type {covariance_type!r}; use one of {', '.join(COVARIANCE_TYPES)}"
    )


def sampling_factors(covariance_type: str, covariances: np.ndarray, k: int, d: int) -> np.ndarray:
    """Lower Cholesky factors of each component's covariance, shape ``(K, d, d)`` (for sampling)."""
    covs = full_covariances(covariance_type, covariances, k, d)
    return np.stack([_cholesky_or_repaired(c) for c in covs])
