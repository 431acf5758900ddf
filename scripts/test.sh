#!/usr/bin/env bash
# Runs every Millrace test on this machine: installs the peers first (idempotent),
# then the whole workspace's unit, property, integration and end-to-end tests.
#
#   scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/millrace-target}"
export MILLRACE_VENV="${MILLRACE_VENV:-$HOME/.cache/millrace-venv}"
export MILLRACE_TOOLS="${MILLRACE_TOOLS:-$HOME/.cache/millrace-tools}"
# Tests start real peers (mosquitto, pymodbus, tansu, chromium) on free loopback ports;
# two test threads keep a 2-core machine responsive.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"

cargo build --workspace --bins
cargo test --workspace "$@"

# --- gateway (aarch64 agent) ---
# The aarch64 agent, cross-built with Debian's toolchain in the release profile (cached in
# ~/.cache/millrace-target-cross), then its smoke test under qemu-aarch64-static against the
# host simulator built above: check-config on the example config, windows on the tap, a
# clean stop. MILLRACE_GATEWAY_SMOKE=0 leaves it out of a local run.
if [ "${MILLRACE_GATEWAY_SMOKE:-1}" != 0 ]; then
  gateway_start=$(date +%s)
  agent_aarch64=$(scripts/cross-build.sh --target aarch64-unknown-linux-gnu | tail -n 1)
  scripts/gateway-smoke.sh "$agent_aarch64" "$CARGO_TARGET_DIR/debug/millrace-sim"
  echo "gateway: aarch64 build and qemu smoke test took $(( $(date +%s) - gateway_start )) s"
fi
# --- end gateway ---
