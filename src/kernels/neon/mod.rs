//! AArch64 kernels: one type, [`Neon`], in two variants.
//!
//! * `"neon"`: ARMv8.0 Advanced SIMD only, so it runs on every 64-bit Arm
//!   this project targets, the Raspberry Pi 4's Cortex-A72 included. Int8
//!   block products widen with `smull`/`smlal` into i16 and pairwise-add into
//!   i32 (`saddlp`/`sadalp`).
//! * `"neon-dotprod"`: the same code with the int8 block product done by
//!   `sdot` (ARMv8.2 DotProd: Pi 5's Cortex-A76, Jetson Orin's A78), one
//!   instruction per 16 byte pairs instead of four or five.
//!
//! Stable Rust has no `vdotq_s32` yet (`stdarch_neon_dotprod` is unstable),
//! so `sdot` is written as inline assembly; it is only ever inlined into
//! functions compiled with `dotprod` enabled, which is also what lets the
//! assembler accept it.
//!
//! f16 → f32 uses `fcvtl`/`fcvtl2`, which are part of ARMv8.0 (the `fp16`
//! feature is half-precision *arithmetic*, which nothing here needs), so both
//! variants convert in-register without checking for `fp16`. Their intrinsics
//! take `float16x4_t`, which is unstable, hence inline assembly again.
//!
//! Matrix products use register tiles of 4 weight rows × `T` tokens. Four
//! rows is what makes the reduction cheap: the four rows' lane vectors fold
//! into one vector of four row sums with two rounds of pairwise adds, and a
//! block's four row scales convert with one `fcvtl`. Decode (`T = 1`) streams
//! four weight rows at once; prefill reuses each unpacked weight block for
//! up to four tokens. Row and token counts that do not fill a tile repeat
//! their last row/token and drop the extra results, so there is one code
//! path per `T` and no scalar tail loop.
//!
//! The k-quants (Q4_K, Q5_K, Q6_K × Q8_K) are in [`kquants`], with tiles of
//! one row × up to four tokens: a super-block is 256 values, so one row's
//! unpacked levels already fill half the register file.
//!
//! Safety: [`Neon`] can only be obtained from [`Neon::detect`] or
//! [`Neon::detect_dotprod`], which check the CPU; every `unsafe fn` below
//! requires only that the CPU has the features in its `target_feature`
//! list (or, for `#[inline(always)]` helpers, in its caller's), and every
//! raw load reads a fixed-size array or a slice cut to the loaded length.

use super::scalar::{check_q8_0_len, q8_acts, q8k_acts};
use super::{Kernels, Packed};
use crate::quant::{BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ6K, BlockQ8_0, QK};
use half::f16;
use std::arch::aarch64::*;
use std::arch::asm;

mod kquants;

/// The AArch64 kernels. The private field keeps it from being built outside
/// this module, so holding one proves the CPU check for its variant passed.
pub struct Neon {
    dotprod: bool,
}

static NEON: Neon = Neon { dotprod: false };
static NEON_DOTPROD: Neon = Neon { dotprod: true };

impl Neon {
    /// The ARMv8.0 kernels (Advanced SIMD is mandatory on AArch64 Linux, but
    /// checking costs nothing and keeps the constructor honest).
    pub fn detect() -> Option<&'static Neon> {
        std::arch::is_aarch64_feature_detected!("neon").then_some(&NEON)
    }

    /// The `sdot` kernels, if this CPU has the DotProd extension.
    pub fn detect_dotprod() -> Option<&'static Neon> {
        (std::arch::is_aarch64_feature_detected!("neon")
            && std::arch::is_aarch64_feature_detected!("dotprod"))
        .then_some(&NEON_DOTPROD)
    }

    /// The three k-quant products, one driver (see [`kquants`]).
    fn matmul_k<B: kquants::KBlock>(&self, w: &[B], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        let (x, n) = (q8k_acts(x), x.n);
        if self.dotprod {
            // SAFETY: a dotprod `Neon` exists only after `detect_dotprod`;
            // `matmul_rows` checked that `x` holds `n * nb` blocks.
            unsafe { kquants::matmul_sdot(w, nb, &x[..n * nb], n, out) }
        } else {
            // SAFETY: any `Neon` exists only after `detect` saw NEON.
            unsafe { kquants::matmul_widen(w, nb, &x[..n * nb], n, out) }
        }
    }
}

