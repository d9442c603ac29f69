"""The detection core: mixture + threshold + learning policy + drift, one call per micro-batch.

:class:`Detector` owns an :class:`~streamgmm.mixture.OnlineGaussianMixture`, a threshold
(:class:`~streamgmm.threshold.AdaptiveThreshold` or :class:`~streamgmm.threshold.FixedThreshold`),
a :class:`~streamgmm.drift.DriftMonitor` and an :class:`~streamgmm.adoption.AdoptionPolicy`.
:meth:`Detector.process` takes a batch ``X`` and

1. scores every event under the model *before* it learns the batch (the E-step runs once:
   ``score_partial_fit(X, sample_weight=fn, return_resp=True)``);
2. decides: ``is_anomaly = score > threshold`` (never during warm-up);
3. updates the threshold, the drift statistics and the adoption policy;
4. learns, with flagged events given weight 0 (``protect=True``).

A batch in which a shift of the whole stream begins (most of its events flagged, the shift
rule of :mod:`streamgmm.adoption`) is cut there: the events before the cut are processed as
above, and the rest is scored by the model that adopted the new regime -- as if the caller had
cut the batch; while each part adopts a cluster, the rest is cut again where most of it is
still flagged. Without it, a batch of 5000 was decided by the model from before the shift to
its end (the replay path flagged 61 % of the normal events after the change on the evaluation's
drifting streams; 13 % with the cut).

Scores and scales (per event, :class:`DetectionResult`)
    ``score`` (by default ``-log`` of the mixture's mass further out than ``x``; ``score="density"``
    for ``-log p(x)``; both in nats), ``log_likelihood``, ``threshold``, ``anomaly_score`` (1.0 at
    the threshold, 0-1 normal, above 1 anomalous), ``tail_probability`` (probability that a
    normal event scores at least this high), ``component`` (most likely), ``warming_up``,
    ``typical_score`` (the expected score of an event from that component) and ``explain(i)``.

Warm-up
    The first ``warmup_events // 2`` complete events initialise the model (their ``component``
    is -1 and their score that of the predictive distribution of the events before them, a
    diagonal Gaussian's and (by tail mass) a full one's, or a mixture's where the events
    before have several modes,
    :meth:`~streamgmm.mixture.OnlineGaussianMixture.warmup_score_samples`, so even a stream
    shorter than the warm-up is ranked; NaN for the first two); the next
    ``warmup_events - warmup_events // 2`` are scored by the mixture and calibrate the
    threshold. During both, nothing is flagged and ``warming_up`` is True.

Missing features
    ``NaN`` marks a missing feature. Such an event is scored by the exact marginal density of its
    observed features (:meth:`~streamgmm.mixture.OnlineGaussianMixture.marginal_score_samples`),
    not imputed. Its ``log_likelihood`` is that marginal; its ``score`` is the tail mass of the
    observed features (a probability, so on the scale of complete events), or by density put on
    that scale (:func:`streamgmm.explain.complete_scale_scores`), so that one threshold applies.
    Incomplete events are not learned.

Protected learning and adoption of new normal behaviour
    Flagged events get weight ``flagged_weight`` (default 0) in the M-step, so isolated anomalies
    and short bursts never teach the model that they are normal; an
    :class:`~streamgmm.adoption.AdoptionPolicy` buffers them and adopts a persistent new mode, or
    the new regime after a shift of the whole stream, as new components (the rules, and the
    ``adoption_*`` and ``shift_*`` parameters: :mod:`streamgmm.adoption`). :attr:`n_adoptions`
    and :attr:`n_shifts` count them.

Explanations
    ``explain(i)`` lists each feature's contribution to ``score - typical_score``
    (:func:`streamgmm.explain.explain_event`).

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> det = Detector(n_components=2, false_alarm_rate=0.01, warmup_events=1000, random_state=0,
...                feature_names=["cpu", "latency"])
>>> normal = np.vstack([rng.normal([10, 100], [1, 5], (2500, 2)),
...                     rng.normal([50, 300], [2, 10], (2500, 2))])
>>> for batch in np.array_split(normal[rng.permutation(5000)], 50):
...     res = det.process(batch)
>>> res = det.process(np.array([[10.0, 100.0], [10.0, 300.0]]))
>>> res.is_anomaly.tolist(), res.warming_up.tolist()
([False, True], [False, False])
>>> bool(res.anomaly_score[1] > 1.0 > res.anomaly_score[0])
True
>>> top = res.explain(1)[0]        # latency 300 belongs to the busy mode, where cpu is ~50
>>> top["feature"], top["direction"], round(top["expected"])
('cpu', 'low', 50)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from streamgmm import _covariance as cv
from streamgmm.adoption import AdoptionParameters, AdoptionPolicy
from streamgmm.drift import DriftMonitor, DriftReport
from streamgmm.explain import (
    MixtureParameters,
    complete_scale_scores,
    explain_event,
    typical_scores,
)
from streamgmm.mixture import OnlineGaussianMixture
from streamgmm.statefile import read_state, write_state
from streamgmm.threshold import AdaptiveThreshold, FixedThreshold, threshold_from_state

__all__ = ["Detector", "DetectionResult"]

logger = logging.getLogger(__name__)

_STATE_KIND = "Detector"
# 2: the mixture state carries n_eff; 3: the adoption policy's state is a part of its own
# (meta["adoption"]) and the detector's meta carries its version; 4: the score (tail mass or
# density) is a parameter -- earlier states scored by density
_STATE_VERSION = 4


@dataclasses.dataclass
class DetectionResult:
    """Per-event outcome of :meth:`Detector.process` (arrays of length ``n``)."""

    score: np.ndarray
    log_likelihood: np.ndarray
    threshold: np.ndarray
    anomaly_score: np.ndarray
    is_anomaly: np.ndarray
    warming_up: np.ndarray
    component: np.ndarray
    typical_score: np.ndarray
    drift: DriftReport
    X: np.ndarray
    feature_names: list[str]
    _parameters: MixtureParameters | None = dataclasses.field(default=None, repr=False)
    _tail_function: Callable[[np.ndarray], np.ndarray] | None = dataclasses.field(
        default=None, repr=False
    )
    _tail_cache: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.score)

    @property
    def tail_probability(self) -> np.ndarray:
        """Probability that a normal event scores at least as high (NaN while warming up).

        Computed on first access, against the recent normal scores as they were right after
        this batch: a caller that only reads it for its anomalies pays only for those.
        """
        if self._tail_cache is None:
            out = np.full(len(self.score), np.nan)
            if self._tail_function is not None:
                live = ~self.warming_up
                out[live] = self._tail_function(self.score[live])
            self._tail_cache = out
        return self._tail_cache

    @classmethod
    def concatenate(cls, parts: list[DetectionResult]) -> DetectionResult:
        """One result for consecutive parts of a batch (drift and parameters of the last part;
        ``drift_detected`` if any part detected a drift)."""
        per_event = (
            "score", "log_likelihood", "threshold", "anomaly_score", "is_anomaly",
            "warming_up", "component", "typical_score", "X",
        )
        joined = {name: np.concatenate([getattr(p, name) for p in parts]) for name in per_event}
        joined["_tail_cache"] = np.concatenate([p.tail_probability for p in parts])
        drift = dataclasses.replace(
            parts[-1].drift, drift_detected=any(p.drift.drift_detected for p in parts)
        )
        return dataclasses.replace(parts[-1], _tail_function=None, drift=drift, **joined)

    def explain(self, i: int) -> list[dict[str, Any]]:
        """Why event ``i`` scored as it did: one dict per feature, largest contribution first.

        Keys: ``feature``, ``value``, ``expected`` (``E[x_j | other features]`` under the
        responsible component), ``contribution`` (nats; they sum to
        ``score[i] - typical_score[i]``), ``direction`` (``"high"``, ``"low"`` or ``"missing"``).
        Empty while warming up.
        """
        k = int(self.component[i])
        if k < 0 or self._parameters is None:
            return []
        excess = float(self.score[i] - self.typical_score[i])
        return explain_event(self.X[i], k, excess, self._parameters, self.feature_names)


class _ShiftBegins(Exception):
    """A shift of the whole stream begins inside a batch: cut it after ``at`` events."""

    def __init__(self, at: int):
        super().__init__(at)
        self.at = int(at)


class Detector:
    """Streaming Gaussian-mixture anomaly detector (see the module notes for every rule).

    Parameters
    ----------
    n_components
        Components of the mixture, or ``"auto"`` (chosen by held-out likelihood on the model's
        warm-up buffer, see :class:`~streamgmm.mixture.OnlineGaussianMixture`).
    covariance_type
        ``"full"``, ``"diag"``, ``"spherical"`` or ``"tied"``.
    false_alarm_rate
        Target fraction of normal events flagged (adaptive threshold).
    warmup_events
        Complete events before the first decision: half initialise the model, half calibrate
        the threshold.
    fixed_threshold
        A constant threshold on the score instead of the adaptive one.
    forgetting
        The engine's ``min_step``: memory of about ``batch_size / forgetting`` events (256 / 0.002
        = 128,000 with the defaults); the one knob for how fast the model adapts.
    protect
        Give flagged events the weight ``flagged_weight`` when learning (and adopt persistent
        new modes).
    feature_names
        Names used in explanations (default ``x0, x1, ...``).
    random_state
        Seed of the engine.
    adoption_buffer, adoption_window, adoption_min_events, adoption_rate_factor,
    adoption_persistence, adoption_boost
        The adoption rule's parameters (``buffer``, ``window``, ... of
        :class:`~streamgmm.adoption.AdoptionParameters`; the rule: :mod:`streamgmm.adoption`).
    shift_window, shift_fraction
        The shift rule (:mod:`streamgmm.adoption`): more than ``shift_fraction`` of the last
        ``shift_window`` events flagged (default ``4 * adoption_min_events``) waives the
        persistence requirement. ``shift_fraction=1`` turns the rule off.
    flagged_weight
        Weight of flagged events in the M-step when ``protect`` (0: not learned at all).
    covariance_shrinkage
        ``"oas"`` (default) shrinks full covariances towards their diagonals by as much as the
        events behind each component leave uncertain (see
        :class:`~streamgmm.mixture.OnlineGaussianMixture`); ``None`` for plain maximum
        likelihood.
    score
        ``"tail"`` (default): ``-log`` of the mixture's mass further out than the event,
        ``sum_k pi_k P(chi2_d >= q_k(x))`` with ``q_k`` its squared Mahalanobis distance to
        component ``k`` (:meth:`~streamgmm.mixture.OnlineGaussianMixture.score_tail_samples`);
        ``"density"``: ``-log p(x)``. The density ranks an event inside a tight but light
        component -- a few percent of the stream packed closely, as anomalies of one kind
        often are -- as very normal; once the warm-up gave such a cluster a component, it is
        learned as normal and the ranking collapses. The tail mass of such an event is at most
        its component's weight. Adoption still asks whether a cluster would be normal by
        density (see ``density_threshold``). Measured: README, *Why the defaults*.
    refit_events
        While the stream is young, the mixture is refitted by batch EM (K chosen again) to all
        events learned so far each time they have grown by half, up to this many events; the
        threshold is recalibrated on the refitted model's cross-fitted scores of those events.
        ``None``: the mixture is initialised once and learns online only (README, *Why the
        defaults*, compares the two).
    **engine_params
        Passed to :class:`~streamgmm.mixture.OnlineGaussianMixture` (e.g. ``max_components``,
        ``reg_covar``, ``step_exponent``, ``warmup_size``).
    """

    def __init__(
        self,
        n_components: int | str = "auto",
        covariance_type: str = "full",
        false_alarm_rate: float = 1e-3,
        warmup_events: int = 1000,
        fixed_threshold: float | None = None,
        forgetting: float = 0.002,
        protect: bool = True,
        feature_names: Sequence[str] | None = None,
        random_state: int | None = None,
        adoption_buffer: int = 500,
        adoption_window: int | None = None,
        adoption_min_events: int | None = None,
        adoption_rate_factor: float = 3.0,
        adoption_persistence: int | None = None,
        adoption_boost: float = 0.05,
        flagged_weight: float = 0.0,
        shift_window: int | None = None,
        shift_fraction: float = 0.5,
        covariance_shrinkage: str | None = "oas",
        refit_events: int | None = 512,
        score: str = "tail",
        **engine_params: Any,
    ):
        if score not in ("tail", "density"):
            raise ValueError(f"score must be 'tail' or 'density', got {score!r}")
        self.score = score
        if int(warmup_events) < 2:
            raise ValueError(f"warmup_events must be >= 2, got {warmup_events!r}")
        if not 0.0 <= forgetting < 1.0:
            raise ValueError(f"forgetting must be in [0, 1), got {forgetting!r}")
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.false_alarm_rate = float(false_alarm_rate)
        self.warmup_events = int(warmup_events)
        self.fixed_threshold = None if fixed_threshold is None else float(fixed_threshold)
        self.forgetting = float(forgetting)
        self.protect = bool(protect)
        self.feature_names = None if feature_names is None else [str(f) for f in feature_names]
        self.random_state = random_state
        self.adoption_buffer = int(adoption_buffer)
        self.adoption_window = int(
            adoption_window if adoption_window is not None else max(2000, 2 * self.warmup_events)
        )
        self.adoption_min_events = adoption_min_events
        self.adoption_rate_factor = float(adoption_rate_factor)
        self.adoption_persistence = int(
            adoption_persistence if adoption_persistence is not None else self.warmup_events
        )
        self.adoption_boost = float(adoption_boost)
        if not 0.0 <= flagged_weight <= 1.0:
            raise ValueError(f"flagged_weight must be in [0, 1], got {flagged_weight!r}")
        self.flagged_weight = float(flagged_weight)
        self.shift_window = None if shift_window is None else int(shift_window)
        self.shift_fraction = float(shift_fraction)
        adoption = AdoptionParameters(
            buffer=self.adoption_buffer,
            window=self.adoption_window,
            min_events=self.adoption_min_events,
            rate_factor=self.adoption_rate_factor,
            persistence=self.adoption_persistence,
            boost=self.adoption_boost,
            shift_window=self.shift_window,
            shift_fraction=self.shift_fraction,
        )
        self.engine_params = dict(engine_params)
        model_warmup = int(self.engine_params.pop("warmup_size", max(self.warmup_events // 2, 1)))
        self.model = OnlineGaussianMixture(
            n_components=n_components,
            covariance_type=covariance_type,
            min_step=self.forgetting,
            covariance_shrinkage=covariance_shrinkage,
            refit_size=refit_events,
            warmup_size=model_warmup,
            random_state=random_state,
            **self.engine_params,
        )
        threshold_warmup = max(self.warmup_events - model_warmup, 1)
        if self.fixed_threshold is None:
            self.threshold: AdaptiveThreshold | FixedThreshold = AdaptiveThreshold(
                false_alarm_rate=self.false_alarm_rate, warmup_events=threshold_warmup
            )
        else:
            self.threshold = FixedThreshold(self.fixed_threshold, warmup_events=threshold_warmup)
        self.drift = DriftMonitor(target_anomaly_rate=self.false_alarm_rate)
        self.adoption = AdoptionPolicy(adoption, self.false_alarm_rate, self.forgetting)
        # Scoring by tail mass, the adoption rule still asks whether a cluster's members would be
        # normal by *density* (compact enough for a Gaussian of their own): by tail mass alone
        # any cluster holding more than the target rate of the traffic would pass, a broad one
        # of scattered outliers too. Its threshold is this one, at the same target rate.
        self.density_threshold: AdaptiveThreshold | None = None
        if self.score == "tail":
            self.density_threshold = AdaptiveThreshold(
                false_alarm_rate=self.false_alarm_rate, warmup_events=threshold_warmup,
                # a quarter of the deciding threshold's window: it only gates adoptions, and
                # every window is a part of the checkpoint
                window_size=int(min(max(10.0 / self.false_alarm_rate, 2000), 25_000)),
            )
        self.model.refit_weights = self._refit_weights
        self.n_events_seen = 0

    def _refit_weights(self, X: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Weights of a refit's rows: those the model would flag get ``flagged_weight``.

        Rows learned before the threshold existed (the warm-ups) were learned at full weight,
        anomalies among them too; a refit to them can give a tight cluster of anomalies a
        component of its own, after which the density calls them normal (River's Shuttle with
        no scaler, 7 % anomalies: ROC-AUC 0.36 with seed 16). Judged again at each refit, they
        are protected as later rows are. The judge is the model's own tail (less than
        ``false_alarm_rate`` of its mass further out), not the threshold: at the initialisation
        the mixture asks again after each fit, with the model just fitted (the concentration
        steps of ``OnlineGaussianMixture._fit_judged``), which no threshold has seen; and on a
        young stream the threshold, calibrated on cross-fitted scores of half the rows, flagged
        none of the warm-up's anomalies when asked in-sample (River's Shuttle behind
        ``StandardScaler``, 325 rows: 0 of 25). Only when scoring by density: by tail mass a
        light component's members score at least ``-log`` of its weight, and there the rule
        cost the development half's replay path 0.007 ROC-AUC and 0.02 PR-AUC.
        """
        if not self.protect or self.score != "density" or not self.model.is_fitted:
            return weights
        flagged = self.model.score_tail_samples(X) < math.log(self.false_alarm_rate)
        return np.where(flagged, np.minimum(weights, self.flagged_weight), weights)

    # -- properties ---------------------------------------------------------------------------
    @property
    def n_adoptions(self) -> int:
        """Clusters of flagged events adopted as new components (:mod:`streamgmm.adoption`)."""
        return self.adoption.n_adoptions

    @property
    def n_shifts(self) -> int:
        """Shifts of the whole stream detected (:mod:`streamgmm.adoption`)."""
        return self.adoption.n_shifts

    @property
    def n_events_learned(self) -> int:
        """Events the model has learned from (warm-up included; weight-0 events included)."""
        return int(self.model.n_events_learned_)

    @property
    def warming_up(self) -> bool:
        """True until events are decided."""
        return not self.model.is_fitted or self.threshold.warming_up

    # -- the batch ------------------------------------------------------------------------------
    def _validate(self, X: Any) -> np.ndarray:
        try:
            X = np.asarray(X, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"X must be numeric: {exc}") from exc
        if X.ndim == 1:
            X = X.reshape(1, -1)
        if X.ndim != 2 or X.shape[1] == 0:
            raise ValueError(f"X must be 2-D (n_events, n_features), got shape {X.shape}")
        d = self.model.n_features_in_
        if d is not None and X.shape[1] != d:
            raise ValueError(f"X has {X.shape[1]} features, but the detector was built on {d}")
        if self.feature_names is not None and len(self.feature_names) != X.shape[1]:
            raise ValueError(
                f"X has {X.shape[1]} features but {len(self.feature_names)} feature_names"
            )
        if np.isinf(X).any():
            row, col = np.argwhere(np.isinf(X))[0]
            raise ValueError(
                f"X contains inf (row {row}, feature {col}); use NaN for a missing value"
            )
        big = np.abs(X) > cv.MAX_MAGNITUDE  # (NaN compares False)
        if big.any():
            row, col = np.argwhere(big)[0]
            raise ValueError(
                f"X holds {X[row, col]:g} (row {row}, feature {col}), beyond "
                f"±{cv.MAX_MAGNITUDE:g}: its square overflows a 64-bit float; rescale the "
                "feature, or use NaN for a value that is not a measurement"
            )
        return X

    def process(self, X: Any, reference: OnlineGaussianMixture | None = None,
                drift_summaries: bool = True, warmup_scores: bool = True) -> DetectionResult:
        """Score, decide, update and learn one micro-batch; returns per-event results.

        Parameters
        ----------
        X
            ``(n, d)`` array of events in arrival order; ``NaN`` marks a missing feature.
        reference
            A fitted mixture that scores the complete events instead of this detector's own
            model (the daemon's merged model of every partition, :mod:`streamgmm.fleet`); the
            threshold then calibrates on its scores, and the own model still learns, protected
            by the decisions. Explanations and components stay those of the own model.
        drift_summaries
            False leaves the drift report's KL divergence, mean displacement and weight entropy
            NaN (:meth:`DriftMonitor.update <streamgmm.drift.DriftMonitor.update>`): nothing
            else changes, and a caller that discards the report (``GMMDetector``) saves their
            cost.
        warmup_scores
            False leaves the scores of the events before the model is initialised NaN (they
            are kept out of the calibration, so nothing else changes): a caller that scores
            its warm-up itself (``GMMDetector``) saves the cost of the predictive.
        """
        X = self._validate(X)
        # A batch that crosses the end of a warm-up is cut there, so that the events after it
        # are scored and decided: warm-up stays as short as stated, whatever the batch size.
        # One in which a shift of the whole stream begins is cut where the shift rule fires
        # (_ShiftBegins), so that the events after it are scored by the model that adopted it.
        # While each such part adopts a cluster of the new regime, the rest is cut again where
        # most of it is still flagged.
        parts = []
        under_way = False
        while True:
            left = self._events_until_warm()
            cut = len(X) if left is None else min(left, len(X))
            try:
                parts.append(self._process_batch(X[:cut], reference, drift_summaries,
                                                 under_way=under_way, warmup_scores=warmup_scores))
                under_way = False
            except _ShiftBegins as shift:
                cut = shift.at
                adopted = self.n_adoptions
                parts.append(self._process_batch(X[:cut], reference, drift_summaries,
                                                 may_cut=False, warmup_scores=warmup_scores))
                under_way = self.n_adoptions > adopted
            X = X[cut:]
            if len(X) == 0:
                break
        return parts[0] if len(parts) == 1 else DetectionResult.concatenate(parts)

    def _events_until_warm(self) -> int | None:
        """Events left in the current warm-up phase (model, then threshold); None when warm."""
        if not self.model.is_fitted:
            return max(1, self.model.warmup_remaining)
        if self.threshold.warming_up:
            return max(1, self.threshold.warmup_events - self.threshold.n_events_seen)
        return None

    def _process_batch(self, X: np.ndarray, reference: OnlineGaussianMixture | None = None,
                       drift_summaries: bool = True, may_cut: bool = True,
                       under_way: bool = False, warmup_scores: bool = True) -> DetectionResult:
        """Score, decide, update and learn one part of a batch.

        Raises :class:`_ShiftBegins` -- before anything is updated -- when ``may_cut`` and
        the decisions show a shift of the whole stream beginning inside the part
        (:meth:`AdoptionPolicy.shift_cut <streamgmm.adoption.AdoptionPolicy.shift_cut>`).
        """
        n, d = X.shape
        names = self.feature_names or [f"x{j}" for j in range(d)]
        complete = ~np.isnan(X.sum(axis=1))  # NaN marks a missing feature; X has no inf
        score = np.full(n, np.nan)
        ll = np.full(n, np.nan)
        component = np.full(n, -1, dtype=np.int64)
        typical = np.full(n, np.nan)
        thr_before = self.threshold.threshold
        refits_before = self.model.n_refits_
        params = None

        predictive = np.zeros(n, dtype=bool)
        if not self.model.is_fitted:
            if complete.any():
                if warmup_scores:
                    rows = np.flatnonzero(complete)
                    ll[rows], log_tail = self.model.warmup_score_samples(X[rows],
                                                                         return_tail=True)
                    score[rows] = -log_tail if self.score == "tail" else -ll[rows]
                    predictive[rows] = True
                self.model.partial_fit(X[complete])
        else:
            params = MixtureParameters.of(self.model)  # the model that scores this batch
            if (~complete).any():
                inc = np.flatnonzero(~complete)
                ll_inc, resp_inc, tail_inc = self.model.marginal_score_samples(
                    X[inc], return_tail=True
                )
                ll[inc] = ll_inc
                k_inc = resp_inc.argmax(axis=1)
                component[inc] = k_inc
                score[inc] = (-tail_inc if self.score == "tail" else
                              complete_scale_scores(params, X[inc], ll_inc, k_inc))
            if complete.any():
                rows = np.flatnonzero(complete)
                decided: dict[str, np.ndarray] = {}

                tail = self.score == "tail"
                ref_score = None
                if reference is not None:
                    ref_ll = reference.score_samples(X[rows])
                    ref_score = -(reference.score_tail_samples(X[rows]) if tail else ref_ll)

                def weights_for(log_score: np.ndarray) -> np.ndarray:
                    flags = self.threshold.decide(-log_score if ref_score is None else ref_score)
                    decided["flags"] = flags
                    if may_cut and self.protect and flags.any():
                        in_batch = np.zeros(n, dtype=bool)
                        in_batch[rows] = flags
                        at = self.adoption.shift_cut(in_batch, self.n_events_seen, under_way)
                        if at is not None:  # the model has learned nothing of the batch yet
                            raise _ShiftBegins(at)
                    if not self.protect:
                        return np.ones(log_score.size)
                    return np.where(flags, self.flagged_weight, 1.0)

                scored = self.model.score_partial_fit(
                    X[rows], sample_weight=weights_for, return_resp=True, return_tail=tail
                )
                ll_c, resp_c = scored[0], scored[1]
                ll[rows] = ll_c
                score[rows] = -(scored[2] if tail else ll_c)
                if ref_score is not None:
                    ll[rows], score[rows] = ref_ll, ref_score
                component[rows] = resp_c.argmax(axis=1)
            scored = component >= 0
            typical[scored] = typical_scores(params, component[scored], self.score)

        warming = np.full(n, not math.isfinite(thr_before))
        warming |= np.isnan(score) | predictive
        a_score = np.full(n, np.nan)
        if math.isfinite(thr_before):  # on the scale of the threshold that decides the batch
            a_score = self.threshold.anomaly_score(score)
            a_score[warming] = np.nan
        # warm-up predictive scores are of another model: kept out of the calibration
        is_anomaly = self.threshold.update(np.where(predictive, np.nan, score))
        if self.density_threshold is not None:
            self.density_threshold.update(np.where(predictive, np.nan, -ll))
        is_anomaly &= ~warming
        refitted = self.model.n_refits_ != refits_before
        held_out = (self.model.held_out_log_tail_ if self.score == "tail"
                    else self.model.held_out_log_likelihood_)
        if refitted and held_out is not None:
            # all rows, the flagged ones too (leaving them out would truncate the tail)
            self.threshold.rebase(-held_out)
            if self.density_threshold is not None:
                self.density_threshold.rebase(-self.model.held_out_log_likelihood_)
        self.n_events_seen += n

        if self.protect and params is not None:
            density_threshold = (self.threshold if self.density_threshold is None
                                 else self.density_threshold).threshold
            self.adoption.update(self.model, X, complete, is_anomaly, self.n_events_seen,
                                 density_threshold)
        self.adoption.advance(self.model, n)

        decided_mask = ~warming
        if self.model.is_fitted:
            report = self.drift.update(
                ll,
                is_anomaly,
                weights=self.model.weights_,
                means=self.model.means_,
                covariances=self.model.covariances_,
                covariance_type=self.covariance_type,
                decided=decided_mask,
                log_likelihood_floor=self._drift_floor(ll, score),
                summaries=drift_summaries,
            )
        else:
            report = self.drift.update(np.where(predictive, np.nan, ll), is_anomaly,
                                       decided=decided_mask)

        thr = np.full(n, thr_before)
        tail_function = None
        if math.isfinite(thr_before):
            tail_function = self.threshold.frozen_tail_probability()
        return DetectionResult(
            score=score,
            log_likelihood=ll,
            threshold=thr,
            anomaly_score=a_score,
            is_anomaly=is_anomaly,
            warming_up=warming,
            component=component,
            typical_score=typical,
            drift=report,
            X=X,
            feature_names=names,
            _parameters=params,
            _tail_function=tail_function,
        )

    def _drift_floor(self, ll: np.ndarray, score: np.ndarray) -> float:
        """The log-likelihood below which the drift statistics clip events: that of the
        threshold's rejection level (minus it, when scoring by density; by tail mass, the
        lowest log-likelihood of this batch's events the level does not reject)."""
        level = getattr(self.threshold, "rejection_level", math.inf)
        if self.score == "density" or not math.isfinite(level):
            return -level
        kept = np.isfinite(ll) & (score <= level)
        return float(ll[kept].min()) if kept.any() else -math.inf

    def score_samples(self, X: Any) -> np.ndarray:
        """Scores without learning or deciding (NaN while the model warms up).

        Incomplete events get the complete-event scale, as in :meth:`process`; an event with no
        observed feature scores NaN.
        """
        X = self._validate(X)
        out = np.full(len(X), np.nan)
        if not self.model.is_fitted or len(X) == 0:
            return out
        complete = ~np.isnan(X.sum(axis=1))  # NaN marks a missing feature; X has no inf
        if self.score == "tail":
            if complete.all():
                return -self.model.score_tail_samples(X)
            _, _, tail = self.model.marginal_score_samples(X, return_tail=True)
            return np.where(np.isnan(X).all(axis=1), np.nan, -tail)
        if complete.all():
            return -self.model.score_samples(X)
        if complete.any():
            out[complete] = -self.model.score_samples(X[complete])
        inc = np.flatnonzero(~complete)
        ll_inc, resp_inc = self.model.marginal_score_samples(X[inc])
        out[inc] = complete_scale_scores(
            MixtureParameters.of(self.model), X[inc], ll_inc, resp_inc.argmax(axis=1)
        )
        return out

    # -- state ----------------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (JSON-serialisable)."""
        return {
            "n_components": self.n_components,
            "covariance_type": self.covariance_type,
            "false_alarm_rate": self.false_alarm_rate,
            "warmup_events": self.warmup_events,
            "fixed_threshold": self.fixed_threshold,
            "forgetting": self.forgetting,
            "protect": self.protect,
            "feature_names": self.feature_names,
            "random_state": self.random_state,
            "adoption_buffer": self.adoption_buffer,
            "adoption_window": self.adoption_window,
            "adoption_min_events": self.adoption_min_events,
            "adoption_rate_factor": self.adoption_rate_factor,
            "adoption_persistence": self.adoption_persistence,
            "adoption_boost": self.adoption_boost,
            "flagged_weight": self.flagged_weight,
            "shift_window": self.shift_window,
            "shift_fraction": self.shift_fraction,
            "covariance_shrinkage": self.model.covariance_shrinkage,
            "refit_events": self.model.refit_size,
            "score": self.score,
            "warmup_size": self.model.warmup_size,
            **self.engine_params,
        }

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The whole state as ``(arrays, meta)`` for :mod:`streamgmm.checkpoint` (no pickle)."""
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {"version": _STATE_VERSION, "params": self.get_params()}
        parts = [("model", self.model), ("threshold", self.threshold), ("drift", self.drift)]
        if self.density_threshold is not None:
            parts.append(("density_threshold", self.density_threshold))
        for part, obj in parts:
            a, m = obj.get_state()
            arrays.update({f"{part}/{k}": v for k, v in a.items()})
            meta[part] = m
        policy_arrays, meta["adoption"] = self.adoption.get_state()
        arrays.update({f"adoption/{k}": v for k, v in policy_arrays.items()})
        meta["detector"] = {"n_events_seen": self.n_events_seen}
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Detector:
        """Rebuild from :meth:`get_state` output.

        Reads format versions 1 to 4 (``meta["version"]``; a state nested in a checkpoint
        before version 3 has none and is version 2 or older).
        """
        try:
            version = meta.get("version", 2)
            if version not in (1, 2, 3, 4):
                raise ValueError(f"format version {version!r}, this streamgmm reads 1 to 4")
            params = dict(meta["params"])
            if version < 4:
                params["score"] = "density"
            det = cls(**params)

            def part(prefix: str) -> dict[str, np.ndarray]:
                cut = len(prefix) + 1
                return {k[cut:]: v for k, v in arrays.items() if k.startswith(prefix + "/")}

            det.model = OnlineGaussianMixture.from_state(part("model"), meta["model"])
            det.model.refit_weights = det._refit_weights
            det.threshold = threshold_from_state(part("threshold"), meta["threshold"])
            if det.density_threshold is not None:
                det.density_threshold = threshold_from_state(
                    part("density_threshold"), meta["density_threshold"]
                )
            det.drift = DriftMonitor.from_state(part("drift"), meta["drift"])
            if version >= 3:
                det.adoption.set_state(part("adoption"), meta["adoption"])
                det.n_events_seen = int(meta["detector"]["n_events_seen"])
            else:
                det._set_state_v2(part("adoption"), meta["detector"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"invalid Detector state: missing or malformed {exc}") from exc
        return det

    def _set_state_v2(self, adoption: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        """Versions 1 and 2 kept the adoption counters in ``meta["detector"]``, with the step
        floor the detector had set on the model; those written before the shift rule existed
        have no ``shift_*`` or ``n_shifts`` (no shift had been detected)."""
        self.n_events_seen = int(info["n_events_seen"])
        shift_fields = ("shift_remaining", "shift_start", "n_shifts")
        has_shift = all(name in info for name in shift_fields)
        policy_meta = {
            "n_adoptions": info["n_adoptions"],
            "boost_remaining": info["boost_remaining"],
            "flagged_since_attempt": info["flagged_since_attempt"],
            "rate_since": info["rate_since"],
            **{name: info[name] if has_shift else 0 for name in shift_fields},
        }
        self.adoption.set_state(adoption, policy_meta)
        self.model.set_min_step(float(info["model_min_step"]))

    def save(self, path: str | os.PathLike) -> None:
        """Save the whole detector to a versioned, pickle-free state file (atomically)."""
        arrays, meta = self.get_state()
        write_state(path, _STATE_KIND, _STATE_VERSION, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Detector:
        """Load a detector saved by :meth:`save`."""
        arrays, meta = read_state(path, _STATE_KIND, _STATE_VERSION)
        return cls.from_state(arrays, meta)
