"""File sources and sink, the output messages, and replay of a file through the real detector."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from streamgmm.config import BatchConfig, Config, FeaturesConfig, ModelConfig, ThresholdConfig
from streamgmm.detector import Detector
from streamgmm.features import DeadLetter, FeatureExtractor
from streamgmm.io.files import CsvSource, JsonlSink, JsonlSource, open_source
from streamgmm.messages import (
    anomaly_message,
    anomaly_record,
    dead_letter_message,
    dead_letter_record,
    format_timestamp,
)
from streamgmm.replay import dead_letter_path_for, main, replay

ANOMALY_KEYS = {"event", "score", "anomaly_score", "threshold", "log_likelihood",
                "tail_probability", "component", "explanation", "source", "detected_at",
                "model_events"}


# -- sources and sink -----------------------------------------------------------------------


def test_jsonl_batches_keep_line_numbers_and_skip_blank_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [b'{"a": %d}' % i for i in range(7)]
    path.write_bytes(b"\n".join(lines[:3]) + b"\n\n  \n" + b"\r\n".join(lines[3:]))  # no final \n
    with open_source(path) as source:
        assert isinstance(source, JsonlSource)
        batches = list(source.batches(3))
    assert [b.values for b in batches] == [lines[:3], lines[3:6], lines[6:]]
    assert [b.lines for b in batches] == [[1, 2, 3], [6, 7, 8], [9]]
    assert batches[-1].position == path.stat().st_size
    assert source.records == 7 and source.blank_lines == 2


def test_gzip_jsonl(tmp_path):
    path = tmp_path / "in.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b'{"a": 1}\n{"a": 2}\n')
    with open_source(path) as source:
        (batch,) = list(source.batches(10))
    assert batch.values == [b'{"a": 1}', b'{"a": 2}'] and batch.lines == [1, 2]


def test_csv_rows_become_objects_the_extractor_understands(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text('latency_ms,http.bytes,http.code,host\n'
                    '12.5,512,200,web-1\n'
                    ',64,500,"web, 2"\n'
                    'inf,1,200,web-3\n'
                    'abc,1,200,web-4\n'
                    ',,,\n'
                    '1,2,3,4,5\n')
    with CsvSource(path) as source:
        (batch,) = list(source.batches(100))
    events = [json.loads(v) if b"NaN" not in v and b"Infinity" not in v else None
              for v in batch.values]
    assert events[0] == {"latency_ms": 12.5, "http": {"bytes": 512, "code": 200},
                         "host": "web-1"}
    assert events[1] == {"http": {"bytes": 64, "code": 500}, "host": "web, 2"}
    assert events[4]["_extra_cells"] == ["5"]  # more cells than columns: kept, not lost
    assert batch.lines == [2, 3, 4, 5, 7]
    assert source.blank_lines == 1
    out = FeatureExtractor(["latency_ms", "http.bytes"]).extract(batch.values)
    assert out.features.tolist() == [[12.5, 512.0], [1.0, 2.0]]
    assert [(d.index, d.reason) for d in out.dead_letters] == [
        (1, "missing_field"), (2, "non_finite"), (3, "non_numeric")]


@pytest.mark.parametrize(("header", "error"), [("a,a", "names a column twice"),
                                                ("a,a.b", "conflict"), ("a..b", "empty part")])
def test_csv_headers_that_cannot_map_to_json_are_refused(tmp_path, header, error):
    path = tmp_path / "in.csv"
    path.write_text(header + "\n1,2\n")
    with pytest.raises(ValueError, match=error):
        CsvSource(path)


def test_open_source_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the format"):
        open_source(tmp_path / "events.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(tmp_path / "missing.jsonl")
    (tmp_path / "events.txt").write_text('{"a": 1}\n')
    with open_source(tmp_path / "events.txt", format="jsonl") as source:
        assert next(source.batches(1)).values == [b'{"a": 1}']
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        next(JsonlSource(tmp_path / "events.txt").batches(0))


def test_jsonl_sink(tmp_path):
    path = tmp_path / "deep" / "out.jsonl"
    with JsonlSink(path) as sink:
        sink.write({"x": math.inf, "n": np.int64(3)})
        with pytest.raises(ValueError, match="newline"):
            sink.write(b'{"a":\n1}')
    assert path.read_text() == '{"x":null,"n":3}\n'


# -- messages -------------------------------------------------------------------------------


def fake_result(explain=None):
    return SimpleNamespace(
        score=np.array([2.0, np.inf]), anomaly_score=np.array([0.1, np.inf]),
        threshold=np.array([20.0, 20.0]), log_likelihood=np.array([-2.0, -np.inf]),
        tail_probability=np.array([0.5, 0.0]), component=np.array([0, np.int64(2)]),
        explain=explain or (lambda i: [{"feature": "a", "value": np.float64(9.0),
                                        "expected": 1.0, "contribution": np.float64(30.0),
                                        "direction": "high"}]))


def test_anomaly_message_schema_and_non_finite_numbers():
    message = json.loads(anomaly_message({"a": 9}, fake_result(), 1, ("events", 3, 1234),
                                         model_events=np.int64(10_000), detected_at=1.5))
    assert set(message) == ANOMALY_KEYS
    assert message["source"] == {"topic": "events", "partition": 3, "offset": 1234}
    assert message["score"] is None and message["log_likelihood"] is None
    assert message["component"] == 2 and message["model_events"] == 10_000
    assert message["detected_at"] == "1970-01-01T00:00:01.500Z"
    assert message["explanation"] == [{"feature": "a", "value": 9.0, "expected": 1.0,
                                       "contribution": 30.0, "direction": "high"}]


def test_a_failing_explanation_does_not_lose_the_anomaly(caplog):
    def broken(i):
        raise np.linalg.LinAlgError("singular")

    record = anomaly_record({"a": 1}, fake_result(broken), 0, {"file": "f", "line": 1}, 5)
    assert record["explanation"] == [] and record["score"] == 2.0
    assert "could not explain row 0" in caplog.text


def test_dead_letter_record_keeps_the_value():
    letter = DeadLetter(0, "invalid_json", "invalid JSON: ...")
    source = {"file": "in.jsonl", "line": 9}
    assert dead_letter_record(None, letter, source, 0)["value"] is None
    assert dead_letter_record("text", letter, source, 0)["value"] == "text"
    line = json.loads(dead_letter_message(b'{"a": tru', letter, source, 0))
    assert line == {"reason": "invalid_json", "message": "invalid JSON: ...", "source": source,
                    "detected_at": "1970-01-01T00:00:00.000Z", "value": '{"a": tru'}


def test_format_timestamp_is_utc_with_milliseconds():
    assert format_timestamp(1_764_065_730.9999) == "2025-11-25T10:15:30.999Z"
    assert format_timestamp().endswith("Z")


# -- replay through the real detector -------------------------------------------------------


def write_events(path, n=4000, anomalies=(), bad=(), seed=0):
    """Two clusters; rows in ``anomalies`` are far away, rows in ``bad`` are unscorable."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            if i in bad:
                f.write(bad[i] + "\n")
                continue
            centre = (0.0, 0.0) if i % 3 else (8.0, 8.0)
            x, y = rng.normal(centre, 1.0)
            if i in anomalies:
                x, y = 40.0, -40.0
            f.write(json.dumps({"id": i, "m": {"x": x}, "y": y}) + "\n")


