#!/usr/bin/env python3
"""Produce a synthetic event stream with injected anomalies and drift to Kafka (or to a file).

Normal events come from a fixed Gaussian mixture over the numeric ``--fields``; a fraction
``--anomaly-rate`` of them is replaced by points far from every component (6–10 standard
deviations out). A drift schedule changes the normal data over time, so the detector's adaptation
and the drift alerts can be watched. Every event is one JSON object::

    {"event_id": 17, "timestamp": 1764000000.25, "source": "sensor-3",
     "latency_ms": 0.41, "bytes": -1.93, "cpu": 2.2,
     "label": {"anomaly": false, "phase": 0}}

The fields default to those of ``config/streamgmm.toml`` (``[features] fields``), so the shipped
configuration scores this stream as it is; dotted names (``--fields http.latency,http.bytes``)
make nested objects. ``label`` carries the ground truth for evaluation and is ignored by the
detector. The Kafka key is ``source``, so events spread over partitions while each source keeps
its order.

Drift schedule (``--drift``, repeatable): ``AT:KIND=AMOUNT`` or ``START-END:KIND=AMOUNT`` (a
linear ramp from START to END events). Kinds:

``shift``  move every component's mean by AMOUNT standard deviations (the same direction for all);
``scale``  multiply the spread of every component by AMOUNT;
``mode``   a new component appears and takes a fraction AMOUNT of the traffic.

For example ``--drift 20000:shift=3 --drift 40000-60000:scale=1.5``.

``--invalid-rate`` makes a fraction of the messages unscorable (invalid JSON, a missing field, a
string instead of a number, a non-finite number, not an object), to exercise the dead-letter
topic.

The generator is importable (``synthetic_events``) so the demo and the tests can use it without
Kafka.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np
import orjson

logger = logging.getLogger("produce_synthetic")

DEFAULT_FIELDS = ("latency_ms", "bytes", "cpu")  # [features] fields of config/streamgmm.toml
DRIFT_KINDS = ("shift", "scale", "mode")
INVALID_KINDS = ("invalid_json", "missing_field", "non_numeric", "non_finite", "not_object")


class UnscorableMessage(bytes):
    """The raw bytes of a message the detector cannot score, with the ``source`` it came from."""

    source: str | None = None


@dataclasses.dataclass(frozen=True)
class DriftStep:
    """One change of the normal data: a ``kind`` of ``amount`` ramped in over [start, end).

    ``start == end`` is a sudden change at event ``start``.
    """

    start: int
    end: int
    kind: str
    amount: float

    def progress(self, event_index: int) -> float:
        """Fraction in [0, 1] of this change in effect at ``event_index``.

        Examples
        --------
        >>> step = DriftStep(100, 200, "shift", 3.0)
        >>> [step.progress(i) for i in (0, 100, 150, 200, 500)]
        [0.0, 0.0, 0.5, 1.0, 1.0]
        >>> DriftStep(100, 100, "shift", 3.0).progress(100)
        1.0
        """
        if event_index < self.start:
            return 0.0
        if event_index >= self.end:
            return 1.0
        return (event_index - self.start) / (self.end - self.start)


def parse_drift(text: str) -> DriftStep:
    """Parse ``AT:KIND=AMOUNT`` or ``START-END:KIND=AMOUNT`` into a :class:`DriftStep`.

    Examples
    --------
    >>> parse_drift("20000:shift=3")
    DriftStep(start=20000, end=20000, kind='shift', amount=3.0)
    >>> parse_drift("1000-5000:mode=0.25")
    DriftStep(start=1000, end=5000, kind='mode', amount=0.25)
    >>> parse_drift("soon:shift=3")
    Traceback (most recent call last):
    ...
    ValueError: drift step 'soon:shift=3': expected AT:KIND=AMOUNT or START-END:KIND=AMOUNT \
