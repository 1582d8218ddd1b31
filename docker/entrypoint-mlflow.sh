#!/usr/bin/env bash
# MLflow tracking server: SQLite run store and served artifacts, both on volumes. Everything comes
# from the environment, so the same script runs in the compose service and on a plain host.
#
#   MLFLOW_HOST                 bind address (default: this host's first IP, never 0.0.0.0)
#   MLFLOW_PORT                 port (default 5000)
#   MLFLOW_DB_DIR               folder of the SQLite store mlflow.db (default /mlflow/db)
#   MLFLOW_BACKEND_STORE_URI    run store (default sqlite:///$MLFLOW_DB_DIR/mlflow.db)
#   MLFLOW_ARTIFACTS_DESTINATION  folder (or URI) the server stores artifacts in (default /mlflow/artifacts)
#   MLFLOW_ALLOWED_HOSTS        Host headers accepted, comma-separated (default: MLflow's own,
#                               localhost and private IPs; add the service name, e.g. mlflow:5000)
#   MLFLOW_WORKERS              server worker processes (default 1: with SQLite, one process owns the database)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  false (default): no job-runner process, which tracking never uses
set -euo pipefail

export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

host="${MLFLOW_HOST:-$(hostname -i | awk '{print $1}')}"
db_dir="${MLFLOW_DB_DIR:-/mlflow/db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-/mlflow/artifacts}"
mkdir -p "$db_dir"
case "$artifacts" in *://*) ;; *) mkdir -p "$artifacts" ;; esac

args=(
  --host "$host"
  --port "${MLFLOW_PORT:-5000}"
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///$db_dir/mlflow.db}"
  --serve-artifacts
  --artifacts-destination "$artifacts"
  --workers "${MLFLOW_WORKERS:-1}"
)
[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ] && args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")

echo "entrypoint-mlflow: mlflow server ${args[*]}"
exec mlflow server "${args[@]}"
