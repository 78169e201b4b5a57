#!/usr/bin/env bash
# What counting live-TTS syntheses costs: the same WebSocket traffic through the plain byte
# tunnel and through the counting tunnel (examples/synthesis_bench.rs, in one process over
# in-memory pipes, so only the tunnels differ). Target: <= 50 µs added p50 per message.
#
#   benches/synthesis_tunnel.sh [--debug] [RUNS]
#
#   --debug   build without optimisations (no release build needed; the figures are then an
#             upper bound: unoptimised code inflates the counting tunnel's extra work most)
#   RUNS      alternating runs per shape (default 3)
#   BENCH_FAST_BUILD=1  release build without fat LTO and with 16 codegen units (minutes instead
#                       of a long LTO link; the shipped binary is LTO-built, so at most faster)
#
# Shapes: 2 chunks of 4 KiB and 4 chunks of 16 KiB per synthesis (plus the request and the
# `complete` frame). Prints one JSON line per tunnel per run, and the added p50.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=--release
dir=release
if [ "${1:-}" = "--debug" ]; then profile=; dir=debug; shift; fi
runs=${1:-3}
fast=()
if [ "${BENCH_FAST_BUILD:-0}" = 1 ] && [ -n "$profile" ]; then
  fast=(--config profile.release.lto=false --config profile.release.codegen-units=16)
fi
cargo build $profile "${fast[@]}" --example synthesis_bench >&2
for shape in "5000 2 4096" "3000 4 16384"; do
  for _ in $(seq "$runs"); do
    # shellcheck disable=SC2086
    "target/$dir/examples/synthesis_bench" $shape
  done
done
