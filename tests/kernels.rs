//! Property tests: every kernel of every implementation this CPU can run,
//! against the scalar reference, on seeded random data. The same tests cover
//! any future instruction set, since they iterate over `available()`.
//!
//! Quantized matrix products have an exact integer part per block, so they
//! are compared with a tight relative bound (against the sum of the block
//! terms' magnitudes, which is what float reordering can disturb);
//! `quantize_q8_0` must be byte-identical.
//!
//! `bench_*` (ignored) are micro-benchmarks:
//! `cargo test --release --test kernels -- --ignored --nocapture --test-threads 1`.

mod common;

use crystald::kernels::{available, scalar::Scalar, select, Acts, Kernels, PackBuf, Weight};
use crystald::quant::k_search::{scale_min_k4, ScaleMinBlock};
use crystald::quant::{
    BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ6K, BlockQ8K, BlockQ8_0, GgmlType, QK, QK_K,
};
use half::f16;
use std::ops::Range;

/// SplitMix64: tiny, seeded, good enough to spread test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Values of mixed magnitude, as activations are.
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let s = [0.01, 1.0, 30.0][self.below(3) as usize];
                self.unit() * s
            })
            .collect()
    }

    fn scale(&mut self) -> u16 {
        f16::from_f32(0.001 + 0.05 * self.unit().abs()).to_bits()
    }

    fn q4_blocks(&mut self, n: usize) -> Vec<BlockQ4_0> {
        (0..n)
            .map(|_| BlockQ4_0 {
                d: self.scale(),
                qs: std::array::from_fn(|_| self.next_u64() as u8),
            })
            .collect()
    }

    /// Q8_0 blocks in -127..=127, the range `quantize_q8_0` produces.
    fn q8_blocks(&mut self, n: usize) -> Vec<BlockQ8_0> {
        (0..n)
            .map(|_| BlockQ8_0 {
                d: self.scale(),
                qs: std::array::from_fn(|_| (self.below(255) as i32 - 127) as i8),
            })
            .collect()
    }
}

impl Rng {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        std::array::from_fn(|_| self.next_u64() as u8)
    }

    fn q4_k_blocks(&mut self, n: usize) -> Vec<BlockQ4K> {
        (0..n)
            .map(|_| BlockQ4K {
                d: self.scale(),
                dmin: self.scale(),
                scales: self.bytes(),
                qs: self.bytes(),
            })
            .collect()
    }

    fn q5_k_blocks(&mut self, n: usize) -> Vec<BlockQ5K> {
        (0..n)
            .map(|_| BlockQ5K {
                d: self.scale(),
                dmin: self.scale(),
                scales: self.bytes(),
                qh: self.bytes(),
                qs: self.bytes(),
            })
            .collect()
    }

    /// Every scale byte (−128 included) and level.
    fn q6_k_blocks(&mut self, n: usize) -> Vec<BlockQ6K> {
        (0..n)
            .map(|_| BlockQ6K {
                ql: self.bytes(),
                qh: self.bytes(),
                scales: bytemuck::cast(self.bytes::<16>()),
                d: self.scale(),
            })
            .collect()
    }

    /// Q8_K blocks in −127..=127 with consistent sums, as `quantize_q8_k`
    /// makes them; `extreme` fills them with ±127 only.
    fn q8_k_blocks(&mut self, n: usize, extreme: bool) -> Vec<BlockQ8K> {
        (0..n)
            .map(|_| {
                let qs: [i8; QK_K] = std::array::from_fn(|_| {
                    if extreme {
                        if self.below(2) == 0 {
                            127
                        } else {
                            -127
                        }
                    } else {
                        (self.below(255) as i32 - 127) as i8
                    }
                });
                let mut bsums = [0i16; QK_K / 16];
                for (s, q) in bsums.iter_mut().zip(qs.chunks_exact(16)) {
                    *s = q.iter().map(|&v| v as i16).sum();
                }
                BlockQ8K {
                    d: 0.001 + 0.05 * self.unit().abs(),
                    qs,
                    bsums,
                }
            })
            .collect()
    }
}

fn kernels() -> Vec<&'static dyn Kernels> {
    let k = available();
    assert_eq!(
        k.last().unwrap().name(),
        "scalar",
        "the scalar reference is always available, last"
    );
    k
}

/// Asserts `got` is within `rel * mag + abs` of `want`, element by element.
fn assert_close(what: &str, got: &[f32], want: &[f32], mag: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for i in 0..got.len() {
        let tol = rel * mag[i] + 1e-30;
        assert!(
            (got[i] - want[i]).abs() <= tol && got[i].is_finite(),
            "{what}: element {i}: got {}, want {} (|diff| {:e} > tol {tol:e})",
            got[i],
            want[i],
            (got[i] - want[i]).abs()
        );
    }
}

/// The shapes every matmul test covers: (cols, total rows, row range, tokens).
fn matmul_cases(cols_list: &[usize]) -> Vec<(usize, usize, Range<usize>, usize)> {
    let mut cases = Vec::new();
    for &cols in cols_list {
        // Keep the scalar reference affordable on wide rows.
        let big = cols > 1000;
        let token_counts: &[usize] = if big {
            &[1, 3, 8, 64]
        } else {
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 24, 33, 40, 64]
        };
        for &n in token_counts {
            let (total, ranges): (usize, Vec<Range<usize>>) = if big {
                (11, vec![0..11, 5..10])
            } else {
                (19, vec![0..19, 0..1, 3..8, 1..14, 18..19, 4..4])
            };
            for r in ranges {
                cases.push((cols, total, r, n));
            }
        }
    }
    cases
}

/// Runs `matmul` (pack, then `matmul_rows`) on every implementation and the reference, and
/// compares. `mag(r, t)` is the sum of |terms| of row `r` · token `t`.
fn check_matmul(
    what: &str,
    w: &Weight<'_>,
    x: &Acts<'_>,
    rows: Range<usize>,
    rel: f32,
    mag: impl Fn(usize, usize) -> f32,
) {
    let n = x.n_tokens(w.cols);
    let len = rows.len() * n;
    let mut want = vec![f32::NAN; len];
    Scalar.matmul(w, *x, rows.clone(), &mut want);
    let mags: Vec<f32> = rows
        .clone()
        .flat_map(|r| (0..n).map(move |t| (r, t)))
        .map(|(r, t)| mag(r, t))
        .collect();
    for k in kernels() {
        // A longer output than needed: the kernel must leave the rest alone.
        let mut got = vec![f32::NAN; len + 3];
        got[len..].fill(-7.0);
        k.matmul(w, *x, rows.clone(), &mut got);
        let ctx = format!(
            "{} {what} cols {} rows {rows:?} of {} tokens {n}",
            k.name(),
            w.cols,
            w.rows
        );
        assert_close(&ctx, &got[..len], &want, &mags, rel);
        assert!(
            got[len..].iter().all(|&v| v == -7.0),
            "{ctx}: wrote past its rows"
        );
    }
}

