#!/usr/bin/env bash
# Stops what `deploy/local/start.sh` started in the background, from the pid
# files under $DIFFCOLOR_HOME/run: the workers' flow runs, the workers, the
# warm-pool service, then the server (see lib.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ENV_FILE="${DIFFCOLOR_ENV_FILE:-$ROOT/deploy/.env}"
if [ -z "${DIFFCOLOR_HOME:-}" ] && [ -f "$ENV_FILE" ]; then
  DIFFCOLOR_HOME="$(sed -n 's/^DIFFCOLOR_HOME=//p' "$ENV_FILE" | tail -n 1)"
fi
: "${DIFFCOLOR_HOME:=$HOME/.local/state/diffcolor}"
PIDS="$DIFFCOLOR_HOME/run"

# shellcheck source=deploy/local/lib.sh
. "$ROOT/deploy/local/lib.sh"
shopt -s nullglob
for file in "$PIDS"/worker-*.pid "$PIDS"/warm.pid "$PIDS"/server.pid; do
  name="$(basename "$file" .pid)"
  pid="$(cat "$file")"
  if _alive "$pid" && ps -o args= -p "$pid" | grep -q 'prefect\|flows\.warm'; then   # not a recycled pid
    echo "stopping $name (pid $pid)"
    case "$name" in server|warm) stop_server "$pid" ;; *) stop_worker "$pid" ;; esac
  fi
  rm -f "$file"
done
