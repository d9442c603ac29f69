"""Whether the broker answers, asked from a thread of its own: the truth behind ``broker_up``.

The daemon's main thread cannot report the broker's health while it is blocked in a call to that
broker (a transaction waiting on a frozen or restarting broker), and a failed call is not proof of
an outage either (a slow recovery is not a dead broker). :class:`BrokerProbe` asks the cluster for
its metadata every ``interval`` seconds, with a deadline, on a client of its own (the backend's
``ask``: :meth:`streamgmm.io.confluent.ConfluentBackend.probe` asks with librdkafka,
:meth:`streamgmm.io.kafka.KafkaPythonBackend.probe` with kafka-python), and reports each answer:
up when a broker answered within the deadline, down otherwise, including when the broker accepts
connections but does not answer (frozen).

Examples
--------
>>> def ask(timeout):
...     raise ConnectionError("no broker at 127.0.0.1:1")
>>> seen = []
>>> probe = BrokerProbe(ask, seen.append, timeout=0.2)
>>> probe.check()
False
>>> seen
[False]
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["BrokerProbe"]

logger = logging.getLogger(__name__)


class BrokerProbe:
    """Asks the cluster for metadata now and then and reports whether it answered.

    Parameters
    ----------
    ask : callable
        ``ask(timeout)`` asks the cluster for its metadata once and raises when no broker
        answered within ``timeout`` seconds (runs on the probe's thread).
    report : callable
        ``report(up: bool)`` after every check (on the probe's thread; must be quick).
    interval, timeout : float
        Seconds between checks, and the deadline of each.
    """

    def __init__(self, ask: Callable[[float], Any], report: Callable[[bool], None],
                 interval: float = 2.0, timeout: float = 2.0) -> None:
        self._ask = ask
        self._report = report
        self.interval = interval
        self.timeout = timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """Ask once; report and return whether a broker answered within the deadline."""
        try:
            self._ask(self.timeout)
            up = True
        except Exception as exc:  # whatever the client raises: no answer
            logger.debug("broker probe: %s", exc)
            up = False
        self._report(up)
        return up

    def start(self) -> BrokerProbe:
        """Check every ``interval`` seconds on a daemon thread until :meth:`stop`."""
        def run() -> None:
            while not self._stop.is_set():
                self.check()
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=run, name="streamgmm-broker-probe", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop checking (waits for the check under way, at most its deadline)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + self.interval + 1.0)
