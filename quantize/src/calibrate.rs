//! Calibration for importance-weighted rounding (`--calibrate FILE`).
//!
//! Rounding error in a weight matters in proportion to the activation that
//! multiplies it: an error in column `j` of a matrix moves the output by
//! `err · a_j`, so on average by `err² · E[a_j²]`. This pass runs the
//! checkpoint's own f32 weights over calibration token sequences and
//! records, for the input of every matrix, the mean square of each column
//! (llama.cpp's "importance matrix" idea); the conversion then rounds each
//! matrix to minimise the error weighted by it (`quant::quantize_row`).
//!
//! It runs layer by layer, not token by token: the hidden states of every
//! calibration token stay in memory (a few MB to a few hundred MB), and
//! each weight matrix is read from the checkpoint, used and dropped, so the
//! memory bound is the conversion's (about the largest tensor), not the
//! model's. The math is the engine's (`crystald::ops`, and the forward pass
//! that `crystald`'s `model/forward.rs` documents), here over whole chunks
//! without a KV cache and with unquantized weights: the quantizer does not
//! link the engine, whose kernels read quantized files, not checkpoints.

use crate::checkpoint::Checkpoint;
use crate::convert::read_laid_out;
use anyhow::{bail, Context, Result};
use crystald::model_file::{Hparams, LayerTensor, TensorDesc, TOKEN_EMBD};
use crystald::ops;
use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;

/// Tokens per chunk at most: attention is quadratic in it, and longer
/// chunks add little to per-column statistics.
pub const MAX_CHUNK: usize = 512;

/// Default `--calibrate-tokens`: four full chunks, about 27 TFLOP of f32
/// prefill on a 7B checkpoint (20+ minutes on 2 cores; README,
/// "Calibration").
pub const DEFAULT_TOKENS: usize = 2048;

/// Relative floor for a column's importance: a column that the calibration
/// text never excited still gets a say, so a block whose columns were all
/// silent is rounded sensibly rather than arbitrarily.
const IMPORTANCE_FLOOR: f32 = 1e-3;

/// Reads calibration token sequences: one per line, either a JSON array of
/// token ids (what `crystald tokenize` prints) or an object with a
/// `token_ids` array (the fine-tuning data's format). Sequences are cut
/// into chunks of at most `chunk_len` tokens, each run from position 0,
/// and reading stops after `max_tokens` tokens.
pub fn read_token_file(
    path: &Path,
    vocab: usize,
    chunk_len: usize,
    max_tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open the calibration file {}", path.display()))?;
    let name = format!("calibration file {}", path.display());
    parse_token_lines(
        std::io::BufReader::new(file),
        &name,
        vocab,
        chunk_len,
        max_tokens,
    )
}

