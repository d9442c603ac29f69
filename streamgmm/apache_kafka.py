"""A real single-node Apache Kafka (KRaft) for the tests and the benchmark, from Maven Central.

The embedded broker (:mod:`streamgmm.embedded`, Tansu) starts in milliseconds but deviates from
Kafka where delivery guarantees live (transactions, end offsets, group fencing). This module runs
the broker users run: the ``org.apache.kafka:kafka_2.13`` jars, resolved once by Maven from the
committed ``apache_kafka.pom.xml`` into a cache folder (:func:`resolve_jars`), started as
``java kafka.Kafka`` with broker and controller in one process on free loopback ports, its log
directory formatted in a folder of its own (:class:`ApacheKafka`).

It needs Java 17+ and, the first time, Maven with access to Maven Central; Maven keeps its own
cache in ``~/.m2``, so later resolutions are offline. ``streamgmm broker`` and the demo keep the
embedded broker. The daemon never imports this module.

Examples
--------
Not run as a doctest (it needs Java and takes seconds)::

    with ApacheKafka() as kafka:
        run_the_daemon(bootstrap_servers=kafka.bootstrap_servers)
        kafka.restart(down_seconds=5)  # broker loss; the data on disk survives
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from streamgmm.embedded import BrokerError, BrokerProcess, free_port

__all__ = ["ApacheKafka", "resolve_jars", "POM", "BASE_PROPERTIES"]

logger = logging.getLogger(__name__)

#: The Maven project whose dependencies are the broker's class path.
POM = Path(__file__).with_name("apache_kafka.pom.xml")

#: Settings of a quick single-node test broker (listeners, ports and ``log.dirs`` are added by
#: :class:`ApacheKafka`). Replication factor 1 and one partition for the internal topics (their
#: default 50 partitions take seconds to create), no initial rebalance delay, and short group and
#: transaction timeouts so that a killed client's leftovers are cleaned up in seconds.
BASE_PROPERTIES: dict[str, str] = {
    "process.roles": "broker,controller",
    "node.id": "1",
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
    "group.min.session.timeout.ms": "1000",
    "group.consumer.min.session.timeout.ms": "1000",
    "group.consumer.min.heartbeat.interval.ms": "500",
    "group.consumer.heartbeat.interval.ms": "500",
    "num.partitions": "1",
    "num.network.threads": "2",
    "num.io.threads": "2",
    "log.segment.bytes": str(16 * 1024 * 1024),
}

_LOG4J2 = """\
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
"""

# Small heap, quick start: a test broker holds little and lives minutes.
_JVM_OPTIONS = ["-Xms128m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                "-Xshare:auto", "-Djava.awt.headless=true"]


def default_cache_dir() -> Path:
    """Where resolved jars are kept: ``$STREAMGMM_KAFKA_JARS`` or ``~/.cache/streamgmm``."""
    if os.environ.get("STREAMGMM_KAFKA_JARS"):
        return Path(os.environ["STREAMGMM_KAFKA_JARS"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "streamgmm" / "apache-kafka"


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        raise BrokerError("Apache Kafka needs Java 17 or newer: install a JDK "
                          "(e.g. apt-get install openjdk-17-jre-headless) or set JAVA_HOME")
    return java


def resolve_jars(cache_dir: str | os.PathLike | None = None, version: str | None = None,
                 timeout: float = 600.0) -> Path:
    """Folder holding every jar of the broker, resolved by Maven on first use.

    The folder is reused while the POM and the version are unchanged (a stamp file marks a
    complete resolution).

    Parameters
    ----------
    cache_dir
        Parent folder of the jar folders; :func:`default_cache_dir` by default.
    version
        Kafka version (``"3.9.0"``); the POM's ``kafka.version`` by default.
    timeout
        Seconds Maven may take (the first resolution downloads ~45 MB).

    Raises
    ------
    BrokerError
        If Maven is missing or fails (its output is in the message).
    """
    digest = hashlib.sha256(POM.read_bytes() + (version or "").encode()).hexdigest()[:12]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    jars = folder / f"jars-{version or 'default'}-{digest}"
    stamp = jars / ".resolved"
    if stamp.exists():
        return jars
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("resolving Apache Kafka's jars needs Maven: install it "
                          "(apt-get install maven) or put resolved jars in "
                          f"{jars} and touch {stamp}")
    partial = Path(tempfile.mkdtemp(prefix="jars-", dir=_mkdir(folder)))
    command = [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
               f"-DoutputDirectory={partial}", "-DincludeScope=runtime"]
    if version:
        command.append(f"-Dkafka.version={version}")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise BrokerError(f"Maven did not resolve Apache Kafka's jars in {timeout:g} s; "
                          "is Maven Central reachable?") from exc
    if done.returncode != 0 or not any(partial.glob("kafka_2.13-*.jar")):
        shutil.rmtree(partial, ignore_errors=True)
        raise BrokerError(f"`{' '.join(command)}` failed ({done.returncode}):\n"
                          f"{(done.stdout + done.stderr)[-3000:]}")
    (partial / ".resolved").write_text(digest + "\n")
    try:
        partial.rename(jars)
    except OSError:  # another process resolved them meanwhile
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("Apache Kafka jars resolved into %s", jars)
    return jars


def _random_cluster_id() -> str:
    """A cluster id as ``kafka-storage random-uuid`` makes one, without starting a JVM.

    Base64url of 16 random bytes; like Kafka's ``Uuid.randomUuid`` it never starts with ``-``
    (a command line would take it for an option).
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