const QUANT_REL: f32 = 1e-5;

/// Σ|w_j·x_j| of one block pair: the scale of the rounding errors that
/// summing the exact integer products in another order can introduce.
fn q4_block_mag(w: &BlockQ4_0, x: &BlockQ8_0) -> f32 {
    let q = |j: usize| if j < QK / 2 { w.qs[j] & 0x0F } else { w.qs[j - QK / 2] >> 4 } as i32 - 8;
    let s: i32 = (0..QK).map(|j| (q(j) * x.qs[j] as i32).abs()).sum();
    s as f32 * (w.scale() * x.scale())
}

fn q8_block_mag(w: &BlockQ8_0, x: &BlockQ8_0) -> f32 {
    let s: i32 =
        w.qs.iter()
            .zip(&x.qs)
            .map(|(&a, &b)| (a as i32 * b as i32).abs())
            .sum();
    s as f32 * (w.scale() * x.scale())
}
const FLOAT_REL: f32 = 1e-5;

/// Q4_K/Q5_K: the magnitudes of the two terms each super-block's float
/// arithmetic combines, d·Σ sc·|q·x| and dmin·Σ m·|Σx|.
fn scale_min_k_mag<B: ScaleMinBlock>(w: &B, x: &BlockQ8K) -> f32 {
    let mut s = 0.0f32;
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, w.scales());
        let dot: i32 = (32 * j..32 * j + 32)
            .map(|i| (w.level(i) as i32 * x.qs[i] as i32).abs())
            .sum();
        let sum = (x.bsums[2 * j] as i32 + x.bsums[2 * j + 1] as i32).abs();
        s += w.d() * (sc as i32 * dot) as f32 + w.dmin() * (m as i32 * sum) as f32;
    }
    s * x.d
}

fn q6_k_mag(w: &BlockQ6K, x: &BlockQ8K) -> f32 {
    let s: i32 = (0..QK_K)
        .map(|i| (w.scales[i / 16] as i32 * w.level(i) as i32 * x.qs[i] as i32).abs())
        .sum();
    s as f32 * w.d() * x.d
}

/// A k-quant product on every set against the reference, over widths of
/// 1, 2, 3, 16 and 43 super-blocks (the 7B MLP padded to 11008) and every
/// token count the tiles split differently.
fn check_k_quant<B: bytemuck::Pod>(
    ty: GgmlType,
    seed: u64,
    extreme: bool,
    blocks: impl Fn(&mut Rng, usize) -> Vec<B>,
    block_mag: impl Fn(&B, &BlockQ8K) -> f32,
) {
    let mut rng = Rng(seed);
    for (cols, total, rows, n) in matmul_cases(&[256, 512, 768, 4096, 11008]) {
        let nb = cols / QK_K;
        let wb = blocks(&mut rng, total * nb);
        let xb = rng.q8_k_blocks(n * nb, extreme);
        let w = Weight {
            ty,
            rows: total,
            cols,
            data: bytemuck::cast_slice(&wb),
        };
        let mag = |r: usize, t: usize| -> f32 {
            (0..nb)
                .map(|b| block_mag(&wb[r * nb + b], &xb[t * nb + b]))
                .sum()
        };
        check_matmul(ty.name(), &w, &Acts::Q8K(&xb), rows, QUANT_REL, mag);
    }
}

#[test]
fn matmul_q4_k_matches_reference() {
    let mag = scale_min_k_mag::<BlockQ4K>;
    check_k_quant(GgmlType::Q4_K, 21, false, |r, n| r.q4_k_blocks(n), mag);
    check_k_quant(GgmlType::Q4_K, 22, true, |r, n| r.q4_k_blocks(n), mag);
}

#[test]
fn matmul_q5_k_matches_reference() {
    let mag = scale_min_k_mag::<BlockQ5K>;
    check_k_quant(GgmlType::Q5_K, 23, false, |r, n| r.q5_k_blocks(n), mag);
    check_k_quant(GgmlType::Q5_K, 24, true, |r, n| r.q5_k_blocks(n), mag);
}

#[test]
fn matmul_q6_k_matches_reference() {
    check_k_quant(GgmlType::Q6_K, 25, false, |r, n| r.q6_k_blocks(n), q6_k_mag);
    check_k_quant(GgmlType::Q6_K, 26, true, |r, n| r.q6_k_blocks(n), q6_k_mag);
}

/// All levels at their extremes (every nibble and high bit set, scales at
/// 63 or ±127/−128) against ±127 activations: the largest 16- and 32-bit
/// partial sums the integer paths can meet.
#[test]
fn matmul_k_quants_at_saturating_extremes_match_reference() {
    let mut rng = Rng(27);
    let nb = 16;
    let x = rng.q8_k_blocks(9 * nb, true); // 9 tokens: the lane kernel and its partial group
    let q4 = vec![
        BlockQ4K {
            d: rng.scale(),
            dmin: rng.scale(),
            scales: [0xFF; 12],
            qs: [0xFF; 128]
        };
        5 * nb
    ];
    let q5 = vec![
        BlockQ5K {
            d: rng.scale(),
            dmin: rng.scale(),
            scales: [0xFF; 12],
            qh: [0xFF; 32],
            qs: [0xFF; 128]
        };
        5 * nb
    ];
    let q6 = [-128i8, 127].map(|sc| {
        vec![
            BlockQ6K {
                ql: [0xFF; 128],
                qh: [0xFF; 64],
                scales: [sc; 16],
                d: rng.scale()
            };
            5 * nb
        ]
    });
    let check = |ty: GgmlType, data: &[u8], mag: &dyn Fn(usize, usize) -> f32| {
        let w = Weight {
            ty,
            rows: 5,
            cols: nb * QK_K,
            data,
        };
        check_matmul(ty.name(), &w, &Acts::Q8K(&x), 0..5, QUANT_REL, mag);
    };
    check(GgmlType::Q4_K, bytemuck::cast_slice(&q4), &|r, t| {
        (0..nb)
            .map(|b| scale_min_k_mag(&q4[r * nb + b], &x[t * nb + b]))
            .sum()
    });
    check(GgmlType::Q5_K, bytemuck::cast_slice(&q5), &|r, t| {
        (0..nb)
            .map(|b| scale_min_k_mag(&q5[r * nb + b], &x[t * nb + b]))
            .sum()
    });
    for q6 in &q6 {
        check(GgmlType::Q6_K, bytemuck::cast_slice(q6), &|r, t| {
            (0..nb)
                .map(|b| q6_k_mag(&q6[r * nb + b], &x[t * nb + b]))
                .sum()
        });
    }
}

