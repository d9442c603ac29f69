"""``streamgmm demo``: the whole pipeline on an embedded broker, with a live console and a plot.

The demo starts the embedded Kafka-protocol broker (:mod:`streamgmm.embedded`), produces a
synthetic stream (:func:`synthetic_stream`: a 3-component Gaussian mixture in three features with
injected far-out anomalies, a few unscorable messages and a level shift two thirds of the way in)
and runs the real :class:`streamgmm.service.Daemon` on it — exactly-once transactions, dead
letters, partition states in a state topic, Prometheus metrics on localhost. A console line per
second shows events/s, the threshold, anomalies and drift; at the end it prints precision and
recall against the injected anomalies and writes a PNG plot of the scores.

Examples
--------
>>> events = list(synthetic_stream(1000, anomaly_rate=0.01, invalid_rate=0.002, seed=1))
>>> len(events)
1000
>>> sum(label for _, label in events if label is not None)
11
>>> sum(label is None for _, label in events)       # unscorable messages carry no label
2
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import orjson

__all__ = ["synthetic_stream", "run_demo", "DemoRecorder", "FIELDS"]

logger = logging.getLogger(__name__)

FIELDS = ("cpu", "latency_ms", "bytes_out")
_MEANS = np.array([[20.0, 50.0, 300.0], [60.0, 120.0, 900.0], [35.0, 200.0, 150.0]])
_SCALES = np.array([[4.0, 8.0, 40.0], [6.0, 15.0, 90.0], [5.0, 25.0, 30.0]])
_WEIGHTS = np.array([0.5, 0.3, 0.2])


def synthetic_stream(
    n_events: int, anomaly_rate: float = 0.005, invalid_rate: float = 0.002,
    shift_at: float | None = 2 / 3, seed: int = 0,
) -> Iterator[tuple[bytes, bool | None]]:
    """Yield ``(json_bytes, is_injected_anomaly)``; ``None`` labels an unscorable message.

    Normal events come from a fixed 3-component mixture over :data:`FIELDS`; anomalies are
    7–12 standard deviations from their component in a random direction; from ``shift_at`` (a
    fraction of the stream) on, every component's mean moves by 3 standard deviations of
    ``latency_ms`` — a drift the model should follow.
    """
    rng = np.random.default_rng(seed)
    shift_index = None if shift_at is None else int(shift_at * n_events)
    for i in range(n_events):
        if rng.random() < invalid_rate:
            bad = (b'{"cpu": "high"}', b"not json at all", b'{"cpu": 1}', b"[1, 2, 3]")
            yield bad[int(rng.integers(len(bad)))], None
            continue
        k = int(rng.choice(3, p=_WEIGHTS))
        mean, scale = _MEANS[k].copy(), _SCALES[k]
        if shift_index is not None and i >= shift_index:
            mean[1] += 3 * scale[1]
        is_anomaly = bool(rng.random() < anomaly_rate)
        if is_anomaly:
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            x = mean + direction * rng.uniform(7, 12) * scale
        else:
            x = rng.normal(mean, scale)
        event = {"id": i, "host": f"web-{k}", **{f: round(float(v), 3) for f, v in zip(
            FIELDS, x, strict=True)}}
        yield orjson.dumps(event), is_anomaly


@dataclass
class DemoRecorder:
    """Collects per-event results from the daemon's ``on_batch`` hook (thread-safe)."""

    ids: list[np.ndarray] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    thresholds: list[np.ndarray] = field(default_factory=list)
    flagged: list[np.ndarray] = field(default_factory=list)
    warming: list[np.ndarray] = field(default_factory=list)
    drift_at: list[int] = field(default_factory=list)
    last_threshold: float = float("nan")
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, daemon, records, extraction, result) -> None:
        if result is None:
            return
        ids = np.array([event.get("id", -1) for event in extraction.events], dtype=np.int64)
        with self.lock:
            self.ids.append(ids)
            self.scores.append(np.asarray(result.score, dtype=float))
            self.thresholds.append(np.asarray(result.threshold, dtype=float))
            self.flagged.append(np.asarray(result.is_anomaly, dtype=bool))
            self.warming.append(np.asarray(result.warming_up, dtype=bool))
            if len(result.threshold):
                self.last_threshold = float(result.threshold[-1])
            drift = getattr(result, "drift", None)
            if drift is not None and getattr(drift, "drift_detected", False):
                self.drift_at.append(int(ids[-1]) if len(ids) else 0)

    def arrays(self) -> dict[str, np.ndarray]:
        with self.lock:
            if not self.ids:
                empty = np.array([])
                return {k: empty for k in ("ids", "scores", "thresholds", "flagged", "warming")}
            out = {
                "ids": np.concatenate(self.ids), "scores": np.concatenate(self.scores),
                "thresholds": np.concatenate(self.thresholds),
                "flagged": np.concatenate(self.flagged), "warming": np.concatenate(self.warming),
            }
        order = np.argsort(out["ids"], kind="stable")
        return {k: v[order] for k, v in out.items()}


