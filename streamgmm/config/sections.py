"""The sections of the configuration, one frozen dataclass per TOML table, and :class:`Config`.

Each section checks its own keys on construction (:mod:`streamgmm.config._schema`); what only
a client library can check — ``[kafka.librdkafka]``, ``[kafka.client]``/``[kafka.consumer]``/
``[kafka.producer]`` — is checked by :mod:`streamgmm.io` (:func:`~streamgmm.io.librdkafka_settings.
check_librdkafka_table`, :func:`~streamgmm.io.kafka.check_passthrough_settings`), and the model's
parameters by the model itself, so that each rule has one home.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streamgmm.config._schema import (
    ConfigError,
    _between,
    _Bool,
    _Choice,
    _fields_check,
    _Float,
    _Int,
    _IntOrAuto,
    _key,
    _n_components_check,
    _non_empty,
    _Optional,
    _port,
    _positive,
    _Section,
    _Str,
    _StrList,
    _toml_key,
    _toml_value,
)

__all__ = [
    "Config",
    "KafkaConfig",
    "BatchConfig",
    "FeaturesConfig",
    "ModelConfig",
    "ThresholdConfig",
    "MetricsConfig",
    "CheckpointConfig",
    "WatchdogConfig",
    "SECTIONS",
    "MESSAGE_OVERHEAD_BYTES",
]

#: Room an output message needs beyond the event it carries (its own fields, headers, framing).
MESSAGE_OVERHEAD_BYTES = 65_536
#: The producers' default limits on one message: librdkafka's ``message.max.bytes`` and
#: kafka-python's ``max_request_size``.
LIBRDKAFKA_MESSAGE_MAX_BYTES = 1_000_000
KAFKA_PYTHON_MAX_REQUEST_SIZE = 1_048_576


def _forgetting_check(value: float) -> str | None:
    """The detector's own rule for ``forgetting`` (one source of truth)."""
    from streamgmm.detector import Detector

    try:
        Detector(forgetting=value)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class KafkaConfig(_Section):
    """``[kafka]``: where events come from and where anomalies and dead letters go.

    Examples
    --------
    >>> kafka = KafkaConfig(bootstrap_servers="k1:9092,k2:9092", security_protocol="SASL_SSL",
    ...                     sasl_mechanism="PLAIN", sasl_plain_username="svc",
    ...                     sasl_plain_password="s3cret", librdkafka={"compression_type": "zstd"})
    >>> kafka.bootstrap_servers, kafka.backend, kafka.broker_quirks
    (('k1:9092', 'k2:9092'), 'confluent-kafka', 'tansu')
    >>> kafka.librdkafka["compression.type"]
    'zstd'
    >>> kafka.to_dict()["sasl_plain_password"]
    '***'

    With ``backend="kafka-python"``, its settings go in ``client``, ``consumer`` and ``producer``
    (the backend merges them, :class:`streamgmm.io.kafka.KafkaPythonBackend`):

    >>> KafkaConfig(backend="kafka-python", consumer={"session_timeout_ms": 6000}).consumer
    {'session_timeout_ms': 6000}
    """

    _name = "kafka"

    bootstrap_servers: tuple[str, ...] = _key(
        ("localhost:9092",), _StrList(), _non_empty,
        'list "host:port" of one or more brokers, e.g. ["kafka:9092"]')
    input_topic: str = _key("events", _Str(), _non_empty)
    output_topic: str = _key("anomalies", _Str(), _non_empty)
    dead_letter_topic: str = _key("events-dlt", _Str(), _non_empty)
    group_id: str = _key("streamgmm", _Str(), _non_empty)
    auto_offset_reset: str = _key(
        "earliest", _Choice("earliest", "latest"),
        hint="where a new consumer group starts reading")
    delivery: str = _key(
        "exactly-once", _Choice("exactly-once", "at-least-once"),
        hint='use "at-least-once" only for brokers without transactions')
    transactional_id: str | None = _key(
        None, _Optional(_Str()),
        hint="the prefix of the replicas' transactional ids (defaults to <group_id>-<input_topic>; "
             "each replica appends its replica_id)")
    replica_id: str | None = _key(
        None, _Optional(_Str()),
        hint="this replica's stable name, unique in the group (e.g. the pod name); defaults to "
             "the host name. Its transactional id is <transactional_id>-<replica_id>: a "
             "restarted replica fences its previous self, replicas never fence each other")
    security_protocol: str = _key(
        "PLAINTEXT", _Choice("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"))
    sasl_mechanism: str | None = _key(
        None, _Optional(_Choice("PLAIN", "GSSAPI", "OAUTHBEARER", "SCRAM-SHA-256",
                                "SCRAM-SHA-512")))
    sasl_plain_username: str | None = _key(None, _Optional(_Str()))
    sasl_plain_password: str | None = _key(
        None, _Optional(_Str()), secret=True,
        hint="prefer the environment variable STREAMGMM_KAFKA__SASL_PLAIN_PASSWORD for secrets")
    ssl_cafile: str | None = _key(None, _Optional(_Str()))
    ssl_certfile: str | None = _key(None, _Optional(_Str()))
    ssl_keyfile: str | None = _key(None, _Optional(_Str()))
    ssl_password: str | None = _key(None, _Optional(_Str()), secret=True)
    ssl_check_hostname: bool = _key(True, _Bool())
    backend: str = _key(
        "confluent-kafka", _Choice("confluent-kafka", "kafka-python"),
        hint='"confluent-kafka" (librdkafka, the fast one) or "kafka-python" (pure Python)')
    broker_quirks: str = _key(
        "tansu", _Choice("tansu", "none"),
        hint='the broker workarounds (streamgmm.io.quirks): "tansu" (the default, correct on '
             'every broker) or "none" for Apache Kafka and brokers like it')
    rebalance: str = _key(
        "eager", _Choice("eager", "cooperative"),
        hint='"cooperative" (confluent-kafka only: cooperative-sticky, partitions that do not '
             'move keep flowing) or "eager" (every rebalance revokes everything)')
    group_instance_id: str | None = _key(
        None, _Optional(_Str()),
        hint="static membership (group.instance.id): a stable id per replica, e.g. the pod "
             "name; a replica that restarts within the session timeout keeps its partitions")
    group_protocol: str = _key(
        "classic", _Choice("classic", "consumer"),
        hint='"consumer" (KIP-848, confluent-kafka only, brokers that offer it: Apache Kafka '
             '4) or "classic"')
    client: Mapping[str, Any] = field(default_factory=dict)
    consumer: Mapping[str, Any] = field(default_factory=dict)
    producer: Mapping[str, Any] = field(default_factory=dict)
    librdkafka: Mapping[str, Any] = field(default_factory=dict)

    _SECURITY = ("security_protocol", "sasl_mechanism", "sasl_plain_username",
                 "sasl_plain_password", "ssl_cafile", "ssl_certfile", "ssl_keyfile",
                 "ssl_password", "ssl_check_hostname")

    def _validate(self) -> None:
        self._validate_group_options()
        if self.backend == "confluent-kafka":
            for table in ("client", "consumer", "producer"):
                if getattr(self, table):
                    name = next(iter(getattr(self, table)))
                    raise ConfigError(f"kafka.{table}.{name}",
                                      "is a kafka-python setting, but kafka.backend is "
                                      '"confluent-kafka"',
                                      "give librdkafka's property under [kafka.librdkafka] "
                                      "instead")
            from streamgmm.io.librdkafka_settings import check_librdkafka_table

            object.__setattr__(self, "librdkafka", check_librdkafka_table(self.librdkafka))
        elif self.librdkafka:
            raise ConfigError(f"kafka.librdkafka.{next(iter(self.librdkafka))}",
                              'applies to kafka.backend = "confluent-kafka" only',
                              'set kafka.backend = "confluent-kafka", or use the kafka-python '
                              "tables [kafka.client], [kafka.consumer] and [kafka.producer]")
        if self.client or self.consumer or self.producer:  # kafka-python only when needed
            from streamgmm.io.kafka import check_passthrough_settings

            for table in ("client", "consumer", "producer"):
                object.__setattr__(self, table,
                                   check_passthrough_settings(table, getattr(self, table)))
        for name in self._SECURITY:
            for table in ("client", "consumer", "producer"):
                if name in getattr(self, table):
                    raise ConfigError(f"kafka.{table}.{name}", "is an explicit [kafka] key",
                                      f"set kafka.{name} instead")
        topics = {"input_topic": self.input_topic, "output_topic": self.output_topic,
                  "dead_letter_topic": self.dead_letter_topic}
        if self.input_topic in (self.output_topic, self.dead_letter_topic):
            raise ConfigError("kafka.input_topic", f'"{self.input_topic}" is also an output topic',
                              f"read and write different topics (got {topics})")
        if self.sasl_mechanism and not self.security_protocol.startswith("SASL"):
            raise ConfigError("kafka.security_protocol",
                              f'is "{self.security_protocol}" but kafka.sasl_mechanism is set',
                              'use "SASL_SSL" (or "SASL_PLAINTEXT") with SASL')
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ConfigError("kafka.sasl_mechanism",
                              f'is required with security_protocol "{self.security_protocol}"',
                              'set it, e.g. "PLAIN" or "SCRAM-SHA-512"')

    def _validate_group_options(self) -> None:
        """``rebalance``, ``group_instance_id`` and ``group_protocol`` against the backend and
        the pass-through tables."""
        if self.backend == "kafka-python":
            if self.rebalance == "cooperative":
                raise ConfigError("kafka.rebalance",
                                  "kafka-python has no cooperative rebalancing",
                                  'use kafka.backend = "confluent-kafka", or rebalance = "eager"')
            if self.group_protocol == "consumer":
                raise ConfigError("kafka.group_protocol",
                                  "kafka-python has no KIP-848 consumer group protocol",
                                  'use kafka.backend = "confluent-kafka", or group_protocol = '
                                  '"classic"')
            for table in ("client", "consumer"):
                if "group_instance_id" in getattr(self, table):
                    raise ConfigError(f"kafka.{table}.group_instance_id",
                                      "is an explicit [kafka] key",
                                      "set kafka.group_instance_id instead")
            return
        from streamgmm.io.librdkafka_settings import librdkafka_name

        given = {librdkafka_name(name): name for name in self.librdkafka}
        for prop, key in (("group.instance.id", "group_instance_id"),
                          ("group.protocol", "group_protocol")):
            if prop in given:
                raise ConfigError(f"kafka.librdkafka.{given[prop]}", "is an explicit [kafka] key",
                                  f"set kafka.{key} instead")
        strategy = str(self.librdkafka.get(given.get("partition.assignment.strategy", ""), ""))
        if "cooperative" in strategy:
            raise ConfigError(f"kafka.librdkafka.{given['partition.assignment.strategy']}",
                              "cooperative assignment needs streamgmm's incremental "
                              "assignments", 'set kafka.rebalance = "cooperative" instead')
        if self.group_protocol == "consumer":
            from streamgmm.io.librdkafka_settings import CLASSIC_PROTOCOL_ONLY

            for prop in CLASSIC_PROTOCOL_ONLY:
                if prop in given:
                    raise ConfigError(f"kafka.librdkafka.{given[prop]}",
                                      'is refused by librdkafka with group_protocol = "consumer" '
                                      "(the broker owns sessions and assignment)",
                                      "remove it (set the broker's group.consumer.* instead)")
            if self.rebalance == "cooperative":
                raise ConfigError("kafka.rebalance",
                                  'has no effect with group_protocol = "consumer", whose '
                                  "assignments are always incremental", "remove it")

    @property
    def max_message_bytes(self) -> tuple[int, str]:
        """The producer's limit on one message, and the setting that sets it.

        Examples
        --------
        >>> KafkaConfig().max_message_bytes
        (1000000, 'kafka.librdkafka."message.max.bytes"')
        >>> KafkaConfig(backend="kafka-python", producer={"max_request_size": 2000000}
        ...             ).max_message_bytes
        (2000000, 'kafka.producer.max_request_size')
        """
        if self.backend == "confluent-kafka":
            value = self.librdkafka.get("message.max.bytes", LIBRDKAFKA_MESSAGE_MAX_BYTES)
            return int(value), 'kafka.librdkafka."message.max.bytes"'
        for table in ("producer", "client"):
            if "max_request_size" in getattr(self, table):
                return (int(getattr(self, table)["max_request_size"]),
                        f"kafka.{table}.max_request_size")
        return KAFKA_PYTHON_MAX_REQUEST_SIZE, "kafka.producer.max_request_size"

    @property
    def effective_replica_id(self) -> str:
        """``replica_id``, or the host name when it is not set."""
        import socket

        return self.replica_id or socket.gethostname() or "streamgmm"

    @property
    def effective_transactional_id(self) -> str:
        """``"<transactional_id>-<replica_id>"``; the prefix defaults to
        ``"<group_id>-<input_topic>"``."""
        prefix = self.transactional_id or f"{self.group_id}-{self.input_topic}"
        return f"{prefix}-{self.effective_replica_id}"

    def security_kwargs(self) -> dict[str, Any]:
        """The security settings (only those set), for any kafka-python client."""
        out = {"security_protocol": self.security_protocol,
               "ssl_check_hostname": self.ssl_check_hostname}
        for name in self._SECURITY:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(frozen=True)
