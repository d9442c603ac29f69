"""Random fault schedules against a REAL broker (Apache Kafka or Tansu).

    python scripts/chaos_real_brokers.py --broker apache --seeds 0-9
    python scripts/chaos_real_brokers.py --replay out/chaos/runs/apache-3/schedule.json


Per seed: 2-4 partitions, 3000-6000 events (valid, invalid, obvious anomalies, hostile), produced
partly up front and partly by a paced producer while 1-3 ``streamgmm run`` replicas (each start in
an empty directory, own replica id) come and go: kill -9, SIGTERM, SIGSTOP shorter or longer than
the 6 s session timeout then SIGCONT, a replica joining, a broker restart (Apache keeps its log).
Then all stop, one final replica runs to the end, and the checks run. Each run's schedule (and
everything needed to replay it) is written to runs/<broker>-<seed>/schedule.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback

import orjson

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from conftest import newest_states, read_topic  # noqa: E402
from test_recovery import write_config  # noqa: E402  (the same daemon config as the kill -9 test)
from test_scale_out import committed  # noqa: E402

from streamgmm.io.kafka import ensure_topics  # noqa: E402
from streamgmm.messages import source_of_dead_letter, source_of_output  # noqa: E402

HERE = ROOT / "out" / "chaos"  # runs (schedules, logs), code snapshots, brokers' files
PY = sys.executable
INVALID = (b"{broken", b'{"x": "high", "y": 1}', b'{"x": 1}', b"[]")
SESSION_TIMEOUT = 6.0
CODE = [str(ROOT)]  # where the replicas import streamgmm from (a snapshot: see main)


class Fail(AssertionError):
    pass


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# -- events -------------------------------------------------------------------------------------

def hostile(rng) -> list[tuple[bytes | None, str]]:
    """A few hostile messages: (value, name). Their fate (dead letter or learned) is not fixed,
    only that each has exactly one."""
    deep = b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b', "y": 1}'
    nested_ok = b'{"x": 0.5, "y": 5, "n": ' + b"[" * 200 + b"1" + b"]" * 200 + b"}"
    cands = [
        (orjson.dumps({"x": 0.1, "y": 5.0, "pad": "a" * 900_000}), "huge-valid"),
        (orjson.dumps({"x": "a" * 900_000, "y": 1}), "huge-invalid"),
        (deep, "deep-invalid"),
        (nested_ok, "nested-valid"),
        (b'{"x": "NaN", "y": 1}', "nan-string"),
        (b'{"x": NaN, "y": 1}', "nan-raw"),
        (b'{"x": "inf", "y": 2}', "inf-string"),
        (b'{"x": -Infinity, "y": 2}', "inf-raw"),
        (b'{"x": 1e999, "y": 2}', "1e999"),
        (b'{"x": 1, "y": 2, "s": "\xff\xfe"}', "non-utf8-in-string"),
        (b"\xff\xfe\xfd\x00\x01", "non-utf8"),
        (b"", "empty"),
        (None, "tombstone"),
        (bytes(rng.getrandbits(8) for _ in range(1000)) * 1000, "1MB-binary"),
        (b'{"x": 1, "y": 2}' + b" " * 999_000, "1MB-valid-padded"),
        (b'{"x": 12345678901234567890123456789, "y": 2}', "bigint"),
        (b'{"x": true, "y": null}', "bool-null"),
        (b'"just a string"', "string"),
    ]
    return rng.sample(cands, rng.randint(3, 7))


def make_events(rng, n: int, start_index: int, anomalies_from: int):
    """[(value, kind, key)]: ~2 % invalid, ~1 % obvious anomalies once past ``anomalies_from``."""
    out = []
    for i in range(start_index, start_index + n):
        u = rng.random()
        key = str(rng.randrange(997)).encode()
        if u < 0.02:
            out.append((rng.choice(INVALID), "invalid", key))
        elif u < 0.03 and i > anomalies_from:
            out.append((orjson.dumps({"i": i, "x": rng.choice([-1, 1]) * 1e4, "y": 1e4}),
                        "anomaly", key))
        else:
            out.append((orjson.dumps({"i": i, "x": rng.gauss(0, 1), "y": rng.gauss(5, 2)}),
                        "normal", key))
    return out


class Producer:
    """confluent-kafka producer recording each message's (partition, offset) and kind."""

    def __init__(self, bootstrap, topic):
        import confluent_kafka
        self.topic = topic
        self.p = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "acks": "all",
                                           "linger.ms": 5, "message.max.bytes": 2_000_000,
                                           "enable.idempotence": True})
        self.where: dict[tuple[int, int], str] = {}
        self.errors = []
        self.sent = 0
        self.lock = threading.Lock()

    def send(self, value, kind, key):
        def done(err, msg, kind=kind):
            if err is not None:
                self.errors.append((kind, str(err)))
            else:
                with self.lock:
                    self.where[(msg.partition(), msg.offset())] = kind
        while True:
            try:
                self.p.produce(self.topic, value=value, key=key, on_delivery=done)
                break
            except BufferError:
                self.p.poll(0.1)
        self.p.poll(0)
        self.sent += 1

    def flush(self, timeout=60):
        left = self.p.flush(timeout)
        if left or self.errors:
            raise Fail(f"produce failed: {left} left, errors {self.errors[:3]}")