def _produce(bootstrap: str, topic: str, stream, labels: dict, rate: float,
             stop: threading.Event, produced: list) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks=1)
    start = time.monotonic()
    futures = []
    try:
        for n, (value, label) in enumerate(stream):
            if stop.is_set():
                break
            if label is not None:
                labels[n] = label
            futures.append(producer.send(topic, value=value, key=str(n % 8).encode()))
            produced[0] = n + 1
            ahead = (n + 1) / rate - (time.monotonic() - start)
            if ahead > 0.005:
                stop.wait(ahead)
        for fut in futures:
            fut.get(timeout=30)
    finally:
        producer.close(timeout=5)


def _summary(recorder: DemoRecorder, labels: dict) -> dict[str, float]:
    data = recorder.arrays()
    ids = data["ids"]
    truth = np.array([labels.get(int(i), False) for i in ids], dtype=bool)
    scored = ~data["warming"]
    flagged = data["flagged"] & scored
    tp = int(np.count_nonzero(flagged & truth))
    fp = int(np.count_nonzero(flagged & ~truth))
    fn = int(np.count_nonzero(~flagged & truth & scored))
    return {
        "scored": int(np.count_nonzero(scored)), "warming": int(np.count_nonzero(~scored)),
        "injected": int(np.count_nonzero(truth & scored)), "flagged": int(flagged.sum()),
        "true_positives": tp, "false_positives": fp, "false_negatives": fn,
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
    }


