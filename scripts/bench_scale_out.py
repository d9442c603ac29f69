#!/usr/bin/env python3
"""Scale-out on Kafka, measured: 1, 2 and 3 replicas side by side, and partitions that move.

On each broker (``--brokers``: the embedded Tansu, then a real Apache Kafka 4.4.0 from Maven
Central), with a ``--partitions``-partition input topic holding ``--events`` events:

1. **Aggregate throughput** with 1, 2 and 3 replicas (``--replicas``): ``streamgmm run``
   processes of one group (exactly-once, the configured default backend), started together on
   the full topic; events/s from the first committed batch to the last event committed, read
   from the group's committed offsets by an independent client. The replica counts take turns
   ``--repeat`` times, best of each, so a neighbour's load hits all alike. On this machine the
   replicas share 2 cores with the broker, so more replicas mean more processes on the same
   cores: the figure says what a second replica costs or gains *here*, not on a cluster.
2. **Moves**: two replicas process a stream paced at ``--rate`` events/s; a third joins, then
   the first is stopped (SIGTERM). For every partition that moved: the time from its assignment
   to its first scored event (the replicas log both), and its state's size.
3. **State bytes per partition**: the newest state record of every partition.

Prints a README-ready table and the raw numbers as JSON::

    .venv/bin/python scripts/bench_scale_out.py
    .venv/bin/python scripts/bench_scale_out.py --brokers tansu --events 60000 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import orjson

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench_daemon import BROKER_NAMES, start_broker  # noqa: E402

FIELDS = "a,b,c"


def produce(bootstrap: str, topic: str, n: int, seed: int = 0, rate: float | None = None,
            stop: threading.Event | None = None) -> int:
    """``n`` events keyed by index (spread over the partitions), paced at ``rate`` if given."""
    import confluent_kafka

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    x[rng.random(n) < 0.002] *= 50
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                                         "acks": "all"})
    started = time.monotonic()
    sent = 0
    for i, row in enumerate(x.tolist()):
        if stop is not None and stop.is_set():
            break
        if rate is not None:
            ahead = i / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        while True:
            try:
                producer.produce(topic, orjson.dumps({"a": row[0], "b": row[1], "c": row[2]}),
                                 key=str(i).encode())
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        sent += 1
    producer.flush(60)
    return sent


def committed_total(bootstrap: str, group: str, topic: str, partitions: int,
                    attempts: int = 10) -> int:
    """The group's committed offsets summed over the topic's partitions; a retriable error
    (the coordinator moving while the replicas rebalance: NOT_COORDINATOR) is tried again."""
    import confluent_kafka

    wanted = [confluent_kafka.TopicPartition(topic, p) for p in range(partitions)]
    attempt = 1
    while True:
        consumer = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                             "enable.auto.commit": False})
        try:
            found = consumer.committed(wanted, timeout=10)
            return sum(tp.offset for tp in found if tp.offset >= 0)
        except confluent_kafka.KafkaException as exc:
            if not exc.args[0].retriable() or attempt == attempts:
                raise
        finally:
            consumer.close()
        attempt += 1
        time.sleep(0.5)  # the pause between two reads of a coordinator that moved


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def merged_model_age(port: int) -> float | None:
    """``streamgmm_merged_model_age_seconds`` of the replica serving metrics on ``port``."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            for line in answer.read().decode().splitlines():
                if line.startswith("streamgmm_merged_model_age_seconds "):
                    value = float(line.split()[1])
                    return None if value != value else value
    except OSError:
        return None
    return None


