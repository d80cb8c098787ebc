//! x86-64 kernels for CPUs with AVX2, FMA and F16C (Haswell and later, Zen).
//!
//! Matrix products work on register tiles of `R` weight rows × `T` tokens:
//! each weight block is loaded and unpacked once per tile and reused for
//! `T` tokens, each activation block once and reused for `R` rows. Decode
//! (one token) is bound by how fast the weights stream from memory, so it
//! uses a few rows at once (independent streams and accumulator chains);
//! prefill is bound by the integer multiply, so it uses many tokens per
//! unpacked weight block.
//!
//! Q4_0, the format most models here use, has two kernels that put one
//! row · token product in each 32-bit lane, so the 8 column sums of a block
//! never need a horizontal reduction: 8 weight rows per register for up to
//! 8 tokens (decode, a few requests decoding together) and 8 tokens per
//! register beyond (prefill). Both do the same exact integer block sums and
//! the same float steps, so a product's bits do not depend on the batch it
//! ran in.
//!
//! Every intrinsic needs the three features, so all SIMD code lives in
//! `unsafe fn`s with `#[target_feature]`; the only way to call them is
//! through an [`Avx2`] value, and the only way to get one is [`Avx2::detect`],
//! which checks the CPU. Loads go through fixed-size arrays or slices whose
//! length was checked just before, so no load can leave its buffer.

mod kquants;

use super::scalar::{check_q8_0_len, q8k_acts};
use super::{Acts, Kernels, PackBuf, Packed, Weight};
use crate::quant::{BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlType, QK};
use half::f16;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// The AVX2 kernels. The private field keeps it from being built outside
/// this module, so holding one proves the CPU check passed.
pub struct Avx2 {
    _checked: (),
}

static AVX2: Avx2 = Avx2 { _checked: () };

impl Avx2 {
    /// The kernels, if this CPU (and OS) supports AVX2, FMA and F16C.
    pub fn detect() -> Option<&'static Avx2> {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            Some(&AVX2)
        } else {
            None
        }
    }

    /// A k-quant product: the lane kernel from [`kquants::LANES_MIN_TOKENS`]
    /// tokens on (`pack` chose the layout by the same rule).
    fn matmul_k<B: kquants::KBlock>(&self, w: &[B], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        if x.n >= kquants::LANES_MIN_TOKENS {
            // SAFETY: `self` exists only after `detect` saw avx2, fma and f16c.
            unsafe { kquants::matmul_lanes(w, nb, x.layout(), x.n, out) }
        } else {
            // SAFETY: as above.
            unsafe { kquants::matmul(w, nb, q8k_acts(x), x.n, out) }
        }
    }
}

/// Q8_0 decode tile: rows per pass for one token. Four streams keep the
/// prefetchers busy and give four independent FMA chains.
const DECODE_ROWS: usize = 4;
/// Q8_0 tile for more tokens: weight rows × tokens per pass, sized so the
/// accumulators, weights and constants fit the 16 ymm registers. Tokens
/// are packed in groups of `PREFILL_TOKENS`, which is also the Q4_0 row
/// tile's largest token count.
const PREFILL_ROWS: usize = 2;
const PREFILL_TOKENS: usize = 4;
/// How far ahead of the current block the weight unpacking of the lane
/// kernel asks for weights, in blocks.
const PREFETCH_BLOCKS: usize = 16;

impl Kernels for Avx2 {
    fn name(&self) -> &'static str {
        "avx2"
    }

    fn pack<'a>(&self, w: &Weight<'_>, x: Acts<'a>, buf: &'a mut PackBuf) -> Packed<'a> {
        let (n, nb) = (x.n_tokens(w.cols), w.cols / w.ty.block_size());
        match (w.ty, x) {
            (GgmlType::Q4_0, Acts::Q8_0(a)) if uses_lanes(n) => {
                let lanes = buf.take::<LaneBlock>(n.div_ceil(LANES) * nb);
                // SAFETY: `self` exists only after `detect` saw avx2, fma and f16c.
                unsafe { pack_lanes(&a[..n * nb], nb, n, lanes) };
                Packed::with_layout(self.name(), w, x, lanes)
            }
            (GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K, Acts::Q8K(a))
                if n >= kquants::LANES_MIN_TOKENS =>
            {
                let lanes = buf.take::<kquants::KLaneBlock>(n.div_ceil(LANES) * nb);
                // SAFETY: as above.
                unsafe { kquants::pack_lanes(&a[..n * nb], nb, n, lanes) };
                Packed::with_layout(self.name(), w, x, lanes)
            }
            (GgmlType::Q4_0 | GgmlType::Q8_0, Acts::Q8_0(a)) => {
                let blocks = buf.take::<TokBlock>(n * nb);
                // SAFETY: as above.
                unsafe { pack(&a[..n * nb], nb, n, blocks) };
                Packed::with_layout(self.name(), w, x, blocks)
            }
            _ => Packed::plain(self.name(), w, x),
        }
    }

    fn matmul_q4_0(&self, w: &[BlockQ4_0], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        let n = x.n;
        if uses_lanes(n) {
            UNPACKED.with_borrow_mut(|wu| {
                // SAFETY: `self` exists only after `detect` saw avx2, fma and f16c.
                unsafe { matmul_q4_0_lanes(w, nb, x.layout(), n, out, wu) }
            })
        } else {
            // SAFETY: as above.
            unsafe { matmul_q4_0(w, nb, x.layout(), n, out) }
        }
    }

    fn matmul_q8_0(&self, w: &[BlockQ8_0], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        // SAFETY: as above.
        unsafe { matmul_q8_0(w, nb, x.layout(), x.n, out) }
    }

    fn matmul_q4_k(&self, w: &[BlockQ4K], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        self.matmul_k(w, nb, x, out)
    }

    fn matmul_q5_k(&self, w: &[BlockQ5K], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        self.matmul_k(w, nb, x, out)
    }

    fn matmul_q6_k(&self, w: &[BlockQ6K], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        self.matmul_k(w, nb, x, out)
    }

    fn matmul_f16(&self, w: &[f16], cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
        // SAFETY: as above.
        unsafe { matmul_float(w, cols, x, n, out) }
    }

    fn matmul_f32(&self, w: &[f32], cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
        // SAFETY: as above.
        unsafe { matmul_float(w, cols, x, n, out) }
    }

    fn quantize_q8_0(&self, x: &[f32], y: &mut [BlockQ8_0]) {
        for (b, x) in y.iter_mut().zip(x.chunks_exact(QK)) {
            let x: &[f32; QK] = x.try_into().expect("chunks_exact gives QK values");
            // SAFETY: `self` exists only after `detect` saw avx2, fma and f16c.
            *b = unsafe { quantize_block_q8_0(x) };
        }
    }

    fn dot_f32(&self, a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        // SAFETY: CPU features as above; both slices are cut to the same length.
        unsafe { dot(&a[..n], &b[..n]) }
    }

    fn dot_f16(&self, a: &[f32], b: &[f16]) -> f32 {
        let n = a.len().min(b.len());
        // SAFETY: as above.
        unsafe { dot(&a[..n], &b[..n]) }
    }

    fn axpy_f32(&self, a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        // SAFETY: as above.
        unsafe { axpy(a, &x[..n], &mut y[..n]) }
    }

    fn axpy_f16(&self, a: f32, x: &[f16], y: &mut [f32]) {
        let n = x.len().min(y.len());
        // SAFETY: as above.
        unsafe { axpy(a, &x[..n], &mut y[..n]) }
    }

    fn dot_q8_0(&self, a: &[f32], b: &[BlockQ8_0]) -> f32 {
        check_q8_0_len("dot_q8_0", a.len(), b.len());
        // SAFETY: CPU features as above; the loads are bounds-checked slices.
        unsafe { dot_q8_0(a, b) }
    }

    fn axpy_q8_0(&self, a: f32, x: &[BlockQ8_0], y: &mut [f32]) {
        check_q8_0_len("axpy_q8_0", y.len(), x.len());
        // SAFETY: as above.
        unsafe { axpy_q8_0(a, x, y) }
    }
}

