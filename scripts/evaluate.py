#!/usr/bin/env python
"""Held-out prequential evaluation of streamgmm against River's detectors and simple baselines.

Every detector sees each labelled stream once, event by event: it scores the event, then learns
it (River's prequential protocol), with default parameters everywhere -- no per-stream tuning.
Reported per stream: ROC-AUC and PR-AUC (average precision) of the scores.

The streams are split, once and for all, into a **development half** (choose defaults on it)
and a **test half** (only report it). The split is by *family* -- the data set or generator a
stream comes from -- so the variants of one data set (anomaly class, fraction, seed, size) are
all in the same half. The families of the previous 11-stream suite, on which the current
defaults were tuned, are all in the development half; the other families are ordered by a
SHA-256 hash of ``SPLIT_SALT + family`` within their kind (real / synthetic) and assigned to
the halves alternately. ``tests/test_evaluate.py`` freezes the assignment.

Streams (all offline, no download)
    scikit-learn ``load_iris``, ``load_wine``, ``load_breast_cancer``, ``load_digits``; River's
    ``Shuttle``, ``ImageSegments``, ``Phishing``, ``Bananas``; River's generators
    ``AnomalySine``, ``Waveform`` (with noise features), ``LED`` (with irrelevant features),
    ``RandomRBF``. A labelled data set becomes ODDS/ADBench-style streams: each class as the
    anomaly with all others normal ("rest"), and for three or more classes each class as the
    only normal one with anomalies drawn from all others ("one"); anomaly fractions 1 %, 3 %, 5 %
    of the normal rows (at least 3), shuffled, no anomaly in the first 10 %; several seeds.
    Synthetic (``streamgmm._synthetic``): 4-feature mixtures with outliers, bursts, a new mode,
    abrupt and gradual drift (the old suite), and wide streams -- correlated, low-rank, heavy
    tails, discrete, constant features, multimodal, abrupt and gradual drift -- with
    (events, features) in (300, 20), (1000, 50), (2500, 100), (5000, 30).

Detectors (``--methods``)
    streamgmm           ``GMMDetector()`` under River, three ways: alone, behind
                        ``StandardScaler()``, behind ``MinMaxScaler()`` (River pipelines learn
                        the scaler in ``learn_one``)
    Detector (replay)   the daemon's ``Detector`` as ``streamgmm replay`` runs it: the default
                        configuration, raw features, micro-batches of ``batch.max_records``
                        (5000: a stream of <= 5000 events is scored by the warm-up model)
    Detector (256)      the same in batches of 256, as a live daemon polls at low rates
    HalfSpaceTrees      ``MinMaxScaler() | HalfSpaceTrees(seed=42)`` as River documents it
    LODA                ``MinMaxScaler() | LODA(seed=42)``
    online Gaussian     running mean and covariance, squared Mahalanobis distance
    sliding GMM         scikit-learn ``GaussianMixture(3)`` refitted on the last 1000 events
    sliding IForest     scikit-learn ``IsolationForest(100, random_state=0)`` refitted on the
                        last 2000 events
    Both sliding baselines first fit after 32 events, refit at 64, 128, 256 and then every 250.

Baseline scores are cached in ``<out>/cache`` by stream (a hash of its data) and method (name +
version); streamgmm's by a hash of the ``streamgmm`` package's source, so a re-run after a
detector change recomputes only streamgmm. From Python::

    import sys; sys.path.insert(0, "scripts"); import evaluate
    from streamgmm.anomaly import GMMDetector
    df = evaluate.run(half="dev", methods={"mine": lambda: GMMDetector(max_components=5)},
                      quick=True)
    evaluate.summary(df)                   # mean ROC-AUC per method (metric="pr_auc")
    evaluate.compare(df, "mine", "GMMDetector")   # per family: candidate minus current

Noise: ``GMMDetector seed 1`` is GMMDetector seeded 1 instead of 0, run on every stream and
kept out of the tables: the goals count on how many streams GMMDetector is "behind" it
(:func:`noise_floor`), what "> 0.01 behind" measures of the random initialisation alone. In
session 14 that was 43 of the 369 development streams (4 by more than two standard errors).

Timings (2 shared cores, ``--jobs 2``): from an empty cache, both halves with the Shuttle
protocol (6 seeds), speed and plots ~31 min; after a streamgmm change (only its six methods
re-run) the development half ~10 min, both halves with all of the above ~15 min;
``--quick --half dev`` ~30 s; fully cached, dev ~20 s.

Usage::

    .venv/bin/python scripts/evaluate.py --quick --half dev      # ~30 s after a change
    .venv/bin/python scripts/evaluate.py --half dev --no-speed   # the tuning loop
    .venv/bin/python scripts/evaluate.py                         # everything, both halves
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from river import anomaly, datasets, preprocessing
from sklearn import datasets as sk_datasets
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.mixture import GaussianMixture

from streamgmm import _synthetic as syn
from streamgmm.anomaly import GMMDetector
from streamgmm.config import Config, FeaturesConfig
from streamgmm.detector import Detector

ROOT = Path(__file__).resolve().parent.parent
SPLIT_SALT = "streamgmm-issue13-split-v1"
STREAM_VERSION = "1"  # bump when the stream builders change (the cache also hashes the data)
BASELINE_VERSION = "1"  # bump when a baseline's code changes
SCALERS = ("none", "standard", "minmax")

# -- progress ---------------------------------------------------------------------------------


def progress(items: Iterable, total: int, desc: str, enabled: bool = True):
    """tqdm over ``items`` (a one-line counter on stderr without tqdm; nothing if disabled)."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False,
                        dynamic_ncols=True)
        return
    for i, item in enumerate(items, 1):
        sys.stderr.write(f"\r{desc}: {i}/{total}")
        sys.stderr.flush()
        yield item
    sys.stderr.write("\r" + " " * 60 + "\r")


# -- streams ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stream:
    """One labelled stream: how to build it and where it belongs.

    Attributes
    ----------
    id : str
        Unique name, e.g. ``"digits/rest/anom=3/frac=0.03/seed=0"``.
    family : str
        The data set or generator; the dev/test split is by family.
    kind : {"real", "synthetic"}
    build : callable
        ``build() -> (X, y)``, ``X`` float ``(n, d)`` in arrival order, ``y`` 1 for anomalies.
    """

    id: str
    family: str
    kind: str
    build: Callable[[], tuple[np.ndarray, np.ndarray]] = dataclasses.field(compare=False)

    @property
    def half(self) -> str:
        return half_of(self.family)


def _insert_anomalies(X, labels, normal, anomalous, n_anomalies, seed):
    """Normal = rows whose label is in ``normal``; ``n_anomalies`` rows from ``anomalous``.

    Shuffled; the anomalies go anywhere after the first 10 % of the normal rows.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    normal_rows = np.flatnonzero(np.isin(labels, normal))
    pool = np.flatnonzero(np.isin(labels, anomalous))
    anomaly_rows = rng.choice(pool, min(n_anomalies, len(pool)), False)
    order = rng.permutation(normal_rows)
    start = len(order) // 10
    positions = np.sort(rng.choice(np.arange(start, len(order)), len(anomaly_rows), False))
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
    return np.array([[float(x[k]) for k in names] for x in xs], float), ys


_LOADED: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _labelled(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(X, labels)`` of a labelled data set (memoised per process)."""
    if name not in _LOADED:
        if name in ("iris", "wine", "breast cancer", "digits"):
            data = getattr(sk_datasets, "load_" + name.replace(" ", "_"))()
            X, labels = data.data, data.target
        elif name == "ImageSegments":
            X, labels = _river_xy(datasets.ImageSegments())
        elif name == "Phishing":
            X, labels = _river_xy(datasets.Phishing())
        elif name == "Bananas":
            X, labels = _river_xy(datasets.Bananas())
        elif name == "Waveform":
            X, labels = _river_xy(datasets.synth.Waveform(seed=7, has_noise=True), limit=3000)
        elif name == "LED":
            X, labels = _river_xy(datasets.synth.LED(seed=7, noise_percentage=0.1,
                                                     irrelevant_features=True), limit=1500)
        elif name == "RandomRBF":
            X, labels = _river_xy(datasets.synth.RandomRBF(
                seed_model=7, seed_sample=7, n_classes=5, n_features=20, n_centroids=20),
                limit=2000)
        else:
            raise KeyError(name)
        _LOADED[name] = (np.asarray(X, float), np.asarray([str(v) for v in labels]))
    return _LOADED[name]


