//! The CrystalCoder forward pass, read top to bottom:
//!
//! ```text
//! x = wte[token] * mup_embeddings_scale
//! for each block:
//!     h = LayerNorm(x; ln_1)
//!     q, k, v = split3(h @ W_qkv + b_qkv); rotate q, k (GPT-J, first rotary_dim dims)
//!     a = softmax(q·kᵀ * attention_scale + causal mask) · v       (over the KV cache)
//!     x = x + a @ W_o + b_o
//!     h = LayerNorm(x; ln_2)
//!     x = x + ((h @ W_up + b_up) * silu(h @ W_gate + b_gate)) @ W_down + b_down
//! logits = LayerNorm(x; ln_f) @ wteᵀ * (mup_output_alpha * mup_width_scale)
//! ```
//!
//! A [`Session`] holds one sequence's KV cache and scratch buffers. Prompts
//! are run in batches of up to [`MAX_BATCH`] tokens (matrix × matrix, so a
//! weight block is loaded once per batch); generation runs one token at a
//! time against the cache.

use super::kv_cache::{KvCache, KvSlice, KvType};
use super::ops;
use super::{EngineError, Model, TensorLoc};
use crate::kernels::{ActType, Acts, PackBuf, Packed, Weight};
use crate::quant::{self, BlockQ8K, BlockQ8_0, QK, QK_K};
use rayon::prelude::*;

/// Tokens per prefill batch: large enough to reuse each weight block many
/// times, small enough that the scratch buffers stay a few MB.
pub const MAX_BATCH: usize = 64;

/// Which logits a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's, `[n_tokens, vocab]` (evaluation).
    All,
}

/// The most scratch memory a session uses (the buffers below at a full
/// batch, and the per-thread attention scores), for the start-up budget.
pub fn scratch_bytes(hp: &crate::model_file::Hparams, n_ctx: usize) -> u64 {
    let (t, d, ff, vocab) = (MAX_BATCH, hp.n_embd, hp.n_ff, hp.vocab_size);
    let widest = vocab.max(ff).max(3 * d);
    let floats = t * (4 * d + 3 * d + 2 * ff) + t * widest + t * vocab;
    let q8 = t * ff.max(d) / QK
        * (std::mem::size_of::<BlockQ8_0>() + crate::kernels::PACKED_BYTES_PER_BLOCK)
        + t * ff.max(d).div_ceil(QK_K) * std::mem::size_of::<BlockQ8K>();
    let rope = n_ctx * hp.rotary_dim / 2 * 8;
    (floats * 4 + q8 + rope + n_ctx * 4 * 64) as u64
}

pub struct Session {
    kv: KvCache,
    /// The tokens whose keys and values are in the cache, in order.
    history: Vec<u32>,
    rope: Vec<(f32, f32)>,
    // Scratch, sized for MAX_BATCH tokens.
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    up: Vec<f32>,
    gate: Vec<f32>,
    transposed: Vec<f32>,
    q8: Vec<BlockQ8_0>,
    q8k: Vec<BlockQ8K>,
    packed: PackBuf,
    logits: Vec<f32>,
}

impl Session {
    /// A session with room for `n_ctx` tokens (at most the model's context length).
    pub fn new(model: &Model, n_ctx: usize, kv_type: KvType) -> Session {
        let hp = &model.hp;
        let n_ctx = n_ctx.clamp(1, hp.context_length);
        let d = hp.n_embd;
        let kv = KvCache::new(kv_type, hp.n_layer, n_ctx, d).unwrap_or_else(|e| {
            let mib = KvCache::full_bytes(kv_type, hp.n_layer, n_ctx, d) >> 20;
            panic!("cannot reserve {mib} MiB of address space for the KV cache: {e}")
        });
        Session {
            kv,
            history: Vec::with_capacity(n_ctx),
            rope: ops::rope_table(n_ctx, hp.rotary_dim, hp.rope_freq_base),
            x: Vec::with_capacity(MAX_BATCH * d),
            h: Vec::new(),
            qkv: Vec::new(),
            att: Vec::new(),
            proj: Vec::new(),
            up: Vec::new(),
            gate: Vec::new(),
            transposed: Vec::new(),
            q8: Vec::new(),
            q8k: Vec::new(),
            packed: PackBuf::default(),
            logits: Vec::new(),
        }
    }

    /// Tokens in the cache.
    pub fn pos(&self) -> usize {
        self.history.len()
    }

