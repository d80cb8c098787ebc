//! Portable reference kernels, written for clarity. They define the results
//! the SIMD kernels are tested against.

use super::{Acts, Kernels, Packed};
use crate::quant::k_search::{scale_min_k4, ScaleMinBlock};
use crate::quant::{q8_0, BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ6K, BlockQ8K, BlockQ8_0, QK};
use half::f16;

pub struct Scalar;

pub fn dot_q4_0_q8_0(w: &[BlockQ4_0], x: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in w.iter().zip(x) {
        let mut isum = 0i32;
        for j in 0..QK / 2 {
            let lo = (a.qs[j] & 0x0F) as i32 - 8;
            let hi = (a.qs[j] >> 4) as i32 - 8;
            isum += lo * b.qs[j] as i32 + hi * b.qs[j + QK / 2] as i32;
        }
        sum += isum as f32 * (a.scale() * b.scale());
    }
    sum
}

pub fn dot_q8_0_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in w.iter().zip(x) {
        let isum: i32 =
            a.qs.iter()
                .zip(&b.qs)
                .map(|(&p, &q)| p as i32 * q as i32)
                .sum();
        sum += isum as f32 * (a.scale() * b.scale());
    }
    sum
}

/// Q4_K and Q5_K: per sub-block `j`, `d·sc_j·Σ q·x − dmin·m_j·Σ x`, the
/// sums over the activation's int8 values (Σ x from its `bsums`), all
/// sub-blocks of a super-block added in integers before the two scales.
pub fn dot_scale_min_q8_k<B: ScaleMinBlock>(w: &[B], x: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in w.iter().zip(x) {
        let (mut isum, mut msum) = (0i32, 0i32);
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, a.scales());
            let dot: i32 = (32 * j..32 * (j + 1))
                .map(|i| a.level(i) as i32 * b.qs[i] as i32)
                .sum();
            isum += sc as i32 * dot;
            msum += m as i32 * (b.bsums[2 * j] as i32 + b.bsums[2 * j + 1] as i32);
        }
        sum += b.d * (a.d() * isum as f32 - a.dmin() * msum as f32);
    }
    sum
}

/// Q6_K: `d·Σ_j sc_j·Σ (q − 32)·x` over its sixteen 16-value sub-blocks.
pub fn dot_q6_k_q8_k(w: &[BlockQ6K], x: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in w.iter().zip(x) {
        let mut isum = 0i32;
        for (j, &sc) in a.scales.iter().enumerate() {
            let dot: i32 = (16 * j..16 * (j + 1))
                .map(|i| a.level(i) as i32 * b.qs[i] as i32)
                .sum();
            isum += sc as i32 * dot;
        }
        sum += b.d * a.d() * isum as f32;
    }
    sum
}

pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y.to_f32()).sum()
}

/// `a · dequant(b)`: each value dequantized exactly as
/// `q8_0::dequantize_row` does (`d * q`, exact in f32), multiplied and
/// added in order, in f32.
pub fn dot_q8_0(a: &[f32], b: &[BlockQ8_0]) -> f32 {
    check_q8_0_len("dot_q8_0", a.len(), b.len());
    let mut sum = 0.0f32;
    for (a, b) in a.chunks_exact(QK).zip(b) {
        let d = b.scale();
        for (&x, &q) in a.iter().zip(&b.qs) {
            sum += x * (d * q as f32);
        }
    }
    sum
}

/// `y += a * dequant(x)`, dequantized as in [`dot_q8_0`].
pub fn axpy_q8_0(a: f32, x: &[BlockQ8_0], y: &mut [f32]) {
    check_q8_0_len("axpy_q8_0", y.len(), x.len());
    for (y, b) in y.chunks_exact_mut(QK).zip(x) {
        let d = b.scale();
        for (y, &q) in y.iter_mut().zip(&b.qs) {
            *y += a * (d * q as f32);
        }
    }
}

