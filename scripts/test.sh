#!/usr/bin/env bash
# The whole test suite: installs test tools, then runs every test of the
# workspace (tests/packaging.rs builds and checks the amd64 .deb), then the
# ARM steps. This is the command CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
export CRYSTALD_PYTHON="$PWD/.venv/bin/python"
cargo test --workspace --locked "$@"
# The `cuda` feature on a machine without a GPU: its host-side unit tests,
# the fallbacks and errors of --device, the kernels compiled by the NVRTC
# that setup.sh installs, and the whole GPU backend run on tests/cuda_emu
# (a stand-in driver that executes the kernels on the CPU): the daemon and
# the fixture comparisons on tiny-a (a real GPU: scripts/gpu-check.sh).
CRYSTALD_NVRTC=$(echo "$PWD"/.venv/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12)
export CRYSTALD_NVRTC
cuda_start=$SECONDS
cargo test --locked --features cuda --lib "$@" -- cuda:: device::
cargo test --locked --features cuda --test device "$@"
CRYSTALD_TEST_DEVICE=cuda-emulated CRYSTALD_TEST_FIXTURES=tiny-a CRYSTALD_TEST_KERNELS=scalar \
    cargo test --locked --features cuda --test engine_fixtures "$@" -- \
    f32_matches_reference q4_0_quality decode_through_the_cache
echo "test.sh: CUDA steps took $((SECONDS - cuda_start)) s"

# A time-boxed fuzz pass of every parser that reads outside data (the long
# run is `scripts/fuzz.sh 600`). A crash fails the suite.
if [ "${CRYSTALD_SKIP_FUZZ:-0}" != 1 ]; then
    fuzz_start=$SECONDS
    scripts/fuzz.sh "${CRYSTALD_FUZZ_SECONDS:-10}"
    echo "test.sh: fuzz pass took $((SECONDS - fuzz_start)) s"
fi

# ARM: release binaries cross-built for aarch64, the kernel and engine tests
# under qemu on a Cortex-A72 (NEON) and a DotProd CPU, and the packages.
# Every release build links against glibc 2.31 (cross/zig.sh), and
# package-deb.sh fails when a binary needs a newer glibc symbol version:
# that is the check for both architectures.
if [ "${CRYSTALD_SKIP_CROSS:-0}" != 1 ]; then
    arm_start=$SECONDS
    cross/test-qemu.sh
    cross/build.sh --release aarch64-unknown-linux-gnu
    cross/package-deb.sh arm64
    echo "test.sh: ARM steps took $((SECONDS - arm_start)) s"
fi
amd64_start=$SECONDS
cross/build.sh --release x86_64-unknown-linux-gnu
cross/package-deb.sh amd64
echo "test.sh: amd64 release package took $((SECONDS - amd64_start)) s"
