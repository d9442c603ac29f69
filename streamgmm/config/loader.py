"""Loading the configuration: a TOML file, then ``STREAMGMM_<SECTION>__<KEY>`` overrides.

:func:`load_config` reads the file, applies the environment, builds the sections
(:mod:`streamgmm.config.sections`) and says where a bad value came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any

from streamgmm.config._schema import ConfigError, _parse_by_default, _Section, _show, _WrongType
from streamgmm.config.sections import SECTIONS, Config

__all__ = ["load_config", "ENV_PREFIX"]

logger = logging.getLogger(__name__)

ENV_PREFIX = "STREAMGMM_"
#: The ``[kafka]`` sub-tables of kafka-python settings passed through to its clients.
_PASSTHROUGH_TABLES = ("client", "consumer", "producer")


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
        if section not in SECTIONS:
            raise _unknown_key(section, SECTIONS, f"in {file_label}")
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
        if parts[0] not in SECTIONS:
            raise _unknown_key(parts[0], SECTIONS, where)
        cls = SECTIONS[parts[0]]
        fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
        if parts[0] == "kafka" and len(parts) == 3 and parts[1] == "librdkafka":
            # librdkafka parses its own values from strings
            data.setdefault("kafka", {}).setdefault("librdkafka", {})
            data["kafka"]["librdkafka"] = {**data["kafka"]["librdkafka"], parts[2]: text}
        elif parts[0] == "kafka" and len(parts) == 3 and parts[1] in _PASSTHROUGH_TABLES:
            from streamgmm.io.kafka import passthrough_default

            try:
                value = _parse_by_default(text, passthrough_default(parts[2]))
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
    for section, cls in SECTIONS.items():
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
