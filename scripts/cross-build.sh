#!/usr/bin/env bash
# Builds millrace-agent for ARM gateways on Debian, without docker: Debian's own
# Rust toolchain (rustc-web / cargo-web) with its prebuilt arm64 standard library,
# and the Debian cross compilers as linkers.
#
#   scripts/cross-build.sh                      # aarch64-unknown-linux-gnu, release
#   scripts/cross-build.sh --target armv7-unknown-linux-gnueabihf
#   scripts/cross-build.sh --target aarch64-unknown-linux-gnu --target armv7-unknown-linux-gnueabihf
#   scripts/cross-build.sh --features opcua     # with the OPC UA source (about 3 MB more)
#
# The gateway build leaves out the cargo features that do not fit the 10 MB
# budget of the binary (today: `opcua`); `--features` adds them back.
#
# Prints the path of each binary built (one per line, last on stdout). With
# docker or podman, `cross build -p millrace-agent --release --target …` does the
# same through Cross.toml.
#
# aarch64 links against Debian's libstd-rust-web-dev:arm64. armv7 has no usable
# prebuilt standard library here (the armhf package would need a second foreign
# architecture and matches only one rustc build), so std is rebuilt from Debian's
# rust-web-src with -Zbuild-std (RUSTC_BOOTSTRAP=1: Debian's compiler is stable).
# Everything is installed by scripts/setup.sh.
#
# Environment:
#   MILLRACE_CROSS_TARGET_DIR  cargo target dirs, one per target below it (default
#                              ~/.cache/millrace-target-cross): apart from the host build,
#                              which uses another rustc, and from each other, since the
#                              armv7 build's RUSTC_BOOTSTRAP=1 would rebuild shared host crates
#   MILLRACE_CROSS_PROFILE     cargo profile (default release: fat LTO, stripped)
#   MILLRACE_AGENT_FEATURES    agent cargo features to build in (as --features)
#   MILLRACE_RUSTC / MILLRACE_CARGO  Debian's toolchain (default /usr/bin/rustc, /usr/bin/cargo)
set -euo pipefail
cd "$(dirname "$0")/.."

targets=()
features="${MILLRACE_AGENT_FEATURES-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --features) features="${2:?--features needs a list}"; shift 2 ;;
    --features=*) features="${1#--features=}"; shift ;;
    --target) targets+=("${2:?--target needs a target triple}"); shift 2 ;;
    --target=*) targets+=("${1#--target=}"); shift ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "cross-build: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(aarch64-unknown-linux-gnu)

RUSTC_BIN="${MILLRACE_RUSTC:-/usr/bin/rustc}"
CARGO_BIN="${MILLRACE_CARGO:-/usr/bin/cargo}"
PROFILE="${MILLRACE_CROSS_PROFILE:-release}"
TARGET_DIR="${MILLRACE_CROSS_TARGET_DIR:-$HOME/.cache/millrace-target-cross}"
SYSROOT_SRC="/usr/lib/rustlib/src/rust/library"

need() { # need FILE PACKAGE
  if [ ! -e "$1" ]; then
    echo "cross-build: $1 is missing: install the Debian package $2 (scripts/setup.sh does)" >&2
    exit 1
  fi
}

need "$RUSTC_BIN" rustc-web
need "$CARGO_BIN" cargo-web

# The rustup proxies must not take over: Debian's cargo runs Debian's rustc.
unset RUSTUP_TOOLCHAIN
export RUSTC="$RUSTC_BIN"

for target in "${targets[@]}"; do
  build_std=()
  case "$target" in
    aarch64-unknown-linux-gnu)
      need /usr/bin/aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu
      need /usr/aarch64-linux-gnu/lib/libc.so libc6-dev-arm64-cross
      need /usr/lib/rustlib/aarch64-unknown-linux-gnu/lib "libstd-rust-web-dev:arm64 (after dpkg --add-architecture arm64)"
      export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
      export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
      export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
      ;;
    armv7-unknown-linux-gnueabihf)
      need /usr/bin/arm-linux-gnueabihf-gcc gcc-arm-linux-gnueabihf
      need /usr/arm-linux-gnueabihf/lib/libc.so libc6-dev-armhf-cross
      need "$SYSROOT_SRC/std" rust-web-src
      export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc
      export CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc
      export AR_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-ar
      build_std=(-Zbuild-std=std,panic_abort)
      ;;
    *)
      echo "cross-build: unsupported target $target (aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf)" >&2
      exit 2
      ;;
  esac

  export CARGO_TARGET_DIR="$TARGET_DIR/$target"
  feature_args=(--no-default-features)
  [ -n "$features" ] && feature_args+=(--features "$features")
  echo "cross-build: millrace-agent for $target ($PROFILE, features: ${features:-none}) with $("$RUSTC_BIN" --version)" >&2
  start=$(date +%s)
  if [ ${#build_std[@]} -gt 0 ]; then
    RUSTC_BOOTSTRAP=1 "$CARGO_BIN" build --locked -p millrace-agent --bin millrace-agent \
      --profile "$PROFILE" --target "$target" "${feature_args[@]}" "${build_std[@]}"
  else
    "$CARGO_BIN" build --locked -p millrace-agent --bin millrace-agent \
      --profile "$PROFILE" --target "$target" "${feature_args[@]}"
  fi
  out_dir="$PROFILE"; [ "$PROFILE" = dev ] && out_dir=debug
  bin="$CARGO_TARGET_DIR/$target/$out_dir/millrace-agent"
  need "$bin" "(the build above should have produced it)"
  echo "cross-build: $target done in $(( $(date +%s) - start )) s, $(stat -c %s "$bin") bytes" >&2
  echo "$bin"
done
