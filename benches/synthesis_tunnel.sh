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
#
# Shapes: 2 chunks of 4 KiB and 4 chunks of 16 KiB per synthesis (plus the request and the
# `complete` frame). Prints one JSON line per tunnel per run, and the added p50.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=--release
dir=release
if [ "${1:-}" = "--debug" ]; then profile=; dir=debug; shift; fi
runs=${1:-3}
cargo build $profile --example synthesis_bench >&2
for shape in "3000 2 4096" "2000 4 16384"; do
  for _ in $(seq "$runs"); do
    # shellcheck disable=SC2086
    "target/$dir/examples/synthesis_bench" $shape
  done
done
