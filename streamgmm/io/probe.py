"""Whether the broker answers, asked from a thread of its own: the truth behind ``broker_up``.

The daemon's main thread cannot report the broker's health while it is blocked in a call to that
broker (a transaction waiting on a frozen or restarting broker), and a failed call is not proof of
an outage either (a slow recovery is not a dead broker). :class:`BrokerProbe` asks the cluster for
its metadata every ``interval`` seconds, with a deadline, on a librdkafka client of its own
(whatever the daemon's backend), and reports each answer: up when a broker answered within the
deadline, down otherwise, including when the broker accepts connections but does not answer
(frozen).

Examples
--------
>>> seen = []
>>> probe = BrokerProbe({"bootstrap.servers": "127.0.0.1:1"}, seen.append, timeout=0.2)
>>> probe.check()
False
>>> seen
[False]
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import confluent_kafka as ck

__all__ = ["BrokerProbe"]

logger = logging.getLogger(__name__)
_quiet = logging.getLogger("streamgmm.librdkafka.probe")
_quiet.propagate = False
_quiet.addHandler(logging.NullHandler())


class BrokerProbe:
    """Asks the cluster for metadata now and then and reports whether it answered.

    Parameters
    ----------
    settings : mapping
        librdkafka properties: ``bootstrap.servers`` and the security settings.
    report : callable
        ``report(up: bool)`` after every check (on the probe's thread; must be quick).
    interval, timeout : float
        Seconds between checks, and the deadline of each.
    """

    def __init__(self, settings: Mapping[str, Any], report: Callable[[bool], None],
                 interval: float = 2.0, timeout: float = 2.0) -> None:
        self._client = ck.Producer({**settings, "logger": _quiet,
                                    "socket.timeout.ms": max(10, int(timeout * 1000))})
        self._report = report
        self.interval = interval
        self.timeout = timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """Ask once; report and return whether a broker answered within the deadline."""
        try:
            self._client.list_topics(timeout=self.timeout)
            up = True
        except ck.KafkaException as exc:
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
