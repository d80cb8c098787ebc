#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (tests/fuzz) into OUT_DIR/<target>/.

Seeds are small, valid (or nearly valid) inputs in each format, built from the
project's own fixtures and test cases: a GGUF file of the real CrystalChat
layout at toy sizes, safetensors and torch.save files with the fixture
checkpoint's tensor names and dtypes, request lines of the daemon tests,
conversations of the fine-tuning sample, token ids of the real tokenizer.
Nothing here is committed; scripts/fuzz.sh regenerates it every run.

Usage: fuzz-seeds.py OUT_DIR [SHARED_DIR]   (SHARED_DIR defaults to ../shared)
Standard library only.
"""

import collections
import io
import json
import os
import pickle
import struct
import sys
import types
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def put(out, target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- GGUF

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
PACK = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
        BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0 = 0, 1, 2, 8
BLOCK = {GGML_F32: (1, 4), GGML_F16: (1, 2), GGML_Q4_0: (32, 18), GGML_Q8_0: (32, 34)}


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gval(ty, v):
    if ty == STRING:
        return gstr(v)
    if ty == ARRAY:
        elem, items = v
        return struct.pack("<IQ", elem, len(items)) + b"".join(gval(elem, i) for i in items)
    return struct.pack(PACK[ty], v)


def gguf(metadata, tensors, version=3, alignment=32):
    """metadata: [(key, type, value)]; tensors: [(name, dims innermost first, ggml type)]."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for k, ty, v in metadata:
        head += gstr(k) + struct.pack("<I", ty) + gval(ty, v)
    offsets, data_len = [], 0
    for name, dims, ty in tensors:
        per, size = BLOCK[ty]
        n = dims[0] // per * size
        for d in dims[1:]:
            n *= d
        offsets.append((data_len, n))
        data_len = (data_len + n + alignment - 1) // alignment * alignment
    for (name, dims, ty), (off, _) in zip(tensors, offsets):
        head += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        head += struct.pack("<IQ", ty, off)
    head += b"\0" * (-len(head) % alignment)
    data = bytearray(data_len)
    for i, (off, n) in enumerate(offsets):
        data[off:off + n] = bytes((i * 7 + j) & 0x3F for j in range(n))
    return head + bytes(data)


def model_gguf(matrix_type, embd_type):
    """The CrystalChat file layout (model_file.rs) at toy sizes."""
    d, n_inner, vocab, n_layer = 32, 40, 8, 1
    ff = (n_inner + 31) // 32 * 32
    meta = [
        ("general.architecture", STRING, "crystalcoder"),
        ("general.name", STRING, "fuzz-seed"),
        ("general.alignment", U32, 32),
        ("crystalcoder.context_length", U32, 16),
        ("crystalcoder.embedding_length", U32, d),
        ("crystalcoder.block_count", U32, n_layer),
        ("crystalcoder.feed_forward_length", U32, ff),
        ("crystalcoder.feed_forward_length_original", U32, n_inner),
        ("crystalcoder.attention.head_count", U32, 2),
        ("crystalcoder.attention.layer_norm_epsilon", F32, 1e-5),
        ("crystalcoder.rope.dimension_count", U32, 8),
        ("crystalcoder.rope.freq_base", F32, 10000.0),
        ("crystalcoder.vocab_size", U32, vocab),
        ("crystalcoder.mup.embeddings_scale", F32, 14.6),
        ("crystalcoder.mup.output_alpha", F32, 2.2),
        ("crystalcoder.mup.width_scale", F32, 0.0625),
        ("crystalcoder.mup.scale_qk_dot_by_d", BOOL, True),
        ("tokenizer.huggingface.json", STRING, '{"model": {}}'),
        ("tokenizer.ggml.bos_token_id", U32, 1),
        ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.crystalchat.im_start_token_id", U32, 3),
        ("tokenizer.crystalchat.im_end_token_id", U32, 4),
        ("tokenizer.crystalchat.sys_start_token_id", U32, 5),
        ("tokenizer.crystalchat.sys_end_token_id", U32, 6),
    ]
    t = [("token_embd.weight", [d, vocab], embd_type)]
    for l in range(n_layer):
        b = f"blk.{l}."
        t += [
            (b + "attn_norm.weight", [d], GGML_F32), (b + "attn_norm.bias", [d], GGML_F32),
            (b + "attn_qkv.weight", [d, 3 * d], matrix_type), (b + "attn_qkv.bias", [3 * d], GGML_F32),
            (b + "attn_output.weight", [d, d], matrix_type), (b + "attn_output.bias", [d], GGML_F32),
            (b + "ffn_norm.weight", [d], GGML_F32), (b + "ffn_norm.bias", [d], GGML_F32),
            (b + "ffn_up.weight", [d, ff], matrix_type), (b + "ffn_up.bias", [ff], GGML_F32),
            (b + "ffn_gate.weight", [d, ff], matrix_type), (b + "ffn_gate.bias", [ff], GGML_F32),
            (b + "ffn_down.weight", [ff, d], matrix_type), (b + "ffn_down.bias", [d], GGML_F32),
        ]
    t += [("output_norm.weight", [d], GGML_F32), ("output_norm.bias", [d], GGML_F32)]
    return gguf(meta, t)


