"""Typed configuration of the daemon: a TOML file plus environment overrides.

The configuration is a tree of frozen dataclasses, one per TOML section (``[kafka]``, ``[batch]``,
``[features]``, ``[model]``, ``[threshold]``, ``[metrics]``, ``[checkpoint]``, ``[watchdog]``).
:func:`load_config` reads a TOML file (optional), applies every environment variable of the form
``STREAMGMM_<SECTION>__<KEY>`` (``STREAMGMM_THRESHOLD__FALSE_ALARM_RATE=0.01``; the value is parsed
to the key's type: numbers, ``true``/``false``, comma-separated lists) and validates the result.

Every mistake is a :class:`ConfigError` whose message starts with the dotted key, says what was
wrong, where the value came from and what to do::

    threshold.false_alarm_rate: must be between 0 and 0.5, got 2.0 (from /etc/streamgmm.toml);
    it is the fraction of normal events allowed to be flagged, e.g. 0.001

Unknown keys are errors too (with a "did you mean" when the spelling is close), so a typo never
silently falls back to a default.

Kafka client settings
---------------------
Security settings (``security_protocol``, ``sasl_mechanism``, ``sasl_plain_username``,
``sasl_plain_password``, ``ssl_cafile``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_password``,
``ssl_check_hostname``) are explicit keys of ``[kafka]``, for either client library
(``kafka.backend``). With ``"confluent-kafka"`` (the default), any other librdkafka property goes
in ``[kafka.librdkafka]``, checked against librdkafka's documented properties
(:mod:`streamgmm.io.librdkafka_settings`). With ``"kafka-python"``, any other kafka-python
setting can be passed through in ``[kafka.client]`` (both consumer and producer),
``[kafka.consumer]`` or ``[kafka.producer]``; the names are checked against kafka-python's own
list (:func:`streamgmm.io.kafka.check_passthrough_settings`). Either way the settings that
streamgmm manages itself to keep its delivery guarantee (group id, auto commit, isolation level,
transactional id, acks, serializers, ...) are refused. The backend
(:func:`streamgmm.io.backend.open_backend`) merges them into its clients' settings.
``kafka.broker_quirks`` names the broker workarounds (:mod:`streamgmm.io.quirks`).

The package has three parts: :mod:`~streamgmm.config._schema` (value kinds, keys, checks),
:mod:`~streamgmm.config.sections` (one dataclass per section, and :class:`Config`) and
:mod:`~streamgmm.config.loader` (:func:`load_config`).

Examples
--------
>>> config = load_config(env={"STREAMGMM_FEATURES__FIELDS": "latency_ms,bytes.out",
...                           "STREAMGMM_THRESHOLD__FALSE_ALARM_RATE": "0.01"})
>>> config.features.fields
('latency_ms', 'bytes.out')
>>> config.threshold.false_alarm_rate
0.01
>>> config.detector_kwargs()["feature_names"]
['latency_ms', 'bytes.out']
>>> load_config(env={"STREAMGMM_FEATURES__FIELDS": "a",
...                  "STREAMGMM_THRESHOLD__FALSE_ALARM_RATE": "2"})
Traceback (most recent call last):
...
streamgmm.config.ConfigError: threshold.false_alarm_rate: must be between 0 and 0.5, got 2.0 \
(from environment variable STREAMGMM_THRESHOLD__FALSE_ALARM_RATE); it is the fraction of normal \
events allowed to be flagged, e.g. 0.001
"""

from streamgmm.config._schema import ConfigError
from streamgmm.config.loader import ENV_PREFIX, load_config
from streamgmm.config.sections import (
    MESSAGE_OVERHEAD_BYTES,
    BatchConfig,
    CheckpointConfig,
    Config,
    FeaturesConfig,
    KafkaConfig,
    MetricsConfig,
    ModelConfig,
    ThresholdConfig,
    WatchdogConfig,
)

__all__ = [
    "ConfigError",
    "Config",
    "KafkaConfig",
    "BatchConfig",
    "FeaturesConfig",
    "ModelConfig",
    "ThresholdConfig",
    "MetricsConfig",
    "CheckpointConfig",
    "WatchdogConfig",
    "load_config",
    "ENV_PREFIX",
    "MESSAGE_OVERHEAD_BYTES",
]
