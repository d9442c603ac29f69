"""A River anomaly detector backed by streamgmm's :class:`~streamgmm.detector.Detector`.

:class:`GMMDetector` speaks River's ``base.AnomalyDetector`` protocol on dict events and adds
the mini-batch methods ``learn_many`` / ``score_many`` on pandas DataFrames.

Examples
--------
>>> from river import anomaly, compose, datasets, metrics, preprocessing
>>> from streamgmm.anomaly import GMMDetector
>>> model = preprocessing.StandardScaler() | GMMDetector(seed=0)
>>> auc = metrics.ROCAUC()
>>> for x, y in datasets.synth.AnomalySine(n_samples=3000, n_anomalies=100, seed=1):
...     auc.update(y, model.score_one(x))
...     model.learn_one(x)
>>> bool(auc.get() > 0.9)
True

Under River's filters. GMMDetector protects its own learning (flagged events are not learned as
normal), so let it learn every event: ``QuantileFilter(..., protect_anomaly_detector=False)``
does. ``ThresholdFilter.learn_one`` in River 0.26 either withholds flagged events from the
detector (``protect_anomaly_detector=True``, which hides the upper tail of the scores from its
calibration, so it flags far more than its quantile says) or, with ``False``, learns nothing at all;
so classify with the filter and learn on the detector. At ``1 - false_alarm_rate`` it then flags
at about that rate:

>>> flt = anomaly.ThresholdFilter(GMMDetector(false_alarm_rate=0.01, seed=0), threshold=0.99)
>>> flags = []
>>> for x, _ in datasets.synth.AnomalySine(n_samples=5000, n_anomalies=1, seed=2):
...     flags.append(flt.classify(flt.score_one(x)))
...     flt.anomaly_detector.learn_one(x)
>>> bool(0.007 < sum(flags[1000:]) / 4000 < 0.013)
True
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any

import numpy as np
from river import base
from scipy import special

from streamgmm import _covariance as cv
from streamgmm.detector import Detector
from streamgmm.frame import InputFrame
from streamgmm.mixture import (
    OnlineGaussianMixture,
    mixture_predictive,
    mixture_predictive_log_tail,
    modes_refit_point,
    warmup_modes_bound,
)

__all__ = ["GMMDetector"]

logger = logging.getLogger(__name__)

_MAX_WARNED_FEATURES = 100
# The smallest micro-batch; also the earliest a buffer in alarm is learned (see *Buffering*).
_MIN_BATCH = 16
_ALARM_WINDOW = 32  # learn_one learns early when most of the last 32 scored events were flagged
_ALARM_MASK = (1 << _ALARM_WINDOW) - 1


# Below this tail probability, ``1 - p`` would run out of float resolution (all far anomalies
# would tie at 1.0); the score then continues as a slowly rising function of ``-log p``.
_LINEAR_TAIL = 1e-6
_LOG_LINEAR_TAIL = -math.log(_LINEAR_TAIL)


def _unit_from_log_tail(log_tail: np.ndarray | float) -> np.ndarray | float:
    """Map ``log P(normal score >= s)`` to [0, 1), increasing, without saturating.

    ``1 - p`` while ``p >= 1e-6`` (so a score of 0.99 means exactly "1 % of normal events score
    higher"), then ``1 - 1e-6 (1 + L0) / (1 + L)`` with ``L = -log p``: continuous, and distinct
    for anomalies whose ``p`` underflows.
    """
    log_tail = np.minimum(np.asarray(log_tail, dtype=np.float64), 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        linear = 1.0 - np.exp(log_tail)
        far = 1.0 - _LINEAR_TAIL * (1.0 + _LOG_LINEAR_TAIL) / (1.0 - log_tail)
    out = np.where(log_tail >= -_LOG_LINEAR_TAIL, linear, far)
    return out if out.ndim else float(out)


def _unit_from_log_tail_one(log_tail: float) -> float:
    """:func:`_unit_from_log_tail` of one number, in plain floats (the same bits)."""
    log_tail = min(log_tail, 0.0)
    if log_tail >= -_LOG_LINEAR_TAIL:
        return float(1.0 - np.exp(log_tail))  # numpy's exp, as the array version's
    return 1.0 - _LINEAR_TAIL * (1.0 + _LOG_LINEAR_TAIL) / (1.0 - log_tail)


class _ExpertTrial:
    """Whether a diagonal mixture of ``n_components`` describes a stream better than the full
    mixture: from the full mixture's initialisation on, a plain diagonal mixture (fitted to the
    events so far, then learning by stepwise EM) and the full one score each batch before
    learning it; after ``n_events`` complete events, the higher median log-likelihood wins.

    The batches learned meanwhile are kept (a few hundred events), so that the winner can be
    built as if it had been there from the start; a trial that is lost costs one small fit.
    A trial still undecided after ``max_events`` (too few complete events) is lost.
    """

    def __init__(self, n_components: int, n_events: int, max_events: int, seed: int | None):
        self.n_components, self.n_events, self.seed = n_components, n_events, seed
        self.max_events = max_events
        self.batches: list[np.ndarray] = []
        self.model: OnlineGaussianMixture | None = None
        self.own: list[np.ndarray] = []
        self.full: list[np.ndarray] = []

    def learned(self, rows: np.ndarray, full_is_fitted: bool) -> None:
        self.batches.append(rows)
        if self.model is None and full_is_fitted:
            data = np.vstack(self.batches)
            data = data[~np.isnan(data).any(axis=1)]
            if len(data) >= self.n_components:
                self.model = OnlineGaussianMixture(
                    self.n_components, covariance_type="diag", random_state=self.seed,
                    warmup_size=len(data)).fit(data)

    def judge(self, rows: np.ndarray, full: OnlineGaussianMixture) -> bool | None:
        """True / False once decided (whether the diagonal mixture won), None until then."""
        if sum(map(len, self.batches)) > self.max_events:
            return False  # memory stays bounded
        if self.model is None:
            return None
        complete = rows[~np.isnan(rows).any(axis=1)]
        if len(complete):
            self.own.append(self.model.score_samples(complete))
            self.full.append(full.score_samples(complete))
            self.model.partial_fit(complete)
        if sum(map(len, self.own)) < self.n_events:
            return None
        own, full_median = (float(np.median(np.concatenate(p))) for p in (self.own, self.full))
        logger.info("diagonal mixture: median log-likelihood %.4g against the full mixture's "
                    "%.4g: %s", own, full_median, "kept" if own > full_median else "dropped")
        return own > full_median


class GMMDetector(base.AnomalyDetector):
    """Online Gaussian-mixture anomaly detector for River.

    Parameters
    ----------
    n_components
        Mixture components, or ``"auto"`` (chosen by held-out likelihood when the model
        initialises).
    max_components
        Upper bound for ``"auto"`` and for components adopted later. 3 by default: on the small
        warm-up buffers of River streams more components are chosen than the data support for
        high-dimensional or discrete data, while 3 keeps multi-modal streams right.
    covariance_type
        ``"full"``, ``"diag"``, ``"spherical"`` or ``"tied"``.
    false_alarm_rate
        Target rate of the detector's adaptive threshold, used to protect learning (flagged events
        are not learned) and exposed as :attr:`threshold`.
    warmup_events
        Complete events learned before the first decision: the first half initialise the mixture,
        the second half calibrate the threshold.
    batch_size
        ``learn_one`` gathers events into micro-batches of this size (see *Buffering*). 512 by
        default: most of what learning a batch costs does not grow with its size, so larger
        batches cost less per event, and the development half of ``scripts/evaluate.py`` ranks
        as with 256 (README, *Why the defaults*).
    forgetting
        Forgetting of the mixture (the engine's ``min_step``).
    protect
        Learn flagged events with the reduced weight ``flagged_weight`` only (and adopt
        persistent new modes, see :mod:`streamgmm.adoption`).
    flagged_weight
        0.1 by default (the :class:`~streamgmm.detector.Detector` uses 0): rare normal modes too
        sparse to be adopted as a cluster are still learned, slowly (README, *Why the
        defaults*).
    adoption_persistence
        How many events a cluster of flagged events must have arrived steadily over before it
        is adopted as a new normal mode (default 1000): shorter bursts stay anomalies, a regime
        that lasts is accepted. The one knob for "how fast should a new behaviour become
        normal" -- except after a shift of the whole stream (most events flagged), which is
        adopted at once (see :mod:`streamgmm.adoption`).
    covariance_shrinkage
        ``"oas"`` (default): full covariances shrunk towards their diagonals by as much as the
        events behind each component leave uncertain; ``None``: maximum likelihood.
    score
        ``"density"`` (default) or ``"tail"``: what the detector ranks by (see
        :class:`~streamgmm.detector.Detector`, whose default is ``"tail"``). The density ranked
        River streams better on the development half of ``scripts/evaluate.py``; the tail mass
        is the choice when a few percent of anomalies may form a tight cluster, which the
        density can learn as normal (README, *Why the defaults*).
    refit_events
        Young streams: the mixture is refitted to everything learned so far each time it has
        grown by half, up to this many events (see :class:`~streamgmm.detector.Detector`).
    diagonal_components
        Components of a second, diagonal mixture consulted where the full one cannot have more
        than one (``n_components="auto"`` with so many features that two full components would
        have more free parameters than half of ``refit_events`` rows: 15 features and more by
        default). One Gaussian over several normal classes is where an anomaly class between
        them hides; the diagonal mixture separates the classes. Both learn every event, each
        protected by its own threshold, and an event scores by the one that finds it rarer
        among its own normal events (the smaller tail probability). It must first win a trial:
        from the full mixture's initialisation on, a plain diagonal mixture and the full one
        score each batch before learning it, and after ``warmup_events // 4`` events the
        diagonal mixture is built (from the batches so far, in order) only if its median
        log-likelihood was the higher (on correlated features it is not, and a lost trial costs
        one small fit). ``None``: never (README, *Why the defaults*).
    seed
        Random seed of the mixture's initialisation.

    Buffering
    ---------
    ``learn_one`` copies the event into a buffer; the call that fills the buffer hands it to the
    detector, which learns it. The buffer holds ``min(batch_size, max(16, n // 8))`` events, ``n``
    being the number of events learned so far: 16 at first, ``batch_size`` from
    ``8 * batch_size`` events on. So an event starts to affect ``score_one`` at most that many
    minus one ``learn_one`` calls after its own (at most ``batch_size - 1``), and at once if
    :meth:`flush` is called. ``learn_many`` flushes the buffer and learns its DataFrame as one
    batch; ``score_one`` and ``score_many`` never learn.

    In alarm, sooner: when more than half of the last 32 events ``score_one`` scored were above
    the detector's threshold, ``learn_one`` learns the buffer as soon as it holds 16 events.
    Anomalies are rare, so this happens after a shift of the whole stream, and it lets the
    detector see the shift (and adopt the new regime, see :mod:`streamgmm.adoption`) within
    tens of events instead of up to ``batch_size``. It changes only when events are learned,
    never how.

    Scores
    ------
    ``score_one`` returns the fraction of recent normal events that score lower than ``x`` under
    the mixture -- ``1 - tail_probability`` of :mod:`streamgmm.threshold`, in [0, 1], higher =
    more anomalous. Its ranking is that of the detector's score (``-log p(x)`` by default, see
    ``score``); for normal events it is roughly uniform,
    so River's ``metrics.ROCAUC`` (which assumes scores in [0, 1]) works, and
    ``anomaly.ThresholdFilter(GMMDetector(false_alarm_rate=r), threshold=1 - r)`` flags at about
    the rate ``r``. Until the mixture has initialised (``warmup_events // 2`` complete events) the
    score is the predictive (F-distribution) tail of the Mahalanobis distance under Gaussians of
    the events learned so far (the geometric mean of a diagonal and a full one's, the
    diagonal one replaced by a mixture of diagonal ones where BIC prefers that, or the tail of
    a mixture of full ones where BIC prefers one, see ``_fallback_score``), and 0.0 before
    any event was learned. Beyond a tail
    probability of 1e-6 the score keeps rising slowly with the detector's score, so far anomalies
    stay ranked. :meth:`Detector.score_samples
    <streamgmm.detector.Detector.score_samples>` on :attr:`detector` gives that score itself.
    With the diagonal mixture (:attr:`expert`, see ``diagonal_components``) a complete event
    gets the larger of the two mixtures' scores, each calibrated on its own normal events:
    ``expert_kept`` is None during its trial, then True or False (and :attr:`expert` None).

    Scalers in front
    ----------------
    Behind a scaler whose range grows with the stream (``preprocessing.MinMaxScaler``), every
    event that extends a feature's range rescales all later ones; behind
    ``preprocessing.StandardScaler`` every event moves the mean and deviation that scale the
    later ones. ``score_one`` then ``learn_one`` of the same event show the rescaling, and the
    detector follows it into a stable internal frame (:mod:`streamgmm.frame`), so its model
    never sees it.

    Features that appear or disappear
    ---------------------------------
    Following River's conventions a missing key is a missing value, never an error. The feature
    set is fixed when the first micro-batch is learned: the sorted union of that batch's keys.
    Afterwards a missing feature is marginalised out exactly (scored by the density of the
    observed features, on the same scale as complete events; such events are not learned by the
    mixture), and a key not in the set is ignored (logged once per name). ``None`` is a missing
    value; values must be numbers (encode categories first, e.g. ``preprocessing.OneHotEncoder``),
    finite and within ±1e150 (a larger one's square overflows the model's statistics):
    ``score_one`` and ``learn_one`` refuse any other with a ``ValueError``, so skipping that
    event leaves the detector, and a River scaler in front, as if it never came.
    """

    def __init__(
        self,
        n_components: int | str = "auto",
        max_components: int = 3,
        covariance_type: str = "full",
        false_alarm_rate: float = 0.01,
        warmup_events: int = 256,
        batch_size: int = 512,
        forgetting: float = 0.002,
        protect: bool = True,
        flagged_weight: float = 0.1,
        adoption_persistence: int = 1000,
        covariance_shrinkage: str | None = "oas",
        refit_events: int | None = 512,
        score: str = "density",
        diagonal_components: int | None = 8,
        seed: int | None = None,
    ):
        self.n_components = n_components
        self.max_components = max_components
        self.covariance_type = covariance_type
        self.false_alarm_rate = false_alarm_rate
        self.warmup_events = warmup_events
        self.batch_size = batch_size
        self.forgetting = forgetting
        self.protect = protect
        self.flagged_weight = flagged_weight
        self.adoption_persistence = adoption_persistence
        self.covariance_shrinkage = covariance_shrinkage
        self.refit_events = refit_events
        self.score = score
        self.diagonal_components = diagonal_components
        self.seed = seed
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.detector: Detector | None = None
        self.features: list[Any] | None = None
        self._index: dict[Any, int] = {}
        self._pending: list[dict[Any, float]] = []  # before the feature set is fixed
        self._pending_scored: list[dict | None] = []  # the same events as scored (streamgmm.frame)
        self._scored_pending: dict | None = None  # the event score_one saw last, till then
        self._rows: list[np.ndarray] = []
        self._warned: set[Any] = set()
        # diagonal Gaussian used until the mixture is initialised: name -> [n, mean, m2]
        self._fallback: dict[Any, list[float]] = {}
        # and the full one, from the feature set's fixing on: [n, mean, scatter] of the complete
        # learned rows (internal frame), and its predictive's (n, mean, Cholesky factor)
        self._joint: list | None = None
        self._joint_fit: tuple | None = None
        # and a mixture of them where BIC prefers one (mixture_predictive): the complete learned
        # rows (internal frame) as the batches _learn_joint got, and (rows it was fitted to, its
        # components or None)
        self._warm_rows: list[np.ndarray] = []
        self._warm_mixture: dict[str, tuple[int, list | None]] = {}  # by covariance type
        self._fast: tuple[np.ndarray, ...] | None = None
        # the diagonal mixture (see diagonal_components), its cached parts as _fast and
        # _tail_one, and its trial until it is decided
        self.expert: Detector | None = None
        self.expert_kept: bool | None = None  # None while on trial (or if there is none)
        self._expert_fast: tuple | None = None
        self._expert_tail_one = None
        self._trial: _ExpertTrial | None = None
        self._tail_one = None  # the threshold's frozen tail_probability_one, until it learns
        self._alarms = 0  # bit i: whether the (i+1)-th last score_one was above the threshold
        self._last_x: dict | None = None  # the event score_one saw last, and its row
        self._last_row: np.ndarray | None = None
        self._last_complete: np.ndarray | None = None  # the last row _row found complete
        self._batch_target = _MIN_BATCH  # learn_one flushes at this many buffered events
        self._input_frame: InputFrame | None = None  # from the first batch on
        self._warm = False  # the mixture is initialised (is_warm, without the lookups)

    @classmethod
    def _unit_test_params(cls):
        yield {}
        yield {"n_components": 2, "covariance_type": "diag", "warmup_events": 100,
               "batch_size": 16}
        # with the diagonal mixture from two features on (see diagonal_components)
        yield {"warmup_events": 32, "refit_events": 16, "batch_size": 16,
               "diagonal_components": 2}

    # -- conversion ------------------------------------------------------------------------
    @staticmethod
    def _value(name: Any, value: Any) -> float:
        if value is None:
            return math.nan
        try:
            out = float(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"feature {name!r} has the non-numeric value {value!r}; GMMDetector needs numbers "
                "(encode categories first, e.g. with preprocessing.OneHotEncoder)"
            ) from exc
        if math.isinf(out):
            raise ValueError(f"feature {name!r} is infinite ({value!r}); use None for missing")
        if abs(out) > cv.MAX_MAGNITUDE:
            raise ValueError(
                f"feature {name!r} is {out:g}, beyond ±{cv.MAX_MAGNITUDE:g}: its square overflows "
                "a 64-bit float; rescale the feature, or use None for a value that is not a "
                "measurement")
        return out

    def _row(self, x: dict) -> np.ndarray:
        if x is self._last_x:  # learn_one right after score_one of the same event
            return self._last_row
        if len(x) == len(self._index):  # the usual case: exactly the known features
            try:
                values = self._getter(x)
                row = np.array(values, dtype=np.float64)
            except (KeyError, TypeError, ValueError):
                pass
            else:
                try:  # hypot of the Python floats is faster than a numpy reduction
                    norm = math.hypot(*values)  # (NaN if one is NaN, inf if one is inf)
                except TypeError:  # numbers given as strings
                    norm = math.hypot(*row.tolist())
                if norm <= cv.MAX_MAGNITUDE:  # no NaN, no inf, none too large: the usual case
                    self._last_complete = row
                    return row
                if not (np.abs(row) > cv.MAX_MAGNITUDE).any():  # (inf too; NaN is missing)
                    if not np.isnan(row).any():  # each value small enough, if not their norm
                        self._last_complete = row
                    return row
        row = np.full(len(self._index), np.nan)
        for name, value in x.items():
            j = self._index.get(name)
            if j is None:
                if name not in self._warned and len(self._warned) < _MAX_WARNED_FEATURES:
                    self._warned.add(name)
                    logger.warning(
                        "feature %r was not among the features fixed at the first batch; ignored",
                        name,
                    )
                continue
            row[j] = self._value(name, value)
        return row

    def _fix_features(self, names) -> None:
        self.features = sorted(names, key=lambda n: (str(type(n)), n))
        self._index = {name: j for j, name in enumerate(self.features)}
        getter = operator.itemgetter(*self.features)
        self._getter = getter if len(self.features) > 1 else (lambda x: (getter(x),))
        self._input_frame = InputFrame(len(self.features))

    def _make_detector(self, **overrides) -> Detector:
        params = dict(
            n_components=self.n_components,
            max_components=self.max_components,
            covariance_type=self.covariance_type,
            false_alarm_rate=self.false_alarm_rate,
            warmup_events=self.warmup_events,
            forgetting=self.forgetting,
            protect=self.protect,
            flagged_weight=self.flagged_weight,
            feature_names=[str(f) for f in self.features or []],
            random_state=self.seed,
            adoption_persistence=self.adoption_persistence,
            covariance_shrinkage=self.covariance_shrinkage,
            refit_events=self.refit_events,
            score=self.score,
        )
        params.update(overrides)
        return Detector(**params)

    # -- learning ----------------------------------------------------------------------------
    def learn_one(self, x: dict) -> None:
        """Buffer ``x``; every ``batch_size``-th call learns the buffer (see *Buffering*)."""
        row = None
        if self.features is not None:
            row = self._row(x)
            scored = self._last_row
            if self._last_x is not None and x is not self._last_x and (scored != row).any():
                # the event score_one saw, learned with other numbers: a scaler in front
                # rescaled it (streamgmm.frame)?
                self._input_frame.observe(scored, row, self._rows)
        if not self._warm:
            self._learn_fallback(x)
        if row is None:
            self._pending.append({k: self._value(k, v) for k, v in x.items()})
            scored, self._scored_pending = self._scored_pending, None
            self._pending_scored.append(None if scored is None or scored is x else
                                        {k: self._value(k, v) for k, v in scored.items()})
            size = len(self._pending)
        else:
            internal = self._input_frame.internal(row)
            self._rows.append(internal)
            size = len(self._rows)
            if not self._warm:
                self._learn_joint(internal[None, :])
        self._last_x = None
        # a full batch, or in alarm: the buffer holds 16 events and most of the last 32 scored
        # events were flagged (see *Buffering*; inline, as learn_one runs once per event)
        if size >= self._batch_target or (
                size >= _MIN_BATCH and self._alarms.bit_count() > _ALARM_WINDOW // 2):
            self.flush()

    def _current_batch_size(self) -> int:
        """Micro-batches grow with the stream: 16 events at first, ``batch_size`` from
        ``8 * batch_size`` learned events on (early events teach the model sooner)."""
        learned = 0 if self.detector is None else self.detector.n_events_seen
        return int(min(self.batch_size, max(_MIN_BATCH, learned // 8)))

    def flush(self) -> None:
        """Learn the buffered events now."""
        if self.features is None:
            if not self._pending:
                return
            names = set().union(*self._pending)
            if not names:
                self._pending, self._pending_scored = [], []
                return
            self._fix_features(names)
            scored = [None if s is None else self._row(s) for s in self._pending_scored]
            rows = self._input_frame.follow(scored, [self._row(x) for x in self._pending])
            self._pending, self._pending_scored = [], []
            if self._input_frame.n_rescalings and not self._warm:
                self._fallback = {}  # learned in the frames the events came in: again
                for row in rows:
                    self._learn_fallback(dict(zip(self.features, row.tolist(), strict=True)))
            self._rows = list(rows)
            if not self._warm:
                self._learn_joint(rows)
        if not self._rows:
            return
        batch = np.array(self._rows, dtype=np.float64)  # much faster than vstack of 1-D rows
        self._rows = []
        self._input_frame.learned(batch)
        self._process(batch)

    def _process(self, batch: np.ndarray) -> None:
        if self.detector is None:
            self.detector = self._make_detector()
            self._trial = self._expert_trial(batch.shape[1])
        usable = ~np.isnan(batch).all(axis=1)
        if usable.any():
            rows = batch[usable]
            if self._trial is not None:
                self._judge_expert(rows)
            if self.expert is not None:
                self.expert.process(rows, drift_summaries=False, warmup_scores=False)
            # the report is discarded, and the warm-up scored by _fallback_score
            self.detector.process(rows, drift_summaries=False, warmup_scores=False)
            self._warm = self.detector.model.is_fitted
            if self._warm:
                self._warm_rows, self._warm_mixture = [], {}
            if self._trial is not None:
                self._trial.learned(rows, self._warm)
        self._fast = self._tail_one = self._expert_fast = self._expert_tail_one = None
        self._batch_target = self._current_batch_size()

    def _expert_trial(self, n_features: int) -> _ExpertTrial | None:
        """The diagonal mixture's trial, where the full one cannot have two components (see
        ``diagonal_components``)."""
        k = self.diagonal_components
        rows = self.refit_events or self.warmup_events // 2  # the largest fit's rows
        if (k is None or self.n_components != "auto" or self.covariance_type != "full"
                or cv.n_parameters("full", 2, n_features) <= rows // 2):
            return None
        return _ExpertTrial(int(k), max(self.warmup_events // 4, 1),
                            4 * max(self.warmup_events, 1), self.seed)

    def _judge_expert(self, rows: np.ndarray) -> None:
        """Score a batch under both mixtures before they learn it; once the trial has its
        events, keep the diagonal mixture (a :class:`Detector`, which learns every batch so
        far, in order) or drop it."""
        trial = self._trial
        verdict = trial.judge(rows, self.detector.model)
        if verdict is None:
            return
        self._trial, self.expert_kept = None, verdict
        if verdict:
            self.expert = self._make_detector(
                n_components=trial.n_components, max_components=trial.n_components,
                covariance_type="diag")
            for past in trial.batches:
                self.expert.process(past, drift_summaries=False, warmup_scores=False)

    @staticmethod
    def _fast_parts(model) -> tuple:
        """A mixture as one stacked whitening map (cached until the model next learns).

        ``z = A x - b`` holds every component's ``L_k^T (x - mu_k)`` (``L_k`` the precision
        Cholesky factor); ``sums`` (``(K, K d)``, None for one component) adds each component's
        squares; ``log_const`` holds ``log w_k - (d log 2 pi + log |S_k|) / 2`` as floats.
        """
        k, d = model.means_.shape
        kind = model.covariance_type
        prec_chol = cv.full_covariances(kind, model.precisions_cholesky_, k, d)
        stacked, offset = cv.whitening_map(model.means_, prec_chol)
        log_const = np.log(np.maximum(model.weights_, 1e-300)) - 0.5 * (
            d * cv.LOG_2PI + cv.log_det_covariances(kind, model.precisions_cholesky_, k, d))
        sums = np.kron(np.eye(k), np.ones(d)) if k > 1 else None
        return (np.ascontiguousarray(stacked), offset, sums, log_const.tolist(),
                model.weights_, d)

    def _score_complete_row(self, row: np.ndarray, parts: tuple | None = None) -> float:
        """The detector's score of one complete row (as ``Detector.score_samples`` gives it).

        Per event this is one matrix-vector product and a few in-place operations on the cached
        :meth:`_fast_parts`: on arrays of a few dozen numbers numpy's cost is its per-call
        overhead, so every call saved counts (``np.dot`` has less of it than ``@``).
        """
        if parts is None:
            if self._fast is None:
                self._fast = self._fast_parts(self.detector.model)
            parts = self._fast
        stacked, offset, sums, log_const, weights, d = parts
        z = np.dot(stacked, row)
        z -= offset
        if self.score == "tail":
            maha = np.dot(z * z, sums.T) if sums is not None else np.array([np.dot(z, z)])
            mass = float(weights @ special.gammaincc(0.5 * d, 0.5 * maha))
            if mass > 1e-250:
                return -math.log(mass)
            terms = np.log(np.maximum(weights, 1e-300)) + cv.log_chi2_tail(maha, d)
            top = float(terms.max())
            return -(top + math.log(float(np.exp(terms - top).sum())))
        if sums is None:  # one component
            return 0.5 * float(np.dot(z, z)) - log_const[0]
        z *= z
        terms = [c - 0.5 * q for c, q in zip(log_const, np.dot(sums, z).tolist())]  # noqa: B905
        # (equal lengths; the strict= keyword alone would cost 0.2 us per event)
        top = max(terms)
        total = 0.0
        for t in terms:  # a plain loop: K is small, and a generator costs more than the sum
            total += math.exp(t - top)
        return -(top + math.log(total))

    def learn_many(self, X) -> None:
        """Flush the buffer, then learn the rows of the DataFrame ``X`` as one batch."""
        self.flush()
        if len(X) == 0:
            return
        if self.features is None:
            self._fix_features(list(X.columns))
        if not self._warm:
            for x in X.to_dict(orient="records"):
                self._learn_fallback(x)
        rows = self._input_frame.internal(self._frame(X))
        if not self._warm:
            self._learn_joint(rows)
        self._input_frame.learned(rows)
        self._process(rows)

    def _frame(self, X) -> np.ndarray:
        frame = X
        if list(X.columns) != self.features:  # reindex only when the columns differ
            for name in X.columns:
                if name not in self._index and name not in self._warned:
                    if len(self._warned) < _MAX_WARNED_FEATURES:
                        self._warned.add(name)
                        logger.warning("column %r is not among the fixed features; ignored", name)
            frame = X.reindex(columns=self.features)
        try:
            return frame.to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"GMMDetector needs numeric columns ({exc}); encode categories first"
            ) from exc

    def _internal_value(self, name: Any, value: float) -> float:
        """A feature's value in the internal frame (see :mod:`streamgmm.frame`)."""
        if self.features is None or self._input_frame.is_identity:
            return value
        j = self._index.get(name)
        if j is None:
            return value
        return value * self._input_frame.scale[j] + self._input_frame.offset[j]

    # -- the diagonal Gaussian used before the mixture exists --------------------------------
    def _learn_fallback(self, x: dict) -> None:
        for name, value in x.items():
            v = self._internal_value(name, self._value(name, value))
            if math.isnan(v):
                continue
            stat = self._fallback.get(name)
            if stat is None:
                if len(self._fallback) >= 10_000:
                    continue
                stat = self._fallback[name] = [0.0, 0.0, 0.0]
            stat[0] += 1.0
            delta = v - stat[1]
            stat[1] += delta / stat[0]
            stat[2] += delta * (v - stat[1])

    def _learn_joint(self, rows: np.ndarray) -> None:
        """Add the complete ``rows`` (internal frame) to the full Gaussian's statistics (Chan)."""
        rows = rows[np.isfinite(rows).all(axis=1)]
        if not len(rows):
            return
        self._warm_rows.append(rows)
        nb = float(len(rows))
        mb = rows.mean(axis=0)
        diff = rows - mb
        sb = diff.T @ diff
        if self._joint is None:
            self._joint = [nb, mb, sb]
        else:
            n, mean, scatter = self._joint
            total = n + nb
            delta = mb - mean
            self._joint = [total, mean + delta * (nb / total),
                           scatter + sb + np.outer(delta, delta) * (n * nb / total)]
        self._joint_fit = None

    def _joint_log_tail(self, internal: np.ndarray) -> float | None:
        """Log predictive tail of a complete row under the full Gaussian of the complete rows
        learned so far (:func:`~streamgmm._covariance.joint_predictive`: its correlations shrunk
        by the OAS rule; with every one shrunk away it is the diagonal of
        :meth:`_fallback_score`); None while it is unusable."""
        joint = self._joint
        if joint is None:
            return None
        if self._joint_fit is None or self._joint_fit[0] != joint[0]:
            self._joint_fit = (joint[0], cv.joint_predictive(*joint))
        fit = self._joint_fit[1]
        return None if fit is None else cv.joint_predictive_log_tail(fit, internal)

    def _mixture_log_tail(self, internal: np.ndarray, covariance_type: str,
                          point: int) -> float | None:
        """Log predictive tail of a complete row under the mixture of ``covariance_type``
        Gaussians BIC prefers for the first ``point`` complete rows learned
        (:func:`~streamgmm.mixture.mixture_predictive`; ``point`` is the last of the fixed
        points of :func:`~streamgmm.mixture.modes_refit_point`, as the daemon's warm-up
        refits: when they have grown by an eighth, at least by 4); None while one Gaussian is
        preferred."""
        n, parts = self._warm_mixture.get(covariance_type, (0, None))
        if point != n:
            parts = mixture_predictive(
                np.concatenate(self._warm_rows)[:point],
                warmup_modes_bound(self.n_components, self.max_components), self.seed,
                covariance_type)
            self._warm_mixture[covariance_type] = (point, parts)
        return None if parts is None else float(mixture_predictive_log_tail(parts, internal))

    def _fallback_score(self, x: dict) -> float:
        """Predictive tail score under Gaussians of the events so far (warm-up only).

        With the mean and variances estimated from ``n`` events, ``n / (n + 1)`` times the
        Mahalanobis distance over ``d`` follows (about) an ``F(d, n - 1)`` distribution: the
        predictive tail, wider than the plug-in chi-square while ``n`` is small, so the first
        events of a stream are not scored as if the few seen so far told the whole story
        (README, *Why the defaults*). 0.0 with nothing learned.

        Two Gaussians give that tail: a diagonal one, and a full one (:meth:`_joint_log_tail`)
        once the feature set is fixed (the first micro-batch); a complete event gets the mean of
        their log tails (the geometric mean of the two tail probabilities), an incomplete one
        the diagonal's over its observed features. The full one follows correlations (an
        event that breaks one is unusual), the diagonal counts every feature an anomaly moves,
        also along a correlation. Development half of ``scripts/evaluate.py``, mean ROC-AUC
        without a scaler, against the diagonal alone: ImageSegments "one" +0.013, digits "one"
        +0.009, wine +0.015, RandomRBF "one" +0.005; the full one alone gained as much there
        but lost 0.097 on breast cancer, whose anomalies (the other class) move along the
        correlated size features.

        Where the complete rows so far have several modes -- BIC prefers a mixture of full
        Gaussians to one (:meth:`_mixture_log_tail`; with no more free parameters than rows:
        from 29 rows with 4 features, never below 209 rows with 13) -- a complete event gets
        the mixture's predictive tail instead: one Gaussian over two normal classes has its
        mean between them, where an anomalous class in between scores as the most normal
        event (README, *Why the defaults*). Where it does not, but BIC prefers a mixture of
        diagonal Gaussians to one diagonal Gaussian (which fits with many features and few
        events: from 121 rows with 30 features), that mixture's tail stands in for the
        diagonal Gaussian's in the geometric mean.

        A feature that has not varied yet (variance 0 so far: a pixel that has always been 0)
        adds at most :func:`~streamgmm._covariance.unvaried_residual_cap` to the statistic,
        in both Gaussians: under a floor of round-off size its first other value outweighed
        every other feature, and about one normal event in eight of digits' first 128 scored
        as the worst anomaly. Development half, every other stream, no scaler /
        ``MinMaxScaler``: digits "one" ROC-AUC 0.937 -> 0.967 / 0.950 -> 0.966, PR-AUC
        0.308 -> 0.547 / 0.389 -> 0.565; ``StandardScaler`` unchanged (it sends a feature
        that has not varied to 0 when the event is scored: the first value that differs never
        reaches the score).
        """
        maha2 = 0.0
        dims = 0
        seen = math.inf
        for name, value in x.items():
            stat = self._fallback.get(name)
            if stat is None or stat[0] < 2:
                continue
            v = self._internal_value(name, self._value(name, value))
            if math.isnan(v):
                continue
            var = stat[2] / (stat[0] - 1.0)
            floor = 1e-12 * (1.0 + stat[1] * stat[1])
            z2 = (v - stat[1]) ** 2 / max(var, floor)
            if var <= floor and z2 > 0.0:  # a feature that has not varied yet
                z2 = min(z2, float(cv.unvaried_residual_cap(stat[0])))
            maha2 += z2
            dims += 1
            seen = min(seen, stat[0])
        if dims == 0:
            return 0.0
        statistic = seen / (seen + 1.0) * maha2 / dims
        log_tail = cv.log_f_tail(statistic, dims, seen - 1.0)
        if self._joint is not None:
            row = self._row(x)
            if math.isfinite(row.sum()):
                internal = self._input_frame.internal(row)
                # (no rows are kept once the mixture exists)
                point = modes_refit_point(sum(len(rows) for rows in self._warm_rows))
                modes = self._mixture_log_tail(internal, "full", point)
                if modes is not None:  # several modes: no single Gaussian describes them
                    return float(_unit_from_log_tail(modes))
                diagonal = self._mixture_log_tail(internal, "diag", point)
                if diagonal is not None:  # several modes, seen with diagonal covariances
                    log_tail = diagonal
                joint = self._joint_log_tail(internal)
                if joint is not None:
                    log_tail = 0.5 * (log_tail + joint)
        return float(_unit_from_log_tail(log_tail))

    # -- scoring ---------------------------------------------------------------------------------
    @property
    def is_warm(self) -> bool:
        """Whether the mixture is initialised (scores are then the detector's, under it)."""
        return self._warm

    @property
    def threshold(self) -> float:
        """The detector's current adaptive threshold on the score (``inf`` while warming up)."""
        return math.inf if self.detector is None else float(self.detector.threshold.threshold)

    @staticmethod
    def _unit_scores(detector: Detector, rows: np.ndarray) -> np.ndarray | None:
        """``1 - tail probability`` of rows from a detector's recent scores (None if too
        few)."""
        if detector.threshold.n_events_seen < 10:
            return None
        scores = detector.score_samples(rows)
        unit = _unit_from_log_tail(detector.threshold.log_tail_probability(scores))
        return np.where(np.isnan(scores), 0.0, unit)

    def score_one(self, x: dict) -> float:
        """Fraction of normal events that score lower than ``x`` (in [0, 1]); never learns."""
        if self.features is not None:
            row = self._row(x)
            self._last_x, self._last_row = x, row  # for learn_one (see streamgmm.frame)
        else:
            self._scored_pending = x
        if self._warm:
            assert self.detector is not None
            threshold = self.detector.threshold
            if threshold.n_events_seen >= 10:
                internal = self._input_frame.internal(row)
                if row is self._last_complete:  # no NaN: the fast path
                    score = self._score_complete_row(internal)
                elif np.isnan(row).all():
                    return self._fallback_score(x)
                else:
                    score = float(self.detector.score_samples(internal[None, :])[0])
                self._alarms = ((self._alarms << 1) | (score > threshold.threshold)) & _ALARM_MASK
                if self._tail_one is None:
                    self._tail_one = threshold.frozen_tail_probability_one()
                tail = self._tail_one(score)
                if self.expert is not None and row is self._last_complete:
                    score, threshold, tail = self._rarer(internal, score, threshold, tail)
                if tail < _LINEAR_TAIL:  # far out: keep the ranking beyond float resolution
                    return _unit_from_log_tail_one(threshold.log_tail_probability_one(score))
                return 1.0 - tail
        return self._fallback_score(x)

    def _rarer(self, internal: np.ndarray, score: float, threshold, tail: float) -> tuple:
        """(score, threshold, tail) of whichever mixture finds the row rarer: the full one's,
        as given, or the diagonal one's (once it is initialised and calibrated)."""
        expert = self.expert
        if self._expert_fast is None:  # once per batch learned: is it ready, then its parts
            if not expert.model.is_fitted or expert.threshold.n_events_seen < 10:
                return score, threshold, tail
            self._expert_fast = self._fast_parts(expert.model)
            self._expert_tail_one = expert.threshold.frozen_tail_probability_one()
        own = self._score_complete_row(internal, self._expert_fast)
        own_tail = self._expert_tail_one(own)
        if own_tail < _LINEAR_TAIL and tail < _LINEAR_TAIL:  # both far out: by log tails
            if (expert.threshold.log_tail_probability_one(own)
                    < threshold.log_tail_probability_one(score)):
                return own, expert.threshold, own_tail
        elif own_tail < tail:
            return own, expert.threshold, own_tail
        return score, threshold, tail

    def score_many(self, X):
        """:meth:`score_one` of the rows of the DataFrame ``X``, as a pandas Series."""
        import pandas as pd

        if self.is_warm:
            assert self.detector is not None
            rows = self._input_frame.internal(self._frame(X))
            unit = self._unit_scores(self.detector, rows)
            if unit is not None:
                if self.expert is not None and self.expert.model.is_fitted:
                    own = self._unit_scores(self.expert, rows)  # the rarer, as score_one
                    if own is not None:
                        complete = ~np.isnan(rows).any(axis=1)
                        unit = np.where(complete, np.maximum(unit, own), unit)
                return pd.Series(unit, index=X.index, dtype=float)
        return pd.Series(
            [self._fallback_score(x) for x in X.to_dict(orient="records")],
            index=X.index, dtype=float,
        )
