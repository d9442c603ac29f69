"""Configuration: the shipped file, environment overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses
import inspect
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest

from streamgmm.config import (
    Config,
    ConfigError,
    FeaturesConfig,
    KafkaConfig,
    ThresholdConfig,
    load_config,
)

SHIPPED = Path(__file__).resolve().parents[1] / "config" / "streamgmm.toml"
KAFKA_PYTHON = '[kafka]\nbackend = "kafka-python"\n'
ISSUE_KEYS = {
    "kafka": ["bootstrap_servers", "input_topic", "output_topic", "dead_letter_topic", "group_id",
              "auto_offset_reset", "delivery", "transactional_id", "security_protocol",
              "sasl_mechanism", "sasl_plain_username", "sasl_plain_password", "ssl_cafile",
              "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_check_hostname"],
    "batch": ["max_records", "max_wait_ms"],
    "features": ["fields", "missing", "max_event_bytes"],
    "model": ["n_components", "covariance_type", "reg_covar", "forgetting"],
    "threshold": ["false_alarm_rate", "warmup_events", "fixed"],
    "metrics": ["host", "port"],
    "checkpoint": ["topic", "interval_seconds", "path"],
}


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def error_of(*args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return info.value


def test_the_shipped_file_loads_and_mentions_every_key():
    config = load_config(SHIPPED, env={})
    assert config.features.fields == ("latency_ms", "bytes", "cpu")
    assert config.kafka.delivery == "exactly-once"
    text = SHIPPED.read_text()
    for section, keys in ISSUE_KEYS.items():
        assert f"[{section}]" in text
        for key in keys:
            assert re.search(rf"^#? ?{key}\b", text, re.M), f"{section}.{key} not documented"
            assert hasattr(getattr(config, section), key)


def test_defaults_and_types(tmp_path):
    config = load_config(write(tmp_path, '[features]\nfields = ["x"]\n'), env={})
    assert config.kafka.bootstrap_servers == ("localhost:9092",)
    assert config.batch.max_records == 5000 and isinstance(config.batch.max_records, int)
    assert config.model.n_components == "auto"
    assert config.threshold.fixed is None
    assert config.checkpoint.interval_seconds == 10.0
    assert config.checkpoint.state_topic(config.kafka.group_id) == "streamgmm-state"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch.max_records = 5


def test_environment_overrides_are_parsed_to_the_keys_type(tmp_path):
    path = write(tmp_path, '[features]\nfields = ["x"]\n[batch]\nmax_records = 10\n')
    env = {
        "STREAMGMM_BATCH__MAX_RECORDS": "2_000",
        "STREAMGMM_KAFKA__BOOTSTRAP_SERVERS": "k1:9092, k2:9092",
        "STREAMGMM_FEATURES__FIELDS": '["p", "q.r"]',
        "STREAMGMM_MODEL__N_COMPONENTS": "4",
        "STREAMGMM_MODEL__PROTECT": "no",
        "STREAMGMM_MODEL__RANDOM_STATE": "7",
        "STREAMGMM_THRESHOLD__FIXED": "12.5",
        "streamgmm_metrics__port": "0",  # ignored: the prefix is case-sensitive
        "STREAMGMM_metrics__PORT": "9999",  # the section and key are not
        "STREAMGMM_LOG_LEVEL": "debug",  # no "__": not a config override
        "OTHER__THING": "x",
    }
    config = load_config(path, env=env)
    assert config.batch.max_records == 2000
    assert config.kafka.bootstrap_servers == ("k1:9092", "k2:9092")
    assert config.features.fields == ("p", "q.r")
    assert config.model.n_components == 4
    assert config.model.protect is False
    assert config.model.random_state == 7
    assert config.threshold.fixed == 12.5
    assert config.metrics.port == 9999


def test_environment_can_unset_an_optional_key(tmp_path):
    path = write(tmp_path, '[features]\nfields = ["x"]\n[threshold]\nfixed = 3.0\n')
    assert load_config(path, env={"STREAMGMM_THRESHOLD__FIXED": "none"}).threshold.fixed is None


def test_without_a_file_the_environment_is_enough():
    config = load_config(env={"STREAMGMM_FEATURES__FIELDS": "a"})
    assert config.features.fields == ("a",)


def test_the_issue_example_message(tmp_path):
    path = write(tmp_path, '[features]\nfields = ["x"]\n[threshold]\nfalse_alarm_rate = 2.0\n')
    err = error_of(path, env={})
    assert err.key == "threshold.false_alarm_rate"
    assert str(err).startswith(
        f"threshold.false_alarm_rate: must be between 0 and 0.5, got 2.0 (from {path})")
    assert "e.g. 0.001" in str(err)


@pytest.mark.parametrize(
    ("toml", "env", "key", "fragment"),
    [
        ("[batch]\nmax_records = 0", {}, "batch.max_records", "must be between 1 and 1e+06, got 0"),
        ('[batch]\nmax_records = "many"', {}, "batch.max_records",
         'expected an integer, got "many" (a string)'),
        ("[batch]\nmax_wait_ms = true", {}, "batch.max_wait_ms",
         "expected an integer, got true (a boolean)"),
        ("", {"STREAMGMM_BATCH__MAX_WAIT_MS": "soon"}, "batch.max_wait_ms",
         "(from environment variable STREAMGMM_BATCH__MAX_WAIT_MS)"),
        ("[batch]\nmax_recods = 5", {}, "batch.max_recods", 'did you mean "max_records"?'),
        ("[bacth]\nmax_records = 5", {}, "bacth", 'did you mean "batch"?'),
        ("", {"STREAMGMM_BATCH__MAXRECORDS": "5"}, "batch.maxrecords",
         "unknown key (from environment variable STREAMGMM_BATCH__MAXRECORDS)"),
        ("", {"STREAMGMM_NOPE__X": "5"}, "nope", "unknown key"),
        ('[kafka]\ndelivery = "exactly_once"', {}, "kafka.delivery",
         'did you mean "exactly-once"?'),
        ('[kafka]\nauto_offset_reset = "smallest"', {}, "kafka.auto_offset_reset",
         'must be one of "earliest", "latest"'),
        ('[kafka]\noutput_topic = "events"', {}, "kafka.input_topic", "is also an output topic"),
        ('[kafka]\nsecurity_protocol = "SASL_SSL"', {}, "kafka.sasl_mechanism", "is required"),
        ('[kafka]\nsasl_mechanism = "PLAIN"', {}, "kafka.security_protocol",
         'use "SASL_SSL"'),
        ("[kafka]\nbootstrap_servers = []", {}, "kafka.bootstrap_servers", "must not be empty"),
        (KAFKA_PYTHON + '[kafka.client]\ngroup_id = "x"', {}, "kafka.client.group_id",
         "managed by streamgmm"),
        (KAFKA_PYTHON + "[kafka.consumer]\nsession_timeout = 1", {},
         "kafka.consumer.session_timeout",
         'did you mean "session_timeout_ms"?'),
        (KAFKA_PYTHON + "[kafka.client]\nsession_timeout_ms = 1", {},
         "kafka.client.session_timeout_ms",
         "is not a kafka-python client setting"),
        (KAFKA_PYTHON + '[kafka.client]\nsecurity_protocol = "SSL"', {},
         "kafka.client.security_protocol",
         "set kafka.security_protocol instead"),
        (KAFKA_PYTHON + "[kafka.producer]\nacks = 1", {}, "kafka.producer.acks",
         "managed by streamgmm"),
        (KAFKA_PYTHON + "[kafka.producer]\nssl_context = 1", {}, "kafka.producer.ssl_context",
         "Python object"),
        ("", {"STREAMGMM_KAFKA__CONSUMER__SESSION_TIMEOUT_MS": "six",
              "STREAMGMM_KAFKA__BACKEND": "kafka-python"},
         "kafka.consumer.session_timeout_ms", "expected an integer"),
        ("[kafka.consumer]\nsession_timeout_ms = 6000", {},
         "kafka.consumer.session_timeout_ms",
         "is a kafka-python setting"),
        ("[kafka.librdkafka]\nfetch_wait_max_msec = 5", {},
         "kafka.librdkafka.fetch_wait_max_msec",
         'No such configuration property: "fetch.wait.max.msec"'),
        ('[kafka.librdkafka]\n"isolation.level" = "read_uncommitted"', {},
         "kafka.librdkafka.isolation.level", "managed by streamgmm"),
        ('[kafka.librdkafka]\n"sasl.password" = "pw"', {}, "kafka.librdkafka.sasl.password",
         "set kafka.security_protocol, kafka.sasl_* or kafka.ssl_* instead"),
        (KAFKA_PYTHON + "[kafka.librdkafka]\nlinger_ms = 5", {},
         "kafka.librdkafka.linger_ms", 'applies to kafka.backend = "confluent-kafka" only'),
        ('[kafka]\nbackend = "rdkafka"', {}, "kafka.backend", 'must be one of'),
        ('[features]\nfields = []', {}, "features.fields", "at least one numeric JSON field"),
        ('[features]\nfields = ["a", "a"]', {}, "features.fields", '"a" is listed twice'),
        ('[features]\nfields = ["a..b"]', {}, "features.fields", "not a dotted path"),
        ('[features]\nfields = [1]', {}, "features.fields", "expected a list of strings"),
        ('[features]\nfields = ["a"]\nmissing = "drop"', {}, "features.missing",
         '"dead-letter", "marginalize"'),
        ('[model]\nn_components = "many"', {}, "model.n_components", 'or "auto"'),
        ("[model]\nn_components = 0", {}, "model.n_components", "between 1 and 1000"),
        ("[model]\nn_components = 12", {}, "model.n_components", "more than model.max_components"),
        ('[model]\ncovariance_type = "ful"', {}, "model.covariance_type", 'did you mean "full"'),
        ("[model]\nreg_covar = -1.0", {}, "model.reg_covar", "between 0 and"),
        ("[model]\nforgetting = 1.0", {}, "model.forgetting", "forgetting must be in [0, 1)"),
        ("[model]\nadoption_persistence = 0", {}, "model.adoption_persistence", "between 1"),
        ("[threshold]\nwarmup_events = 1", {}, "threshold.warmup_events", "between 2 and"),
        ("[model]\nstep_exponent = 0.5", {}, "model.step_exponent", "between 0.5 and 1"),
        ("[model]\nreg_covar = nan", {}, "model.reg_covar", "expected a finite number"),
        ("[threshold]\nfalse_alarm_rate = 0", {}, "threshold.false_alarm_rate", "between 0 and"),
        ("[metrics]\nport = 70000", {}, "metrics.port", "TCP port between 0 and 65535"),
        ("[checkpoint]\ninterval_seconds = 0", {}, "checkpoint.interval_seconds", "between 0.01"),
        ("batch = 3", {}, "batch", "expected a [batch] table"),
    ],
)
def test_mistakes_name_the_key_and_the_problem(tmp_path, toml, env, key, fragment):
    if "[features]" not in toml:
        toml += '\n[features]\nfields = ["x"]\n'
    err = error_of(write(tmp_path, toml), env=env)
    assert err.key == key
    assert str(err).startswith(f"{key}: ")
    assert fragment in str(err)


def test_missing_fields_says_what_to_do():
    err = error_of(env={})
    assert err.key == "features.fields"
    assert "(not set)" in str(err) and "fields = [" in str(err)


def test_file_problems(tmp_path):
    assert "does not exist" in str(error_of(tmp_path / "nope.toml", env={}))
    assert "is not valid TOML" in str(error_of(write(tmp_path, "[batch\n"), env={}))


def test_kafka_client_kwargs_are_valid_kafka_python_arguments(tmp_path):
    from kafka import KafkaConsumer, KafkaProducer

    toml = """
