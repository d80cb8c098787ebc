#!/usr/bin/env bash
# Benchmark of the quantizer at full scale: makes a synthetic checkpoint with
# the real CrystalChat 7B shapes in the published layout (four fp32 PyTorch
# shards, 27 GB), converts it to the q4_0 preset and prints wall time, input
# GB/s and peak RSS (the quantizer's own summary line). Needs ~31 GB of disk.
#
#   scripts/bench-quantize.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-.work/bench}
mkdir -p "$work"
cargo build --release --locked -p crystal-quantize
q=target/release/crystal-quantize
ckpt=$work/synth-7b-bin
if [ ! -f "$ckpt/pytorch_model.bin.index.json" ]; then
    "$q" synth --shape 7b --format bin-f32 --shards 4 --tokenizer ../shared/crystalchat/tokenizer.json -o "$ckpt"
fi
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB RAM, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
"$q" "$ckpt" -o "$work/synth-7b-q4_0.gguf" --type q4_0 --force
