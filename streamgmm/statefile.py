"""Versioned, pickle-free state files, written atomically.

Every persistent object in streamgmm (a mixture, a detector, the daemon's checkpoint) is stored as
a *state*: a flat mapping of names to numpy arrays plus a small JSON document of metadata. A state
file is a ``.npz`` archive read with ``allow_pickle=False`` (a crafted file cannot run code) that
carries its kind, a format version and a SHA-256 digest of its contents, so that a truncated or
tampered file, a file of another kind, or a file written by a newer streamgmm is refused with a
clear :class:`CheckpointError` instead of being half-loaded.

Files are written to a temporary name in the same directory, flushed to disk and renamed over the
target, so a crash (even ``kill -9``) leaves either the old file or the new one, never a mixture.

Examples
--------
>>> import numpy as np, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "state.npz")
>>> write_state(path, kind="example", version=1,
...             arrays={"w": np.array([0.25, 0.75])}, meta={"name": "demo"})
>>> arrays, meta = read_state(path, kind="example", max_version=1)
>>> arrays["w"].tolist(), meta["name"]
([0.25, 0.75], 'demo')
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["CheckpointError", "write_state", "read_state", "dumps_state", "loads_state"]

_META_KEY = "__meta__"
_FORMAT = "streamgmm-state"


class CheckpointError(ValueError):
    """A state file is missing, corrupt, of the wrong kind or from a newer version."""


def _digest(arrays: Mapping[str, np.ndarray], meta_json: bytes) -> str:
    h = hashlib.sha256()
    h.update(meta_json)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def dumps_state(
    kind: str, version: int, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None
) -> bytes:
    """Serialise a state to bytes (see :func:`write_state`)."""
    clean: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        a = np.asarray(value)
        if a.dtype == object:
            raise TypeError(f"state array {name!r} has dtype object, which cannot be stored safely")
        clean[name] = a
    if _META_KEY in clean:
        raise ValueError(f"{_META_KEY!r} is reserved")
    body = json.dumps(dict(meta or {}), sort_keys=True, allow_nan=False).encode()
    header = {"format": _FORMAT, "kind": kind, "version": int(version)}
    header["sha256"] = _digest(clean, body)
    header_json = json.dumps({"header": header, "meta": json.loads(body)}, sort_keys=True).encode()
    buf = io.BytesIO()
    np.savez(buf, **clean, **{_META_KEY: np.frombuffer(header_json, dtype=np.uint8)})
    return buf.getvalue()


def loads_state(
    data: bytes, kind: str, max_version: int, source: str = "<bytes>"
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Parse bytes made by :func:`dumps_state`; returns ``(arrays, meta)``.

    ``meta`` includes the file's ``"version"``, so readers can migrate older layouts.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise CheckpointError(
            f"{source}: not a readable streamgmm state file ({exc}); it may be truncated or "
            "corrupt. Delete it (or point to another path) to start fresh."
        ) from exc
    raw = arrays.pop(_META_KEY, None)
    if raw is None:
        raise CheckpointError(f"{source}: no streamgmm header; this is not a streamgmm state file")
    try:
        doc = json.loads(raw.tobytes().decode())
        header, meta = doc["header"], doc["meta"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{source}: unreadable header ({exc})") from exc
    if header.get("format") != _FORMAT:
        raise CheckpointError(f"{source}: unknown format {header.get('format')!r}")
    if header.get("kind") != kind:
        raise CheckpointError(
            f"{source}: holds a {header.get('kind')!r} state, expected {kind!r}"
        )
    version = header.get("version")
    if not isinstance(version, int) or version > max_version:
        raise CheckpointError(
            f"{source}: written by a newer streamgmm (format version {version}, this one reads up "
            f"to {max_version}); upgrade streamgmm or start fresh"
        )
    body = json.dumps(meta, sort_keys=True, allow_nan=False).encode()
    if _digest(arrays, body) != header.get("sha256"):
        raise CheckpointError(
            f"{source}: checksum mismatch, the file is corrupt; delete it to start fresh"
        )
    meta = dict(meta)
    meta["version"] = version
    return arrays, meta


def write_state(
    path: str | os.PathLike,
    kind: str,
    version: int,
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write a state file atomically (temporary file, fsync, rename).

    Parameters
    ----------
    path
        Destination; its directory is created if needed.
    kind
        What the state is (e.g. ``"OnlineGaussianMixture"``); checked on reading.
    version
        Layout version of this kind, checked against the reader's ``max_version``.
    arrays
        Numeric arrays (no object dtype).
    meta
        JSON-serialisable metadata (no NaN/inf).
    """
    data = dumps_state(kind, version, arrays, meta)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_state(
    path: str | os.PathLike, kind: str, max_version: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a state file written by :func:`write_state`; returns ``(arrays, meta)``.

    Raises
    ------
    CheckpointError
        If the file is missing, corrupt, of another kind or from a newer version.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such state file") from exc
    except IsADirectoryError as exc:
        raise CheckpointError(f"{path}: is a directory, not a state file") from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror})") from exc
    return loads_state(data, kind=kind, max_version=max_version, source=path)
