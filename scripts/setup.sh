#!/usr/bin/env bash
# Installs what building and testing crystald needs on a fresh Debian
# machine that has only Rust, gcc and Python: the Python packages the tests
# use to cross-check files (in .venv). Idempotent; safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# gguf: the reference GGUF reader/quantizer; safetensors+numpy: expected values.
if ! .venv/bin/python -c 'import gguf, numpy, safetensors' 2>/dev/null; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check 'gguf==0.19.*' numpy safetensors
fi
# systemd-analyze and systemd-socket-activate: tests/systemd_units.rs checks
# the units in systemd/ with them.
if ! command -v systemd-analyze >/dev/null || ! command -v systemd-socket-activate >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd
fi
echo "setup: ok ($(.venv/bin/python -c 'import gguf, importlib.metadata as m; print("gguf", m.version("gguf"))'))"