def gguf_seeds(out):
    put(out, "gguf", "model-q4_0.gguf", model_gguf(GGML_Q4_0, GGML_Q8_0))
    put(out, "gguf", "model-f16.gguf", model_gguf(GGML_F16, GGML_F32))
    every_type = [
        ("u8", U8, 1), ("i8", I8, -1), ("u16", U16, 2), ("i16", I16, -2), ("u32", U32, 3),
        ("i32", I32, -3), ("f32", F32, 0.5), ("bool", BOOL, True), ("str", STRING, "é"),
        ("u64", U64, 4), ("i64", I64, -4), ("f64", F64, 0.25),
        ("arr", ARRAY, (U32, [1, 2, 3])), ("strs", ARRAY, (STRING, ["a", "bc"])),
        ("nested", ARRAY, (ARRAY, [(U8, [1]), (U8, [2, 3])])),
        ("general.alignment", U32, 64),
    ]
    put(out, "gguf", "metadata.gguf",
        gguf(every_type, [("t", [32, 2], GGML_Q8_0), ("v", [4, 1, 1, 2], GGML_F32)], alignment=64))
    put(out, "gguf", "v2-empty.gguf", gguf([], [], version=2))


# ---------------------------------------------------------------- safetensors

def fixture_tensors(shared):
    """(name, dtype) of the fixture checkpoint, from its safetensors header."""
    path = os.path.join(shared, "fixtures", "tiny-a", "model.safetensors")
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        return [(k, v["dtype"]) for k, v in header.items() if k != "__metadata__"]
    except OSError:
        return [("transformer.wte.weight", "BF16"), ("transformer.h.0.ln_1.weight", "F32")]