def _plot(path: str, recorder: DemoRecorder, labels: dict, shift_index: int | None) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'streamgmm[plots]'); no plot")
        return None
    data = recorder.arrays()
    ids, scores = data["ids"], data["scores"]
    scored = ~data["warming"]
    truth = np.array([labels.get(int(i), False) for i in ids], dtype=bool)
    fig, ax = plt.subplots(figsize=(11, 4.5), dpi=110)
    ax.scatter(ids[scored], scores[scored], s=2, c="0.6", label="events (score = −log p)")
    ax.plot(ids[scored], data["thresholds"][scored], c="tab:blue", lw=1.2, label="threshold")
    hit = data["flagged"] & scored
    ax.scatter(ids[hit], scores[hit], s=18, facecolors="none", edgecolors="tab:red",
               label="flagged")
    ax.scatter(ids[truth & scored], scores[truth & scored], s=6, c="k", marker="x",
               label="injected anomaly")
    if shift_index is not None:
        ax.axvline(shift_index, c="tab:orange", ls="--", lw=1, label="level shift")
    for k, at in enumerate(recorder.drift_at):
        ax.axvline(at, c="tab:green", ls=":", lw=1, label="drift detected" if k == 0 else None)
    ax.set_yscale("symlog")
    ax.set_xlabel("event")
    ax.set_ylabel("anomaly score (−log p(x))")
    ax.set_title("streamgmm demo: online Gaussian mixture over a Kafka stream")
    ax.legend(loc="upper left", fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_demo(
    events: int = 30000, rate: float = 1000.0, anomaly_rate: float = 0.005, seed: int = 7,
    plot_path: str | None = "streamgmm-demo.png", metrics_port: int = 0,
    workdir: str | None = None, live: bool = True, out=None,
) -> int:
    """Run the demo; prints to ``out`` (default stdout) and returns the exit code."""
    from streamgmm.config import load_config
    from streamgmm.embedded import EmbeddedBroker
    from streamgmm.metrics import Metrics
    from streamgmm.service import Daemon

    out = out or sys.stdout
    workdir = workdir or tempfile.mkdtemp(prefix="streamgmm-demo-")
    os.makedirs(workdir, exist_ok=True)
    say = lambda text="": print(text, file=out, flush=True)  # noqa: E731
    say(f"streamgmm demo: {events} events at {rate:g}/s, {anomaly_rate:.1%} injected anomalies,"
        " a level shift at 2/3")
    broker = EmbeddedBroker(log_path=os.path.join(workdir, "broker.log")).start()
    metrics = Metrics()
    stop = threading.Event()
    try:
        say(f"  embedded broker  {broker.bootstrap_servers} (Tansu, in memory)")
        port = metrics.serve("127.0.0.1", metrics_port)
        say(f"  metrics          http://127.0.0.1:{port}/metrics")
        config = load_config(None, env={
            "STREAMGMM_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "STREAMGMM_KAFKA__INPUT_TOPIC": "events",
            "STREAMGMM_FEATURES__FIELDS": ",".join(FIELDS),
            "STREAMGMM_THRESHOLD__WARMUP_EVENTS": "1000",
            "STREAMGMM_CHECKPOINT__INTERVAL_SECONDS": "5",
            "STREAMGMM_BATCH__MAX_WAIT_MS": "100",
            "STREAMGMM_MODEL__RANDOM_STATE": str(seed),
        })
        say(f"  state topic      {config.checkpoint.state_topic(config.kafka.group_id)}")
        say(f"  topics           {config.kafka.input_topic} -> {config.kafka.output_topic} "
            f"(anomalies), {config.kafka.dead_letter_topic} (dead letters)")
        from streamgmm.io.kafka import ensure_topics

        ensure_topics(broker.bootstrap_servers, [config.kafka.input_topic,
                                                 config.kafka.output_topic,
                                                 config.kafka.dead_letter_topic], partitions=2)
        recorder = DemoRecorder()
        daemon = Daemon(config, metrics=metrics, on_batch=recorder)
        labels: dict[int, bool] = {}
        produced = [0]
        stream = synthetic_stream(events, anomaly_rate=anomaly_rate, seed=seed)
        producer = threading.Thread(
            target=_produce, name="demo-producer", daemon=True,
            args=(broker.bootstrap_servers, config.kafka.input_topic, stream, labels, rate, stop,
                  produced))
        runner = threading.Thread(target=daemon.run, name="demo-daemon", daemon=True)
        started = time.monotonic()
        producer.start()
        runner.start()
        say()
        last_events, last_time = 0, started
        try:
            while runner.is_alive():
                runner.join(timeout=1.0)
                now = time.monotonic()
                st = daemon.stats
                if live:
                    speed = (st.events - last_events) / max(now - last_time, 1e-9)
                    warming = metrics.value("streamgmm_warming_up") == 1
                    drifts = metrics.value("streamgmm_drift_detected_total") or 0
                    say(f"  t={now - started:5.1f}s  produced {produced[0]:6d}  processed "
                        f"{st.events:6d}  {speed:7.0f} ev/s  threshold "
                        f"{recorder.last_threshold:7.2f}  anomalies {st.anomalies:4d}  "
                        f"dead letters {st.dead_letters:3d}  drift {int(drifts)}"
                        + ("  (warming up)" if warming else ""))
                last_events, last_time = st.events, now
                done = not producer.is_alive() and st.events >= produced[0]
                if done or now - started > max(120.0, 5 * events / rate):
                    daemon.request_stop()
        except KeyboardInterrupt:
            say("interrupted; stopping")
            stop.set()
            daemon.request_stop()
            runner.join(timeout=15)
        elapsed = time.monotonic() - started
        stop.set()
        summary = _summary(recorder, labels)
        st = daemon.stats
        say()
        say(f"summary after {elapsed:.1f} s: {st.events} events ({st.events / elapsed:.0f}/s "
            f"incl. start-up), {st.anomalies} anomalies published, {st.dead_letters} dead letters "
            f"({', '.join(f'{k}={v}' for k, v in sorted(st.dead_letter_reasons.items()))})")
        say(f"  warm-up          {summary['warming']} events learned before scoring")
        say(f"  injected         {summary['injected']} anomalies after warm-up, detector flagged "
            f"{summary['flagged']}")
        say(f"  precision        {summary['precision']:.3f}  ({summary['true_positives']} true, "
            f"{summary['false_positives']} false alarms)")
        say(f"  recall           {summary['recall']:.3f}  ({summary['false_negatives']} missed)")
        say(f"  model            {daemon.detector.n_events_learned} events learned, "
            f"{int(metrics.value('streamgmm_components') or 0)} components, drift detected "
            f"{int(metrics.value('streamgmm_drift_detected_total') or 0)} time(s)")
        if plot_path:
            written = _plot(plot_path, recorder, labels, int(2 / 3 * events))
            if written:
                say(f"  plot             {os.path.abspath(written)}")
        return 0
    finally:
        stop.set()
        metrics.close()
        broker.kill()