class BatchConfig(_Section):
    """``[batch]``: how many records the daemon takes per poll and how long it waits for them."""

    _name = "batch"

    max_records: int = _key(5000, _Int(), _between(1, 1_000_000),
                            "larger batches raise throughput and latency, e.g. 5000")
    max_wait_ms: int = _key(200, _Int(), _between(0, 600_000),
                            "the longest a record waits to be scored, in milliseconds")


@dataclass(frozen=True)
class FeaturesConfig(_Section):
    """``[features]``: which JSON fields make the feature vector and what to do with bad events.

    Examples
    --------
    >>> FeaturesConfig(fields=["latency_ms", "http.bytes"]).fields
    ('latency_ms', 'http.bytes')
    >>> FeaturesConfig(fields=["a", "a"])
    Traceback (most recent call last):
    ...
    streamgmm.config.ConfigError: features.fields: "a" is listed twice; ...
    """

    _name = "features"

    fields: tuple[str, ...] = _key(
        (), _StrList(), _fields_check,
        'list the numeric JSON fields as dotted paths, e.g. fields = ["latency_ms", "http.bytes"]')
    missing: str = _key(
        "dead-letter", _Choice("dead-letter", "marginalize"),
        hint='"dead-letter" sends events with a missing field to the dead-letter topic; '
             '"marginalize" scores them on the fields they have')
    max_event_bytes: int = _key(
        900_000, _Int(), _between(2, 1 << 30),
        "events larger than this go to the dead-letter topic; keep it "
        f"{MESSAGE_OVERHEAD_BYTES} bytes below the producer's message limit")


