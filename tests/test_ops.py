"""Operations: the Docker image, the compose stack, the alert rules, the dashboard, the producer.

No Docker engine runs here, so the container files are parsed and cross-checked against each other
and against ``config/streamgmm.toml``; the alert rules are checked and unit-tested by ``promtool``
(and each unit test is shown able to fail); and the metric names the dashboard and the rules use
are compared with what the real daemon exports, scraped by a real Prometheus that also evaluates
the rules and every dashboard query.
"""

from __future__ import annotations

import doctest
import fnmatch
import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml  # PyYAML (dev extra): compose, Prometheus and Grafana files are YAML
from waiting import stop, wait_for

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
ALERTS_TEST = DOCKER / "prometheus" / "alerts_test.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "streamgmm.json"
GRAFANA_DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = DOCKER / "grafana" / "provisioning" / "dashboards" / "streamgmm.yml"
CONFIG = ROOT / "config" / "streamgmm.toml"
PRODUCER = ROOT / "scripts" / "produce_synthetic.py"
CONTRACTS = ROOT / "docs" / "contracts.md"

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (apt-get install prometheus)",
)
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the prometheus binary is not installed (apt-get install prometheus)",
)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _load_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _config() -> dict:
    return tomllib.loads(CONFIG.read_text(encoding="utf-8"))


def _compose() -> dict:
    return _load_yaml(COMPOSE)


def _metrics_port() -> int:
    return int(_config()["metrics"]["port"])


def _contract_metric_names() -> set[str]:
    """Metric names in the table of docs/contracts.md."""
    names = set(re.findall(r"^\| `(streamgmm_[a-z_]+)` \|", CONTRACTS.read_text(), re.MULTILINE))
    assert len(names) >= 20, "could not read the metric table of docs/contracts.md"
    return names


_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _metric_names_in(promql: str) -> set[str]:
    """Names of the streamgmm metric families a PromQL expression reads (plus ``up``)."""
    names = set()
    for name in re.findall(r"\b(streamgmm_[a-z_]+)", promql):
        for suffix in _HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.endswith("_seconds" + suffix):
                name = name[: -len(suffix)]
        names.add(name)
    if re.search(r"\bup\{", promql):
        names.add("up")
    return names


