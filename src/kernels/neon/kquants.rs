//! NEON products of the k-quants (Q4_K, Q5_K, Q6_K) with Q8_K activations,
//! in both variants: widening multiplies (ARMv8.0) and `sdot`.
//!
//! Every k-quant super-block unpacks to the same shape: 16 vectors of 16
//! unsigned levels (values 16v..16v+16, at most 63, so they are also valid
//! signed bytes for `smull`/`sdot`), the scales of its groups (sub-blocks
//! of 32 values for Q4_K/Q5_K, 16 for Q6_K) as 32-bit lanes, and a
//! correction that the activation's 16-value sums turn into one product: the
//! minimums of Q4_K/Q5_K, Q6_K's −32 offset. So one tile driver serves all
//! three types; each type only says how to unpack its bytes.
//!
//! A tile is one weight row × `T` tokens: the super-block is unpacked once
//! and multiplied with each token's activations. Group products are folded
//! with pairwise adds into one vector of four group sums, which a single
//! `mla` scales, so sub-block products are added in 32-bit integers (one
//! activation scale per 256 values makes that exact) and converted to float
//! once per super-block and token.
//!
//! Everything here is `#[inline(always)]` down from the two entry points,
//! as in the parent module: the `sdot` assembly is only accepted inside a
//! function compiled with `dotprod`.

use super::{f16x4_to_f32, sdot, Sdot, Widen};
use crate::quant::k_search::unpack_scale_min_k4;
use crate::quant::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K};
use std::arch::aarch64::*;

/// One super-block, unpacked.
pub(super) struct Unpacked {
    /// Levels of values `16v..16v + 16`, all in 0..=63.
    w: [int8x16_t; 16],
    /// The scales of four consecutive groups per vector, in the order the
    /// group sums come out of [`KDot`] and `vpaddq_s32`; only the first
    /// `4 / GROUP` are used.
    s: [int32x4_t; 4],
    /// Per 16-value group `g`, the factor of the activation sum `bsums[g]`
    /// in the correction term (lanes 0-7: groups 0-7).
    c: [int16x8_t; 2],
    /// Scale of the integer sum Σ s·(w·x).
    d: f32,
    /// Scale of the correction Σ c·bsums.
    coef: f32,
}

/// A k-quant block the tile driver can multiply.
pub(super) trait KBlock {
    /// Level vectors per scale group: 2 for the 32-value sub-blocks of
    /// Q4_K/Q5_K, 1 for Q6_K's 16-value ones.
    const GROUP: usize;

    /// # Safety
    /// The CPU must have NEON (callers are reached only through a detected
    /// `Neon`).
    unsafe fn unpack(&self) -> Unpacked;
}

