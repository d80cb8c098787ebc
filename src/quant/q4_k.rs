//! Q4_K: super-blocks of 256 four-bit values in 8 sub-blocks of 32, each
//! with a 6-bit scale and minimum relative to the f16 `d` and `dmin`:
//! value = d·sc_j·q − dmin·m_j.
//!
//! `qs` holds the values 64 at a time: byte `l` of each 32-byte run has
//! sub-block `2i`'s value `l` in its low nibble and sub-block `2i+1`'s in
//! its high nibble (ggml's `block_q4_K`, 144 bytes, 4.5 bits per weight).

use super::k_search::{quantize_blocks, quantize_scale_min_super, ScaleMinBlock, QK_K};
use bytemuck::{Pod, Zeroable};

#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
#[repr(C)]
pub struct BlockQ4K {
    /// f16 bits of the super-block scale and minimum scale.
    pub d: u16,
    pub dmin: u16,
    /// Eight 6-bit scales and eight 6-bit minimums ([`scale_min_k4`]).
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

impl ScaleMinBlock for BlockQ4K {
    fn d_dmin_bits(&self) -> (u16, u16) {
        (self.d, self.dmin)
    }

    fn scales(&self) -> &[u8; 12] {
        &self.scales
    }

    fn level(&self, i: usize) -> u8 {
        let (run, l) = (i / 64, i % 64);
        let b = self.qs[run * 32 + l % 32];
        if l < 32 {
            b & 0x0F
        } else {
            b >> 4
        }
    }
}

/// ggml's `quantize_row_q4_K_ref` for one super-block: levels 0..=15,
/// scale search from `(15 - 1) / range` in 21 steps of 0.1; with
/// `importance` (per column, from calibration) the weighted search of
/// [`quantize_scale_min_super`].
pub fn quantize_block(x: &[f32], importance: Option<&[f32]>) -> BlockQ4K {
    let (d, dmin, scales, l) = quantize_scale_min_super(x, 15, -1.0, 20, importance);
    let mut qs = [0u8; QK_K / 2];
    for run in 0..4 {
        for i in 0..32 {
            qs[run * 32 + i] = l[run * 64 + i] | (l[run * 64 + 32 + i] << 4);
        }
    }
    BlockQ4K {
        d,
        dmin,
        scales,
        qs,
    }
}

pub fn quantize_row(src: &[f32], importance: Option<&[f32]>, dst: &mut [BlockQ4K]) {
    quantize_blocks(src, importance, dst, QK_K, quantize_block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_on_a_grid_round_trip() {
        // Every sub-block on its own grid of 16 levels: reconstruction is
        // then limited only by the 6-bit scales and f16 d.
        let x: Vec<f32> = (0..QK_K)
            .map(|i| (i % 16) as f32 * 0.125 - 0.5 * (i / 32) as f32 / 8.0)
            .collect();
        let b = quantize_block(&x, None);
        let mut y = vec![0.0; QK_K];
        super::super::k_search::dequantize_scale_min(&[b], &mut y);
        let err = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 0.02, "max error {err}");
    }

    #[test]
    fn zero_block_is_zero() {
        let b = quantize_block(&[0.0; QK_K], None);
        let mut y = vec![1.0; QK_K];
        super::super::k_search::dequantize_scale_min(&[b], &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }
}