def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape)] with small shapes; data is a byte ramp."""
    size = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1}
    header, at = {}, 0
    for name, dtype, shape in tensors:
        n = size[dtype]
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + n]}
        at += n
    if metadata is not None:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + bytes(i * 13 & 0x7F for i in range(at))


def safetensors_seeds(out, shared):
    names = fixture_tensors(shared)
    small = [(n, dt, [2, 3] if n.endswith("weight") and "ln_" not in n else [3]) for n, dt in names[:12]]
    put(out, "safetensors", "fixture-names.safetensors", safetensors(small, {"format": "pt"}))
    put(out, "safetensors", "dtypes.safetensors", safetensors(
        [("a", "F32", [2, 2]), ("b", "F16", [3]), ("c", "BF16", [1, 4]), ("d", "I64", [1]),
         ("e", "U8", []), ("f", "BOOL", [0])]))
    put(out, "safetensors", "empty.safetensors", safetensors([]))


# ---------------------------------------------------------------- torch.save

def torch_pickle(tensors):
    """The data.pkl torch.save writes for a state dict of contiguous tensors."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    storages = {}
    for st in ("FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage"):
        cls = type(st, (), {"__module__": "torch"})
        setattr(torch, st, cls)
        storages[st] = cls

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = torch, utils

    class Storage:
        def __init__(self, ty, key, numel):
            self.ty, self.key, self.numel = ty, key, numel

    class Tensor:
        def __init__(self, storage, offset, shape):
            self.storage, self.offset, self.shape = storage, offset, shape

        def __reduce__(self):
            stride, acc = [], 1
            for s in reversed(self.shape):
                stride.insert(0, acc)
                acc *= s
            return (_rebuild_tensor_v2, (self.storage, self.offset, tuple(self.shape),
                                         tuple(stride), False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", storages[obj.ty], obj.key, "cpu", obj.numel)
            return None

    try:
        state = collections.OrderedDict()
        blobs = {}
        for i, (name, ty, shape, share) in enumerate(tensors):
            numel = 1
            for s in shape:
                numel *= s
            key = str(share if share is not None else i)
            if key not in blobs:
                blobs[key] = Storage(ty, key, numel * 2 if share is not None else numel)
            state[name] = Tensor(blobs[key], numel if share is not None and i != share else 0, shape)
        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(state)
        return buf.getvalue(), blobs
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def torch_save(tensors, zip64=False):
    elem = {"FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8}
    pkl, blobs = torch_pickle(tensors)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", b"little")
        for key, st in blobs.items():
            data = bytes((j * 5 + 1) & 0x3F for j in range(st.numel * elem[st.ty]))
            with z.open(f"archive/data/{key}", "w", force_zip64=zip64) as f:
                f.write(data)
        z.writestr("archive/version", b"3\n")
    return buf.getvalue(), pkl


def pytorch_seeds(out, shared):
    names = [n for n, _ in fixture_tensors(shared)][:10]
    tensors = [(n, "FloatStorage", [2, 3] if n.endswith("weight") else [3], None) for n in names]
    data, pkl = torch_save(tensors)
    for target in ("pytorch", "zip"):
        put(out, target, "fixture-names.bin", data)
    put(out, "pickle", "fixture-names.pkl", pkl)
    mixed = [("a", "HalfStorage", [4], None), ("b", "BFloat16Storage", [2, 2], None),
             ("c", "FloatStorage", [2], 2), ("d", "FloatStorage", [2], 2),
             ("steps", "LongStorage", [1], None)]
    data, pkl = torch_save(mixed, zip64=True)
    for target in ("pytorch", "zip"):
        put(out, target, "mixed-zip64.bin", data)
    put(out, "pickle", "mixed.pkl", pkl)
    # The pickle unit tests' inputs.
    put(out, "pickle", "memo-dict.pkl",
        b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bK\x01h\x01\x86u.")
    put(out, "pickle", "long-float.pkl", b"\x8a\x02\x00\xff0G\x3f\xf0\x00\x00\x00\x00\x00\x00.")


# ---------------------------------------------------------------- daemon requests

REQUESTS = [
    {"id": 1, "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 64},
    {"id": "a", "prompt": "Once upon a time", "max_tokens": 32, "stream": True, "seed": 2},
    {"id": "b", "messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello"},
                             {"role": "user", "content": "<|im_start|>user <s>"}],
     "temperature": 0},
    {"id": 3, "prompt": "x", "temperature": 0.7, "top_k": 10, "top_p": 0.9, "min_p": 0.1,
     "repeat_penalty": 1.2, "stop": ["\n", "END"], "logprobs": 5, "timeout_ms": 1000},
    {"id": 4, "prompt": "x", "stop": "one"},
    {"op": "cancel", "id": "long"},
    {"op": "health"},
    {"op": "health", "id": 9},
]
BAD_LINES = [
    b'{"id": 1, "max_token": 5, "prompt": "typo"}',
    b'{"id": 1.5, "prompt": "a"}',
    b'{"id": "\xff"}',
    b'[1, 2]',
    b'{"id": 1, "messages": [], "prompt": "both"}',
    b'{"op": "explode"}',
    b'{"id": 2, "prompt": "a", "max_tokens": 0, "temperature": -1, "top_p": 2}',
]


def request_seeds(out):
    for i, r in enumerate(REQUESTS):
        put(out, "request", f"ok-{i}.json", json.dumps(r).encode())
    for i, line in enumerate(BAD_LINES):
        put(out, "request", f"bad-{i}.json", line)


def http_seeds(out):
    # The HTTP transport: OpenAI bodies behind request heads, and broken heads.
    bodies = [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                                  "max_tokens": 8, "stream": True,
                                  "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {"messages": [{"role": "developer", "content": "Be brief."},
                                               {"role": "user", "content": [{"type": "text", "text": "a"}]}],
                                  "logprobs": True, "top_logprobs": 2, "seed": -5, "stop": ["x"]}),
        ("/v1/completions", {"prompt": ["def f():"], "logprobs": 1, "temperature": 0}),
        ("/v1/chat/completions", {"messages": [], "n": 2}),
    ]
    for i, (path, body) in enumerate(bodies):
        b = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Length: {len(b)}\r\n\r\n"
        put(out, "http", f"ok-{i}.http", head.encode() + b)
    for i, raw in enumerate([
        b"GET /health HTTP/1.0\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
    ]):
        put(out, "http", f"bad-{i}.http", raw)