/// Weight rows per tile: fixed, see the module comment.
const ROWS: usize = 4;

impl Kernels for Neon {
    fn name(&self) -> &'static str {
        if self.dotprod {
            "neon-dotprod"
        } else {
            "neon"
        }
    }

    fn matmul_q4_0(&self, w: &[BlockQ4_0], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        let (x, n) = (q8_acts(x), x.n);
        if self.dotprod {
            // SAFETY: a dotprod `Neon` exists only after `detect_dotprod`.
            unsafe { matmul_q4_0_sdot(w, nb, &x[..n * nb], n, out) }
        } else {
            // SAFETY: any `Neon` exists only after `detect` saw NEON.
            unsafe { matmul_q4_0_widen(w, nb, &x[..n * nb], n, out) }
        }
    }

    fn matmul_q8_0(&self, w: &[BlockQ8_0], nb: usize, x: &Packed<'_>, out: &mut [f32]) {
        let (x, n) = (q8_acts(x), x.n);
        if self.dotprod {
            // SAFETY: as above.
            unsafe { matmul_q8_0_sdot(w, nb, &x[..n * nb], n, out) }
        } else {
            // SAFETY: as above.
            unsafe { matmul_q8_0_widen(w, nb, &x[..n * nb], n, out) }
        }
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
        // SAFETY: NEON was detected; float code is the same in both variants.
        unsafe { matmul_f16(w, cols, x, n, out) }
    }

    fn matmul_f32(&self, w: &[f32], cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
        // SAFETY: as above.
        unsafe { matmul_f32(w, cols, x, n, out) }
    }

    fn quantize_q8_0(&self, x: &[f32], y: &mut [BlockQ8_0]) {
        for (b, x) in y.iter_mut().zip(x.chunks_exact(QK)) {
            let x: &[f32; QK] = x.try_into().expect("chunks_exact gives QK values");
            // SAFETY: NEON was detected.
            *b = unsafe { quantize_block_q8_0(x) };
        }
    }

    fn dot_f32(&self, a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        // SAFETY: NEON was detected; both slices are cut to the same length.
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
        // SAFETY: NEON was detected; float code is the same in both variants.
        unsafe { dot_q8_0(a, b) }
    }

    fn axpy_q8_0(&self, a: f32, x: &[BlockQ8_0], y: &mut [f32]) {
        check_q8_0_len("axpy_q8_0", y.len(), x.len());
        // SAFETY: as above.
        unsafe { axpy_q8_0(a, x, y) }
    }
}

// ---------------------------------------------------------------- helpers

/// Four f16 (bit patterns) widened to f32.
#[inline(always)]
unsafe fn f16x4_to_f32(v: uint16x4_t) -> float32x4_t {
    let out: float32x4_t;
    // SAFETY: a register-only ARMv8.0 instruction; no memory, no flags.
    asm!(
        "fcvtl {o:v}.4s, {i:v}.4h",
        o = lateout(vreg) out,
        i = in(vreg) v,
        options(pure, nomem, nostack, preserves_flags)
    );
    out
}

/// The upper four of eight f16 widened to f32.
#[inline(always)]
unsafe fn f16x8_high_to_f32(v: uint16x8_t) -> float32x4_t {
    let out: float32x4_t;
    // SAFETY: as in `f16x4_to_f32`.
    asm!(
        "fcvtl2 {o:v}.4s, {i:v}.8h",
        o = lateout(vreg) out,
        i = in(vreg) v,
        options(pure, nomem, nostack, preserves_flags)
    );
    out
}

