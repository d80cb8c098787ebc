//! Compute kernels behind one dispatch point.
//!
//! [`Kernels`] is the set of hot operations; each instruction set implements
//! it in its own module. [`scalar`] is written for clarity: it is the oracle
//! every SIMD version is property-tested against, and the fallback on any
//! CPU. [`select`] picks the best implementation the CPU supports once at
//! start-up; `CRYSTALD_KERNELS=scalar` (or the `--kernels` flag) forces one.
//!
//! Quantized matrices are multiplied with int8 arithmetic: activations are
//! quantized on the fly, to Q8_0 (blocks of 32) for Q4_0/Q8_0 weights and
//! to Q8_K (blocks of 256) for the k-quants, as ggml does, and each block
//! product is an integer dot scaled by the block scales.

/// The driver of a tokens-across-lanes Q4_0 prefill kernel (the AVX2 and
/// AVX-512 sets each have one, with their own tile, lane count and tile
/// shape): rows outside, so a tile's weights are read from memory once,
/// unpacked to bytes into `$wu` (in L1) and reused by every token group;
/// tiles of `$rows` rows × `$groups` lane groups of `$lanes` tokens, and
/// tiles of 1 at the edges. `$x` holds the packed groups (`nb` blocks
/// each); row `r` · token `t` goes to `$out[r * n + t]`. Expands inside the
/// caller's `unsafe` target-feature function.
#[cfg(target_arch = "x86_64")]
macro_rules! lanes_matmul {
    ($tile:ident, $lanes:ident, $rows:ident, $groups:ident, $w:expr, $nb:expr, $x:expr, $n:expr, $out:expr, $wu:expr) => {{
        let (w, nb, x, n, out, wu) = ($w, $nb, $x, $n, $out, $wu);
        let groups = n.div_ceil($lanes);
        let rows = w.len() / nb;
        let mut r = 0;
        while r < rows {
            let rt = if rows - r >= $rows { $rows } else { 1 };
            let (wr, or) = (&w[r * nb..(r + rt) * nb], &mut out[r * n..(r + rt) * n]);
            unpack_q4_0(wr, wu);
            let mut g = 0;
            while g < groups {
                let gt = if groups - g >= $groups { $groups } else { 1 };
                let xg = &x[g * nb..(g + gt) * nb];
                let t0 = g * $lanes;
                match (rt, gt) {
                    ($rows, $groups) => $tile::<$rows, $groups>(wr, wu, nb, xg, or, n, t0),
                    ($rows, _) => $tile::<$rows, 1>(wr, wu, nb, xg, or, n, t0),
                    (_, $groups) => $tile::<1, $groups>(wr, wu, nb, xg, or, n, t0),
                    _ => $tile::<1, 1>(wr, wu, nb, xg, or, n, t0),
                }
                g += gt;
            }
            r += rt;
        }
    }};
}

/// Writes one lane group's results, tokens `t..t + lanes.len()` of a row,
/// to `row` (one weight row's `n` outputs); lanes past the last token (a
/// last, partial group) are dropped.
#[cfg(target_arch = "x86_64")]
fn store_lanes(row: &mut [f32], t: usize, lanes: &[f32]) {
    if t < row.len() {
        let m = lanes.len().min(row.len() - t);
        row[t..t + m].copy_from_slice(&lanes[..m]);
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "aarch64")]
pub mod neon;
pub mod scalar;

use crate::quant::{
    BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ6K, BlockQ8K, BlockQ8_0, GgmlType, QK, QK_K,
};
use half::f16;
use std::ops::Range;

