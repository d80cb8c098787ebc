//! x86-64 kernels for CPUs with AVX-512 F/BW/VL and VNNI (Ice Lake and
//! later Xeon and Core, AMD Zen 4 and 5): the Q4_0 products, which is where
//! decode and prefill spend their time. Everything else (Q8_0 and float
//! products, quantization, attention) is the AVX2 code, which these CPUs
//! also run, reached through the [`Avx2`] value that detection yields.
//!
//! **Decode** streams Q4_0 rows at one 64-byte load per three blocks. Three
//! blocks are 54 bytes (scale, 16 nibble bytes, three times), so one masked
//! load takes them as they lie in the file, without any shuffle: the nibble
//! byte `j` of block `k` sits at byte `18k + 2 + j`. The activations are
//! packed to match ([`Triple`]): `x[j]` at that byte in one vector (for the
//! low nibbles), `x[j + 16]` in another (high nibbles), zero under the
//! scale bytes. `vpdpbusd` (u8 × i8, four products summed per 32-bit lane)
//! then multiplies the masked low and high nibbles with them in place. The
//! lanes split cleanly: lanes 0-4 hold block 0, 5-8 block 1, 9-13 block 2,
//! so one int→float conversion and one fused multiply-add with per-lane
//! scales (the weight scales, gathered from the same load by one word
//! permute, times the activation scales) finish three blocks. About ten
//! vector instructions per three blocks instead of about ten per block.
//!
//! **Prefill** puts sixteen tokens across the lanes of a 512-bit register
//! ([`Lane16`]), the design of the AVX2 lane kernel: four unsigned weight
//! bytes broadcast to every lane meet four activation bytes of each of the
//! sixteen tokens in one `vpdpbusd`.
//!
//! The `- 8` of Q4_0 comes off as a precomputed activation sum, as in the
//! AVX2 kernels; integer sums are exact, so the results differ from the
//! scalar oracle only in the order the float block terms are added.
//!
//! Safety: an [`Avx512`] exists only after [`Avx512::detect`] saw every
//! feature in the `target_feature` lists below; the functions here require
//! nothing else. Weight loads are masked to the bytes of the blocks they
//! read (masked-off bytes are not accessed and cannot fault); other loads
//! read fixed-size arrays of slices whose length was checked first.

use super::avx2::{unpack_q4_0, Avx2, NextTile};
use super::{Acts, Kernels, PackBuf, Packed, Weight};
use crate::quant::{BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlType, QK};
use half::f16;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// The AVX-512 kernels. Holding one proves the CPU check passed; `avx2` is
/// the AVX2 set, for the operations this set does not redo.
pub struct Avx512 {
    avx2: &'static Avx2,
}

impl Avx512 {
    /// The kernels, if this CPU (and OS) supports AVX-512 F/BW/VL/VNNI as
    /// well as AVX2, FMA and F16C.
    pub fn detect() -> Option<&'static Avx512> {
        static AVX512: std::sync::OnceLock<Option<Avx512>> = std::sync::OnceLock::new();
        AVX512
            .get_or_init(|| {
                let avx2 = Avx2::detect()?;
                (is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni"))
                .then_some(Avx512 { avx2 })
            })
            .as_ref()
    }
}

/// Decode tile: weight rows per pass (independent FMA chains, and more
/// reads in flight). 8 streamed a little faster than 4 from a mapped file
/// (`bench_q4_0_decode`-style runs, within their noise).
const DECODE_ROWS: usize = 8;
/// Tokens per tile of the triple kernel when a product has a few tokens.
const FEW_TOKENS: usize = 4;
/// Bytes of three Q4_0 blocks.
const TRIPLE_BYTES: usize = 3 * std::mem::size_of::<BlockQ4_0>();

/// Tokens per lane group of the prefill kernel: one 32-bit lane each.
const LANES: usize = 16;
/// Prefill tile: weight rows × lane groups per pass.
const LANE_ROWS: usize = 2;
const LANE_GROUPS: usize = 4;
/// From this many tokens on, Q4_0 products use the lane kernel.
const LANES_MIN_TOKENS: usize = 8;

