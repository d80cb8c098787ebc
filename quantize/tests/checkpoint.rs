//! Checkpoint reader against the shared fixtures, synthetic checkpoints and damaged files.

use std::fs;
use std::path::{Path, PathBuf};

use crystal_quantize::checkpoint::{to_f32, Checkpoint, DType, ErrorKind, Layout, TensorRef};
use crystal_quantize::synth::{
    self, state_dict_pickle, PickledTensor, StoredDtype, SynthFormat, SynthOptions, SynthShape,
    TorchZipWriter,
};

fn shared() -> PathBuf {
    // `../shared` relative to the workspace root, which is this crate's parent.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

fn fixture(name: &str) -> PathBuf {
    shared().join("fixtures").join(name)
}

fn tokenizer() -> PathBuf {
    shared().join("crystalchat/tokenizer.json")
}

fn f32s(t: &TensorRef<'_>) -> Vec<f32> {
    let mut v = Vec::new();
    to_f32(t, &mut v).unwrap_or_else(|e| panic!("{e}"));
    v
}

/// Opening `dir` must fail; returns the message after checking it mentions `needle`.
fn open_err(dir: &Path, needle: &str) -> (ErrorKind, String) {
    match Checkpoint::open(dir) {
        Ok(_) => panic!("{} opened but should have failed", dir.display()),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(needle),
                "error does not mention {needle:?}: {msg}"
            );
            (e.kind(), msg)
        }
    }
}

/// Layer tensor names and shapes of a CrystalCoder model.
fn expected_weights(d: u64, ff: u64, layers: u64, vocab: u64) -> Vec<(String, Vec<u64>)> {
    let mut v = vec![("transformer.wte.weight".to_string(), vec![vocab, d])];
    for l in 0..layers {
        let p = format!("transformer.h.{l}");
        for (n, s) in [
            ("ln_1.weight", vec![d]),
            ("ln_1.bias", vec![d]),
            ("attn.c_attn.weight", vec![d, 3 * d]),
            ("attn.c_attn.bias", vec![3 * d]),
            ("attn.c_proj.weight", vec![d, d]),
            ("attn.c_proj.bias", vec![d]),
            ("ln_2.weight", vec![d]),
            ("ln_2.bias", vec![d]),
            ("mlp.c_fc.weight", vec![d, ff]),
            ("mlp.c_fc.bias", vec![ff]),
            ("mlp.c_fc2.weight", vec![d, ff]),
            ("mlp.c_fc2.bias", vec![ff]),
            ("mlp.c_proj.weight", vec![ff, d]),
            ("mlp.c_proj.bias", vec![d]),
        ] {
            v.push((format!("{p}.{n}"), s));
        }
    }
    v.push(("transformer.ln_f.weight".into(), vec![d]));
    v.push(("transformer.ln_f.bias".into(), vec![d]));
    v
}

#[test]
fn tiny_a_bf16_safetensors() {
    let dir = fixture("tiny-a");
    let ck = Checkpoint::open(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ck.layout(), Layout::Safetensors);
    let want = expected_weights(256, 682, 2, 32032);
    assert_eq!(ck.len(), want.len());
    for (name, shape) in &want {
        let t = ck.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(t.dtype, DType::BF16, "{name}");
        assert_eq!(&t.shape, shape, "{name}");
        assert_eq!(t.bytes.len() as u64, t.numel() * 2);
    }
    assert!(ck.get("lm_head.weight").is_none());
    let mut names = ck.names();
    let sorted = {
        let mut s = names.clone();
        s.sort();
        s
    };
    assert_eq!(names, sorted);
    names.dedup();
    assert_eq!(names.len(), want.len());

    // Decode a few values independently from the raw file.
    let raw = fs::read(dir.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&raw[8..8 + n]).unwrap();
    for name in [
        "transformer.wte.weight",
        "transformer.h.1.mlp.c_proj.weight",
        "transformer.ln_f.weight",
    ] {
        let begin = header[name]["data_offsets"][0].as_u64().unwrap() as usize + 8 + n;
        let t = ck.get(name).unwrap();
        let v = f32s(&t);
        for i in [0, 1, 7, v.len() / 2, v.len() - 1] {
            let b = &raw[begin + 2 * i..begin + 2 * i + 2];
            let expect = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            assert_eq!(v[i].to_bits(), expect.to_bits(), "{name}[{i}]");
        }
        // Weights are random: not all zero.
        assert!(v.iter().any(|&x| x != 0.0), "{name} is all zero");
    }
    let total: u64 = want
        .iter()
        .map(|(_, s)| s.iter().product::<u64>() * 2)
        .sum();
    assert_eq!(ck.total_bytes(), total);
}