// Everything below: callers must make sure the CPU supports avx2, fma and
// f16c (holding an `Avx2` proves it). That is the only safety requirement;
// indexing is bounds-checked, and raw loads read whole fixed-size arrays or
// sub-slices whose length was just checked.

/// Sum of the eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_to_f32(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// An f32 or f16 element of float weights or the KV cache: everything the
/// float kernels need, so each is written once, generic over the element.
trait FloatElem: Copy {
    /// Eight values from `s[..8]` as f32 (`s` is cut to 8, so the load
    /// cannot leave it); callers have avx2, fma and f16c enabled.
    unsafe fn load8(s: &[Self]) -> __m256;
    fn to_f32(self) -> f32;
}

impl FloatElem for f32 {
    #[inline(always)]
    unsafe fn load8(s: &[f32]) -> __m256 {
        let s = &s[..8];
        _mm256_loadu_ps(s.as_ptr())
    }

    fn to_f32(self) -> f32 {
        self
    }
}

impl FloatElem for f16 {
    #[inline(always)]
    unsafe fn load8(s: &[f16]) -> __m256 {
        let s = &s[..8];
        _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr().cast()))
    }

    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// Eight f32 from `s[..8]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8(s: &[f32]) -> __m256 {
    f32::load8(s)
}

/// Hints that the cache line at `p` will be read soon. Prefetches never
/// fault, and `wrapping_add` by the caller keeps the address computation
/// defined even past the end of the buffer.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prefetch<T>(p: *const T) {
    _mm_prefetch(p.cast::<i8>(), _MM_HINT_T0);
}

/// Prefetches, into L2, the `bytes` of weights that follow a tile (the next
/// tile's rows), spread over the tile's `steps` loop steps so they arrive
/// during its time. One sequential prefetch stream a whole tile ahead keeps
/// enough reads in flight for a single thread to stream weights at DRAM
/// bandwidth; per-row hints a few hundred bytes ahead, or the hardware
/// prefetchers alone, reached about 60 % of it on the development machine
/// (several row streams, each crossing a page every few kilobytes).
#[derive(Clone, Copy)]
pub(super) struct NextTile {
    base: *const u8,
    /// Lines to have asked for after step `s`: `((s + 1) * rate) >> 16`.
    rate: usize,
}

impl NextTile {
    /// For a tile whose weights start at `tile` and take `bytes`.
    pub(super) fn new<T>(tile: *const T, bytes: usize, steps: usize) -> NextTile {
        NextTile {
            base: tile.cast::<u8>().wrapping_add(bytes),
            rate: (bytes.div_ceil(64) << 16) / steps.max(1) + 1,
        }
    }

    /// The prefetches of loop step `s`. Requires SSE (every x86-64 CPU).
    #[inline(always)]
    pub(super) unsafe fn step(self, s: usize) {
        let (from, to) = ((s * self.rate) >> 16, ((s + 1) * self.rate) >> 16);
        for line in from..to {
            // Prefetches never fault; `wrapping_add` keeps the address
            // computation defined even past the weights.
            _mm_prefetch(self.base.wrapping_add(line * 64).cast::<i8>(), _MM_HINT_T1);
        }
    }
}

/// One token's Q8_0 activation block, repacked for the tiles. Tokens come
/// in groups of `PREFILL_TOKENS` (the last group may be smaller), and within
/// a group block-major (`[block][token]`), so a tile walks one contiguous,
/// aligned stream instead of 34-byte strided rows; the scale is widened to
/// f32 once rather than once per weight row.
#[derive(Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
#[repr(C, align(32))]
struct TokBlock {
    q: [i8; QK],
    /// The scale in all 8 lanes, and (Q4_0 only) `8·Σ q` in all 8 lanes:
    /// the correction that turns a product with unsigned nibbles into one
    /// with `nibble - 8` (as in the lane kernel). Stored broadcast because
    /// a tile reads them as whole-register operands: a broadcast per use
    /// would take a shuffle port that the activation bytes' broadcasts
    /// already saturate.
    d: [f32; 8],
    bias: [i32; 8],
}

