//! The CrystalCoder conventions inside a GGUF file: architecture name,
//! metadata keys, tensor names and shapes, and how each tensor is derived
//! from the Hugging Face checkpoint. The quantizer writes by these rules and
//! the engine validates by them, so they live in one place.
//!
//! Matrices are stored as ggml does: rows along the output dimension, each
//! row contiguous along the reduction (input) dimension, so quantization
//! blocks run along the dot products. HF's GPT-2 `Conv1D` weights are
//! `[in, out]`, so the quantizer transposes them.
//!
//! Padding: block formats need rows that are a multiple of 32 values (256
//! for the k-quants), and the MLP width `n_inner` (10922 for the 7B model)
//! is not. The file therefore stores the MLP at width
//! `n_ff = round_up(n_inner, 32)` (10944), or `round_up(n_inner, 256)`
//! (11008, 0.8 % more MLP bytes) when a k-quant MLP matrix needs it: `ffn_up`,
//! `ffn_gate` and their biases get zero rows/entries past `n_inner`, so the
//! extra activations are `0 * silu(0) = 0`, and `ffn_down` gets zero columns
//! past `n_inner`. The result is exactly the unpadded function. The engine
//! only sees `n_ff` (`crystalcoder.feed_forward_length`); the checkpoint's
//! width is kept in `crystalcoder.feed_forward_length_original`. Every type,
//! f32 included, is padded the same way so the engine has one shape.

use crate::gguf::{Header, Value};
use crate::quant::{QK, QK_K};

pub const ARCH: &str = "crystalcoder";

pub mod keys {
    pub const NAME: &str = "general.name";
    pub const FILE_TYPE: &str = "general.file_type";
    pub const QUANT_VERSION: &str = "general.quantization_version";
    pub const CONTEXT_LENGTH: &str = "crystalcoder.context_length";
    pub const EMBEDDING_LENGTH: &str = "crystalcoder.embedding_length";
    pub const BLOCK_COUNT: &str = "crystalcoder.block_count";
    pub const FEED_FORWARD_LENGTH: &str = "crystalcoder.feed_forward_length";
    pub const FEED_FORWARD_LENGTH_ORIGINAL: &str = "crystalcoder.feed_forward_length_original";
    pub const HEAD_COUNT: &str = "crystalcoder.attention.head_count";
    pub const LAYER_NORM_EPSILON: &str = "crystalcoder.attention.layer_norm_epsilon";
    pub const ROPE_DIMENSION_COUNT: &str = "crystalcoder.rope.dimension_count";
    pub const ROPE_FREQ_BASE: &str = "crystalcoder.rope.freq_base";
    pub const VOCAB_SIZE: &str = "crystalcoder.vocab_size";
    pub const MUP_EMBEDDINGS_SCALE: &str = "crystalcoder.mup.embeddings_scale";
    pub const MUP_OUTPUT_ALPHA: &str = "crystalcoder.mup.output_alpha";
    pub const MUP_WIDTH_SCALE: &str = "crystalcoder.mup.width_scale";
    pub const MUP_SCALE_QK_DOT_BY_D: &str = "crystalcoder.mup.scale_qk_dot_by_d";
    pub const TOKENIZER_JSON: &str = "tokenizer.huggingface.json";
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    pub const UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
    pub const IM_START_ID: &str = "tokenizer.crystalchat.im_start_token_id";
    pub const IM_END_ID: &str = "tokenizer.crystalchat.im_end_token_id";
    pub const SYS_START_ID: &str = "tokenizer.crystalchat.sys_start_token_id";
    pub const SYS_END_ID: &str = "tokenizer.crystalchat.sys_end_token_id";
}

/// The longest context any file may declare (see [`Hparams::max_context`]).
pub const MAX_CONTEXT: usize = 1 << 17;