/// A weight matrix in file layout: `rows` rows of `cols` values, each row
/// contiguous along the reduction dimension.
#[derive(Clone, Copy, Debug)]
pub struct Weight<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> Weight<'a> {
    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols).expect("validated at load")
    }

    pub fn row(&self, r: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// Rows `rows` as blocks (or values) of `T`: the caller checked that
    /// `T` is the storage of `self.ty`.
    pub fn rows_as<T: bytemuck::Pod>(&self, rows: Range<usize>) -> &'a [T] {
        let n = self.row_bytes();
        bytemuck::cast_slice(&self.data[rows.start * n..rows.end * n])
    }

    /// The activation format this weight type is multiplied with.
    pub fn act_type(&self) -> ActType {
        match self.ty {
            GgmlType::F32 | GgmlType::F16 => ActType::F32,
            GgmlType::Q4_0 | GgmlType::Q8_0 => ActType::Q8_0,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => ActType::Q8K,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActType {
    F32,
    Q8_0,
    Q8K,
}

/// `n_tokens` activation rows of `cols` values, in the format the weight
/// type needs.
#[derive(Clone, Copy, Debug)]
pub enum Acts<'a> {
    F32(&'a [f32]),
    Q8_0(&'a [BlockQ8_0]),
    Q8K(&'a [BlockQ8K]),
}

impl Acts<'_> {
    pub fn n_tokens(&self, cols: usize) -> usize {
        match self {
            Acts::F32(x) => x.len() / cols,
            Acts::Q8_0(x) => x.len() / (cols / QK),
            Acts::Q8K(x) => x.len() / (cols / QK_K),
        }
    }
}

/// The most bytes any kernel set's packed layout takes per activation block
/// (one token's 32 values), for the scratch-memory budget.
pub const PACKED_BYTES_PER_BLOCK: usize = 128;

/// One 64-byte line of packed-activation storage: the alignment every
/// packed layout may assume.
#[derive(Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Reusable storage for packed activations, grown to the largest product
/// seen, so a warm forward pass allocates nothing.
#[derive(Default)]
pub struct PackBuf(Vec<Line>);

impl PackBuf {
    /// `count` values of `T` at the start of the buffer, holding whatever
    /// the last product left there: packers write every field they read,
    /// so the buffer only grows and is never cleared on the hot path.
    pub fn take<T: bytemuck::Pod>(&mut self, count: usize) -> &mut [T] {
        let bytes = count * std::mem::size_of::<T>();
        let lines = bytes.div_ceil(64);
        if self.0.len() < lines {
            self.0.resize(lines, Line([0; 64]));
        }
        let all: &mut [u8] = bytemuck::cast_slice_mut(&mut self.0);
        bytemuck::cast_slice_mut(&mut all[..bytes])
    }

    /// Returns the memory to the system.
    pub fn release(&mut self) {
        self.0 = Vec::new();
    }
}

/// Activations ready for one matrix product: `n` tokens in the format the
/// weight type needs, plus whatever layout the kernel set that packed them
/// prefers. Packed once per product and shared by every thread's row range.
#[derive(Clone, Copy)]
pub struct Packed<'a> {
    pub n: usize,
    pub acts: Acts<'a>,
    /// The weight type this was packed for.
    pub ty: GgmlType,
    /// The kernel set that packed it: only that set can read `layout`.
    pub by: &'static str,
    layout: &'a [u8],
}

impl<'a> Packed<'a> {
    /// `x` as it is, no extra layout.
    pub fn plain(by: &'static str, w: &Weight<'_>, x: Acts<'a>) -> Packed<'a> {
        Packed::with_layout::<u8>(by, w, x, &[])
    }

    pub fn with_layout<T: bytemuck::Pod>(
        by: &'static str,
        w: &Weight<'_>,
        x: Acts<'a>,
        layout: &'a [T],
    ) -> Packed<'a> {
        Packed {
            n: x.n_tokens(w.cols),
            acts: x,
            ty: w.ty,
            by,
            layout: bytemuck::cast_slice(layout),
        }
    }

    /// The kernel set's layout as `T`s (the set knows which type it wrote).
    pub fn layout<T: bytemuck::Pod>(&self) -> &'a [T] {
        bytemuck::cast_slice(self.layout)
    }
}

/// The hot operations, one implementation per instruction set.
///
/// A set implements the per-type products over whole rows; the checks and
/// the type dispatch live once, in the provided [`Kernels::matmul_rows`].
pub trait Kernels: Send + Sync {
    fn name(&self) -> &'static str;

    /// Prepares activations for products with `w`: once per product, before
    /// the rows are split across threads. The default keeps `x` as it is.
    fn pack<'a>(&self, w: &Weight<'_>, x: Acts<'a>, buf: &'a mut PackBuf) -> Packed<'a> {
        let _ = buf;
        Packed::plain(self.name(), w, x)
    }

    /// `w`: whole Q4_0 rows of `nb` blocks; `out`: rows × `x.n`, grouped by row.
    fn matmul_q4_0(&self, w: &[BlockQ4_0], nb: usize, x: &Packed<'_>, out: &mut [f32]);
    fn matmul_q8_0(&self, w: &[BlockQ8_0], nb: usize, x: &Packed<'_>, out: &mut [f32]);
    /// `w`: whole k-quant rows of `nb` super-blocks; `x`: Q8_K activations.
    fn matmul_q4_k(&self, w: &[BlockQ4K], nb: usize, x: &Packed<'_>, out: &mut [f32]);
    fn matmul_q5_k(&self, w: &[BlockQ5K], nb: usize, x: &Packed<'_>, out: &mut [f32]);
    fn matmul_q6_k(&self, w: &[BlockQ6K], nb: usize, x: &Packed<'_>, out: &mut [f32]);
    /// `x`: `n` tokens of `cols` f32 values.
    fn matmul_f16(&self, w: &[f16], cols: usize, x: &[f32], n: usize, out: &mut [f32]);
    fn matmul_f32(&self, w: &[f32], cols: usize, x: &[f32], n: usize, out: &mut [f32]);

    /// For each weight row `r` in `rows` and each token `t`:
    /// `out[(r - rows.start) * n + t] = W[r] · x[t]`.
    ///
    /// Output is grouped by weight row so that threads given disjoint row
    /// ranges write disjoint slices.
    fn matmul_rows(&self, w: &Weight<'_>, x: &Packed<'_>, rows: Range<usize>, out: &mut [f32]) {
        let n = x.n;
        assert!(
            rows.end <= w.rows,
            "rows {rows:?} out of {} weight rows",
            w.rows
        );
        assert!(
            out.len() >= rows.len() * n,
            "output too short for {} rows × {n} tokens",
            rows.len()
        );
        assert!(
            x.by == self.name() && x.ty == w.ty,
            "activations packed by '{}' for {} used by '{}' for {}",
            x.by,
            x.ty,
            self.name(),
            w.ty
        );
        let out = &mut out[..rows.len() * n];
        let nb = w.cols / w.ty.block_size();
        match (w.ty, x.acts) {
            (GgmlType::Q4_0, Acts::Q8_0(a)) => {
                assert!(a.len() >= n * nb, "activations too short");
                self.matmul_q4_0(w.rows_as(rows), nb, x, out)
            }
            (GgmlType::Q8_0, Acts::Q8_0(a)) => {
                assert!(a.len() >= n * nb, "activations too short");
                self.matmul_q8_0(w.rows_as(rows), nb, x, out)
            }
            (GgmlType::Q4_K, Acts::Q8K(a)) => {
                assert!(a.len() >= n * nb, "activations too short");
                self.matmul_q4_k(w.rows_as(rows), nb, x, out)
            }
            (GgmlType::Q5_K, Acts::Q8K(a)) => {
                assert!(a.len() >= n * nb, "activations too short");
                self.matmul_q5_k(w.rows_as(rows), nb, x, out)
            }
            (GgmlType::Q6_K, Acts::Q8K(a)) => {
                assert!(a.len() >= n * nb, "activations too short");
                self.matmul_q6_k(w.rows_as(rows), nb, x, out)
            }
            (GgmlType::F16, Acts::F32(a)) => {
                self.matmul_f16(w.rows_as(rows), w.cols, &a[..n * w.cols], n, out)
            }
            (GgmlType::F32, Acts::F32(a)) => {
                self.matmul_f32(w.rows_as(rows), w.cols, &a[..n * w.cols], n, out)
            }
            (ty, _) => panic!("{ty} weights paired with the wrong activation format"),
        }
    }

    /// [`Kernels::pack`] then [`Kernels::matmul_rows`], for a one-off
    /// product on one thread.
    fn matmul(&self, w: &Weight<'_>, x: Acts<'_>, rows: Range<usize>, out: &mut [f32]) {
        let mut buf = PackBuf::default();
        let x = self.pack(w, x, &mut buf);
        self.matmul_rows(w, &x, rows, out)
    }

    /// Quantizes `x` into Q8_0 blocks (`x.len() / 32` of them), with ggml's
    /// reference rounding.
    fn quantize_q8_0(&self, x: &[f32], y: &mut [BlockQ8_0]);

    /// Quantizes `x` into Q8_K blocks (`x.len() / 256` of them). Once per
    /// product, so the reference code serves every set.
    fn quantize_q8_k(&self, x: &[f32], y: &mut [BlockQ8K]) {
        crate::quant::q8_k::quantize_row(x, y)
    }

    fn dot_f32(&self, a: &[f32], b: &[f32]) -> f32;
    fn dot_f16(&self, a: &[f32], b: &[f16]) -> f32;
    /// `y += a * x`
    fn axpy_f32(&self, a: f32, x: &[f32], y: &mut [f32]);
    fn axpy_f16(&self, a: f32, x: &[f16], y: &mut [f32]);

    /// `a · dequant(b)` for a key row stored as Q8_0 blocks (a Q8_0 KV
    /// cache): `a` holds exactly `32 * b.len()` values (asserted).
    fn dot_q8_0(&self, a: &[f32], b: &[BlockQ8_0]) -> f32;
    /// `y += a * dequant(x)` for a value row stored as Q8_0 blocks: `y`
    /// holds exactly `32 * x.len()` values (asserted).
    fn axpy_q8_0(&self, a: f32, x: &[BlockQ8_0], y: &mut [f32]);
}

/// The implementations this CPU can run, best first.
pub fn available() -> Vec<&'static dyn Kernels> {
    let mut v: Vec<&'static dyn Kernels> = Vec::new();
    v.push(&scalar::Scalar);
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(k) = avx2::Avx2::detect() {
            v.push(k);
        }
        if let Some(k) = avx512::Avx512::detect() {
            v.push(k);
        }
    }
    // Baseline before DotProd, so that after the reversal an A76/A78 gets
    // "neon-dotprod" first and a Cortex-A72 (Pi 4) gets "neon".
    #[cfg(target_arch = "aarch64")]
    {
        if let Some(k) = neon::Neon::detect() {
            v.push(k);
        }
        if let Some(k) = neon::Neon::detect_dotprod() {
            v.push(k);
        }
    }
    v.reverse();
    v
}

/// Picks the kernels: `name` ("scalar", "avx2", "avx512", "neon", "neon-dotprod", or "auto"/None for
/// the best available). An unknown or unsupported name is an error, never a
/// silent fallback, so a forced run really tests what it names.
pub fn select(name: Option<&str>) -> Result<&'static dyn Kernels, String> {
    let avail = available();
    match name.unwrap_or("auto") {
        "auto" | "" => Ok(avail[0]),
        want => avail
            .iter()
            .copied()
            .find(|k| k.name() == want)
            .ok_or_else(|| {
                let names: Vec<_> = avail.iter().map(|k| k.name()).collect();
                format!(
                    "kernels '{want}' are not available on this CPU (available: {})",
                    names.join(", ")
                )
            }),
    }
}

/// [`select`] with the choice taken from `CRYSTALD_KERNELS`.
pub fn from_env() -> Result<&'static dyn Kernels, String> {
    select(std::env::var("CRYSTALD_KERNELS").ok().as_deref())
}
