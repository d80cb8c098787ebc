//! safetensors: `u64` little-endian header length, a JSON header
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the data
//! block that the offsets are relative to.
//!
//! Parsed by hand rather than through the `safetensors` crate so that every complaint can
//! name the tensor and the exact byte range, and so truncation is reported as such.

use std::path::Path;

use super::{byte_len, element_size, CheckpointError, DType, ErrorKind, RawTensor, Result};

/// The format's own limit; also keeps a corrupt length from allocating gigabytes.
const MAX_HEADER: u64 = 100 << 20;

pub(crate) fn parse(data: &[u8], path: &Path) -> Result<Vec<RawTensor>> {
    let bad = |kind, msg: String| CheckpointError::new(kind, msg).in_file(path);
    let file_len = data.len() as u64;
    if file_len < 8 {
        return Err(bad(
            ErrorKind::Truncated,
            format!("file is {file_len} bytes, too short for a safetensors header"),
        ));
    }
    let n = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER {
        return Err(bad(
            ErrorKind::Malformed,
            format!("header length {n} is implausible (not a safetensors file?)"),
        ));
    }
    if 8 + n > file_len {
        return Err(bad(
            ErrorKind::Truncated,
            format!(
                "header needs bytes [8, {}) but the file ends at {file_len}",
                8 + n
            ),
        ));
    }
    let header: serde_json::Value = serde_json::from_slice(&data[8..8 + n as usize])
        .map_err(|e| bad(ErrorKind::Malformed, format!("invalid JSON header: {e}")))?;
    let Some(obj) = header.as_object() else {
        return Err(bad(
            ErrorKind::Malformed,
            "JSON header is not an object".to_string(),
        ));
    };
    let base = 8 + n;
    let mut out = Vec::with_capacity(obj.len());
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let t = parse_entry(info, base, file_len).map_err(|e| e.in_file(path).for_tensor(name))?;
        out.push(RawTensor {
            name: name.clone(),
            dtype: t.0,
            shape: t.1,
            start: t.2,
            len: t.3,
        });
    }
    Ok(out)
}

fn parse_entry(
    info: &serde_json::Value,
    base: u64,
    file_len: u64,
) -> Result<(DType, Vec<u64>, u64, u64)> {
    let malformed = |msg: &str| CheckpointError::new(ErrorKind::Malformed, msg.to_string());
    let dtype_name = info
        .get("dtype")
        .and_then(|d| d.as_str())
        .ok_or_else(|| malformed("header entry has no string \"dtype\""))?;
    let dtype = match dtype_name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        other => DType::Other(other.to_ascii_lowercase()),
    };
    let elem = element_size(&dtype).ok_or_else(|| {
        CheckpointError::new(
            ErrorKind::Unsupported,
            format!("unknown safetensors dtype {dtype_name}"),
        )
    })?;
    let shape = info
        .get("shape")
        .and_then(|s| s.as_array())
        .and_then(|a| a.iter().map(|d| d.as_u64()).collect::<Option<Vec<u64>>>())
        .ok_or_else(|| malformed("header entry has no \"shape\" list of non-negative integers"))?;
    let offsets = info
        .get("data_offsets")
        .and_then(|s| s.as_array())
        .and_then(|a| a.iter().map(|d| d.as_u64()).collect::<Option<Vec<u64>>>())
        .filter(|v| v.len() == 2)
        .ok_or_else(|| malformed("header entry has no \"data_offsets\" pair"))?;
    let (begin, end) = (offsets[0], offsets[1]);
    if begin > end {
        return Err(malformed(&format!(
            "data_offsets [{begin}, {end}) are reversed"
        )));
    }
    let need = byte_len(&shape, elem);
    if need != Some(end - begin) {
        return Err(malformed(&format!(
            "shape {shape:?} of {dtype} needs {} bytes but data_offsets [{begin}, {end}) hold {}",
            need.map_or("too many".to_string(), |n| n.to_string()),
            end - begin
        )));
    }
    let abs_end = base.checked_add(end);
    if abs_end.is_none_or(|e| e > file_len) {
        return Err(CheckpointError::new(
            ErrorKind::Truncated,
            format!(
                "truncated: data needs file bytes [{}, {}) but the file ends at {file_len}",
                base as u128 + begin as u128,
                base as u128 + end as u128
            ),
        ));
    }
    Ok((dtype, shape, base + begin, end - begin))
}
