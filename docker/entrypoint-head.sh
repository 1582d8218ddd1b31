#!/usr/bin/env bash
# Ray head node: GCS, dashboard and job server. Everything comes from the environment, so the same
# script runs in the compose service and on a plain host (with `ray` on PATH).
#
#   RAY_AUTH_TOKEN            required: the cluster's shared secret (every node and client uses it)
#   RAY_AUTH_MODE             token (default); Ray refuses unauthenticated GCS/dashboard calls
#   RAY_NODE_IP               address this node advertises (default: this host's first IP); Ray's gRPC
#                             servers still listen on all interfaces, and it replaces 127.0.0.1 with
#                             the host's address
#   RAY_GCS_PORT              GCS port (default 6379)
#   RAY_DASHBOARD_HOST        dashboard + job server bind address (default: RAY_NODE_IP, never 0.0.0.0)
#   RAY_DASHBOARD_PORT        dashboard + job server port (default 8265)
#   RAY_CLIENT_SERVER_PORT    Ray client port (default 10001)
#   RAY_NUM_CPUS, RAY_NUM_GPUS, RAY_RESOURCES (JSON), RAY_OBJECT_STORE_MEMORY (bytes),
#   RAY_TEMP_DIR, RAY_DASHBOARD_AGENT_LISTEN_PORT: optional; unset lets Ray decide
#   SHARED_DIR                the shared volume's mount point (default /mnt/shared): Ray does not start
#                             unless it is a writable folder. po_ray does not read it: pass
#                             run.storage_path=$SHARED_DIR/... (Train/Tune storage every node reaches)
set -euo pipefail

: "${RAY_AUTH_TOKEN:?set RAY_AUTH_TOKEN to the cluster secret (e.g. openssl rand -hex 32), the same on every node}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_AUTH_TOKEN
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"

node_ip="${RAY_NODE_IP:-$(hostname -i | awk '{print $1}')}"
storage="${SHARED_DIR:-/mnt/shared}"
mkdir -p "$storage" && [ -w "$storage" ] || {
  echo "entrypoint-head: SHARED_DIR=$storage is not a writable folder; mount the shared volume there" >&2
  exit 1
}

args=(
  --head
  --node-ip-address="$node_ip"
  --port="${RAY_GCS_PORT:-6379}"
  --dashboard-host="${RAY_DASHBOARD_HOST:-$node_ip}"
  --dashboard-port="${RAY_DASHBOARD_PORT:-8265}"
  --ray-client-server-port="${RAY_CLIENT_SERVER_PORT:-10001}"
)
[ -n "${RAY_NUM_CPUS:-}" ] && args+=(--num-cpus="$RAY_NUM_CPUS")
[ -n "${RAY_NUM_GPUS:-}" ] && args+=(--num-gpus="$RAY_NUM_GPUS")
[ -n "${RAY_RESOURCES:-}" ] && args+=(--resources="$RAY_RESOURCES")
[ -n "${RAY_OBJECT_STORE_MEMORY:-}" ] && args+=(--object-store-memory="$RAY_OBJECT_STORE_MEMORY")
[ -n "${RAY_TEMP_DIR:-}" ] && args+=(--temp-dir="$RAY_TEMP_DIR")
[ -n "${RAY_DASHBOARD_AGENT_LISTEN_PORT:-}" ] && args+=(--dashboard-agent-listen-port="$RAY_DASHBOARD_AGENT_LISTEN_PORT")

echo "entrypoint-head: ray start ${args[*]} (shared $storage)"
# exec: ray is PID 1 (or the caller's child), so SIGTERM/SIGINT stop it directly.
exec ray start "${args[@]}" --block
