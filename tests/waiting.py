"""Waiting on a condition with a deadline: how the tests wait, instead of sleeping blindly."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable
from typing import Any


def wait_for(
    condition: Callable[[], Any],
    what: str,
    timeout: float = 60.0,
    processes: Iterable[tuple[str, subprocess.Popen]] = (),
    interval: float = 0.2,
) -> Any:
    """Poll ``condition`` until it returns something true, and return that.

    Fails after ``timeout`` seconds, or as soon as one of the named ``processes`` exits (it
    will not make the condition true any more). ``OSError`` from the condition (a server not
    listening yet) counts as "not yet".
    """
    processes = list(processes)
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for name, process in processes:
            if process.poll() is not None:
                raise AssertionError(
                    f"{name} exited with {process.returncode} while waiting for {what}"
                )
        try:
            value = condition()
            if value:
                return value
        except OSError as exc:
            last_error = exc
        time.sleep(interval)  # the polling interval of a condition with a deadline
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} ({last_error})")


def stop(process: subprocess.Popen, timeout: float = 10.0) -> int:
    """Stop ``process`` with SIGTERM, or SIGKILL if it is still running after ``timeout`` s."""
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
