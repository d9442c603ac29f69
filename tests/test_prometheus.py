"""A real Prometheus server scrapes streamgmm's metrics endpoint; values are read back via its API.

Needs the ``prometheus`` binary (Debian package ``prometheus``); skipped with that reason otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import numpy as np
import pytest
from waiting import stop, wait_for

from streamgmm.detector import Detector
from streamgmm.embedded import free_port
from streamgmm.metrics import Metrics

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="the prometheus binary is not installed (apt-get install prometheus)"),
]


def _get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())




@pytest.fixture
def prometheus(tmp_path):
    """A Prometheus server scraping a fresh :class:`Metrics` endpoint every second."""
    metrics = Metrics()
    target_port = metrics.serve("127.0.0.1", 0)
    web_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: streamgmm\n    scrape_interval: 1s\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n")
    log = open(tmp_path / "prometheus.log", "wb")  # closed in the finally below
    process = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{web_port}"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{web_port}"
    try:
        wait_for(lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200,
                  "Prometheus to be ready", processes=[("prometheus", process)])
        yield metrics, base
    finally:
        stop(process)
        log.close()
        metrics.close()


def _query(base: str, promql: str) -> dict[tuple, float]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    answer = _get_json(url)
    assert answer["status"] == "success", answer
    return {tuple(sorted((k, v) for k, v in r["metric"].items() if k not in ("job", "instance",
                                                                             "__name__"))):
            float(r["value"][1]) for r in answer["data"]["result"]}


def test_prometheus_scrapes_the_values_the_daemon_sets(prometheus):
    metrics, base = prometheus
    detector = Detector(n_components=2, warmup_events=200, random_state=0)
    rng = np.random.default_rng(0)
    n_anomalies = 0
    for k in range(5):
        X = rng.normal(size=(100, 2))
        if k == 4:
            X[:3] = 40.0
        result = detector.process(X)
        n_anomalies += int(result.is_anomaly.sum())
        metrics.observe_batch(result, duration_s=0.0123)
        metrics.set_model(detector)
    assert n_anomalies >= 3
    metrics.dead_letters({"invalid_json": 4, "non_numeric": 1})
    metrics.set_consumer_lag(77)
    metrics.set_broker_up(True)
    metrics.checkpoint_written()
    # A replica's partitions and their states (scale-out)
    metrics.partitions_changed("assigned", 3, owned=3)
    metrics.partitions_changed("lost", 1, owned=2)
    metrics.state_restored(0.042, 12345)
    metrics.set_merged_model(5, 7.5)
    metrics.state_bytes.set(23456)

    def scraped():
        values = _query(base, "streamgmm_consumer_lag_events")
        return values.get(()) == 77

    wait_for(scraped, "Prometheus to scrape the metrics endpoint")
    assert _query(base, 'up{job="streamgmm"}') == {(): 1.0}
    assert _query(base, "streamgmm_events_total") == {(): 500.0}
    assert _query(base, "streamgmm_anomalies_total") == {(): float(n_anomalies)}
    dead = _query(base, "streamgmm_dead_letters_total")
    assert dead[(("reason", "invalid_json"),)] == 4.0
    assert dead[(("reason", "non_numeric"),)] == 1.0
    assert dead[(("reason", "oversize"),)] == 0.0 and len(dead) == 6
    assert _query(base, "streamgmm_threshold") == {(): result.threshold[-1]}
    assert _query(base, "streamgmm_drift_kl_divergence") == {(): result.drift.kl_divergence}
    assert _query(base, "streamgmm_log_likelihood_mean") == {
        (): result.drift.mean_log_likelihood}
    weights = detector.model.weights_
    assert _query(base, "streamgmm_component_weight") == {
        (("component", str(k)),): w for k, w in enumerate(weights)}
    assert _query(base, "streamgmm_components") == {(): float(len(weights))}
    assert _query(base, "streamgmm_model_events_learned") == {(): 500.0}
    assert _query(base, "streamgmm_warming_up") == {(): 0.0}
    assert _query(base, "streamgmm_broker_up") == {(): 1.0}
    assert _query(base, "streamgmm_batch_duration_seconds_count") == {(): 5.0}
    assert _query(base, 'streamgmm_batch_duration_seconds_bucket{le="0.025"}') == {
        (("le", "0.025"),): 5.0}
    age = _query(base, "streamgmm_checkpoint_age_seconds")[()]
    assert 0.0 <= age < 60.0
    assert list(_query(base, "streamgmm_build_info")) == [(("version", "0.1.0"),)]
    assert _query(base, "streamgmm_partitions_owned") == {(): 2.0}
    assert _query(base, "streamgmm_rebalances_total") == {
        (("change", "assigned"),): 3.0, (("change", "revoked"),): 0.0, (("change", "lost"),): 1.0}
    assert _query(base, "streamgmm_state_restore_duration_seconds_count") == {(): 1.0}
    assert _query(base, "streamgmm_state_restore_duration_seconds_sum") == {(): 0.042}
    assert _query(base, "streamgmm_state_restore_bytes_total") == {(): 12345.0}
    assert _query(base, "streamgmm_state_bytes") == {(): 23456.0}
    assert _query(base, "streamgmm_merged_model_partitions") == {(): 5.0}
    assert _query(base, "streamgmm_merged_model_age_seconds") == {(): 7.5}

    # A later change shows up in a later scrape, and rate() works on the counters.
    metrics.dead_letters({"invalid_json": 6})
    wait_for(lambda: _query(base, 'streamgmm_dead_letters_total{reason="invalid_json"}')
              == {(("reason", "invalid_json"),): 10.0}, "the next scrape")
    rate = _query(base, 'increase(streamgmm_dead_letters_total{reason="invalid_json"}[1m])')
    assert list(rate.values())[0] > 0