REAL_SETS = ["iris", "wine", "breast cancer", "digits", "ImageSegments", "Phishing", "Bananas",
             "Waveform", "LED", "RandomRBF"]
OLD_SYNTHETIC = {
    "mixture + outliers": lambda n, s: syn.mixture_with_outliers(n, contamination=0.01, seed=s),
    "bursts": lambda n, s: syn.bursts(n, seed=s),
    "new mode": lambda n, s: syn.new_mode(n, label_events=150, seed=s),
    "abrupt drift": lambda n, s: syn.abrupt_drift(n, contamination=0.01, seed=s),
    "gradual drift": lambda n, s: syn.gradual_drift(n, contamination=0.01, seed=s),
}
WIDE_SIZES = [(300, 20), (1000, 50), (2500, 100), (5000, 30)]
FRACTIONS = (0.01, 0.03, 0.05)
# the families of the previous suite: the defaults were tuned on them, so they are dev data
TUNED_FAMILIES = {"AnomalySine", "Shuttle", "ImageSegments", "breast cancer", "wine", "digits",
                  *OLD_SYNTHETIC}


def _class_streams(name: str, seeds: Sequence[int], fractions: Sequence[float],
                   max_classes: int | None) -> list[Stream]:
    X, labels = _labelled(name)
    classes = sorted(set(labels.tolist()))
    kinds = [("rest", c) for c in classes]
    if len(classes) >= 3:
        kinds += [("one", c) for c in classes]
    if max_classes is not None:
        kinds = [k for k in kinds if k[1] in classes[:max_classes]]
    out = []
    for mode, c in kinds:
        if mode == "rest":
            normal, anomalous = [k for k in classes if k != c], [c]
        else:
            normal, anomalous = [c], [k for k in classes if k != c]
        n_normal = int(np.isin(labels, normal).sum())
        counts = sorted({max(3, int(round(f * n_normal))) for f in fractions})
        for n_anom in counts:
            for seed in seeds:
                sid = f"{name}/{mode}-{c}/anom={n_anom}/seed={seed}"
                out.append(Stream(sid, name, "real", _bind(
                    _class_build, name, normal, anomalous, n_anom, seed + 1000 * n_anom)))
    return out


def _class_build(name, normal, anomalous, n_anom, seed):
    X, labels = _labelled(name)
    return _insert_anomalies(X, labels, normal, anomalous, n_anom, seed)


def _bind(fn, *args):
    """``lambda: fn(*args)`` that pickles (for the worker processes)."""
    import functools

    return functools.partial(fn, *args)


def _shuttle(limit=None):
    X, y = _river_xy(datasets.Shuttle(), limit=limit)
    return X, np.asarray(y, int)


