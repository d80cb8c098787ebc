//! Zero-copy reader for Hugging Face checkpoints: single or sharded safetensors and
//! PyTorch `.bin` (zip + pickle) files.
//!
//! Every file is memory-mapped read-only and fully indexed at [`Checkpoint::open`], so a
//! damaged or truncated shard is reported before any conversion work starts. Tensor data is
//! handed out as slices of the maps; [`Checkpoint::release`] drops a tensor's pages again so
//! converting a checkpoint larger than RAM keeps resident memory near the largest tensor.

mod pickle;
mod pytorch;
mod safetensors;
mod zipfile;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapOptions};

/// Element type of a stored tensor.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// Anything that is not a float weight (`"bool"`, `"i64"`, `"f64"`, `"u8"`, ...). Listed so
    /// callers can see and skip it; converting it to f32 is an error.
    Other(String),
}

impl DType {
    pub fn is_float(&self) -> bool {
        !matches!(self, DType::Other(_))
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DType::F32 => f.write_str("f32"),
            DType::F16 => f.write_str("f16"),
            DType::BF16 => f.write_str("bf16"),
            DType::Other(s) => f.write_str(s),
        }
    }
}

/// A tensor as stored: raw little-endian bytes straight from the file mapping.
#[derive(Clone, Debug)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Raw little-endian element bytes; not necessarily aligned for the element type.
    pub bytes: &'a [u8],
    pub file: &'a Path,
}

impl TensorRef<'_> {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// Which on-disk layout [`Checkpoint::open`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Safetensors,
    SafetensorsSharded,
    PytorchBin,
    PytorchBinSharded,
}

/// What went wrong, for callers that want to react differently (tests, mostly).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The OS refused to open, stat or map a file.
    Io,
    /// A file or index entry the layout requires is absent.
    Missing,
    /// A byte range points past the end of its file or zip entry.
    Truncated,
    /// The container (zip, pickle, JSON header) is not well formed.
    Malformed,
    /// Well formed, but uses something this reader does not handle (compression, big-endian,
    /// non-contiguous strides, a non-float dtype where floats are needed).
    Unsupported,
    /// A tensor name occurs twice across the checkpoint.
    Duplicate,
}

/// Error from opening or decoding a checkpoint. The message always names the file and/or the
/// tensor it concerns.
#[derive(Debug)]
pub struct CheckpointError {
    kind: ErrorKind,
    file: Option<PathBuf>,
    tensor: Option<String>,
    message: String,
    source: Option<std::io::Error>,
}

impl CheckpointError {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        CheckpointError {
            kind,
            file: None,
            tensor: None,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn io(path: &Path, what: &str, err: std::io::Error) -> Self {
        CheckpointError {
            kind: ErrorKind::Io,
            file: Some(path.to_path_buf()),
            tensor: None,
            message: what.to_string(),
            source: Some(err),
        }
    }

    /// Attaches the file, unless a more specific one is already recorded.
    pub(crate) fn in_file(mut self, path: &Path) -> Self {
        if self.file.is_none() {
            self.file = Some(path.to_path_buf());
        }
        self
    }

