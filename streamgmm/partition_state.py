"""The state of one input partition: its detector and how far it has learned, as one record.

The daemon keeps a :class:`PartitionState` per input partition it owns and writes it to the
compacted state topic (key ``"topic:partition"``), so that whichever replica is assigned the
partition next restores it (:mod:`streamgmm.service`). A record holds:

* the partition's :class:`~streamgmm.detector.Detector` (mixture, thresholds, drift reference,
  adoption buffer);
* ``learned``: the next offset to learn; every event before it is in the detector;
* ``events_learned``: how many of this partition's valid events the state has learned;
* ``output_positions``: where a read-back for already published outputs of the events from
  ``learned`` on starts: the end offsets of the output topics when it was written, or where
  such outputs were found before them (a dead producer's, see :mod:`streamgmm.service`);
* who wrote it (``replica``) and when (``written_at``), and what it was made for (the input
  topic and the feature fields), so that a state of another configuration is refused.

The record is a :mod:`streamgmm.statefile` state (pickle-free, with a SHA-256 digest),
compressed with zlib: a few hundred kilobytes at the default false-alarm rate, most of it the
thresholds' windows of recent scores.

Examples
--------
>>> import numpy as np
>>> from streamgmm.detector import Detector
>>> from streamgmm.io.base import TopicPartition
>>> det = Detector(n_components=1, warmup_events=100, random_state=0)
>>> _ = det.process(np.random.default_rng(0).normal(size=(300, 2)))
>>> state = PartitionState(TopicPartition("events", 3), det, learned=300, events_learned=300)
>>> data = encode_state(state, fields=["a", "b"])
>>> back = decode_state(data, key=b"events:3", fields=["a", "b"])
>>> back.learned, back.events_learned, back.detector.n_events_learned
(300, 300, 300)
"""

from __future__ import annotations

import copy
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamgmm.io.base import TopicPartition
from streamgmm.statefile import CheckpointError, dumps_state, loads_state

__all__ = ["PartitionState", "encode_state", "decode_state", "state_key", "STATE_KIND",
           "STATE_VERSION"]

STATE_KIND = "streamgmm-partition"
STATE_VERSION = 1

#: A decoded record may not be larger than this (a zlib bomb is that message's problem).
MAX_STATE_BYTES = 64 * 1024 * 1024


@dataclass
class PartitionState:
    """One input partition's detector and bookkeeping (see the module docstring).

    Attributes
    ----------
    partition : TopicPartition
    detector : streamgmm.detector.Detector
    learned : int
        The next offset to learn: every event before it has been learned.
    events_learned : int
        This partition's valid events the state has learned (a state started from another
        partition's counts only its own).
    output_positions : dict of TopicPartition to int
        Where a read-back of the outputs of the events from ``learned`` on starts, per output
        and dead-letter partition: their end offsets when the state was written, or earlier.
    replica : str
        The replica that wrote it.
    written_at : float
        Wall-clock time of the write (0 for a state never written).
    """

    partition: TopicPartition
    detector: Any
    learned: int
    events_learned: int = 0
    output_positions: dict[TopicPartition, int] = field(default_factory=dict)
    replica: str = ""
    written_at: float = 0.0

    def started_from(self, other: PartitionState) -> PartitionState:
        """A state for this partition that starts from a copy of ``other``'s detector (a new
        partition that starts from what the fleet has learned, never cold)."""
        return PartitionState(self.partition, copy.deepcopy(other.detector), self.learned, 0,
                              dict(self.output_positions), self.replica)


def state_key(tp: TopicPartition) -> bytes:
    """The state topic's key of partition ``tp``: ``b"topic:partition"``."""
    return tp.key().encode()


