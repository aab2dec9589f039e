#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s ==\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build the cdi binary the end-to-end tests run"
cargo build --locked --bin cdi
export CDI_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/cdi"

step "tests (unit, qemu-img interop, real servers, end to end)"
cargo test --workspace --locked --no-fail-fast

if [ -d fuzz ]; then
  step "fuzz targets build"
  if command -v cargo-fuzz >/dev/null 2>&1; then
    (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build --dev)
  else
    echo "SKIPPED: cargo-fuzz is not installed (.ci/run installs it)"
  fi
fi

if [ -x bench/run ]; then
  step "benchmark smoke run (correctness against qemu-img, 2x regression guard)"
  bench/run --smoke
fi