    pub(crate) fn for_tensor(mut self, name: &str) -> Self {
        if self.tensor.is_none() {
            self.tensor = Some(name.to_string());
        }
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    pub fn tensor(&self) -> Option<&str> {
        self.tensor.as_deref()
    }
}

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some(t) = &self.tensor {
            write!(f, "tensor '{t}': ")?;
        }
        f.write_str(&self.message)?;
        if let Some(e) = &self.source {
            write!(f, ": {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CheckpointError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

pub type Result<T> = std::result::Result<T, CheckpointError>;

/// One tensor located inside a file by a format parser; offsets are absolute in the file.
pub(crate) struct RawTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub start: u64,
    pub len: u64,
}

struct MappedFile {
    path: PathBuf,
    map: Mmap,
}

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<u64>,
    start: usize,
    len: usize,
}

/// An opened, validated checkpoint directory.
pub struct Checkpoint {
    layout: Layout,
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, Entry>,
}

const SAFETENSORS: &str = "model.safetensors";
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
const PYTORCH: &str = "pytorch_model.bin";
const PYTORCH_INDEX: &str = "pytorch_model.bin.index.json";

/// Largest index.json accepted; the real 7B index is ~30 KB.
const MAX_INDEX_BYTES: u64 = 64 << 20;

impl Checkpoint {
    /// Detects the layout in `dir` (in Hugging Face's order of preference: `model.safetensors`,
    /// `model.safetensors.index.json`, `pytorch_model.bin`, `pytorch_model.bin.index.json`),
    /// maps every file and validates every tensor's location.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let candidates = [
            (SAFETENSORS, Layout::Safetensors),
            (SAFETENSORS_INDEX, Layout::SafetensorsSharded),
            (PYTORCH, Layout::PytorchBin),
            (PYTORCH_INDEX, Layout::PytorchBinSharded),
        ];
        for (name, layout) in candidates {
            let path = dir.join(name);
            if path.is_file() {
                return match layout {
                    Layout::Safetensors | Layout::PytorchBin => Self::from_files(layout, &[path]),
                    _ => Self::open_index(dir, &path, layout),
                };
            }
        }
        if !dir.is_dir() {
            return Err(CheckpointError::new(ErrorKind::Missing, "not a directory").in_file(dir));
        }
        Err(CheckpointError::new(
            ErrorKind::Missing,
            format!(
                "no checkpoint found (expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {PYTORCH} or {PYTORCH_INDEX})"
            ),
        )
        .in_file(dir))
    }

    /// Opens one weights file directly; the format is chosen by extension
    /// (`.safetensors`, otherwise a PyTorch zip).
    pub fn open_file(path: &Path) -> Result<Checkpoint> {
        let layout = if is_safetensors(path) {
            Layout::Safetensors
        } else {
            Layout::PytorchBin
        };
        Self::from_files(layout, &[path.to_path_buf()])
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The distinct weight files, in the order they were opened.
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<TensorRef<'_>> {
        let (name, e) = self.tensors.get_key_value(name)?;
        let f = &self.files[e.file];
        Some(TensorRef {
            name,
            dtype: e.dtype.clone(),
            shape: e.shape.clone(),
            bytes: &f.map[e.start..e.start + e.len],
            file: &f.path,
        })
    }