fn uses_lanes(n: usize) -> bool {
    n >= LANES_MIN_TOKENS
}

impl Kernels for Avx512 {
    fn name(&self) -> &'static str {
        "avx512"
    }

    fn pack<'a>(&self, w: &Weight<'_>, x: Acts<'a>, buf: &'a mut PackBuf) -> Packed<'a> {
        let (n, nb) = (x.n_tokens(w.cols), w.cols / QK);
        match (w.ty, x) {
            (GgmlType::Q4_0, Acts::Q8_0(a)) if uses_lanes(n) => {
                let lanes = buf.take::<Lane16>(n.div_ceil(LANES) * nb);
                pack_lanes(&a[..n * nb], nb, n, lanes);
                Packed::with_layout(self.name(), w, x, lanes)
            }
            (GgmlType::Q4_0, Acts::Q8_0(a)) => {
                let triples = buf.take::<Triple>(n * nb.div_ceil(3));
                pack_triples(&a[..n * nb], nb, n, triples);
                Packed::with_layout(self.name(), w, x, triples)
            }
            // The AVX2 layout, claimed for this set (only it reads it here).
            _ => Packed {
                by: self.name(),
                ..self.avx2.pack(w, x, buf)
            },
        }
    }

    fn matmul_q4_0(&self, w: &[BlockQ4_0], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        let n = x.n;
        if nb == 0 {
            out.fill(0.0);
        } else if uses_lanes(n) {
            UNPACKED.with_borrow_mut(|wu| {
                // SAFETY: `self` exists only after `detect` saw the features.
                unsafe { matmul_q4_0_lanes(w, nb, x.layout(), n, out, wu) }
            })
        } else {
            // SAFETY: as above.
            unsafe { matmul_q4_0_triples(w, nb, x.layout(), n, out) }
        }
    }

    fn matmul_q8_0(&self, w: &[BlockQ8_0], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        self.avx2.matmul_q8_0(w, nb, x, out)
    }

    // k-quants: the AVX2 kernels (already integer-bound on the 256-bit
    // unpacking; a 512-bit version is future work, README "k-quants").
    fn matmul_q4_k(&self, w: &[BlockQ4K], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        self.avx2.matmul_q4_k(w, nb, x, out)
    }

    fn matmul_q5_k(&self, w: &[BlockQ5K], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        self.avx2.matmul_q5_k(w, nb, x, out)
    }

    fn matmul_q6_k(&self, w: &[BlockQ6K], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        self.avx2.matmul_q6_k(w, nb, x, out)
    }

    fn matmul_f16(&self, w: &[f16], cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
        self.avx2.matmul_f16(w, cols, x, n, out)
    }

    fn matmul_f32(&self, w: &[f32], cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
        self.avx2.matmul_f32(w, cols, x, n, out)
    }

    fn quantize_q8_0(&self, x: &[f32], y: &mut [BlockQ8_0]) {
        self.avx2.quantize_q8_0(x, y)
    }

    fn dot_f32(&self, a: &[f32], b: &[f32]) -> f32 {
        self.avx2.dot_f32(a, b)
    }

    fn dot_f16(&self, a: &[f32], b: &[f16]) -> f32 {
        self.avx2.dot_f16(a, b)
    }

    fn axpy_f32(&self, a: f32, x: &[f32], y: &mut [f32]) {
        self.avx2.axpy_f32(a, x, y)
    }

    fn axpy_f16(&self, a: f32, x: &[f16], y: &mut [f32]) {
        self.avx2.axpy_f16(a, x, y)
    }

    fn dot_q8_0(&self, a: &[f32], b: &[BlockQ8_0]) -> f32 {
        self.avx2.dot_q8_0(a, b)
    }

    fn axpy_q8_0(&self, a: f32, x: &[BlockQ8_0], y: &mut [f32]) {
        self.avx2.axpy_q8_0(a, x, y)
    }
}

// ---------------------------------------------------------------- decode: three blocks per load