    /// The tokens in the cache: a new prompt sharing a prefix with them only
    /// needs the rest computed.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    pub fn n_ctx(&self) -> usize {
        self.kv.n_ctx
    }

    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }

    /// Forgets everything after the first `n` tokens (kept for prefix reuse).
    pub fn truncate(&mut self, n: usize) {
        self.history.truncate(n);
    }

    /// Between requests: keeps the first `keep` cached tokens for prefix
    /// reuse and returns the memory of the rest of the KV cache and of the
    /// scratch buffers to the system, so one long request does not leave
    /// the process owning its peak for good.
    pub fn release(&mut self, keep: usize) {
        self.history.truncate(keep);
        self.kv.release_from(self.history.len());
        for v in [
            &mut self.x,
            &mut self.h,
            &mut self.qkv,
            &mut self.att,
            &mut self.proj,
            &mut self.up,
            &mut self.gate,
            &mut self.transposed,
            &mut self.logits,
        ] {
            *v = Vec::new();
        }
        self.q8 = Vec::new();
        self.q8k = Vec::new();
        self.packed.release();
    }

    /// Runs `tokens` at positions `pos()..pos() + tokens.len()` and returns
    /// the requested logits. On error nothing is added to the cache.
    pub fn forward(
        &mut self,
        model: &Model,
        tokens: &[u32],
        which: Logits,
    ) -> Result<&[f32], EngineError> {
        let hp = &model.hp;
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= hp.vocab_size) {
            return Err(EngineError::TokenOutOfRange {
                id,
                vocab: hp.vocab_size,
            });
        }
        if self.pos() + tokens.len() > self.kv.n_ctx {
            return Err(EngineError::ContextFull {
                needed: self.pos() + tokens.len(),
                capacity: self.kv.n_ctx,
            });
        }
        let vocab = hp.vocab_size;
        let mut all = Vec::new();
        if which == Logits::All {
            all.reserve_exact(tokens.len() * vocab);
        }
        for batch in tokens.chunks(MAX_BATCH) {
            let want_all = which == Logits::All;
            self.run_batch(model, batch, want_all);
            if want_all {
                all.extend_from_slice(&self.logits);
            }
        }
        if which == Logits::All {
            self.logits = all;
        }
        Ok(&self.logits)
    }

    fn run_batch(&mut self, model: &Model, tokens: &[u32], all_logits: bool) {
        let hp = &model.hp;
        let k = model.kernels;
        let (t, d, ff) = (tokens.len(), hp.n_embd, hp.n_ff);

        // Embedding lookup: one row of the (possibly quantized) table per token.
        let embd = model.weight(model.token_embd);
        self.x.resize(t * d, 0.0);
        for (row, &id) in self.x.chunks_exact_mut(d).zip(tokens) {
            quant::dequantize_row(embd.ty, embd.row(id as usize), row);
            row.iter_mut().for_each(|v| *v *= hp.mup_embeddings_scale);
        }

        for (l, layer) in model.layers.iter().enumerate() {
            // Attention.
            self.h.resize(t * d, 0.0);
            for (x, h) in self.x.chunks_exact(d).zip(self.h.chunks_exact_mut(d)) {
                ops::layer_norm(
                    x,
                    model.vector(layer.attn_norm_w),
                    model.vector(layer.attn_norm_b),
                    hp.layer_norm_epsilon,
                    h,
                );
            }
            self.qkv.resize(t * 3 * d, 0.0);
            let w = model.weight(layer.qkv_w);
            let acts = prepare(
                k,
                &w,
                &self.h,
                &mut self.q8,
                &mut self.q8k,
                &mut self.packed,
            );
            linear(
                model,
                &w,
                layer.qkv_b,
                acts,
                t,
                &mut self.qkv,
                &mut self.transposed,
            );
            self.attention(model, l, t);
            self.proj.resize(t * d, 0.0);
            let w = model.weight(layer.attn_out_w);
            let acts = prepare(
                k,
                &w,
                &self.att,
                &mut self.q8,
                &mut self.q8k,
                &mut self.packed,
            );
            linear(
                model,
                &w,
                layer.attn_out_b,
                acts,
                t,
                &mut self.proj,
                &mut self.transposed,
            );
            self.x.iter_mut().zip(&self.proj).for_each(|(x, p)| *x += p);

            // MLP: up and gate share one quantization of h.
            for (x, h) in self.x.chunks_exact(d).zip(self.h.chunks_exact_mut(d)) {
                ops::layer_norm(
                    x,
                    model.vector(layer.ffn_norm_w),
                    model.vector(layer.ffn_norm_b),
                    hp.layer_norm_epsilon,
                    h,
                );
            }
            self.up.resize(t * ff, 0.0);
            self.gate.resize(t * ff, 0.0);
            let (up_w, gate_w) = (model.weight(layer.up_w), model.weight(layer.gate_w));
            let acts = prepare(
                k,
                &up_w,
                &self.h,
                &mut self.q8,
                &mut self.q8k,
                &mut self.packed,
            );
            linear(
                model,
                &up_w,
                layer.up_b,
                acts,
                t,
                &mut self.up,
                &mut self.transposed,
            );
            let acts = if gate_w.ty == up_w.ty {
                acts
            } else {
                prepare(
                    k,
                    &gate_w,
                    &self.h,
                    &mut self.q8,
                    &mut self.q8k,
                    &mut self.packed,
                )
            };
            linear(
                model,
                &gate_w,
                layer.gate_b,
                acts,
                t,
                &mut self.gate,
                &mut self.transposed,
            );
            self.up
                .iter_mut()
                .zip(&self.gate)
                .for_each(|(u, &g)| *u *= ops::silu(g));
            let w = model.weight(layer.down_w);
            let acts = prepare(
                k,
                &w,
                &self.up,
                &mut self.q8,
                &mut self.q8k,
                &mut self.packed,
            );
            linear(
                model,
                &w,
                layer.down_b,
                acts,
                t,
                &mut self.proj,
                &mut self.transposed,
            );
            self.x.iter_mut().zip(&self.proj).for_each(|(x, p)| *x += p);
        }

        // Output head, tied to the embedding.
        let first = if all_logits { 0 } else { t - 1 };
        let n_out = t - first;
        self.h.resize(n_out * d, 0.0);
        for (x, h) in self
            .x
            .chunks_exact(d)
            .skip(first)
            .zip(self.h.chunks_exact_mut(d))
        {
            ops::layer_norm(
                x,
                model.vector(model.output_norm_w),
                model.vector(model.output_norm_b),
                hp.layer_norm_epsilon,
                h,
            );
        }
        self.logits.resize(n_out * hp.vocab_size, 0.0);
        let head = model.weight(model.token_embd);
        let acts = prepare(
            k,
            &head,
            &self.h,
            &mut self.q8,
            &mut self.q8k,
            &mut self.packed,
        );
        matmul(
            model,
            &head,
            acts,
            n_out,
            &mut self.logits,
            &mut self.transposed,
        );
        let scale = hp.logit_scale();
        self.logits.iter_mut().for_each(|v| *v *= scale);
        self.history.extend_from_slice(tokens);
    }

    /// Rotates q and k, appends k and v to the cache, and computes every
    /// head's attention output for the `t` new tokens into `att`.
    fn attention(&mut self, model: &Model, layer: usize, t: usize) {
        let hp = &model.hp;
        let (d, hd, nh, rd) = (hp.n_embd, hp.head_dim(), hp.n_head, hp.rotary_dim);
        let half = rd / 2;
        for (i, qkv) in self.qkv.chunks_exact_mut(3 * d).enumerate() {
            let pos = self.history.len() + i;
            let cs = &self.rope[pos * half..(pos + 1) * half];
            for head in qkv[..2 * d].chunks_exact_mut(hd) {
                ops::rope_head(&mut head[..rd], cs);
            }
            let at = self.kv.at(layer, pos);
            self.kv.k.write(at, &qkv[d..2 * d]);
            self.kv.v.write(at, &qkv[2 * d..3 * d]);
        }

        let k = model.kernels;
        let scale = hp.attention_scale();
        let (kv, qkv, pos0) = (&self.kv, &self.qkv, self.history.len());
        let base = kv.at(layer, 0);
        let (kc, vc) = (kv.k.view(), kv.v.view());
        self.att.resize(t * d, 0.0);
        model.pool.install(|| {
            self.att.par_chunks_mut(hd).enumerate().for_each_init(
                || Vec::with_capacity(kv.n_ctx),
                |scores: &mut Vec<f32>, (i, out)| {
                    let (tok, head) = (i / nh, i % nh);
                    let q = &qkv[tok * 3 * d + head * hd..][..hd];
                    let n_keys = pos0 + tok + 1; // causal: keys up to this token
                    scores.clear();
                    for j in 0..n_keys {
                        let off = base + j * d + head * hd;
                        let s = match kc {
                            KvSlice::F32(c) => k.dot_f32(q, &c[off..off + hd]),
                            KvSlice::F16(c) => k.dot_f16(q, &c[off..off + hd]),
                        };
                        scores.push(s * scale);
                    }
                    ops::softmax(scores);
                    out.fill(0.0);
                    for (j, &p) in scores.iter().enumerate() {
                        let off = base + j * d + head * hd;
                        match vc {
                            KvSlice::F32(c) => k.axpy_f32(p, &c[off..off + hd], out),
                            KvSlice::F16(c) => k.axpy_f16(p, &c[off..off + hd], out),
                        }
                    }
                },
            )
        });
    }
}