def _anomaly_sine(n, seed):
    X, y = _river_xy(datasets.synth.AnomalySine(n_samples=n, n_anomalies=n // 30, seed=seed))
    return X, np.asarray(y, int)


def _wide(kind, n, d, seed):
    return syn.WIDE_STREAMS[kind](n, d, seed=seed)


def _old(kind, n, seed):
    return OLD_SYNTHETIC[kind](n, seed)


def catalogue(quick: bool = False, seeds: int | None = None) -> list[Stream]:
    """Every stream of the evaluation (both halves), in a fixed order.

    Parameters
    ----------
    quick : bool
        A small subset for fast iteration: one seed, one anomaly fraction (3 %), at most two
        classes per data set, two sizes of each wide synthetic stream, Shuttle's first 10,000.
    seeds : int, optional
        Seeds per variant (default 2; 1 with ``quick``).
    """
    seeds = list(range(seeds if seeds is not None else (1 if quick else 2)))
    fractions = (0.03,) if quick else FRACTIONS
    out: list[Stream] = []
    for name in REAL_SETS:
        out += _class_streams(name, seeds, fractions, 2 if quick else None)
    out.append(Stream("Shuttle", "Shuttle", "real", _bind(_shuttle, 10_000 if quick else None)))
    n_old = 2000 if quick else 5000
    for s in seeds:
        out.append(Stream(f"AnomalySine/n={n_old}/seed={s}", "AnomalySine", "synthetic",
                          _bind(_anomaly_sine, n_old, s)))
        for kind in OLD_SYNTHETIC:
            out.append(Stream(f"{kind}/n={n_old}/seed={s}", kind, "synthetic",
                              _bind(_old, kind, n_old, s)))
    sizes = [(300, 20), (1000, 50)] if quick else WIDE_SIZES
    for kind in syn.WIDE_STREAMS:
        for n, d in sizes:
            for s in seeds:
                out.append(Stream(f"{kind}/n={n}/d={d}/seed={s}", kind, "synthetic",
                                  _bind(_wide, kind, n, d, s)))
    return out


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def split() -> dict[str, str]:
    """``family -> "dev" | "test"`` for every family of :func:`catalogue` (deterministic)."""
    families: dict[str, str] = {}
    for s in catalogue(quick=True, seeds=1):
        families.setdefault(s.family, s.kind)
    out = {f: "dev" for f in families if f in TUNED_FAMILIES}
    for kind in ("real", "synthetic"):
        rest = sorted((f for f, k in families.items() if k == kind and f not in out),
                      key=lambda f: _hash(SPLIT_SALT + f))
        for i, f in enumerate(rest):
            out[f] = "test" if i % 2 == 0 else "dev"
    return out


_SPLIT: dict[str, str] | None = None


def half_of(family: str) -> str:
    """The half (``"dev"`` or ``"test"``) of a stream family."""
    global _SPLIT
    if _SPLIT is None:
        _SPLIT = split()
    return _SPLIT[family]


# -- do-it-yourself baselines (array-based, exactly prequential) ------------------------------


def online_gaussian(X: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each event under the mean and covariance of its past."""
    n, d = X.shape
    scores = np.zeros(n)
    mean, m2 = np.zeros(d), np.zeros((d, d))
    for i in range(n):
        x = X[i]
        if i >= 2:
            cov = m2 / (i - 1)
            cov = cov + 1e-6 * (np.trace(cov) / d + 1e-12) * np.eye(d)
            diff = x - mean
            scores[i] = float(diff @ np.linalg.solve(cov, diff))
        delta = x - mean
        mean = mean + delta / (i + 1)
        m2 = m2 + np.outer(delta, x - mean)
    return scores


def refit_points(n: int, first: int = 32, every: int = 250) -> list[int]:
    """Event counts after which the sliding baselines refit: 32, 64, 128, 256, then every 250."""
    pts, p = [], first
    while p < min(n, 256):
        pts.append(p)
        p *= 2
    p = 256
    while p < n:
        pts.append(p)
        p += every
    return pts


def _sliding(X: np.ndarray, fit, window: int) -> np.ndarray:
    """Score each event with the model last fitted on (at most) ``window`` earlier events."""
    scores = np.zeros(len(X))
    pts = refit_points(len(X)) + [len(X)]
    for start, stop in zip(pts[:-1], pts[1:], strict=True):
        model_score = fit(X[max(0, start - window) : start])
        scores[start:stop] = model_score(X[start:stop])
    return scores


def sliding_gmm(X: np.ndarray) -> np.ndarray:
    """scikit-learn ``GaussianMixture`` (up to 3 components, one per 50 events), last 1000.

    Each refit starts from the previous solution (``warm_start``) while the number of
    components stays the same: about ten times faster on 64 features; ROC-AUC moves by a few
    hundredths either way against a cold start (no systematic loss).
    """
    state: dict = {}

    def fit(data):
        k = min(3, max(1, len(data) // 50))
        model = state.get("model")
        if model is None or model.n_components != k:
            model = GaussianMixture(k, reg_covar=1e-6, random_state=0, warm_start=True)
            state["model"] = model
        model.fit(data)
        return lambda Z: -model.score_samples(Z)  # called before the next refit

    return _sliding(X, fit, 1000)


def sliding_iforest(X: np.ndarray) -> np.ndarray:
    """scikit-learn ``IsolationForest(100, random_state=0)`` on the last 2000 events."""

    def fit(data):
        model = IsolationForest(n_estimators=100, random_state=0).fit(data)
        return lambda Z: -model.score_samples(Z)

    return _sliding(X, fit, 2000)


# -- methods ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Method:
    """A detector under evaluation.

    Attributes
    ----------
    name : str
    factory : callable
        ``kind="river"``: returns a River anomaly detector (``score_one`` / ``learn_one``);
        ``kind="batch"``: returns an object with ``process(X) -> result.score`` (the daemon's
        ``Detector``), called on micro-batches of ``batch_size``; ``kind="array"``: a function
        ``X -> scores`` that is itself prequential.
    kind : {"river", "batch", "array"}
    scaler : {"none", "standard", "minmax"}
        River scaler put in front (``kind="river"`` only).
    version : str or None
        Cache key of the code; ``None`` = never cached.
    group : {"streamgmm", "baseline", "candidate", "reference"}
        ``"reference"``: GMMDetector itself with another seed, for :func:`noise_floor` only
        (kept out of the tables and the baselines).
    """

    name: str
    factory: Callable
    kind: str = "river"
    scaler: str = "none"
    version: str | None = None
    group: str = "candidate"
    batch_size: int = 5000


def streamgmm_version() -> str:
    """Hash of the source of the ``streamgmm`` that is imported: the key of its cached results.

    The imported package, not this worktree's: a script elsewhere that imports this harness
    with its own ``streamgmm`` and shares the cache (``out=``) keeps its results apart.
    """
    import streamgmm

    package = Path(streamgmm.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package.parent).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


REPLAY_BATCH = Config(features=FeaturesConfig(fields=["x"])).batch.max_records  # 5000


def replay_detector(n_features: int) -> Detector:
    """The daemon's ``Detector`` as ``streamgmm replay`` builds it from the default config."""
    config = Config(features=FeaturesConfig(fields=[f"x{j:03d}" for j in range(n_features)]))
    return Detector(**{**config.detector_kwargs(), "random_state": 0})


def _with_scaler(factory: Callable, scaler: str) -> Callable:
    if scaler == "none":
        return factory
    cls = {"standard": preprocessing.StandardScaler, "minmax": preprocessing.MinMaxScaler}[scaler]
    return lambda: cls() | factory()


SCALER_LABEL = {"none": "", "standard": " (Std)", "minmax": " (MinMax)"}


def river_methods(name: str, factory: Callable, version: str | None = None,
                  group: str = "candidate", scalers: Sequence[str] = SCALERS) -> list[Method]:
    """One :class:`Method` per scaler for a River detector factory."""
    return [Method(name + SCALER_LABEL[s], factory, "river", s, version, group) for s in scalers]


NOISE_REFERENCE = "GMMDetector seed 1"


def default_methods() -> dict[str, Method]:
    """streamgmm (three scalers and the replay path), the five baselines, and GMMDetector with
    seed 1 (:func:`noise_floor`)."""
    v = streamgmm_version() + ".s0"  # seed pinned to 0 (see _pin_seed)
    methods = river_methods("GMMDetector", GMMDetector, v, "streamgmm")
    methods.append(Method("Detector (replay)", replay_detector, "batch", version=v,
                          group="streamgmm", batch_size=REPLAY_BATCH))
    # replay's 5000-event batches leave a stream of <= 5000 events scored by the warm-up
    # model; a live daemon polls smaller batches (max_wait_ms), so show that case too
    methods.append(Method("Detector (256)", replay_detector, "batch", version=v,
                          group="streamgmm", batch_size=256))
    bv = BASELINE_VERSION
    methods += [
        Method("HST (MinMax)", lambda: preprocessing.MinMaxScaler()
               | anomaly.HalfSpaceTrees(seed=42), "river", version=bv, group="baseline"),
        Method("LODA (MinMax)", lambda: preprocessing.MinMaxScaler() | anomaly.LODA(seed=42),
               "river", version=bv, group="baseline"),
        Method("online Gaussian", online_gaussian, "array", version=bv, group="baseline"),
        Method("sliding GMM", sliding_gmm, "array", version=bv + ".2", group="baseline"),
        Method("sliding IForest", sliding_iforest, "array", version=bv, group="baseline"),
        Method(NOISE_REFERENCE, lambda: GMMDetector(seed=1), "river",
               version=streamgmm_version() + ".s1", group="reference"),
    ]
    return {m.name: m for m in methods}


def as_dicts(X: np.ndarray) -> list[dict]:
    """Rows as River dicts with names ``x000, x001, ...`` (sorted = column order)."""
    names = [f"x{j:03d}" for j in range(X.shape[1])]
    return [dict(zip(names, map(float, row), strict=True)) for row in X]


def _pin_seed(model):
    """Give a River detector whose ``seed`` is None (a fresh random seed) the seed 0.

    ``GMMDetector(seed=None)`` draws its initialisation from OS entropy, which moved single
    streams by up to 0.1 ROC-AUC between identical runs (Bananas); pinned, every run and every
    candidate is reproducible and candidates are compared on the same draws. Pipelines are
    searched step by step. Detectors built with a seed keep it.
    """
    steps = getattr(model, "steps", None)
    for step in (steps.values() if isinstance(steps, dict) else [model]):
        if hasattr(step, "seed") and step.seed is None:
            step.seed = 0
    return model


def run_method(method: Method, X: np.ndarray, events: list[dict] | None = None) -> dict:
    """Prequential scores of one method on one stream: ``{"scores", "seconds", ...}``.

    NaN scores (the batch path's warm-up) become the lowest score of the stream: not flagged.
    """
    start = time.perf_counter()
    extra = {}
    if method.kind == "river":
        model = _pin_seed(_with_scaler(method.factory, method.scaler)())
        events = events if events is not None else as_dicts(X)
        scores = np.empty(len(events))
        for i, x in enumerate(events):
            scores[i] = model.score_one(x)
            model.learn_one(x)
    elif method.kind == "batch":
        det = method.factory(X.shape[1])
        parts = [det.process(X[i : i + method.batch_size])
                 for i in range(0, len(X), method.batch_size)]
        scores = np.concatenate([np.asarray(p.score, float) for p in parts])
        extra["flags"] = np.concatenate([np.asarray(p.is_anomaly, bool) for p in parts])
        extra["warming"] = np.concatenate([np.asarray(p.warming_up, bool) for p in parts])
        extra["threshold"] = np.concatenate([np.asarray(p.threshold, float) for p in parts])
    else:
        scores = np.asarray(method.factory(X), float)
    seconds = time.perf_counter() - start
    scores = np.asarray(scores, float)
    bad = ~np.isfinite(scores)
    if bad.any():
        finite = scores[~bad]
        low = finite.min() - 1.0 if finite.size else 0.0
        scores = np.where(np.isposinf(scores), finite.max() + 1.0 if finite.size else 1.0,
                          np.where(bad, low, scores))
    return {"scores": scores, "seconds": np.float64(seconds), **extra}


# -- cache --------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def data_key(X: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(X, float).tobytes())
    h.update(np.ascontiguousarray(y, np.int64).tobytes())
    return h.hexdigest()[:10]


def cache_path(cache_dir: Path, stream: Stream, key: str, method: Method) -> Path:
    return (Path(cache_dir) / f"{_slug(stream.id)}-{key}"
            / f"{_slug(method.name)}-{method.version}.npz")


def prune_cache(cache_dir: Path) -> int:
    """Delete cached results of default methods computed by other code versions; count them."""
    current = {_slug(m.name): m.version for m in default_methods().values()}
    removed = 0
    for path in Path(cache_dir).glob("*/*.npz"):
        method, _, version = path.stem.rpartition("-")
        if method in current and version != current[method]:
            path.unlink()
            removed += 1
    return removed


def save_result(path: Path, result: dict) -> None:
    """Write a cache entry atomically (a uniquely named temporary file, then a rename)."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **result)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- running ------------------------------------------------------------------------------------


def _metrics(y: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    if y.min() == y.max():
        return float("nan"), float("nan")
    return float(roc_auc_score(y, scores)), float(average_precision_score(y, scores))


_WORK: dict = {}  # set before the worker pool forks


def _evaluate_stream(i: int) -> tuple[list[dict], dict]:
    stream: Stream = _WORK["streams"][i]
    methods: list[Method] = _WORK["methods"]
    cache_dir, keep = _WORK["cache_dir"], _WORK["keep"]
    X, y = stream.build()
    X = np.asarray(X, float)
    y = np.asarray(y, int)
    key = data_key(X, y)
    events = None
    rows, kept = [], {}
    for m in methods:
        path = cache_path(cache_dir, stream, key, m) if (cache_dir and m.version) else None
        result = None
        if path is not None and path.exists():
            try:
                with np.load(path) as z:
                    result = {k: z[k] for k in z.files}
            except (OSError, ValueError):
                result = None
        if result is None:
            if m.kind == "river" and events is None:
                events = as_dicts(X)
            result = run_method(m, X, events)
            if path is not None:
                save_result(path, result)
        roc, pr = _metrics(y, result["scores"])
        rows.append({"half": stream.half, "family": stream.family, "kind": stream.kind,
                     "stream": stream.id, "method": m.name, "group": m.group,
                     "roc_auc": roc, "pr_auc": pr, "n_events": len(y), "n_features": X.shape[1],
                     "n_anomalies": int(y.sum()),
                     "events_per_s": len(y) / max(float(result["seconds"]), 1e-9)})
        if keep and stream.id in _WORK.get("plot", ()):
            arrays = kept.setdefault("arrays", [{"stream": stream.id, "y": y}])[0]
            arrays[m.name] = result
        if keep and "flags" in result:
            normal = (y == 0) & ~result["warming"]
            kept.setdefault("far", []).append(
                {"stream": stream.id, "method": m.name, "family": stream.family,
                 "half": stream.half,
                 "n_events": len(y),
                 "normal_decided": int(normal.sum()),
                 "false_alarms": int((result["flags"] & normal).sum())})
    return rows, kept


def run(half: str = "both", methods: dict | Sequence[Method] | None = None, quick: bool = False,
        *, include_defaults: bool | None = None, seeds: int | None = None,
        streams: Sequence[str] | None = None, jobs: int = 1, cache: bool = True,
        out: str | os.PathLike = ROOT / "out" / "evaluation", show_progress: bool = True,
        _extras: dict | None = None) -> pd.DataFrame:
    """Evaluate detectors prequentially on one or both halves; per-stream metrics.

    Parameters
    ----------
    half : {"dev", "test", "both"}
    methods : dict or sequence, optional
        ``{name: factory}`` of River detector factories (each run three ways, behind no scaler,
        ``StandardScaler`` and ``MinMaxScaler``; never cached), or :class:`Method` objects, or
        names of :func:`default_methods` (a name selects every default method that contains
        it, case-insensitive: ``"GMMDetector"`` gives all three scalers). Default: all default
        methods. To cache a candidate, pass ``Method(name, factory, version="v1")``; for the
        daemon's path, ``Method(name, lambda n_features: Detector(...), kind="batch")``.
    quick : bool
        The small subset of :func:`catalogue`.
    include_defaults : bool, optional
        Also run the default methods (the baselines come from the cache). Default: True when
        ``methods`` is given as factories, so candidates are compared with the baselines.
    seeds : int, optional
        Seeds per stream variant.
    streams : sequence of str, optional
        Keep streams whose id contains one of these substrings.
    jobs : int
        Worker processes (at most 2 on a shared machine).
    cache : bool
        Read and write ``<out>/cache``.
    out : path
    show_progress : bool

    Returns
    -------
    pandas.DataFrame
        One row per (stream, method): ``half, family, kind, stream, method, group, roc_auc,
        pr_auc, n_events, n_features, n_anomalies, events_per_s``.
    """
    if half not in ("dev", "test", "both"):
        raise ValueError(f"half must be dev, test or both, got {half!r}")
    defaults = default_methods()
    chosen: list[Method] = []
    if methods is None:
        chosen = list(defaults.values())
    else:
        items = methods.items() if isinstance(methods, dict) else [(None, m) for m in methods]
        factories = False
        for name, m in items:
            if isinstance(m, Method):
                chosen.append(m)
            elif isinstance(m, str):
                hits = [d for d in defaults.values()
                        if d.name.lower() == m.lower() or m.lower() in d.name.lower()]
                if not hits:
                    raise KeyError(f"no method matches {m!r}; choose from {list(defaults)}")
                chosen += [d for d in hits if d not in chosen]
            else:
                factories = True
                chosen += river_methods(name, m)
        if include_defaults if include_defaults is not None else factories:
            chosen = [m for m in defaults.values() if m.name not in {c.name for c in chosen}] \
                + chosen
    selected = [s for s in catalogue(quick, seeds) if half in ("both", s.half)]
    if streams:
        selected = [s for s in selected if any(p in s.id for p in streams)]
    if not selected:
        raise ValueError(f"no stream of the {half} half matches {list(streams or [])}; "
                         "`python scripts/evaluate.py --list` shows the streams and halves")
    _WORK.update(streams=selected, methods=chosen,
                 cache_dir=Path(out) / "cache" if cache else None, keep=_extras is not None,
                 plot=set(plot_streams(selected)) if _extras is not None else set())
    rows: list[dict] = []
    idx = range(len(selected))
    jobs = max(1, min(int(jobs), 2))
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            for r, kept in progress(pool.imap_unordered(_evaluate_stream, idx), len(selected),
                                    "streams", show_progress):
                rows += r
                _merge(_extras, kept)
    else:
        for i in progress(idx, len(selected), "streams", show_progress):
            r, kept = _evaluate_stream(i)
            rows += r
            _merge(_extras, kept)
    df = pd.DataFrame(rows)
    order = {m.name: i for i, m in enumerate(chosen)}
    return df.sort_values(["half", "stream", "method"], key=lambda c: c.map(order)
                          if c.name == "method" else c).reset_index(drop=True)


def _merge(into: dict | None, kept: dict) -> None:
    if into is not None:
        for k, v in kept.items():
            into.setdefault(k, []).extend(v)


# -- summaries ----------------------------------------------------------------------------------


def summary(df: pd.DataFrame, metric: str = "roc_auc") -> pd.DataFrame:
    """Per half and method: mean over families (each family weighs the same) and over streams.

    Columns ``<half> family-mean``, ``<half> stream-mean``, ``<half> worst`` (lowest stream).
    """
    out = {}
    for half, part in df.groupby("half"):
        fam = part.groupby(["method", "family"])[metric].mean().groupby("method").mean()
        out[f"{half} family-mean"] = fam
        out[f"{half} stream-mean"] = part.groupby("method")[metric].mean()
        out[f"{half} worst"] = part.groupby("method")[metric].min()
    table = pd.DataFrame(out)
    methods = list(dict.fromkeys(df["method"]))
    return table.loc[methods]


def compare(df: pd.DataFrame, candidate: str, reference: str = "GMMDetector",
            metric: str = "roc_auc") -> pd.DataFrame:
    """Per half and family: ``candidate`` minus ``reference`` (mean of ``metric``), worst first.

    Also the number of streams where the candidate is better / worse by more than 0.01, so a
    change that helps on average but breaks a few streams shows.

    Examples
    --------
    >>> df = run("dev", {"K5": lambda: GMMDetector(max_components=5)}, quick=True)  # doctest: +SKIP
    >>> compare(df, "K5 (MinMax)", "GMMDetector (MinMax)")  # doctest: +SKIP
    """
    t = df.pivot_table(index=["half", "family", "stream"], columns="method", values=metric)
    d = (t[candidate] - t[reference]).rename("delta").reset_index()
    out = d.groupby(["half", "family"]).agg(
        delta=("delta", "mean"), better=("delta", lambda v: int((v > 0.01).sum())),
        worse=("delta", lambda v: int((v < -0.01).sum())), streams=("delta", "size"))
    out = out.sort_values(["half", "delta"])
    total = d.groupby("half").agg(
        delta=("delta", "mean"), better=("delta", lambda v: int((v > 0.01).sum())),
        worse=("delta", lambda v: int((v < -0.01).sum())), streams=("delta", "size"))
    total.index = pd.MultiIndex.from_tuples([(h, "**all streams**") for h in total.index])
    parts = [pd.concat([out.loc[[h]], total.loc[[h]]]) for h in total.index.get_level_values(0)]
    return pd.concat(parts)


def family_table(df: pd.DataFrame, metric: str = "roc_auc") -> pd.DataFrame:
    """Family x method mean of ``metric``, plus a mean row (over families)."""
    methods = list(dict.fromkeys(df["method"]))
    t = df.pivot_table(index="family", columns="method", values=metric, aggfunc="mean")[methods]
    counts = df.groupby("family")["stream"].nunique()
    t.index = [f"{f} ({counts[f]})" for f in t.index]
    t.loc["**mean over families**"] = t.mean()
    return t


def stream_table(df: pd.DataFrame, metric: str = "roc_auc") -> pd.DataFrame:
    methods = list(dict.fromkeys(df["method"]))
    t = df.pivot_table(index="stream", columns="method", values=metric, aggfunc="mean")[methods]
    t.loc["**mean over streams**"] = t.mean()
    return t


def _roc_by_stream(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """ROC-AUC per stream (rows) and method (columns), and the baselines' names."""
    t = df.pivot_table(index="stream", columns="method", values="roc_auc")
    return t, [m for m in df.loc[df["group"] == "baseline", "method"].unique()]


def gaps(df: pd.DataFrame, method: str) -> pd.Series:
    """Per stream: best baseline's ROC-AUC minus ``method``'s (positive = behind)."""
    t, base = _roc_by_stream(df)
    return (t[base].max(axis=1) - t[method]).sort_values(ascending=False)


def roc_auc_standard_error(auc, n_anomalies, n_normal) -> np.ndarray:
    """Standard error of an ROC-AUC from its value and class sizes (Hanley & McNeil 1982).

    Examples
    --------
    >>> float(np.round(roc_auc_standard_error(0.9, 20, 2000), 3))
    0.046
    """
    a = np.clip(np.asarray(auc, float), 1e-9, 1 - 1e-9)
    na, nn = np.asarray(n_anomalies, float), np.asarray(n_normal, float)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (na - 1) * (q1 - a * a) + (nn - 1) * (q2 - a * a)) / (na * nn)
    return np.sqrt(np.maximum(var, 0.0))


def significant_gaps(df: pd.DataFrame, method: str, z: float = 2.0) -> pd.Series:
    """The streams on which the best baseline is ahead of ``method`` by more than 0.01 ROC-AUC
    *and* by more than ``z`` standard errors of the difference (:func:`gaps`' gap, positive).

    On a stream of a few dozen anomalies an ROC-AUC is uncertain by a few hundredths, and the
    best of five baselines is the luckiest of five, so "behind by > 0.01" counts noise too. The
    two AUCs' errors are combined as if independent (the scores are of the same events, so
    this overstates the error of the difference), and Hanley & McNeil's error is itself about
    1.3 times the spread of resampled Gaussian scores: a conservative count.
    """
    t, base = _roc_by_stream(df)
    return _beyond_noise(df, method, t[base].idxmax(axis=1), gaps(df, method), z)


def _beyond_noise(df: pd.DataFrame, method: str, other: pd.Series, gap: pd.Series,
                  z: float) -> pd.Series:
    """The gaps over 0.01 that exceed ``z`` standard errors of the difference between
    ``method`` and the method ``other[stream]`` (see :func:`significant_gaps`)."""
    rows = df.drop_duplicates(["stream", "method"]).set_index(["stream", "method"])
    out = {}
    for stream, g in gap[gap > 0.01].items():
        mine, theirs = rows.loc[(stream, method)], rows.loc[(stream, other[stream])]
        na = mine["n_anomalies"]
        nn = mine["n_events"] - na
        se = np.hypot(roc_auc_standard_error(mine["roc_auc"], na, nn),
                      roc_auc_standard_error(theirs["roc_auc"], na, nn))
        if g > z * se:
            out[stream] = g
    return pd.Series(out, dtype=float).sort_values(ascending=False)


def noise_floor(df: pd.DataFrame, method: str = "GMMDetector",
                reference: str = NOISE_REFERENCE, z: float = 2.0) -> dict[str, int] | None:
    """How often ``method`` is "behind" itself: the streams on which ``reference`` (the same
    detector, seeded 1 instead of 0) is ahead by more than 0.01 ROC-AUC, and by more than ``z``
    standard errors too (as :func:`significant_gaps` counts them against the baselines).

    Nothing about the detector changes but its random initialisation, so these counts are
    what "> 0.01 behind" measures of the noise alone, against one rival where the baselines
    are five. None when the reference was not run.

    Examples
    --------
    >>> df = pd.DataFrame({"stream": ["a", "a", "b", "b"], "method": ["m", "r", "m", "r"],
    ...                    "roc_auc": [0.80, 0.85, 0.90, 0.90], "n_events": 1000,
    ...                    "n_anomalies": 20})
    >>> noise_floor(df, "m", "r")
    {'streams': 2, 'behind': 1, 'differ': 1, 'significant': 0}
    """
    t = df.pivot_table(index="stream", columns="method", values="roc_auc")
    if method not in t or reference not in t:
        return None
    t = t[[method, reference]].dropna()
    gap = t[reference] - t[method]
    other = pd.Series(reference, index=t.index)
    return {"streams": len(t), "behind": int((gap > 0.01).sum()),
            "differ": int((gap.abs() > 0.01).sum()),
            "significant": len(_beyond_noise(df, method, other, gap, z))}


def markdown_table(table: pd.DataFrame, fmt: str = ".3f", first: str = "stream",
                   bold: str = "row") -> str:
    """README-ready markdown; the best value of each row (``bold="column"``: column) in bold."""
    cols = list(table.columns)
    lines = [f"| {first} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    col_best = table.apply(pd.to_numeric, errors="coerce").max()
    for name, row in table.iterrows():
        vals = pd.to_numeric(row, errors="coerce")
        best = vals.max()
        raw = row
        if bold == "column":
            best = col_best
        elif bold == "none":
            best = float("nan")
        cells = []
        for c in cols:
            v = vals[c]
            text = format(v, fmt) if np.isfinite(v) else (str(raw[c]) if isinstance(
                raw[c], str) else "-")
            top = best[c] if bold == "column" else best
            cells.append(f"**{text}**" if np.isfinite(v) and v == top else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)



# -- River's Shuttle protocol, per-event speed, batch throughput ------------------------------


def shuttle_protocol(out: Path, cache: bool = True, show_progress: bool = True,
                     seeds: Sequence[int] = (0,)) -> pd.DataFrame:
    """River's Shuttle protocol: ``scaler | detector``, score then learn, all 49,097 events.

    ``first 10k`` is River's ``RollingROCAUC(10_000)`` after the first 10,000 events (the
    ROC-AUC of those events), ``all`` the ROC-AUC over the whole stream. GMMDetector (once per
    seed in ``seeds``), HalfSpaceTrees(seed=42) and LODA(seed=42), each behind no scaler,
    ``StandardScaler`` and ``MinMaxScaler``. Cached like the suite (baselines by version,
    streamgmm by source hash and seed).
    """
    from river import metrics

    bv = BASELINE_VERSION
    methods, labels = [], []
    for seed in seeds:
        ours = river_methods("GMMDetector", functools.partial(GMMDetector, seed=seed),
                             f"{streamgmm_version()}.s{seed}", "streamgmm")
        methods += ours
        labels += ["GMMDetector" + (f" seed={seed}" if len(seeds) > 1 else "")] * len(ours)
    for name, factory in (("HST", lambda: anomaly.HalfSpaceTrees(seed=42)),
                          ("LODA", lambda: anomaly.LODA(seed=42))):
        theirs = river_methods(name, factory, bv, "shuttle")
        methods += theirs
        labels += [name] * len(theirs)
    stream = Stream("Shuttle", "Shuttle", "real", _bind(_shuttle, None))
    X, y = stream.build()
    key = data_key(X, y)
    events = None
    rows = []
    for m, label in progress(list(zip(methods, labels, strict=True)), len(methods),
                             "Shuttle protocol", show_progress):
        path = cache_path(out / "cache", stream, key, m) if cache else None
        if path is not None and path.exists():
            with np.load(path) as z:
                scores = z["scores"]
        else:
            events = events if events is not None else as_dicts(X)
            result = run_method(m, X, events)
            scores = result["scores"]
            if path is not None:
                save_result(path, result)
        rolling = metrics.RollingROCAUC(window_size=10_000)
        for yt, sc in zip(y[:10_000], scores[:10_000], strict=True):
            rolling.update(bool(yt), float(sc))
        rows.append({"detector": label, "scaler": m.scaler, "first 10k": rolling.get(),
                     "all": float(roc_auc_score(y, scores))})
    return pd.DataFrame(rows)


def _interleaved_speed(factories: dict[str, Callable], events: list[dict],
                       block: int = 1000) -> dict[str, float]:
    """events/s of ``score_one`` + ``learn_one`` per model, run block by block in turn.

    Alternating blocks of ``block`` events between the models makes them share whatever else
    the machine is doing, so the ratio is fair on a busy machine.
    """
    models = {k: f() for k, f in factories.items()}
    spent = dict.fromkeys(models, 0.0)
    for i in range(0, len(events), block):
        part = events[i : i + block]
        for name, model in models.items():
            start = time.perf_counter()
            for x in part:
                model.score_one(x)
                model.learn_one(x)
            spent[name] += time.perf_counter() - start
    return {k: len(events) / v for k, v in spent.items()}


def per_event_speed(quick: bool = False, repeats: int | None = None) -> pd.DataFrame:
    """GMMDetector vs HalfSpaceTrees (both defaults, raw dicts): Shuttle and 30 features.

    Each pair runs ``repeats`` times (3; 1 with ``quick``); the row with the median ratio is
    kept, as the machine may be shared.
    """
    repeats = repeats if repeats is not None else (1 if quick else 3)
    X_sh, _ = _shuttle(10_000 if quick else None)
    sh = [{f"f{j + 1}": float(v) for j, v in enumerate(row)} for row in X_sh]
    X30, _ = syn.correlated(5000 if quick else 20_000, 30, seed=11)
    rows = []
    for name, events in (("Shuttle (9 features)", sh), ("correlated (30 features)",
                                                         as_dicts(X30))):
        runs = []
        for _ in range(repeats):
            eps = _interleaved_speed({"GMMDetector": GMMDetector,
                                      "HalfSpaceTrees": lambda: anomaly.HalfSpaceTrees(seed=42)},
                                     events)
            runs.append({"stream": name, "events": len(events),
                         **{f"{k} ev/s": v for k, v in eps.items()},
                         "ratio": eps["GMMDetector"] / eps["HalfSpaceTrees"]})
        rows.append(sorted(runs, key=lambda r: r["ratio"])[len(runs) // 2])
    return pd.DataFrame(rows)


def batch_throughput(n: int) -> dict[str, float]:
    """events/s of GMMDetector's batch path (``score_many`` + ``learn_many``), steady state."""
    X, _ = syn.mixture_with_outliers(n, contamination=0.01, seed=99)
    frame = pd.DataFrame(as_dicts(X))
    out = {}
    for chunk in (1000, 10_000):
        model = GMMDetector()
        model.learn_many(frame.iloc[: n // 10])
        tail = frame.iloc[n // 10 :]
        parts = [tail.iloc[i : i + chunk] for i in range(0, len(tail), chunk)]
        start = time.perf_counter()
        for part in parts:
            model.score_many(part)
            model.learn_many(part)
        out[f"score_many + learn_many, chunks of {chunk:,}"] = len(tail) / (
            time.perf_counter() - start)
    return out


# -- false alarms, goals -----------------------------------------------------------------------


# streams whose normal data changes: a batch that straddles the change is scored by the old
# model, so their false alarms measure adaptation, not the threshold; reported apart
CHANGING_FAMILIES = {"abrupt drift", "gradual drift", "new mode", "wide abrupt drift",
                     "wide gradual drift"}


def false_alarm_check(far_rows: list[dict], min_events: int = 5000) -> dict[str, dict]:
    """Realised false-alarm rate of each batch-path method on the normal decided events.

    Pooled over the stationary streams (not :data:`CHANGING_FAMILIES`) with at least
    ``min_events`` events: shorter ones have too few decided events for a rate of 1e-3 to be
    measured. The changing streams' pooled rate is returned too (``"changing rate"``).
    """
    far = pd.DataFrame(far_rows)
    out: dict[str, dict] = {}
    if far.empty:
        return out
    target = float(replay_detector(1).false_alarm_rate)
    for method, rows in far.groupby("method", sort=False):
        long = rows[rows["n_events"] >= min_events].copy()
        long["rate"] = long["false_alarms"] / long["normal_decided"].clip(lower=1)
        changing = long["family"].isin(CHANGING_FAMILIES)
        still, moved = long[~changing], long[changing]
        decided, alarms = int(still["normal_decided"].sum()), int(still["false_alarms"].sum())
        out[method] = {
            "target": target, "streams": len(still), "decided": decided, "alarms": alarms,
            "rate": alarms / decided if decided else float("nan"),
            "median stream rate": float(still["rate"].median()) if len(still) else float("nan"),
            "changing streams": len(moved),
            "changing rate": float(moved["false_alarms"].sum()
                                   / max(1, moved["normal_decided"].sum())),
            "table": long}
    return out


def goals(df: pd.DataFrame, shuttle: pd.DataFrame | None, speed: pd.DataFrame | None,
          far: dict | None) -> list[str]:
    """The issue's goals, yes/NO with the numbers (test half where the issue says so)."""
    lines = []
    test = df[df["half"] == "test"]
    ours = df.loc[df["group"] == "streamgmm", "method"]
    gmm = [m for m in dict.fromkeys(ours) if m.startswith("GMMDetector")]
    base = list(dict.fromkeys(df.loc[df["group"] == "baseline", "method"]))

    def mark(ok):
        return "yes" if ok else "NO"

    if len(test) and base:
        for metric, label in (("roc_auc", "ROC-AUC"), ("pr_auc", "PR-AUC")):
            s = summary(test, metric)["test family-mean"]
            best_b = s[base].idxmax()
            for m in gmm:
                lines.append(f"- test half, best mean {label} ({m}): {mark(s[m] > s[base].max())}"
                             f" ({s[m]:.3f}; best baseline {best_b} {s[best_b]:.3f})")
        fam = test.groupby(["family", "method"])["roc_auc"].mean().unstack()
        for m in gmm:
            g = gaps(test, m)
            fg = (fam[base].max(axis=1) - fam[m]).sort_values(ascending=False)
            lines.append(f"- test half, never > 0.01 ROC-AUC behind the best baseline ({m}): "
                         f"{mark(g.max() <= 0.01)} (worst {g.index[0]} {g.iloc[0]:+.3f}; "
                         f"{int((g > 0.01).sum())} of {len(g)} streams behind by > 0.01, "
                         f"{len(significant_gaps(test, m))} of them by > 2 standard errors; "
                         f"ahead by > 0.01 on {int((g < -0.01).sum())}; "
                         f"per family mean, worst {fg.index[0]} {fg.iloc[0]:+.3f})")
        floor = noise_floor(test)
        if floor:
            lines.append(f"  - noise floor: GMMDetector is behind itself seeded 1 instead of 0 "
                         f"by > 0.01 on {floor['behind']} of {floor['streams']} test streams "
                         f"({floor['significant']} of them by > 2 standard errors; the two "
                         f"differ by > 0.01 on {floor['differ']})")
    for half, part in df.groupby("half"):
        s = summary(part, "roc_auc")[f"{half} family-mean"]
        vals = s[[m for m in gmm if m in s.index]]
        if len(vals) == 3:
            spread = vals.max() - vals.min()
            lines.append(f"- {half} half, scaler moves mean ROC-AUC by < 0.01: "
                         f"{mark(spread < 0.01)} ({spread:.3f}: "
                         + ", ".join(f"{k} {v:.3f}" for k, v in vals.items()) + ")")
    if shuttle is not None and len(shuttle):
        want = {"minmax": (0.97, 0.98), "standard": (0.98, 0.99), "none": (0.98, 0.99)}
        ours = shuttle[shuttle["detector"].str.startswith("GMMDetector")]
        n_seeds = ours["detector"].nunique()
        for sc, (a, b) in want.items():
            g = ours[ours["scaler"] == sc]
            f10, al = g["first 10k"].min(), g["all"].min()
            seeds = f", the narrowest of {n_seeds} seeds" if n_seeds > 1 else ""
            lines.append(f"- Shuttle protocol, scaler {sc}: >= {a} first 10k and >= {b} all: "
                         f"{mark(f10 >= a and al >= b)} ({f10:.4f} / {al:.4f}{seeds})")
    if speed is not None and len(speed):
        for _, r in speed.iterrows():
            lines.append(f"- score_one + learn_one >= 1.5x HalfSpaceTrees on {r['stream']}: "
                         f"{mark(r['ratio'] >= 1.5)} ({r['ratio']:.2f}x)")
    for method, f in (far or {}).items():
        lo, hi = 0.75 * f["target"], 1.25 * f["target"]
        lines.append(f"- {method}, false_alarm_rate={f['target']:g}: realised rate within "
                     f"±25 % on normal events ({f['streams']} stationary streams of >= 5000 "
                     f"events): {mark(lo <= f['rate'] <= hi)} ({f['rate']:.2e}: "
                     f"{f['alarms']} false alarms in {f['decided']:,} decided normal events;"
                     f" median per stream {f['median stream rate']:.2e}; on the "
                     f"{f['changing streams']} streams whose normal data changes "
                     f"{f['changing rate']:.2e}; per stream in false_alarms_<half>.csv)")
    return lines


# -- plots --------------------------------------------------------------------------------------


PLOT_FAMILIES = ["Shuttle", "abrupt drift", "digits", "wide gradual drift", "correlated",
                 "iris", "LED", "constant features"]


def plot_streams(selected: Sequence[Stream]) -> list[str]:
    """A few streams to plot: the longest (first by id) of each of :data:`PLOT_FAMILIES`."""
    chosen = []
    for fam in PLOT_FAMILIES:
        cands = [s for s in selected if s.family == fam]
        if cands:
            chosen.append(cands[-1].id if fam != "digits" else cands[0].id)
    return chosen


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_stream(arrays: dict, out: Path) -> None:
    """Each batch-path Detector's score, threshold and flags; GMMDetector's River score below."""
    plt = _plt()
    cut = 10_000  # longer streams: their first 10,000 events, or nothing can be seen
    y = arrays["y"][:cut]
    t = np.arange(len(y))
    arrays = {k: ({kk: vv[:cut] for kk, vv in v.items() if np.ndim(vv)} if isinstance(v, dict)
                  else v) for k, v in arrays.items()}
    batch = [k for k, v in arrays.items() if isinstance(v, dict) and "flags" in v]
    fig, axes = plt.subplots(len(batch) + 1, 1, figsize=(11, 2.8 * (len(batch) + 1)),
                             sharex=True, squeeze=False)
    for ax, name in zip(axes[:-1, 0], batch, strict=True):
        rep = arrays[name]
        score, thr, flags = rep["scores"], rep["threshold"], rep["flags"].astype(bool)
        ax.plot(t, score, lw=0.4, color="0.55", label="score = -log p(x)")
        ax.plot(t, thr, lw=1.2, color="tab:orange", label="adaptive threshold")
        ax.scatter(t[flags], score[flags], s=8, color="tab:red", label="flagged", zorder=3)
        ax.scatter(t[y == 1], score[y == 1], s=28, facecolors="none", edgecolors="k",
                   label="true anomaly", zorder=4)
        lo, hi = np.percentile(score, [0.5, 99.5])
        ax.set_ylim(lo - 1, hi + 0.3 * abs(hi) + 1)
        ax.set_title(f"{arrays['stream']}: {name} ({int(flags.sum())} flagged, "
                     f"{int(y.sum())} true anomalies"
                     + (f", first {cut:,} events)" if len(y) == cut else ")"), fontsize=9)
        ax.legend(loc="upper left", fontsize=7, ncol=4)
    ax = axes[-1, 0]
    for name, colour in (("GMMDetector", "tab:blue"), ("GMMDetector (MinMax)", "tab:green")):
        if name in arrays:
            ax.plot(t, arrays[name]["scores"], lw=0.4, color=colour, alpha=0.7, label=name)
            ax.scatter(t[y == 1], arrays[name]["scores"][y == 1], s=20, facecolors="none",
                       edgecolors=colour, zorder=4)
    ax.set_ylabel("River score_one")
    ax.set_xlabel("event (circles: true anomalies)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"stream_{_slug(arrays['stream'])}.png", dpi=100)
    plt.close(fig)


def plot_summary(df: pd.DataFrame, out: Path) -> None:
    """Per-stream ROC-AUC of every detector (dots), family means (ticks), dev vs test."""
    plt = _plt()
    df = df[df["group"] != "reference"]
    methods = list(dict.fromkeys(df["method"]))
    halves = [h for h in ("dev", "test") if h in set(df["half"])]
    fig, axes = plt.subplots(1, len(halves), figsize=(6.5 * len(halves), 4.8), sharey=True,
                             squeeze=False)
    rng = np.random.default_rng(0)
    for ax, half in zip(axes[0], halves, strict=True):
        part = df[df["half"] == half]
        for i, m in enumerate(methods):
            v = part.loc[part["method"] == m, "roc_auc"].to_numpy()
            ax.scatter(i + rng.uniform(-0.3, 0.3, len(v)), v, s=3, alpha=0.25, color="0.4")
            fam = part[part["method"] == m].groupby("family")["roc_auc"].mean()
            ax.scatter(np.full(len(fam), i), fam, marker="_", s=120, color="tab:blue")
            ax.scatter([i], [fam.mean()], marker="D", s=40, color="tab:red", zorder=3)
        ax.set_xticks(range(len(methods)), methods, rotation=40, ha="right", fontsize=8)
        ax.set_title(f"{half} half: {part['stream'].nunique()} streams, "
                     f"{part['family'].nunique()} families", fontsize=10)
        ax.axhline(0.5, color="0.8", lw=0.8)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("ROC-AUC (dots: streams, ticks: families, diamond: mean)")
    fig.tight_layout()
    fig.savefig(out / "summary_roc_auc.png", dpi=110)
    plt.close(fig)


# -- command line -------------------------------------------------------------------------------


def report(df: pd.DataFrame, out: Path, extras: dict | None = None) -> str:
    """The markdown report: per half, per-family tables and worst streams; files in ``out``."""
    text = []
    everything, df = df, df[df["group"] != "reference"]  # the reference only in the goals
    for half in [h for h in ("dev", "test") if h in set(df["half"])]:
        part = df[df["half"] == half]
        n_streams, n_fam = part["stream"].nunique(), part["family"].nunique()
        for metric, label in (("roc_auc", "ROC-AUC"), ("pr_auc", "PR-AUC")):
            text.append(f"\n### {half} half: {label} per family (mean over its variants; "
                        f"{n_streams} streams, {n_fam} families)\n")
            text.append(markdown_table(family_table(part, metric), first="family (streams)"))
            (out / f"{half}_streams_{metric}.md").write_text(
                markdown_table(stream_table(part, metric)) + "\n")
        text.append(f"\n### {half} half: means\n")
        s = pd.concat([summary(part, "roc_auc").add_prefix("ROC "),
                       summary(part, "pr_auc").add_prefix("PR ")], axis=1)
        s.columns = [c.replace(f"{half} ", "") for c in s.columns]
        s = s.drop(columns=[c for c in s.columns if "worst" in c and "PR" in c])
        text.append(markdown_table(s, first="method", bold="column"))
        if "GMMDetector" in set(part["method"]) and (part["group"] == "baseline").any():
            g = gaps(part, "GMMDetector")
            text.append(f"\nworst {half} streams for GMMDetector (best baseline minus it):")
            for sid, v in g.head(8).items():
                text.append(f"- {sid}: {v:+.3f}")
    halves = "_".join(sorted(set(df["half"])))
    everything.to_csv(out / f"results_{halves}.csv", index=False)
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--half", choices=("dev", "test", "both"), default="both",
                        help="which half of the streams to run and print (default both)")
    parser.add_argument("--quick", action="store_true",
                        help="a small subset of the streams (one seed, one fraction)")
    parser.add_argument("--seeds", type=int, help="seeds per stream variant (default 2)")
    parser.add_argument("--methods", nargs="*",
                        help="subset of the detectors: each keeps the detectors whose name "
                             "contains it, case-insensitive (e.g. GMMDetector IForest); "
                             "default all")
    parser.add_argument("--streams", nargs="*", help="keep streams whose id contains these")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, at most 2")
    parser.add_argument("--no-cache", action="store_true", help="recompute everything")
    parser.add_argument("--out", default=str(ROOT / "out" / "evaluation"),
                        help="results, plots and the cache (default out/evaluation)")
    parser.add_argument("--list", action="store_true", help="list streams and their halves")
    parser.add_argument("--prune-cache", action="store_true",
                        help="delete cached results of every other streamgmm source and "
                             "baseline version (also those of other worktrees that share "
                             "this --out)")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    parser.add_argument("--no-speed", action="store_true",
                        help="skip the speed sections (per event and batch path)")
    parser.add_argument("--no-shuttle", action="store_true",
                        help="skip River's Shuttle protocol (49,097 events, 9 runs, cached)")
    parser.add_argument("--shuttle-seeds", default="0",
                        help="GMMDetector seeds for the Shuttle protocol, comma-separated "
                             "(default 0; the goals take the narrowest, e.g. 0,1,2,3,4,16)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.prune_cache:
        print(f"removed {prune_cache(out / 'cache')} stale cached results")
    if args.list:
        for s in catalogue(args.quick, args.seeds):
            print(f"{s.half:4}  {s.family:20}  {s.id}")
        return 0
    methods = args.methods or None
    extras: dict = {}
    started = time.perf_counter()
    try:
        df = run(args.half, methods, args.quick, seeds=args.seeds, streams=args.streams,
                 jobs=args.jobs, cache=not args.no_cache, out=out, _extras=extras)
    except (KeyError, ValueError) as exc:  # a --methods or --streams that selects nothing
        parser.error(str(exc).strip("'\""))
    text = report(df, out, extras)
    shuttle = speed = None
    if not args.no_shuttle:
        shuttle = shuttle_protocol(out, cache=not args.no_cache,
                                   seeds=[int(s) for s in args.shuttle_seeds.split(",")])
        table = shuttle.pivot(index="detector", columns="scaler", values=["first 10k", "all"])
        table.columns = [f"{a} ({b})" for a, b in table.columns]
        text += ("\n\n### River's Shuttle protocol (score then learn; RollingROCAUC(10_000) "
                 "after 10,000 events, ROC-AUC over all 49,097)\n\n")
        text += markdown_table(table, first="detector", bold="column")
    if not args.no_speed:
        speed = per_event_speed(args.quick)
        text += ("\n\n### score_one + learn_one, defaults, raw dicts, side by side "
                 "(blocks of 1000 events in turn; median ratio of 3 runs)\n\n")
        shown = speed.set_index("stream").astype(object)
        for c in shown.columns:
            shown[c] = [f"{v:.2f}x" if c == "ratio" else f"{v:,.0f}" for v in speed[c]]
        text += markdown_table(shown, first="stream", bold="none")
        thr = batch_throughput(50_000 if args.quick else 200_000)
        text += "\n\n### GMMDetector batch path (4 features, steady state)\n\n"
        text += "| path | events/s |\n|---|---|\n"
        text += "\n".join(f"| {k} | {v:,.0f} |" for k, v in thr.items())
    far = false_alarm_check(extras.get("far", []))
    if far:
        pd.concat([f["table"] for f in far.values()]).to_csv(
            out / f"false_alarms_{args.half}.csv", index=False)
    text += "\n\n### goals\n\n" + "\n".join(goals(df, shuttle, speed, far))
    if not args.no_plots:
        for arrays in extras.get("arrays", []):
            plot_stream(arrays, out)
        plot_summary(df, out)
        text += f"\n\nplots: {out.resolve()}"
    text += f"\n\n(streamgmm source {streamgmm_version()}; {time.perf_counter() - started:.0f} s)"
    print(text)
    (out / f"report_{args.half}{'_quick' if args.quick else ''}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
