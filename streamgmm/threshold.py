"""Thresholds that turn anomaly scores into decisions, at a stated false-alarm rate.

:class:`AdaptiveThreshold` follows the upper quantile of recent scores of normal events so that a
fraction ``false_alarm_rate`` of normal events is flagged; :class:`FixedThreshold` is a constant for
users who want one. Both also express a score on two scales whose meaning never changes:

* ``anomaly_score`` -- ``(score - offset) / (threshold - offset)`` clipped at 0, where ``offset`` is
  the median of recent normal scores: 1.0 exactly at the threshold, 0-1 normal, above 1 anomalous
  (the convention of VictoriaMetrics' vmanomaly). The offset matters because a score ``-log p(x)``
  can be negative.
* ``tail_probability`` -- the probability that a normal event scores at least this high, estimated
  from the recent normal scores (empirically inside the sample, with an exponential tail beyond it).

How the adaptive threshold stays calibrated
-------------------------------------------
The threshold is an order statistic of a bounded window of recent scores. For exchangeable scores
the next score exceeds the ``(k+1)``-th largest of ``N`` with probability exactly
``(k+1)/(N+1)``, whatever their distribution, so ``k`` is chosen to make that equal to the target
(interpolating between neighbouring order statistics). Two biases must be avoided:

* *Truncation*: leaving flagged events out of the window removes the very tail the quantile is
  about and drags the threshold down step after step (and replacing them by the threshold itself
  "censors" them so the threshold can never rise). Here flagged events **do** enter the window.
* *Contamination*: real anomalies in the window drag the threshold up, so a few percent of
  anomalies would hide themselves when the target is 0.1 %. Events far beyond the threshold are
  therefore kept out: only scores up to a *rejection level* enter the window. It is the larger of
  the score that normal events exceed with probability ``rejection_ratio * false_alarm_rate``
  under a generalised Pareto tail fitted to the window (quantile matching, shape >= 0, so heavy
  tails are followed) and ``threshold + rejection_gap * (threshold - median)``. The normal mass
  beyond the cut (about ``rejection_ratio * false_alarm_rate``) is estimated from the same tail and
  compensated in the quantile's level, so the calibration holds for heavy tails too.

At the end of the warm-up (whose scores may contain anomalies) the cut starts at the upper quartile
and is raised until the threshold it implies confirms it, fitting an exponential tail to the top
5 % only: this settles on the smallest self-consistent cut rather than one inflated by the
anomalies in the warm-up sample; the threshold is then fitted to the scores below the cut as every
later update fits it (the tail's shape free). :meth:`~AdaptiveThreshold.rebase` (a refitted model's
held-out scores, which hold the stream's anomalies too) recalibrates the same way. Each batch's
scores are admitted to the window up to a level that is self-consistent with the window *and the
batch*: the level before the batch is raised while the fit with the batch's scores up to it implies
a higher one. With one fixed cut, a batch whose normal scores reach further than the window's (a
model that changed since, or a large batch) lost its upper tail, and the threshold stayed below
it batch after batch (the realised rate 2-3 times the target on River's Shuttle in batches of
5000). Anomalies that score *between* the threshold and the rejection
level at a rate well above the target cannot be told from a heavier normal tail and do raise the
threshold; anomalies beyond it (the usual case: far outside the learned density) do not.

The realised false-alarm rate this gives on heavy- and light-tailed scores, with and without
injected anomalies, is in the README (*Threshold*).

The window holds ``window_size`` scores (default ``40 / false_alarm_rate`` bounded to
``[2000, 100000]``), so memory is bounded and the threshold follows slow changes of the score
distribution within about one window.

Young streams
-------------
The scores of a stream's first events come from a model that knew few events, and a model's
scores drift as its estimates sharpen (a shrunk covariance tightens as its events accrue, an
overfitted one loosens), so scores made early are not exchangeable with today's. The window keeps
only the scores of the later half of the events seen (never fewer than ``warmup_events``): the
model that made the oldest of them knew at least half as many events as today's. With every score
since the warm-up kept, the threshold lagged the drift and the daemon's detector in batches of
256 flagged 1.7e-3 of the normal events at a target of 1e-3 (``scripts/evaluate.py``'s stationary
streams).

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> thr = AdaptiveThreshold(false_alarm_rate=0.01, warmup_events=500)
>>> for _ in range(200):
...     flags = thr.update(rng.normal(size=1000))
>>> thr.warming_up
False
>>> bool(2.2 < thr.threshold < 2.45)        # the 99 % quantile of N(0, 1) is 2.33
True
>>> bool(abs(thr.realised_rate - 0.01) < 0.0025)
True
>>> thr.anomaly_score(np.array([thr.threshold])).item()
1.0
"""