    /// Sum of all tensors' data bytes (buffers included).
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|e| e.len as u64).sum()
    }

    /// Tells the OS this tensor's pages are no longer needed, so a tensor-by-tensor conversion
    /// keeps resident memory bounded by the largest tensor rather than the file size. Pages
    /// shared with a neighbouring tensor are dropped too; they are simply re-read if touched.
    pub fn release(&self, t: &TensorRef<'_>) {
        if let Some((map, offset)) = self.locate(t) {
            // SAFETY: the map is a read-only, private (copy-on-write) file mapping that is never
            // written, so none of its pages hold data that exists only in memory. DONTNEED merely
            // drops the page-table entries; the next access faults the same bytes back in from
            // the file (page cache or disk). Any outstanding `&[u8]` into the range therefore
            // keeps observing identical contents, and no data is lost. memmap2 widens `offset`
            // down to a page boundary itself and the kernel rounds the length up.
            let r = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    offset,
                    t.bytes.len(),
                )
            };
            // Purely advisory: failure only means the memory stays resident a little longer.
            let _ = r;
        }
    }

    /// Hints that this tensor will be read soon (readahead), e.g. one tensor ahead of the one
    /// being converted.
    pub fn prefetch(&self, t: &TensorRef<'_>) {
        if let Some((map, offset)) = self.locate(t) {
            let _ = map.advise_range(memmap2::Advice::WillNeed, offset, t.bytes.len());
        }
    }

    /// Finds which of our maps `t.bytes` points into, by address.
    fn locate(&self, t: &TensorRef<'_>) -> Option<(&Mmap, usize)> {
        if t.bytes.is_empty() {
            return None;
        }
        let p = t.bytes.as_ptr() as usize;
        self.files.iter().find_map(|f| {
            let base = f.map.as_ptr() as usize;
            (p >= base && p + t.bytes.len() <= base + f.map.len()).then(|| (&f.map, p - base))
        })
    }

    fn open_index(dir: &Path, index_path: &Path, layout: Layout) -> Result<Checkpoint> {
        let weight_map = read_index(index_path)?;
        // One open per distinct shard, in a stable order.
        let mut shard_names: Vec<&str> = weight_map.values().map(String::as_str).collect();
        shard_names.sort_unstable();
        shard_names.dedup();
        if shard_names.is_empty() {
            return Err(
                CheckpointError::new(ErrorKind::Malformed, "weight_map is empty")
                    .in_file(index_path),
            );
        }
        let mut paths = Vec::with_capacity(shard_names.len());
        for shard in &shard_names {
            let rel = Path::new(shard);
            let plain = rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !plain {
                return Err(CheckpointError::new(
                    ErrorKind::Malformed,
                    format!("weight_map names shard '{shard}', which is not a relative path inside the checkpoint directory"),
                )
                .in_file(index_path));
            }
            let path = dir.join(rel);
            if !path.is_file() {
                let example = weight_map
                    .iter()
                    .find(|(_, f)| f == shard)
                    .map(|(n, _)| n.as_str())
                    .unwrap_or_default();
                return Err(CheckpointError::new(
                    ErrorKind::Missing,
                    format!(
                        "shard listed in {} (e.g. for '{example}') does not exist",
                        index_path.display()
                    ),
                )
                .in_file(&path));
            }
            paths.push(path);
        }
        let ck = Self::from_files(layout, &paths)?;
        for (name, shard) in &weight_map {
            let want = dir.join(shard);
            let found = ck.tensors.get(name).map(|e| &ck.files[e.file].path);
            if found != Some(&want) {
                return Err(CheckpointError::new(
                    ErrorKind::Missing,
                    format!(
                        "{} maps this tensor to this shard, but the shard does not contain it",
                        index_path.display()
                    ),
                )
                .in_file(&want)
                .for_tensor(name));
            }
        }
        Ok(ck)
    }

    fn from_files(layout: Layout, paths: &[PathBuf]) -> Result<Checkpoint> {
        let mut files: Vec<MappedFile> = Vec::with_capacity(paths.len());
        let mut tensors = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let map = map_file(path)?;
            let raw = if is_safetensors(path) {
                safetensors::parse(&map, path)?
            } else {
                pytorch::parse(&map, path)?
            };
            for t in raw {
                let end = t.start.checked_add(t.len);
                if end.is_none_or(|e| e > map.len() as u64) {
                    // Parsers already check this; kept as the invariant `get` relies on.
                    return Err(CheckpointError::new(
                        ErrorKind::Truncated,
                        format!(
                            "data [{}, {}) extends past the end of the file ({} bytes)",
                            t.start,
                            t.start as u128 + t.len as u128,
                            map.len()
                        ),
                    )
                    .in_file(path)
                    .for_tensor(&t.name));
                }
                let entry = Entry {
                    file: i,
                    dtype: t.dtype,
                    shape: t.shape,
                    start: t.start as usize,
                    len: t.len as usize,
                };
                if let Some(prev) = tensors.insert(t.name.clone(), entry) {
                    let other = if prev.file == i {
                        path.clone()
                    } else {
                        files[prev.file].path.clone()
                    };
                    return Err(CheckpointError::new(
                        ErrorKind::Duplicate,
                        format!("also present in {}", other.display()),
                    )
                    .in_file(path)
                    .for_tensor(&t.name));
                }
            }
            files.push(MappedFile {
                path: path.clone(),
                map,
            });
        }
        Ok(Checkpoint {
            layout,
            files,
            tensors,
        })
    }
}

