#!/usr/bin/env python3
"""The daemon against its ceiling, its latency and its memory, in one run, on each broker.

Everything below is measured on the embedded broker (Tansu) and then on a real Apache Kafka 4.4.0
(KRaft, single node, from Maven Central: ``streamgmm.apache_kafka``), one after the other in the
same run (``--brokers``); the table has a column per broker.

1. **Ceiling**: consume the input topic with kafka-python alone (manual assignment, no group, no
   output) and decode every record with orjson — nothing else. Several client settings are tried
   (``fetch_max_wait_ms``, fetch sizes, records per poll) and the best is the ceiling. CRC checks
   stay on, as in the daemon (they are kafka-python's pure-Python CRC-32C unless the ``crc32c``
   package is installed); the rate without them is printed for information.
2. **Throughput**: the daemon (``streamgmm.service.Daemon``, exactly-once, in this process) on the
   same topic for each ``--batch-sizes`` value: steady-state events/s from the end of its first
   batch to the end of its last (the ceiling is timed the same way). Ceiling and daemon runs take
   turns ``--repeat`` times and the best of each counts, so a neighbour's load on a shared
   machine does not favour either side.
3. **Latency and memory**: ``streamgmm run`` as a subprocess (metrics endpoint on) under a paced
   load of ``--rate`` events/s for ``--duration`` s. Each event carries its produce time; an
   independent confluent-kafka client reads the output topic with ``read_committed``, so latency
   is produce → anomaly visible to a downstream consumer (transaction committed). The daemon's RSS
   is sampled every ``--rss-interval`` s; start = after ``--warmup`` s.

Prints the ratios (goal: the daemon at the default batch size ≥ 0.8 of the ceiling) and a
README-ready table. Takes about two minutes with the defaults::

    .venv/bin/python scripts/bench_daemon.py
    .venv/bin/python scripts/bench_daemon.py --duration 1800 --rate 10000   # a long memory run
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = "a,b,c"


def make_events(n: int, seed: int = 0) -> np.ndarray:
    """Three normal features with 0.2% of the rows blown up 50-fold (the anomalies)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    x[rng.random(n) < 0.002] *= 50
    return x


def produce(bootstrap: str, topic: str, n: int, seed: int = 0) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
    futures = [producer.send(topic, orjson.dumps({"a": r[0], "b": r[1], "c": r[2], "i": i}),
                             partition=0)
               for i, r in enumerate(make_events(n, seed).tolist())]
    for fut in futures:
        fut.get(timeout=60)
    producer.close()


def steady_rate(n: int, next_batch) -> float:
    """Events/s from the end of the first batch to the end of the last.

    ``next_batch(seen)`` consumes one batch and returns how many events it held.
    """
    started, seen, first = None, 0, 0
    while seen < n:
        seen += next_batch(seen)
        if started is None and seen:
            started, first = time.perf_counter(), seen
    return (n - first) / (time.perf_counter() - started)


def ceiling(bootstrap: str, topic: str, n: int, loads=orjson.loads, max_records: int = 5000,
            **options) -> float:
    """Events/s of kafka-python consume + decode, from the end of the first poll to the last."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             isolation_level="read_committed", **options)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, 0)

    def next_batch(_seen: int) -> int:
        count = 0
        for records in consumer.poll(timeout_ms=500, max_records=max_records).values():
            for rec in records:
                loads(rec.value)
            count += len(records)
        return count

    try:
        return steady_rate(n, next_batch)
    finally:
        consumer.close()


#: Settings tried for the ceiling: kafka-python's defaults, the daemon's, larger fetches.
CEILING_SETTINGS = (
    {},
    {"fetch_max_wait_ms": 20},
    {"fetch_max_wait_ms": 20, "max_records": 10000, "max_partition_fetch_bytes": 4 << 20},
)


def librdkafka_ceiling(bootstrap: str, topic: str, n: int, max_records: int = 5000) -> float:
    """Events/s of confluent-kafka consume + orjson decode (the fast backend's own ceiling)."""
    from confluent_kafka import Consumer
    from confluent_kafka import TopicPartition as CTopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"ceil-{time.time_ns()}",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "fetch.wait.max.ms": 20})
    consumer.assign([CTopicPartition(topic, 0, 0)])

    def next_batch(seen: int) -> int:
        messages = consumer.consume(min(max_records, n - seen), 0.5)
        for message in messages:
            orjson.loads(message.value())
        return len(messages)

    try:
        return steady_rate(n, next_batch)
    finally:
        consumer.close()


def best_ceiling(bootstrap: str, topic: str, n: int) -> tuple[float, dict]:
    best, best_settings = 0.0, {}
    for settings in CEILING_SETTINGS:
        rate = ceiling(bootstrap, topic, n, **settings)
        print(f"  ceiling with {settings or 'kafka-python defaults'}: {rate:,.0f}/s", flush=True)
        if rate > best:
            best, best_settings = rate, settings
    return best, best_settings


