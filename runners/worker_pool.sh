#!/usr/bin/env bash
# A pool of Python SDK worker processes on 127.0.0.1 for Flink's EXTERNAL
# environment (runners/worker_pool.py): each worker a job asks for is its
# own process, so --sdk_worker_parallelism 2 runs the Python stages on two
# cores. Start it beside the session cluster (runners/flink_cluster.sh).
#
#   runners/worker_pool.sh start    # waits until it answers
#   runners/worker_pool.sh status
#   runners/worker_pool.sh stop     # stops it and every worker it started
#
# WORKER_POOL_PORT (default 50000) changes the port; PYTHON (default
# python3) is the workers' interpreter (a venv with this project's
# dependencies); MLPIPE_RUN (default runners/.run) holds the log and pid.
# Jobs then take: --environment_type EXTERNAL
#   --environment_config 127.0.0.1:$WORKER_POOL_PORT --sdk_worker_parallelism 2
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${MLPIPE_RUN:-$ROOT/runners/.run}/worker_pool"
PORT="${WORKER_POOL_PORT:-50000}"
PY="${PYTHON:-python3}"

die() { echo "worker pool: $*" >&2; exit 2; }
running() { [[ -f "$STATE/pool.pid" ]] && kill -0 "$(cat "$STATE/pool.pid")" 2>/dev/null; }
answers() {
  python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1).close()" "$PORT" 2>/dev/null
}

start() {
  if running; then echo "worker pool: already running at 127.0.0.1:$PORT"; return; fi
  if answers; then
    die "port $PORT is in use (a pool left by another run? kill the pid in its MLPIPE_RUN folder, or set WORKER_POOL_PORT)"
  fi
  rm -rf "$STATE"; mkdir -p "$STATE"
  # The workers import this project: its root first on their path.
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" nohup "$PY" -m runners.worker_pool \
      --port "$PORT" --log_dir "$STATE" > "$STATE/pool.log" 2>&1 &
  echo $! > "$STATE/pool.pid"
  for _ in $(seq 1 60); do
    if answers; then echo "worker pool: up at 127.0.0.1:$PORT"; return; fi
    running || break
    sleep 0.25
  done
  stop >/dev/null
  die "the pool did not come up; see $STATE/pool.log"
}

stop() {
  if running; then
    local pid; pid=$(cat "$STATE/pool.pid"); kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$STATE/pool.pid"
  echo "worker pool: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status)
    if running && answers; then echo "worker pool: up at 127.0.0.1:$PORT"
    else echo "worker pool: not running"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
