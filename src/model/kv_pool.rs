//! The KV pool: one bounded reservation of key/value memory shared by every
//! sequence, split into blocks of [`BLOCK`] positions. A sequence holds a
//! block table (its blocks in position order); attention reads its keys and
//! values through it.
//!
//! Memory: the pool is an anonymous map reserved once at start. The kernel
//! hands out zero pages only as blocks are written, so an idle daemon owns
//! nothing of it; [`KvPool::trim`] gives the pages of free blocks back.
//! Layout of each of the two stores (keys, values):
//! `[block][layer][slot][width]`, so a block is one contiguous, page-sized
//! multiple (for the real model) that is touched and released whole.
//!
//! Prefix reuse: every full block a sequence computed is entered in an index
//! keyed by its tokens and the block before it. A finished sequence's
//! blocks stay there, unreferenced, until space is needed (least recently
//! used first); a new sequence whose tokens begin with an indexed chain
//! takes those blocks read-only and computes only the rest. Only full
//! blocks are shared, so nobody ever writes into a block someone else
//! reads.

use crate::kernels::Kernels;
use crate::quant::{BlockQ8_0, QK};
use half::f16;
use memmap2::{MmapMut, MmapOptions, UncheckedAdvice};
use std::collections::{BTreeMap, HashMap};

/// Positions per block: small enough that a conversation's unshared tail
/// wastes little, large enough that block-table lookups are rare in the
/// attention loop.
pub const BLOCK: usize = 16;

/// Element type of the pool, named `f32`/`f16`/`q8_0` in the config file
/// and on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvType {
    F32,
    F16,
    /// ggml's Q8_0 blocks (32 values, one f16 scale): 8.5 bits per value.
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl KvType {
    /// Bytes of one position's row of `width` values.
    pub fn row_bytes(self, width: usize) -> usize {
        match self {
            KvType::F32 => width * 4,
            KvType::F16 => width * 2,
            KvType::Q8_0 => width / QK * std::mem::size_of::<BlockQ8_0>(),
        }
    }

    /// Stored elements per `n` values (Q8_0 stores blocks of 32).
    pub fn elems(self, n: usize) -> usize {
        match self {
            KvType::F32 | KvType::F16 => n,
            KvType::Q8_0 => n / QK,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        }
    }
}

/// A store seen as its element type, for the attention kernels; offsets
/// come from [`KvPool::row`].
#[derive(Clone, Copy)]
pub enum KvSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Q8_0(&'a [BlockQ8_0]),
}

/// One of the two stores (keys or values), as raw zero-initialised pages.
struct Store {
    ty: KvType,
    map: MmapMut,
}

impl Store {
    fn new(ty: KvType, bytes: usize) -> std::io::Result<Store> {
        let map = MmapOptions::new().len(bytes.max(1)).map_anon()?;
        Ok(Store { ty, map })
    }

    fn view(&self) -> KvSlice<'_> {
        // The map is page-aligned and rows are whole elements, so every
        // cast below covers whole elements at their alignment.
        let n = self.map.len() / self.ty.row_bytes(QK) * self.ty.elems(QK);
        match self.ty {
            KvType::F32 => KvSlice::F32(&bytemuck::cast_slice(&self.map)[..n]),
            KvType::F16 => KvSlice::F16(&bytemuck::cast_slice(&self.map)[..n]),
            KvType::Q8_0 => {
                let bytes = n * std::mem::size_of::<BlockQ8_0>();
                KvSlice::Q8_0(bytemuck::cast_slice(&self.map[..bytes]))
            }
        }
    }

    /// Writes one row of values at element offset `at`.
    fn write(&mut self, at: usize, src: &[f32], k: &dyn Kernels) {
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
            KvType::Q8_0 => {
                let size = std::mem::size_of::<BlockQ8_0>();
                let n = src.len() / QK;
                let bytes = &mut self.map[at * size..(at + n) * size];
                k.quantize_q8_0(src, bytemuck::cast_slice_mut(bytes));
            }
        }
    }

    fn copy_within(&mut self, from: usize, to: usize, bytes: usize) {
        self.map.copy_within(from..from + bytes, to);
    }

    /// Hands the whole pages inside bytes `[from, to)` back to the kernel;
    /// they read as zeros afterwards and cost nothing until written.
    fn release(&mut self, from: usize, to: usize) {
        let page = page_size();
        let start = from.next_multiple_of(page);
        let end = to / page * page;
        if start >= end {
            return;
        }
        // SAFETY: MADV_DONTNEED on a private anonymous map only replaces
        // the pages of [start, end) (inside the map: callers pass byte
        // ranges of free blocks, which lie inside it) with zero pages. No
        // reference into the map outlives this call (we hold `&mut self`),
        // and a free block's contents are dead: it is written before it is
        // read again.
        let r = unsafe {
            self.map
                .unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
        };
        // Failing to release only costs memory; the contents stay valid.
        debug_assert!(r.is_ok(), "madvise(MADV_DONTNEED): {r:?}");
    }

    /// Resident pages of the store, for tests.
    #[cfg(test)]
    fn resident_pages(&self) -> usize {
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
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }
}

