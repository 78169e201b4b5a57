#!/usr/bin/env bash
# Builds the release proxy, then runs benches/auto_concurrency.py with the given arguments (see its docstring).
# Needs Python with httpx (scripts/test-requirements.txt).
#   BENCH_FAST_BUILD=1  release build without fat LTO and with 16 codegen units (minutes instead
#                       of a long LTO link; the shipped binary is LTO-built, so at most faster)
set -euo pipefail
cd "$(dirname "$0")/.."
fast=()
if [ "${BENCH_FAST_BUILD:-0}" = 1 ]; then
  fast=(--config profile.release.lto=false --config profile.release.codegen-units=16)
fi
cargo build --release "${fast[@]}" --bin smallest-proxy >&2
exec python3 benches/auto_concurrency.py "$@"