/// `acc + Σ` of the four groups of four byte products of `a` and `b`.
/// Callers must have `dotprod` enabled (only the `*_sdot` entry points,
/// through the `Sdot` type, reach this).
#[inline(always)]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: a register-only instruction, available because every caller
    // was compiled with (and entered after detecting) `dotprod`.
    asm!(
        "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        b = in(vreg) b,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// The 32 bytes of a Q8_0 block as two vectors.
#[inline(always)]
unsafe fn load_q8(qs: &[i8; QK]) -> [int8x16_t; 2] {
    // SAFETY: both 16-byte loads lie inside the 32-byte array.
    [vld1q_s8(qs.as_ptr()), vld1q_s8(qs.as_ptr().add(16))]
}

/// Sum of the four lanes of each of four vectors, as one vector.
#[inline(always)]
unsafe fn reduce4_s32(s: [int32x4_t; ROWS]) -> int32x4_t {
    vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]))
}

#[inline(always)]
unsafe fn reduce4_f32(s: [float32x4_t; ROWS]) -> float32x4_t {
    vpaddq_f32(vpaddq_f32(s[0], s[1]), vpaddq_f32(s[2], s[3]))
}

// ---------------------------------------------------------------- int8 block products

/// How one block's int8 dot product is computed: the only thing that differs
/// between the two variants. Both return four lanes whose sum is the product.
trait IntDot {
    /// Q4_0 nibbles already shifted to -8..=7 times Q8_0 bytes.
    unsafe fn nibbles(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t;
    /// Any i8 times any i8.
    unsafe fn bytes(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t;
}

/// ARMv8.0: widening multiplies.
struct Widen;

impl IntDot for Widen {
    /// |nibble·x| <= 8·128, so two products summed by `smlal`, and then the
    /// low and high halves added, stay within i16 (4·1024 < 32768): one
    /// widening step to i32 for the whole block.
    #[inline(always)]
    unsafe fn nibbles(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t {
        let lo = vmlal_s8(
            vmull_s8(vget_low_s8(w[0]), vget_low_s8(x[0])),
            vget_low_s8(w[1]),
            vget_low_s8(x[1]),
        );
        let hi = vmlal_high_s8(vmull_high_s8(w[0], x[0]), w[1], x[1]);
        vpaddlq_s16(vaddq_s16(lo, hi))
    }

    /// A single product can reach 128·128 = 16384, so two would overflow
    /// i16: each product is widened to i32 on its own (`sadalp`), which is
    /// exact for every byte value, not only the ±127 quantize_q8_0 makes.
    #[inline(always)]
    unsafe fn bytes(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t {
        let s = vpaddlq_s16(vmull_s8(vget_low_s8(w[0]), vget_low_s8(x[0])));
        let s = vpadalq_s16(s, vmull_high_s8(w[0], x[0]));
        let s = vpadalq_s16(s, vmull_s8(vget_low_s8(w[1]), vget_low_s8(x[1])));
        vpadalq_s16(s, vmull_high_s8(w[1], x[1]))
    }
}

/// ARMv8.2 DotProd. Only instantiated inside `dotprod` functions.
struct Sdot;

impl IntDot for Sdot {
    #[inline(always)]
    unsafe fn nibbles(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t {
        sdot(sdot(vdupq_n_s32(0), w[0], x[0]), w[1], x[1])
    }

    #[inline(always)]
    unsafe fn bytes(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t {
        sdot(sdot(vdupq_n_s32(0), w[0], x[0]), w[1], x[1])
    }
}

/// A quantized weight block: its scale, its values as signed bytes in the
/// same element order as a Q8_0 block, and which product applies.
trait QBlock {
    fn scale_bits(&self) -> u16;
    unsafe fn unpack(&self) -> [int8x16_t; 2];
    unsafe fn dot<D: IntDot>(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t;
}

impl QBlock for BlockQ4_0 {
    fn scale_bits(&self) -> u16 {
        self.d
    }

    /// Low nibbles are elements 0..16 and high nibbles 16..32, which are
    /// exactly the two halves of the activation block, so no shuffle is needed.
    #[inline(always)]
    unsafe fn unpack(&self) -> [int8x16_t; 2] {
        // SAFETY: a 16-byte load of the 16-byte array.
        let v = vld1q_u8(self.qs.as_ptr());
        let eight = vdupq_n_s8(8);
        let lo = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F)));
        let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
        [vsubq_s8(lo, eight), vsubq_s8(hi, eight)]
    }

    #[inline(always)]
    unsafe fn dot<D: IntDot>(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t {
        D::nibbles(w, x)
    }
}

impl QBlock for BlockQ8_0 {
    fn scale_bits(&self) -> u16 {
        self.d
    }

    #[inline(always)]
    unsafe fn unpack(&self) -> [int8x16_t; 2] {
        load_q8(&self.qs)
    }

    #[inline(always)]
    unsafe fn dot<D: IntDot>(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t {
        D::bytes(w, x)
    }
}

/// Four weight rows × `T` tokens of a quantized product. Returns, per
/// token, the four rows' results as one vector.
///
/// All slices must be `nb` blocks long (asserted, which also lets the
/// compiler drop the per-block bounds checks).
#[inline(always)]
unsafe fn quant_tile<W: QBlock, D: IntDot, const T: usize>(
    w: [&[W]; ROWS],
    x: [&[BlockQ8_0]; T],
    xd: [&[f32]; T],
    nb: usize,
) -> [float32x4_t; T] {
    for w in w {
        assert_eq!(w.len(), nb);
    }
    for t in 0..T {
        assert!(x[t].len() == nb && xd[t].len() == nb);
    }
    let mut acc = [vdupq_n_f32(0.0); T];
    for b in 0..nb {
        let mut q = [[vdupq_n_s8(0); 2]; ROWS];
        let mut d = [0u16; ROWS];
        for r in 0..ROWS {
            q[r] = w[r][b].unpack();
            d[r] = w[r][b].scale_bits();
        }
        // SAFETY: a 4-lane load of a 4-element array.
        let dw = f16x4_to_f32(vld1_u16(d.as_ptr()));
        for t in 0..T {
            let xv = load_q8(&x[t][b].qs);
            let mut s = [vdupq_n_s32(0); ROWS];
            for r in 0..ROWS {
                s[r] = W::dot::<D>(q[r], xv);
            }
            let scale = vmulq_n_f32(dw, xd[t][b]);
            acc[t] = vfmaq_f32(acc[t], vcvtq_f32_s32(reduce4_s32(s)), scale);
        }
    }
    acc
}

/// `ROWS` slices of `len` elements starting at rows `r0..r0 + ROWS` of `w`,
/// the last real row repeated past `r0 + valid`.
fn row_slices<E>(w: &[E], len: usize, r0: usize, valid: usize) -> [&[E]; ROWS] {
    std::array::from_fn(|i| {
        let r = r0 + i.min(valid - 1);
        &w[r * len..(r + 1) * len]
    })
}

/// The tile width for `rem` remaining tokens and how many of them it uses:
/// three tokens go through the four-token tile with one repeated.
fn token_group(rem: usize) -> (usize, usize) {
    match rem {
        1 => (1, 1),
        2 => (2, 2),
        _ => (4, rem.min(4)),
    }
}

/// Runs `$tile::<T>` on the tile at rows `r0..r0+valid`, tokens `t0..t0+g`,
/// padding the token list like [`row_slices`], and writes the real results.
macro_rules! run_tile {
    ($T:literal, $call:expr, $out:expr, $n:expr, $r0:expr, $valid:expr, $t0:expr, $g:expr) => {{
        let res: [float32x4_t; $T] = $call;
        for (t, v) in res.iter().enumerate().take($g) {
            let mut lanes = [0.0f32; ROWS];
            // SAFETY: a 4-lane store into a 4-element array.
            vst1q_f32(lanes.as_mut_ptr(), *v);
            for (r, &l) in lanes.iter().enumerate().take($valid) {
                $out[($r0 + r) * $n + $t0 + t] = l;
            }
        }
    }};
}

/// Every row of `w` (`nb` blocks each) times every token of `x`.
///
/// Rows outside, tokens inside: a 4-row strip of weights (4·nb blocks, under
/// 25 KB for the widest 7B matrix) stays in L1 while all tokens pass, so each
/// weight byte is read from DRAM once per call; the activations are re-read
/// from L2 once per strip.
#[inline(always)]
unsafe fn quant_matmul<W: QBlock, D: IntDot>(
    w: &[W],
    nb: usize,
    x: &[BlockQ8_0],
    n: usize,
    out: &mut [f32],
) {
    if nb == 0 {
        out.fill(0.0);
        return;
    }
    assert!(x.len() == n * nb && w.len().is_multiple_of(nb));
    let rows = w.len() / nb;
    assert!(out.len() >= rows * n);
    // Converted once here instead of once per weight row.
    let xd: Vec<f32> = x.iter().map(|b| b.scale()).collect();
    let mut r0 = 0;
    while r0 < rows {
        let valid = (rows - r0).min(ROWS);
        let wr = row_slices(w, nb, r0, valid);
        let mut t0 = 0;
        while t0 < n {
            let (tile, g) = token_group(n - t0);
            let last = t0 + g - 1;
            let xs = |i: usize| {
                let t = (t0 + i).min(last);
                (&x[t * nb..(t + 1) * nb], &xd[t * nb..(t + 1) * nb])
            };
            match tile {
                1 => run_tile!(
                    1,
                    quant_tile::<W, D, 1>(wr, [xs(0).0], [xs(0).1], nb),
                    out,
                    n,
                    r0,
                    valid,
                    t0,
                    g
                ),
                2 => run_tile!(
                    2,
                    quant_tile::<W, D, 2>(wr, [xs(0).0, xs(1).0], [xs(0).1, xs(1).1], nb),
                    out,
                    n,
                    r0,
                    valid,
                    t0,
                    g
                ),
                _ => run_tile!(
                    4,
                    quant_tile::<W, D, 4>(
                        wr,
                        [xs(0).0, xs(1).0, xs(2).0, xs(3).0],
                        [xs(0).1, xs(1).1, xs(2).1, xs(3).1],
                        nb
                    ),
                    out,
                    n,
                    r0,
                    valid,
                    t0,
                    g
                ),
            }
            t0 += g;
        }
        r0 += ROWS;
    }
}

// The four quantized entry points: the generic code instantiated once per
// variant, each inside a function compiled for exactly its features.

#[target_feature(enable = "neon")]
unsafe fn matmul_q4_0_widen(
    w: &[BlockQ4_0],
    nb: usize,
    x: &[BlockQ8_0],
    n: usize,
    out: &mut [f32],
) {
    quant_matmul::<BlockQ4_0, Widen>(w, nb, x, n, out)
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn matmul_q4_0_sdot(w: &[BlockQ4_0], nb: usize, x: &[BlockQ8_0], n: usize, out: &mut [f32]) {
    quant_matmul::<BlockQ4_0, Sdot>(w, nb, x, n, out)
}

#[target_feature(enable = "neon")]
unsafe fn matmul_q8_0_widen(
    w: &[BlockQ8_0],
    nb: usize,
    x: &[BlockQ8_0],
    n: usize,
    out: &mut [f32],
) {
    quant_matmul::<BlockQ8_0, Widen>(w, nb, x, n, out)
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn matmul_q8_0_sdot(w: &[BlockQ8_0], nb: usize, x: &[BlockQ8_0], n: usize, out: &mut [f32]) {
    quant_matmul::<BlockQ8_0, Sdot>(w, nb, x, n, out)
}

// ---------------------------------------------------------------- F16/F32 × F32

/// A float weight element: eight of them as two f32 vectors.
trait FloatElem: Copy {
    /// `s` must hold at least 8 elements (checked).
    unsafe fn load8(s: &[Self]) -> [float32x4_t; 2];
    fn to_f32(self) -> f32;
}

impl FloatElem for f32 {
    #[inline(always)]
    unsafe fn load8(s: &[f32]) -> [float32x4_t; 2] {
        let s = &s[..8];
        // SAFETY: two 4-lane loads inside the 8 elements just checked.
        [vld1q_f32(s.as_ptr()), vld1q_f32(s.as_ptr().add(4))]
    }

    fn to_f32(self) -> f32 {
        self
    }
}

impl FloatElem for f16 {
    #[inline(always)]
    unsafe fn load8(s: &[f16]) -> [float32x4_t; 2] {
        let s = &s[..8];
        // SAFETY: one 8-lane load of the 8 elements just checked; `f16` is a
        // transparent `u16`.
        let v = vld1q_u16(s.as_ptr().cast());
        [f16x4_to_f32(vget_low_u16(v)), f16x8_high_to_f32(v)]
    }

    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// Four weight rows × `T` tokens of a float product (all slices `cols`
/// long); the last `cols % 8` columns in scalar code.
#[inline(always)]
unsafe fn float_tile<E: FloatElem, const T: usize>(
    w: [&[E]; ROWS],
    x: [&[f32]; T],
    cols: usize,
) -> [float32x4_t; T] {
    for w in w {
        assert_eq!(w.len(), cols);
    }
    for x in x {
        assert_eq!(x.len(), cols);
    }
    let mut acc = [[vdupq_n_f32(0.0); T]; ROWS];
    let main = cols / 8 * 8;
    let mut c = 0;
    while c < main {
        let mut wv = [[vdupq_n_f32(0.0); 2]; ROWS];
        for r in 0..ROWS {
            wv[r] = E::load8(&w[r][c..]);
        }
        for t in 0..T {
            let xv = f32::load8(&x[t][c..]);
            for r in 0..ROWS {
                acc[r][t] = vfmaq_f32(vfmaq_f32(acc[r][t], wv[r][0], xv[0]), wv[r][1], xv[1]);
            }
        }
        c += 8;
    }
    let mut res = [vdupq_n_f32(0.0); T];
    for t in 0..T {
        let mut tail = [0.0f32; ROWS];
        for r in 0..ROWS {
            for (&a, &b) in w[r][main..].iter().zip(&x[t][main..]) {
                tail[r] += a.to_f32() * b;
            }
        }
        let sums = reduce4_f32([acc[0][t], acc[1][t], acc[2][t], acc[3][t]]);
        // SAFETY: a 4-lane load of a 4-element array.
        res[t] = vaddq_f32(sums, vld1q_f32(tail.as_ptr()));
    }
    res
}

/// Like [`quant_matmul`], for float weights of `cols` columns.
#[inline(always)]
unsafe fn float_matmul<E: FloatElem>(w: &[E], cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
    if cols == 0 {
        out.fill(0.0);
        return;
    }
    assert!(x.len() == n * cols && w.len().is_multiple_of(cols));
    let rows = w.len() / cols;
    assert!(out.len() >= rows * n);
    let mut r0 = 0;
    while r0 < rows {
        let valid = (rows - r0).min(ROWS);
        let wr = row_slices(w, cols, r0, valid);
        let mut t0 = 0;
        while t0 < n {
            let (tile, g) = token_group(n - t0);
            let last = t0 + g - 1;
            let xs = |i: usize| {
                let t = (t0 + i).min(last);
                &x[t * cols..(t + 1) * cols]
            };
            match tile {
                1 => run_tile!(
                    1,
                    float_tile::<E, 1>(wr, [xs(0)], cols),
                    out,
                    n,
                    r0,
                    valid,
                    t0,
                    g
                ),
                2 => run_tile!(
                    2,
                    float_tile::<E, 2>(wr, [xs(0), xs(1)], cols),
                    out,
                    n,
                    r0,
                    valid,
                    t0,
                    g
                ),
                _ => run_tile!(
                    4,
                    float_tile::<E, 4>(wr, [xs(0), xs(1), xs(2), xs(3)], cols),
                    out,
                    n,
                    r0,
                    valid,
                    t0,
                    g
                ),
            }
            t0 += g;
        }
        r0 += ROWS;
    }
}

#[target_feature(enable = "neon")]
unsafe fn matmul_f16(w: &[f16], cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
    float_matmul(w, cols, x, n, out)
}

#[target_feature(enable = "neon")]
unsafe fn matmul_f32(w: &[f32], cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
    float_matmul(w, cols, x, n, out)
}

// ---------------------------------------------------------------- quantize

/// One Q8_0 block, bit-identical to `quant::q8_0::quantize_block`: the same
/// f32 operations (amax, d = amax / 127, id = 1 / d, x · id), then
///
/// * `fmaxnm` for the maximum, which like `f32::max` ignores a NaN operand;
///   starting from 0 also keeps an all-NaN block at amax 0, as the fold does;
/// * `fcvtas`, which rounds half away from zero exactly like `f32::round`
///   (C `roundf`), sends NaN to 0 and saturates, and `sqxtn` twice, which
///   saturates to i8: together Rust's `as i8` after `round()`;
/// * the scale through the `half` crate, the same call the reference makes.
#[target_feature(enable = "neon")]
unsafe fn quantize_block_q8_0(x: &[f32; QK]) -> BlockQ8_0 {
    let mut v = [vdupq_n_f32(0.0); QK / 4];
    for (i, v) in v.iter_mut().enumerate() {
        // SAFETY: lanes 4i..4i+4 of the 32-element array, i < 8.
        *v = vld1q_f32(x.as_ptr().add(4 * i));
    }
    let mut m = vdupq_n_f32(0.0);
    for &vi in &v {
        m = vmaxnmq_f32(m, vabsq_f32(vi));
    }
    let amax = vmaxnmvq_f32(m);
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut h = [vdupq_n_s16(0); QK / 8];
    for (i, h) in h.iter_mut().enumerate() {
        let a = vcvtaq_s32_f32(vmulq_n_f32(v[2 * i], id));
        let b = vcvtaq_s32_f32(vmulq_n_f32(v[2 * i + 1], id));
        *h = vqmovn_high_s32(vqmovn_s32(a), b);
    }
    let lo = vqmovn_high_s16(vqmovn_s16(h[0]), h[1]);
    let hi = vqmovn_high_s16(vqmovn_s16(h[2]), h[3]);
    let mut out = BlockQ8_0 {
        d: f16::from_f32(d).to_bits(),
        qs: [0; QK],
    };
    // SAFETY: two 16-byte stores into the 32-byte array.
    vst1q_s8(out.qs.as_mut_ptr(), lo);
    vst1q_s8(out.qs.as_mut_ptr().add(16), hi);
    out
}

// ---------------------------------------------------------------- attention

/// Four accumulators of four lanes: attention rows are 64-128 long, and a
/// single `fmla` chain would wait on its own latency every step.
#[target_feature(enable = "neon")]
unsafe fn dot<E: FloatElem>(a: &[f32], b: &[E]) -> f32 {
    let mut acc = [vdupq_n_f32(0.0); 4];
    let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (a16.remainder(), b16.remainder());
    for (a, b) in a16.zip(b16) {
        for h in 0..2 {
            let (x, y) = (f32::load8(&a[8 * h..]), E::load8(&b[8 * h..]));
            acc[2 * h] = vfmaq_f32(acc[2 * h], x[0], y[0]);
            acc[2 * h + 1] = vfmaq_f32(acc[2 * h + 1], x[1], y[1]);
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
        let (x, y) = (f32::load8(a), E::load8(b));
        acc[0] = vfmaq_f32(acc[0], x[0], y[0]);
        acc[1] = vfmaq_f32(acc[1], x[1], y[1]);
    }
    vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
    )) + tail
}

#[target_feature(enable = "neon")]
unsafe fn axpy<E: FloatElem>(a: f32, x: &[E], y: &mut [f32]) {
    let mut x8 = x.chunks_exact(8);
    let mut y8 = y.chunks_exact_mut(8);
    for (x, y) in (&mut x8).zip(&mut y8) {
        let (xv, yv) = (E::load8(x), f32::load8(y));
        // SAFETY: two 4-lane stores into the 8-element chunk.
        vst1q_f32(y.as_mut_ptr(), vfmaq_n_f32(yv[0], xv[0], a));
        vst1q_f32(y.as_mut_ptr().add(4), vfmaq_n_f32(yv[1], xv[1], a));
    }
    for (y, x) in y8.into_remainder().iter_mut().zip(x8.remainder()) {
        *y += a * x.to_f32();
    }
}

/// A Q8_0 block's 32 values as eight f32 vectors: `sxtl` to i16, `sxtl` to
/// i32, `scvtf`; all in registers after the two 16-byte loads.
#[inline(always)]
unsafe fn q8_to_f32(qs: &[i8; QK]) -> [float32x4_t; 8] {
    let [lo, hi] = load_q8(qs);
    let h = [
        vmovl_s8(vget_low_s8(lo)),
        vmovl_high_s8(lo),
        vmovl_s8(vget_low_s8(hi)),
        vmovl_high_s8(hi),
    ];
    let mut out = [vdupq_n_f32(0.0); 8];
    for (i, &h) in h.iter().enumerate() {
        out[2 * i] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(h)));
        out[2 * i + 1] = vcvtq_f32_s32(vmovl_high_s16(h));
    }
    out
}

/// A block scale (f16 bits) in all four lanes, converted with `fcvtl`.
#[inline(always)]
unsafe fn scale4(bits: u16) -> float32x4_t {
    f16x4_to_f32(vdup_n_u16(bits))
}

/// `Σ a[i]·q[i]` of one block, lane-wise and unscaled: four independent
/// chains of two (`fmul`, `fmla`), then their sum.
#[inline(always)]
unsafe fn block_dot_q8(a: &[f32; QK], qs: &[i8; QK]) -> float32x4_t {
    let q = q8_to_f32(qs);
    let mut s = [vdupq_n_f32(0.0); 4];
    for (k, s) in s.iter_mut().enumerate() {
        // SAFETY: lanes 4k..4k+4 and 4k+16..4k+20 of the 32-element array, k < 4.
        let (x0, x1) = (
            vld1q_f32(a.as_ptr().add(4 * k)),
            vld1q_f32(a.as_ptr().add(4 * k + 16)),
        );
        *s = vfmaq_f32(vmulq_f32(x0, q[k]), x1, q[k + 4]);
    }
    vaddq_f32(vaddq_f32(s[0], s[1]), vaddq_f32(s[2], s[3]))
}

/// `a · dequant(b)` for a Q8_0 key row (`a.len() == 32 * b.len()`, checked
/// by the caller). Each block's unscaled sum goes into one of two
/// accumulators (even and odd blocks) with one `fmla` by its scale, so the
/// loop-carried chains are short and the widening and conversion bound it.
#[target_feature(enable = "neon")]
unsafe fn dot_q8_0(a: &[f32], b: &[BlockQ8_0]) -> f32 {
    let mut acc = [vdupq_n_f32(0.0); 2];
    let (mut a64, mut b2) = (a.chunks_exact(2 * QK), b.chunks_exact(2));
    for (a, b) in (&mut a64).zip(&mut b2) {
        for (k, acc) in acc.iter_mut().enumerate() {
            let a: &[f32; QK] = a[k * QK..(k + 1) * QK].try_into().expect("QK values");
            *acc = vfmaq_f32(*acc, block_dot_q8(a, &b[k].qs), scale4(b[k].d));
        }
    }
    if let ([last], Ok(a)) = (b2.remainder(), <&[f32; QK]>::try_from(a64.remainder())) {
        acc[0] = vfmaq_f32(acc[0], block_dot_q8(a, &last.qs), scale4(last.d));
    }
    vaddvq_f32(vaddq_f32(acc[0], acc[1]))
}

/// `y += a·dequant(x)` for a Q8_0 value row (`y.len() == 32 * x.len()`,
/// checked by the caller): `a` times the block scale once per block, then
/// one `fmla` per four values (`(a·d)·q`; the oracle's `a·(d·q)` differs by
/// one rounding of the product).
#[target_feature(enable = "neon")]
unsafe fn axpy_q8_0(a: f32, x: &[BlockQ8_0], y: &mut [f32]) {
    let av = vdupq_n_f32(a);
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let ad = vmulq_f32(av, scale4(b.d));
        let q = q8_to_f32(&b.qs);
        for (q, y) in q.iter().zip(y.chunks_exact_mut(4)) {
            // SAFETY: a 4-lane load and store of the 4-element chunk.
            vst1q_f32(y.as_mut_ptr(), vfmaq_f32(vld1q_f32(y.as_ptr()), ad, *q));
        }
    }
}