from __future__ import annotations

import bisect
import logging
import math
from typing import Any

import numpy as np

__all__ = ["AdaptiveThreshold", "FixedThreshold", "threshold_from_state"]

logger = logging.getLogger(__name__)

_LN10 = math.log(10.0)


def _as_scores(scores: Any) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(
            f"scores must be a 1-d array, got shape {arr.shape}; pass one score per event"
        )
    if np.isinf(arr).any() and np.isneginf(arr).any():
        raise ValueError("scores contain -inf; a score is -log p(x) and cannot be -inf")
    return arr


def _upper_quantile(sorted_sample: np.ndarray, tail: float) -> float:
    """Value exceeded by a new exchangeable draw with probability ``tail``.

    Uses the order-statistic identity P(new > X_(N-k)) = (k+1)/(N+1) with linear interpolation in
    ``k``; below the resolution of the sample (``tail < 1/(N+1)``) an exponential tail fitted to
    the sample's top is extrapolated.
    """
    n = sorted_sample.size
    pos = tail * (n + 1) - 1.0  # k: number of sample points above the answer
    if pos >= 0.0:
        k_lo = math.floor(pos)
        frac = pos - k_lo
        hi = sorted_sample[n - 1 - k_lo]
        if frac == 0.0 or k_lo + 1 >= n:
            return float(hi)
        lo = sorted_sample[n - 2 - k_lo]
        return float(hi + frac * (lo - hi))
    # Extrapolate: the top of the sample sits at tail 1/(n+1); scale from a decade below it.
    top = float(sorted_sample[-1])
    scale = _exponential_scale(sorted_sample, 1.0 / (n + 1))
    return top + scale * math.log((1.0 / (n + 1)) / tail)


def _exponential_scale(sorted_sample: np.ndarray, tail: float) -> float:
    """Scale of an exponential tail matched to the quantiles at ``tail`` and ``10 * tail``.

    Falls back to wider quantile pairs when the sample is too small, and is never below a tiny
    positive floor so that extrapolation stays defined.
    """
    n = sorted_sample.size
    tail_hi = max(tail, 2.0 / (n + 1))
    tail_lo = min(10.0 * tail_hi, 0.5)
    if tail_lo <= tail_hi:
        tail_lo = 0.5
        tail_hi = min(tail_hi, 0.25)
    q_hi = _upper_quantile(sorted_sample, tail_hi) if tail_hi * (n + 1) >= 1 else sorted_sample[-1]
    q_lo = _upper_quantile(sorted_sample, tail_lo)
    spread = float(np.abs(sorted_sample[-1] - sorted_sample[0])) + 1.0
    scale = (q_hi - q_lo) / math.log(tail_lo / tail_hi)
    return max(float(scale), 1e-9 * spread)


