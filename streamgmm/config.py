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
in ``[kafka.librdkafka]``, checked by librdkafka itself; :meth:`KafkaConfig.librdkafka_settings`
merges it with the translated security keys. With ``"kafka-python"``, any other kafka-python
setting can be passed through in ``[kafka.client]`` (both consumer and producer),
``[kafka.consumer]`` or ``[kafka.producer]``; the names are checked against kafka-python's own
list. Either way the settings that streamgmm manages itself to keep its delivery guarantee
(group id, auto commit, isolation level, transactional id, acks, serializers, ...) are refused.
:meth:`KafkaConfig.consumer_kwargs` and :meth:`KafkaConfig.producer_kwargs` merge them.

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

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
]

logger = logging.getLogger(__name__)

ENV_PREFIX = "STREAMGMM_"

#: Room an output message needs beyond the event it carries (its own fields, headers, framing).
MESSAGE_OVERHEAD_BYTES = 65_536
#: The producers' default limits on one message: librdkafka's ``message.max.bytes`` and
#: kafka-python's ``max_request_size``.
LIBRDKAFKA_MESSAGE_MAX_BYTES = 1_000_000
KAFKA_PYTHON_MAX_REQUEST_SIZE = 1_048_576


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key, the problem and the remedy.

    Parameters
    ----------
    key : str
        Dotted name of the offending key (``"threshold.false_alarm_rate"``), or ``""`` when the
        problem is the file itself.
    problem : str
        What is wrong.
    hint : str, optional
        What to do about it.
    """

    def __init__(self, key: str, problem: str, hint: str | None = None):
        self.key = key
        self.problem = problem
        self.hint = hint
        message = f"{key}: {problem}" if key else problem
        if hint:
            message += f"; {hint}"
        super().__init__(message)


# --------------------------------------------------------------------------------------------
# Value kinds: how a key's value is checked and converted (from TOML or from an environment string)
# --------------------------------------------------------------------------------------------


class _WrongType(Exception):
    """Raised by a kind when a value has the wrong type; the message says what was expected."""


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}" (a string)'
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, list | tuple):
        return f"{list(value)!r} (a list)"
    if isinstance(value, dict):
        return "a table"
    return repr(value)


class _Kind:
    description = "a value"

    def coerce(self, value: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def parse_env(self, text: str) -> Any:
        return self.coerce(text)

    def to_toml(self, value: Any) -> Any:
        return value


class _Str(_Kind):
    description = "a string"

    def coerce(self, value):
        if not isinstance(value, str):
            raise _WrongType(f"expected a string, got {_show(value)}")
        return value


class _Int(_Kind):
    description = "an integer"

    def coerce(self, value):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise _WrongType(f"expected an integer, got {_show(value)}")
        return int(value)

    def parse_env(self, text):
        try:
            return int(text.strip().replace("_", ""))
        except ValueError:
            raise _WrongType(f"expected an integer, got {_show(text)}") from None


class _Float(_Kind):
    description = "a number"

    def coerce(self, value):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _WrongType(f"expected a number, got {_show(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise _WrongType(f"expected a finite number, got {value}")
        return value

    def parse_env(self, text):
        try:
            return self.coerce(float(text.strip().replace("_", "")))
        except ValueError:
            raise _WrongType(f"expected a number, got {_show(text)}") from None


class _Bool(_Kind):
    description = "true or false"
    _WORDS = {"true": True, "1": True, "yes": True, "on": True,
              "false": False, "0": False, "no": False, "off": False}

    def coerce(self, value):
        if not isinstance(value, bool):
            raise _WrongType(f"expected true or false, got {_show(value)}")
        return value

    def parse_env(self, text):
        try:
            return self._WORDS[text.strip().lower()]
        except KeyError:
            raise _WrongType(f"expected true or false, got {_show(text)}") from None


class _StrList(_Kind):
    """A list of strings; a single string is split at commas (handy for environment variables)."""

    description = "a list of strings"

    def coerce(self, value):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise _WrongType(f"expected a list of strings, got {_show(value)}")
        return tuple(value)

    def parse_env(self, text):
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                return self.coerce(tomllib.loads(f"v = {stripped}")["v"])
            except tomllib.TOMLDecodeError as exc:
                raise _WrongType(f"could not read {stripped!r} as a TOML list: {exc}") from None
        return self.coerce(text)

    def to_toml(self, value):
        return list(value)


class _Choice(_Kind):
    def __init__(self, *choices: str):
        self.choices = choices
        self.description = "one of " + ", ".join(f'"{c}"' for c in choices)

    def coerce(self, value):
        if not isinstance(value, str) or value not in self.choices:
            close = difflib.get_close_matches(str(value), self.choices, n=1)
            extra = f' (did you mean "{close[0]}"?)' if close else ""
            raise _WrongType(f"must be {self.description}, got {_show(value)}{extra}")
        return value


class _IntOrAuto(_Kind):
    description = 'an integer or "auto"'

    def coerce(self, value):
        if value == "auto":
            return "auto"
        if isinstance(value, bool) or not isinstance(value, int):
            raise _WrongType(f'expected an integer or "auto", got {_show(value)}')
        return value

    def parse_env(self, text):
        text = text.strip()
        if text.lower() == "auto":
            return "auto"
        try:
            return int(text)
        except ValueError:
            raise _WrongType(f'expected an integer or "auto", got {_show(text)}') from None


class _Optional(_Kind):
    """``None`` allowed (TOML has no null: omit the key; in the environment write ``none``)."""

    def __init__(self, inner: _Kind):
        self.inner = inner
        self.description = inner.description + " (optional)"

    def coerce(self, value):
        return None if value is None else self.inner.coerce(value)

    def parse_env(self, text):
        if text.strip().lower() in ("", "none", "null"):
            return None
        return self.inner.parse_env(text)

    def to_toml(self, value):
        return None if value is None else self.inner.to_toml(value)


def _key(default: Any, kind: _Kind, check: Callable[[Any], str | None] | None = None,
         hint: str | None = None, secret: bool = False):
    """A configuration key: its default, its kind, a range check and the hint shown on error."""
    return field(default=default,
                 metadata={"kind": kind, "check": check, "hint": hint, "secret": secret})


def _between(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    def check(v):
        if v is None:
            return None
        below = v <= low if low_open else v < low
        above = v >= high if high_open else v > high
        if below or above:
            if low_open and not high_open and high == math.inf:
                return f"must be greater than {low:g}, got {v!r}"
            if high == math.inf:
                return f"must be at least {low:g}, got {v!r}"
            return f"must be between {low:g} and {high:g}, got {v!r}"
        return None

    return check


def _at_least(low: float):
    return _between(low, math.inf)


def _positive(v):
    return None if v is None or v > 0 else f"must be greater than 0, got {v!r}"


def _non_empty(v):
    return None if v else "must not be empty"


def _port(v):
    return None if 0 <= v <= 65535 else f"must be a TCP port between 0 and 65535, got {v!r}"


_FIELD_PATH = re.compile(r"^[^.\s]+(\.[^.\s]+)*$")


def _fields_check(fields):
    if not fields:
        return "must list at least one numeric JSON field"
    for name in fields:
        if not _FIELD_PATH.match(name):
            return (f'"{name}" is not a dotted path like "a" or "b.c" '
                    "(no empty parts, no whitespace)")
    seen = set()
    for name in fields:
        if name in seen:
            return f'"{name}" is listed twice'
        seen.add(name)
    return None


def _n_components_check(v):
    if v == "auto" or 1 <= v <= 1000:
        return None
    return f'must be "auto" or an integer between 1 and 1000, got {v!r}'


class _Section:
    """Shared validation for section dataclasses (runs on construction, from files or code)."""

    _name = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if "kind" not in f.metadata:
                continue
            key = f"{self._name}.{f.name}"
            secret = f.metadata["secret"] or _is_secret(f.name)
            try:
                value = f.metadata["kind"].coerce(getattr(self, f.name))
            except _WrongType as exc:
                problem = (f"expected {f.metadata['kind'].description}, got a value of another "
                           "type (not shown: it is a secret)") if secret else str(exc)
                raise ConfigError(key, problem, f.metadata["hint"]) from None
            object.__setattr__(self, f.name, value)
            check = f.metadata["check"]
            problem = check(value) if check else None
            if problem:
                raise ConfigError(key, problem, f.metadata["hint"])
        self._validate()

    def _validate(self) -> None:
        """Checks that involve more than one key of the section."""

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """The section as a TOML-ready mapping (secrets replaced by ``"***"`` when ``redact``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if "kind" in f.metadata:
                value = f.metadata["kind"].to_toml(value)
                secret = f.metadata["secret"] or _is_secret(f.name)
                if redact and secret and value is not None:
                    value = "***"
            elif isinstance(value, Mapping):
                value = {k: ("***" if redact and _is_secret(k) else v) for k, v in value.items()}
            out[f.name] = value
        return out


def _toml_key(name: str) -> str:
    """A TOML key: bare when it can be, quoted otherwise (librdkafka's names hold dots)."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _toml_value(name)


#: Words that mark a setting's value as secret wherever they appear in its name.
_SECRET_WORDS = ("password", "passwd", "secret", "key", "token", "credential", "passphrase",
                 "sasl", "oauth", "jaas", "pem")
#: Names that hold one of those words but nothing secret.
_NOT_SECRET = frozenset({"sasl_mechanism", "sasl.mechanism", "sasl.mechanisms"})


def _is_secret(name: str) -> bool:
    """Whether the value of setting ``name`` must never be shown (``--print-config``, errors).

    By name patterns (:data:`_SECRET_WORDS`: ``sasl.*``, ``*password*``, ``*key*``, ...) and by
    librdkafka's own list of sensitive properties.

    Examples
    --------
    >>> [_is_secret(n) for n in ("ssl.key.pem", "sasl.oauthbearer.config", "sasl_mechanism",
    ...                          "linger.ms", "ssl_keyfile", "api_token")]
    [True, True, False, False, True, True]
    """
    from streamgmm.io.confluent import SENSITIVE_PROPERTIES

    lowered = name.lower()
    if lowered in _NOT_SECRET:
        return False
    dotted = lowered if "." in lowered else lowered.replace("_", ".")
    return dotted in SENSITIVE_PROPERTIES or any(word in lowered for word in _SECRET_WORDS)


# --------------------------------------------------------------------------------------------
# Kafka pass-through settings
# --------------------------------------------------------------------------------------------

# Settings streamgmm sets itself: overriding them would break the delivery guarantee or decoding.
_MANAGED = frozenset({
    "bootstrap_servers", "group_id", "auto_offset_reset", "enable_auto_commit", "isolation_level",
    "transactional_id", "enable_idempotence", "acks", "key_deserializer", "value_deserializer",
    "key_serializer", "value_serializer", "max_poll_records", "default_offset_commit_callback",
})
# Settings that take Python objects, which a TOML file cannot express.
_OBJECTS = frozenset({
    "kafka_client", "selector", "ssl_context", "metric_reporters", "partitioner",
    "sasl_oauth_token_provider", "socket_options", "partition_assignment_strategy",
})


def _kafka_python_defaults() -> tuple[dict[str, Any], dict[str, Any]]:
    from kafka import KafkaConsumer, KafkaProducer

    return dict(KafkaConsumer.DEFAULT_CONFIG), dict(KafkaProducer.DEFAULT_CONFIG)


def _check_passthrough(table: str, settings: Mapping[str, Any], allowed: set[str]) -> dict:
    out = {}
    for name, value in settings.items():
        key = f"kafka.{table}.{name}"
        if name in _MANAGED:
            raise ConfigError(key, "is managed by streamgmm and cannot be overridden",
                              "remove it (use the [kafka] keys for servers, group and delivery)")
        if name in _OBJECTS:
            raise ConfigError(key, "takes a Python object, which a config file cannot express",
                              "remove it")
        if name not in allowed:
            close = difflib.get_close_matches(name, sorted(allowed), n=1)
            hint = f'did you mean "{close[0]}"? ' if close else ""
            raise ConfigError(key, f"is not a kafka-python {table} setting",
                              hint + "see the KafkaConsumer/KafkaProducer documentation")
        if isinstance(value, Mapping):
            raise ConfigError(key, "expected a value, got a table", "remove the sub-table")
        out[name] = tuple(value) if isinstance(value, list) else value
    return out


def _parse_passthrough_env(name: str, text: str, default: Any) -> Any:
    """Parse an environment string for a pass-through key by the type of kafka-python's default."""
    if isinstance(default, bool):
        return _Bool().parse_env(text)
    if isinstance(default, int):
        return _Int().parse_env(text)
    if isinstance(default, float):
        return _Float().parse_env(text)
    if isinstance(default, list | tuple):
        return _StrList().parse_env(text)
    return text


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KafkaConfig(_Section):
    """``[kafka]``: where events come from and where anomalies and dead letters go.

    Examples
    --------
    >>> kafka = KafkaConfig(bootstrap_servers="k1:9092,k2:9092", security_protocol="SASL_SSL",
    ...                     sasl_mechanism="PLAIN", sasl_plain_username="svc",
    ...                     sasl_plain_password="s3cret", librdkafka={"compression_type": "zstd"})
    >>> kafka.bootstrap_servers, kafka.backend
    (('k1:9092', 'k2:9092'), 'confluent-kafka')
    >>> settings = kafka.librdkafka_settings()
    >>> settings["sasl.username"], settings["compression.type"]
    ('svc', 'zstd')
    >>> kafka.to_dict()["sasl_plain_password"]
    '***'

    With ``backend="kafka-python"``, its settings go in ``client``, ``consumer`` and ``producer``:

    >>> kafka = KafkaConfig(backend="kafka-python", consumer={"session_timeout_ms": 6000})
    >>> kw = kafka.consumer_kwargs()
    >>> kw["group_id"], kw["security_protocol"], kw["session_timeout_ms"]
    ('streamgmm', 'PLAINTEXT', 6000)
    >>> "group_id" in kafka.producer_kwargs()
    False
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
        hint="give every daemon instance its own stable id (defaults to <group_id>-<input_topic>)")
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
    client: Mapping[str, Any] = field(default_factory=dict)
    consumer: Mapping[str, Any] = field(default_factory=dict)
    producer: Mapping[str, Any] = field(default_factory=dict)
    librdkafka: Mapping[str, Any] = field(default_factory=dict)

    _SECURITY = ("security_protocol", "sasl_mechanism", "sasl_plain_username",
                 "sasl_plain_password", "ssl_cafile", "ssl_certfile", "ssl_keyfile",
                 "ssl_password", "ssl_check_hostname")

    def _validate(self) -> None:
        if self.backend == "confluent-kafka":
            self._validate_librdkafka()
        elif self.librdkafka:
            raise ConfigError(f"kafka.librdkafka.{next(iter(self.librdkafka))}",
                              'applies to kafka.backend = "confluent-kafka" only',
                              'set kafka.backend = "confluent-kafka", or use the kafka-python '
                              "tables [kafka.client], [kafka.consumer] and [kafka.producer]")
        if self.client or self.consumer or self.producer:  # kafka-python only when needed
            consumer_defaults, producer_defaults = _kafka_python_defaults()
            common = set(consumer_defaults) & set(producer_defaults)
            object.__setattr__(self, "client", _check_passthrough(
                "client", self.client, common))
            object.__setattr__(self, "consumer", _check_passthrough(
                "consumer", self.consumer, set(consumer_defaults)))
            object.__setattr__(self, "producer", _check_passthrough(
                "producer", self.producer, set(producer_defaults)))
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

    def _validate_librdkafka(self) -> None:
        from streamgmm.io.confluent import (
            MANAGED,
            SECURITY_PROPERTIES,
            check_librdkafka_settings,
            librdkafka_name,
        )

        for table in ("client", "consumer", "producer"):
            if getattr(self, table):
                name = next(iter(getattr(self, table)))
                raise ConfigError(f"kafka.{table}.{name}",
                                  "is a kafka-python setting, but kafka.backend is "
                                  '"confluent-kafka"',
                                  "give librdkafka's property under [kafka.librdkafka] instead")
        settings = {}
        for name, value in self.librdkafka.items():
            key, prop = f"kafka.librdkafka.{name}", librdkafka_name(name)
            if prop in MANAGED:
                raise ConfigError(key, "is managed by streamgmm", "remove it")
            if prop in SECURITY_PROPERTIES:
                raise ConfigError(key, "is set by an explicit [kafka] key",
                                  "set kafka.security_protocol, kafka.sasl_* or kafka.ssl_* "
                                  "instead")
            if isinstance(value, (Mapping, list)):
                shown = "a table or list (not shown: it is a secret)" if _is_secret(prop) \
                    else _show(value)
                raise ConfigError(key, f"expected a single value, got {shown}",
                                  'librdkafka takes strings, numbers and booleans, e.g. "a,b"')
            problem = check_librdkafka_settings({prop: value})
            if problem:
                if _is_secret(prop):  # a value may slip into the complaint: never show it
                    problem = problem.replace(str(value), "***")
                raise ConfigError(key, f"is not a valid librdkafka setting: {problem}",
                                  "see librdkafka's CONFIGURATION.md for the property names")
            settings[prop] = value
        object.__setattr__(self, "librdkafka", settings)

    def librdkafka_settings(self) -> dict[str, Any]:
        """Security and ``[kafka.librdkafka]`` properties for the confluent-kafka clients."""
        from streamgmm.io.confluent import librdkafka_security

        return {**librdkafka_security(self.security_kwargs()), **self.librdkafka}

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
    def effective_transactional_id(self) -> str:
        """``transactional_id``, or ``"<group_id>-<input_topic>"`` when it is not set."""
        return self.transactional_id or f"{self.group_id}-{self.input_topic}"

    def security_kwargs(self) -> dict[str, Any]:
        """The security settings (only those set), for any kafka-python client."""
        out = {"security_protocol": self.security_protocol,
               "ssl_check_hostname": self.ssl_check_hostname}
        for name in self._SECURITY:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def consumer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``kafka.KafkaConsumer`` (the daemon adds what it manages)."""
        return {"bootstrap_servers": list(self.bootstrap_servers), "group_id": self.group_id,
                "auto_offset_reset": self.auto_offset_reset, **self.security_kwargs(),
                **_lists(self.client), **_lists(self.consumer)}

    def producer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``kafka.KafkaProducer`` (the daemon adds what it manages)."""
        return {"bootstrap_servers": list(self.bootstrap_servers), **self.security_kwargs(),
                **_lists(self.client), **_lists(self.producer)}


def _lists(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


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
        0.002, _Float(), _between(0, 0.5),
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
        hint="a fixed score threshold (-log p(x)) instead of the adaptive one; omit to adapt")


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
    """``[checkpoint]``: where and how often the model state (with its offsets) is saved."""

    _name = "checkpoint"

    path: str = _key("streamgmm-checkpoint.npz", _Str(), _non_empty,
                     "a file path on persistent storage (relative to the working directory)")
    interval_seconds: float = _key(30.0, _Float(), _between(0.1, 86_400),
                                   "seconds between checkpoints, e.g. 30")


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


_SECTIONS: dict[str, type[_Section]] = {
    "kafka": KafkaConfig,
    "batch": BatchConfig,
    "features": FeaturesConfig,
    "model": ModelConfig,
    "threshold": ThresholdConfig,
    "metrics": MetricsConfig,
    "checkpoint": CheckpointConfig,
    "watchdog": WatchdogConfig,
}
_PASSTHROUGH_TABLES = ("client", "consumer", "producer")


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
        return {name: getattr(self, name).to_dict(redact) for name in _SECTIONS}

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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _unknown_key(key: str, known, where: str) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f'did you mean "{close[0]}"? ' if close else ""
    section = key.rsplit(".", 1)[0] if "." in key else ""
    listing = ", ".join(sorted(known))
    scope = f"[{section}]" if section else "the top level"
    return ConfigError(key, f"unknown key ({where})",
                       f"{hint}known keys in {scope}: {listing}")


def _env_overrides(env: Mapping[str, str]) -> list[tuple[tuple[str, ...], str, str]]:
    """``(path, text, variable)`` for every ``STREAMGMM_<SECTION>__<KEY>`` variable."""
    out = []
    for variable, text in env.items():
        if not variable.startswith(ENV_PREFIX) or "__" not in variable:
            continue
        parts = tuple(p.lower() for p in variable[len(ENV_PREFIX):].split("__"))
        if any(not p for p in parts):
            raise ConfigError(".".join(parts), f"environment variable {variable} is malformed",
                              "write STREAMGMM_<SECTION>__<KEY>, e.g. STREAMGMM_BATCH__MAX_RECORDS")
        out.append((parts, text, variable))
    return sorted(out)


def load_config(path: str | os.PathLike | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    """Read the configuration from a TOML file and the environment, and validate it.

    Parameters
    ----------
    path : path-like, optional
        A TOML file. Without one, the defaults and the environment make the configuration.
    env : mapping, optional
        Environment variables (defaults to ``os.environ``). Every ``STREAMGMM_<SECTION>__<KEY>``
        overrides ``<key>`` of ``[<section>]``; ``STREAMGMM_KAFKA__LIBRDKAFKA__<KEY>`` sets a
        librdkafka property (underscores for dots), ``STREAMGMM_KAFKA__CLIENT__<KEY>`` (and
        ``__CONSUMER__``/``__PRODUCER__``) a kafka-python pass-through setting. Names are
        case-insensitive; values are parsed to the key's type (lists: comma-separated or a TOML
        array; optional keys: ``none`` unsets).

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        The file is missing or not TOML, or a key is unknown, of the wrong type or out of range.
        The message names the key and where its value came from.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    file_label = "built-in default"
    if path is not None:
        file_label = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("", f"config file {path} does not exist",
                              "pass the path of a TOML file, e.g. config/streamgmm.toml") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError("", f"config file {path} is not valid TOML: {exc}",
                              "fix the syntax (see config/streamgmm.toml)") from None
    sources: dict[str, str] = {}
    data: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        if section not in _SECTIONS:
            raise _unknown_key(section, _SECTIONS, f"in {file_label}")
        if not isinstance(values, dict):
            raise ConfigError(section, f"expected a [{section}] table, got {_show(values)}",
                              f"write the keys under a [{section}] header")
        data[section] = dict(values)
        for key in values:
            sources[f"{section}.{key}"] = f"from {file_label}"
            if isinstance(values[key], dict):
                for sub in values[key]:
                    sources[f"{section}.{key}.{sub}"] = f"from {file_label}"

    for parts, text, variable in _env_overrides(env):
        dotted = ".".join(parts)
        where = f"from environment variable {variable}"
        if parts[0] not in _SECTIONS:
            raise _unknown_key(parts[0], _SECTIONS, where)
        cls = _SECTIONS[parts[0]]
        fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
        if parts[0] == "kafka" and len(parts) == 3 and parts[1] == "librdkafka":
            # librdkafka parses its own values from strings
            data.setdefault("kafka", {}).setdefault("librdkafka", {})
            data["kafka"]["librdkafka"] = {**data["kafka"]["librdkafka"], parts[2]: text}
        elif parts[0] == "kafka" and len(parts) == 3 and parts[1] in _PASSTHROUGH_TABLES:
            consumer_defaults, producer_defaults = _kafka_python_defaults()
            default = {**producer_defaults, **consumer_defaults}.get(parts[2])
            try:
                value = _parse_passthrough_env(parts[2], text, default)
            except _WrongType as exc:
                raise ConfigError(dotted, f"{exc} ({where})") from None
            data.setdefault("kafka", {}).setdefault(parts[1], {})
            data["kafka"][parts[1]] = {**data["kafka"][parts[1]], parts[2]: value}
        elif len(parts) == 2 and "kind" in fields_by_name.get(parts[1], field()).metadata:
            f = fields_by_name[parts[1]]
            try:
                value = f.metadata["kind"].parse_env(text)
            except _WrongType as exc:
                raise ConfigError(dotted, f"{exc} ({where})", f.metadata["hint"]) from None
            data.setdefault(parts[0], {})[parts[1]] = value
        else:
            known = [f.name for f in dataclasses.fields(cls)]
            raise _unknown_key(dotted, known, where)
        sources[dotted] = where
        logger.debug("config %s overridden by %s", dotted, variable)

    sections: dict[str, _Section] = {}
    for section, cls in _SECTIONS.items():
        values = data.get(section, {})
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise _unknown_key(f"{section}.{key}", known, sources.get(f"{section}.{key}", ""))
        try:
            sections[section] = cls(**values)
        except ConfigError as exc:
            where = sources.get(exc.key) or ("not set" if exc.key else "")
            problem = f"{exc.problem} ({where})" if where else exc.problem
            raise ConfigError(exc.key, problem, exc.hint) from None
    return Config(**sections)
