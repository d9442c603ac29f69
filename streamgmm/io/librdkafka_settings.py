"""librdkafka's settings, checked and translated without librdkafka: no client library here.

The ``[kafka]`` security keys are translated to librdkafka's names (:func:`librdkafka_security`);
anything else goes under ``[kafka.librdkafka]`` with librdkafka's own property names
(``"fetch.wait.max.ms"``, or ``fetch_wait_max_ms``), checked against librdkafka's documented
properties when the configuration is loaded (:func:`check_librdkafka_settings`,
:func:`check_librdkafka_table`), without building a client. The configuration uses these
checks whatever the backend, so it never imports confluent-kafka.

Examples
--------
>>> librdkafka_security({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN",
...                      "sasl_plain_username": "svc", "ssl_check_hostname": False})
... # doctest: +NORMALIZE_WHITESPACE
{'security.protocol': 'SASL_SSL', 'sasl.mechanism': 'PLAIN', 'sasl.username': 'svc',
 'ssl.endpoint.identification.algorithm': 'none'}
>>> librdkafka_name("fetch_wait_max_ms"), librdkafka_name("fetch.wait.max.ms")
('fetch.wait.max.ms', 'fetch.wait.max.ms')
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

__all__ = [
    "MANAGED",
    "CLASSIC_PROTOCOL_ONLY",
    "SECURITY_PROPERTIES",
    "SENSITIVE_PROPERTIES",
    "librdkafka_name",
    "librdkafka_security",
    "check_librdkafka_settings",
    "check_librdkafka_table",
]

#: Settings the daemon manages itself; ``[kafka.librdkafka]`` may not override them.
MANAGED = frozenset({
    "bootstrap.servers", "group.id", "auto.offset.reset", "isolation.level",
    "enable.auto.commit", "enable.auto.offset.store", "transactional.id", "logger",
    "on_delivery", "error_cb", "on_assign",
})

#: The consumer properties librdkafka refuses with ``group.protocol=consumer`` (KIP-848: the
#: broker owns the session timeout, the heartbeats and the assignor).
CLASSIC_PROTOCOL_ONLY = ("session.timeout.ms", "heartbeat.interval.ms",
                         "partition.assignment.strategy", "group.protocol.type")

_SECURITY_NAMES = {
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
}
#: librdkafka's names of the ``[kafka]`` security keys; set them there, not in the table.
SECURITY_PROPERTIES = frozenset(_SECURITY_NAMES.values()) | {
    "ssl.endpoint.identification.algorithm"}


def librdkafka_name(name: str) -> str:
    """librdkafka's property name for ``name``: underscores become dots unless it has dots."""
    return name if "." in name else name.replace("_", ".")


def librdkafka_security(security: Mapping[str, Any]) -> dict[str, Any]:
    """Translate the ``[kafka]`` security keys (kafka-python names) to librdkafka properties."""
    out: dict[str, Any] = {}
    for name, value in security.items():
        if value is None:
            continue
        if name == "ssl_check_hostname":
            if not value:
                out["ssl.endpoint.identification.algorithm"] = "none"
        else:
            out[_SECURITY_NAMES[name]] = value
    return out


#: librdkafka's sensitive properties (flagged ``_RK_SENSITIVE`` in its ``rdkafka_conf.c``): their
#: values are never shown, in ``--print-config`` or in an error.
SENSITIVE_PROPERTIES = frozenset({
    "sasl.username", "sasl.password", "sasl.oauthbearer.config", "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.assertion.private.key.file", "sasl.oauthbearer.assertion.private.key.pem",
    "sasl.oauthbearer.assertion.private.key.passphrase", "ssl.key.location", "ssl.key.password",
    "ssl.key.pem", "ssl_key", "ssl.ca.pem", "ssl.keystore.password",
})
_BOOLEANS = {"true": True, "false": False}


