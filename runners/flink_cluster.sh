#!/usr/bin/env bash
# A local Flink 1.19 session cluster on 127.0.0.1 from the jars that
# runners/fetch_jars.sh fetched: one JobManager (REST at 127.0.0.1:8081) and
# one TaskManager with 2 slots, parallelism 2.
#
#   runners/flink_cluster.sh start    # waits until the TaskManager registered
#   runners/flink_cluster.sh status
#   runners/flink_cluster.sh stop
#   runners/flink_cluster.sh crash-taskmanager   # kill -9 it, start a new one
#
# FLINK_REST_PORT (default 8081), FLINK_SLOTS (default 2) and
# FLINK_TM_MEMORY (default 4096m) change the defaults; MLPIPE_RUN (default
# runners/.run) holds the configuration, logs and process ids.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JARS="${MLPIPE_JARS:-$ROOT/runners/.jars}"
STATE="${MLPIPE_RUN:-$ROOT/runners/.run}/flink"
PORT="${FLINK_REST_PORT:-8081}"
SLOTS="${FLINK_SLOTS:-2}"
CP="$JARS/flink/*"
# The TaskManager also gets Beam's runner (loaded parent-first, see the
# configuration): Beam's Flink runner shuts a job's Python workers down the
# moment no task holds them, and starts new ones for the next stage, unless
# its classes come from Flink's own classloader; only then does it keep
# them for --environment_cache_millis. Restarted mid-job, the workers
# imported TensorFlow again each time, and a closing worker failed a
# running bundle ("call is closed", "Channel closed prematurely").
TM_CP="$CP:$JARS/beam/*"
# What Flink's own launch scripts give a Java 17 JVM (its default
# env.java.default-opts.all): without them a streaming job's state failed
# with "InaccessibleObjectException: ... java.util does not opens java.util".
JAVA17_OPENS="--add-exports=java.base/sun.net.util=ALL-UNNAMED
--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED
--add-exports=java.security.jgss/sun.security.krb5=ALL-UNNAMED
--add-opens=java.base/java.lang=ALL-UNNAMED --add-opens=java.base/java.net=ALL-UNNAMED
--add-opens=java.base/java.io=ALL-UNNAMED --add-opens=java.base/java.nio=ALL-UNNAMED
--add-opens=java.base/sun.nio.ch=ALL-UNNAMED --add-opens=java.base/java.lang.reflect=ALL-UNNAMED
--add-opens=java.base/java.text=ALL-UNNAMED --add-opens=java.base/java.time=ALL-UNNAMED
--add-opens=java.base/java.util=ALL-UNNAMED --add-opens=java.base/java.util.concurrent=ALL-UNNAMED
--add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED
--add-opens=java.base/java.util.concurrent.locks=ALL-UNNAMED"