#[test]
fn matmul_q4_0_matches_reference() {
    let mut rng = Rng(1);
    for (cols, total, rows, n) in matmul_cases(&[32, 64, 96, 160, 416, 4096, 10944]) {
        let nb = cols / QK;
        let wb = rng.q4_blocks(total * nb);
        let xb = rng.q8_blocks(n * nb);
        let w = Weight {
            ty: GgmlType::Q4_0,
            rows: total,
            cols,
            data: bytemuck::cast_slice(&wb),
        };
        let mag = |r: usize, t: usize| -> f32 {
            (0..nb)
                .map(|b| q4_block_mag(&wb[r * nb + b], &xb[t * nb + b]))
                .sum()
        };
        check_matmul("q4_0", &w, &Acts::Q8_0(&xb), rows, QUANT_REL, mag);
    }
}

#[test]
fn q4_0_products_have_the_same_bits_at_any_token_count() {
    let mut rng = Rng(2);
    let sets: Vec<_> = kernels()
        .into_iter()
        .filter(|k| common::Q4_0_SAME_BITS_AT_ANY_BATCH.contains(&k.name()))
        .collect();
    assert!(sets.iter().any(|k| k.name() == "scalar"));
    #[cfg(target_arch = "x86_64")]
    assert!(
        !is_x86_feature_detected!("avx2") || sets.iter().any(|k| k.name() == "avx2"),
        "the AVX2 set is checked where the CPU has it"
    );
    for cols in [32, 96, 4096] {
        let (rows, nb) = (21, cols / QK);
        let wb = rng.q4_blocks(rows * nb);
        let w = Weight {
            ty: GgmlType::Q4_0,
            rows,
            cols,
            data: bytemuck::cast_slice(&wb),
        };
        let tokens = 20;
        let xb = rng.q8_blocks(tokens * nb);
        for k in &sets {
            // Each token alone.
            let mut alone = vec![0.0f32; rows * tokens];
            for t in 0..tokens {
                let mut o = vec![0.0f32; rows];
                k.matmul(&w, Acts::Q8_0(&xb[t * nb..(t + 1) * nb]), 0..rows, &mut o);
                for r in 0..rows {
                    alone[r * tokens + t] = o[r];
                }
            }
            // Every batch size from 1 to 20 tokens, starting at each token
            // where the batch fits; row ranges that cut tiles.
            for n in 1..=tokens {
                for t0 in (0..=tokens - n).step_by(3) {
                    let x = Acts::Q8_0(&xb[t0 * nb..(t0 + n) * nb]);
                    for range in [0..rows, 3..rows - 1] {
                        let mut got = vec![0.0f32; range.len() * n];
                        k.matmul(&w, x, range.clone(), &mut got);
                        for (i, r) in range.clone().enumerate() {
                            for t in 0..n {
                                let (g, a) = (got[i * n + t], alone[r * tokens + t0 + t]);
                                assert!(
                                    g.to_bits() == a.to_bits(),
                                    "{} cols {cols} rows {range:?} tokens {t0}..{}: row {r} token {}: {g} batched, {a} alone",
                                    k.name(),
                                    t0 + n,
                                    t0 + t
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The extremes of the integer paths: nibbles all 0 or all 15 (weights -8
/// and 7) against activations all ±127 or ±128 in whole blocks, where 16-bit
/// partial sums come closest to overflowing; token counts that fill the
/// prefill tiles' lanes exactly and partly; rows not a multiple of any tile.
#[test]
fn matmul_q4_0_extremes_match_reference() {
    let mut rng = Rng(14);
    for (cols, rows, n) in [
        (32, 9, 8),
        (96, 7, 17),
        (416, 13, 64),
        (10944, 5, 16),
        (4096, 6, 1),
        (160, 5, 3),
    ] {
        let nb = cols / QK;
        for (wbyte, xval) in [
            (0xFFu8, 127i8),
            (0xFF, -128),
            (0x00, 127),
            (0x00, -128),
            (0xF0, -127),
        ] {
            let mut wb = rng.q4_blocks(rows * nb);
            let mut xb = rng.q8_blocks(n * nb);
            // Every other block at the extreme, the rest random.
            for b in wb.iter_mut().step_by(2) {
                b.qs = [wbyte; QK / 2];
            }
            for b in xb.iter_mut().step_by(2) {
                b.qs = [xval; QK];
            }
            let w = Weight {
                ty: GgmlType::Q4_0,
                rows,
                cols,
                data: bytemuck::cast_slice(&wb),
            };
            let mag = |r: usize, t: usize| -> f32 {
                (0..nb)
                    .map(|b| q4_block_mag(&wb[r * nb + b], &xb[t * nb + b]))
                    .sum()
            };
            check_matmul(
                &format!("q4_0 extremes {wbyte:#x}/{xval}"),
                &w,
                &Acts::Q8_0(&xb),
                0..rows,
                QUANT_REL,
                mag,
            );
        }
    }
}

#[test]
fn matmul_q8_0_matches_reference() {
    let mut rng = Rng(2);
    for (cols, total, rows, n) in matmul_cases(&[32, 64, 96, 160, 416, 4096, 10944]) {
        let nb = cols / QK;
        let wb = rng.q8_blocks(total * nb);
        let xb = rng.q8_blocks(n * nb);
        let w = Weight {
            ty: GgmlType::Q8_0,
            rows: total,
            cols,
            data: bytemuck::cast_slice(&wb),
        };
        let mag = |r: usize, t: usize| -> f32 {
            (0..nb)
                .map(|b| q8_block_mag(&wb[r * nb + b], &xb[t * nb + b]))
                .sum()
        };
        check_matmul("q8_0", &w, &Acts::Q8_0(&xb), rows, QUANT_REL, mag);
    }
}

/// Plain float rows may have any length, so the column tails matter too.
const FLOAT_COLS: [usize; 12] = [1, 7, 8, 13, 32, 64, 96, 127, 160, 416, 4096, 10944];

#[test]
fn matmul_f16_matches_reference() {
    let mut rng = Rng(3);
    for (cols, total, rows, n) in matmul_cases(&FLOAT_COLS) {
        let wv: Vec<f16> = rng
            .vec(total * cols)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let x = rng.vec(n * cols);
        let w = Weight {
            ty: GgmlType::F16,
            rows: total,
            cols,
            data: bytemuck::cast_slice(&wv),
        };
        let mag = |r: usize, t: usize| -> f32 {
            (0..cols)
                .map(|c| (wv[r * cols + c].to_f32() * x[t * cols + c]).abs())
                .sum()
        };
        check_matmul("f16", &w, &Acts::F32(&x), rows, FLOAT_REL, mag);
    }
}

#[test]
fn matmul_f32_matches_reference() {
    let mut rng = Rng(4);
    for (cols, total, rows, n) in matmul_cases(&FLOAT_COLS) {
        let wv = rng.vec(total * cols);
        let x = rng.vec(n * cols);
        let w = Weight {
            ty: GgmlType::F32,
            rows: total,
            cols,
            data: bytemuck::cast_slice(&wv),
        };
        let mag = |r: usize, t: usize| -> f32 {
            (0..cols)
                .map(|c| (wv[r * cols + c] * x[t * cols + c]).abs())
                .sum()
        };
        check_matmul("f32", &w, &Acts::F32(&x), rows, FLOAT_REL, mag);
    }
}

#[test]
fn matmul_rejects_mismatched_activation_format() {
    for k in kernels() {
        let wb = [BlockQ4_0 {
            d: 0,
            qs: [0; QK / 2],
        }];
        let w = Weight {
            ty: GgmlType::Q4_0,
            rows: 1,
            cols: QK,
            data: bytemuck::cast_slice(&wb),
        };
        let x = [0.0f32; QK];
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            k.matmul(&w, Acts::F32(&x), 0..1, &mut [0.0])
        }));
        assert!(
            r.is_err(),
            "{}: Q4_0 weights with f32 activations must panic",
            k.name()
        );
    }
}

/// A packed layout is private to the set that wrote it: handing it to
/// another set (or using it with a weight of another type) must panic
/// rather than read it as something else.
#[test]
fn matmul_rejects_activations_packed_by_another_set_or_for_another_type() {
    let mut rng = Rng(21);
    let (cols, n) = (4 * QK, 5);
    let q4 = rng.q4_blocks(2 * cols / QK);
    let q8 = rng.q8_blocks(2 * cols / QK);
    let x = rng.q8_blocks(n * cols / QK);
    let w4 = Weight {
        ty: GgmlType::Q4_0,
        rows: 2,
        cols,
        data: bytemuck::cast_slice(&q4),
    };
    let w8 = Weight {
        ty: GgmlType::Q8_0,
        rows: 2,
        cols,
        data: bytemuck::cast_slice(&q8),
    };
    let all = kernels();
    for a in &all {
        let mut buf = PackBuf::default();
        let packed = a.pack(&w4, Acts::Q8_0(&x), &mut buf);
        for b in &all {
            let mut out = vec![0.0; 2 * n];
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                b.matmul_rows(&w4, &packed, 0..2, &mut out)
            }));
            assert_eq!(
                r.is_ok(),
                a.name() == b.name(),
                "packed by {} used by {}",
                a.name(),
                b.name()
            );
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            a.matmul_rows(&w8, &packed, 0..2, &mut [0.0; 10])
        }));
        assert!(
            r.is_err(),
            "{}: Q4_0 packing used for Q8_0 weights must panic",
            a.name()
        );
    }
}

/// Quantizes `x` with every implementation and demands the reference's bytes.
fn check_quantize(what: &str, x: &[f32]) {
    let nb = x.len() / QK;
    let mut want = vec![
        BlockQ8_0 {
            d: 0xFFFF,
            qs: [99; QK]
        };
        nb
    ];
    Scalar.quantize_q8_0(x, &mut want);
    for k in kernels() {
        let mut got = vec![
            BlockQ8_0 {
                d: 0xFFFF,
                qs: [99; QK]
            };
            nb
        ];
        k.quantize_q8_0(x, &mut got);
        for (b, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g,
                w,
                "{} quantize_q8_0 {what}: block {b} of {nb}, input {:?}",
                k.name(),
                &x[b * QK..(b + 1) * QK]
            );
        }
    }
}

#[test]
fn quantize_q8_0_is_bit_exact_on_random_rows() {
    let mut rng = Rng(5);
    for n in [32, 64, 96, 160, 4096, 10944] {
        for _ in 0..4 {
            check_quantize(&format!("random {n}"), &rng.vec(n));
        }
    }
    // Magnitudes from subnormal to huge: the scale's f16 rounding, its
    // underflow to zero and overflow to infinity.
    for e in [-140, -126, -100, -30, -10, 0, 10, 60, 100, 125, 127] {
        let s = 2f32.powi(e);
        let x: Vec<f32> = rng.vec(256).into_iter().map(|v| v * s).collect();
        check_quantize(&format!("scale 2^{e}"), &x);
    }
}

#[test]
fn quantize_q8_0_is_bit_exact_on_ties_and_edge_blocks() {
    let mut rng = Rng(6);
    let mut x = Vec::new();
    // amax 127 → d = 1 and id = 1, amax 63.5 → d = 0.5 and id = 2: both
    // exact, so x·id lands exactly on .5 where roundf (away from zero) and
    // round-to-even disagree (0.5, 2.5, -2.5, ...).
    for (amax, step) in [(127.0f32, 1.0f32), (63.5, 0.5)] {
        let mut b = [0.0f32; QK];
        b[0] = amax;
        for (j, v) in b.iter_mut().enumerate().skip(1) {
            let k = j as f32 - 16.0; // -15..=15
            *v = (k + 0.5) * step;
        }
        x.extend_from_slice(&b);
        x.extend(b.iter().map(|v| -v));
    }
    // Random ties: every value a half-integer below amax = 127.
    for _ in 0..8 {
        x.push(if rng.below(2) == 0 { 127.0 } else { -127.0 });
        for _ in 1..QK {
            x.push(rng.below(254) as f32 - 126.5);
        }
    }
    x.extend([0.0; QK]);
    x.extend([-0.0; QK]);
    x.extend([3.0; QK]);
    x.extend([-1e-3; QK]);
    x.extend([f32::MIN_POSITIVE / 8.0; QK]);
    // One outlier among tiny values; values that round to zero.
    let mut b = [1e-6f32; QK];
    b[31] = -1000.0;
    x.extend_from_slice(&b);
    check_quantize("ties and edge blocks", &x);
}

#[test]
fn quantize_q8_0_matches_on_non_finite_input() {
    // Not expected from a healthy model, but both implementations must
    // agree, so a NaN never turns into a kernel-dependent result.
    let mut x: Vec<f32> = (0..4 * QK).map(|i| (i as f32 - 60.0) * 0.37).collect();
    x[3] = f32::NAN;
    x[QK + 5] = f32::INFINITY;
    x[2 * QK + 7] = f32::NEG_INFINITY;
    x[3 * QK..].fill(f32::NAN);
    check_quantize("non-finite", &x);
}

#[test]
fn quantize_q8_0_fills_only_whole_blocks() {
    let x: Vec<f32> = (0..3 * QK + 5).map(|i| i as f32).collect();
    for k in kernels() {
        let mut y = vec![
            BlockQ8_0 {
                d: 0xABCD,
                qs: [7; QK]
            };
            5
        ];
        k.quantize_q8_0(&x, &mut y);
        let mut want = vec![
            BlockQ8_0 {
                d: 0xABCD,
                qs: [7; QK]
            };
            5
        ];
        Scalar.quantize_q8_0(&x, &mut want);
        assert_eq!(y, want, "{}", k.name());
    }
}

const VEC_LENS: [usize; 16] = [
    0, 1, 2, 7, 8, 9, 13, 31, 32, 33, 64, 80, 127, 128, 1000, 4096,
];

#[test]
fn dot_f32_matches_reference() {
    let mut rng = Rng(7);
    for n in VEC_LENS {
        let (a, b) = (rng.vec(n), rng.vec(n));
        let want = Scalar.dot_f32(&a, &b);
        let mag: f32 = a.iter().zip(&b).map(|(x, y)| (x * y).abs()).sum();
        for k in kernels() {
            assert_close(
                &format!("{} dot_f32 len {n}", k.name()),
                &[k.dot_f32(&a, &b)],
                &[want],
                &[mag],
                FLOAT_REL,
            );
        }
    }
}

#[test]
fn dot_f16_matches_reference() {
    let mut rng = Rng(8);
    for n in VEC_LENS {
        let a = rng.vec(n);
        let b: Vec<f16> = rng.vec(n).into_iter().map(f16::from_f32).collect();
        let want = Scalar.dot_f16(&a, &b);
        let mag: f32 = a.iter().zip(&b).map(|(x, y)| (x * y.to_f32()).abs()).sum();
        for k in kernels() {
            assert_close(
                &format!("{} dot_f16 len {n}", k.name()),
                &[k.dot_f16(&a, &b)],
                &[want],
                &[mag],
                FLOAT_REL,
            );
        }
    }
}

#[test]
fn dots_use_the_shorter_length() {
    let mut rng = Rng(9);
    let (a, b) = (rng.vec(77), rng.vec(45));
    let bh: Vec<f16> = b.iter().copied().map(f16::from_f32).collect();
    let mag: f32 = a.iter().zip(&b).map(|(x, y)| (x * y).abs()).sum();
    for k in kernels() {
        for (x, y) in [(&a, &b), (&b, &a)] {
            assert_close(
                "dot_f32 uneven",
                &[k.dot_f32(x, y)],
                &[Scalar.dot_f32(x, y)],
                &[mag],
                FLOAT_REL,
            );
        }
        assert_close(
            "dot_f16 uneven",
            &[k.dot_f16(&a, &bh)],
            &[Scalar.dot_f16(&a, &bh)],
            &[mag * 2.0],
            FLOAT_REL,
        );
    }
}

/// `y + a·x` differs from the reference only by one rounding (fused or
/// not), so each element is compared against |y| + |a·x|.
fn axpy_mag(a: f32, x: impl Iterator<Item = f32>, y: &[f32]) -> Vec<f32> {
    x.zip(y).map(|(x, y)| y.abs() + (a * x).abs()).collect()
}

#[test]
fn axpy_f32_matches_reference() {
    let mut rng = Rng(10);
    for n in VEC_LENS {
        let (x, y0, a) = (rng.vec(n), rng.vec(n + 3), rng.unit() * 3.0);
        let mut want = y0.clone();
        Scalar.axpy_f32(a, &x, &mut want);
        let mut mag = axpy_mag(a, x.iter().copied(), &y0);
        mag.extend([0.0; 3]); // past x's end y must be untouched
        for k in kernels() {
            let mut got = y0.clone();
            k.axpy_f32(a, &x, &mut got);
            assert_close(
                &format!("{} axpy_f32 len {n}", k.name()),
                &got,
                &want,
                &mag,
                2.0 * f32::EPSILON,
            );
        }
    }
}

#[test]
fn axpy_f16_matches_reference() {
    let mut rng = Rng(11);
    for n in VEC_LENS {
        let x: Vec<f16> = rng.vec(n + 2).into_iter().map(f16::from_f32).collect();
        let (y0, a) = (rng.vec(n), rng.unit() * 3.0);
        let mut want = y0.clone();
        Scalar.axpy_f16(a, &x, &mut want);
        let mag = axpy_mag(a, x.iter().map(|v| v.to_f32()), &y0);
        for k in kernels() {
            let mut got = y0.clone();
            k.axpy_f16(a, &x, &mut got);
            assert_close(
                &format!("{} axpy_f16 len {n}", k.name()),
                &got,
                &want,
                &mag,
                2.0 * f32::EPSILON,
            );
        }
    }
}

// ------------------------------------------------ Q8_0 KV cache attention

impl Rng {
    /// A block scale for the Q8_0 KV cache tests: mostly typical, but also
    /// 0, f16 subnormals, tiny and huge normals up to f16's largest, and
    /// negative ones (the kernels must not assume a sign).
    fn kv_scale(&mut self) -> u16 {
        let bits = match self.below(8) {
            0 => 0,
            1 => 1 + self.below(0x3FF) as u16, // subnormal, 2^-24..2^-14
            2 => f16::from_f32(1e-4 * (0.1 + self.unit().abs())).to_bits(),
            3 => f16::MAX.to_bits(),
            4 => f16::from_f32(100.0 + 30000.0 * self.unit().abs()).to_bits(),
            _ => self.scale(),
        };
        bits | if self.below(6) == 0 { 0x8000 } else { 0 }
    }

    /// `n` Q8_0 blocks as a KV cache holds them (see [`Rng::kv_scale`]),
    /// with values over the whole i8 range, -128 included (which
    /// `quantize_q8_0` never writes), and now and then a block of extremes.
    fn kv_blocks(&mut self, n: usize) -> Vec<BlockQ8_0> {
        (0..n)
            .map(|_| {
                let extreme = self.below(5) == 0;
                BlockQ8_0 {
                    d: self.kv_scale(),
                    qs: std::array::from_fn(|_| match (extreme, self.below(2)) {
                        (true, 0) => -128,
                        (true, _) => 127,
                        _ => self.next_u64() as i8,
                    }),
                }
            })
            .collect()
    }

    /// `n` activation values scaled by one of tiny, ordinary, large.
    fn kv_vec(&mut self, n: usize) -> Vec<f32> {
        let s = [1e-6, 1.0, 1e4][self.below(3) as usize];
        self.vec(n).into_iter().map(|v| v * s).collect()
    }
}

/// The f32 values of Q8_0 blocks, through the library's `dequantize_row`.
fn dequant_q8_0(b: &[BlockQ8_0]) -> Vec<f32> {
    let mut out = vec![0.0; QK * b.len()];
    crystald::quant::dequantize_row(GgmlType::Q8_0, bytemuck::cast_slice(b), &mut out);
    out
}

/// Block counts of the Q8_0 attention tests: every count up to 13 (odd and
/// even, for the kernels that take blocks in pairs), several times each.
fn kv_cases() -> impl Iterator<Item = usize> {
    (0..6).flat_map(|_| 1..=13)
}

#[test]
fn dot_q8_0_matches_reference() {
    let mut rng = Rng(30);
    for nb in kv_cases() {
        let (a, b) = (rng.kv_vec(QK * nb), rng.kv_blocks(nb));
        let want = Scalar.dot_q8_0(&a, &b);
        let mag: f32 = a
            .iter()
            .zip(dequant_q8_0(&b))
            .map(|(x, y)| (x * y).abs())
            .sum();
        for k in kernels() {
            assert_close(
                &format!("{} dot_q8_0 {nb} blocks", k.name()),
                &[k.dot_q8_0(&a, &b)],
                &[want],
                &[mag],
                FLOAT_REL,
            );
        }
    }
}

/// The scalar `axpy_q8_0` rounds `a·(d·q)` (`d·q` is exact); the SIMD sets
/// round `a·d` once per block and fuse the multiply-add, so an element can
/// differ by up to about two f32 epsilons of `|y| + |a·x|`.
#[test]
fn axpy_q8_0_matches_reference() {
    let mut rng = Rng(31);
    for nb in kv_cases() {
        let x = rng.kv_blocks(nb);
        let y0 = rng.kv_vec(QK * nb);
        let a = rng.unit() * [1e-3, 1.0, 30.0][rng.below(3) as usize];
        let mut want = y0.clone();
        Scalar.axpy_q8_0(a, &x, &mut want);
        let mag = axpy_mag(a, dequant_q8_0(&x).into_iter(), &y0);
        for k in kernels() {
            let mut got = y0.clone();
            k.axpy_q8_0(a, &x, &mut got);
            assert_close(
                &format!("{} axpy_q8_0 {nb} blocks", k.name()),
                &got,
                &want,
                &mag,
                4.0 * f32::EPSILON,
            );
        }
    }
}

/// The oracle itself: the scalar kernels equal dequantizing with
/// `quant::dequantize_row` and computing in f64, within 1e-6 of the sum of
/// the terms' magnitudes (dot) or of `|y| + |a·x|` (axpy).
#[test]
fn q8_0_attention_oracle_matches_f64_dequantize_then_dot() {
    let mut rng = Rng(32);
    for nb in kv_cases() {
        let (a, b) = (rng.kv_vec(QK * nb), rng.kv_blocks(nb));
        let x = dequant_q8_0(&b);
        let exact: f64 = a.iter().zip(&x).map(|(&p, &q)| p as f64 * q as f64).sum();
        let mag: f64 = a
            .iter()
            .zip(&x)
            .map(|(&p, &q)| (p as f64 * q as f64).abs())
            .sum();
        let got = Scalar.dot_q8_0(&a, &b) as f64;
        assert!(
            (got - exact).abs() <= 1e-6 * mag + 1e-30,
            "dot_q8_0 {nb} blocks: {got} vs f64 {exact} (magnitude {mag})"
        );

        let s = rng.unit() * 3.0;
        let mut y = a.clone();
        Scalar.axpy_q8_0(s, &b, &mut y);
        for (i, ((&got, &y0), &x)) in y.iter().zip(&a).zip(&x).enumerate() {
            let exact = y0 as f64 + s as f64 * x as f64;
            let mag = (y0 as f64).abs() + (s as f64 * x as f64).abs();
            assert!(
                (got as f64 - exact).abs() <= 1e-6 * mag + 1e-30,
                "axpy_q8_0 {nb} blocks, element {i}: {got} vs f64 {exact}"
            );
        }
    }
}

/// What the KV cache does: rows quantized by `quantize_q8_0`, then scored
/// and summed, at the head sizes models use; every set agrees with the
/// oracle on its own quantized rows.
#[test]
fn q8_0_attention_on_quantized_rows_matches_reference() {
    let mut rng = Rng(33);
    for head_dim in [32, 64, 96, 128, 160, 256] {
        let (q, kv) = (rng.vec(head_dim), rng.vec(head_dim));
        for k in kernels() {
            let mut blocks = vec![BlockQ8_0 { d: 0, qs: [0; QK] }; head_dim / QK];
            k.quantize_q8_0(&kv, &mut blocks);
            let x = dequant_q8_0(&blocks);
            let mag: f32 = q.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
            assert_close(
                &format!("{} dot_q8_0 head_dim {head_dim}", k.name()),
                &[k.dot_q8_0(&q, &blocks)],
                &[Scalar.dot_q8_0(&q, &blocks)],
                &[mag],
                FLOAT_REL,
            );
            let mut want = q.clone();
            Scalar.axpy_q8_0(0.25, &blocks, &mut want);
            let mut got = q.clone();
            k.axpy_q8_0(0.25, &blocks, &mut got);
            let mag = axpy_mag(0.25, x.into_iter(), &q);
            assert_close(
                &format!("{} axpy_q8_0 head_dim {head_dim}", k.name()),
                &got,
                &want,
                &mag,
                4.0 * f32::EPSILON,
            );
        }
    }
}

/// The f32 side must hold exactly one value per quantized value: a short or
/// long row is a caller bug, and every set panics rather than reading or
/// writing part of it.
#[test]
fn q8_0_attention_rejects_mismatched_lengths() {
    let b = Rng(34).kv_blocks(3);
    for k in kernels() {
        for n in [0, 3 * QK - 1, 3 * QK + 1, 4 * QK] {
            let a = vec![1.0f32; n];
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| k.dot_q8_0(&a, &b)));
            assert!(
                r.is_err(),
                "{}: dot_q8_0 with {n} values for 3 blocks",
                k.name()
            );
            let mut y = a.clone();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                k.axpy_q8_0(1.0, &b, &mut y)
            }));
            assert!(
                r.is_err(),
                "{}: axpy_q8_0 with {n} values for 3 blocks",
                k.name()
            );
            assert!(
                y.iter().all(|&v| v == 1.0),
                "{}: axpy_q8_0 wrote before panicking",
                k.name()
            );
        }
        assert_eq!(k.dot_q8_0(&[], &[]), 0.0);
        k.axpy_q8_0(1.0, &[], &mut []);
    }
}