fn is_safetensors(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| CheckpointError::io(path, "cannot open", e))?;
    // SAFETY: the mapping is read-only and private, so we never write through it. The remaining
    // hazard of any file mapping is another process truncating or rewriting the file while it
    // is mapped; checkpoints are inputs that nobody modifies during a conversion, and every
    // offset we hand out was validated against the length at open time.
    let map = unsafe { MmapOptions::new().map_copy_read_only(&file) }
        .map_err(|e| CheckpointError::io(path, "cannot memory-map", e))?;
    Ok(map)
}

fn read_index(path: &Path) -> Result<HashMap<String, String>> {
    let meta = std::fs::metadata(path).map_err(|e| CheckpointError::io(path, "cannot stat", e))?;
    if meta.len() > MAX_INDEX_BYTES {
        return Err(CheckpointError::new(
            ErrorKind::Malformed,
            format!("index is implausibly large ({} bytes)", meta.len()),
        )
        .in_file(path));
    }
    let text = std::fs::read(path).map_err(|e| CheckpointError::io(path, "cannot read", e))?;
    let json: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
        CheckpointError::new(ErrorKind::Malformed, format!("invalid JSON: {e}")).in_file(path)
    })?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(CheckpointError::new(
            ErrorKind::Malformed,
            "no \"weight_map\" object in the index",
        )
        .in_file(path));
    };
    let mut out = HashMap::with_capacity(map.len());
    for (name, file) in map {
        let Some(file) = file.as_str() else {
            return Err(CheckpointError::new(
                ErrorKind::Malformed,
                "weight_map value is not a file name",
            )
            .in_file(path)
            .for_tensor(name));
        };
        out.insert(name.clone(), file.to_string());
    }
    Ok(out)
}

/// Converts a float tensor to f32 (bf16 and f16 widen exactly) into `out`, replacing its
/// contents.
pub fn to_f32(t: &TensorRef<'_>, out: &mut Vec<f32>) -> Result<()> {
    let err = |kind, msg: String| {
        Err(CheckpointError::new(kind, msg)
            .in_file(t.file)
            .for_tensor(t.name))
    };
    let size = match &t.dtype {
        DType::F32 => 4,
        DType::F16 | DType::BF16 => 2,
        DType::Other(d) => {
            return err(
                ErrorKind::Unsupported,
                format!("dtype {d} is not a float type and cannot be converted to f32"),
            )
        }
    };
    let expect = t
        .shape
        .iter()
        .try_fold(size as u64, |acc, &d| acc.checked_mul(d));
    if expect != Some(t.bytes.len() as u64) {
        return err(
            ErrorKind::Malformed,
            format!(
                "shape {:?} of {} needs {} bytes but {} are stored",
                t.shape,
                t.dtype,
                expect.map_or("too many".to_string(), |e| e.to_string()),
                t.bytes.len()
            ),
        );
    }
    out.clear();
    out.reserve(t.bytes.len() / size);
    match t.dtype {
        DType::F32 => {
            // Fast path: aligned data on a little-endian host is already f32.
            match bytemuck::try_cast_slice::<u8, f32>(t.bytes) {
                Ok(v) if cfg!(target_endian = "little") => out.extend_from_slice(v),
                _ => out.extend(
                    t.bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                ),
            }
        }
        DType::BF16 => out.extend(
            t.bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)),
        ),
        DType::F16 => out.extend(
            t.bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
        ),
        DType::Other(_) => unreachable!("rejected above"),
    }
    Ok(())
}

