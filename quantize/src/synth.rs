//! Random-weight CrystalCoder checkpoints in the real Hugging Face layouts, for benchmarks and
//! end-to-end tests of the converter.
//!
//! Tensors are generated and written in bounded chunks, so even the 7B shape (27 GB as fp32)
//! needs only a few MB of memory. Every tensor draws from its own PRNG stream keyed by
//! (seed, name), so any single tensor can be regenerated with [`SynthTensor::values`] to check
//! what a reader returns.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{bail, Context};
use serde_json::json;

/// Model dimensions to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthShape {
    /// The published CrystalChat 7B configuration.
    Real7B,
    /// A 2-layer model small enough for unit tests (keeps the real vocabulary).
    Tiny,
}

/// The configuration values that differ between shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynthConfig {
    pub n_embd: u64,
    pub n_layer: u64,
    pub n_head: u64,
    pub rotary_dim: u64,
    pub n_inner: u64,
    pub n_positions: u64,
    pub vocab_size: u64,
}

impl SynthShape {
    pub fn config(self) -> SynthConfig {
        match self {
            SynthShape::Real7B => SynthConfig {
                n_embd: 4096,
                n_layer: 32,
                n_head: 32,
                rotary_dim: 32,
                n_inner: 10922,
                n_positions: 2048,
                vocab_size: 32032,
            },
            SynthShape::Tiny => SynthConfig {
                n_embd: 128,
                n_layer: 2,
                n_head: 2,
                rotary_dim: 16,
                n_inner: 330,
                n_positions: 256,
                vocab_size: 32032,
            },
        }
    }
}

/// On-disk layout to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthFormat {
    /// One `model.safetensors` in bf16, `lm_head` omitted (tied), no attention buffers.
    SafetensorsBf16,
    /// fp32 `torch.save` zip shards `pytorch_model-0000i-of-0000n.bin` plus
    /// `pytorch_model.bin.index.json`, with the `attn.bias`/`attn.masked_bias` buffers and a
    /// separate `lm_head.weight` copy, like the published 7B checkpoint. `shards: 1` writes a
    /// single `pytorch_model.bin` without an index, as `save_pretrained` does.
    BinF32Sharded { shards: usize },
}

#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub shape: SynthShape,
    pub format: SynthFormat,
    pub seed: u64,
    /// Copied into the output directory as `tokenizer.json`.
    pub tokenizer_json: std::path::PathBuf,
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Approximately normal (sum of four uniforms, so bounded at about ±3.5 std).
    Normal {
        mean: f32,
        std: f32,
    },
    /// Lower-triangular ones over the last two dimensions (the causal-mask buffer).
    CausalMask,
    Const(f32),
}

/// Element type as written to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    BF16,
    Bool,
}

impl StoredDtype {
    pub fn size(self) -> u64 {
        match self {
            StoredDtype::F32 => 4,
            StoredDtype::BF16 => 2,
            StoredDtype::Bool => 1,
        }
    }
}

/// One tensor of a synthetic checkpoint.
#[derive(Clone, Debug)]
pub struct SynthTensor {
    pub name: String,
    pub shape: Vec<u64>,
    pub init: Init,
    pub dtype: StoredDtype,
    /// Name whose PRNG stream this tensor uses; `lm_head.weight` reuses the embedding's so
    /// the two are identical copies.
    stream: String,
}

impl SynthTensor {
    fn new(name: String, shape: Vec<u64>, init: Init, dtype: StoredDtype) -> Self {
        SynthTensor {
            stream: name.clone(),
            name,
            shape,
            init,
            dtype,
        }
    }

    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    pub fn stored_bytes(&self) -> u64 {
        self.numel() * self.dtype.size()
    }

    /// All values exactly as stored (bf16 rounding applied, bools as 0.0/1.0), widened to
    /// f32. Allocates the whole tensor: meant for tests on small shapes.
    pub fn values(&self, seed: u64) -> Vec<f32> {
        let mut g = self.generator(seed);
        let mut v = vec![0.0; self.numel() as usize];
        g.fill(&mut v);
        match self.dtype {
            StoredDtype::F32 | StoredDtype::Bool => {}
            StoredDtype::BF16 => {
                for x in &mut v {
                    *x = half::bf16::from_f32(*x).to_f32();
                }
            }
        }
        v
    }

