#!/usr/bin/env bash
# Builds the release proxy, then runs benches/auto_concurrency.py with the given arguments (see its docstring).
# Needs Python with httpx (scripts/test-requirements.txt). BENCH_FAST_BUILD=1: a faster, non-LTO
# release build (see release_then.sh).
exec "$(dirname "$0")/release_then.sh" auto_concurrency.py "$@"