def daemon_env(bootstrap: str, topic: str, out: str, workdir: str, tag: str,
               max_records: int | None = None, backend: str | None = None) -> dict[str, str]:
    env = {
        "STREAMGMM_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "STREAMGMM_KAFKA__INPUT_TOPIC": topic,
        "STREAMGMM_KAFKA__OUTPUT_TOPIC": out, "STREAMGMM_KAFKA__DEAD_LETTER_TOPIC": out + "-dlt",
        "STREAMGMM_KAFKA__GROUP_ID": f"bench-{tag}-{time.time_ns()}",
        "STREAMGMM_FEATURES__FIELDS": FIELDS, "STREAMGMM_MODEL__N_COMPONENTS": "2",
    }
    if max_records is not None:
        env["STREAMGMM_BATCH__MAX_RECORDS"] = str(max_records)
    if backend is not None:
        env["STREAMGMM_KAFKA__BACKEND"] = backend
    return env


def daemon_run(bootstrap: str, topic: str, n: int, max_records: int, workdir: str,
               backend: str, tag: str = ""):
    """Steady-state events/s of the exactly-once daemon over ``n`` events already in ``topic``."""
    from streamgmm.config import load_config
    from streamgmm.service import Daemon

    tag = f"{backend}-{max_records}{tag}"  # a fresh group (so state topic) and output topic per run
    config = load_config(None, env=daemon_env(bootstrap, topic, f"{topic}-out-{tag}", workdir,
                                              tag, max_records, backend))
    daemon = Daemon(config, create_topics=True)
    marks: list[tuple[float, int]] = []

    def on_batch(d, records, extraction, result):
        marks.append((time.perf_counter(), d.stats.events))

    daemon.on_batch = on_batch
    daemon.run(max_events=n)
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / (t1 - t0), daemon.stats


BROKER_NAMES = {"tansu": "embedded broker (Tansu 0.6)", "apache": "Apache Kafka 4.4.0"}


def start_broker(kind: str, workdir: str):
    """The embedded broker, or a real Apache Kafka (KRaft, from Maven Central), on loopback."""
    from streamgmm.apache_kafka import ApacheKafka
    from streamgmm.embedded import EmbeddedBroker

    os.makedirs(workdir, exist_ok=True)
    if kind == "tansu":
        return EmbeddedBroker(log_path=os.path.join(workdir, "broker.log"))
    return ApacheKafka(workdir=workdir)


#: librdkafka settings of the latency reader: short fetch waits, so that the reader adds little.
READER_OPTIONS = {"fetch.wait.max.ms": 10}


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def latency_and_memory(bootstrap: str, workdir: str, rate: float, duration: float,
                       warmup: float, rss_interval: float) -> dict:
    """Run ``streamgmm run`` under a paced load; latency of anomalies and the daemon's RSS."""
    from confluent_kafka import Consumer, Producer
    from confluent_kafka import TopicPartition as CTopicPartition

    from streamgmm.io.kafka import ensure_topics

    topic, out = "paced", "paced-out"
    ensure_topics(bootstrap, [topic, out, out + "-dlt"])
    env = {**os.environ, **daemon_env(bootstrap, topic, out, workdir, "paced"),
           "STREAMGMM_METRICS__HOST": "127.0.0.1", "STREAMGMM_METRICS__PORT": "0"}
    log = open(os.path.join(workdir, "daemon.log"), "wb")
    daemon = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "streamgmm"),
                               "run", "--log-level", "WARNING"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    latencies: list[tuple[float, float]] = []  # (produce time, latency)
    stop_reading = threading.Event()

    def read_output():
        reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"lat-{time.time_ns()}",
                           "isolation.level": "read_committed", "enable.auto.commit": False,
                           **READER_OPTIONS})
        reader.assign([CTopicPartition(out, 0, 0)])
        try:
            while not stop_reading.is_set():
                # poll, not consume(num_messages=…): that waits for a full batch or its timeout.
                msg = reader.poll(0.1)
                if msg is not None and msg.error() is None:
                    now = time.time()
                    sent = orjson.loads(msg.value())["event"]["ts"]
                    latencies.append((sent, now - sent))
        finally:
            reader.close()

    reader_thread = threading.Thread(target=read_output, daemon=True)
    reader_thread.start()
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1})
    x = make_events(int(rate * duration) + 1, seed=1).tolist()
    rss: list[tuple[float, int]] = []
    started = time.time()
    next_rss, tick, i = started, 0.005, 0
    try:
        while True:
            now = time.time()
            if now - started >= duration:
                break
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited with {daemon.returncode}; see {log.name}")
            due = min(len(x), int((now - started) * rate))
            while i < due:
                a, b, c = x[i]
                producer.produce(topic, orjson.dumps({"a": a, "b": b, "c": c, "i": i,
                                                      "ts": time.time()}), partition=0)
                i += 1
            producer.poll(0)
            if now >= next_rss:
                rss.append((now - started, rss_bytes(daemon.pid)))
                next_rss += rss_interval
            time.sleep(tick)
        producer.flush(30)
        # Let the last anomalies through, then stop the daemon cleanly.
        deadline = time.time() + 5
        while time.time() < deadline and (not latencies or latencies[-1][0] < started + duration
                                          - 1.0):
            time.sleep(0.05)
        rss.append((time.time() - started, rss_bytes(daemon.pid)))
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        stop_reading.set()
        reader_thread.join(10)
        log.close()
    steady = np.array([lat for sent, lat in latencies if sent >= started + warmup])
    after_warmup = [r for t, r in rss if t >= warmup] or [r for _, r in rss]
    return {
        "rate": rate, "duration_s": duration, "events": i, "anomalies_seen": len(latencies),
        "latency_samples": int(len(steady)),
        "latency_p50_ms": float(np.percentile(steady, 50) * 1e3) if len(steady) else None,
        "latency_p99_ms": float(np.percentile(steady, 99) * 1e3) if len(steady) else None,
        "latency_max_ms": float(steady.max() * 1e3) if len(steady) else None,
        "rss_start_mib": after_warmup[0] / 2**20, "rss_end_mib": after_warmup[-1] / 2**20,
        "rss_max_mib": max(after_warmup) / 2**20,
        "rss_samples_mib": [round(r / 2**20, 1) for _, r in rss],
        "_latencies": [(sent - started, lat) for sent, lat in latencies],
    }