/// Forcing a set this CPU lacks (every build knows the other architecture's
/// names, so some always are), or a name no set has, is an error that names
/// what was asked for and lists what is available, never a fallback.
#[test]
fn forcing_a_set_the_cpu_lacks_is_an_error_listing_the_available_ones() {
    let avail: Vec<&str> = kernels().iter().map(|k| k.name()).collect();
    let missing: Vec<&str> = ["scalar", "avx2", "avx512", "neon", "neon-dotprod", "sse9"]
        .into_iter()
        .filter(|n| !avail.contains(n))
        .collect();
    assert!(missing.len() >= 3, "{missing:?}");
    for name in missing {
        let err = match select(Some(name)) {
            Ok(k) => panic!("'{name}' selected {}", k.name()),
            Err(e) => e,
        };
        assert!(err.contains(&format!("'{name}'")), "{err}");
        for a in &avail {
            assert!(err.contains(a), "{err} does not list {a}");
        }
    }
}

#[test]
fn every_available_implementation_can_be_selected_by_name() {
    for k in kernels() {
        assert_eq!(select(Some(k.name())).unwrap().name(), k.name());
    }
    assert_eq!(select(None).unwrap().name(), kernels()[0].name());
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        let best = if avx512 {
            "avx512"
        } else if avx2 {
            "avx2"
        } else {
            "scalar"
        };
        assert_eq!(
            select(None).unwrap().name(),
            best,
            "the best set this CPU supports is the default"
        );
        let names: Vec<&str> = kernels().iter().map(|k| k.name()).collect();
        assert_eq!(names.contains(&"avx512"), avx512, "{names:?}");
        assert_eq!(names.contains(&"avx2"), avx2, "{names:?}");
    }
}

