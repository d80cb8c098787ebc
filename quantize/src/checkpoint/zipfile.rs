//! Just enough of the zip format to find entries in a `torch.save` archive inside a memory
//! map: end-of-central-directory (plain and zip64), the central directory, and each entry's
//! local header (whose variable-length extra field torch uses to 64-byte-align data).
//!
//! Written here instead of going through the `zip` crate's reader so that entry data is a
//! plain byte range of the map (zero copy), and every structural defect becomes an error with
//! an offset rather than a generic message. All arithmetic is checked: the input is untrusted.

use super::{CheckpointError, ErrorKind, Result};

const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;

pub(crate) struct ZipEntry {
    pub name: String,
    /// Absolute offset of the entry's data in the file.
    pub data_start: u64,
    pub size: u64,
}

fn malformed(msg: String) -> CheckpointError {
    CheckpointError::new(ErrorKind::Malformed, format!("corrupt zip archive: {msg}"))
}

fn u16_at(d: &[u8], at: u64) -> Option<u16> {
    let at = usize::try_from(at).ok()?;
    Some(u16::from_le_bytes(
        d.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(d: &[u8], at: u64) -> Option<u32> {
    let at = usize::try_from(at).ok()?;
    Some(u32::from_le_bytes(
        d.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(d: &[u8], at: u64) -> Option<u64> {
    let at = usize::try_from(at).ok()?;
    Some(u64::from_le_bytes(
        d.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn bytes_at(d: &[u8], at: u64, len: u64) -> Option<&[u8]> {
    let at = usize::try_from(at).ok()?;
    let len = usize::try_from(len).ok()?;
    d.get(at..at.checked_add(len)?)
}

/// Lists the entries of the zip archive `d` in central-directory order.
pub(crate) fn entries(d: &[u8]) -> Result<Vec<ZipEntry>> {
    let file_len = d.len() as u64;
    if d.len() < 4 || u32_at(d, 0) != Some(LOCAL_SIG) {
        return Err(CheckpointError::new(
            ErrorKind::Malformed,
            "not a zip archive (the legacy pre-1.6 torch.save format is not supported)",
        ));
    }
    let eocd = find_eocd(d).ok_or_else(|| {
        CheckpointError::new(
            ErrorKind::Truncated,
            format!(
                "truncated or corrupt zip archive: no end-of-central-directory record in the last bytes of the file ({file_len} bytes)"
            ),
        )
    })?;
    let short = |what: &str| malformed(format!("{what} at offset {eocd} is cut short"));
    let disk = u16_at(d, eocd + 4).ok_or_else(|| short("end record"))?;
    let cd_disk = u16_at(d, eocd + 6).ok_or_else(|| short("end record"))?;
    let mut count = u16_at(d, eocd + 10).ok_or_else(|| short("end record"))? as u64;
    let mut cd_size = u32_at(d, eocd + 12).ok_or_else(|| short("end record"))? as u64;
    let mut cd_offset = u32_at(d, eocd + 16).ok_or_else(|| short("end record"))? as u64;
    if disk != 0 || cd_disk != 0 {
        return Err(CheckpointError::new(
            ErrorKind::Unsupported,
            "multi-volume zip archives are not supported",
        ));
    }
    // Where the central directory must end: at the zip64 record if there is one, else here.
    let mut cd_limit = eocd;
    if eocd >= 20 && u32_at(d, eocd - 20) == Some(ZIP64_LOCATOR_SIG) {
        let loc = eocd - 20;
        let z64 = u64_at(d, loc + 8).ok_or_else(|| short("zip64 locator"))?;
        if z64 >= loc || u32_at(d, z64) != Some(ZIP64_EOCD_SIG) {
            return Err(malformed(format!(
                "zip64 locator at offset {loc} points to {z64}, where there is no zip64 end record"
            )));
        }
        let rec = bytes_at(d, z64, 56).ok_or_else(|| short("zip64 end record"))?;
        let get = |o: usize| u64::from_le_bytes(rec[o..o + 8].try_into().expect("8 bytes"));
        count = get(32);
        cd_size = get(40);
        cd_offset = get(48);
        cd_limit = z64;
    }
    let cd_end = cd_offset.checked_add(cd_size);
    if cd_end.is_none_or(|e| e > cd_limit) {
        return Err(malformed(format!(
            "central directory [{cd_offset}, {}) overlaps the end record at {cd_limit}",
            cd_offset as u128 + cd_size as u128
        )));
    }
    // Each central record is at least 46 bytes; this bounds `count` by the file size.
    if count > cd_size / 46 {
        return Err(malformed(format!(
            "{count} entries cannot fit in a {cd_size}-byte central directory"
        )));
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut at = cd_offset;
    for i in 0..count {
        let e = central_entry(d, at, cd_offset, cd_limit)
            .map_err(|m| malformed(format!("central directory record {i} at offset {at}: {m}")))?;
        at = e.1;
        out.push(e.0);
    }
    Ok(out)
}

fn find_eocd(d: &[u8]) -> Option<u64> {
    let len = d.len();
    if len < 22 {
        return None;
    }
    let lowest = len.saturating_sub(22 + u16::MAX as usize);
    // Scan backwards; accept a signature only if its comment runs exactly to the end of the
    // file, so a stray signature inside data (or a truncated file) is not mistaken for one.
    (lowest..=len - 22).rev().find_map(|p| {
        let p64 = p as u64;
        (u32_at(d, p64) == Some(EOCD_SIG)
            && u16_at(d, p64 + 20).map(|c| p + 22 + c as usize) == Some(len))
        .then_some(p64)
    })
}

/// Parses the central record at `at`; returns the entry and the offset of the next record.
fn central_entry(
    d: &[u8],
    at: u64,
    cd_offset: u64,
    cd_limit: u64,
) -> std::result::Result<(ZipEntry, u64), String> {
    let rec = bytes_at(d, at, 46)
        .filter(|_| at + 46 <= cd_limit)
        .ok_or("cut short")?;
    let u16f = |o: usize| u16::from_le_bytes([rec[o], rec[o + 1]]);
    let u32f = |o: usize| u32::from_le_bytes(rec[o..o + 4].try_into().expect("4 bytes"));
    if u32f(0) != CENTRAL_SIG {
        return Err("bad signature".into());
    }
    let flags = u16f(8);
    let method = u16f(10);
    let mut csize = u32f(20) as u64;
    let mut usize_ = u32f(24) as u64;
    let name_len = u16f(28) as u64;
    let extra_len = u16f(30) as u64;
    let comment_len = u16f(32) as u64;
    let mut local = u32f(42) as u64;
    let next = at + 46 + name_len + extra_len + comment_len;
    if next > cd_limit {
        return Err("runs past the end of the central directory".into());
    }
    let name_bytes = bytes_at(d, at + 46, name_len).ok_or("name cut short")?;
    let name = std::str::from_utf8(name_bytes)
        .map_err(|_| "entry name is not UTF-8".to_string())?
        .to_string();
    let extra = bytes_at(d, at + 46 + name_len, extra_len).ok_or("extra field cut short")?;
    // The zip64 extra field holds, in this order, only the values whose 32-bit fields are
    // saturated.
    let mut z64 = zip64_extra(extra);
    for field in [&mut usize_, &mut csize, &mut local] {
        if *field == 0xFFFF_FFFF {
            let z = z64.as_mut().ok_or(format!(
                "'{name}' has a saturated size/offset but no zip64 extra field"
            ))?;
            *field = z
                .next()
                .ok_or(format!("'{name}': zip64 extra field is too short"))?;
        }
    }
    if flags & 1 != 0 {
        return Err(format!("'{name}' is encrypted"));
    }
    if method != 0 {
        return Err(format!(
            "'{name}' is compressed (method {method}); torch.save writes entries uncompressed (stored), so this file was re-packed and cannot be memory-mapped"
        ));
    }
    if csize != usize_ {
        return Err(format!(
            "'{name}' is stored but its compressed size {csize} differs from its size {usize_}"
        ));
    }
    // The local header repeats the name and has its own extra field (torch pads data to 64
    // bytes there), so the data offset comes from it, not from the central record.
    let lh = bytes_at(d, local, 30)
        .filter(|_| local + 30 <= cd_offset)
        .ok_or(format!(
            "local header of '{name}' at offset {local} lies outside the entry area"
        ))?;
    if u32::from_le_bytes(lh[0..4].try_into().expect("4 bytes")) != LOCAL_SIG {
        return Err(format!(
            "no local header signature for '{name}' at offset {local}"
        ));
    }
    let l_name = u16::from_le_bytes([lh[26], lh[27]]) as u64;
    let l_extra = u16::from_le_bytes([lh[28], lh[29]]) as u64;
    if bytes_at(d, local + 30, l_name) != Some(name_bytes) {
        return Err(format!(
            "local header at offset {local} does not repeat the name '{name}'"
        ));
    }
    let data_start = local + 30 + l_name + l_extra;
    if data_start.checked_add(csize).is_none_or(|e| e > cd_offset) {
        return Err(format!(
            "truncated: data of '{name}' needs bytes [{data_start}, {}) but entry data must end by the central directory at {cd_offset}",
            data_start as u128 + csize as u128
        ));
    }
    Ok((
        ZipEntry {
            name,
            data_start,
            size: csize,
        },
        next,
    ))
}

/// Iterator over the u64 values of the zip64 extended-information field (id 1), if present.
fn zip64_extra(mut extra: &[u8]) -> Option<impl Iterator<Item = u64> + '_> {
    while extra.len() >= 4 {
        let id = u16::from_le_bytes([extra[0], extra[1]]);
        let len = u16::from_le_bytes([extra[2], extra[3]]) as usize;
        let body = extra.get(4..4 + len)?;
        if id == 1 {
            return Some(
                body.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
            );
        }
        extra = &extra[4 + len..];
    }
    None
}