/// `out = x @ Wᵀ + b` for `t` tokens.
fn linear(
    model: &Model,
    w: &Weight<'_>,
    b: TensorLoc,
    x: Packed<'_>,
    t: usize,
    out: &mut [f32],
    transposed: &mut Vec<f32>,
) {
    matmul(model, w, x, t, out, transposed);
    ops::add_bias(out, model.vector(b));
}

/// Puts activations in the format `w` multiplies with (Q8_0 or Q8_K for
/// quantized weights) and the layout the kernels want, once for all threads.
fn prepare<'a>(
    k: &dyn crate::kernels::Kernels,
    w: &Weight<'_>,
    x: &'a [f32],
    q8: &'a mut Vec<BlockQ8_0>,
    q8k: &'a mut Vec<BlockQ8K>,
    packed: &'a mut PackBuf,
) -> Packed<'a> {
    let acts = match w.act_type() {
        ActType::F32 => Acts::F32(x),
        ActType::Q8_0 => {
            let nb = w.cols / QK;
            let t = x.len() / w.cols;
            q8.resize(t * nb, BlockQ8_0 { d: 0, qs: [0; QK] });
            for (xr, yr) in x.chunks_exact(w.cols).zip(q8.chunks_exact_mut(nb)) {
                k.quantize_q8_0(xr, yr);
            }
            Acts::Q8_0(q8)
        }
        ActType::Q8K => {
            let nb = w.cols / QK_K;
            let t = x.len() / w.cols;
            q8k.resize(t * nb, bytemuck::Zeroable::zeroed());
            for (xr, yr) in x.chunks_exact(w.cols).zip(q8k.chunks_exact_mut(nb)) {
                k.quantize_q8_k(xr, yr);
            }
            Acts::Q8K(q8k)
        }
    };
    k.pack(w, acts, packed)
}