def _alert_rules() -> list[dict]:
    return [rule for group in _load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _dashboard_panels() -> list[dict]:
    panels = []
    for panel in _dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return panels


def _dashboard_queries() -> list[str]:
    return [t["expr"] for p in _dashboard_panels() for t in p.get("targets", [])]


def _dashboard_annotation_queries() -> list[str]:
    return [a["expr"] for a in _dashboard()["annotations"]["list"] if "expr" in a]


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 60, env=None
         ) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form instruction; fails for the shell form."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def _import_producer():
    spec = importlib.util.spec_from_file_location("produce_synthetic", PRODUCER)
    module = importlib.util.module_from_spec(spec)
    sys.modules["produce_synthetic"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module




# --------------------------------------------------------------------------------------------
# alert rules: promtool
# --------------------------------------------------------------------------------------------


@needs_promtool
def test_promtool_accepts_the_prometheus_config_and_its_rule_files():
    result = _run(["promtool", "check", "config", PROMETHEUS_CONFIG.name],
                  cwd=PROMETHEUS_CONFIG.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alerts.yml" in result.stdout


@needs_promtool
def test_promtool_accepts_the_alert_rules():
    result = _run(["promtool", "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_unit_tests_pass():
    result = _run(["promtool", "test", "rules", ALERTS_TEST.name], cwd=ALERTS_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested_firing_and_quiet():
    tests = _load_yaml(ALERTS_TEST)["tests"]
    firing, quiet = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in _alert_rules()}
    assert alerts - firing == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown staying quiet"
    assert (firing | quiet) - alerts == set(), "unit tests of alerts that do not exist"


def _promtool_test_with(tmp_path: Path, rules: dict) -> subprocess.CompletedProcess:
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    return _run(["promtool", "test", "rules", "alerts_test.yml"], cwd=tmp_path)


@needs_promtool
@pytest.mark.parametrize("alert", sorted(r["alert"] for r in _alert_rules()) if ALERTS.exists()
                         else [])
def test_alert_unit_tests_catch_an_alert_that_never_fires_or_always_fires(alert, tmp_path):
    """Mutants of each rule make ``promtool test rules`` fail: the tests are not vacuous."""
    original = _load_yaml(ALERTS)

    def mutant(expr: str) -> dict:
        rules = json.loads(json.dumps(original))
        for group in rules["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == alert:
                    rule["expr"] = expr
        return rules

    never = _promtool_test_with(tmp_path, mutant("vector(1) < 0"))
    assert never.returncode != 0, f"{alert}: a rule that never fires passes its unit tests"
    # Fires for every streamgmm instance, quiet look-alikes included.
    always = _promtool_test_with(
        tmp_path, mutant('group by (job, instance) ({job="streamgmm"}) or vector(1)'))
    assert always.returncode != 0, f"{alert}: a rule that always fires passes its unit tests"


def _github_anchors(markdown: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file (outside code fences): lower
    case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``, ``-1``, ``-2`` on repeats."""
    anchors: set[str] = set()
    fenced = False
    for line in markdown.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        anchor, repeat = slug, 0
        while anchor in anchors:
            repeat += 1
            anchor = f"{slug}-{repeat}"
        anchors.add(anchor)
    return anchors


def test_github_anchors_follow_githubs_slugs(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Alerts: what they mean\n```\n# not a heading\n```\n## `a_b` c\n## `a_b` c\n")
    assert _github_anchors(doc) == {"alerts-what-they-mean", "a_b-c", "a_b-c-1"}


def test_alert_rules_are_labelled_and_annotated_for_people():
    for rule in _alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        # The runbook link resolves: the file exists and has a heading of the alert's name.
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert (ROOT / path).is_file(), rule["annotations"]["runbook"]
        assert anchor == rule["alert"].lower(), rule["annotations"]["runbook"]
        assert anchor in _github_anchors(ROOT / path), rule["annotations"]["runbook"]


def test_alerts_cover_the_operational_situations():
    alerts = {rule["alert"]: rule["expr"] for rule in _alert_rules()}
    wanted = {
        "StreamgmmAnomalyRateAboveTarget": "streamgmm_anomaly_rate_target",
        "StreamgmmDriftDetected": "streamgmm_drift_detected_total",
        "StreamgmmDaemonDown": "up",
        "StreamgmmNotConsuming": "streamgmm_consumer_lag_events",
        "StreamgmmConsumerLagGrowing": "streamgmm_consumer_lag_events",
        "StreamgmmDeadLetters": "streamgmm_dead_letters_total",
        "StreamgmmCheckpointTooOld": "streamgmm_checkpoint_age_seconds",
        "StreamgmmCheckpointFailing": "streamgmm_checkpoint_failures_total",
        "StreamgmmPartitionsLost": "streamgmm_rebalances_total",
        "StreamgmmReplicaIdle": "streamgmm_partitions_owned",
    }
    for alert, metric in wanted.items():
        assert alert in alerts
        assert metric in _metric_names_in(alerts[alert]), (alert, metric)


def test_checkpoint_alert_allows_for_the_configured_interval():
    (expr,) = [r["expr"] for r in _alert_rules() if r["alert"] == "StreamgmmCheckpointTooOld"]
    limit = float(re.search(r">\s*([0-9.]+)", expr).group(1))
    assert limit >= 3 * _config()["checkpoint"]["interval_seconds"]
    # A state is written only after its partition learned something: the alert judges only a
    # replica that processes events (an idle one has nothing to write).
    assert {"streamgmm_events_total", "streamgmm_dead_letters_total"} <= _metric_names_in(expr)


def test_rules_and_dashboard_use_only_contract_metric_names():
    allowed = _contract_metric_names() | {"up"}
    used = set()
    for expr in [r["expr"] for r in _alert_rules()] + _dashboard_queries() + \
            _dashboard_annotation_queries():
        used |= _metric_names_in(expr)
    assert used - allowed == set()


# --------------------------------------------------------------------------------------------
# Prometheus scrape config and Grafana
# --------------------------------------------------------------------------------------------


def test_prometheus_scrapes_every_daemon_replica_on_the_configured_metrics_port():
    prometheus = _load_yaml(PROMETHEUS_CONFIG)
    assert prometheus["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "streamgmm"]
    (dns,) = job["dns_sd_configs"]
    assert dns["type"] == "A" and dns["port"] == _metrics_port()
    assert dns["names"] == ["streamgmm"]
    for daemon in _daemon_services().values():
        assert daemon["networks"]["default"]["aliases"] == dns["names"]
    # The rules find the daemons by this job name.
    assert all('job="streamgmm"' in r["expr"] for r in _alert_rules() if "up{" in r["expr"])


def test_dashboard_is_well_formed_and_uses_the_provisioned_datasource():
    dashboard = _dashboard()
    (datasource,) = _load_yaml(GRAFANA_DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    panels = _dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] == "streamgmm" and dashboard["schemaVersion"] >= 36
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"]
            assert target["expr"].strip(), panel["title"]
    variable = dashboard["templating"]["list"][0]
    assert variable["name"] == "instance" and variable["datasource"]["uid"] == datasource["uid"]


def test_dashboard_shows_what_operators_need():
    queries = _dashboard_queries()
    used = set().union(*map(_metric_names_in, queries))
    needed = {
        "throughput": {"streamgmm_events_total"},
        "anomaly rate vs target": {"streamgmm_anomaly_rate", "streamgmm_anomaly_rate_target",
                                   "streamgmm_anomalies_total"},
        "threshold and log-likelihood": {"streamgmm_threshold", "streamgmm_log_likelihood_mean",
                                         "streamgmm_log_likelihood_ewma",
                                         "streamgmm_log_likelihood_reference"},
        "drift": {"streamgmm_drift_kl_divergence", "streamgmm_drift_mean_displacement",
                  "streamgmm_drift_weight_entropy", "streamgmm_drift_detected_total"},
        "component weights": {"streamgmm_component_weight"},
        "lag": {"streamgmm_consumer_lag_events"},
        "dead letters": {"streamgmm_dead_letters_total"},
        "replicas and their partitions' states": {
            "streamgmm_partitions_owned", "streamgmm_rebalances_total",
            "streamgmm_merged_model_age_seconds", "streamgmm_merged_model_partitions",
            "streamgmm_state_restore_duration_seconds", "streamgmm_state_bytes",
            "streamgmm_checkpoint_age_seconds"},
    }
    for what, names in needed.items():
        assert names <= used, f"dashboard lacks {what}: {names - used}"
    assert any("sum by (reason)" in q and "streamgmm_dead_letters_total" in q for q in queries)
    assert any("component" in t["legendFormat"] for p in _dashboard_panels()
               for t in p.get("targets", []) if "streamgmm_component_weight" in t["expr"])


def test_grafana_provisioning_matches_the_compose_mounts():
    grafana = _compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2][::-1] for v in grafana["volumes"] if v.startswith("./"))
    (provider,) = _load_yaml(GRAFANA_DASHBOARDS)["providers"]
    dashboards_dir = provider["options"]["path"]
    assert (DOCKER / mounts[dashboards_dir]).resolve() == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
    for kind in ("datasources", "dashboards"):
        target = f"/etc/grafana/provisioning/{kind}"
        assert (DOCKER / mounts[target]).resolve() == GRAFANA_DATASOURCES.parents[1] / kind


# --------------------------------------------------------------------------------------------
# compose and Dockerfile
# --------------------------------------------------------------------------------------------


def _bind_mounts(service: dict) -> list[tuple[str, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def test_every_file_the_compose_stack_mounts_or_builds_from_exists():
    compose = _compose()
    named = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for source, _target in _bind_mounts(service):
            assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in named, f"{name} uses undeclared volume {source}"
        if "build" in service:
            context = (DOCKER / service["build"]["context"]).resolve()
            assert context == ROOT
            assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE


def test_compose_kafka_is_a_complete_single_node_kraft_broker():
    kafka = _compose()["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = {k: str(v) for k, v in kafka["environment"].items()}
    for key in ("KAFKA_NODE_ID", "KAFKA_PROCESS_ROLES", "KAFKA_LISTENERS",
                "KAFKA_ADVERTISED_LISTENERS", "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
                "KAFKA_INTER_BROKER_LISTENER_NAME", "KAFKA_CONTROLLER_LISTENER_NAMES",
                "KAFKA_CONTROLLER_QUORUM_VOTERS"):
        assert env.get(key), f"{key} missing: the image's defaults are dropped once any is set"
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert env[key] == "1", f"{key} must be 1 on a single node (exactly-once needs it)"
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    listeners = dict(item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
                     .split(","))
    assert set(listeners) == set(protocols)
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] not in advertised
    node, voter = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")
    assert node == env["KAFKA_NODE_ID"]
    assert voter.split(":")[1] == listeners[env["KAFKA_CONTROLLER_LISTENER_NAMES"]].split(":")[1]
    # The daemon and the producer bootstrap through the inter-broker listener's address.
    inter_broker = env["KAFKA_INTER_BROKER_LISTENER_NAME"]
    internal = advertised[inter_broker]
    assert internal == f"{kafka['hostname']}:{listeners[inter_broker].split(':')[1]}"
    daemon_env = _compose()["services"]["streamgmm"]["environment"]
    assert daemon_env["STREAMGMM_KAFKA__BOOTSTRAP_SERVERS"] == internal
    assert f"--bootstrap-servers={internal}" in _compose()["services"]["producer"]["command"]
    # The host listener is published on the same port.
    external = [a for name, a in advertised.items() if a.startswith("localhost:")]
    assert [f"{a.split(':')[1]}:{a.split(':')[1]}" for a in external] == kafka["ports"]


def test_compose_creates_the_configured_topics_before_the_daemon_starts():
    compose = _compose()
    config = _config()["kafka"]
    init = compose["services"]["kafka-init"]
    env = init["environment"]
    assert [env["INPUT_TOPIC"], env["OUTPUT_TOPIC"], env["DEAD_LETTER_TOPIC"]] == [
        config["input_topic"], config["output_topic"], config["dead_letter_topic"]]
    script = "\n".join(init["command"])
    for variable in ("INPUT_TOPIC", "OUTPUT_TOPIC", "DEAD_LETTER_TOPIC", "PARTITIONS"):
        assert f"$${{{variable}}}" in script, f"{variable} is not used by the topic creation"
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("streamgmm", "producer"):
        assert compose["services"][name]["depends_on"]["kafka-init"]["condition"] == \
            "service_completed_successfully"
    producer = compose["services"]["producer"]["command"]
    assert f"--topic={config['input_topic']}" in producer
    assert f"--fields={','.join(_config()['features']['fields'])}" in producer


def _daemon_services() -> dict[str, dict]:
    return {name: service for name, service in _compose()["services"].items()
            if service.get("command", [None])[0] == "run"}


@pytest.mark.parametrize("name", ["streamgmm", "streamgmm-2"])
def test_compose_daemon_runs_the_mounted_config_with_valid_overrides(name):
    from streamgmm.config import load_config

    daemon = _daemon_services()[name]
    command = daemon["command"]
    assert command[:2] == ["run", "--config"]
    mounts = dict((target, source) for source, target in _bind_mounts(daemon))
    assert (DOCKER / mounts[command[2]]).resolve() == CONFIG
    env = {k: str(v) for k, v in daemon["environment"].items()}
    assert all(k.startswith("STREAMGMM_") for k in env)
    config = load_config(CONFIG, env=env)  # raises ConfigError naming a bad override
    assert list(config.kafka.bootstrap_servers) == ["kafka:9092"]
    assert config.metrics.host == "0.0.0.0", "metrics must listen beyond the container"
    assert config.metrics.port == _metrics_port()
    assert daemon["expose"] == [str(_metrics_port())]
    # No disk: the partitions' states live in the state topic; the only mount is the config.
    assert config.checkpoint.path is None, "checkpoint.path is no longer used"
    assert [target for _, target in _bind_mounts(daemon)] == [command[2]]
    assert daemon["volumes"] == [f"../config/streamgmm.toml:{command[2]}:ro"]
    assert daemon["read_only"] is True, "a replica needs no disk"
    # A stable name of its own (the default, the host name, is a new container id each time).
    assert env.get("STREAMGMM_KAFKA__REPLICA_ID")
    assert config.kafka.effective_replica_id == env["STREAMGMM_KAFKA__REPLICA_ID"]
    # Graceful stop: SIGTERM reaches the daemon, with time to commit and write its states.
    assert "entrypoint" not in daemon, "keep the image's exec-form ENTRYPOINT"
    assert daemon["init"] is True
    assert int(daemon["stop_grace_period"].rstrip("s")) >= 10
    assert "container_name" not in daemon and "ports" not in daemon, "would prevent replicas"


def test_compose_daemon_replicas_can_share_the_input():
    from streamgmm.config import load_config

    daemons = _daemon_services()
    assert set(daemons) == {"streamgmm", "streamgmm-2"}
    assert "profiles" not in daemons["streamgmm"], "the first replica always runs"
    configs = [load_config(CONFIG, env={k: str(v) for k, v in d["environment"].items()})
               for d in daemons.values()]
    replica_ids = [c.kafka.effective_replica_id for c in configs]
    assert len(set(replica_ids)) == len(daemons), "replicas need names of their own"
    transactional_ids = [c.kafka.effective_transactional_id for c in configs]
    assert len(set(transactional_ids)) == len(daemons), "replicas would fence each other"
    assert all("STREAMGMM_KAFKA__TRANSACTIONAL_ID" not in d["environment"]
               for d in daemons.values()), "the replica id makes each transactional id"
    # They share the state topic, hence each other's partitions' states and the merged model.
    assert len({c.checkpoint.state_topic(c.kafka.group_id) for c in configs}) == 1
    assert not any(d.get("volumes", [])[1:] for d in daemons.values()), "no state on disk"
    assert set(_compose()["volumes"]) == {"kafka-data", "prometheus-data", "grafana-data"}
    assert all(d["networks"]["default"]["aliases"] == ["streamgmm"] for d in daemons.values())
    assert all("STREAMGMM_KAFKA__GROUP_ID" not in d["environment"] for d in daemons.values()), \
        "replicas share the consumer group of the config"
    partitions = int(_compose()["services"]["kafka-init"]["environment"]["PARTITIONS"])
    assert len(daemons) <= partitions, "a replica beyond the partition count idles"


def test_dockerfile_builds_a_slim_non_root_image_with_the_daemon_as_main_process():
    instructions = _dockerfile_instructions()
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(froms) >= 2 and froms[-1].endswith("AS runtime"), "multi-stage, runtime last"
    runtime = _final_stage(instructions)
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users, "the runtime stage must switch to an unprivileged user"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"} and int(user) >= 1000
    group_add = " ".join(args for keyword, args in runtime if keyword == "RUN")
    assert f"--uid {user}" in group_add
    # No compiler or pip cache in the final image: it only copies the built environment.
    assert not any(keyword == "RUN" and "pip install" in args for keyword, args in runtime)

    (entrypoint,) = [args for keyword, args in runtime if keyword == "ENTRYPOINT"]
    entry = _exec_form(entrypoint)
    assert Path(entry[0]).name not in {"sh", "bash", "dash", "ash", "tini"}, \
        "a shell in between would swallow SIGTERM"
    assert entry == ["streamgmm"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["streamgmm"] == "streamgmm.cli:main"
    (cmd,) = [args for keyword, args in runtime if keyword == "CMD"]
    assert _exec_form(cmd) == ["run", "--config", "/etc/streamgmm/streamgmm.toml"]
    stop = [args for keyword, args in runtime if keyword == "STOPSIGNAL"]
    assert stop in ([], ["SIGTERM"])

    (healthcheck,) = [args for keyword, args in runtime if keyword == "HEALTHCHECK"]
    options, _, probe = healthcheck.partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    probe_args = _exec_form(probe)
    # The probe reads the daemon's configuration, so it follows its [metrics] port.
    assert probe_args == ["streamgmm", "health", "--config", _exec_form(cmd)[2]]
    exposed = [args for keyword, args in runtime if keyword == "EXPOSE"]
    assert exposed == [str(_metrics_port())]
    # A replica needs no disk: no volume, no checkpoint path (it would only be warned about).
    assert not any(keyword == "VOLUME" for keyword, _ in runtime)
    assert not any(keyword == "ENV" and "CHECKPOINT" in args for keyword, args in runtime)


def test_the_healthcheck_probe_tells_a_live_metrics_endpoint_from_a_dead_one(tmp_path):
    """Run the HEALTHCHECK command against a real metrics endpoint on a port set as an operator
    would (STREAMGMM_METRICS__PORT), and against a port where nothing listens."""
    from streamgmm.embedded import free_port
    from streamgmm.metrics import Metrics

    (healthcheck,) = [a for k, a in _final_stage(_dockerfile_instructions()) if k == "HEALTHCHECK"]
    probe = _exec_form(healthcheck.partition(" CMD ")[2])
    assert probe[:2] == ["streamgmm", "health"]
    command = [sys.executable, "-m", "streamgmm.cli", "health", "--config", str(CONFIG)]
    metrics = Metrics()
    port = metrics.serve("127.0.0.1", 0)
    try:
        live = _run(command, timeout=30, env={**os.environ, "STREAMGMM_METRICS__PORT": str(port)})
        assert live.returncode == 0, live.stderr
    finally:
        metrics.close()
    nobody = {**os.environ, "STREAMGMM_METRICS__PORT": str(free_port())}
    dead = _run(command, timeout=30, env=nobody)
    assert dead.returncode == 1 and "does not answer" in dead.stderr


def _dockerignore_excludes(relative: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    patterns = [line.strip() for line in (DOCKER / "Dockerfile.dockerignore").read_text()
                .splitlines() if line.strip() and not line.startswith("#")]
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").replace("**/", "*").replace("/**", "/*")
        if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates):
            excluded = not negate
    return excluded


def test_every_file_the_image_copies_exists_and_reaches_the_build_context():
    copies = [args.split() for keyword, args in _dockerfile_instructions() if keyword == "COPY"]
    sources = [s for args in copies if not args[0].startswith("--from") for s in args[:-1]]
    assert "config/streamgmm.toml" in sources and "scripts/produce_synthetic.py" in sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file in the repository"
        sample = next(path.rglob("*.py")) if path.is_dir() else path
        assert not _dockerignore_excludes(str(sample.relative_to(ROOT))), \
            f"COPY {source}: excluded from the build context by Dockerfile.dockerignore"
    assert _dockerignore_excludes(".venv/bin/python")
    assert _dockerignore_excludes("tests/test_ops.py")
    assert _dockerignore_excludes("streamgmm/__pycache__/mixture.cpython-311.pyc")


def test_producer_service_runs_the_script_the_image_ships():
    producer = _compose()["services"]["producer"]
    script = producer["entrypoint"][1]
    copies = [args.split() for keyword, args in _dockerfile_instructions() if keyword == "COPY"]
    assert ["scripts/produce_synthetic.py", script] in copies
    assert producer["image"] == _compose()["services"]["streamgmm"]["image"]
    parsed = _import_producer().build_parser().parse_args(producer["command"])
    assert parsed.rate > 0 and parsed.drift and parsed.anomaly_rate > 0


# --------------------------------------------------------------------------------------------
# the synthetic producer
# --------------------------------------------------------------------------------------------


def test_producer_doctests_pass():
    module = _import_producer()
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8 and result.failed == 0


def test_producer_help_and_argument_errors():
    result = _run([sys.executable, str(PRODUCER), "--help"])
    assert result.returncode == 0
    for option in ("--bootstrap-servers", "--rate", "--fields", "--anomaly-rate", "--drift",
                   "--invalid-rate", "--output"):
        assert option in result.stdout
    bad = _run([sys.executable, str(PRODUCER), "--drift", "tomorrow:shift=3"])
    assert bad.returncode == 2 and "AT:KIND=AMOUNT" in bad.stderr
    bad = _run([sys.executable, str(PRODUCER), "--anomaly-rate", "1.5", "--output", "-"])
    assert bad.returncode == 2 and "anomaly_rate must be in [0, 1)" in bad.stderr


def test_generator_is_reproducible_and_injects_the_requested_anomalies():
    module = _import_producer()
    first = list(itertools.islice(module.synthetic_events(seed=7, clock=lambda: 0.0), 200))
    again = list(itertools.islice(module.synthetic_events(seed=7, clock=lambda: 0.0), 200))
    other = list(itertools.islice(module.synthetic_events(seed=8, clock=lambda: 0.0), 200))
    assert first == again and first != other
    events = list(itertools.islice(module.synthetic_events(anomaly_rate=0.02, seed=3), 20_000))
    flagged = [e for e in events if e["label"]["anomaly"]]
    assert 0.015 < len(flagged) / len(events) < 0.025
    # Anomalies are far from the normal data: compare distances to the normal centroid's spread.
    x = np.array([[e[f] for f in module.DEFAULT_FIELDS] for e in events])
    is_anomaly = np.array([e["label"]["anomaly"] for e in events])
    from sklearn.mixture import GaussianMixture

    normal = GaussianMixture(3, random_state=0).fit(x[~is_anomaly])
    assert np.median(normal.score_samples(x[is_anomaly])) < \
        np.quantile(normal.score_samples(x[~is_anomaly]), 0.001)


def test_generator_drift_schedule_moves_the_data():
    module = _import_producer()
    shift = module.parse_drift("5000:shift=4")
    events = list(itertools.islice(module.synthetic_events(["a", "b"], drift=[shift],
                                                           anomaly_rate=0.0, seed=5), 10_000))
    x = np.array([[e["a"], e["b"]] for e in events])
    moved = np.linalg.norm(x[5000:].mean(axis=0) - x[:5000].mean(axis=0))
    assert 3.5 < moved < 4.5
    assert {e["label"]["phase"] for e in events[:5000]} == {0}
    assert {e["label"]["phase"] for e in events[5000:]} == {1}
    ramp = module.parse_drift("1000-3000:scale=3")
    events = list(itertools.islice(module.synthetic_events(1, drift=[ramp], anomaly_rate=0.0,
                                                           n_clusters=1, seed=5), 4000))
    x = np.array([e["x0"] for e in events])
    assert 2.5 < x[3000:].std() / x[:1000].std() < 3.5


def test_generator_emits_each_kind_of_unscorable_message():
    from streamgmm.config import load_config
    from streamgmm.features import FeatureExtractor

    module = _import_producer()
    stream = module.synthetic_events(invalid_rate=0.2, seed=11)
    raw = [module.encode_event(e)[0] for e in itertools.islice(stream, 1000)]
    config = load_config(CONFIG, env={})
    fields = list(config.features.fields)
    extraction = FeatureExtractor(fields, missing=config.features.missing,
                                  max_event_bytes=config.features.max_event_bytes).extract(raw)
    reasons = {letter.reason for letter in extraction.dead_letters}
    assert reasons == {"invalid_json", "missing_field", "non_numeric", "non_finite",
                       "not_object"}
    assert 150 < len(extraction.dead_letters) < 250
    assert extraction.features.shape == (1000 - len(extraction.dead_letters), len(fields))



def test_pacing_follows_an_absolute_schedule():
    module = _import_producer()
    now = [0.0]
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    def clock():
        return now[0]

    out = []
    for i in module.paced(iter(range(101)), rate=50.0, sleep=sleep, clock=clock):
        out.append(i)
        if i == 10:
            now[0] += 1.0  # a slow moment: the next events are caught up without sleeping
    assert out == list(range(101))
    assert now[0] == pytest.approx(100 / 50.0)
    assert list(module.paced(iter([1, 2]), rate=0, sleep=sleep, clock=clock)) == [1, 2]


@pytest.mark.integration
def test_producer_writes_keyed_json_events_to_kafka(bootstrap):
    from conftest import read_topic, unique_name

    topic = unique_name("synthetic")
    started = time.monotonic()
    result = _run([sys.executable, str(PRODUCER), "--bootstrap-servers", bootstrap,
                   "--topic", topic, "--count", "300", "--rate", "1000", "--invalid-rate", "0.05",
                   "--seed", "4"], timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert f"produced 300 events to {topic}" in result.stderr
    assert elapsed >= 299 / 1000  # paced, not dumped
    messages = read_topic(bootstrap, topic, expect=300)
    assert len(messages) == 300
    objects = []
    for message in messages:
        try:
            objects.append((message.key(), json.loads(message.value())))
        except ValueError:
            continue
    keyed = [(k, v) for k, v in objects if isinstance(v, dict) and "source" in v]
    assert len(keyed) > 250 and all(k == v["source"].encode() for k, v in keyed)
    assert sorted(v["event_id"] for _, v in keyed) == sorted({v["event_id"] for _, v in keyed})


# --------------------------------------------------------------------------------------------
# the real daemon: exported names, and Prometheus evaluating the rules and the dashboard
# --------------------------------------------------------------------------------------------


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _exported_families(exposition: str) -> dict[str, list]:
    from prometheus_client.parser import text_string_to_metric_families

    return {family.name if family.type != "counter" else family.name + "_total": family.samples
            for family in text_string_to_metric_families(exposition)}


def _prometheus_query(base: str, promql: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.fixture
def running_daemon(bootstrap, tmp_path):
    """``streamgmm run`` with the shipped config, fed by the synthetic producer; yields its port."""
    from conftest import unique_name

    from streamgmm.embedded import free_port

    port = free_port()
    topic = unique_name("ops-events")
    env = dict(os.environ)
    env.update({
        "STREAMGMM_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "STREAMGMM_KAFKA__INPUT_TOPIC": topic,
        "STREAMGMM_KAFKA__OUTPUT_TOPIC": f"{topic}-anomalies",
        "STREAMGMM_KAFKA__DEAD_LETTER_TOPIC": f"{topic}-dlt",
        "STREAMGMM_KAFKA__GROUP_ID": unique_name("ops-group"),
        "STREAMGMM_KAFKA__TRANSACTIONAL_ID": unique_name("ops-tx"),
        "STREAMGMM_METRICS__HOST": "127.0.0.1",
        "STREAMGMM_METRICS__PORT": str(port),
        "STREAMGMM_CHECKPOINT__INTERVAL_SECONDS": "2",
        "STREAMGMM_THRESHOLD__WARMUP_EVENTS": "300",
        "STREAMGMM_MODEL__N_COMPONENTS": "3",
        "STREAMGMM_MODEL__RANDOM_STATE": "0",
    })
    producer = _run([sys.executable, str(PRODUCER), "--bootstrap-servers", bootstrap,
                     "--topic", topic, "--count", "3000", "--rate", "0", "--anomaly-rate", "0.01",
                     "--invalid-rate", "0.01", "--drift", "1500:shift=6", "--seed", "9"],
                    timeout=120)
    assert producer.returncode == 0, producer.stderr
    executable = Path(sys.executable).with_name("streamgmm")
    log = open(tmp_path / "daemon.log", "wb")  # closed in the finally below
    workdir = tmp_path / "replica"  # empty: a replica needs no disk
    workdir.mkdir()
    daemon = subprocess.Popen([str(executable), "run", "--config", str(CONFIG)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        def learned_everything():
            families = _exported_families(_scrape(port))
            events = families.get("streamgmm_events_total", [])
            return events and events[0].value >= 2900 and families

        try:
            families = wait_for(learned_everything, "the daemon to process the stream",
                                 timeout=120, processes=[("the daemon", daemon)])
        except AssertionError:
            log.flush()
            raise AssertionError((tmp_path / "daemon.log").read_text()[-3000:]) from None
        yield port, families, daemon
    finally:
        if daemon.poll() is None:
            stop(daemon, timeout=30)
        log.close()


@pytest.mark.integration
@needs_prometheus
def test_rules_and_dashboard_hold_on_the_real_daemon(running_daemon, tmp_path):
    port, families, daemon = running_daemon
    exported = set(families) | {"up"}

    # 1. Every name the rules and the dashboard use is one the daemon really exports.
    used = set()
    for expr in [r["expr"] for r in _alert_rules()] + _dashboard_queries() + \
            _dashboard_annotation_queries():
        used |= _metric_names_in(expr)
    assert used - exported == set(), "rules or dashboard use names the daemon does not export"
    assert _contract_metric_names() <= exported, "the daemon lacks contract metrics"

    # 2. A real Prometheus with the shipped config (a static target instead of Docker's DNS)
    #    scrapes the daemon, evaluates every rule without error, and answers every dashboard
    #    query with data.
    from streamgmm.embedded import free_port

    config = _load_yaml(PROMETHEUS_CONFIG)
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "streamgmm"]
    job.pop("dns_sd_configs")
    job["scrape_interval"] = "1s"
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    config["scrape_configs"] = [job]
    config["rule_files"] = [str(ALERTS)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    web_port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # closed in the finally below
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{web_port}"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{web_port}"
    watched = [("prometheus", prometheus), ("the daemon", daemon)]
    try:
        wait_for(lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200,
                  "Prometheus to be ready", timeout=60, processes=watched)

        def rules_evaluated():
            with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5) as response:
                groups = json.loads(response.read())["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            return len(rules) == len(_alert_rules()) and all(
                r.get("lastEvaluation", "").startswith("20") and r["health"] != "unknown"
                for r in rules) and rules

        rules = wait_for(rules_evaluated, "every rule to be evaluated", 60, watched)
        assert [r["name"] for r in rules if r["health"] != "ok" or r.get("lastError")] == []

        substitutions = {"$__rate_interval": "30s", "$instance": ".*"}
        queries = []
        for expr in _dashboard_queries():
            for variable, value in substitutions.items():
                expr = expr.replace(variable, value)
            queries.append(expr)

        def every_query_answers():
            return all(_prometheus_query(base, q) for q in queries)

        try:
            wait_for(every_query_answers, "every dashboard query to return data", 60, watched)
        except AssertionError:
            empty = [q for q in queries if not _prometheus_query(base, q)]
            raise AssertionError(f"dashboard queries without data: {empty}") from None
        assert _prometheus_query(base, 'up{job="streamgmm"}')[0]["value"][1] == "1"
        # The daemon is alive, connected and not warming up any more: those alerts are quiet.
        firing = {a["labels"]["alertname"] for a in
                  json.loads(urllib.request.urlopen(f"{base}/api/v1/alerts", timeout=5).read())
                  ["data"]["alerts"] if a["state"] == "firing"}
        assert not firing & {"StreamgmmDaemonDown", "StreamgmmDaemonAbsent",
                             "StreamgmmBrokerUnreachable", "StreamgmmNotConsuming"}

        # What `docker stop` does to the image's exec-form entrypoint: SIGTERM to the daemon.
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        stop(prometheus)
        log.close()


# --------------------------------------------------------------------------------------------
# the compose stack's Kafka settings, topic creation and daemon config, run on Apache Kafka
# --------------------------------------------------------------------------------------------


def _kafka_properties(environment: dict) -> dict[str, str]:
    """``server.properties`` the apache/kafka image makes of its ``KAFKA_*`` environment.

    The image's rule: drop ``KAFKA_``, lower-case, ``___`` → ``-``, ``__`` → ``_``, ``_`` → ``.``.

    >>> _kafka_properties({"KAFKA_NODE_ID": 1, "KAFKA_LOG__X___Y": "v", "CLUSTER_ID": "c"})
    {'node.id': '1', 'log_x-y': 'v'}
    """
    props = {}
    for key, value in environment.items():
        if not key.startswith("KAFKA_"):
            continue
        name = key[len("KAFKA_"):].lower()
        name = name.replace("___", "\0").replace("__", "\1").replace("_", ".")
        props[name.replace("\0", "-").replace("\1", "_")] = str(value)
    return props


def _remap_addresses(props: dict[str, str]) -> dict[str, int]:
    """Point every listener, advertised listener and voter at a free loopback port, in place.

    Returns the new port of each of the compose file's ports.
    """
    from streamgmm.embedded import free_port

    ports: dict[str, int] = {}

    def loopback(match):
        return f"127.0.0.1:{ports.setdefault(match.group(2), free_port())}"

    for key in ("listeners", "advertised.listeners", "controller.quorum.voters"):
        props[key] = re.sub(r"([\w.-]*):(\d+)", loopback, props[key])
    return ports


@pytest.mark.integration
def test_the_compose_kafka_settings_topic_creation_and_daemon_config_run_on_apache_kafka(
        tmp_path):
    """The compose stack without Docker: its broker settings, kafka-init and daemon, for real.

    The kafka service's environment becomes the broker's whole ``server.properties`` (ports
    remapped to loopback, ``log.dirs`` to a temporary folder) on the image's Kafka version;
    kafka-init's script runs with the same Kafka's ``kafka-topics.sh`` class; the daemon runs
    ``config/streamgmm.toml`` with the compose overrides, fed by the compose producer's command.
    """
    import confluent_kafka.admin
    from conftest import read_topic, start_broker
    from test_recovery import committed_total

    compose = _compose()
    kafka = compose["services"]["kafka"]
    version = kafka["image"].split(":", 1)[1]
    props = _kafka_properties(kafka["environment"])
    ports = _remap_addresses(props)
    props["log.dirs"] = str(tmp_path / "kafka" / "data")
    internal = dict(item.split("://") for item in props["advertised.listeners"].split(","))[
        props["inter.broker.listener.name"]]
    controller_port = int(props["controller.quorum.voters"].rsplit(":", 1)[1])
    broker = start_broker("apache", tmp_path / "kafka", port=int(internal.rsplit(":", 1)[1]),
                          controller_port=controller_port, version=version, base={},
                          properties=props, cluster_id=str(kafka["environment"]["CLUSTER_ID"]))
    try:
        assert set(ports) == {"9092", "9093", "9094"}
        # kafka-init: its own script, with this Kafka's TopicCommand as kafka-topics.sh
        tools = tmp_path / "bin"
        tools.mkdir()
        topics_sh = tools / "kafka-topics.sh"
        topics_sh.write_text("#!/bin/sh\nexec " + " ".join(
            f"'{part}'" for part in broker.java_command("org.apache.kafka.tools.TopicCommand"))
            + ' "$@"\n')
        topics_sh.chmod(0o755)
        init = compose["services"]["kafka-init"]
        script = (init["command"][0].replace("$$", "$").replace("/opt/kafka/bin/", f"{tools}/")
                  .replace("kafka:9092", internal))
        env = {**os.environ, **{k: str(v) for k, v in init["environment"].items()}}
        created = subprocess.run(["/bin/bash", "-ec", script], env=env, capture_output=True,
                                 text=True, timeout=180)
        assert created.returncode == 0, created.stdout + created.stderr
        config = _config()["kafka"]
        for topic in (config["input_topic"], config["output_topic"], config["dead_letter_topic"]):
            assert re.search(rf"Topic: {re.escape(topic)}\s.*PartitionCount: 3", created.stdout)

        # the producer service's command (bootstrap remapped), as fast as it goes, 3000 events
        command = [arg.replace("kafka:9092", internal) for arg in
                   compose["services"]["producer"]["command"] if not arg.startswith("--rate=")]
        produced = _run([sys.executable, str(PRODUCER), *command, "--rate=0", "--count=3000",
                         "--seed=5"], timeout=120)
        assert produced.returncode == 0, produced.stderr

        # the daemon: the mounted config with the compose overrides, bootstrap remapped
        from streamgmm.embedded import free_port

        port = free_port()
        daemon_env = {**os.environ,
                      **{k: str(v) for k, v in compose["services"]["streamgmm"]["environment"]
                         .items()},
                      "STREAMGMM_KAFKA__BOOTSTRAP_SERVERS": internal,
                      "STREAMGMM_METRICS__HOST": "127.0.0.1",
                      "STREAMGMM_METRICS__PORT": str(port)}
        with open(tmp_path / "daemon.log", "wb") as log:
            daemon = subprocess.Popen(
                [str(Path(sys.executable).with_name("streamgmm")), "run", "--config", str(CONFIG)],
                env=daemon_env, stdout=log, stderr=subprocess.STDOUT)
            try:
                def committed_everything():
                    try:
                        return committed_total(internal, config["group_id"],
                                               config["input_topic"], partitions=3) >= 3000
                    except confluent_kafka.KafkaException:  # the offsets topic is being made
                        return False

                wait_for(committed_everything, "the daemon to commit the whole stream", 120,
                         [("the daemon", daemon)])
                families = _exported_families(_scrape(port))
                assert stop(daemon, timeout=30) == 0
            finally:
                if daemon.poll() is None:
                    daemon.kill()
                    daemon.wait()
        counted = {name: int(sum(sample.value for sample in families[name])) for name in
                   ("streamgmm_events_total", "streamgmm_dead_letters_total",
                    "streamgmm_anomalies_total")}
        assert counted["streamgmm_anomalies_total"] > 0
        # Read until the counted records are in (then 0.5 s more, for duplicates): waiting
        # for a silence instead ended before the reader's first fetch under load (0 anomalies
        # read after 3 s of silence, in a full run of the suite).
        letters = read_topic(internal, config["dead_letter_topic"], timeout=60,
                             expect=counted["streamgmm_dead_letters_total"], idle=0.5)
        anomalies = read_topic(internal, config["output_topic"], timeout=60,
                               expect=counted["streamgmm_anomalies_total"], idle=0.5)
        assert counted["streamgmm_dead_letters_total"] == len(letters)
        assert counted["streamgmm_events_total"] + len(letters) == 3000
        assert counted["streamgmm_anomalies_total"] == len(anomalies)
        # no topic was auto-created (auto.create.topics.enable=false): only those three, the
        # state topic the daemon created (one partition, compacted) and Kafka's own
        admin = confluent_kafka.admin.AdminClient({"bootstrap.servers": internal})
        topics = admin.list_topics(timeout=10).topics
        state_topic = f"{config['group_id']}-state"
        assert {n for n in topics if not n.startswith("__")} == {
            config["input_topic"], config["output_topic"], config["dead_letter_topic"],
            state_topic}
        assert len(topics[state_topic].partitions) == 1
        resource = confluent_kafka.admin.ConfigResource("topic", state_topic)
        (described,) = admin.describe_configs([resource]).values()
        assert described.result(timeout=10)["cleanup.policy"].value == "compact"
    finally:
        broker.cleanup()
