# Shared set-up for scripts/test and scripts/demo: a virtual environment in .venv with streamgmm
# installed (editable, with extras). Idempotent and quiet when everything is already there.
# With NEED_PROMETHEUS=1 (scripts/test) it also installs Debian's prometheus/promtool for the
# integration tests, and resolves the jars of the Apache Kafka test broker (Java and Maven,
# Maven Central; streamgmm/apache_kafka.py); under CI=true a failed install stops the run
# instead of skipping tests.
VENV=${STREAMGMM_VENV:-.venv}
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "== creating virtual environment in $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.streamgmm-installed"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  echo "== installing streamgmm and its development extras"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
if [[ "${NEED_PROMETHEUS:-0}" == 1 ]] && ! command -v promtool >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "== installing prometheus and promtool (Debian package)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
      || echo "warning: could not install prometheus"
  fi
  if ! command -v promtool >/dev/null 2>&1; then
    if [[ "${CI:-}" == true ]]; then
      echo "error: prometheus/promtool are required in CI and could not be installed" >&2
      exit 1
    fi
    echo "warning: no prometheus/promtool: their tests will be skipped (apt-get install prometheus)"
  fi
fi
if [[ "${NEED_PROMETHEUS:-0}" == 1 ]]; then
  if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
      echo "== installing Java and Maven (Debian packages) for the Apache Kafka test broker"
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        openjdk-17-jre-headless maven >/dev/null) || echo "warning: could not install Java/Maven"
    fi
  fi
  # The tests' broker (the POM's version) and the compose stack's (its apache/kafka image tag).
  compose_kafka=$(sed -n 's|^ *image: apache/kafka:||p' docker/compose.yml | head -1)
  if ! jars=$("$PY" -m streamgmm.apache_kafka resolve "" $compose_kafka); then
    if [[ "${CI:-}" == true ]]; then
      echo "error: the Apache Kafka test broker is required in CI and its jars could not be resolved" >&2
      exit 1
    fi
    echo "warning: no Apache Kafka jars: its tests will be skipped (needs java, mvn, Maven Central)"
  else
    echo "== Apache Kafka jars in $jars"
  fi
fi
export PY