def measure(bs: str, args, sizes: list[int], backends: list[str], workdir: str) -> dict:
    """Ceiling, daemon throughput and (unless skipped) the paced run on the broker at ``bs``."""
    results: dict = {"events": args.events}
    produce(bs, "bench", args.events)
    print("ceiling: kafka-python consume + orjson decode, manual assignment", flush=True)
    ceil, settings = best_ceiling(bs, "bench", args.events)
    results["ceiling_per_s"], results["ceiling_settings"] = ceil, settings
    results["json_stdlib_per_s"] = ceiling(bs, "bench", args.events, json.loads, **settings)
    results["no_crc_check_per_s"] = ceiling(bs, "bench", args.events, check_crcs=False,
                                            **settings)
    print(f"ceiling {ceil:,.0f}/s ({settings or 'defaults'}); with json instead of orjson "
          f"{results['json_stdlib_per_s']:,.0f}/s; without CRC checks (the daemon keeps "
          f"them) {results['no_crc_check_per_s']:,.0f}/s", flush=True)
    backends = args.backends.split(",")
    if "confluent-kafka" in backends:
        results["librdkafka_ceiling_per_s"] = librdkafka_ceiling(bs, "bench", args.events)
        print(f"confluent-kafka consume + orjson decode (the fast backend's own ceiling): "
              f"{results['librdkafka_ceiling_per_s']:,.0f}/s", flush=True)
    # Ceiling and daemon runs take turns, best of --repeat each: on a shared machine a
    # neighbour's load then hits both sides alike.
    for round_ in range(args.repeat):
        if round_:
            ceil = max(ceil, ceiling(bs, "bench", args.events, **settings))
            print(f"  ceiling again: best {ceil:,.0f}/s", flush=True)
        for backend in backends:
            for size in sizes:
                rate, stats = daemon_run(bs, "bench", args.events, size, workdir, backend,
                                         f"-{round_}")
                key = f"daemon_per_s_{backend}_batch_{size}"
                results[key] = max(rate, results.get(key, 0.0))
                print(f"  daemon ({backend}, exactly-once, max_records={size}): "
                      f"{rate:,.0f}/s; {stats.anomalies} anomalies, {stats.batches} batches",
                      flush=True)
    results["ceiling_per_s"] = ceil
    for backend in backends:
        for size in sizes:
            rate = results[f"daemon_per_s_{backend}_batch_{size}"]
            print(f"daemon ({backend}, exactly-once, max_records={size}), best of "
                  f"{args.repeat}: {rate:,.0f}/s = {rate / ceil:.0%} of the ceiling "
                  f"({ceil:,.0f}/s)")
    if not args.skip_latency:
        print(f"paced run: {args.rate:,.0f} events/s for {args.duration:g} s through "
              "`streamgmm run`", flush=True)
        lat = latency_and_memory(bs, workdir, args.rate, args.duration, args.warmup,
                                 args.rss_interval)
        results["paced"] = lat
        lat.pop("_latencies")
        print(f"latency produce→anomaly (read_committed), {lat['latency_samples']} anomalies: "
              f"p50 {lat['latency_p50_ms']:.0f} ms, p99 {lat['latency_p99_ms']:.0f} ms, "
              f"max {lat['latency_max_ms']:.0f} ms; daemon RSS {lat['rss_start_mib']:.0f} → "
              f"{lat['rss_end_mib']:.0f} MiB (max {lat['rss_max_mib']:.0f}); samples "
              f"{lat['rss_samples_mib']}", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000,
                        help="events in the throughput topic (default: %(default)s)")
    parser.add_argument("--batch-sizes", default="1000,5000",
                        help="max_records values for the throughput runs (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="ceiling and daemon runs alternate this many times; best of each")
    parser.add_argument("--rate", type=float, default=5000.0,
                        help="paced load for latency and memory, events/s (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="length of the paced run, seconds (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of the paced run left out of latency and RSS start")
    parser.add_argument("--rss-interval", type=float, default=5.0)
    parser.add_argument("--backends", default="kafka-python,confluent-kafka",
                        help="daemon Kafka backends to measure (default: %(default)s); the "
                             "paced run uses the configured default backend")
    parser.add_argument("--skip-latency", action="store_true", help="throughput only")
    parser.add_argument("--brokers", default="tansu,apache",
                        help="brokers to measure on, one after the other (default: %(default)s)")
    args = parser.parse_args()
    from streamgmm.config import BatchConfig

    default_batch = BatchConfig().max_records
    sizes = sorted({int(s) for s in args.batch_sizes.split(",")} | {default_batch})
    workdir = tempfile.mkdtemp(prefix="bench-daemon-")
    backends = args.backends.split(",")
    brokers = args.brokers.split(",")
    results: dict = {"events": args.events, "brokers": {}}
    for kind in brokers:
        print(f"== broker: {BROKER_NAMES[kind]}", flush=True)
        with start_broker(kind, os.path.join(workdir, kind)) as broker:
            results["brokers"][kind] = measure(broker.bootstrap_servers, args, sizes, backends,
                                               os.path.join(workdir, kind))
    from streamgmm.config import KafkaConfig

    default_backend = KafkaConfig().backend
    for kind, found in results["brokers"].items():
        ceil = found["ceiling_per_s"]
        for backend in backends:
            ratio = found[f"daemon_per_s_{backend}_batch_{default_batch}"] / ceil
            found[f"ratio_{backend}"] = ratio
            print(f"\n{BROKER_NAMES[kind]}: goal (daemon at the default max_records="
                  f"{default_batch} >= 80% of the ceiling), {backend} backend: {ratio:.0%} — "
                  f"{'met' if ratio >= 0.8 else 'NOT met'}")
    print(f"the configured default backend: {default_backend}\n")
    print_table(results["brokers"], backends, sizes, default_batch)
    print()
    print(json.dumps(results))
    return 0


def print_table(by_broker: dict, backends: list[str], sizes: list[int], default_batch: int
                ) -> None:
    """The README's table: one column per broker, measured in the same run."""
    kinds = list(by_broker)
    print("| measured on 2 shared cores, same run | "
          + " | ".join(BROKER_NAMES[k] for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))

    def row(label, cell):
        print(f"| {label} | " + " | ".join(cell(by_broker[k]) for k in kinds) + " |")

    row("ceiling: kafka-python consume + orjson decode",
        lambda r: f"{r['ceiling_per_s']:,.0f} events/s")
    if all("librdkafka_ceiling_per_s" in r for r in by_broker.values()):
        row("confluent-kafka consume + orjson decode",
            lambda r: f"{r['librdkafka_ceiling_per_s']:,.0f} events/s")
    for backend in backends:
        for size in sizes:
            key = f"daemon_per_s_{backend}_batch_{size}"
            default = " (default)" if size == default_batch else ""
            row(f"daemon, {backend}, exactly-once, `max_records = {size}`{default}",
                lambda r, key=key: f"{r[key]:,.0f} events/s ({r[key] / r['ceiling_per_s']:.0%})")
    if all("paced" in r for r in by_broker.values()):
        lat = next(iter(by_broker.values()))["paced"]
        row(f"latency produce → anomaly (read_committed), at {lat['rate']:,.0f} events/s",
            lambda r: f"p50 {r['paced']['latency_p50_ms']:.0f} ms, "
                      f"p99 {r['paced']['latency_p99_ms']:.0f} ms")
        row(f"daemon RSS over {lat['duration_s']:g} s ({lat['events']:,} events)",
            lambda r: f"{r['paced']['rss_start_mib']:.0f} → {r['paced']['rss_end_mib']:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
