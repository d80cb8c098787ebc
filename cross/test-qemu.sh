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
# natively): all of them on the Cortex-A72, only the quantized ones on
# `max`, since the quantized block product is the only code the two
# variants do not share. About 2.5 minutes emulated. Timings under qemu
# say nothing about speed on hardware.
#
# Release profile, so the build is shared with `cross/build.sh --release`.
# Needs what scripts/setup.sh installs (qemu-user, gcc-aarch64-linux-gnu,
# libc6-dev-arm64-cross, the rustup target). Not run here: tests/gguf_files
# (it drives the x86 Python venv) and the tokenizer/CLI tests, which hold
# no architecture-specific code.
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER:-aarch64-linux-gnu-gcc}
export CC_aarch64_unknown_linux_gnu=${CC_aarch64_unknown_linux_gnu:-aarch64-linux-gnu-gcc}
for tool in qemu-aarch64 "$CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER"; do
    command -v "$tool" >/dev/null || { echo "test-qemu.sh: $tool not found: run scripts/setup.sh" >&2; exit 2; }
done

cargo_test=(cargo test --release --locked --target "$target" -p crystald)
"${cargo_test[@]}" --lib --test kernels --test engine_fixtures --no-run

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# cpu, the kernel sets it must offer (best first), the one the engine runs,
# which engine fixture tests (none named: all).
for spec in "cortex-a72 neon,scalar neon" "max neon-dotprod,neon,scalar neon-dotprod q4_0_quality q8_0_quality"; do
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