class ApacheKafka(BrokerProcess):
    """A single-node Apache Kafka in KRaft mode (broker and controller in one JVM).

    Parameters
    ----------
    workdir
        Folder for the log directory, the configuration and the broker's output; a new temporary
        folder by default (removed by :meth:`cleanup`).
    port, controller_port
        Loopback ports of the client and controller listeners; free ones by default. They stay
        the same across :meth:`restart`.
    properties
        Settings that replace or extend :data:`BASE_PROPERTIES` (for instance the translation of
        a deployment's ``KAFKA_*`` environment).
    host
        The interface to listen on and advertise.
    jars
        Folder of the broker's jars; :func:`resolve_jars` (for ``version``) by default.
    version
        Kafka version to resolve; the POM's by default.
    base
        The settings ``properties`` extend; :data:`BASE_PROPERTIES` by default, ``{}`` to run
        exactly the given ``properties`` (listeners, ports and ``log.dirs`` are still added
        unless ``properties`` sets them).
    cluster_id
        The id the log directory is formatted with; a random one by default.

    Attributes
    ----------
    kind : str
        ``"apache"`` (the embedded broker's tests tell the brokers apart by it).
    bootstrap_servers : str
        ``"host:port"`` of the client listener.
    """

    kind = "apache"
    _label = "Apache Kafka"  # a kill keeps what it had synced to disk

    def __init__(
        self,
        workdir: str | os.PathLike | None = None,
        port: int | None = None,
        controller_port: int | None = None,
        properties: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        jars: str | os.PathLike | None = None,
        version: str | None = None,
        base: Mapping[str, str] = BASE_PROPERTIES,
        cluster_id: str | None = None,
    ) -> None:
        self.version = version
        self.base = dict(base)
        self.cluster_id = cluster_id
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(
            tempfile.mkdtemp(prefix="apache-kafka-"))
        self.host = host
        self.port = int(port) if port is not None else free_port(host)
        self.controller_port = (int(controller_port) if controller_port is not None
                                else free_port(host))
        self.extra_properties = dict(properties or {})
        self._jars = Path(jars) if jars is not None else None
        self._process: subprocess.Popen | None = None
        self.log_path = self.workdir / "broker.log"

    # -- configuration ------------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_dir(self) -> Path:
        """The broker's data (``log.dirs``): kept by :meth:`restart`, wiped by ``empty=True``."""
        return self.workdir / "data"

    def properties(self) -> dict[str, str]:
        """The complete ``server.properties`` this broker runs with."""
        props = dict(self.base)
        node = props.get("node.id", self.extra_properties.get("node.id", "1"))
        props.update({
            "listeners": f"PLAINTEXT://{self.host}:{self.port},"
                         f"CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.quorum.voters": f"{node}@{self.host}:{self.controller_port}",
            "log.dirs": str(self.log_dir),
        })
        props.update(self.extra_properties)
        return props

    def _write_config(self) -> Path:
        _mkdir(self.workdir)
        config = self.workdir / "server.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in self.properties().items()))
        (self.workdir / "log4j2.properties").write_text(_LOG4J2)
        return config

    def java_command(self, main: str, *args: str) -> list[str]:
        """``java … main args`` on the broker's class path (``org.apache.kafka.tools.…``)."""
        java = _java()  # first: no Java, no need to resolve jars
        jars = self._jars if self._jars is not None else resolve_jars(version=self.version)
        return [java, *_JVM_OPTIONS,
                f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
                "-cp", f"{jars}{os.sep}*", main, *args]

    def _format(self, config: Path) -> None:
        if (self.log_dir / "meta.properties").exists():
            return
        cid = self.cluster_id or _random_cluster_id()
        done = subprocess.run(
            self.java_command("kafka.tools.StorageTool", "format", f"--cluster-id={cid}",
                              f"--config={config}"),
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise BrokerError(f"formatting the Kafka log directory {self.log_dir} failed:\n"
                              f"{(done.stdout + done.stderr)[-3000:]}")

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> ApacheKafka:
        """Format the log directory if new, start the broker and wait until it serves metadata.

        Raises
        ------
        BrokerError
            If Java or the jars are missing, the broker exits, or it does not answer a metadata
            request within ``timeout`` seconds (its log is named in the message).
        """
        if self.running:
            return self
        config = self._write_config()
        self._format(config)
        with open(self.log_path, "ab") as out:
            self._process = subprocess.Popen(
                self.java_command("kafka.Kafka", str(config)), stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._serves_metadata():
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise BrokerError(f"Apache Kafka exited with code {code} while starting on "
                                  f"{self.bootstrap_servers}; see {self.log_path}:\n"
                                  f"{self._log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(f"Apache Kafka did not serve metadata on "
                                  f"{self.bootstrap_servers} within {timeout:g} s; see "
                                  f"{self.log_path}:\n{self._log_tail()}")
            time.sleep(0.1)
        logger.info("Apache Kafka (pid %d) serving on %s", self._process.pid,
                    self.bootstrap_servers)
        return self

    def _serves_metadata(self) -> bool:
        import confluent_kafka.admin

        admin = confluent_kafka.admin.AdminClient({
            "bootstrap.servers": self.bootstrap_servers, "socket.connection.setup.timeout.ms": 1000,
            "log_level": 0})
        try:
            return bool(admin.list_topics(timeout=1).brokers)
        except confluent_kafka.KafkaException:
            return False

    def _log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """Controlled shutdown (``SIGTERM``), then ``SIGKILL`` after ``timeout`` seconds."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("Apache Kafka did not stop in %g s; killing it", timeout)
        self.kill()

    def restart(self, down_seconds: float = 0.0, empty: bool = False, hard: bool = False,
                timeout: float = 60.0) -> ApacheKafka:
        """Stop the broker, stay down ``down_seconds``, and start it again on the same ports.

        Parameters
        ----------
        down_seconds
            How long the broker stays away.
        empty
            Wipe the log directory and format it anew: a broker that comes back without its data
            (like the embedded one after any restart).
        hard
            Crash (``SIGKILL``) instead of a controlled shutdown; the log is recovered on start.
        timeout
            Seconds the broker may take to serve metadata again.
        """
        if hard:
            self.kill()
        else:
            self.stop()
        if empty:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        time.sleep(down_seconds)  # the outage itself is what the caller asked for
        return self.start(timeout=timeout)

    def cleanup(self) -> None:
        """Kill the broker and remove the working folder if this object made it."""
        self.kill()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ApacheKafka:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"ApacheKafka({self.bootstrap_servers}, {state})"


def main(argv: list[str] | None = None) -> int:
    """``python -m streamgmm.apache_kafka resolve [VERSION…]``: resolve jars (for set-up scripts).

    Prints each jar folder; without a version, the POM's.
    """
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "resolve":
        sys.stderr.write("usage: python -m streamgmm.apache_kafka resolve [VERSION ...]\n")
        return 2
    try:
        for version in args[1:] or [None]:
            sys.stdout.write(f"{resolve_jars(version=version)}\n")
    except BrokerError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
