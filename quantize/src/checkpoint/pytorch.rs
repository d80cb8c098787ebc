//! PyTorch `.bin` files as written by `torch.save` since 1.6: a zip archive with
//! `<prefix>/data.pkl` (the state dict, tensors referring to storages by persistent id),
//! `<prefix>/data/<key>` (raw storage bytes, entries stored uncompressed),
//! `<prefix>/byteorder` and `<prefix>/version`.

use std::collections::HashMap;
use std::path::Path;

use super::pickle;
use super::zipfile::{self, ZipEntry};
use super::{byte_len, CheckpointError, ErrorKind, RawTensor, Result};

pub(crate) fn parse(data: &[u8], path: &Path) -> Result<Vec<RawTensor>> {
    let entries = zipfile::entries(data).map_err(|e| e.in_file(path))?;
    let err = |kind, msg: String| CheckpointError::new(kind, msg).in_file(path);

    let mut pkl: Vec<&ZipEntry> = entries
        .iter()
        .filter(|e| e.name == "data.pkl" || e.name.ends_with("/data.pkl"))
        .collect();
    let pkl = match pkl.len() {
        1 => pkl.remove(0),
        0 => {
            return Err(err(
                ErrorKind::Malformed,
                "zip archive has no data.pkl, so it is not a torch.save checkpoint".into(),
            ))
        }
        n => {
            return Err(err(
                ErrorKind::Malformed,
                format!("zip archive has {n} data.pkl entries; expected one"),
            ))
        }
    };
    let prefix = &pkl.name[..pkl.name.len() - "data.pkl".len()];
    let by_name: HashMap<&str, &ZipEntry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let body = |e: &ZipEntry| &data[e.data_start as usize..(e.data_start + e.size) as usize];

    if let Some(bo) = by_name.get(format!("{prefix}byteorder").as_str()) {
        let order = body(bo);
        if order != b"little" {
            return Err(err(
                ErrorKind::Unsupported,
                format!(
                    "byte order is '{}'; only little-endian checkpoints are supported",
                    String::from_utf8_lossy(order).trim()
                ),
            ));
        }
    }

    let root = pickle::load(body(pkl)).map_err(|e| {
        err(
            ErrorKind::Malformed,
            format!(
                "corrupt pickle {}: at byte {}: {}",
                pkl.name, e.offset, e.message
            ),
        )
    })?;
    let tensors = pickle::state_dict(&root)
        .map_err(|m| err(ErrorKind::Malformed, format!("{}: {m}", pkl.name)))?;

    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let raw = locate(&t, prefix, &by_name, &name).map_err(|e| e.in_file(path))?;
        out.push(raw);
    }
    Ok(out)
}

/// Resolves a pickled tensor to the byte range of its elements in the file.
fn locate(
    t: &pickle::Tensor,
    prefix: &str,
    by_name: &HashMap<&str, &ZipEntry>,
    name: &str,
) -> Result<RawTensor> {
    let err = |kind, msg: String| CheckpointError::new(kind, msg).for_tensor(name);
    let st = &t.storage;
    let entry_name = format!("data/{}", st.key);
    let Some(entry) = by_name.get(format!("{prefix}{entry_name}").as_str()) else {
        return Err(err(
            ErrorKind::Missing,
            format!("tensor storage '{entry_name}' is not in the archive"),
        ));
    };
    let storage_bytes = st.numel.checked_mul(st.elem_size);
    if storage_bytes.is_none_or(|b| b > entry.size) {
        return Err(err(
            ErrorKind::Truncated,
            format!(
                "truncated: tensor storage '{entry_name}' declares {} elements of {} bytes but its zip entry holds only {} bytes",
                st.numel, st.elem_size, entry.size
            ),
        ));
    }
    if t.size.len() != t.stride.len() {
        return Err(err(
            ErrorKind::Malformed,
            format!(
                "size {:?} and stride {:?} have different ranks",
                t.size, t.stride
            ),
        ));
    }
    let shape: Vec<u64> = t
        .size
        .iter()
        .map(|&d| u64::try_from(d))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| err(ErrorKind::Malformed, format!("negative size {:?}", t.size)))?;
    let offset = u64::try_from(t.offset).map_err(|_| {
        err(
            ErrorKind::Malformed,
            format!("negative storage_offset {}", t.offset),
        )
    })?;
    let Some(len) = byte_len(&shape, st.elem_size) else {
        return Err(err(
            ErrorKind::Malformed,
            format!("size {:?} overflows", t.size),
        ));
    };
    let numel = len / st.elem_size;
    if numel > 0 {
        // Same rule as torch's is_contiguous: dimensions of extent 1 may carry any stride.
        let mut expect: i64 = 1;
        for (i, (&d, &s)) in t.size.iter().zip(&t.stride).enumerate().rev() {
            if d != 1 && s != expect {
                return Err(err(
                    ErrorKind::Unsupported,
                    format!(
                        "non-contiguous layout: size {:?} with stride {:?} (dimension {i} has stride {s}, contiguous would be {expect}); re-save the checkpoint with contiguous tensors",
                        t.size, t.stride
                    ),
                ));
            }
            expect = expect.saturating_mul(d);
        }
    }
    if offset.checked_add(numel).is_none_or(|end| end > st.numel) {
        return Err(err(
            ErrorKind::Truncated,
            format!(
                "truncated: elements [{offset}, {}) lie outside tensor storage '{entry_name}' of {} elements",
                offset as u128 + numel as u128,
                st.numel
            ),
        ));
    }
    // In range: offset + numel <= storage numel, whose byte size fits inside the entry.
    let start = entry.data_start + offset * st.elem_size;
    Ok(RawTensor {
        name: name.to_string(),
        dtype: st.dtype.clone(),
        shape,
        start,
        len,
    })
}
