//! Q8_K: the activation format the k-quant kernels multiply with, never
//! stored in files: 256 signed bytes with one f32 scale, plus the sums of
//! each 16 bytes, which turn a k-quant's minimums (Q4_K, Q5_K) and Q6_K's
//! −32 offset into one small product per sub-block instead of a
//! subtraction per value. One scale per 256 values lets a kernel add
//! sub-block products in integers; the layout is ggml's `block_q8_K`.

use super::k_search::QK_K;
use bytemuck::{Pod, Zeroable};

#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq)]
#[repr(C)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

/// d = amax / 127, q = round(x / d) (half away from zero), with the
/// reciprocal taken first, as our Q8_0 does.
pub fn quantize_block(x: &[f32]) -> BlockQ8K {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut b = BlockQ8K::zeroed();
    if amax == 0.0 {
        return b;
    }
    let d = amax / 127.0;
    let id = 1.0 / d;
    for (q, &v) in b.qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
    }
    for (s, q) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
        *s = q.iter().map(|&v| v as i16).sum();
    }
    b.d = d;
    b
}

pub fn quantize_row(src: &[f32], dst: &mut [BlockQ8K]) {
    super::k_search::quantize_blocks(src, None, dst, QK_K, |x, _| quantize_block(x))
}