/// Everything the forward pass needs to know about the model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Hparams {
    pub vocab_size: usize,
    pub context_length: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub rotary_dim: usize,
    /// MLP width as stored (padded to a multiple of 32).
    pub n_ff: usize,
    /// MLP width of the checkpoint.
    pub n_inner: usize,
    pub layer_norm_epsilon: f32,
    pub rope_freq_base: f32,
    pub mup_embeddings_scale: f32,
    pub mup_output_alpha: f32,
    pub mup_width_scale: f32,
    pub scale_qk_dot_by_d: bool,
}

impl Hparams {
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// The factor applied to q·k: 1/head_dim under muP, else 1/sqrt(head_dim).
    pub fn attention_scale(&self) -> f32 {
        let hd = self.head_dim() as f32;
        if self.scale_qk_dot_by_d {
            1.0 / hd
        } else {
            1.0 / hd.sqrt()
        }
    }

    /// The factor applied to the logits.
    pub fn logit_scale(&self) -> f32 {
        (self.mup_output_alpha as f64 * self.mup_width_scale as f64) as f32
    }

    /// The stored MLP width: `n_inner` rounded up to whole blocks of the
    /// widest block the file's MLP matrices use (32, or 256 for k-quants).
    pub fn padded_ff(n_inner: usize, block: usize) -> usize {
        n_inner.div_ceil(block) * block
    }

