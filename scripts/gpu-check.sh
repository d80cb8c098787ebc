#!/usr/bin/env bash
# The CUDA backend on a real GPU, in two halves:
#
#   scripts/gpu-check.sh prepare   # here (Rust, ../shared): builds and packs
#   scripts/gpu-check.sh run       # on the GPU machine: needs nothing else
#
# `prepare` builds crystald and crystal-quantize (release, --features cuda)
# and the engine_fixtures test binary, all against glibc 2.31, and copies them with the tiny-a
# fixture and the tokenizer into .gpu-check/ (about 60 MB; ignored by git,
# listed in .git/info/exclude), which is all `run` reads.
#
# `run` (under 8 minutes on one H200 with 16 cores), from the repository root:
# 1. the fixture comparisons of tests/engine_fixtures.rs with the model on
#    the GPU (CRYSTALD_TEST_DEVICE=cuda): f32 relative L2 <= 1e-4 and the
#    upstream greedy tokens, f16 <= 2e-3, q8_0, q4_0, q4_k_m and q5_k_m
#    within the CPU's bounds, decode through the KV cache equal to a full
#    recompute;
# 2. the 7B-shape synthetic checkpoint converted to q4_0, then
#    `crystald bench` on the GPU (pp512 and pp64 prefill, tg128 decode, load
#    time, GPU memory, host RSS, decode as a share of the bandwidth ceiling)
#    beside the same on that machine's CPU.
# Results go to stdout and, when $OUT is set, to $OUT/gpu-check.log.
# A dry run of the script on the CPU stand-in driver (CRYSTALD_CUDA_DRIVER,
# see tests/cuda_emu) checks the script rather than the GPU:
# GPU_CHECK_SHAPE=tiny GPU_CHECK_PP=128 (the tiny shape's context is 256),
# GPU_CHECK_FIXTURES=0 skips step 1.
set -euo pipefail
cd "$(dirname "$0")/.."
pack=.gpu-check

prepare() {
    grep -qx "/$pack/" .git/info/exclude 2>/dev/null || echo "/$pack/" >>.git/info/exclude
    rm -rf "$pack"
    mkdir -p "$pack/bin" "$pack/shared/fixtures" "$pack/shared/crystalchat"
    # Linked against glibc 2.31 like the release binaries (cross/zig.sh):
    # the GPU machine's OS may be older than this one's.
    target=x86_64-unknown-linux-gnu
    # shellcheck source=cross/zig.sh
    . cross/zig.sh
    zig_cargo build --release --locked -p crystald -p crystal-quantize --bins --features crystald/cuda
    cp "target/$target/release/crystald" "target/$target/release/crystal-quantize" "$pack/bin/"
    local test_bin
    test_bin=$(zig_cargo test --release --locked -p crystald --features cuda --test engine_fixtures \
        --no-run --message-format=json 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*engine_fixtures[^"]*\)".*/\1/p' | tail -1)
    [ -x "$test_bin" ] || { echo "gpu-check: engine_fixtures test binary not found" >&2; exit 1; }
    cp "$test_bin" "$pack/bin/engine_fixtures"
    strip "$pack"/bin/*
    cp -r ../shared/fixtures/tiny-a "$pack/shared/fixtures/"
    cp ../shared/crystalchat/tokenizer.json "$pack/shared/crystalchat/"
    du -sh "$pack"
}

run() {
    [ -x "$pack/bin/crystald" ] || { echo "gpu-check: run 'scripts/gpu-check.sh prepare' first" >&2; exit 2; }
    local log=${OUT:-/tmp}/gpu-check.log
    exec > >(tee "$log") 2>&1
    local bin=$PWD/$pack/bin
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    lscpu | grep -E '^Model name|^CPU\(s\)' || true
    local cores
    cores=$(nproc)

    local t=$SECONDS
    if [ "${GPU_CHECK_FIXTURES:-1}" = 1 ]; then
        echo "== fixtures on the GPU (tiny-a)"
        CRYSTALD_SHARED=$PWD/$pack/shared CRYSTALD_TEST_DEVICE=cuda CRYSTALD_TEST_FIXTURES=tiny-a \
            CRYSTALD_TEST_KERNELS=scalar "$bin/engine_fixtures" --test-threads 1 --nocapture \
            f32_matches_reference f16_matches_reference q8_0_quality q4_0_quality \
            q4_k_m_quality q5_k_m_quality decode_through_the_cache ||
            echo "gpu-check: FIXTURE COMPARISON FAILED"
        echo "fixtures took $((SECONDS - t)) s"
    fi

    local shape=${GPU_CHECK_SHAPE:-7b}
    echo "== $shape-shape q4_0 file"
    t=$SECONDS
    local work=/tmp/crystald-gpu-check
    mkdir -p "$work"
    "$bin/crystal-quantize" synth --shape "$shape" --tokenizer "$pack/shared/crystalchat/tokenizer.json" -o "$work/synth"
    "$bin/crystal-quantize" "$work/synth" -o "$work/$shape-q4_0.gguf" --type q4_0 --force --threads "$cores"
    rm -rf "$work/synth"
    echo "conversion took $((SECONDS - t)) s"

    local m=$work/$shape-q4_0.gguf
    local pp=${GPU_CHECK_PP:-512}
    echo "== GPU: pp$pp + tg128, then pp64"
    "$bin/crystald" bench -m "$m" --device cuda --threads-list 1 --prompt-tokens "$pp" --gen-tokens 128 --reps 1 ||
        echo "gpu-check: GPU BENCH FAILED"
    "$bin/crystald" bench -m "$m" --device cuda --threads-list 1 --prompt-tokens 64 --gen-tokens 16 --reps 1 ||
        echo "gpu-check: GPU BENCH FAILED"
    echo "== CPU of the same machine ($cores threads): pp64 + tg16"
    "$bin/crystald" bench -m "$m" --device cpu --threads-list "$cores" --prompt-tokens 64 --gen-tokens 16 --reps 1 ||
        echo "gpu-check: CPU BENCH FAILED"
    echo "gpu-check: done in $SECONDS s"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