class _Tail:
    """Generalised Pareto tail beyond ``t``, which normal events exceed with probability ``p``.

    Fitted by matching the quantiles at tail probabilities ``p``, ``r p`` and ``r^2 p``
    (Pickands' estimator): the shape ``gamma`` is 0 for exponential tails (the tail of
    ``-log p(x)`` under a Gaussian), positive for heavy tails. It is kept within [0, 1]: a window
    cut at the rejection level looks *bounded* near the cut, and letting that show as a negative
    shape would let a too-tight cut confirm itself.
    """

    __slots__ = ("t", "p", "gamma", "sigma")

    def __init__(
        self, sorted_sample: np.ndarray, p: float, min_anchor: float = 0.0, exponential=False
    ):
        # Anchor the fit where the sample has at least ~10 points above, then extrapolate to p.
        anchor = min(max(p, 10.0 / (sorted_sample.size + 1), min_anchor), 0.25)
        ratio = min(8.0, math.sqrt(0.5 / anchor))
        q1 = _upper_quantile(sorted_sample, anchor)
        q2 = _upper_quantile(sorted_sample, ratio * anchor)
        q3 = _upper_quantile(sorted_sample, ratio * ratio * anchor)
        spread = 1e-9 * (float(sorted_sample[-1] - sorted_sample[0]) + 1.0)
        d12, d23 = max(q1 - q2, spread), max(q2 - q3, spread)
        gamma = min(max(math.log(d12 / d23) / math.log(ratio), 0.0), 1.0)
        if exponential or abs(gamma) < 1e-6:
            gamma = 0.0
            sigma = d12 / math.log(ratio)
        else:
            sigma = gamma * d12 / (1.0 - ratio ** (-gamma))
        self.t, self.p, self.gamma, self.sigma = q1, anchor, gamma, max(sigma, spread)
        if anchor > p:
            self.t, self.sigma = self.quantile(p), self.sigma * (anchor / p) ** gamma
            self.p = p

    def survival(self, x: np.ndarray | float) -> np.ndarray:
        """P(score > x) for x >= t."""
        return np.exp(self.log_survival(x))

    def log_survival(self, x: np.ndarray | float) -> np.ndarray:
        """log P(score > x) for x >= t; finite far beyond where P itself underflows."""
        z = np.maximum(np.asarray(x, dtype=np.float64) - self.t, 0.0) / self.sigma
        if abs(self.gamma) < 1e-6:
            return math.log(self.p) - z
        base = np.maximum(1.0 + self.gamma * z, 0.0)
        with np.errstate(divide="ignore"):
            return math.log(self.p) - np.log(base) / self.gamma

    def quantile(self, q: float) -> float:
        """Score exceeded with probability ``q <= p``."""
        ratio = self.p / q
        if abs(self.gamma) < 1e-6:
            return self.t + self.sigma * math.log(ratio)
        return self.t + self.sigma * (ratio**self.gamma - 1.0) / self.gamma


class _FrozenTailOne:
    """The tail probability of one score under a fixed window and tail (a picklable callable)."""

    __slots__ = ("window", "tail", "t", "n")

    def __init__(self, sorted_window: np.ndarray, tail: _Tail | None):
        self.window, self.tail, self.n = sorted_window.tolist(), tail, sorted_window.size
        self.t = math.nan if tail is None else tail.t

    def __call__(self, score: float) -> float:
        if score > self.t:  # (False while there is no tail)
            return min(float(self.tail.survival(score)), 1.0)
        if score != score or self.tail is None:
            return math.nan
        return min((self.n - bisect.bisect_left(self.window, score) + 1.0) / (self.n + 1.0), 1.0)


def _tail_probability_in(srt: np.ndarray, tail: _Tail, s: np.ndarray) -> np.ndarray:
    """Tail probability of scores ``s`` under a sorted window and its fitted upper tail."""
    n = srt.size
    if s.size > 64:  # sorted queries search much faster
        order = np.argsort(s)
        pos = np.empty(s.size, dtype=np.int64)
        pos[order] = np.searchsorted(srt, s[order], side="left")
    else:
        pos = np.searchsorted(srt, s, side="left")
    p = (n - pos + 1.0) / (n + 1.0)
    beyond = s > tail.t
    if beyond.any():
        p[beyond] = tail.survival(s[beyond])
    p[np.isnan(s)] = np.nan
    return np.minimum(p, 1.0)


