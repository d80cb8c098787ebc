//! Element-wise and normalisation operations of the forward pass. They are
//! a few percent of the time next to the matrix products, so they stay
//! scalar and readable until a profile says otherwise. Outside the engine
//! (no `runtime` feature needed) because the quantizer's calibration pass
//! runs the same math on the checkpoint's f32 weights.

/// `LayerNorm` with biased variance, as `torch.nn.LayerNorm` computes it.
pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
        *o = (v - mean) * inv * w + b;
    }
}

pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// cos/sin of every rotary angle for positions `0..n_pos`: GPT-J rotary
/// with `theta_i = pos * base^(-2i / rotary_dim)`, computed in f32 as the
/// reference implementation does.
pub fn rope_table(n_pos: usize, rotary_dim: usize, base: f32) -> Vec<(f32, f32)> {
    let half = rotary_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / rotary_dim as f32))
        .collect();
    let mut t = Vec::with_capacity(n_pos * half);
    for p in 0..n_pos {
        for &f in &inv_freq {
            let (s, c) = (p as f32 * f).sin_cos();
            t.push((c, s));
        }
    }
    t
}

/// Rotates adjacent pairs `(x[2i], x[2i+1])` of the first `rotary_dim`
/// dims of one head ("rotate every two", not NeoX's rotate-half).
pub fn rope_head(x: &mut [f32], cos_sin: &[(f32, f32)]) {
    for (pair, &(c, s)) in x.chunks_exact_mut(2).zip(cos_sin) {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * c - b * s;
        pair[1] = b * c + a * s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_normalises() {
        let x = [1.0, 2.0, 3.0, 4.0];
        let mut o = [0.0; 4];
        layer_norm(&x, &[1.0; 4], &[0.5; 4], 0.0, &mut o);
        let mean: f32 = o.iter().sum::<f32>() / 4.0;
        assert!((mean - 0.5).abs() < 1e-6);
        let var: f32 = o.iter().map(|v| (v - 0.5) * (v - 0.5)).sum::<f32>() / 4.0;
        assert!((var - 1.0).abs() < 1e-5);
    }

    #[test]
    fn rope_rotates_adjacent_pairs_only_in_rotary_dims() {
        let table = rope_table(4, 4, 10000.0);
        let mut x = [1.0, 0.0, 1.0, 0.0, 7.0, 7.0];
        rope_head(&mut x[..4], &table[2 * 2..3 * 2]);
        // pair 0 rotates by pos*1 = 2 rad, pair 1 by 2 * 10000^(-1/2)
        assert!((x[0] - 2f32.cos()).abs() < 1e-6 && (x[1] - 2f32.sin()).abs() < 1e-6);
        let t = 2.0 * 0.01f32;
        assert!((x[2] - t.cos()).abs() < 1e-6 && (x[3] - t.sin()).abs() < 1e-6);
        assert_eq!(&x[4..], &[7.0, 7.0]);
    }

    #[test]
    fn softmax_sums_to_one_and_is_stable() {
        let mut x = [1000.0, 1000.0, f32::NEG_INFINITY];
        softmax(&mut x);
        assert_eq!(x, [0.5, 0.5, 0.0]);
    }
}
