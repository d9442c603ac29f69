"""Drift statistics between the live mixture and a reference snapshot, and a change detector.

Per batch, :class:`DriftMonitor` reports figures a dashboard can plot (:class:`DriftReport`):

* the batch's mean log-likelihood, its EWMA, and the reference log-likelihood (the EWMA when the
  reference was taken);
* ``kl_divergence``: KL(live || reference) between the two mixtures by the closed-form variational
  approximation of Hershey & Olsen (2007), in nats (clipped at 0);
* ``mean_displacement``: how far the live components' means have moved, in standard deviations --
  the weight-averaged Mahalanobis distance from each live mean to the nearest reference component;
* ``weight_entropy``: entropy of the live mixture weights in nats (``log K`` when all equal);
* ``anomaly_rate`` (EWMA of the flags after warm-up) next to ``target_anomaly_rate``;
* ``drift_detected`` / ``n_drifts`` from a two-sided CUSUM on the log-likelihood stream.

The change detector
-------------------
Per-event log-likelihoods are floored (so that isolated anomalies cannot fake a drift), grouped
into blocks of ``block_size`` events whatever the batching, and each block mean is standardised by
the mean and standard deviation of the first ``burn_in_blocks`` blocks after the last reset. A
two-sided CUSUM with allowance ``cusum_k`` and decision interval ``cusum_h`` (in standard
deviations) raises a drift event; the detector then restarts its burn-in, and ``settle_events``
later -- once the model has had time to adapt -- the reference is re-snapshotted (how fast the
defaults detect a shift, and how rarely a stationary stream raises one: README, *Drift*).
Its state is a few numbers, so it saves without pickle (unlike River's ADWIN).

References
----------
Hershey, J. R. and Olsen, P. A. (2007). Approximating the Kullback Leibler divergence between
Gaussian mixture models. ICASSP.

Page, E. S. (1954). Continuous inspection schemes. Biometrika 41.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> monitor = DriftMonitor(target_anomaly_rate=0.01)
>>> params = dict(weights=np.array([0.5, 0.5]), means=np.array([[0.0], [5.0]]),
...               covariances=np.array([[[1.0]], [[1.0]]]), covariance_type="full")
>>> for _ in range(200):
...     report = monitor.update(rng.normal(-1.4, 1.0, 100), np.zeros(100, bool), **params)
>>> report.n_drifts, round(report.kl_divergence, 6)
(0, 0.0)
>>> shifted = dict(params, means=np.array([[0.0], [6.0]]))
>>> reports = [monitor.update(rng.normal(-2.4, 1.0, 100), np.zeros(100, bool), **shifted)
...            for _ in range(30)]
>>> first = next(r for r in reports if r.drift_detected)
>>> first.n_drifts, round(first.mean_displacement, 2)        # one component moved by 1 sd
(1, 0.5)
>>> round(reports[-1].mean_displacement, 2)     # settle_events later: the new reference
0.0
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from streamgmm import _covariance as cv

__all__ = [
    "DriftMonitor",
    "DriftReport",
    "gaussian_kl_matrix",
    "mixture_kl_variational",
    "mean_displacement",
    "weight_entropy",
]


@dataclasses.dataclass(frozen=True)
class DriftReport:
    """Drift figures for one batch (see :mod:`streamgmm.drift`). NaN where not yet defined."""

    mean_log_likelihood: float
    log_likelihood_ewma: float
    reference_log_likelihood: float
    kl_divergence: float
    mean_displacement: float
    weight_entropy: float
    anomaly_rate: float
    target_anomaly_rate: float
    drift_detected: bool
    n_drifts: int

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for logs and JSON)."""
        return dataclasses.asdict(self)


# -- the math (pure) -------------------------------------------------------------------------------
def _kl_from_parts(means_a, covs_a, logdet_a, means_b, inv_b, logdet_b) -> np.ndarray:
    d = means_a.shape[1]
    trace = np.einsum("bij,aji->ab", inv_b, covs_a)
    diff = means_b[None, :, :] - means_a[:, None, :]  # (Ka, Kb, d)
    maha = np.einsum("abi,bij,abj->ab", diff, inv_b, diff)
    return 0.5 * (trace + maha - d + logdet_b[None, :] - logdet_a[:, None])


