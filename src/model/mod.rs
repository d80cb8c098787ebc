//! The CrystalChat model: a validated, memory-mapped GGUF file and the
//! forward pass over it ([`forward`]).
//!
//! Weights are used in place from the map; loading copies nothing but the
//! tokenizer JSON. Everything the forward pass indexes is checked here once,
//! so a corrupt or foreign file is an error at load, never a panic later.

pub mod forward;
pub mod kv_pool;
pub mod mapping_guard;
pub mod residency;

pub use forward::{Engine, Logits, Session, Step};
pub use kv_pool::{KvPool, KvType, Sequence};
pub use residency::Prefetch;

pub use crate::device::{DeviceChoice, Placement};
use crate::gguf::{self, Gguf, TensorInfo};
use crate::kernels::{Kernels, Weight};
use crate::model_file::{self, keys, Hparams, Kind, SpecialTokens};
use crate::quant::GgmlType;
use std::collections::HashMap;
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
    /// The KV pool has no room left for the step (positions).
    PoolFull {
        needed: usize,
        available: usize,
    },
    /// The GPU failed during the step (the driver's words). The step's
    /// sequences hold reserved but unwritten positions: release them.
    Device(String),
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
            EngineError::PoolFull { needed, available } => write!(
                f,
                "the KV pool is full: {needed} positions needed, {available} free"
            ),
            EngineError::Device(e) => write!(f, "GPU error: {e}"),
        }
    }
}

impl std::error::Error for EngineError {}

/// Where a tensor's bytes are in the map, and its matrix shape.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TensorLoc {
    pub ty: GgmlType,
    pub offset: usize,
    pub n_bytes: usize,
    pub rows: usize,
    pub cols: usize,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Layer {
    pub attn_norm_w: TensorLoc,
    pub attn_norm_b: TensorLoc,
    pub qkv_w: TensorLoc,
    pub qkv_b: TensorLoc,
    pub attn_out_w: TensorLoc,
    pub attn_out_b: TensorLoc,
    pub ffn_norm_w: TensorLoc,
    pub ffn_norm_b: TensorLoc,
    pub up_w: TensorLoc,
    pub up_b: TensorLoc,
    pub gate_w: TensorLoc,
    pub gate_b: TensorLoc,
    pub down_w: TensorLoc,
    pub down_b: TensorLoc,
}

