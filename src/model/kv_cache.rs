//! The attention key/value cache: for every layer and position, the rotated
//! keys and the values of all heads (`n_embd` wide), laid out
//! `[layer][pos][width]`.
//!
//! The cache is an anonymous map, reserved for the whole context but not
//! written: the kernel hands out zero pages only as positions fill, so a
//! daemon serving short prompts owns the pages of those positions in every
//! layer, not the full context (1 GiB at 2048 tokens for the 7B model in
//! f16). [`KvCache::release_from`] gives the pages past a position back to
//! the kernel after a long request.

use half::f16;
use memmap2::{MmapMut, MmapOptions, UncheckedAdvice};

/// Named `f32`/`f16` in the config file and on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvType {
    F32,
    F16,
}

impl KvType {
    pub fn bytes(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::F16 => 2,
        }
    }
}

/// One of the two caches (keys or values), as raw zero-initialised pages.
pub struct KvStore {
    ty: KvType,
    map: MmapMut,
}

/// A store seen as its element type, for the attention kernels.
#[derive(Clone, Copy)]
pub enum KvSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl KvStore {
    fn new(ty: KvType, n: usize) -> std::io::Result<KvStore> {
        let map = MmapOptions::new().len(n * ty.bytes()).map_anon()?;
        Ok(KvStore { ty, map })
    }

