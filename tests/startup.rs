//! What `crystald serve` checks between loading the model and READY=1: the
//! declared context, the memory budget against MemAvailable and the cgroup
//! limit (injected through CRYSTALD_MEMINFO and CRYSTALD_CGROUP_MEMORY_MAX),
//! and locking the weights; plus giving memory back when idle.

mod common;

use common::startup::{rewrite_model, Serve};
use common::*;
use crystald::gguf::Value;
use crystald::model_file::keys;
use std::path::Path;

fn fake_meminfo(dir: &Path, available_kb: u64) -> std::path::PathBuf {
    let p = dir.join("meminfo");
    std::fs::write(
        &p,
        format!("MemTotal:       8000000 kB\nMemFree:          100000 kB\nMemAvailable:   {available_kb:>8} kB\n"),
    )
    .unwrap();
    p
}

#[test]
fn an_absurd_declared_context_is_refused_before_anything_is_sized() {
    let dir = temp_dir();
    let bad = dir.path().join("ctx.gguf");
    rewrite_model(&converted("tiny-a", "q4_0"), &bad, |meta| {
        for (k, v) in meta.iter_mut() {
            if k == keys::CONTEXT_LENGTH {
                *v = Value::U32(1_000_000);
            }
        }
    });
    // Even with a small --ctx: the file itself is wrong.
    let log = Serve::refused(&bad, &["--ctx", "64"], &[], None);
    assert!(
        log.contains("ctx.gguf")
            && log.contains("context_length 1000000 is beyond what the model can address"),
        "{log}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_crystald"))
        .args(["generate", "--max-tokens", "1", "-p", "hi", "-m"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("context_length 1000000"));
}

#[test]
fn a_budget_over_mem_available_is_an_error_naming_the_numbers_or_a_warning() {
    let model = converted("tiny-a", "q4_0");
    let dir = temp_dir();
    let small = fake_meminfo(dir.path(), 2048);
    let env = [("CRYSTALD_MEMINFO", small.as_path())];
    let log = Serve::refused(&model, &["--ctx", "512", "--kv-budget", "512"], &env, None);
    let mib = std::fs::metadata(&model).unwrap().len().div_ceil(1 << 20);
    for want in [
        "memory budget".to_string(),
        format!("the model ({mib} MiB)"),
        "KV pool of 512 tokens".into(),
        "MemAvailable is 2 MiB".into(),
        "memory_check = \"warn\"".into(),
    ] {
        assert!(log.contains(&want), "'{want}' missing: {log}");
    }
    // The KV pool is part of it: a bigger element type needs more, Q8_0 less.
    let need = |log: &str| -> u64 {
        let at = log.find(") = ").unwrap() + 4;
        log[at..].split(' ').next().unwrap().parse().unwrap()
    };
    let with = |ty: &str| {
        let args = ["--ctx", "512", "--kv-budget", "16384", "--kv-type", ty];
        Serve::refused(&model, &args, &env, None)
    };
    let (log_f32, log_f16, log_q8) = (with("f32"), with("f16"), with("q8_0"));
    assert!(need(&log_f32) > need(&log_f16), "{log_f32}");
    assert!(need(&log_q8) < need(&log_f16), "{log_q8}");
    assert!(need(&log_f16) > need(&log), "{log_f16}");

    let s = Serve::ready(&model, &["--memory-check", "warn"], &env);
    assert!(
        s.log()
            .lines()
            .any(|l| l.starts_with("<4>") && l.contains("MemAvailable is 2 MiB")),
        "{}",
        s.log()
    );
    drop(s);
    // Plenty: starts, and says what it counted.
    let big = fake_meminfo(dir.path(), 64 << 20);
    let s = Serve::ready(&model, &[], &[("CRYSTALD_MEMINFO", big.as_path())]);
    assert!(s.log().contains("fits"), "{}", s.log());
}

#[test]
fn a_kv_pool_smaller_than_one_context_is_refused_naming_both() {
    let model = converted("tiny-a", "q4_0");
    // 1 MiB of f32 is 256 positions of this model (2 layers × 256 × 4 B × 2).
    for budget in [["--kv-budget", "256"], ["--kv-budget", "1 MiB"]] {
        let args = ["--ctx", "512", "--kv-type", "f32", budget[0], budget[1]];
        let log = Serve::refused(&model, &args, &[], None);
        assert!(
            log.contains("kv_budget holds")
                && log.contains("less than one full context (ctx = 512)"),
            "{budget:?}: {log}"
        );
    }
    let log = Serve::refused(&model, &["--kv-budget", "lots"], &[], None);
    assert!(log.contains("--kv-budget") && log.contains("lots"), "{log}");
    // Exactly one context is enough, and the pool's size is in the log.
    let s = Serve::ready(&model, &["--ctx", "512", "--kv-budget", "512"], &[]);
    assert!(s.log().contains("KV pool: 512 tokens"), "{}", s.log());
}

