#!/usr/bin/env bash
# The main job end to end: convert a CrystalChat checkpoint into one int4
# GGUF file and answer a prompt with it.
#
#   scripts/demo.sh /path/to/CrystalChat "What is a Raspberry Pi?"
#
# Without a checkpoint directory it makes a small random-weight one in the
# real layout (the reply is then gibberish, through the real path).
set -euo pipefail
cd "$(dirname "$0")/.."

hf_dir=${1:-}
prompt=${2:-"Write a haiku about edge devices."}
work=.work/demo
mkdir -p "$work"

cargo build --release --locked -p crystald -p crystal-quantize
bin=target/release

if [ -z "$hf_dir" ]; then
    hf_dir=$work/synthetic-tiny
    tokenizer=../shared/crystalchat/tokenizer.json
    [ -f "$tokenizer" ] || { echo "demo: no checkpoint given and $tokenizer not found" >&2; exit 2; }
    [ -f "$hf_dir/config.json" ] || "$bin/crystal-quantize" synth --shape tiny --format safetensors-bf16 --tokenizer "$tokenizer" -o "$hf_dir"
fi

model=$work/$(basename "$hf_dir")-q4_0.gguf
"$bin/crystal-quantize" "$hf_dir" -o "$model" --type q4_0 --force
"$bin/crystald" generate --model "$model" --prompt "$prompt" --max-tokens 64 --seed 42
