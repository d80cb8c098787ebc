#!/usr/bin/env bash
# Side-by-side benchmark of llama.cpp and crystald on this machine, in one run.
# Not run by CI (it needs ~8 GB of disk, network access to PyPI/apt and tens of
# minutes on a 2-core machine).
#
#   scripts/bench-vs-llama.sh
#
# What it does (every step is cached under $WORK, so reruns only measure):
#  1. fetches llama.cpp's source from PyPI: the sdist of llama-cpp-python
#     ($LLAMA_CPP_PY_VERSION) vendors it under vendor/llama.cpp. Nothing of
#     llama.cpp is committed here; it lives in $WORK (.work is git-ignored).
#  2. builds llama.cpp's llama-bench with cmake: Release, CPU backend only,
#     AVX2/FMA/F16C/BMI2 plus AVX-512 F/BW/VL/VBMI/VNNI/BF16 (LLAMA_ISA=avx512,
#     what a native build uses on an AVX-512 VNNI CPU, without AMX) or not
#     (LLAMA_ISA=avx2), static, -j$JOBS under nice.
#     cmake and GNU time are installed with apt-get when missing (needs root).
#  3. writes a random-weight LLaMA-architecture GGUF with CrystalChat-7B
#     dimensions (n_embd 4096, 32 layers, 32 heads, n_ff 10944, vocab 32032,
#     context 2048), all matrices in Q4_0 including token_embd and output
#     (3.52 GiB, the file of the spec's llama.cpp anchors), with
#     scripts/llama_gguf.py (needs Python with numpy and gguf).
#  4. builds crystald and crystal-quantize, and makes crystald's q4_0 file
#     from a synthetic 7B checkpoint as scripts/bench-quantize.sh does
#     (27 GB of fp32 shards in .work/bench; skipped when the file exists).
#  5. for each thread count (2 then 1), alternating: llama-bench -p 64 -n 32
#     in default mode (Q4_0 weights repacked at load, --repack 1), llama-bench
#     with --repack 0 (plain mmap), and crystald bench once per kernel set in
#     $KERNELS (its table includes the read bandwidth of the mapped model with
#     the same threads, hence the decode ceiling); each under /usr/bin/time -v
#     for peak RSS. Both model files are read once first so that both start
#     from a warm page cache.
#  6. prints the tables (prefill and decode tok/s, peak RSS, decode against the
#     bandwidth ceiling, ratios crystald / llama.cpp default and crystald /
#     llama.cpp no-repack per kernel set) plus the machine
#     and its load average at start and end. Raw outputs and the table stay
#     in $WORK/results-<date>/.
#
# Environment (defaults in brackets):
#   WORK                  work directory [.work/llama]
#   LLAMA_CPP_PY_VERSION  llama-cpp-python sdist to take llama.cpp from [0.3.36]
#   QUANT                 q4_0 or q4_k_m [q4_0]: the format compared. q4_k_m:
#                         llama.cpp's file is made by its own llama-quantize
#                         (--allow-requantize, from an all-Q8_0 file written by
#                         llama_gguf.py) with the MLP at 11008 as crystald's
#                         k-quant presets store it; crystald's with --type q4_k_m
#   LLAMA_MODEL           llama.cpp GGUF [$WORK/llama-7b-$QUANT.gguf]; made if missing
#   CRYSTAL_MODEL         crystald GGUF [.work/bench/synth-7b-$QUANT.gguf];
#                         made if missing, e.g. CRYSTAL_MODEL=/path/synth-7b-q4_0.gguf
#                         to reuse an existing one
#   THREADS               thread counts ["2 1"]
#   KERNELS               crystald kernel sets to measure, each its own row ["auto avx2"]
#   LLAMA_ISA             llama.cpp's instruction sets: avx512 or avx2 [avx512]
#   REPS                  repetitions per measurement, medians/means reported [3]
#   ROUNDS                times the whole alternation is repeated [1]; medians over rounds
#   JOBS                  build parallelism [2]
#   PY                    Python with numpy + gguf [.venv/bin/python, else python3]
#   TOKENIZER             CrystalChat tokenizer.json [../shared/crystalchat/tokenizer.json]
#   CARGO_TARGET_DIR      honoured as usual for crystald's binaries
#
# Caveats: llama.cpp runs the LLaMA architecture (RMSNorm, SwiGLU, full
# rotary, no biases) with CrystalChat's sizes, not CrystalCoder itself;
# weights are random; llama-bench's tg32 starts from an empty KV cache while
# crystald decodes after its 64-token prompt; the machine may be shared, so
# read the load averages and compare ratios, not absolute numbers.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-.work/llama}
LLAMA_CPP_PY_VERSION=${LLAMA_CPP_PY_VERSION:-0.3.36}
LLAMA_ISA=${LLAMA_ISA:-avx512}
QUANT=${QUANT:-q4_0}
case $QUANT in q4_0 | q4_k_m) ;; *) echo "bench-vs-llama: QUANT must be q4_0 or q4_k_m" >&2; exit 1 ;; esac
LLAMA_MODEL=${LLAMA_MODEL:-$WORK/llama-7b-$QUANT.gguf}
CRYSTAL_MODEL=${CRYSTAL_MODEL:-.work/bench/synth-7b-$QUANT.gguf}
THREADS=${THREADS:-"2 1"}
KERNELS=${KERNELS:-"auto avx2"}
REPS=${REPS:-3}
ROUNDS=${ROUNDS:-1}
JOBS=${JOBS:-2}
TOKENIZER=${TOKENIZER:-../shared/crystalchat/tokenizer.json}
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
bin=${CARGO_TARGET_DIR:-target}/release
sdist_dir=$WORK/llama_cpp_python-$LLAMA_CPP_PY_VERSION
src=$sdist_dir/vendor/llama.cpp

say() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'bench-vs-llama: error: %s\n' "$*" >&2; exit 1; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

mkdir -p "$WORK"
load_start=$(loadavg)
t_start=$(date +%s)

# ---------------------------------------------------------------- 6. report
# report: the summary table of the measurements in $res (REPORT_ONLY=<results dir>
# reprints it for an earlier run without measuring anything).
report() {
{
    echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(awk '/MemTotal/ {printf "%.1f GiB", $2/2^20}' /proc/meminfo) RAM"
    echo "load average (1/5/15 min): start $(cat "$res/load-start"), end $(cat "$res/load-end"); $(cat "$res/elapsed") s in all"
    commit=$(awk -v v="## [$LLAMA_CPP_PY_VERSION]" '$0 == v {f=1; next} /^## / {f=0} f && /llama.cpp@/ {sub(/.*llama.cpp@/, ""); print; exit}' "$sdist_dir/CHANGELOG.md" 2>/dev/null || true)
    echo "llama.cpp: ggml-org/llama.cpp@${commit:-unknown} as vendored in llama-cpp-python $LLAMA_CPP_PY_VERSION (ggml $(sed -n 's/^set(GGML_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\))/\2/p' "$src/ggml/CMakeLists.txt" | paste -sd.)), CPU backend, LLAMA_ISA=$LLAMA_ISA"
    echo "llama.cpp model: $LLAMA_MODEL ($(du -b "$LLAMA_MODEL" | awk '{printf "%.2f GiB", $1/2^30}'))"
    echo "crystald model:  $CRYSTAL_MODEL ($(du -b "$CRYSTAL_MODEL" | awk '{printf "%.2f GiB", $1/2^30}')), crystald $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src quantize Cargo.toml Cargo.lock || echo '+dirty')"
    echo "crystald kernels: $KERNELS ($(grep -ho '^kernels [a-z0-9-]*' "$res"/crystald-*-r1.err | sort -u | paste -sd, | sed 's/kernels //g') as run)"
    echo "CPU flags (SIMD): $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|fma|f16c|sse4|ssse3|amx)' | sort | paste -sd' ')"
    echo "reps $REPS per measurement, $ROUNDS round(s); prompt 64 tokens, 32 generated; medians"
    echo
    RES=$res THREADS=$THREADS ROUNDS=$ROUNDS KERNELS=$KERNELS "$PY" - <<'EOF'
import json, os, re, statistics as st
res, rounds = os.environ["RES"], int(os.environ["ROUNDS"])
threads = os.environ["THREADS"].split()

def peak_gib(name):
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{res}/{name}.time").read())
    return int(m.group(1)) / 2**20

def load1(name):  # 1-minute load average before and after the run
    v = [l.split()[1] for l in open(f"{res}/{name}.load")]
    return "→".join(v)

def llama(name):
    """medians of llama-bench's per-repetition samples, and their min-max."""
    pp = tg = None
    for line in open(f"{res}/{name}.out"):
        if not line.startswith("{"):
            continue
        j = json.loads(line)
        if j["n_prompt"] > 0 and j["n_gen"] == 0:
            pp = j["samples_ts"]
        elif j["n_gen"] > 0 and j["n_prompt"] == 0:
            tg = j["samples_ts"]
    spread = f"pp {min(pp):.2f}-{max(pp):.2f}, tg {min(tg):.2f}-{max(tg):.2f}"
    return st.median(pp), st.median(tg), peak_gib(name), spread

def crystald(name):
    rows = [l for l in open(f"{res}/{name}.out") if re.match(r"\|\s*(cpu|cuda)\s*\|\s*\d+\s*\|", l)]
    c = [x.strip() for x in rows[-1].strip().strip("|").split("|")]
    # device, threads, prefill, decode, load ms, peak RSS MiB, anon RSS MiB,
    # KV MiB, GPU MiB, read GB/s, ceiling tok/s, decode / ceiling (medians)
    return (float(c[2]), float(c[3]), peak_gib(name),
            f"(medians only; anon {c[6]} MiB; read {c[9]} GB/s, ceiling {c[10]} tok/s)", float(c[10]))

engines = [("llama.cpp default (repack)", "llama-default", llama),
           ("llama.cpp --repack 0 (mmap)", "llama-norepack", llama)]
engines += [(f"crystald {k}", f"crystald-{k}", crystald) for k in os.environ["KERNELS"].split()]
table = {}
print("| engine | threads | prefill pp64 tok/s | decode tg32 tok/s | peak RSS GiB | samples min-max | load 1m before→after |")
print("|---|---|---|---|---|---|---|")
for t in threads:
    for label, key, f in engines:
        names = [f"{key}-t{t}-r{r}" for r in range(1, rounds + 1)]
        vals = [f(n) for n in names]
        pp, tg, rss = (st.median([v[i] for v in vals]) for i in range(3))
        ceil = st.median([v[4] for v in vals]) if len(vals[0]) > 4 else None
        table[(key, t)] = (pp, tg, rss, ceil)
        spread = "; ".join(v[3] for v in vals)
        loads = "; ".join(load1(n) for n in names)
        print(f"| {label} | {t} | {pp:.2f} | {tg:.2f} | {rss:.2f} | {spread} | {loads} |")
print()
print("Bandwidth ceiling: decode tok/s if every byte of crystald's model file streamed at the")
print("read bandwidth that crystald bench measures with the same threads, in the same process.")
print()
print("| crystald kernels | threads | ceiling tok/s | crystald decode / ceiling | llama.cpp default decode / ceiling |")
print("|---|---|---|---|---|")
for t in threads:
    for label, key, f in engines[2:]:
        c = table[(key, t)]
        l = table[("llama-default", t)]
        print(f"| {label} | {t} | {c[3]:.2f} | {100 * c[1] / c[3]:.0f} % | {100 * l[1] / c[3]:.0f} % |")
print()
print("| ratio crystald / llama.cpp | threads | prefill | decode | peak RSS |")
print("|---|---|---|---|---|")
for t in threads:
    for clabel, ckey, _ in engines[2:]:
        c = table[(ckey, t)]
        for label, key in [("vs default (repack)", "llama-default"), ("vs --repack 0", "llama-norepack")]:
            l = table[(key, t)]
            print(f"| {clabel} {label} | {t} | {c[0] / l[0]:.2f} | {c[1] / l[1]:.2f} | {c[2] / l[2]:.2f} |")
EOF
    echo
    echo "tok/s: medians over the repetitions (llama-bench samples; crystald bench's own medians)."
    echo "peak RSS: /usr/bin/time -v maximum resident set size (crystald: of its largest"
    echo "per-measurement child process). Raw outputs are in $res."
} | tee "$res/summary.md"
}