    fn generator(&self, seed: u64) -> ValueGen {
        let cols = self.shape.last().copied().unwrap_or(1);
        let rows = if self.shape.len() >= 2 {
            self.shape[self.shape.len() - 2]
        } else {
            1
        };
        ValueGen {
            rng: SplitMix64::new(seed ^ fnv1a(self.stream.as_bytes())),
            init: self.init,
            index: 0,
            rows,
            cols,
        }
    }
}

/// The tensors a checkpoint of this shape and format holds, in file order.
pub fn tensors(shape: SynthShape, format: SynthFormat) -> Vec<SynthTensor> {
    let c = shape.config();
    let (d, ff) = (c.n_embd, c.n_inner);
    let bin = matches!(format, SynthFormat::BinF32Sharded { .. });
    let dt = if bin {
        StoredDtype::F32
    } else {
        StoredDtype::BF16
    };
    let weight = Init::Normal {
        mean: 0.0,
        std: 0.02,
    };
    let bias = Init::Normal {
        mean: 0.0,
        std: 0.01,
    };
    let ln_w = Init::Normal {
        mean: 1.0,
        std: 0.05,
    };
    let mut v = Vec::new();
    let mut add = |name: String, shape: Vec<u64>, init| {
        v.push(SynthTensor::new(name, shape, init, dt));
    };
    add(
        "transformer.wte.weight".into(),
        vec![c.vocab_size, d],
        weight,
    );
    for l in 0..c.n_layer {
        let p = format!("transformer.h.{l}");
        add(format!("{p}.ln_1.weight"), vec![d], ln_w);
        add(format!("{p}.ln_1.bias"), vec![d], bias);
        add(format!("{p}.attn.c_attn.weight"), vec![d, 3 * d], weight);
        add(format!("{p}.attn.c_attn.bias"), vec![3 * d], bias);
        add(format!("{p}.attn.c_proj.weight"), vec![d, d], weight);
        add(format!("{p}.attn.c_proj.bias"), vec![d], bias);
        add(format!("{p}.ln_2.weight"), vec![d], ln_w);
        add(format!("{p}.ln_2.bias"), vec![d], bias);
        for fc in ["c_fc", "c_fc2"] {
            add(format!("{p}.mlp.{fc}.weight"), vec![d, ff], weight);
            add(format!("{p}.mlp.{fc}.bias"), vec![ff], bias);
        }
        add(format!("{p}.mlp.c_proj.weight"), vec![ff, d], weight);
        add(format!("{p}.mlp.c_proj.bias"), vec![d], bias);
    }
    add("transformer.ln_f.weight".into(), vec![d], ln_w);
    add("transformer.ln_f.bias".into(), vec![d], bias);
    if bin {
        let mut lm = SynthTensor::new(
            "lm_head.weight".into(),
            vec![c.vocab_size, d],
            weight,
            StoredDtype::F32,
        );
        lm.stream = "transformer.wte.weight".into();
        v.push(lm);
        // Buffers last, as in the reference fixture.
        let n = c.n_positions;
        for l in 0..c.n_layer {
            v.push(SynthTensor::new(
                format!("transformer.h.{l}.attn.bias"),
                vec![1, 1, n, n],
                Init::CausalMask,
                StoredDtype::Bool,
            ));
            v.push(SynthTensor::new(
                format!("transformer.h.{l}.attn.masked_bias"),
                vec![],
                Init::Const(-1e4),
                StoredDtype::F32,
            ));
        }
    }
    v
}

/// The `config.json` of a checkpoint of this shape (same keys as the published one).
pub fn config_json(shape: SynthShape) -> serde_json::Value {
    let c = shape.config();
    json!({
        "attn_pdrop": 0.0,
        "scale_attn_weights": true,
        "resid_pdrop": 0.0,
        "mup_embeddings_scale": 14.6,
        "n_inner": c.n_inner,
        "n_embd": c.n_embd,
        "layer_norm_epsilon": 1e-05,
        "n_positions": c.n_positions,
        "activation_function": "swiglu",
        "n_head": c.n_head,
        "n_layer": c.n_layer,
        "mup_output_alpha": 2.22,
        "mup_width_scale": 0.0625,
        "position_embedding_type": "rotary",
        "rotary_dim": c.rotary_dim,
        "mup_scale_qk_dot_by_d": true,
        "tie_word_embeddings": true,
        "vocab_size": c.vocab_size,
        "embd_pdrop": 0.0,
        "model_type": "crystalcoder",
        "use_cache": true,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "auto_map": {
            "AutoConfig": "configuration_crystalcoder.CrystalCoderConfig",
            "AutoModel": "modeling_crystalcoder.CrystalCoderModel",
            "AutoModelForCausalLM": "modeling_crystalcoder.CrystalCoderLMHeadModel"
        },
        "architectures": ["CrystalCoderLMHeadModel"]
    })
}

