//! AVX2 products of the k-quants (Q4_K, Q5_K, Q6_K) with Q8_K activations.
//!
//! Every k-quant super-block unpacks to the same shape: 8 vectors of 32
//! unsigned levels (values 32v..32v+32), 8 vectors of 16-bit scales lined
//! up with `maddubs` output (one scale per 16 values), and a correction
//! that the activation's 16-value sums turn into one product: the
//! minimums of Q4_K/Q5_K, Q6_K's −32 offset. So one tile driver serves all
//! three types; each type only says how to unpack its bytes.
//!
//! A tile is one weight row × up to 8 tokens: each 32-value vector of the
//! super-block is unpacked once and multiplied with every token's
//! activations, adding sub-block products in 32-bit integers (one
//! activation scale per 256 values makes that exact) and converting to
//! float once per super-block. From 8 tokens on, the lane kernel
//! ([`matmul_lanes`]) takes over: 8 tokens across the lanes, each row's 4
//! level bytes broadcast, as the Q4_0 lane kernel does.

use super::{half_to_f32, hsum, transpose8x32, LANES};
use crate::quant::k_search::unpack_scale_min_k4;
use crate::quant::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K};
use std::arch::x86_64::*;
use std::cell::RefCell;

/// What a super-block needs once, before its level vectors: the scale
/// sources, the correction factors and the two float scales.
pub(super) struct Prep<P> {
    p: P,
    /// Per 16-value group `g`, the factor of the activation sum `bsums[g]`
    /// in the correction term.
    c: __m256i,
    /// Scale of the integer sum Σ s·(w·x).
    d: f32,
    /// Scale of the correction Σ c·bsums.
    coef: f32,
}

/// A k-quant block the tile driver can multiply: it yields, for each
/// `v < 8`, the levels of values `32v..32v + 32` as unsigned bytes and the
/// 16-bit scale of each `maddubs` lane (lanes 0-7: values `32v..32v + 16`,
/// lanes 8-15: the next 16). Computed per `v` rather than all at once, so
/// a tile keeps two vectors of the block in registers, not sixteen.
pub(super) trait KBlock: Copy {
    type P: Copy;
    /// Columns of 4 values the lane kernel adds in 16 bits before scaling:
    /// as many as stay within one scale and below 2^15 (the `maddubs`
    /// pairs of a column reach 2 · max level · 127).
    const CHUNK: usize;
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C (callers are
    /// `target_feature` functions reached only through a detected `Avx2`).
    unsafe fn prep(&self) -> Prep<Self::P>;
    /// Vector `V` (a constant, so the unpacking has no run-time choices).
    ///
    /// # Safety
    /// As [`KBlock::prep`]; `V < 8`.
    unsafe fn levels<const V: usize>(&self, p: &Prep<Self::P>) -> (__m256i, __m256i);
}

/// Broadcasts 16-bit lane `i` of `v` (the same eight lanes in both
/// halves) to every lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn splat16(v: __m256i, i: usize) -> __m256i {
    _mm256_shuffle_epi8(v, _mm256_set1_epi64x(pair_ctl(i)))
}

/// Shuffle control (8 bytes) repeating 16-bit lane `i` four times.
#[inline]
fn pair_ctl(i: usize) -> i64 {
    let (a, b) = (2 * i as u8, 2 * i as u8 + 1);
    i64::from_ne_bytes([a, b, a, b, a, b, a, b])
}

/// Scales and minimums of Q4_K/Q5_K: the eight 16-bit scales in both
/// halves (one per level vector), and the minimums repeated for their two
/// 16-value sums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scale_min_prep(scales: &[u8; 12], d: u16, dmin: u16) -> Prep<__m256i> {
    let sm = unpack_scale_min_k4(scales);
    // SAFETY: `sm` is 16 bytes; each 8-byte load reads half of it.
    let (sc, mn) = unsafe {
        (
            _mm_cvtepu8_epi16(_mm_loadl_epi64(sm.as_ptr() as *const __m128i)),
            _mm_cvtepu8_epi16(_mm_loadl_epi64(sm[8..].as_ptr() as *const __m128i)),
        )
    };
    Prep {
        p: _mm256_broadcastsi128_si256(sc),
        c: _mm256_set_m128i(_mm_unpackhi_epi16(mn, mn), _mm_unpacklo_epi16(mn, mn)),
        // SAFETY: same features (f16c).
        d: unsafe { half_to_f32(d) },
        // SAFETY: as above.
        coef: -unsafe { half_to_f32(dmin) },
    }
}

