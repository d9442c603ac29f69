"""Metrics: exactly the contract's names, the values the daemon sets, promtool, and serving."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamgmm.features import REASONS
from streamgmm.metrics import Metrics

CONTRACTS = Path(__file__).resolve().parents[1] / "docs" / "contracts.md"


def contract_metrics() -> dict[str, tuple[str, set[str]]]:
    """``name -> (type, labels)`` from the table in docs/contracts.md."""
    out = {}
    for line in CONTRACTS.read_text().splitlines():
        m = re.match(r"^\| `(streamgmm_\w+)` \| (\w+)[^|]*\| ([^|]*)\|", line)
        if m:
            labels = set(re.findall(r"`(\w+)`", m.group(3)))
            out[m.group(1)] = (m.group(2), labels)
    return out


def families(metrics: Metrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}


@dataclass
class Drift:
    mean_log_likelihood: float = -3.5
    log_likelihood_ewma: float = -3.4
    reference_log_likelihood: float = -3.3
    kl_divergence: float = 0.02
    mean_displacement: float = 0.1
    weight_entropy: float = 1.05
    anomaly_rate: float = 0.0012
    target_anomaly_rate: float = 0.001
    drift_detected: bool = False
    n_drifts: int = 0


@dataclass
class Batch:
    """The attributes of detector.BatchResult that the metrics read (see docs/contracts.md)."""

    score: np.ndarray
    is_anomaly: np.ndarray
    threshold: np.ndarray
    warming_up: np.ndarray
    drift: Drift | None = field(default_factory=Drift)


def batch(n=10, anomalies=(3,), threshold=7.5, warming=False, drift=None):
    is_anomaly = np.zeros(n, bool)
    is_anomaly[list(anomalies)] = True
    return Batch(score=np.linspace(0, 9, n), is_anomaly=is_anomaly,
                 threshold=np.full(n, threshold), warming_up=np.full(n, warming),
                 drift=drift if drift is not None else Drift())


def test_the_registry_holds_exactly_the_contract_metrics():
    expected = contract_metrics()
    assert len(expected) == 31  # the table was parsed
    metrics = Metrics()
    metrics.set_model(Mixture(np.array([0.5, 0.5])))  # so that component_weight has a sample
    found = families(metrics)
    names = {}
    for family in found.values():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {k for s in family.samples for k in s.labels} - {"le"}
        names[name] = (family.type, labels)
    assert names == expected


def test_observe_batch_sets_counters_and_gauges():
    metrics = Metrics()
    metrics.observe_batch(batch(10, anomalies=(3, 7), drift=Drift(drift_detected=True)), 0.02)
    metrics.observe_batch(batch(5, anomalies=(), threshold=8.0), 0.001)
    v = metrics.value
    assert v("streamgmm_events_total") == 15
    assert v("streamgmm_anomalies_total") == 2
    assert v("streamgmm_threshold") == 8.0
    assert v("streamgmm_warming_up") == 0
    assert v("streamgmm_batch_duration_seconds_count") == 2
    assert v("streamgmm_batch_duration_seconds_sum") == pytest.approx(0.021)
    assert v("streamgmm_batch_duration_seconds_bucket", le="0.001") == 1
    assert v("streamgmm_drift_detected_total") == 1
    assert v("streamgmm_log_likelihood_mean") == -3.5
    assert v("streamgmm_log_likelihood_ewma") == -3.4
    assert v("streamgmm_log_likelihood_reference") == -3.3
    assert v("streamgmm_drift_kl_divergence") == 0.02
    assert v("streamgmm_drift_mean_displacement") == 0.1
    assert v("streamgmm_drift_weight_entropy") == 1.05
    assert v("streamgmm_anomaly_rate") == 0.0012
    assert v("streamgmm_anomaly_rate_target") == 0.001


def test_empty_batch_and_warm_up():
    metrics = Metrics()
    assert metrics.value("streamgmm_warming_up") == 1
    assert np.isnan(metrics.value("streamgmm_threshold"))
    metrics.observe_batch(batch(0, anomalies=()), 0.0001)
    assert metrics.value("streamgmm_events_total") == 0
    assert np.isnan(metrics.value("streamgmm_threshold"))
    metrics.observe_batch(batch(4, anomalies=(), threshold=np.inf, warming=True), 0.0001)
    assert metrics.value("streamgmm_warming_up") == 1
    assert metrics.value("streamgmm_events_total") == 4


def test_dead_letters_are_counted_per_reason_and_labels_stay_bounded():
    metrics = Metrics()
    for reason in REASONS:
        assert metrics.value("streamgmm_dead_letters_total", reason=reason) == 0
    metrics.dead_letters({"invalid_json": 3, "oversize": 1})
    metrics.dead_letters({"invalid_json": 2, "non_finite": 0})
    assert metrics.value("streamgmm_dead_letters_total", reason="invalid_json") == 5
    assert metrics.value("streamgmm_dead_letters_total", reason="oversize") == 1
    with pytest.raises(ValueError, match="unknown dead-letter reason 'typo'; expected one of"):
        metrics.dead_letters({"typo": 1})


@dataclass
class Mixture:
    """The attributes of OnlineGaussianMixture that the metrics read (see docs/contracts.md)."""

    weights_: np.ndarray
    is_fitted: bool = True
    n_events_learned_: int = 0

    @property
    def n_components_(self):
        return len(self.weights_)


def test_set_model_tracks_components_and_removes_stale_series():
    metrics = Metrics()
    metrics.set_model(Mixture(np.array([0.5, 0.3, 0.2]), n_events_learned_=1234))
    assert metrics.value("streamgmm_components") == 3
    assert metrics.value("streamgmm_component_weight", component="2") == 0.2
    assert metrics.value("streamgmm_model_events_learned") == 1234
    assert metrics.value("streamgmm_warming_up") == 0
    metrics.set_model(Mixture(np.array([0.6, 0.4]), n_events_learned_=2000))
    assert metrics.value("streamgmm_component_weight", component="2") is None
    assert metrics.value("streamgmm_component_weight", component="1") == 0.4
    metrics.set_model(Mixture(np.array([]), is_fitted=False, n_events_learned_=10))
    assert metrics.value("streamgmm_components") == 0
    assert metrics.value("streamgmm_warming_up") == 1
    assert metrics.value("streamgmm_component_weight", component="0") is None


def test_checkpoint_age_is_computed_at_scrape_time():
    now = [1000.0]
    metrics = Metrics(clock=lambda: now[0])
    now[0] = 1010.0
    assert metrics.value("streamgmm_checkpoint_age_seconds") == 10.0  # since start
    metrics.checkpoint_written()
    now[0] = 1012.5
    assert metrics.value("streamgmm_checkpoint_age_seconds") == 2.5
    metrics.checkpoint_written(timestamp=1000.0)
    assert metrics.value("streamgmm_checkpoint_age_seconds") == 12.5


def test_lag_and_broker():
    metrics = Metrics()
    metrics.set_consumer_lag(42)
    metrics.set_broker_up(False)
    assert metrics.value("streamgmm_consumer_lag_events") == 42
    assert metrics.value("streamgmm_broker_up") == 0
    metrics.set_broker_up(True)
    assert metrics.value("streamgmm_broker_up") == 1


def test_two_instances_do_not_share_state():
    a, b = Metrics(), Metrics()
    a.dead_letters({"oversize": 1})
    assert b.value("streamgmm_dead_letters_total", reason="oversize") == 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed "
                    "(apt-get install prometheus)")
def test_promtool_check_metrics_is_clean():
    metrics = Metrics()
    metrics.observe_batch(batch(10, drift=Drift(drift_detected=True)), 0.02)
    metrics.dead_letters({"missing_field": 2})
    metrics.set_model(Mixture(np.array([0.7, 0.3]), n_events_learned_=99))
    metrics.set_consumer_lag(3)
    metrics.checkpoint_written()
    done = subprocess.run(["promtool", "check", "metrics"], input=metrics.exposition(),
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert done.stdout.strip() == b"" and done.stderr.strip() == b""


def test_serve_on_a_free_port_and_close():
    with Metrics() as metrics:
        port = metrics.serve("127.0.0.1", 0)
        assert port > 0 and metrics.port == port
        metrics.dead_letters({"not_object": 4})
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b'streamgmm_dead_letters_total{reason="not_object"} 4.0' in body
        with pytest.raises(RuntimeError, match="already served"):
            metrics.serve("127.0.0.1", 0)
    assert metrics.port is None
    with pytest.raises(ConnectionRefusedError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_serve_on_a_busy_port_names_it():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            Metrics().serve("127.0.0.1", port)


def test_metrics_from_a_real_detector_stream():
    """The daemon's calls, fed by the real Detector: values equal what the detector reports."""
    from streamgmm.detector import Detector

    detector = Detector(n_components=2, warmup_events=200, random_state=0)
    rng = np.random.default_rng(0)
    metrics = Metrics()
    metrics.set_model(detector)
    assert detector.warming_up and metrics.value("streamgmm_warming_up") == 1
    n_anomalies = 0
    for k in range(6):
        X = rng.normal(size=(200, 2))
        if k == 5:
            X[:3] = 50.0
        result = detector.process(X)
        n_anomalies += int(result.is_anomaly.sum())
        metrics.observe_batch(result, 0.01)
        metrics.set_model(detector)
    assert n_anomalies >= 3
    assert metrics.value("streamgmm_events_total") == 1200
    assert metrics.value("streamgmm_anomalies_total") == n_anomalies
    assert metrics.value("streamgmm_threshold") == result.threshold[-1]
    assert not detector.warming_up
    assert metrics.value("streamgmm_warming_up") == 0
    assert metrics.value("streamgmm_model_events_learned") == detector.n_events_learned
    weights = detector.model.weights_
    assert metrics.value("streamgmm_components") == len(weights)
    for k, w in enumerate(weights):
        assert metrics.value("streamgmm_component_weight", component=str(k)) == w
    drift = result.drift
    assert metrics.value("streamgmm_drift_kl_divergence") == drift.kl_divergence
    assert metrics.value("streamgmm_log_likelihood_mean") == drift.mean_log_likelihood
    assert metrics.value("streamgmm_anomaly_rate_target") == drift.target_anomaly_rate
    assert metrics.value("streamgmm_drift_detected_total") == drift.n_drifts
    if shutil.which("promtool"):
        done = subprocess.run(["promtool", "check", "metrics"], input=metrics.exposition(),
                              capture_output=True, timeout=60)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