/// How the group products are computed: the only thing that differs
/// between the two variants. Both return four lanes, lanes 0-1 adding up to
/// the first group's product and lanes 2-3 to the second's, so that one
/// `vpaddq_s32` of two results gives four group sums.
pub(super) trait KDot {
    /// Two 16-value groups, `w[i]·x[i]`; levels at most 63.
    unsafe fn pair16(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t;
    /// Two 32-value groups, `w[0..2]·x[0..2]` and `w[2..4]·x[2..4]`; levels
    /// at most 31.
    unsafe fn pair32(w: [int8x16_t; 4], x: [int8x16_t; 4]) -> int32x4_t;
}

/// Each i16 lane adds up as many byte products as its level range allows
/// before one widening: |level·x| <= 63·128 four times (Q6_K) or 31·128
/// eight times (Q5_K, Q4_K smaller) stays below 32768, for every i8 `x`,
/// not only the ±127 that Q8_K holds.
impl KDot for Widen {
    #[inline(always)]
    unsafe fn pair16(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t {
        let p = |w: int8x16_t, x: int8x16_t| {
            vmlal_high_s8(vmull_s8(vget_low_s8(w), vget_low_s8(x)), w, x)
        };
        // Two products per lane in each `p`, four after `addp`.
        vpaddlq_s16(vpaddq_s16(p(w[0], x[0]), p(w[1], x[1])))
    }

    #[inline(always)]
    unsafe fn pair32(w: [int8x16_t; 4], x: [int8x16_t; 4]) -> int32x4_t {
        let p = |w0: int8x16_t, x0: int8x16_t, w1: int8x16_t, x1: int8x16_t| {
            let s = vmlal_high_s8(vmull_s8(vget_low_s8(w0), vget_low_s8(x0)), w0, x0);
            vmlal_high_s8(vmlal_s8(s, vget_low_s8(w1), vget_low_s8(x1)), w1, x1)
        };
        // Four products per lane in each `p`, eight after `addp`.
        vpaddlq_s16(vpaddq_s16(
            p(w[0], x[0], w[1], x[1]),
            p(w[2], x[2], w[3], x[3]),
        ))
    }
}

/// Only instantiated inside `dotprod` functions.
impl KDot for Sdot {
    #[inline(always)]
    unsafe fn pair16(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t {
        let z = vdupq_n_s32(0);
        vpaddq_s32(sdot(z, w[0], x[0]), sdot(z, w[1], x[1]))
    }

    #[inline(always)]
    unsafe fn pair32(w: [int8x16_t; 4], x: [int8x16_t; 4]) -> int32x4_t {
        let z = vdupq_n_s32(0);
        vpaddq_s32(
            sdot(sdot(z, w[0], x[0]), w[1], x[1]),
            sdot(sdot(z, w[2], x[2]), w[3], x[3]),
        )
    }
}

/// Two f16 scales (bit patterns) as f32, with one `fcvtl`: `half` would
/// check for FP16 arithmetic at run time, which the Pi 4 lacks, and convert
/// with integer bit manipulation instead.
#[inline(always)]
unsafe fn f16_pair(a: u16, b: u16) -> (f32, f32) {
    let v = f16x4_to_f32(vcreate_u16(a as u64 | (b as u64) << 16));
    (vgetq_lane_f32::<0>(v), vgetq_lane_f32::<1>(v))
}

/// Scales and minimums of Q4_K/Q5_K: the eight scales as two vectors of
/// four, and each minimum repeated for its sub-block's two 16-value sums.
#[inline(always)]
unsafe fn scale_min_vectors(scales: &[u8; 12]) -> ([int32x4_t; 4], [int16x8_t; 2]) {
    let sm = unpack_scale_min_k4(scales);
    // SAFETY: a 16-byte load of the 16-byte array.
    let v = vld1q_u8(sm.as_ptr());
    let sc = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(v)));
    let m = vreinterpretq_s16_u16(vmovl_high_u8(v));
    let zero = vdupq_n_s32(0);
    (
        [vmovl_s16(vget_low_s16(sc)), vmovl_high_s16(sc), zero, zero],
        [vzip1q_s16(m, m), vzip2q_s16(m, m)],
    )
}

impl KBlock for BlockQ4K {
    const GROUP: usize = 2;

    #[inline(always)]
    unsafe fn unpack(&self) -> Unpacked {
        let low = vdupq_n_u8(0x0F);
        let mut w = [vdupq_n_s8(0); 16];
        for run in 0..4 {
            // Byte l of run `run` holds value 64·run + l (low nibble) and
            // value 64·run + 32 + l (high nibble).
            for k in 0..2 {
                // SAFETY: `qs` is 128 bytes; run < 4, k < 2 loads bytes
                // 32·run + 16k..32·run + 16k + 16.
                let q = vld1q_u8(self.qs.as_ptr().add(32 * run + 16 * k));
                w[4 * run + k] = vreinterpretq_s8_u8(vandq_u8(q, low));
                w[4 * run + 2 + k] = vreinterpretq_s8_u8(vshrq_n_u8::<4>(q));
            }
        }
        let (s, c) = scale_min_vectors(&self.scales);
        let (d, dmin) = f16_pair(self.d, self.dmin);
        Unpacked {
            w,
            s,
            c,
            d,
            coef: -dmin,
        }
    }
}

impl KBlock for BlockQ5K {
    const GROUP: usize = 2;