/// The four-bit part of Q4_K/Q5_K level vector `v`: 32-byte run `v / 2`
/// of `qs`, low nibbles for even `v`, high for odd.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn nibbles(qs: &[u8; 128], v: usize) -> __m256i {
    let run = &qs[32 * (v / 2)..32 * (v / 2) + 32];
    // SAFETY: `run` is 32 bytes.
    let q = unsafe { _mm256_loadu_si256(run.as_ptr() as *const __m256i) };
    let q = if v.is_multiple_of(2) {
        q
    } else {
        _mm256_srli_epi16(q, 4)
    };
    _mm256_and_si256(q, _mm256_set1_epi8(0x0F))
}

impl KBlock for BlockQ4K {
    type P = __m256i;
    // 8 · 2 · 15 · 127 = 30480: a whole 32-value sub-block.
    const CHUNK: usize = 8;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn prep(&self) -> Prep<__m256i> {
        scale_min_prep(&self.scales, self.d, self.dmin)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn levels<const V: usize>(&self, p: &Prep<__m256i>) -> (__m256i, __m256i) {
        (nibbles(&self.qs, V), splat16(p.p, V))
    }
}

impl KBlock for BlockQ5K {
    type P = __m256i;
    // 4 · 2 · 31 · 127 = 31496: half a sub-block.
    const CHUNK: usize = 4;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn prep(&self) -> Prep<__m256i> {
        scale_min_prep(&self.scales, self.d, self.dmin)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn levels<const V: usize>(&self, p: &Prep<__m256i>) -> (__m256i, __m256i) {
        let v = V;
        // SAFETY: `qh` is 32 bytes.
        let qh = unsafe { _mm256_loadu_si256(self.qh.as_ptr() as *const __m256i) };
        // Bit `v` of each `qh` byte is the fifth bit of level vector `v`; a
        // 16-bit shift by less than 8 keeps each byte's own bit at bit 0.
        let bit = _mm256_and_si256(
            _mm256_srl_epi16(qh, _mm_cvtsi32_si128(v as i32)),
            _mm256_set1_epi8(1),
        );
        (
            _mm256_or_si256(nibbles(&self.qs, v), _mm256_slli_epi16(bit, 4)),
            splat16(p.p, v),
        )
    }
}

impl KBlock for BlockQ6K {
    /// The 16-bit scales of sub-blocks 0-7 and 8-15, each in both halves.
    type P = [__m256i; 2];
    // 2 · 2 · 63 · 127 = 32004: half a 16-value sub-block.
    const CHUNK: usize = 2;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn prep(&self) -> Prep<[__m256i; 2]> {
        // SAFETY: `scales` is 16 bytes.
        let sc = unsafe { _mm_loadu_si128(self.scales.as_ptr() as *const __m128i) };
        let (lo8, hi8) = (
            _mm_cvtepi8_epi16(sc),
            _mm_cvtepi8_epi16(_mm_srli_si128(sc, 8)),
        );
        // SAFETY: same features (f16c).
        let d = unsafe { half_to_f32(self.d) };
        Prep {
            p: [_mm256_set_m128i(lo8, lo8), _mm256_set_m128i(hi8, hi8)],
            c: _mm256_set_m128i(hi8, lo8),
            d,
            coef: -32.0 * d,
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn levels<const V: usize>(&self, p: &Prep<[__m256i; 2]>) -> (__m256i, __m256i) {
        let v = V;
        // Values 128h..128h+128: `ql[64h..]` holds the low nibbles (bytes
        // 0-31: vectors 0 and 2 of the half, 32-63: 1 and 3), `qh[32h..]`
        // the top two bits (bits 2k of byte l: vector k).
        let (h, k) = (v / 4, v % 4);
        let ql = &self.ql[64 * h + 32 * (k % 2)..64 * h + 32 * (k % 2) + 32];
        let qh = &self.qh[32 * h..32 * h + 32];
        // SAFETY: both slices are 32 bytes.
        let (l, hb) = unsafe {
            (
                _mm256_loadu_si256(ql.as_ptr() as *const __m256i),
                _mm256_loadu_si256(qh.as_ptr() as *const __m256i),
            )
        };
        let l = if k < 2 { l } else { _mm256_srli_epi16(l, 4) };
        let low = _mm256_and_si256(l, _mm256_set1_epi8(0x0F));
        let top = _mm256_and_si256(
            _mm256_srl_epi16(hb, _mm_cvtsi32_si128(2 * k as i32)),
            _mm256_set1_epi8(3),
        );
        // Vector v spans sub-blocks 2v and 2v+1: their scales fill the low
        // and high halves of its scale vector.
        let (a, b) = (pair_ctl(2 * k), pair_ctl(2 * k + 1));
        let s = _mm256_shuffle_epi8(p.p[h], _mm256_set_epi64x(b, b, a, a));
        (_mm256_or_si256(low, _mm256_slli_epi16(top, 4)), s)
    }
}

/// Tokens per tile: 8 integer accumulators, the block's level and scale
/// vectors and a product fit the 16 ymm registers.
const TILE_TOKENS: usize = 8;

/// `out[r * n + t] = W[r] · x[t]` for every row of `w` (`nb` super-blocks
/// each) and every token of `x`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn matmul<B: KBlock>(
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
    assert!(x.len() >= n * nb && out.len() >= w.len() / nb * n);
    for (wr, or) in w.chunks_exact(nb).zip(out.chunks_exact_mut(n)) {
        let mut t = 0;
        while t < n {
            let (o, xs) = (&mut or[t..], &x[t * nb..]);
            // SAFETY: same features; a tile of T tokens reads T · nb blocks
            // of `xs` and writes T outputs, both there (n - t >= T).
            unsafe {
                match n - t {
                    1 => tile::<B, 1>(wr, xs, nb, o),
                    2 => tile::<B, 2>(wr, xs, nb, o),
                    3 => tile::<B, 3>(wr, xs, nb, o),
                    4 => tile::<B, 4>(wr, xs, nb, o),
                    5 => tile::<B, 5>(wr, xs, nb, o),
                    6 => tile::<B, 6>(wr, xs, nb, o),
                    7 => tile::<B, 7>(wr, xs, nb, o),
                    _ => tile::<B, TILE_TOKENS>(wr, xs, nb, o),
                }
            }
            t += (n - t).min(TILE_TOKENS);
        }
    }
}

/// One weight row (`w`, `nb` super-blocks) × tokens `0..T` of `x`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<B: KBlock, const T: usize>(w: &[B], x: &[BlockQ8K], nb: usize, out: &mut [f32]) {
    assert!(x.len() >= T * nb && out.len() >= T && w.len() == nb);
    let mut acc = [_mm256_setzero_ps(); T];
    for (i, b) in w.iter().enumerate() {
        let xb: [&BlockQ8K; T] = std::array::from_fn(|t| &x[t * nb + i]);
        // SAFETY: same features.
        let p = unsafe { b.prep() };
        let mut isum = [_mm256_setzero_si256(); T];
        // SAFETY (each step): same features, V < 8.
        unsafe {
            step::<B, T, 0>(b, &p, &xb, &mut isum);
            step::<B, T, 1>(b, &p, &xb, &mut isum);
            step::<B, T, 2>(b, &p, &xb, &mut isum);
            step::<B, T, 3>(b, &p, &xb, &mut isum);
            step::<B, T, 4>(b, &p, &xb, &mut isum);
            step::<B, T, 5>(b, &p, &xb, &mut isum);
            step::<B, T, 6>(b, &p, &xb, &mut isum);
            step::<B, T, 7>(b, &p, &xb, &mut isum);
        }
        for ((a, s), xt) in acc.iter_mut().zip(isum).zip(&xb) {
            // SAFETY: `bsums` is 16 × i16 = 32 bytes.
            let sums = unsafe { _mm256_loadu_si256(xt.bsums.as_ptr() as *const __m256i) };
            let corr = _mm256_madd_epi16(sums, p.c);
            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(p.d * xt.d), *a);
            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(corr), _mm256_set1_ps(p.coef * xt.d), *a);
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: same features.
        *o = unsafe { hsum(a) };
    }
}

/// Level vector `V` of `b` times the same 32 activations of each token.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn step<B: KBlock, const T: usize, const V: usize>(
    b: &B,
    p: &Prep<B::P>,
    xb: &[&BlockQ8K; T],
    isum: &mut [__m256i; T],
) {
    // SAFETY: same features, V < 8.
    let (lv, sv) = unsafe { b.levels::<V>(p) };
    for (s, xt) in isum.iter_mut().zip(xb) {
        let q = &xt.qs[32 * V..32 * V + 32];
        // SAFETY: `q` is 32 bytes.
        let xv = unsafe { _mm256_loadu_si256(q.as_ptr() as *const __m256i) };
        let prod = _mm256_maddubs_epi16(lv, xv);
        *s = _mm256_add_epi32(*s, _mm256_madd_epi16(prod, sv));
    }
}

