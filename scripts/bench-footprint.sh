#!/usr/bin/env bash
# The daemon's memory, start-up time and idle CPU on one model file, as the
# README's footprint table: builds the release binaries, then runs
# scripts/bench-footprint.py (see there for what is measured and the
# environment variables). The cold-start rows drop the page cache, which
# needs root (COLD=0 skips them). Takes a few minutes on a 2-core machine
# with the 7B file (the ~2000-token prompt dominates).
#
#   scripts/bench-footprint.sh /path/to/synth-7b-q4_0.gguf
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: scripts/bench-footprint.sh MODEL.gguf}
cargo build --release --quiet --workspace
exec python3 scripts/bench-footprint.py target/release/crystald "$model"
