"""Smoke tests of ``scripts/evaluate.py``: the harness runs, and its dev/test split is frozen."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import evaluate  # noqa: E402

# The split decides which streams the defaults may be chosen on. Changing it silently would let
# test data leak into tuning, so it is spelled out here; a new family must be added on purpose.
FROZEN_SPLIT = {
    "AnomalySine": "dev", "Bananas": "dev", "ImageSegments": "dev", "Phishing": "dev",
    "RandomRBF": "dev", "Shuttle": "dev", "abrupt drift": "dev", "breast cancer": "dev",
    "bursts": "dev", "digits": "dev", "discrete": "dev", "gradual drift": "dev",
    "heavy tails": "dev", "mixture + outliers": "dev", "new mode": "dev",
    "wide abrupt drift": "dev", "wide gradual drift": "dev", "wine": "dev",
    "LED": "test", "Waveform": "test", "iris": "test", "constant features": "test",
    "correlated": "test", "low-rank": "test", "multimodal": "test",
}


def test_split_is_frozen_and_by_family():
    assert evaluate.split() == FROZEN_SPLIT
    assert not evaluate.TUNED_FAMILIES & {f for f, h in FROZEN_SPLIT.items() if h == "test"}
    halves = {}
    for s in evaluate.catalogue():
        halves.setdefault(s.family, set()).add(s.half)
    assert all(len(h) == 1 for h in halves.values())
    ids = [s.id for s in evaluate.catalogue()]
    assert len(ids) == len(set(ids))


def test_sliding_baselines_are_prequential():
    """An event's score depends only on the events before it."""
    X = np.random.default_rng(0).normal(size=(400, 3))
    for fn in (evaluate.sliding_iforest, evaluate.sliding_gmm, evaluate.online_gaussian):
        a = fn(X)
        X2 = X.copy()
        X2[300:] += 100.0
        b = fn(X2)
        np.testing.assert_allclose(a[:300], b[:300])


def test_run_tiny_subset(tmp_path):
    methods = {"cand": lambda: evaluate.GMMDetector()}
    df = evaluate.run("both", methods, quick=True, include_defaults=False,
                      streams=["iris/rest-0", "correlated/n=300"], out=tmp_path,
                      show_progress=False)
    assert set(df["method"]) == {"cand", "cand (Std)", "cand (MinMax)"}
    assert set(df["half"]) == {"test"}
    assert df["roc_auc"].between(0, 1).all() and df["pr_auc"].between(0, 1).all()
    assert not (tmp_path / "cache").exists()  # factories are never cached
    base = evaluate.run("test", ["sliding IForest"], quick=True, streams=["iris/rest-0"],
                        out=tmp_path, show_progress=False)
    assert list((tmp_path / "cache").rglob("*.npz"))
    again = evaluate.run("test", ["sliding IForest"], quick=True, streams=["iris/rest-0"],
                         out=tmp_path, show_progress=False)
    assert base["roc_auc"].tolist() == again["roc_auc"].tolist()
    text = evaluate.report(df, tmp_path)
    assert "test half" in text and (tmp_path / "results_test.csv").exists()


@pytest.mark.slow
def test_command_line_quick_subset(tmp_path, capsys):
    assert evaluate.main(["--quick", "--streams", "wine/rest-0", "low-rank/n=300",
                          "--out", str(tmp_path), "--no-plots", "--no-speed", "--no-shuttle"]) == 0
    out = capsys.readouterr().out
    assert "dev half" in out and "test half" in out and "goals" in out


def test_the_roc_auc_standard_error_matches_the_spread_of_resampled_streams():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    aucs = []
    for _ in range(400):
        normal, anomalies = rng.normal(0, 1, 1000), rng.normal(1.5, 1, 30)
        y = np.r_[np.zeros(1000), np.ones(30)]
        aucs.append(roc_auc_score(y, np.r_[normal, anomalies]))
    se = evaluate.roc_auc_standard_error(np.mean(aucs), 30, 1000)
    # Hanley & McNeil assume exponential scores; for Gaussian ones the error is overstated
    assert 0.9 < se / np.std(aucs) < 1.5


