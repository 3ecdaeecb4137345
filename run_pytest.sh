#!/usr/bin/env bash
# The project's test command: unit tests, then end-to-end tests that run the real entry points
# (mlflow run, DeepSpeed ZeRO-3 on 2 CPU ranks, mlflow models serve, Spark) on tiny settings.
# Uses the active Python, or ./.venv when none is active.
set -euo pipefail
cd "$(dirname "$0")"
PY=python
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" -m pytest --timeout=900 "$@"