@dataclass(frozen=True)
class ModelConfig(_Section):
    """``[model]``: the Gaussian mixture (see :class:`streamgmm.mixture.OnlineGaussianMixture`)."""

    _name = "model"

    n_components: int | str = _key("auto", _IntOrAuto(), _n_components_check,
                                   '"auto" chooses by held-out likelihood on the warm-up events')
    covariance_type: str = _key("full", _Choice("full", "diag", "spherical", "tied"))
    reg_covar: float = _key(1e-6, _Float(), _between(0, 1e6),
                            "added to covariance diagonals for stability, e.g. 1e-6")
    forgetting: float = _key(
        0.002, _Float(), _forgetting_check,
        "the smallest learning step: 0 never forgets; the model remembers about "
        "256 / forgetting events (128,000 at 0.002)")
    step_exponent: float = _key(0.7, _Float(), _between(0.5, 1, low_open=True),
                                "the stepwise-EM step size exponent, in (0.5, 1]")
    max_components: int = _key(10, _Int(), _between(1, 1000))
    n_init: int = _key(3, _Int(), _between(1, 100))
    max_iter: int = _key(100, _Int(), _between(1, 100_000))
    tol: float = _key(1e-3, _Float(), _positive)
    protect: bool = _key(True, _Bool(),
                         hint="true keeps anomalies from being learned as normal")
    adoption_persistence: int | None = _key(
        None, _Optional(_Int()), _between(1, 100_000_000),
        "events a new behaviour must keep arriving before it is learned as normal "
        "(omit for threshold.warmup_events)")
    random_state: int | None = _key(None, _Optional(_Int()),
                                    hint="an integer makes runs reproducible")

    def _validate(self) -> None:
        if self.n_components != "auto" and self.n_components > self.max_components:
            raise ConfigError("model.n_components",
                              f"is {self.n_components}, more than model.max_components "
                              f"= {self.max_components}", "raise max_components or lower it")


