"""Adoption of new normal behaviour: when flagged events become a new component of the mixture.

:class:`~streamgmm.detector.Detector` gives flagged events the weight ``flagged_weight`` (default
0) in the M-step, so isolated anomalies and short bursts never teach the model that they are
normal. A *persistent* new mode, or a sustained shift of the whole stream, would then be flagged
forever (River's protected filters lock in this way), so an :class:`AdoptionPolicy` keeps flagged
complete events in a bounded buffer (``buffer`` events, thinned uniformly at random when full,
those older than ``window`` events dropped) and **adopts** them when all of the following hold:

* at least ``min_events`` (default ``max(30, 2 (d + 1))``) flagged events are buffered, and the
  flagged rate over the last ``window`` events (or since the last adoption, if more recent) is at
  least ``rate_factor`` times the target (false alarms alone rarely get there);
* clustering them with a small mixture (K <= 4, by held-out likelihood) yields a cluster whose
  Gaussian makes at least ``min_events`` of its points *normal* -- their score under it, weighted
  by the share of the traffic the cluster represents, is below the current threshold: they form a
  mode as dense as normal data, unlike anomalies scattered all over (checked at most once per
  ``min_events`` new flags; after a check in which no cluster was dense, the next waits for
  twice as many new flags as the last, up to ``buffer``, until a dense cluster, an adoption
  or a shift);
* those members arrived steadily over the last ``persistence`` events: each quarter of that
  period holds at least an eighth of the members that arrived in it (a steady mode puts a quarter
  in each). So a burst is not adopted, neither while it lasts (nothing in the earlier quarters but
  a few stray flags) nor after it (nothing in the later ones), nor is a new cluster that the
  clustering lumps together with a trickle of older flags (a rare mode the model fits poorly,
  say); a mode that keeps arriving is adopted after about ``6/7 * persistence`` events -- or at
  once if the whole stream has shifted (below).

Each such cluster's members then seed a new component
(:meth:`~streamgmm.mixture.OnlineGaussianMixture.spawn_component`; at ``max_components`` the
lightest is replaced, and dead components are re-seeded by the engine), leave the buffer, and the
model forgets faster (its step floor raised to ``boost`` by
:meth:`~streamgmm.mixture.OnlineGaussianMixture.set_min_step`) for the next ``persistence`` events
so that the old shape fades. Events flagged before the adoption stay flagged: the decision is
never revised.

**Shift of the whole stream.** Anomalies are a minority by definition: when more than
``shift_fraction`` (default 1/2) of the last ``shift_window`` events (default
``4 * min_events``, 120 for up to 14 features) were flagged, the old normal no longer describes
the traffic, and waiting ``persistence`` events would score the whole new regime as anomalous
meanwhile. The sustained majority itself is then the evidence of persistence: dense clusters are
adopted without the steadiness requirement (the density rule still applies, so scattered anomalies
are not adopted), and this stays so for the ``persistence`` events that follow (the boost period),
so that the new regime's smaller modes, each a minority on its own, join without waiting either.
Meanwhile only the events flagged since the shift began are clustered, and a cluster's share of
the traffic is measured since then. Bursts that make up less than half of the traffic are
unaffected; a burst that is the majority of ``shift_window`` consecutive events is
indistinguishable from a shift and is adopted. :attr:`AdoptionPolicy.n_shifts` counts the shifts
detected. The shift begins with the longest recent stretch (within ``window``) in which the
flags are the majority, so that a shift decided in one large batch is clustered on all of it
that the buffer holds; and the buffer drops the events older than ``window`` before it is
thinned. A batch in which a shift begins is cut where it does (:meth:`AdoptionPolicy.shift_cut`,
used by :class:`~streamgmm.detector.Detector`).

Examples
--------
>>> import numpy as np
>>> from streamgmm.mixture import OnlineGaussianMixture
>>> rng = np.random.default_rng(0)
>>> model = OnlineGaussianMixture(1, random_state=0).fit(rng.normal(0, 1, (2000, 2)))
>>> policy = AdoptionPolicy(AdoptionParameters(window=2000, persistence=400),
...                         false_alarm_rate=0.01, forgetting=0.002)
>>> now = 0
>>> for _ in range(10):     # from now on every event comes from a new mode at (8, 8)
...     X = rng.normal(8, 1, (40, 2))
...     now += len(X)
...     flagged = -model.score_samples(X) > 6.0
...     policy.update(model, X, np.ones(40, bool), flagged, now, threshold=6.0)
...     policy.advance(model, len(X))
>>> policy.n_shifts, policy.n_adoptions, len(model.weights_), model.min_step
(1, 1, 2, 0.05)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np

from streamgmm import _covariance as cv
from streamgmm.mixture import OnlineGaussianMixture

__all__ = ["AdoptionParameters", "AdoptionPolicy"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AdoptionParameters:
    """The adoption and shift rules' parameters (see the module notes).

    Parameters
    ----------
    buffer
        Flagged complete events kept (thinned uniformly at random when full).
    window
        Events over which flags are kept and the flag rate is measured.
    min_events
        Members a cluster needs to be adopted; ``None``: ``max(30, 2 (d + 1))``.
    rate_factor
        The flag rate must be at least this many times the target false-alarm rate.
    persistence
        Events over which a cluster's members must have arrived steadily; also the length of
        the faster forgetting after an adoption and of the waiver after a shift.
    boost
        The engine's step floor during the faster forgetting.
    shift_window, shift_fraction
        More than ``shift_fraction`` of the last ``shift_window`` events flagged (default
        ``4 * min_events``) is a shift of the whole stream. ``shift_fraction=1`` turns it off.
    """

    buffer: int = 500
    window: int = 2000
    min_events: int | None = None
    rate_factor: float = 3.0
    persistence: int = 1000
    boost: float = 0.05
    shift_window: int | None = None
    shift_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.shift_window is not None and int(self.shift_window) < 1:
            raise ValueError(f"shift_window must be >= 1, got {self.shift_window!r}")
        if not 0.0 < self.shift_fraction <= 1.0:
            raise ValueError(f"shift_fraction must be in (0, 1], got {self.shift_fraction!r}")

    def min_events_for(self, n_features: int) -> int:
        """``min_events``, or its default for ``n_features`` features."""
        if self.min_events is not None:
            return int(self.min_events)
        return max(30, 2 * (n_features + 1))

    def shift_window_for(self, n_features: int) -> int:
        """``shift_window``, or its default for ``n_features`` features."""
        if self.shift_window is not None:
            return int(self.shift_window)
        return 4 * self.min_events_for(n_features)


class AdoptionPolicy:
    """Buffers flagged events and adopts persistent new modes into a mixture (module notes).

    Parameters
    ----------
    parameters
        The rules' parameters.
    false_alarm_rate
        The detector's target rate (the flag rate is compared with it).
    forgetting
        The engine's usual step floor, restored when the faster forgetting ends.

    Attributes
    ----------
    n_adoptions : int
        Clusters adopted as components.
    n_shifts : int
        Shifts of the whole stream detected.
    """

    _SCALARS = (
        "n_adoptions", "n_shifts", "boost_remaining", "flagged_since_attempt", "rate_since",
        "shift_remaining", "shift_start",
    )

    def __init__(self, parameters: AdoptionParameters, false_alarm_rate: float, forgetting: float):
        self.parameters = parameters
        self.false_alarm_rate = float(false_alarm_rate)
        self.forgetting = float(forgetting)
        self.n_adoptions = 0
        self.n_shifts = 0
        self.boost_remaining = 0  # events left of faster forgetting
        self.flagged_X = np.empty((0, 0))  # the buffer of flagged complete events
        self.flagged_at = np.empty(0, dtype=np.int64)  # their arrival indices
        self.flag_times = np.empty(0, dtype=np.int64)  # arrival index of every recent flag
        self.flagged_since_attempt = 0
        self.rate_since = 0  # the flag rate is measured from here (reset at each adoption)
        self.shift_remaining = 0  # events left in which a detected shift waives persistence
        self.shift_start = 0  # arrival of the first flag of the current shift
        self.attempt_wait = 0  # new flags before the next attempt (0: min_events; see update)

    def update(
        self,
        model: OnlineGaussianMixture,
        X: np.ndarray,
        complete: np.ndarray,
        is_anomaly: np.ndarray,
        now: int,
        threshold: float,
    ) -> None:
        """Account for a decided batch and adopt clusters of flagged events when the rules hold.

        ``now`` counts the events seen after the batch; ``threshold`` is the current threshold
        on ``-log p(x)``.
        """
        p = self.parameters
        n, d = X.shape
        arrival = now - n + np.arange(n)
        flagged = is_anomaly & complete
        if self.flagged_X.shape[1] != d:
            self.flagged_X = np.empty((0, d))
        self.flag_times = np.concatenate([self.flag_times, arrival[is_anomaly]])
        self.flag_times = self.flag_times[self.flag_times >= now - p.window]
        self.shift_remaining = max(self.shift_remaining - n, 0)
        shift_window = p.shift_window_for(d)
        if (
            p.shift_fraction < 1.0
            and now - self.rate_since >= shift_window
            and np.count_nonzero(self.flag_times >= now - shift_window)
            > p.shift_fraction * shift_window
        ):
            if self.shift_remaining == 0:
                self.n_shifts += 1
                self.attempt_wait = 0
                self.shift_start = self._shift_began(now)
                logger.info(
                    "most of the last %d events were flagged: the stream has shifted",
                    shift_window,
                )
            self.shift_remaining = p.persistence
        self.flagged_since_attempt += int(flagged.sum())
        if flagged.any():
            self.flagged_X = np.vstack([self.flagged_X, X[flagged]])
            self.flagged_at = np.concatenate([self.flagged_at, arrival[flagged]])
        # Events older than the window leave first, then the buffer is thinned: a large batch
        # thinned first kept its share of the window's flags only (a tenth of a 5000-event
        # batch's last 2000 events).
        recent = self.flagged_at >= now - p.window
        self.flagged_X, self.flagged_at = self.flagged_X[recent], self.flagged_at[recent]
        if len(self.flagged_at) > p.buffer:
            # Thin uniformly (not oldest first) so the buffer keeps covering the window.
            rng = np.random.default_rng(now)
            keep = np.sort(rng.choice(len(self.flagged_at), p.buffer, False))
            self.flagged_X, self.flagged_at = self.flagged_X[keep], self.flagged_at[keep]
        need = p.min_events_for(d)
        window = max(min(p.window, now - self.rate_since), 1)
        rate = self.flag_times.size / window
        if (
            self.flagged_X.shape[0] < need
            or rate < p.rate_factor * self.false_alarm_rate
            or not flagged.any()
        ):
            return
        if self.flagged_since_attempt < max(need, self.attempt_wait):
            return
        self.flagged_since_attempt = 0
        dense = False
        adopted = np.zeros(len(self.flagged_X), dtype=bool)
        pool = np.ones(len(self.flagged_X), dtype=bool)
        if self.shift_remaining > 0:
            # During a shift: cluster only what was flagged since it began, and measure each
            # cluster's share of the traffic since then.
            pool = self.flagged_at >= self.shift_start
            window = max(now - self.shift_start, 1)
        for group in self._candidate_groups(model, self.flagged_X[pool], window, threshold):
            members = np.zeros(len(pool), dtype=bool)
            members[pool] = group
            if members.sum() < need:
                continue
            dense = True
            if not self._steady(self.flagged_at[members], now) and self.shift_remaining == 0:
                continue
            weight = float(min(max(members.sum() / window, 0.01), 0.5))
            index = model.spawn_component(self.flagged_X[members], weight=weight)
            adopted |= members
            self.n_adoptions += 1
            logger.info(
                "adopted %d flagged events (flag rate %.3g vs target %.3g) as component %d",
                int(members.sum()), rate, self.false_alarm_rate, index,
            )
        # An attempt in which no cluster was dense enough to be normal doubles the new flags
        # the next one waits for (up to the buffer's size); a dense cluster, an adoption or a
        # shift resets the wait. Anomalies that keep coming scattered (River's Shuttle: 7 % of
        # the events, flagged) made an attempt -- a mixture fitted to the buffer -- every
        # min_events flags, a quarter of the detector's time; a new mode is dense, and while it
        # is not yet steady its attempts still come every min_events flags.
        self.attempt_wait = 0 if dense else min(2 * max(need, self.attempt_wait), p.buffer)
        if adopted.any():
            self.flagged_X = self.flagged_X[~adopted]
            self.flagged_at = self.flagged_at[~adopted]
            self.flag_times = np.empty(0, dtype=np.int64)
            self.rate_since = now
            self.boost_remaining = p.persistence

    def advance(self, model: OnlineGaussianMixture, n: int) -> None:
        """Count ``n`` events of the faster forgetting after an adoption, and set the model's
        step floor accordingly (``boost`` meanwhile, ``forgetting`` after)."""
        if self.boost_remaining > 0:
            model.set_min_step(max(self.forgetting, self.parameters.boost))
            self.boost_remaining -= n
            if self.boost_remaining <= 0:
                model.set_min_step(self.forgetting)
                self.boost_remaining = 0

    def shift_cut(self, flagged: np.ndarray, now: int, under_way: bool = False) -> int | None:
        """Where to cut a batch whose decisions ``flagged`` show a shift beginning inside it.

        The events up to the first at which more than ``shift_fraction`` of the last
        ``2 * shift_window`` events (the flags before the batch included) are flagged are
        decided and learned first, so that the shift rule adopts the new regime before the rest
        is scored. Twice the shift rule's window, so that more than ``shift_window`` flags
        (``4 * min_events`` by default: up to 4 clusters) are clustered: cut where the rule
        first fires, the new regime was clustered on some 60 events, one cluster for all its
        modes (``max(1, 60 // 30)``), whose broad Gaussian then took in the point anomalies
        around it (recall 0.96 -> 0 after an abrupt shift in batches of 256). ``None`` when
        that does not happen inside the batch,
        when fewer than ``shift_window`` events would follow the cut, or when a shift is already
        under way -- unless ``under_way`` (the part before adopted a cluster of it: the rest of
        the new regime may follow; then only the batch's flags count). ``now`` counts the events
        seen before the batch.
        """
        p = self.parameters
        n = flagged.size
        if p.shift_fraction >= 1.0 or self.flagged_X.shape[1] == 0:
            return None
        if self.shift_remaining > 0 and not under_way:
            return None
        w = p.shift_window_for(self.flagged_X.shape[1])
        span = 2 * w
        if n < span + w:
            return None
        before = self.flag_times[self.flag_times >= now - span] - (now - span)
        if under_way:
            before = before[:0]
        seq = np.zeros(span + n)
        seq[before] = 1.0
        seq[span:] = flagged
        csum = np.concatenate([[0.0], np.cumsum(seq)])
        ends = np.arange(1, n + 1)  # the cut after the batch's first `ends` events
        flags_in_span = csum[span + ends] - csum[ends]
        fires = (flags_in_span > p.shift_fraction * span) & (now + ends - self.rate_since >= w)
        if not fires.any():
            return None
        cut = int(ends[np.argmax(fires)])
        return cut if cut <= n - w else None

    def _shift_began(self, now: int) -> int:
        """Arrival of the first flag of the longest recent stretch (up to ``window`` events)
        in which more than ``shift_fraction`` of the events were flagged.

        Not the first flag of the last ``shift_window`` events: a batch much longer than that
        window, flagged throughout, would then be clustered on its last ``shift_window`` events
        only -- in a thinned buffer too few to adopt, and the shift was flagged for good.
        """
        times = np.sort(self.flag_times)
        run = times.size - np.arange(times.size)  # flags from each one on
        majority = run > self.parameters.shift_fraction * (now - times)
        return int(times[np.argmax(majority)]) if majority.any() else now

    def _steady(self, arrivals: np.ndarray, now: int) -> bool:
        """Whether a cluster's members arrived steadily over the last ``persistence`` events:
        each quarter of that period holds at least an eighth of those that arrived in it (a
        steady mode puts a quarter in each)."""
        age = now - arrivals
        counts = np.histogram(age, bins=4, range=(0, self.parameters.persistence))[0]
        return 8 * counts.min() >= counts.sum() > 0

    def _candidate_groups(
        self, model: OnlineGaussianMixture, points: np.ndarray, window: int, threshold: float
    ) -> list[np.ndarray]:
        """Clusters of buffered points that a Gaussian of their own would make normal.

        The points are clustered by a small mixture (K <= 4, by held-out likelihood); a cluster's
        members are the points whose score under its component -- weighted by the share of the
        traffic the cluster represents -- is below the current threshold.
        """
        need = self.parameters.min_events_for(points.shape[1])
        max_k = int(max(1, min(4, len(points) // need)))
        try:
            clusters = OnlineGaussianMixture(
                n_components="auto" if max_k > 1 else 1,
                covariance_type=model.covariance_type,
                covariance_shrinkage=model.covariance_shrinkage,
                max_components=max_k,
                n_init=1,
                max_iter=50,
                random_state=0,
            ).fit(points)
        except (ValueError, np.linalg.LinAlgError) as exc:
            logger.debug("adoption clustering failed: %s", exc)
            return []
        label = clusters.predict(points)
        log_density = cv.log_gaussian_prob(
            clusters.covariance_type, points, clusters.means_, clusters.precisions_cholesky_
        )
        groups = []
        for k in range(len(clusters.weights_)):
            in_k = label == k
            if in_k.sum() < need:
                continue
            weight = min(max(in_k.sum() / window, 0.01), 0.5)
            score = -math.log(weight) - log_density[:, k]
            groups.append(in_k & (score <= threshold))
        return groups

    # -- state ----------------------------------------------------------------------------------
    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, meta)``: the buffer and the counters (the parameters are the detector's)."""
        arrays = {"X": self.flagged_X, "at": self.flagged_at, "flag_times": self.flag_times}
        meta = {name: int(getattr(self, name)) for name in self._SCALARS}
        meta["attempt_wait"] = int(self.attempt_wait)
        return arrays, meta

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore what :meth:`get_state` returned (every field required but ``attempt_wait``,
        which states written before it lack)."""
        self.flagged_X = np.asarray(arrays["X"], dtype=np.float64)
        self.flagged_at = np.asarray(arrays["at"], dtype=np.int64)
        self.flag_times = np.asarray(arrays["flag_times"], dtype=np.int64)
        for name in self._SCALARS:
            setattr(self, name, int(meta[name]))
        self.attempt_wait = int(meta.get("attempt_wait", 0))  # states before it: no wait