/// [`read_token_file`] on any reader; `name` starts every error message.
pub fn parse_token_lines(
    input: impl BufRead,
    name: &str,
    vocab: usize,
    chunk_len: usize,
    max_tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    let at = |n: usize| format!("{name} line {n}");
    let mut chunks = Vec::new();
    let mut total = 0;
    for (i, line) in input.lines().enumerate() {
        if total >= max_tokens {
            break;
        }
        let line = line.with_context(|| at(i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("{}: not JSON", at(i + 1)))?;
        let ids = match &v {
            serde_json::Value::Array(a) => a,
            serde_json::Value::Object(o) => match o.get("token_ids") {
                Some(serde_json::Value::Array(a)) => a,
                _ => bail!("{}: the object has no \"token_ids\" array", at(i + 1)),
            },
            _ => bail!(
                "{}: expected a JSON array of token ids or an object with a \"token_ids\" array",
                at(i + 1)
            ),
        };
        let mut seq = Vec::with_capacity(ids.len().min(max_tokens - total));
        for (k, id) in ids.iter().enumerate() {
            match id.as_u64() {
                Some(id) if id < vocab as u64 => seq.push(id as u32),
                Some(id) => bail!(
                    "{}: token id {id} (position {k}) is outside the model's vocabulary of {vocab}",
                    at(i + 1)
                ),
                None => bail!("{}: position {k} holds {id}, not a token id", at(i + 1)),
            }
        }
        seq.truncate(max_tokens - total);
        total += seq.len();
        chunks.extend(seq.chunks(chunk_len.max(1)).map(<[u32]>::to_vec));
    }
    if chunks.is_empty() {
        bail!("the {name} holds no token ids");
    }
    Ok(chunks)
}

/// What a calibration pass measured.
pub struct Calibration {
    /// Per matrix (by file tensor name), one positive weight per input
    /// column, normalised to mean 1.
    pub importance: HashMap<String, Vec<f32>>,
    pub tokens: usize,
    pub chunks: usize,
    /// The output head's input (the final LayerNorm) of every token, in
    /// chunk order: the tests turn it into logits and compare them with
    /// the upstream implementation's.
    pub head_input: Vec<f32>,
}

impl Calibration {
    pub fn importance(&self, tensor: &str) -> Option<&[f32]> {
        self.importance.get(tensor).map(Vec::as_slice)
    }
}

/// Sums of squares per input column, per matrix.
#[derive(Default)]
struct Energy(HashMap<String, Vec<f64>>);

impl Energy {
    fn add(&mut self, tensors: &[&str], rows: &[f32], width: usize) {
        let mut sums = vec![0.0f64; width];
        for row in rows.chunks_exact(width) {
            for (s, &v) in sums.iter_mut().zip(row) {
                *s += (v as f64) * (v as f64);
            }
        }
        for t in tensors {
            let e = self
                .0
                .entry(t.to_string())
                .or_insert_with(|| vec![0.0; width]);
            e.iter_mut().zip(&sums).for_each(|(e, s)| *e += s);
        }
    }

    fn normalised(self) -> HashMap<String, Vec<f32>> {
        self.0
            .into_iter()
            .map(|(name, sums)| {
                let mean = sums.iter().sum::<f64>() / sums.len().max(1) as f64;
                let imp = sums
                    .iter()
                    .map(|&s| {
                        let r = if mean > 0.0 { (s / mean) as f32 } else { 1.0 };
                        r.max(IMPORTANCE_FLOOR)
                    })
                    .collect();
                (name, imp)
            })
            .collect()
    }
}

/// Runs `chunks` through the checkpoint layer by layer and measures the
/// importance of every matrix's input columns. `hp` and `descs` are the
/// file's (the MLP padded as the preset stores it, so the importance of
/// the down projection has the stored width). `layer_done` is called after
/// each block.
pub fn calibrate(
    ckpt: &Checkpoint,
    hp: &Hparams,
    descs: &[TensorDesc],
    chunks: &[Vec<u32>],
    threads: usize,
    layer_done: &mut dyn FnMut(usize),
) -> Result<Calibration> {
    let (d, ff) = (hp.n_embd, hp.n_ff);
    let n: usize = chunks.iter().map(Vec::len).sum();
    let desc = |name: &str| {
        descs
            .iter()
            .find(|t| t.name == name)
            .expect("the file's tensor table names every tensor")
    };
    let read = |name: &str| read_laid_out(ckpt, desc(name), threads);
    let layer_read =
        |l: usize, t: LayerTensor| read(&crystald::model_file::layer_tensor_name(l, t));

    // Embedding rows of the calibration tokens; the table is dropped after.
    let mut x = vec![0.0f32; n * d];
    {
        let wte = read(TOKEN_EMBD)?;
        for (row, &tok) in x.chunks_exact_mut(d).zip(chunks.iter().flatten()) {
            let src = &wte[tok as usize * d..(tok as usize + 1) * d];
            for (o, &v) in row.iter_mut().zip(src) {
                *o = v * hp.mup_embeddings_scale;
            }
        }
    }

    let longest = chunks.iter().map(Vec::len).max().unwrap_or(0);
    let rope = ops::rope_table(longest, hp.rotary_dim, hp.rope_freq_base);
    let mut energy = Energy::default();
    let (mut h, mut qkv, mut att, mut proj) = (
        vec![0.0f32; n * d],
        vec![0.0f32; n * 3 * d],
        vec![0.0f32; n * d],
        vec![0.0f32; n * d],
    );
    let (mut up, mut gate) = (vec![0.0f32; n * ff], vec![0.0f32; n * ff]);
    let name = |l: usize, t: LayerTensor| crystald::model_file::layer_tensor_name(l, t);
    for l in 0..hp.n_layer {
        use LayerTensor::*;
        layer_norm_rows(
            &x,
            &layer_read(l, AttnNormW)?,
            &layer_read(l, AttnNormB)?,
            hp.layer_norm_epsilon,
            &mut h,
        );
        energy.add(&[&name(l, QkvW)], &h, d);
        linear(
            &h,
            &layer_read(l, QkvW)?,
            &layer_read(l, QkvB)?,
            &mut qkv,
            threads,
        );
        attention(hp, chunks, &rope, &mut qkv, &mut att, threads);
        energy.add(&[&name(l, AttnOutW)], &att, d);
        linear(
            &att,
            &layer_read(l, AttnOutW)?,
            &layer_read(l, AttnOutB)?,
            &mut proj,
            threads,
        );
        x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);

        layer_norm_rows(
            &x,
            &layer_read(l, FfnNormW)?,
            &layer_read(l, FfnNormB)?,
            hp.layer_norm_epsilon,
            &mut h,
        );
        energy.add(&[&name(l, UpW), &name(l, GateW)], &h, d);
        linear(
            &h,
            &layer_read(l, UpW)?,
            &layer_read(l, UpB)?,
            &mut up,
            threads,
        );
        linear(
            &h,
            &layer_read(l, GateW)?,
            &layer_read(l, GateB)?,
            &mut gate,
            threads,
        );
        up.iter_mut()
            .zip(&gate)
            .for_each(|(u, &g)| *u *= ops::silu(g));
        energy.add(&[&name(l, DownW)], &up, ff);
        linear(
            &up,
            &layer_read(l, DownW)?,
            &layer_read(l, DownB)?,
            &mut proj,
            threads,
        );
        x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
        layer_done(l);
    }
    layer_norm_rows(
        &x,
        &read(crystald::model_file::OUTPUT_NORM)?,
        &read(crystald::model_file::OUTPUT_NORM_BIAS)?,
        hp.layer_norm_epsilon,
        &mut h,
    );
    // The head is tied to the embedding: its rounding is weighted by the
    // head's input, since the logits are what quality is measured on.
    energy.add(&[TOKEN_EMBD], &h, d);
    Ok(Calibration {
        importance: energy.normalised(),
        tokens: n,
        chunks: chunks.len(),
        head_input: h,
    })
}

fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (x, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        ops::layer_norm(x, w, b, eps, o);
    }
}

/// `out[t] = x[t] · Wᵀ + b` for every row `t` of `x`, with `w` row-major
/// `[out, in]`; token rows split across threads, each thread streaming
/// the whole matrix over a few tokens at a time so a weight row is reused
/// from cache.
pub fn linear(x: &[f32], w: &[f32], b: &[f32], out: &mut [f32], threads: usize) {
    let (m, k) = (b.len(), w.len() / b.len());
    let n = x.len() / k;
    let per = n.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (x, out) in x.chunks(per * k).zip(out.chunks_mut(per * m)) {
            s.spawn(move || {
                const TILE: usize = 8;
                for (x, out) in x.chunks(TILE * k).zip(out.chunks_mut(TILE * m)) {
                    for (o, (wr, &bias)) in w.chunks_exact(k).zip(b).enumerate() {
                        for (t, xr) in x.chunks_exact(k).enumerate() {
                            out[t * m + o] = bias + dot(xr, wr);
                        }
                    }
                }
            });
        }
    });
}

/// Sixteen independent sums, so the compiler vectorises it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Rotates q and k, then causal attention within each chunk: every token
/// over the keys of its own chunk up to itself. Token rows are split
/// across threads after the rotation.
fn attention(
    hp: &Hparams,
    chunks: &[Vec<u32>],
    rope: &[(f32, f32)],
    qkv: &mut [f32],
    att: &mut [f32],
    threads: usize,
) {
    let (d, hd, nh, rd) = (hp.n_embd, hp.head_dim(), hp.n_head, hp.rotary_dim);
    let half = rd / 2;
    // (chunk start row, position) of every row.
    let rows: Vec<(usize, usize)> = chunks
        .iter()
        .scan(0, |start, c| {
            let s = *start;
            *start += c.len();
            Some((0..c.len()).map(move |p| (s, p)))
        })
        .flatten()
        .collect();
    for (row, &(_, pos)) in qkv.chunks_exact_mut(3 * d).zip(&rows) {
        let cs = &rope[pos * half..(pos + 1) * half];
        for head in row[..2 * d].chunks_exact_mut(hd) {
            ops::rope_head(&mut head[..rd], cs);
        }
    }
    let scale = hp.attention_scale();
    let qkv = &*qkv;
    let per = rows.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (i, out) in att.chunks_mut(per * d).enumerate() {
            let rows = &rows[i * per..];
            s.spawn(move || {
                let mut scores = Vec::new();
                for (out, &(start, pos)) in out.chunks_exact_mut(d).zip(rows) {
                    let q_row = &qkv[(start + pos) * 3 * d..][..d];
                    for h in 0..nh {
                        let q = &q_row[h * hd..(h + 1) * hd];
                        scores.clear();
                        for j in start..=start + pos {
                            let k = &qkv[j * 3 * d + d + h * hd..][..hd];
                            scores.push(dot(q, k) * scale);
                        }
                        ops::softmax(&mut scores);
                        let o = &mut out[h * hd..(h + 1) * hd];
                        o.fill(0.0);
                        for (j, &p) in (start..=start + pos).zip(&scores) {
                            let v = &qkv[j * 3 * d + 2 * d + h * hd..][..hd];
                            o.iter_mut().zip(v).for_each(|(o, &v)| *o += p * v);
                        }
                    }
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_equals_the_naive_product_on_awkward_sizes() {
        for (n, k, m, threads) in [(1, 3, 2, 1), (13, 37, 5, 2), (9, 33, 17, 3)] {
            let x: Vec<f32> = (0..n * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
            let w: Vec<f32> = (0..m * k).map(|i| ((i * 5) % 13) as f32 * 0.25).collect();
            let b: Vec<f32> = (0..m).map(|i| i as f32).collect();
            let mut out = vec![0.0; n * m];
            linear(&x, &w, &b, &mut out, threads);
            for t in 0..n {
                for o in 0..m {
                    let want: f32 = b[o] + (0..k).map(|i| x[t * k + i] * w[o * k + i]).sum::<f32>();
                    assert!((out[t * m + o] - want).abs() <= 1e-4 * want.abs().max(1.0));
                }
            }
        }
    }

    #[test]
    fn energy_is_normalised_to_mean_one_with_a_floor() {
        let mut e = Energy::default();
        // Two rows of width 4: column energies 0, 2, 8, 6 → mean 4.
        e.add(
            &["a", "b"],
            &[0.0, 1.0, 2.0, 1.0, 0.0, 1.0, 2.0, 2.236_068],
            4,
        );
        let imp = e.normalised();
        let a = &imp["a"];
        assert_eq!(a, &imp["b"]);
        assert_eq!(a[0], IMPORTANCE_FLOOR);
        assert!((a[1] - 0.5).abs() < 1e-6 && (a[2] - 2.0).abs() < 1e-6);
        assert!((a[3] - 1.5).abs() < 1e-5);
    }
}