#[test]
fn tiny_b_sharded_bin_with_buffers() {
    let dir = fixture("tiny-b");
    let ck = Checkpoint::open(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ck.layout(), Layout::PytorchBinSharded);
    assert_eq!(ck.files().len(), 2);
    let want = expected_weights(256, 1034, 3, 32032);
    for (name, shape) in &want {
        let t = ck.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(t.dtype, DType::F32, "{name}");
        assert_eq!(&t.shape, shape, "{name}");
    }
    // 3 layers × 2 buffers + lm_head.
    assert_eq!(ck.len(), want.len() + 7);

    let wte = ck.get("transformer.wte.weight").unwrap();
    let lm = ck.get("lm_head.weight").unwrap();
    assert_eq!(lm.shape, wte.shape);
    assert_ne!(
        lm.file, wte.file,
        "fixture keeps lm_head in the second shard"
    );
    assert!(lm.file.ends_with("pytorch_model-00002-of-00002.bin"));
    assert_eq!(f32s(&lm), f32s(&wte));

    for l in 0..3 {
        let mask = ck.get(&format!("transformer.h.{l}.attn.bias")).unwrap();
        assert_eq!(mask.dtype, DType::Other("bool".into()));
        assert!(!mask.dtype.is_float());
        assert_eq!(mask.shape, vec![1, 1, 512, 512]);
        for (i, &b) in mask.bytes.iter().enumerate() {
            let (r, c) = (i / 512, i % 512);
            assert_eq!(b, (c <= r) as u8, "mask[{r},{c}]");
        }
        let mb = ck
            .get(&format!("transformer.h.{l}.attn.masked_bias"))
            .unwrap();
        assert_eq!(mb.dtype, DType::F32);
        assert!(mb.shape.is_empty());
        assert_eq!(f32s(&mb), vec![-1e4]);

        // `attn.bias` (mask) and `attn.c_attn.bias` (weights) are different tensors.
        let cb = ck
            .get(&format!("transformer.h.{l}.attn.c_attn.bias"))
            .unwrap();
        assert_eq!(cb.dtype, DType::F32);
        assert_eq!(cb.shape, vec![768]);
        assert_ne!(cb.bytes.as_ptr(), mask.bytes.as_ptr());
    }
}

#[test]
fn release_and_prefetch_keep_data_readable() {
    let ck = Checkpoint::open(&fixture("tiny-b")).unwrap();
    let mut before = Vec::new();
    for name in ck.names() {
        let t = ck.get(name).unwrap();
        ck.prefetch(&t);
        before.push(t.bytes.to_vec());
        ck.release(&t);
    }
    for (name, old) in ck.names().into_iter().zip(before) {
        let t = ck.get(name).unwrap();
        assert_eq!(t.bytes, &old[..], "{name} changed after release");
    }
}

fn write_synth(dir: &Path, format: SynthFormat, seed: u64) -> (u64, u64) {
    let opts = SynthOptions {
        shape: SynthShape::Tiny,
        format,
        seed,
        tokenizer_json: tokenizer(),
    };
    let (mut calls, mut last, mut total) = (0u64, 0u64, 0u64);
    synth::write_synthetic(dir, &opts, &mut |_, done, all| {
        assert!(done > last && done <= all);
        calls += 1;
        last = done;
        total = all;
    })
    .unwrap();
    assert_eq!(last, total, "progress must reach the total");
    (calls, total)
}

