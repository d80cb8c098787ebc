//! Tensor storage types, bit-compatible with ggml's reference layouts.
//!
//! Every type here is a standard ggml type id, so a file written by this
//! project opens in the reference `gguf` Python package and in `gguf-dump`.
//! Quantized types store fixed-size blocks along a row (the reduction
//! dimension of a matrix): [`QK`] values for Q4_0 and Q8_0, [`QK_K`] for the
//! k-quants, so a row of `n` values takes `n / block_size * type_size`
//! bytes and `n` must be a multiple of the block size.

pub mod f16;
pub mod k_search;
pub mod q4_0;
pub mod q4_k;
pub mod q5_k;
pub mod q6_k;
pub mod q8_0;
pub mod q8_k;

pub use k_search::QK_K;
pub use q4_0::BlockQ4_0;
pub use q4_k::BlockQ4K;
pub use q5_k::BlockQ5K;
pub use q6_k::BlockQ6K;
pub use q8_0::BlockQ8_0;
pub use q8_k::BlockQ8K;

/// Values per block for Q4_0 and Q8_0 (ggml's `QK4_0` and `QK8_0`).
pub const QK: usize = 32;

/// A ggml tensor type. The discriminants are ggml's type ids, written as-is
/// into GGUF tensor tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
#[allow(non_camel_case_types)] // ggml's names, as users see them in tools
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q8_0 = 8,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            8 => Self::Q8_0,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            _ => return None,
        })
    }

    pub const ALL: [GgmlType; 7] = [
        Self::F32,
        Self::F16,
        Self::Q4_0,
        Self::Q8_0,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
    ];

    /// A k-quant: super-blocks of [`QK_K`] values.
    pub fn is_k_quant(self) -> bool {
        matches!(self, Self::Q4_K | Self::Q5_K | Self::Q6_K)
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
            Self::Q4_K => "q4_K",
            Self::Q5_K => "q5_K",
            Self::Q6_K => "q6_K",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Values per storage unit (1 for plain floats).
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 => 1,
            Self::Q4_0 | Self::Q8_0 => QK,
            Self::Q4_K | Self::Q5_K | Self::Q6_K => QK_K,
        }
    }

    /// Bytes per storage unit.
    pub fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
            Self::Q4_0 => std::mem::size_of::<BlockQ4_0>(),
            Self::Q8_0 => std::mem::size_of::<BlockQ8_0>(),
            Self::Q4_K => std::mem::size_of::<BlockQ4K>(),
            Self::Q5_K => std::mem::size_of::<BlockQ5K>(),
            Self::Q6_K => std::mem::size_of::<BlockQ6K>(),
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
/// `importance` (one positive value per column, from calibration) makes
/// Q4_0 and the k-quants round to minimise the importance-weighted error
/// instead of the reference's; the other types ignore it. Without it every
/// type is ggml's reference quantizer.
///
/// Panics if the sizes disagree: callers size buffers from the same shape.
pub fn quantize_row(ty: GgmlType, src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    assert_eq!(Some(dst.len()), ty.row_bytes(src.len()), "row buffer size");
    if let Some(imp) = importance {
        assert_eq!(imp.len(), src.len(), "importance length");
    }
    match ty {
        GgmlType::F32 => dst.copy_from_slice(bytemuck::cast_slice(src)),
        GgmlType::F16 => f16::encode_row(src, dst),
        GgmlType::Q4_0 => q4_0::quantize_row(src, importance, bytemuck::cast_slice_mut(dst)),
        GgmlType::Q8_0 => q8_0::quantize_row(src, bytemuck::cast_slice_mut(dst)),
        GgmlType::Q4_K => q4_k::quantize_row(src, importance, bytemuck::cast_slice_mut(dst)),
        GgmlType::Q5_K => q5_k::quantize_row(src, importance, bytemuck::cast_slice_mut(dst)),
        GgmlType::Q6_K => q6_k::quantize_row(src, bytemuck::cast_slice_mut(dst)),
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
        GgmlType::Q4_K => {
            k_search::dequantize_scale_min::<BlockQ4K>(bytemuck::cast_slice(src), dst)
        }
        GgmlType::Q5_K => {
            k_search::dequantize_scale_min::<BlockQ5K>(bytemuck::cast_slice(src), dst)
        }
        GgmlType::Q6_K => q6_k::dequantize_row(bytemuck::cast_slice(src), dst),
    }
}

/// The first block (or for f32/f16, value) of `data`, whole blocks of `ty`,
/// whose scale is NaN or infinite. A quantizer never writes one; a damaged
/// or foreign file can, and every product with that row would then be NaN.
pub fn first_non_finite_scale(ty: GgmlType, data: &[u8]) -> Option<usize> {
    let half = |lo: u8, hi: u8| half::f16::from_le_bytes([lo, hi]).is_finite();
    let size = ty.type_size();
    data.chunks_exact(size).position(|b| match ty {
        GgmlType::F32 => !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite(),
        // The scale leads the block; Q4_K/Q5_K follow it with `dmin`.
        GgmlType::F16 | GgmlType::Q4_0 | GgmlType::Q8_0 => !half(b[0], b[1]),
        GgmlType::Q4_K | GgmlType::Q5_K => !half(b[0], b[1]) || !half(b[2], b[3]),
        // Q6_K keeps its scale last.
        GgmlType::Q6_K => !half(b[size - 2], b[size - 1]),
    })
}