pub struct Model {
    /// Declared before `file`: stops watching before the map goes away.
    _guard: mapping_guard::MappingGuard,
    file: Gguf,
    pub hp: Hparams,
    pub special: SpecialTokens,
    token_embd: TensorLoc,
    output_norm_w: TensorLoc,
    output_norm_b: TensorLoc,
    layers: Vec<Layer>,
    pub kernels: &'static dyn Kernels,
    pool: rayon::ThreadPool,
    /// Where the forward pass runs (see [`Model::place`]).
    device: Placement,
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
        // From here on, a truncation of the file is a clear fatal error
        // rather than a silent SIGBUS death (see `mapping_guard`).
        let guard = mapping_guard::MappingGuard::new(file.map(), path);
        Self::from_gguf(file, guard, kernels, threads)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))
    }

    fn from_gguf(
        file: Gguf,
        guard: mapping_guard::MappingGuard,
        kernels: &'static dyn Kernels,
        threads: usize,
    ) -> Result<Model, String> {
        let Checked { hp, special, locs } = check(&file.header)?;
        let get = |name: &str| locs[name];
        let layer = |l: usize| {
            use model_file::LayerTensor::*;
            let g = |t| get(&model_file::layer_tensor_name(l, t));
            Layer {
                attn_norm_w: g(AttnNormW),
                attn_norm_b: g(AttnNormB),
                qkv_w: g(QkvW),
                qkv_b: g(QkvB),
                attn_out_w: g(AttnOutW),
                attn_out_b: g(AttnOutB),
                ffn_norm_w: g(FfnNormW),
                ffn_norm_b: g(FfnNormB),
                up_w: g(UpW),
                up_b: g(UpB),
                gate_w: g(GateW),
                gate_b: g(GateB),
                down_w: g(DownW),
                down_b: g(DownB),
            }
        };
        let layers = (0..hp.n_layer).map(layer).collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("crystald-compute-{i}"))
            .build()
            .map_err(|e| format!("cannot start compute threads: {e}"))?;
        Ok(Model {
            _guard: guard,
            token_embd: get(model_file::TOKEN_EMBD),
            output_norm_w: get(model_file::OUTPUT_NORM),
            output_norm_b: get(model_file::OUTPUT_NORM_BIAS),
            layers,
            hp,
            special,
            file,
            kernels,
            pool,
            device: Placement::Cpu,
        })
    }

    /// Moves the forward pass to the device `choice` names: `Cpu` keeps it
    /// here; `Cuda` uploads the weights to the GPU or fails naming what is
    /// missing; `Auto` tries the GPU and stays on the CPU when it cannot be
    /// used. Returns the line for the log (which device, and why not the GPU).
    pub fn place(&mut self, choice: DeviceChoice) -> Result<String, String> {
        if choice == DeviceChoice::Cpu {
            return Ok("device: cpu".into());
        }
        match self.open_gpu() {
            Ok(line) => Ok(line),
            // A build without CUDA has no GPU to miss.
            Err(_) if choice == DeviceChoice::Auto && !cfg!(feature = "cuda") => {
                Ok("device: cpu".into())
            }
            Err(e) if choice == DeviceChoice::Auto => {
                Ok(format!("device: cpu (no usable GPU: {e})"))
            }
            Err(e) => Err(format!("--device cuda: {e}")),
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn open_gpu(&mut self) -> Result<String, String> {
        Err("this crystald was built without CUDA support (cargo feature `cuda`)".into())
    }

    #[cfg(feature = "cuda")]
    fn open_gpu(&mut self) -> Result<String, String> {
        let all = self.file.header.tensors.iter();
        if let Some(t) = all.clone().find(|t| !crate::cuda::forward::supported(t.ty)) {
            return Err(format!(
                "tensor '{}' is {}: the GPU kernels do not read that type",
                t.name, t.ty
            ));
        }
        let start = all.clone().map(|t| t.offset as usize).min().unwrap_or(0);
        let end = all
            .map(|t| (t.offset + t.n_bytes) as usize)
            .max()
            .unwrap_or(0);
        let map = self.file.map();
        // The file's pages are dropped as soon as they are on the GPU, so
        // a board whose CPU and GPU share DRAM never holds the model twice.
        let gpu = crate::cuda::Gpu::open(&map[start..end], start, |r| residency::evict(map, r))?;
        let line = format!(
            "device: cuda, {} ({} MiB of weights on the GPU)",
            gpu.info.summary(),
            gpu.weight_bytes() >> 20
        );
        self.device = Placement::Cuda(Box::new(gpu));
        Ok(line)
    }

    pub fn device(&self) -> &Placement {
        &self.device
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn token_embd_loc(&self) -> TensorLoc {
        self.token_embd
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn output_norm_locs(&self) -> (TensorLoc, TensorLoc) {
        (self.output_norm_w, self.output_norm_b)
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn layer_locs(&self) -> &[Layer] {
        &self.layers
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

    /// Reads the whole file and compares it with its recorded checksum.
    pub fn verify(&self) -> gguf::checksum::Verdict {
        gguf::checksum::verify(&self.file)
    }

    /// Every block scale of the file is finite (reads the whole file).
    pub fn check_scales(&self) -> Result<(), String> {
        gguf::checksum::check_scales(&self.file)
    }

    pub fn has_checksum(&self) -> bool {
        self.file.header.checksum.is_some()
    }

    /// Pins the weights in memory (`lock_weights`).
    pub fn lock_weights(&self) -> Result<(), String> {
        residency::lock(self.file.map())
    }

    pub fn prefetch(&self, how: Prefetch) -> std::io::Result<()> {
        residency::prefetch(self.file.map(), how)
    }

    /// GB/s at which the compute threads read the whole mapped file: the
    /// rate decode could at best stream the weights at (`crystald bench`).
    pub fn read_bandwidth(&self) -> f64 {
        residency::read_bandwidth(self.file.map(), &self.pool)
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

/// What [`check`] found usable in a header.
struct Checked {
    hp: Hparams,
    special: SpecialTokens,
    locs: HashMap<String, TensorLoc>,
}

/// Validates a parsed header as a CrystalChat model without mapping
/// anything: what [`Model::load`] checks before it indexes a tensor. For
/// callers holding the file's bytes (the fuzz targets).
pub fn check_header(h: &gguf::Header) -> Result<(), String> {
    check(h).map(|_| ())
}

fn check(h: &gguf::Header) -> Result<Checked, String> {
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
    // The table must have tensors for every layer before the expected
    // names are listed: a corrupt block_count (up to 2^24) would otherwise
    // build a list of millions of names first (found by the `gguf` fuzz
    // target's harness: a 10 KB file made the loader allocate over 2 GB).
    // Bounded this way, a single missing tensor is still named below.
    let layers_in_table = h
        .tensors
        .iter()
        .filter_map(|t| {
            t.name
                .strip_prefix("blk.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|l| l.saturating_add(1))
        .max()
        .unwrap_or(0);
    if hp.n_layer > layers_in_table {
        return Err(format!(
            "block_count {} but the file has tensors for {layers_in_table} layers",
            hp.n_layer
        ));
    }
    let mut locs = HashMap::new();
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
    Ok(Checked { hp, special, locs })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufWriter, Header, Value};

    fn hparams(n_layer: usize) -> Hparams {
        Hparams {
            vocab_size: 8,
            context_length: 16,
            n_embd: 32,
            n_layer,
            n_head: 2,
            rotary_dim: 8,
            n_ff: 64,
            n_inner: 40,
            layer_norm_epsilon: 1e-5,
            rope_freq_base: 1e4,
            mup_embeddings_scale: 1.0,
            mup_output_alpha: 1.0,
            mup_width_scale: 1.0,
            scale_qk_dot_by_d: true,
        }
    }

    /// A model header with every tensor `hp` implies, data zeroed.
    fn model_file(hp: &Hparams) -> Vec<u8> {
        let mut meta = vec![(
            gguf::KEY_ARCHITECTURE.to_string(),
            Value::String(model_file::ARCH.into()),
        )];
        meta.extend(hp.to_metadata());
        meta.push((keys::TOKENIZER_JSON.into(), Value::String("{}".into())));
        let special = SpecialTokens {
            bos: 1,
            eos: 2,
            im_start: 3,
            im_end: 4,
            sys_start: 5,
            sys_end: 6,
        };
        meta.extend(special.to_metadata());
        let specs: Vec<_> = model_file::tensor_descs(hp)
            .into_iter()
            .map(|d| crate::gguf::TensorSpec {
                name: d.name,
                dims: d.dims,
                ty: GgmlType::F32,
            })
            .collect();
        let sizes: Vec<u64> = specs.iter().map(|s| s.n_bytes()).collect();
        let mut w = GgufWriter::new(Vec::new(), &meta, specs, 32).unwrap();
        for n in sizes {
            w.write_data(&vec![0; n as usize]).unwrap();
        }
        w.finish().unwrap()
    }

    fn set_u32(file: &mut [u8], key: &str, v: u32) {
        let at = file
            .windows(key.len())
            .position(|w| w == key.as_bytes())
            .unwrap()
            + key.len()
            + 4;
        file[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn an_absurd_context_length_is_refused_before_anything_is_sized() {
        let hp = hparams(1);
        // rotary_dim 8, base 1e4: the slowest frequency repeats every 6283 positions.
        assert_eq!(hp.max_context(), 6283);
        for (ctx, ok) in [(6283, true), (6284, false), (u32::MAX, false)] {
            let mut f = model_file(&hp);
            set_u32(&mut f, keys::CONTEXT_LENGTH, ctx);
            let r = check_header(&Header::parse(&f).unwrap());
            if ok {
                r.unwrap();
            } else {
                let e = r.unwrap_err();
                let named = format!(
                    "context_length {ctx} is beyond what the model can address: at most 6283"
                );
                assert!(e.contains(&named) || e.contains("implausibly large"), "{e}");
            }
        }
    }

    #[test]
    fn a_valid_header_passes() {
        let f = model_file(&hparams(2));
        check_header(&Header::parse(&f).unwrap()).unwrap();
    }

    /// Regression (fuzzing): block_count corrupted to 15.7 M in a 10 KB
    /// file made the check list 220 M tensor names (> 2 GB) before failing.
    #[test]
    fn a_corrupt_block_count_is_refused_before_allocating() {
        let mut f = model_file(&hparams(1));
        set_u32(&mut f, keys::BLOCK_COUNT, 0x00F0_0000);
        let h = Header::parse(&f).unwrap();
        let started = std::time::Instant::now();
        let e = check_header(&h).unwrap_err();
        assert!(
            e.contains("block_count 15728640 but the file has tensors for 1 layers"),
            "{e}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}
