"""How long a replica may trust that its partitions are still its own.

A consumer group takes a member's partitions away when it stops heartbeating for the session
timeout — a process paused by ``SIGSTOP``, a VM that froze, a long stop-the-world — or when it
does not poll within the poll interval. Such a *zombie* still holds a batch it polled before: if
it publishes that batch when it wakes up, its outputs and its (older) offsets land after the new
owner's, and the group rewinds. Apache Kafka refuses the zombie's transaction (its group
metadata is stale, KIP-447); Tansu does not.

:class:`Lease` is the daemon's own guard, whatever the broker: renewed each time a poll returns,
it expires when the process was frozen (a clock thread that ticks every 50 ms saw a gap) for more
than ``session_timeout / 2``, or when more than ``max_poll_interval / 2`` passed since the poll.
A batch is published only under a valid lease; otherwise the daemon drops what it learned from it
and rejoins the group, restoring its partitions' states (:mod:`streamgmm.service`).

Examples
--------
>>> lease = Lease(session_timeout=6.0, max_poll_interval=300.0)
>>> lease.renew()
>>> lease.valid()
True
>>> lease.stop()
"""

from __future__ import annotations

import threading
import time

__all__ = ["Lease"]


class Lease:
    """A lease on this member's partitions (see the module docstring).

    Parameters
    ----------
    session_timeout, max_poll_interval : float
        The consumer's, in seconds.
    tick : float
        Seconds between two ticks of the clock thread.
    """

    def __init__(self, session_timeout: float, max_poll_interval: float,
                 tick: float = 0.05) -> None:
        self.session_timeout = float(session_timeout)
        self.max_poll_interval = float(max_poll_interval)
        self._tick = tick
        self._lock = threading.Lock()
        self._renewed = time.monotonic()
        self._last_tick = self._renewed
        self._longest_gap = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streamgmm-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            now = time.monotonic()
            with self._lock:
                self._longest_gap = max(self._longest_gap, now - self._last_tick)
                self._last_tick = now

    def renew(self) -> None:
        """A poll returned: the group knows this member is alive."""
        now = time.monotonic()
        with self._lock:
            self._renewed = self._last_tick = now
            self._longest_gap = 0.0

    def frozen_for(self) -> float:
        """The longest time the process stood still since the last renewal, seconds."""
        now = time.monotonic()
        with self._lock:
            return max(self._longest_gap, now - self._last_tick)

    def valid(self) -> bool:
        """Whether the partitions are surely still this member's."""
        since_poll = time.monotonic() - self._renewed
        return (self.frozen_for() < self.session_timeout / 2
                and since_poll < self.max_poll_interval / 2)

    def stop(self) -> None:
        """End the clock thread."""
        self._stop.set()
