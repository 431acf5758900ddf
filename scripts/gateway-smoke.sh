#!/usr/bin/env bash
# Smoke test of an ARM millrace-agent under qemu user-mode emulation:
#   1. `check-config` on the example agent configs;
#   2. a short run against the simulator (a host binary) on free loopback ports:
#      the agent polls a simulated PLC over Modbus TCP and receives simulated MQTT
#      sensors on its embedded broker, and must write closed windows to its tap;
#   3. SIGTERM: the agent must stop cleanly (exit 0) within its stop timeout.
#
#   scripts/gateway-smoke.sh AGENT_BINARY SIM_BINARY
#   scripts/gateway-smoke.sh "$(scripts/cross-build.sh | tail -n 1)" \
#                            ~/.cache/millrace-target/debug/millrace-sim
#
# The emulator follows from the binary's ELF machine: qemu-aarch64-static for
# aarch64, run without -L (it then loads Debian's arm64 ld.so and libc from
# libc6:arm64; mixing the cross ld.so with that libc makes threads hang), and
# qemu-arm-static -L /usr/arm-linux-gnueabihf for armv7 (libc6-armhf-cross).
#
# Environment:
#   MILLRACE_SMOKE_RUN   how long the agent runs (default 12s)
#   MILLRACE_SMOKE_KEEP  keep the scratch directory (set to 1) for inspection
set -euo pipefail
cd "$(dirname "$0")/.."

AGENT="${1:?usage: gateway-smoke.sh AGENT_BINARY SIM_BINARY}"
SIM="${2:?usage: gateway-smoke.sh AGENT_BINARY SIM_BINARY}"
RUN_SECONDS="${MILLRACE_SMOKE_RUN:-12s}"
RUN_SECONDS="${RUN_SECONDS%s}"

fail() { echo "gateway-smoke: FAIL: $*" >&2; exit 1; }
[ -x "$AGENT" ] || fail "agent binary $AGENT not found or not executable"
[ -x "$SIM" ] || fail "simulator binary $SIM not found or not executable"

machine=$(od -An -tu2 -j18 -N2 "$AGENT" | tr -d ' ')
case "$machine" in
  183) QEMU=(qemu-aarch64-static) ;;                               # EM_AARCH64
  40)  QEMU=(qemu-arm-static -L /usr/arm-linux-gnueabihf) ;;       # EM_ARM
  62)  QEMU=() ;;                                                  # EM_X86_64: a host build
  *)   fail "$AGENT: unsupported ELF machine $machine" ;;