/// Whether a Q4_0 product over `n` tokens uses the lane kernel (packing and
/// product must agree).
fn uses_lanes(n: usize) -> bool {
    n >= LANES_MIN_TOKENS
}

thread_local! {
    /// Per-thread weights unpacked for the lane kernel, grown to the largest
    /// tile seen and reused (the pool's threads live as long as the model).
    static UNPACKED: RefCell<Vec<__m256i>> = const { RefCell::new(Vec::new()) };
}

/// Packs `n` tokens of `nb` blocks (`x.len() == n * nb`) into `p`
/// (`n * nb` long). The group of tokens `t0..t0 + g` starts at index
/// `t0 * nb`; block `b` of its token `t` is at `t0 * nb + b * g + t`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack(x: &[BlockQ8_0], nb: usize, n: usize, p: &mut [TokBlock]) {
    assert!(x.len() == n * nb && p.len() == n * nb);
    // Loops, not iterator closures: closures may not inherit the target features.
    let mut i = 0;
    let mut t0 = 0;
    while t0 < n {
        let g = PREFILL_TOKENS.min(n - t0);
        for b in 0..nb {
            for t in t0..t0 + g {
                let blk = &x[t * nb + b];
                let v = _mm256_loadu_si256(blk.qs.as_ptr().cast());
                let out = &mut p[i];
                _mm256_store_si256(out.q.as_mut_ptr().cast(), v);
                out.d = [half_to_f32(blk.d); 8];
                out.bias = [8 * blk.qs.iter().map(|&q| q as i32).sum::<i32>(); 8];
                i += 1;
            }
        }
        t0 += g;
    }
}

/// The weight block scale in all eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale8(bits: u16) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi16(bits as i16))
}

/// Checks the lengths a tile of `r` rows × `t` tokens (the token group
/// starting at `t0`) reads and writes, so the tile can index without
/// per-access checks: its largest activation index is
/// `t0 * nb + (nb - 1) * t + t - 1 < (t0 + t) * nb <= n * nb`.
fn check_tile<W>(r: usize, t: usize, nb: usize, w: &[W], x: Toks<'_>, t0: usize, out: &[f32]) {
    assert!(r >= 1 && t >= 1 && t0 + t <= x.n);
    assert!(w.len() >= r * nb && x.b.len() >= nb * x.n);
    assert!(out.len() >= (r - 1) * x.n + t0 + t);
}

/// `n` tokens packed by [`pack`].
#[derive(Clone, Copy)]
struct Toks<'a> {
    n: usize,
    b: &'a [TokBlock],
}

/// Weight rows per tile of the Q4_0 kernel for one to `PREFILL_TOKENS`
/// tokens: one per 32-bit lane.
const ROW_LANES: usize = 8;

/// Q4_0 × Q8_0 for `rows` (1..=8) weight rows × `T` tokens (the group
/// starting at `t0`), one row per 32-bit lane: the lane kernel turned
/// around. A 4 × 4 transpose of 32-bit words per register half puts bytes
/// `4k..4k + 4` of eight rows side by side, whose low and high nibbles are
/// elements `4k..` and `16 + 4k..`; each meets the matching 4 activation
/// bytes of a token, broadcast. `maddubs` results are summed over the 8
/// columns in 16 bits (|sum| ≤ 8 · 2 · 15 · 128 < 32768: exact), then one
/// widening, bias correction, conversion and scaling per token and block
/// serves 8 rows. The transpose is paid once per block for all `T` tokens.
///
/// Each lane does exactly the arithmetic of a lane of [`tile_q4_0_lanes`]
/// (exact block sum, `fma(sum, dw·dx, acc)` block by block), so a row ·
/// token product has the same bits whichever kernel, and however many
/// other tokens, it ran with: a request decodes the same alone or batched.
/// Missing rows of a last, partial tile repeat the last row and are not
/// stored.
// Tiles index several arrays by row and token; range loops say it plainest.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q4_0_rows<const T: usize>(
    w: &[BlockQ4_0],
    nb: usize,
    rows: usize,
    x: Toks<'_>,
    t0: usize,
    out: &mut [f32],
) {
    assert!((1..=ROW_LANES).contains(&rows));
    check_tile(rows, T, nb, w, x, t0, out);
    let n = x.n;
    let (wp, xp) = (w.as_ptr(), x.b.as_ptr());
    // Row i's first block; a partial tile's missing rows reread the last.
    let row = |i: usize| wp.wrapping_add(i.min(rows - 1) * nb);
    let rp: [*const BlockQ4_0; ROW_LANES] = std::array::from_fn(row);
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); T];
    let ahead = NextTile::new(wp, rows * nb * std::mem::size_of::<BlockQ4_0>(), nb);
    for b in 0..nb {
        ahead.step(b);
        // SAFETY: every rp[i] starts a row below `rows` and b < nb, and
        // check_tile saw w.len() >= rows * nb.
        let blk = |i: usize| &*rp[i].add(b);
        let qs = |i: usize| _mm_loadu_si128(blk(i).qs.as_ptr().cast());
        // Rows 0..4 in the low halves, 4..8 in the high halves.
        let a0 = _mm256_set_m128i(qs(4), qs(0));
        let a1 = _mm256_set_m128i(qs(5), qs(1));
        let a2 = _mm256_set_m128i(qs(6), qs(2));
        let a3 = _mm256_set_m128i(qs(7), qs(3));
        let (lo01, hi01) = (_mm256_unpacklo_epi32(a0, a1), _mm256_unpackhi_epi32(a0, a1));
        let (lo23, hi23) = (_mm256_unpacklo_epi32(a2, a3), _mm256_unpackhi_epi32(a2, a3));
        // Word k of every row's bytes, rows in lane order.
        let words = [
            _mm256_unpacklo_epi64(lo01, lo23),
            _mm256_unpackhi_epi64(lo01, lo23),
            _mm256_unpacklo_epi64(hi01, hi23),
            _mm256_unpackhi_epi64(hi01, hi23),
        ];
        let mut col = [_mm256_setzero_si256(); 8];
        for k in 0..4 {
            col[k] = _mm256_and_si256(words[k], low);
            col[4 + k] = _mm256_and_si256(_mm256_srli_epi16(words[k], 4), low);
        }
        // The 8 scales gathered in general-purpose registers, whose ALUs
        // are otherwise idle here, and moved over as two words.
        let d = |i: usize| blk(i).d as u64;
        let lo = d(0) | d(1) << 16 | d(2) << 32 | d(3) << 48;
        let hi = d(4) | d(5) << 16 | d(6) << 32 | d(7) << 48;
        let dw = _mm256_cvtph_ps(_mm_set_epi64x(hi as i64, lo as i64));
        for t in 0..T {
            // SAFETY: t0 * nb + b * T + t < n * nb, the length check_tile
            // saw (see there); TokBlock is 32-byte aligned, so its bytes
            // read as 8 aligned i32.
            let xb = &*xp.add(t0 * nb + b * T + t);
            let xq = xb.q.as_ptr().cast::<i32>();
            let mut s = _mm256_maddubs_epi16(col[0], _mm256_set1_epi32(*xq));
            for k in 1..8 {
                let p = _mm256_maddubs_epi16(col[k], _mm256_set1_epi32(*xq.add(k)));
                s = _mm256_add_epi16(s, p);
            }
            let bias = _mm256_load_si256(xb.bias.as_ptr().cast());
            let i = _mm256_sub_epi32(_mm256_madd_epi16(s, ones), bias);
            let dd = _mm256_mul_ps(dw, _mm256_load_ps(xb.d.as_ptr()));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), dd, acc[t]);
        }
    }
    for t in 0..T {
        let mut v = [0.0f32; ROW_LANES];
        _mm256_storeu_ps(v.as_mut_ptr(), acc[t]);
        for r in 0..rows {
            out[r * n + t0 + t] = v[r];
        }
    }
}