/// Every synthetic tensor reads back exactly as generated.
fn check_round_trip(dir: &Path, format: SynthFormat, seed: u64) -> Checkpoint {
    let ck = Checkpoint::open(dir).unwrap_or_else(|e| panic!("{e}"));
    let list = synth::tensors(SynthShape::Tiny, format);
    assert_eq!(ck.len(), list.len());
    for t in &list {
        let r = ck
            .get(&t.name)
            .unwrap_or_else(|| panic!("{} missing", t.name));
        assert_eq!(r.shape, t.shape, "{}", t.name);
        let expect = t.values(seed);
        match t.dtype {
            StoredDtype::Bool => {
                assert_eq!(r.dtype, DType::Other("bool".into()));
                let got: Vec<f32> = r.bytes.iter().map(|&b| b as f32).collect();
                assert_eq!(got, expect, "{}", t.name);
            }
            StoredDtype::F32 | StoredDtype::BF16 => {
                let dt = if t.dtype == StoredDtype::F32 {
                    DType::F32
                } else {
                    DType::BF16
                };
                assert_eq!(r.dtype, dt, "{}", t.name);
                assert_eq!(f32s(&r), expect, "{}", t.name);
            }
        }
    }
    ck
}

#[test]
fn synth_safetensors_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let (calls, total) = write_synth(tmp.path(), SynthFormat::SafetensorsBf16, 11);
    assert!(calls >= 30);
    let ck = check_round_trip(tmp.path(), SynthFormat::SafetensorsBf16, 11);
    assert_eq!(ck.layout(), Layout::Safetensors);
    assert_eq!(ck.total_bytes(), total);
    assert!(ck.get("lm_head.weight").is_none());

    let cfg: serde_json::Value =
        serde_json::from_slice(&fs::read(tmp.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "crystalcoder");
    assert_eq!(cfg["n_embd"], 128);
    assert_eq!(cfg["n_inner"], 330);
    assert_eq!(cfg["rotary_dim"], 16);
    assert_eq!(
        fs::read(tmp.path().join("tokenizer.json")).unwrap(),
        fs::read(tokenizer()).unwrap()
    );
    // Same seed, same file; different seed, different weights.
    let again = tempfile::tempdir().unwrap();
    write_synth(again.path(), SynthFormat::SafetensorsBf16, 11);
    assert_eq!(
        fs::read(tmp.path().join("model.safetensors")).unwrap(),
        fs::read(again.path().join("model.safetensors")).unwrap()
    );
    let other = synth::tensors(SynthShape::Tiny, SynthFormat::SafetensorsBf16)[0].values(12);
    assert_ne!(f32s(&ck.get("transformer.wte.weight").unwrap()), other);
}

#[test]
fn synth_bin_sharded_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let format = SynthFormat::BinF32Sharded { shards: 2 };
    let (_, total) = write_synth(tmp.path(), format, 5);
    let ck = check_round_trip(tmp.path(), format, 5);
    assert_eq!(ck.layout(), Layout::PytorchBinSharded);
    assert_eq!(ck.total_bytes(), total);
    assert_eq!(ck.files().len(), 2);
    assert!(tmp
        .path()
        .join("pytorch_model-00001-of-00002.bin")
        .is_file());
    assert!(tmp
        .path()
        .join("pytorch_model-00002-of-00002.bin")
        .is_file());
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(tmp.path().join("pytorch_model.bin.index.json")).unwrap())
            .unwrap();
    assert_eq!(index["metadata"]["total_size"], total);
    assert_eq!(index["weight_map"].as_object().unwrap().len(), ck.len());
    let wte = ck.get("transformer.wte.weight").unwrap();
    let lm = ck.get("lm_head.weight").unwrap();
    assert_eq!(f32s(&wte), f32s(&lm));
    assert_ne!(wte.bytes.as_ptr(), lm.bytes.as_ptr(), "separate storages");
}

#[test]
fn synth_bin_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let format = SynthFormat::BinF32Sharded { shards: 1 };
    write_synth(tmp.path(), format, 3);
    assert!(!tmp.path().join("pytorch_model.bin.index.json").exists());
    let ck = check_round_trip(tmp.path(), format, 3);
    assert_eq!(ck.layout(), Layout::PytorchBin);
    // Data is 64-byte aligned within the file, as torch writes it.
    let base = fs::read(tmp.path().join("pytorch_model.bin")).unwrap();
    let wte = ck.get("transformer.wte.weight").unwrap();
    let at = base
        .windows(64)
        .position(|w| w == &wte.bytes[..64])
        .unwrap();
    assert_eq!(at % 64, 0);
}