    #[inline(always)]
    unsafe fn unpack(&self) -> Unpacked {
        let one = vdupq_n_u8(1);
        // SAFETY: `qh` is 32 bytes: two 16-byte loads.
        let mut h = [
            vld1q_u8(self.qh.as_ptr()),
            vld1q_u8(self.qh.as_ptr().add(16)),
        ];
        let mut w = [vdupq_n_s8(0); 16];
        for run in 0..4 {
            for k in 0..2 {
                // SAFETY: as in Q4_K, bytes 32·run + 16k.. of the 128.
                let q = vld1q_u8(self.qs.as_ptr().add(32 * run + 16 * k));
                // Bits 2·run and 2·run + 1 of `qh` are the fifth bits of
                // this run's two sub-blocks; shifting `h` as the runs pass
                // keeps them at bits 0 and 1.
                let (b0, b1) = (vandq_u8(h[k], one), vandq_u8(vshrq_n_u8::<1>(h[k]), one));
                h[k] = vshrq_n_u8::<2>(h[k]);
                // `sli` keeps the low four bits of its first operand, so the
                // low nibbles need no mask.
                w[4 * run + k] = vreinterpretq_s8_u8(vsliq_n_u8::<4>(q, b0));
                w[4 * run + 2 + k] = vreinterpretq_s8_u8(vsliq_n_u8::<4>(vshrq_n_u8::<4>(q), b1));
            }
        }
        let (s, c) = scale_min_vectors(&self.scales);
        let (d, dmin) = f16_pair(self.d, self.dmin);
        Unpacked {
            w,
            s,
            c,
            d,
            coef: -dmin,
        }
    }
}

impl KBlock for BlockQ6K {
    const GROUP: usize = 1;