/// Q4_0 rows `w` × `n` tokens (fewer than the lane kernel takes), 8 rows
/// per tile; `out`: rows × `n`, grouped by row. Token groups inside, so a
/// tile's weights (8 rows, under 64 KB) are read from memory once and from
/// cache by the second group.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn matmul_q4_0(w: &[BlockQ4_0], nb: usize, x: &[TokBlock], n: usize, out: &mut [f32]) {
    if nb == 0 {
        out.fill(0.0);
        return;
    }
    let x = Toks { n, b: x };
    let rows = w.len() / nb;
    let mut r = 0;
    while r < rows {
        let m = ROW_LANES.min(rows - r);
        let (wr, or) = (&w[r * nb..(r + m) * nb], &mut out[r * n..(r + m) * n]);
        let mut t0 = 0;
        while t0 < n {
            let g = PREFILL_TOKENS.min(n - t0);
            match g {
                1 => tile_q4_0_rows::<1>(wr, nb, m, x, t0, or),
                2 => tile_q4_0_rows::<2>(wr, nb, m, x, t0, or),
                3 => tile_q4_0_rows::<3>(wr, nb, m, x, t0, or),
                _ => tile_q4_0_rows::<PREFILL_TOKENS>(wr, nb, m, x, t0, or),
            }
            t0 += g;
        }
        r += m;
    }
}

