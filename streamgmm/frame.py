"""The input's frame, followed through range rescalings of a scaler in front of the detector.

A River pipeline such as ``preprocessing.MinMaxScaler() | GMMDetector()`` hands the detector
each feature as ``(x - min) / (max - min)`` with the minimum and maximum *seen so far*. Whenever
an event extends a feature's range, every later event arrives in a new frame: the same raw value
maps to a different number, and a model learned in the old frame misjudges all of them (on
River's Shuttle protocol: ROC-AUC 0.82 on the first 10,000 events behind ``MinMaxScaler``,
against 0.98 with no scaler).

The rescaling is visible in River's prequential protocol: ``score_one(x)`` sees the event in the
old frame and ``learn_one(x)``, right after, in the new one (the pipeline's scaler learns the
event first). An event that extends the range scores beyond the range of the values learned so
far, and is learned exactly at its end; the other end is fixed. Those two correspondences give
the affine map from the old frame to the new, feature by feature. :class:`InputFrame` composes
these maps into one per-feature map to a *stable* internal frame, ``z = scale * x + offset``,
in which the detector learns and scores: its model, thresholds and buffers never see the
rescaling. Nothing else triggers it: every other feature of the pair must agree exactly.

A running standardisation (``preprocessing.StandardScaler``) moves every feature with every
event, by an affine map that the pair also gives: the learned value of a feature scored ``t``
is ``t sqrt((n - 1) / (n + t**2))``, ``n`` the scaler's count, which each feature tells and all
must agree on (:meth:`InputFrame._standardisation`). Followed, the early events -- standardised
by the mean and deviation of a handful of events before them -- are where the later ones put
them (on River's Shuttle behind ``StandardScaler``, the first 60 events made a "mode" of their
own that the warm-up gave a component, and ROC-AUC over all events was 0.81-0.99 by seed).
An unrelated pair of events leaves the frame alone. Events a scaler learns without the
detector seeing them scored (``learn_one`` without ``score_one``) move its frame unseen, and
so do those of ``GMMDetector``'s first micro-batch, learned before its feature set is fixed:
following those too (from the scaler's second event) cost the development half's
``StandardScaler`` path 0.09 of PR-AUC on a subset of its streams (wine, drifting streams).

Examples
--------
>>> import numpy as np
>>> frame = InputFrame(1)
>>> for raw in [2.0, 4.0, 3.0]:            # a min-max scaler has seen 2 and 4
...     frame.learned(frame.internal(np.array([(raw - 2.0) / 2.0])))
>>> scored = np.array([(6.0 - 2.0) / 2.0])  # 6 extends the range: scored in the old frame...
>>> learned = np.array([1.0])               # ...and learned at the end of the new one
>>> frame.observe(scored, learned)
True
>>> frame.internal(np.array([0.5])).tolist()  # 4 in the new frame: where 4 was learned
[1.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Relative tolerance for "the same value" and "at the end of the range".
_TOLERANCE = 1e-9
# A standardised value this close to 0 is a value at the scaler's mean, up to round-off.
_AT_MEAN = 1e-12


class InputFrame:
    """Per-feature affine map from the frame events arrive in to a stable internal frame.

    Parameters
    ----------
    n_features
        Number of features.

    Attributes
    ----------
    scale, offset : ndarray of shape (n_features,)
        ``internal = scale * x + offset`` (identity until a rescaling was seen).
    n_rescalings : int
        Range extensions followed so far (features counted separately).
    """

    def __init__(self, n_features: int):
        self.scale = np.ones(n_features)
        self.offset = np.zeros(n_features)
        self.low = np.full(n_features, np.inf)  # range of the learned values, internal frame
        self.high = np.full(n_features, -np.inf)
        self.n_rescalings = 0
        self._identity = True
        # features a standardisation has been seen to vary (constant ones it sends to 0)
        self._varied = np.zeros(n_features, dtype=bool)
        # read a first variation learned at +1 as a standardisation's (see follow)
        self._standard_reading = False

    @property
    def is_identity(self) -> bool:
        """Whether no rescaling has been seen (the internal frame is the input's)."""
        return self._identity

    def internal(self, row: np.ndarray) -> np.ndarray:
        """The row (or rows) in the internal frame."""
        return row if self._identity else row * self.scale + self.offset

    def learned(self, internal_rows: np.ndarray) -> None:
        """Widen the range of learned values by rows (or a row) given in the internal frame."""
        if internal_rows.ndim == 2:  # fmin/fmax skip NaN (a missing value)
            if not len(internal_rows):
                return
            internal_rows = np.fmin.reduce(internal_rows, axis=0), np.fmax.reduce(
                internal_rows, axis=0)
        else:
            internal_rows = internal_rows, internal_rows
        np.fmin(self.low, internal_rows[0], out=self.low)
        np.fmax(self.high, internal_rows[1], out=self.high)

    def observe(self, scored: np.ndarray, learned: np.ndarray,
                pending: Sequence[np.ndarray] = ()) -> bool:
        """Follow a rescaling between an event as scored and the same event as learned.

        Both rows are in the input's frame; ``pending`` are rows learned but not yet passed to
        :meth:`learned` (internal frame). Returns whether the frame moved: either some features
        were scored beyond the learned range and learned exactly at its end, every other
        feature unchanged (a range extension: each such feature's map is composed with the
        affine map that fixes the range's other end and sends the scored value to the learned
        one), or the pair is one step of a running standardisation (see
        :meth:`_standardisation`).
        """
        s, v = np.asarray(scored, dtype=float), np.asarray(learned, dtype=float)
        if s.shape != self.scale.shape or s.shape != v.shape:
            return False
        with np.errstate(invalid="ignore"):
            changed = ~((s == v) | (np.isnan(s) & np.isnan(v)))  # a missing value stays missing
            if not changed.any():
                return False
            # Cheap necessary condition first (a scaler that moves every event, StandardScaler,
            # fails it): a changed feature is learned at or beyond the known range's end.
            internal = v * self.scale + self.offset
            tol = _TOLERANCE * (1.0 + np.abs(self.low) + np.abs(self.high))
            if not ((internal >= self.high - tol) | (internal <= self.low + tol)
                    | ~changed).all():
                return self._standardisation(s, v)
        if len(pending):
            self.learned(np.vstack(pending))
        moves = []
        for j in np.flatnonzero(changed).tolist():  # few: those whose range the event extended
            scale, offset = self.scale[j], self.offset[j]
            low = (self.low[j] - offset) / scale  # the learned range, in the input frame
            high = (self.high[j] - offset) / scale
            sj, vj = s[j], v[j]
            if not (math.isfinite(low) and math.isfinite(high) and high >= low):
                return self._standardisation(s, v)
            tol = _TOLERANCE * max(1.0, abs(low), abs(high))
            if high == low:
                # constant so far, so scored at the constant's 0 (a range of width 0): the
                # first value above it is learned at 1 and gives the unit; the constant stays
                if abs(sj - low) <= tol and vj == 1.0 and not self._standard_reading:
                    continue
                return self._standardisation(s, v)
            if sj > high + tol and abs(vj - high) <= tol:
                fixed = low  # the range's other end stays where it is
            elif sj < low - tol and abs(vj - low) <= tol:
                fixed = high
            else:
                return self._standardisation(s, v)  # not a range extension
            a = (vj - fixed) / (sj - fixed)  # new = a * old + b
            if not 0.0 < a < 1.0:
                return False
            moves.append((j, a, fixed * (1.0 - a)))
        for j, a, b in moves:
            self._compose(j, a, b)
        self.n_rescalings += len(moves)
        self._identity = False
        return True

    def follow(self, scored: Sequence[np.ndarray | None], learned: Sequence[np.ndarray]
               ) -> np.ndarray:
        """Follow a fresh frame through the first events; their learned rows, in the frame
        the last of them arrived in, which becomes the internal one.

        ``scored[i]`` is event ``i`` as it was scored (``None``: not scored, or the same
        numbers). A detector fixes its features only after a first micro-batch: learned as
        they came, those events sat in as many frames as a running standardisation had steps
        (each of a handful of events) -- on digits behind ``StandardScaler``, 16 such rows
        among the warm-up's 128 took ROC-AUC from 0.70 to 0.52. Anchored at the last event,
        the internal frame is the one a detector that starts following there would have.

        The scaler's second event sends each feature that changed to 1 (a min-max range) or
        to +-1 (a standardisation); both readings are tried. If neither follows every event
        that changed, the rows are kept as they came (a min-max scaler whose feature first
        moved down, to the new minimum, learns it at 0 as if nothing happened: unseen).
        """
        for standard_reading in (False, True):
            trial = InputFrame(len(self.scale))
            trial._standard_reading = standard_reading
            rows = trial._follow_all(scored, learned)
            if rows is not None:
                trial._standard_reading = False
                self.__dict__.update(trial.__dict__)
                if self._identity:
                    return rows
                rows = (rows - self.offset) / self.scale  # internal frame := the last event's
                self.scale, self.offset = np.ones_like(self.scale), np.zeros_like(self.offset)
                self.low = np.full_like(self.low, np.inf)
                self.high = -self.low
                self.learned(rows)
                self._identity = True
                return rows
        rows = np.array(learned, dtype=float).reshape(len(learned), len(self.scale))
        self.learned(rows)
        return rows

    def _follow_all(self, scored, learned) -> np.ndarray | None:
        """The learned rows in this frame, followed through every pair; None if one that
        changed could not be followed (a scaler without a range yet scores NaN: no step)."""
        rows = np.empty((len(learned), len(self.scale)))
        for i, (s, v) in enumerate(zip(scored, learned, strict=True)):
            if s is not None and not self.observe(s, v):
                with np.errstate(invalid="ignore"):
                    changed = ~((s == v) | np.isnan(s))
                if changed.any():
                    return None
            rows[i] = self.internal(v)
            self.learned(rows[i])
        return rows

    def _compose(self, j, a, b) -> None:
        """Compose the map of feature ``j`` (an index, or a mask with ``a`` and ``b`` arrays
        of its features) with the input's step ``new = a * old + b``."""
        # internal = scale * old + offset = scale * (new - b) / a + offset
        self.offset[j] -= self.scale[j] * b / a
        self.scale[j] /= a

    def _standardisation(self, s: np.ndarray, v: np.ndarray) -> bool:
        """Follow one step of a running standardisation (River's ``StandardScaler``), if it is one.

        Such a scaler sends ``x`` to ``(x - m) / sd`` with the mean and the (population)
        standard deviation of the ``n - 1`` values before and, once it has learned ``x``, of
        the ``n`` values with it. With ``t`` the scored value, the learned one is
        ``t sqrt((n - 1) / (n + t**2))``: every feature with ``t != 0`` tells ``n``, which must
        be the same integer for all of them (anything else -- unrelated events, another scaler
        -- leaves the frame alone). The step of the frame is then
        ``new = a * old - a t / n`` with ``a = (n / (n - 1) / (1 + t**2 / n)) ** 0.5``, for
        every feature. A feature constant so far (sent to 0, standard deviation 0) has no
        unit: its internal value stays where the constant was learned, with the unit the
        scaler gives it when it first varies.
        """
        observed = ~(np.isnan(s) | np.isnan(v))
        # a value at the mean comes as round-off (1e-16) rather than 0: it moves no unit
        at_mean = observed & (np.abs(s) <= _AT_MEAN) & (np.abs(v) <= _AT_MEAN)
        moved = observed & ~at_mean & (s != 0.0)
        varied = self._varied | moved  # (a feature sent to a value other than 0 varies)
        constant = observed & ~varied
        starts = constant & (v != 0.0)  # was constant (sent to 0), varies from this event on
        if moved.any():
            t, u = s[moved], v[moved]
            if not ((t * u > 0.0) & (np.abs(u) < np.abs(t))).all():
                return False
            r = (u / t) ** 2
            n_j = (1.0 + r * t * t) / (1.0 - r)
        elif starts.any() and (self._standard_reading or (v[starts] < 0.0).any()):
            # the scaler's second event, say: every feature that differs is sent to -1 or +1,
            # with the count ``v**2 + 1``. (All at +1 could be a min-max scaler's first range.)
            n_j = v[starts] ** 2 + 1.0
        else:
            return False
        n = float(np.round(n_j.mean()))
        if n < 2.0 or np.abs(n_j - n).max() > 1e-6 * n:
            return False
        root = math.sqrt(n - 1.0)  # where such a feature's value is sent: +-sqrt(n - 1)
        if (np.abs(np.abs(v[starts]) - root) > 1e-6 * root).any():
            return False
        steady = observed & varied
        if (v[steady & ~moved & ~at_mean] != 0.0).any():
            return False  # a value at the mean stays at 0
        a = np.sqrt(n / (n - 1.0) / (1.0 + s[steady] * s[steady] / n))
        self._compose(steady, a, -a * s[steady] / n)  # every steady feature at once
        if starts.any():
            # the constant, learned at offset so far, is sent to -sign(v) / sqrt(n - 1) now
            self.offset[starts] += self.scale[starts] * np.copysign(1.0, v[starts]) / root
        self._varied = varied | starts
        self.n_rescalings += int(steady.sum())
        self._identity = False
        return True
