#!/usr/bin/env bash
# The project's test command: unit tests, then end-to-end tests that run the real entry points
# (mlflow run, DeepSpeed ZeRO-3 on 2 CPU ranks, mlflow models serve, Spark) on tiny settings.
# Sets up first (scripts/setup_env.sh tests): ./.venv from requirements_dev.txt, created or
# brought up to date (an active virtual environment other than ./.venv is used as is), and a
# Java that Spark 4 can start on. Then: ./run_pytest.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
exports=$(bash scripts/setup_env.sh tests)
eval "$exports"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VIRTUAL_ENV/bin/python" -m pytest --timeout=900 "$@"
