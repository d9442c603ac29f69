"""One batch from raw values to decisions: the path the daemon and ``streamgmm replay`` share.

:class:`BatchPipeline` decodes and validates a batch of raw values
(:class:`streamgmm.features.FeatureExtractor`), lets the detector score every good event *before*
it learns from it and decide (prequential), and returns a :class:`BatchOutcome`: the extraction,
the detector's result, which events are anomalies and which records are dead letters. No I/O:
the daemon turns the outcome into Kafka records (:mod:`streamgmm.service`), a replay into JSON
lines (:mod:`streamgmm.replay`), both in the schema of :mod:`streamgmm.messages`.

Examples
--------
>>> import numpy as np, orjson
>>> from streamgmm.config import Config, FeaturesConfig, ModelConfig, ThresholdConfig
>>> config = Config(features=FeaturesConfig(fields=["x"]),
...                 model=ModelConfig(n_components=1, random_state=0),
...                 threshold=ThresholdConfig(warmup_events=100))
>>> pipeline = BatchPipeline.from_config(config)
>>> rng = np.random.default_rng(0)
>>> _ = pipeline.process([orjson.dumps({"x": float(v)}) for v in rng.normal(size=500)])
>>> outcome = pipeline.process([b'{"x": 0.1}', b'{"x": 1e6}', b"not json"])
>>> [index for index, _ in outcome.anomalies], [d.reason for d in outcome.dead_letters]
([1], ['invalid_json'])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamgmm.features import DeadLetter, Extraction, FeatureExtractor

__all__ = ["BatchPipeline", "BatchOutcome"]


@dataclass(frozen=True)
class BatchOutcome:
    """What one batch gave.

    Attributes
    ----------
    extraction : streamgmm.features.Extraction
        The decoded events and the dead letters.
    result : detector batch result or None
        The detector's decisions for the good events; ``None`` when none could be scored.
    anomaly_rows : ndarray of int
        The rows of ``result`` (and of ``extraction.events``) that are anomalies.
    model_events : int
        Events the model had learned after the batch.
    """

    extraction: Extraction
    result: Any
    anomaly_rows: np.ndarray
    model_events: int

    @property
    def anomalies(self) -> Iterator[tuple[int, int]]:
        """``(index in the batch, row of the result)`` of each anomaly, in batch order."""
        indices = self.extraction.indices
        return ((int(indices[row]), int(row)) for row in self.anomaly_rows)

    @property
    def dead_letters(self) -> list[DeadLetter]:
        """The records that cannot be scored, in batch order (``.index`` in the batch)."""
        return self.extraction.dead_letters

    @property
    def n_anomalies(self) -> int:
        return len(self.anomaly_rows)

    @property
    def n_scored(self) -> int:
        return len(self.extraction.indices)


class BatchPipeline:
    """Raw values in, a :class:`BatchOutcome` out; the detector learns from every good event.

    Parameters
    ----------
    extractor : streamgmm.features.FeatureExtractor
    detector : streamgmm.detector.Detector
    """

    def __init__(self, extractor: FeatureExtractor, detector: Any) -> None:
        self.extractor = extractor
        self.detector = detector

    @classmethod
    def from_config(cls, config: Any, detector: Any = None) -> BatchPipeline:
        """The pipeline of a :class:`streamgmm.config.Config`: its ``[features]`` and, without
        ``detector``, a fresh detector from ``config.detector_kwargs()``."""
        if detector is None:
            from streamgmm.detector import Detector

            detector = Detector(**config.detector_kwargs())
        features = config.features
        extractor = FeatureExtractor(features.fields, missing=features.missing,
                                     max_event_bytes=features.max_event_bytes)
        return cls(extractor, detector)

    def process(self, values: Sequence[bytes | str | None], reference: Any = None) -> BatchOutcome:
        """Decode, score, decide and learn one batch of raw values (``reference``: a mixture that
        scores instead of the detector's own model, see :meth:`Detector.process
        <streamgmm.detector.Detector.process>`)."""
        extraction = self.extractor.extract(values)
        result = None
        rows = np.empty(0, dtype=np.intp)
        if len(extraction.indices):
            result = self.detector.process(extraction.features, reference=reference)
            rows = np.flatnonzero(result.is_anomaly)
        return BatchOutcome(extraction, result, rows, int(self.detector.n_events_learned))