/// From this many tokens on, products use the lane kernel.
pub(super) const LANES_MIN_TOKENS: usize = 8;
/// Lane groups (of 8 tokens) per pass of the lane kernel: 4 each of 16-bit
/// sums, 32-bit sums and float accumulators, the broadcast weight column
/// and a product fill 14 of the 16 ymm registers.
const LANE_GROUPS: usize = 4;

/// One super-block of eight tokens' Q8_K activations, transposed for the
/// lane kernel: `q[k]` holds bytes `4k..4k + 4` of token `t` in 32-bit lane
/// `t` (as the Q4_0 lane kernel's blocks), `bsums[p]` the 16-value sums
/// `2p` and `2p + 1` of token `t` as the two 16-bit halves of lane `t`.
/// Missing tokens of a last, partial group are zeros (scale 0).
#[derive(Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
#[repr(C, align(32))]
pub(super) struct KLaneBlock {
    q: [[u8; 32]; 64],
    bsums: [[u8; 32]; 8],
    d: [f32; LANES],
}

/// Packs `n` tokens of `nb` super-blocks (`x.len() == n * nb`) into
/// `ceil(n / 8) * nb` lane blocks, group-major.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn pack_lanes(x: &[BlockQ8K], nb: usize, n: usize, out: &mut [KLaneBlock]) {
    let groups = n.div_ceil(LANES);
    assert!(x.len() == n * nb && out.len() == groups * nb);
    let load = |b: &[u8]| {
        let b = &b[..32];
        // SAFETY: `b` is 32 bytes.
        unsafe { _mm256_loadu_si256(b.as_ptr() as *const __m256i) }
    };
    let store = |dst: &mut [u8; 32], v: __m256i| {
        // SAFETY: `dst` is 32 bytes, and 32-byte aligned (the struct is).
        unsafe { _mm256_store_si256(dst.as_mut_ptr() as *mut __m256i, v) }
    };
    for g in 0..groups {
        let tokens = LANES.min(n - g * LANES);
        for b in 0..nb {
            let blk = |t: usize| &x[(g * LANES + t) * nb + b];
            let o = &mut out[g * nb + b];
            for c in 0..8 {
                let v = std::array::from_fn(|t| {
                    if t < tokens {
                        load(&bytemuck::cast_slice(&blk(t).qs)[32 * c..])
                    } else {
                        _mm256_setzero_si256()
                    }
                });
                // SAFETY: same features.
                for (k, q) in unsafe { transpose8x32(v) }.into_iter().enumerate() {
                    store(&mut o.q[8 * c + k], q);
                }
            }
            let v = std::array::from_fn(|t| {
                if t < tokens {
                    load(bytemuck::cast_slice(&blk(t).bsums))
                } else {
                    _mm256_setzero_si256()
                }
            });
            // SAFETY: same features.
            for (p, q) in unsafe { transpose8x32(v) }.into_iter().enumerate() {
                store(&mut o.bsums[p], q);
            }
            o.d = std::array::from_fn(|t| if t < tokens { blk(t).d } else { 0.0 });
        }
    }
}

