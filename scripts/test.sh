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
