//! Compute kernels behind one dispatch point.
//!
//! [`Kernels`] is the set of hot operations; each instruction set implements
//! it in its own module. [`scalar`] is written for clarity: it is the oracle
//! every SIMD version is property-tested against, and the fallback on any
//! CPU. [`select`] picks the best implementation the CPU supports once at
//! start-up; `CRYSTALD_KERNELS=scalar` (or the `--kernels` flag) forces one.
//!
//! Quantized matrices are multiplied with int8 arithmetic: activations are
//! quantized on the fly to Q8_0 (blocks of 32, as ggml does) and each block
//! product is an integer dot scaled by the two block scales.

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "aarch64")]
pub mod neon;
pub mod scalar;

use crate::quant::{BlockQ4_0, BlockQ8_0, GgmlType, QK};
use half::f16;
use std::ops::Range;

/// A weight matrix in file layout: `rows` rows of `cols` values, each row
/// contiguous along the reduction dimension.
#[derive(Clone, Copy, Debug)]
pub struct Weight<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> Weight<'a> {
    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols).expect("validated at load")
    }

    pub fn row(&self, r: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// Rows `rows` as Q4_0 blocks (the caller checked the type).
    pub fn q4_0_rows(&self, rows: Range<usize>) -> &'a [BlockQ4_0] {
        let n = self.row_bytes();
        bytemuck::cast_slice(&self.data[rows.start * n..rows.end * n])
    }

    pub fn q8_0_rows(&self, rows: Range<usize>) -> &'a [BlockQ8_0] {
        let n = self.row_bytes();
        bytemuck::cast_slice(&self.data[rows.start * n..rows.end * n])
    }

    pub fn f16_rows(&self, rows: Range<usize>) -> &'a [f16] {
        let n = self.row_bytes();
        bytemuck::cast_slice(&self.data[rows.start * n..rows.end * n])
    }

    pub fn f32_rows(&self, rows: Range<usize>) -> &'a [f32] {
        let n = self.row_bytes();
        bytemuck::cast_slice(&self.data[rows.start * n..rows.end * n])
    }

    /// The activation format this weight type is multiplied with.
    pub fn act_type(&self) -> ActType {
        match self.ty {
            GgmlType::F32 | GgmlType::F16 => ActType::F32,
            GgmlType::Q4_0 | GgmlType::Q8_0 => ActType::Q8_0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActType {
    F32,
    Q8_0,
}

/// `n_tokens` activation rows of `cols` values, in the format the weight
/// type needs.
#[derive(Clone, Copy, Debug)]
pub enum Acts<'a> {
    F32(&'a [f32]),
    Q8_0(&'a [BlockQ8_0]),
}

impl Acts<'_> {
    pub fn n_tokens(&self, cols: usize) -> usize {
        match self {
            Acts::F32(x) => x.len() / cols,
            Acts::Q8_0(x) => x.len() / (cols / QK),
        }
    }
}

/// The hot operations, one implementation per instruction set.
pub trait Kernels: Send + Sync {
    fn name(&self) -> &'static str;

    /// For each weight row `r` in `rows` and each token `t`:
    /// `out[(r - rows.start) * n_tokens + t] = W[r] · x[t]`.
    ///
    /// Output is grouped by weight row so that threads given disjoint row
    /// ranges write disjoint slices.
    fn matmul_rows(&self, w: &Weight<'_>, x: &Acts<'_>, rows: Range<usize>, out: &mut [f32]);

    /// Quantizes `x` into Q8_0 blocks (`x.len() / 32` of them), with ggml's
    /// reference rounding.
    fn quantize_q8_0(&self, x: &[f32], y: &mut [BlockQ8_0]);

    fn dot_f32(&self, a: &[f32], b: &[f32]) -> f32;
    fn dot_f16(&self, a: &[f32], b: &[f16]) -> f32;
    /// `y += a * x`
    fn axpy_f32(&self, a: f32, x: &[f32], y: &mut [f32]);
    fn axpy_f16(&self, a: f32, x: &[f16], y: &mut [f32]);
}

/// The implementations this CPU can run, best first.
pub fn available() -> Vec<&'static dyn Kernels> {
    let mut v: Vec<&'static dyn Kernels> = Vec::new();
    v.push(&scalar::Scalar);
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = avx2::Avx2::detect() {
        v.push(k);
    }
    // Baseline before DotProd, so that after the reversal an A76/A78 gets
    // "neon-dotprod" first and a Cortex-A72 (Pi 4) gets "neon".
    #[cfg(target_arch = "aarch64")]
    {
        if let Some(k) = neon::Neon::detect() {
            v.push(k);
        }
        if let Some(k) = neon::Neon::detect_dotprod() {
            v.push(k);
        }
    }
    v.reverse();
    v
}

/// Picks the kernels: `name` ("scalar", "avx2", "neon", "neon-dotprod", or "auto"/None for
/// the best available). An unknown or unsupported name is an error, never a
/// silent fallback, so a forced run really tests what it names.
pub fn select(name: Option<&str>) -> Result<&'static dyn Kernels, String> {
    let avail = available();
    match name.unwrap_or("auto") {
        "auto" | "" => Ok(avail[0]),
        want => avail
            .iter()
            .copied()
            .find(|k| k.name() == want)
            .ok_or_else(|| {
                let names: Vec<_> = avail.iter().map(|k| k.name()).collect();
                format!(
                    "kernels '{want}' are not available on this CPU (available: {})",
                    names.join(", ")
                )
            }),
    }
}

/// [`select`] with the choice taken from `CRYSTALD_KERNELS`.
pub fn from_env() -> Result<&'static dyn Kernels, String> {
    select(std::env::var("CRYSTALD_KERNELS").ok().as_deref())
}
