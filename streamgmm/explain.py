"""Per-event scales and explanations under a fitted mixture (used by the detector's results).

:class:`MixtureParameters` is a snapshot of a mixture's parameters (the detector takes one before
each batch is learned, so results describe the model that scored them). Under it:

Typical score (:func:`typical_scores`)
    ``E[-log pi_k N(x | k)]`` for ``x`` drawn from component ``k``:
    ``-log pi_k + (d (1 + log 2 pi) + log |Sigma_k|) / 2``, what an ordinary event of that
    component scores.

Incomplete events on the complete-event scale (:func:`complete_scale_scores`)
    An event with missing features is scored by the exact marginal density of its observed
    ones; to apply one threshold, its score is put on the scale of complete events: the
    Mahalanobis distance over the ``m`` observed features under the responsible component is
    mapped to the distance over all ``d`` features with the same chi-square tail probability.

Explanations (:func:`explain_event`)
    For an event under its responsible component ``k`` (mean ``mu``, precision ``P``), the
    contribution of feature ``j`` is ``0.5 (x_j - mu_j) [P (x - mu)]_j - 0.5``: these add up to
    ``0.5 * mahalanobis^2 - d/2``, the event's score minus its typical score up to the term
    ``log r_k`` (the log-responsibility, 0 for an event that only ``k`` explains), which is
    shared out in proportion to the contributions' sizes so that the total is exactly
    ``score - typical_score``. ``expected`` is ``E[x_j | the other features]`` under ``k``, and
    ``direction`` says whether the value is ``"high"`` or ``"low"`` against it.

Examples
--------
>>> import numpy as np
>>> params = MixtureParameters("full", np.array([1.0]), np.zeros((1, 2)),
...                            np.array([[[1.0, 0.8], [0.8, 1.0]]]))
>>> x = np.array([2.0, -2.0])        # each value is ordinary; together they are not
>>> excess = float(-params.log_density(x[None])[0, 0] - typical_scores(params, np.array([0]))[0])
>>> [(e["feature"], e["direction"], round(e["expected"], 1))
...  for e in explain_event(x, 0, excess, params, ["a", "b"])]
[('a', 'high', -1.6), ('b', 'low', 1.6)]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from streamgmm import _covariance as cv

__all__ = ["MixtureParameters", "typical_scores", "complete_scale_scores", "explain_event"]


@dataclasses.dataclass(frozen=True)
class MixtureParameters:
    """A mixture's parameters in scikit-learn's shapes for ``covariance_type``.

    ``precisions_cholesky`` is computed from the covariances when not given.
    """

    covariance_type: str
    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    precisions_cholesky: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.precisions_cholesky is None:
            pc = cv.precision_cholesky(self.covariance_type, self.covariances)
            object.__setattr__(self, "precisions_cholesky", pc)

    @classmethod
    def of(cls, model: Any) -> MixtureParameters:
        """The current parameters of a fitted :class:`~streamgmm.mixture.OnlineGaussianMixture`."""
        return cls(model.covariance_type, model.weights_, model.means_, model.covariances_,
                   model.precisions_cholesky_)

    @property
    def n_components(self) -> int:
        return len(self.weights)

    @property
    def n_features(self) -> int:
        return self.means.shape[1]

    def covariance(self, k: int) -> np.ndarray:
        """Component ``k``'s covariance as a ``(d, d)`` matrix."""
        one = self.covariances if self.covariance_type == "tied" else self.covariances[k : k + 1]
        return cv.full_covariances(self.covariance_type, one, 1, self.n_features)[0]

    def log_det_covariances(self) -> np.ndarray:
        """``log |Sigma_k|`` per component, shape ``(K,)``."""
        return cv.log_det_covariances(
            self.covariance_type, self.precisions_cholesky, self.n_components, self.n_features
        )

    def log_density(self, X: np.ndarray) -> np.ndarray:
        """``log N(x_i | mu_k, Sigma_k)`` of complete rows, shape ``(n, K)``."""
        return cv.log_gaussian_prob(self.covariance_type, X, self.means, self.precisions_cholesky)


def _neg_log_weights(params: MixtureParameters) -> np.ndarray:
    return -np.log(np.maximum(params.weights, 1e-300))