/// Writes config.json, tokenizer.json and the weights into `dir` (created if needed).
/// `progress` is called after each chunk with the tensor name, bytes written so far and the
/// total weight bytes.
pub fn write_synthetic(
    dir: &Path,
    opts: &SynthOptions,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cfg = serde_json::to_string_pretty(&config_json(opts.shape))?;
    std::fs::write(dir.join("config.json"), cfg + "\n")
        .with_context(|| format!("writing {}", dir.join("config.json").display()))?;
    std::fs::copy(&opts.tokenizer_json, dir.join("tokenizer.json"))
        .with_context(|| format!("copying {}", opts.tokenizer_json.display()))?;

    let list = tensors(opts.shape, opts.format);
    let total: u64 = list.iter().map(SynthTensor::stored_bytes).sum();
    let mut sink = Progress {
        done: 0,
        total,
        f: progress,
    };
    match opts.format {
        SynthFormat::SafetensorsBf16 => {
            let path = dir.join("model.safetensors");
            write_safetensors(&path, &list, opts.seed, &mut sink)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        SynthFormat::BinF32Sharded { shards } => {
            if shards == 0 {
                bail!("BinF32Sharded needs at least one shard");
            }
            write_bin_shards(dir, &list, shards, opts.seed, &mut sink)?;
        }
    }
    Ok(())
}

struct Progress<'a> {
    done: u64,
    total: u64,
    f: &'a mut dyn FnMut(&str, u64, u64),
}

/// Elements generated per chunk: 4 MB of f32, whatever the tensor size.
const CHUNK: usize = 1 << 20;

/// Generates `t` chunk by chunk and writes its stored bytes to `w`.
fn stream_tensor(
    t: &SynthTensor,
    seed: u64,
    w: &mut dyn Write,
    sink: &mut Progress<'_>,
) -> std::io::Result<()> {
    let mut g = t.generator(seed);
    let mut vals = vec![0f32; CHUNK.min(t.numel() as usize)];
    let mut bytes = Vec::with_capacity(vals.len() * t.dtype.size() as usize);
    let mut left = t.numel();
    while left > 0 {
        let n = (left as usize).min(CHUNK);
        let chunk = &mut vals[..n];
        g.fill(chunk);
        bytes.clear();
        match t.dtype {
            StoredDtype::F32 => {
                for x in chunk.iter() {
                    bytes.extend_from_slice(&x.to_le_bytes());
                }
            }
            StoredDtype::BF16 => {
                for x in chunk.iter() {
                    bytes.extend_from_slice(&half::bf16::from_f32(*x).to_bits().to_le_bytes());
                }
            }
            StoredDtype::Bool => bytes.extend(chunk.iter().map(|&x| (x != 0.0) as u8)),
        }
        w.write_all(&bytes)?;
        left -= n as u64;
        sink.done += bytes.len() as u64;
        (sink.f)(&t.name, sink.done, sink.total);
    }
    Ok(())
}

fn write_safetensors(
    path: &Path,
    list: &[SynthTensor],
    seed: u64,
    sink: &mut Progress<'_>,
) -> anyhow::Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut at = 0u64;
    for t in list {
        let dtype = match t.dtype {
            StoredDtype::F32 => "F32",
            StoredDtype::BF16 => "BF16",
            StoredDtype::Bool => "BOOL",
        };
        let end = at + t.stored_bytes();
        header.insert(
            t.name.clone(),
            json!({"dtype": dtype, "shape": t.shape, "data_offsets": [at, end]}),
        );
        at = end;
    }
    let mut text = serde_json::to_string(&header)?;
    // The format pads the header with spaces so the data block starts 8-byte aligned.
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut w = BufWriter::with_capacity(1 << 20, File::create(path)?);
    w.write_all(&(text.len() as u64).to_le_bytes())?;
    w.write_all(text.as_bytes())?;
    for t in list {
        stream_tensor(t, seed, &mut w, sink)?;
    }
    w.into_inner().map_err(|e| e.into_error())?;
    Ok(())
}

