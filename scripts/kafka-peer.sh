#!/usr/bin/env bash
# Installs (once) and starts or stops tansu, a Kafka-compatible broker, on loopback.
#
#   scripts/kafka-peer.sh install                  build tansu into $HOME/.cache/millrace-tools (skip if present)
#   scripts/kafka-peer.sh start DIR [PORT] [TOPIC...]
#                                                  start a broker with its sqlite store and pid file in DIR,
#                                                  on PORT (default: a free one), create TOPICs (NAME or
#                                                  NAME:PARTITIONS; default: the three millrace topics, 1
#                                                  partition each); prints the port
#   scripts/kafka-peer.sh stop DIR                 stop the broker started with DIR (the store is kept,
#                                                  so `start DIR PORT` brings the same data back)
#
# Environment: MILLRACE_TOOLS (default $HOME/.cache/millrace-tools); KAFKA_PEER_SCRAM_USER=NAME:PASSWORD
# makes `start` create that SCRAM-SHA-512 user (and the topics) on a first, open start, then run
# the broker with client authentication required (SASL_PLAINTEXT).
set -euo pipefail

TOOLS="${MILLRACE_TOOLS:-$HOME/.cache/millrace-tools}"
TANSU="$TOOLS/bin/tansu"
DEFAULT_TOPICS=(millrace.windows millrace.alerts millrace.dead-letters)

die() { echo "kafka-peer: $*" >&2; exit 1; }

install_tansu() {
  if [[ -x "$TANSU" ]]; then
    return 0
  fi
  echo "kafka-peer: building tansu 0.6.0 into $TOOLS (this takes a while)" >&2
  cargo install tansu --version 0.6.0 --locked --features dynostore,libsql --root "$TOOLS" >&2 \
    || die "cargo install tansu failed"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

port_open() {
  python3 - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.settimeout(0.5)
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
}

run_broker() {
  local dir="$1" port="$2"
  shift 2
  # tansu reads `sqlite://NAME` relative to its working directory.
  (cd "$dir" && exec nohup "$TANSU" broker "$@" \
    --cluster-id millrace-test \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "sqlite://tansu.db" \
    >>"$dir/tansu.log" 2>&1) &
  echo $! >"$dir/tansu.pid"
  for _ in $(seq 1 100); do
    if port_open "$port"; then
      break
    fi
    kill -0 "$(cat "$dir/tansu.pid")" 2>/dev/null || die "tansu exited; see $dir/tansu.log"
    sleep 0.1
  done
  port_open "$port" || die "tansu did not listen on 127.0.0.1:$port; see $dir/tansu.log"
}

create_topics() {
  local port="$1"
  shift
  local name partitions
  for topic in "$@"; do
    name="${topic%%:*}"
    partitions=1
    [[ "$topic" == *:* ]] && partitions="${topic##*:}"
    # Creating an existing topic (a restart on the same store) is not an error here.
    "$TANSU" topic create --broker "tcp://127.0.0.1:$port" --partitions "$partitions" "$name" >>"$dir/tansu.log" 2>&1 || true
  done
}

start() {
  local dir="${1:?usage: kafka-peer.sh start DIR [PORT] [TOPIC...]}"
  local port="${2:-}"
  shift $(( $# >= 2 ? 2 : 1 ))
  local topics=("$@")
  [[ ${#topics[@]} -gt 0 ]] || topics=("${DEFAULT_TOPICS[@]}")
  install_tansu
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if [[ -f "$dir/tansu.pid" ]] && kill -0 "$(cat "$dir/tansu.pid")" 2>/dev/null; then
    die "a broker is already running for $dir (pid $(cat "$dir/tansu.pid"))"
  fi
  [[ -n "$port" ]] || port="$(free_port)"
  if [[ -n "${KAFKA_PEER_SCRAM_USER:-}" ]]; then
    # Users and topics are made while the broker is open, then it restarts
    # with authentication required on the same store.
    run_broker "$dir" "$port"
    "$TANSU" user create --broker "tcp://127.0.0.1:$port" --mechanism scram512 \
      "${KAFKA_PEER_SCRAM_USER%%:*}" "${KAFKA_PEER_SCRAM_USER#*:}" >>"$dir/tansu.log" 2>&1 \
      || die "creating the SCRAM user failed; see $dir/tansu.log"
    create_topics "$port" "${topics[@]}"
    stop "$dir"
    run_broker "$dir" "$port" --authentication
  else
    run_broker "$dir" "$port"
    create_topics "$port" "${topics[@]}"
  fi
  echo "$port"
}

stop() {
  local dir="${1:?usage: kafka-peer.sh stop DIR}"
  [[ -f "$dir/tansu.pid" ]] || return 0
  local pid
  pid="$(cat "$dir/tansu.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$dir/tansu.pid"
}

case "${1:-}" in
  install) install_tansu ;;
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  *) die "usage: kafka-peer.sh install | start DIR [PORT] [TOPIC...] | stop DIR" ;;
esac
