//! The conversion pipeline: HF checkpoint in, one GGUF file out, tensor by
//! tensor so that peak memory is about the largest tensor, not the model.

use crate::calibrate;
use crate::checkpoint::{self, Checkpoint, DType, TensorRef};
use crate::hf_config;
use anyhow::{bail, Context, Result};
use crystald::gguf::{GgufWriter, TensorSpec, Value, KEY_ARCHITECTURE};
use crystald::model_file::{self, keys, Kind, TensorDesc};
use crystald::quant::{self, GgmlType};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Which storage type each tensor gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// int4 matrices; the embedding (also the output head) in Q8_0 because
    /// logits are sensitive to it; norms and biases f32.
    Q4_0,
    Q8_0,
    F16,
    F32,
    /// Q4_K matrices; Q6_K for the tied embedding/head and for the MLP down
    /// projection of the blocks that matter most (llama.cpp's Q4_K_M
    /// recipe; its extra bits for the value projection, here a Q5_K fused
    /// QKV, lowered the fixtures' KL by 0.2-2 % for 0.12 more bits per
    /// weight, so they are left out).
    Q4KM,
    /// Q4_K matrices, Q6_K embedding/head.
    Q4KS,
    /// Q5_K matrices; Q6_K for the embedding/head and for the down
    /// projection and QKV of the blocks that matter most.
    Q5KM,
    /// Q6_K everywhere.
    Q6K,
}

impl Preset {
    pub const ALL: [Preset; 8] = [
        Preset::Q4KM,
        Preset::Q4KS,
        Preset::Q5KM,
        Preset::Q6K,
        Preset::Q4_0,
        Preset::Q8_0,
        Preset::F16,
        Preset::F32,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Q4_0 => "q4_0",
            Preset::Q8_0 => "q8_0",
            Preset::F16 => "f16",
            Preset::F32 => "f32",
            Preset::Q4KM => "q4_k_m",
            Preset::Q4KS => "q4_k_s",
            Preset::Q5KM => "q5_k_m",
            Preset::Q6K => "q6_k",
        }
    }

    pub fn parse(s: &str) -> Option<Preset> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
    }

    /// The storage type of `d` in a model of `n_layer` blocks. A k-quant
    /// needs rows of whole 256-value super-blocks: the MLP width is padded
    /// to that (`model_file`), and a matrix whose rows still do not fit
    /// (an embedding width that is not a multiple of 256, which no
    /// CrystalCoder has) falls back to Q8_0.
    pub fn type_for(self, d: &TensorDesc, n_layer: usize) -> GgmlType {
        use crystald::model_file::LayerTensor::{DownW, QkvW};
        use GgmlType as T;
        if d.kind == Kind::Vector {
            return T::F32;
        }
        let more_bits =
            |t| matches!(d.layer, Some((l, lt)) if lt == t && use_more_bits(l, n_layer));
        let ty = match self {
            Preset::Q4_0 if d.kind == Kind::Linear => T::Q4_0,
            Preset::Q4_0 | Preset::Q8_0 => T::Q8_0,
            Preset::F16 => T::F16,
            Preset::F32 => T::F32,
            Preset::Q4KM | Preset::Q4KS | Preset::Q5KM if d.kind == Kind::Embedding => T::Q6_K,
            Preset::Q4KM if more_bits(DownW) => T::Q6_K,
            Preset::Q4KM | Preset::Q4KS => T::Q4_K,
            Preset::Q5KM if more_bits(DownW) || more_bits(QkvW) => T::Q6_K,
            Preset::Q5KM => T::Q5_K,
            Preset::Q6K => T::Q6_K,
        };
        if ty.row_bytes(d.dims[0] as usize).is_none() {
            T::Q8_0
        } else {
            ty
        }
    }

    /// Whether any matrix is a k-quant (the MLP is then padded to 256).
    pub fn uses_k_quants(self) -> bool {
        matches!(
            self,
            Preset::Q4KM | Preset::Q4KS | Preset::Q5KM | Preset::Q6K
        )
    }

    /// llama.cpp's `general.file_type` value (`LLAMA_FTYPE_MOSTLY_*`).
    fn file_type(self) -> u32 {
        match self {
            Preset::F32 => 0,
            Preset::F16 => 1,
            Preset::Q4_0 => 2,
            Preset::Q8_0 => 7,
            Preset::Q4KS => 14,
            Preset::Q4KM => 15,
            Preset::Q5KM => 17,
            Preset::Q6K => 18,
        }
    }
}

