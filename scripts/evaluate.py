#!/usr/bin/env python
"""Prequential evaluation of streamgmm against River's detectors and do-it-yourself baselines.

Every detector sees each labelled stream once, event by event: it scores the event, then learns
it (River's prequential protocol), with default parameters everywhere -- no per-dataset tuning.
Reported per stream: ROC-AUC and PR-AUC (average precision) of the scores, and events/s through
``score_one`` + ``learn_one``. A throughput section times the batch path (``score_many`` +
``learn_many``) against ``HalfSpaceTrees``. PNG plots of the detector's scores, threshold and
flags over time are written to ``--out``.

Detectors
    streamgmm            ``GMMDetector()`` (River API, defaults)
    HalfSpaceTrees       ``MinMaxScaler() | HalfSpaceTrees(seed=42)`` as River documents
    LODA                 ``MinMaxScaler() | LODA(seed=42)``
    online Gaussian      one Gaussian, running mean and covariance, Mahalanobis score
    sliding sklearn GMM  ``sklearn.mixture.GaussianMixture(3)`` refitted every 250 events on the
                         last 1000

Streams (all offline)
    River's ``synth.AnomalySine`` and ``Shuttle``; synthetic mixtures with outliers, bursts, a new
    mode, abrupt and gradual drift; and "one class group is normal, a few rows of another are
    anomalies" streams from scikit-learn's breast cancer, wine and digits and River's
    ImageSegments.

Usage::

    .venv/bin/python scripts/evaluate.py --quick           # ~1 minute
    .venv/bin/python scripts/evaluate.py --seeds 3         # the README table
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
from river import anomaly, datasets, preprocessing
from sklearn import datasets as sk_datasets
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.mixture import GaussianMixture

from streamgmm import _synthetic as syn
from streamgmm.anomaly import GMMDetector
from streamgmm.detector import Detector

# -- progress ---------------------------------------------------------------------------------


def progress(items: Iterable, total: int, desc: str):
    """tqdm if installed, else a one-line counter on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False)
        return
    for i, item in enumerate(items, 1):
        sys.stderr.write(f"\r{desc}: {i}/{total}")
        sys.stderr.flush()
        yield item
    sys.stderr.write("\r" + " " * 60 + "\r")


# -- do-it-yourself baselines -------------------------------------------------------------------


class OnlineGaussian:
    """One Gaussian with a running mean and covariance; score = squared Mahalanobis distance."""

    def __init__(self):
        self.names: list | None = None
        self.n = 0
        self.mean = self.m2 = self._inv = None

    def _vec(self, x: dict) -> np.ndarray:
        if self.names is None:
            self.names = sorted(x)
        return np.array([x.get(k, 0.0) for k in self.names], dtype=float)

    def score_one(self, x: dict) -> float:
        if self.n < 2:
            return 0.0
        if self._inv is None:
            cov = self.m2 / (self.n - 1)
            cov = cov + 1e-6 * (np.trace(cov) / len(cov) + 1e-12) * np.eye(len(cov))
            self._inv = np.linalg.pinv(cov)
        diff = self._vec(x) - self.mean
        return float(diff @ self._inv @ diff)

    def learn_one(self, x: dict) -> None:
        v = self._vec(x)
        if self.mean is None:
            self.mean, self.m2 = np.zeros_like(v), np.zeros((len(v), len(v)))
        self.n += 1
        delta = v - self.mean
        self.mean = self.mean + delta / self.n
        self.m2 = self.m2 + np.outer(delta, v - self.mean)
        self._inv = None