def check_librdkafka_settings(settings: Mapping[str, Any]) -> str | None:
    """Check ``settings`` against librdkafka's documented properties; return the first
    complaint, or ``None``.

    Names, types, ranges and allowed words come from librdkafka's CONFIGURATION.md
    (:mod:`streamgmm.io.librdkafka_properties`). No client is built, so checking has no side
    effects: no plugin (``plugin.library.paths``) is loaded, no key file read, no thread
    started. The value of a sensitive property is never repeated in a complaint.

    Examples
    --------
    >>> check_librdkafka_settings({"fetch.wait.max.ms": 50}) is None
    True
    >>> print(check_librdkafka_settings({"fetch.wait.max.msec": 50}))
    No such configuration property: "fetch.wait.max.msec" (did you mean "fetch.wait.max.ms"?)
    >>> print(check_librdkafka_settings({"compression.type": "brotli"}))
    Invalid value "brotli" for configuration property "compression.type": one of none, gzip, \
snappy, lz4, zstd
    >>> print(check_librdkafka_settings({"ssl.key.password": 12345}))  # a number, not shown
    None
    >>> print(check_librdkafka_settings({"plugin.library.paths": "/opt/none.so"}))  # not loaded
    None
    """
    from streamgmm.io.librdkafka_properties import PROPERTIES

    for name, value in settings.items():
        if name not in PROPERTIES:
            close = difflib.get_close_matches(name, list(PROPERTIES), n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            return f'No such configuration property: "{name}"{hint}'
        _, kind, allowed = PROPERTIES[name]
        problem = _check_value(name, kind, allowed, value)
        if problem:
            shown = "(not shown: sensitive)" if name in SENSITIVE_PROPERTIES else f'"{value}"'
            return f'Invalid value {shown} for configuration property "{name}": {problem}'
    return None


def _check_value(name: str, kind: str, allowed: tuple, value: Any) -> str | None:
    """What is wrong with ``value`` for a property of ``kind``, or ``None``."""
    text = str(value).strip().lower() if not isinstance(value, bool) else str(value).lower()
    if kind == "api":
        return "it is set through librdkafka's API, not in a configuration file"
    if kind == "boolean":
        return None if isinstance(value, bool) or text in _BOOLEANS else "true or false"
    if kind in ("integer", "float"):
        if name in ("acks", "request.required.acks") and text == "all":
            return None
        try:
            number = float(text) if kind == "float" else int(text)
        except ValueError:
            return f"expected {'a number' if kind == 'float' else 'an integer'}"
        if isinstance(value, bool) or (allowed and not allowed[0] <= number <= allowed[1]):
            return f"must be between {allowed[0]} and {allowed[1]}" if allowed else "a number"
        return None
    if kind in ("enum", "flags") and allowed:
        words = [w.strip() for w in text.split(",")] if kind == "flags" else [text]
        if not all(w in allowed for w in words):
            return "one of " + ", ".join(allowed)
    return None




def check_librdkafka_table(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check the ``[kafka.librdkafka]`` table; return it with librdkafka's property names.

    Raises
    ------
    streamgmm.config.ConfigError
        For the first setting that streamgmm manages, that an explicit ``[kafka]`` key sets, that
        is not a single value, or that librdkafka would refuse. A secret's value is never shown.
    """
    from streamgmm.config._schema import ConfigError, is_secret, show

    out = {}
    for name, value in settings.items():
        key, prop = f"kafka.librdkafka.{name}", librdkafka_name(name)
        if prop in MANAGED:
            raise ConfigError(key, "is managed by streamgmm", "remove it")
        if prop in SECURITY_PROPERTIES:
            raise ConfigError(key, "is set by an explicit [kafka] key",
                              "set kafka.security_protocol, kafka.sasl_* or kafka.ssl_* instead")
        if isinstance(value, (Mapping, list)):
            shown = ("a table or list (not shown: it is a secret)" if is_secret(prop)
                     else show(value))
            raise ConfigError(key, f"expected a single value, got {shown}",
                              'librdkafka takes strings, numbers and booleans, e.g. "a,b"')
        problem = check_librdkafka_settings({prop: value})
        if problem:
            if is_secret(prop):  # a value may slip into the complaint: never show it
                problem = problem.replace(str(value), "***")
            raise ConfigError(key, f"is not a valid librdkafka setting: {problem}",
                              "see librdkafka's CONFIGURATION.md for the property names")
        out[prop] = value
    return out
