//! Zero-copy GGUF reader: memory-maps the file, parses and validates the
//! header and tensor table once, then hands out tensor data as slices of the
//! map. Nothing in the file is trusted: every length, count and offset is
//! checked against the bytes actually present before it is used.

use super::{
    align_up, value_type as vt, Error, Result, Value, DEFAULT_ALIGNMENT, KEY_ALIGNMENT, MAGIC,
    VERSION,
};
use crate::quant::GgmlType;
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

/// Deepest nesting of arrays accepted (ggml writes at most arrays of arrays).
const MAX_ARRAY_DEPTH: usize = 2;
/// Most dimensions a ggml tensor can have.
const MAX_DIMS: usize = 4;

#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions innermost (contiguous) first, as ggml's `ne`.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Shape outermost first (`[rows, cols]` for a matrix), as numpy shows it.
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

/// Parsed header and tensor table of a GGUF file.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    /// Where the file's checksum value is (absolute offset) and what it
    /// says, when the file has one (see [`super::checksum`]).
    pub checksum: Option<(u64, u64)>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: impl Into<String>) -> Error {
        Error::Format {
            offset: self.pos as u64,
            what: what.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!(
                "file ends inside {what} ({n} bytes needed, {} left)",
                self.remaining()
            ))),
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    /// A count of items that each take at least `min_item_bytes`: refusing
    /// counts the rest of the file cannot hold keeps a corrupted count from
    /// becoming a huge allocation.
    fn count(&mut self, min_item_bytes: usize, what: &str) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let max = (self.remaining() / min_item_bytes.max(1)) as u64;
        if n > max {
            return Err(Error::Format {
                offset: at as u64,
                what: format!("{what} is {n}, but the rest of the file can hold at most {max}: the file is truncated or corrupt"),
            });
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, &format!("length of {what}"))?;
        let at = self.pos;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Error::Format {
            offset: at as u64,
            what: format!("{what} is not valid UTF-8"),
        })
    }

    fn value(&mut self, ty: u32, depth: usize, key: &str) -> Result<Value> {
        Ok(match ty {
            vt::U8 => Value::U8(self.u8(key)?),
            vt::I8 => Value::I8(self.u8(key)? as i8),
            vt::U16 => Value::U16(self.u16(key)?),
            vt::I16 => Value::I16(self.u16(key)? as i16),
            vt::U32 => Value::U32(self.u32(key)?),
            vt::I32 => Value::I32(self.u32(key)? as i32),
            vt::F32 => Value::F32(f32::from_bits(self.u32(key)?)),
            vt::U64 => Value::U64(self.u64(key)?),
            vt::I64 => Value::I64(self.u64(key)? as i64),
            vt::F64 => Value::F64(f64::from_bits(self.u64(key)?)),
            vt::BOOL => match self.u8(key)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(self.err(format!(
                        "metadata '{key}': bool byte {b} is neither 0 nor 1"
                    )))
                }
            },
            vt::STRING => Value::String(self.string(&format!("metadata '{key}'"))?),
            vt::ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!(
                        "metadata '{key}': arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let elem = self.u32(key)?;
                let min = match elem {
                    vt::U8 | vt::I8 | vt::BOOL => 1,
                    vt::U16 | vt::I16 => 2,
                    vt::U32 | vt::I32 | vt::F32 => 4,
                    _ => 8,
                };
                let n = self.count(min, &format!("metadata '{key}' array length"))?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1, key)?);
                }
                Value::Array(items)
            }
            other => return Err(self.err(format!("metadata '{key}': unknown value type {other}"))),
        })
    }
}

impl Header {
    /// Parses and validates the header of a whole GGUF file held in `buf`.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        let mut c = Cursor { buf, pos: 0 };
        let magic = c.take(4, "the magic number")?;
        if magic != MAGIC {
            return Err(Error::Format {
                offset: 0,
                what: format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"),
            });
        }
        let version = c.u32("the version")?;
        if !(2..=VERSION).contains(&version) {
            return Err(Error::Format {
                offset: 4,
                what: format!("GGUF version {version} is not supported (2 or 3)"),
            });
        }
        // Smallest possible tensor info: empty name (8), n_dims (4), one dim (8), type (4), offset (8).
        let n_tensors = c.count(32, "tensor count")?;
        // Smallest possible metadata pair: empty key (8), type (4), one byte.
        let n_kv = c.count(13, "metadata count")?;

