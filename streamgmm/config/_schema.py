"""The configuration's small schema library: value kinds, keys, range checks, sections.

A section is a frozen dataclass whose fields are made with :func:`_key` (default, kind, check,
hint); :class:`_Section` checks and converts every field on construction, from a file or from
code, and raises :class:`ConfigError` naming the key. Nothing here knows a section or a client
library.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any

__all__ = ["ConfigError", "is_secret", "show"]


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key, the problem and the remedy.

    Raised as ``streamgmm.config.ConfigError`` (its public name, whichever module raises it).

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

    __module__ = "streamgmm.config"

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
    from streamgmm.io.librdkafka_settings import SENSITIVE_PROPERTIES

    lowered = name.lower()
    if lowered in _NOT_SECRET:
        return False
    dotted = lowered if "." in lowered else lowered.replace("_", ".")
    return dotted in SENSITIVE_PROPERTIES or any(word in lowered for word in _SECRET_WORDS)




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




def _parse_by_default(text: str, default: Any) -> Any:
    """Parse an environment string by the type of a setting's default (pass-through keys)."""
    if isinstance(default, bool):
        return _Bool().parse_env(text)
    if isinstance(default, int):
        return _Int().parse_env(text)
    if isinstance(default, float):
        return _Float().parse_env(text)
    if isinstance(default, list | tuple):
        return _StrList().parse_env(text)
    return text


#: Public names for :mod:`streamgmm.io`'s checks.
is_secret = _is_secret
show = _show
