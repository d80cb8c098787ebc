//! Reading a Hugging Face CrystalCoder directory's `config.json` and
//! `tokenizer.json` into what the model file needs.

use anyhow::{bail, Context, Result};
use crystald::model_file::{Hparams, SpecialTokens};
use serde_json::Value as Json;
use std::path::Path;

pub fn read_hparams(dir: &Path) -> Result<Hparams> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let cfg: Json = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let where_ = path.display();
    let model_type = cfg
        .get("model_type")
        .and_then(Json::as_str)
        .unwrap_or("(missing)");
    if !model_type.eq_ignore_ascii_case("crystalcoder") {
        bail!("{where_}: model_type is '{model_type}'; crystal-quantize converts CrystalCoder/CrystalChat checkpoints (model_type 'crystalcoder')");
    }
    for (key, want) in [
        ("activation_function", "swiglu"),
        ("position_embedding_type", "rotary"),
    ] {
        if let Some(v) = cfg.get(key).and_then(Json::as_str) {
            if v != want {
                bail!("{where_}: {key} is '{v}', but this engine implements '{want}' only");
            }
        }
    }
    let int = |k: &str| -> Result<usize> {
        cfg.get(k)
            .and_then(Json::as_u64)
            .map(|v| v as usize)
            .with_context(|| format!("{where_}: '{k}' is missing or not a non-negative integer"))
    };
    let float = |k: &str| -> Result<f32> {
        cfg.get(k)
            .and_then(Json::as_f64)
            .map(|v| v as f32)
            .with_context(|| format!("{where_}: '{k}' is missing or not a number"))
    };
    let n_embd = int("n_embd")?;
    // n_inner may be null in GPT-2 configs, meaning 4 * n_embd.
    let n_inner = match cfg.get("n_inner") {
        None | Some(Json::Null) => 4 * n_embd,
        Some(_) => int("n_inner")?,
    };
    let hp = Hparams {
        vocab_size: int("vocab_size")?,
        context_length: int("n_positions")?,
        n_embd,
        n_layer: int("n_layer")?,
        n_head: int("n_head")?,
        rotary_dim: int("rotary_dim")?,
        n_ff: Hparams::padded_ff(n_inner, crystald::quant::QK),
        n_inner,
        layer_norm_epsilon: float("layer_norm_epsilon")?,
        rope_freq_base: cfg
            .get("rotary_emb_base")
            .and_then(Json::as_f64)
            .unwrap_or(10000.0) as f32,
        mup_embeddings_scale: float("mup_embeddings_scale")?,
        mup_output_alpha: float("mup_output_alpha")?,
        mup_width_scale: float("mup_width_scale")?,
        scale_qk_dot_by_d: cfg
            .get("mup_scale_qk_dot_by_d")
            .and_then(Json::as_bool)
            .unwrap_or(false),
    };
    hp.validate()
        .map_err(|e| anyhow::anyhow!("{where_}: {e}"))?;
    Ok(hp)
}

/// The tokenizer JSON text (embedded verbatim) and the special ids found in it.
pub fn read_tokenizer(dir: &Path) -> Result<(String, SpecialTokens)> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let tok: Json = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let added = tok
        .get("added_tokens")
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let vocab = tok.pointer("/model/vocab").and_then(Json::as_object);
    let id = |content: &str| -> Result<u32> {
        let from_added = added
            .iter()
            .find(|t| t.get("content").and_then(Json::as_str) == Some(content))
            .and_then(|t| t.get("id"))
            .and_then(Json::as_u64);
        let from_vocab = || vocab.and_then(|v| v.get(content)).and_then(Json::as_u64);
        from_added
            .or_else(from_vocab)
            .map(|v| v as u32)
            .with_context(|| {
                format!(
                    "{}: special token '{content}' not found; is this the CrystalChat tokenizer?",
                    path.display()
                )
            })
    };
    let special = SpecialTokens {
        bos: id("<s>")?,
        eos: id("</s>")?,
        im_start: id("<|im_start|>")?,
        im_end: id("<|im_end|>")?,
        sys_start: id("<|sys_start|>")?,
        sys_end: id("<|sys_end|>")?,
    };
    Ok((text, special))
}
