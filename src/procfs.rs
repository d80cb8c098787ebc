//! Reading memory figures from `/proc` and the cgroup file system: this
//! process's RSS for the summaries and benchmarks, and the memory the
//! system and the service's cgroup leave for the daemon's start-up budget.
//!
//! Tests point the budget at fake files with two environment variables:
//! `CRYSTALD_MEMINFO` (read instead of `/proc/meminfo`) and
//! `CRYSTALD_CGROUP_MEMORY_MAX` (read instead of the cgroup's
//! `memory.max`, in the same format: a byte count or `max`).

use std::path::{Path, PathBuf};

/// A `kB` field of a `/proc` status-style file, in bytes.
fn kb_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()
            .map(|kb| kb * 1024)
    })
}

/// A `kB` field of `/proc/self/status` (e.g. `VmHWM`, `RssAnon`), in bytes.
pub fn status_bytes(field: &str) -> Option<u64> {
    kb_field(&std::fs::read_to_string("/proc/self/status").ok()?, field)
}

/// Peak resident set size so far.
pub fn peak_rss() -> Option<u64> {
    status_bytes("VmHWM")
}

/// `MemAvailable` of `/proc/meminfo` (or `$CRYSTALD_MEMINFO`): what the
/// kernel estimates can be allocated without swapping.
pub fn mem_available() -> Result<u64, String> {
    let path = std::env::var_os("CRYSTALD_MEMINFO")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/proc/meminfo".into());
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    kb_field(&text, "MemAvailable")
        .ok_or_else(|| format!("{} has no MemAvailable line", path.display()))
}

/// The memory limit of this process's cgroup (systemd's `MemoryMax=`), or
/// `None` without one. cgroup v2 `memory.max`, else v1
/// `memory.limit_in_bytes`; `$CRYSTALD_CGROUP_MEMORY_MAX` names the file.
pub fn cgroup_memory_max() -> Result<Option<u64>, String> {
    let file = match std::env::var_os("CRYSTALD_CGROUP_MEMORY_MAX") {
        Some(p) => PathBuf::from(p),
        None => match own_cgroup_limit_file() {
            Some(p) => p,
            None => return Ok(None),
        },
    };
    let text = std::fs::read_to_string(&file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    parse_limit(&text).ok_or_else(|| {
        format!(
            "{}: expected a byte count or 'max', got '{}'",
            file.display(),
            text.trim()
        )
    })
}

/// `Some(None)` for no limit.
fn parse_limit(text: &str) -> Option<Option<u64>> {
    match text.trim() {
        "max" => Some(None),
        // cgroup v1 writes "no limit" as the largest page-aligned i64.
        n => n.parse::<u64>().ok().map(|v| (v < 1 << 62).then_some(v)),
    }
}

fn own_cgroup_limit_file() -> Option<PathBuf> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let root = Path::new("/sys/fs/cgroup");
    let mut v1 = None;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        if id == "0" && controllers.is_empty() {
            let f = root.join(rel).join("memory.max");
            if f.exists() {
                return Some(f);
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(root.join("memory").join(rel).join("memory.limit_in_bytes"));
        }
    }
    v1.filter(|f| f.exists())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_memory_figures() {
        let now = super::status_bytes("VmRSS").expect("VmRSS on Linux");
        let peak = super::peak_rss().expect("VmHWM on Linux");
        assert!(peak >= now && now > 0);
    }

    #[test]
    fn reads_the_system_and_cgroup_limits() {
        assert!(super::mem_available().unwrap() > 0);
        // Whatever the machine has, it must parse.
        super::cgroup_memory_max().unwrap();
        assert_eq!(super::parse_limit("max\n"), Some(None));
        assert_eq!(super::parse_limit("1073741824\n"), Some(Some(1 << 30)));
        assert_eq!(
            super::parse_limit("9223372036854771712"),
            Some(None),
            "cgroup v1's 'unlimited'"
        );
        assert_eq!(super::parse_limit("lots"), None);
    }
}
