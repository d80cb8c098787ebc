//! Facts about the CPU the engine needs at start-up.

use std::collections::HashSet;

/// Physical cores (hyper-threads share a core's SIMD units, so extra
/// threads on them only add contention), falling back to logical CPUs.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cores = HashSet::new();
    for cpu in 0..logical.max(1) * 2 {
        let base = format!("/sys/devices/system/cpu/cpu{cpu}/topology");
        let read = |f: &str| {
            std::fs::read_to_string(format!("{base}/{f}"))
                .ok()
                .map(|s| s.trim().to_string())
        };
        if let (Some(pkg), Some(core)) = (read("physical_package_id"), read("core_id")) {
            cores.insert((pkg, core));
        }
    }
    // The affinity mask may allow fewer CPUs than the machine has.
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical)
    }
}