/// CI runs this suite on emulated CPUs and says which implementations each
/// must offer, best first (`CRYSTALD_EXPECT_KERNELS=neon,scalar` for a
/// Cortex-A72), so a run that silently fell back to fewer kernels fails
/// instead of passing on the scalar reference alone.
#[test]
fn available_kernels_are_the_expected_ones() {
    let names: Vec<&str> = kernels().iter().map(|k| k.name()).collect();
    eprintln!("available kernels: {}", names.join(", "));
    if let Ok(want) = std::env::var("CRYSTALD_EXPECT_KERNELS") {
        let want: Vec<&str> = want.split(',').map(str::trim).collect();
        assert_eq!(names, want, "CRYSTALD_EXPECT_KERNELS");
    }
}

// ---------------------------------------------------------------- benchmarks

/// Nanoseconds this thread has spent on a CPU (Linux; 0 elsewhere).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Best time of `reps` runs of `f`, in seconds. Timed as this thread's CPU
/// time where the OS reports it, so that waiting for a core on a shared
/// machine does not count; wall time otherwise.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let (t, c) = (std::time::Instant::now(), thread_cpu_ns());
            f();
            let (wall, cpu) = (t.elapsed().as_secs_f64(), thread_cpu_ns() - c);
            if cpu > 0 {
                cpu as f64 * 1e-9
            } else {
                wall
            }
        })
        .fold(f64::INFINITY, f64::min)
}