/// Q8_0 × Q8_0 tile. Both operands are signed, so the weight's sign moves
/// onto the activation (`sign`) and its magnitude is the unsigned operand.
/// Exact for values in -127..=127, the range `quantize_q8_0` produces.
// Tiles index several arrays by row and token; range loops say it plainest.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q8_0<const R: usize, const T: usize>(
    w: &[BlockQ8_0],
    nb: usize,
    x: Toks<'_>,
    t0: usize,
    out: &mut [f32],
) {
    check_tile(R, T, nb, w, x, t0, out);
    let n = x.n;
    let (wp, xp) = (w.as_ptr(), x.b.as_ptr());
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let ahead = NextTile::new(wp, R * nb * std::mem::size_of::<BlockQ8_0>(), nb);
    for b in 0..nb {
        ahead.step(b);
        let mut q = [_mm256_setzero_si256(); R];
        let mut mag = [_mm256_setzero_si256(); R];
        let mut dw = [_mm256_setzero_ps(); R];
        for r in 0..R {
            // SAFETY: r < R and b < nb, and check_tile saw w.len() >= R * nb.
            let blk = &*wp.add(r * nb + b);
            q[r] = _mm256_loadu_si256(blk.qs.as_ptr().cast());
            mag[r] = _mm256_sign_epi8(q[r], q[r]);
            dw[r] = scale8(blk.d);
        }
        for t in 0..T {
            // SAFETY: i < n * nb, the length check_tile saw (see there).
            let i = t0 * nb + b * T + t;
            let xb = &*xp.add(i);
            let (xv, dx) = (
                _mm256_load_si256(xb.q.as_ptr().cast()),
                _mm256_load_ps(xb.d.as_ptr()),
            );
            for r in 0..R {
                let p = _mm256_maddubs_epi16(mag[r], _mm256_sign_epi8(xv, q[r]));
                let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
                acc[r][t] = _mm256_fmadd_ps(s, _mm256_mul_ps(dw[r], dx), acc[r][t]);
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            out[r * n + t0 + t] = hsum(acc[r][t]);
        }
    }
}

/// Q8_0 rows `w` × `n` tokens with [`tile_q8_0`]; `out`: rows × `n`,
/// grouped by row.
///
/// Decode: `DECODE_ROWS` rows at a time straight through the weights.
/// More tokens: token groups outside, rows inside, so a group's packed
/// activations (`nb` × 4 tokens × 64 bytes, under 100 KB) stay cached
/// while the weights stream past once per group, reused by its tokens.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn matmul_q8_0(w: &[BlockQ8_0], nb: usize, x: &[TokBlock], n: usize, out: &mut [f32]) {
    if nb == 0 {
        out.fill(0.0);
        return;
    }
    let x = Toks { n, b: x };
    let rows = w.len() / nb;
    if n == 1 {
        let mut r = 0;
        while rows - r >= DECODE_ROWS {
            let (wr, or) = (
                &w[r * nb..(r + DECODE_ROWS) * nb],
                &mut out[r..r + DECODE_ROWS],
            );
            tile_q8_0::<DECODE_ROWS, 1>(wr, nb, x, 0, or);
            r += DECODE_ROWS;
        }
        for r in r..rows {
            tile_q8_0::<1, 1>(&w[r * nb..(r + 1) * nb], nb, x, 0, &mut out[r..r + 1]);
        }
        return;
    }
    // One tile per row pair and token group, so each weight block is
    // loaded once for all the group's tokens.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group<const R: usize>(
        w: &[BlockQ8_0],
        nb: usize,
        x: Toks<'_>,
        t0: usize,
        g: usize,
        out: &mut [f32],
    ) {
        match g {
            1 => tile_q8_0::<R, 1>(w, nb, x, t0, out),
            2 => tile_q8_0::<R, 2>(w, nb, x, t0, out),
            3 => tile_q8_0::<R, 3>(w, nb, x, t0, out),
            _ => tile_q8_0::<R, PREFILL_TOKENS>(w, nb, x, t0, out),
        }
    }
    let mut t0 = 0;
    while t0 < n {
        let g = PREFILL_TOKENS.min(n - t0);
        let mut r = 0;
        while rows - r >= PREFILL_ROWS {
            let (wr, or) = (
                &w[r * nb..(r + PREFILL_ROWS) * nb],
                &mut out[r * n..(r + PREFILL_ROWS) * n],
            );
            group::<PREFILL_ROWS>(wr, nb, x, t0, g, or);
            r += PREFILL_ROWS;
        }
        for r in r..rows {
            let (wr, or) = (&w[r * nb..(r + 1) * nb], &mut out[r * n..(r + 1) * n]);
            group::<1>(wr, nb, x, t0, g, or);
        }
        t0 += g;
    }
}

// ---------------------------------------------------------------- Q4_0 prefill, tokens across lanes

/// Tokens per lane group: one 32-bit lane of a ymm register each.
const LANES: usize = 8;
/// Prefill tile of the lane kernel: weight rows × lane groups (8 tokens)
/// per pass. The R · G accumulators, G partial sums and 4 weight broadcasts
/// fit the 16 ymm registers; each block of packed activations read from L2
/// serves R rows and each unpacked weight column G groups. 2 × 3 and 4 × 2
/// were the fastest of 2×2, 1×4, 4×1, 3×2, 2×3, 4×2 and 2×4 on the 2-core
/// development machine (`bench_q4_0_prefill`, within its noise).
const LANE_ROWS: usize = 2;
const LANE_GROUPS: usize = 3;
/// From this many tokens on, the lane kernel (weights unpacked once, 8
/// tokens per register) beats the row-lane tiles (weights transposed once
/// per 4 tokens). Below it, a lane group would be partly empty: at 5 to 8
/// tokens the row-lane tiles took 0.65 to 0.85 of the lane kernel's time
/// (`bench_few_tokens`, 11008 × 4096 from memory, one thread).
const LANES_MIN_TOKENS: usize = 9;

/// Block `b` of eight tokens' Q8_0 activations, transposed for the lane
/// kernel: `q[k]` holds bytes `4k..4k + 4` of token `t`'s block in 32-bit
/// lane `t`, so the 4 weight bytes `4k..4k + 4` broadcast to every lane
/// meet the matching 4 activation bytes of all eight tokens. Missing tokens
/// of a last, partial group are zeros (scale 0), and their lanes are never
/// stored.
#[derive(Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
#[repr(C, align(32))]
struct LaneBlock {
    q: [[u8; 32]; 8],
    /// `8·Σ q` per lane (i32): the correction for unsigned nibbles, as in
    /// [`tile_q4_0_rows`].
    bias: [i32; LANES],
    /// The activation scales, f32 per lane.
    d: [f32; LANES],
}

/// Packs `n` tokens of `nb` blocks (`x.len() == n * nb`) into
/// `ceil(n / 8) * nb` lane blocks, group-major: block `b` of group `g` at
/// `g * nb + b`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_lanes(x: &[BlockQ8_0], nb: usize, n: usize, out: &mut [LaneBlock]) {
    let groups = n.div_ceil(LANES);
    assert!(x.len() == n * nb && out.len() == groups * nb);
    let ones8 = _mm256_set1_epi8(1);
    let ones16 = _mm256_set1_epi16(1);
    for g in 0..groups {
        for b in 0..nb {
            let mut v = [_mm256_setzero_si256(); LANES];
            let mut d = [0.0f32; LANES];
            for t in 0..LANES.min(n - g * LANES) {
                let blk = &x[(g * LANES + t) * nb + b];
                v[t] = _mm256_loadu_si256(blk.qs.as_ptr().cast());
                d[t] = half_to_f32(blk.d);
            }
            let q = transpose8x32(v);
            // Per-lane sums of the 32 bytes: pairs by maddubs, then 16-bit
            // sums of at most 8 · 2 · 128, then pairs of those.
            let mut s = _mm256_maddubs_epi16(ones8, q[0]);
            for qk in &q[1..] {
                s = _mm256_add_epi16(s, _mm256_maddubs_epi16(ones8, *qk));
            }
            let o = &mut out[g * nb + b];
            for (dst, qk) in o.q.iter_mut().zip(q) {
                _mm256_store_si256(dst.as_mut_ptr().cast(), qk);
            }
            let bias = _mm256_slli_epi32(_mm256_madd_epi16(s, ones16), 3);
            _mm256_store_si256(o.bias.as_mut_ptr().cast(), bias);
            o.d = d;
        }
    }
}

