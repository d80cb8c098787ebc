#!/usr/bin/env python3
"""Write a random-weight LLaMA-architecture GGUF with CrystalChat-7B dimensions,
for benchmarking llama.cpp beside crystald (scripts/bench-vs-llama.sh).

    python scripts/llama_gguf.py --tokenizer ../shared/crystalchat/tokenizer.json \
        -o .work/llama/llama-7b-q4_0.gguf [--emb-type q4_0|q8_0] [--out-type q4_0|q8_0] \
        [--matrix-type q4_0|q8_0|f32] [--n-ff 10944] [--small]

Dimensions: n_embd 4096, 32 layers, 32 heads (no GQA), n_ff 10944 (CrystalCoder's
n_inner padded to a multiple of 32, as crystald does), vocab 32032, context 2048.
Every matrix is Q4_0 by default, token_embd and output included: that matches the
3.52 GiB file of the spec's llama.cpp measurements (llama-quantize's own Q4_0 mix
would put output.weight in Q6_K; crystald's q4_0 preset keeps its single tied
embedding in Q8_0). Norm weights are f32 ones.

For the k-quant comparison (bench-vs-llama.sh with QUANT=q4_k_m) the script
writes every matrix in Q8_0 with --n-ff 11008 (CrystalCoder's n_inner padded to
whole 256-value super-blocks, as crystald's k-quant presets store it), which
llama.cpp's llama-quantize --allow-requantize turns into its own Q4_K_M mix.

--small with f32 types makes the input of scripts/compare-llama-quantize.sh:
n_embd 512, 2 layers, MLP 1536, every matrix f32 from a normal distribution.

Q4_0 blocks are random bytes with a small random f16 scale (0.002-0.006), so
activations stay finite; the values are meaningless, the shapes and types are
what the benchmark needs. Only the architecture's shapes matter for speed:
CrystalCoder's biases, LayerNorm and partial rotary are not represented.

Memory stays bounded: tensor infos are declared first, then each tensor is
generated and written on its own. Output goes to <out>.tmp and is renamed at the end.
"""
import argparse
import json
import os
import sys

import numpy as np

try:
    import gguf
except ImportError:  # pragma: no cover
    sys.exit("llama_gguf.py: the Python 'gguf' package is needed (pip install gguf)")

N_EMBD, N_LAYER, N_HEAD, N_FF, N_VOCAB, N_CTX = 4096, 32, 32, 10944, 32032, 2048

QT = gguf.GGMLQuantizationType
TYPES = {"q4_0": QT.Q4_0, "q8_0": QT.Q8_0, "f32": QT.F32}
# bytes per block of 32 weights, offset of the f16 scale is 0 in both
BLOCK_BYTES = {QT.Q4_0: 18, QT.Q8_0: 34}


def vocab(tokenizer_path):
    """tokens, scores, token types for a SentencePiece-style ("llama") vocab."""
    tok = json.load(open(tokenizer_path, encoding="utf-8"))
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    special = set()
    for a in tok.get("added_tokens", []):
        by_id[a["id"]] = a["content"]
        if a.get("special"):
            special.add(a["id"])
    T = gguf.TokenType
    tokens, scores, types = [], [], []
    for i in range(N_VOCAB):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        else:
            tokens.append(t)
            if i == 0:
                types.append(T.UNKNOWN)
            elif i in special:
                types.append(T.CONTROL)
            elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types.append(T.BYTE)
            else:
                types.append(T.NORMAL)
        scores.append(-float(i))
    return tokens, scores, types


def random_blocks(rng, rows, cols, qtype):
    nb = rows * cols // 32
    bb = BLOCK_BYTES[qtype]
    data = np.frombuffer(rng.bytes(nb * bb), dtype=np.uint8).reshape(nb, bb).copy()
    if qtype == QT.Q8_0:  # keep int8 quants within +-64 so the row sums stay small
        data[:, 2:] = (data[:, 2:].view(np.int8) // 2).view(np.uint8)
    d = rng.uniform(0.002, 0.006, size=nb).astype(np.float16)
    data[:, 0:2] = d.view(np.uint8).reshape(nb, 2)
    return data.reshape(rows, cols // 32 * bb)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--emb-type", default="q4_0", choices=TYPES)
    p.add_argument("--out-type", default="q4_0", choices=TYPES)
    p.add_argument("--matrix-type", default="q4_0", choices=TYPES, help="type of the layers' matrices")
    p.add_argument("--n-ff", type=int, default=N_FF, help="MLP width (a multiple of 32)")
    p.add_argument("--small", action="store_true", help="n_embd 512, 2 layers, MLP 1536")
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()
    mt, n_ff = TYPES[a.matrix_type], a.n_ff
    global N_EMBD, N_LAYER, N_HEAD
    if a.small:
        N_EMBD, N_LAYER, N_HEAD, n_ff = 512, 2, 8, 1536

    # (name, numpy shape rows x cols, type); None type = f32 vector of ones
    plan = [("token_embd.weight", (N_VOCAB, N_EMBD), TYPES[a.emb_type])]
    for l in range(N_LAYER):
        b = f"blk.{l}."
        plan += [
            (b + "attn_norm.weight", (N_EMBD,), None),
            (b + "attn_q.weight", (N_EMBD, N_EMBD), mt),
            (b + "attn_k.weight", (N_EMBD, N_EMBD), mt),
            (b + "attn_v.weight", (N_EMBD, N_EMBD), mt),
            (b + "attn_output.weight", (N_EMBD, N_EMBD), mt),
            (b + "ffn_norm.weight", (N_EMBD,), None),
            (b + "ffn_gate.weight", (n_ff, N_EMBD), mt),
            (b + "ffn_up.weight", (n_ff, N_EMBD), mt),
            (b + "ffn_down.weight", (N_EMBD, n_ff), mt),
        ]
    plan += [
        ("output_norm.weight", (N_EMBD,), None),
        ("output.weight", (N_VOCAB, N_EMBD), TYPES[a.out_type]),
    ]

    tmp = a.output + ".tmp"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("crystalchat-7b-shaped random llama (benchmark only)")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(N_VOCAB)
    w.add_file_type({QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}.get(mt, gguf.LlamaFileType.ALL_F32))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, scores, types = vocab(a.tokenizer)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    for name, shape, qt in plan:
        if qt is None:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            rows, cols = shape
            if qt == QT.F32:
                w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * rows * cols)
                continue
            nbytes = rows * cols // 32 * BLOCK_BYTES[qt]
            w.add_tensor_info(name, (rows, cols // 32 * BLOCK_BYTES[qt]), np.dtype(np.uint8), nbytes, raw_dtype=qt)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(a.seed)
    for k, (name, shape, qt) in enumerate(plan):
        if qt is None:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        elif qt == QT.F32:
            w.write_tensor_data(rng.normal(0.0, 0.02, size=shape).astype(np.float32))
        else:
            w.write_tensor_data(random_blocks(rng, shape[0], shape[1], qt))
        if k % 45 == 0:
            print(f"  {k + 1}/{len(plan)} {name}", file=sys.stderr, flush=True)
    w.close()
    os.replace(tmp, a.output)
    print(f"wrote {a.output} ({os.path.getsize(a.output) / 2**30:.2f} GiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