# ---------------------------------------------------------------- chat and ids

def load_vocab(shared):
    try:
        with open(os.path.join(shared, "crystalchat", "tokenizer.json"), encoding="utf-8") as f:
            return json.load(f)["model"]["vocab"]
    except (OSError, KeyError, ValueError):
        return {}


def sample_ids(shared, n):
    """Token ids of the first n conversations of the fine-tuning sample."""
    out = []
    try:
        with open(os.path.join(shared, "crystalchat", "chat_sample.jsonl"), encoding="utf-8") as f:
            for line in f:
                out.append(json.loads(line)["token_ids"])
                if len(out) == n:
                    break
    except (OSError, KeyError, ValueError):
        pass
    return out


IM_START, IM_END, SYS_START, SYS_END = 32018, 32019, 32020, 32021


def chat_seeds(out, shared):
    """Sample conversations as the chat target reads them: messages split at
    0x00, the first byte of each picks the role (mod 3: system, user,
    assistant)."""
    vocab = load_vocab(shared)
    piece = {i: t for t, i in vocab.items()}

    def text(ids):
        b = bytearray()
        for i in ids:
            t = piece.get(i, "")
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                b.append(int(t[3:5], 16))
            elif not (t.startswith("<") and t.endswith(">")):
                b += t.replace("\u2581", " ").encode()
        return bytes(b).replace(b"\0", b" ")[:400]

    for n, ids in enumerate(sample_ids(shared, 24)):
        msgs, cur, role = [], [], 2  # text before any marker: assistant
        for i in ids:
            if i in (SYS_START, IM_START, IM_END, SYS_END):
                if cur or i in (SYS_END, IM_END):
                    msgs.append(bytes([role]) + text(cur))
                cur = []
                role = {SYS_START: 0, IM_START: 1, IM_END: 2, SYS_END: 2}[i]
            else:
                cur.append(i)
        if cur:
            msgs.append(bytes([role]) + text(cur))
        # A chunk of the sample may start mid-conversation: keep a shape the
        # template accepts (system first only, user/assistant alternating).
        shaped = []
        for m in msgs:
            if m[0] == 0 and shaped:
                continue
            if shaped and shaped[-1][0] == m[0]:
                shaped[-1] += b" " + m[1:]
            else:
                shaped.append(m)
        put(out, "chat", f"sample-{n}", b"\0".join(m[:160] for m in shaped[:6]))
    put(out, "chat", "injection", b"\x01<|im_start|>user <s></s><|sys_end|>\0\x02ok")


def id_seeds(out, shared):
    vocab = load_vocab(shared)
    byte_id = lambda b: vocab.get(f"<0x{b:02X}>", 3 + b)
    ids = lambda xs: b"".join(struct.pack("<I", x) for x in xs)
    for n, sample in enumerate(sample_ids(shared, 6)):
        put(out, "detokenize", f"sample-{n}", ids(sample[:512]))
    # "é€😀" as byte-fallback tokens, a split character, an invalid run.
    put(out, "detokenize", "utf8-split", ids([byte_id(b) for b in "é€😀".encode()]))
    put(out, "detokenize", "invalid", ids([byte_id(0xE2), byte_id(0x41), byte_id(0xF0), byte_id(0x9F)]))
    put(out, "detokenize", "specials", ids([1, 2, 32018, 32031, 32032, 40000]))
    # Calibration token files: both line formats, and the refused ones.
    samples = sample_ids(shared, 3)
    lines = [json.dumps({"token_ids": s[:40]}) for s in samples] + [json.dumps(s[:20]) for s in samples]
    put(out, "calibration", "sample", "\n".join(lines).encode())
    put(out, "calibration", "bad", b'[1, 2]\n\n{"ids": [3]}\n[1, -2, 3.5, 40000, "x"]\n42\nnot json\n')


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out = sys.argv[1]
    shared = sys.argv[2] if len(sys.argv) == 3 else os.path.join(ROOT, "..", "shared")
    gguf_seeds(out)
    safetensors_seeds(out, shared)
    pytorch_seeds(out, shared)
    request_seeds(out)
    http_seeds(out)
    chat_seeds(out, shared)
    id_seeds(out, shared)


if __name__ == "__main__":
    main()