/// `out[t, r] = W[r] · x[t]`, weight rows split across the thread pool.
fn matmul(
    model: &Model,
    w: &Weight<'_>,
    x: Packed<'_>,
    t: usize,
    out: &mut [f32],
    transposed: &mut Vec<f32>,
) {
    let rows = w.rows;
    let threads = model.pool.current_num_threads();
    // A few chunks per thread balance uneven cores without much overhead.
    let chunk = rows.div_ceil(threads * 4).max(16);
    let k = model.kernels;
    let by_row: &mut [f32] = if t == 1 {
        out
    } else {
        transposed.resize(rows * t, 0.0);
        transposed
    };
    model.pool.install(|| {
        by_row
            .par_chunks_mut(chunk * t)
            .enumerate()
            .for_each(|(c, o)| {
                let r0 = c * chunk;
                k.matmul_rows(w, &x, r0..r0 + o.len() / t, o);
            })
    });
    if t > 1 {
        // Back to token-major, split by tokens across the pool: each task
        // reads its tokens' contiguous run of every row and writes its few
        // output rows sequentially.
        let src: &[f32] = transposed;
        let per = t.div_ceil(threads);
        model.pool.install(|| {
            out[..t * rows]
                .par_chunks_mut(per * rows)
                .enumerate()
                .for_each(|(c, o)| {
                    let t0 = c * per;
                    let m = o.len() / rows;
                    for (r, row) in src.chunks_exact(t).enumerate() {
                        for (j, &v) in row[t0..t0 + m].iter().enumerate() {
                            o[j * rows + r] = v;
                        }
                    }
                })
        });
    }
}