/// llama.cpp's choice of the blocks that get more bits in its `_M` mixes:
/// the first and last eighth, and every third block in between.
fn use_more_bits(layer: usize, n_layer: usize) -> bool {
    layer < n_layer / 8 || layer >= 7 * n_layer / 8 || (layer - n_layer / 8) % 3 == 2
}

pub struct Options {
    pub input: PathBuf,
    pub output: PathBuf,
    pub preset: Preset,
    pub force: bool,
    pub threads: usize,
    /// Importance-weighted rounding from a calibration pass (`calibrate`).
    pub calibration: Option<CalibrationInput>,
}

/// `--calibrate FILE` and how much of it to run.
#[derive(Clone, Debug)]
pub struct CalibrationInput {
    pub path: PathBuf,
    pub max_tokens: usize,
}

/// Progress callbacks; the binary draws a bar or prints lines.
pub trait Progress {
    fn start(&mut self, total_bytes: u64, n_tensors: usize);
    fn tensor_done(&mut self, name: &str, ty: GgmlType, input_bytes_done: u64);
    fn finish(&mut self);
    /// A stage before the tensors (calibration), for a line of output.
    fn note(&mut self, _msg: &str) {}
}

#[derive(Debug, Default)]
pub struct Summary {
    pub tensors_by_type: BTreeMap<&'static str, usize>,
    pub params: u64,
    pub weight_bytes: u64,
    pub output_bytes: u64,
    /// The checksum recorded in the file (`crystald verify` checks it).
    pub checksum: u64,
    pub input_bytes: u64,
    pub elapsed: Duration,
    /// Calibration tokens run, when calibrated.
    pub calibration_tokens: Option<usize>,
}