/// Best wall time of `reps` runs of `f`, in seconds, for runs too short
/// for the CPU-time clock's resolution on some VMs (a scheduler tick).
fn best_wall(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Random weights of `ty` (`rows` × `cols`) and `n` tokens of the
/// activations it multiplies with, for the benchmarks.
fn bench_data(
    rng: &mut Rng,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    n: usize,
) -> (Vec<u8>, BenchActs) {
    let nb = cols / ty.block_size();
    let cast = |v: &[u8]| v.to_vec();
    match ty {
        GgmlType::Q4_0 => (
            cast(bytemuck::cast_slice(&rng.q4_blocks(rows * nb))),
            BenchActs::Q8_0(rng.q8_blocks(n * nb)),
        ),
        GgmlType::Q4_K => (
            cast(bytemuck::cast_slice(&rng.q4_k_blocks(rows * nb))),
            BenchActs::Q8K(rng.q8_k_blocks(n * nb, false)),
        ),
        GgmlType::Q5_K => (
            cast(bytemuck::cast_slice(&rng.q5_k_blocks(rows * nb))),
            BenchActs::Q8K(rng.q8_k_blocks(n * nb, false)),
        ),
        GgmlType::Q6_K => (
            cast(bytemuck::cast_slice(&rng.q6_k_blocks(rows * nb))),
            BenchActs::Q8K(rng.q8_k_blocks(n * nb, false)),
        ),
        _ => unreachable!("benchmarks cover the 4-6 bit types"),
    }
}

enum BenchActs {
    Q8_0(Vec<BlockQ8_0>),
    Q8K(Vec<BlockQ8K>),
}

impl BenchActs {
    fn acts(&self) -> Acts<'_> {
        match self {
            BenchActs::Q8_0(x) => Acts::Q8_0(x),
            BenchActs::Q8K(x) => Acts::Q8K(x),
        }
    }
}

