#!/usr/bin/env bash
# The whole test suite: installs test tools, then runs every test of the
# workspace. This is the command CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
export CRYSTALD_PYTHON="$PWD/.venv/bin/python"
cargo test --workspace --locked "$@"