/// Copies `src` into a fresh temp dir, symlinking every file except `copy`.
fn stage(src: &Path, copy: &[&str]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        let dst = tmp.path().join(&name);
        if copy.iter().any(|c| name == *c) {
            fs::copy(e.path(), &dst).unwrap();
            // The shared fixtures are read-only; the copy must be writable to truncate it.
            let mut perm = fs::metadata(&dst).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perm.set_readonly(false);
            fs::set_permissions(&dst, perm).unwrap();
        } else {
            std::os::unix::fs::symlink(e.path(), &dst).unwrap();
        }
    }
    tmp
}

fn truncate(path: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

#[test]
fn truncated_safetensors_fails_at_open() {
    let tmp = stage(&fixture("tiny-a"), &["model.safetensors"]);
    let file = tmp.path().join("model.safetensors");
    let len = fs::metadata(&file).unwrap().len();
    // Decreasing lengths: last data byte, mid-data, inside the header, inside the length.
    for cut in [len - 1, len - 4096, len / 2, 3000, 100, 5, 0] {
        truncate(&file, cut);
        let (kind, msg) = open_err(tmp.path(), "model.safetensors");
        if cut > 3100 {
            // Cut in the data: the message names a tensor and says truncated.
            assert_eq!(kind, ErrorKind::Truncated, "{msg}");
            assert!(msg.contains("tensor '"), "{msg}");
        }
    }
}

#[test]
fn truncated_fixture_shard_fails_at_open() {
    let shard = "pytorch_model-00002-of-00002.bin";
    let tmp = stage(&fixture("tiny-b"), &[shard]);
    let file = tmp.path().join(shard);
    let len = fs::metadata(&file).unwrap().len();
    for cut in [
        len - 1,
        len - 22,
        len - 200,
        len - 5000,
        len / 2,
        4000,
        31,
        0,
    ] {
        truncate(&file, cut);
        let (kind, msg) = open_err(tmp.path(), shard);
        assert!(
            matches!(kind, ErrorKind::Truncated | ErrorKind::Malformed),
            "{kind:?}: {msg}"
        );
    }
}

#[test]
fn truncated_synth_shard_fails_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    write_synth(tmp.path(), SynthFormat::BinF32Sharded { shards: 2 }, 1);
    let shard = "pytorch_model-00001-of-00002.bin";
    let file = tmp.path().join(shard);
    let len = fs::metadata(&file).unwrap().len();
    for cut in [len - 1, len - 100, len * 3 / 4, 1000, 10] {
        truncate(&file, cut);
        open_err(tmp.path(), shard);
    }
}

/// A storage entry shorter than its persistent id declares: the zip itself is intact.
#[test]
fn short_storage_names_tensor_and_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pytorch_model.bin");
    let t = PickledTensor::contiguous("w", "FloatStorage", "0", &[4, 4]);
    let mut z = TorchZipWriter::create(&path, "archive").unwrap();
    z.entry("data.pkl", &state_dict_pickle(&[t])).unwrap();
    z.entry("data/0", &[0u8; 60]).unwrap(); // 15 floats, 16 declared
    z.finish().unwrap();
    let (kind, msg) = open_err(tmp.path(), "pytorch_model.bin");
    assert_eq!(kind, ErrorKind::Truncated);
    assert!(
        msg.contains("tensor 'w'") && msg.contains("data/0"),
        "{msg}"
    );
}

fn write_torch(path: &Path, tensors: &[PickledTensor], storages: &[(&str, Vec<u8>)]) {
    let mut z = TorchZipWriter::create(path, "archive").unwrap();
    z.entry("data.pkl", &state_dict_pickle(tensors)).unwrap();
    for (k, b) in storages {
        z.entry(&format!("data/{k}"), b).unwrap();
    }
    z.entry("version", b"3\n").unwrap();
    z.finish().unwrap();
}

fn floats(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(f32::to_le_bytes).collect()
}

