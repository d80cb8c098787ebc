"""Reads a crystald GGUF file with the reference `gguf` package and checks it
against independently laid-out source values.

usage: check_gguf.py MODEL.gguf EXPECTED.safetensors

EXPECTED holds, for every tensor of the file, the f32 values it should
encode (checkpoint values transposed and padded into file layout). f32 and
f16 tensors must equal them exactly; Q8_0 and Q4_0 tensors must be
byte-identical to gguf.quants.quantize of them. gguf has no quantizer for
the k-quants (Q4_K, Q5_K, Q6_K): for those EXPECTED holds crystald's own
dequantization, which gguf.quants.dequantize must reproduce bit for bit.
"""
import sys

import gguf
import numpy as np
import xxhash
from safetensors.numpy import load_file

CHECKSUM_KEY = "crystald.checksum.xxh3_64"


def check_checksum(path, reader):
    """The recorded checksum is XXH3-64 of the whole file with its own
    8-byte value read as zeros, computed here independently."""
    f = reader.fields[CHECKSUM_KEY]
    assert f.types[0] == gguf.GGUFValueType.UINT64, f"{CHECKSUM_KEY} is {f.types[0]}"
    stored = int(f.parts[f.data[0]][0])
    data = bytearray(open(path, "rb").read())
    key = CHECKSUM_KEY.encode()
    at = data.find(key) + len(key) + 4  # the key, then the u32 value type
    assert int.from_bytes(data[at:at + 8], "little") == stored
    data[at:at + 8] = bytes(8)
    actual = xxhash.xxh3_64_intdigest(bytes(data))
    assert actual == stored, f"checksum {stored:016x} recorded, file hashes to {actual:016x}"

K_QUANTS = (
    gguf.GGMLQuantizationType.Q4_K,
    gguf.GGMLQuantizationType.Q5_K,
    gguf.GGMLQuantizationType.Q6_K,
)

REQUIRED = [
    "general.architecture",
    "general.alignment",
    "crystalcoder.context_length",
    "crystalcoder.embedding_length",
    "crystalcoder.block_count",
    "crystalcoder.feed_forward_length",
    "crystalcoder.feed_forward_length_original",
    "crystalcoder.attention.head_count",
    "crystalcoder.attention.layer_norm_epsilon",
    "crystalcoder.rope.dimension_count",
    "crystalcoder.rope.freq_base",
    "crystalcoder.vocab_size",
    "crystalcoder.mup.embeddings_scale",
    "crystalcoder.mup.output_alpha",
    "crystalcoder.mup.width_scale",
    "crystalcoder.mup.scale_qk_dot_by_d",
    "tokenizer.huggingface.json",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.crystalchat.im_start_token_id",
    "tokenizer.crystalchat.im_end_token_id",
    "tokenizer.crystalchat.sys_start_token_id",
    "tokenizer.crystalchat.sys_end_token_id",
]


def field_value(reader, key):
    f = reader.fields[key]
    part = f.parts[f.data[0]]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part[0]


def main(path, expected_path):
    reader = gguf.GGUFReader(path)
    missing = [k for k in REQUIRED if k not in reader.fields]
    assert not missing, f"metadata missing: {missing}"
    assert field_value(reader, "general.architecture") == "crystalcoder"
    check_checksum(path, reader)
    tok = field_value(reader, "tokenizer.huggingface.json")
    assert '"<|im_start|>"' in tok, "embedded tokenizer lacks the chat tokens"
    assert field_value(reader, "tokenizer.crystalchat.im_start_token_id") == 32018

    expected = load_file(expected_path)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(expected), f"tensor sets differ: {sorted(set(tensors) ^ set(expected))}"
    counts = {}
    for name, ref in expected.items():
        t = tensors[name]
        qtype = t.tensor_type
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
        # gguf-py lists dims innermost first.
        assert list(t.shape[::-1]) == list(ref.shape), f"{name}: shape {list(t.shape[::-1])} != {list(ref.shape)}"
        raw = np.asarray(t.data)
        if qtype == gguf.GGMLQuantizationType.F32:
            ok = np.array_equal(raw.reshape(ref.shape).view(np.uint32), ref.view(np.uint32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            ok = np.array_equal(raw.reshape(ref.shape).view(np.uint16), ref.astype(np.float16).view(np.uint16))
        elif qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
            want = gguf.quants.quantize(ref, qtype)
            ok = raw.tobytes() == want.tobytes()
        elif qtype in K_QUANTS:
            got = gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(ref.shape)
            ok = np.array_equal(got.view(np.uint32), ref.view(np.uint32))
        else:
            raise AssertionError(f"{name}: unexpected type {qtype.name}")
        assert ok, f"{name} ({qtype.name}): bytes differ from the reference encoding"
    print(f"OK {path}: {len(expected)} tensors {counts}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