#[test]
fn a_budget_over_the_cgroup_limit_is_an_error() {
    let model = converted("tiny-a", "q4_0");
    let dir = temp_dir();
    let limit = dir.path().join("memory.max");
    std::fs::write(&limit, "4194304\n").unwrap();
    let log = Serve::refused(
        &model,
        &[],
        &[("CRYSTALD_CGROUP_MEMORY_MAX", limit.as_path())],
        None,
    );
    assert!(
        log.contains("the cgroup's memory limit (MemoryMax=) is 4 MiB"),
        "{log}"
    );
    std::fs::write(&limit, "max\n").unwrap();
    Serve::ready(
        &model,
        &[],
        &[("CRYSTALD_CGROUP_MEMORY_MAX", limit.as_path())],
    );
    std::fs::write(&limit, "a lot\n").unwrap();
    let s = Serve::ready(
        &model,
        &[],
        &[("CRYSTALD_CGROUP_MEMORY_MAX", limit.as_path())],
    );
    assert!(s.log().contains("memory budget not checked"), "{}", s.log());
}

/// linux/capability.h
const CAP_IPC_LOCK: libc::c_ulong = 14;

/// In the child: RLIMIT_MEMLOCK of 64 KiB, and no CAP_IPC_LOCK (which
/// would ignore the limit) when running as root.
fn low_memlock() -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: 64 << 10,
        rlim_max: 64 << 10,
    };
    // SAFETY: plain system calls on this (forked) process, with a valid
    // pointer to a local struct.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Fails with EPERM when not root, where there is no capability to drop.
        libc::prctl(libc::PR_CAPBSET_DROP, CAP_IPC_LOCK, 0, 0, 0);
    }
    Ok(())
}

/// In the child: RLIMIT_MEMLOCK raised to its hard limit.
fn full_memlock() -> std::io::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above.
    unsafe {
        libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn lock_weights_without_the_privilege_says_which_limit_to_raise() {
    let model = converted("tiny-a", "q4_0");
    let log = Serve::refused(&model, &["--lock-weights"], &[], Some(low_memlock));
    for want in [
        "lock_weights: cannot lock the model's",
        "RLIMIT_MEMLOCK (now 64 KiB)",
        "LimitMEMLOCK=infinity",
    ] {
        assert!(log.contains(want), "'{want}' missing: {log}");
    }
    assert!(!log.contains("ready"), "{log}");

    // With the limit as high as this machine allows: locked, or the same
    // clear refusal when even the hard limit is below the model's size.
    let mut s = Serve::spawn(&model, &["--lock-weights"], &[], Some(full_memlock));
    match s.outcome() {
        common::startup::Outcome::Ready => {
            assert!(s.log().contains("locked the model's"), "{}", s.log());
            let locked = std::fs::read_to_string(format!("/proc/{}/status", s.pid()))
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("VmLck:").map(|v| v.trim().to_string()))
                .unwrap();
            let kb: u64 = locked.trim_end_matches(" kB").parse().unwrap();
            let size = std::fs::metadata(&model).unwrap().len();
            assert!(kb * 1024 >= size, "VmLck {kb} kB for a {size}-byte model");
        }
        common::startup::Outcome::Exited(c) => {
            assert_eq!(c, 1);
            assert!(s.log().contains("RLIMIT_MEMLOCK"), "{}", s.log());
        }
    }
}

#[test]
fn the_worker_gives_memory_back_when_idle() {
    let model = converted("tiny-a", "q4_0");
    let s = Serve::ready(&model, &["--ctx", "512"], &[]);
    let socket = s.dir.path().join("d.sock");
    let wait_kept = |n: usize| {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while s.log().matches("idle: kept").count() < n {
            assert!(std::time::Instant::now() < until, "{}", s.log());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let line = s
            .log()
            .lines()
            .rfind(|l| l.contains("idle: kept"))
            .unwrap()
            .to_string();
        line.split_whitespace()
            .nth(2)
            .unwrap()
            .parse::<usize>()
            .unwrap()
    };
    let reply = ask(
        &socket,
        r#"{"id": 1, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}"#,
    );
    assert!(reply.contains("\"done\""), "{reply}");
    // A short request is kept whole for the prefix cache.
    let short = wait_kept(1);
    assert!((5..=25).contains(&short), "{short}");
    // A long one is cut to kv_keep_tokens (256); the rest is given back.
    let long = "the quick brown fox jumps over the lazy dog ".repeat(40);
    let line = serde_json::json!({"id": 2, "prompt": long, "max_tokens": 4, "temperature": 0});
    let reply = ask(&socket, &line.to_string());
    assert!(reply.contains("\"done\""), "{reply}");
    assert_eq!(wait_kept(2), 256);
}

fn ask(socket: &Path, line: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut c = std::os::unix::net::UnixStream::connect(socket).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    writeln!(c, "{line}").unwrap();
    let mut reply = String::new();
    BufReader::new(c).read_line(&mut reply).unwrap();
    reply
}