    #[inline(always)]
    unsafe fn unpack(&self) -> Unpacked {
        let (three, top) = (vdupq_n_u8(3), vdupq_n_u8(0x30));
        let mut w = [vdupq_n_s8(0); 16];
        for half in 0..2 {
            for k in 0..2 {
                // SAFETY: `ql` is 128 bytes and `qh` 64: half < 2, k < 2
                // loads ql[64h + 16k..] and ql[64h + 32 + 16k..] (16 bytes
                // each, ending by 128) and qh[32h + 16k..+16] (by 64).
                let (l0, l1, h) = (
                    vld1q_u8(self.ql.as_ptr().add(64 * half + 16 * k)),
                    vld1q_u8(self.ql.as_ptr().add(64 * half + 32 + 16 * k)),
                    vld1q_u8(self.qh.as_ptr().add(32 * half + 16 * k)),
                );
                // Quarter `q` (values 128·half + 32q + l) takes bits 2q, 2q+1
                // of `h` as its bits 4-5: `sli` moves them up under the low
                // nibbles (quarters 0, 1), `sri` slides the high nibbles
                // under bits already in place (quarters 2, 3).
                let h2 = vshrq_n_u8::<2>(h);
                let quarters = [
                    vsliq_n_u8::<4>(l0, vandq_u8(h, three)),
                    vsliq_n_u8::<4>(l1, vandq_u8(h2, three)),
                    vsriq_n_u8::<4>(vandq_u8(h, top), l0),
                    vsriq_n_u8::<4>(vandq_u8(h2, top), l1),
                ];
                for (q, &v) in quarters.iter().enumerate() {
                    w[8 * half + 2 * q + k] = vreinterpretq_s8_u8(v);
                }
            }
        }
        // SAFETY: a 16-byte load of the 16-byte array.
        let sc = vld1q_s8(self.scales.as_ptr());
        let (lo, hi) = (vmovl_s8(vget_low_s8(sc)), vmovl_high_s8(sc));
        let (d, _) = f16_pair(self.d, 0);
        Unpacked {
            w,
            s: [
                vmovl_s16(vget_low_s16(lo)),
                vmovl_high_s16(lo),
                vmovl_s16(vget_low_s16(hi)),
                vmovl_high_s16(hi),
            ],
            c: [lo, hi],
            d,
            coef: -32.0 * d,
        }
    }
}

/// `out[r * n + t] = W[r] · x[t]` for every row of `w` (`nb` super-blocks
/// each) and every token of `x` (`n * nb` blocks, token-major).
///
/// Rows outside, tokens inside, as in the parent module: a row (the widest
/// 7B one is 43 super-blocks, 9 KB of Q6_K) stays in L1 while the tokens
/// pass.
#[inline(always)]
unsafe fn matmul<B: KBlock, D: KDot>(
    w: &[B],
    nb: usize,
    x: &[BlockQ8K],
    n: usize,
    out: &mut [f32],
) {
    if nb == 0 || n == 0 {
        out.fill(0.0);
        return;
    }
    assert!(x.len() == n * nb && w.len().is_multiple_of(nb));
    assert!(out.len() >= w.len() / nb * n);
    for (wr, or) in w.chunks_exact(nb).zip(out.chunks_exact_mut(n)) {
        let mut t = 0;
        while t < n {
            let xs = |i: usize| &x[(t + i) * nb..(t + i + 1) * nb];
            let g = (n - t).min(4);
            let o = &mut or[t..t + g];
            match g {
                1 => tile::<B, D, 1>(wr, [xs(0)], o),
                2 => tile::<B, D, 2>(wr, [xs(0), xs(1)], o),
                3 => tile::<B, D, 3>(wr, [xs(0), xs(1), xs(2)], o),
                _ => tile::<B, D, 4>(wr, [xs(0), xs(1), xs(2), xs(3)], o),
            }
            t += g;
        }
    }
}

/// One weight row (`w`) × `T` tokens, every slice the same number of
/// super-blocks (asserted, which also lets the compiler drop the per-block
/// bounds checks).
#[inline(always)]
unsafe fn tile<B: KBlock, D: KDot, const T: usize>(w: &[B], x: [&[BlockQ8K]; T], out: &mut [f32]) {
    for x in x {
        assert_eq!(x.len(), w.len());
    }
    assert_eq!(out.len(), T);
    let mut acc = [vdupq_n_f32(0.0); T];
    for (i, b) in w.iter().enumerate() {
        let u = b.unpack();
        for t in 0..T {
            let xb = &x[t][i];
            let mut xv = [vdupq_n_s8(0); 16];
            for (v, xv) in xv.iter_mut().enumerate() {
                // SAFETY: `qs` is 256 bytes; v < 16 loads bytes 16v..16v+16.
                *xv = vld1q_s8(xb.qs.as_ptr().add(16 * v));
            }
            // Four group sums per step, scaled by one `mla`: each lane stays
            // far inside i32 (Q6_K: 128 · 63·127·16 per group, four groups).
            let mut isum = vdupq_n_s32(0);
            for q in 0..4 / B::GROUP {
                let p = if B::GROUP == 2 {
                    let g = |o: usize| {
                        D::pair32(
                            [u.w[o], u.w[o + 1], u.w[o + 2], u.w[o + 3]],
                            [xv[o], xv[o + 1], xv[o + 2], xv[o + 3]],
                        )
                    };
                    vpaddq_s32(g(8 * q), g(8 * q + 4))
                } else {
                    let g = |o: usize| D::pair16([u.w[o], u.w[o + 1]], [xv[o], xv[o + 1]]);
                    vpaddq_s32(g(4 * q), g(4 * q + 2))
                };
                isum = vmlaq_s32(isum, p, u.s[q]);
            }
            // SAFETY: `bsums` is 16 × i16: two 8-lane loads.
            let (s0, s1) = (
                vld1q_s16(xb.bsums.as_ptr()),
                vld1q_s16(xb.bsums.as_ptr().add(8)),
            );
            // |c·bsum| <= 128 · 16·128: products widen to i32 one by one.
            let corr = vmull_s16(vget_low_s16(s0), vget_low_s16(u.c[0]));
            let corr = vmlal_high_s16(corr, s0, u.c[0]);
            let corr = vmlal_s16(corr, vget_low_s16(s1), vget_low_s16(u.c[1]));
            let corr = vmlal_high_s16(corr, s1, u.c[1]);
            acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(isum), u.d * xb.d);
            acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(corr), u.coef * xb.d);
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = vaddvq_f32(a);
    }
}

// The entry points: the generic driver instantiated once per variant, each
// inside a function compiled for exactly its features.

/// # Safety
/// The CPU must have NEON; `x` holds `n * nb` blocks.
#[target_feature(enable = "neon")]
pub(super) unsafe fn matmul_widen<B: KBlock>(
    w: &[B],
    nb: usize,
    x: &[BlockQ8K],
    n: usize,
    out: &mut [f32],
) {
    matmul::<B, Widen>(w, nb, x, n, out)
}