/// One super-block of a weight row, unpacked for the lane kernel: levels as
/// bytes, the 16-bit scale of each chunk of columns, the correction's
/// factor pairs and the two float scales.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(super) struct KRow {
    levels: [[u8; 32]; 8],
    c: [i32; 8],
    sc: [i16; 32],
    d: f32,
    coef: f32,
}

impl KRow {
    #[target_feature(enable = "avx2,fma,f16c")]
    fn unpack<B: KBlock>(b: &B) -> KRow {
        let mut r = KRow {
            levels: [[0; 32]; 8],
            c: [0; 8],
            sc: [0; 32],
            d: 0.0,
            coef: 0.0,
        };
        // SAFETY: same features.
        let p = unsafe { b.prep() };
        // SAFETY (each): same features, V < 8.
        let all = unsafe {
            [
                b.levels::<0>(&p),
                b.levels::<1>(&p),
                b.levels::<2>(&p),
                b.levels::<3>(&p),
                b.levels::<4>(&p),
                b.levels::<5>(&p),
                b.levels::<6>(&p),
                b.levels::<7>(&p),
            ]
        };
        let mut lane_scales = [0i16; 16];
        for (v, (l, s)) in all.into_iter().enumerate() {
            // SAFETY: 32-byte stores into 32-byte arrays.
            unsafe {
                _mm256_storeu_si256(r.levels[v].as_mut_ptr() as *mut __m256i, l);
                _mm256_storeu_si256(lane_scales.as_mut_ptr() as *mut __m256i, s);
            }
            // Chunk q covers values 4·CHUNK·q..: its scale is that of the
            // `maddubs` lane over its first values.
            let per_vector = 8 / B::CHUNK;
            for j in 0..per_vector {
                let first_value = 4 * B::CHUNK * j;
                r.sc[v * per_vector + j] = lane_scales[first_value / 16 * 8];
            }
        }
        // SAFETY: 32-byte store into `c` (8 × i32).
        unsafe { _mm256_storeu_si256(r.c.as_mut_ptr() as *mut __m256i, p.c) };
        r.d = p.d;
        r.coef = p.coef;
        r
    }
}

