#!/usr/bin/env python
"""Engine benchmark: streamgmm's score-and-learn against scikit-learn's score-only and River's
HalfSpaceTrees, side by side in one run on the same events, plus resident memory over a long run.

For each covariance type (batch 1000, d=10, K=8 by default) it prints:

* events/s of ``OnlineGaussianMixture.score_partial_fit`` (score *and* learn);
* events/s of scikit-learn's ``GaussianMixture.score_samples`` on the same parameters
  (score only: the reference E-step, our yardstick for "close to the limit");
* events/s of River's ``HalfSpaceTrees`` ``score_one`` + ``learn_one`` (full type only: it has
  no covariance type);
* resident memory after 1M and after 10M streamed events (must be flat).

Timings interleave the contenders and keep the best of several rounds, so a busy machine
penalises them alike. Goals: score-and-learn >= 1.5x scikit-learn's score-only, >= 40x
HalfSpaceTrees.

Usage: ``python scripts/bench_engine.py [--quick] [--memory-events 10000000]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_stream(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 4.0, (k, d))
    labels = rng.integers(0, k, n)
    return centres[labels] + rng.normal(size=(n, d)) * rng.uniform(0.5, 1.5, (k, 1, d))[0]


def best_rate(fn, n_events: int, rounds: int) -> float:
    best = np.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_events / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1000, help="micro-batch size (1000)")
    parser.add_argument("--features", type=int, default=10, help="dimensions d (10)")
    parser.add_argument("--components", type=int, default=8, help="components K (8)")
    parser.add_argument("--events", type=int, default=200_000, help="events per timing round")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (best is kept)")
    parser.add_argument("--hst-events", type=int, default=5_000, help="events for HalfSpaceTrees")
    parser.add_argument(
        "--memory-events", type=int, default=10_000_000, help="events of the memory run"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.rounds, args.hst_events, args.memory_events = 20_000, 2, 500, 200_000

    from river import anomaly
    from sklearn.mixture import GaussianMixture

    from streamgmm import OnlineGaussianMixture

    warnings.filterwarnings("ignore")
    d, k, b = args.features, args.components, args.batch
    X = make_stream(args.events + 20_000, d, k)
    init, stream = X[:20_000], X[20_000:]
    batches = [stream[i : i + b] for i in range(0, len(stream), b)]

    rows = []
    hst_rate = None
    for covariance_type in ("full", "tied", "diag", "spherical"):
        print(f"[{covariance_type}] fitting on 20,000 events ...", file=sys.stderr)
        seed = OnlineGaussianMixture(k, covariance_type=covariance_type, random_state=0)
        seed.fit(init)
        reference = GaussianMixture(k, covariance_type=covariance_type)
        reference.weights_ = seed.weights_
        reference.means_ = seed.means_
        reference.covariances_ = seed.covariances_
        reference.precisions_cholesky_ = seed.precisions_cholesky_
        ours_rates, sk_rates = [], []
        for _ in range(args.rounds):
            model = OnlineGaussianMixture.from_state(*seed.get_state())

            def ours(model=model):
                for batch in batches:
                    model.score_partial_fit(batch)

            def sklearn_score(reference=reference):
                for batch in batches:
                    reference.score_samples(batch)

            ours_rates.append(best_rate(ours, len(stream), 1))
            sk_rates.append(best_rate(sklearn_score, len(stream), 1))
        ours_rate, sk_rate = max(ours_rates), max(sk_rates)

        if covariance_type == "full":
            print("[full] HalfSpaceTrees ...", file=sys.stderr)
            lo, hi = stream.min(axis=0), stream.max(axis=0)
            dicts = [
                {f"x{j}": float(v) for j, v in enumerate((row - lo) / (hi - lo))}
                for row in stream[: args.hst_events]
            ]

            def hst_run(dicts=dicts):
                hst = anomaly.HalfSpaceTrees(seed=0)
                for x in dicts:
                    hst.score_one(x)
                    hst.learn_one(x)

            hst_rate = best_rate(hst_run, len(dicts), 2)

        print(f"[{covariance_type}] memory over {args.memory_events:,} events ...", file=sys.stderr)
        model = OnlineGaussianMixture.from_state(*seed.get_state())
        pool = batches[: min(len(batches), 100)]
        rss_1m = None
        seen = 0
        while seen < args.memory_events:
            model.score_partial_fit(pool[(seen // b) % len(pool)])
            seen += b
            if rss_1m is None and seen >= min(1_000_000, args.memory_events // 10):
                rss_1m = rss_bytes()
        rss_end = rss_bytes()
        rows.append((covariance_type, ours_rate, sk_rate, rss_1m, rss_end, model.n_events_learned_))

    mem_first = min(1_000_000, args.memory_events // 10)
    print()
    print(
        f"Engine benchmark: batch {b}, d={d}, K={k}; best of {args.rounds} rounds of "
        f"{len(stream):,} events; numpy {np.__version__}"
    )
    header = (
        f"| covariance | streamgmm score+learn (ev/s) | sklearn score-only (ev/s) | ratio "
        f"| vs HalfSpaceTrees | RSS @ {mem_first / 1e6:g}M | RSS @ {args.memory_events / 1e6:g}M |"
    )
    print(header)
    print("|" + "---|" * 7)
    ok = True
    for covariance_type, ours_rate, sk_rate, rss_1m, rss_end, _ in rows:
        ratio = ours_rate / sk_rate
        vs_hst = ours_rate / hst_rate
        ok &= ratio >= 1.5 and vs_hst >= 40
        print(
            f"| {covariance_type} | {ours_rate:,.0f} | {sk_rate:,.0f} | {ratio:.2f}x "
            f"| {vs_hst:,.0f}x | {rss_1m / 2**20:.1f} MiB | {rss_end / 2**20:.1f} MiB |"
        )
    print(f"\nHalfSpaceTrees score_one+learn_one: {hst_rate:,.0f} ev/s (on {args.hst_events:,})")
    print(f"Goals (>= 1.5x sklearn score-only, >= 40x HalfSpaceTrees): {'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
