//! The CrystalChat model: a validated, memory-mapped GGUF file and the
//! forward pass over it ([`forward`]).
//!
//! Weights are used in place from the map; loading copies nothing but the
//! tokenizer JSON. Everything the forward pass indexes is checked here once,
//! so a corrupt or foreign file is an error at load, never a panic later.

pub mod forward;
pub mod kv_cache;
pub mod ops;

pub use forward::{Logits, Session};
pub use kv_cache::KvType;

use crate::gguf::{self, Gguf, TensorInfo};
use crate::kernels::{Kernels, Weight};
use crate::model_file::{self, keys, Hparams, Kind, SpecialTokens};
use crate::quant::GgmlType;
use std::fmt;
use std::path::Path;

#[derive(Debug)]
pub enum EngineError {
    /// The model file cannot be used.
    Load(String),
    /// A token id that is not in the vocabulary.
    TokenOutOfRange {
        id: u32,
        vocab: usize,
    },
    /// The context window cannot hold the request.
    ContextFull {
        needed: usize,
        capacity: usize,
    },
    EmptyInput,
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::Load(m) => write!(f, "{m}"),
            EngineError::TokenOutOfRange { id, vocab } => {
                write!(f, "token id {id} is outside the vocabulary (0..{vocab})")
            }
            EngineError::ContextFull { needed, capacity } => {
                write!(
                    f,
                    "context full: {needed} tokens needed, the context holds {capacity}"
                )
            }
            EngineError::EmptyInput => write!(f, "no input tokens"),
        }
    }
}

impl std::error::Error for EngineError {}

/// Where a tensor's bytes are in the map, and its matrix shape.
#[derive(Clone, Copy, Debug)]
struct TensorLoc {
    ty: GgmlType,
    offset: usize,
    n_bytes: usize,
    rows: usize,
    cols: usize,
}

#[derive(Clone, Copy, Debug)]
struct Layer {
    attn_norm_w: TensorLoc,
    attn_norm_b: TensorLoc,
    qkv_w: TensorLoc,
    qkv_b: TensorLoc,
    attn_out_w: TensorLoc,
    attn_out_b: TensorLoc,
    ffn_norm_w: TensorLoc,
    ffn_norm_b: TensorLoc,
    up_w: TensorLoc,
    up_b: TensorLoc,
    gate_w: TensorLoc,
    gate_b: TensorLoc,
    down_w: TensorLoc,
    down_b: TensorLoc,
}

pub struct Model {
    file: Gguf,
    pub hp: Hparams,
    pub special: SpecialTokens,
    token_embd: TensorLoc,
    output_norm_w: TensorLoc,
    output_norm_b: TensorLoc,
    layers: Vec<Layer>,
    pub kernels: &'static dyn Kernels,
    pool: rayon::ThreadPool,
}

/// Alignment every tensor must have in the map, so f32 vectors and SIMD
/// loads are aligned.
const TENSOR_ALIGN: u64 = 32;

impl Model {
    pub fn load(
        path: &Path,
        kernels: &'static dyn Kernels,
        threads: usize,
    ) -> Result<Model, EngineError> {
        let file =
            Gguf::open(path).map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        Self::from_gguf(file, kernels, threads)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))
    }

    fn from_gguf(
        file: Gguf,
        kernels: &'static dyn Kernels,
        threads: usize,
    ) -> Result<Model, String> {
        let h = &file.header;
        let hp = Hparams::from_header(h)?;
        let special = SpecialTokens::from_header(h)?;
        for id in [
            special.bos,
            special.eos,
            special.im_start,
            special.im_end,
            special.sys_start,
            special.sys_end,
        ] {
            if id as usize >= hp.vocab_size {
                return Err(format!(
                    "special token id {id} is outside the vocabulary ({})",
                    hp.vocab_size
                ));
            }
        }
        if h.get(keys::TOKENIZER_JSON)
            .and_then(gguf::Value::as_str)
            .is_none()
        {
            return Err(format!(
                "metadata '{}' (the embedded tokenizer) is missing",
                keys::TOKENIZER_JSON
            ));
        }
        let mut locs = std::collections::HashMap::new();
        for d in model_file::tensor_descs(&hp) {
            let t = h
                .tensor(&d.name)
                .ok_or_else(|| format!("tensor '{}' is missing", d.name))?;
            if t.dims != d.dims {
                return Err(format!(
                    "tensor '{}' has dims {:?}, the hyper-parameters imply {:?}",
                    d.name, t.dims, d.dims
                ));
            }
            if d.kind == Kind::Vector && t.ty != GgmlType::F32 {
                return Err(format!(
                    "tensor '{}' is {}, norms and biases must be f32",
                    d.name, t.ty
                ));
            }
            if t.offset % TENSOR_ALIGN != 0 {
                return Err(format!(
                    "tensor '{}' data is not {TENSOR_ALIGN}-byte aligned (offset {})",
                    d.name, t.offset
                ));
            }
            locs.insert(d.name.clone(), loc(t));
        }
        let get = |name: &str| locs[name];
        let layer = |l: usize| {
            let g = |s: &str| get(&model_file::layer_tensor_name(l, s));
            Layer {
                attn_norm_w: g("attn_norm.weight"),
                attn_norm_b: g("attn_norm.bias"),
                qkv_w: g("attn_qkv.weight"),
                qkv_b: g("attn_qkv.bias"),
                attn_out_w: g("attn_output.weight"),
                attn_out_b: g("attn_output.bias"),
                ffn_norm_w: g("ffn_norm.weight"),
                ffn_norm_b: g("ffn_norm.bias"),
                up_w: g("ffn_up.weight"),
                up_b: g("ffn_up.bias"),
                gate_w: g("ffn_gate.weight"),
                gate_b: g("ffn_gate.bias"),
                down_w: g("ffn_down.weight"),
                down_b: g("ffn_down.bias"),
            }
        };
        let layers = (0..hp.n_layer).map(layer).collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("crystald-compute-{i}"))
            .build()
            .map_err(|e| format!("cannot start compute threads: {e}"))?;
        Ok(Model {
            token_embd: get(model_file::TOKEN_EMBD),
            output_norm_w: get(model_file::OUTPUT_NORM),
            output_norm_b: get(model_file::OUTPUT_NORM_BIAS),
            layers,
            hp,
            special,
            file,
            kernels,
            pool,
        })
    }

    pub fn tokenizer_json(&self) -> &str {
        self.file
            .header
            .get(keys::TOKENIZER_JSON)
            .and_then(gguf::Value::as_str)
            .expect("checked at load")
    }

    pub fn name(&self) -> &str {
        self.file
            .header
            .get(keys::NAME)
            .and_then(gguf::Value::as_str)
            .unwrap_or("crystalchat")
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    pub fn file_bytes(&self) -> u64 {
        self.file.file_len()
    }

    fn weight(&self, t: TensorLoc) -> Weight<'_> {
        Weight {
            ty: t.ty,
            rows: t.rows,
            cols: t.cols,
            data: self.bytes(t),
        }
    }

    fn vector(&self, t: TensorLoc) -> &[f32] {
        bytemuck::cast_slice(self.bytes(t))
    }

    fn bytes(&self, t: TensorLoc) -> &[u8] {
        &self.file.map()[t.offset..t.offset + t.n_bytes]
    }
}

fn loc(t: &TensorInfo) -> TensorLoc {
    TensorLoc {
        ty: t.ty,
        offset: t.offset as usize,
        n_bytes: t.n_bytes as usize,
        cols: t.dims[0] as usize,
        rows: t.dims.get(1).copied().unwrap_or(1) as usize,
    }
}