#[test]
fn storage_offset_and_shared_storage() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pytorch_model.bin");
    let mut a = PickledTensor::contiguous("a", "FloatStorage", "0", &[2, 2]);
    a.storage_numel = 10;
    a.offset = 3;
    let mut b = PickledTensor::contiguous("b", "FloatStorage", "0", &[6]);
    b.storage_numel = 10;
    b.offset = 4;
    let h = PickledTensor::contiguous("h", "HalfStorage", "1", &[2]);
    let bf = PickledTensor::contiguous("bf", "BFloat16Storage", "2", &[2]);
    write_torch(
        &path,
        &[a, b, h, bf],
        &[
            ("0", floats((0..10).map(|i| i as f32))),
            (
                "1",
                [0x3c00u16, 0xc000]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            (
                "2",
                [0x3f80u16, 0x4040]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
        ],
    );
    let ck = Checkpoint::open(tmp.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(f32s(&ck.get("a").unwrap()), vec![3.0, 4.0, 5.0, 6.0]);
    assert_eq!(ck.get("a").unwrap().shape, vec![2, 2]);
    assert_eq!(
        f32s(&ck.get("b").unwrap()),
        vec![4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    );
    assert_eq!(ck.get("h").unwrap().dtype, DType::F16);
    assert_eq!(f32s(&ck.get("h").unwrap()), vec![1.0, -2.0]);
    assert_eq!(ck.get("bf").unwrap().dtype, DType::BF16);
    assert_eq!(f32s(&ck.get("bf").unwrap()), vec![1.0, 3.0]);

    // One element too far: rejected, naming the tensor.
    let mut c = PickledTensor::contiguous("c", "FloatStorage", "0", &[7]);
    c.storage_numel = 10;
    c.offset = 4;
    write_torch(&path, &[c], &[("0", floats((0..10).map(|i| i as f32)))]);
    let (kind, msg) = open_err(tmp.path(), "tensor 'c'");
    assert_eq!(kind, ErrorKind::Truncated, "{msg}");
}

#[test]
fn non_contiguous_stride_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pytorch_model.bin");
    let mut t = PickledTensor::contiguous("transposed", "FloatStorage", "0", &[2, 3]);
    t.stride = vec![1, 2];
    write_torch(&path, &[t], &[("0", floats([0.0; 6]))]);
    let (kind, msg) = open_err(tmp.path(), "tensor 'transposed'");
    assert_eq!(kind, ErrorKind::Unsupported);
    assert!(msg.contains("non-contiguous"), "{msg}");

    // A size-1 dimension may carry any stride (torch's is_contiguous rule).
    let mut t = PickledTensor::contiguous("row", "FloatStorage", "0", &[1, 3]);
    t.stride = vec![77, 1];
    write_torch(&path, &[t], &[("0", floats([1.0, 2.0, 3.0]))]);
    let ck = Checkpoint::open(tmp.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(f32s(&ck.get("row").unwrap()), vec![1.0, 2.0, 3.0]);
}

#[test]
fn big_endian_archive_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pytorch_model.bin");
    let t = PickledTensor::contiguous("w", "FloatStorage", "0", &[1]);
    let mut z = TorchZipWriter::create(&path, "archive").unwrap();
    z.entry("data.pkl", &state_dict_pickle(&[t])).unwrap();
    z.entry("byteorder", b"big").unwrap();
    z.entry("data/0", &[0; 4]).unwrap();
    z.finish().unwrap();
    let (kind, msg) = open_err(tmp.path(), "pytorch_model.bin");
    assert_eq!(kind, ErrorKind::Unsupported);
    assert!(msg.contains("big"), "{msg}");
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

fn synth_single_bin() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let tmp = tempfile::tempdir().unwrap();
    write_synth(tmp.path(), SynthFormat::BinF32Sharded { shards: 1 }, 9);
    let file = tmp.path().join("pytorch_model.bin");
    let bytes = fs::read(&file).unwrap();
    (tmp, file, bytes)
}

#[test]
fn corrupt_central_directory_is_reported() {
    let (tmp, file, orig) = synth_single_bin();
    let first_cd = find(&orig, b"PK\x01\x02").unwrap();
    let last_cd = rfind(&orig, b"PK\x01\x02").unwrap();
    let eocd = rfind(&orig, b"PK\x05\x06").unwrap();
    let cases: Vec<(usize, Vec<u8>)> = vec![
        (first_cd, vec![0xAA; 46]),                    // first record garbled
        (last_cd, vec![0x55; 16]),                     // last record's signature and header
        (first_cd + 42, vec![0xFF, 0xFF, 0xFF, 0x7F]), // local-header offset far away
        (first_cd + 28, vec![0xFF, 0xFF]),             // name length past the directory
        (eocd + 16, vec![1, 0, 0, 0]),                 // directory offset
        (eocd, vec![0; 4]),                            // end record signature
    ];
    for (at, patch) in cases {
        let mut b = orig.clone();
        b[at..at + patch.len()].copy_from_slice(&patch);
        fs::write(&file, &b).unwrap();
        let (kind, msg) = open_err(tmp.path(), "pytorch_model.bin");
        assert!(
            matches!(kind, ErrorKind::Malformed | ErrorKind::Truncated),
            "patch at {at}: {kind:?} {msg}"
        );
    }
}

#[test]
fn compressed_entry_is_rejected() {
    let (tmp, file, mut b) = synth_single_bin();
    // Mark the first entry (data.pkl) as deflated in its central record and local header.
    let cd = find(&b, b"PK\x01\x02").unwrap();
    b[cd + 10] = 8;
    b[8] = 8;
    fs::write(&file, &b).unwrap();
    let (kind, msg) = open_err(tmp.path(), "pytorch_model.bin");
    assert_eq!(kind, ErrorKind::Malformed, "{msg}");
    assert!(
        msg.contains("compressed") && msg.contains("data.pkl"),
        "{msg}"
    );
}

#[test]
fn corrupt_pickle_in_place_is_reported() {
    let (tmp, file, orig) = synth_single_bin();
    let start = find(&orig, b"\x80\x02}").unwrap();
    let end = start + find(&orig[start..], b"u.").unwrap() + 2;
    let patches: Vec<(usize, Vec<u8>)> = vec![
        (start, vec![0xFF]),                             // not a pickle at all
        (end - 1, vec![0xFE]),                           // STOP replaced by an invalid opcode
        (end - 2, vec![b'0', b'0']),                     // SETITEMS/STOP replaced: no STOP
        (start + 5, vec![b'X', 0xFF, 0xFF, 0xFF, 0x7F]), // absurd string length
        (start + 40, vec![b'h', 250]),                   // memo key never stored
        ((start + end) / 2, vec![0xFF; 32]),             // garbage mid-stream
    ];
    for (at, patch) in patches {
        let mut b = orig.clone();
        b[at..at + patch.len()].copy_from_slice(&patch);
        fs::write(&file, &b).unwrap();
        let (kind, msg) = open_err(tmp.path(), "pytorch_model.bin");
        assert_eq!(kind, ErrorKind::Malformed, "patch at {at}: {msg}");
        assert!(msg.contains("data.pkl"), "{msg}");
    }
}

#[test]
fn broken_pickles_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pytorch_model.bin");
    let tensors: Vec<PickledTensor> = (0..4)
        .map(|i| {
            PickledTensor::contiguous(&format!("t{i}"), "FloatStorage", &i.to_string(), &[2, 3])
        })
        .collect();
    let good = state_dict_pickle(&tensors);
    let storages: Vec<(String, Vec<u8>)> =
        (0..4).map(|i| (i.to_string(), floats([1.5; 6]))).collect();
    let write = |pickle: &[u8]| {
        let mut z = TorchZipWriter::create(&path, "archive").unwrap();
        z.entry("data.pkl", pickle).unwrap();
        for (k, b) in &storages {
            z.entry(&format!("data/{k}"), b).unwrap();
        }
        z.finish().unwrap();
    };
    write(&good);
    assert_eq!(Checkpoint::open(tmp.path()).unwrap().len(), 4);

    // Every truncation of the pickle fails cleanly.
    let mut errors = 0;
    for cut in 0..good.len() {
        write(&good[..cut]);
        let (kind, _) = open_err(tmp.path(), "pytorch_model.bin");
        assert_eq!(kind, ErrorKind::Malformed);
        errors += 1;
    }
    assert_eq!(errors, good.len());
    // Byte mutations (deterministic): any outcome but a panic; errors name the file.
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut failed = 0;
    for _ in 0..600 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut p = good.clone();
        let at = (x % p.len() as u64) as usize;
        p[at] = (x >> 32) as u8;
        write(&p);
        if let Err(e) = Checkpoint::open(tmp.path()) {
            assert!(e.to_string().contains("pytorch_model.bin"), "{e}");
            failed += 1;
        }
    }
    assert!(
        failed > 100,
        "mutations should mostly break the pickle ({failed})"
    );
}