/// Transposes an 8 × 8 matrix of 32-bit elements: lane `k` of `v[t]`
/// becomes lane `t` of the result's `k`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn transpose8x32(v: [__m256i; 8]) -> [__m256i; 8] {
    // [a0 b0 a1 b1 | a4 b4 a5 b5] and [a2 b2 a3 b3 | a6 b6 a7 b7]
    let lo01 = _mm256_unpacklo_epi32(v[0], v[1]);
    let hi01 = _mm256_unpackhi_epi32(v[0], v[1]);
    let lo23 = _mm256_unpacklo_epi32(v[2], v[3]);
    let hi23 = _mm256_unpackhi_epi32(v[2], v[3]);
    let lo45 = _mm256_unpacklo_epi32(v[4], v[5]);
    let hi45 = _mm256_unpackhi_epi32(v[4], v[5]);
    let lo67 = _mm256_unpacklo_epi32(v[6], v[7]);
    let hi67 = _mm256_unpackhi_epi32(v[6], v[7]);
    // [a0 b0 c0 d0 | a4 b4 c4 d4], [a1 b1 c1 d1 | a5 ...], ...
    let c0 = _mm256_unpacklo_epi64(lo01, lo23);
    let c1 = _mm256_unpackhi_epi64(lo01, lo23);
    let c2 = _mm256_unpacklo_epi64(hi01, hi23);
    let c3 = _mm256_unpackhi_epi64(hi01, hi23);
    let e0 = _mm256_unpacklo_epi64(lo45, lo67);
    let e1 = _mm256_unpackhi_epi64(lo45, lo67);
    let e2 = _mm256_unpacklo_epi64(hi45, hi67);
    let e3 = _mm256_unpackhi_epi64(hi45, hi67);
    [
        _mm256_permute2x128_si256(c0, e0, 0x20),
        _mm256_permute2x128_si256(c1, e1, 0x20),
        _mm256_permute2x128_si256(c2, e2, 0x20),
        _mm256_permute2x128_si256(c3, e3, 0x20),
        _mm256_permute2x128_si256(c0, e0, 0x31),
        _mm256_permute2x128_si256(c1, e1, 0x31),
        _mm256_permute2x128_si256(c2, e2, 0x31),
        _mm256_permute2x128_si256(c3, e3, 0x31),
    ]
}

/// Unpacks Q4_0 rows to one byte per weight (0..=15, element order): block
/// `i` of `w` becomes `out[i]`. Requires avx2, fma and f16c (the AVX-512
/// set uses it too).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn unpack_q4_0(w: &[BlockQ4_0], out: &mut Vec<__m256i>) {
    let low = _mm256_set1_epi8(0x0F);
    let shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    out.clear();
    out.reserve(w.len());
    for (i, blk) in w.iter().enumerate() {
        prefetch(w.as_ptr().wrapping_add(i + PREFETCH_BLOCKS));
        // One 16-byte load in both halves, shifted by 0 (low nibbles,
        // elements 0..16) and 4 (high nibbles, elements 16..32).
        let raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(blk.qs.as_ptr().cast()));
        out.push(_mm256_and_si256(_mm256_srlv_epi32(raw, shift), low));
    }
}

/// `R` weight rows × `G` lane groups (8 tokens each) of Q4_0 × Q8_0. `w`
/// holds the `R` rows (`nb` blocks each) and `wu` the same rows unpacked
/// ([`unpack_q4_0`]); `x` holds the `G` groups (`nb` lane blocks each),
/// which start at token `t0`; row `r` · token `t` goes to `out[r * n + t]`
/// for the tokens below `n`.
///
/// For each 4-byte column `k` of a block, a row's 4 unsigned weight bytes
/// are broadcast to all lanes and multiplied with `q[k]` of every group by
/// `maddubs`, whose 16-bit results are summed over the 8 columns (|sum| ≤
/// 8 · 2 · 15 · 128 < 32768: exact) before a single widening, bias
/// correction, conversion and scaling per row, group and block: 8 token dot
/// products per reduction instead of one.
// Tiles index several arrays by row and token; range loops say it plainest.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q4_0_lanes<const R: usize, const G: usize>(
    w: &[BlockQ4_0],
    wu: &[__m256i],
    nb: usize,
    x: &[LaneBlock],
    out: &mut [f32],
    n: usize,
    t0: usize,
) {
    assert!(w.len() >= R * nb && wu.len() >= R * nb && x.len() >= G * nb);
    assert!(t0 < n && out.len() >= (R - 1) * n + n);
    let (wp, up, xp) = (w.as_ptr(), wu.as_ptr(), x.as_ptr());
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); G]; R];
    for b in 0..nb {
        for r in 0..R {
            // SAFETY: r < R and b < nb, and w.len(), wu.len() >= R * nb
            // (asserted); the 8 u32 read from `col` are that __m256i's bytes.
            let dw = scale8((*wp.add(r * nb + b)).d);
            let col = up.add(r * nb + b).cast::<i32>();
            // Columns in two halves of four: 4 broadcasts, G partial sums
            // and the R × G accumulators stay within the 16 registers.
            let mut s = [_mm256_setzero_si256(); G];
            for h in 0..2 {
                let mut wb = [_mm256_setzero_si256(); 4];
                for (j, v) in wb.iter_mut().enumerate() {
                    *v = _mm256_set1_epi32(*col.add(4 * h + j));
                }
                for g in 0..G {
                    // SAFETY: g < G and b < nb, and x.len() >= G * nb (asserted).
                    let xb = &*xp.add(g * nb + b);
                    for j in 0..4 {
                        let q = _mm256_load_si256(xb.q[4 * h + j].as_ptr().cast());
                        let p = _mm256_maddubs_epi16(wb[j], q);
                        s[g] = if h == 0 && j == 0 {
                            p
                        } else {
                            _mm256_add_epi16(s[g], p)
                        };
                    }
                }
            }
            for g in 0..G {
                // SAFETY: as above.
                let xb = &*xp.add(g * nb + b);
                let bias = _mm256_load_si256(xb.bias.as_ptr().cast());
                let i = _mm256_sub_epi32(_mm256_madd_epi16(s[g], ones), bias);
                let d = _mm256_mul_ps(dw, _mm256_load_ps(xb.d.as_ptr()));
                acc[r][g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), d, acc[r][g]);
            }
        }
    }
    for r in 0..R {
        for g in 0..G {
            let mut v = [0.0f32; LANES];
            _mm256_storeu_ps(v.as_mut_ptr(), acc[r][g]);
            super::store_lanes(&mut out[r * n..(r + 1) * n], t0 + g * LANES, &v);
        }
    }
}

