"""Replay: the daemon's detector over a file instead of a Kafka topic.

:func:`replay` reads a JSONL (or CSV) file in micro-batches of ``batch.max_records`` events and
runs each through the daemon's own batch path (:class:`streamgmm.pipeline.BatchPipeline`:
features extracted, every event scored before the detector learns from it). Every anomaly
becomes one JSON line of the output file, in the schema of the daemon's output topic
(:mod:`streamgmm.messages`) with ``source = {file, line}``; every record that cannot be scored
goes, with its reason, to ``<output>.dead-letters.jsonl`` (``out.jsonl`` gives
``out.dead-letters.jsonl``). Nothing is dropped silently: the summary accounts for every line.

Use it to try a configuration on recorded data, to backfill, or to warm a detector up before it
goes live (the summary carries the trained detector, ``summary.detector.save(path)``).

Examples
--------
>>> import os, tempfile, json
>>> import numpy as np
>>> from streamgmm.config import Config, FeaturesConfig, ThresholdConfig, ModelConfig
>>> folder = tempfile.mkdtemp()
>>> rng = np.random.default_rng(0)
>>> with open(os.path.join(folder, "in.jsonl"), "w") as f:
...     for i in range(3000):
...         x = 500.0 if i == 2500 else float(rng.normal(10, 1))
...         _ = f.write(json.dumps({"id": i, "x": x, "y": float(rng.normal())}) + "\\n")
...     _ = f.write('{"id": "bad", "x": "oops", "y": 1}\\n')
>>> config = Config(features=FeaturesConfig(fields=["x", "y"]),
...                 model=ModelConfig(n_components=1, random_state=0),
...                 threshold=ThresholdConfig(false_alarm_rate=1e-4, warmup_events=500))
>>> summary = replay(config, os.path.join(folder, "in.jsonl"),
...                  os.path.join(folder, "out.jsonl"), progress=False)
>>> summary.records, summary.events_scored, summary.dead_letters
(3001, 3000, 1)
>>> anomalies = [json.loads(line) for line in open(summary.output_path)]
>>> any(a["event"]["id"] == 2500 for a in anomalies)
True
>>> json.loads(open(summary.dead_letter_path).readline())["reason"]
'non_numeric'
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamgmm.config import Config
from streamgmm.io.files import JsonlSink, open_source
from streamgmm.messages import anomaly_record, dead_letter_record
from streamgmm.pipeline import BatchPipeline

__all__ = ["replay", "ReplaySummary", "dead_letter_path_for", "main"]

logger = logging.getLogger(__name__)


def dead_letter_path_for(output_path: str | os.PathLike) -> Path:
    """Where the dead letters of a replay to ``output_path`` go.

    Examples
    --------
    >>> dead_letter_path_for("runs/out.jsonl").as_posix()
    'runs/out.dead-letters.jsonl'
    >>> dead_letter_path_for("anomalies").as_posix()
    'anomalies.dead-letters.jsonl'
    """
    output_path = Path(output_path)
    stem = output_path.name
    for suffix in (".jsonl", ".ndjson", ".json"):
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    return output_path.with_name(stem + ".dead-letters.jsonl")


@dataclass
class ReplaySummary:
    """What a replay did; every input line is accounted for.

    ``records == events_scored + dead_letters``; blank lines are not records.
    """

    input_path: Path
    output_path: Path
    dead_letter_path: Path
    records: int = 0
    events_scored: int = 0
    anomalies: int = 0
    dead_letters: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    blank_lines: int = 0
    warming_up_events: int = 0
    drifts: int = 0
    events_learned: int = 0
    elapsed_seconds: float = 0.0
    detector: Any = field(default=None, repr=False)

    @property
    def events_per_second(self) -> float:
        """Records processed per second of wall-clock time."""
        return self.records / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def __str__(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.dead_letter_reasons.items()))
        rate = self.anomalies / self.events_scored if self.events_scored else 0.0
        lines = [
            f"replayed {self.input_path}: {self.records} records in {self.elapsed_seconds:.2f} s "
            f"({self.events_per_second:,.0f} records/s)",
            f"  scored {self.events_scored} (warming up: {self.warming_up_events}), "
            f"anomalies {self.anomalies} ({rate:.3%}) -> {self.output_path}",
            f"  dead letters {self.dead_letters}" + (f" ({reasons})" if reasons else "")
            + f" -> {self.dead_letter_path}",
            f"  drifts detected {self.drifts}; the model learned {self.events_learned} events"
            + (f"; {self.blank_lines} blank lines skipped" if self.blank_lines else ""),
        ]
        return "\n".join(lines)


def _progress_bar(enabled: bool, total: int, name: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                dynamic_ncols=True, file=sys.stderr)


def replay(config: Config, input_path: str | os.PathLike, output_path: str | os.PathLike,
           progress: bool = True, *, detector: Any = None, input_format: str | None = None,
           clock: Callable[[], float] = time.time) -> ReplaySummary:
    """Run the detector over a file of events; write anomalies and dead letters as JSONL.

    Parameters
    ----------
    config : Config
        ``features``, ``model``, ``threshold`` and ``batch.max_records`` are used; Kafka,
        metrics and checkpoint settings are not.
    input_path : path-like
        JSONL (or CSV; gzip allowed), see :mod:`streamgmm.io.files`.
    output_path : path-like
        One JSON line per anomaly. Dead letters go to :func:`dead_letter_path_for`.
    progress : bool, default True
        Show a progress bar on stderr.
    detector : streamgmm.detector.Detector, optional
        Continue with this detector (e.g. one loaded from disk) instead of a new one built from
        ``config.detector_kwargs()``. It must use the configured features.
    input_format : {"jsonl", "csv"}, optional
        Override the format implied by the file name.
    clock : callable, default time.time
        Source of ``detected_at``.

    Returns
    -------
    ReplaySummary
    """
    started = time.perf_counter()
    pipeline = BatchPipeline.from_config(config, detector)
    detector = pipeline.detector
    input_path, output_path = Path(input_path), Path(output_path)
    summary = ReplaySummary(input_path=input_path, output_path=output_path,
                            dead_letter_path=dead_letter_path_for(output_path),
                            detector=detector)
    if output_path.resolve() == input_path.resolve():
        raise ValueError(f"the output {output_path} is the input file; choose another path")
    reasons: Counter[str] = Counter()
    file_name = str(input_path)
    with open_source(input_path, input_format) as source, \
            JsonlSink(summary.output_path) as anomalies_out, \
            JsonlSink(summary.dead_letter_path) as dead_out:
        bar = _progress_bar(progress, source.size, input_path.name)
        shown = 0
        try:
            for batch in source.batches(config.batch.max_records):
                outcome = pipeline.process(batch.values)
                now = clock()
                result = outcome.result
                if result is not None:
                    summary.events_scored += outcome.n_scored
                    summary.warming_up_events += int(np.count_nonzero(result.warming_up))
                    drift = getattr(result, "drift", None)
                    if drift is not None and getattr(drift, "drift_detected", False):
                        summary.drifts += 1
                    for index, row in outcome.anomalies:
                        anomalies_out.write(anomaly_record(
                            outcome.extraction.events[row], result, row,
                            source={"file": file_name, "line": batch.lines[index]},
                            model_events=outcome.model_events, detected_at=now))
                for letter in outcome.dead_letters:
                    reasons[letter.reason] += 1
                    dead_out.write(dead_letter_record(
                        batch.values[letter.index], letter,
                        source={"file": file_name, "line": batch.lines[letter.index]},
                        detected_at=now))
                summary.records += len(batch.values)
                if bar is not None:
                    bar.update(batch.position - shown)
                    shown = batch.position
                    bar.set_postfix(anomalies=anomalies_out.count, dead=dead_out.count,
                                    refresh=False)
        finally:
            if bar is not None:
                bar.close()
        summary.anomalies = anomalies_out.count
        summary.dead_letters = dead_out.count
        summary.blank_lines = source.blank_lines
    summary.dead_letter_reasons = dict(reasons)
    summary.events_learned = int(detector.n_events_learned)
    summary.elapsed_seconds = time.perf_counter() - started
    logger.info("replay of %s: %d records, %d anomalies, %d dead letters in %.2f s",
                input_path, summary.records, summary.anomalies, summary.dead_letters,
                summary.elapsed_seconds)
    return summary


def main(config: Config, input_path: str | os.PathLike, output_path: str | os.PathLike,
         progress: bool | None = None) -> int:
    """Command-line entry point of ``streamgmm replay``: run, print the summary, return 0.

    A missing or unreadable input (or an output that is the input) prints the reason to stderr
    and returns 1. The progress bar shows when stderr is a terminal (or ``progress=True``).
    """
    if progress is None:
        progress = sys.stderr.isatty()
    try:
        summary = replay(config, input_path, output_path, progress=progress)
    except (OSError, ValueError) as exc:
        print(f"streamgmm replay: {exc}", file=sys.stderr)
        return 1
    print(summary)
    return 0
