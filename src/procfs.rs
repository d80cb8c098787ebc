//! Reading this process's memory figures from `/proc/self/status`, for the
//! summaries and benchmarks that report peak and anonymous RSS.

/// A `kB` field of `/proc/self/status` (e.g. `VmHWM`, `RssAnon`), in bytes.
pub fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()
            .map(|kb| kb * 1024)
    })
}

/// Peak resident set size so far.
pub fn peak_rss() -> Option<u64> {
    status_bytes("VmHWM")
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_memory_figures() {
        let now = super::status_bytes("VmRSS").expect("VmRSS on Linux");
        let peak = super::peak_rss().expect("VmHWM on Linux");
        assert!(peak >= now && now > 0);
    }
}
