#!/usr/bin/env bash
# Builds the release proxy, then runs the Python bench named first (benches/NAME.py) with the
# rest of the arguments. The benches' .sh wrappers call this.
#   BENCH_FAST_BUILD=1  release build without fat LTO and with 16 codegen units (minutes instead
#                       of a long LTO link; the shipped binary is LTO-built, so at most faster)
set -euo pipefail
cd "$(dirname "$0")/.."
script=$1
shift
fast=()
if [ "${BENCH_FAST_BUILD:-0}" = 1 ]; then
  fast=(--config profile.release.lto=false --config profile.release.codegen-units=16)
fi
cargo build --release "${fast[@]}" --bin smallest-proxy >&2
exec python3 "benches/$script" "$@"
