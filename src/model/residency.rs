//! Keeping the mapped weights in memory: reading them in before the first
//! request (`prefetch`) and pinning them so that memory pressure from other
//! software cannot page the model out between requests (`lock_weights`).

use memmap2::{Advice, Mmap};

/// How the weights get into memory at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Prefetch {
    /// On first use: start-up is immediate, the first request reads the
    /// file as it goes.
    Off,
    /// Ask the kernel to read the file in the background (`MADV_WILLNEED`)
    /// and start serving at once.
    Background,
    /// Read every page before serving (`MADV_POPULATE_READ`): the first
    /// request runs at full speed, start-up takes as long as the read.
    Wait,
}

pub fn prefetch(map: &Mmap, how: Prefetch) -> std::io::Result<()> {
    match how {
        Prefetch::Off => Ok(()),
        Prefetch::Background => map.advise(Advice::WillNeed),
        Prefetch::Wait => match map.advise(Advice::PopulateRead) {
            Ok(()) => Ok(()),
            // Before Linux 5.14: fault every page in by reading it.
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                let _ = map.advise(Advice::WillNeed);
                let mut sum = 0u8;
                for b in map.iter().step_by(4096) {
                    sum = sum.wrapping_add(*b);
                }
                std::hint::black_box(sum);
                Ok(())
            }
            Err(e) => Err(e),
        },
    }
}

/// Locks every page of the map in memory (reading it in first).
pub fn lock(map: &Mmap) -> Result<(), String> {
    map.lock().map_err(|e| {
        let mib = (map.len() as u64).div_ceil(1 << 20);
        let limit = memlock_limit()
            .map(|l| format!(" (now {})", human(l)))
            .unwrap_or_default();
        format!(
            "lock_weights: cannot lock the model's {mib} MiB in memory: {e}. Raise \
             RLIMIT_MEMLOCK{limit} to at least {mib} MiB (under systemd: \
             LimitMEMLOCK=infinity in the unit; in a shell: ulimit -l), or \
             grant CAP_IPC_LOCK, or set lock_weights = false"
        )
    })
}

fn memlock_limit() -> Option<u64> {
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK).ok()?;
    Some(soft)
}

fn human(bytes: u64) -> String {
    if bytes == nix::libc::RLIM_INFINITY {
        "unlimited".into()
    } else if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// How fast the threads of `pool` read all of `map`, in GB/s (best of three
/// passes after a warm-up), each thread a contiguous share as a matrix
/// product splits its rows.
pub fn read_bandwidth(map: &Mmap, pool: &rayon::ThreadPool) -> f64 {
    use rayon::prelude::*;
    let words: &[u64] = bytemuck::cast_slice(&map[..map.len() / 64 * 64]);
    let part = words.len().div_ceil(pool.current_num_threads()).max(8);
    let pass = || {
        let t = std::time::Instant::now();
        pool.install(|| {
            words.par_chunks(part).for_each(|chunk| {
                // Eight independent sums: enough loads in flight, and a
                // result the compiler cannot drop.
                let mut acc = [0u64; 8];
                for line in chunk.chunks_exact(8) {
                    for (a, &w) in acc.iter_mut().zip(line) {
                        *a = a.wrapping_add(w);
                    }
                }
                std::hint::black_box(acc);
            })
        });
        t.elapsed().as_secs_f64()
    };
    pass();
    let best = (0..3).map(|_| pass()).fold(f64::INFINITY, f64::min);
    (words.len() * 8) as f64 / best / 1e9
}

/// Drops the pages of `range` (file offsets) from this process and, where
/// nothing else maps them, from the page cache: once the weights are on a
/// GPU the CPU never reads them again, and on a Jetson the page cache
/// would otherwise keep a second copy in the one shared DRAM. Best effort:
/// the pages are clean, a failure only leaves them cached.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn evict(map: &Mmap, range: std::ops::Range<usize>) {
    // madvise takes page-aligned addresses; arm64 kernels may use 64 KiB pages.
    let page = super::kv_pool::page_size();
    let start = range.start / page * page;
    let end = range.end.min(map.len());
    if start >= end {
        return;
    }
    // SAFETY: the range lies inside the live, read-only, file-backed map
    // (start is page-aligned, end clamped to its length). MADV_PAGEOUT
    // only reclaims; MADV_DONTNEED on a read-only file mapping makes the
    // next access read the file again, so no data can be lost either way.
    unsafe {
        let addr = map.as_ptr().add(start) as *mut nix::libc::c_void;
        let len = end - start;
        if nix::libc::madvise(addr, len, nix::libc::MADV_PAGEOUT) != 0 {
            nix::libc::madvise(addr, len, nix::libc::MADV_DONTNEED);
        }
    }
}
