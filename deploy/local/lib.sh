# Shared by start.sh and stop.sh: stopping the services in the right order.
#
# Flow runs first, while the server is still up: each gets SIGTERM, which
# Prefect records as the run crashing (its items resume from their
# checkpoints on the next run), and SIGKILL after DIFFCOLOR_STOP_GRACE
# seconds. Then the workers, then the server.

: "${DIFFCOLOR_STOP_GRACE:=30}"   # seconds a stopped flow run gets to record its state

_alive() { kill -0 "$1" 2>/dev/null; }

_wait_gone() {  # _wait_gone SECONDS PID...: true when every PID has exited in time
  local deadline=$((SECONDS + $1)) pid alive; shift
  while :; do
    alive=0
    for pid in "$@"; do _alive "$pid" && alive=1; done
    [ "$alive" = 0 ] && return 0
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 1
  done
}

stop_worker() {  # stop_worker PID: its flow runs (each in a session of its own), then the worker
  local pid="$1" runs run
  _alive "$pid" || return 0
  runs="$(pgrep -P "$pid" || true)"
  if [ -n "$runs" ]; then
    echo "stopping the flow runs of worker $pid: $(echo $runs)" >&2
    for run in $runs; do kill -TERM -- "-$run" 2>/dev/null || kill -TERM "$run" 2>/dev/null || true; done
    # shellcheck disable=SC2086
    _wait_gone "$DIFFCOLOR_STOP_GRACE" $runs || for run in $runs; do kill -KILL -- "-$run" 2>/dev/null || true; done
    sleep 5   # the worker sees its runs exit and records them as crashed
  fi
  kill -TERM "$pid" 2>/dev/null || true
  _wait_gone 30 "$pid" || kill -KILL "$pid" 2>/dev/null || true
}

stop_server() {  # stop_server PID
  local pid="$1"
  _alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  _wait_gone 30 "$pid" || kill -KILL "$pid" 2>/dev/null || true
}