# -- replicas -----------------------------------------------------------------------------------

class Replica:
    def __init__(self, name, config, rundir):
        self.name, self.config, self.rundir = name, config, rundir
        self.log_path = rundir / f"{name}.log"
        self.proc = None
        self.starts = 0
        self.stopped = False
        self.exits = []

    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self):
        self.starts += 1
        wd = self.rundir / f"{self.name}-disk-{self.starts}"
        shutil.rmtree(wd, ignore_errors=True)
        wd.mkdir(parents=True)
        env = {**os.environ, "STREAMGMM_KAFKA__REPLICA_ID": self.name,
               "PYTHONPATH": CODE[0]}
        self.log_at_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as f:
            f.write(f"\n=== start {self.starts} at {time.strftime('%H:%M:%S')}\n".encode())
            self.proc = subprocess.Popen(
                [PY, "-m", "streamgmm.cli", "run", "--config", str(self.config),
                 "--log-level", "INFO"], stdout=f, stderr=subprocess.STDOUT, cwd=wd, env=env,
                start_new_session=True)

    def sig(self, s):
        if self.alive:
            self.proc.send_signal(s)

    def reap(self, timeout):
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self.exits.append(code)
        return code

    def said_nothing(self):
        """Nothing logged since the last start: SIGTERM came while Python was still importing
        (before the daemon installs its handler); -15 then is no finding."""
        with open(self.log_path, "rb") as f:
            f.seek(self.log_at_start)
            return len(f.read().strip().splitlines()) <= 1

    def text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


# -- the schedule -------------------------------------------------------------------------------

def make_plan(seed: int, broker_kind: str) -> dict:
    rng = random.Random(seed)
    plan = {
        "seed": seed, "broker": broker_kind,
        "partitions": rng.choice([2, 3, 4]),
        "n_events": rng.randint(3000, 6000),
        "upfront": rng.choice([0.2, 0.5, 1.0]),
        "rate": rng.choice([300, 600, 1200]),
        "backend": rng.choice(["kafka-python", "confluent-kafka"]),
        "interval": rng.choice([0.2, 0.7, 2.0, 5.0]),
        "max_records": rng.choice([25, 100, 500]),
        "hostile_seed": rng.randrange(10**6),
        "final": rng.choice(["r0", "r1", "final"]),
    }
    names = ["r0", "r1", "r2", "r3"]
    running = set()
    actions = []
    for r in names[: rng.randint(1, 3)]:
        actions.append(["start", r])
        running.add(r)
    restarted = False
    for _ in range(rng.randint(3, 8)):
        actions.append(["sleep", round(rng.uniform(0.3, 4.0), 2)])
        choices = ["kill9", "kill9", "term", "stop_short", "stop_long", "join", "burst"]
        if broker_kind == "apache" and not restarted:
            choices.append("broker_restart")
        what = rng.choice(choices)
        if what in ("kill9", "term", "stop_short", "stop_long"):
            if not running:
                what = "join"
            else:
                r = rng.choice(sorted(running))
                if what == "stop_short":
                    actions.append(["stop", r, round(rng.uniform(0.3, SESSION_TIMEOUT * 0.6), 2)])
                elif what == "stop_long":
                    actions.append(["stop", r, round(rng.uniform(SESSION_TIMEOUT + 2, 16), 2)])
                else:
                    actions.append([what, r])
                    running.discard(r)
                    if rng.random() < 0.6:  # comes back, maybe after a while
                        actions.append(["sleep", round(rng.uniform(0, 3), 2)])
                        actions.append(["start", r])
                        running.add(r)
        if what == "join":
            free = [n for n in names if n not in running]
            if free and len(running) < 3:
                r = rng.choice(free)
                actions.append(["start", r])
                running.add(r)
        elif what == "burst":
            actions.append(["burst", rng.randint(200, 1200)])
        elif what == "broker_restart":
            restarted = True
            actions.append(["broker_restart", round(rng.uniform(0, 8), 1),
                            rng.random() < 0.5])  # down seconds, hard
    if not running:
        actions.append(["start", "r0"])
    plan["actions"] = actions
    return plan


