"""The daemon's watchdog: a stuck loop becomes a process exit, and SIGTERM always works.

Every blocking call of the daemon has a deadline, but a client library can still block past it
(a C call of librdkafka, a lock of kafka-python's I/O thread, a broker that restarted empty in the
middle of a transaction). A blocked main thread cannot run Python signal handlers either, so it
would also ignore ``SIGTERM``. The :class:`Watchdog` covers both from threads of its own:

* the daemon calls :meth:`Watchdog.beat` whenever its loop makes progress (a poll returned, a
  batch was published, a reconnection attempt ended); when no beat came for ``stall_seconds``, the
  watchdog logs what happened and ends the process with :data:`EXIT_STUCK`, so that its supervisor
  (Docker's restart policy, Kubernetes, systemd) starts it again. Nothing is lost: whichever
  replica gets its partitions next resumes from their states and the committed offsets, as after
  ``kill -9``;
* :meth:`Watchdog.watch_signals` acts on ``SIGTERM``/``SIGINT`` from a thread of its own (through
  the signal wakeup file descriptor), asks the daemon to stop, and ends the process with
  :data:`EXIT_STUCK` if the daemon has not returned ``stop_seconds`` later.

Examples
--------
>>> exits = []
>>> clock = iter([0.0, 0.0, 5.0, 31.0]).__next__
>>> dog = Watchdog(stall_seconds=30, stop_seconds=10, clock=clock, exit=exits.append)
>>> dog.beat()          # t = 0
>>> dog.check()         # t = 5: fine
>>> dog.check()         # t = 31: no beat for 31 s
>>> exits
[4]
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

__all__ = ["Watchdog", "EXIT_STUCK", "SIGNALS"]

logger = logging.getLogger(__name__)

#: Exit code when the loop was stuck (or did not stop in time): restart the process.
EXIT_STUCK = 4
#: The signals that stop the daemon.
SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def _exit_now(code: int) -> None:
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # a broken log stream must not keep a stuck process alive
            pass
    os._exit(code)


class Watchdog:
    """Ends the process when the daemon's loop is stuck or does not stop in time.

    Parameters
    ----------
    stall_seconds : float
        Longest time without a :meth:`beat` before the process exits with :data:`EXIT_STUCK`.
        Longer than the longest deadline of one blocking call (the daemon's are at most 60 s).
    stop_seconds : float
        Longest time from a stop request to the end of the process.
    clock, exit
        Injected for tests: monotonic seconds, and what ends the process (``os._exit``).
    """

    def __init__(self, stall_seconds: float, stop_seconds: float,
                 clock: Callable[[], float] = time.monotonic,
                 exit: Callable[[int], None] = _exit_now) -> None:
        self.stall_seconds = float(stall_seconds)
        self.stop_seconds = float(stop_seconds)
        self._clock = clock
        self._exit = exit
        self._last_beat = clock()
        self._stop_asked_at: float | None = None
        self._on_stop: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """The loop made progress."""
        self._last_beat = self._clock()

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the signal thread) when SIGTERM or SIGINT arrives."""
        self._on_stop.append(callback)

    @property
    def stop_requested(self) -> bool:
        """Whether SIGTERM/SIGINT (or :meth:`request_stop`) came."""
        return self._stop_asked_at is not None

    def request_stop(self) -> None:
        """Start the stop deadline and tell every :meth:`on_stop` callback."""
        if self._stop_asked_at is None:
            self._stop_asked_at = self._clock()
        for callback in self._on_stop:
            callback()

    def check(self) -> None:
        """End the process if the loop is stuck or the stop is overdue (the thread's work)."""
        now = self._clock()
        if self._stop_asked_at is not None and now - self._stop_asked_at > self.stop_seconds:
            logger.critical("the daemon did not stop within %g s of the stop request (it is "
                            "blocked in a call to Kafka); exiting with code %d without the final "
                            "states. Nothing is lost: the partitions' next owner resumes from "
                            "their last states and the committed offsets", self.stop_seconds,
                            EXIT_STUCK)
            self._exit(EXIT_STUCK)
        elif now - self._last_beat > self.stall_seconds:
            logger.critical("the daemon loop made no progress for %.0f s (a call to Kafka is "
                            "blocked past its deadline); exiting with code %d so that the "
                            "supervisor restarts it. Nothing is lost: the partitions' next owner "
                            "resumes from their last states and the committed offsets",
                            now - self._last_beat, EXIT_STUCK)
            self._exit(EXIT_STUCK)

    def start(self, interval: float = 1.0) -> Watchdog:
        """Check every ``interval`` seconds on a daemon thread."""
        def run() -> None:
            while True:
                time.sleep(interval)  # the watchdog's own clock tick
                self.check()

        self.beat()
        self._thread = threading.Thread(target=run, name="streamgmm-watchdog", daemon=True)
        self._thread.start()
        return self

    def watch_signals(self) -> None:
        """Act on SIGTERM/SIGINT from a thread of its own, even while the main thread blocks.

        Python runs signal handlers in the main thread only, between two bytecodes: never while
        it waits inside a C call. The C-level handler still writes the signal's number to the
        wakeup file descriptor (:func:`signal.set_wakeup_fd`), whichever thread the kernel
        delivered it to; a thread reads it there and calls :meth:`request_stop`. Call from the
        main thread.
        """
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for signum in SIGNALS:  # a handler must be set for the C handler to run
            signal.signal(signum, lambda *_: None)

        def wait() -> None:
            while True:
                for signum in os.read(read_end, 64):
                    if signum in SIGNALS:
                        logger.info("%s received; stopping", signal.Signals(signum).name)
                        self.request_stop()

        threading.Thread(target=wait, name="streamgmm-signals", daemon=True).start()