def start_replica(bootstrap: str, topic: str, group: str, name: str, workdir: str,
                  interval: float = 10.0, metrics_port: int | None = None
                  ) -> tuple[subprocess.Popen, str]:
    disk = os.path.join(workdir, f"{group}-{name}")
    os.makedirs(disk)
    env = {**os.environ,
           "STREAMGMM_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "STREAMGMM_KAFKA__INPUT_TOPIC": topic,
           "STREAMGMM_KAFKA__OUTPUT_TOPIC": f"{group}-out",
           "STREAMGMM_KAFKA__DEAD_LETTER_TOPIC": f"{group}-dlt",
           "STREAMGMM_KAFKA__GROUP_ID": group, "STREAMGMM_KAFKA__REPLICA_ID": name,
           "STREAMGMM_FEATURES__FIELDS": FIELDS, "STREAMGMM_MODEL__N_COMPONENTS": "2",
           "STREAMGMM_METRICS__ENABLED": "false" if metrics_port is None else "true",
           "STREAMGMM_METRICS__HOST": "127.0.0.1",
           "STREAMGMM_METRICS__PORT": str(metrics_port or 0),
           "STREAMGMM_CHECKPOINT__INTERVAL_SECONDS": str(interval)}
    log_path = os.path.join(disk, "log")
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process by the caller's exit
    proc = subprocess.Popen([sys.executable, "-m", "streamgmm.cli", "run", "--create-topics",
                             "--log-level", "INFO"], stdout=log, stderr=subprocess.STDOUT,
                            cwd=disk, env=env)
    return proc, log_path