    pub fn view(&self) -> KvSlice<'_> {
        // The map is page-aligned and a whole number of elements long.
        match self.ty {
            KvType::F32 => KvSlice::F32(bytemuck::cast_slice(&self.map)),
            KvType::F16 => KvSlice::F16(bytemuck::cast_slice(&self.map)),
        }
    }

    pub fn write(&mut self, at: usize, src: &[f32]) {
        match self.ty {
            KvType::F32 => {
                let c: &mut [f32] = bytemuck::cast_slice_mut(&mut self.map);
                c[at..at + src.len()].copy_from_slice(src);
            }
            KvType::F16 => {
                let c: &mut [f16] = bytemuck::cast_slice_mut(&mut self.map);
                for (d, &s) in c[at..at + src.len()].iter_mut().zip(src) {
                    *d = f16::from_f32(s);
                }
            }
        }
    }

    /// Hands the whole pages inside elements `[from, to)` back to the
    /// kernel; they read as zeros afterwards and cost nothing until written.
    fn release(&mut self, from: usize, to: usize) {
        let page = page_size();
        let start = (from * self.ty.bytes()).next_multiple_of(page);
        let end = (to * self.ty.bytes()) / page * page;
        if start >= end {
            return;
        }
        // SAFETY: MADV_DONTNEED on a private anonymous map only replaces
        // the pages of [start, end) (inside the map, checked above by
        // construction from element indices < len) with zero pages. No
        // reference into the map outlives this call: we hold `&mut self`,
        // and every position past `from` is dead data that the forward pass
        // rewrites before reading it again.
        let r = unsafe {
            self.map
                .unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
        };
        // Failing to release only costs memory; the contents stay valid.
        debug_assert!(r.is_ok(), "madvise(MADV_DONTNEED): {r:?}");
    }

    /// Whether each page of the store is resident, for tests.
    #[cfg(test)]
    fn resident_pages(&self) -> Vec<bool> {
        let page = page_size();
        let n = self.map.len().div_ceil(page);
        let mut vec = vec![0u8; n];
        // SAFETY: the pointer and length describe our own live map, and
        // `vec` has one byte per page of it, as mincore(2) requires.
        let r = unsafe {
            nix::libc::mincore(
                self.map.as_ptr() as *mut nix::libc::c_void,
                self.map.len(),
                vec.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.into_iter().map(|b| b & 1 == 1).collect()
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { nix::libc::sysconf(nix::libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

pub struct KvCache {
    pub k: KvStore,
    pub v: KvStore,
    pub n_layer: usize,
    pub n_ctx: usize,
    pub width: usize,
}

impl KvCache {
    /// Reserves the cache; fails only when the address space cannot hold it.
    pub fn new(ty: KvType, n_layer: usize, n_ctx: usize, width: usize) -> std::io::Result<KvCache> {
        let n = n_layer * n_ctx * width;
        Ok(KvCache {
            k: KvStore::new(ty, n)?,
            v: KvStore::new(ty, n)?,
            n_layer,
            n_ctx,
            width,
        })
    }

    /// Bytes the full cache takes once every position is filled.
    pub fn full_bytes(ty: KvType, n_layer: usize, n_ctx: usize, width: usize) -> u64 {
        2 * (n_layer * n_ctx * width * ty.bytes()) as u64
    }

    /// Element offset of (layer, position).
    pub fn at(&self, layer: usize, pos: usize) -> usize {
        (layer * self.n_ctx + pos) * self.width
    }

    pub fn bytes(&self) -> usize {
        self.k.map.len() + self.v.map.len()
    }

    /// Returns the memory of every position from `pos` on, in every layer.
    pub fn release_from(&mut self, pos: usize) {
        let pos = pos.min(self.n_ctx);
        for l in 0..self.n_layer {
            let (from, to) = (self.at(l, pos), self.at(l + 1, 0));
            self.k.release(from, to);
            self.v.release(from, to);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resident(c: &KvCache) -> usize {
        [&c.k, &c.v]
            .iter()
            .map(|s| s.resident_pages().iter().filter(|&&r| r).count())
            .sum()
    }

    /// qemu-user (the ARM tests run under it) ignores madvise, so the
    /// release can only be seen where the kernel does it itself.
    /// Probed on a map of its own, directly, so that a broken
    /// `release` cannot hide behind it.
    fn madvise_is_honoured() -> bool {
        let mut m = MmapOptions::new().len(page_size()).map_anon().unwrap();
        m[0] = 1;
        // SAFETY: our own live map, whole; no references into it are held.
        let r = unsafe {
            nix::libc::madvise(
                m.as_mut_ptr() as *mut nix::libc::c_void,
                m.len(),
                nix::libc::MADV_DONTNEED,
            )
        };
        r == 0 && m[0] == 0
    }

    #[test]
    fn pages_are_touched_as_positions_fill_and_released_after() {
        let page = page_size();
        // One position of one layer is two pages wide, as for the 7B model
        // (4096 f16 values = 8 KiB).
        let width = page;
        let (n_layer, n_ctx) = (4, 512);
        let mut c = KvCache::new(KvType::F16, n_layer, n_ctx, width).unwrap();
        let pages_per_pos = 2 * width * 2 / page; // k and v
        assert_eq!(resident(&c), 0, "a new cache must not own memory");
        let row = vec![1.0f32; width];
        for pos in 0..100 {
            for l in 0..n_layer {
                let at = c.at(l, pos);
                c.k.write(at, &row);
                c.v.write(at, &row);
            }
        }
        assert_eq!(resident(&c), 100 * n_layer * pages_per_pos);
        c.release_from(10);
        let released = madvise_is_honoured();
        if released {
            assert_eq!(resident(&c), 10 * n_layer * pages_per_pos);
        }
        // What was kept is intact; what was released reads as zero.
        let KvSlice::F16(k) = c.k.view() else {
            unreachable!()
        };
        for l in 0..n_layer {
            assert!(k[c.at(l, 9)..c.at(l, 10)].iter().all(|&x| x == f16::ONE));
            if released {
                assert!(k[c.at(l, 10)..c.at(l, 11)].iter().all(|&x| x == f16::ZERO));
            }
        }
    }

    #[test]
    fn release_keeps_pages_shared_with_kept_positions() {
        // Narrow rows: many positions per page. Releasing from a position
        // in the middle of a page must keep that page.
        let width = 64;
        let mut c = KvCache::new(KvType::F32, 2, 1024, width).unwrap();
        let row: Vec<f32> = (0..width).map(|i| i as f32 + 1.0).collect();
        for pos in 0..1024 {
            for l in 0..2 {
                let at = c.at(l, pos);
                c.k.write(at, &row);
            }
        }
        c.release_from(17);
        let KvSlice::F32(k) = c.k.view() else {
            unreachable!()
        };
        for l in 0..2 {
            assert_eq!(&k[c.at(l, 16)..c.at(l, 17)], &row[..]);
        }
        let per_page = page_size() / (width * 4);
        let kept_pages = 17usize.div_ceil(per_page);
        if madvise_is_honoured() {
            assert_eq!(resident(&c), 2 * kept_pages);
        }
    }
}