class SlidingWindowGMM:
    """scikit-learn's GaussianMixture refitted every ``refit`` events on the last ``window``."""

    def __init__(self, n_components: int = 3, window: int = 1000, refit: int = 250):
        self.n_components, self.window, self.refit = n_components, window, refit
        self.names: list | None = None
        self.rows: list[np.ndarray] = []
        self.model: GaussianMixture | None = None
        self.since = 0

    def _vec(self, x: dict) -> np.ndarray:
        if self.names is None:
            self.names = sorted(x)
        return np.array([x.get(k, 0.0) for k in self.names], dtype=float)

    def score_one(self, x: dict) -> float:
        if self.model is None:
            return 0.0
        return float(-self.model.score_samples(self._vec(x)[None, :])[0])

    def learn_one(self, x: dict) -> None:
        self.rows.append(self._vec(x))
        self.rows = self.rows[-self.window :]
        self.since += 1
        if self.since >= self.refit or (self.model is None and len(self.rows) >= 100):
            self.since = 0
            data = np.vstack(self.rows)
            k = min(self.n_components, max(1, len(data) // 50))
            self.model = GaussianMixture(k, reg_covar=1e-6, random_state=0).fit(data)


METHODS: dict[str, Callable[[], object]] = {
    "streamgmm": lambda: GMMDetector(),
    "HalfSpaceTrees": lambda: preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(seed=42),
    "LODA": lambda: preprocessing.MinMaxScaler() | anomaly.LODA(seed=42),
    "online Gaussian": OnlineGaussian,
    "sliding sklearn GMM": SlidingWindowGMM,
}

# -- streams ------------------------------------------------------------------------------------


def _one_class_group(X, labels, normal, anomalous, n_anomalies, seed):
    """Normal = rows whose label is in ``normal``; ``n_anomalies`` rows from ``anomalous``."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    normal_rows = np.flatnonzero(np.isin(labels, normal))
    anomaly_rows = rng.choice(np.flatnonzero(np.isin(labels, anomalous)), n_anomalies, False)
    order = rng.permutation(normal_rows)
    # anomalies go anywhere after the first 10 % (a detector needs some normal data first)
    start = len(order) // 10
    positions = np.sort(rng.choice(np.arange(start, len(order)), n_anomalies, False))
    rows = list(order)
    for offset, (pos, row) in enumerate(zip(positions, anomaly_rows, strict=True)):
        rows.insert(pos + offset, row)
    y = np.isin(np.array(rows), anomaly_rows).astype(int)
    return np.asarray(X, dtype=float)[rows], y


def _river_xy(dataset, limit=None):
    xs, ys = [], []
    for x, y in dataset:
        xs.append(x)
        ys.append(y)
        if limit and len(xs) >= limit:
            break
    names = sorted(xs[0])
    return np.array([[x[k] for k in names] for x in xs], float), ys


def stream_anomaly_sine(n, seed):
    X, y = _river_xy(datasets.synth.AnomalySine(n_samples=n, n_anomalies=n // 30, seed=seed))
    return X, np.array(y, int)


def stream_shuttle(n, seed):
    X, y = _river_xy(datasets.Shuttle(), limit=n)
    return X, np.array(y, int)


def stream_image_segments(n, seed):
    X, labels = _river_xy(datasets.ImageSegments())
    return _one_class_group(X, labels, ["brickface", "sky", "foliage", "cement", "window"],
                            ["path", "grass"], 20, seed)


def stream_breast_cancer(n, seed):
    data = sk_datasets.load_breast_cancer()
    return _one_class_group(data.data, data.target, [1], [0], 10, seed)


def stream_wine(n, seed):
    data = sk_datasets.load_wine()
    return _one_class_group(data.data, data.target, [0, 1], [2], 5, seed)


def stream_digits(n, seed):
    data = sk_datasets.load_digits()
    return _one_class_group(data.data, data.target, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], 30, seed)


STREAMS: dict[str, Callable[[int, int], tuple[np.ndarray, np.ndarray]]] = {
    "AnomalySine": stream_anomaly_sine,
    "mixture + outliers": lambda n, s: syn.mixture_with_outliers(n, contamination=0.01, seed=s),
    "bursts": lambda n, s: syn.bursts(n, seed=s),
    "new mode": lambda n, s: syn.new_mode(n, label_events=150, seed=s),
    "abrupt drift": lambda n, s: syn.abrupt_drift(n, contamination=0.01, seed=s),
    "gradual drift": lambda n, s: syn.gradual_drift(n, contamination=0.01, seed=s),
    "Shuttle (River)": stream_shuttle,
    "ImageSegments (River)": stream_image_segments,
    "breast cancer": stream_breast_cancer,
    "wine": stream_wine,
    "digits": stream_digits,
}

# -- running -------------------------------------------------------------------------------------


def as_dicts(X: np.ndarray) -> list[dict]:
    names = [f"x{j}" for j in range(X.shape[1])]
    return [dict(zip(names, map(float, row), strict=True)) for row in X]


def prequential(factory, events: list[dict]) -> tuple[np.ndarray, float]:
    model = factory()
    scores = np.empty(len(events))
    start = time.perf_counter()
    for i, x in enumerate(events):
        scores[i] = model.score_one(x)
        model.learn_one(x)
    elapsed = time.perf_counter() - start
    return np.nan_to_num(scores, nan=0.0), len(events) / elapsed


def plot_stream(name: str, X: np.ndarray, y: np.ndarray, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    det = Detector(random_state=0)
    results = [det.process(b) for b in np.array_split(X, max(len(X) // 100, 1))]
    score = np.concatenate([r.score for r in results])
    threshold = np.concatenate([r.threshold for r in results])
    flags = np.concatenate([r.is_anomaly for r in results])
    t = np.arange(len(score))
    fig, ax = plt.subplots(figsize=(11, 3.6))
    ax.plot(t, score, lw=0.4, color="0.55", label="score = -log p(x)")
    ax.plot(t, threshold, lw=1.2, color="tab:orange", label="adaptive threshold")
    ax.scatter(t[flags], score[flags], s=10, color="tab:red", label="flagged", zorder=3)
    ax.scatter(t[y == 1], score[y == 1], s=28, facecolors="none", edgecolors="k",
               label="true anomaly", zorder=4)
    finite = score[np.isfinite(score)]
    if finite.size:
        lo, hi = np.percentile(finite, [0.5, 99.9])
        ax.set_ylim(lo - 1, max(hi, np.nanmax(threshold[np.isfinite(threshold)], initial=hi)) * 1.3
                    + 1)
    ax.set_xlabel("event")
    ax.set_title(f"{name}: streamgmm Detector (false_alarm_rate=0.001), "
                 f"{flags.sum()} flagged, {int(y.sum())} true anomalies")
    ax.legend(loc="upper left", fontsize=8, ncol=4)
    fig.tight_layout()
    safe = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    fig.savefig(os.path.join(out, f"{safe}.png"), dpi=110)
    plt.close(fig)


def throughput(n: int) -> dict[str, float]:
    """events/s after a warm-up of ``n // 10`` events (steady state).

    One at a time for GMMDetector and HalfSpaceTrees; the batch path (``score_many`` then
    ``learn_many`` per chunk) for GMMDetector.
    """
    X, _ = syn.mixture_with_outliers(n, contamination=0.01, seed=99)
    events = as_dicts(X)
    prime, rest = events[: n // 10], events[n // 10 :]
    out = {}
    for name, factory in (("HalfSpaceTrees", lambda: anomaly.HalfSpaceTrees(seed=42)),
                          ("streamgmm", GMMDetector)):
        model = factory()
        for x in prime:
            model.learn_one(x)
        start = time.perf_counter()
        for x in rest:
            model.score_one(x)
            model.learn_one(x)
        out[f"{name} score_one+learn_one"] = len(rest) / (time.perf_counter() - start)
    frame = pd.DataFrame(events)
    for chunk in (1000, 10_000):
        model = GMMDetector()
        model.learn_many(frame.iloc[: n // 10])
        model.learn_many(frame.iloc[n // 10 : n // 10 + chunk])
        tail = frame.iloc[n // 10 + chunk :]
        parts = [tail.iloc[i : i + chunk] for i in range(0, len(tail), chunk)]
        start = time.perf_counter()
        for part in parts:
            model.score_many(part)
            model.learn_many(part)
        out[f"streamgmm score_many+learn_many (chunks of {chunk})"] = len(tail) / (
            time.perf_counter() - start)
    return out


def markdown_table(table: pd.DataFrame, fmt: str) -> str:
    cols = list(table.columns)
    lines = ["| stream | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in table.iterrows():
        best = row.max()
        cells = []
        for c in cols:
            v = row[c]
            text = format(v, fmt) if np.isfinite(v) else "-"
            cells.append(f"**{text}**" if np.isfinite(v) and v == best else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short streams, one seed")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per stream (default 3)")
    parser.add_argument("--out", default="out/evaluation", help="where the PNG plots go")
    parser.add_argument("--streams", nargs="*", help="subset of stream names")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    n = 3000 if args.quick else 10_000
    seeds = list(range(1 if args.quick else args.seeds))
    os.makedirs(args.out, exist_ok=True)
    names = args.streams or list(STREAMS)

    roc, pr, speed = {}, {}, {}
    jobs = [(s, seed) for s in names for seed in seeds]
    for stream, seed in progress(jobs, len(jobs), "streams"):
        size = 20_000 if stream.startswith("Shuttle") and not args.quick else n
        X, y = STREAMS[stream](size, seed)
        events = as_dicts(X)
        for method, factory in METHODS.items():
            scores, eps = prequential(factory, events)
            roc.setdefault(stream, {}).setdefault(method, []).append(roc_auc_score(y, scores))
            pr.setdefault(stream, {}).setdefault(method, []).append(
                average_precision_score(y, scores))
            speed.setdefault(stream, {}).setdefault(method, []).append(eps)
        if seed == seeds[0] and not args.no_plots:
            plot_stream(stream, X, y, args.out)

    def frame(d):
        means = {s: {m: float(np.mean(v)) for m, v in ms.items()} for s, ms in d.items()}
        return pd.DataFrame(means).T[list(METHODS)]

    roc_t, pr_t, speed_t = frame(roc), frame(pr), frame(speed)
    roc_t.loc["**mean**"] = roc_t.mean()
    pr_t.loc["**mean**"] = pr_t.mean()
    print("\n### ROC-AUC (prequential, default parameters; mean over "
          f"{len(seeds)} seed{'s' * (len(seeds) > 1)})\n")
    print(markdown_table(roc_t, ".3f"))
    print("\n### PR-AUC (average precision)\n")
    print(markdown_table(pr_t, ".3f"))
    print("\n### events/s through score_one + learn_one\n")
    print(markdown_table(speed_t, ",.0f"))

    thr = throughput(50_000 if args.quick else 300_000)
    print("\n### throughput (4 features, synthetic mixture, steady state after 10 % warm-up)\n")
    print("| path | events/s |\n|---|---|")
    for k, v in thr.items():
        print(f"| {k} | {v:,.0f} |")

    print("\n### goals\n")
    baselines = [m for m in METHODS if m != "streamgmm"]
    body_roc = roc_t.drop(index="**mean**")
    ok_roc = roc_t.loc["**mean**"].idxmax() == "streamgmm"
    ok_pr = pr_t.loc["**mean**"].idxmax() == "streamgmm"
    gaps = body_roc[baselines].max(axis=1) - body_roc["streamgmm"]
    hst = thr["HalfSpaceTrees score_one+learn_one"]
    one = thr["streamgmm score_one+learn_one"]
    batch = max(v for k, v in thr.items() if "score_many" in k)
    print(f"- best mean ROC-AUC: {'yes' if ok_roc else 'NO'} "
          f"({roc_t.loc['**mean**', 'streamgmm']:.3f})")
    print(f"- best mean PR-AUC: {'yes' if ok_pr else 'NO'} "
          f"({pr_t.loc['**mean**', 'streamgmm']:.3f})")
    worst = gaps.idxmax()
    print(f"- never > 0.005 ROC-AUC behind the best baseline: "
          f"{'yes' if gaps.max() <= 0.005 else 'NO'} (worst: {worst}, {gaps.max():+.3f})")
    print(f"- score_one+learn_one faster than HalfSpaceTrees: {'yes' if one > hst else 'NO'} "
          f"({one / hst:.2f}x)")
    print(f"- batch path >= 50x HalfSpaceTrees: {'yes' if batch >= 50 * hst else 'NO'} "
          f"({batch / hst:.1f}x)")
    if not args.no_plots:
        print(f"\nplots: {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