def encode_state(state: PartitionState, fields: Sequence[str]) -> bytes:
    """The record value of ``state`` (zlib-compressed :func:`~streamgmm.statefile.dumps_state`)."""
    arrays, meta = state.detector.get_state()
    body = dumps_state(STATE_KIND, STATE_VERSION, {f"detector/{k}": v for k, v in arrays.items()}, {
        "detector": meta,
        "partition": state.partition.key(),
        "learned": int(state.learned),
        "events_learned": int(state.events_learned),
        "output_positions": {tp.key(): int(o) for tp, o in state.output_positions.items()},
        "fields": list(fields),
        "replica": state.replica,
        "written_at": state.written_at or time.time(),
    })
    return zlib.compress(body, 1)


def decode_state(data: bytes | None, key: bytes | None, fields: Sequence[str]) -> PartitionState:
    """The :class:`PartitionState` of a state record, checked.

    Raises
    ------
    CheckpointError
        If the record is not a readable state, names another partition than its key, was made
        for other feature fields, or holds a detector that cannot score.
    """
    where = f"state record {key!r}"
    if not data:
        raise CheckpointError(f"{where}: empty (a deleted state)")
    try:
        inflater = zlib.decompressobj()
        body = inflater.decompress(data, MAX_STATE_BYTES)
        if inflater.unconsumed_tail:
            raise CheckpointError(f"{where}: more than {MAX_STATE_BYTES} bytes uncompressed")
    except zlib.error as exc:
        raise CheckpointError(f"{where}: not a compressed state ({exc})") from exc
    try:
        arrays, meta = loads_state(body, STATE_KIND, STATE_VERSION, source=where)
    except CheckpointError as exc:  # its advice is for files; a record is skipped instead
        raise CheckpointError(str(exc).split("; ")[0]) from exc
    name = meta.get("partition")
    if not isinstance(name, str) or key is None or name.encode() != key:
        raise CheckpointError(f"{where}: holds the state of {name!r}, not of its key")
    if meta.get("fields") != list(fields):
        raise CheckpointError(
            f"{where}: made for features {meta.get('fields')} but the configuration has "
            f"{list(fields)}; replicas of one group must share their features (use another "
            "group_id, or delete the state topic, to start fresh)")
    learned, events = meta.get("learned"), meta.get("events_learned")
    for what, value in (("learned", learned), ("events_learned", events)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{where}: {what} is {value!r}, not a count")
    positions = meta.get("output_positions")
    if not isinstance(positions, Mapping):
        raise CheckpointError(f"{where}: output_positions is not a table")
    try:
        output_positions = {TopicPartition.from_key(k): int(v) for k, v in positions.items()}
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: output_positions is malformed ({exc})") from exc
    detector = _detector_of(where, arrays, meta, len(fields))
    written_at = meta.get("written_at")
    return PartitionState(TopicPartition.from_key(name), detector, learned, events,
                          output_positions, str(meta.get("replica", "")),
                          float(written_at) if isinstance(written_at, int | float) else 0.0)


def _detector_of(where: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                 n_features: int):
    """The detector of a state, checked: finite model arrays that it can score with."""
    from streamgmm.detector import Detector

    det_arrays = {k[len("detector/"):]: v for k, v in arrays.items()
                  if k.startswith("detector/")}
    for name, array in det_arrays.items():
        # The model and the drift reference are numbers; NaN there poisons every score. (The
        # threshold's window holds NaN where it has no score yet.)
        if name.startswith(("model/", "drift/")) and array.dtype.kind == "f" \
                and not np.isfinite(array).all():
            raise CheckpointError(f"{where}: the array detector/{name} holds NaN or infinity")
    if not isinstance(meta.get("detector"), Mapping):
        raise CheckpointError(f"{where}: holds no detector state")
    try:
        detector = Detector.from_state(det_arrays, meta["detector"])
        detector.score_samples(np.zeros((1, n_features)))
    except Exception as exc:  # whatever a malformed state breaks in the detector's code
        raise CheckpointError(f"{where}: the detector state is inconsistent "
                              f"({type(exc).__name__}: {exc})") from exc
    return detector
