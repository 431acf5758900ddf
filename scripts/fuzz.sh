#!/usr/bin/env bash
# Runs Millrace's fuzz targets (fuzz/, libFuzzer through cargo-fuzz, nightly),
# one at a time, each for SECONDS (default 600), growing fuzz/corpus/<target>.
#
#   scripts/fuzz.sh                 # every target, 10 minutes each
#   scripts/fuzz.sh mqtt_payload 60
#
# A crash leaves its input in fuzz/artifacts/<target>/; after the fix, copy it
# to fuzz/regressions/<target>/ so every test run replays it
# (`cargo test -p millrace-fuzz`, on stable, part of scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET="${1:-all}"
SECONDS_EACH="${2:-600}"
TARGETS=(mqtt_payload sparkplug_payload wire_batch ingest_body modbus_decode store_codecs)

# Idempotent tool set-up: the nightly toolchain and cargo-fuzz, only if missing.
if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

# Its own target directory: the sanitizer flags would rebuild everything else.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/millrace-target-fuzz}"

if [ "$TARGET" = all ]; then
  selected=("${TARGETS[@]}")
else
  selected=("$TARGET")
fi
for t in "${selected[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  echo "fuzz: $t for ${SECONDS_EACH}s"
  # Rust code is memory safe: no sanitizer, so the executions go to finding
  # panics, hangs and runaway allocations (-rss_limit_mb, -malloc_limit_mb).
  status=0
  cargo +nightly fuzz run --fuzz-dir fuzz --features fuzzing --sanitizer none "$t" \
    "fuzz/corpus/$t" -- \
    -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -malloc_limit_mb=1024 \
    -max_len=262144 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$t/" > "fuzz/artifacts/$t/last-run.log" 2>&1 || status=$?
  grep -E "^(#[0-9]+[[:space:]]+DONE|stat::|==[0-9]+==|SUMMARY|Test unit written|thread .* panicked)" \
    "fuzz/artifacts/$t/last-run.log" || true
  if [ "$status" -ne 0 ]; then
    echo "fuzz: $t found a crash (exit $status): see fuzz/artifacts/$t/" >&2
    exit "$status"
  fi
done