#[test]
fn index_naming_missing_shard() {
    let tmp = stage(&fixture("tiny-b"), &[]);
    fs::remove_file(tmp.path().join("pytorch_model-00002-of-00002.bin")).unwrap();
    let (kind, _) = open_err(tmp.path(), "pytorch_model-00002-of-00002.bin");
    assert_eq!(kind, ErrorKind::Missing);
}

#[test]
fn index_pointing_to_wrong_shard() {
    let tmp = stage(&fixture("tiny-b"), &[]);
    let idx_path = tmp.path().join("pytorch_model.bin.index.json");
    let mut idx: serde_json::Value = serde_json::from_slice(&fs::read(&idx_path).unwrap()).unwrap();
    idx["weight_map"]["lm_head.weight"] = "pytorch_model-00001-of-00002.bin".into();
    fs::remove_file(&idx_path).unwrap();
    fs::write(&idx_path, serde_json::to_vec(&idx).unwrap()).unwrap();
    let (kind, msg) = open_err(tmp.path(), "tensor 'lm_head.weight'");
    assert_eq!(kind, ErrorKind::Missing);
    assert!(msg.contains("pytorch_model-00001-of-00002.bin"), "{msg}");

    // A path escaping the directory is refused.
    idx["weight_map"]["lm_head.weight"] = "../pytorch_model-00002-of-00002.bin".into();
    fs::write(&idx_path, serde_json::to_vec(&idx).unwrap()).unwrap();
    let (kind, _) = open_err(tmp.path(), "pytorch_model.bin.index.json");
    assert_eq!(kind, ErrorKind::Malformed);
}

