//! Q4_0: blocks of 32 four-bit values with one f16 scale; value = d * (q - 8).
//!
//! Byte `j` of `qs` holds element `j` in its low nibble and element `j + 16`
//! in its high nibble (ggml's layout, not pairwise interleaving).

use super::k_search::{importance_weights, make_qx, nearest_int};
use super::QK;
use bytemuck::{Pod, Zeroable};
use half::f16;

#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
#[repr(C)]
pub struct BlockQ4_0 {
    /// f16 bits of the scale.
    pub d: u16,
    pub qs: [u8; QK / 2],
}

impl BlockQ4_0 {
    pub fn scale(&self) -> f32 {
        f16::from_bits(self.d).to_f32()
    }
}

/// ggml's `quantize_row_q4_0_ref`: the value of largest magnitude (first one
/// on ties) maps to -8, so d = max / -8 keeps its sign; q = trunc(x/d + 8.5)
/// clamped to 15, all in f32.
pub fn quantize_block(x: &[f32]) -> BlockQ4_0 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = |v: f32| ((v * id + 8.5) as i32).min(15) as u8;
    let mut qs = [0u8; QK / 2];
    for (j, b) in qs.iter_mut().enumerate() {
        *b = q(x[j]) | (q(x[j + QK / 2]) << 4);
    }
    BlockQ4_0 {
        d: f16::from_f32(d).to_bits(),
        qs,
    }
}

/// Importance-weighted Q4_0 (calibration): the scale that minimises the
/// error weighted by [`importance_weights`], searched as the k-quants
/// search theirs ([`make_qx`] with levels −8..=7), then every level
/// rounded against the stored f16 scale. The block layout is unchanged.
pub fn quantize_block_weighted(x: &[f32], importance: &[f32]) -> BlockQ4_0 {
    let mut w = [0.0f32; QK];
    importance_weights(x, importance, &mut w);
    let mut l = [0i8; QK];
    let d = f16::from_f32(make_qx(x, 8, &mut l, Some(&w)));
    let df = d.to_f32();
    if df != 0.0 {
        for (q, &v) in l.iter_mut().zip(x) {
            *q = (nearest_int(v / df).clamp(-8, 7) + 8) as i8;
        }
    }
    let mut qs = [0u8; QK / 2];
    for (j, b) in qs.iter_mut().enumerate() {
        *b = l[j] as u8 | ((l[j + QK / 2] as u8) << 4);
    }
    BlockQ4_0 { d: d.to_bits(), qs }
}

pub fn quantize_row(src: &[f32], importance: Option<&[f32]>, dst: &mut [BlockQ4_0]) {
    super::k_search::quantize_blocks(src, importance, dst, QK, |x, imp| match imp {
        Some(imp) => quantize_block_weighted(x, imp),
        None => quantize_block(x),
    })
}

pub fn dequantize_row(src: &[BlockQ4_0], dst: &mut [f32]) {
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = b.scale();
        for j in 0..QK / 2 {
            y[j] = d * ((b.qs[j] & 0x0F) as i32 - 8) as f32;
            y[j + QK / 2] = d * ((b.qs[j] >> 4) as i32 - 8) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extreme_value_maps_to_minus_eight_and_round_trips() {
        let mut x = [0.0f32; QK];
        x[3] = -4.0;
        x[20] = 2.0;
        let b = quantize_block(&x);
        let mut y = [0.0f32; QK];
        dequantize_row(&[b], &mut y);
        assert_eq!(y[3], -4.0);
        assert_eq!(y[20], 2.0);
        assert_eq!(y[0], 0.0);
    }

    #[test]
    fn zero_block_is_all_eights() {
        let b = quantize_block(&[0.0; QK]);
        // 0 / -8 is -0.0, as in the reference.
        assert_eq!(b.scale(), 0.0);
        assert!(b.qs.iter().all(|&q| q == 0x88));
    }
}