@dataclass(frozen=True)
class ThresholdConfig(_Section):
    """``[threshold]``: when an event is an anomaly."""

    _name = "threshold"

    false_alarm_rate: float = _key(
        1e-3, _Float(), _between(0, 0.5, low_open=True),
        "it is the fraction of normal events allowed to be flagged, e.g. 0.001")
    warmup_events: int = _key(1000, _Int(), _between(2, 100_000_000),
                              "events learned before the first decision, e.g. 1000")
    fixed: float | None = _key(
        None, _Optional(_Float()),
        hint="a fixed threshold on the score instead of the adaptive one; omit to adapt")
    score: str = _key(
        "tail", _Choice("tail", "density"),
        hint='"tail": -log of the mixture\'s mass further out than the event (a tight cluster of '
             'anomalies stays anomalous); "density": -log p(x)')


@dataclass(frozen=True)
class MetricsConfig(_Section):
    """``[metrics]``: the Prometheus endpoint."""

    _name = "metrics"

    enabled: bool = _key(True, _Bool())
    host: str = _key("0.0.0.0", _Str(), _non_empty,
                     'the address to listen on, e.g. "127.0.0.1" or "0.0.0.0"')
    port: int = _key(9108, _Int(), _port, "0 picks a free port")


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """``[checkpoint]``: the state topic, where each input partition's model state (with the
    offsets it has learned up to) is written, and how often."""

    _name = "checkpoint"

    topic: str | None = _key(
        None, _Optional(_Str()),
        hint="the compacted state topic, one record per input partition (defaults to "
             "<group_id>-state); replicas of a group share it")
    interval_seconds: float = _key(10.0, _Float(), _between(0.01, 86_400),
                                   "seconds between two writes of a partition's state, e.g. 10")
    path: str | None = _key(
        None, _Optional(_Str()),
        hint="no longer used: the state lives in the state topic, a replica needs no disk")

    def state_topic(self, group_id: str) -> str:
        """``topic``, or ``"<group_id>-state"``."""
        return self.topic or f"{group_id}-state"


