#!/usr/bin/env bash
# One machine, nothing else installed: a local Prefect server (SQLite), the
# `diffcolor` process work pool with its `reprocess` and `nightly` queues, the
# deployments of deploy/prefect.yaml, the warm-pool service (reprocess runs'
# models kept loaded between runs) and process worker(s).
#
#   deploy/local/start.sh                # start in the background, then return
#   deploy/local/start.sh --foreground   # stay attached; Ctrl-C / SIGTERM stops all (systemd)
#   deploy/local/stop.sh                 # stop what a background start left running
#
# Settings come from the environment, then from deploy/.env (DIFFCOLOR_ENV_FILE
# names another file); a variable already set in the environment wins. See
# deploy/.env.example and deploy/README.md for each one.
set -euo pipefail

FOREGROUND=0
case "${1:-}" in
  --foreground) FOREGROUND=1 ;;
  "") ;;
  *) echo "usage: $0 [--foreground]" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# 1. Settings: environment first, then the env file, then defaults.
ENV_FILE="${DIFFCOLOR_ENV_FILE:-$ROOT/deploy/.env}"
if [ -f "$ENV_FILE" ]; then
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in ''|'#'*) continue ;; esac
    key="${line%%=*}"
    value="${line#*=}"
    [[ "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || { echo "$ENV_FILE: cannot read line: $line" >&2; exit 2; }
    [ -n "${!key+x}" ] || export "$key=$value"
  done < "$ENV_FILE"
fi
: "${DIFFCOLOR_HOME:=$HOME/.local/state/diffcolor}"   # server database, logs, pid files
: "${DIFFCOLOR_HOST:=127.0.0.1}"                     # 0.0.0.0 to reach the UI from other machines
: "${DIFFCOLOR_PORT:=4200}"
: "${DIFFCOLOR_WORKERS:=1}"                          # worker processes; each starts one device pool per flow run
: "${DIFFCOLOR_WORKER_LIMIT:=2}"                     # flow runs at once per worker (a nightly and a reprocess)
: "${DIFFCOLOR_PRESET:=default}"
: "${DIFFCOLOR_WARM_IDLE_SECONDS:=600}"             # reprocess models kept loaded this long unused (0: no service)
: "${DIFFCOLOR_WARM_MODELS:=2}"                      # models (with their device settings) kept loaded at most
: "${DIFFCOLOR_VENV:=$ROOT/.venv}"
for required in DIFFCOLOR_MANIFEST DIFFCOLOR_OUTPUT DIFFCOLOR_MODEL; do
  if [ -z "${!required:-}" ]; then
    echo "start.sh: $required is not set (in the environment or in $ENV_FILE; see deploy/.env.example)" >&2
    exit 2
  fi
done

export DIFFCOLOR_MANIFEST DIFFCOLOR_OUTPUT DIFFCOLOR_MODEL DIFFCOLOR_PRESET
export DIFFCOLOR_PROJECT_DIR="$ROOT"                 # where flow runs load the code (prefect.yaml's pull step)
export PREFECT_HOME="$DIFFCOLOR_HOME/prefect"         # SQLite database: $PREFECT_HOME/prefect.db
export PREFECT_API_URL="http://127.0.0.1:$DIFFCOLOR_PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false        # archives run air-gapped: no telemetry
export DO_NOT_TRACK=1                                # nor the Prefect client's usage events
export PREFECT_CLI_PROMPT=false
mkdir -p "$DIFFCOLOR_HOME/logs" "$DIFFCOLOR_HOME/run" "$PREFECT_HOME"
LOGS="$DIFFCOLOR_HOME/logs"
PIDS="$DIFFCOLOR_HOME/run"

# 2. The Python environment (`make install` creates it on first use).
if [ ! -x "$DIFFCOLOR_VENV/bin/prefect" ]; then
  echo "== creating the Python environment ($DIFFCOLOR_VENV) =="
  make -C "$ROOT" install VENV="$DIFFCOLOR_VENV"
fi
PREFECT="$DIFFCOLOR_VENV/bin/prefect"
export PATH="$DIFFCOLOR_VENV/bin:$PATH"

# shellcheck source=deploy/local/lib.sh
. "$ROOT/deploy/local/lib.sh"
server_pid=""   # set only when this script started the server
worker_pids=()
warm_pid=""     # the warm-pool service, when started
stop_started() {  # workers first, then the warm pools, then the server (see lib.sh)
  trap - TERM INT EXIT
  for pid in "${worker_pids[@]}"; do stop_worker "$pid"; done
  [ -z "$warm_pid" ] || stop_server "$warm_pid"
  [ -z "$server_pid" ] || stop_server "$server_pid"
}
if [ "$FOREGROUND" = 1 ]; then
  trap 'stop_started; exit 0' TERM INT
  trap stop_started EXIT
else
  trap '[ "${ready:-0}" = 1 ] || stop_started' EXIT   # a failed start leaves nothing behind
fi
launch() {  # launch NAME COMMAND...: in a session of its own (a terminal's Ctrl-C reaches only this
            # script, which stops the services in order), logging to $LOGS/NAME.log
  local name="$1"; shift
  # A script's background commands start with SIGINT ignored, which would make
  # Prefect's graceful stop (SIGTERM -> SIGINT to itself) a no-op: restore it.
  nohup setsid "$DIFFCOLOR_VENV/bin/python" -c \
    'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])' \
    "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  launched="$!"
  echo "$launched" >"$PIDS/$name.pid"
}

# 3. The server, unless one already answers on this port.
healthy() { "$DIFFCOLOR_VENV/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
              "$PREFECT_API_URL/health" >/dev/null 2>&1; }
if healthy; then
  echo "== Prefect server already running at $PREFECT_API_URL =="
else
  echo "== starting the Prefect server on $DIFFCOLOR_HOST:$DIFFCOLOR_PORT (log: $LOGS/server.log) =="
  launch server "$PREFECT" server start --host "$DIFFCOLOR_HOST" --port "$DIFFCOLOR_PORT"
  server_pid="$launched"
  for _ in $(seq 1 180); do
    healthy && break
    kill -0 "$server_pid" 2>/dev/null || { echo "the server exited; see $LOGS/server.log" >&2; exit 1; }
    sleep 1
  done
  healthy || { echo "the server did not answer in 180 s; see $LOGS/server.log" >&2; exit 1; }
fi

# 4. The work pool, its queues and the deployments (nightly schedule, reprocess).
if ! bash "$ROOT/deploy/register.sh" >"$LOGS/register.log" 2>&1; then
  cat "$LOGS/register.log" >&2
  exit 1
fi
echo "== registered deploy/prefect.yaml (log: $LOGS/register.log) =="

# 5. The warm-pool service: the reprocess runs' device pools, kept between runs (a flow run is a fresh
#    process; this service is not), so that a recolour finds its model loaded. The workers' flow runs
#    find it through DIFFCOLOR_WARM_POOL.
if [ "$DIFFCOLOR_WARM_IDLE_SECONDS" != 0 ]; then
  export DIFFCOLOR_WARM_POOL="$PIDS/warm.sock"
  echo "== starting the warm-pool service on $DIFFCOLOR_WARM_POOL (log: $LOGS/warm.log) =="
  launch warm env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$DIFFCOLOR_VENV/bin/python" -m flows.warm serve \
    --socket "$DIFFCOLOR_WARM_POOL" --idle-seconds "$DIFFCOLOR_WARM_IDLE_SECONDS" --max-pools "$DIFFCOLOR_WARM_MODELS"
  warm_pid="$launched"
  for _ in $(seq 1 120); do
    [ -e "$DIFFCOLOR_WARM_POOL.key" ] && break
    kill -0 "$warm_pid" 2>/dev/null || { cat "$LOGS/warm.log" >&2; echo "the warm-pool service exited" >&2; exit 1; }
    sleep 0.5
  done
  [ -e "$DIFFCOLOR_WARM_POOL.key" ] || { echo "the warm-pool service did not start in 60 s; see $LOGS/warm.log" >&2; exit 1; }
else
  unset DIFFCOLOR_WARM_POOL
fi

# 6. The worker(s): they run each flow run as a subprocess of this machine.
for i in $(seq 1 "$DIFFCOLOR_WORKERS"); do
  launch "worker-$i" "$PREFECT" worker start --pool diffcolor --name "diffcolor-$(hostname)-$i" \
    --limit "$DIFFCOLOR_WORKER_LIMIT"
  worker_pids+=("$launched")
done
ready=1
echo "ready: UI and API at http://$DIFFCOLOR_HOST:$DIFFCOLOR_PORT, logs in $LOGS"

if [ "$FOREGROUND" = 0 ]; then
  echo "running in the background: stop with deploy/local/stop.sh"
  exit 0
fi
# Foreground: stay until a signal (the traps stop everything in order) or until a service dies.
wait -n "${worker_pids[@]}" ${warm_pid:+"$warm_pid"} ${server_pid:+"$server_pid"} || true
echo "a DiffColor service process exited; stopping the others (logs in $LOGS)" >&2
exit 1