impl Summary {
    pub fn bits_per_weight(&self) -> f64 {
        self.weight_bytes as f64 * 8.0 / self.params.max(1) as f64
    }
    pub fn input_gb_per_s(&self) -> f64 {
        self.input_bytes as f64 / 1e9 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The temporary output being written, for the interrupt handler: Drop
/// does not run when the process is stopped by a signal.
static IN_PROGRESS: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Removes the temporary output of a conversion in progress (called on
/// SIGINT/SIGTERM before exiting).
pub fn remove_partial_output() {
    if let Some(p) = IN_PROGRESS.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = std::fs::remove_file(p);
    }
}

/// Removes the temporary output unless the conversion completed.
struct TempOutput {
    path: PathBuf,
    keep: bool,
}

impl TempOutput {
    fn new(path: PathBuf) -> TempOutput {
        *IN_PROGRESS.lock().unwrap_or_else(|e| e.into_inner()) = Some(path.clone());
        TempOutput { path, keep: false }
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        IN_PROGRESS.lock().unwrap_or_else(|e| e.into_inner()).take();
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub fn temp_path_for(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    output.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Removes temporary outputs for `output` left by conversions that were
/// killed outright (SIGKILL, power loss: no handler ran), i.e. whose process
/// no longer exists. Returns the paths removed. A temporary file is never
/// mistaken for a model: it keeps its hidden `.NAME.tmp-PID` name until the
/// finished, synced file is renamed into place.
pub fn remove_stale_temp_outputs(output: &Path) -> Vec<PathBuf> {
    let Some(name) = output.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Vec::new();
    };
    let dir = output_dir(output);
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let file_name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if !alive && std::fs::remove_file(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

/// The directory `output` is created in (`.` for a bare file name).
fn output_dir(output: &Path) -> &Path {
    match output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

pub fn convert(opts: &Options, progress: &mut dyn Progress) -> Result<Summary> {
    let started = Instant::now();
    if opts.output.exists() && !opts.force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            opts.output.display()
        );
    }
    let mut hp = hf_config::read_hparams(&opts.input)?;
    if opts.preset.uses_k_quants() {
        hp.n_ff = model_file::Hparams::padded_ff(hp.n_inner, quant::QK_K);
    }
    let (tokenizer_json, special) = hf_config::read_tokenizer(&opts.input)?;
    let ckpt = Checkpoint::open(&opts.input)
        .with_context(|| format!("cannot open the checkpoint in {}", opts.input.display()))?;

    let descs = model_file::tensor_descs(&hp);
    // Check every tensor before writing a byte, so a bad checkpoint fails fast.
    for d in &descs {
        let t = ckpt
            .get(&d.hf_name)
            .with_context(|| format!("tensor '{}' is missing from the checkpoint", d.hf_name))?;
        check_tensor(&t, d)?;
    }
    let calibration = match &opts.calibration {
        Some(c) => Some(run_calibration(
            c,
            &ckpt,
            &hp,
            &descs,
            opts.threads,
            progress,
        )?),
        None => None,
    };
    let embd = ckpt.get("transformer.wte.weight").expect("checked above");
    let lm_head = ckpt.get("lm_head.weight");
    if let Some(h) = &lm_head {
        if h.shape != embd.shape {
            bail!("lm_head.weight has shape {:?} but transformer.wte.weight has {:?}; CrystalCoder ties them", h.shape, embd.shape);
        }
    }

    let specs: Vec<TensorSpec> = descs
        .iter()
        .map(|d| TensorSpec {
            name: d.name.clone(),
            dims: d.dims.clone(),
            ty: opts.preset.type_for(d, hp.n_layer),
        })
        .collect();
    let input_bytes: u64 = descs
        .iter()
        .map(|d| ckpt.get(&d.hf_name).unwrap().bytes.len() as u64)
        .sum();
    progress.start(input_bytes, descs.len());

    let mut metadata: Vec<(String, Value)> = vec![
        (
            KEY_ARCHITECTURE.into(),
            Value::String(model_file::ARCH.into()),
        ),
        (keys::NAME.into(), Value::String(model_name(&opts.input))),
        (keys::FILE_TYPE.into(), Value::U32(opts.preset.file_type())),
        (keys::QUANT_VERSION.into(), Value::U32(2)),
    ];
    if let (Some(c), Some(input)) = (&calibration, &opts.calibration) {
        // llama.cpp's keys for the same provenance.
        let file = input.path.file_name().unwrap_or_default();
        metadata.push((
            "quantize.imatrix.file".into(),
            Value::String(file.to_string_lossy().into_owned()),
        ));
        metadata.push((
            "quantize.imatrix.entries_count".into(),
            Value::I32(c.importance.len() as i32),
        ));
        metadata.push((
            "quantize.imatrix.chunks_count".into(),
            Value::I32(c.chunks as i32),
        ));
    }
    metadata.extend(hp.to_metadata());
    metadata.push((keys::TOKENIZER_JSON.into(), Value::String(tokenizer_json)));
    metadata.extend(special.to_metadata());

    for p in remove_stale_temp_outputs(&opts.output) {
        eprintln!(
            "crystal-quantize: removed {}, left by an interrupted conversion",
            p.display()
        );
    }
    let tmp = TempOutput::new(temp_path_for(&opts.output));
    let file =
        File::create(&tmp.path).with_context(|| format!("cannot create {}", tmp.path.display()))?;
    let out_err = |e: std::io::Error| anyhow::anyhow!("writing {}: {e}", opts.output.display());
    let mut w = GgufWriter::with_checksum(
        BufWriter::with_capacity(8 << 20, file),
        &metadata,
        specs.clone(),
        32,
    )
    .map_err(out_err)?;

    let mut summary = Summary {
        input_bytes,
        calibration_tokens: calibration.as_ref().map(|c| c.tokens),
        ..Summary::default()
    };
    let mut done_in = 0u64;
    let mut src = Vec::new();
    let mut out = Vec::new();
    let mut laid_out = Vec::new();
    for (i, (d, spec)) in descs.iter().zip(&specs).enumerate() {
        let t = ckpt.get(&d.hf_name).unwrap();
        // Let the OS read the next tensor while this one is converted.
        if let Some(next) = descs.get(i + 1).and_then(|n| ckpt.get(&n.hf_name)) {
            ckpt.prefetch(&next);
        }
        read_checked(&t, &d.hf_name, &mut src)?;
        if d.kind == Kind::Embedding {
            if let Some(h) = &lm_head {
                verify_tied(h, &src)?;
                ckpt.release(h);
            }
        }
        ckpt.release(&t);
        let rows = lay_out(d, &src, &mut laid_out, opts.threads);
        let importance = calibration.as_ref().and_then(|c| c.importance(&d.name));
        encode_rows(
            spec.ty,
            rows,
            spec.dims[0] as usize,
            importance,
            &mut out,
            opts.threads,
        );
        w.write_data(&out).map_err(out_err)?;
        done_in += t.bytes.len() as u64;
        *summary.tensors_by_type.entry(spec.ty.name()).or_default() += 1;
        if d.kind != Kind::Vector {
            summary.params += spec.dims.iter().product::<u64>();
            summary.weight_bytes += out.len() as u64;
        }
        progress.tensor_done(&d.name, spec.ty, done_in);
    }
    let (file, checksum) = w.finish_with_checksum().map_err(out_err)?;
    summary.checksum = checksum;
    let file = file.into_inner().map_err(|e| out_err(e.into_error()))?;
    file.sync_all().map_err(out_err)?;
    summary.output_bytes = file.metadata().map_err(out_err)?.len();
    drop(file);
    std::fs::rename(&tmp.path, &opts.output).with_context(|| {
        format!(
            "cannot move the result into place at {}",
            opts.output.display()
        )
    })?;
    let mut tmp = tmp;
    tmp.keep = true;
    // Make the rename itself durable: after a power loss the directory
    // holds either the old state or the complete new file.
    if let Ok(d) = File::open(output_dir(&opts.output)) {
        let _ = d.sync_all();
    }
    progress.finish();
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Reads the calibration file and runs the pass, with a line per block.
fn run_calibration(
    input: &CalibrationInput,
    ckpt: &Checkpoint,
    hp: &model_file::Hparams,
    descs: &[TensorDesc],
    threads: usize,
    progress: &mut dyn Progress,
) -> Result<calibrate::Calibration> {
    let chunk_len = hp.context_length.min(calibrate::MAX_CHUNK);
    let chunks =
        calibrate::read_token_file(&input.path, hp.vocab_size, chunk_len, input.max_tokens)?;
    let tokens: usize = chunks.iter().map(Vec::len).sum();
    progress.note(&format!(
        "calibrating on {tokens} tokens ({} chunks) of {}",
        chunks.len(),
        input.path.display()
    ));
    let started = Instant::now();
    let n_layer = hp.n_layer;
    let c = calibrate::calibrate(ckpt, hp, descs, &chunks, threads, &mut |l| {
        progress.note(&format!(
            "calibration: block {}/{n_layer} ({:.0}s)",
            l + 1,
            started.elapsed().as_secs_f64()
        ))
    })
    .context("calibration pass")?;
    Ok(c)
}

/// One checkpoint tensor as f32 in file layout (transposed, padded),
/// checked finite; its file pages are released after reading.
pub(crate) fn read_laid_out(ckpt: &Checkpoint, d: &TensorDesc, threads: usize) -> Result<Vec<f32>> {
    let t = ckpt
        .get(&d.hf_name)
        .with_context(|| format!("tensor '{}' is missing from the checkpoint", d.hf_name))?;
    let mut src = Vec::new();
    read_checked(&t, &d.hf_name, &mut src)?;
    ckpt.release(&t);
    let mut scratch = Vec::new();
    let in_place = std::ptr::eq(
        lay_out(d, &src, &mut scratch, threads).as_ptr(),
        src.as_ptr(),
    );
    Ok(if in_place { src } else { scratch })
}

fn model_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "CrystalChat".into())
}

fn check_tensor(t: &TensorRef<'_>, d: &TensorDesc) -> Result<()> {
    if t.shape != d.hf_shape {
        bail!(
            "tensor '{}' in {} has shape {:?}, but config.json implies {:?}",
            d.hf_name,
            t.file.display(),
            t.shape,
            d.hf_shape
        );
    }
    if let DType::Other(name) = &t.dtype {
        bail!(
            "tensor '{}' in {} has dtype {name}; only f32, f16 and bf16 weights are supported",
            d.hf_name,
            t.file.display()
        );
    }
    Ok(())
}

/// A checkpoint tensor as f32 into `out`, refused if any value is NaN or
/// infinite: what the conversion and the calibration pass both read.
fn read_checked(t: &TensorRef<'_>, name: &str, out: &mut Vec<f32>) -> Result<()> {
    checkpoint::to_f32(t, out).with_context(|| format!("reading tensor '{name}'"))?;
    check_finite(name, out)
}

fn check_finite(name: &str, values: &[f32]) -> Result<()> {
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        bail!("tensor '{name}' holds {} at flat index {i}; the checkpoint is corrupt or was saved after a divergence", values[i]);
    }
    Ok(())
}

/// The checkpoint must tie its head to the embedding: a copy that differs
/// would silently change the model, so it is refused.
/// Compared in row chunks so a 7B head costs a few MB, not another copy.
fn verify_tied(lm_head: &TensorRef<'_>, embd: &[f32]) -> Result<()> {
    let cols = lm_head.shape[1] as usize;
    let row_bytes = lm_head.bytes.len() / lm_head.shape[0] as usize;
    const CHUNK_ROWS: usize = 256;
    let mut head = Vec::new();
    for (c, bytes) in lm_head.bytes.chunks(CHUNK_ROWS * row_bytes).enumerate() {
        let part = TensorRef {
            bytes,
            shape: vec![(bytes.len() / row_bytes) as u64, cols as u64],
            dtype: lm_head.dtype.clone(),
            name: lm_head.name,
            file: lm_head.file,
        };
        checkpoint::to_f32(&part, &mut head).context("reading tensor 'lm_head.weight'")?;
        let base = c * CHUNK_ROWS * cols;
        if let Some(i) = head
            .iter()
            .zip(&embd[base..])
            .position(|(a, b)| a.to_bits() != b.to_bits())
        {
            bail!(
                "lm_head.weight differs from transformer.wte.weight (first at flat index {}: {} vs {}); CrystalCoder ties them, so this checkpoint is not one",
                base + i,
                head[i],
                embd[base + i]
            );
        }
    }
    Ok(())
}

/// Puts a checkpoint tensor into file layout: Conv1D weights `[in, out]`
/// become row-major `[out, in]`, and everything is zero-padded to the file
/// shape (see `model_file` on padding).
fn lay_out<'a>(
    d: &TensorDesc,
    src: &'a [f32],
    scratch: &'a mut Vec<f32>,
    threads: usize,
) -> &'a [f32] {
    let cols = d.dims[0] as usize;
    let rows = d.dims.get(1).copied().unwrap_or(1) as usize;
    if d.kind != Kind::Linear && src.len() == rows * cols {
        return src;
    }
    scratch.clear();
    scratch.resize(rows * cols, 0.0);
    match d.kind {
        Kind::Linear => {
            let (n_in, n_out) = (d.hf_shape[0] as usize, d.hf_shape[1] as usize);
            transpose_into(src, n_in, n_out, scratch, cols, threads);
        }
        _ => scratch[..src.len()].copy_from_slice(src),
    }
    scratch
}

/// `dst[o * dst_stride + i] = src[i * n_out + o]`, in tiles so both sides
/// stay in cache, output rows split across threads.
fn transpose_into(
    src: &[f32],
    n_in: usize,
    n_out: usize,
    dst: &mut [f32],
    dst_stride: usize,
    threads: usize,
) {
    const TILE: usize = 64;
    let per = n_out.div_ceil(threads.max(1)).div_ceil(TILE).max(1) * TILE;
    std::thread::scope(|s| {
        for (c, dst) in dst.chunks_mut(per * dst_stride).enumerate() {
            let o_start = c * per;
            let o_end = (o_start + per).min(n_out);
            s.spawn(move || {
                for i0 in (0..n_in).step_by(TILE) {
                    for o0 in (o_start..o_end).step_by(TILE) {
                        for i in i0..(i0 + TILE).min(n_in) {
                            let row = &src[i * n_out..(i + 1) * n_out];
                            for o in o0..(o0 + TILE).min(o_end) {
                                dst[(o - o_start) * dst_stride + i] = row[o];
                            }
                        }
                    }
                }
            });
        }
    });
}

/// Encodes rows of `cols` values into `out`, splitting rows across threads;
/// `importance` (per column) weights the rounding of every row.
fn encode_rows(
    ty: GgmlType,
    values: &[f32],
    cols: usize,
    importance: Option<&[f32]>,
    out: &mut Vec<u8>,
    threads: usize,
) {
    let row_bytes = ty
        .row_bytes(cols)
        .expect("file shapes are padded to whole blocks");
    let n_rows = values.len() / cols;
    out.clear();
    out.resize(n_rows * row_bytes, 0);
    let per = n_rows.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (src, dst) in values
            .chunks(per * cols)
            .zip(out.chunks_mut(per * row_bytes))
        {
            s.spawn(move || {
                for (x, y) in src.chunks_exact(cols).zip(dst.chunks_exact_mut(row_bytes)) {
                    quant::quantize_row(ty, x, importance, y);
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_pads_with_zeros() {
        // [in=2, out=3] -> [out=3, in=2 (+2 pad cols)]
        let src = [1., 2., 3., 4., 5., 6.];
        let mut dst = vec![0.0; 12];
        transpose_into(&src, 2, 3, &mut dst, 4, 1);
        assert_eq!(dst, [1., 4., 0., 0., 2., 5., 0., 0., 3., 6., 0., 0.]);
    }

    #[test]
    fn threaded_transpose_equals_naive() {
        let (n_in, n_out, stride) = (130, 200, 160);
        let src: Vec<f32> = (0..n_in * n_out).map(|v| v as f32).collect();
        for threads in [1, 2, 3, 7] {
            let mut dst = vec![0.0; n_out * stride];
            transpose_into(&src, n_in, n_out, &mut dst, stride, threads);
            for o in 0..n_out {
                for i in 0..stride {
                    let want = if i < n_in { src[i * n_out + o] } else { 0.0 };
                    assert_eq!(dst[o * stride + i], want, "threads {threads} at ({o}, {i})");
                }
            }
        }
    }

    #[test]
    fn preset_types() {
        let hp = crystald::model_file::Hparams {
            vocab_size: 512,
            context_length: 64,
            n_embd: 256,
            n_layer: 8,
            n_head: 4,
            rotary_dim: 16,
            n_ff: 768,
            n_inner: 682,
            layer_norm_epsilon: 1e-5,
            rope_freq_base: 1e4,
            mup_embeddings_scale: 1.0,
            mup_output_alpha: 1.0,
            mup_width_scale: 1.0,
            scale_qk_dot_by_d: true,
        };
        let descs = model_file::tensor_descs(&hp);
        let ty = |p: Preset, name: &str| {
            let d = descs.iter().find(|d| d.name == name).unwrap();
            p.type_for(d, hp.n_layer)
        };
        assert_eq!(ty(Preset::Q4_0, "blk.0.ffn_up.weight"), GgmlType::Q4_0);
        assert_eq!(ty(Preset::Q4_0, "token_embd.weight"), GgmlType::Q8_0);
        assert_eq!(ty(Preset::Q4_0, "blk.0.ffn_up.bias"), GgmlType::F32);
        assert_eq!(ty(Preset::F16, "token_embd.weight"), GgmlType::F16);
        // 8 blocks: more bits in 0 (first eighth), 7 (last) and 3, 6.
        for (l, more) in [
            (0, true),
            (1, false),
            (2, false),
            (3, true),
            (6, true),
            (7, true),
        ] {
            let (down, qkv) = (
                format!("blk.{l}.ffn_down.weight"),
                format!("blk.{l}.attn_qkv.weight"),
            );
            let want_down = if more { GgmlType::Q6_K } else { GgmlType::Q4_K };
            assert_eq!(ty(Preset::Q4KM, &down), want_down, "{down}");
            assert_eq!(ty(Preset::Q4KM, &qkv), GgmlType::Q4_K, "{qkv}");
            let want_q5 = if more { GgmlType::Q6_K } else { GgmlType::Q5_K };
            assert_eq!(ty(Preset::Q5KM, &qkv), want_q5, "{qkv}");
            assert_eq!(ty(Preset::Q4KS, &down), GgmlType::Q4_K, "{down}");
        }
        assert_eq!(ty(Preset::Q4KM, "blk.1.ffn_gate.weight"), GgmlType::Q4_K);
        assert_eq!(ty(Preset::Q4KM, "token_embd.weight"), GgmlType::Q6_K);
        assert_eq!(ty(Preset::Q5KM, "blk.1.ffn_up.weight"), GgmlType::Q5_K);
        assert_eq!(ty(Preset::Q5KM, "blk.7.ffn_down.weight"), GgmlType::Q6_K);
        assert_eq!(ty(Preset::Q6K, "blk.1.attn_output.weight"), GgmlType::Q6_K);
        assert_eq!(ty(Preset::Q6K, "blk.1.attn_output.bias"), GgmlType::F32);
    }

    #[test]
    fn k_quant_rows_that_do_not_fill_super_blocks_fall_back_to_q8_0() {
        let d = TensorDesc {
            name: "blk.0.attn_output.weight".into(),
            hf_name: String::new(),
            kind: Kind::Linear,
            layer: Some((0, crystald::model_file::LayerTensor::AttnOutW)),
            dims: vec![96, 96],
            hf_shape: vec![96, 96],
        };
        assert_eq!(Preset::Q4KM.type_for(&d, 4), GgmlType::Q8_0);
        assert_eq!(Preset::Q6K.type_for(&d, 4), GgmlType::Q8_0);
    }

    #[test]
    fn preset_names_round_trip() {
        for p in Preset::ALL {
            assert_eq!(Preset::parse(p.name()), Some(p));
            assert_eq!(Preset::parse(&p.name().to_uppercase()), Some(p));
        }
        assert_eq!(Preset::parse("q4_k"), None);
    }
}
