#!/usr/bin/env bash
# crystal-quantize's blocks against llama.cpp's llama-quantize on the same f32
# rows: a small random LLaMA-architecture f32 GGUF (scripts/llama_gguf.py
# --small) is quantized by llama-quantize --pure to one type at a time, and
# quantize/examples/compare_blocks.rs re-encodes every f32 row with our
# quantizer and counts byte-identical blocks (README, "k-quants").
#
#   scripts/compare-llama-quantize.sh
#
# Needs llama-quantize, which scripts/bench-vs-llama.sh builds
# (LLAMA_QUANTIZE [.work/llama/build-0.3.36-$LLAMA_ISA/bin/llama-quantize],
# LLAMA_ISA [avx2]), and .venv's Python with gguf and numpy.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-.work/llama}
LLAMA_ISA=${LLAMA_ISA:-avx2}
LLAMA_QUANTIZE=${LLAMA_QUANTIZE:-$WORK/build-0.3.36-$LLAMA_ISA/bin/llama-quantize}
PY=${PY:-.venv/bin/python}
TOKENIZER=${TOKENIZER:-../shared/crystalchat/tokenizer.json}
[ -x "$LLAMA_QUANTIZE" ] || { echo "compare-llama-quantize: no $LLAMA_QUANTIZE (build it with scripts/bench-vs-llama.sh)" >&2; exit 1; }
src=$WORK/small-f32.gguf
[ -f "$src" ] || "$PY" scripts/llama_gguf.py --tokenizer "$TOKENIZER" --small \
    --matrix-type f32 --emb-type f32 --out-type f32 -o "$src"
cargo build --release --locked -q -p crystal-quantize --example compare_blocks
for q in Q4_K_S Q5_K_S Q6_K Q4_0 Q8_0; do
    out=$WORK/small-$q-pure.gguf
    "$LLAMA_QUANTIZE" --pure "$src" "$out" "$q" 2 >"$WORK/llama-quantize-$q.log" 2>&1 ||
        { echo "llama-quantize $q failed: see $WORK/llama-quantize-$q.log" >&2; exit 1; }
    echo "== llama-quantize --pure $q"
    "${CARGO_TARGET_DIR:-target}/release/examples/compare_blocks" "$src" "$out"
done