fn write_bin_shards(
    dir: &Path,
    list: &[SynthTensor],
    shards: usize,
    seed: u64,
    sink: &mut Progress<'_>,
) -> anyhow::Result<()> {
    // Contiguous groups of roughly equal bytes, in file order, like save_pretrained's sharding;
    // groups left empty by one dominant tensor are dropped.
    let total: u64 = list
        .iter()
        .map(SynthTensor::stored_bytes)
        .sum::<u64>()
        .max(1);
    let mut groups: Vec<Vec<&SynthTensor>> = vec![Vec::new(); shards];
    let mut before = 0u64;
    for t in list {
        let g = ((before as u128 * shards as u128 / total as u128) as usize).min(shards - 1);
        groups[g].push(t);
        before += t.stored_bytes();
    }
    groups.retain(|g| !g.is_empty());
    let n = groups.len();
    if shards == 1 {
        return write_bin(&dir.join("pytorch_model.bin"), &groups[0], seed, sink);
    }
    let mut weight_map = serde_json::Map::new();
    for (i, g) in groups.iter().enumerate() {
        let name = format!("pytorch_model-{:05}-of-{:05}.bin", i + 1, n);
        let path = dir.join(&name);
        write_bin(&path, g, seed, sink)?;
        for t in g {
            weight_map.insert(t.name.clone(), json!(name));
        }
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let path = dir.join("pytorch_model.bin.index.json");
    std::fs::write(&path, serde_json::to_string_pretty(&index)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// One torch.save archive holding `list` as a state dict, each tensor in its own storage.
fn write_bin(
    path: &Path,
    list: &[&SynthTensor],
    seed: u64,
    sink: &mut Progress<'_>,
) -> anyhow::Result<()> {
    let pickled: Vec<PickledTensor> = list
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let storage_type = match t.dtype {
                StoredDtype::F32 => "FloatStorage",
                StoredDtype::BF16 => "BFloat16Storage",
                StoredDtype::Bool => "BoolStorage",
            };
            PickledTensor::contiguous(&t.name, storage_type, &i.to_string(), &t.shape)
        })
        .collect();
    let pickle = state_dict_pickle(&pickled);
    let mut zip = TorchZipWriter::create(path, &archive_prefix(path))?;
    zip.entry("data.pkl", &pickle)?;
    zip.entry("byteorder", b"little")?;
    for (i, t) in list.iter().enumerate() {
        zip.start(&format!("data/{i}"), t.stored_bytes())?;
        stream_tensor(t, seed, zip.writer(), sink)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    zip.entry("version", b"3\n")?;
    zip.finish()
        .with_context(|| format!("finishing {}", path.display()))
}

/// torch names the archive's top folder after the file stem.
fn archive_prefix(path: &Path) -> String {
    path.file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("archive")
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// torch.save building blocks, public so tests can craft valid and deliberately broken files.

/// A tensor entry of a pickled state dict, as `_rebuild_tensor_v2` arguments.
#[derive(Clone, Debug)]
pub struct PickledTensor {
    pub name: String,
    /// `FloatStorage`, `BoolStorage`, ... (module `torch`).
    pub storage_type: String,
    /// Names the archive entry `data/<key>`.
    pub key: String,
    /// Elements in the storage (the persistent id's numel).
    pub storage_numel: u64,
    pub offset: u64,
    pub size: Vec<u64>,
    pub stride: Vec<u64>,
}

impl PickledTensor {
    /// A tensor owning a whole storage of exactly its size, contiguous.
    pub fn contiguous(name: &str, storage_type: &str, key: &str, shape: &[u64]) -> Self {
        let mut stride = vec![1u64; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * shape[i + 1];
        }
        PickledTensor {
            name: name.to_string(),
            storage_type: storage_type.to_string(),
            key: key.to_string(),
            storage_numel: shape.iter().product(),
            offset: 0,
            size: shape.to_vec(),
            stride,
        }
    }
}

/// The `data.pkl` (pickle protocol 2) that `torch.save(state_dict)` writes for these tensors,
/// with the same opcode patterns: memoised strings and globals, SETITEMS in batches of 1000.
pub fn state_dict_pickle(tensors: &[PickledTensor]) -> Vec<u8> {
    let mut p = PickleWriter::default();
    p.out.extend_from_slice(&[0x80, 2]);
    p.op(b'}');
    p.memoize_new();
    for batch in tensors.chunks(1000) {
        p.op(b'(');
        for t in batch {
            p.str(&t.name);
            p.global("torch._utils", "_rebuild_tensor_v2");
            p.op(b'(');
            // Persistent id: ('storage', torch.<Type>, key, 'cpu', numel).
            p.op(b'(');
            p.str("storage");
            p.global("torch", &t.storage_type);
            p.str(&t.key);
            p.str("cpu");
            p.int(t.storage_numel);
            p.op(b't');
            p.memoize_new();
            p.op(b'Q');
            p.int(t.offset);
            p.int_tuple(&t.size);
            p.int_tuple(&t.stride);
            p.op(0x89); // requires_grad = False
            p.global("collections", "OrderedDict");
            p.op(b')');
            p.op(b'R'); // backward_hooks = OrderedDict()
            p.memoize_new();
            p.op(b't');
            p.memoize_new();
            p.op(b'R');
            p.memoize_new();
        }
        p.op(b'u');
    }
    p.op(b'.');
    p.out
}

#[derive(Default)]
struct PickleWriter {
    out: Vec<u8>,
    next_memo: u32,
    memo: HashMap<String, u32>,
}

impl PickleWriter {
    fn op(&mut self, op: u8) {
        self.out.push(op);
    }

    fn memoize_new(&mut self) -> u32 {
        let k = self.next_memo;
        self.next_memo += 1;
        if k < 256 {
            self.out.extend_from_slice(&[b'q', k as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend_from_slice(&k.to_le_bytes());
        }
        k
    }

    /// Emits a BINGET for something already memoised under `memo_key`; false if it is new.
    fn get(&mut self, memo_key: &str) -> bool {
        let Some(&k) = self.memo.get(memo_key) else {
            return false;
        };
        if k < 256 {
            self.out.extend_from_slice(&[b'h', k as u8]);
        } else {
            self.out.push(b'j');
            self.out.extend_from_slice(&k.to_le_bytes());
        }
        true
    }

    fn str(&mut self, s: &str) {
        let key = format!("s:{s}");
        if self.get(&key) {
            return;
        }
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        let k = self.memoize_new();
        self.memo.insert(key, k);
    }

    fn global(&mut self, module: &str, name: &str) {
        let key = format!("g:{module}\n{name}");
        if self.get(&key) {
            return;
        }
        self.out.push(b'c');
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
        let k = self.memoize_new();
        self.memo.insert(key, k);
    }

    fn int(&mut self, v: u64) {
        if v < 256 {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if v < 65536 {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if v <= i32::MAX as u64 {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as u32).to_le_bytes());
        } else {
            // LONG1: minimal little-endian two's complement; a positive value needs a clear
            // top bit.
            let mut b = v.to_le_bytes().to_vec();
            while b.len() > 1 && b[b.len() - 1] == 0 && b[b.len() - 2] & 0x80 == 0 {
                b.pop();
            }
            if b[b.len() - 1] & 0x80 != 0 {
                b.push(0);
            }
            self.out.extend_from_slice(&[0x8a, b.len() as u8]);
            self.out.extend_from_slice(&b);
        }
    }

    fn int_tuple(&mut self, v: &[u64]) {
        match v.len() {
            0 => self.op(b')'),
            1..=3 => {
                for &x in v {
                    self.int(x);
                }
                self.op(0x84 + v.len() as u8);
            }
            _ => {
                self.op(b'(');
                for &x in v {
                    self.int(x);
                }
                self.op(b't');
            }
        }
        self.memoize_new();
    }
}

/// Streams a torch.save-style zip: stored (uncompressed) entries under `<prefix>/`, data
/// 64-byte aligned like torch's own writer so readers can map tensors in place.
pub struct TorchZipWriter {
    zip: zip::ZipWriter<BufWriter<File>>,
    prefix: String,
}

impl TorchZipWriter {
    pub fn create(path: &Path, prefix: &str) -> anyhow::Result<Self> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TorchZipWriter {
            zip: zip::ZipWriter::new(BufWriter::with_capacity(1 << 20, file)),
            prefix: prefix.to_string(),
        })
    }

    /// Starts entry `<prefix>/<name>` of `len` bytes; write its data through [`Self::writer`].
    pub fn start(&mut self, name: &str, len: u64) -> anyhow::Result<()> {
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .with_alignment(64)
            .large_file(len >= u32::MAX as u64);
        self.zip
            .start_file(format!("{}/{name}", self.prefix), opts)?;
        Ok(())
    }

    pub fn writer(&mut self) -> &mut dyn Write {
        &mut self.zip
    }

    /// A whole small entry at once.
    pub fn entry(&mut self, name: &str, data: &[u8]) -> anyhow::Result<()> {
        self.start(name, data.len() as u64)?;
        self.zip.write_all(data)?;
        Ok(())
    }

    pub fn finish(self) -> anyhow::Result<()> {
        // into_inner flushes and reports a late write error (e.g. disk full) instead of
        // losing it on drop.
        self.zip
            .finish()?
            .into_inner()
            .map_err(|e| e.into_error())?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Random numbers.

/// splitmix64: tiny state, passes BigCrush, and ~1 ns per draw.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    #[inline]
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Sequential value stream of one tensor; chunking does not change the values.
struct ValueGen {
    rng: SplitMix64,
    init: Init,
    /// Elements produced so far (for position-dependent inits).
    index: u64,
    rows: u64,
    cols: u64,
}

impl ValueGen {
    fn fill(&mut self, out: &mut [f32]) {
        match self.init {
            Init::Normal { mean, std } => {
                // Sum of four 16-bit uniforms: mean 4·32767.5, std 65536/√3 (up to 2⁻³² error).
                // Close enough to a Gaussian for weights and ~20× cheaper than Box-Muller,
                // which matters when writing 7B values.
                let scale = std * (3f32.sqrt() / 65536.0);
                for x in out.iter_mut() {
                    let r = self.rng.next();
                    // At most 4·65535, so i32 (fast to convert, unlike u64).
                    let s = ((r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48))
                        as i32;
                    *x = mean + (s - 131_070) as f32 * scale;
                }
            }
            Init::CausalMask => {
                for x in out.iter_mut() {
                    let i = self.index % (self.rows * self.cols);
                    let (r, c) = (i / self.cols, i % self.cols);
                    *x = if c <= r { 1.0 } else { 0.0 };
                    self.index += 1;
                }
                return;
            }
            Init::Const(c) => out.fill(c),
        }
        self.index += out.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_does_not_change_values() {
        let t = &tensors(SynthShape::Tiny, SynthFormat::SafetensorsBf16)[0];
        let mut a = t.generator(7);
        let mut whole = vec![0f32; 1000];
        a.fill(&mut whole);
        let mut b = t.generator(7);
        let mut parts = vec![0f32; 1000];
        let (x, y) = parts.split_at_mut(333);
        b.fill(x);
        b.fill(y);
        assert_eq!(whole, parts);
    }

    #[test]
    fn normal_has_requested_moments() {
        let t = SynthTensor::new(
            "w".into(),
            vec![200_000],
            Init::Normal {
                mean: 0.5,
                std: 0.02,
            },
            StoredDtype::F32,
        );
        let v = t.values(1);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!((mean - 0.5).abs() < 1e-3, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 5e-4, "std {}", var.sqrt());
        // Different seeds give different streams.
        assert_ne!(t.values(1)[..8], t.values(2)[..8]);
    }

    #[test]
    fn causal_mask_is_lower_triangular() {
        let t = SynthTensor::new(
            "m".into(),
            vec![1, 1, 5, 5],
            Init::CausalMask,
            StoredDtype::Bool,
        );
        let v = t.values(0);
        for r in 0..5 {
            for c in 0..5 {
                assert_eq!(v[r * 5 + c], if c <= r { 1.0 } else { 0.0 });
            }
        }
    }

    #[test]
    fn long_ints_round_trip_through_the_reader() {
        for v in [
            0u64,
            255,
            256,
            65535,
            65536,
            1 << 31,
            (1 << 31) - 1,
            1 << 40,
            u32::MAX as u64,
            0x80u64 << 48,
        ] {
            let mut p = PickleWriter::default();
            p.int(v);
            p.op(b'.');
            let got = crate::checkpoint::pickle_int_for_tests(&p.out);
            assert_eq!(got, Some(v as i64), "value {v}");
        }
    }

    #[test]
    fn seven_b_layout_is_complete() {
        let list = tensors(SynthShape::Real7B, SynthFormat::BinF32Sharded { shards: 4 });
        // wte + 32 × 14 + ln_f × 2 + lm_head + 32 × 2 buffers
        assert_eq!(list.len(), 1 + 32 * 14 + 2 + 1 + 64);
        let bytes: u64 = list.iter().map(SynthTensor::stored_bytes).sum();
        // The published checkpoint is about 27 GB.
        assert!((26e9..29e9).contains(&(bytes as f64)), "{bytes}");
    }
}
