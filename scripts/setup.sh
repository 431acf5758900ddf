#!/usr/bin/env bash
# Installs everything the Millrace tests and demo need on a fresh Debian machine.
# Idempotent and fast when already done: it only installs what is missing.
#
#   scripts/setup.sh            # Debian packages, the Python venv, cached cargo tools
#
# Environment:
#   MILLRACE_VENV      Python venv for the peers (default ~/.cache/millrace-venv)
#   MILLRACE_TOOLS     cargo install root for tools (default ~/.cache/millrace-tools)
set -euo pipefail

VENV="${MILLRACE_VENV:-$HOME/.cache/millrace-venv}"
TOOLS="${MILLRACE_TOOLS:-$HOME/.cache/millrace-tools}"

# Debian packages: peers for the tests (mosquitto, socat, mbpoll, chromium), and the
# build dependencies of rdkafka's bundled librdkafka (cmake, libcurl, OpenSSL for TLS and SASL).
APT_PACKAGES=(mosquitto mosquitto-clients socat mbpoll cmake libcurl4-openssl-dev libssl-dev pkg-config
              python3-venv openssl chromium chromium-driver)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Python peers: pymodbus (a Modbus server that is not ours), confluent-kafka (an
# independent Kafka client), pysparkplug (a Sparkplug B edge node) and asyncua (an
# OPC UA server), in a venv
# this script owns.
PY_PACKAGES=("pymodbus>=3.6,<4" "pyserial>=3.5" "confluent-kafka>=2.3" "pysparkplug>=0.6,<1" "asyncua>=1.1,<3")
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating Python venv at $VENV"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import pymodbus, serial, confluent_kafka, pysparkplug, asyncua" 2>/dev/null; then
  echo "setup: installing Python peers into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
fi

# tansu: a Kafka-compatible broker built with its storage engines (slow to build: cached).
TANSU_VERSION=0.6.0
if ! cargo install --list --root "$TOOLS" 2>/dev/null | grep -q "^tansu v$TANSU_VERSION:"; then
  echo "setup: building tansu $TANSU_VERSION into $TOOLS (first run only; takes a while)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql \
    --root "$TOOLS" --quiet
fi

# --- gateway (aarch64 agent) ---
# The agent's ARM builds without docker (scripts/cross-build.sh) and their smoke test under
# qemu (scripts/gateway-smoke.sh): Debian's Rust toolchain (rustc-web/cargo-web from
# bookworm-security) with its arm64 standard library, the standard library's source
# (armv7 rebuilds std), the aarch64 and armhf cross compilers and C libraries, qemu user-mode
# emulation, and systemd-analyze (package systemd) for the unit-file checks.
GATEWAY_SUDO=""; [ "$(id -u)" -eq 0 ] || GATEWAY_SUDO="sudo"
gateway_update=0
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "setup: adding the arm64 Debian architecture (for libstd-rust-web-dev:arm64)"
  $GATEWAY_SUDO dpkg --add-architecture arm64
  gateway_update=1
fi
GATEWAY_PACKAGES=(rustc-web cargo-web libstd-rust-web-dev:arm64 libc6:arm64 rust-web-src
                  gcc-aarch64-linux-gnu libc6-dev-arm64-cross
                  gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user-static systemd)
gateway_missing=()
for p in "${GATEWAY_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || gateway_missing+=("$p")
done
if [ ${#gateway_missing[@]} -gt 0 ] || [ "$gateway_update" -eq 1 ]; then
  echo "setup: installing Debian packages for the gateway builds: ${gateway_missing[*]}"
  $GATEWAY_SUDO apt-get update -qq
  [ ${#gateway_missing[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive $GATEWAY_SUDO \
    apt-get install -y -qq --no-install-recommends "${gateway_missing[@]}" >/dev/null
fi
# --- end gateway ---

echo "setup: ok (venv $VENV, tools $TOOLS)"
