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
//! An [`Engine`] holds the KV pool and the scratch buffers. One
//! [`Engine::step`] runs the next tokens of any number of sequences
//! together: their rows go through every weight matrix as one matrix
//! (up to [`MAX_BATCH`] rows at a time, so a weight block is loaded once
//! for all of them), and only attention is per sequence, through each
//! sequence's block table. A prompt is one sequence's many rows; decoding
//! four replies is four sequences' one row each. A [`Session`] is an
//! engine with a single sequence, for the command line.

use super::kv_pool::{KvPool, KvSlice, KvType, Sequence, BLOCK};
use super::{EngineError, Model, TensorLoc};
use crate::kernels::{ActType, Acts, PackBuf, Packed, Weight};
use crate::ops;
use crate::quant::{self, BlockQ8K, BlockQ8_0, QK, QK_K};
use rayon::prelude::*;

/// Tokens per prefill batch: large enough to reuse each weight block many
/// times, small enough that the scratch buffers stay a few MB.
pub const MAX_BATCH: usize = 64;

/// Which logits a step returns for a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None: a prompt chunk before the last skips the output head.
    None,
    /// Only the last token's (generation).
    Last,
    /// Every token's, `[n_tokens, vocab]` (evaluation).
    All,
}

/// One sequence's part of a step: `tokens` are run at positions
/// `seq.len()..`, then added to `seq`.
pub struct Step<'a> {
    pub seq: &'a mut Sequence,
    pub tokens: &'a [u32],
    pub logits: Logits,
}

/// One row of a step: which step, its position and token, and whether its
/// logits are wanted.
#[derive(Clone, Copy)]
pub(crate) struct Row {
    pub step: usize,
    pub pos: usize,
    pub token: u32,
    pub logits: bool,
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

pub struct Engine {
    pool: KvPool,
    /// The longest sequence a step may build.
    n_ctx: usize,
    rope: Vec<(f32, f32)>,
    rows: Vec<Row>,
    // Scratch, sized for MAX_BATCH rows.
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
    /// Set when the model is on a GPU: the step runs there, on the same
    /// rows and block tables (the pool above keeps only the bookkeeping).
    #[cfg(feature = "cuda")]
    gpu: Option<crate::cuda::GpuEngine>,
    /// Fault injection for the daemon's tests: the step with this number
    /// (from 1) fails as a GPU error would (`CRYSTALD_FAULT_DEVICE_AT_STEP`).
    fault_at_step: Option<u64>,
    steps_run: u64,
}

impl Engine {
    /// An engine whose sequences may grow to `n_ctx` tokens (at most the
    /// model's context length) and whose KV pool holds `pool_tokens`
    /// positions in all. Fails when the address space cannot hold the pool.
    pub fn new(
        model: &Model,
        n_ctx: usize,
        pool_tokens: usize,
        kv_type: KvType,
    ) -> Result<Engine, String> {
        let hp = &model.hp;
        let n_ctx = n_ctx.clamp(1, hp.context_length);
        let pool = KvPool::new(kv_type, hp.n_layer, hp.n_embd, pool_tokens).map_err(|e| {
            let mib = KvPool::full_bytes(kv_type, hp.n_layer, hp.n_embd, pool_tokens) >> 20;
            format!("cannot reserve {mib} MiB of address space for the KV pool: {e}")
        })?;
        let rope = ops::rope_table(n_ctx, hp.rotary_dim, hp.rope_freq_base);
        #[cfg(feature = "cuda")]
        let gpu = match model.device().gpu() {
            Some(g) => {
                let blocks = pool.capacity() / BLOCK;
                Some(crate::cuda::GpuEngine::new(
                    g, model, n_ctx, blocks, kv_type, &rope,
                )?)
            }
            None => None,
        };
        Ok(Engine {
            pool,
            n_ctx,
            rope,
            rows: Vec::new(),
            x: Vec::new(),
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
            #[cfg(feature = "cuda")]
            gpu,
            fault_at_step: std::env::var("CRYSTALD_FAULT_DEVICE_AT_STEP")
                .ok()
                .and_then(|v| v.parse().ok()),
            steps_run: 0,
        })
    }

    /// GPU memory the engine holds (KV store and scratch); 0 on the CPU.
    pub fn gpu_bytes(&self) -> u64 {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return g.bytes();
        }
        0
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn pool(&self) -> &KvPool {
        &self.pool
    }

    pub fn pool_mut(&mut self) -> &mut KvPool {
        &mut self.pool
    }

    /// While idle: keeps `keep_tokens` cached positions for prefix reuse
    /// and returns the memory of the rest of the pool and of the scratch
    /// buffers to the system, so one long request does not leave the
    /// process owning its peak for good.
    pub fn release_memory(&mut self, keep_tokens: usize) {
        self.pool.trim(keep_tokens);
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
        self.rows = Vec::new();
        self.q8 = Vec::new();
        self.q8k = Vec::new();
        self.packed.release();
    }