die() { echo "flink: $*" >&2; exit 2; }
running() { [[ -f "$STATE/$1.pid" ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }
in_use() {  # something accepts connections on 127.0.0.1:$1
  python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1).close()" "$1" 2>/dev/null
}
registered() {  # the TaskManagers the JobManager knows of
  python3 - "$PORT" <<'PY' 2>/dev/null
import json, sys, urllib.request
with urllib.request.urlopen(f'http://127.0.0.1:{sys.argv[1]}/overview', timeout=2) as r:
    print(json.load(r)['taskmanagers'])
PY
}

start() {
  [[ -f "$JARS/flink/.fetched" ]] || die "no Flink jars in $JARS/flink: run runners/fetch_jars.sh"
  if running jobmanager; then echo "flink: already running (REST at 127.0.0.1:$PORT)"; return; fi
  # A cluster this state folder does not know (a killed test run's, say)
  # would answer for the new one and never be stopped: refuse instead.
  if in_use "$PORT"; then
    die "port $PORT is in use (a cluster left by another run? stop it, e.g. kill the pids in its MLPIPE_RUN folder, or set FLINK_REST_PORT)"
  fi
  rm -rf "$STATE"; mkdir -p "$STATE/conf" "$STATE/tmp"
  cat > "$STATE/conf/flink-conf.yaml" <<CONF
jobmanager.rpc.address: 127.0.0.1
jobmanager.bind-host: 127.0.0.1
jobmanager.rpc.port: ${FLINK_RPC_PORT:-6123}
rest.address: 127.0.0.1
rest.bind-address: 127.0.0.1
rest.port: $PORT
blob.server.port: 0
taskmanager.host: 127.0.0.1
taskmanager.bind-host: 127.0.0.1
taskmanager.numberOfTaskSlots: $SLOTS
parallelism.default: 2
jobmanager.memory.process.size: 1024m
taskmanager.memory.process.size: ${FLINK_TM_MEMORY:-4096m}
# Each job loads Beam's runner classes again: at the default 256m the
# TaskManager died of OutOfMemoryError: Metaspace after about 4 jobs.
taskmanager.memory.jvm-metaspace.size: 1024m
# Beam's batch translation holds each group's values (a GroupByKey's
# list, every element a whole encoded RecordBatch) on the task heap, and
# Flink's sorts need each record (a TFDV statistics accumulator, a shard's
# batch) to fit one operator's share of the managed memory. With 3 GB and
# Flink's 40% managed the task heap was ~280 MB and a 1M-row scoring run
# died of "Java heap space" in the dedupe and history stages; with 3 GB
# and 10% managed (heap ~840 MB) a statistics combine failed with "Record
# too large" for its sort buffer. 4 GB and 30%: ~880 MB heap (after the
# task off-heap below), ~800 MB managed. (A size, not a use: the process takes what its jobs need.)
taskmanager.memory.managed.fraction: 0.3
# Beam's graphs have many shuffles: Flink's default network share is short.
taskmanager.memory.network.min: 512m
taskmanager.memory.network.max: 512m
# Each blocking (batch) partition takes this many buffers (Flink's default
# 512); a job with dozens of shuffles would run out with it.
taskmanager.network.sort-shuffle.min-buffers: 64
io.tmp.dirs: $STATE/tmp
# On a machine shared far beyond its cores (load 20 on 2 here) the
# TaskManager answered a task deployment after Flink's default 10 s and a
# batch job failed with AskTimeoutException.
pekko.ask.timeout: 60 s
web.submit.enable: false
# Beam's classes, and all they use (Joda-Time, ...), from the
# TaskManager's classpath (TM_CP), not from each job's jar: see TM_CP.
# (Only org.apache.beam. parent-first failed: a Joda Duration of the job's
# jar could not be assigned to a field of the parent's WindowingStrategy.)
classloader.resolve-order: parent-first
# Beam's gRPC (netty) then allocates its direct buffers against the
# TaskManager's direct memory limit, where Flink reserves none for tasks:
# a 1M-row run failed with "OutOfMemoryError: Direct buffer memory".
taskmanager.memory.task.off-heap.size: 256m
CONF
  # What Flink's own jobmanager.sh / taskmanager.sh do: BashJavaUtils turns
  # the memory settings into JVM flags and explicit -D settings.
  local utils tm_jvm tm_dyn jm_jvm jm_dyn
  utils=$(java -cp "$CP" org.apache.flink.runtime.util.bash.BashJavaUtils \
          GET_TM_RESOURCE_PARAMS --configDir "$STATE/conf" 2>"$STATE/utils.log" \
          | sed -n 's/^BASH_JAVA_UTILS_EXEC_RESULT://p') || true
  tm_jvm=$(sed -n 1p <<<"$utils"); tm_dyn=$(sed -n 2p <<<"$utils")
  utils=$(java -cp "$CP" org.apache.flink.runtime.util.bash.BashJavaUtils \
          GET_JM_RESOURCE_PARAMS --configDir "$STATE/conf" 2>>"$STATE/utils.log" \
          | sed -n 's/^BASH_JAVA_UTILS_EXEC_RESULT://p') || true
  jm_jvm=$(sed -n 1p <<<"$utils"); jm_dyn=$(sed -n 2p <<<"$utils")
  [[ -n "$tm_jvm" && -n "$jm_jvm" ]] || die "cannot size the JVMs (see $STATE/utils.log)"
  # shellcheck disable=SC2086  # word-split the flag lists on purpose
  nohup java $JAVA17_OPENS $jm_jvm -cp "$CP" \
      org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint \
      --configDir "$STATE/conf" $jm_dyn > "$STATE/jobmanager.log" 2>&1 &
  echo $! > "$STATE/jobmanager.pid"
  printf '%s\n%s\n' "$tm_jvm" "$tm_dyn" > "$STATE/taskmanager.flags"
  start_taskmanager
  for _ in $(seq 1 120); do
    if [[ "$(registered)" -ge 1 ]] 2>/dev/null; then
      echo "flink: session cluster up, REST at 127.0.0.1:$PORT ($SLOTS slots)"
      return
    fi
    running jobmanager || break
    running taskmanager || break
    sleep 0.5
  done
  stop >/dev/null
  die "the cluster did not come up; see $STATE/jobmanager.log and $STATE/taskmanager.log"
}

start_taskmanager() {  # with the flags start() worked out; appends to its log
  local tm_jvm tm_dyn
  tm_jvm=$(sed -n 1p "$STATE/taskmanager.flags"); tm_dyn=$(sed -n 2p "$STATE/taskmanager.flags")
  # shellcheck disable=SC2086
  nohup java $JAVA17_OPENS $tm_jvm -cp "$TM_CP" org.apache.flink.runtime.taskexecutor.TaskManagerRunner \
      --configDir "$STATE/conf" $tm_dyn >> "$STATE/taskmanager.log" 2>&1 &
  echo $! > "$STATE/taskmanager.pid"
}

# A crash, for fault tests: the TaskManager dies at once (SIGKILL) and a new
# one registers; jobs with checkpoints restart from their last one.
crash_taskmanager() {
  running jobmanager || die "not running"
  if running taskmanager; then kill -9 "$(cat "$STATE/taskmanager.pid")"; fi
  start_taskmanager
  echo "flink: TaskManager killed and started again"
}

stop() {
  local name pid
  for name in taskmanager jobmanager; do
    if running "$name"; then
      pid=$(cat "$STATE/$name.pid"); kill "$pid"
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/$name.pid"
  done
  echo "flink: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  crash-taskmanager) crash_taskmanager ;;
  status)
    if running jobmanager && [[ "$(registered)" -ge 1 ]] 2>/dev/null; then
      echo "flink: up, REST at 127.0.0.1:$PORT"
    else
      echo "flink: not running"; exit 1
    fi ;;
  *) echo "usage: $0 start|stop|status|crash-taskmanager" >&2; exit 2 ;;
esac
