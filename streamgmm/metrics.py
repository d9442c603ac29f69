"""Prometheus metrics of the daemon, with exactly the names fixed in ``docs/contracts.md``.

:class:`Metrics` owns its own ``CollectorRegistry`` (nothing leaks into the global one), so several
daemons or tests can live in one process. The daemon calls a handful of methods per batch
(:meth:`Metrics.observe_batch`, :meth:`Metrics.dead_letters`, :meth:`Metrics.set_model`,
:meth:`Metrics.set_consumer_lag`) and :meth:`Metrics.serve` exposes ``/metrics`` over HTTP.

Conventions (checked by ``promtool check metrics``): base units (seconds), counters ending in
``_total``, labels of bounded cardinality (``reason`` takes the six values of
:data:`streamgmm.features.REASONS`; ``component`` at most ``max_components`` values), and no
``_created`` series (:func:`prometheus_client.disable_created_metrics`).

Examples
--------
>>> metrics = Metrics()
>>> metrics.dead_letters({"invalid_json": 2})
>>> metrics.set_consumer_lag(17)
>>> metrics.value("streamgmm_dead_letters_total", reason="invalid_json")
2.0
>>> metrics.value("streamgmm_consumer_lag_events")
17.0
>>> b"streamgmm_build_info{version=" in metrics.exposition()
True
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from streamgmm import __version__
from streamgmm.features import REASONS

__all__ = ["Metrics", "BATCH_DURATION_BUCKETS"]

logger = logging.getLogger(__name__)

#: Buckets of ``streamgmm_batch_duration_seconds``: from half a millisecond to 30 seconds.
BATCH_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                          2.5, 5.0, 10.0, 30.0)


def _last(values) -> float | None:
    array = np.asarray(values)
    return float(array[-1]) if array.size else None


class Metrics:
    """The daemon's Prometheus metrics.

    Parameters
    ----------
    clock : callable, default time.time
        Wall-clock seconds, used for the checkpoint age (tests can pass their own).

    Attributes
    ----------
    registry : prometheus_client.CollectorRegistry
        The registry holding every metric (pass it to a ``prometheus_client`` exposition function
        or use :meth:`exposition`).

    Notes
    -----
    ``streamgmm_checkpoint_age_seconds`` is computed at scrape time. Until the first checkpoint is
    written it counts from the creation of this object, so an alert on a stale checkpoint also
    fires when no checkpoint is ever written.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> import numpy as np
    >>> metrics = Metrics()
    >>> batch = SimpleNamespace(score=np.array([1.0, 9.0]), is_anomaly=np.array([False, True]),
    ...                         threshold=np.array([5.0, 5.0]), warming_up=np.array([False, False]),
    ...                         drift=None)
    >>> metrics.observe_batch(batch, duration_s=0.004)
    >>> metrics.value("streamgmm_events_total"), metrics.value("streamgmm_anomalies_total")
    (2.0, 1.0)
    >>> metrics.value("streamgmm_threshold")
    5.0
    """

    def __init__(self, clock: Callable[[], float] = time.time):
        prometheus_client.disable_created_metrics()
        self._clock = clock
        self._lock = threading.Lock()
        self._last_checkpoint = clock()
        self._component_labels: set[str] = set()
        self._server = None
        self._thread: threading.Thread | None = None
        self.registry = registry = CollectorRegistry(auto_describe=True)

        def counter(name, doc, labels=()):
            return Counter(name, doc, labels, registry=registry)

        def gauge(name, doc, labels=()):
            return Gauge(name, doc, labels, registry=registry)

        # prometheus-client appends "_total" to counter names itself.
        self.events = counter("streamgmm_events", "Events scored (valid events consumed).")
        self.anomalies = counter("streamgmm_anomalies", "Events flagged as anomalies.")
        self.dead_letters_total = counter(
            "streamgmm_dead_letters", "Events sent to the dead-letter topic, by reason.",
            ["reason"])
        for reason in REASONS:  # every series exists from the start (rate() needs a zero)
            self.dead_letters_total.labels(reason=reason)
        self.batch_duration = Histogram(
            "streamgmm_batch_duration_seconds",
            "Time to decode, score, learn from and publish one batch.",
            buckets=BATCH_DURATION_BUCKETS, registry=registry)
        self.threshold = gauge("streamgmm_threshold",
                               "Current anomaly threshold on the score (-log p(x)).")
        self.anomaly_rate = gauge("streamgmm_anomaly_rate",
                                  "Observed recent fraction of events flagged as anomalies.")
        self.anomaly_rate_target = gauge("streamgmm_anomaly_rate_target",
                                         "Target false-alarm rate of the adaptive threshold.")
        self.log_likelihood_mean = gauge(
            "streamgmm_log_likelihood_mean", "Mean log-likelihood of the last batch, nats/event.")
        self.log_likelihood_ewma = gauge(
            "streamgmm_log_likelihood_ewma",
            "Exponentially weighted mean log-likelihood per event, nats.")
        self.log_likelihood_reference = gauge(
            "streamgmm_log_likelihood_reference",
            "Reference log-likelihood per event (at the last drift reset), nats.")
        self.drift_kl_divergence = gauge(
            "streamgmm_drift_kl_divergence",
            "KL divergence of the live model from the reference model, nats.")
        self.drift_mean_displacement = gauge(
            "streamgmm_drift_mean_displacement",
            "Weighted displacement of component means from the reference, in standard deviations.")
        self.drift_weight_entropy = gauge("streamgmm_drift_weight_entropy",
                                          "Entropy of the mixture weights, nats.")
        self.drift_detected = counter("streamgmm_drift_detected", "Drifts detected.")
        self.component_weight = gauge("streamgmm_component_weight",
                                      "Mixture weight of each component.", ["component"])
        self.components = gauge("streamgmm_components", "Number of mixture components.")
        self.consumer_lag = gauge("streamgmm_consumer_lag_events",
                                  "Events in the input topic not yet consumed (end - position).")
        self.checkpoint_age = gauge(
            "streamgmm_checkpoint_age_seconds",
            "Seconds since this replica last wrote its partitions' states to the state topic.")
        self.checkpoint_age.set_function(self._checkpoint_age)
        self.checkpoint_failures = counter(
            "streamgmm_checkpoint_failures",
            "State records that could not be written (the broker refused them); detection goes "
            "on and the last good state stays.")
        self.partitions_owned = gauge("streamgmm_partitions_owned",
                                      "Input partitions this replica owns now.")
        self.rebalances = counter(
            "streamgmm_rebalances",
            "Partitions assigned to, revoked from or lost by this replica.", ["change"])
        for change in ("assigned", "revoked", "lost"):
            self.rebalances.labels(change=change)
        self.state_restore_duration = Histogram(
            "streamgmm_state_restore_duration_seconds",
            "Time from an assignment to its partitions' states being restored (state topic "
            "read, outputs read back).", buckets=BATCH_DURATION_BUCKETS, registry=registry)
        self.state_restore_bytes = counter(
            "streamgmm_state_restore_bytes", "Bytes of partition state restored.")
        self.state_bytes = gauge("streamgmm_state_bytes",
                                 "Size of the last state record written, bytes.")
        self.state_bytes.set(math.nan)
        self.merged_model_age = gauge(
            "streamgmm_merged_model_age_seconds",
            "Age of the oldest partition state in the merged model this replica scores with "
            "(NaN while it owns every partition with a model).")
        self.merged_model_age.set(math.nan)
        self.merged_model_partitions = gauge(
            "streamgmm_merged_model_partitions",
            "Partitions whose models make the merged model this replica scores with.")
        self.model_events_learned = gauge("streamgmm_model_events_learned",
                                          "Events the model has learned from.")
        self.warming_up = gauge("streamgmm_warming_up",
                                "1 while the model gathers its warm-up events, else 0.")
        self.warming_up.set(1)
        self.broker_up = gauge(
            "streamgmm_broker_up",
            "1 while a Kafka broker answers a metadata request within 2 s (asked every 2 s from "
            "a thread of its own), else 0.")
        self.last_progress = gauge(
            "streamgmm_last_progress_timestamp_seconds",
            "Unix time when the daemon loop last made progress (a poll, a published batch or a "
            "reconnection attempt); stale while the loop is stuck.")
        self.last_progress.set(clock())
        self.build_info = gauge("streamgmm_build_info", "streamgmm build information.",
                                ["version"])
        self.build_info.labels(version=__version__).set(1)
        for g in (self.threshold, self.anomaly_rate, self.anomaly_rate_target,
                  self.log_likelihood_mean,
                  self.log_likelihood_ewma, self.log_likelihood_reference,
                  self.drift_kl_divergence, self.drift_mean_displacement,
                  self.drift_weight_entropy):
            g.set(math.nan)  # unknown until the first batch says otherwise

    # -- per batch ---------------------------------------------------------------------------

    def observe_batch(self, result: Any, duration_s: float) -> None:
        """Record one processed batch.

        Parameters
        ----------
        result : detector.BatchResult or alike
            Read: ``score`` and ``is_anomaly`` (per event), ``threshold`` and ``warming_up``
            (their last values), and ``drift`` (a ``DriftReport`` or ``None``).
        duration_s : float
            Wall-clock seconds the batch took (decode to publish).
        """
        self.batch_duration.observe(max(0.0, float(duration_s)))
        n_events = int(np.asarray(result.score).size)
        if n_events:
            self.events.inc(n_events)
        n_anomalies = int(np.count_nonzero(result.is_anomaly))
        if n_anomalies:
            self.anomalies.inc(n_anomalies)
        threshold = _last(result.threshold)
        if threshold is not None:
            self.threshold.set(threshold)
        warming = _last(getattr(result, "warming_up", ()))
        if warming is not None:
            self.warming_up.set(1.0 if warming else 0.0)
        drift = getattr(result, "drift", None)
        if drift is not None:
            self.observe_drift(drift)

    def observe_drift(self, report: Any) -> None:
        """Set the drift gauges from a :class:`streamgmm.drift.DriftReport`."""
        for gauge, attribute in (
            (self.log_likelihood_mean, "mean_log_likelihood"),
            (self.log_likelihood_ewma, "log_likelihood_ewma"),
            (self.log_likelihood_reference, "reference_log_likelihood"),
            (self.drift_kl_divergence, "kl_divergence"),
            (self.drift_mean_displacement, "mean_displacement"),
            (self.drift_weight_entropy, "weight_entropy"),
            (self.anomaly_rate, "anomaly_rate"),
            (self.anomaly_rate_target, "target_anomaly_rate"),
        ):
            value = getattr(report, attribute, None)
            if value is not None:
                gauge.set(float(value))
        if getattr(report, "drift_detected", False):
            self.drift_detected.inc()

    def dead_letters(self, reason_counts: Mapping[str, int]) -> None:
        """Count dead letters, e.g. ``metrics.dead_letters(extraction.reason_counts())``.

        Raises
        ------
        ValueError
            For a reason outside :data:`streamgmm.features.REASONS` (labels stay bounded).
        """
        for reason, count in reason_counts.items():
            if reason not in REASONS:
                raise ValueError(f"unknown dead-letter reason {reason!r}; "
                                 f"expected one of {', '.join(REASONS)}")
            if count:
                self.dead_letters_total.labels(reason=reason).inc(count)

    def set_consumer_lag(self, events: int) -> None:
        """Events behind the end of the input topic (summed over assigned partitions)."""
        self.consumer_lag.set(max(0, int(events)))

    def checkpoint_written(self, timestamp: float | None = None) -> None:
        """Note that a checkpoint was written at ``timestamp`` (default: now)."""
        with self._lock:
            self._last_checkpoint = self._clock() if timestamp is None else float(timestamp)

    def checkpoint_failed(self) -> None:
        """Count a checkpoint that could not be written."""
        self.checkpoint_failures.inc()

    def _checkpoint_age(self) -> float:
        with self._lock:
            return max(0.0, self._clock() - self._last_checkpoint)

    def partitions_changed(self, change: str, n: int, owned: int) -> None:
        """``n`` partitions were ``"assigned"``, ``"revoked"`` or ``"lost"``; ``owned`` now."""
        self.rebalances.labels(change=change).inc(n)
        self.partitions_owned.set(owned)

    def state_restored(self, duration_s: float, n_bytes: int) -> None:
        """Partitions' states were restored in ``duration_s`` from ``n_bytes`` of records."""
        self.state_restore_duration.observe(duration_s)
        self.state_restore_bytes.inc(n_bytes)

    def set_merged_model(self, partitions: int, age_s: float | None) -> None:
        """The merged model is made of ``partitions`` models, the oldest written ``age_s`` ago."""
        self.merged_model_partitions.set(partitions)
        self.merged_model_age.set(math.nan if age_s is None else age_s)

    def progressed(self, timestamp: float | None = None) -> None:
        """Note that the daemon loop made progress at ``timestamp`` (default: now)."""
        self.last_progress.set(self._clock() if timestamp is None else float(timestamp))

    def set_broker_up(self, up: bool) -> None:
        """Whether the broker is reachable (1) or not (0)."""
        self.broker_up.set(1 if up else 0)

    def set_model(self, model: Any) -> None:
        """Set component weights, component count, events learned and warm-up from a model.

        Parameters
        ----------
        model : OnlineGaussianMixture or Detector
            A detector is read through its ``model``, ``n_events_learned`` and ``warming_up``
            (the threshold may still calibrate after the mixture is fitted). While the mixture
            is warming up (``is_fitted`` false) it has no weights; the component series are then
            removed.
        """
        mixture = getattr(model, "model", model)
        learned = getattr(model, "n_events_learned", None)
        if learned is None:
            learned = getattr(mixture, "n_events_learned_", 0)
        self.model_events_learned.set(int(learned))
        fitted = bool(getattr(mixture, "is_fitted", True))
        warming = getattr(model, "warming_up", None) if mixture is not model else None
        self.warming_up.set(1 if (not fitted if warming is None else warming) else 0)
        weights = np.asarray(getattr(mixture, "weights_", []) if fitted else [], dtype=float)
        labels = {str(k) for k in range(weights.size)}
        for stale in self._component_labels - labels:
            self.component_weight.remove(stale)
        for k, weight in enumerate(weights):
            self.component_weight.labels(component=str(k)).set(float(weight))
        self._component_labels = labels
        self.components.set(int(getattr(mixture, "n_components_", weights.size)) if fitted else 0)

    # -- exposition --------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format (what ``/metrics`` returns)."""
        return prometheus_client.generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float | None:
        """The current value of one sample (``None`` if absent), e.g. for tests and the console."""
        return self.registry.get_sample_value(name, labels or None)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve ``/metrics`` over HTTP in a background thread; return the bound port.

        Parameters
        ----------
        host : str
            Address to listen on (``"0.0.0.0"`` for every interface).
        port : int
            TCP port; ``0`` picks a free one.

        Raises
        ------
        OSError
            The address is in use or not available; the message names it.
        RuntimeError
            Already serving (call :meth:`close` first).
        """
        if self._server is not None:
            raise RuntimeError("metrics are already served; call close() before serving again")
        try:
            server, thread = prometheus_client.start_http_server(
                port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror}; "
                          "choose another metrics.port (0 picks a free one)") from exc
        self._server, self._thread = server, thread
        bound = server.server_address[1]
        logger.info("serving Prometheus metrics on http://%s:%d/metrics", host, bound)
        return bound

    @property
    def port(self) -> int | None:
        """The port being served, or ``None``."""
        return None if self._server is None else self._server.server_address[1]

    def close(self) -> None:
        """Stop serving (idempotent); waits for the server thread to finish."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