    /// Runs every step's tokens and returns the logits asked for, in step
    /// order (`Last`: one row, `All`: one per token, `None`: nothing). On
    /// error nothing is added to any sequence.
    pub fn step(&mut self, model: &Model, steps: &mut [Step<'_>]) -> Result<&[f32], EngineError> {
        let vocab = model.hp.vocab_size;
        let mut needed = 0;
        for s in steps.iter() {
            if s.tokens.is_empty() {
                return Err(EngineError::EmptyInput);
            }
            if let Some(&id) = s.tokens.iter().find(|&&id| id as usize >= vocab) {
                return Err(EngineError::TokenOutOfRange { id, vocab });
            }
            if s.seq.len() + s.tokens.len() > self.n_ctx {
                return Err(EngineError::ContextFull {
                    needed: s.seq.len() + s.tokens.len(),
                    capacity: self.n_ctx,
                });
            }
            needed += self.pool.blocks_needed(s.seq, s.tokens.len());
        }
        if needed > self.pool.blocks_available() {
            return Err(EngineError::PoolFull {
                needed: needed * BLOCK,
                available: self.pool.blocks_available() * BLOCK,
            });
        }
        self.rows.clear();
        for (i, s) in steps.iter_mut().enumerate() {
            self.pool
                .reserve(s.seq, s.tokens.len())
                .expect("counted above");
            let n = s.tokens.len();
            self.rows
                .extend(s.tokens.iter().enumerate().map(|(j, &token)| Row {
                    step: i,
                    pos: s.seq.len() + j,
                    token,
                    logits: match s.logits {
                        Logits::None => false,
                        Logits::Last => j + 1 == n,
                        Logits::All => true,
                    },
                }));
        }
        self.logits.clear();
        self.steps_run += 1;
        if self.fault_at_step == Some(self.steps_run) {
            return Err(EngineError::Device(
                "injected fault (CRYSTALD_FAULT_DEVICE_AT_STEP)".into(),
            ));
        }
        let rows = std::mem::take(&mut self.rows);
        for chunk in rows.chunks(MAX_BATCH) {
            #[cfg(feature = "cuda")]
            if let Some(g) = &mut self.gpu {
                let gpu = model.device().gpu().expect("a GPU engine has a GPU model");
                if let Err(e) = g.run_chunk(gpu, model, steps, chunk, &mut self.logits) {
                    self.rows = rows;
                    return Err(EngineError::Device(e));
                }
                continue;
            }
            self.run_chunk(model, steps, chunk);
        }
        self.rows = rows;
        for s in steps.iter_mut() {
            self.pool.commit(s.seq, s.tokens);
        }
        Ok(&self.logits)
    }

    /// Runs `rows` (whose steps' earlier rows are already in the pool)
    /// through the model and appends the logits of the rows that want them.
    fn run_chunk(&mut self, model: &Model, steps: &[Step<'_>], rows: &[Row]) {
        let hp = &model.hp;
        let k = model.kernels;
        let (t, d, ff) = (rows.len(), hp.n_embd, hp.n_ff);

        // Embedding lookup: one row of the (possibly quantized) table per token.
        let embd = model.weight(model.token_embd);
        self.x.resize(t * d, 0.0);
        for (x, r) in self.x.chunks_exact_mut(d).zip(rows) {
            quant::dequantize_row(embd.ty, embd.row(r.token as usize), x);
            x.iter_mut().for_each(|v| *v *= hp.mup_embeddings_scale);
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
            self.attention(model, l, steps, rows);
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

        // Output head, tied to the embedding, for the rows whose logits
        // somebody reads.
        let n_out = rows.iter().filter(|r| r.logits).count();
        if n_out == 0 {
            return;
        }
        self.h.resize(n_out * d, 0.0);
        let wanted = self.x.chunks_exact(d).zip(rows).filter(|(_, r)| r.logits);
        for ((x, _), h) in wanted.zip(self.h.chunks_exact_mut(d)) {
            ops::layer_norm(
                x,
                model.vector(model.output_norm_w),
                model.vector(model.output_norm_b),
                hp.layer_norm_epsilon,
                h,
            );
        }
        let from = self.logits.len();
        self.logits.resize(from + n_out * hp.vocab_size, 0.0);
        let head = model.weight(model.token_embd);
        let acts = prepare(
            k,
            &head,
            &self.h,
            &mut self.q8,
            &mut self.q8k,
            &mut self.packed,
        );
        let out = &mut self.logits[from..];
        matmul(model, &head, acts, n_out, out, &mut self.transposed);
        let scale = hp.logit_scale();
        out.iter_mut().for_each(|v| *v *= scale);
    }

    /// Rotates q and k, stores k and v in the pool, and computes every
    /// head's attention output for the rows into `att`, each row over the
    /// keys of its own sequence up to its position.
    fn attention(&mut self, model: &Model, layer: usize, steps: &[Step<'_>], rows: &[Row]) {
        let hp = &model.hp;
        let (d, hd, nh, rd) = (hp.n_embd, hp.head_dim(), hp.n_head, hp.rotary_dim);
        let half = rd / 2;
        let k = model.kernels;
        for (r, qkv) in rows.iter().zip(self.qkv.chunks_exact_mut(3 * d)) {
            let cs = &self.rope[r.pos * half..(r.pos + 1) * half];
            for head in qkv[..2 * d].chunks_exact_mut(hd) {
                ops::rope_head(&mut head[..rd], cs);
            }
            let seq = &*steps[r.step].seq;
            self.pool
                .write(seq, layer, r.pos, &qkv[d..2 * d], &qkv[2 * d..3 * d], k);
        }

        let scale = hp.attention_scale();
        let (pool, qkv, n_ctx) = (&self.pool, &self.qkv, self.n_ctx);
        let (kc, vc) = (pool.keys(), pool.values());
        // Stored elements per head (Q8_0 stores blocks of 32 values).
        let he = pool.kv_type().elems(hd);
        self.att.resize(rows.len() * d, 0.0);
        model.pool.install(|| {
            self.att.par_chunks_mut(hd).enumerate().for_each_init(
                || Vec::with_capacity(n_ctx),
                |scores: &mut Vec<f32>, (i, out)| {
                    let (row, head) = (&rows[i / nh], i % nh);
                    let q = &qkv[(i / nh) * 3 * d + head * hd..][..hd];
                    let table = steps[row.step].seq.blocks();
                    let n_keys = row.pos + 1; // causal: keys up to this token
                    let at = |j: usize| pool.row(table[j / BLOCK], layer, j % BLOCK) + head * he;
                    scores.clear();
                    for j in 0..n_keys {
                        let off = at(j);
                        let s = match kc {
                            KvSlice::F32(c) => k.dot_f32(q, &c[off..off + he]),
                            KvSlice::F16(c) => k.dot_f16(q, &c[off..off + he]),
                            KvSlice::Q8_0(c) => k.dot_q8_0(q, &c[off..off + he]),
                        };
                        scores.push(s * scale);
                    }
                    ops::softmax(scores);
                    out.fill(0.0);
                    for (j, &p) in scores.iter().enumerate() {
                        let off = at(j);
                        match vc {
                            KvSlice::F32(c) => k.axpy_f32(p, &c[off..off + he], out),
                            KvSlice::F16(c) => k.axpy_f16(p, &c[off..off + he], out),
                            KvSlice::Q8_0(c) => k.axpy_q8_0(p, &c[off..off + he], out),
                        }
                    }
                },
            )
        });
    }
}

/// One sequence on an engine of its own: the command line's generation,
/// evaluation and benchmarks. Its cache of the last prompt serves the
/// next one that shares its beginning.
pub struct Session {
    engine: Engine,
    seq: Sequence,
}

impl Session {
    /// A session with room for `n_ctx` tokens (at most the model's context length).
    pub fn new(model: &Model, n_ctx: usize, kv_type: KvType) -> Session {
        Self::try_new(model, n_ctx, kv_type).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Session::new`], with an error where the KV cache cannot be had
    /// (address space, or GPU memory for a model on a GPU).
    pub fn try_new(model: &Model, n_ctx: usize, kv_type: KvType) -> Result<Session, String> {
        let n_ctx = n_ctx.clamp(1, model.hp.context_length);
        Ok(Session {
            engine: Engine::new(model, n_ctx, n_ctx, kv_type)?,
            seq: Sequence::default(),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Tokens in the cache.
    pub fn pos(&self) -> usize {
        self.seq.len()
    }

    /// The tokens in the cache: a new prompt sharing a prefix with them only
    /// needs the rest computed.
    pub fn history(&self) -> &[u32] {
        self.seq.tokens()
    }

    pub fn n_ctx(&self) -> usize {
        self.engine.n_ctx
    }

    pub fn kv_bytes(&self) -> usize {
        self.engine.pool.bytes()
    }

    /// Forgets everything after the first `n` tokens (kept for prefix reuse).
    pub fn truncate(&mut self, n: usize) {
        self.engine.pool.truncate(&mut self.seq, n);
    }

    /// Between requests: keeps the first `keep` cached tokens and gives
    /// the memory of the rest back (see [`Engine::release_memory`]).
    pub fn release(&mut self, keep: usize) {
        self.truncate(keep);
        self.engine.release_memory(0);
    }

    /// Runs `tokens` at positions `pos()..pos() + tokens.len()` and returns
    /// the requested logits. On error nothing is added to the cache.
    pub fn forward(
        &mut self,
        model: &Model,
        tokens: &[u32],
        which: Logits,
    ) -> Result<&[f32], EngineError> {
        self.engine.step(
            model,
            &mut [Step {
                seq: &mut self.seq,
                tokens,
                logits: which,
            }],
        )
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
