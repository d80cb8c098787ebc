//! Q8_0: blocks of 32 signed bytes with one f16 scale; value = d * q.

use super::QK;
use bytemuck::{Pod, Zeroable};
use half::f16;

#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
#[repr(C)]
pub struct BlockQ8_0 {
    /// f16 bits of the scale.
    pub d: u16,
    pub qs: [i8; QK],
}

impl BlockQ8_0 {
    pub fn scale(&self) -> f32 {
        f16::from_bits(self.d).to_f32()
    }
}

/// ggml's `quantize_row_q8_0_ref`: d = amax / 127, q = roundf(x / d), with
/// the reciprocal taken in f32 before multiplying, exactly as the reference does.
pub fn quantize_block(x: &[f32]) -> BlockQ8_0 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    for (q, &v) in qs.iter_mut().zip(x) {
        // `f32::round` rounds half away from zero, like C's roundf.
        *q = (v * id).round() as i8;
    }
    BlockQ8_0 {
        d: f16::from_f32(d).to_bits(),
        qs,
    }
}

pub fn quantize_row(src: &[f32], dst: &mut [BlockQ8_0]) {
    for (b, x) in dst.iter_mut().zip(src.chunks_exact(QK)) {
        *b = quantize_block(x);
    }
}

pub fn dequantize_row(src: &[BlockQ8_0], dst: &mut [f32]) {
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = b.scale();
        for (o, &q) in y.iter_mut().zip(&b.qs) {
            *o = d * q as f32;
        }
    }
}