if [ -n "${REPORT_ONLY:-}" ]; then
    res=$REPORT_ONLY
    [ -f "$res/load-end" ] || die "$res: not a finished results directory"
    report
    exit 0
fi

# ---------------------------------------------------------------- tools
need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
[ -x /usr/bin/time ] || need_apt+=(time)
command -v c++ >/dev/null || need_apt+=(g++)
if [ ${#need_apt[@]} -gt 0 ]; then
    say "installing ${need_apt[*]} with apt-get"
    [ "$(id -u)" = 0 ] || die "need root to apt-get install ${need_apt[*]} (or install them yourself)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}" >/dev/null ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}" >/dev/null; } ||
        die "apt-get install ${need_apt[*]} failed"
fi
"$PY" -c 'import numpy, gguf' 2>/dev/null ||
    die "$PY lacks numpy/gguf: set PY to a Python that has them (e.g. PY=/path/.venv/bin/python)"

# ---------------------------------------------------------------- 1. llama.cpp source
if [ ! -f "$src/CMakeLists.txt" ]; then
    tarball=$WORK/llama_cpp_python-$LLAMA_CPP_PY_VERSION.tar.gz
    if [ ! -f "$tarball" ]; then
        say "downloading llama-cpp-python $LLAMA_CPP_PY_VERSION sdist from PyPI (vendors llama.cpp)"
        # Straight from the index: `pip download` of an sdist prepares its
        # metadata, which builds cmake from source under --no-binary.
        TARBALL=$tarball "$PY" - "$LLAMA_CPP_PY_VERSION" <<'EOF' ||
import os, re, sys, urllib.request
name = f"llama_cpp_python-{sys.argv[1]}.tar.gz"
index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/").read().decode()
urls = [u.replace("&amp;", "&") for u in re.findall(r'href="([^"]+)"', index) if f"/{name}" in u]
if not urls:
    sys.exit(f"{name} is not on PyPI")
urllib.request.urlretrieve(urls[0], os.environ["TARBALL"])
EOF
            die "download of llama-cpp-python $LLAMA_CPP_PY_VERSION failed"
    fi
    say "extracting $tarball"
    tar -xzf "$tarball" -C "$WORK"
    [ -f "$src/CMakeLists.txt" ] || die "no vendor/llama.cpp in $tarball"
fi

# ---------------------------------------------------------------- 2. llama-bench
# The instruction sets: LLAMA_ISA=avx512 (default) adds AVX-512 F/BW/VL/VBMI/VNNI/BF16
# to AVX2, which is what a native build picks on an AVX-512 VNNI CPU and what
# crystald's avx512 kernels compete with; LLAMA_ISA=avx2 builds the edge-box
# ISA (AVX2/FMA/F16C). Set explicitly rather than GGML_NATIVE: on a CPU that
# reports AMX (the VMs this runs on can) a native build picks ggml's AMX path,
# which dies with SIGILL when the hypervisor does not enable AMX tile state.
case $LLAMA_ISA in
avx512) isa_flags=(-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON) ;;
avx2) isa_flags=(-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF) ;;
*) die "LLAMA_ISA must be avx512 or avx2, not '$LLAMA_ISA'" ;;
esac
build=$WORK/build-$LLAMA_CPP_PY_VERSION-$LLAMA_ISA
llama_bench=$build/bin/llama-bench
llama_quantize=$build/bin/llama-quantize
cmake_flags=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_CCACHE=OFF
    -DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON
    -DGGML_AVX_VNNI=OFF "${isa_flags[@]}"
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
    -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON)
