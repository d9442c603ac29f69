"""What the whole fleet has learned: the latest state of every input partition, and one model.

Every replica reads the compacted state topic all the time (:class:`streamgmm.io.base.StateReader`)
and hands the records to a :class:`FleetView`. It keeps, per input partition, the last few state
records (raw: decoded only when needed) and the mixture of the newest one, and answers:

* :meth:`FleetView.candidates`: the states a replica that is assigned a partition may restore,
  newest first (the daemon takes the newest one consistent with the group's committed offset);
* :meth:`FleetView.most_experienced`: the state a partition without any starts from (never cold);
* :meth:`FleetView.reference`: **one model that has seen the whole stream**. Mixtures merge
  exactly as a mixture of mixtures: each partition's model weighs in proportion to the events it
  remembers, so the union of their components, weights scaled, is the density of the whole
  stream as the fleet knows it. The replica's own partitions enter with their live models; the
  others with their last written state, which is at most ``[checkpoint] interval_seconds`` old
  plus the time the record takes to arrive (:attr:`FleetView.age` measures it).

Examples
--------
>>> import numpy as np
>>> from streamgmm.mixture import OnlineGaussianMixture
>>> a = OnlineGaussianMixture.from_parameters([1.0], [[0.0]], [[[1.0]]])
>>> b = OnlineGaussianMixture.from_parameters([1.0], [[10.0]], [[[1.0]]])
>>> merged = merge_models([(a, 1.0), (b, 3.0)])
>>> merged.weights_.round(2).tolist(), merged.means_.ravel().tolist()
([0.25, 0.75], [0.0, 10.0])
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from streamgmm import _covariance as cv
from streamgmm.io.base import TopicPartition
from streamgmm.mixture import OnlineGaussianMixture
from streamgmm.partition_state import PartitionState, decode_state
from streamgmm.statefile import CheckpointError

__all__ = ["FleetView", "merge_models"]

logger = logging.getLogger(__name__)


def remembered_events(model: OnlineGaussianMixture) -> float:
    """How many events a model's estimate rests on: those learned, at most about the inverse
    of its smallest step (a forgetting model remembers no more)."""
    n = float(model.n_events_learned_)
    return min(n, 1.0 / model.min_step) if model.min_step > 0 else n


def merge_models(models: Sequence[tuple[OnlineGaussianMixture, float]]) -> OnlineGaussianMixture:
    """The mixture of mixtures: every component of every model, its weight times the model's
    share of ``sum(weight)``; scores the union of the streams the models learned.

    Parameters
    ----------
    models : sequence of (OnlineGaussianMixture, float)
        Fitted models with the same features, and what each weighs (e.g. events remembered).
    """
    total = sum(w for _, w in models)
    weights, means, covariances = [], [], []
    for model, w in models:
        k, d = model.means_.shape
        weights.append(model.weights_ * (w / total))
        means.append(model.means_)
        covariances.append(cv.full_covariances(model.covariance_type, model.covariances_, k, d))
    return OnlineGaussianMixture.from_parameters(
        np.concatenate(weights), np.concatenate(means), np.concatenate(covariances), "full")


class FleetView:
    """The state topic as a replica knows it (see the module docstring).

    Parameters
    ----------
    fields : sequence of str
        The feature fields; a state made for others is refused (and logged).
    history : int
        State records kept per partition (the newest may be one whose transaction did not
        commit, on a broker that shows aborted records).
    """

    def __init__(self, fields: Sequence[str], history: int = 3) -> None:
        self.fields = list(fields)
        self._records: dict[TopicPartition, deque[bytes]] = {}
        self._models: dict[TopicPartition, tuple[OnlineGaussianMixture, float, float]] = {}
        self._history = history
        self._reference: OnlineGaussianMixture | None = None
        self._reference_key: tuple | None = None
        #: State records that could not be read (each logged once).
        self.rejected = 0
        #: The newest state record of another configuration (its error), if any.
        self.foreign: CheckpointError | None = None

    def ingest(self, records: Iterable[Any]) -> int:
        """Take records of the state topic (``key``, ``value``); returns how many were read."""
        n = 0
        for record in records:
            try:
                tp = TopicPartition.from_key(record.key.decode())
            except (AttributeError, UnicodeDecodeError, ValueError):
                self._reject(f"state record with key {record.key!r}: not \"topic:partition\"")
                continue
            if not record.value:  # a tombstone: the partition's state was deleted
                self._records.pop(tp, None)
                self._models.pop(tp, None)
                continue
            try:
                state = decode_state(record.value, record.key, self.fields)
            except CheckpointError as exc:
                if "made for features" in str(exc):
                    self.foreign = exc
                self._reject(str(exc))
                continue
            self._records.setdefault(tp, deque(maxlen=self._history)).append(record.value)
            model = state.detector.model
            if model.is_fitted:
                self._models[tp] = (model, remembered_events(model), state.written_at)
            n += 1
        return n

    def _reject(self, why: str) -> None:
        self.rejected += 1
        logger.warning("ignoring a state record: %s", why)

    def size(self, tp: TopicPartition) -> int:
        """Bytes of the newest state record of ``tp`` (0 without one)."""
        records = self._records.get(tp)
        return len(records[-1]) if records else 0

    def partitions(self) -> set[TopicPartition]:
        """The partitions with a state."""
        return set(self._records)

    def candidates(self, tp: TopicPartition) -> list[PartitionState]:
        """The states of ``tp`` this view holds, newest first."""
        out = []
        for value in reversed(self._records.get(tp, ())):
            try:
                out.append(decode_state(value, tp.key().encode(), self.fields))
            except CheckpointError:  # checked when ingested; cannot happen
                continue
        return out

    def most_experienced(self, exclude: Iterable[TopicPartition] = ()) -> PartitionState | None:
        """The newest state of the partition whose model remembers the most events."""
        skip = set(exclude)
        ranked = sorted(((n, tp) for tp, (_, n, _) in self._models.items() if tp not in skip),
                        reverse=True)
        for _, tp in ranked:
            states = self.candidates(tp)
            if states:
                return states[0]
        return None

    def _parts(self, live: Mapping[TopicPartition, Any]
               ) -> dict[TopicPartition, tuple[OnlineGaussianMixture, float]]:
        """The fitted model of every partition and what it weighs (``live`` ones count instead
        of their written states)."""
        parts = {tp: (m, n) for tp, (m, n, _) in self._models.items()}
        for tp, detector in live.items():
            model = detector.model
            if model.is_fitted:
                parts[tp] = (model, remembered_events(model))
            else:
                parts.pop(tp, None)
        return parts

    def merged_partitions(self, live: Mapping[TopicPartition, Any]) -> set[TopicPartition]:
        """The partitions whose models :meth:`reference` merges."""
        return set(self._parts(live))

    def reference(self, live: Mapping[TopicPartition, Any]) -> OnlineGaussianMixture | None:
        """The merged model of every partition (``live``: this replica's detectors, by partition,
        which count instead of their written states); ``None`` while it would be one model."""
        parts = self._parts(live)
        if len(parts) < 2:
            return None
        key = tuple(sorted((tp, id(m), m.n_events_learned_) for tp, (m, _) in parts.items()))
        if key != self._reference_key:
            self._reference = merge_models([parts[tp] for tp in sorted(parts)])
            self._reference_key = key
        return self._reference

    def age(self, now: float | None = None, exclude: Iterable[TopicPartition] = ()) -> float | None:
        """Seconds since the oldest written state in the merged view was written (``exclude``:
        the partitions that count with their live models); ``None`` without any."""
        skip = set(exclude)
        times = [t for tp, (_, _, t) in self._models.items() if tp not in skip and t > 0]
        if not times:
            return None
        return max(0.0, (time.time() if now is None else now) - min(times))