thread_local! {
    /// Per-thread rows unpacked for the lane kernel, reused.
    static ROWS: RefCell<Vec<KRow>> = const { RefCell::new(Vec::new()) };
}

/// Prefill of k-quant rows `w` (`nb` super-blocks each) × `n` tokens packed
/// by [`pack_lanes`]: each row is unpacked once into L1 and multiplied with
/// every lane group, four at a time.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn matmul_lanes<B: KBlock>(
    w: &[B],
    nb: usize,
    x: &[KLaneBlock],
    n: usize,
    out: &mut [f32],
) {
    if nb == 0 || n == 0 {
        out.fill(0.0);
        return;
    }
    let groups = n.div_ceil(LANES);
    assert!(x.len() >= groups * nb && out.len() >= w.len() / nb * n);
    ROWS.with_borrow_mut(|rows| {
        for (wr, or) in w.chunks_exact(nb).zip(out.chunks_exact_mut(n)) {
            rows.clear();
            rows.extend(wr.iter().map(|b| KRow::unpack(b)));
            let mut g = 0;
            while g < groups {
                let xs = &x[g * nb..];
                // SAFETY: same features; a pass over G groups reads G · nb
                // lane blocks, which `x` holds (g + G <= groups).
                unsafe {
                    match groups - g {
                        1 => lane_tile::<B, 1>(rows, xs, nb, or, g * LANES),
                        2 => lane_tile::<B, 2>(rows, xs, nb, or, g * LANES),
                        3 => lane_tile::<B, 3>(rows, xs, nb, or, g * LANES),
                        _ => lane_tile::<B, LANE_GROUPS>(rows, xs, nb, or, g * LANES),
                    }
                }
                g += (groups - g).min(LANE_GROUPS);
            }
        }
    })
}

