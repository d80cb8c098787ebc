#!/usr/bin/env bash
# Builds crystald and crystal-quantize for another Linux target from an
# x86-64 Debian machine, without Docker.
#
#   cross/build.sh [--release] [TARGET]
#
# TARGET defaults to aarch64-unknown-linux-gnu: the one binary for the
# Raspberry Pi 4/5 and Jetson Orin (64-bit OS); the kernels pick NEON or
# NEON+DotProd at run time. x86_64-unknown-linux-gnu builds natively.
# Needs (scripts/setup.sh installs them): `rustup target add TARGET`, and
# for aarch64 Debian's gcc-aarch64-linux-gnu and libc6-dev-arm64-cross,
# used as the linker.
#
# Prints the directory holding the two binaries on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
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
    aarch64-unknown-linux-gnu)
        gcc=aarch64-linux-gnu-gcc
        # Cargo and the cc crate read these; an explicit setting wins.
        export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER:-$gcc}
        export CC_aarch64_unknown_linux_gnu=${CC_aarch64_unknown_linux_gnu:-$gcc}
        export AR_aarch64_unknown_linux_gnu=${AR_aarch64_unknown_linux_gnu:-aarch64-linux-gnu-ar}
        if ! command -v "$gcc" >/dev/null; then
            echo "build.sh: $gcc not found: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross (or run scripts/setup.sh)" >&2
            exit 2
        fi
        ;;
    x86_64-unknown-linux-gnu) ;;
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
cargo build --locked "${profile_flag[@]}" --target "$target" -p crystald -p crystal-quantize --bins

out=${CARGO_TARGET_DIR:-target}/$target/$profile_dir
for b in crystald crystal-quantize; do
    [ -x "$out/$b" ] || { echo "build.sh: $out/$b was not built" >&2; exit 1; }
done
echo "$out"
