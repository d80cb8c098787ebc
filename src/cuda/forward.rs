//! The engine's step on the GPU: the forward pass of
//! [`crate::model::forward`], kernel by kernel, over the same rows and the
//! same KV block tables (the host pool keeps the bookkeeping, the K and V
//! values live here). Only token ids, positions and block tables go up per
//! step, and only the wanted logits come back.
//!
//! Per layer: LayerNorm, QKV, rotary + KV store, attention, output
//! projection (+ residual), LayerNorm, up, gate (× silu into up), down
//! (+ residual): nine launches, the bias and residual adds fused into the
//! projections.

use super::{check_fits, Arg, DevBuf, Gpu};
use crate::model::forward::{Row, Step, MAX_BATCH};
use crate::model::kv_pool::BLOCK;
use crate::model::{KvType, Model, TensorLoc};
use crate::quant::GgmlType;

/// Threads per block of the row-wise kernels (embedding, LayerNorm, rotary).
const ROW_THREADS: u32 = 256;
/// Threads per block of the attention kernel: one warp per key at a time.
const ATTENTION_THREADS: u32 = 128;
/// From `matmul.cu`: rows per thread block and tokens per weight pass.
pub const MM_WARPS: usize = 4;
pub const MM_TOKENS: usize = 8;
const OUT_SET: i32 = 0;
const OUT_ADD: i32 = 1;
const OUT_MUL_SILU: i32 = 2;

/// Grid of a matrix product: row groups × token groups.
pub fn matmul_grid(rows: usize, n_tok: usize) -> (u32, u32) {
    (
        rows.div_ceil(MM_WARPS) as u32,
        n_tok.div_ceil(MM_TOKENS) as u32,
    )
}

/// The weight formats the GPU kernels read (all that crystal-quantize
/// writes); anything else is named in the error that keeps a model on the CPU.
pub fn supported(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::Q4_0
            | GgmlType::Q8_0
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
    )
}

/// Bytes of the GPU KV store for `blocks` pool blocks.
pub fn kv_bytes(kv: KvType, n_layer: usize, d: usize, blocks: usize) -> Result<u64, String> {
    let elem = match kv {
        KvType::F32 => 4,
        KvType::F16 => 2,
        KvType::Q8_0 => {
            return Err(
                "kv_type q8_0 is not supported on the GPU: use f16 or f32 (or --device cpu)".into(),
            )
        }
    };
    Ok(2 * (blocks * n_layer * BLOCK * d * elem) as u64)
}

pub struct GpuEngine {
    kv_f16: bool,
    k: DevBuf,
    v: DevBuf,
    rope: DevBuf,
    x: DevBuf,
    h: DevBuf,
    qkv: DevBuf,
    att: DevBuf,
    up: DevBuf,
    scores: DevBuf,
    logits: DevBuf,
    tokens: DevBuf,
    pos: DevBuf,
    block: DevBuf,
    table_at: DevBuf,
    out_rows: DevBuf,
    tables: DevBuf,
    n_ctx: usize,
    // Host staging, reused.
    h_tables: Vec<u32>,
    h_logits_rows: Vec<i32>,
}

impl GpuEngine {
    /// Allocates the KV store for `blocks` pool blocks and the scratch of
    /// a [`MAX_BATCH`]-row step. `rope` is the host's cos/sin table.
    pub fn new(
        gpu: &Gpu,
        model: &Model,
        n_ctx: usize,
        blocks: usize,
        kv: KvType,
        rope: &[(f32, f32)],
    ) -> Result<GpuEngine, String> {
        let hp = &model.hp;
        let (t, d, ff, vocab) = (MAX_BATCH, hp.n_embd, hp.n_ff, hp.vocab_size);
        let kv_total = kv_bytes(kv, hp.n_layer, d, blocks)?;
        let f = 4;
        let table_len = t * (n_ctx.div_ceil(BLOCK) + 1);
        let scratch = [
            t * d * f,                 // x
            t * d * f,                 // h
            t * 3 * d * f,             // qkv
            t * d * f,                 // att
            t * ff * f,                // up
            t * hp.n_head * n_ctx * f, // scores
            t * vocab * f,             // logits
        ];
        let needed = kv_total + scratch.iter().sum::<usize>() as u64 + (rope.len() * 8) as u64;
        let (free, _) = gpu.memory()?;
        check_fits("the KV cache and scratch", needed, free)?;
        let dr = gpu.driver();
        let buf = |bytes: usize| DevBuf::new(dr, bytes);
        let flat: Vec<f32> = rope.iter().flat_map(|&(c, s)| [c, s]).collect();
        let rope_buf = buf(flat.len() * 4)?;
        rope_buf.upload(0, &flat)?;
        Ok(GpuEngine {
            kv_f16: kv == KvType::F16,
            k: buf(kv_total as usize / 2)?,
            v: buf(kv_total as usize / 2)?,
            rope: rope_buf,
            x: buf(scratch[0])?,
            h: buf(scratch[1])?,
            qkv: buf(scratch[2])?,
            att: buf(scratch[3])?,
            up: buf(scratch[4])?,
            scores: buf(scratch[5])?,
            logits: buf(scratch[6])?,
            tokens: buf(t * 4)?,
            pos: buf(t * 4)?,
            block: buf(t * 4)?,
            table_at: buf(t * 4)?,
            out_rows: buf(t * 4)?,
            tables: buf(table_len * 4)?,
            n_ctx,
            h_tables: Vec::new(),
            h_logits_rows: Vec::new(),
        })
    }

