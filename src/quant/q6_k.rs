//! Q6_K: super-blocks of 256 six-bit values in 16 sub-blocks of 16, each
//! with a signed 8-bit scale relative to one f16 `d`: value = d·sc_j·(q − 32).
//!
//! Values go 128 at a time: `ql` holds their low nibbles (byte `l` of the
//! first 32: values `l` and `l + 64`; of the next 32: `l + 32` and
//! `l + 96`), `qh` their top two bits (byte `l`: values `l`, `l + 32`,
//! `l + 64`, `l + 96` from the low bits up). ggml's `block_q6_K`, 210
//! bytes, 6.5625 bits per weight.

use super::k_search::{make_qx, nearest_int, GROUP_MAX_EPS, QK_K};
use bytemuck::{Pod, Zeroable};
use half::f16;

#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: u16,
}

impl BlockQ6K {
    pub fn d(&self) -> f32 {
        f16::from_bits(self.d).to_f32()
    }
    /// Value `i` (0..256) as its level minus 32 (−32..=31).
    pub fn level(&self, i: usize) -> i8 {
        let (half, r) = (i / 128, i % 128);
        let (quarter, l) = (r / 32, r % 32);
        let ql = self.ql[half * 64 + (quarter % 2) * 32 + l];
        let low = if quarter < 2 { ql & 0x0F } else { ql >> 4 };
        let high = (self.qh[half * 32 + l] >> (2 * quarter)) & 3;
        (low | (high << 4)) as i8 - 32
    }
}

/// ggml's `quantize_row_q6_K_ref` for one super-block.
pub fn quantize_block(x: &[f32]) -> BlockQ6K {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for (ib, s) in scales.iter_mut().enumerate() {
        *s = make_qx(&x[16 * ib..16 * (ib + 1)], 32, &mut l[16 * ib..], None);
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = *s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        return BlockQ6K::zeroed();
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let mut sc = [0i8; QK_K / 16];
    for (q, &s) in sc.iter_mut().zip(&scales) {
        *q = nearest_int(iscale * s).min(127) as i8;
    }
    for (j, &scj) in sc.iter().enumerate() {
        let dj = d.to_f32() * scj as f32;
        if dj == 0.0 {
            // Keeps make_qx's levels, as the reference does.
            continue;
        }
        for i in 16 * j..16 * (j + 1) {
            l[i] = (nearest_int(x[i] / dj).clamp(-32, 31) + 32) as i8;
        }
    }
    let mut b = BlockQ6K {
        ql: [0; QK_K / 2],
        qh: [0; QK_K / 4],
        scales: sc,
        d: d.to_bits(),
    };
    for half in 0..2 {
        let lh = &l[half * 128..];
        for i in 0..32 {
            let q = |k: usize| lh[i + 32 * k] as u8;
            b.ql[half * 64 + i] = (q(0) & 0x0F) | ((q(2) & 0x0F) << 4);
            b.ql[half * 64 + 32 + i] = (q(1) & 0x0F) | ((q(3) & 0x0F) << 4);
            b.qh[half * 32 + i] =
                (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
    b
}

pub fn quantize_row(src: &[f32], dst: &mut [BlockQ6K]) {
    super::k_search::quantize_blocks(src, None, dst, QK_K, |x, _| quantize_block(x))
}

/// `(d·sc)·q`, rounded as the reference and the `gguf` package round it.
pub fn dequantize_row(src: &[BlockQ6K], dst: &mut [f32]) {
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = b.d();
        for (i, v) in y.iter_mut().enumerate() {
            *v = d * b.scales[i / 16] as f32 * b.level(i) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_grid_round_trips() {
        let x: Vec<f32> = (0..QK_K)
            .map(|i| ((i * 13) % 63) as f32 * 0.01 - 0.31)
            .collect();
        let b = quantize_block(&x);
        let mut y = vec![0.0; QK_K];
        dequantize_row(&[b], &mut y);
        let err = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 0.006, "max error {err}");
    }

    #[test]
    fn tiny_block_is_all_zero_bytes() {
        let b = quantize_block(&[1e-20; QK_K]);
        assert_eq!(bytemuck::bytes_of(&b), &[0u8; 210][..]);
    }
}
