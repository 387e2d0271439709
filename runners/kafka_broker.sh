#!/usr/bin/env bash
# A single-node Kafka 3.9 broker in KRaft mode (broker and controller in one
# process) on 127.0.0.1, from the jars that runners/fetch_jars.sh fetched.
#
#   runners/kafka_broker.sh start     # formats fresh storage, waits for it
#   runners/kafka_broker.sh status
#   runners/kafka_broker.sh stop      # stops it and deletes its data
#
# KAFKA_PORT (default 9092) and KAFKA_CONTROLLER_PORT (default 9093) change
# the ports; MLPIPE_RUN (default runners/.run) holds configuration, data,
# log and process id. Topics are created on first use (auto-create on).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JARS="${MLPIPE_JARS:-$ROOT/runners/.jars}"
STATE="${MLPIPE_RUN:-$ROOT/runners/.run}/kafka"
PORT="${KAFKA_PORT:-9092}"
CONTROLLER="${KAFKA_CONTROLLER_PORT:-9093}"
CP="$JARS/kafka/*"

die() { echo "kafka: $*" >&2; exit 2; }
running() { [[ -f "$STATE/broker.pid" ]] && kill -0 "$(cat "$STATE/broker.pid")" 2>/dev/null; }
answers() {  # the broker accepts connections on its port
  python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1).close()" "$PORT" 2>/dev/null
}

start() {
  [[ -f "$JARS/kafka/.fetched" ]] || die "no Kafka jars in $JARS/kafka: run runners/fetch_jars.sh"
  if running; then echo "kafka: already running at 127.0.0.1:$PORT"; return; fi
  # A broker this state folder does not know (a killed test run's, say)
  # would answer for the new one and never be stopped: refuse instead.
  if answers; then
    die "port $PORT is in use (a broker left by another run? stop it, e.g. kill the pid in its MLPIPE_RUN folder, or set KAFKA_PORT)"
  fi
  rm -rf "$STATE"; mkdir -p "$STATE/data"
  cat > "$STATE/server.properties" <<CONF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$STATE/data
num.partitions=2
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
# Records carry their event time (CreateTime), which for a replayed history
# is weeks old: time-based retention (default 7 days) would delete them as
# soon as they are written, and a reader would find the topic empty.
log.retention.ms=-1
log.retention.bytes=-1
CONF
  # --cluster-id=ID, not -t ID: a random base64url id may start with '-',
  # which the tool would read as an option (seen once in a test run).
  local java_opts=(-Xmx512m -Xms256m -XX:+UseG1GC -Djava.awt.headless=true)
  java "${java_opts[@]}" -cp "$CP" kafka.tools.StorageTool format \
      --cluster-id="$(python3 -c 'import base64,uuid; print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))')" \
      -c "$STATE/server.properties" > "$STATE/format.log" 2>&1 \
      || die "formatting the storage failed; see $STATE/format.log"
  nohup java "${java_opts[@]}" -cp "$CP" kafka.Kafka "$STATE/server.properties" \
      > "$STATE/broker.log" 2>&1 &
  echo $! > "$STATE/broker.pid"
  for _ in $(seq 1 120); do
    if answers && grep -q "Kafka Server started\|\[KafkaRaftServer nodeId=1\] Kafka Server started" "$STATE/broker.log"; then
      echo "kafka: broker up at 127.0.0.1:$PORT"
      return
    fi
    running || break
    sleep 0.5
  done
  stop >/dev/null
  die "the broker did not come up; see $STATE/broker.log"
}

stop() {
  if running; then
    local pid; pid=$(cat "$STATE/broker.pid"); kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -rf "$STATE"
  echo "kafka: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status)
    if running && answers; then echo "kafka: up at 127.0.0.1:$PORT"
    else echo "kafka: not running"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