stamp=$build/bench-vs-llama.flags
if [ ! -x "$llama_bench" ] || [ ! -x "$llama_quantize" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${cmake_flags[*]}" ]; then
    say "building llama-bench and llama-quantize (CPU, $LLAMA_ISA, Release, -j$JOBS, nice); tens of minutes on 2 cores"
    nice -n 19 cmake -S "$src" -B "$build" "${cmake_flags[@]}" >"$WORK/cmake-configure.log" 2>&1 ||
        die "cmake configure failed, see $WORK/cmake-configure.log"
    nice -n 19 cmake --build "$build" --target llama-bench llama-quantize -j "$JOBS" >"$WORK/cmake-build.log" 2>&1 ||
        die "llama-bench build failed, see $WORK/cmake-build.log"
    echo "${cmake_flags[*]}" >"$stamp"
fi
"$llama_bench" --help 2>&1 | grep -q -- '--repack' ||
    die "this llama-bench has no --repack option; cannot measure the no-repack mode"

# ---------------------------------------------------------------- 3. llama GGUF
if [ ! -f "$LLAMA_MODEL" ] && [ "$QUANT" = q4_0 ]; then
    say "writing $LLAMA_MODEL (random Q4_0 weights, CrystalChat-7B dimensions)"
    nice -n 10 "$PY" scripts/llama_gguf.py --tokenizer "$TOKENIZER" -o "$LLAMA_MODEL"
elif [ ! -f "$LLAMA_MODEL" ]; then
    q8=$WORK/llama-7b-q8_0-ff11008.gguf
    if [ ! -f "$q8" ]; then
        say "writing $q8 (random Q8_0 weights, CrystalChat-7B dimensions, MLP 11008)"
        nice -n 10 "$PY" scripts/llama_gguf.py --tokenizer "$TOKENIZER" --matrix-type q8_0 \
            --emb-type q8_0 --out-type q8_0 --n-ff 11008 -o "$q8"
    fi
    say "llama-quantize: $q8 -> $LLAMA_MODEL (Q4_K_M)"
    nice -n 10 "$llama_quantize" --allow-requantize "$q8" "$LLAMA_MODEL.tmp" Q4_K_M "$JOBS" >"$WORK/llama-quantize.log" 2>&1 ||
        die "llama-quantize failed, see $WORK/llama-quantize.log"
    mv "$LLAMA_MODEL.tmp" "$LLAMA_MODEL"
fi

# ---------------------------------------------------------------- 4. crystald
say "building crystald and crystal-quantize (release, nice)"
nice -n 19 cargo build --release --locked -j "$JOBS" -p crystald -p crystal-quantize
if [ ! -f "$CRYSTAL_MODEL" ]; then
    ckpt=.work/bench/synth-7b-bin
    if [ ! -f "$ckpt/pytorch_model.bin.index.json" ]; then
        say "making a synthetic 7B fp32 checkpoint in $ckpt (27 GB)"
        "$bin/crystal-quantize" synth --shape 7b --format bin-f32 --shards 4 --tokenizer "$TOKENIZER" -o "$ckpt"
    fi
    say "quantizing to $CRYSTAL_MODEL ($QUANT)"
    mkdir -p "$(dirname "$CRYSTAL_MODEL")"
    "$bin/crystal-quantize" "$ckpt" -o "$CRYSTAL_MODEL" --type "$QUANT"
fi

# ---------------------------------------------------------------- 5. measure
res=$WORK/results-$(date +%Y%m%d-%H%M%S)
mkdir -p "$res"
say "warming the page cache with both model files"
cat "$LLAMA_MODEL" "$CRYSTAL_MODEL" >/dev/null

# run NAME CMD...: stdout to $res/NAME.out, stderr to NAME.err, time -v to NAME.time,
# load average before/after to NAME.load
run() {
    local name=$1
    shift
    echo "before $(loadavg)" >"$res/$name.load"
    local t0=$SECONDS
    /usr/bin/time -v -o "$res/$name.time" "$@" >"$res/$name.out" 2>"$res/$name.err" ||
        die "$name failed: $(tail -5 "$res/$name.err")"
    echo "after $(loadavg)" >>"$res/$name.load"
    printf '    %-26s %4ds  peak RSS %s KiB  (load %s)\n' "$name" $((SECONDS - t0)) \
        "$(awk -F': ' '/Maximum resident/ {print $2}' "$res/$name.time")" "$(loadavg)" >&2
}

for r in $(seq 1 "$ROUNDS"); do
    for t in $THREADS; do
        say "round $r/$ROUNDS, $t thread(s)"
        run "llama-default-t$t-r$r" "$llama_bench" -m "$LLAMA_MODEL" -p 64 -n 32 -t "$t" -r "$REPS" --repack 1 -o jsonl
        run "llama-norepack-t$t-r$r" "$llama_bench" -m "$LLAMA_MODEL" -p 64 -n 32 -t "$t" -r "$REPS" --repack 0 -o jsonl
        for k in $KERNELS; do
            run "crystald-$k-t$t-r$r" "$bin/crystald" bench -m "$CRYSTAL_MODEL" --kernels "$k" --threads-list "$t" --reps "$REPS"
        done
    done
done
echo "$load_start" >"$res/load-start"
loadavg >"$res/load-end"
echo $(($(date +%s) - t_start)) >"$res/elapsed"
report