def replay_config(max_records=200, **threshold):
    """Small batches: the detector warms up batch by batch (a batch is scored before learning)."""
    return Config(features=FeaturesConfig(fields=["m.x", "y"]),
                  batch=BatchConfig(max_records=max_records),
                  model=ModelConfig(n_components=2, random_state=0),
                  threshold=ThresholdConfig(**{"false_alarm_rate": 1e-3, "warmup_events": 500,
                                               **threshold}))


def test_replay_writes_anomalies_and_dead_letters_and_accounts_for_every_line(tmp_path):
    events = tmp_path / "events.jsonl"
    injected = {1500, 2600, 3900}
    bad = {7: "not json", 1000: '{"id": 1000, "m": {"x": "high"}, "y": 1}',
           2000: '{"id": 2000, "m": {}, "y": 1}', 3000: "[1, 2]"}
    write_events(events, anomalies=injected, bad=bad)
    output = tmp_path / "out" / "anomalies.jsonl"
    summary = replay(replay_config(), events, output, progress=False, clock=lambda: 0.0)

    assert summary.records == 4000
    assert summary.events_scored == 4000 - len(bad)
    assert summary.dead_letters == len(bad)
    assert summary.dead_letter_reasons == {"invalid_json": 1, "non_numeric": 1,
                                           "missing_field": 1, "not_object": 1}
    assert summary.events_learned == summary.events_scored
    assert summary.detector.n_events_learned == summary.events_scored

    anomalies = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(anomalies) == summary.anomalies
    by_id = {a["event"]["id"]: a for a in anomalies}
    assert injected <= set(by_id), "every injected anomaly is found"
    false_alarms = len(by_id) - len(injected)
    assert false_alarms <= 0.01 * summary.events_scored
    for a in anomalies:
        assert set(a) == ANOMALY_KEYS
        assert a["source"] == {"file": str(events), "line": a["event"]["id"] + 1}
        assert a["anomaly_score"] > 1 and a["score"] > a["threshold"]
        assert a["detected_at"] == "1970-01-01T00:00:00.000Z"
        assert 500 <= a["model_events"] <= 4000
    top = by_id[2600]["explanation"]
    assert top and {"feature", "value", "expected", "contribution", "direction"} <= set(top[0])
    assert top[0]["feature"] in ("m.x", "y")

    letters = [json.loads(line) for line in dead_letter_path_for(output).read_text().splitlines()]
    assert [(d["source"]["line"], d["reason"]) for d in letters] == [
        (8, "invalid_json"), (1001, "non_numeric"), (2001, "missing_field"), (3001, "not_object")]
    assert letters[0]["value"] == "not json"
    assert "replayed" in str(summary) and "dead letters 4" in str(summary)