/// # Safety
/// The CPU must have NEON and DotProd; `x` holds `n * nb` blocks.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn matmul_sdot<B: KBlock>(
    w: &[B],
    nb: usize,
    x: &[BlockQ8K],
    n: usize,
    out: &mut [f32],
) {
    matmul::<B, Sdot>(w, nb, x, n, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{k_search::ScaleMinBlock, QK_K};

    fn levels(u: &Unpacked) -> Vec<u8> {
        let mut out = vec![0u8; QK_K];
        for (v, &w) in u.w.iter().enumerate() {
            // SAFETY: a 16-byte store into the 256-byte vector at 16v, v < 16.
            unsafe { vst1q_s8(out.as_mut_ptr().add(16 * v).cast(), w) };
        }
        out
    }

    fn lanes32(v: int32x4_t) -> [i32; 4] {
        let mut out = [0; 4];
        // SAFETY: a 4-lane store into a 4-element array.
        unsafe { vst1q_s32(out.as_mut_ptr(), v) };
        out
    }

    fn lanes16(v: int16x8_t) -> [i16; 8] {
        let mut out = [0; 8];
        // SAFETY: an 8-lane store into an 8-element array.
        unsafe { vst1q_s16(out.as_mut_ptr(), v) };
        out
    }

    /// Random bytes, so every nibble, high bit and scale pattern occurs
    /// (quantized blocks leave many of them out).
    fn bytes<const N: usize>(seed: &mut u64) -> [u8; N] {
        std::array::from_fn(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (*seed >> 33) as u8
        })
    }

    /// The per-super-block unpacking against the blocks' own accessors.
    #[test]
    fn unpacked_levels_and_scales_match_the_block_accessors() {
        use crate::quant::k_search::scale_min_k4;
        if super::super::Neon::detect().is_none() {
            return;
        }
        let mut seed = 7;
        for _ in 0..20 {
            let q4 = BlockQ4K {
                d: 0x3c00,
                dmin: 0x3800,
                scales: bytes(&mut seed),
                qs: bytes(&mut seed),
            };
            // SAFETY: NEON detected above.
            let u = unsafe { q4.unpack() };
            assert_eq!(
                levels(&u),
                (0..QK_K).map(|i| q4.level(i)).collect::<Vec<_>>()
            );
            let (s, c) = (
                [lanes32(u.s[0]), lanes32(u.s[1])].concat(),
                [lanes16(u.c[0]), lanes16(u.c[1])].concat(),
            );
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, &q4.scales);
                assert_eq!(
                    (s[j], c[2 * j], c[2 * j + 1]),
                    (sc as i32, m as i16, m as i16)
                );
            }
            assert_eq!((u.d, u.coef), (1.0, -0.5));

            let q5 = BlockQ5K {
                d: 0x3c00,
                dmin: 0x3800,
                scales: bytes(&mut seed),
                qh: bytes(&mut seed),
                qs: bytes(&mut seed),
            };
            // SAFETY: as above.
            let u = unsafe { q5.unpack() };
            assert_eq!(
                levels(&u),
                (0..QK_K).map(|i| q5.level(i)).collect::<Vec<_>>()
            );

            let q6 = BlockQ6K {
                ql: bytes(&mut seed),
                qh: bytes(&mut seed),
                scales: bytemuck::cast(bytes::<16>(&mut seed)),
                d: 0x3c00,
            };
            // SAFETY: as above.
            let u = unsafe { q6.unpack() };
            assert_eq!(
                levels(&u),
                (0..QK_K)
                    .map(|i| (q6.level(i) + 32) as u8)
                    .collect::<Vec<_>>()
            );
            let s: Vec<i32> = u.s.iter().flat_map(|&v| lanes32(v)).collect();
            let c: Vec<i16> = u.c.iter().flat_map(|&v| lanes16(v)).collect();
            for g in 0..16 {
                assert_eq!((s[g], c[g]), (q6.scales[g] as i32, q6.scales[g] as i16));
            }
            assert_eq!((u.d, u.coef), (1.0, -32.0));
        }
    }
}
