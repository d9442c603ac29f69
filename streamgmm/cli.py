"""The ``streamgmm`` command: run the daemon, the demo, a file replay or the embedded broker.

Exit codes: 0 success (also after ``SIGTERM``/``SIGINT``), 1 runtime failure, 2 invalid
configuration or arguments (nothing was connected), 3 unusable state (a state topic made for
other features), 4 the daemon was stuck (its loop made no progress for ``[watchdog]
stall_seconds``, or it did not stop within ``[watchdog] stop_seconds`` of a ``SIGTERM``): restart
it, nothing is lost.

Examples
--------
>>> parser = build_parser()
>>> parser.parse_args(["run", "--config", "x.toml"]).command
'run'
>>> parser.parse_args(["broker", "--port", "9092"]).port
9092
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from streamgmm import __version__

__all__ = ["main", "build_parser"]

logger = logging.getLogger("streamgmm.cli")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_CHECKPOINT, EXIT_STUCK = 0, 1, 2, 3, 4

_DESCRIPTION = """\
streamgmm: streaming Gaussian-mixture anomaly detection on event streams.

Reads JSON events from a Kafka topic, scores each one with an online-EM Gaussian mixture before
learning from it, and publishes anomalies (with explanations) to an output topic and unscorable
events to a dead-letter topic, exactly once. Prometheus metrics on /metrics.

Start here:
  streamgmm demo                       everything on an embedded broker, about a minute
  streamgmm run --config streamgmm.toml   the daemon against your Kafka
  streamgmm replay --config C in.jsonl --output out.jsonl   the same detector over files
  streamgmm broker                     an embedded Kafka-protocol broker for development
