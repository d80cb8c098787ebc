//! Q5_K: Q4_K with a fifth bit per value (levels 0..=31):
//! value = d·sc_j·q − dmin·m_j.
//!
//! `qs` is laid out as Q4_K's; bit `2i` of `qh[l]` is the high bit of
//! sub-block `2i`'s value `l`, bit `2i+1` that of sub-block `2i+1`'s
//! (ggml's `block_q5_K`, 176 bytes, 5.5 bits per weight).

use super::k_search::{quantize_blocks, quantize_scale_min_super, ScaleMinBlock, QK_K};
use bytemuck::{Pod, Zeroable};

#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
#[repr(C)]
pub struct BlockQ5K {
    pub d: u16,
    pub dmin: u16,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

impl ScaleMinBlock for BlockQ5K {
    fn d_dmin_bits(&self) -> (u16, u16) {
        (self.d, self.dmin)
    }

    fn scales(&self) -> &[u8; 12] {
        &self.scales
    }

    fn level(&self, i: usize) -> u8 {
        let (sub, l) = (i / 32, i % 32);
        let b = self.qs[(sub / 2) * 32 + l];
        let low = if sub % 2 == 0 { b & 0x0F } else { b >> 4 };
        low | (((self.qh[l] >> sub) & 1) << 4)
    }
}

/// ggml's `quantize_row_q5_K_ref` for one super-block: levels 0..=31,
/// scale search from `(31 - 0.5) / range` in 16 steps of 0.1; with
/// `importance` the weighted search of [`quantize_scale_min_super`].
pub fn quantize_block(x: &[f32], importance: Option<&[f32]>) -> BlockQ5K {
    let (d, dmin, scales, l) = quantize_scale_min_super(x, 31, -0.5, 15, importance);
    let (mut qs, mut qh) = ([0u8; QK_K / 2], [0u8; QK_K / 8]);
    for run in 0..4 {
        for i in 0..32 {
            let (lo, hi) = (l[run * 64 + i], l[run * 64 + 32 + i]);
            qs[run * 32 + i] = (lo & 0x0F) | ((hi & 0x0F) << 4);
            qh[i] |= ((lo >> 4) << (2 * run)) | ((hi >> 4) << (2 * run + 1));
        }
    }
    BlockQ5K {
        d,
        dmin,
        scales,
        qh,
        qs,
    }
}

pub fn quantize_row(src: &[f32], importance: Option<&[f32]>, dst: &mut [BlockQ5K]) {
    quantize_blocks(src, importance, dst, QK_K, quantize_block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn high_bits_land_in_qh_and_round_trip() {
        let x: Vec<f32> = (0..QK_K).map(|i| ((i * 7) % 32) as f32 * 0.0625).collect();
        let b = quantize_block(&x, None);
        assert!(b.qh.iter().any(|&h| h != 0), "levels above 15 need qh bits");
        let mut y = vec![0.0; QK_K];
        super::super::k_search::dequantize_scale_min(&[b], &mut y);
        let err = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 0.01, "max error {err}");
    }
}