    /// Checks the relations the forward pass relies on.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("context_length", self.context_length),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_inner", self.n_inner),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} is 0"));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!(
                "n_embd {} is not a multiple of n_head {}",
                self.n_embd, self.n_head
            ));
        }
        if !self.n_embd.is_multiple_of(QK) {
            return Err(format!("n_embd {} is not a multiple of {QK}", self.n_embd));
        }
        if !self.rotary_dim.is_multiple_of(2) || self.rotary_dim > self.head_dim() {
            return Err(format!(
                "rotary_dim {} must be even and at most head_dim {}",
                self.rotary_dim,
                self.head_dim()
            ));
        }
        if self.n_ff != Self::padded_ff(self.n_inner, QK)
            && self.n_ff != Self::padded_ff(self.n_inner, QK_K)
        {
            return Err(format!(
                "feed_forward_length {} is not n_inner {} rounded up to {QK} or {QK_K}",
                self.n_ff, self.n_inner
            ));
        }
        let floats = [
            ("layer_norm_epsilon", self.layer_norm_epsilon),
            ("rope_freq_base", self.rope_freq_base),
            ("mup_embeddings_scale", self.mup_embeddings_scale),
            ("mup_output_alpha", self.mup_output_alpha),
            ("mup_width_scale", self.mup_width_scale),
        ];
        for (name, v) in floats {
            if !v.is_finite() || v <= 0.0 {
                return Err(format!("{name} is {v}, expected a positive finite number"));
            }
        }
        // Keep sizes far from overflow in any index arithmetic.
        let limit = 1usize << 24;
        for (name, v) in positive {
            if v > limit {
                return Err(format!("{name} {v} is implausibly large"));
            }
        }
        // The KV cache and rotary table are sized from the context, so a
        // corrupt value must not get that far.
        let max_ctx = self.max_context();
        if self.context_length > max_ctx {
            return Err(format!(
                "context_length {} is beyond what the model can address: at most {max_ctx} \
                 (the longest rotary wavelength, 2π·rope_freq_base^((rotary_dim-2)/rotary_dim), \
                 and never more than {MAX_CONTEXT}); the file is corrupt or not a CrystalChat model",
                self.context_length
            ));
        }
        Ok(())
    }

    /// The longest context a file may declare: positions further apart than
    /// the slowest rotary frequency's wavelength look alike to attention, so
    /// no checkpoint is trained past it; [`MAX_CONTEXT`] caps files without
    /// rotary dimensions. 35 332 for CrystalChat (rotary_dim 32, base 10⁴),
    /// whose real context is 2048.
    pub fn max_context(&self) -> usize {
        let rd = self.rotary_dim as f64;
        if self.rotary_dim < 4 {
            return MAX_CONTEXT;
        }
        let wavelength = std::f64::consts::TAU * (self.rope_freq_base as f64).powf((rd - 2.0) / rd);
        (wavelength as usize).min(MAX_CONTEXT)
    }

    pub fn to_metadata(&self) -> Vec<(String, Value)> {
        let u = |v: usize| Value::U32(v as u32);
        vec![
            (keys::CONTEXT_LENGTH.into(), u(self.context_length)),
            (keys::EMBEDDING_LENGTH.into(), u(self.n_embd)),
            (keys::BLOCK_COUNT.into(), u(self.n_layer)),
            (keys::FEED_FORWARD_LENGTH.into(), u(self.n_ff)),
            (keys::FEED_FORWARD_LENGTH_ORIGINAL.into(), u(self.n_inner)),
            (keys::HEAD_COUNT.into(), u(self.n_head)),
            (
                keys::LAYER_NORM_EPSILON.into(),
                Value::F32(self.layer_norm_epsilon),
            ),
            (keys::ROPE_DIMENSION_COUNT.into(), u(self.rotary_dim)),
            (keys::ROPE_FREQ_BASE.into(), Value::F32(self.rope_freq_base)),
            (keys::VOCAB_SIZE.into(), u(self.vocab_size)),
            (
                keys::MUP_EMBEDDINGS_SCALE.into(),
                Value::F32(self.mup_embeddings_scale),
            ),
            (
                keys::MUP_OUTPUT_ALPHA.into(),
                Value::F32(self.mup_output_alpha),
            ),
            (
                keys::MUP_WIDTH_SCALE.into(),
                Value::F32(self.mup_width_scale),
            ),
            (
                keys::MUP_SCALE_QK_DOT_BY_D.into(),
                Value::Bool(self.scale_qk_dot_by_d),
            ),
        ]
    }

    pub fn from_header(h: &Header) -> Result<Hparams, String> {
        let arch = h
            .get(crate::gguf::KEY_ARCHITECTURE)
            .and_then(Value::as_str)
            .unwrap_or("(none)");
        if arch != ARCH {
            return Err(format!(
                "architecture is '{arch}', this engine runs '{ARCH}'"
            ));
        }
        let int = |k: &str| -> Result<usize, String> {
            h.get(k)
                .ok_or_else(|| format!("metadata key '{k}' is missing"))?
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| format!("metadata key '{k}' is not an unsigned integer"))
        };
        let float = |k: &str| -> Result<f32, String> {
            h.get(k)
                .ok_or_else(|| format!("metadata key '{k}' is missing"))?
                .as_f64()
                .map(|v| v as f32)
                .ok_or_else(|| format!("metadata key '{k}' is not a number"))
        };
        let hp = Hparams {
            vocab_size: int(keys::VOCAB_SIZE)?,
            context_length: int(keys::CONTEXT_LENGTH)?,
            n_embd: int(keys::EMBEDDING_LENGTH)?,
            n_layer: int(keys::BLOCK_COUNT)?,
            n_head: int(keys::HEAD_COUNT)?,
            rotary_dim: int(keys::ROPE_DIMENSION_COUNT)?,
            n_ff: int(keys::FEED_FORWARD_LENGTH)?,
            n_inner: int(keys::FEED_FORWARD_LENGTH_ORIGINAL)?,
            layer_norm_epsilon: float(keys::LAYER_NORM_EPSILON)?,
            rope_freq_base: float(keys::ROPE_FREQ_BASE)?,
            mup_embeddings_scale: float(keys::MUP_EMBEDDINGS_SCALE)?,
            mup_output_alpha: float(keys::MUP_OUTPUT_ALPHA)?,
            mup_width_scale: float(keys::MUP_WIDTH_SCALE)?,
            scale_qk_dot_by_d: h
                .get(keys::MUP_SCALE_QK_DOT_BY_D)
                .ok_or_else(|| {
                    format!("metadata key '{}' is missing", keys::MUP_SCALE_QK_DOT_BY_D)
                })?
                .as_bool()
                .ok_or_else(|| {
                    format!(
                        "metadata key '{}' is not a bool",
                        keys::MUP_SCALE_QK_DOT_BY_D
                    )
                })?,
        };
        hp.validate()?;
        Ok(hp)
    }
}