"""

_RUN_HELP = """\
Run the daemon until SIGTERM/SIGINT (which finish the current batch, publish, commit, write the
partitions' states and exit 0).

Configuration: a TOML file (see config/streamgmm.toml, every key commented); every key can be
overridden by an environment variable STREAMGMM_<SECTION>__<KEY>, e.g.
STREAMGMM_KAFKA__BOOTSTRAP_SERVERS=kafka:9092. An invalid configuration exits 2 before connecting,
naming the key. --print-config shows the effective configuration and exits.

Delivery: exactly-once by default (one Kafka transaction per batch: anomalies, dead letters and
input offsets); read the output topics with isolation.level=read_committed. For brokers without
transactions set kafka.delivery = "at-least-once".

State: each input partition's model, thresholds and drift reference, with the offset they have
learned up to, is a record of the compacted state topic (checkpoint.topic, default
<group_id>-state), written every checkpoint.interval_seconds in the transaction of its events'
outputs, when the partition is revoked, and on shutdown. Whichever replica is assigned a partition
restores its state before scoring it, so replicas come and go freely (scale out by starting more,
up to the input topic's partition count; give each its own kafka.replica_id) and need no disk.
A state topic made for other features is refused (exit 3); to start fresh use a new group_id or
delete the state topic and the group.
"""

_DEMO_HELP = """\
Start an embedded Kafka-protocol broker (Tansu, in memory), stream synthetic events with
injected anomalies, unscorable messages and a level shift through the real daemon, show a live
console, serve metrics on localhost, and end with precision/recall against the injected anomalies
and a PNG plot. Finishes by itself (about a minute with the defaults).
"""


def _add_logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging verbosity (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``streamgmm`` command."""
    parser = argparse.ArgumentParser(
        prog="streamgmm", description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"streamgmm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run the daemon (Kafka in, anomalies out)",
                         description=_RUN_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", metavar="PATH",
                     help="TOML configuration file (omit to use defaults + environment)")
    run.add_argument("--print-config", action="store_true",
                     help="print the effective configuration (secrets redacted) and exit")
    run.add_argument("--create-topics", action="store_true",
                     help="create missing input, output and dead-letter topics")
    _add_logging(run)

    demo = sub.add_parser("demo", help="the whole pipeline on an embedded broker (~1 min)",
                          description=_DEMO_HELP)
    demo.add_argument("--events", type=int, default=30000,
                      help="number of events to stream (default: %(default)s)")
    demo.add_argument("--rate", type=float, default=1000.0,
                      help="events per second to produce (default: %(default)s)")
    demo.add_argument("--anomaly-rate", type=float, default=0.005,
                      help="fraction of injected anomalies (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=7, help="random seed (default: %(default)s)")
    demo.add_argument("--plot", metavar="PNG", default="streamgmm-demo.png",
                      help="where to write the plot (default: %(default)s); '' for none")
    demo.add_argument("--metrics-port", type=int, default=0,
                      help="port of the metrics endpoint (default: a free one)")
    demo.add_argument("--workdir", metavar="DIR", default=None,
                      help="directory for the broker log (default: a temp dir)")
    demo.add_argument("--quiet", action="store_true", help="no live console, summary only")
    _add_logging(demo)

    replay = sub.add_parser("replay", help="run the detector over a JSONL file, no Kafka",
                            description="Score every event of INPUT (JSON lines) with the same "
                            "detector as the daemon and write anomalies to --output, dead letters "
                            "next to it, with a progress bar.")
    replay.add_argument("--config", metavar="PATH", help="TOML configuration file")
    replay.add_argument("input", metavar="INPUT.jsonl", help="events, one JSON object per line")
    replay.add_argument("--output", metavar="OUT.jsonl", required=True,
                        help="where to write the anomalies")
    _add_logging(replay)

    health = sub.add_parser(
        "health", help="exit 0 if the local daemon's metrics endpoint answers (for HEALTHCHECK)",
        description="Fetch /metrics from the daemon on this host, on the port of the "
        "configuration ([metrics] port, or STREAMGMM_METRICS__PORT): exit 0 if it answers, 1 if "
        "not. The container image's HEALTHCHECK runs it, so it follows the configured port.")
    health.add_argument("--config", metavar="PATH", help="TOML configuration file")
    health.add_argument("--timeout", type=float, default=4.0,
                        help="seconds to wait for the answer (default: %(default)s)")

    broker = sub.add_parser("broker", help="run the embedded Kafka-protocol broker alone",
                            description="Run the embedded Tansu broker (in memory: its data is "
                            "lost when it stops) until Ctrl-C, for local development.")
    broker.add_argument("--port", type=int, default=9092,
                        help="port to listen on (default: %(default)s; 0 picks a free one)")
    broker.add_argument("--host", default="127.0.0.1", help="interface (default: %(default)s)")
    _add_logging(broker)
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":  # kafka-python is chatty at INFO
        logging.getLogger("kafka").setLevel(logging.WARNING)


def _error(message: str) -> None:
    print(f"streamgmm: error: {message}", file=sys.stderr)


def _load_config(path: str | None):
    from streamgmm.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        _error(f"invalid configuration: {exc}")
        return None


def _cmd_run(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    if config is None:
        return EXIT_CONFIG
    if args.print_config:
        print(config.to_toml())
        return EXIT_OK
    _setup_logging(args.log_level)
    from streamgmm.watchdog import Watchdog

    # SIGTERM/SIGINT are handled on a thread of their own from the start: a stop that arrives
    # while connecting, or while a Kafka call blocks, is honoured.
    watchdog = Watchdog(config.watchdog.stall_seconds, config.watchdog.stop_seconds)
    watchdog.watch_signals()
    # `kill -USR1 <pid>` writes every thread's stack to the log: where a daemon that seems
    # stuck is waiting, without stopping it.
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    from streamgmm.checkpoint import CheckpointError
    from streamgmm.io.base import abandoned_clients
    from streamgmm.metrics import Metrics
    from streamgmm.service import Daemon

    metrics = Metrics() if config.metrics.enabled else None
    daemon = Daemon(config, metrics=metrics, create_topics=args.create_topics,
                    watchdog=watchdog)
    try:
        if metrics is not None:
            metrics.serve(config.metrics.host, config.metrics.port)
    except OSError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    watchdog.on_stop(daemon.request_stop)
    if watchdog.stop_requested:
        daemon.request_stop()
    watchdog.start()
    try:
        code = daemon.run()
    except CheckpointError as exc:
        _error(f"unusable state topic: {exc}")
        code = EXIT_CHECKPOINT
    finally:
        if metrics is not None:
            metrics.close()
    if abandoned_clients():  # destroying a client blocked in a call would block the exit
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging("WARNING" if args.log_level == "INFO" else args.log_level)
    from streamgmm.demo import run_demo

    return run_demo(events=args.events, rate=args.rate, anomaly_rate=args.anomaly_rate,
                    seed=args.seed, plot_path=args.plot or None,
                    metrics_port=args.metrics_port, workdir=args.workdir, live=not args.quiet)


def _cmd_replay(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    if config is None:
        return EXIT_CONFIG
    _setup_logging(args.log_level)
    if not os.path.exists(args.input):
        _error(f"{args.input}: no such file")
        return EXIT_CONFIG
    from streamgmm import replay

    return int(replay.main(config, args.input, args.output) or 0)


def _cmd_health(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    config = _load_config(args.config)
    if config is None:
        return EXIT_CONFIG
    metrics = config.metrics
    if not metrics.enabled or metrics.port == 0:
        print("streamgmm: metrics are disabled or on a random port; nothing to check",
              file=sys.stderr)
        return EXIT_OK
    host = "127.0.0.1" if metrics.host in ("0.0.0.0", "::", "") else metrics.host
    url = f"http://{host}:{metrics.port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            ok = response.status == 200
    except (OSError, urllib.error.URLError) as exc:
        _error(f"{url} does not answer: {exc}")
        return EXIT_FAILURE
    return EXIT_OK if ok else EXIT_FAILURE


def _cmd_broker(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    import signal
    import threading

    from streamgmm.embedded import BrokerError, EmbeddedBroker

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        broker = EmbeddedBroker(port=args.port or None, host=args.host).start()
    except BrokerError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    print(f"embedded broker listening on {broker.bootstrap_servers} (in memory); Ctrl-C stops it",
          flush=True)
    try:
        while not stop.wait(0.5):
            if not broker.running:
                _error("the broker exited")
                return EXIT_FAILURE
    finally:
        broker.stop()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``streamgmm`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"run": _cmd_run, "demo": _cmd_demo, "replay": _cmd_replay,
                "health": _cmd_health, "broker": _cmd_broker}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