#[test]
fn duplicate_tensor_across_shards() {
    let tmp = tempfile::tempdir().unwrap();
    for s in ["a.bin", "b.bin"] {
        let t = PickledTensor::contiguous("w", "FloatStorage", "0", &[1]);
        write_torch(&tmp.path().join(s), &[t], &[("0", floats([1.0]))]);
    }
    let idx = serde_json::json!({"metadata": {}, "weight_map": {"w": "a.bin", "v": "b.bin"}});
    fs::write(
        tmp.path().join("pytorch_model.bin.index.json"),
        serde_json::to_vec(&idx).unwrap(),
    )
    .unwrap();
    let (kind, msg) = open_err(tmp.path(), "tensor 'w'");
    assert_eq!(kind, ErrorKind::Duplicate);
    assert!(msg.contains("a.bin") && msg.contains("b.bin"), "{msg}");
}

#[test]
fn empty_directory_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (kind, msg) = open_err(tmp.path(), "pytorch_model.bin");
    assert_eq!(kind, ErrorKind::Missing);
    assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
}

#[test]
fn unsupported_dtype_conversion_names_tensor() {
    let ck = Checkpoint::open(&fixture("tiny-b")).unwrap();
    let mask = ck.get("transformer.h.1.attn.bias").unwrap();
    let mut out = vec![1.0];
    let e = to_f32(&mask, &mut out).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    let msg = e.to_string();
    assert!(
        msg.contains("transformer.h.1.attn.bias")
            && msg.contains("bool")
            && msg.contains("pytorch_model-00002-of-00002.bin"),
        "{msg}"
    );

    // A byte length that does not match the shape.
    let mut bad = ck.get("transformer.h.1.attn.masked_bias").unwrap();
    bad.shape = vec![2];
    let e = to_f32(&bad, &mut out).unwrap_err();
    assert!(
        e.to_string().contains("transformer.h.1.attn.masked_bias"),
        "{e}"
    );
}

#[test]
fn safetensors_header_errors_name_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.safetensors");
    let write = |header: serde_json::Value, data: &[u8]| {
        let h = serde_json::to_vec(&header).unwrap();
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(&h);
        b.extend_from_slice(data);
        fs::write(&path, b).unwrap();
    };
    // F16 and an unconverted integer tensor read fine.
    write(
        serde_json::json!({
            "h": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
            "ids": {"dtype": "I64", "shape": [1], "data_offsets": [4, 12]},
        }),
        &[0x00, 0x3c, 0x00, 0xb8, 1, 0, 0, 0, 0, 0, 0, 0],
    );
    let ck = Checkpoint::open(tmp.path()).unwrap();
    assert_eq!(f32s(&ck.get("h").unwrap()), vec![1.0, -0.5]);
    assert_eq!(ck.get("ids").unwrap().dtype, DType::Other("i64".into()));
    drop(ck);
    // Shape disagreeing with the offsets.
    write(
        serde_json::json!({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}),
        &[0; 8],
    );
    let (kind, _) = open_err(tmp.path(), "tensor 'w'");
    assert_eq!(kind, ErrorKind::Malformed);
    // Unknown dtype.
    write(
        serde_json::json!({"q": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}),
        &[0; 1],
    );
    let (kind, _) = open_err(tmp.path(), "tensor 'q'");
    assert_eq!(kind, ErrorKind::Unsupported);
}

