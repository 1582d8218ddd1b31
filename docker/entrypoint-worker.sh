#!/usr/bin/env bash
# Ray worker node joining the head at RAY_HEAD_ADDRESS. Everything comes from the environment, so
# the same script runs in the compose services and on a plain host (with `ray` on PATH).
#
#   RAY_AUTH_TOKEN            required: the cluster's shared secret (the head's)
#   RAY_AUTH_MODE             token (default)
#   RAY_HEAD_ADDRESS          the head's GCS, host:port (default head:6379)
#   RAY_NODE_IP               address this node advertises (default: this host's first IP); Ray's gRPC
#                             servers still listen on all interfaces, and it replaces 127.0.0.1 with
#                             the host's address
#   RAY_HEAD_WAIT_S           seconds to wait for the head's GCS to answer (default 120)
#   RAY_NUM_CPUS, RAY_NUM_GPUS, RAY_RESOURCES (JSON), RAY_OBJECT_STORE_MEMORY (bytes),
#   RAY_TEMP_DIR, RAY_DASHBOARD_AGENT_LISTEN_PORT: optional; unset lets Ray decide (the temp dir:
#                             the head's), set RAY_TEMP_DIR when several nodes share one host
#   SHARED_DIR                the shared volume's mount point (default /mnt/shared): Ray does not start
#                             unless it is a writable folder. po_ray does not read it: pass
#                             run.storage_path=$SHARED_DIR/... (Train/Tune storage every node reaches)
set -euo pipefail

: "${RAY_AUTH_TOKEN:?set RAY_AUTH_TOKEN to the cluster secret, the same as on the head}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_AUTH_TOKEN
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"

node_ip="${RAY_NODE_IP:-$(hostname -i | awk '{print $1}')}"
head="${RAY_HEAD_ADDRESS:-head:6379}"
storage="${SHARED_DIR:-/mnt/shared}"
mkdir -p "$storage" && [ -w "$storage" ] || {
  echo "entrypoint-worker: SHARED_DIR=$storage is not a writable folder; mount the shared volume there" >&2
  exit 1
}

# Poll the head with a deadline: the worker may start before the head's GCS listens.
deadline=$(( SECONDS + ${RAY_HEAD_WAIT_S:-120} ))
until ray health-check --address "$head" >/dev/null 2>&1; do
  if (( SECONDS >= deadline )); then
    echo "entrypoint-worker: no Ray head answered at $head within ${RAY_HEAD_WAIT_S:-120} s (check RAY_HEAD_ADDRESS and RAY_AUTH_TOKEN)" >&2
    exit 1
  fi
  sleep 2
done

args=(
  --address="$head"
  --node-ip-address="$node_ip"
)
[ -n "${RAY_NUM_CPUS:-}" ] && args+=(--num-cpus="$RAY_NUM_CPUS")
[ -n "${RAY_NUM_GPUS:-}" ] && args+=(--num-gpus="$RAY_NUM_GPUS")
[ -n "${RAY_RESOURCES:-}" ] && args+=(--resources="$RAY_RESOURCES")
[ -n "${RAY_OBJECT_STORE_MEMORY:-}" ] && args+=(--object-store-memory="$RAY_OBJECT_STORE_MEMORY")
[ -n "${RAY_TEMP_DIR:-}" ] && args+=(--temp-dir="$RAY_TEMP_DIR")
[ -n "${RAY_DASHBOARD_AGENT_LISTEN_PORT:-}" ] && args+=(--dashboard-agent-listen-port="$RAY_DASHBOARD_AGENT_LISTEN_PORT")

echo "entrypoint-worker: ray start ${args[*]} (shared $storage)"
exec ray start "${args[@]}" --block
