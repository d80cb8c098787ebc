//! Starting `crystald serve` and telling whether it reached READY=1 (through
//! a real notify socket, as systemd sees it) or exited first; and model
//! files rewritten with edited metadata.

use super::*;
use crystald::gguf::{checksum, Gguf, GgufWriter, TensorSpec, Value, KEY_ALIGNMENT};
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Serve {
    pub dir: tempfile::TempDir,
    child: Child,
    notify: UnixDatagram,
}

pub enum Outcome {
    /// READY=1 arrived; the daemon is running.
    Ready,
    /// It exited first, with this code.
    Exited(i32),
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// Spawns `serve --model MODEL ARGS` with `env`; `pre_exec` runs in the
    /// child before exec (to lower limits).
    pub fn spawn(
        model: &Path,
        args: &[&str],
        env: &[(&str, &Path)],
        pre_exec: Option<fn() -> std::io::Result<()>>,
    ) -> Serve {
        let dir = temp_dir();
        let notify_path = dir.path().join("notify");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let cfg = dir.path().join("empty.toml");
        std::fs::write(&cfg, "").unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_crystald"));
        cmd.args(["serve", "--threads", "1", "--log-level", "debug"])
            .arg("--model")
            .arg(model)
            .arg("--socket")
            .arg(dir.path().join("d.sock"))
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .env("NOTIFY_SOCKET", &notify_path)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(f) = pre_exec {
            // SAFETY: `f` only makes async-signal-safe system calls
            // (setrlimit, prctl) between fork and exec.
            unsafe {
                cmd.pre_exec(f);
            }
        }
        let child = cmd.spawn().unwrap();
        Serve { dir, child, notify }
    }

    /// Waits (bounded) for READY=1 or the exit.
    pub fn outcome(&mut self) -> Outcome {
        let until = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = self.notify.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                    return Outcome::Ready;
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                return Outcome::Exited(status.code().unwrap_or(-1));
            }
            assert!(
                Instant::now() < until,
                "no READY=1 nor exit: {}",
                self.log()
            );
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts and expects READY=1.
    pub fn ready(model: &Path, args: &[&str], env: &[(&str, &Path)]) -> Serve {
        let mut s = Serve::spawn(model, args, env, None);
        match s.outcome() {
            Outcome::Ready => s,
            Outcome::Exited(c) => panic!("daemon exited with {c}: {}", s.log()),
        }
    }

    /// Starts and expects an exit with status 1 before READY; returns the log.
    pub fn refused(
        model: &Path,
        args: &[&str],
        env: &[(&str, &Path)],
        pre_exec: Option<fn() -> std::io::Result<()>>,
    ) -> String {
        let mut s = Serve::spawn(model, args, env, pre_exec);
        match s.outcome() {
            Outcome::Exited(1) => s.log(),
            Outcome::Exited(c) => panic!("exit status {c}, expected 1: {}", s.log()),
            Outcome::Ready => panic!("daemon started, expected a refusal: {}", s.log()),
        }
    }
}

/// Writes `src`'s tensors again to `dst` under metadata changed by `edit`,
/// without a checksum (like files made before checksums were recorded).
pub fn rewrite_model(src: &Path, dst: &Path, edit: impl FnOnce(&mut Vec<(String, Value)>)) {
    rewrite(src, dst, edit, |_, _| {}, false)
}

/// Writes `src` again to `dst`: metadata changed by `edit_meta`, each
/// tensor's data passed through `edit_data(name, bytes)`, and a fresh
/// checksum when `checksum` is set (so the checksum vouches for the edit).
pub fn rewrite(
    src: &Path,
    dst: &Path,
    edit_meta: impl FnOnce(&mut Vec<(String, Value)>),
    mut edit_data: impl FnMut(&str, &mut [u8]),
    with_checksum: bool,
) {
    let g = Gguf::open(src).unwrap();
    let mut meta: Vec<_> = g
        .header
        .metadata
        .iter()
        .filter(|(k, _)| k != KEY_ALIGNMENT && k != checksum::KEY)
        .cloned()
        .collect();
    edit_meta(&mut meta);
    let specs = g
        .header
        .tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty,
        })
        .collect();
    let out = std::io::BufWriter::new(std::fs::File::create(dst).unwrap());
    let align = g.header.alignment as usize;
    let mut w = if with_checksum {
        GgufWriter::with_checksum(out, &meta, specs, align)
    } else {
        GgufWriter::new(out, &meta, specs, align)
    }
    .unwrap();
    for t in &g.header.tensors {
        let mut data = g.data(t).to_vec();
        edit_data(&t.name, &mut data);
        w.write_data(&data).unwrap();
    }
    let mut out = if with_checksum {
        w.finish_with_checksum().unwrap().0
    } else {
        w.finish().unwrap()
    };
    out.flush().unwrap();
}
