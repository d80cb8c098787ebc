#!/usr/bin/env bash
# Builds crystald and crystal-quantize for another Linux target from an
# x86-64 Debian machine, without Docker.
#
#   cross/build.sh [--release] [TARGET]
#
# TARGET defaults to aarch64-unknown-linux-gnu: the one binary for the
# Raspberry Pi 4/5 and Jetson Orin (64-bit OS); the kernels pick NEON or
# NEON+DotProd at run time. x86_64-unknown-linux-gnu is the x86-64 build.
# Both link against glibc 2.31 (CRYSTALD_GLIBC) with cargo-zigbuild (see
# cross/zig.sh), so they run on Debian 11/12, Ubuntu 20.04-24.04, JetPack
# 5/6 and Raspberry Pi OS bullseye/bookworm. Needs (scripts/setup.sh
# installs them): `rustup target add TARGET` and .venv's cargo-zigbuild
# and ziglang.
#
# Prints the directory holding the two binaries on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

release=0
target=aarch64-unknown-linux-gnu
for arg in "$@"; do
    case "$arg" in
        --release) release=1 ;;
        -h | --help) usage 0 ;;
        -*) echo "build.sh: unknown option $arg" >&2; usage 2 >&2 ;;
        *) target=$arg ;;
    esac
done

case "$target" in
    aarch64-unknown-linux-gnu | x86_64-unknown-linux-gnu) ;;
    armv7-unknown-linux-gnueabihf | arm-unknown-linux-gnueabihf)
        echo "build.sh: 32-bit Arm is not supported: a 7B model file does not fit a 32-bit address space (see cross/README.md)" >&2
        exit 2
        ;;
    *)
        echo "build.sh: unsupported target $target (supported: aarch64-unknown-linux-gnu, x86_64-unknown-linux-gnu)" >&2
        exit 2
        ;;
esac

if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi

profile_flag=()
profile_dir=debug
if [ "$release" = 1 ]; then
    profile_flag=(--release)
    profile_dir=release
fi
# shellcheck source=cross/zig.sh
. cross/zig.sh
# crystald with the GPU backend: it opens the CUDA driver only when a GPU
# is asked for (`device = "auto"` finds none on a Raspberry Pi and runs on
# the CPU), so one binary serves every board, Jetsons included.
zig_cargo build --locked "${profile_flag[@]}" -p crystald -p crystal-quantize --bins --features crystald/cuda

out=${CARGO_TARGET_DIR:-target}/$target/$profile_dir
for b in crystald crystal-quantize; do
    [ -x "$out/$b" ] || { echo "build.sh: $out/$b was not built" >&2; exit 1; }
done
echo "$out"