def test_a_gap_within_the_noise_is_not_significant():
    rows = []
    for stream, mine, theirs, anomalies in (("small", 0.80, 0.85, 10), ("large", 0.80, 0.85, 2000)):
        rows += [{"stream": stream, "method": "m", "group": "streamgmm", "roc_auc": mine,
                  "n_events": 4 * anomalies, "n_anomalies": anomalies},
                 {"stream": stream, "method": "b", "group": "baseline", "roc_auc": theirs,
                  "n_events": 4 * anomalies, "n_anomalies": anomalies}]
    df = pd.DataFrame(rows)
    assert list(evaluate.gaps(df, "m").round(3)) == [0.05, 0.05]
    assert list(evaluate.significant_gaps(df, "m").index) == ["large"]


def test_the_noise_floor_counts_the_detector_behind_itself_reseeded_and_stays_out_of_the_tables(
        tmp_path):
    rows = []
    for stream, mine, again, anomalies in (("noise", 0.80, 0.85, 10), ("real", 0.80, 0.85, 2000),
                                           ("same", 0.90, 0.90, 50), ("ahead", 0.90, 0.80, 50)):
        for method, group, auc in (("GMMDetector", "streamgmm", mine),
                                   (evaluate.NOISE_REFERENCE, "reference", again),
                                   ("b", "baseline", 0.5)):
            rows.append({"half": "test", "family": "f", "stream": stream, "method": method,
                         "group": group, "roc_auc": auc, "pr_auc": auc,
                         "n_events": 4 * anomalies, "n_anomalies": anomalies})
    df = pd.DataFrame(rows)
    assert evaluate.noise_floor(df) == {"streams": 4, "behind": 2, "differ": 3,
                                        "significant": 1}
    assert evaluate.noise_floor(df[df["group"] != "reference"]) is None
    lines = evaluate.goals(df, None, None, None)
    assert not any(evaluate.NOISE_REFERENCE + ")" in line for line in lines)
    assert any("noise floor" in line and "by > 0.01 on 2 of 4 test streams (1 of them" in line
               for line in lines)
    evaluate.report(df, tmp_path)
    assert evaluate.NOISE_REFERENCE not in (tmp_path / "test_streams_roc_auc.md").read_text()
    assert evaluate.NOISE_REFERENCE in set(pd.read_csv(tmp_path / "results_test.csv")["method"])


def test_the_shuttle_goal_takes_the_narrowest_seed():
    shuttle = pd.DataFrame([
        {"detector": f"GMMDetector seed={seed}", "scaler": scaler, "first 10k": f10, "all": al}
        for seed, f10, al in ((0, 0.99, 0.995), (1, 0.985, 0.989))
        for scaler in ("none", "standard", "minmax")])
    empty = pd.DataFrame(columns=["half", "method", "group", "stream", "family", "roc_auc"])
    lines = [line for line in evaluate.goals(empty, shuttle, None, None) if "Shuttle" in line]
    assert len(lines) == 3
    assert "scaler none" in lines[2]
    assert "NO (0.9850 / 0.9890, the narrowest of 2 seeds)" in lines[2]
    assert "scaler minmax" in lines[0] and lines[0].split(": ")[-1].startswith("yes")


def test_a_selection_of_no_stream_says_so_and_how_to_list_them(tmp_path, capsys):
    # it was a KeyError from pandas ('half') on an empty frame
    with pytest.raises(ValueError, match="no stream of the dev half matches.*--list"):
        evaluate.run("dev", streams=["no such stream"], out=tmp_path, show_progress=False)
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--half", "dev", "--streams", "no such stream", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "--list" in capsys.readouterr().err
