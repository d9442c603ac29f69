"""The ``streamgmm`` command as users meet it: help, configuration errors, the broker command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from streamgmm.cli import EXIT_CONFIG, main
from streamgmm.embedded import free_port
from streamgmm.io.base import broker_reachable


def _streamgmm(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "streamgmm.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_help_answers_the_first_questions(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("demo", "run", "replay", "broker"):
        assert f"streamgmm {command}" in text
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for answer in ("STREAMGMM_", "exactly-once", "read_committed", "exits 2", "state topic",
                   "exit 3", "new group_id", "replica_id", "need no disk"):
        assert answer in text, answer
    assert "--fresh" not in text and "checkpoint.path" not in text


def test_invalid_config_exits_2_naming_the_key_before_connecting(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[features]\nfields = ["a"]\n[threshold]\nfalse_alarm_rate = 2.0\n'
                      '[kafka]\nbootstrap_servers = ["127.0.0.1:1"]\n')
    started = time.monotonic()
    done = _streamgmm("run", "--config", str(config))
    assert done.returncode == EXIT_CONFIG
    assert "threshold.false_alarm_rate" in done.stderr
    assert time.monotonic() - started < 20  # no connection attempt to the dead address


def test_invalid_environment_override_exits_2(tmp_path):
    done = _streamgmm("run", env={"STREAMGMM_FEATURES__FIELDS": "a",
                                  "STREAMGMM_BATCH__MAX_RECORDS": "lots"})
    assert done.returncode == EXIT_CONFIG
    assert "batch.max_records" in done.stderr and "STREAMGMM_BATCH__MAX_RECORDS" in done.stderr


def test_run_fresh_is_gone(tmp_path):
    """Starting fresh is a new group_id or a deleted state topic now, not a flag."""
    done = _streamgmm("run", "--fresh", env={"STREAMGMM_FEATURES__FIELDS": "a"})
    assert done.returncode == EXIT_CONFIG
    assert "unrecognized arguments: --fresh" in done.stderr


def test_a_checkpoint_path_is_warned_about_and_never_touched(tmp_path):
    """An old configuration that still sets checkpoint.path starts (no broker here: it retries),
    says the path is no longer used, leaves the file alone and stops cleanly on SIGTERM."""
    checkpoint = tmp_path / "ck.npz"
    checkpoint.write_bytes(b"garbage, not a state file")
    env = {**os.environ, "STREAMGMM_FEATURES__FIELDS": "a",
           "STREAMGMM_CHECKPOINT__PATH": str(checkpoint), "STREAMGMM_METRICS__ENABLED": "false",
           "STREAMGMM_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streamgmm.cli", "run"], cwd=tmp_path,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while b"no longer used" not in log_path.read_bytes():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert str(checkpoint) in text and "state topic" in text and "Traceback" not in text
    assert checkpoint.read_bytes() == b"garbage, not a state file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz", "daemon.log"]


@pytest.mark.integration
def test_a_state_topic_made_for_other_features_exits_3_with_the_way_out(bootstrap):
    import numpy as np
    from conftest import produce, unique_name

    from streamgmm.detector import Detector
    from streamgmm.io.base import TopicPartition
    from streamgmm.io.kafka import ensure_topics
    from streamgmm.partition_state import PartitionState, encode_state, state_key

    topic, group = unique_name("in"), unique_name("g")
    tp = TopicPartition(topic, 0)
    detector = Detector(n_components=1, warmup_events=50, random_state=0)
    detector.process(np.random.default_rng(0).normal(size=(100, 1)))
    ensure_topics(bootstrap, [f"{group}-state"], partitions=1)
    produce(bootstrap, f"{group}-state",
            [encode_state(PartitionState(tp, detector, 100, 100), fields=["a"])],
            keys=[state_key(tp)])
    started = time.monotonic()
    done = _streamgmm("run", env={"STREAMGMM_FEATURES__FIELDS": "b", "STREAMGMM_KAFKA__GROUP_ID":
                                  group, "STREAMGMM_KAFKA__INPUT_TOPIC": topic,
                                  "STREAMGMM_METRICS__ENABLED": "false",
                                  "STREAMGMM_KAFKA__BOOTSTRAP_SERVERS": bootstrap})
    assert done.returncode == 3, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "unusable state topic" in done.stderr
    assert "made for features ['a']" in done.stderr and "['b']" in done.stderr
    assert "another group_id" in done.stderr and "delete the state topic" in done.stderr
    assert time.monotonic() - started < 45, "refused before joining the group"


def test_print_config_shows_the_effective_configuration():
    done = _streamgmm("run", "--print-config", env={"STREAMGMM_FEATURES__FIELDS": "a,b.c"})
    assert done.returncode == 0
    assert '"b.c"' in done.stdout and "[kafka]" in done.stdout


@pytest.mark.integration
def test_broker_command_serves_until_sigterm():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamgmm.cli", "broker", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in line
        assert broker_reachable(f"127.0.0.1:{port}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        deadline = time.monotonic() + 5
        while broker_reachable(f"127.0.0.1:{port}", timeout=0.2):
            assert time.monotonic() < deadline, "the broker outlived the command"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
