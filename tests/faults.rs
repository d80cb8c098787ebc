//! Fault injection against the real `crystald serve`: killed mid-generation
//! and restarted on the same socket, and the model file truncated or
//! rewritten on disk while the daemon has it mapped. (The quantizer's faults,
//! SIGKILL mid-write and a full disk, are in quantize/tests/cli.rs.)

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

struct Daemon {
    child: Child,
    log: PathBuf,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts `crystald serve` on `model` and `socket`, logging to `log`.
    fn spawn(model: &Path, socket: &Path, log: &Path, env: &[(&str, &str)]) -> Daemon {
        let err = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_crystald"))
            .envs(env.iter().copied())
            .args(["serve", "--threads", "1", "--ctx", "448"])
            .args(["--config", "/dev/null"])
            .arg("--model")
            .arg(model)
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        Daemon {
            child,
            log: log.to_path_buf(),
            socket: socket.to_path_buf(),
        }
    }

    fn start(model: &Path, socket: &Path, log: &Path) -> Daemon {
        Self::start_with_env(model, socket, log, &[])
    }

    fn start_with_env(model: &Path, socket: &Path, log: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut d = Self::spawn(model, socket, log, env);
        let until = Instant::now() + WAIT;
        while UnixStream::connect(&d.socket).is_err() {
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("daemon exited with {status}: {}", d.log());
            }
            assert!(Instant::now() < until, "daemon did not start: {}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let until = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < until,
                "daemon did not exit: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn connect(&self) -> (UnixStream, BufReader<UnixStream>) {
        let s = UnixStream::connect(&self.socket).expect("connect");
        s.set_read_timeout(Some(WAIT)).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        (s, r)
    }

    /// Sends one request and returns its final event (`None`: the
    /// connection closed first).
    fn ask(&self, req: &Value) -> Option<Value> {
        let (mut s, mut r) = self.connect();
        writeln!(s, "{req}").unwrap();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return None;
            }
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["event"] == "done" || v["event"] == "error" {
                return Some(v);
            }
        }
    }
}

impl Daemon {
    /// One control request's reply line.
    fn ask_op(&self, req: &Value) -> Value {
        let (mut s, mut r) = self.connect();
        writeln!(s, "{req}").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }
}

fn request(id: &str, max_tokens: u64) -> Value {
    json!({"id": id, "prompt": "Once upon a time", "max_tokens": max_tokens,
           "temperature": 0, "stream": true})
}

/// A private copy of the converted fixture, which the tests may damage.
fn model_copy(dir: &Path) -> PathBuf {
    let p = dir.join("model.gguf");
    std::fs::copy(converted("tiny-a", "q4_0"), &p).unwrap();
    p
}

#[test]
fn sigkill_mid_generation_then_restart_on_the_same_socket() {
    let dir = temp_dir();
    let model = converted("tiny-a", "q4_0");
    let socket = dir.path().join("crystald.sock");
    let mut d = Daemon::start(&model, &socket, &dir.path().join("log1"));
    let (mut s, mut r) = d.connect();
    writeln!(s, "{}", request("long", 400)).unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let first: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(first["event"], "token", "{first}");
    // Generation is under way: kill without any chance to clean up.
    d.child.kill().unwrap();
    assert!(d.wait_exit().code().is_none());
    // The client sees the connection end, not a hang.
    let mut rest = String::new();
    while r.read_line(&mut rest).unwrap_or(0) > 0 {}
    assert!(!rest.contains("\"done\""), "{rest}");
    assert!(socket.exists(), "SIGKILL leaves the socket file");

    // The same command again: the stale socket is replaced and served.
    let d = Daemon::start(&model, &socket, &dir.path().join("log2"));
    let done = d.ask(&request("again", 8)).expect("a reply");
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["usage"]["completion_tokens"], 8);
}