[features]
fields = ["x"]
[kafka]
backend = "kafka-python"
security_protocol = "SASL_SSL"
sasl_mechanism = "SCRAM-SHA-512"
sasl_plain_username = "svc"
ssl_cafile = "/etc/ca.pem"
[kafka.client]
client_id = "gmm"
request_timeout_ms = 40000
[kafka.consumer]
session_timeout_ms = 6000
[kafka.producer]
linger_ms = 5
"""
    env = {"STREAMGMM_KAFKA__SASL_PLAIN_PASSWORD": "pw",
           "STREAMGMM_KAFKA__PRODUCER__COMPRESSION_TYPE": "gzip",
           "STREAMGMM_KAFKA__CONSUMER__CHECK_CRCS": "false"}
    kafka = load_config(write(tmp_path, toml), env=env).kafka
    from streamgmm.io.kafka import KafkaPythonBackend

    backend = KafkaPythonBackend(kafka)
    consumer, producer = backend.consumer_options(), backend.producer_options()
    assert set(consumer) <= set(KafkaConsumer.DEFAULT_CONFIG)
    assert set(producer) <= set(KafkaProducer.DEFAULT_CONFIG)
    assert consumer["sasl_plain_password"] == producer["sasl_plain_password"] == "pw"
    assert consumer["session_timeout_ms"] == 6000 and "session_timeout_ms" not in producer
    assert consumer["check_crcs"] is False
    assert producer["linger_ms"] == 5 and producer["compression_type"] == "gzip"
    assert consumer["client_id"] == producer["client_id"] == "gmm"
    assert backend.bootstrap == "localhost:9092"
    assert kafka.effective_transactional_id == f"streamgmm-events-{kafka.effective_replica_id}"


def test_effective_config_round_trips_through_toml(tmp_path):
    toml = SHIPPED.read_text() + ""
    env = {"STREAMGMM_KAFKA__SASL_PLAIN_PASSWORD": "hunter2",
           "STREAMGMM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
           "STREAMGMM_KAFKA__SASL_MECHANISM": "PLAIN",
           "STREAMGMM_KAFKA__LIBRDKAFKA__SESSION_TIMEOUT_MS": "6000",
           "STREAMGMM_MODEL__FORGETTING": "0.01", "STREAMGMM_THRESHOLD__FIXED": "20",
           "STREAMGMM_MODEL__RANDOM_STATE": "3"}
    config = load_config(write(tmp_path, toml), env=env)
    redacted = config.to_toml()
    assert "hunter2" not in redacted and 'sasl_plain_password = "***"' in redacted
    tomllib.loads(redacted)
    again = load_config(write(tmp_path, config.to_toml(redact=False)), env={})
    assert again == config


def test_detector_kwargs_build_a_real_detector():
    from streamgmm.detector import Detector

    config = Config(features=FeaturesConfig(fields=["a", "b"]),
                    threshold=ThresholdConfig(false_alarm_rate=0.02, warmup_events=50, fixed=9.0))
    kwargs = config.detector_kwargs()
    assert kwargs["feature_names"] == ["a", "b"]
    assert kwargs["fixed_threshold"] == 9.0
    assert "random_state" not in kwargs
    detector = Detector(**kwargs)
    assert detector.false_alarm_rate == 0.02
    assert detector.forgetting == config.model.forgetting
    result = detector.process(np.random.default_rng(0).normal(size=(60, 2)))
    assert result.score.shape == (60,)


def test_config_defaults_are_the_library_defaults():
    """The defaults shown by --print-config are those the detector and engine would use."""
    from streamgmm.detector import Detector
    from streamgmm.mixture import OnlineGaussianMixture

    kwargs = Config(features=FeaturesConfig(fields=["a"])).detector_kwargs()
    defaults = {name: p.default for cls in (OnlineGaussianMixture, Detector)
                for name, p in inspect.signature(cls).parameters.items()
                if p.default is not p.empty}
    for name, value in kwargs.items():
        if name in ("feature_names", "n_components"):  # no default / the detector's is used
            continue
        assert value == defaults[name], name
    assert kwargs["n_components"] == inspect.signature(Detector).parameters["n_components"].default


def test_sections_validate_when_built_in_code():
    with pytest.raises(ConfigError, match=r"^kafka\.delivery: must be one of"):
        KafkaConfig(delivery="sometimes")
    assert KafkaConfig(bootstrap_servers="a:1,b:2").bootstrap_servers == ("a:1", "b:2")


def test_adoption_persistence_reaches_the_detector(tmp_path):
    from streamgmm.detector import Detector

    base = '[features]\nfields = ["x"]\n'
    default = load_config(write(tmp_path, base), env={})
    assert "adoption_persistence" not in default.detector_kwargs()
    config = load_config(write(tmp_path, base + "[model]\nadoption_persistence = 250\n"), env={})
    detector = Detector(**config.detector_kwargs())
    assert detector.get_params()["adoption_persistence"] == 250