def gaussian_kl_matrix(
    means_a: np.ndarray, covs_a: np.ndarray, means_b: np.ndarray, covs_b: np.ndarray
) -> np.ndarray:
    """``KL(N(a_i) || N(b_j))`` for every pair, a ``(K_a, K_b)`` array in nats.

    Examples
    --------
    >>> kl = gaussian_kl_matrix(np.zeros((1, 1)), np.ones((1, 1, 1)),
    ...                         np.ones((1, 1)), np.ones((1, 1, 1)))
    >>> float(kl[0, 0])
    0.5
    """
    inv_b, logdet_b = cv.precisions_and_log_dets(covs_b)
    _, logdet_a = cv.precisions_and_log_dets(covs_a)
    return _kl_from_parts(means_a, covs_a, logdet_a, means_b, inv_b, logdet_b)


def _logsumexp_rows(a: np.ndarray) -> np.ndarray:
    top = a.max(axis=1)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return top + np.log(np.exp(a - top[:, None]).sum(axis=1))


def mixture_kl_variational(
    weights_f: np.ndarray,
    means_f: np.ndarray,
    covs_f: np.ndarray,
    weights_g: np.ndarray,
    means_g: np.ndarray,
    covs_g: np.ndarray,
    _g_parts: tuple[np.ndarray, np.ndarray] | None = None,
) -> float:
    """Variational approximation of KL(f || g) between two Gaussian mixtures (Hershey & Olsen).

    ``D = sum_a w_a log(sum_a' w_a' exp(-KL(f_a||f_a')) / sum_b v_b exp(-KL(f_a||g_b)))``; it is
    exact for single Gaussians and zero when ``f == g``. Covariances as ``(K, d, d)`` arrays.

    Examples
    --------
    >>> w, m, c = np.array([1.0]), np.zeros((1, 2)), np.eye(2)[None]
    >>> mixture_kl_variational(w, m, c, w, m + 1.0, c)
    1.0
    """
    wf = np.asarray(weights_f, dtype=np.float64)
    wg = np.asarray(weights_g, dtype=np.float64)
    inv_f, logdet_f = cv.precisions_and_log_dets(covs_f)
    inv_g, logdet_g = _g_parts if _g_parts is not None else cv.precisions_and_log_dets(covs_g)
    kl_ff = _kl_from_parts(means_f, covs_f, logdet_f, means_f, inv_f, logdet_f)
    kl_fg = _kl_from_parts(means_f, covs_f, logdet_f, means_g, inv_g, logdet_g)
    with np.errstate(divide="ignore"):
        log_wf, log_wg = np.log(wf), np.log(wg)
    num = _logsumexp_rows(log_wf[None, :] - kl_ff)
    den = _logsumexp_rows(log_wg[None, :] - kl_fg)
    mask = wf > 0
    return float(np.sum(wf[mask] * (num[mask] - den[mask])))


def mean_displacement(
    weights_f: np.ndarray,
    means_f: np.ndarray,
    means_g: np.ndarray,
    covs_g: np.ndarray,
    _inv_g: np.ndarray | None = None,
) -> float:
    """Weighted mean over live components of the Mahalanobis distance to the nearest reference.

    Examples
    --------
    >>> mean_displacement(np.array([1.0]), np.array([[3.0]]), np.array([[0.0]]),
    ...                   np.array([[[4.0]]]))
    1.5
    """
    inv_g = _inv_g if _inv_g is not None else cv.precisions_and_log_dets(covs_g)[0]
    diff = means_f[:, None, :] - means_g[None, :, :]
    maha = np.einsum("abi,bij,abj->ab", diff, inv_g, diff)
    return float(np.sum(weights_f * np.sqrt(np.maximum(maha.min(axis=1), 0.0))))