/// Bytes per element of a dtype named the way this module names them, if known.
pub(crate) fn element_size(dtype: &DType) -> Option<u64> {
    Some(match dtype {
        DType::F32 => 4,
        DType::F16 | DType::BF16 => 2,
        DType::Other(s) => match s.as_str() {
            "bool" | "u8" | "i8" | "f8_e4m3" | "f8_e5m2" => 1,
            "i16" | "u16" => 2,
            "i32" | "u32" => 4,
            "i64" | "u64" | "f64" | "c64" => 8,
            "c128" => 16,
            _ => return None,
        },
    })
}

/// numel × element size, or None on overflow.
pub(crate) fn byte_len(shape: &[u64], elem: u64) -> Option<u64> {
    shape.iter().try_fold(elem, |acc, &d| acc.checked_mul(d))
}

/// Runs a pickle that should evaluate to one integer (lets the synth writer's tests check its
/// integer encodings against this reader).
#[cfg(test)]
pub(crate) fn pickle_int_for_tests(data: &[u8]) -> Option<i64> {
    match pickle::load(data) {
        Ok(pickle::Value::Int(i)) => Some(i),
        _ => None,
    }
}

/// Byte-level entry points of the format parsers for the fuzz targets
/// (`tests/fuzz`): the same code [`Checkpoint::open`] runs on a mapped file,
/// with the invariants its callers rely on asserted, so a violation is a
/// crash the fuzzer reports. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Largest tensor whose elements are decoded to f32 per input, so one
    /// execution stays fast.
    const MAX_DECODE_BYTES: u64 = 1 << 20;

    fn check_located(data: &[u8], tensors: &[RawTensor]) {
        let path = Path::new("fuzz-input");
        let mut out = Vec::new();
        for t in tensors {
            let end = t.start.checked_add(t.len).expect("range overflows");
            assert!(end <= data.len() as u64, "'{}' lies past the input", t.name);
            if let Some(elem) = element_size(&t.dtype) {
                assert_eq!(
                    byte_len(&t.shape, elem),
                    Some(t.len),
                    "'{}': length disagrees with shape",
                    t.name
                );
            }
            if t.dtype.is_float() && t.len <= MAX_DECODE_BYTES {
                let r = TensorRef {
                    name: &t.name,
                    dtype: t.dtype.clone(),
                    shape: t.shape.clone(),
                    bytes: &data[t.start as usize..end as usize],
                    file: path,
                };
                to_f32(&r, &mut out).expect("a located float tensor decodes");
                assert_eq!(out.len() as u64, r.numel());
            }
        }
    }

    /// Indexes a safetensors file held in memory; returns the tensor count.
    pub fn safetensors(data: &[u8]) -> Result<usize> {
        let tensors = super::safetensors::parse(data, Path::new("fuzz-input.safetensors"))?;
        check_located(data, &tensors);
        Ok(tensors.len())
    }

    /// Indexes a `torch.save` zip held in memory (zip directory, pickle,
    /// storage lookup); returns the tensor count.
    pub fn pytorch(data: &[u8]) -> Result<usize> {
        let tensors = super::pytorch::parse(data, Path::new("fuzz-input.bin"))?;
        check_located(data, &tensors);
        Ok(tensors.len())
    }

    /// Lists a zip archive's entries; each entry's data must lie in `data`.
    pub fn zip(data: &[u8]) -> Result<usize> {
        let entries = super::zipfile::entries(data)?;
        for e in &entries {
            let end = e.data_start.checked_add(e.size).expect("entry overflows");
            assert!(
                end <= data.len() as u64,
                "entry '{}' lies past the input",
                e.name
            );
        }
        Ok(entries.len())
    }

    /// Runs a pickle and reads it as a state dict; returns the tensor count.
    pub fn pickle(data: &[u8]) -> std::result::Result<usize, String> {
        let v = super::pickle::load(data)
            .map_err(|e| format!("at byte {}: {}", e.offset, e.message))?;
        super::pickle::state_dict(&v).map(|t| t.len())
    }
}
