#!/usr/bin/env python
"""Per-event speed of ``GMMDetector`` against River's HalfSpaceTrees, and against an older
revision of itself, side by side in one process.

``score_one`` + ``learn_one`` with defaults on raw dicts, on the streams of
``scripts/evaluate.py``'s speed table: Shuttle (49,097 events, 9 features) and the 30-feature
correlated stream (20,000 events). The contenders take turns on blocks of 1000 events, so a
busy machine slows them alike; each stream is run ``--runs`` times and the run with the median
ratio to HalfSpaceTrees is printed, with the ratio of every run. Time is the process's CPU time
by default (``--clock wall`` for ``time.perf_counter``, as ``scripts/evaluate.py`` uses): on a
shared machine, wall time also counts the moments another process held the core.

``--against REV`` adds ``GMMDetector`` as it was at git revision ``REV`` (extracted to a
temporary directory as a renamed package), so a change's speed-up is measured in the same run
as its ratio to HalfSpaceTrees, never against numbers from another run. Both revisions are then
seeded with the run's number (defaults otherwise): they do the same work, so the comparison
is of the code alone (with ``seed=None`` the initialisation, and with it the work, varies).

Usage: ``python scripts/bench_per_event.py [--against main] [--runs 5] [--minmax-hst]``
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from river import anomaly, datasets, preprocessing

from streamgmm import _synthetic as syn
from streamgmm.anomaly import GMMDetector

ROOT = pathlib.Path(__file__).resolve().parents[1]


def streams() -> dict[str, list[dict]]:
    """The two streams of ``scripts/evaluate.py``'s per-event speed table, as dicts."""
    shuttle = [{f"f{j + 1}": float(x[k]) for j, k in enumerate(sorted(x))}
               for x, _ in datasets.Shuttle()]
    X, _ = syn.correlated(20_000, 30, seed=11)
    wide = [{f"x{j:03d}": float(v) for j, v in enumerate(row)} for row in np.asarray(X)]
    return {"Shuttle (9 features)": shuttle, "correlated (30 features)": wide}


def detector_at(revision: str, workdir: pathlib.Path):
    """``GMMDetector`` of the package at a git revision, imported as ``streamgmm_old``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "streamgmm"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive, check=True)
    package = workdir / "streamgmm_old"
    (workdir / "streamgmm").rename(package)
    for path in package.rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\bstreamgmm(?=[. ])", "streamgmm_old", text))
    sys.path.insert(0, str(workdir))
    return importlib.import_module("streamgmm_old.anomaly").GMMDetector


def interleaved(factories: dict, events: list[dict], seed: int | None, clock=time.process_time,
                block: int = 1000) -> dict[str, float]:
    """events/s of ``score_one`` + ``learn_one`` per model, block by block in turn."""
    models = {name: make(seed) for name, make in factories.items()}
    spent = dict.fromkeys(models, 0.0)
    for i in range(0, len(events), block):
        part = events[i : i + block]
        for name, model in models.items():
            start = clock()
            for x in part:
                model.score_one(x)
                model.learn_one(x)
            spent[name] += clock() - start
    return {name: len(events) / t for name, t in spent.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", help="also time GMMDetector at this git revision")
    parser.add_argument("--runs", type=int, default=5, help="runs per stream (median kept)")
    parser.add_argument("--minmax-hst", action="store_true",
                        help="also time MinMaxScaler() | HalfSpaceTrees(seed=42)")
    parser.add_argument("--clock", choices=["process", "wall"], default="process",
                        help="CPU time of this process (default) or wall time")
    args = parser.parse_args(argv)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    factories = {"GMMDetector": lambda seed: GMMDetector(seed=seed)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.against:
            old = detector_at(args.against, pathlib.Path(tmp))
            factories[f"GMMDetector@{args.against}"] = lambda seed: old(seed=seed)
        factories["HalfSpaceTrees"] = lambda _: anomaly.HalfSpaceTrees(seed=42)
        if args.minmax_hst:
            factories["MinMaxScaler+HST"] = lambda _: (preprocessing.MinMaxScaler()
                                                       | anomaly.HalfSpaceTrees(seed=42))
        names = [n for n in factories if n != "HalfSpaceTrees"]
        print("| stream | events | " + " | ".join(f"{n} ev/s" for n in factories) + " | "
              + " | ".join(f"GMMDetector / {n}" for n in names if n != "GMMDetector")
              + (" | " if len(names) > 1 else "") + "GMMDetector / HST (each run) |")
        print("|---" * (2 + len(factories) + len(names)) + "|")
        for stream, events in streams().items():
            runs = [interleaved(factories, events, run if args.against else None, clock)
                    for run in range(args.runs)]
            ratios = [r["GMMDetector"] / r["HalfSpaceTrees"] for r in runs]
            median = runs[ratios.index(statistics.median_low(ratios))]
            others = [f"{median['GMMDetector'] / median[n]:.2f}x" for n in names
                      if n != "GMMDetector"]
            print(f"| {stream} | {len(events):,} | "
                  + " | ".join(f"{median[n]:,.0f}" for n in factories) + " | "
                  + " | ".join(others) + (" | " if others else "")
                  + f"**{statistics.median_low(ratios):.2f}x** ("
                  + ", ".join(f"{r:.2f}" for r in ratios) + ") |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