def test_replay_is_the_same_detector_as_the_daemon_batch_by_batch(tmp_path):
    """Replaying equals feeding the same micro-batches to a fresh detector by hand."""
    events = tmp_path / "events.jsonl"
    write_events(events, n=1500, anomalies={1200})
    config = replay_config(max_records=250, warmup_events=300)
    summary = replay(config, events, tmp_path / "out.jsonl", progress=False)

    detector = Detector(**config.detector_kwargs())
    extractor = FeatureExtractor(["m.x", "y"])
    lines = events.read_bytes().splitlines()
    flagged = []
    for start in range(0, len(lines), 250):
        out = extractor.extract(lines[start:start + 250])
        result = detector.process(out.features)
        flagged += [out.events[k]["id"] for k in np.flatnonzero(result.is_anomaly)]
    replayed = [json.loads(line)["event"]["id"]
                for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert replayed == flagged
    assert 1200 in replayed
    assert summary.events_learned == detector.n_events_learned == 1500


def test_replay_marginalizes_missing_fields_when_configured(tmp_path):
    events = tmp_path / "events.jsonl"
    write_events(events, n=1200, bad={1100: '{"id": 1100, "y": 0.1}'})
    config = replay_config(warmup_events=300)
    config = dataclasses.replace(
        config, features=FeaturesConfig(fields=["m.x", "y"], missing="marginalize"))
    summary = replay(config, events, tmp_path / "out.jsonl", progress=False)
    assert summary.dead_letters == 0 and summary.events_scored == 1200


def test_replay_from_csv_with_a_progress_bar(tmp_path, capsys):
    pytest.importorskip("tqdm")
    events = tmp_path / "events.csv"
    rng = np.random.default_rng(1)
    rows = ["id,m.x,y"] + [f"{i},{rng.normal():.4f},{rng.normal():.4f}" for i in range(800)]
    rows[700] = "699,60,60"
    events.write_text("\n".join(rows) + "\n")
    summary = replay(replay_config(max_records=100, warmup_events=200), events,
                     tmp_path / "out.jsonl")
    assert summary.events_scored == 800
    ids = [json.loads(line)["event"]["id"]
           for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert 699 in ids
    assert "events.csv" in capsys.readouterr().err  # the progress bar went to stderr


def test_replay_refuses_to_overwrite_its_input(tmp_path):
    events = tmp_path / "events.jsonl"
    write_events(events, n=10)
    before = events.read_bytes()
    with pytest.raises(ValueError, match="is the input file"):
        replay(replay_config(), events, events, progress=False)
    assert events.read_bytes() == before


def test_main_prints_the_summary_or_the_problem(tmp_path, capsys):
    assert main(replay_config(), tmp_path / "missing.jsonl", tmp_path / "out.jsonl") == 1
    assert "does not exist" in capsys.readouterr().err
    events = tmp_path / "events.jsonl"
    write_events(events, n=600)
    assert main(replay_config(), events, tmp_path / "out.jsonl", progress=False) == 0
    assert "replayed" in capsys.readouterr().out
