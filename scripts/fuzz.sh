#!/usr/bin/env bash
# Fuzzes every parser that reads outside data (targets in tests/fuzz, see
# the README's "Reliability" section) for a fixed time per target.
#
#   scripts/fuzz.sh                  # every target, $FUZZ_SECONDS (default 20) s each
#   scripts/fuzz.sh 600              # the long run: 10 min per target
#   scripts/fuzz.sh 60 gguf pickle   # some targets
#
# Environment: FUZZ_SECONDS (per target, when no argument gives it),
# FUZZ_SANITIZER (none, the default: safe Rust needs no ASan to report a
# panic, overflow or OOM, and builds and runs ~2x faster; address for the
# long run), FUZZ_JOBS (parallel libFuzzer jobs per target, default 1).
#
# Seeds are regenerated from the fixtures and test cases by
# scripts/fuzz-seeds.py into tests/fuzz/corpus/<target>/ (not committed);
# what libFuzzer adds there is kept between runs. A crash stops nothing but
# fails the script: the input is saved as tests/fuzz/artifacts/<target>/crash-*,
# reproduce it with the command printed below, then turn it into a regression
# test in the crate's own tests. Needs cargo-fuzz (scripts/setup.sh installs
# it); only a stable toolchain exists, so RUSTC_BOOTSTRAP=1 lets cargo-fuzz
# use the unstable flags it needs (-Zsanitizer for address).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-20}
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then
    seconds=$1
    shift
fi
all=(gguf safetensors pytorch zip pickle request http chat detokenize calibration)
targets=("${@:-${all[@]}}")
sanitizer=${FUZZ_SANITIZER:-none}
jobs=${FUZZ_JOBS:-1}
fuzz_dir=tests/fuzz
export RUSTC_BOOTSTRAP=1
# The fuzz crate has its own target dir (instrumented builds share nothing
# with the workspace's).
export CARGO_TARGET_DIR="$PWD/$fuzz_dir/target"

PATH="$HOME/.cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is missing; run scripts/setup.sh" >&2
    exit 1
fi
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
"$python" scripts/fuzz-seeds.py "$fuzz_dir/corpus"

# One build for every target: cargo-fuzz's release build (one codegen unit
# per crate), with debug assertions and overflow checks. (Measured: more
# codegen units, or --dev with optimised dependencies, cost more CPU time.)
build_start=$SECONDS
cargo fuzz build --fuzz-dir "$fuzz_dir" -s "$sanitizer" -a
echo "fuzz.sh: built the fuzz targets in $((SECONDS - build_start)) s"
bin="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"

failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "$fuzz_dir/artifacts/$t" "$fuzz_dir/corpus/$t"
    log="$fuzz_dir/artifacts/$t/last-run.log"
    echo "fuzz.sh: $t for ${seconds} s"
    rc=0
    extra=()
    # Encoding text with the real tokenizer dominates `chat`; shorter
    # conversations give it ~10x more executions.
    [ "$t" = chat ] && extra=(-max_len=1024)
    parallel=()
    # -jobs makes libFuzzer log to fuzz-N.log files; only for more than one.
    [ "$jobs" -gt 1 ] && parallel=(-jobs="$jobs" -workers="$jobs")
    # -timeout: one input taking 10 s is a hang; -rss_limit_mb: a parser
    # that allocates 2 GB for a small input is a bug too.
    "$bin/$t" "$fuzz_dir/corpus/$t" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$fuzz_dir/artifacts/$t/" -print_final_stats=1 \
        "${extra[@]}" "${parallel[@]}" >"$log" 2>&1 || rc=$?
    [ "$jobs" -gt 1 ] && cat fuzz-*.log >>"$log" 2>/dev/null && rm -f fuzz-*.log
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{s += $2} END {print s + 0}')
    corpus=$(find "$fuzz_dir/corpus/$t" -type f | wc -l)
    if [ "$rc" != 0 ]; then
        failed+=("$t")
        tail -n 40 "$log" >&2
        crash=$(grep -o 'Test unit written to [^ ]*' "$log" | tail -n 1 | awk '{print $5}' || true)
        echo "fuzz.sh: $t FAILED; reproduce: $bin/$t ${crash:-<the input in $fuzz_dir/artifacts/$t/>}" >&2
        summary+=("$(printf '%-12s %12s execs  corpus %5s  FAILED' "$t" "$execs" "$corpus")")
    else
        summary+=("$(printf '%-12s %12s execs  corpus %5s  ok' "$t" "$execs" "$corpus")")
    fi
done

echo "fuzz.sh: ${seconds} s per target, sanitizer $sanitizer:"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: crashes in: ${failed[*]}" >&2
    exit 1
fi