class _ScoreScale:
    """Shared behaviour: bounded window of normal scores, realised rate, score normalisation."""

    kind = "Threshold"

    def __init__(self, false_alarm_rate: float, warmup_events: int, window_size: int | None):
        if not 0.0 < false_alarm_rate < 0.5:
            raise ValueError(
                f"false_alarm_rate must be in (0, 0.5), got {false_alarm_rate!r}; "
                "it is the fraction of normal events to flag, e.g. 0.001"
            )
        if int(warmup_events) < 0:
            raise ValueError(f"warmup_events must be >= 0, got {warmup_events!r}")
        if window_size is None:
            window_size = int(min(max(40.0 / false_alarm_rate, 2000), 100_000))
        if int(window_size) < 10:
            raise ValueError(f"window_size must be >= 10, got {window_size!r}")
        self.false_alarm_rate = float(false_alarm_rate)
        self.warmup_events = int(warmup_events)
        self.window_size = int(window_size)
        self._window = np.empty(self.window_size, dtype=np.float64)
        self._filled = 0
        self._cursor = 0
        self._sorted = np.empty(0, dtype=np.float64)
        self.n_events_seen = 0  # finite scores seen, warm-up included
        self.n_events_decided = 0  # events decided after warm-up
        self.n_flagged = 0  # of those, how many were flagged
        self.threshold = math.inf
        self.offset = 0.0

    # -- window -----------------------------------------------------------------------------
    def _push(self, values: np.ndarray) -> None:
        """Append to the ring buffer, keeping a sorted copy up to date incrementally."""
        values = values[-self.window_size :]
        m = values.size
        if m == 0:
            return
        end = self._cursor + m
        if self._filled + m > self.window_size:  # some old values are overwritten
            n_old = self._filled + m - self.window_size
            start = (self._cursor - self._filled) % self.window_size  # the oldest score
            idx = (start + np.arange(n_old)) % self.window_size
            old = np.sort(self._window[idx])
            pos = np.searchsorted(self._sorted, old, side="left")
            # equal values: step past the ones already chosen
            pos = pos + (np.arange(n_old) - np.searchsorted(old, old, side="left"))
            self._sorted = np.delete(self._sorted, pos)
        if end <= self.window_size:
            self._window[self._cursor : end] = values
        else:
            first = self.window_size - self._cursor
            self._window[self._cursor :] = values[:first]
            self._window[: m - first] = values[first:]
        self._cursor = end % self.window_size
        self._filled = min(self._filled + m, self.window_size)
        new = np.sort(values)
        self._sorted = np.insert(self._sorted, np.searchsorted(self._sorted, new), new)

    def _occupied(self) -> np.ndarray:
        """Positions of the window's scores in the ring buffer, oldest first."""
        return (self._cursor - self._filled + np.arange(self._filled)) % self.window_size

    def _forget_oldest(self, keep: int) -> None:
        """Drop all but the ``keep`` most recent scores of the window."""
        n_old = self._filled - int(keep)
        if n_old <= 0:
            return
        old = np.sort(self._window[self._occupied()[:n_old]])
        pos = np.searchsorted(self._sorted, old, side="left")
        # equal values: step past the ones already chosen
        pos = pos + (np.arange(n_old) - np.searchsorted(old, old, side="left"))
        self._sorted = np.delete(self._sorted, pos)
        self._filled -= n_old

    def rebase(self, scores: Any) -> None:
        """Replace the recent scores by ``scores``: the scorer changed (a model was refitted).

        Counters stay; a warm adaptive threshold is recalibrated on the new scores (cut at
        its rejection level, so far anomalies among them do not count). Fewer than 10 finite
        scores are ignored.
        """
        s = _as_scores(scores)
        s = s[~np.isnan(s)][-self.window_size :]
        if s.size < 10:
            return
        self._filled = 0
        self._cursor = 0
        self._sorted = np.empty(0, dtype=np.float64)
        self._push(s)
        if not self.warming_up:
            self._recalibrate()

    def _recalibrate(self) -> None:
        """Hook for :meth:`rebase` (the fixed threshold has nothing to recalibrate)."""
        self.offset = float(np.median(self._sorted))

    @property
    def warming_up(self) -> bool:
        """True until a threshold exists; nothing is flagged meanwhile."""
        return not math.isfinite(self.threshold)

    @property
    def realised_rate(self) -> float:
        """Fraction of events flagged since the warm-up ended (NaN before any)."""
        if self.n_events_decided == 0:
            return math.nan
        return self.n_flagged / self.n_events_decided

    # -- decisions and scales -----------------------------------------------------------------
    def decide(self, scores: Any) -> np.ndarray:
        """Flags ``score > threshold`` (all False while warming up or for NaN scores)."""
        s = _as_scores(scores)
        with np.errstate(invalid="ignore"):
            return s > self.threshold

    def anomaly_score(self, scores: Any) -> np.ndarray:
        """``(score - offset) / (threshold - offset)`` clipped at 0: 1.0 at the threshold.

        NaN while warming up (there is no threshold yet) and for NaN scores.
        """
        s = _as_scores(scores)
        if self.warming_up:
            return np.full(s.shape, np.nan)
        span = max(self.threshold - self.offset, 1e-12)
        out = (s - self.offset) / span
        with np.errstate(invalid="ignore"):
            np.maximum(out, 0.0, out=out, where=~np.isnan(out))
        out[s == self.threshold] = 1.0
        return out

    def tail_probability(self, scores: Any) -> np.ndarray:
        """Probability that a normal event scores at least this high.

        Estimated from the recent scores (during the warm-up too, from those gathered so far);
        NaN before at least 10 scores have been seen.
        """
        s = _as_scores(scores)
        if self._sorted.size < 10:
            return np.full(s.shape, np.nan)
        return self._tail_probability(s)

    def log_tail_probability(self, scores: Any) -> np.ndarray:
        """Natural log of :meth:`tail_probability`, finite even where the probability underflows.

        Far anomalies keep distinct values (their ranking survives), e.g. for AUC or sorting.
        """
        s = _as_scores(scores)
        if self._sorted.size < 10:
            return np.full(s.shape, np.nan)
        with np.errstate(divide="ignore"):
            out = np.log(self._tail_probability(s))
        tail = self._tail_model()
        beyond = s > tail.t
        if beyond.any():
            out[beyond] = np.minimum(tail.log_survival(s[beyond]), 0.0)
        return out

    def tail_probability_one(self, score: float) -> float:
        """:meth:`tail_probability` of one score, without array overhead (for per-event APIs)."""
        srt = self._sorted
        n = srt.size
        if n < 10 or score != score:
            return math.nan
        tail = self._tail_model()
        if score > tail.t:
            return min(float(tail.survival(score)), 1.0)
        above = n - int(srt.searchsorted(score))
        return min((above + 1.0) / (n + 1.0), 1.0)

    def log_tail_probability_one(self, score: float) -> float:
        """:meth:`log_tail_probability` of one score, without array overhead (per-event APIs)."""
        srt = self._sorted
        if srt.size < 10 or score != score:
            return math.nan
        tail = self._tail_model()
        if score > tail.t:
            return min(float(tail.log_survival(score)), 0.0)
        return float(np.log(self.tail_probability_one(score)))

    def _tail_model(self) -> _Tail:
        n = self._sorted.size
        return _Tail(self._sorted, min(max(20.0 / (n + 1), 0.001), 0.05))

    def frozen_tail_probability_one(self) -> _FrozenTailOne:
        """:meth:`tail_probability_one` as it is now, as a function of one score.

        For per-event APIs that score many events between two updates (``GMMDetector``): the
        window is searched as a Python list (:func:`bisect.bisect_left`, cheaper for one value
        than numpy's ``searchsorted``) and the tail model is looked up once.
        """
        return _FrozenTailOne(self._sorted, self._tail_model() if self._sorted.size >= 10 else None)

    def frozen_tail_probability(self):
        """:meth:`tail_probability` as it is now, as a function of scores.

        The window is replaced, never modified in place, so the function keeps answering for
        this moment after later updates: a batch's tail probabilities can be computed only for
        the events someone asks about (the daemon: its anomalies).
        """
        if self._sorted.size < 10:
            return lambda scores: np.full(_as_scores(scores).shape, np.nan)
        srt, tail = self._sorted, self._tail_model()
        return lambda scores: _tail_probability_in(srt, tail, _as_scores(scores))

    def _tail_probability(self, s: np.ndarray) -> np.ndarray:
        return _tail_probability_in(self._sorted, self._tail_model(), s)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _count(self, finite: np.ndarray, flags: np.ndarray, was_warming: bool) -> None:
        self.n_events_seen += int(finite.sum())
        if not was_warming:
            self.n_events_decided += int(finite.sum())
            self.n_flagged += int(flags.sum())

    def _base_meta(self) -> dict[str, Any]:
        return {
            "false_alarm_rate": self.false_alarm_rate,
            "warmup_events": self.warmup_events,
            "window_size": self.window_size,
            "filled": self._filled,
            "cursor": self._cursor,
            "n_events_seen": self.n_events_seen,
            "n_events_decided": self.n_events_decided,
            "n_flagged": self.n_flagged,
            "threshold": None if self.warming_up else self.threshold,
            "offset": self.offset,
        }

    def _restore_base(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        window = np.asarray(arrays["window"], dtype=np.float64)
        if window.shape != (self.window_size,):
            raise ValueError(
                f"threshold state window has shape {window.shape}, expected ({self.window_size},)"
            )
        self._window = window.copy()
        self._filled = int(meta["filled"])
        self._cursor = int(meta["cursor"])
        self._sorted = np.sort(self._window[self._occupied()])
        self.n_events_seen = int(meta["n_events_seen"])
        self.n_events_decided = int(meta["n_events_decided"])
        self.n_flagged = int(meta["n_flagged"])
        self.threshold = math.inf if meta["threshold"] is None else float(meta["threshold"])
        self.offset = float(meta["offset"])

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:  # pragma: no cover
        raise NotImplementedError


class AdaptiveThreshold(_ScoreScale):
    """Threshold at the ``1 - false_alarm_rate`` quantile of recent normal scores.

    Parameters
    ----------
    false_alarm_rate
        Target fraction of normal events flagged, e.g. ``0.001``.
    warmup_events
        Number of finite scores gathered before the first threshold; nothing is flagged before.
    window_size
        Scores kept (bounded memory). Default ``40 / false_alarm_rate`` within ``[2000, 100000]``:
        about 40 scores above the threshold, enough for a stable order statistic.
    rejection_ratio, rejection_gap
        The rejection level -- scores above it are taken for anomalies and kept out of the window
        -- is the larger of the score normal events exceed with probability
        ``rejection_ratio * false_alarm_rate`` (by the fitted tail) and
        ``threshold + rejection_gap * (threshold - median)`` (see the module notes).

    Attributes
    ----------
    threshold : float
        Current threshold (``inf`` while warming up).
    rejection_level : float
        Scores above it do not enter the window.
    realised_rate : float
        Fraction flagged since the warm-up, to report next to ``false_alarm_rate``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> thr = AdaptiveThreshold(false_alarm_rate=0.001, warmup_events=2000)
    >>> normal = rng.standard_exponential(300_000)
    >>> far_outliers = np.where(rng.random(300_000) < 0.03, 40.0, 0.0)  # 3 % anomalies
    >>> flags = np.concatenate([thr.update(b) for b in np.split(normal + far_outliers, 300)])
    >>> bool(6.2 < thr.threshold < 7.6)          # -log(0.001) = 6.9 for Exp(1)
    True
    >>> is_outlier = far_outliers > 0
    >>> bool(flags[2000:][is_outlier[2000:]].mean() > 0.99)
    True
    >>> false_alarm = flags[2000:][~is_outlier[2000:]].mean()
    >>> bool(0.00075 < false_alarm < 0.00125)
    True
    """

    kind = "AdaptiveThreshold"

    def __init__(
        self,
        false_alarm_rate: float = 1e-3,
        warmup_events: int = 1000,
        window_size: int | None = None,
        rejection_ratio: float = 0.05,
        rejection_gap: float = 0.5,
    ):
        super().__init__(false_alarm_rate, warmup_events, window_size)
        if not 0.0 < rejection_ratio < 1.0:
            raise ValueError(f"rejection_ratio must be in (0, 1), got {rejection_ratio!r}")
        if not rejection_gap > 0:
            raise ValueError(f"rejection_gap must be > 0, got {rejection_gap!r}")
        self.rejection_ratio = float(rejection_ratio)
        self.rejection_gap = float(rejection_gap)
        self.rejection_level = math.inf
        self._tail: _Tail | None = None

    def update(self, scores: Any) -> np.ndarray:
        """Decide on a batch with the current threshold, then learn from it.

        Parameters
        ----------
        scores
            One score per event, in arrival order; NaN scores (events that could not be scored)
            are ignored.

        Returns
        -------
        numpy.ndarray of bool
            ``score > threshold`` under the threshold in force *before* this batch (all False
            while warming up), the same as :meth:`decide` would have returned.
        """
        s = _as_scores(scores)
        was_warming = self.warming_up
        flags = self.decide(s)
        finite = ~np.isnan(s)
        self._count(finite, flags, was_warming)
        kept = s[finite]
        if was_warming:
            self._push(kept)
            if self.n_events_seen >= max(self.warmup_events, 1):
                self._initialise()
            return flags
        level = self._admission_level(np.sort(kept))
        self._push(kept[kept <= level])
        self._forget_oldest(max(self.n_events_seen // 2, self.warmup_events, 10))
        if self._sorted.size:
            self._set(*self._fit(self._sorted, level))
        return flags

    def _admission_level(self, batch: np.ndarray) -> float:
        """The level up to which a sorted batch's scores enter the window (module notes).

        The rejection level before the batch, raised while the fit to the window and the batch's
        scores up to it implies a higher one; where no score of the batch lies beyond it (the
        usual case) it is unchanged and costs nothing.
        """
        level = self.rejection_level
        admitted = int(np.searchsorted(batch, level, side="right"))
        for _ in range(50):
            if admitted >= batch.size or not math.isfinite(level):
                break
            inside = batch[:admitted]
            merged = np.insert(self._sorted, np.searchsorted(self._sorted, inside), inside)
            if merged.size < 10:
                break
            implied = self._fit(merged, level)[2]
            more = int(np.searchsorted(batch, implied, side="right"))
            if implied <= level or more == admitted:
                break
            level, admitted = implied, more
        return level

    def _fit(
        self, srt: np.ndarray, rejection_level: float, robust: bool = False
    ) -> tuple[_Tail, float, float]:
        """Tail model, median and next rejection level for a window cut at ``rejection_level``.

        The window lacks the normal events beyond the cut, a mass ``beyond`` estimated by the tail
        model; the quantile is taken at ``(alpha - beyond) / (1 - beyond)`` to compensate.
        ``robust`` (for the warm-up sample, which may hold anomalies) fits an exponential tail to
        the top 5 % instead of the top ``alpha``.
        """
        alpha = self.false_alarm_rate
        anchor = 0.05 if robust else 0.0
        tail = _Tail(srt, alpha, anchor, robust)
        if math.isfinite(rejection_level):
            beyond = min(float(tail.survival(rejection_level)), 0.5 * alpha)
            tail = _Tail(srt, (alpha - beyond) / (1.0 - beyond), anchor, robust)
            tail.p = alpha
        half = srt.size // 2
        median = float(srt[half] if srt.size % 2 else 0.5 * (srt[half - 1] + srt[half]))
        level = max(
            tail.quantile(self.rejection_ratio * alpha),
            tail.t + self.rejection_gap * max(tail.t - median, 0.0),
        )
        return tail, median, level

    def _set(self, tail: _Tail, median: float, level: float) -> None:
        self._tail = tail
        self.threshold = tail.t
        self.offset = median
        self.rejection_level = level

    def _tail_model(self) -> _Tail:
        return self._tail if self._tail is not None else super()._tail_model()

    def _recalibrate(self) -> None:
        # A refitted model's held-out scores of every learned event hold the stream's anomalies
        # as a warm-up sample does, so they are calibrated on as one. Fitted to all of them
        # (the cut at infinity), a few far anomalies raised the tail's shape to its bound and the
        # threshold far beyond every normal score: the replay path flagged 3e-4 of the normal
        # events at a target of 1e-3, none at all on 5000-event streams.
        self._calibrate("recalibrated")

    def _initialise(self) -> None:
        """First threshold from the warm-up sample, robust to the anomalies it may hold."""
        self._calibrate("initialised")

    def _calibrate(self, what: str) -> None:
        """Threshold from a window that may hold anomalies: the smallest self-consistent cut,
        then the fit of an update to the scores below it."""
        full = self._sorted
        if full.size < 10:
            return
        # Start at the upper quartile (unaffected by a few % of anomalies) and raise the cut until
        # the threshold it implies confirms it: the smallest self-consistent threshold.
        level = _upper_quantile(full, 0.25)
        fit = None
        for _ in range(200):
            kept = full[: np.searchsorted(full, level, side="right")]
            if kept.size < 10:
                break
            fit = self._fit(kept, level, robust=True)
            converged = abs(fit[2] - level) <= 1e-9 * (abs(level) + 1.0)
            level = fit[2]
            if converged:
                break
        if fit is None:
            fit = self._fit(full, math.inf, robust=True)
        else:  # the cut found, fit the threshold below it as update does (the shape free)
            kept = full[: np.searchsorted(full, fit[2], side="right")]
            if kept.size >= 10:
                fit = self._fit(kept, fit[2])
        keep = self._window[self._occupied()]
        keep = keep[keep <= fit[2]]
        self._filled = 0
        self._cursor = 0
        self._sorted = np.empty(0, dtype=np.float64)
        self._push(keep)
        self._set(*fit)
        logger.info(
            "adaptive threshold %s at %.6g after %d events (target rate %g)",
            what,
            self.threshold,
            self.n_events_seen,
            self.false_alarm_rate,
        )

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, meta)`` for :mod:`streamgmm.checkpoint`."""
        meta = self._base_meta()
        meta["kind"] = self.kind
        meta["rejection_ratio"] = self.rejection_ratio
        meta["rejection_gap"] = self.rejection_gap
        finite_level = math.isfinite(self.rejection_level)
        meta["rejection_level"] = self.rejection_level if finite_level else None
        meta["tail"] = None if self._tail is None else {
            name: getattr(self._tail, name) for name in _Tail.__slots__
        }
        return {"window": self._window.copy()}, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> AdaptiveThreshold:
        """Rebuild from :meth:`get_state` output (every field is required)."""
        obj = cls(
            false_alarm_rate=meta["false_alarm_rate"],
            warmup_events=meta["warmup_events"],
            window_size=meta["window_size"],
            rejection_ratio=meta["rejection_ratio"],
            rejection_gap=meta["rejection_gap"],
        )
        obj._restore_base(arrays, meta)
        level = meta["rejection_level"]
        obj.rejection_level = math.inf if level is None else float(level)
        if meta["tail"] is not None:
            tail = _Tail.__new__(_Tail)
            for name, value in meta["tail"].items():
                setattr(tail, name, float(value))
            obj._tail = tail
        return obj


class FixedThreshold(_ScoreScale):
    """A constant threshold, with the same reporting as :class:`AdaptiveThreshold`.

    The window of recent scores is kept only to express scores as ``anomaly_score`` (its median is
    the offset) and ``tail_probability``; ``realised_rate`` shows what rate the constant yields.

    Parameters
    ----------
    value
        The threshold on the score ``-log p(x)``.
    warmup_events
        Scores gathered before the first decision.
    window_size
        Recent scores kept for the offset and tail probabilities.

    Examples
    --------
    >>> import numpy as np
    >>> thr = FixedThreshold(5.0, warmup_events=0)
    >>> thr.update(np.array([1.0, 6.0])).tolist()
    [False, True]
    >>> thr.realised_rate
    0.5
    """

    kind = "FixedThreshold"

    def __init__(self, value: float, warmup_events: int = 0, window_size: int = 10_000):
        if not math.isfinite(value):
            raise ValueError(f"a fixed threshold must be finite, got {value!r}")
        super().__init__(0.01, warmup_events, window_size)
        self.value = float(value)
        self.false_alarm_rate = math.nan
        if self.warmup_events == 0:
            self.threshold = self.value

    def update(self, scores: Any) -> np.ndarray:
        """Flag ``score > value`` (after the warm-up) and remember the scores for the scales."""
        s = _as_scores(scores)
        was_warming = self.warming_up
        flags = self.decide(s)
        finite = ~np.isnan(s)
        self._count(finite, flags, was_warming)
        self._push(s[finite])
        if self._sorted.size:
            self.offset = float(np.median(self._sorted))
        if self.n_events_seen >= self.warmup_events:
            self.threshold = self.value
        return flags

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, meta)`` for :mod:`streamgmm.checkpoint`."""
        meta = self._base_meta()
        meta["kind"] = self.kind
        meta["value"] = self.value
        meta["false_alarm_rate"] = None
        return {"window": self._window.copy()}, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> FixedThreshold:
        """Rebuild from :meth:`get_state` output."""
        obj = cls(meta["value"], warmup_events=meta["warmup_events"],
                  window_size=meta["window_size"])
        obj._restore_base(arrays, meta)
        obj.false_alarm_rate = math.nan
        return obj


def threshold_from_state(
    arrays: dict[str, np.ndarray], meta: dict[str, Any]
) -> AdaptiveThreshold | FixedThreshold:
    """Rebuild whichever threshold :meth:`get_state` described (its ``meta["kind"]``)."""
    kinds = {"AdaptiveThreshold": AdaptiveThreshold, "FixedThreshold": FixedThreshold}
    kind = meta.get("kind")
    if kind not in kinds:
        raise ValueError(f"unknown threshold kind {kind!r} in state; expected one of {list(kinds)}")
    return kinds[kind].from_state(arrays, meta)