/// What a tensor is, which decides its storage type under a preset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The token embedding, also the tied output head.
    Embedding,
    /// A GPT-2 Conv1D weight, `[in, out]` in the checkpoint.
    Linear,
    /// A LayerNorm weight or bias, or a linear bias.
    Vector,
}

/// One tensor of a transformer block. The file names, the checkpoint names,
/// the shapes, the loader and the quantization presets all key on this one
/// table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerTensor {
    AttnNormW,
    AttnNormB,
    QkvW,
    QkvB,
    AttnOutW,
    AttnOutB,
    FfnNormW,
    FfnNormB,
    UpW,
    UpB,
    GateW,
    GateB,
    DownW,
    DownB,
}

impl LayerTensor {
    /// File order within a block.
    pub const ALL: [LayerTensor; 14] = [
        Self::AttnNormW,
        Self::AttnNormB,
        Self::QkvW,
        Self::QkvB,
        Self::AttnOutW,
        Self::AttnOutB,
        Self::FfnNormW,
        Self::FfnNormB,
        Self::UpW,
        Self::UpB,
        Self::GateW,
        Self::GateB,
        Self::DownW,
        Self::DownB,
    ];

    /// The name after `blk.N.` in the file and after `transformer.h.N.` in
    /// the checkpoint.
    pub fn names(self) -> (&'static str, &'static str) {
        use LayerTensor::*;
        match self {
            AttnNormW => ("attn_norm.weight", "ln_1.weight"),
            AttnNormB => ("attn_norm.bias", "ln_1.bias"),
            QkvW => ("attn_qkv.weight", "attn.c_attn.weight"),
            QkvB => ("attn_qkv.bias", "attn.c_attn.bias"),
            AttnOutW => ("attn_output.weight", "attn.c_proj.weight"),
            AttnOutB => ("attn_output.bias", "attn.c_proj.bias"),
            FfnNormW => ("ffn_norm.weight", "ln_2.weight"),
            FfnNormB => ("ffn_norm.bias", "ln_2.bias"),
            UpW => ("ffn_up.weight", "mlp.c_fc.weight"),
            UpB => ("ffn_up.bias", "mlp.c_fc.bias"),
            GateW => ("ffn_gate.weight", "mlp.c_fc2.weight"),
            GateB => ("ffn_gate.bias", "mlp.c_fc2.bias"),
            DownW => ("ffn_down.weight", "mlp.c_proj.weight"),
            DownB => ("ffn_down.bias", "mlp.c_proj.bias"),
        }
    }

    pub fn kind(self) -> Kind {
        use LayerTensor::*;
        match self {
            QkvW | AttnOutW | UpW | GateW | DownW => Kind::Linear,
            _ => Kind::Vector,
        }
    }

    /// `(file dims innermost first, checkpoint shape)` for embedding width
    /// `d`, stored MLP width `ff` and checkpoint MLP width `ffo`.
    fn shapes(self, d: u64, ff: u64, ffo: u64) -> (Vec<u64>, Vec<u64>) {
        use LayerTensor::*;
        match self {
            AttnNormW | AttnNormB | AttnOutB | FfnNormW | FfnNormB | DownB => (vec![d], vec![d]),
            QkvW => (vec![d, 3 * d], vec![d, 3 * d]),
            QkvB => (vec![3 * d], vec![3 * d]),
            AttnOutW => (vec![d, d], vec![d, d]),
            UpW | GateW => (vec![d, ff], vec![d, ffo]),
            UpB | GateB => (vec![ff], vec![ffo]),
            DownW => (vec![ff, d], vec![ffo, d]),
        }
    }
}

/// One tensor of the model file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorDesc {
    pub name: String,
    pub hf_name: String,
    pub kind: Kind,
    /// The block and role of a per-layer tensor.
    pub layer: Option<(usize, LayerTensor)>,
    /// Shape in the file, innermost first (`[cols, rows]` for a matrix), padded.
    pub dims: Vec<u64>,
    /// Shape in the checkpoint, outermost first, unpadded.
    pub hf_shape: Vec<u64>,
}