/// One token's activations for three consecutive blocks, laid out to meet
/// a 64-byte load of the three Q4_0 blocks as they lie in the file (see the
/// module comment). Missing blocks of a row's last triple are zeros.
#[derive(Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
#[repr(C, align(64))]
struct Triple {
    /// `x[j]` of block `k` at byte `18k + 2 + j`, zero elsewhere.
    lo: [i8; 64],
    /// `x[j + 16]` of block `k` at byte `18k + 2 + j`.
    hi: [i8; 64],
    /// `-8 ·` the sum of the activation bytes that meet each lane.
    negbias: [i32; 16],
    /// Each lane's activation scale (that of the block it holds).
    d: [f32; 16],
}

/// The block a 32-bit lane of a triple holds: lanes 0-4 block 0, 5-8
/// block 1, 9-13 block 2; 14 and 15 see only zero activations.
fn lane_block(lane: usize) -> usize {
    match lane {
        0..=4 => 0,
        5..=8 => 1,
        _ => 2,
    }
}

/// Packs `n` tokens of `nb` blocks into `ceil(nb / 3)` triples each,
/// token-major.
fn pack_triples(x: &[BlockQ8_0], nb: usize, n: usize, out: &mut [Triple]) {
    let ng = nb.div_ceil(3);
    assert!(x.len() == n * nb && out.len() == n * ng);
    for (xt, ot) in x.chunks_exact(nb).zip(out.chunks_exact_mut(ng)) {
        for (blocks, o) in xt.chunks(3).zip(ot.iter_mut()) {
            *o = bytemuck::Zeroable::zeroed();
            for (k, b) in blocks.iter().enumerate() {
                let at = 18 * k + 2;
                o.lo[at..at + 16].copy_from_slice(&b.qs[..16]);
                o.hi[at..at + 16].copy_from_slice(&b.qs[16..]);
            }
            for lane in 0..16 {
                let bytes = o.lo[4 * lane..4 * lane + 4]
                    .iter()
                    .chain(&o.hi[4 * lane..4 * lane + 4]);
                o.negbias[lane] = -8 * bytes.map(|&v| v as i32).sum::<i32>();
                o.d[lane] = blocks
                    .get(lane_block(lane))
                    .map_or(0.0, |b| f16::from_bits(b.d).to_f32());
            }
        }
    }
}

/// The word permutation that puts, for each 32-bit lane, the f16 scale of
/// its block (word `9k` of a triple's load) in word `lane`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn scale_index() -> __m512i {
    let words: [u16; 32] = std::array::from_fn(|lane| 9 * lane_block(lane.min(15)) as u16);
    _mm512_loadu_si512(words.as_ptr().cast())
}

/// The weight scale of each lane's block, widened to f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn triple_scales(wv: __m512i, idx: __m512i) -> __m512 {
    _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(idx, wv)))
}