def stop_all(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def throughput(bootstrap: str, topic: str, n: int, partitions: int, replicas: int,
               workdir: str, tag: str) -> float:
    """Aggregate events/s of ``replicas`` replicas over the ``n`` events in ``topic``."""
    group = f"bench-{replicas}-{tag}-{time.time_ns()}"
    procs = [start_replica(bootstrap, topic, group, f"r{k}", workdir)[0]
             for k in range(replicas)]
    try:
        first, t0 = 0, None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            done = committed_total(bootstrap, group, topic, partitions)
            now = time.perf_counter()
            if t0 is None and done > 0:
                first, t0 = done, now
            if done >= n:
                return (n - first) / (now - t0)
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a replica exited")
            time.sleep(0.1)
        raise RuntimeError("the replicas did not finish within 600 s")
    finally:
        stop_all(procs)


_STAMP = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def moves(bootstrap: str, workdir: str, partitions: int, rate: float, seconds: float) -> dict:
    """Two replicas on a paced stream; a third joins, then the first stops: each moved
    partition's time from assignment to first scored event, from the replicas' logs."""
    topic = f"moves-{time.time_ns()}"
    from streamgmm.io.confluent import ensure_topics

    ensure_topics(bootstrap, [topic], partitions=partitions)
    stop = threading.Event()
    n = int(rate * seconds * 3)
    producer = threading.Thread(target=produce, args=(bootstrap, topic, n, 1, rate, stop),
                                daemon=True)
    producer.start()
    group = f"moves-{time.time_ns()}"
    ports = [free_port() for _ in range(3)]
    r0 = start_replica(bootstrap, topic, group, "r0", workdir, 2.0, ports[0])
    r1 = start_replica(bootstrap, topic, group, "r1", workdir, 2.0, ports[1])
    procs = [r0[0], r1[0]]
    ages: list[float] = []

    def sample(until: float, live: list[int]) -> None:
        while time.monotonic() < until:
            ages.extend(a for a in map(merged_model_age, live) if a is not None)
            time.sleep(1.0)

    try:
        sample(time.monotonic() + seconds, ports[:2])
        r2 = start_replica(bootstrap, topic, group, "r2", workdir, 2.0, ports[2])
        procs.append(r2[0])
        sample(time.monotonic() + seconds, ports)
        r0[0].send_signal(signal.SIGTERM)
        r0[0].wait(timeout=30)
        sample(time.monotonic() + seconds, ports[1:])
    finally:
        stop.set()
        stop_all(procs)
    waits = []
    pattern = re.compile(rb"(\S+:\d+): first event scored ([\d.]+) s after its assignment")
    for _, log_path in (r1, r2):
        with open(log_path, "rb") as log:
            for line in log:
                found = pattern.search(line)
                if found:
                    waits.append(float(found.group(2)))
    return {"moved": len(waits), "first_event_after_assignment_s": waits,
            "merged_model_age_s": ages}


def state_sizes(bootstrap: str, group_prefix: str) -> list[int]:
    """Bytes of the newest state record of every partition, in every state topic of the run."""
    import confluent_kafka

    admin = confluent_kafka.admin.AdminClient({"bootstrap.servers": bootstrap})
    topics = [t for t in admin.list_topics(timeout=10).topics if t.endswith("-state")
              and t.startswith(group_prefix)]
    sizes = {}
    consumer = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": "sizes",
                                         "enable.auto.commit": False,
                                         "isolation.level": "read_committed"})
    try:
        consumer.assign([confluent_kafka.TopicPartition(t, 0, confluent_kafka.OFFSET_BEGINNING)
                         for t in topics])
        idle = time.monotonic()
        while time.monotonic() - idle < 2.0:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                sizes[(msg.topic(), msg.key())] = len(msg.value() or b"")
                idle = time.monotonic()
    finally:
        consumer.close()
    return sorted(sizes.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=120_000,
                        help="events in the throughput topic (default: %(default)s)")
    parser.add_argument("--partitions", type=int, default=6,
                        help="partitions of the input topic (default: %(default)s)")
    parser.add_argument("--replicas", default="1,2,3", help="replica counts (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="the replica counts take turns this many times; best of each")
    parser.add_argument("--rate", type=float, default=2000.0,
                        help="paced load of the moves run, events/s (default: %(default)s)")
    parser.add_argument("--phase", type=float, default=15.0,
                        help="seconds between the moves (default: %(default)s)")
    parser.add_argument("--brokers", default="tansu,apache",
                        help="brokers to measure on, one after the other (default: %(default)s)")
    args = parser.parse_args()
    counts = [int(k) for k in args.replicas.split(",")]
    workdir = tempfile.mkdtemp(prefix="bench-scale-out-")
    results: dict = {"events": args.events, "partitions": args.partitions, "brokers": {}}
    from streamgmm.io.confluent import ensure_topics

    for kind in args.brokers.split(","):
        print(f"== broker: {BROKER_NAMES[kind]}", flush=True)
        with start_broker(kind, os.path.join(workdir, kind)) as broker:
            bs = broker.bootstrap_servers
            ensure_topics(bs, ["bench"], partitions=args.partitions)
            produce(bs, "bench", args.events)
            found: dict = {}
            for round_ in range(args.repeat):
                for k in counts:
                    rate = throughput(bs, "bench", args.events, args.partitions, k, workdir,
                                      f"{kind}{round_}")
                    found[k] = max(rate, found.get(k, 0.0))
                    print(f"  {k} replica(s): {rate:,.0f} events/s", flush=True)
            sizes = state_sizes(bs, "bench-")
            moved = moves(bs, workdir, args.partitions, args.rate, args.phase)
            waits = moved["first_event_after_assignment_s"]
            results["brokers"][kind] = {
                "throughput": found, "state_bytes": sizes, **moved,
                "first_event_median_s": statistics.median(waits) if waits else None,
                "first_event_max_s": max(waits) if waits else None}
            print(f"  state bytes per partition: median {statistics.median(sizes):,.0f}, max "
                  f"{max(sizes):,.0f} ({len(sizes)} states)", flush=True)
            print(f"  moves: {len(waits)} partitions moved; first event after assignment "
                  f"{', '.join(f'{w:.2f}' for w in waits)} s", flush=True)
            ages = moved["merged_model_age_s"]
            if ages:
                print(f"  merged model age (state interval 2 s), {len(ages)} samples: median "
                      f"{statistics.median(ages):.2f} s, max {max(ages):.2f} s", flush=True)
    print()
    print("| broker | " + " | ".join(f"{k} replica{'s' if k > 1 else ''} (ev/s)" for k in counts)
          + " | moved partition: assignment -> first scored event (median / max) "
          "| state bytes per partition (median) |")
    print("|---" * (len(counts) + 3) + "|")
    for kind, found in results["brokers"].items():
        base = found["throughput"][counts[0]]
        cells = [f"{found['throughput'][k]:,.0f} ({found['throughput'][k] / base:.2f}x)"
                 for k in counts]
        median, worst = found["first_event_median_s"], found["first_event_max_s"]
        move = "n/a" if median is None else f"{median:.2f} s / {worst:.2f} s"
        print(f"| {BROKER_NAMES[kind]} | " + " | ".join(cells)
              + f" | {move} | {statistics.median(found['state_bytes']):,.0f} |")
    print()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