@dataclass(frozen=True)
class WatchdogConfig(_Section):
    """``[watchdog]``: when a stuck daemon ends its process (exit code 4) to be restarted."""

    _name = "watchdog"

    stall_seconds: float = _key(
        120.0, _Float(), _between(10, 86_400),
        "seconds the loop may go without progress; above the longest Kafka deadline (60 s)")
    stop_seconds: float = _key(
        20.0, _Float(), _between(1, 3600),
        "seconds from SIGTERM to the end of the process; below the supervisor's grace period "
        "(docker stop's 10 s by default, compose's stop_grace_period)")


SECTIONS: dict[str, type[_Section]] = {
    "kafka": KafkaConfig,
    "batch": BatchConfig,
    "features": FeaturesConfig,
    "model": ModelConfig,
    "threshold": ThresholdConfig,
    "metrics": MetricsConfig,
    "checkpoint": CheckpointConfig,
    "watchdog": WatchdogConfig,
}


@dataclass(frozen=True)
class Config:
    """The whole configuration; see the module docstring and ``config/streamgmm.toml``.

    Examples
    --------
    >>> config = Config(features=FeaturesConfig(fields=("x", "y")),
    ...                 threshold=ThresholdConfig(false_alarm_rate=0.01, warmup_events=200))
    >>> kw = config.detector_kwargs()
    >>> kw["false_alarm_rate"], kw["warmup_events"], kw["feature_names"]
    (0.01, 200, ['x', 'y'])
    >>> print(config.to_toml().splitlines()[0])
    # streamgmm effective configuration (secrets redacted)
    """

    features: FeaturesConfig
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)

    def __post_init__(self) -> None:
        limit, setting = self.kafka.max_message_bytes
        largest = self.features.max_event_bytes + MESSAGE_OVERHEAD_BYTES
        if largest > limit:
            raise ConfigError(
                "features.max_event_bytes",
                f"is {self.features.max_event_bytes}, so an output message may reach {largest} "
                f"bytes (the event plus {MESSAGE_OVERHEAD_BYTES} for its own fields), more than "
                f"the producer's limit {setting} = {limit}",
                f"lower features.max_event_bytes to at most {limit - MESSAGE_OVERHEAD_BYTES}, or "
                f"raise {setting} (and the topics' max.message.bytes on the broker)")

    def detector_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`streamgmm.detector.Detector`.

        ``random_state`` is only passed when set (a fresh seed otherwise).
        """
        m, t = self.model, self.threshold
        kwargs: dict[str, Any] = {
            "n_components": m.n_components,
            "covariance_type": m.covariance_type,
            "false_alarm_rate": t.false_alarm_rate,
            "warmup_events": t.warmup_events,
            "fixed_threshold": t.fixed,
            "score": t.score,
            "forgetting": m.forgetting,
            "protect": m.protect,
            "feature_names": list(self.features.fields),
            "reg_covar": m.reg_covar,
            "step_exponent": m.step_exponent,
            "max_components": m.max_components,
            "n_init": m.n_init,
            "max_iter": m.max_iter,
            "tol": m.tol,
        }
        if m.random_state is not None:
            kwargs["random_state"] = m.random_state
        if m.adoption_persistence is not None:
            kwargs["adoption_persistence"] = m.adoption_persistence
        return kwargs

    def to_dict(self, redact: bool = True) -> dict[str, dict[str, Any]]:
        """The effective configuration as nested dicts (``None`` values included)."""
        return {name: getattr(self, name).to_dict(redact) for name in SECTIONS}

    def to_toml(self, redact: bool = True) -> str:
        """The effective configuration as TOML text, e.g. for ``streamgmm run --print-config``.

        Keys without a value (TOML has no null) are written as comments. Loading the output
        (unredacted) gives back an equal configuration.
        """
        head = "secrets redacted" if redact else "contains secrets"
        lines = [f"# streamgmm effective configuration ({head})"]
        for section, values in self.to_dict(redact).items():
            tables = {k: v for k, v in values.items() if isinstance(v, Mapping)}
            lines += ["", f"[{section}]"]
            for key, value in values.items():
                if key in tables:
                    continue
                if value is None:
                    lines.append(f"# {key} = (not set)")
                else:
                    lines.append(f"{key} = {_toml_value(value)}")
            for table, settings in tables.items():
                if settings:
                    lines += ["", f"[{section}.{table}]"]
                    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in settings.items()]
        return "\n".join(lines) + "\n"

