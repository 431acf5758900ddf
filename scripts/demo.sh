#!/usr/bin/env bash
# Runs the whole Millrace pipeline on this machine with the example configs:
#   millrace-sim (PLCs on 127.0.0.1:15020/15021, MQTT sensors, a Sparkplug B node)
#   + an OPC UA server (asyncua from the venv of scripts/setup.sh, when present)
#     → millrace-agent (embedded MQTT broker on 127.0.0.1:1883, windows, anomaly
#       scores, outbox)
#     → millrace-aggregator (127.0.0.1:8480, embedded durable log, live dashboard)
# and prints windows and anomalies as they close. Ctrl-C stops everything cleanly.
# State goes under $DEMO_DIR (default out/demo); read the log afterwards with
#   millrace-aggregator tail millrace.windows --from-beginning --config out/demo/aggregator.toml
#
#   scripts/demo.sh            # build (dev profile) and run
#   DEMO_DIR=/tmp/x scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/millrace-target}"
DEMO_DIR="${DEMO_DIR:-$PWD/out/demo}"
mkdir -p "$DEMO_DIR"

echo "demo: building the agent, the aggregator and the simulator (the first build takes several minutes)"
cargo build --quiet -p millrace-agent -p millrace-sim -p millrace-aggregator
BIN="$CARGO_TARGET_DIR/debug"

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# No working token ships in config/: the demo makes its own, shared by the
# agent (MILLRACE_UPLINK_TOKEN) and the aggregator (MILLRACE_TOKEN_GW_DEMO_1).
if [ ! -s "$DEMO_DIR/uplink.token" ]; then
  (umask 077; python3 -c 'import secrets; print(secrets.token_hex(24))' > "$DEMO_DIR/uplink.token")
fi
MILLRACE_UPLINK_TOKEN="$(cat "$DEMO_DIR/uplink.token")"
export MILLRACE_UPLINK_TOKEN
export MILLRACE_TOKEN_GW_DEMO_1="$MILLRACE_UPLINK_TOKEN"

# The aggregator keeps its state in the demo folder.
sed -e "s|^data-dir = .*|data-dir = \"$DEMO_DIR/aggregator-state\"|" \
    -e "s|^dir = .*|dir = \"$DEMO_DIR/aggregator-state/log\"|" \
    config/aggregator.toml > "$DEMO_DIR/aggregator.toml"
"$BIN/millrace-aggregator" run --config "$DEMO_DIR/aggregator.toml" 2> "$DEMO_DIR/aggregator.log" &
pids+=($!)

# An OPC UA server that is not ours (asyncua, in the venv scripts/setup.sh
# makes) plays a line controller whose Temperature and Count change every
# second; the agent subscribes to it. Without asyncua the demo runs without it.
VENV="${MILLRACE_VENV:-$HOME/.cache/millrace-venv}"
cp config/agent.toml "$DEMO_DIR/agent.toml"
if "$VENV/bin/python" -c "import asyncua" 2>/dev/null; then
  opcua_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  coproc OPCUA { exec "$VENV/bin/python" scripts/opcua-peer.py --port "$opcua_port" 2> "$DEMO_DIR/opcua.log"; }
  pids+=("$OPCUA_PID")
  read -r ready endpoint <&"${OPCUA[0]}" || { echo "demo: the OPC UA server did not start; see $DEMO_DIR/opcua.log" >&2; exit 1; }
  echo "tick 1000000 1000" >&"${OPCUA[1]}"
  cat >> "$DEMO_DIR/agent.toml" <<EOF

# Added by scripts/demo.sh: the OPC UA server it started ($ready $endpoint).
[[opcua.servers]]
name = "line-1"
endpoint = "$endpoint"
security-policy = "none"
identity = "anonymous"
mode = "subscribe"
publishing-interval = "500ms"

[[opcua.servers.nodes]]
node-id = "ns=2;s=Line1.Temperature"
sensor = "temperature"
unit = "degC"

[[opcua.servers.nodes]]
node-id = "ns=2;s=Line1.Count"
sensor = "count"
EOF
  echo "demo: OPC UA server (asyncua) at $endpoint"
else
  echo "demo: no asyncua in $VENV (run scripts/setup.sh): the demo runs without its OPC UA server"
fi

# Then the agent: it hosts the MQTT broker the simulated sensors publish to.
MILLRACE_DATA_DIR="$DEMO_DIR/agent-state" \
  "$BIN/millrace-agent" run --config "$DEMO_DIR/agent.toml" --tap "$DEMO_DIR/tap.jsonl" \
  2> "$DEMO_DIR/agent.log" &
pids+=($!)
sleep 1
"$BIN/millrace-sim" run --config config/sim.toml 2> "$DEMO_DIR/sim.log" &
pids+=($!)

echo "demo: logs in $DEMO_DIR/{agent,aggregator,sim}.log"
echo "demo: dashboard on http://127.0.0.1:8480/  (open it in a browser)"
echo "demo: agent metrics on http://127.0.0.1:9481/metrics, aggregator metrics on http://127.0.0.1:8480/metrics"
echo "demo: embedded log in $DEMO_DIR/aggregator-state/log"
echo "demo: every record as JSON lines in $DEMO_DIR/tap.jsonl; summary below (Ctrl-C to stop)"
touch "$DEMO_DIR/tap.jsonl"
tail -n 0 -F "$DEMO_DIR/tap.jsonl" 2>/dev/null | python3 -u scripts/tap-summary.py
