#!/usr/bin/env bash
# Runs the aarch64 build of the tests under qemu-user on two CPU models:
#
#   cortex-a72  (Raspberry Pi 4: ARMv8.0, no DotProd) -> kernels "neon"
#   max         (every extension qemu has, DotProd too) -> "neon-dotprod"
#
# Each run asserts the exact list of kernel sets the CPU offers
# (CRYSTALD_EXPECT_KERNELS), runs the kernel property tests against the
# scalar reference and the library unit tests, and the engine fixtures with
# that CPU's NEON variant only (CRYSTALD_TEST_KERNELS; scalar is covered
# natively): all of them on the Cortex-A72 except the q4_k_s and q6_k
# presets (mixes of the Q4_K, Q5_K and Q6_K blocks that q4_k_m and q5_k_m
# already run, and emulated k-quant conversion is slow), only the quantized
# ones on `max`, since the quantized block product is the only code the two
# variants do not share. About 5 minutes emulated. Timings under qemu
# say nothing about speed on hardware.
#
# Release profile and the same zig linker against glibc 2.31 (cross/zig.sh),
# so the build is shared with `cross/build.sh --release` and the tests run
# the code that ships. qemu loads Debian's arm64 glibc from the cross
# sysroot. Needs what scripts/setup.sh installs (qemu-user,
# libc6-dev-arm64-cross, the rustup target, .venv's cargo-zigbuild and
# ziglang). Not run here: tests/gguf_files
# (it drives the x86 Python venv) and the tokenizer/CLI tests, which hold
# no architecture-specific code.
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu
command -v qemu-aarch64 >/dev/null || { echo "test-qemu.sh: qemu-aarch64 not found: run scripts/setup.sh" >&2; exit 2; }
[ -e "$sysroot/lib/ld-linux-aarch64.so.1" ] || { echo "test-qemu.sh: no arm64 glibc in $sysroot: run scripts/setup.sh" >&2; exit 2; }
# shellcheck source=cross/zig.sh
. cross/zig.sh

cargo_test=(zig_cargo test --release --locked -p crystald)
"${cargo_test[@]}" --lib --test kernels --test engine_fixtures --no-run

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# cpu, the kernel sets it must offer (best first), the one the engine runs,
# which engine fixture tests (test-name filters and --skip options).
# The calibration tests exercise the quantizer (portable f32 code), not the
# kernels, and would take minutes emulated: they run natively only.
for spec in "cortex-a72 neon,scalar neon --skip q4_k_s --skip q6_k --skip calibration" \
    "max neon-dotprod,neon,scalar neon-dotprod q4_0_quality q8_0_quality q4_k_m q5_k_m"; do
    read -r cpu expect engine filters <<<"$spec"
    start=$SECONDS
    echo "== qemu-aarch64 -cpu $cpu: expecting kernels $expect"
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu $cpu -L $sysroot"
    export CRYSTALD_EXPECT_KERNELS=$expect CRYSTALD_TEST_KERNELS=$engine
    "${cargo_test[@]}" --lib --test kernels
    # shellcheck disable=SC2086 # the filters are separate words
    "${cargo_test[@]}" --test engine_fixtures -- --nocapture $filters 2>&1 | tee "$log"
    # The fixture tests print the kernels each model ran with; demand that
    # the NEON variant really ran (at least 2 fixtures × 2 quantized types).
    runs=$(grep -c "kernels=$engine kv=" "$log" || true)
    if [ "$runs" -lt 4 ]; then
        echo "test-qemu.sh: -cpu $cpu: expected 4 engine runs with kernels=$engine, saw $runs" >&2
        exit 1
    fi
    echo "== qemu-aarch64 -cpu $cpu: ok ($((SECONDS - start)) s, $runs engine runs with $engine)"
done
