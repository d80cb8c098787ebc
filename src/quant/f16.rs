//! IEEE half precision rows (ggml `F16`), little-endian.

use half::f16;

/// Round-to-nearest-even, as numpy's `astype(float16)` and ggml do.
pub fn encode_row(src: &[f32], dst: &mut [u8]) {
    for (d, &s) in dst.chunks_exact_mut(2).zip(src) {
        d.copy_from_slice(&f16::from_f32(s).to_le_bytes());
    }
}

pub fn decode_row(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = f16::from_le_bytes([s[0], s[1]]).to_f32();
    }
}