/// Prefill of Q4_0 rows `w` (`nb` blocks each) × `n` tokens with the lane
/// kernel: rows outside, so a tile's weights are read from memory once,
/// unpacked into `wu` (`LANE_ROWS · nb` × 32 bytes, in L1) and reused by
/// every token group; the packed activations (`n / 8 · nb` × 320 bytes)
/// stay in L2.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn matmul_q4_0_lanes(
    w: &[BlockQ4_0],
    nb: usize,
    buf: &[LaneBlock],
    n: usize,
    out: &mut [f32],
    wu: &mut Vec<__m256i>,
) {
    if nb == 0 {
        out.fill(0.0);
        return;
    }
    lanes_matmul!(
        tile_q4_0_lanes,
        LANES,
        LANE_ROWS,
        LANE_GROUPS,
        w,
        nb,
        buf,
        n,
        out,
        wu
    )
}

// ---------------------------------------------------------------- F16/F32 × F32

/// Float tile, for F16 or F32 weights: `R` rows of `cols` × `T` tokens of
/// `cols`, the last `cols % 8` columns in scalar code.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_float<E: FloatElem, const R: usize, const T: usize>(
    w: &[E],
    cols: usize,
    x: &[f32],
    out: &mut [f32],
    stride: usize,
) {
    let w: [&[E]; R] = std::array::from_fn(|r| &w[r * cols..(r + 1) * cols]);
    let x: [&[f32]; T] = std::array::from_fn(|t| &x[t * cols..(t + 1) * cols]);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let main = cols / 8 * 8;
    let mut c = 0;
    while c < main {
        let mut wv = [_mm256_setzero_ps(); R];
        for r in 0..R {
            prefetch(
                w[r].as_ptr()
                    .wrapping_add(c + 256 / std::mem::size_of::<E>()),
            );
            wv[r] = E::load8(&w[r][c..]);
        }
        for t in 0..T {
            let xv = load8(&x[t][c..]);
            for r in 0..R {
                acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
            }
        }
        c += 8;
    }
    for r in 0..R {
        for t in 0..T {
            let tail: f32 = w[r][main..]
                .iter()
                .zip(&x[t][main..])
                .map(|(&a, &b)| a.to_f32() * b)
                .sum();
            out[r * stride + t] = hsum(acc[r][t]) + tail;
        }
    }
}

/// `w`: rows of `cols` values; `x`: `n` tokens of `cols`; `out`: rows × `n`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn matmul_float<E: FloatElem>(w: &[E], cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
    if cols == 0 {
        out.fill(0.0);
        return;
    }
    let rows = w.len() / cols;
    let mut r = 0;
    // Decode: four rows per pass; prefill: 2 rows × 4 tokens (8
    // accumulators, 2 weight vectors).
    let rt = if n == 1 { 4 } else { 2 };
    while rows - r >= rt {
        let (wr, or) = (&w[r * cols..(r + rt) * cols], &mut out[r * n..(r + rt) * n]);
        if rt == 4 {
            tile_float::<E, 4, 1>(wr, cols, x, or, n);
        } else {
            let mut t = 0;
            while n - t >= 4 {
                tile_float::<E, 2, 4>(wr, cols, &x[t * cols..], &mut or[t..], n);
                t += 4;
            }
            while t < n {
                tile_float::<E, 2, 1>(wr, cols, &x[t * cols..], &mut or[t..], n);
                t += 1;
            }
        }
        r += rt;
    }
    while r < rows {
        let (wr, or) = (&w[r * cols..(r + 1) * cols], &mut out[r * n..(r + 1) * n]);
        let mut t = 0;
        while n - t >= 4 {
            tile_float::<E, 1, 4>(wr, cols, &x[t * cols..], &mut or[t..], n);
            t += 4;
        }
        while t < n {
            tile_float::<E, 1, 1>(wr, cols, &x[t * cols..], &mut or[t..], n);
            t += 1;
        }
        r += 1;
    }
}

// ---------------------------------------------------------------- quantize