/// The length contract of the Q8_0 attention kernels, shared by every set:
/// the f32 side holds exactly one value per quantized value.
pub(crate) fn check_q8_0_len(what: &str, values: usize, blocks: usize) {
    assert!(
        values == QK * blocks,
        "{what}: {values} f32 values for {blocks} Q8_0 blocks (want {})",
        QK * blocks
    );
}

/// `out[r * n + t] = dot(w row r, x token t)`, rows and tokens `len` long.
fn per_row_token<W, X>(
    w: &[W],
    len: usize,
    x: &[X],
    n: usize,
    out: &mut [f32],
    dot: impl Fn(&[W], &[X]) -> f32,
) {
    if len == 0 {
        out.fill(0.0);
        return;
    }
    for (wr, o) in w.chunks_exact(len).zip(out.chunks_exact_mut(n)) {
        for (xt, o) in x.chunks_exact(len).zip(o) {
            *o = dot(wr, xt);
        }
    }
}

/// The Q8_0 activations of a quantized product (`matmul_rows` checked the pairing).
pub(crate) fn q8_acts<'a>(x: &Packed<'a>) -> &'a [BlockQ8_0] {
    match x.acts {
        Acts::Q8_0(a) => a,
        _ => unreachable!("matmul_rows pairs Q4_0/Q8_0 weights with Q8_0"),
    }
}

/// The Q8_K activations of a k-quant product.
pub(crate) fn q8k_acts<'a>(x: &Packed<'a>) -> &'a [BlockQ8K] {
    match x.acts {
        Acts::Q8K(a) => a,
        _ => unreachable!("matmul_rows pairs k-quant weights with Q8_K"),
    }
}

impl Kernels for Scalar {
    fn name(&self) -> &'static str {
        "scalar"
    }

    fn matmul_q4_0(&self, w: &[BlockQ4_0], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        per_row_token(w, nb, q8_acts(x), x.n, out, dot_q4_0_q8_0)
    }

    fn matmul_q8_0(&self, w: &[BlockQ8_0], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        per_row_token(w, nb, q8_acts(x), x.n, out, dot_q8_0_q8_0)
    }

    fn matmul_q4_k(&self, w: &[BlockQ4K], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        per_row_token(w, nb, q8k_acts(x), x.n, out, dot_scale_min_q8_k)
    }

    fn matmul_q5_k(&self, w: &[BlockQ5K], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        per_row_token(w, nb, q8k_acts(x), x.n, out, dot_scale_min_q8_k)
    }

    fn matmul_q6_k(&self, w: &[BlockQ6K], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        per_row_token(w, nb, q8k_acts(x), x.n, out, dot_q6_k_q8_k)
    }

    fn matmul_f16(&self, w: &[f16], cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
        per_row_token(w, cols, x, n, out, |w, x| dot_f16(x, w))
    }

    fn matmul_f32(&self, w: &[f32], cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
        per_row_token(w, cols, x, n, out, dot_f32)
    }

    fn quantize_q8_0(&self, x: &[f32], y: &mut [BlockQ8_0]) {
        q8_0::quantize_row(x, y)
    }

    fn dot_f32(&self, a: &[f32], b: &[f32]) -> f32 {
        dot_f32(a, b)
    }

    fn dot_f16(&self, a: &[f32], b: &[f16]) -> f32 {
        dot_f16(a, b)
    }

    fn axpy_f32(&self, a: f32, x: &[f32], y: &mut [f32]) {
        for (y, x) in y.iter_mut().zip(x) {
            *y += a * x;
        }
    }

    fn axpy_f16(&self, a: f32, x: &[f16], y: &mut [f32]) {
        for (y, x) in y.iter_mut().zip(x) {
            *y += a * x.to_f32();
        }
    }

    fn dot_q8_0(&self, a: &[f32], b: &[BlockQ8_0]) -> f32 {
        dot_q8_0(a, b)
    }

    fn axpy_q8_0(&self, a: f32, x: &[BlockQ8_0], y: &mut [f32]) {
        axpy_q8_0(a, x, y)
    }
}
