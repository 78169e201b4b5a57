#!/usr/bin/env bash
# Builds the release proxy, then runs benches/soak.py with the given arguments (see its docstring).
# Needs Python with httpx (scripts/test-requirements.txt) and redis-server. BENCH_FAST_BUILD=1:
# a faster, non-LTO release build (see release_then.sh).
exec "$(dirname "$0")/release_then.sh" soak.py "$@"
