# Shared set-up for scripts/test and scripts/demo: a virtual environment in .venv with streamgmm
# installed (editable, with extras). Idempotent and quiet when everything is already there.
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
# Prometheus (Debian package) for the integration test that scrapes the daemon; optional elsewhere.
if ! command -v prometheus >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  echo "== installing prometheus (Debian package)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
    || echo "warning: could not install prometheus; its integration tests will be skipped"
fi
export PY
