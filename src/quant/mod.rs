//! Tensor storage types, bit-compatible with ggml's reference layouts.
//!
//! Every type here is a standard ggml type id, so a file written by this
//! project opens in the reference `gguf` Python package and in `gguf-dump`.
//! Quantized types store fixed-size blocks of [`QK`] values along a row (the
//! reduction dimension of a matrix), so a row of `n` values takes
//! `n / QK * type_size` bytes and `n` must be a multiple of [`QK`].

pub mod f16;
pub mod q4_0;
pub mod q8_0;

pub use q4_0::BlockQ4_0;
pub use q8_0::BlockQ8_0;

/// Values per block for Q4_0 and Q8_0 (ggml's `QK4_0` and `QK8_0`).
pub const QK: usize = 32;

/// A ggml tensor type. The discriminants are ggml's type ids, written as-is
/// into GGUF tensor tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q8_0 = 8,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            8 => Self::Q8_0,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        self as u32
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q4_0 => "q4_0",
            Self::Q8_0 => "q8_0",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Self::F32, Self::F16, Self::Q4_0, Self::Q8_0]
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Values per storage unit (1 for plain floats).
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 => 1,
            Self::Q4_0 | Self::Q8_0 => QK,
        }
    }

    /// Bytes per storage unit.
    pub fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
            Self::Q4_0 => std::mem::size_of::<BlockQ4_0>(),
            Self::Q8_0 => std::mem::size_of::<BlockQ8_0>(),
        }
    }

    /// Bytes of one row of `n` values, or `None` when `n` does not fill whole blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_size()) {
            return None;
        }
        (n / self.block_size()).checked_mul(self.type_size())
    }

    pub fn bits_per_weight(self) -> f64 {
        (self.type_size() * 8) as f64 / self.block_size() as f64
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Encodes one row of `src` as `ty` into `dst` (exactly `ty.row_bytes(src.len())` bytes).
///
/// Panics if the sizes disagree: callers size buffers from the same shape.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    assert_eq!(Some(dst.len()), ty.row_bytes(src.len()), "row buffer size");
    match ty {
        GgmlType::F32 => dst.copy_from_slice(bytemuck::cast_slice(src)),
        GgmlType::F16 => f16::encode_row(src, dst),
        GgmlType::Q4_0 => q4_0::quantize_row(src, bytemuck::cast_slice_mut(dst)),
        GgmlType::Q8_0 => q8_0::quantize_row(src, bytemuck::cast_slice_mut(dst)),
    }
}

/// Decodes one row stored as `ty` in `src` into `dst`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    assert_eq!(Some(src.len()), ty.row_bytes(dst.len()), "row buffer size");
    match ty {
        GgmlType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes(s.try_into().unwrap());
            }
        }
        GgmlType::F16 => f16::decode_row(src, dst),
        GgmlType::Q4_0 => q4_0::dequantize_row(bytemuck::cast_slice(src), dst),
        GgmlType::Q8_0 => q8_0::dequantize_row(bytemuck::cast_slice(src), dst),
    }
}
