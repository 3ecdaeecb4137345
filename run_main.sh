#!/usr/bin/env bash
# Sets up (scripts/setup_env.sh main: ./.venv from requirements.txt, and a Java for Spark when
# one can be had), then runs the project with the venv's MLflow: by default the offline `main`
# pipeline (data_prep -> train -> evaluate -> register on the tiny profile).
#   ./run_main.sh                  # the default pipeline
#   ./run_main.sh -P seed=7        # any `mlflow run` arguments are passed on
#   ./run_main.sh -e config        # another entry point (MLproject lists them)
set -euo pipefail
cd "$(dirname "$0")"
exports=$(bash scripts/setup_env.sh main)
eval "$exports"
exec "$VIRTUAL_ENV/bin/mlflow" run . --env-manager local "$@"