esac
if [ ${#QEMU[@]} -gt 0 ]; then
  command -v "${QEMU[0]}" >/dev/null ||
    fail "${QEMU[0]} is missing: install the Debian package qemu-user-static (scripts/setup.sh does)"
fi
command -v python3 >/dev/null || fail "python3 is missing"

scratch=$(mktemp -d "${TMPDIR:-/tmp}/millrace-smoke.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  if [ "${MILLRACE_SMOKE_KEEP:-0}" = 1 ]; then
    echo "gateway-smoke: scratch kept in $scratch" >&2
  else
    rm -rf "$scratch"
  fi
}
trap cleanup EXIT

agent() { "${QEMU[@]}" "$AGENT" "$@"; }

echo "gateway-smoke: $(agent --version) under ${QEMU[*]:-no emulator}"

# 1. The example configs parse and check on the target. A build without the
# `opcua` feature (the default gateway build) must refuse the OPC UA example
# with the error that says so, and nothing else.
for cfg in config/agent*.toml; do
  if agent check-config "$cfg" >"$scratch/check.out" 2>&1; then
    echo "gateway-smoke: check-config $cfg ok"
  elif [ "$cfg" = config/agent-opcua.toml ] &&
       grep -q "this build has no OPC UA support" "$scratch/check.out"; then
    echo "gateway-smoke: check-config $cfg refused as expected (built without the opcua feature)"
  else
    cat "$scratch/check.out" >&2; fail "check-config $cfg"
  fi
done

# 2. Free loopback ports for the embedded broker and the simulated PLC.
read -r mqtt_port modbus_port < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)

cat >"$scratch/sim.toml" <<EOF
seed = 7
[mqtt]
broker = "127.0.0.1:$mqtt_port"
client-id = "smoke-sim"
keep-alive = "5s"
reconnect-delay = "200ms"
queue-capacity = 1024

[[modbus-tcp]]
name = "press-1"
listen = "127.0.0.1:$modbus_port"
unit-id = 1
refresh = "500ms"

[[modbus-tcp.points]]
sensor = "temperature"
unit = "degC"
table = "holding"
address = 0
type = "f32"
order = "ABCD"
signal = { offset = 80.0, amplitude = 5.0, period = "60s", noise-stddev = 0.2 }

[[mqtt-sensor]]
topic = "plant/boiler-3/temp"
interval = "100ms"
unit = "degC"
signal = { offset = 180.0, amplitude = 0.5, period = "600s", noise-stddev = 0.5 }
EOF

cat >"$scratch/agent.toml" <<EOF
[agent]
id = "gw-smoke"
data-dir = "$scratch/state"

[window]
width = "1s"
allowed-lateness = "500ms"
idle-timeout = "3s"

[broker]
enabled = true
listen = "127.0.0.1:$mqtt_port"

[[broker.subscriptions]]
filter = "plant/+/+"
format = "json"

[[modbus.devices]]
name = "press-1"
transport = "tcp"
address = "127.0.0.1:$modbus_port"
poll-interval = "500ms"
timeout = "1s"

[[modbus.devices.registers]]
sensor = "temperature"
function = "holding"
address = 0
type = "f32"
order = "ABCD"
unit = "degC"
EOF

agent check-config "$scratch/agent.toml" >/dev/null || fail "check-config of the smoke config"

started=$(date +%s%N)
# Started directly (not through the agent() function, whose subshell would take
# the signals): $! is the emulator, which passes signals on to the agent.
"${QEMU[@]}" "$AGENT" run --config "$scratch/agent.toml" --tap "$scratch/tap.jsonl" \
  2>"$scratch/agent.log" &
agent_pid=$!
pids+=("$agent_pid")

# The broker is up once the agent listens: then start the plant.
for _ in $(seq 1 200); do
  python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $mqtt_port), 0.2)" 2>/dev/null && break
  kill -0 "$agent_pid" 2>/dev/null || { cat "$scratch/agent.log" >&2; fail "the agent exited at start-up"; }
  sleep 0.1
done
echo "gateway-smoke: agent listening after $(( ($(date +%s%N) - started) / 1000000 )) ms"
"$SIM" run --config "$scratch/sim.toml" >"$scratch/sim.log" 2>&1 &
sim_pid=$!
pids+=("$sim_pid")

sleep "$RUN_SECONDS"
kill -0 "$agent_pid" 2>/dev/null || { tail -20 "$scratch/agent.log" >&2; fail "the agent died while running"; }

# 3. A clean stop: SIGTERM flushes windows and commits the journal.
kill -TERM "$agent_pid"
code=0
for _ in $(seq 1 300); do
  kill -0 "$agent_pid" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$agent_pid" 2>/dev/null; then
  tail -20 "$scratch/agent.log" >&2
  fail "the agent did not stop within 30 s of SIGTERM"
fi
wait "$agent_pid" || code=$?
[ "$code" -eq 0 ] || { tail -20 "$scratch/agent.log" >&2; fail "the agent exited with $code after SIGTERM"; }

kill -TERM "$sim_pid" 2>/dev/null || true
wait "$sim_pid" 2>/dev/null || true

python3 - "$scratch/tap.jsonl" <<'EOF' || { tail -20 "$scratch/agent.log" >&2; fail "too few windows on the tap"; }
import json, sys
windows = {}
with open(sys.argv[1]) as f:
    for line in f:
        r = json.loads(line)
        if r.get("type") == "window":
            s = r["series"]
            key = f"{s['device']}/{s['sensor']}"
            windows.setdefault(key, []).append(r)
want = {"boiler-3/temp", "press-1/temperature"}
print("gateway-smoke: windows on the tap:",
      ", ".join(f"{k}={len(v)}" for k, v in sorted(windows.items())) or "none")
missing = want - windows.keys()
if missing:
    sys.exit(f"no window for {sorted(missing)}")
for key, ws in windows.items():
    for w in ws:
        if not (w["count"] > 0 and w["min"] <= w["mean"] <= w["max"]):
            sys.exit(f"inconsistent window for {key}: {w}")
if sum(len(v) for v in windows.values()) < 4:
    sys.exit("fewer than 4 windows")
EOF
echo "gateway-smoke: ok"