/// `R` weight rows × `T` tokens of Q4_0 × Q8_0 on triples: `w` holds the
/// rows (`nb` blocks each), `x` the tokens' triples (`ng` each, token-major)
/// starting at token `t0`, and row `r` · token `t0 + t` goes to
/// `out[r * n + t0 + t]`.
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_triples<const R: usize, const T: usize>(
    w: &[BlockQ4_0],
    nb: usize,
    x: &[Triple],
    ng: usize,
    t0: usize,
    out: &mut [f32],
    n: usize,
) {
    assert!(ng == nb.div_ceil(3) && w.len() >= R * nb && x.len() >= (t0 + T) * ng);
    assert!(t0 + T <= n && out.len() >= (R - 1) * n + t0 + T);
    let (low, idx) = (_mm512_set1_epi8(0x0F), scale_index());
    let (wp, xp) = (w.as_ptr().cast::<u8>(), x.as_ptr());
    let row_bytes = nb * std::mem::size_of::<BlockQ4_0>();
    let ahead = NextTile::new(wp, R * row_bytes, ng);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    for g in 0..ng {
        ahead.step(g);
        // 54 bytes for a whole triple; 18 or 36 for a row's last, short one.
        let mask: __mmask64 = (1u64 << (18 * (nb - 3 * g).min(3))) - 1;
        for r in 0..R {
            // SAFETY: row r < R lies within w (asserted), and the masked
            // load touches only the bytes of blocks 3g.. of that row.
            let p = wp.add(r * row_bytes + g * TRIPLE_BYTES);
            let wv = _mm512_maskz_loadu_epi8(mask, p.cast());
            let lo = _mm512_and_si512(wv, low);
            let hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low);
            let dw = triple_scales(wv, idx);
            for t in 0..T {
                // SAFETY: (t0 + t) * ng + g < (t0 + T) * ng <= x.len().
                let xt = &*xp.add((t0 + t) * ng + g);
                let i = _mm512_load_si512(xt.negbias.as_ptr().cast());
                let i = _mm512_dpbusd_epi32(i, lo, _mm512_load_si512(xt.lo.as_ptr().cast()));
                let i = _mm512_dpbusd_epi32(i, hi, _mm512_load_si512(xt.hi.as_ptr().cast()));
                let d = _mm512_mul_ps(dw, _mm512_load_ps(xt.d.as_ptr()));
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), d, acc[r][t]);
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            out[r * n + t0 + t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
}

/// Runs `tile_triples::<R, _>` over tokens `t0..t0 + T` for `T` up to
/// [`FEW_TOKENS`].
macro_rules! few_tokens {
    ($R:expr, $w:expr, $nb:expr, $x:expr, $ng:expr, $t0:expr, $tn:expr, $out:expr, $n:expr) => {
        match $tn {
            4 => tile_triples::<$R, 4>($w, $nb, $x, $ng, $t0, $out, $n),
            3 => tile_triples::<$R, 3>($w, $nb, $x, $ng, $t0, $out, $n),
            2 => tile_triples::<$R, 2>($w, $nb, $x, $ng, $t0, $out, $n),
            _ => tile_triples::<$R, 1>($w, $nb, $x, $ng, $t0, $out, $n),
        }
    };
}

/// Q4_0 rows `w` × `n` tokens packed as triples: tokens in tiles of up to
/// [`FEW_TOKENS`] outside, rows inside, so each tile streams the weights
/// once.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn matmul_q4_0_triples(w: &[BlockQ4_0], nb: usize, x: &[Triple], n: usize, out: &mut [f32]) {
    let ng = nb.div_ceil(3);
    let rows = w.len() / nb;
    let mut t0 = 0;
    while t0 < n {
        let tn = FEW_TOKENS.min(n - t0);
        let mut r = 0;
        while rows - r >= DECODE_ROWS {
            let (wr, or) = (&w[r * nb..(r + DECODE_ROWS) * nb], &mut out[r * n..]);
            few_tokens!(DECODE_ROWS, wr, nb, x, ng, t0, tn, or, n);
            r += DECODE_ROWS;
        }
        while r < rows {
            let (wr, or) = (&w[r * nb..(r + 1) * nb], &mut out[r * n..]);
            few_tokens!(1, wr, nb, x, ng, t0, tn, or, n);
            r += 1;
        }
        t0 += tn;
    }
}

// ---------------------------------------------------------------- prefill: 16 tokens across lanes

/// Block `b` of sixteen tokens' activations, transposed: `q[k]` holds bytes
/// `4k..4k + 4` of token `t`'s block in 32-bit lane `t`. Tokens past the
/// end of a last, partial group are zeros, and their lanes are never stored.
#[derive(Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
#[repr(C, align(64))]
struct Lane16 {
    q: [[i8; 64]; 8],
    /// `-8 · Σ q` per lane: the correction for unsigned nibbles.
    negbias: [i32; LANES],
    d: [f32; LANES],
}

