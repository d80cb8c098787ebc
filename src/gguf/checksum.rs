//! The file's integrity checksum: XXH3-64 of every byte of the file, with
//! the 8 bytes of the checksum's own value read as zeros, stored as the
//! `u64` metadata value [`KEY`]. The writer reserves the value in the header
//! and patches it once the data is written; a reader hashes the map.
//!
//! XXH3 is not cryptographic: it catches the random corruption of a flaky
//! SD card or an interrupted copy, not a deliberate forgery.

use super::reader::Gguf;
use crate::quant;
use xxhash_rust::xxh3::Xxh3;

pub const KEY: &str = "crystald.checksum.xxh3_64";

/// The checksum of `bytes`, with `[value_at, value_at + 8)` taken as zeros.
pub fn of_file(bytes: &[u8], value_at: usize) -> u64 {
    let mut h = Xxh3::new();
    h.update(&bytes[..value_at]);
    h.update(&[0; 8]);
    h.update(&bytes[value_at + 8..]);
    h.digest()
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Match(u64),
    Mismatch {
        stored: u64,
        actual: u64,
    },
    /// A file written before checksums were recorded.
    Absent,
}

impl Verdict {
    /// The message for a mismatch, naming both values.
    pub fn describe(&self) -> String {
        match self {
            Verdict::Match(v) => format!("checksum ok (xxh3 {v:016x})"),
            Verdict::Mismatch { stored, actual } => format!(
                "checksum mismatch: the file records xxh3 {stored:016x} but its contents hash to \
                 {actual:016x}; the file is corrupt (bad storage or an incomplete copy): copy it \
                 again or re-run crystal-quantize"
            ),
            Verdict::Absent => "no checksum recorded (the file was made before crystal-quantize \
                                recorded one); its integrity cannot be checked"
                .into(),
        }
    }
}

/// Reads the whole map and compares it with the recorded checksum.
pub fn verify(file: &Gguf) -> Verdict {
    let Some((at, stored)) = file.header.checksum else {
        return Verdict::Absent;
    };
    let actual = of_file(file.map(), at as usize);
    if actual == stored {
        Verdict::Match(actual)
    } else {
        Verdict::Mismatch { stored, actual }
    }
}

/// Every tensor's block scales (and f32/f16 values) are finite: what a
/// checksum cannot vouch for when the file was written wrong in the first
/// place. Reads the whole file, like [`verify`].
pub fn check_scales(file: &Gguf) -> Result<(), String> {
    for t in &file.header.tensors {
        if let Some(i) = quant::first_non_finite_scale(t.ty, file.data(t)) {
            let what = if t.ty.block_size() == 1 {
                "value"
            } else {
                "block"
            };
            return Err(format!(
                "tensor '{}' ({}): {what} {i} has a NaN or infinite scale; the file is damaged \
                 or was written by a broken tool",
                t.name, t.ty
            ));
        }
    }
    Ok(())
}