fn write_safetensors(path: &Path, tensors: &[(&str, &[u64], Vec<f32>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        let begin = data.len();
        data.extend(floats(values.iter().copied()));
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(&h);
    b.extend_from_slice(&data);
    fs::write(path, b).unwrap();
}

#[test]
fn sharded_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let a = "model-00001-of-00002.safetensors";
    let b = "model-00002-of-00002.safetensors";
    write_safetensors(
        &tmp.path().join(a),
        &[("x", &[2], vec![1.0, 2.0]), ("y", &[1], vec![3.0])],
    );
    write_safetensors(
        &tmp.path().join(b),
        &[("z", &[2, 2], vec![4.0, 5.0, 6.0, 7.0])],
    );
    let idx =
        serde_json::json!({"metadata": {"total_size": 28}, "weight_map": {"x": a, "y": a, "z": b}});
    let idx_path = tmp.path().join("model.safetensors.index.json");
    fs::write(&idx_path, serde_json::to_vec(&idx).unwrap()).unwrap();
    let ck = Checkpoint::open(tmp.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ck.layout(), Layout::SafetensorsSharded);
    assert_eq!(ck.names(), vec!["x", "y", "z"]);
    assert_eq!(ck.total_bytes(), 28);
    let z = ck.get("z").unwrap();
    assert!(z.file.ends_with(b));
    assert_eq!(z.shape, vec![2, 2]);
    assert_eq!(f32s(&z), vec![4.0, 5.0, 6.0, 7.0]);
    assert_eq!(f32s(&ck.get("y").unwrap()), vec![3.0]);
    drop(ck);

    // The same tensor in both shards is refused.
    write_safetensors(&tmp.path().join(b), &[("x", &[1], vec![0.0])]);
    let (kind, msg) = open_err(tmp.path(), "tensor 'x'");
    assert_eq!(kind, ErrorKind::Duplicate, "{msg}");
}

#[test]
fn checkpoint_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Checkpoint>();
    assert_send_sync::<crystal_quantize::checkpoint::CheckpointError>();
}

/// Resident bytes of the mapping that contains `p`, from /proc/self/smaps.
#[cfg(target_os = "linux")]
fn mapping_rss(p: *const u8) -> u64 {
    let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
    let addr = p as u64;
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                inside = lo <= addr && addr < hi;
                continue;
            }
        }
        if inside {
            if let Some(kb) = line.strip_prefix("Rss:") {
                return kb
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap()
                    * 1024;
            }
        }
    }
    panic!("no mapping contains {p:?}");
}

#[cfg(target_os = "linux")]
#[test]
fn release_returns_resident_pages() {
    let ck = Checkpoint::open(&fixture("tiny-b")).unwrap();
    let wte = ck.get("transformer.wte.weight").unwrap();
    let len = wte.bytes.len() as u64; // 32 MB
    let before = mapping_rss(wte.bytes.as_ptr());
    let sum: u64 = wte.bytes.iter().step_by(4096).map(|&b| b as u64).sum();
    std::hint::black_box(sum);
    let touched = mapping_rss(wte.bytes.as_ptr());
    assert!(
        touched >= before + len * 3 / 4,
        "touched: {touched} of {len}"
    );
    ck.release(&wte);
    let after = mapping_rss(wte.bytes.as_ptr());
    // Pages outside the tensor (the pickle, the central directory, fault-around of the
    // neighbours) may stay; the tensor's own pages must go.
    assert!(
        after <= before + len / 8 && touched - after >= len * 3 / 4,
        "resident before {before}, touched {touched}, after release {after} ({len} bytes)"
    );
}