#[test]
fn a_model_file_truncated_under_the_daemon_is_a_clear_fatal_error() {
    let dir = temp_dir();
    let model = model_copy(dir.path());
    let socket = dir.path().join("crystald.sock");
    let mut d = Daemon::start(&model, &socket, &dir.path().join("log"));
    assert_eq!(d.ask(&request("before", 4)).unwrap()["event"], "done");

    // Cut the weights off the mapped file (the header stays readable).
    let len = std::fs::metadata(&model).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap()
        .set_len(len / 8)
        .unwrap();
    assert!(
        d.ask(&request("after", 4)).is_none(),
        "no reply can be computed"
    );
    let status = d.wait_exit();
    let log = d.log();
    assert_eq!(
        status.code(),
        Some(74),
        "EX_IOERR expected: {status}\n{log}"
    );
    assert!(
        log.contains(&format!(
            "fatal: the model file {} was truncated or replaced in place while in use",
            model.display()
        )) && log.contains("SIGBUS reading byte"),
        "{log}"
    );

    // A restart (what systemd's Restart=on-failure does) re-validates the
    // file and refuses it with the reason.
    let out = Command::new(env!("CARGO_BIN_EXE_crystald"))
        .args(["serve", "--config", "/dev/null"])
        .arg("--model")
        .arg(&model)
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&model.display().to_string()) && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn a_model_file_rewritten_in_place_gives_garbage_but_no_crash() {
    let dir = temp_dir();
    let model = model_copy(dir.path());
    let socket = dir.path().join("crystald.sock");
    let d = Daemon::start(&model, &socket, &dir.path().join("log"));
    let before = d.ask(&request("before", 8)).unwrap();
    assert_eq!(before["event"], "done");

    // Same length, every weight byte 0xff: NaN f32 values and f16 scales.
    let data_start = crystald::gguf::Gguf::open(&model)
        .unwrap()
        .header
        .data_offset;
    let len = std::fs::metadata(&model).unwrap().len();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&model)
            .unwrap();
        f.write_all_at(&vec![0xff; (len - data_start) as usize], data_start)
            .unwrap();
    }
    // Every index was validated at load, so the engine only computes with
    // the new values: replies keep coming (their text is meaningless).
    for i in 0..3 {
        let done = d.ask(&request(&format!("after-{i}"), 8)).expect("a reply");
        assert_eq!(done["event"], "done", "{done}");
    }
    let (mut s, mut r) = d.connect();
    writeln!(s, "{}", json!({"op": "health"})).unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\""), "{line}");
}

/// A GPU error in the middle of a reply (injected: no GPU is needed): that
/// request gets an `internal` error naming it, nothing hangs, and the
/// worker stops so that health says "failed" and systemd's watchdog
/// restarts the daemon, rather than serving from a GPU in an unknown state.
#[test]
fn a_gpu_error_mid_reply_fails_the_request_and_stops_the_worker() {
    let dir = temp_dir();
    let model = converted("tiny-a", "q4_0");
    let socket = dir.path().join("crystald.sock");
    let fault = [("CRYSTALD_FAULT_DEVICE_AT_STEP", "3")];
    let d = Daemon::start_with_env(&model, &socket, &dir.path().join("log"), &fault);
    // Step 1 reads the prompt, step 2 decodes, step 3 fails.
    let e = d.ask(&request("hit", 20)).expect("an answer, not a hang");
    assert_eq!(
        (&e["event"], &e["code"]),
        (&json!("error"), &json!("internal")),
        "{e}"
    );
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("GPU error") && msg.contains("injected fault"),
        "{e}"
    );

    let health = d.ask_op(&json!({"op": "health"}));
    assert_eq!(health["status"], "failed", "{health}");
    assert_eq!(health["device"], "cpu", "{health}");
    let after = d.ask(&request("after", 4)).expect("an answer, not a hang");
    assert_eq!(
        (&after["event"], &after["code"]),
        (&json!("error"), &json!("internal")),
        "{after}"
    );
    assert!(d.log().contains("the GPU failed"), "{}", d.log());
}
