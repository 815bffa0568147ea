#!/usr/bin/env bash
# Fuzz smoke: every cargo-fuzz target in fuzz/ (or the TARGETs given) for
# SECONDS each (default 20), failing on any crash, panic or sanitizer report.
# Also the documented longer runs (RELIABILITY.md), e.g. `bash tests/fuzz.sh 180`.
#
# usage: tests/fuzz.sh [SECONDS [TARGET...]]
#
# Runs on the stable toolchain: cargo-fuzz passes -Z flags (sanitizer,
# coverage instrumentation), which stable rustc accepts with RUSTC_BOOTSTRAP=1.
# Installs the pinned cargo-fuzz when missing. Each target's corpus grows in
# fuzz/corpus/TARGET (not committed), seeded from fuzz/seeds/TARGET.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT/fuzz"
SECONDS_PER_TARGET=${1:-20}
CARGO_FUZZ_VERSION=0.13.2
export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1

if [[ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
  echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

echo "== fuzz/: cargo fmt --check"
cargo fmt -- --check
# Not -O: release code with debug assertions and overflow checks, so an
# arithmetic overflow on outside bytes is a finding too.
echo "== cargo fuzz build (address sanitizer, overflow checks)"
cargo fuzz build

targets=("${@:2}")
if [[ ${#targets[@]} == 0 ]]; then
  mapfile -t targets < <(cargo fuzz list)
fi
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  seeds=()
  [[ -d "seeds/$target" ]] && seeds=("seeds/$target")
  echo "== fuzz $target for ${SECONDS_PER_TARGET}s"
  # -max_len: values up to 64 KiB, enough to nest far past MAX_DEPTH.
  # -print_final_stats: run count and corpus growth, shown below.
  cargo fuzz run "$target" "corpus/$target" "${seeds[@]}" -- \
    -max_total_time="$SECONDS_PER_TARGET" -max_len=65536 -print_final_stats=1 \
    2>"corpus/$target.log" || {
      tail -n 60 "corpus/$target.log"
      echo "fuzz target $target failed; the input is under fuzz/artifacts/$target/"
      exit 1
    }
  grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb|stat::new_units_added)' \
    "corpus/$target.log" || true
  echo "corpus/$target: $(find "corpus/$target" -type f | wc -l) inputs"
done
echo "fuzz: ${targets[*]} ran ${SECONDS_PER_TARGET}s each without a crash"
