#!/usr/bin/env bash
# Installs what building and testing crystald needs on a fresh Debian
# machine that has only Rust, gcc and Python: the Python packages the tests
# use to cross-check files (in .venv), and the ARM cross toolchain and
# emulator (below). Idempotent; safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# gguf: the reference GGUF reader/quantizer; safetensors+numpy: expected
# values; xxhash: recomputes the model file's checksum independently.
if ! .venv/bin/python -c 'import gguf, numpy, safetensors, xxhash' 2>/dev/null; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check 'gguf==0.19.*' numpy safetensors 'xxhash==3.*'
fi
# tests/http.rs drives the HTTP API with the official `openai` client (its
# HTTP library, httpx2, gives the Unix-socket transport) and parses
# /metrics with prometheus_client's parser.
if ! .venv/bin/python -c 'import openai, prometheus_client' 2>/dev/null; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check 'openai==3.*' 'prometheus_client==0.*'
fi
# Release builds (cross/build.sh, cross/test-qemu.sh) link against glibc
# 2.31 with zig, for every supported OS image: zig and cargo-zigbuild as
# PyPI wheels (prebuilt, no compiling; about 100 MB in .venv).
if ! .venv/bin/python -c 'import ziglang' 2>/dev/null || [ ! -x .venv/bin/cargo-zigbuild ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check 'ziglang==0.17.*' 'cargo-zigbuild==0.24.*'
fi
# NVRTC, the CUDA compiler library (no GPU needed to run it): tests/device.rs
# compiles the GPU kernels with it, as crystald does at start-up on a GPU.
# 12.2 is JetPack 6.0's, the oldest CUDA the `cuda` feature supports.
if ! compgen -G '.venv/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12' >/dev/null; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check 'nvidia-cuda-nvrtc-cu12==12.2.*'
fi
# Debian packages, gathered first so that apt runs (and updates) once.
need=()
# systemd-analyze and systemd-socket-activate: tests/systemd_units.rs checks
# the units in systemd/ with them.
if ! command -v systemd-analyze >/dev/null || ! command -v systemd-socket-activate >/dev/null; then
    need+=(systemd)
fi
# MQTT: tests/mqtt.rs runs the daemon against a real Mosquitto broker
# (started by the tests on a free loopback port) and drives it with the stock
# mosquitto_pub/mosquitto_sub clients; openssl makes the test CA.
if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
    need+=(mosquitto)
fi
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
command -v openssl >/dev/null || need+=(openssl)
# tests/http.rs runs the README's curl examples.
command -v curl >/dev/null || need+=(curl)
# Fuzzing: libfuzzer-sys compiles libFuzzer's C++ sources; the CUDA tests build
# their CPU stand-in for the driver (tests/cuda_emu) with it.
command -v c++ >/dev/null || need+=(g++)
# ARM cross builds and emulated tests (cross/): Debian's aarch64 gcc and
# libc as linker and sysroot, qemu-user to run the tests, Rust's aarch64
# std. CRYSTALD_SKIP_CROSS=1 leaves them out (and scripts/test.sh then
# skips the ARM steps).
if [ "${CRYSTALD_SKIP_CROSS:-0}" != 1 ]; then
    command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
    [ -e /usr/aarch64-linux-gnu/lib/libc.so ] || need+=(libc6-dev-arm64-cross)
    command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
    command -v dpkg-deb >/dev/null || need+=(dpkg)
fi
# tests/packaging.rs: installs the .deb into a temporary root (dpkg, whose
# maintainer scripts use systemd-sysusers and systemd-tmpfiles from the
# systemd package above), reads its changelog (dpkg-dev), starts the daemon
# as the package's user (setpriv, util-linux); package-deb.sh reads the
# binaries' symbol versions with readelf (binutils).
command -v dpkg >/dev/null || need+=(dpkg)
command -v dpkg-parsechangelog >/dev/null || need+=(dpkg-dev)
command -v setpriv >/dev/null || need+=(util-linux)
command -v readelf >/dev/null || need+=(binutils)
if [ ${#need[@]} -gt 0 ]; then
    sudo=()
    [ "$(id -u)" = 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${need[@]}"
fi
if [ "${CRYSTALD_SKIP_CROSS:-0}" != 1 ] \
    && ! rustup target list --installed | grep -qx aarch64-unknown-linux-gnu; then
    rustup target add aarch64-unknown-linux-gnu
fi
# Fuzzing (scripts/fuzz.sh, a short pass of which scripts/test.sh runs):
# cargo-fuzz from crates.io, built once into ~/.cargo/bin (kept by a CI
# cache of ~/.cargo). libFuzzer itself comes with the libfuzzer-sys crate.
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked --quiet cargo-fuzz --version 0.13.2
fi
echo "setup: ok ($(.venv/bin/python -c 'import gguf, importlib.metadata as m; print("gguf", m.version("gguf"))'))"
