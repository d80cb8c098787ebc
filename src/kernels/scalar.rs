//! Portable reference kernels, written for clarity. They define the results
//! the SIMD kernels are tested against.

use super::{Acts, Kernels, Weight};
use crate::quant::{q8_0, BlockQ4_0, BlockQ8_0, GgmlType, QK};
use half::f16;
use std::ops::Range;

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

pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y.to_f32()).sum()
}

impl Kernels for Scalar {
    fn name(&self) -> &'static str {
        "scalar"
    }

    fn matmul_rows(&self, w: &Weight<'_>, x: &Acts<'_>, rows: Range<usize>, out: &mut [f32]) {
        let n = x.n_tokens(w.cols);
        let nb = w.cols / QK;
        for (i, r) in rows.enumerate() {
            let o = &mut out[i * n..(i + 1) * n];
            for (t, o) in o.iter_mut().enumerate() {
                *o = match (w.ty, x) {
                    (GgmlType::F32, Acts::F32(x)) => {
                        dot_f32(w.f32_rows(r..r + 1), &x[t * w.cols..(t + 1) * w.cols])
                    }
                    (GgmlType::F16, Acts::F32(x)) => {
                        dot_f16(&x[t * w.cols..(t + 1) * w.cols], w.f16_rows(r..r + 1))
                    }
                    (GgmlType::Q4_0, Acts::Q8_0(x)) => {
                        dot_q4_0_q8_0(w.q4_0_rows(r..r + 1), &x[t * nb..(t + 1) * nb])
                    }
                    (GgmlType::Q8_0, Acts::Q8_0(x)) => {
                        dot_q8_0_q8_0(w.q8_0_rows(r..r + 1), &x[t * nb..(t + 1) * nb])
                    }
                    (ty, _) => panic!("{ty} weights paired with the wrong activation format"),
                };
            }
        }
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
}
