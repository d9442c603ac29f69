#!/usr/bin/env python3
"""Daemon throughput against its ceiling, in one run, on the embedded broker.

1. Ceiling: consume the input topic with kafka-python alone (manual assignment) and decode every
   record with orjson and with the standard library — nothing else.
2. The daemon (``streamgmm.service.Daemon``, exactly-once) on the same topic: end-to-end events/s
   for each ``--batch-sizes`` value. (Produce→anomaly latency under a paced load is not measured
   yet.)

Prints the ratio daemon/ceiling (goal: ≥ 0.8). Usage::

    .venv/bin/python scripts/bench_daemon.py --events 100000 --batch-sizes 500,2000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition


def produce(bootstrap: str, topic: str, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    x[rng.random(n) < 0.002] *= 50
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
    futures = [producer.send(topic, orjson.dumps({"a": r[0], "b": r[1], "c": r[2], "i": i}),
                             partition=0) for i, r in enumerate(x.tolist())]
    for fut in futures:
        fut.get(timeout=60)
    producer.close()


def ceiling(bootstrap: str, topic: str, n: int, loads) -> float:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             isolation_level="read_committed")
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, 0)
    started, seen = time.perf_counter(), 0
    while seen < n:
        for records in consumer.poll(timeout_ms=500, max_records=5000).values():
            for rec in records:
                loads(rec.value)
            seen += len(records)
    elapsed = time.perf_counter() - started
    consumer.close()
    return n / elapsed


def daemon_run(bootstrap: str, topic: str, n: int, max_records: int, workdir: str):
    from streamgmm.config import load_config
    from streamgmm.service import Daemon

    out = f"{topic}-out-{max_records}"
    config = load_config(None, env={
        "STREAMGMM_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "STREAMGMM_KAFKA__INPUT_TOPIC": topic,
        "STREAMGMM_KAFKA__OUTPUT_TOPIC": out, "STREAMGMM_KAFKA__DEAD_LETTER_TOPIC": out + "-dlt",
        "STREAMGMM_KAFKA__GROUP_ID": f"bench-{max_records}-{time.time_ns()}",
        "STREAMGMM_FEATURES__FIELDS": "a,b,c", "STREAMGMM_BATCH__MAX_RECORDS": str(max_records),
        "STREAMGMM_MODEL__N_COMPONENTS": "2",
        "STREAMGMM_CHECKPOINT__PATH": os.path.join(workdir, f"ck-{max_records}.npz"),
    })
    daemon = Daemon(config, create_topics=True)
    first: list[float] = []

    def on_batch(d, records, extraction, result):
        if not first:
            first.append(time.perf_counter())

    daemon.on_batch = on_batch
    daemon.run(max_events=n)
    elapsed = time.perf_counter() - first[0]
    return n / elapsed, daemon.stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch-sizes", default="1000,5000")
    args = parser.parse_args()
    from streamgmm.embedded import EmbeddedBroker

    workdir = tempfile.mkdtemp(prefix="bench-daemon-")
    with EmbeddedBroker(log_path=os.path.join(workdir, "broker.log")) as broker:
        bs = broker.bootstrap_servers
        produce(bs, "bench", args.events)
        results = {"events": args.events}
        results["ceiling_orjson_per_s"] = ceiling(bs, "bench", args.events, orjson.loads)
        results["ceiling_json_per_s"] = ceiling(bs, "bench", args.events, json.loads)
        ceil = results["ceiling_orjson_per_s"]
        print(f"ceiling (kafka-python consume + decode): orjson {ceil:,.0f}/s, "
              f"json {results['ceiling_json_per_s']:,.0f}/s")
        for size in [int(s) for s in args.batch_sizes.split(",")]:
            rate, stats = daemon_run(bs, "bench", args.events, size, workdir)
            results[f"daemon_per_s_batch_{size}"] = rate
            print(f"daemon (exactly-once, max_records={size}): {rate:,.0f}/s = "
                  f"{rate / ceil:.0%} of the ceiling; {stats.anomalies} anomalies, "
                  f"{stats.batches} transactions")
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