/// The system's page size (4 KiB on most, 16 or 64 KiB on some arm64 kernels).
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { nix::libc::sysconf(nix::libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// A full block's identity in the prefix index: the node id of the block
/// before it (0 at the start of a sequence) and its own tokens. Node ids
/// are never reused, so a key naming an evicted parent can never match
/// again, whatever block later takes the parent's memory.
type Key = (u64, [u32; BLOCK]);

#[derive(Clone, Default)]
struct BlockInfo {
    /// Sequences using the block.
    refs: u32,
    /// The block's entry in the prefix index, if it has one.
    key: Option<Key>,
    node: u64,
    /// Its place in the eviction order while unreferenced and indexed.
    lru: Option<(u64, u32)>,
}

/// One sequence's tokens and the blocks holding their keys and values.
#[derive(Debug, Default)]
pub struct Sequence {
    blocks: Vec<u32>,
    tokens: Vec<u32>,
    /// The node id each leading full block is known by in the index (its
    /// own, or that of an identical block another sequence indexed first).
    chain: Vec<u64>,
}

impl Sequence {
    /// The tokens whose keys and values are in the pool, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }
}

/// The pool has no block to give (all are held by running sequences).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolFull {
    pub needed: usize,
    pub available: usize,
}

pub struct KvPool {
    ty: KvType,
    n_layer: usize,
    width: usize,
    k: Store,
    v: Store,
    blocks: Vec<BlockInfo>,
    free: Vec<u32>,
    /// Unreferenced indexed blocks, oldest first: (release stamp, distance
    /// from the sequence's end) so that a chain is evicted from its tail.
    cached: BTreeMap<(u64, u32), u32>,
    index: HashMap<Key, u32>,
    next_node: u64,
    clock: u64,
}

impl KvPool {
    /// Reserves room for `tokens` positions (rounded up to whole blocks);
    /// fails only when the address space cannot hold it.
    pub fn new(ty: KvType, n_layer: usize, width: usize, tokens: usize) -> std::io::Result<KvPool> {
        assert!(
            ty != KvType::Q8_0 || width.is_multiple_of(QK),
            "Q8_0 rows are whole blocks"
        );
        let n_blocks = tokens.div_ceil(BLOCK).max(1);
        let bytes = n_blocks * n_layer * BLOCK * ty.row_bytes(width);
        Ok(KvPool {
            ty,
            n_layer,
            width,
            k: Store::new(ty, bytes)?,
            v: Store::new(ty, bytes)?,
            blocks: vec![BlockInfo::default(); n_blocks],
            // Lowest blocks first, so a lightly used pool stays at its start.
            free: (0..n_blocks as u32).rev().collect(),
            cached: BTreeMap::new(),
            index: HashMap::new(),
            next_node: 1,
            clock: 0,
        })
    }

    /// Bytes the pool takes once every block is written.
    pub fn full_bytes(ty: KvType, n_layer: usize, width: usize, tokens: usize) -> u64 {
        2 * (tokens.div_ceil(BLOCK) * BLOCK * n_layer * ty.row_bytes(width)) as u64
    }

    pub fn kv_type(&self) -> KvType {
        self.ty
    }

    /// Positions the pool holds.
    pub fn capacity(&self) -> usize {
        self.blocks.len() * BLOCK
    }

    pub fn bytes(&self) -> usize {
        self.k.map.len() + self.v.map.len()
    }

    /// Blocks held by running sequences.
    pub fn blocks_in_use(&self) -> usize {
        self.blocks.len() - self.free.len() - self.cached.len()
    }

    /// Unreferenced blocks kept for prefix reuse.
    pub fn blocks_cached(&self) -> usize {
        self.cached.len()
    }

    /// Blocks a sequence could take now (free or evictable).
    pub fn blocks_available(&self) -> usize {
        self.free.len() + self.cached.len()
    }

    fn block_bytes(&self) -> usize {
        self.n_layer * BLOCK * self.ty.row_bytes(self.width)
    }

    /// Element offset of (block, layer, slot) in either store.
    pub fn row(&self, block: u32, layer: usize, slot: usize) -> usize {
        ((block as usize * self.n_layer + layer) * BLOCK + slot) * self.ty.elems(self.width)
    }

    pub fn keys(&self) -> KvSlice<'_> {
        self.k.view()
    }

    pub fn values(&self) -> KvSlice<'_> {
        self.v.view()
    }

    /// Stores position `pos` of `seq` (whose block must be reserved) in `layer`.
    pub fn write(
        &mut self,
        seq: &Sequence,
        layer: usize,
        pos: usize,
        key: &[f32],
        value: &[f32],
        k: &dyn Kernels,
    ) {
        let block = seq.blocks[pos / BLOCK];
        debug_assert!(
            self.blocks[block as usize].key.is_none(),
            "writing into an indexed block"
        );
        let at = self.row(block, layer, pos % BLOCK);
        self.k.write(at, key, k);
        self.v.write(at, value, k);
    }

    /// A new sequence that starts with the longest indexed chain of full
    /// blocks matching `tokens[..max]`, taken read-only.
    pub fn lookup(&mut self, tokens: &[u32], max: usize) -> Sequence {
        let mut seq = Sequence::default();
        let mut parent = 0;
        for chunk in tokens[..max.min(tokens.len())].chunks_exact(BLOCK) {
            let key = (parent, chunk.try_into().expect("BLOCK tokens"));
            let Some(&b) = self.index.get(&key) else {
                break;
            };
            self.take(b);
            parent = self.blocks[b as usize].node;
            seq.blocks.push(b);
            seq.chain.push(parent);
            seq.tokens.extend_from_slice(chunk);
        }
        seq
    }

    fn take(&mut self, b: u32) {
        let info = &mut self.blocks[b as usize];
        if let Some(at) = info.lru.take() {
            self.cached.remove(&at);
        }
        info.refs += 1;
    }

    /// Blocks `seq` must add to hold `n` more positions.
    pub fn blocks_needed(&self, seq: &Sequence, n: usize) -> usize {
        (seq.tokens.len() + n)
            .div_ceil(BLOCK)
            .saturating_sub(seq.blocks.len())
    }

    /// Makes room for `n` more positions of `seq`, evicting cached blocks
    /// (least recently used first) when no block is free. Takes nothing
    /// when it cannot take everything.
    pub fn reserve(&mut self, seq: &mut Sequence, n: usize) -> Result<(), PoolFull> {
        let needed = self.blocks_needed(seq, n);
        if needed > self.blocks_available() {
            return Err(PoolFull {
                needed,
                available: self.blocks_available(),
            });
        }
        for _ in 0..needed {
            let b = match self.free.pop() {
                Some(b) => b,
                None => self.evict_oldest().expect("counted above"),
            };
            self.blocks[b as usize].refs = 1;
            seq.blocks.push(b);
        }
        Ok(())
    }

    /// Takes the least recently used cached block out of the index.
    fn evict_oldest(&mut self) -> Option<u32> {
        let (_, b) = self.cached.pop_first()?;
        let info = &mut self.blocks[b as usize];
        info.lru = None;
        if let Some(key) = info.key.take() {
            self.index.remove(&key);
        }
        Some(b)
    }

    /// Records that `tokens` were computed into `seq`'s reserved blocks,
    /// and indexes the blocks that became full.
    pub fn commit(&mut self, seq: &mut Sequence, tokens: &[u32]) {
        seq.tokens.extend_from_slice(tokens);
        debug_assert!(seq.tokens.len() <= seq.blocks.len() * BLOCK);
        while (seq.chain.len() + 1) * BLOCK <= seq.tokens.len() {
            let i = seq.chain.len();
            let parent = if i == 0 { 0 } else { seq.chain[i - 1] };
            let chunk: [u32; BLOCK] = seq.tokens[i * BLOCK..(i + 1) * BLOCK]
                .try_into()
                .expect("BLOCK tokens");
            let key = (parent, chunk);
            let node = match self.index.get(&key) {
                // Another sequence indexed the same block first: ours stays
                // private, later blocks chain on to theirs.
                Some(&other) => self.blocks[other as usize].node,
                None => {
                    let b = seq.blocks[i];
                    let node = self.next_node;
                    self.next_node += 1;
                    let info = &mut self.blocks[b as usize];
                    info.key = Some(key);
                    info.node = node;
                    self.index.insert(key, b);
                    node
                }
            };
            seq.chain.push(node);
        }
    }

    /// Gives a sequence's blocks back: indexed ones stay cached for reuse,
    /// the others are free at once.
    pub fn release(&mut self, seq: Sequence) {
        self.clock += 1;
        let n = seq.blocks.len();
        for (i, &b) in seq.blocks.iter().enumerate() {
            self.drop_ref(b, (n - 1 - i) as u32);
        }
    }

    fn drop_ref(&mut self, b: u32, depth_from_end: u32) {
        let info = &mut self.blocks[b as usize];
        info.refs -= 1;
        if info.refs > 0 {
            return;
        }
        if info.key.is_some() {
            // Within one release, the tail goes first: its parent must stay
            // for it to be found at all.
            let at = (self.clock, depth_from_end);
            info.lru = Some(at);
            self.cached.insert(at, b);
        } else {
            self.free.push(b);
        }
    }

    /// Forgets everything after the first `n` tokens of `seq`. A block that
    /// is cut in the middle will be written again, so it is made private
    /// first (taken out of the index, or copied if others read it).
    pub fn truncate(&mut self, seq: &mut Sequence, n: usize) {
        let n = n.min(seq.tokens.len());
        seq.tokens.truncate(n);
        seq.chain.truncate(n / BLOCK);
        self.clock += 1;
        let keep = n.div_ceil(BLOCK);
        let tail: Vec<u32> = seq.blocks.drain(keep..).collect();
        let m = tail.len();
        for (i, b) in tail.into_iter().enumerate() {
            self.drop_ref(b, (m - 1 - i) as u32);
        }
        if !n.is_multiple_of(BLOCK) {
            let last = seq.blocks[keep - 1];
            let info = &mut self.blocks[last as usize];
            if info.refs == 1 {
                if let Some(key) = info.key.take() {
                    self.index.remove(&key);
                }
            } else if info.key.is_some() {
                let copy = match self.free.pop() {
                    Some(b) => b,
                    None => match self.evict_oldest() {
                        Some(b) => b,
                        // No room for a copy: recompute the partial block.
                        None => {
                            seq.blocks.pop();
                            seq.tokens.truncate((keep - 1) * BLOCK);
                            self.drop_ref(last, 0);
                            return;
                        }
                    },
                };
                let bb = self.block_bytes();
                let (from, to) = (last as usize * bb, copy as usize * bb);
                self.k.copy_within(from, to, bb);
                self.v.copy_within(from, to, bb);
                self.blocks[copy as usize].refs = 1;
                seq.blocks[keep - 1] = copy;
                self.drop_ref(last, 0);
            }
        }
    }

    /// While idle: keeps at most `keep_tokens` positions of cached blocks
    /// (the most recently used) and gives the memory of every free block
    /// back to the system.
    pub fn trim(&mut self, keep_tokens: usize) {
        while self.cached.len() * BLOCK > keep_tokens {
            let b = self.evict_oldest().expect("non-empty");
            self.free.push(b);
        }
        let bb = self.block_bytes();
        for &b in &self.free {
            let from = b as usize * bb;
            self.k.release(from, from + bb);
            self.v.release(from, from + bb);
        }
    }

    #[cfg(test)]
    fn resident_pages(&self) -> usize {
        self.k.resident_pages() + self.v.resident_pages()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernels() -> &'static dyn Kernels {
        crate::kernels::select(Some("scalar")).unwrap()
    }

    /// Writes `tokens` into `seq` as a forward pass would: value = token id.
    fn fill(pool: &mut KvPool, seq: &mut Sequence, tokens: &[u32]) {
        pool.reserve(seq, tokens.len()).unwrap();
        let w = pool.width;
        for (i, &t) in tokens.iter().enumerate() {
            let pos = seq.len() + i;
            for l in 0..pool.n_layer {
                let row = vec![t as f32 + l as f32 * 1000.0; w];
                pool.write(seq, l, pos, &row, &row, kernels());
            }
        }
        pool.commit(seq, tokens);
    }

    fn read(pool: &KvPool, seq: &Sequence, layer: usize, pos: usize) -> f32 {
        let at = pool.row(seq.blocks[pos / BLOCK], layer, pos % BLOCK);
        match pool.keys() {
            KvSlice::F32(c) => c[at],
            _ => unreachable!(),
        }
    }

    fn toks(range: std::ops::Range<u32>) -> Vec<u32> {
        range.collect()
    }

    #[test]
    fn a_shared_prefix_is_found_and_only_full_blocks_are_shared() {
        let mut pool = KvPool::new(KvType::F32, 2, 32, 10 * BLOCK).unwrap();
        let mut a = Sequence::default();
        let prompt = toks(0..40); // 2 full blocks + 8
        fill(&mut pool, &mut a, &prompt);
        assert_eq!(pool.blocks_in_use(), 3);
        pool.release(a);
        assert_eq!(pool.blocks_cached(), 2, "the partial tail is freed");

        // Same first 35 tokens: two blocks reused, no more.
        let mut other = toks(0..35);
        other.extend([999; 10]);
        let b = pool.lookup(&other, other.len() - 1);
        assert_eq!(b.len(), 2 * BLOCK);
        assert_eq!(pool.blocks_cached(), 0);
        for pos in 0..b.len() {
            assert_eq!(read(&pool, &b, 1, pos), pos as f32 + 1000.0);
        }
        // A different first block shares nothing, even with equal later blocks.
        let mut shifted = vec![7u32; BLOCK];
        shifted.extend(toks(16..40));
        let c = pool.lookup(&shifted, shifted.len());
        assert_eq!(c.len(), 0);
        pool.release(b);
        pool.release(c);
    }

    #[test]
    fn lookup_stops_at_max_so_the_last_token_is_recomputed() {
        let mut pool = KvPool::new(KvType::F32, 1, 32, 4 * BLOCK).unwrap();
        let mut a = Sequence::default();
        fill(&mut pool, &mut a, &toks(0..32));
        pool.release(a);
        let s = pool.lookup(&toks(0..32), 31);
        assert_eq!(s.len(), BLOCK);
        pool.release(s);
    }

    #[test]
    fn eviction_is_least_recently_used_and_tail_first() {
        let mut pool = KvPool::new(KvType::F32, 1, 32, 4 * BLOCK).unwrap();
        let (mut a, mut b) = (Sequence::default(), Sequence::default());
        fill(&mut pool, &mut a, &toks(0..32));
        fill(&mut pool, &mut b, &toks(100..132));
        pool.release(a); // older
        pool.release(b);
        // Needs one block: a's tail goes; a's head stays findable.
        let mut c = Sequence::default();
        fill(&mut pool, &mut c, &toks(500..516));
        assert_eq!(pool.lookup(&toks(0..32), 32).len(), BLOCK);
        let b2 = pool.lookup(&toks(100..132), 32);
        assert_eq!(b2.len(), 2 * BLOCK);
        pool.release(b2);
        pool.release(c);
    }

    #[test]
    fn reserve_fails_whole_when_every_block_is_held() {
        let mut pool = KvPool::new(KvType::F32, 1, 32, 3 * BLOCK).unwrap();
        let mut a = Sequence::default();
        fill(&mut pool, &mut a, &toks(0..40));
        let mut b = Sequence::default();
        assert_eq!(
            pool.reserve(&mut b, 2 * BLOCK),
            Err(PoolFull {
                needed: 2,
                available: 0
            })
        );
        assert!(b.blocks().is_empty(), "nothing taken on failure");
        // a's tail block has room for 8 more positions without a new block.
        assert_eq!(pool.reserve(&mut a, 8), Ok(()));
        pool.release(a);
        assert_eq!(
            pool.reserve(&mut b, 3 * BLOCK),
            Ok(()),
            "cached blocks are evicted"
        );
    }

    #[test]
    fn truncating_into_a_shared_block_copies_it() {
        let mut pool = KvPool::new(KvType::F32, 2, 32, 6 * BLOCK).unwrap();
        let mut a = Sequence::default();
        fill(&mut pool, &mut a, &toks(0..32));
        let mut b = pool.lookup(&toks(0..32), 32);
        assert_eq!(b.blocks(), a.blocks());
        pool.truncate(&mut b, 20);
        assert_ne!(
            b.blocks()[1],
            a.blocks()[1],
            "the cut block is a private copy"
        );
        assert_eq!(b.blocks()[0], a.blocks()[0]);
        fill(&mut pool, &mut b, &[777; 4]);
        for pos in 0..32 {
            assert_eq!(read(&pool, &a, 0, pos), pos as f32, "a is untouched");
        }
        for pos in 0..24 {
            let want = if pos < 20 { pos as f32 } else { 777.0 };
            assert_eq!(read(&pool, &b, 1, pos), want + 1000.0);
        }
        pool.release(a);
        pool.release(b);
        // The cut block's index entry stays with a's (unchanged) block.
        let c = pool.lookup(&toks(0..32), 32);
        assert_eq!(c.len(), 32);
        pool.release(c);
    }

    #[test]
    fn identical_blocks_computed_twice_chain_on_the_first() {
        let mut pool = KvPool::new(KvType::F32, 1, 32, 8 * BLOCK).unwrap();
        let (mut a, mut b) = (Sequence::default(), Sequence::default());
        fill(&mut pool, &mut a, &toks(0..16));
        fill(&mut pool, &mut b, &toks(0..16)); // computed side by side
        fill(&mut pool, &mut b, &toks(16..32));
        pool.release(a);
        pool.release(b);
        // b's second block is indexed under a's first: the whole chain is found.
        let c = pool.lookup(&toks(0..32), 32);
        assert_eq!(c.len(), 32);
        pool.release(c);
        assert_eq!(pool.blocks_cached() + pool.free.len(), 8);
    }

    #[test]
    fn q8_0_rows_round_trip_within_the_format() {
        let mut pool = KvPool::new(KvType::Q8_0, 2, 64, 2 * BLOCK).unwrap();
        let mut s = Sequence::default();
        pool.reserve(&mut s, 3).unwrap();
        let row: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 7.0).collect();
        pool.write(&s, 1, 2, &row, &row, kernels());
        let at = pool.row(s.blocks()[0], 1, 2);
        let KvSlice::Q8_0(c) = pool.values() else {
            unreachable!()
        };
        let mut back = vec![0.0; 64];
        crate::quant::dequantize_row(
            crate::quant::GgmlType::Q8_0,
            bytemuck::cast_slice(&c[at..at + 2]),
            &mut back,
        );
        let err = row
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        // Half a step of the block holding the largest value (4.5), plus
        // the f16 rounding of the scale.
        assert!(err <= 0.5 * 4.5 / 127.0 * 1.01, "max error {err}");
        pool.release(s);
    }

    /// qemu-user (the ARM tests run under it) ignores madvise, so the
    /// release can only be seen where the kernel does it itself. Probed on
    /// a map of its own, so that a broken `trim` cannot hide behind it.
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
    fn pages_are_touched_as_blocks_fill_and_trim_gives_them_back() {
        let page = page_size();
        // One position of one layer is two pages wide in f16, as for the 7B model.
        let width = page;
        let mut pool = KvPool::new(KvType::F16, 2, width, 64 * BLOCK).unwrap();
        assert_eq!(pool.resident_pages(), 0, "a new pool must not own memory");
        let pages_per_block = 2 * 2 * BLOCK * 2; // k and v, 2 layers, 2 pages a row
        let mut a = Sequence::default();
        let mut b = Sequence::default();
        pool.reserve(&mut a, 3 * BLOCK).unwrap();
        pool.reserve(&mut b, BLOCK).unwrap();
        let row = vec![1.0f32; width];
        for pos in 0..3 * BLOCK {
            for l in 0..2 {
                pool.write(&a, l, pos, &row, &row, kernels());
            }
        }
        for l in 0..2 {
            pool.write(&b, l, 0, &row, &row, kernels());
        }
        let b_pages = 2 * 2 * 2; // one position in two layers, k and v
        assert_eq!(pool.resident_pages(), 3 * pages_per_block + b_pages);
        pool.commit(&mut a, &toks(0..(3 * BLOCK) as u32));
        pool.release(a);
        pool.trim(BLOCK); // keep one block of a
        if madvise_is_honoured() {
            assert_eq!(pool.resident_pages(), pages_per_block + b_pages);
        }
        let kept = pool.lookup(&toks(0..(3 * BLOCK) as u32), 3 * BLOCK);
        assert_eq!(kept.len(), BLOCK, "the head of the chain is kept");
        let KvSlice::F16(k) = pool.keys() else {
            unreachable!()
        };
        let at = pool.row(kept.blocks()[0], 1, BLOCK - 1);
        assert!(k[at..at + width].iter().all(|&x| x == f16::ONE));
        pool.release(kept);
        pool.release(b);
    }
}