const BENCH_TYPES: [GgmlType; 4] = [
    GgmlType::Q4_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Decode: 7B-shape matrices (25 MB at 4.5 bits) times one token, one
/// thread, per quantized type. "hot": one matrix (cache-resident on
/// large-L3 servers); "DRAM": 32 copies cycled (800 MB), so weights come
/// from memory as in real decoding.
#[test]
#[ignore]
fn bench_decode() {
    // The MLP down projection's shape, then up/gate's (rows of 4096), at
    // the k-quants' padded width.
    for ty in BENCH_TYPES {
        for (rows, cols) in [(4096, 11008), (11008, 4096)] {
            bench_decode_shape(ty, rows, cols);
        }
    }
}

fn bench_decode_shape(ty: GgmlType, rows: usize, cols: usize) {
    let mut rng = Rng(12);
    let copies = 32;
    let (mats, x): (Vec<Vec<u8>>, Vec<BenchActs>) = (0..copies)
        .map(|_| bench_data(&mut rng, ty, rows, cols, 1))
        .unzip();
    let x = &x[0];
    let bytes = mats[0].len() as f64;
    let mut out = vec![0.0f32; rows];
    for k in kernels() {
        let w = |i: usize| Weight {
            ty,
            rows,
            cols,
            data: &mats[i],
        };
        let mut buf = PackBuf::default();
        let xp = k.pack(&w(0), x.acts(), &mut buf);
        let hot = best_of(5, || k.matmul_rows(&w(0), &xp, 0..rows, &mut out));
        let reps = if k.name() == "scalar" { 1 } else { 3 };
        let cold = best_of(reps, || {
            for i in 0..copies {
                k.matmul_rows(&w(i), &xp, 0..rows, &mut out);
            }
        });
        println!(
            "{ty} decode {rows}x{cols} {:>6}: hot {:6.2} GB/s ({:.2} ms), DRAM {:6.2} GB/s",
            k.name(),
            bytes / hot / 1e9,
            hot * 1e3,
            bytes * copies as f64 / cold / 1e9
        );
    }
}

/// Batched decode: 7B-shape matrices (the MLP up projection, 11008 × 4096)
/// times 1 to 8 tokens, one thread, weights cycled through 32 copies so
/// they come from memory as in real decoding. Reported per token count as
/// time and as tokens per second relative to one token: the gain several
/// sequences decoding together get from each weight pass.
#[test]
#[ignore]
fn bench_few_tokens() {
    let (rows, cols, copies) = (11008, 4096, 32);
    for ty in BENCH_TYPES {
        let mut rng = Rng(14);
        let (mats, xs): (Vec<Vec<u8>>, Vec<BenchActs>) = (0..copies)
            .map(|_| bench_data(&mut rng, ty, rows, cols, 8))
            .unzip();
        for k in kernels().into_iter().filter(|k| k.name() != "scalar") {
            let mut one = 0.0;
            let w = |i: usize| Weight {
                ty,
                rows,
                cols,
                data: &mats[i],
            };
            let nb = cols / ty.block_size();
            for n in 1..=8 {
                let acts = match &xs[0] {
                    BenchActs::Q8_0(x) => Acts::Q8_0(&x[..n * nb]),
                    BenchActs::Q8K(x) => Acts::Q8K(&x[..n * nb]),
                };
                let mut buf = PackBuf::default();
                let xp = k.pack(&w(0), acts, &mut buf);
                let mut out = vec![0.0f32; rows * n];
                let t = best_wall(5, || {
                    for i in 0..copies {
                        k.matmul_rows(&w(i), &xp, 0..rows, &mut out);
                    }
                }) / copies as f64;
                // The first 1024 rows again and again (2-4 MB, in cache):
                // the arithmetic alone.
                let hot_rows = 1024;
                let hot = best_wall(5, || {
                    for _ in 0..32 {
                        k.matmul_rows(&w(0), &xp, 0..hot_rows, &mut out[..hot_rows * n]);
                    }
                }) / 32.0
                    * (rows as f64 / hot_rows as f64);
                if n == 1 {
                    one = t;
                }
                println!(
                    "{ty} {rows}x{cols} x {n} tokens {:>6}: {:6.2} ms, {:5.2}x the tokens/s of 1; in cache {:6.2} ms",
                    k.name(),
                    t * 1e3,
                    one * n as f64 / t,
                    hot * 1e3
                );
            }
        }
    }
}

/// Prefill: one matrix times 64 tokens, one thread, per quantized type.
/// Reported as weight GB/s (each weight read once per 64 tokens) and
/// multiply-adds per second.
#[test]
#[ignore]
fn bench_prefill() {
    let (cols, n) = (11008, 64);
    for ty in BENCH_TYPES {
        let mut rng = Rng(13);
        for k in kernels() {
            // The scalar path is slow: fewer rows keep the run short.
            let rows = if k.name() == "scalar" { 256 } else { 4096 };
            let (wb, x) = bench_data(&mut rng, ty, rows, cols, n);
            let w = Weight {
                ty,
                rows,
                cols,
                data: &wb,
            };
            let mut out = vec![0.0f32; rows * n];
            // Best of many: on a shared machine the minimum is the run that had a core.
            let reps = if k.name() == "scalar" { 3 } else { 25 };
            let mut buf = PackBuf::default();
            let xp = k.pack(&w, x.acts(), &mut buf);
            let t = best_of(reps, || k.matmul_rows(&w, &xp, 0..rows, &mut out));
            println!(
                "{ty} prefill {rows}x{cols} x {n} tokens {:>6}: {:6.3} GB/s of weights, {:6.2} G MAC/s, {:.1} ms",
                k.name(),
                wb.len() as f64 / t / 1e9,
                (rows * cols * n) as f64 / t / 1e9,
                t * 1e3
            );
        }
    }
}

/// Attention over a cached head, one thread: `positions` keys scored with
/// one query (`dot_*`), then as many values summed (`axpy_*`), for a KV
/// cache in f32, f16 and Q8_0. Reported per cached position and as KV bytes
/// read per second (the cache is 4 MB or less in Q8_0/f16, so mostly L2/L3).
#[test]
#[ignore]
fn bench_attention() {
    let (head_dim, positions) = (128, 4096);
    let mut rng = Rng(35);
    let q = rng.vec(head_dim);
    let rows = rng.vec(head_dim * positions);
    let rows_f16: Vec<f16> = rows.iter().copied().map(f16::from_f32).collect();
    let nb = head_dim / QK;
    let mut rows_q8 = vec![BlockQ8_0 { d: 0, qs: [0; QK] }; nb * positions];
    Scalar.quantize_q8_0(&rows, &mut rows_q8);
    let mut scores = vec![0.0f32; positions];
    let mut out = vec![0.0f32; head_dim];
    for k in kernels() {
        let reps = if k.name() == "scalar" { 5 } else { 50 };
        let report = |what: &str, bytes: usize, t: f64| {
            println!(
                "attention {what:<10} head_dim {head_dim} x {positions} {:>12}: {:6.2} ns/position, {:6.2} GB/s",
                k.name(),
                t / positions as f64 * 1e9,
                bytes as f64 / t / 1e9
            )
        };
        let t = best_of(reps, || {
            for (s, r) in scores.iter_mut().zip(rows.chunks_exact(head_dim)) {
                *s = k.dot_f32(&q, r);
            }
        });
        report("dot_f32", rows.len() * 4, t);
        let t = best_of(reps, || {
            for (s, r) in scores.iter_mut().zip(rows_f16.chunks_exact(head_dim)) {
                *s = k.dot_f16(&q, r);
            }
        });
        report("dot_f16", rows.len() * 2, t);
        let t = best_of(reps, || {
            for (s, r) in scores.iter_mut().zip(rows_q8.chunks_exact(nb)) {
                *s = k.dot_q8_0(&q, r);
            }
        });
        report("dot_q8_0", rows_q8.len() * 34, t);
        let t = best_of(reps, || {
            for r in rows.chunks_exact(head_dim) {
                k.axpy_f32(1e-4, r, &mut out);
            }
        });
        report("axpy_f32", rows.len() * 4, t);
        let t = best_of(reps, || {
            for r in rows_f16.chunks_exact(head_dim) {
                k.axpy_f16(1e-4, r, &mut out);
            }
        });
        report("axpy_f16", rows.len() * 2, t);
        let t = best_of(reps, || {
            for r in rows_q8.chunks_exact(nb) {
                k.axpy_q8_0(1e-4, r, &mut out);
            }
        });
        report("axpy_q8_0", rows_q8.len() * 34, t);
        std::hint::black_box((&scores, &out));
    }
}
