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
    for answer in ("STREAMGMM_", "exactly-once", "read_committed", "--fresh", "exits 2"):
        assert answer in text, answer


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


def test_corrupt_checkpoint_is_refused_with_the_way_out(tmp_path):
    checkpoint = tmp_path / "ck.npz"
    checkpoint.write_bytes(b"garbage, not a state file")
    done = _streamgmm("run", env={"STREAMGMM_FEATURES__FIELDS": "a",
                                  "STREAMGMM_CHECKPOINT__PATH": str(checkpoint),
                                  "STREAMGMM_METRICS__ENABLED": "false",
                                  "STREAMGMM_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert done.returncode == 3
    assert "--fresh" in done.stderr and str(checkpoint) in done.stderr


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