/// One unpacked row × `G` lane groups starting at token `t0`. For each
/// column of 4 values the row's 4 level bytes are broadcast to every lane
/// and multiplied with that column of 8 tokens by `maddubs`; a chunk's
/// columns add up in 16 bits, then one `madd` with the chunk's scale
/// widens them: 8 token products per instruction, where the row-major tile
/// computes one.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lane_tile<B: KBlock, const G: usize>(
    rows: &[KRow],
    x: &[KLaneBlock],
    nb: usize,
    out: &mut [f32],
    t0: usize,
) {
    assert!(rows.len() == nb && x.len() >= G * nb);
    let mut acc = [_mm256_setzero_ps(); G];
    for (b, kr) in rows.iter().enumerate() {
        let xb: [&KLaneBlock; G] = std::array::from_fn(|g| &x[g * nb + b]);
        let cols: &[u32; 64] = bytemuck::cast_ref(&kr.levels);
        let mut isum = [_mm256_setzero_si256(); G];
        for (q, &sc) in kr.sc[..64 / B::CHUNK].iter().enumerate() {
            let mut s16 = [_mm256_setzero_si256(); G];
            for col in q * B::CHUNK..(q + 1) * B::CHUNK {
                let wb = _mm256_set1_epi32(cols[col] as i32);
                for g in 0..G {
                    // SAFETY: a 32-byte aligned load of a 32-byte array.
                    let xq = unsafe { _mm256_load_si256(xb[g].q[col].as_ptr() as *const __m256i) };
                    s16[g] = _mm256_add_epi16(s16[g], _mm256_maddubs_epi16(wb, xq));
                }
            }
            let scv = _mm256_set1_epi16(sc);
            for g in 0..G {
                isum[g] = _mm256_add_epi32(isum[g], _mm256_madd_epi16(s16[g], scv));
            }
        }
        for g in 0..G {
            let mut corr = _mm256_setzero_si256();
            for p in 0..8 {
                // SAFETY: as above.
                let bs = unsafe { _mm256_load_si256(xb[g].bsums[p].as_ptr() as *const __m256i) };
                corr = _mm256_add_epi32(corr, _mm256_madd_epi16(bs, _mm256_set1_epi32(kr.c[p])));
            }
            // SAFETY: `d` is 8 f32, 32-byte aligned.
            let xd = unsafe { _mm256_load_ps(xb[g].d.as_ptr()) };
            acc[g] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(isum[g]),
                _mm256_mul_ps(_mm256_set1_ps(kr.d), xd),
                acc[g],
            );
            acc[g] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(corr),
                _mm256_mul_ps(_mm256_set1_ps(kr.coef), xd),
                acc[g],
            );
        }
    }
    for g in 0..G {
        let mut v = [0.0f32; LANES];
        // SAFETY: 8 floats into an 8-float array.
        unsafe { _mm256_storeu_ps(v.as_mut_ptr(), acc[g]) };
        super::super::store_lanes(out, t0 + g * LANES, &v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{k_search::ScaleMinBlock, QK_K};

    /// The per-vector unpacking against the blocks' own accessors.
    #[test]
    fn level_vectors_match_the_block_accessors() {
        if super::super::Avx2::detect().is_none() {
            return;
        }
        let x: Vec<f32> = (0..QK_K)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        fn levels<B: KBlock>(b: &B) -> Vec<u8> {
            let mut out = vec![0u8; QK_K];
            // SAFETY: AVX2 detected by the caller; 32-byte stores into a
            // 256-byte vector at 32v.
            unsafe {
                let p = b.prep();
                let all = [
                    b.levels::<0>(&p).0,
                    b.levels::<1>(&p).0,
                    b.levels::<2>(&p).0,
                    b.levels::<3>(&p).0,
                    b.levels::<4>(&p).0,
                    b.levels::<5>(&p).0,
                    b.levels::<6>(&p).0,
                    b.levels::<7>(&p).0,
                ];
                for (v, l) in all.into_iter().enumerate() {
                    _mm256_storeu_si256(out.as_mut_ptr().add(32 * v) as *mut __m256i, l);
                }
            }
            out
        }
        let q4 = crate::quant::q4_k::quantize_block(&x, None);
        assert_eq!(
            levels(&q4),
            (0..QK_K).map(|i| q4.level(i)).collect::<Vec<_>>()
        );
        let q5 = crate::quant::q5_k::quantize_block(&x, None);
        assert_eq!(
            levels(&q5),
            (0..QK_K).map(|i| q5.level(i)).collect::<Vec<_>>()
        );
        let q6 = crate::quant::q6_k::quantize_block(&x);
        assert_eq!(
            levels(&q6),
            (0..QK_K)
                .map(|i| (q6.level(i) + 32) as u8)
                .collect::<Vec<_>>()
        );
    }
}