        let mut metadata = Vec::with_capacity(n_kv);
        let mut checksum = None;
        for _ in 0..n_kv {
            let key = c.string("a metadata key")?;
            if metadata.iter().any(|(k, _): &(String, Value)| *k == key) {
                return Err(c.err(format!("metadata key '{key}' appears twice")));
            }
            let ty = c.u32(&key)?;
            let at = c.pos as u64;
            let value = c.value(ty, 0, &key)?;
            if key == super::checksum::KEY {
                match value {
                    Value::U64(v) => checksum = Some((at, v)),
                    _ => return Err(c.err(format!("{key} must be a u64, found {value:?}"))),
                }
            }
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| k == KEY_ALIGNMENT) {
            None => DEFAULT_ALIGNMENT as u64,
            Some((_, Value::U32(a))) if a.is_power_of_two() => *a as u64,
            Some((_, v)) => {
                return Err(c.err(format!(
                    "{KEY_ALIGNMENT} must be a u32 power of two, found {v:?}"
                )))
            }
        };

        let mut raw = Vec::with_capacity(n_tensors);
        let mut seen = HashMap::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("a tensor name")?;
            if seen.insert(name.clone(), ()).is_some() {
                return Err(Error::Tensor {
                    name,
                    what: "appears twice in the tensor table".into(),
                });
            }
            let n_dims = c.u32(&name)? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::Tensor {
                    name,
                    what: format!("has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            let type_id = c.u32(&name)?;
            let offset = c.u64(&name)?;
            let Some(ty) = GgmlType::from_id(type_id) else {
                let known: Vec<String> = GgmlType::ALL
                    .iter()
                    .map(|t| format!("{} = {}", t.id(), t.name()))
                    .collect();
                return Err(Error::Tensor { name, what: format!("has ggml type id {type_id}, which this build does not support (supported: {})", known.join(", ")) });
            };
            raw.push((name, dims, ty, offset));
        }

        let data_offset = align_up(c.pos as u64, alignment);
        if data_offset > buf.len() as u64 && n_tensors > 0 {
            return Err(Error::Format {
                offset: c.pos as u64,
                what: "file ends before the tensor data section".into(),
            });
        }
        let file_len = buf.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ty, rel) in raw {
            let bad = |what: String| Error::Tensor {
                name: name.clone(),
                what,
            };
            if dims.contains(&0) {
                return Err(bad(format!("has an empty dimension {dims:?}")));
            }
            let n_elements = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
            let row_bytes = usize::try_from(dims[0])
                .ok()
                .and_then(|n| ty.row_bytes(n))
                .ok_or_else(|| {
                    bad(format!(
                        "row length {} is not a multiple of the {ty} block size {}",
                        dims[0],
                        ty.block_size()
                    ))
                })?;
            let n_bytes = (n_elements / dims[0])
                .checked_mul(row_bytes as u64)
                .ok_or_else(|| bad("size overflows".into()))?;
            if rel % alignment != 0 {
                return Err(bad(format!(
                    "data offset {rel} is not a multiple of the alignment {alignment}"
                )));
            }
            let offset = data_offset
                .checked_add(rel)
                .ok_or_else(|| bad("offset overflows".into()))?;
            match offset.checked_add(n_bytes) {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(bad(format!(
                        "data [{offset}, {}) lies past the end of the file ({file_len} bytes): the file is truncated or corrupt",
                        offset.saturating_add(n_bytes)
                    )))
                }
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_bytes,
            });
        }
        Ok(Header {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            checksum,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// A memory-mapped, validated GGUF file.
pub struct Gguf {
    map: Mmap,
    pub header: Header,
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Gguf> {
        let file = File::open(path)?;
        // SAFETY: the map is read-only; the file may still be changed by
        // another process while mapped, which no safe Rust API can prevent.
        // Such a change can alter values we read (never memory safety of
        // slice bounds, which were validated against the length at map time);
        // a file truncated under us raises SIGBUS, which the engine turns into
        // a clear fatal error (model::mapping_guard). The operator's contract:
        // do not rewrite a model file in place while the daemon runs (the
        // quantizer writes a new file and renames it).
        let map = unsafe { Mmap::map(&file)? };
        let header = Header::parse(&map)?;
        Ok(Gguf { map, header })
    }

    /// The raw bytes of a tensor (validated to lie inside the file).
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.offset as usize..(t.offset + t.n_bytes) as usize]
    }

    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }

    /// The whole mapping, for callers that advise the kernel about access patterns.
    pub fn map(&self) -> &Mmap {
        &self.map
    }
}