with event counts, e.g. 20000:shift=3 or 20000-40000:scale=1.5
    """
    usage = (
        f"drift step {text!r}: expected AT:KIND=AMOUNT or START-END:KIND=AMOUNT with event "
        "counts, e.g. 20000:shift=3 or 20000-40000:scale=1.5"
    )
    try:
        when, change = text.split(":", 1)
        kind, amount_text = change.split("=", 1)
        start_text, _, end_text = when.partition("-")
        start = int(start_text)
        end = int(end_text) if end_text else start
        amount = float(amount_text)
    except ValueError:
        raise ValueError(usage) from None
    kind = kind.strip()
    if kind not in DRIFT_KINDS:
        raise ValueError(f"drift step {text!r}: unknown kind {kind!r}; use one of {DRIFT_KINDS}")
    if start < 0 or end < start:
        raise ValueError(f"drift step {text!r}: need 0 <= START <= END, got {start} and {end}")
    if not math.isfinite(amount):
        raise ValueError(f"drift step {text!r}: AMOUNT must be a finite number")
    if kind == "scale" and amount <= 0:
        raise ValueError(f"drift step {text!r}: a scale must be positive")
    if kind == "mode" and not 0 < amount < 1:
        raise ValueError(f"drift step {text!r}: a mode's share of the traffic must be in (0, 1)")
    return DriftStep(start, end, kind, amount)


@dataclasses.dataclass
class _Mixture:
    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, d)
    cholesky: np.ndarray  # (K, d, d), covariance = L @ L.T

    @property
    def n_features(self) -> int:
        return self.means.shape[1]


def _base_mixture(n_features: int, n_clusters: int, rng: np.random.Generator) -> _Mixture:
    weights = rng.dirichlet(np.full(n_clusters, 5.0))
    means = rng.uniform(-8.0, 8.0, size=(n_clusters, n_features))
    cholesky = np.empty((n_clusters, n_features, n_features))
    for k in range(n_clusters):
        # A random rotation with random axis lengths: correlated features, like real telemetry.
        rotation, _ = np.linalg.qr(rng.normal(size=(n_features, n_features)))
        scales = rng.uniform(0.5, 1.5, size=n_features)
        cholesky[k] = np.linalg.cholesky((rotation * scales**2) @ rotation.T)
    return _Mixture(weights, means, cholesky)


def synthetic_events(
    fields: Sequence[str] | int = DEFAULT_FIELDS,
    n_clusters: int = 3,
    anomaly_rate: float = 0.01,
    drift: Sequence[DriftStep] = (),
    invalid_rate: float = 0.0,
    n_sources: int = 8,
    seed: int | None = 0,
    clock=time.time,
) -> Iterator[dict | bytes]:
    """Yield synthetic events forever: dicts, or raw bytes for the unscorable ones.

    Parameters
    ----------
    fields
        Names of the numeric fields, dotted for nested objects (``"http.bytes"``); an integer
        ``d`` means ``x0`` … ``x{d-1}``.
    n_clusters
        Number of Gaussian components of the normal data.
    anomaly_rate
        Probability that an event is an injected anomaly (``label.anomaly`` is true).
    drift
        Changes of the normal data over the event index, see :func:`parse_drift`.
    invalid_rate
        Probability that an event is unscorable; such events are yielded as ``bytes`` (what goes
        on the wire), with kinds cycling through invalid JSON, a missing field, a non-numeric
        value, a non-finite number and a JSON value that is not an object.
    n_sources
        Number of distinct ``source`` values (the Kafka key).
    seed
        Seed of the random generator; the same seed gives the same stream.
    clock
        Function returning the event timestamp (seconds since the epoch).

    Yields
    ------
    dict or UnscorableMessage
        One event per iteration; unscorable ones as bytes (with their ``source`` attribute).

    Examples
    --------
    >>> import itertools
    >>> stream = synthetic_events(["cpu", "net.rx"], seed=1, clock=lambda: 0.0)
    >>> events = list(itertools.islice(stream, 3))
    >>> sorted(events[0])
    ['cpu', 'event_id', 'label', 'net', 'source', 'timestamp']
    >>> sorted(events[0]["net"]), events[2]["event_id"]
    (['rx'], 2)
    >>> stream = synthetic_events(anomaly_rate=0.1, seed=2)
    >>> flags = [e["label"]["anomaly"] for e in itertools.islice(stream, 5000)]
    >>> 0.08 < sum(flags) / len(flags) < 0.12
    True
    """
    names = [f"x{j}" for j in range(fields)] if isinstance(fields, int) else list(fields)
    if not names or len(set(names)) != len(names) or not all(names):
        raise ValueError(f"fields must be distinct non-empty names, got {names}")
    n_features = len(names)
    if n_clusters < 1 or n_sources < 1:
        raise ValueError("n_clusters and n_sources must be at least 1")
    if not 0.0 <= anomaly_rate < 1.0:
        raise ValueError(f"anomaly_rate must be in [0, 1), got {anomaly_rate}")
    if not 0.0 <= invalid_rate < 1.0:
        raise ValueError(f"invalid_rate must be in [0, 1), got {invalid_rate}")
    rng = np.random.default_rng(seed)
    mixture = _base_mixture(n_features, n_clusters, rng)
    shift_direction = rng.normal(size=n_features)
    shift_direction /= np.linalg.norm(shift_direction)
    new_modes = {
        id(step): _base_mixture(n_features, 1, rng) for step in drift if step.kind == "mode"
    }
    invalid_kinds = itertools.cycle(INVALID_KINDS)

    for index in itertools.count():
        shift = np.zeros(n_features)
        scale = 1.0
        mode_component: _Mixture | None = None
        for step in drift:
            fraction = step.progress(index)
            if fraction == 0.0:
                continue
            if step.kind == "shift":
                shift += fraction * step.amount * shift_direction
            elif step.kind == "scale":
                scale *= 1.0 + fraction * (step.amount - 1.0)
            elif rng.random() < fraction * step.amount:
                mode_component = new_modes[id(step)]
        is_anomaly = bool(rng.random() < anomaly_rate)
        source = f"sensor-{int(rng.integers(n_sources))}"
        if mode_component is not None:
            component, chosen = 0, mode_component
        else:
            component, chosen = int(rng.choice(len(mixture.weights), p=mixture.weights)), mixture
        direction = rng.normal(size=n_features)
        if is_anomaly:
            # Far out along a random direction: 6-10 standard deviations of that component.
            direction *= rng.uniform(6.0, 10.0) / np.linalg.norm(direction)
        x = chosen.means[component] + shift + scale * (chosen.cholesky[component] @ direction)
        event = {"event_id": index, "timestamp": round(float(clock()), 6), "source": source}
        for name, value in zip(names, x, strict=True):
            _set_path(event, name, float(value))
        event["label"] = {"anomaly": is_anomaly, "phase": sum(index >= s.start for s in drift)}
        if invalid_rate and rng.random() < invalid_rate:
            message = UnscorableMessage(_make_invalid(event, names[0], next(invalid_kinds)))
            message.source = source
            yield message
        else:
            yield event


def _set_path(event: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        event = event.setdefault(part, {})
    event[leaf] = value


def _make_invalid(event: dict, field: str, kind: str) -> bytes:
    """Turn a valid event into the raw bytes of an unscorable message of the given kind."""
    *parents, leaf = field.split(".")
    holder = event
    for part in parents:
        holder = holder[part]
    if kind == "invalid_json":
        return orjson.dumps(event)[:-7]  # cut off mid-object
    if kind == "missing_field":
        del holder[leaf]
    elif kind == "non_numeric":
        holder[leaf] = "twelve"
    elif kind == "non_finite":
        # orjson refuses NaN; Python's json writes the literal, as careless producers do.
        holder[leaf] = math.nan
        return json.dumps(event, allow_nan=True).encode()
    elif kind == "not_object":
        return orjson.dumps([event["event_id"], event["source"]])
    return orjson.dumps(event)


def encode_event(event: dict | bytes) -> tuple[bytes, bytes | None]:
    """Return ``(value, key)`` bytes for one generated event.

    Examples
    --------
    >>> encode_event({"source": "sensor-1", "features": {"x0": 1.5}})
    (b'{"source":"sensor-1","features":{"x0":1.5}}', b'sensor-1')
    >>> encode_event(b"[1,2]")
    (b'[1,2]', None)
    """
    if isinstance(event, bytes):
        source = getattr(event, "source", None)
        return bytes(event), source.encode() if source is not None else None
    return orjson.dumps(event), event["source"].encode()


def paced(events: Iterator, rate: float, sleep=time.sleep, clock=time.monotonic) -> Iterator:
    """Yield from ``events`` at ``rate`` per second on average (``rate <= 0``: as fast as possible).

    The schedule is absolute (event ``i`` is due at ``i / rate`` seconds after the start), so a
    slow moment is caught up on instead of lowering the average rate.
    """
    if rate <= 0:
        yield from events
        return
    start = clock()
    for i, event in enumerate(events):
        delay = start + i / rate - clock()
        if delay > 0:
            sleep(delay)
        yield event


def _connect_producer(args: argparse.Namespace):
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    deadline = time.monotonic() + args.connect_timeout
    while True:
        try:
            return KafkaProducer(
                bootstrap_servers=args.bootstrap_servers.split(","),
                acks="all",
                linger_ms=args.linger_ms,
                client_id="streamgmm-produce-synthetic",
            )
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"error: no Kafka broker reachable at {args.bootstrap_servers} within "
                    f"{args.connect_timeout:g} s ({exc}); check --bootstrap-servers"
                ) from exc
            logger.warning("broker not reachable yet (%s); retrying", exc)
            time.sleep(1.0)


def _drift_argument(text: str) -> DriftStep:
    try:
        return parse_drift(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fields_argument(text: str) -> tuple[str, ...] | int:
    if text.strip().isdigit():
        return int(text)
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="produce_synthetic.py",
        description=__doc__.split("\n\n")[0],
        epilog="Example: produce_synthetic.py --bootstrap-servers localhost:9094 --topic events "
        "--rate 500 --fields cpu,mem,net.rx --anomaly-rate 0.005 --drift 60000:shift=3",
    )
    parser.add_argument(
        "--bootstrap-servers",
        default="localhost:9092",
        help="comma-separated Kafka brokers (default: %(default)s)",
    )
    parser.add_argument(
        "--topic", default="events", help="topic to produce to (default: %(default)s)"
    )
    parser.add_argument(
        "--output",
        metavar="PATH",
        help="write JSON lines to PATH ('-' for stdout) instead of Kafka",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="events per second, 0 for as fast as possible (default: %(default)s)",
    )
    parser.add_argument(
        "--count", type=int, default=0, help="number of events, 0 for no end (default: %(default)s)"
    )
    parser.add_argument(
        "--fields",
        type=_fields_argument,
        default=DEFAULT_FIELDS,
        metavar="NAME,...",
        help="numeric fields, comma-separated, dotted for nested objects, or a count N for "
        "x0..x{N-1}; the [features] fields of the daemon's config "
        f"(default: {','.join(DEFAULT_FIELDS)})",
    )
    parser.add_argument(
        "--clusters",
        type=int,
        default=3,
        help="Gaussian components of the normal data (default: %(default)s)",
    )
    parser.add_argument(
        "--anomaly-rate",
        type=float,
        default=0.005,
        help="fraction of injected anomalies (default: %(default)s)",
    )
    parser.add_argument(
        "--invalid-rate",
        type=float,
        default=0.0,
        help="fraction of unscorable messages, for the dead-letter topic (default: %(default)s)",
    )
    parser.add_argument(
        "--drift",
        type=_drift_argument,
        action="append",
        default=[],
        metavar="AT:KIND=AMOUNT",
        help="drift step, repeatable: e.g. 20000:shift=3, 40000-60000:scale=1.5, "
        "80000:mode=0.3 (kinds: shift, scale, mode)",
    )
    parser.add_argument(
        "--sources", type=int, default=8, help="distinct keys (source names) (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--linger-ms", type=int, default=5, help="producer batching delay (default: %(default)s)"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=60.0,
        help="seconds to keep retrying an unreachable broker (default: %(default)s)",
    )
    parser.add_argument(
        "--log-every",
        type=int,
        default=10_000,
        help="log progress every N events, 0 for never (default: %(default)s)",
    )
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (docker stop) ends the stream like Ctrl-C: what was sent is flushed first.
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    try:
        events = synthetic_events(
            fields=args.fields,
            n_clusters=args.clusters,
            anomaly_rate=args.anomaly_rate,
            drift=args.drift,
            invalid_rate=args.invalid_rate,
            n_sources=args.sources,
            seed=args.seed,
        )
        first = next(events)  # generators validate lazily: fail here, before connecting
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stream = itertools.chain([first], events)
    if args.count > 0:
        stream = itertools.islice(stream, args.count)
    stream = paced(stream, args.rate)

    produced = 0
    if args.output is not None:
        out = sys.stdout.buffer if args.output == "-" else open(args.output, "wb")  # noqa: SIM115
        try:
            for event in stream:
                out.write(encode_event(event)[0] + b"\n")
                produced += 1
        except KeyboardInterrupt:
            pass
        finally:
            out.flush()
            if out is not sys.stdout.buffer:
                out.close()
        print(f"wrote {produced} events to {args.output}", file=sys.stderr)
        return 0

    producer = _connect_producer(args)
    pending = []
    try:
        for event in stream:
            value, key = encode_event(event)
            pending.append(producer.send(args.topic, value=value, key=key))
            produced += 1
            if len(pending) >= 1000:
                for future in pending:
                    future.get(timeout=30)  # flush() does not raise on a failed record
                pending.clear()
            if args.log_every and produced % args.log_every == 0:
                logger.info("produced %d events to %s", produced, args.topic)
    except KeyboardInterrupt:
        pass
    finally:
        producer.flush()
        for future in pending:
            future.get(timeout=30)
        producer.close()
    print(
        f"produced {produced} events to {args.topic} at {args.bootstrap_servers}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