# -- a run --------------------------------------------------------------------------------------

def run(plan: dict, broker, rundir: pathlib.Path, keep: bool) -> list[str]:
    """Returns a list of problems (empty: passed)."""
    shutil.rmtree(rundir, ignore_errors=True)
    rundir.mkdir(parents=True)
    (rundir / "schedule.json").write_text(json.dumps(plan, indent=1))
    bootstrap = broker.bootstrap_servers
    quirks = "none" if broker.kind == "apache" else "tansu"
    tag = f"{plan['broker']}-{plan['seed']}-{int(time.time()) % 100000}"
    topics = (f"in-{tag}", f"out-{tag}", f"dlq-{tag}")
    group = f"group-{tag}"
    P = plan["partitions"]
    ensure_topics(bootstrap, topics[:1], partitions=P)
    ensure_topics(bootstrap, topics[1:])
    config = rundir / "streamgmm.toml"
    write_config(config, bootstrap, topics, group, backend=plan["backend"], quirks=quirks,
                 interval=plan["interval"], max_records=plan["max_records"])
    erng = random.Random(plan["seed"] * 7919 + 1)
    n = plan["n_events"]
    events = make_events(erng, n, 0, n // 2)
    hrng = random.Random(plan["hostile_seed"])
    for value, name in hostile(hrng):  # inserted at random places in the second half
        pos = hrng.randrange(n // 2, len(events))
        events.insert(pos, (value, "hostile:" + name, str(hrng.randrange(997)).encode()))
    bursts = []
    next_index = n
    for a in plan["actions"]:
        if a[0] == "burst":
            bursts.append(make_events(erng, a[1], next_index, 0))
            next_index += a[1]

    prod = Producer(bootstrap, topics[0])
    upfront = int(len(events) * plan["upfront"])
    for value, kind, key in events[:upfront]:
        prod.send(value, kind, key)
    prod.flush()
    rest = events[upfront:]
    stop_producing = threading.Event()

    def paced():
        t0 = time.monotonic()
        for k, (value, kind, key) in enumerate(rest):
            if stop_producing.is_set():
                return
            ahead = k / plan["rate"] - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
            prod.send(value, kind, key)
    pthread = threading.Thread(target=paced, daemon=True)
    pthread.start()

    replicas: dict[str, Replica] = {}
    events_log = []
    problems = []

    def note(*a):
        events_log.append([round(time.monotonic() - T0, 2), *a])
        log("  ", *a)

    def get(r):
        if r not in replicas:
            replicas[r] = Replica(r, config, rundir)
        return replicas[r]

    T0 = time.monotonic()
    burst_i = 0
    last_change = [T0]
    try:
        for a in plan["actions"]:
            op = a[0]
            if op == "sleep":
                time.sleep(a[1])
            elif op == "start":
                rep = get(a[1])
                if rep.alive:
                    note("skip start (alive)", a[1])
                    continue
                rep.start()
                last_change[0] = time.monotonic()
                note("start", a[1], rep.proc.pid)
            elif op in ("kill9", "term"):
                rep = get(a[1])
                if op == "term" and broker.kind == "tansu" and rep.alive:
                    # a member that leaves while the group rebalances leaves Tansu's group
                    # with a departed leader for good (README, Reliability): let it settle first
                    settle = last_change[0] + SESSION_TIMEOUT + 2 - time.monotonic()
                    if settle > 0:
                        note(f"  (Tansu: waiting {settle:.1f} s for the group to settle)")
                        time.sleep(settle)
                if not rep.alive:
                    note("skip", op, a[1], f"(dead, exits {rep.exits})")
                    continue
                rep.sig(signal.SIGKILL if op == "kill9" else signal.SIGTERM)
                code = rep.reap(30)
                last_change[0] = time.monotonic()
                note(op, a[1], "exit", code)
                if code is None:
                    problems.append(f"{a[1]} did not exit within 30 s of SIGTERM")
                    rep.sig(signal.SIGKILL)
                    rep.reap(10)
                elif op == "term" and code == -15 and rep.said_nothing():
                    note("  (SIGTERM before the daemon started: -15 expected)")
                elif op == "term" and code != 0:
                    problems.append(f"{a[1]} exited {code} on SIGTERM")
            elif op == "stop":
                rep = get(a[1])
                if not rep.alive:
                    note("skip stop (dead)", a[1], rep.exits)
                    continue
                rep.sig(signal.SIGSTOP)
                note("SIGSTOP", a[1], a[2])
                time.sleep(a[2])
                rep.sig(signal.SIGCONT)
                if a[2] > SESSION_TIMEOUT:
                    last_change[0] = time.monotonic()
                note("SIGCONT", a[1])
            elif op == "burst":
                for value, kind, key in bursts[burst_i]:
                    prod.send(value, kind, key)
                burst_i += 1
                note("burst", a[1])
            elif op == "broker_restart":
                note("broker restart", a[1], "hard" if a[2] else "soft")
                broker.restart(down_seconds=a[1], hard=a[2], timeout=90)
                note("broker back")
            # a replica that died by itself is a finding
            for rep in replicas.values():
                if rep.proc is not None and rep.proc.poll() is not None and \
                        len(rep.exits) < rep.starts:
                    rep.exits.append(rep.proc.returncode)
                    problems.append(f"{rep.name} exited {rep.proc.returncode} on its own")
                    note("died by itself", rep.name, rep.proc.returncode)
        pthread.join(120)
        if pthread.is_alive():
            problems.append("the paced producer did not finish in 120 s")
            stop_producing.set()
        prod.flush()
        # everyone stops; then the final replica alone. On Tansu one at a time, a session
        # timeout apart: members that leave while the group rebalances leave it with a departed
        # leader, and no member gets partitions again (a Tansu bug, README, Reliability)
        for rep in replicas.values():
            if rep.alive and broker.kind == "tansu":
                time.sleep(SESSION_TIMEOUT + 2)
            if rep.alive:
                rep.sig(signal.SIGTERM)
                code = rep.reap(30)
                note("final term", rep.name, code)
                if code is None:
                    problems.append(f"{rep.name} did not exit within 30 s of SIGTERM (end)")
                    rep.sig(signal.SIGKILL)
                    rep.reap(10)
                elif code == -15 and rep.said_nothing():
                    note("  (SIGTERM before the daemon started: -15 expected)")
                elif code != 0:
                    problems.append(f"{rep.name} exited {code} on SIGTERM (end)")
            elif rep.proc is not None and len(rep.exits) < rep.starts:
                rep.exits.append(rep.proc.returncode)
                problems.append(f"{rep.name} exited {rep.proc.returncode} on its own")
        final = get(plan["final"])
        if broker.kind == "tansu":
            time.sleep(SESSION_TIMEOUT + 2)  # the group settles after the last leave
        final.start()
        note("final start", final.name)
        ends = {p: 0 for p in range(P)}
        for (p, o) in prod.where:
            ends[p] = max(ends[p], o + 1)

        def wait(cond, what, timeout):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if final.proc.poll() is not None:
                    raise Fail(f"the final replica exited {final.proc.returncode} while "
                               f"waiting for {what}")
                v = cond()
                if v:
                    return v
                time.sleep(0.5)
            raise Fail(f"timed out after {timeout} s waiting for {what} (last {cond.last})")

        def all_committed():
            c = committed(bootstrap, group, topics[0], P)
            all_committed.last = (c, ends)
            return all(c.get(p, -1) >= ends[p] for p in range(P))

        def all_learned():
            states = newest_states(bootstrap, f"{group}-state", ["x", "y"])
            got = {tp.partition: s.learned for tp, s in states.items()}
            all_learned.last = (got, ends)
            return all(got.get(p, -1) >= ends[p] for p in range(P))

        def joined():
            joined.last = "no 'joined group' line"
            with open(final.log_path, "rb") as f:
                f.seek(final.log_at_start)
                return b"joined group" in f.read()

        wait(joined, "the final replica to join", 120)
        wait(all_committed, "every event committed", 240)
        wait(all_learned, "every event learned", 120)
        final.sig(signal.SIGTERM)
        code = final.reap(30)
        note("final exit", code)
        if code != 0:
            problems.append(f"final replica exit {code} on SIGTERM")
            if code is None:
                final.sig(signal.SIGKILL)
                final.reap(10)
        problems += check(bootstrap, topics, group, prod.where, ends)
    except Exception as exc:
        problems.append(f"{type(exc).__name__}: {exc}"[:1500])
        problems.append("group as the broker describes it: " + describe_group(bootstrap, group))
        if not isinstance(exc, Fail):
            problems.append(traceback.format_exc()[-1500:])
    finally:
        stop_producing.set()
        for rep in replicas.values():
            if rep.proc is not None and rep.proc.poll() is None:
                rep.sig(signal.SIGCONT)
                rep.sig(signal.SIGKILL)
                rep.reap(10)
    # tracebacks in the logs
    for rep in replicas.values():
        bad = unexpected_tracebacks(rep.text())
        if bad:
            problems.append(f"{rep.name}.log has {len(bad)} unexpected Traceback(s): "
                            + bad[0][:800])
    (rundir / "events.json").write_text(json.dumps({"events": events_log, "problems": problems},
                                                   indent=1))
    if not problems and not keep:
        for d in rundir.glob("*-disk-*"):
            shutil.rmtree(d, ignore_errors=True)
    return problems


#: Tracebacks that kafka-python logs itself (at ERROR) when the broker goes away: expected.
EXPECTED_TRACEBACKS = ("ConnectionResetError", "BrokenPipeError", "ConnectionRefusedError")


def unexpected_tracebacks(text: str) -> list[str]:
    import re
    out = []
    for m in re.finditer(r"Traceback \(most recent call last\):\n(?:[ \t].*\n|\n)*(.*)", text):
        block, last = m.group(0), m.group(1)
        if "/kafka/net/" in block and last.split(":")[0] in EXPECTED_TRACEBACKS:
            continue
        out.append(block)
    return out


def describe_group(bootstrap, group) -> str:
    try:
        import confluent_kafka.admin
        admin = confluent_kafka.admin.AdminClient({"bootstrap.servers": bootstrap})
        d = admin.describe_consumer_groups([group], request_timeout=10)[group].result(timeout=15)
        members = [(m.client_id, m.member_id[-8:], sorted(
            (tp.topic[-6:], tp.partition) for tp in (m.assignment.topic_partitions or [])))
            for m in d.members]
        return f"state {d.state} members {members}"
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return f"(describe failed: {exc})"


def check(bootstrap, topics, group, where, ends) -> list[str]:
    problems = []
    kind_of = {(topics[0], p, o): k for (p, o), k in where.items()}
    outputs = read_topic(bootstrap, topics[1], idle=3.0, timeout=60)
    letters = read_topic(bootstrap, topics[2], idle=3.0, timeout=60)
    out_sources = [source_of_output(m.value()) for m in outputs]
    dlq_sources = [source_of_dead_letter(m.headers()) for m in letters]
    out_sources = [tuple(s) if s else s for s in out_sources]
    dlq_sources = [tuple(s) if s else s for s in dlq_sources]
    if None in out_sources or None in dlq_sources:
        problems.append("an output or dead letter without a source")
    dup = [(s, c, kind_of.get(s)) for s, c in
           collections.Counter(out_sources + dlq_sources).items() if c > 1]
    if dup:
        problems.append(f"published more than once ({len(dup)}): {dup[:6]}")
    invalid = {s for s, k in kind_of.items() if k == "invalid"}
    anomalies = {s for s, k in kind_of.items() if k == "anomaly"}
    hostile_ = {s for s, k in kind_of.items() if k.startswith("hostile")}
    dset = set(dlq_sources)
    if invalid - dset:
        problems.append(f"invalid not dead-lettered: {sorted(invalid - dset)[:5]}")
    if dset - invalid - hostile_:
        bad = sorted(dset - invalid - hostile_)[:5]
        problems.append(f"dead letters of valid events: {[(s, kind_of.get(s)) for s in bad]}")
    lost = anomalies - set(out_sources)
    if lost:
        problems.append(f"lost anomalies ({len(lost)}/{len(anomalies)}): {sorted(lost)[:5]}")
    n = len(kind_of)
    if len(set(out_sources)) > len(anomalies) + 0.02 * n + 10:
        problems.append(f"too many outputs {len(set(out_sources))} for {len(anomalies)} anomalies")
    states = newest_states(bootstrap, f"{group}-state", ["x", "y"])
    by_p = {tp.partition: s for tp, s in states.items()}
    for p, end in ends.items():
        s = by_p.get(p)
        if s is None:
            problems.append(f"no state for partition {p}")
            continue
        mine = [s_ for s_ in kind_of if s_[1] == p]
        dl = sum(1 for s_ in dset if s_[1] == p)
        if s.learned != end:
            problems.append(f"partition {p}: learned up to {s.learned}, end {end}")
        if s.events_learned != len(mine) - dl:
            problems.append(f"partition {p}: events_learned {s.events_learned} != "
                            f"{len(mine)} - {dl} dead letters = {len(mine) - dl}")
    fates = {}
    for s, k in kind_of.items():
        if k.startswith("hostile"):
            fates[k] = "dlq" if s in dset else ("out" if s in set(out_sources) else "learned")
    log("   hostile fates:", fates)
    return problems


def start_broker(kind, workdir):
    if kind == "tansu":
        from streamgmm.embedded import EmbeddedBroker
        return EmbeddedBroker(port=None, log_path=workdir / "broker.log").start()
    from streamgmm.apache_kafka import ApacheKafka
    return ApacheKafka(workdir=workdir).start()


def main():
    ap = argparse.ArgumentParser(
        description="Random fault schedules against a real broker: replicas of `streamgmm run` "
                    "killed, stopped, frozen and joining, a broker restart, hostile messages; "
                    "then each output must be published once and each event learned once. "
                    "Minutes per schedule; a failing schedule is kept in "
                    "out/chaos/runs/<broker>-<seed>/schedule.json for --replay.",
        epilog="Session 9: 52 schedules on Apache Kafka and 21 on Tansu found four faults "
               "(README, Reliability).")
    ap.add_argument("--broker", default="apache", choices=["apache", "tansu"],
                    help="which real broker to start (default apache)")
    ap.add_argument("--seeds", default="0-4", help="a seed or a range, e.g. 7 or 0-9")
    ap.add_argument("--replay", help="schedule.json files (comma-separated) to run again")
    ap.add_argument("--keep", action="store_true", help="keep the replicas' working "
                    "directories of runs that pass too")
    ap.add_argument("--code", default=str(ROOT),
                    help="the tree whose streamgmm the replicas run (copied at start; "
                         "default this repository)")
    args = ap.parse_args()
    snap = HERE / "code" / str(os.getpid())
    shutil.copytree(pathlib.Path(args.code) / "streamgmm", snap / "streamgmm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    CODE[0] = str(snap)
    log("replicas run streamgmm copied from", args.code, "to", snap)
    if args.replay:
        plans = [json.loads(pathlib.Path(f).read_text()) for f in args.replay.split(",")]
        args.broker = plans[0]["broker"]
    else:
        a, _, b = args.seeds.partition("-")
        plans = [make_plan(s, args.broker) for s in range(int(a), int(b or a) + 1)]
    bdir = HERE / "brokers" / f"{args.broker}-{os.getpid()}"
    shutil.rmtree(bdir, ignore_errors=True)
    bdir.mkdir(parents=True)
    broker = start_broker(args.broker, bdir)
    log("broker", broker)
    fails = 0
    try:
        for plan in plans:
            t = time.monotonic()
            log(f"run seed {plan['seed']}: P={plan['partitions']} n={plan['n_events']} "
                f"{plan['backend']} interval={plan['interval']} max_records={plan['max_records']}"
                f" actions={plan['actions']}")
            suffix = f"-replay-{os.getpid()}-{id(plan) % 1000}" if args.replay else ""
            problems = run(plan, broker, HERE / "runs" / f"{args.broker}-{plan['seed']}{suffix}",
                           args.keep)
            status = "FAIL" if problems else "ok"
            fails += bool(problems)
            log(f"seed {plan['seed']} {status} in {time.monotonic() - t:.0f} s")
            for p in problems:
                log("    PROBLEM", p)
            if not broker.running:
                broker.start()
    finally:
        if hasattr(broker, "cleanup"):
            broker.cleanup()
        else:
            broker.kill()
    log(f"done: {len(plans)} runs, {fails} failed")


if __name__ == "__main__":
    main()