    /// GPU memory this engine holds (KV store and scratch).
    pub fn bytes(&self) -> u64 {
        [
            &self.k,
            &self.v,
            &self.rope,
            &self.x,
            &self.h,
            &self.qkv,
            &self.att,
            &self.up,
            &self.scores,
            &self.logits,
            &self.tables,
        ]
        .iter()
        .map(|b| b.bytes() as u64)
        .sum()
    }

    /// Runs `rows` (at most [`MAX_BATCH`], their blocks reserved in the
    /// host pool) and appends the wanted rows' logits to `out`.
    pub(crate) fn run_chunk(
        &mut self,
        gpu: &Gpu,
        model: &Model,
        steps: &[Step<'_>],
        rows: &[Row],
        out: &mut Vec<f32>,
    ) -> Result<(), String> {
        gpu.make_current()?;
        let hp = &model.hp;
        let (t, d) = (rows.len(), hp.n_embd);
        debug_assert!(t <= MAX_BATCH);

        // What the kernels index by row: token, position, the block its K
        // and V go to, and where its sequence's block table starts.
        let mut tokens = Vec::with_capacity(t);
        let mut pos = Vec::with_capacity(t);
        let mut block = Vec::with_capacity(t);
        let mut table_at = Vec::with_capacity(t);
        self.h_tables.clear();
        let mut placed: Vec<(usize, i32)> = Vec::new();
        for r in rows {
            let table = steps[r.step].seq.blocks();
            let at = match placed.iter().find(|p| p.0 == r.step) {
                Some(&(_, at)) => at,
                None => {
                    let at = self.h_tables.len() as i32;
                    self.h_tables.extend_from_slice(table);
                    placed.push((r.step, at));
                    at
                }
            };
            tokens.push(r.token);
            pos.push(r.pos as i32);
            block.push(table[r.pos / BLOCK]);
            table_at.push(at);
        }
        self.h_logits_rows.clear();
        self.h_logits_rows
            .extend((0..t).filter(|&i| rows[i].logits).map(|i| i as i32));
        self.tokens.upload(0, &tokens)?;
        self.pos.upload(0, &pos)?;
        self.block.upload(0, &block)?;
        self.table_at.upload(0, &table_at)?;
        self.tables.upload(0, &self.h_tables)?;
        self.out_rows.upload(0, &self.h_logits_rows)?;

        let k = &gpu.kernels;
        let w = |l: TensorLoc| Arg::Ptr(gpu.weight_ptr(l.offset));
        let p = |b: &DevBuf| Arg::Ptr(b.ptr());
        let i = |v: usize| Arg::I32(v as i32);
        let row_grid = |n: usize| (n as u32, 1);
        let embd = model.token_embd_loc();
        gpu.launch(
            k.embed,
            row_grid(t),
            ROW_THREADS,
            &[
                w(embd),
                i(embd.ty.id() as usize),
                i(d),
                p(&self.tokens),
                Arg::F32(hp.mup_embeddings_scale),
                p(&self.x),
            ],
        )?;
        let norm = |x: &DevBuf, rows: Arg, n: usize, wt: TensorLoc, b: TensorLoc, out: &DevBuf| {
            gpu.launch(
                k.layer_norm,
                row_grid(n),
                ROW_THREADS,
                &[
                    p(x),
                    rows,
                    i(d),
                    w(wt),
                    w(b),
                    Arg::F32(hp.layer_norm_epsilon),
                    p(out),
                ],
            )
        };
        let kv_f16 = i(self.kv_f16 as usize);
        for (l, layer) in model.layer_locs().iter().enumerate() {
            norm(
                &self.x,
                Arg::Ptr(0),
                t,
                layer.attn_norm_w,
                layer.attn_norm_b,
                &self.h,
            )?;
            matmul(
                gpu,
                layer.qkv_w,
                &self.h,
                t,
                Some(layer.qkv_b),
                1.0,
                OUT_SET,
                &self.qkv,
            )?;
            gpu.launch(
                k.rope_store,
                row_grid(t),
                ROW_THREADS,
                &[
                    p(&self.qkv),
                    i(d),
                    i(hp.n_head),
                    i(hp.rotary_dim),
                    p(&self.rope),
                    p(&self.pos),
                    p(&self.block),
                    i(l),
                    i(hp.n_layer),
                    p(&self.k),
                    p(&self.v),
                    kv_f16,
                ],
            )?;
            gpu.launch(
                k.attention,
                (hp.n_head as u32, t as u32),
                ATTENTION_THREADS,
                &[
                    p(&self.qkv),
                    i(d),
                    i(hp.n_head),
                    p(&self.pos),
                    p(&self.tables),
                    p(&self.table_at),
                    i(l),
                    i(hp.n_layer),
                    p(&self.k),
                    p(&self.v),
                    kv_f16,
                    Arg::F32(hp.attention_scale()),
                    p(&self.scores),
                    i(self.n_ctx),
                    p(&self.att),
                ],
            )?;
            let (att, x) = (&self.att, &self.x);
            matmul(
                gpu,
                layer.attn_out_w,
                att,
                t,
                Some(layer.attn_out_b),
                1.0,
                OUT_ADD,
                x,
            )?;
            norm(
                &self.x,
                Arg::Ptr(0),
                t,
                layer.ffn_norm_w,
                layer.ffn_norm_b,
                &self.h,
            )?;
            matmul(
                gpu,
                layer.up_w,
                &self.h,
                t,
                Some(layer.up_b),
                1.0,
                OUT_SET,
                &self.up,
            )?;
            let gate = (layer.gate_w, layer.gate_b);
            matmul(
                gpu,
                gate.0,
                &self.h,
                t,
                Some(gate.1),
                1.0,
                OUT_MUL_SILU,
                &self.up,
            )?;
            matmul(
                gpu,
                layer.down_w,
                &self.up,
                t,
                Some(layer.down_b),
                1.0,
                OUT_ADD,
                x,
            )?;
        }

        let n_out = self.h_logits_rows.len();
        if n_out == 0 {
            // Surface a failed kernel of this step now, not in a later one.
            return gpu.synchronize();
        }
        let (nw, nb) = model.output_norm_locs();
        norm(&self.x, p(&self.out_rows), n_out, nw, nb, &self.h)?;
        let scale = hp.logit_scale();
        matmul(
            gpu,
            embd,
            &self.h,
            n_out,
            None,
            scale,
            OUT_SET,
            &self.logits,
        )?;
        let from = out.len();
        out.resize(from + n_out * hp.vocab_size, 0.0);
        self.logits.download(&mut out[from..])
    }
}

/// `out[t, r] (op)= scale * (W[r] · x[t]) + b[r]` for `n_tok` tokens.
#[allow(clippy::too_many_arguments)]
fn matmul(
    gpu: &Gpu,
    w: TensorLoc,
    x: &DevBuf,
    n_tok: usize,
    bias: Option<TensorLoc>,
    scale: f32,
    mode: i32,
    out: &DevBuf,
) -> Result<(), String> {
    let k = &gpu.kernels;
    let f = match w.ty {
        GgmlType::Q4_0 => k.matmul_q4_0,
        GgmlType::Q8_0 => k.matmul_q8_0,
        GgmlType::F16 => k.matmul_f16,
        GgmlType::F32 => k.matmul_f32,
        GgmlType::Q4_K => k.matmul_q4_k,
        GgmlType::Q5_K => k.matmul_q5_k,
        GgmlType::Q6_K => k.matmul_q6_k,
    };
    gpu.launch(
        f,
        matmul_grid(w.rows, n_tok),
        (MM_WARPS * 32) as u32,
        &[
            Arg::Ptr(gpu.weight_ptr(w.offset)),
            Arg::I32(w.rows as i32),
            Arg::I32(w.cols as i32),
            Arg::Ptr(x.ptr()),
            Arg::I32(n_tok as i32),
            Arg::Ptr(bias.map_or(0, |b| gpu.weight_ptr(b.offset))),
            Arg::F32(scale),
            Arg::I32(mode),
            Arg::Ptr(out.ptr()),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_shapes_cover_every_row_and_token() {
        assert_eq!(matmul_grid(1, 1), (1, 1));
        assert_eq!(matmul_grid(4, 8), (1, 1));
        assert_eq!(matmul_grid(5, 9), (2, 2));
        // The 7B shape's fused QKV and output head, decode and a full batch.
        assert_eq!(matmul_grid(3 * 4096, 1), (3072, 1));
        assert_eq!(matmul_grid(32032, MAX_BATCH), (8008, 8));
        // The kernel's constants are these.
        let src = include_str!("kernels/matmul.cu");
        assert!(src.contains(&format!("#define MM_WARPS {MM_WARPS}")));
        assert!(src.contains(&format!("#define MM_TOKENS {MM_TOKENS}")));
        let common = include_str!("kernels/common.cu");
        assert!(common.contains(&format!("#define KV_BLOCK {BLOCK}")));
    }

    #[test]
    fn kv_store_sizes_and_the_unsupported_kv_type_is_named() {
        // 7B, 2048 positions of f16: 32 layers × 2048 × 4096 × 2 bytes × (K, V).
        let blocks = 2048 / BLOCK;
        assert_eq!(kv_bytes(KvType::F16, 32, 4096, blocks).unwrap(), 1 << 30);
        assert_eq!(kv_bytes(KvType::F32, 32, 4096, blocks).unwrap(), 2 << 30);
        let e = kv_bytes(KvType::Q8_0, 32, 4096, blocks).unwrap_err();
        assert!(e.contains("q8_0") && e.contains("f16"), "{e}");
    }
}
