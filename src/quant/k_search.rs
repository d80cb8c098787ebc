//! The scale searches behind ggml's k-quants, shared by Q4_K, Q5_K and Q6_K.
//!
//! A k-quant super-block holds 256 values in sub-blocks (8 of 32 for
//! Q4_K/Q5_K, 16 of 16 for Q6_K), each with its own small integer scale
//! (and for Q4_K/Q5_K a minimum) relative to one f16 super-block scale.
//! Plain min/max rounding wastes levels on outliers; ggml's reference
//! quantizer instead tries a few candidate scales around the min/max one
//! and keeps the one with the least weighted squared error. This file
//! follows the reference arithmetic operation by operation, in f32 and in
//! the same order, so our blocks are the reference's blocks (a C build
//! that contracts `a * b + c` into FMA can still flip a rounding: README,
//! "k-quants").

/// Values per k-quant super-block (ggml's `QK_K`).
pub const QK_K: usize = 256;

/// ggml's `nearest_int`: round half to even. Adding 1.5·2²³ leaves the
/// rounded integer in the low mantissa bits (ggml's trick, exact below
/// 2²²); the searches call this millions of times per matrix, and without
/// SSE4.1 `round_ties_even` is a libm call (a fifth of the conversion's
/// time). Larger magnitudes, which quantization does not produce, take
/// the slow path.
#[inline]
pub fn nearest_int(v: f32) -> i32 {
    if v.abs() < 4_194_304.0 {
        ((v + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
    } else {
        v.round_ties_even() as i32
    }
}

/// Below this every value of a group counts as zero (ggml's `GROUP_MAX_EPS`).
pub const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `make_qkx2_quants`: levels `l[i]` in `0..=nmax` with
/// `x ≈ scale * l - min`, searching `nstep + 1` candidate scales from
/// `(nmax + rmin) / (max - min)` in steps of `rdelta`, each refined by the
/// weighted least-squares scale and offset for its levels. Returns
/// `(scale, min)`; `min` is non-negative (the offset subtracted).
pub fn make_qkx2(
    x: &[f32],
    nmax: i32,
    weights: &[f32],
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut laux = [0u8; 32];
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let level = |iscale: f32, v: f32, min: f32| nearest_int(iscale * (v - min)).clamp(0, nmax);
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        l[i] = level(iscale, x[i], min) as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = level(iscale, x[i], min);
            laux[i] = q as u8;
            let (w, q) = (weights[i], q as f32);
            sum_l += w * q;
            sum_l2 += w * q * q;
            sum_xl += w * q * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` with `rmse_type = 1`: symmetric levels `l` in
/// `-nmax..nmax` stored as `l + nmax`, trying 18 scales around `nmax / max`
/// and keeping the one that maximises `(Σ w x l)² / Σ w l²` (the weighted
/// least-squares fit). Without importance weights `w = x²` (the
/// reference); with them, the caller's `weights`. Returns the scale.
pub fn make_qx(x: &[f32], nmax: i32, l: &mut [i8], weights: Option<&[f32]>) -> f32 {
    let n = x.len();
    let w = |i: usize| match weights {
        Some(w) => w[i],
        None => x[i] * x[i],
    };
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l[..n].fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..n {
        let q = level(iscale, x[i]);
        l[i] = (q + nmax) as i8;
        let (w, q) = (w(i), q as f32);
        sumlx += w * x[i] * q;
        suml2 += w * q * q;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for (i, &v) in x.iter().enumerate() {
            let q = level(iscale, v) as f32;
            let w = w(i);
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                l[i] = (level(iscale, x[i]) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Per-value weights for importance-weighted rounding: the column's
/// activation energy times `sqrt(σ² + x²)`, σ² the group's mean square.
/// The energy says how much an error in this column moves the matrix's
/// output on real inputs; the magnitude factor keeps the reference's
/// preference for getting large weights right, which the energy alone
/// (a per-column, not per-value, quantity) cannot express.
pub fn importance_weights(x: &[f32], importance: &[f32], out: &mut [f32]) {
    let sigma2 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    for ((o, &v), &imp) in out.iter_mut().zip(x).zip(importance) {
        *o = imp * (sigma2 + v * v).sqrt();
    }
}

/// Sub-block `j`'s 6-bit scale and minimum from the 12 packed bytes of a
/// Q4_K/Q5_K super-block (ggml's `get_scale_min_k4`): sub-blocks 0-3 in the
/// low 6 bits of bytes 0-3 (scales) and 4-7 (mins); 4-7 split into a low
/// nibble in bytes 8-11 and the top two bits in the spare bits of 0-7.
#[inline]
pub fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// All eight scales (bytes 0-7) and minimums (bytes 8-15) of
/// [`scale_min_k4`] at once, with four 32-bit word operations instead of
/// sixteen byte lookups: what the SIMD kernels unpack per super-block.
#[inline]
pub fn unpack_scale_min_k4(q: &[u8; 12]) -> [u8; 16] {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (a, b, c) = (word(0), word(1), word(2));
    // Sub-blocks 4-7: the low nibble from bytes 8-11, the top two bits
    // from the spare bits 6-7 of bytes 0-3 (scales) or 4-7 (minimums).
    let words = [
        a & LOW6,
        (c & LOW4) | (((a >> 6) & LOW2) << 4),
        b & LOW6,
        ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4),
    ];
    let mut out = [0u8; 16];
    for (o, w) in out.chunks_exact_mut(4).zip(words) {
        o.copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// The inverse of [`scale_min_k4`] for all eight sub-blocks.
pub fn pack_scale_min_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..8 {
        let (ls, lm) = (sc[j], m[j]);
        if j < 4 {
            q[j] = ls;
            q[j + 4] = lm;
        } else {
            q[j + 4] = (ls & 0x0F) | ((lm & 0x0F) << 4);
            q[j - 4] |= (ls >> 4) << 6;
            q[j] |= (lm >> 4) << 6;
        }
    }
    q
}

/// The shared first half of Q4_K and Q5_K quantization: each 32-value
/// sub-block's scale and minimum by [`make_qkx2`], both quantized to 6 bits
/// against the super-block's largest, then every value's level recomputed
/// against the rounded scales. Returns `(d, dmin, packed scales, levels
/// 0..=nmax)`.
///
/// Without `importance` this is ggml's reference quantizer (weights
/// `rms(x) + |x|`, the caller's `rmin`/`nstep` in steps of 0.1). With it
/// (one value per column of `x`, from calibration), the weights are
/// [`importance_weights`] and the search is twice as fine.
pub fn quantize_scale_min_super(
    x: &[f32],
    nmax: i32,
    rmin: f32,
    nstep: i32,
    importance: Option<&[f32]>,
) -> (u16, u16, [u8; 12], [u8; QK_K]) {
    use half::f16;
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    let mut all_weights = [0.0f32; QK_K];
    if let Some(imp) = importance {
        importance_weights(x, imp, &mut all_weights);
    }
    let mut weights = [0.0f32; 32];
    for j in 0..8 {
        let xs = &x[32 * j..32 * (j + 1)];
        let (s, m) = if importance.is_some() {
            let w = &all_weights[32 * j..32 * (j + 1)];
            make_qkx2(xs, nmax, w, &mut l[32 * j..], rmin, 0.05, 2 * nstep)
        } else {
            let sum_x2: f32 = xs.iter().fold(0.0, |s, v| s + v * v);
            let av_x = (sum_x2 / 32.0).sqrt();
            for (w, v) in weights.iter_mut().zip(xs) {
                *w = av_x + v.abs();
            }
            make_qkx2(xs, nmax, &weights, &mut l[32 * j..], rmin, 0.1, nstep)
        };
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        // ggml stores nearest_int in a uint8_t before clamping; the values
        // are at most 63 here, so the clamp is the whole story.
        ls[j] = nearest_int(inv_scale * scales[j]).min(63) as u8;
        lm[j] = nearest_int(inv_min * mins[j]).min(63) as u8;
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    if importance.is_some() {
        // Rounding the scales to 6 bits moved each sub-block off its
        // optimum: try the neighbouring 6-bit scale and minimum too, and
        // keep the pair with the least weighted error.
        let (df, dminf) = (d.to_f32(), dmin.to_f32());
        for j in 0..8 {
            let (xs, w) = (&x[32 * j..32 * (j + 1)], &all_weights[32 * j..32 * (j + 1)]);
            let err = |s: u8, m: u8| {
                let (dj, dm) = (df * s as f32, dminf * m as f32);
                let mut e = 0.0f32;
                for (&v, &w) in xs.iter().zip(w) {
                    let q = if dj == 0.0 {
                        0
                    } else {
                        nearest_int((v + dm) / dj).clamp(0, nmax)
                    };
                    let diff = dj * q as f32 - dm - v;
                    e += w * diff * diff;
                }
                e
            };
            let mut best = (err(ls[j], lm[j]), ls[j], lm[j]);
            for s in ls[j].saturating_sub(1)..=(ls[j] + 1).min(63) {
                for m in lm[j].saturating_sub(1)..=(lm[j] + 1).min(63) {
                    let e = err(s, m);
                    if e < best.0 {
                        best = (e, s, m);
                    }
                }
            }
            (ls[j], lm[j]) = (best.1, best.2);
        }
    }
    let packed = pack_scale_min_k4(&ls, &lm);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for i in 32 * j..32 * (j + 1) {
            l[i] = nearest_int((x[i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (d.to_bits(), dmin.to_bits(), packed, l)
}

/// What Q4_K and Q5_K share: f16 `d` and `dmin`, eight 6-bit scales and
/// minimums ([`scale_min_k4`]) and a level per value, so that their
/// dequantization and the scalar products are written once.
pub trait ScaleMinBlock {
    /// f16 bits of the super-block scale and minimum scale.
    fn d_dmin_bits(&self) -> (u16, u16);
    fn scales(&self) -> &[u8; 12];
    /// Value `i` (0..256) as its level.
    fn level(&self, i: usize) -> u8;

    fn d(&self) -> f32 {
        half::f16::from_bits(self.d_dmin_bits().0).to_f32()
    }
    fn dmin(&self) -> f32 {
        half::f16::from_bits(self.d_dmin_bits().1).to_f32()
    }
}

/// Q4_K/Q5_K rows: `d·sc·q − dmin·m`, each product rounded to f32 as the
/// reference (and the `gguf` package) computes it.
pub fn dequantize_scale_min<B: ScaleMinBlock>(src: &[B], dst: &mut [f32]) {
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (b.d(), b.dmin());
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, b.scales());
            let (dj, mj) = (d * sc as f32, dmin * m as f32);
            for (i, v) in y.iter_mut().enumerate().skip(32 * j).take(32) {
                *v = dj * b.level(i) as f32 - mj;
            }
        }
    }
}

/// Encodes whole blocks of `len` values of `src` into `dst` with `block`,
/// handing each block its slice of the per-column `importance`.
pub fn quantize_blocks<B>(
    src: &[f32],
    importance: Option<&[f32]>,
    dst: &mut [B],
    len: usize,
    block: impl Fn(&[f32], Option<&[f32]>) -> B,
) {
    for (i, (b, x)) in dst.iter_mut().zip(src.chunks_exact(len)).enumerate() {
        *b = block(x, importance.map(|imp| &imp[i * len..(i + 1) * len]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even_like_the_reference() {
        for (v, want) in [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (2.49, 2),
            (-3.7, -4),
        ] {
            assert_eq!(nearest_int(v), want, "{v}");
        }
    }

    #[test]
    fn scale_min_packing_round_trips_every_six_bit_value() {
        for seed in 0..64u8 {
            let sc: [u8; 8] = std::array::from_fn(|j| (seed + 7 * j as u8) & 63);
            let m: [u8; 8] = std::array::from_fn(|j| (63 - seed + 5 * j as u8) & 63);
            let q = pack_scale_min_k4(&sc, &m);
            for j in 0..8 {
                assert_eq!(scale_min_k4(j, &q), (sc[j], m[j]), "sub-block {j}");
            }
        }
    }

    #[test]
    fn word_unpacking_equals_the_bytewise_lookup() {
        let mut state = 0x9e37_79b9_u32;
        for _ in 0..1000 {
            let q: [u8; 12] = std::array::from_fn(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 24) as u8
            });
            let u = unpack_scale_min_k4(&q);
            for j in 0..8 {
                assert_eq!(
                    (u[j], u[8 + j]),
                    scale_min_k4(j, &q),
                    "sub-block {j} of {q:?}"
                );
            }
        }
    }

    #[test]
    fn qkx2_fits_levels_that_reconstruct_a_ramp_exactly() {
        // 32 values on an exact 0..15 grid with offset: the search must find it.
        let x: Vec<f32> = (0..32).map(|i| 0.25 * (i % 16) as f32 - 1.0).collect();
        let w = vec![1.0f32; 32];
        let mut l = [0u8; 32];
        let (scale, min) = make_qkx2(&x, 15, &w, &mut l, -1.0, 0.1, 20);
        for i in 0..32 {
            assert!((scale * l[i] as f32 - min - x[i]).abs() < 1e-5, "value {i}");
        }
    }

    /// Importance-weighted rounding must lower the error it weighs: over
    /// many random super-blocks with skewed column importance, the
    /// importance-weighted squared error of the weighted Q4_K/Q5_K/Q4_0
    /// blocks is below the reference quantizer's.
    #[test]
    fn weighted_rounding_lowers_the_weighted_error() {
        use crate::quant::{dequantize_row, quantize_row, GgmlType};
        let mut state = 0x2545_f491_u32;
        let mut rnd = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as f32 / u32::MAX as f32 - 0.5
        };
        let cols = 4 * QK_K;
        // A few loud columns, as real activations have.
        let importance: Vec<f32> = (0..cols)
            .map(|i| if i % 37 == 0 { 30.0 } else { 0.2 + rnd().abs() })
            .collect();
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q4_0] {
            let (mut plain, mut weighted) = (0.0f64, 0.0f64);
            let mut bytes = vec![0u8; ty.row_bytes(cols).unwrap()];
            let mut y = vec![0.0f32; cols];
            for _ in 0..64 {
                let x: Vec<f32> = (0..cols).map(|_| rnd() * (1.0 + rnd())).collect();
                for (imp, total) in [(None, &mut plain), (Some(&importance[..]), &mut weighted)] {
                    quantize_row(ty, &x, imp, &mut bytes);
                    dequantize_row(ty, &bytes, &mut y);
                    *total += x
                        .iter()
                        .zip(&y)
                        .zip(&importance)
                        .map(|((a, b), w)| (*w * (a - b) * (a - b)) as f64)
                        .sum::<f64>();
                }
            }
            assert!(
                weighted < 0.9 * plain,
                "{ty}: weighted error {weighted:.4e} vs reference {plain:.4e}"
            );
        }
    }

    #[test]
    fn qx_all_zero_group_gives_zero_scale() {
        let mut l = [5i8; 16];
        assert_eq!(make_qx(&[0.0; 16], 32, &mut l, None), 0.0);
        assert!(l.iter().all(|&v| v == 0));
    }
}