/// Packs `n` tokens of `nb` blocks into `ceil(n / 16) * nb` lane blocks,
/// group-major: block `b` of group `g` at `g * nb + b`.
fn pack_lanes(x: &[BlockQ8_0], nb: usize, n: usize, out: &mut [Lane16]) {
    let groups = n.div_ceil(LANES);
    assert!(x.len() == n * nb && out.len() == groups * nb);
    for (g, og) in out.chunks_exact_mut(nb).enumerate() {
        for (b, o) in og.iter_mut().enumerate() {
            *o = bytemuck::Zeroable::zeroed();
            for t in 0..LANES.min(n - g * LANES) {
                let blk = &x[(g * LANES + t) * nb + b];
                for k in 0..8 {
                    o.q[k][4 * t..4 * t + 4].copy_from_slice(&blk.qs[4 * k..4 * k + 4]);
                }
                o.negbias[t] = -8 * blk.qs.iter().map(|&v| v as i32).sum::<i32>();
                o.d[t] = f16::from_bits(blk.d).to_f32();
            }
        }
    }
}

thread_local! {
    /// Per-thread weights unpacked for the lane kernel (see the AVX2 set).
    static UNPACKED: RefCell<Vec<__m256i>> = const { RefCell::new(Vec::new()) };
}

/// `R` weight rows × `G` lane groups of Q4_0 × Q8_0: `w` holds the rows,
/// `wu` the same rows unpacked to bytes, `x` the groups (`nb` lane blocks
/// each) starting at token `t0`; row `r` · token `t` goes to
/// `out[r * n + t]` for the tokens below `n`.
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_lanes<const R: usize, const G: usize>(
    w: &[BlockQ4_0],
    wu: &[__m256i],
    nb: usize,
    x: &[Lane16],
    out: &mut [f32],
    n: usize,
    t0: usize,
) {
    assert!(w.len() >= R * nb && wu.len() >= R * nb && x.len() >= G * nb);
    assert!(t0 < n && out.len() >= (R - 1) * n + n);
    let (wp, up, xp) = (w.as_ptr(), wu.as_ptr(), x.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); G]; R];
    for b in 0..nb {
        for r in 0..R {
            // SAFETY: r < R and b < nb, and w.len(), wu.len() >= R * nb
            // (asserted); the 8 i32 read from `col` are that __m256i's bytes.
            let dw = _mm512_cvtph_ps(_mm256_set1_epi16((*wp.add(r * nb + b)).d as i16));
            let col = up.add(r * nb + b).cast::<i32>();
            let mut s = [_mm512_setzero_si512(); G];
            for g in 0..G {
                // SAFETY: g < G and b < nb, and x.len() >= G * nb (asserted).
                let xb = &*xp.add(g * nb + b);
                s[g] = _mm512_load_si512(xb.negbias.as_ptr().cast());
            }
            for k in 0..8 {
                let wb = _mm512_set1_epi32(*col.add(k));
                for g in 0..G {
                    // SAFETY: as above.
                    let xb = &*xp.add(g * nb + b);
                    let q = _mm512_load_si512(xb.q[k].as_ptr().cast());
                    s[g] = _mm512_dpbusd_epi32(s[g], wb, q);
                }
            }
            for g in 0..G {
                // SAFETY: as above.
                let xb = &*xp.add(g * nb + b);
                let d = _mm512_mul_ps(dw, _mm512_load_ps(xb.d.as_ptr()));
                acc[r][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[g]), d, acc[r][g]);
            }
        }
    }
    for r in 0..R {
        for g in 0..G {
            let mut v = [0.0f32; LANES];
            _mm512_storeu_ps(v.as_mut_ptr(), acc[r][g]);
            super::store_lanes(&mut out[r * n..(r + 1) * n], t0 + g * LANES, &v);
        }
    }
}

/// Prefill of Q4_0 rows × `n` tokens with the lane kernel: rows outside, so
/// a tile's weights are read from memory once, unpacked into `wu` (in L1)
/// and reused by every token group.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn matmul_q4_0_lanes(
    w: &[BlockQ4_0],
    nb: usize,
    x: &[Lane16],
    n: usize,
    out: &mut [f32],
    wu: &mut Vec<__m256i>,
) {
    lanes_matmul!(
        tile_lanes,
        LANES,
        LANE_ROWS,
        LANE_GROUPS,
        w,
        nb,
        x,
        n,
        out,
        wu
    )
}