def weight_entropy(weights: np.ndarray) -> float:
    """Entropy ``-sum w log w`` of the mixture weights, in nats.

    Examples
    --------
    >>> round(weight_entropy(np.array([0.5, 0.5])), 4)
    0.6931
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w[w > 0]
    return float(-np.sum(w * np.log(w)))


# -- the monitor ----------------------------------------------------------------------------------
def _lindley(start: float, increments: np.ndarray) -> np.ndarray:
    """All values of ``S_t = max(0, S_{t-1} + u_t)`` from ``S_0 = start``, without a loop.

    ``S_t = C_t - min(-S_0, min_{j<=t} C_j)`` with ``C`` the cumulative sum of the increments.
    """
    c = np.cumsum(increments)
    floor = np.minimum.accumulate(np.minimum(c, -start))
    return np.maximum(c - floor, 0.0)


class DriftMonitor:
    """Tracks drift of the live mixture and of the log-likelihood stream; one report per batch.

    Parameters
    ----------
    target_anomaly_rate
        Reported next to the observed rate.
    halflife_events
        Half-life, in events, of the log-likelihood EWMA.
    rate_halflife_events
        Half-life, in events, of the observed anomaly rate. Default ``max(1000, 5 / target)``.
    block_size
        Events per block mean fed to the CUSUM.
    burn_in_blocks
        Blocks used to standardise the CUSUM after each reset (nothing is detected meanwhile).
    cusum_k, cusum_h
        CUSUM allowance and decision interval, in standard deviations of block means.
    settle_events
        Events between a detected drift and the re-snapshot of the reference.

    Attributes
    ----------
    n_drifts : int
        Drift events since the start.
    """

    def __init__(
        self,
        target_anomaly_rate: float = 1e-3,
        halflife_events: float = 1000.0,
        rate_halflife_events: float | None = None,
        block_size: int = 32,
        burn_in_blocks: int = 100,
        cusum_k: float = 0.5,
        cusum_h: float = 12.0,
        settle_events: int = 2000,
    ):
        if halflife_events <= 0 or (rate_halflife_events is not None and rate_halflife_events <= 0):
            raise ValueError("half-lives must be > 0 events")
        if block_size < 1 or burn_in_blocks < 2:
            raise ValueError("block_size must be >= 1 and burn_in_blocks >= 2")
        self.target_anomaly_rate = float(target_anomaly_rate)
        self.halflife_events = float(halflife_events)
        if rate_halflife_events is None:
            rate_halflife_events = max(1000.0, 5.0 / max(self.target_anomaly_rate, 1e-9))
        self.rate_halflife_events = float(rate_halflife_events)
        self.block_size = int(block_size)
        self.burn_in_blocks = int(burn_in_blocks)
        self.cusum_k = float(cusum_k)
        self.cusum_h = float(cusum_h)
        self.settle_events = int(settle_events)
        # scalar state (all JSON-able)
        self.n_drifts = 0
        self.ll_ewma = math.nan
        self.rate_ewma = math.nan
        self.reference_ll = math.nan
        self._block_sum = 0.0
        self._block_count = 0
        self._burn_n = 0
        self._burn_mean = 0.0
        self._burn_m2 = 0.0
        self._cusum_pos = 0.0
        self._cusum_neg = 0.0
        self._resnapshot_in: int | None = None
        self._reference: dict[str, np.ndarray] | None = None
        self._reference_parts: tuple[np.ndarray, np.ndarray] | None = None

    # -- reference --------------------------------------------------------------------------
    def snapshot(self, weights, means, covariances, covariance_type: str) -> None:
        """Take the live mixture as the new reference (its log-likelihood: the current EWMA)."""
        w = np.asarray(weights, dtype=np.float64)
        m = np.asarray(means, dtype=np.float64)
        k, d = m.shape
        self._reference = {
            "weights": w.copy(),
            "means": m.copy(),
            "covariances": cv.full_covariances(covariance_type, covariances, k, d).copy(),
        }
        self._reference_parts = None
        self.reference_ll = self.ll_ewma
        self._resnapshot_in = None

    @property
    def has_reference(self) -> bool:
        """Whether a reference snapshot exists."""
        return self._reference is not None

    # -- per batch ----------------------------------------------------------------------------
    def update(
        self,
        log_likelihood: np.ndarray,
        is_anomaly: np.ndarray,
        weights: np.ndarray | None = None,
        means: np.ndarray | None = None,
        covariances: np.ndarray | None = None,
        covariance_type: str = "full",
        decided: np.ndarray | None = None,
        log_likelihood_floor: float = -math.inf,
        summaries: bool = True,
    ) -> DriftReport:
        """Account for one batch and report.

        Parameters
        ----------
        log_likelihood
            Per-event ``log p(x)`` under the model before it learned the batch (NaN = unscored).
        is_anomaly
            Per-event flags.
        weights, means, covariances, covariance_type
            The live mixture after learning the batch (``None`` while it is not fitted).
        decided
            Which events were decided after warm-up (default: every scored event); only those
            count for the observed anomaly rate.
        log_likelihood_floor
            Per-event log-likelihoods are raised to this floor before the EWMA and the CUSUM, so
            that isolated anomalies cannot move them much (the detector passes minus its
            threshold's rejection level).
        summaries
            Whether to compute the report's description of the live mixture against the
            reference (KL divergence, mean displacement, weight entropy; NaN if not). They only
            describe the model, nothing depends on them, and they cost more than the rest of
            the update: a caller that discards the report skips them.
        """
        ll = np.asarray(log_likelihood, dtype=np.float64).ravel()
        flags = np.asarray(is_anomaly, dtype=bool).ravel()
        finite = np.isfinite(ll)
        if decided is None:
            decided = finite
        decided = np.asarray(decided, dtype=bool).ravel()
        clipped = np.maximum(ll[finite], log_likelihood_floor)
        batch_mean = float(ll[finite].mean()) if finite.any() else math.nan
        if clipped.size:
            lam = 2.0 ** (-clipped.size / self.halflife_events)
            m = float(clipped.mean())
            self.ll_ewma = m if math.isnan(self.ll_ewma) else lam * self.ll_ewma + (1 - lam) * m
        n_decided = int(decided.sum())
        if n_decided:
            lam = 2.0 ** (-n_decided / self.rate_halflife_events)
            r = float(flags[decided].mean())
            old = self.rate_ewma
            self.rate_ewma = r if math.isnan(old) else lam * old + (1 - lam) * r

        drift = self._feed_cusum(clipped)
        have_model = weights is not None and means is not None and covariances is not None
        if drift:
            self.n_drifts += 1
            self._resnapshot_in = self.settle_events
        elif self._resnapshot_in is not None:
            self._resnapshot_in -= int(finite.sum())
        if have_model and (self._reference is None or (
            self._resnapshot_in is not None and self._resnapshot_in <= 0
        )):
            self.snapshot(weights, means, covariances, covariance_type)

        kl = displacement = entropy = math.nan
        if have_model and summaries:
            w = np.asarray(weights, dtype=np.float64)
            mu = np.asarray(means, dtype=np.float64)
            covs = cv.full_covariances(covariance_type, covariances, mu.shape[0], mu.shape[1])
            ref = self._reference
            assert ref is not None
            entropy = weight_entropy(w)
            try:
                if self._reference_parts is None:
                    self._reference_parts = cv.precisions_and_log_dets(ref["covariances"])
                parts = self._reference_parts
                kl = max(
                    mixture_kl_variational(
                        w, mu, covs, ref["weights"], ref["means"], ref["covariances"], parts
                    ),
                    0.0,
                )
                displacement = mean_displacement(
                    w, mu, ref["means"], ref["covariances"], parts[0]
                )
            except (np.linalg.LinAlgError, ValueError):
                kl = displacement = math.nan
        return DriftReport(
            mean_log_likelihood=batch_mean,
            log_likelihood_ewma=self.ll_ewma,
            reference_log_likelihood=self.reference_ll,
            kl_divergence=kl,
            mean_displacement=displacement,
            weight_entropy=entropy,
            anomaly_rate=self.rate_ewma,
            target_anomaly_rate=self.target_anomaly_rate,
            drift_detected=drift,
            n_drifts=self.n_drifts,
        )

    def _feed_cusum(self, values: np.ndarray) -> bool:
        """Add per-event values; True if a drift was detected in this batch."""
        # Complete the pending block, then take whole blocks at once.
        take = min(self.block_size - self._block_count, values.size)
        self._block_sum += float(values[:take].sum())
        self._block_count += take
        if self._block_count < self.block_size:
            return False
        rest = values[take:]
        whole = rest.size // self.block_size
        means = [self._block_sum / self.block_size]
        if whole:
            means.extend(rest[: whole * self.block_size].reshape(whole, -1).mean(axis=1).tolist())
        tail = rest[whole * self.block_size :]
        self._block_sum = float(tail.sum())
        self._block_count = tail.size
        detected = False
        blocks = np.asarray(means, dtype=np.float64)
        while blocks.size:
            if self._burn_n < self.burn_in_blocks:
                block_mean, blocks = float(blocks[0]), blocks[1:]
                self._burn_n += 1
                delta = block_mean - self._burn_mean
                self._burn_mean += delta / self._burn_n
                self._burn_m2 += delta * (block_mean - self._burn_mean)
                continue
            std = math.sqrt(self._burn_m2 / (self._burn_n - 1))
            std = max(std, 1e-9 * (abs(self._burn_mean) + 1.0))
            z = (blocks - self._burn_mean) / std
            pos = _lindley(self._cusum_pos, z - self.cusum_k)
            neg = _lindley(self._cusum_neg, -z - self.cusum_k)
            alarms = np.flatnonzero((pos > self.cusum_h) | (neg > self.cusum_h))
            if alarms.size == 0:
                self._cusum_pos, self._cusum_neg = float(pos[-1]), float(neg[-1])
                break
            detected = True
            self._reset_cusum()
            blocks = blocks[alarms[0] + 1 :]
        return detected

    def _reset_cusum(self) -> None:
        self._burn_n = 0
        self._burn_mean = 0.0
        self._burn_m2 = 0.0
        self._cusum_pos = 0.0
        self._cusum_neg = 0.0

    # -- state --------------------------------------------------------------------------------
    _PARAMS = (
        "target_anomaly_rate", "halflife_events", "rate_halflife_events", "block_size",
        "burn_in_blocks", "cusum_k", "cusum_h", "settle_events",
    )
    _SCALARS = (
        "n_drifts", "ll_ewma", "rate_ewma", "reference_ll", "_block_sum", "_block_count",
        "_burn_n", "_burn_mean", "_burn_m2", "_cusum_pos", "_cusum_neg", "_resnapshot_in",
    )

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, meta)`` for :mod:`streamgmm.checkpoint` (NaN scalars stored as ``None``)."""
        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v

        meta = {"params": {p: getattr(self, p) for p in self._PARAMS}}
        meta["scalars"] = {s: clean(getattr(self, s)) for s in self._SCALARS}
        arrays = {} if self._reference is None else {
            f"reference/{k}": v.copy() for k, v in self._reference.items()
        }
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> DriftMonitor:
        """Rebuild from :meth:`get_state` output (every scalar is required)."""
        obj = cls(**meta["params"])
        scalars = meta["scalars"]
        for name in cls._SCALARS:
            value = scalars[name]
            if value is None and name in ("ll_ewma", "rate_ewma", "reference_ll"):
                value = math.nan
            setattr(obj, name, value)
        if "reference/weights" in arrays:
            obj._reference = {
                k: np.asarray(arrays[f"reference/{k}"], dtype=np.float64)
                for k in ("weights", "means", "covariances")
            }
        return obj
