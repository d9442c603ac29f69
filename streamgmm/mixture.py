"""OnlineGaussianMixture: a Gaussian mixture learned by stepwise (online) EM from micro-batches.

The model keeps sufficient statistics — per component a weight, a mean and a *centred* scatter,
all float64 — and interpolates them with each micro-batch's statistics (Cappé & Moulines 2009;
Liang & Klein 2009). Parameters (covariances, Cholesky factors of the precisions) are derived
from the statistics after every update; they are never interpolated themselves.

Step size
    A batch of ``b`` rows at step count ``t`` (counted in batches of ``batch_size`` rows) moves the
    statistics by ``gamma = 1 - (1 - eta_t) ** (b / batch_size)`` with
    ``eta_t = max((t + 2) ** -step_exponent, min_step)``. For ``b = batch_size`` this is exactly
    the stepwise-EM schedule; two half batches move the model as far as one whole batch.
    ``min_step > 0`` turns the decaying step into exponential forgetting: the model's memory is
    then about ``1 / min_step`` batches of ``batch_size`` rows, so it tracks drift.

Forgetting by each component's own mass (Celaya & Agostini 2015)
    The weights forget at the global rate. A component's mean and scatter forget only in
    proportion to the mass it actually receives relative to its share: a rare but normal mode
    keeps the shape learned from its last few hundred events instead of decaying into a spike
    that raises false alarms.

Numerics
    Rows are centred on a running reference point before any product, scatters are combined with
    Chan's pairwise update (no ``E[x^2] - mu^2`` on raw data), ``reg_covar`` is scaled by each
    feature's variance on the initial data with its 1 % most extreme values at each end clipped
    (so it works for features in units of 1e-6 and 1e6 alike, and one gross error among the
    rows -- a value of 1e6 in N(0, 1) data, which made the plain variance ~2e9 -- does not give
    every component a variance of at least ~2000 along its feature), and a Cholesky
    factorisation that fails is repaired, not raised.

Discrete features
    A feature whose initial values lie on a grid of step ``q`` (the smallest gap between its
    distinct values) gets at least the rounding variance ``q**2 / 12`` on its diagonal: a
    Gaussian is never more certain about it than its resolution, so a rare but ordinary value
    of a count-like or nearly constant feature (a pixel that is almost always 0, a density with
    three values) does not outweigh the continuous features. Continuous features are unaffected
    (their smallest gap is tiny). What it changed on the evaluation streams: README, *Why the
    defaults*.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln

from . import _covariance as cv
from .statefile import read_state, write_state

__all__ = ["OnlineGaussianMixture"]

log = logging.getLogger(__name__)

_STATE_KIND = "OnlineGaussianMixture"
_STATE_VERSION = 2  # 2: n_eff (events behind the statistics)
# score_samples remembers its last E-step for batches at least this large, so that scoring a
# batch and then learning it (score_many then learn_many in River) runs the E-step once.
_MEMO_MIN_ROWS = 256
# A component whose weight falls below this fraction of 1/K is re-seeded...
_DEAD_WEIGHT_FRACTION = 1e-3
# ...and so is one that, over the last ~1/_ACTIVITY_RATE batches, received less than this
# fraction of the mass its weight promises (it lost the competition for the data; a rare but
# live mode still receives its share on average).
_STARVED_ACTIVITY = 0.05
_ACTIVITY_RATE = 0.1
# Fits at most of the concentration steps of an initialisation or a refit
# (OnlineGaussianMixture._fit_judged)...
_JUDGE_ROUNDS = 4
# ...which stop once a fit changes the judgement of at most this fraction of the rows
_JUDGE_SETTLED = 0.01
# Relative to a feature's magnitude, the largest gap between two values that counts as a tie
# in its rounding variance: 1e4 times double round-off, far below any data's resolution (float32
# resolves 1e-7; integer counts up to 1e11 keep their step)
_TIE_TOLERANCE = 1e-12

SampleWeight = np.ndarray | Callable[[np.ndarray], np.ndarray] | None


def _winsorised_variance(X: np.ndarray, w: np.ndarray, tail: float = 0.01) -> np.ndarray:
    """Per-feature weighted variance of ``X``, each feature clipped to its ``tail`` and
    ``1 - tail`` quantiles (over the rows of positive weight): a few far rows do not set it.

    Examples
    --------
    >>> X = np.random.default_rng(0).normal(size=(512, 1))
    >>> X[0, 0] = 1e6                                   # one gross error
    >>> round(float(X.var()))                           # the variance is the error's
    1949310398
    >>> round(float(_winsorised_variance(X, np.ones(512))[0]), 2)
    0.96
    """
    keep = w > 0
    rows, ww = (X[keep], w[keep]) if keep.any() else (X, np.ones(len(X)))
    low, high = np.quantile(rows, [tail, 1.0 - tail], axis=0)
    clipped = np.clip(rows, low, high)
    mean = (ww @ clipped) / ww.sum()
    return (ww @ (clipped - mean) ** 2) / ww.sum()


def _spread_is_round_off(X: np.ndarray) -> np.ndarray:
    """Per feature, whether all its values in ``X`` agree up to ``_TIE_TOLERANCE`` of their
    largest magnitude: one level, whatever round-off put between them.

    Examples
    --------
    >>> X = np.array([[0.1 + 0.2, 1.0], [0.3, 2.0]])
    >>> _spread_is_round_off(X).tolist()
    [True, False]
    """
    if not len(X):
        return np.zeros(X.shape[1], dtype=bool)
    return np.ptp(X, axis=0) <= _TIE_TOLERANCE * np.abs(X).max(axis=0)


def _rounding_variance(X: np.ndarray) -> np.ndarray:
    """Per feature, ``q**2 / 12`` with ``q`` the smallest gap between its distinct values in ``X``.

    The variance of rounding to a grid of step ``q``. For a discrete or coarsely quantised
    feature (counts, pixel intensities, a density that takes three values) it is the feature's
    resolution, below which no variance can be known; for a continuous one the smallest gap
    among ``n`` values is about ``range / n**2`` and the term negligible. 0 for a constant
    feature.

    Gaps below ``_TIE_TOLERANCE`` times the feature's largest magnitude are ties: the values of
    one level, rescaled by River's ``StandardScaler`` and followed back by
    :mod:`streamgmm.frame`, differ by round-off, about ``1e-17`` of that magnitude. Counted as
    gaps, they took the resolution away: behind ``StandardScaler`` the three-valued features of
    River's ImageSegments got a millionth of their variance instead of 0.4-0.7.

    Examples
    --------
    >>> levels = np.array([[0.0], [1.0], [2.0], [1.0]])
    >>> _rounding_variance(levels).round(4).tolist()
    [0.0833]
    >>> 0.1 + 0.2 == 0.3                                # one level, with round-off
    False
    >>> _rounding_variance(np.array([[0.3], [0.1 + 0.2], [0.6]])).round(4).tolist()
    [0.0075]
    """
    srt = np.sort(X, axis=0)
    gaps = np.diff(srt, axis=0)
    tie = _TIE_TOLERANCE * np.abs(srt).max(axis=0, initial=0.0)
    smallest = np.where(gaps > tie, gaps, np.inf).min(axis=0, initial=np.inf)
    return np.where(np.isfinite(smallest), smallest**2 / 12.0, 0.0)


def refit_points(end: int, first: int, least: int) -> list[int]:
    """Row counts below ``end`` at which a warm-up predictive is refitted: ``first``, then each
    an eighth more than the one before (at least ``least`` more).

    A fixed grid: row ``i`` is scored by the fit to the rows before the last point ``<= i``,
    however the stream was cut into batches and wherever a restart fell, and a warm-up of
    ``m`` rows costs about ``8 ln m`` fits instead of ``m``.

    Examples
    --------
    >>> refit_points(60, 4, 4)                         # the mixture's (_modes_log_tails)
    [4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 45, 50, 56]
    >>> refit_points(30, 3, 1)                         # the full Gaussian's
    [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20, 22, 24, 27]
    """
    points, p = [], first
    while p < end:
        points.append(p)
        p += max(least, p // 8)
    return points


# A warm-up mixture's component lighter than this is no normal mode: a tight class of anomalies
# learned in the warm-up (nothing is flagged there) would otherwise become one
_MIN_MODE_WEIGHT = 0.05
_MODES_GRID = (4, 4)  # the warm-up mixture's refit points: from 4 rows, at least 4 apart


def warmup_modes_bound(n_components: int | str, max_components: int) -> int:
    """The most components a warm-up mixture (:func:`mixture_predictive`) may have:
    ``max_components`` with ``n_components="auto"``, else the fixed ``n_components`` (the
    user's number of modes; 1: one Gaussian, no mixture).

    >>> warmup_modes_bound("auto", 10), warmup_modes_bound(1, 10)
    (10, 1)
    """
    return max_components if n_components == "auto" else int(n_components)


def modes_refit_point(n: int) -> int:
    """The warm-up mixture's last refit point (:func:`refit_points`) at or below ``n`` rows, 0
    before the first: the rows a young stream's :func:`mixture_predictive` is fitted to.

    >>> modes_refit_point(3), modes_refit_point(47), modes_refit_point(50)
    (0, 45, 50)
    """
    return (refit_points(n + 1, *_MODES_GRID) or [0])[-1]


def _segments(points: list[int], start: int, end: int):
    """``(p, first, stop)`` for each refit point whose rows ``[p, next point)`` reach into
    ``[start, end)``: rows ``first:stop`` are scored by the fit to the ``p`` rows before."""
    for i, p in enumerate(points):
        stop = points[i + 1] if i + 1 < len(points) else end
        if stop > start:
            yield p, max(p, start), stop


def _joint_log_tails(data: np.ndarray, start: int) -> np.ndarray:
    """Log predictive tail of each row of ``data`` from ``start`` on under the full Gaussian of
    the rows before it (:func:`~streamgmm._covariance.joint_predictive`), refitted at the
    points of :func:`refit_points` (every row up to 16, then every eighth); NaN before three.
    """
    out = np.full(len(data) - start, np.nan)
    centre = data[0]
    c = data - centre
    s1, s2, n = np.zeros(data.shape[1]), np.zeros((data.shape[1],) * 2), 0
    for p, first, stop in _segments(refit_points(len(data), 3, 1), start, len(data)):
        s1 = s1 + c[n:p].sum(axis=0)
        s2 = s2 + c[n:p].T @ c[n:p]
        n = p
        mean = s1 / n
        fit = cv.joint_predictive(float(n), centre + mean, s2 - n * np.outer(mean, mean))
        if fit is not None:
            out[first - start:stop - start] = cv.joint_predictive_log_tail(fit, data[first:stop])
    return out


def mixture_predictive(
    rows: np.ndarray, max_components: int, random_state: int | None = None,
    covariance_type: str = "full",
) -> list[tuple[float, cv.JointPredictive]] | None:
    """The components of the mixture of 2 to ``max_components`` Gaussians that BIC prefers to
    one Gaussian for ``rows``, as ``(log weight, predictive)`` pairs; None if one Gaussian is
    preferred (or no mixture can be fitted).

    A young stream's warm-up scores: one Gaussian over two normal modes has its mean between
    them, where an anomalous mode hides (one class between two normal ones). Each ``K`` is
    fitted by batch EM, with ``"full"`` (OAS-shrunk) or ``"diag"`` covariances, never with more
    free parameters than rows (with many features and few rows, one full Gaussian it is, at no
    cost: a diagonal mixture still separates the modes from a few rows per feature); the one
    with the lowest BIC wins, its free parameters counted as the covariance type's, so more
    components win only where the modes are clear, and only if each has three rows behind it
    (a singleton is no mode). Each component is then the
    :func:`~streamgmm._covariance.joint_predictive` of its rows (their diagonal, for
    ``"diag"``), weighted by their responsibilities: its ``n`` is the rows behind it, so a
    young component's tail is wide. A component of less than 5 % of the weight is dropped
    (the others' weights renormalised): nothing is flagged in the warm-up, so a tight class of
    anomalies is learned with the rest, and as a component of its own it would make its
    later members normal.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(40, 2)) + [[0, 0], [8, 8]] * 20
    >>> parts = mixture_predictive(X, 3, random_state=0)
    >>> one_mode = np.random.default_rng(1).normal(size=(40, 2))
    >>> len(parts), mixture_predictive(one_mode, 3, random_state=0)
    (2, None)
    >>> between = mixture_predictive_log_tail(parts, np.array([[4.0, 4.0], [0.0, 0.0]]))
    >>> bool(between[0] < between[1] - 5)     # one Gaussian would put (4, 4) at its centre
    True
    >>> wide = np.random.default_rng(2).normal(size=(150, 30)) + [[0.0] * 30, [2.0] * 30] * 75
    >>> mixture_predictive(wide, 3, 0), len(mixture_predictive(wide, 3, 0, "diag"))
    (None, 2)
    """
    d = rows.shape[1]
    if max_components < 2 or cv.n_parameters(covariance_type, 2, d) > len(rows):
        return None  # no mixture fits: nothing to compare one Gaussian with
    diagonal = covariance_type == "diag"
    best, chosen, previous, rises = math.inf, None, math.inf, 0
    for k in range(1, max_components + 1):
        if cv.n_parameters(covariance_type, k, d) > len(rows) or rises >= 2:
            break  # more free parameters than rows, or BIC rose twice in a row
        model = OnlineGaussianMixture(k, covariance_type=covariance_type, n_init=1,
                                      covariance_shrinkage=None if diagonal else "oas",
                                      random_state=random_state)
        try:
            model._fit_batch(rows, np.ones(len(rows)))  # fit(), without its convergence warning
        except (ValueError, np.linalg.LinAlgError):
            break
        bic = model.bic(rows)
        rises, previous = (rises + 1 if bic > previous else 0), bic
        if bic < best:
            parts = _component_predictives(model, rows, diagonal) if k > 1 else None
            if k == 1 or parts is not None:
                best, chosen = bic, parts
    if chosen is None:
        return None
    modes = [(lw, fit) for lw, fit in chosen if lw >= math.log(_MIN_MODE_WEIGHT)] or chosen
    total = math.log(sum(math.exp(lw) for lw, _ in modes))
    return [(lw - total, fit) for lw, fit in modes]


def _component_predictives(model: OnlineGaussianMixture, rows: np.ndarray,
                           diagonal: bool = False) -> list | None:
    """Each component's :func:`~streamgmm._covariance.joint_predictive` from its
    responsibility-weighted ``rows`` (their diagonal scatter only, with ``diagonal``), with its
    log weight; None if one has none (fewer than three rows behind it, or a singular
    covariance)."""
    parts = []
    for r in model.predict_proba(rows).T:
        n = float(r.sum())
        mean = r @ rows / max(n, 1e-300)
        centred = rows - mean
        scatter = (np.diag(r @ (centred * centred)) if diagonal
                   else (centred * r[:, None]).T @ centred)
        fit = cv.joint_predictive(n, mean, scatter)
        if fit is None:
            return None
        parts.append((math.log(n / len(rows)), fit))
    return parts


def mixture_predictive_log_tail(
    parts: list[tuple[float, cv.JointPredictive]], rows: np.ndarray
) -> Any:
    """``log sum_k w_k tail_k`` of complete rows (``(m, d)``, or one ``(d,)`` row: a float)
    under :func:`mixture_predictive`'s components: the mixture's predictive mass further out
    than each row."""
    terms = np.array([lw + cv.joint_predictive_log_tail(fit, rows) for lw, fit in parts])
    total = cv.log_sum_exp(np.atleast_2d(terms.T))  # (rows, K)
    return total if np.ndim(rows) > 1 else float(total[0])


def _seed_probabilities(w: np.ndarray) -> np.ndarray:
    """Probabilities of the rows to seed a k-means++ start (by weight; uniform if all are 0)."""
    return w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))


class OnlineGaussianMixture:
    """Gaussian mixture with scikit-learn's surface, learned online by stepwise EM.

    Parameters
    ----------
    n_components : int or "auto", default=3
        Number of components. ``"auto"`` chooses it on the warm-up buffer (or in ``fit``) by
        two-fold held-out likelihood, between 1 and ``max_components``.
    covariance_type : {"full", "tied", "diag", "spherical"}, default="full"
    covariance_shrinkage : {None, "oas"}, default=None
        ``"oas"`` shrinks each full (or tied) covariance towards its diagonal by the Oracle
        Approximating Shrinkage rule, with the intensity set by the number of events behind
        the component (:func:`~streamgmm._covariance.shrink_to_diagonal`): correlations that
        few events support fade, and the shrinkage vanishes as events accrue. For many
        features and few events. ``None`` keeps scikit-learn's maximum-likelihood estimate.
    reg_covar : float, default=1e-6
        Added to the covariances' diagonals, in units of each feature's variance on the data the
        model was initialised from, its 1 % most extreme values at each end clipped (its plain
        variance if that leaves it constant; absolute units for features that were constant
        then). At least the feature's rounding variance ``q**2 / 12`` is added, ``q`` being the
        smallest gap between its distinct values on that data (see *Numerics* in the module
        notes).
    step_exponent : float, default=0.7
        ``alpha`` of the step size ``(t + 2) ** -alpha``; must satisfy ``0.5 < alpha <= 1``.
    min_step : float, default=0.0
        Floor on the step size per batch of ``batch_size`` rows; ``> 0`` means exponential
        forgetting with a memory of about ``1 / min_step`` such batches.
    batch_size : int, default=256
        The batch size the step schedule is expressed in (any batch size may be passed).
    warmup_size : int, optional
        Rows gathered by ``partial_fit`` before the model initialises itself. Defaults to
        ``max(500, 10 * K * d)`` with ``K`` the (maximum) number of components.
    refit_size : int, optional
        After initialising, keep the rows learned and refit the mixture to all of them by batch
        EM (choosing K again) each time their number has grown by half, up to ``refit_size``
        rows; then they are dropped and learning is purely online. A young stream thus gets the
        batch fit of everything seen so far (which stepwise EM only approaches), with K growing
        as the data supports it, at a bounded cost (the sizes grow geometrically) and memory
        (``refit_size`` rows). ``None`` (default): initialise once.
    n_init : int, default=3
        Restarts (k-means++ seeding followed by batch EM) at initialisation; the best is kept.
    max_iter : int, default=100
        EM iterations per restart in ``fit`` and at initialisation.
    tol : float, default=1e-3
        Convergence threshold on the change of the mean log-likelihood between EM iterations.
    max_components : int, default=10
        Upper bound for ``"auto"`` and for components added by :meth:`spawn_component`.
    random_state : int or None
        Seed for initialisation, re-seeding and sampling.
    weights_init, means_init, precisions_init : array-like, optional
        Initial parameters for ``fit`` (scikit-learn semantics).

    Attributes
    ----------
    weights_, means_, covariances_, precisions_cholesky_ : ndarray
        Fitted parameters, in scikit-learn's shapes.
    n_refits_ : int
        Refits since initialisation (see ``refit_size``).
    held_out_log_likelihood_, held_out_log_tail_, held_out_sample_weight_ : ndarray or None
        Two-fold cross-fitted log-likelihoods and log tail masses (each row scored by the half
        it was not fitted on) and weights of the rows of the last initialisation or refit:
        honest scores of data the model was fitted to, e.g. to recalibrate a threshold after a
        refit.
    n_events_learned_ : int
        Rows passed to ``fit``/``partial_fit`` since creation (including the warm-up rows).
    converged_, n_iter_, lower_bound_ :
        As in scikit-learn, for the last batch EM run (``fit`` or initialisation).

    Examples
    --------
    >>> import numpy as np
    >>> from streamgmm import OnlineGaussianMixture
    >>> rng = np.random.default_rng(0)
    >>> X = np.vstack([rng.normal(-5, 1, (3000, 2)), rng.normal(5, 1, (3000, 2))])
    >>> X = X[rng.permutation(len(X))]
    >>> gmm = OnlineGaussianMixture(n_components=2, random_state=0)
    >>> for batch in np.array_split(X, 30):
    ...     log_lik = gmm.score_partial_fit(batch)   # score first, then learn
    >>> np.round(np.sort(gmm.means_[:, 0]))
    array([-5.,  5.])
    >>> gmm.predict(np.array([[-5.0, -5.0], [5.0, 5.0]])).tolist() == gmm.predict(
    ...     gmm.means_[np.argsort(gmm.means_[:, 0])]).tolist()
    True
    >>> gmm.n_events_learned_
    6000
    """

    def __init__(
        self,
        n_components: int | str = 3,
        *,
        covariance_type: str = "full",
        covariance_shrinkage: str | None = None,
        reg_covar: float = 1e-6,
        step_exponent: float = 0.7,
        min_step: float = 0.0,
        batch_size: int = 256,
        warmup_size: int | None = None,
        refit_size: int | None = None,
        n_init: int = 3,
        max_iter: int = 100,
        tol: float = 1e-3,
        max_components: int = 10,
        random_state: int | None = None,
        weights_init: Any = None,
        means_init: Any = None,
        precisions_init: Any = None,
    ) -> None:
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.covariance_shrinkage = covariance_shrinkage
        self.reg_covar = reg_covar
        self.step_exponent = step_exponent
        self.min_step = min_step
        self.batch_size = batch_size
        self.warmup_size = warmup_size
        self.refit_size = refit_size
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.max_components = max_components
        self.random_state = random_state
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self._check_parameters()
        self._rng = np.random.default_rng(random_state)
        self.n_events_learned_ = 0
        self.n_features_in_: int | None = None
        self.converged_ = False
        self.n_iter_ = 0
        self.lower_bound_ = -np.inf
        self._fitted = False
        self._steps = 0.0
        self._n_eff = 0.0  # effective number of events behind the statistics (Kish)
        self._next_refit = 0  # buffered rows at which to refit (0: no more refits)
        self.n_refits_ = 0
        self.held_out_log_likelihood_: np.ndarray | None = None
        self.held_out_log_tail_: np.ndarray | None = None
        self.held_out_sample_weight_: np.ndarray | None = None
        self._buffer: list[np.ndarray] = []
        self._buffer_weights: list[np.ndarray] = []
        self._memo: tuple[np.ndarray, np.ndarray] | None = None
        # the warm-up's last mixture (_modes_log_tails): (digest of its rows, its components)
        self._warm_modes: tuple[bytes, list | None] | None = None
        # Optional ``(rows, weights) -> weights`` for the rows of a fit to the buffer: called
        # with the current model before a refit, and after each fit of an initialisation or a
        # refit until its answer settles (_fit_judged; the Detector judges its rows again); not a
        # parameter and not part of the state: its owner sets it.
        self.refit_weights: Any = None

    # ------------------------------------------------------------------ validation

    def _check_parameters(self) -> None:
        k = self.n_components
        if not (k == "auto" or (isinstance(k, int | np.integer) and not isinstance(k, bool))):
            raise ValueError(f"n_components must be a positive int or 'auto', got {k!r}")
        if k != "auto" and k < 1:
            raise ValueError(f"n_components must be >= 1, got {k}")
        if self.covariance_type not in cv.COVARIANCE_TYPES:
            raise ValueError(
                f"covariance_type must be one of {cv.COVARIANCE_TYPES}, "
                f"got {self.covariance_type!r}"
            )
        if self.covariance_shrinkage not in (None, "oas"):
            raise ValueError(
                f"covariance_shrinkage must be None or 'oas', got {self.covariance_shrinkage!r}"
            )
        if not (self.reg_covar >= 0 and np.isfinite(self.reg_covar)):
            raise ValueError(f"reg_covar must be a finite number >= 0, got {self.reg_covar!r}")
        if not 0.5 < self.step_exponent <= 1.0:
            raise ValueError(f"step_exponent must be in (0.5, 1], got {self.step_exponent!r}")
        if not 0.0 <= self.min_step < 1.0:
            raise ValueError(f"min_step must be in [0, 1), got {self.min_step!r}")
        for name in ("batch_size", "n_init", "max_iter", "max_components"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.warmup_size is not None and (
            not isinstance(self.warmup_size, int | np.integer) or self.warmup_size < 1
        ):
            raise ValueError(
                f"warmup_size must be a positive int or None, got {self.warmup_size!r}"
            )
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol!r}")

    def _validate_X(self, X: Any, allow_nan: bool = False) -> np.ndarray:
        try:
            X = np.asarray(X, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"X must be numeric: {exc}") from exc
        if X.ndim != 2:
            raise ValueError(
                f"X must be 2-D (n_samples, n_features), got an array of shape {X.shape}; "
                "use X.reshape(1, -1) for a single event"
            )
        if X.shape[1] == 0:
            raise ValueError("X has no features (shape (n, 0))")
        if self.n_features_in_ is not None and X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but the model was built on {self.n_features_in_}"
            )
        bad = ~np.isfinite(X) if not allow_nan else np.isinf(X)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            what = "NaN or inf" if not allow_nan else "inf"
            raise ValueError(
                f"X contains {what} (first at row {row}, feature {col}); clean or drop such rows"
            )
        return X

    @staticmethod
    def _validate_weights(weights: Any, n: int) -> np.ndarray:
        if weights is None:
            return np.ones(n)
        try:
            w = np.asarray(weights, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sample_weight must be numeric: {exc}") from exc
        if w.shape != (n,):
            raise ValueError(f"sample_weight must have shape ({n},), got {w.shape}")
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError("sample_weight must be finite and >= 0")
        return w

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise ValueError(
                "this OnlineGaussianMixture is not fitted yet: call fit(X), or partial_fit until "
                f"it has gathered its warm-up buffer ({self._warmup_target()} rows)"
            )

    # ------------------------------------------------------------------ derived quantities

    @property
    def is_fitted(self) -> bool:
        """False while ``partial_fit`` is still gathering the warm-up buffer."""
        return self._fitted

    @property
    def n_components_(self) -> int:
        """The current number of components."""
        self._check_fitted()
        return len(self._weight_stat)

    @property
    def warmup_remaining(self) -> int:
        """Rows still needed before the model initialises itself (0 once fitted)."""
        if self._fitted:
            return 0
        return max(0, self._warmup_target() - sum(len(b) for b in self._buffer))

    def _max_k(self) -> int:
        if self.n_components == "auto":
            return self.max_components
        return max(int(self.n_components), self.max_components)

    def _warmup_target(self, n_features: int | None = None) -> int:
        if self.warmup_size is not None:
            return int(self.warmup_size)
        d = n_features or self.n_features_in_ or 1
        k = self.max_components if self.n_components == "auto" else int(self.n_components)
        return max(500, 10 * k * d)

    def _update_parameters(self) -> None:
        """Derive weights, means, covariances and precision Cholesky factors from statistics."""
        self._memo = None
        self.weights_ = self._weight_stat / self._weight_stat.sum()
        self.means_ = self._means + self._shift
        counts = None if self.covariance_shrinkage is None else self.weights_ * self._n_eff
        self.covariances_ = cv.covariances_from_scatter(
            self.covariance_type, self._scatter, self.weights_, self._reg, counts
        )
        self.precisions_cholesky_ = cv.precision_cholesky(self.covariance_type, self.covariances_)
        self._log_weights = np.log(np.maximum(self.weights_, np.finfo(float).tiny))

    @property
    def precisions_(self) -> np.ndarray:
        """Precision matrices (inverse covariances), in scikit-learn's shapes."""
        self._check_fitted()
        pc = self.precisions_cholesky_
        if self.covariance_type == "full":
            return pc @ np.swapaxes(pc, 1, 2)
        if self.covariance_type == "tied":
            return pc @ pc.T
        return pc**2

    # ------------------------------------------------------------------ E-step

    def _weighted_log_prob(self, X: np.ndarray, centred: bool = False) -> np.ndarray:
        """``log pi_k + log N(x | k)`` for rows ``X`` (shape ``(n, K)``)."""
        return cv.log_gaussian_prob(
            self.covariance_type,
            X if centred else X - self._shift,
            self._means,
            self.precisions_cholesky_,
            self._log_weights,
        )

    def _estep(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return cv.posterior(self._weighted_log_prob(X))

    def _log_tail(self, weighted_log_prob: np.ndarray) -> np.ndarray:
        """:func:`~streamgmm._covariance.log_tail_mass` of rows from their E-step."""
        return cv.log_tail_mass(
            weighted_log_prob - self._log_weights[None, :], self._log_weights,
            self.covariance_type, self.precisions_cholesky_, self._means.shape[1],
        )

    # ------------------------------------------------------------------ scikit-learn surface

    def score_samples(self, X: Any) -> np.ndarray:
        """Log-likelihood ``log p(x)`` of each row under the mixture, shape ``(n,)``."""
        self._check_fitted()
        X = self._validate_X(X)
        wlp = self._weighted_log_prob(X)
        if len(X) >= _MEMO_MIN_ROWS:
            self._memo = (X.copy(), wlp)
        return cv.log_sum_exp(wlp)

    def score_tail_samples(self, X: Any) -> np.ndarray:
        """Log of the mixture's mass further out than each row, shape ``(n,)``.

        ``log sum_k pi_k P(chi2_d >= q_k(x))``, ``q_k`` the squared Mahalanobis distance to
        component ``k`` (:func:`~streamgmm._covariance.log_tail_mass`): at most 0, lower =
        more unusual. Where :meth:`score_samples` ranks by density, so that a point inside a
        tight but light component (a small cluster of anomalies, say) looks normal, this ranks
        by how much of the mixture's mass lies beyond the point.

        Examples
        --------
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X = np.vstack([rng.normal(size=(950, 2)), 0.01 * rng.normal(size=(50, 2)) + 6])
        >>> gmm = OnlineGaussianMixture(2, random_state=0).fit(X)
        >>> tight_centre, broad_edge = [6.0, 6.0], [2.0, 0.0]
        >>> ll = gmm.score_samples([tight_centre, broad_edge])
        >>> tail = gmm.score_tail_samples([tight_centre, broad_edge])
        >>> bool(ll[0] > ll[1]), bool(tail[0] < tail[1])
        (True, True)
        """
        self._check_fitted()
        X = self._validate_X(X)
        return self._log_tail(self._weighted_log_prob(X))

    def warmup_score_samples(
        self, X: Any, return_tail: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Predictive log-density of rows while the model gathers its warm-up buffer.

        Row ``i`` is scored under a Gaussian of unknown mean and variance per feature, fitted to
        the ``n`` rows buffered so far *and the rows of* ``X`` *before it* (prequential within
        the batch): each feature's predictive is a Student-t with ``n - 1`` degrees of freedom,
        location the mean and scale ``s (1 + 1/n)^(1/2)`` (at least the feature's rounding
        resolution), the features taken as independent. Wider than the plug-in Gaussian while
        ``n`` is small, so the first rows of a stream get honest log-densities before the
        mixture exists. A feature that has not varied in the ``n`` rows adds at most
        :func:`~streamgmm._covariance.unvaried_residual_cap` to the squared residual. NaN while
        fewer than two rows precede a row, and once the model is fitted (use
        :meth:`score_samples`). Nothing is learned. With ``return_tail``, also the log
        of the predictive tail (the counterpart of :meth:`score_tail_samples`): of
        ``F(d, n - 1)`` at the mean squared standardised residual ``sum_j t_j**2 / d``; from
        three rows on, with two features or more, the mean of that log tail and the one of a
        full Gaussian of the rows before (its correlations shrunk by the OAS rule,
        :func:`~streamgmm._covariance.joint_predictive`) -- the geometric mean of the two
        tail probabilities, as ``GMMDetector``'s warm-up scores: the full Gaussian sees an
        event that breaks a correlation, the diagonal one every feature an anomaly moves.
        Where BIC prefers a mixture of full Gaussians for the rows before
        (:func:`mixture_predictive`), the tail is that mixture's alone: one Gaussian over
        several modes has its mean between them, where an anomalous mode hides. Both are
        refitted at fixed row counts (:func:`refit_points`), so the scores do not depend on
        how the rows were cut into batches.

        Examples
        --------
        >>> import numpy as np
        >>> m = OnlineGaussianMixture(2, warmup_size=100)
        >>> ll = m.warmup_score_samples(np.vstack([np.random.default_rng(0).normal(size=(50, 2)),
        ...                                        [[0.0, 0.0], [5.0, 5.0]]]))
        >>> bool(np.isnan(ll[:2]).all() and ll[50] > ll[51] + 10)
        True
        """
        X = self._validate_X(X)
        out = np.full(len(X), np.nan)
        tail = np.full(len(X), np.nan)
        if self._fitted or len(X) == 0:
            return (out, tail) if return_tail else out
        past = (np.vstack(self._buffer)[np.concatenate(self._buffer_weights) > 0]
                if self._buffer else np.empty((0, X.shape[1])))
        data = np.vstack([past, X])
        centre = data[0]
        c = data - centre
        # statistics of the rows before each row of X: cumulative sums, centred for stability
        n = np.arange(len(past), len(data), dtype=np.float64)[:, None]
        s1 = np.cumsum(c, axis=0)[len(past) - 1 : -1] if len(past) else None
        s2 = np.cumsum(c * c, axis=0)[len(past) - 1 : -1] if len(past) else None
        zero = np.zeros((1, X.shape[1]))
        if s1 is None:
            s1 = np.vstack([zero, np.cumsum(c[:-1], axis=0)])
            s2 = np.vstack([zero, np.cumsum(c[:-1] ** 2, axis=0)])
        ok = n[:, 0] >= 2
        if not ok.any():
            return (out, tail) if return_tail else out
        n, s1, s2, x = n[ok], s1[ok], s2[ok], c[len(past):][ok]
        mean = s1 / n
        var = np.maximum(s2 - n * mean**2, 0.0) / (n - 1.0)
        tiny = 1e-12 * (1.0 + (mean + centre) ** 2)
        floor = np.maximum(_rounding_variance(data), tiny)
        nu = n - 1.0
        scale2 = np.maximum(var, floor) * (1.0 + 1.0 / n)
        const = gammaln((nu + 1.0) / 2.0) - gammaln(nu / 2.0) - 0.5 * np.log(nu * math.pi)
        z2 = (x - mean) ** 2 / (nu * scale2)
        # a feature that has not varied yet: at most the cap (GMMDetector's warm-up does the same)
        z2 = np.where(var <= tiny, np.minimum(z2, cv.unvaried_residual_cap(n) / nu), z2)
        out[ok] = (const - 0.5 * np.log(scale2) - 0.5 * (nu + 1.0) * np.log1p(z2)).sum(axis=1)
        if not return_tail:
            return out
        d = X.shape[1]
        statistic, dof = (z2 * nu).sum(axis=1) / d, nu[:, 0]
        tail[ok] = cv.log_f_tail(statistic, d, dof)
        if np.isfinite(data).all():
            modes = self._modes_log_tails(data, len(past))
            by_modes = ok & np.isfinite(modes)
            tail[by_modes] = modes[by_modes]
            if d > 1:
                joint = _joint_log_tails(data, len(past))
                both = ok & np.isfinite(joint) & ~by_modes
                tail[both] = 0.5 * (tail[both] + joint[both])
        return out, tail

    def _modes_log_tails(self, data: np.ndarray, start: int) -> np.ndarray:
        """Log predictive tail of each row of ``data`` from ``start`` on under the mixture of
        full Gaussians BIC prefers for the rows before it
        (:func:`mixture_predictive`, of at most :func:`warmup_modes_bound` components;
        refitted at the fixed points of :func:`refit_points`: 4, 8, 12, 16, then every
        eighth); NaN where one Gaussian is preferred.

        The last fit is kept with a digest of the rows it was fitted to, so that
        micro-batches of a few events do not refit it each time; it is derived from the buffer
        alone, so it is not part of the state (a restored model fits it again, to the same
        rows).
        """
        out = np.full(len(data) - start, np.nan)
        max_k = warmup_modes_bound(self.n_components, self.max_components)
        if max_k < 2:
            return out
        for p, first, stop in _segments(refit_points(len(data), *_MODES_GRID), start, len(data)):
            digest = hashlib.blake2b(np.ascontiguousarray(data[:p]).tobytes(),
                                     digest_size=16).digest()
            cached = self._warm_modes
            if cached is not None and cached[0] == digest:
                parts = cached[1]
            else:
                parts = mixture_predictive(data[:p], max_k, self.random_state)
                self._warm_modes = (digest, parts)
            if parts is not None:
                out[first - start:stop - start] = mixture_predictive_log_tail(
                    parts, data[first:stop])
        return out

    def _recall_estep(self, X: np.ndarray) -> np.ndarray | None:
        """The weighted log-probabilities of ``X`` if ``score_samples`` just computed them under
        the current parameters (the memo is dropped whenever the parameters change)."""
        memo = self._memo
        if memo is not None and memo[0].shape == X.shape and np.array_equal(memo[0], X):
            return memo[1]
        return None

    def score(self, X: Any, y: Any = None) -> float:
        """Mean log-likelihood per row."""
        return float(self.score_samples(X).mean())

    def predict_proba(self, X: Any) -> np.ndarray:
        """Posterior probability of each component for each row, shape ``(n, K)``."""
        self._check_fitted()
        return self._estep(self._validate_X(X))[1]

    def predict(self, X: Any) -> np.ndarray:
        """Most likely component of each row."""
        self._check_fitted()
        return self._weighted_log_prob(self._validate_X(X)).argmax(axis=1)

    def sample(self, n_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n_samples`` rows; returns ``(X, component_labels)`` like scikit-learn."""
        self._check_fitted()
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        k, d = self._means.shape
        counts = self._rng.multinomial(n_samples, self.weights_)
        factors = cv.sampling_factors(self.covariance_type, self.covariances_, k, d)
        X = np.vstack(
            [
                self.means_[j] + self._rng.standard_normal((c, d)) @ factors[j].T
                for j, c in enumerate(counts)
            ]
        )
        labels = np.repeat(np.arange(k), counts)
        return X, labels

    def _n_parameters(self) -> int:
        return cv.n_parameters(self.covariance_type, len(self._weight_stat), self.n_features_in_)

    def bic(self, X: Any) -> float:
        """Bayesian information criterion on ``X`` (lower is better)."""
        X = self._validate_X(X)
        return -2.0 * self.score(X) * len(X) + self._n_parameters() * np.log(len(X))

    def aic(self, X: Any) -> float:
        """Akaike information criterion on ``X`` (lower is better)."""
        X = self._validate_X(X)
        return -2.0 * self.score(X) * len(X) + 2.0 * self._n_parameters()

    # ------------------------------------------------------------------ batch EM

    def _set_reference(self, X: np.ndarray, w: np.ndarray) -> None:
        """Fix the centring point and the per-feature regularisation from initial data."""
        self.n_features_in_ = X.shape[1]
        wsum = w.sum() if w.sum() > 0 else 1.0
        self._shift = (w @ X) / wsum if w.sum() > 0 else X.mean(axis=0)
        var = (w @ (X - self._shift) ** 2) / wsum
        # no single row sets the unit; a nearly constant feature (a blank pixel) keeps its own
        clipped = _winsorised_variance(X, w)
        var = np.where(clipped > 0, clipped, var)
        # a constant feature's weighted mean misses its value by round-off, which left it a
        # variance of (1e-16 |value|)**2 and the covariances a diagonal next to nothing
        var[_spread_is_round_off(X)] = 0.0
        positive = var[var > 0]
        fill = positive.mean() if len(positive) else 1.0
        self._reg = np.maximum(self.reg_covar * np.where(var > 0, var, fill),
                               _rounding_variance(X))

    def _mstep_replace(self, Xc: np.ndarray, resp: np.ndarray) -> None:
        fallback = np.zeros((resp.shape[1], Xc.shape[1]))
        mass, means, scatter = cv.batch_statistics(self.covariance_type, Xc, resp, fallback)
        self._weight_stat = np.maximum(mass / mass.sum(), np.finfo(float).tiny)
        self._n_eff = float(mass.sum())
        self._means = means
        self._scatter = scatter
        self._activity = np.ones(len(mass))

    def _kmeans_pp_resp(self, Xc: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
        """Hard responsibilities from k-means++ seeding followed by a few Lloyd iterations.

        Distances are measured on rows scaled to unit variance per feature, so that the seeding
        (and with it the fitted mixture) does not depend on the features' units.
        """
        n = len(Xc)
        spread = Xc.std(axis=0)
        scale = np.where(spread > 0, spread, 1.0)
        Xc = Xc / scale
        centers = [Xc[self._rng.choice(n, p=_seed_probabilities(w))]]
        d2 = ((Xc - centers[0]) ** 2).sum(axis=1)
        for _ in range(1, k):
            weights = d2 * w
            total = weights.sum()
            idx = self._rng.choice(n, p=weights / total) if total > 0 else self._rng.integers(n)
            centers.append(Xc[idx])
            d2 = np.minimum(d2, ((Xc - Xc[idx]) ** 2).sum(axis=1))
        centers = np.array(centers)
        for _ in range(3):
            dist = (
                (Xc**2).sum(1)[:, None] - 2 * Xc @ centers.T + (centers**2).sum(1)[None, :]
            )
            labels = dist.argmin(axis=1)
            for j in range(k):
                members = labels == j
                if members.any() and w[members].sum() > 0:
                    centers[j] = (w[members] @ Xc[members]) / w[members].sum()
        resp = np.zeros((n, k))
        resp[np.arange(n), labels] = 1.0
        return resp

    def _run_em(
        self, Xc: np.ndarray, w: np.ndarray, resp: np.ndarray, max_iter: int
    ) -> tuple[float, int, bool]:
        """Batch EM from initial responsibilities; returns (lower bound, iterations, converged)."""
        self._mstep_replace(Xc, resp * w[:, None])
        self._update_parameters()
        lower = -np.inf
        wsum = w.sum()
        for it in range(1, max_iter + 1):
            wlp = (
                cv.log_gaussian_prob(
                    self.covariance_type, Xc, self._means, self.precisions_cholesky_
                )
                + self._log_weights
            )
            ll, resp = cv.posterior(wlp)
            new_lower = float(w @ ll / wsum)
            self._mstep_replace(Xc, resp * w[:, None])
            self._update_parameters()
            if abs(new_lower - lower) < self.tol:
                return new_lower, it, True
            lower = new_lower
        return lower, max_iter, False

    def _initialise(self, X: np.ndarray, w: np.ndarray, k: int) -> None:
        """Best of ``n_init`` k-means++ + EM runs with ``k`` components (or the given init)."""
        self._set_reference(X, w)
        Xc = X - self._shift
        best = None
        if self.means_init is not None or self.weights_init is not None:
            runs = [self._resp_from_init(Xc, k)]
        elif k == 1:
            # every start gives the same single Gaussian: fit it once, but draw each start's
            # seed row still, so that later fits see the random stream n_init starts leave
            runs = [None]
            p = _seed_probabilities(w)
            for _ in range(self.n_init - 1):
                self._rng.choice(len(X), p=p)
        else:
            runs = [None] * self.n_init
        for resp0 in runs:
            resp = resp0 if resp0 is not None else self._kmeans_pp_resp(Xc, w, k)
            lower, n_iter, converged = self._run_em(Xc, w, resp, self.max_iter)
            if best is None or lower > best[0]:
                best = (lower, n_iter, converged, self._weight_stat, self._means, self._scatter)
        self.lower_bound_, self.n_iter_, self.converged_ = best[0], best[1], best[2]
        self._weight_stat, self._means, self._scatter = best[3], best[4], best[5]
        self._fitted = True
        self._update_parameters()

    def _resp_from_init(self, Xc: np.ndarray, k: int) -> np.ndarray:
        """Responsibilities implied by user-given initial parameters (scikit-learn semantics)."""
        d = Xc.shape[1]
        weights = (
            np.full(k, 1.0 / k) if self.weights_init is None else np.asarray(self.weights_init)
        )
        means = np.asarray(self.means_init, dtype=float) - self._shift
        if self.precisions_init is not None:
            prec = np.asarray(self.precisions_init, dtype=float)
            if self.covariance_type in ("full", "tied"):
                stack = prec[None] if self.covariance_type == "tied" else prec
                chol = np.linalg.cholesky(stack)
                prec_chol = chol[0] if self.covariance_type == "tied" else chol
            else:
                prec_chol = np.sqrt(prec)
        else:
            cov = np.ones(k) if self.covariance_type == "spherical" else None
            if self.covariance_type == "full":
                cov = np.repeat(np.eye(d)[None], k, axis=0)
            elif self.covariance_type == "tied":
                cov = np.eye(d)
            elif self.covariance_type == "diag":
                cov = np.ones((k, d))
            prec_chol = cv.precision_cholesky(self.covariance_type, cov)
        wlp = cv.log_gaussian_prob(self.covariance_type, Xc, means, prec_chol) + np.log(weights)
        return cv.posterior(wlp)[1]

    def _choose_k(self, X: np.ndarray, w: np.ndarray) -> int:
        """Number of components by two-fold held-out log-likelihood on ``X``.

        Each K is fitted on one half of the rows and scored on the other, both ways, so that
        every row gets a held-out log-likelihood under each K (the search stops after two falls
        in a row of the mean). The fewest components whose mean is
        within one standard error of the best one's wins (the one-standard-error rule of
        cross-validation, Breiman et al. 1984), the standard error being that of the mean
        per-row difference: on small halves the best mean is often a fluke.

        K > 1 is only tried while the mixture has no more free parameters (as counted for BIC)
        than a fitting half has rows: with fewer, the held-out comparison is decided by noise,
        and on discrete data with anomalies among the warm-up rows (Shuttle) a broad, light
        component that only houses the anomalies can win it. Shrunk covariances are counted
        as full ones (README, *Why the defaults*, says what counting them as diagonal did).
        """
        n = len(X)
        order = self._rng.permutation(n)
        splits = [(order[: n // 2], order[n // 2 :]), (order[n // 2 :], order[: n // 2])]
        d = X.shape[1]
        max_k = max(1, min(self.max_components, n // 4))
        while max_k > 1 and cv.n_parameters(self.covariance_type, max_k, d) > n // 2:
            max_k -= 1
        best_k, best, falls, previous = 1, -np.inf, 0, -np.inf
        wn = w / max(w.sum(), 1e-300)
        per_row: dict[int, np.ndarray] = {}
        per_row_tail: dict[int, np.ndarray] = {}
        for k in range(1, max_k + 1):
            per_row[k], per_row_tail[k] = np.empty(n), np.empty(n)
            for train, test in splits:
                per_row[k][test], per_row_tail[k][test] = self._held_out(X, w, k, train, test)
            held_out = float(wn @ per_row[k])
            if held_out > best:
                best_k, best = k, held_out
            falls = falls + 1 if held_out < previous else 0
            previous = held_out
            if falls >= 2:
                break
        # One-standard-error rule: the fewest components whose held-out log-likelihood is
        # within one standard error (of the paired per-row difference) of the best.
        n_eff = 1.0 / max(float(wn @ wn), 1e-300)
        for k in range(1, best_k):
            diff = per_row[best_k] - per_row[k]
            mean = float(wn @ diff)
            if mean <= math.sqrt(max(float(wn @ (diff - mean) ** 2), 0.0) / n_eff):
                best_k = k
                break
        log.info("n_components='auto' chose %d components by held-out likelihood", best_k)
        self.held_out_log_likelihood_, self.held_out_sample_weight_ = per_row[best_k], w
        self.held_out_log_tail_ = per_row_tail[best_k]
        return best_k

    def _held_out(
        self, X: np.ndarray, w: np.ndarray, k: int, train: np.ndarray, test: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Log-likelihoods and log tail masses of ``X[test]`` under ``k`` components fitted to
        ``X[train]``."""
        self._initialise(X[train], w[train], k)
        wlp = self._weighted_log_prob(X[test])
        return cv.log_sum_exp(wlp), self._log_tail(wlp)

    def _fit_batch(self, X: np.ndarray, w: np.ndarray) -> None:
        if self.n_components == "auto":
            k = self._choose_k(X, w)
        else:
            k = int(self.n_components)
        if len(X) < k:
            raise ValueError(
                f"need at least n_components={k} rows to initialise, got {len(X)}"
            )
        if self.n_components != "auto" and self.refit_size is not None and len(X) >= 2 * k:
            order = self._rng.permutation(len(X))
            a, b = order[: len(X) // 2], order[len(X) // 2 :]
            ll, tail = np.empty(len(X)), np.empty(len(X))
            ll[b], tail[b] = self._held_out(X, w, k, a, b)
            ll[a], tail[a] = self._held_out(X, w, k, b, a)
            self.held_out_log_likelihood_, self.held_out_sample_weight_ = ll, w
            self.held_out_log_tail_ = tail
        self._initialise(X, w, k)
        self._steps = len(X) / self.batch_size

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> OnlineGaussianMixture:
        """Batch EM on ``X`` (restarts from scratch), as scikit-learn's ``fit``.

        Afterwards ``partial_fit`` continues from the fitted statistics.
        """
        X = self._validate_X(X)
        w = self._validate_weights(sample_weight, len(X))
        k = self.n_components
        if k != "auto" and len(X) < int(k):
            raise ValueError(f"need at least n_components={k} rows to fit, got {len(X)}")
        self.n_features_in_ = None
        self._fitted = False
        self._buffer, self._buffer_weights = [], []
        self._fit_batch(X, w)
        if not self.converged_:  # the internal fits (held-out, refits) do not say so
            log.warning(
                "EM did not converge in %d iterations (tol=%g); increase max_iter or tol",
                self.max_iter,
                self.tol,
            )
        self.n_events_learned_ = len(X)
        return self

    # ------------------------------------------------------------------ stepwise EM

    def set_min_step(self, min_step: float) -> None:
        """Change the floor of the step size (``min_step``) from the next batch on.

        Raising it for a while makes the model forget faster; the detector does so after it
        adopts a new mode, so that the old shape fades (:mod:`streamgmm.adoption`).
        """
        if not 0.0 <= min_step < 1.0:
            raise ValueError(f"min_step must be in [0, 1), got {min_step!r}")
        self.min_step = float(min_step)

    def _step_size(self, n_rows: float) -> float:
        eta = max((self._steps + 2.0) ** -self.step_exponent, self.min_step)
        return 1.0 - (1.0 - eta) ** (n_rows / self.batch_size)

    def _learn(self, Xc: np.ndarray, w: np.ndarray | None, resp: np.ndarray) -> None:
        """One stepwise-EM update from centred rows, their weights (None: all 1) and posteriors."""
        wsum = float(len(Xc)) if w is None else w.sum()
        if wsum <= 0:
            return
        gamma = self._step_size(wsum)
        mass, means, scatter = cv.batch_statistics(
            self.covariance_type, Xc, resp if w is None else resp * w[:, None], self._means
        )
        weights = self._weight_stat / self._weight_stat.sum()
        share = mass / wsum
        # Per-component step: the component forgets in proportion to the mass it receives
        # relative to its share (Celaya & Agostini 2015), capped so that a handful of points
        # cannot replace a component's shape.
        relative = share / np.maximum(weights, np.finfo(float).tiny)
        step = 1.0 - (1.0 - gamma) ** relative
        if gamma < 1.0:
            d = Xc.shape[1]
            floor_points = d + 1.0 if cv.is_matrix_type(self.covariance_type) else 1.0
            step = np.minimum(step, mass / (mass + floor_points))
        self._means, self._scatter = cv.combine(step, self._means, self._scatter, means, scatter)
        self._weight_stat = (1.0 - gamma) * weights + gamma * share
        # Kish's effective sample size of the exponentially weighted statistics
        self._n_eff = 1.0 / ((1.0 - gamma) ** 2 / max(self._n_eff, 1e-300) + gamma**2 / wsum)
        rate = 1.0 - (1.0 - _ACTIVITY_RATE) ** (wsum / self.batch_size)
        self._activity = (1.0 - rate) * self._activity + rate * np.minimum(relative, 10.0)
        self._steps += wsum / self.batch_size
        self._reseed_dead_components()
        self._recentre()
        self._update_parameters()

    def _recentre(self) -> None:
        """Move the centring point to the mixture's mean (keeps products well conditioned)."""
        weights = self._weight_stat / self._weight_stat.sum()
        offset = weights @ self._means
        self._shift = self._shift + offset
        self._means = self._means - offset

    def _reseed_dead_components(self) -> None:
        """Re-seed dead components by splitting the heaviest one (MOG2-style birth and death).

        Dead: a weight below ``1e-3 / K``, or a component starved of the mass its weight
        promises over the last few batches — after an abrupt change, components left far from
        the new data would otherwise fade for thousands of batches while one component stretches
        over several new modes.
        """
        k = len(self._weight_stat)
        if self._activity.min() >= _STARVED_ACTIVITY and self._weight_stat.min() >= (
            _DEAD_WEIGHT_FRACTION / k * self._weight_stat.sum()
        ):
            return
        weights = self._weight_stat / self._weight_stat.sum()
        dead = np.flatnonzero(
            (weights < _DEAD_WEIGHT_FRACTION / k) | (self._activity < _STARVED_ACTIVITY)
        )
        for j in dead:
            donor = int(np.argmax(weights))
            if donor == j:
                continue
            donor_scatter = self._scatter[donor]
            if donor_scatter.ndim == 1:
                donor_scatter = np.diag(donor_scatter)
            cov = donor_scatter + np.diag(self._reg)
            vals, vecs = np.linalg.eigh(cov)
            # Moment-matched split along the principal axis: the two halves together keep the
            # donor's mean and covariance, each with 36% of the variance along that axis.
            offset = 0.8 * np.sqrt(max(vals[-1], 0.0)) * vecs[:, -1]
            self._means[j] = self._means[donor] + offset
            self._means[donor] = self._means[donor] - offset
            shrink = np.outer(offset, offset)
            if self._scatter.ndim == 3:
                self._scatter[donor] = self._scatter[donor] - shrink
            else:
                self._scatter[donor] = np.maximum(self._scatter[donor] - np.diag(shrink), 0.0)
            self._scatter[j] = self._scatter[donor]
            half = 0.5 * (weights[donor] + weights[j])
            weights[j] = weights[donor] = half
            self._activity[j] = self._activity[donor] = 1.0
            log.debug("re-seeded dead component %d by splitting component %d", j, donor)
        self._weight_stat = weights

    def partial_fit(
        self, X: Any, y: Any = None, sample_weight: SampleWeight = None
    ) -> OnlineGaussianMixture:
        """Learn from one micro-batch (any size, including one row).

        On an unfitted model, rows are gathered into a warm-up buffer of ``warmup_size`` rows;
        the model then initialises itself from it (k-means++ seeding and batch EM with
        ``n_init`` restarts; ``n_components="auto"`` chooses K by held-out likelihood).
        """
        self.score_partial_fit(X, sample_weight=sample_weight)
        return self

    def score_partial_fit(
        self,
        X: Any,
        sample_weight: SampleWeight = None,
        return_resp: bool = False,
        return_tail: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        """Score each row under the model *before* learning it, then learn the batch.

        The E-step runs once: the log-likelihoods it yields are returned and its
        responsibilities feed the M-step.

        Parameters
        ----------
        X : array-like of shape (n, d)
        sample_weight : array of shape (n,), callable or None
            A callable receives the log-likelihoods and returns weights — a caller can
            down-weight suspected anomalies without a second pass. It is not called while the
            model is warming up.
        return_resp : bool
            Also return the responsibilities ``(n, K)`` (shape ``(n, 0)`` while warming up).
        return_tail : bool
            Also return the log tail masses (:meth:`score_tail_samples`, after the
            responsibilities if those are returned); a callable ``sample_weight`` then receives
            them instead of the log-likelihoods.

        Returns
        -------
        log_likelihood : ndarray of shape (n,)
            ``NaN`` for rows that arrive while the model is still gathering its warm-up buffer.
        """
        X = self._validate_X(X)
        n = len(X)
        if not self._fitted:
            w = self._validate_weights(None if callable(sample_weight) else sample_weight, n)
            self._gather(X, w)
            ll = np.full(n, np.nan)
            return self._scored(ll, np.full((n, 0), np.nan), ll, return_resp, return_tail)
        if n == 0:
            ll = np.empty(0)
            return self._scored(ll, np.empty((0, len(self.weights_))), ll, return_resp,
                                return_tail)
        Xc = X - self._shift
        wlp = self._recall_estep(X)
        if wlp is None:
            wlp = self._weighted_log_prob(Xc, centred=True)
        ll, resp = cv.posterior(wlp)
        tail = self._log_tail(wlp) if return_tail else ll
        if callable(sample_weight):
            sample_weight = sample_weight(tail)
        w = None if sample_weight is None else self._validate_weights(sample_weight, n)
        self._learn(Xc, w, resp)
        self.n_events_learned_ += n
        if self._next_refit:
            self._gather_refit(X, np.ones(n) if w is None else w)
        return self._scored(ll, resp, tail, return_resp, return_tail)

    @staticmethod
    def _scored(ll, resp, tail, return_resp: bool, return_tail: bool):
        out = (ll,) + ((resp,) if return_resp else ()) + ((tail,) if return_tail else ())
        return out if len(out) > 1 else ll

    def _gather_refit(self, X: np.ndarray, w: np.ndarray) -> None:
        """Keep learned rows; refit to all of them when their number reaches the next size."""
        self._buffer.append(X.copy())
        self._buffer_weights.append(w.copy())
        buffered = sum(len(b) for b in self._buffer)
        if buffered < self._next_refit:
            return
        data, weights = np.vstack(self._buffer), np.concatenate(self._buffer_weights)
        if self._fit_judged(data, weights):
            self.n_refits_ += 1
            log.debug("refitted %d components to %d rows", len(self.weights_), len(data))
        self._plan_refits(data, weights)

    def _fit_judged(self, data: np.ndarray, weights: np.ndarray) -> bool:
        """Batch fit to the buffer with the weights the owner's ``refit_weights`` gives its rows.

        At a refit the judge is the model before it. At the initialisation there is none, and
        a fit to every row judges them: a tight cluster of anomalies among them stretches
        that model until most of its members look ordinary (River's Shuttle, 7 % anomalies:
        4 of the first 128 events' 10 flagged). A fit without the rows flagged so far sees the
        others further out, so the initial model is refitted without them and asked again
        until its answer settles (at most ``_JUDGE_ROUNDS`` fits; settled: it changed for at
        most ``_JUDGE_SETTLED`` of the rows) -- the concentration steps of robust estimators
        (Rousseeuw & Van Driessen 1999); on Shuttle 12 flagged, 9 of the 10. K is chosen again
        by each fit: one that kept the K of a fit that gave the anomalies a component would
        keep it for them. A refit starts from the judgement of the model before it and takes
        the same steps: that model may have given the anomalies a component, judged none of
        them flagged, and the single Gaussian fitted next learned them at full weight, wider
        for good (River's Shuttle behind ``StandardScaler`` with seed 1, ``MinMaxScaler`` with
        seeds 0 and 3: ROC-AUC 0.986 / 0.982 / 0.986 on the first 10,000 events against 0.991
        with the other seeds). A refit whose own judgement agrees with its judge's costs one
        fit, as before. Returns whether it fitted (not if every row has weight 0).
        """
        judge = self.refit_weights
        fit_weights = weights
        if self._fitted and judge is not None:  # a refit: judged by the model before it
            fit_weights = judge(data, weights)
            if fit_weights.sum() <= 0:
                return False
        for _ in range(_JUDGE_ROUNDS):
            self._fit_batch(data, fit_weights)
            if judge is None:
                break
            judged = judge(data, weights)
            if (np.count_nonzero(judged != fit_weights) <= _JUDGE_SETTLED * len(data)
                    or judged.sum() <= 0):
                break
            fit_weights = judged
        return True

    def _plan_refits(self, data: np.ndarray, weights: np.ndarray) -> None:
        """After a fit to ``data``: keep it and set the next refit size, or stop refitting."""
        n, limit = len(data), self.refit_size
        self._warm_modes = None  # the warm-up is over
        if limit is not None and n < limit:
            self._buffer, self._buffer_weights = [data], [weights]
            self._next_refit = min(max(n + n // 2, n + 1), int(limit))
        else:
            self._buffer, self._buffer_weights = [], []
            self._next_refit = 0

    def _gather(self, X: np.ndarray, w: np.ndarray) -> None:
        if self.n_features_in_ is None and len(X):
            self.n_features_in_ = X.shape[1]
        self._buffer.append(X.copy())
        self._buffer_weights.append(w.copy())
        self.n_events_learned_ += len(X)
        buffered = sum(len(b) for b in self._buffer)
        if buffered >= self._warmup_target():
            data, weights = np.vstack(self._buffer), np.concatenate(self._buffer_weights)
            if weights.sum() <= 0:
                return
            self._fit_judged(data, weights)
            self._plan_refits(data, weights)
            log.info(
                "initialised %d components on a warm-up buffer of %d rows",
                len(self.weights_),
                len(data),
            )

    # ------------------------------------------------------------------ missing features

    def marginal_score_samples(
        self, X: Any, return_tail: bool = False
    ) -> tuple[np.ndarray, ...]:
        """Log-likelihood and responsibilities with missing features (``NaN``) marginalised out.

        With ``return_tail``, also the log tail masses of the observed features (of
        :meth:`score_tail_samples`, with as many degrees of freedom as features observed).

        The marginal of a Gaussian mixture over the observed features is the mixture of the
        Gaussians restricted to them, with the same weights: exact, no imputation. Rows with no
        observed feature get log-likelihood 0 and the prior weights as responsibilities.

        Examples
        --------
        >>> import numpy as np
        >>> gmm = OnlineGaussianMixture(1, random_state=0).fit(
        ...     np.random.default_rng(0).normal(size=(500, 2)))
        >>> ll, _ = gmm.marginal_score_samples(np.array([[0.0, np.nan]]))
        >>> bool(abs(ll[0] - (-0.5 * np.log(2 * np.pi * gmm.covariances_[0, 0, 0])
        ...                   - 0.5 * gmm.means_[0, 0] ** 2 / gmm.covariances_[0, 0, 0])) < 1e-12)
        True
        """
        self._check_fitted()
        X = self._validate_X(X, allow_nan=True)
        missing = np.isnan(X)
        ll = np.empty(len(X))
        tail = np.zeros(len(X))
        resp = np.empty((len(X), len(self.weights_)))
        patterns, inverse = np.unique(missing, axis=0, return_inverse=True)
        for p, pattern in enumerate(patterns):
            rows = np.flatnonzero(inverse.ravel() == p)
            observed = ~pattern
            if not observed.any():
                ll[rows] = 0.0
                resp[rows] = self.weights_
                continue
            if observed.all():
                wlp = self._weighted_log_prob(X[rows])
                if return_tail:
                    tail[rows] = self._log_tail(wlp)
            else:
                kind, mo, prec_chol = cv.marginal_parameters(
                    self.covariance_type, self.means_, self.covariances_, observed
                )
                log_prob = cv.log_gaussian_prob(kind, X[rows][:, observed], mo, prec_chol)
                wlp = log_prob + self._log_weights
                if return_tail:
                    tail[rows] = cv.log_tail_mass(log_prob, self._log_weights, kind, prec_chol,
                                                  int(observed.sum()))
            ll[rows], resp[rows] = cv.posterior(wlp)
        return (ll, resp, tail) if return_tail else (ll, resp)

    # ------------------------------------------------------------------ structure changes

    def spawn_component(self, X: Any, weight: float | None = None) -> int:
        """Add a component fitted to the points ``X`` (a new mode); returns its index.

        Its covariance is the points' covariance shrunk towards the mixture's pooled covariance
        (so a handful of points still give a well-conditioned component). At ``max_components``
        the lightest component is replaced instead. ``weight`` defaults to ``1 / (K + 1)``.
        """
        self._check_fitted()
        X = self._validate_X(X)
        if len(X) == 0:
            raise ValueError("spawn_component needs at least one point")
        k, d = self._means.shape
        weights = self._weight_stat / self._weight_stat.sum()
        Xc = X - self._shift
        mean = Xc.mean(axis=0)
        diff = Xc - mean
        pooled = np.tensordot(weights, self._scatter, axes=1)
        n = len(X)
        prior = d + 2.0
        if self._scatter.ndim == 3:
            scatter = (diff.T @ diff + prior * pooled) / (n + prior)
        else:
            scatter = ((diff**2).sum(axis=0) + prior * pooled) / (n + prior)
        w_new = 1.0 / (k + 1) if weight is None else float(weight)
        if not 0.0 < w_new < 1.0:
            raise ValueError(f"weight must be in (0, 1), got {weight!r}")
        if k < self._max_k():
            index = k
            self._means = np.vstack([self._means, mean])
            self._scatter = np.concatenate([self._scatter, scatter[None]])
            weights = np.append(weights * (1.0 - w_new), w_new)
            self._activity = np.append(self._activity, 1.0)
        else:
            index = int(np.argmin(weights))
            self._means[index] = mean
            self._scatter[index] = scatter
            weights = weights.copy()
            weights[index] = 0.0
            weights = weights / weights.sum() * (1.0 - w_new)
            weights[index] = w_new
            self._activity[index] = 1.0
        self._weight_stat = weights
        self._update_parameters()
        return index

    def prune_components(self, min_weight: float) -> np.ndarray:
        """Remove components lighter than ``min_weight`` (keeps one at least); returns kept ones."""
        self._check_fitted()
        weights = self._weight_stat / self._weight_stat.sum()
        keep = np.flatnonzero(weights >= min_weight)
        if len(keep) == 0:
            keep = np.array([int(np.argmax(weights))])
        if len(keep) < len(weights):
            self._weight_stat = weights[keep] / weights[keep].sum()
            self._means = self._means[keep]
            self._scatter = self._scatter[keep]
            self._activity = self._activity[keep]
            self._update_parameters()
        return keep

    def merge(self, other: OnlineGaussianMixture) -> OnlineGaussianMixture:
        """Combine two models' sufficient statistics into a new model.

        For replicas that each learn from some partitions of a stream. Each model counts in
        proportion to the events it learned; components are matched by a minimum-cost
        assignment on their means (models started from one shared snapshot match one to one).

        Examples
        --------
        >>> import numpy as np
        >>> rng = np.random.default_rng(1)
        >>> X = rng.normal(size=(4000, 2))
        >>> a = OnlineGaussianMixture(1, random_state=0).fit(X[:2000])
        >>> b = OnlineGaussianMixture(1, random_state=0).fit(X[2000:])
        >>> merged = a.merge(b)
        >>> bool(np.allclose(merged.means_, X.mean(axis=0)))
        True
        >>> merged.n_events_learned_
        4000
        """
        self._check_fitted()
        other._check_fitted()
        if other.n_features_in_ != self.n_features_in_:
            raise ValueError(
                f"cannot merge models of {self.n_features_in_} and {other.n_features_in_} features"
            )
        if other.covariance_type != self.covariance_type:
            raise ValueError(
                f"cannot merge a {self.covariance_type!r} model with a "
                f"{other.covariance_type!r} one"
            )
        if len(other.weights_) != len(self.weights_):
            raise ValueError(
                f"cannot merge models of {len(self.weights_)} and {len(other.weights_)} components"
            )
        merged = OnlineGaussianMixture.from_state(*self.get_state())
        other_means = other._means + other._shift - self._shift
        k, d = self._means.shape
        pooled = cv.full_covariances(self.covariance_type, self.covariances_, k, d).mean(axis=0)
        scale = np.sqrt(np.maximum(np.diag(pooled), np.finfo(float).tiny))
        cost = (((self._means[:, None, :] - other_means[None, :, :]) / scale) ** 2).sum(axis=2)
        _, order = linear_sum_assignment(cost)
        n_a, n_b = float(self.n_events_learned_), float(other.n_events_learned_)
        frac = n_b / (n_a + n_b) if n_a + n_b > 0 else 0.5
        wa, wb = self.weights_, other.weights_[order]
        mass_a, mass_b = (1.0 - frac) * wa, frac * wb
        total = mass_a + mass_b
        step = np.where(total > 0, mass_b / np.where(total > 0, total, 1.0), 0.0)
        merged._means, merged._scatter = cv.combine(
            step, self._means, self._scatter, other_means[order], other._scatter[order]
        )
        merged._weight_stat = total / total.sum()
        merged._activity = np.ones(len(total))
        merged._steps = self._steps + other._steps
        merged._n_eff = self._n_eff + other._n_eff
        merged.n_events_learned_ = self.n_events_learned_ + other.n_events_learned_
        merged._recentre()
        merged._update_parameters()
        return merged

    @classmethod
    def from_parameters(
        cls,
        weights: Any,
        means: Any,
        covariances: Any,
        covariance_type: str = "full",
        **params: Any,
    ) -> OnlineGaussianMixture:
        """A fitted model with exactly the given parameters (scikit-learn shapes).

        Examples
        --------
        >>> import numpy as np
        >>> m = OnlineGaussianMixture.from_parameters(
        ...     [0.5, 0.5], [[0.0], [4.0]], [[[1.0]], [[1.0]]], "full")
        >>> m.predict(np.array([[0.1], [3.9]])).tolist()
        [0, 1]
        """
        weights = np.asarray(weights, dtype=float)
        means = np.asarray(means, dtype=float)
        covariances = np.asarray(covariances, dtype=float)
        k, d = means.shape
        model = cls(k, covariance_type=covariance_type, **params)
        model.n_features_in_ = d
        model._shift = np.zeros(d)
        model._reg = np.zeros(d)
        model._n_eff = 1e12  # given parameters are taken as exact: no shrinkage
        model._weight_stat = weights / weights.sum()
        model._activity = np.ones(k)
        model._means = means.copy()
        if covariance_type == "full":
            model._scatter = covariances.copy()
        elif covariance_type == "tied":
            model._scatter = np.repeat(covariances[None], k, axis=0)
        elif covariance_type == "diag":
            model._scatter = covariances.copy()
        else:
            model._scatter = np.repeat(covariances[:, None], d, axis=1)
        model._fitted = True
        model._update_parameters()
        model._reg = model.reg_covar * np.ones(d)
        return model

    # ------------------------------------------------------------------ persistence

    _PARAMS = (
        "n_components",
        "covariance_type",
        "covariance_shrinkage",
        "reg_covar",
        "step_exponent",
        "min_step",
        "batch_size",
        "warmup_size",
        "refit_size",
        "n_init",
        "max_iter",
        "tol",
        "max_components",
        "random_state",
    )

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (JSON-serialisable)."""
        out = {}
        for name in self._PARAMS:
            value = getattr(self, name)
            out[name] = value.item() if isinstance(value, np.generic) else value
        return out

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The whole state as ``(arrays, meta)`` for :mod:`streamgmm.checkpoint` (no pickle)."""
        arrays: dict[str, np.ndarray] = {}
        if self._buffer:
            arrays["buffer"] = np.vstack(self._buffer)
            arrays["buffer_weights"] = np.concatenate(self._buffer_weights)
        if self._fitted:
            arrays.update(
                weight_stat=self._weight_stat,
                activity=self._activity,
                means=self._means,
                scatter=self._scatter,
                shift=self._shift,
                reg=self._reg,
            )
        meta = {
            "version": _STATE_VERSION,
            "params": self.get_params(),
            "fitted": self._fitted,
            "steps": self._steps,
            "n_eff": self._n_eff,
            "next_refit": self._next_refit,
            "n_refits": self.n_refits_,
            "n_events_learned": int(self.n_events_learned_),
            "n_features_in": self.n_features_in_,
            "converged": bool(self.converged_),
            "n_iter": int(self.n_iter_),
            "lower_bound": float(self.lower_bound_) if np.isfinite(self.lower_bound_) else None,
            "rng": self._rng.bit_generator.state,
        }
        return arrays, meta

    @classmethod
    def from_state(
        cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]
    ) -> OnlineGaussianMixture:
        """Rebuild a model from :meth:`get_state` output (exact round trip).

        Reads format versions 1 and 2. A state carries its version in ``meta["version"]``;
        states nested in a detector's before the version was recorded there are told apart by
        ``n_eff``, which version 2 introduced.
        """
        try:
            version = meta.get("version", 2 if "n_eff" in meta else 1)
            model = cls(**meta["params"])
            model._fitted = bool(meta["fitted"])
            model._steps = float(meta["steps"])
            if version == 1:  # no n_eff (every learned event counts) and no refits
                model._n_eff = float(meta["n_events_learned"])
                model._next_refit = 0
                model.n_refits_ = 0
            elif version == 2:
                model._n_eff = float(meta["n_eff"])
                model._next_refit = int(meta["next_refit"])
                model.n_refits_ = int(meta["n_refits"])
            else:
                raise ValueError(f"format version {version!r}, this streamgmm reads 1 and 2")
            model.n_events_learned_ = int(meta["n_events_learned"])
            model.n_features_in_ = meta["n_features_in"]
            model.converged_ = bool(meta["converged"])
            model.n_iter_ = int(meta["n_iter"])
            lb = meta["lower_bound"]
            model.lower_bound_ = -np.inf if lb is None else float(lb)
            model._rng.bit_generator.state = meta["rng"]
            if "buffer" in arrays:
                model._buffer = [np.array(arrays["buffer"], dtype=float)]
                model._buffer_weights = [np.array(arrays["buffer_weights"], dtype=float)]
            if model._fitted:
                model._weight_stat = np.array(arrays["weight_stat"], dtype=float)
                model._activity = np.array(arrays["activity"], dtype=float)
                model._means = np.array(arrays["means"], dtype=float)
                model._scatter = np.array(arrays["scatter"], dtype=float)
                model._shift = np.array(arrays["shift"], dtype=float)
                model._reg = np.array(arrays["reg"], dtype=float)
                k, d = model._means.shape
                expected = (k, d, d) if cv.is_matrix_type(model.covariance_type) else (k, d)
                if model._scatter.shape != expected or model._weight_stat.shape != (k,):
                    raise ValueError("inconsistent array shapes")
                model._update_parameters()
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid OnlineGaussianMixture state: {exc}") from exc
        return model

    def save(self, path: str | os.PathLike) -> None:
        """Save to a versioned, pickle-free ``.npz`` file, written atomically."""
        arrays, meta = self.get_state()
        write_state(path, _STATE_KIND, _STATE_VERSION, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> OnlineGaussianMixture:
        """Load a model saved by :meth:`save`.

        Raises
        ------
        streamgmm.checkpoint.CheckpointError
            If the file is corrupt, of another kind, or from a newer streamgmm.
        """
        arrays, meta = read_state(path, _STATE_KIND, _STATE_VERSION)
        return cls.from_state(arrays, meta)

    def __repr__(self) -> str:
        state = f"fitted, {len(self.weights_)} components" if self._fitted else "warming up"
        return (
            f"OnlineGaussianMixture(n_components={self.n_components!r}, "
            f"covariance_type={self.covariance_type!r}; {state}, "
            f"{self.n_events_learned_} events learned)"
        )