/// One Q8_0 block, bit-identical to `quant::q8_0::quantize_block`: the same
/// f32 operations in the same order (amax, d = amax / 127, id = 1 / d,
/// x * id), then C `roundf` (half away from zero, which no AVX rounding mode
/// does) and Rust's saturating `as i8` (NaN to 0, ±inf to the ends).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_block_q8_0(x: &[f32; QK]) -> BlockQ8_0 {
    let sign = _mm256_set1_ps(-0.0);
    let mut v = [_mm256_setzero_ps(); 4];
    for (i, v) in v.iter_mut().enumerate() {
        *v = load8(&x[i * 8..]);
    }
    // `max_ps` returns its second operand when either is NaN, so with the
    // running maximum second a NaN input is skipped, as `f32::max` does.
    let mut m = _mm256_setzero_ps();
    for vi in v {
        m = _mm256_max_ps(_mm256_andnot_ps(sign, vi), m);
    }
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));

    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let idv = _mm256_set1_ps(id);
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
    let mut q = [_mm256_setzero_si256(); 4];
    for (q, &v) in q.iter_mut().zip(&v) {
        let s = _mm256_mul_ps(v, idv);
        let t = _mm256_round_ps(s, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        // s - trunc(s) is exact, so the tie test is exact too.
        let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(s, t));
        let up = _mm256_cmp_ps(frac, half, _CMP_GE_OQ);
        let away = _mm256_or_ps(_mm256_and_ps(s, sign), one);
        let r = _mm256_add_ps(t, _mm256_and_ps(up, away));
        let r = _mm256_and_ps(r, _mm256_cmp_ps(s, s, _CMP_ORD_Q));
        *q = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    }
    // The packs work within 128-bit lanes; the permute restores element order.
    let p = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let mut out = BlockQ8_0 {
        d: _mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(d), _MM_FROUND_TO_NEAREST_INT), 0) as u16,
        qs: [0; QK],
    };
    _mm256_storeu_si256(out.qs.as_mut_ptr().cast(), p);
    out
}

// ---------------------------------------------------------------- attention

/// `a · b` for f32 activations and f32 or f16 values (attention scores).
/// Four accumulators: attention rows are 64-128 long, and one FMA chain
/// would wait on its own latency every step.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot<E: FloatElem>(a: &[f32], b: &[E]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let (a32, b32) = (a.chunks_exact(32), b.chunks_exact(32));
    let (ar, br) = (a32.remainder(), b32.remainder());
    for (a, b) in a32.zip(b32) {
        for (k, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(load8(&a[k * 8..]), E::load8(&b[k * 8..]), *acc);
        }
    }
    let (a8, b8) = (ar.chunks_exact(8), br.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(&x, &y)| x * y.to_f32())
        .sum();
    for (a, b) in a8.zip(b8) {
        acc[0] = _mm256_fmadd_ps(load8(a), E::load8(b), acc[0]);
    }
    hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    )) + tail
}

/// `y += a·x` for f32 or f16 `x` (attention's weighted sum of values).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy<E: FloatElem>(a: f32, x: &[E], y: &mut [f32]) {
    let av = _mm256_set1_ps(a);
    let mut x8 = x.chunks_exact(8);
    let mut y8 = y.chunks_exact_mut(8);
    for (x, y) in (&mut x8).zip(&mut y8) {
        let r = _mm256_fmadd_ps(av, E::load8(x), load8(y));
        _mm256_storeu_ps(y.as_mut_ptr(), r);
    }
    for (y, &x) in y8.into_remainder().iter_mut().zip(x8.remainder()) {
        *y += a * x.to_f32();
    }
}

/// Eight i8 from `q[..8]` (`q` is cut to 8, so the load cannot leave it),
/// sign-extended and converted to f32 (`vpmovsxbd` + `vcvtdq2ps`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8x8(q: &[i8]) -> __m256 {
    let q = &q[..8];
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(q.as_ptr().cast())))
}

/// `Σ a[i]·q[i]` of one Q8_0 block, lane-wise and not yet scaled: two
/// independent chains of two, so the block's work overlaps the next's.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_dot_q8(a: &[f32; QK], q: &[i8; QK]) -> __m256 {
    let s0 = _mm256_mul_ps(load8(&a[..]), q8x8(&q[..]));
    let s1 = _mm256_mul_ps(load8(&a[8..]), q8x8(&q[8..]));
    let s0 = _mm256_fmadd_ps(load8(&a[16..]), q8x8(&q[16..]), s0);
    let s1 = _mm256_fmadd_ps(load8(&a[24..]), q8x8(&q[24..]), s1);
    _mm256_add_ps(s0, s1)
}

/// `a · dequant(b)` for a Q8_0 key row (`a.len() == 32 * b.len()`, checked
/// by the caller; a shorter `a` would only end the sum early). Each block's
/// unscaled sum is multiplied by its scale in one FMA into one of two
/// accumulators (even and odd blocks), so the only loop-carried chains are
/// two FMAs per block pair: the int→float conversion, not latency, bounds
/// the loop.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0(a: &[f32], b: &[BlockQ8_0]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 2];
    let (mut a64, mut b2) = (a.chunks_exact(2 * QK), b.chunks_exact(2));
    // Loops, not iterator closures: closures may not inherit the target features.
    for (a, b) in (&mut a64).zip(&mut b2) {
        for (k, acc) in acc.iter_mut().enumerate() {
            let a: &[f32; QK] = a[k * QK..(k + 1) * QK].try_into().expect("QK values");
            let s = block_dot_q8(a, &b[k].qs);
            *acc = _mm256_fmadd_ps(s, scale8(b[k].d), *acc);
        }
    }
    if let ([last], Ok(a)) = (b2.remainder(), <&[f32; QK]>::try_from(a64.remainder())) {
        acc[0] = _mm256_fmadd_ps(block_dot_q8(a, &last.qs), scale8(last.d), acc[0]);
    }
    hsum(_mm256_add_ps(acc[0], acc[1]))
}

/// `y += a·dequant(x)` for a Q8_0 value row (`y.len() == 32 * x.len()`,
/// checked by the caller). `a` times the block scale once per block, then
/// one FMA per eight values: `(a·d)·q` where the scalar oracle computes
/// `a·(d·q)`, which differs by one rounding of the product.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_q8_0(a: f32, x: &[BlockQ8_0], y: &mut [f32]) {
    let av = _mm256_set1_ps(a);
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let ad = _mm256_mul_ps(av, scale8(b.d));
        for (q, y) in b.qs.chunks_exact(8).zip(y.chunks_exact_mut(8)) {
            let r = _mm256_fmadd_ps(ad, q8x8(q), load8(y));
            // SAFETY: an eight-lane store into the eight-element chunk.
            _mm256_storeu_ps(y.as_mut_ptr(), r);
        }
    }
}