def typical_scores(
    params: MixtureParameters, component: np.ndarray, score: str = "density"
) -> np.ndarray:
    """The score of a typical event of component k. By density, ``E[-log pi_k N(x|k)]``
    ``= -log pi_k + (d + log|2 pi S|) / 2``; by tail mass, at the median distance,
    ``-log(pi_k / 2)``."""
    if score == "tail":
        return (_neg_log_weights(params) + math.log(2.0))[component]
    d = params.n_features
    per_k = _neg_log_weights(params) + 0.5 * (
        d * (1.0 + cv.LOG_2PI) + params.log_det_covariances()
    )
    return per_k[component]


def complete_scale_scores(
    params: MixtureParameters, X: np.ndarray, log_likelihood: np.ndarray, component: np.ndarray
) -> np.ndarray:
    """Scores of incomplete rows (NaN = missing) on the scale of complete events.

    ``log_likelihood`` is each row's marginal ``log p(x_o)`` and ``component`` its responsible
    component; a row with no observed feature scores NaN.
    """
    n, d = X.shape
    out = np.full(n, np.nan)
    log_det = params.log_det_covariances()
    neg_log_w = _neg_log_weights(params)
    patterns, inverse = np.unique(np.isnan(X), axis=0, return_inverse=True)
    for p, pattern in enumerate(patterns):
        observed = ~pattern
        m = int(observed.sum())
        if m == 0:
            continue
        rows = np.flatnonzero(inverse.ravel() == p)
        k = component[rows]
        marginal_type, means_o, prec_chol_o = cv.marginal_parameters(
            params.covariance_type, params.means, params.covariances, observed
        )
        maha2 = cv.squared_mahalanobis(marginal_type, X[rows][:, observed], means_o, prec_chol_o)
        maha2 = maha2[np.arange(len(rows)), k]
        log_det_o = cv.log_det_covariances(marginal_type, prec_chol_o, params.n_components, m)[k]
        tail = stats.chi2.sf(maha2, m)
        maha2_full = np.where(
            tail > 0, stats.chi2.isf(np.where(tail > 0, tail, 1.0), d), maha2 * d / m
        )
        log_resp = -neg_log_w[k] - 0.5 * (m * cv.LOG_2PI + log_det_o + maha2) - log_likelihood[rows]
        out[rows] = neg_log_w[k] + 0.5 * (d * cv.LOG_2PI + log_det[k] + maha2_full) + log_resp
    return out


def explain_event(
    x: np.ndarray,
    component: int,
    excess: float,
    params: MixtureParameters,
    feature_names: Sequence[str],
) -> list[dict[str, Any]]:
    """Why the event ``x`` scored ``excess`` above its typical score under ``component``.

    One dict per feature, largest contribution first, with keys ``feature``, ``value``,
    ``expected`` (``E[x_j | other features]`` under the component), ``contribution`` (nats;
    they sum to ``excess``) and ``direction`` (``"high"``, ``"low"`` or ``"missing"``).
    """
    mu = params.means[component]
    cov = params.covariance(component)
    observed = ~np.isnan(x)
    o = np.flatnonzero(observed)
    diff = x[o] - mu[o]
    prec = cv.precisions_and_log_dets(cov[np.ix_(o, o)][None])[0][0]
    pd = prec @ diff
    contrib = 0.5 * diff * pd - 0.5
    # Share out the log-responsibility so the total is exactly score - typical_score.
    residual = excess - float(contrib.sum())
    size = np.abs(contrib)
    share = size / size.sum() if size.sum() > 0 else np.full(o.size, 1.0 / max(o.size, 1))
    contrib = contrib + residual * share
    # E[x_j | other observed features] = x_j - [P (x - mu)]_j / P_jj
    expected_obs = x[o] - pd / np.diag(prec)
    out = []
    for pos, j in enumerate(o):
        out.append({
            "feature": feature_names[j],
            "value": float(x[j]),
            "expected": float(expected_obs[pos]),
            "contribution": float(contrib[pos]),
            "direction": "high" if x[j] >= expected_obs[pos] else "low",
        })
    missing = np.flatnonzero(~observed)
    if missing.size:
        # E[x_missing | observed] = mu_m + S_mo S_oo^-1 (x_o - mu_o)
        cond = mu[missing] + cov[np.ix_(missing, o)] @ pd
        for pos, j in enumerate(missing):
            out.append({
                "feature": feature_names[j],
                "value": math.nan,
                "expected": float(cond[pos]),
                "contribution": 0.0,
                "direction": "missing",
            })
    out.sort(key=lambda item: -abs(item["contribution"]))
    return out