pub fn layer_tensor_name(layer: usize, t: LayerTensor) -> String {
    format!("blk.{layer}.{}", t.names().0)
}

pub const TOKEN_EMBD: &str = "token_embd.weight";
pub const OUTPUT_NORM: &str = "output_norm.weight";
pub const OUTPUT_NORM_BIAS: &str = "output_norm.bias";

/// The tensors of the model file, in file order.
pub fn tensor_descs(hp: &Hparams) -> Vec<TensorDesc> {
    let (d, ff, ffo, v) = (
        hp.n_embd as u64,
        hp.n_ff as u64,
        hp.n_inner as u64,
        hp.vocab_size as u64,
    );
    let global =
        |name: &str, hf_name: &str, kind: Kind, dims: Vec<u64>, hf_shape: Vec<u64>| TensorDesc {
            name: name.into(),
            hf_name: hf_name.into(),
            kind,
            layer: None,
            dims,
            hf_shape,
        };
    let mut out = vec![global(
        TOKEN_EMBD,
        "transformer.wte.weight",
        Kind::Embedding,
        vec![d, v],
        vec![v, d],
    )];
    for l in 0..hp.n_layer {
        for t in LayerTensor::ALL {
            let (dims, hf_shape) = t.shapes(d, ff, ffo);
            out.push(TensorDesc {
                name: layer_tensor_name(l, t),
                hf_name: format!("transformer.h.{l}.{}", t.names().1),
                kind: t.kind(),
                layer: Some((l, t)),
                dims,
                hf_shape,
            });
        }
    }
    out.push(global(
        OUTPUT_NORM,
        "transformer.ln_f.weight",
        Kind::Vector,
        vec![d],
        vec![d],
    ));
    out.push(global(
        OUTPUT_NORM_BIAS,
        "transformer.ln_f.bias",
        Kind::Vector,
        vec![d],
        vec![d],
    ));
    out
}

/// Special token ids the chat template and stop rules need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: u32,
    pub eos: u32,
    pub im_start: u32,
    pub im_end: u32,
    pub sys_start: u32,
    pub sys_end: u32,
}

impl SpecialTokens {
    /// The ids CrystalChat's tokenizer_config.json assigns: `<s>`, `</s>`
    /// and its four added chat tokens. The quantizer reads them from the
    /// checkpoint and the engine from the model file; this table is for the
    /// tests and fuzz targets that use the real tokenizer without a model.
    pub const CRYSTALCHAT: SpecialTokens = SpecialTokens {
        bos: 1,
        eos: 2,
        im_start: 32018,
        im_end: 32019,
        sys_start: 32020,
        sys_end: 32021,
    };

    pub fn to_metadata(&self) -> Vec<(String, Value)> {
        vec![
            (keys::BOS_ID.into(), Value::U32(self.bos)),
            (keys::EOS_ID.into(), Value::U32(self.eos)),
            (keys::IM_START_ID.into(), Value::U32(self.im_start)),
            (keys::IM_END_ID.into(), Value::U32(self.im_end)),
            (keys::SYS_START_ID.into(), Value::U32(self.sys_start)),
            (keys::SYS_END_ID.into(), Value::U32(self.sys_end)),
        ]
    }

    pub fn from_header(h: &Header) -> Result<SpecialTokens, String> {
        let id = |k: &str| -> Result<u32, String> {
            h.get(k)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| format!("metadata key '{k}' is missing or not a token id"))
        };
        Ok(SpecialTokens {
            bos: id(keys::BOS_ID)?,
            eos: id(keys::EOS_ID)?,
            im_start: id(keys::IM_START_ID)?,
            im_end: id(keys::IM_END_ID)?,
            sys_start: id(keys::SYS_START_ID)?,
            sys_end: id(keys::SYS_END_ID)?,
        })
    }
}
