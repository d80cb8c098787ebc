//! The OpenAI-compatible HTTP transport as its clients see it: the real
//! daemon on a converted fixture, driven by the official `openai` Python
//! package, by curl (the README's examples) and by raw HTTP for the bad
//! inputs. Every wait is bounded.

mod common;

use common::http_client::{read_response, request, Resp};
use common::services::{signal, Daemon, WAIT};
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const KEY: &str = "sk-test-0123456789";

struct Api {
    d: Daemon,
    /// HOST:PORT of the TCP listener.
    addr: String,
    unix: PathBuf,
    _keys: tempfile::TempDir,
}

/// Starts a daemon with an `[http]` table listening on a free loopback
/// port and a Unix socket, with an API key; `http` adds keys to the table.
fn start(top: &str, http: &str) -> Api {
    start_with(top, http, &[])
}

fn start_with(top: &str, http: &str, args: &[&str]) -> Api {
    let keys = temp_dir();
    let key_file = keys.path().join("keys");
    std::fs::write(&key_file, format!("# test key\n{KEY}\n")).unwrap();
    let unix = keys.path().join("http.sock");
    let d = Daemon::spawn_config(
        &format!(
            "{top}\n[http]\nlisten = [\"127.0.0.1:0\", \"unix:{}\"]\napi_key_file = \"{}\"\n{http}\n",
            unix.display(),
            key_file.display()
        ),
        args,
    );
    let log = d.wait_log("ready:");
    let addr = log
        .lines()
        .find_map(|l| l.split("http: listening on http://").nth(1))
        .unwrap_or_else(|| panic!("no TCP address in the log: {log}"))
        .trim()
        .to_string();
    Api {
        d,
        addr,
        unix,
        _keys: keys,
    }
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("CRYSTALD_PYTHON") {
        return p.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python")
}

impl Api {
    fn connect(&self) -> TcpStream {
        TcpStream::connect(&self.addr).unwrap()
    }

    fn call(&self, method: &str, path: &str, auth: Option<&str>, body: Option<&[u8]>) -> Resp {
        let mut s = self.connect();
        s.write_all(&request(method, path, auth, body)).unwrap();
        read_response(&mut s)
    }

    fn post(&self, path: &str, body: &Value) -> Resp {
        self.call("POST", path, Some(KEY), Some(body.to_string().as_bytes()))
    }

    fn metric(&self, line_start: &str) -> f64 {
        let text = String::from_utf8(self.call("GET", "/metrics", Some(KEY), None).body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(line_start))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    /// Waits until `/metrics` shows `line_start` at `value`.
    fn wait_metric(&self, line_start: &str, value: f64) {
        let until = Instant::now() + WAIT;
        while self.metric(line_start) != value {
            assert!(
                Instant::now() < until,
                "{line_start} never reached {value}: {}",
                self.d.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A chat prompt whose greedy reply on the fixture runs to `tokens`, so a
/// request with it has text to check or is still running while a test
/// acts (the random-weight model ends some replies at once).
fn prompt_for(api: &Api, tokens: u64) -> String {
    for i in 0..20 {
        let prompt = format!("Tell me a long story, number {i}.");
        let r = api
            .post("/v1/chat/completions", &chat(&prompt, tokens))
            .json();
        if r["choices"][0]["finish_reason"] == "length" {
            return prompt;
        }
    }
    panic!("no prompt with a {tokens}-token reply");
}

fn long_prompt(api: &Api) -> String {
    prompt_for(api, 400)
}

fn chat(content: &str, max_tokens: u64) -> Value {
    json!({"model": "crystalchat", "messages": [{"role": "user", "content": content}],
           "max_tokens": max_tokens, "temperature": 0})
}

#[test]
fn the_openai_package_talks_to_it_over_tcp_and_the_unix_socket() {
    let api = start("", "");
    let model = api.call("GET", "/v1/models", Some(KEY), None).json()["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let prompt = prompt_for(&api, 8);
    let out = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_client.py"))
        .arg(format!("http://{}", api.addr))
        .arg(&api.unix)
        .arg(KEY)
        .arg(&model)
        .arg(&prompt)
        .output()
        .expect("run the openai client (scripts/setup.sh installs it into .venv)");
    assert!(
        out.status.success(),
        "{}\n{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        api.d.log()
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The same request over the daemon's own socket protocol gives the
    // same text: HTTP is only another way in.
    let own = api.d.ask_socket(
        &json!({"id": 1, "temperature": 0, "max_tokens": 8, "seed": 7,
        "messages": [{"role": "user", "content": prompt}]}),
    );
    assert_eq!(own["event"], "done", "{own}");
    assert_eq!(summary["chat_text"], own["text"], "{summary}\n{own}");
    assert!(!own["text"].as_str().unwrap().is_empty());
    let own = api.d.ask_socket(
        &json!({"id": 2, "temperature": 0, "max_tokens": 8, "seed": 7,
        "prompt": "def fibonacci(n):"}),
    );
    assert_eq!(summary["completion_text"], own["text"], "{summary}");
}

#[test]
fn bad_requests_get_openai_error_objects_and_the_daemon_keeps_serving() {
    let api = start("", "max_body_bytes = 4096");
    let chat_path = "/v1/chat/completions";
    let cases: Vec<(Resp, u16, &str)> = vec![
        (
            api.call("POST", chat_path, Some(KEY), Some(b"{not json")),
            400,
            "not JSON",
        ),
        (
            api.call("POST", chat_path, Some(KEY), Some(b"[1, 2]")),
            400,
            "an array",
        ),
        (api.post(chat_path, &json!({"messages": []})), 400, "empty"),
        (
            api.post(chat_path, &json!({"messages": "hello"})),
            400,
            "messages",
        ),
        (
            api.post(chat_path, &{
                let mut c = chat("hi", 4);
                c["n"] = json!(3);
                c
            }),
            400,
            "n = 1",
        ),
        (
            api.post(chat_path, &{
                let mut c = chat("hi", 4);
                c["temperature"] = json!("warm");
                c
            }),
            400,
            "temperature",
        ),
        (api.post(chat_path, &chat("hi", 100_000)), 400, "max_tokens"),
        (
            api.post(chat_path, &chat(&"word ".repeat(600), 4)),
            400,
            "context",
        ),
        (
            api.post("/v1/completions", &json!({"prompt": 3})),
            400,
            "prompt",
        ),
        (
            api.post(chat_path, &chat(&"x".repeat(5000), 4)),
            413,
            "max_body_bytes",
        ),
        (
            api.call(
                "POST",
                chat_path,
                None,
                Some(chat("hi", 4).to_string().as_bytes()),
            ),
            401,
            "API key",
        ),
        (
            api.call(
                "POST",
                chat_path,
                Some("sk-wrong"),
                Some(chat("hi", 4).to_string().as_bytes()),
            ),
            401,
            "API key",
        ),
        (api.call("GET", "/metrics", None, None), 401, "API key"),
        (
            api.call("GET", "/v2/anything", Some(KEY), None),
            404,
            "no such endpoint",
        ),
        (api.call("GET", chat_path, Some(KEY), None), 405, "POST"),
        (
            api.call("GET", "/v1/models/other-model", Some(KEY), None),
            404,
            "other-model",
        ),
    ];
    for (resp, status, needle) in cases {
        let err = resp.error();
        assert_eq!(resp.status, status, "{err}");
        assert!(
            err["message"].as_str().unwrap().contains(needle),
            "{status} {needle}: {err}"
        );
        if status == 401 {
            assert!(
                resp.head.contains("WWW-Authenticate: Bearer"),
                "{}",
                resp.head
            );
        }
    }
    // Only /health is open without a key.
    let health = api.call("GET", "/health", None, None);
    assert_eq!(
        (health.status, health.json()["status"].clone()),
        (200, json!("ok"))
    );
    // A chunked upload is not taken; a bad Content-Length is malformed.
    let mut s = api.connect();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).status, 411);
    let mut s = api.connect();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nContent-Length: -1\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).status, 400);
    // Still serving, and the refusals were counted by reason.
    let ok = api.post(chat_path, &chat("Hello", 4));
    assert_eq!(ok.status, 200, "{:?}", ok.json());
    assert_eq!(ok.json()["choices"][0]["message"]["role"], "assistant");
    assert!(api.metric("crystald_requests_total{outcome=\"invalid_request\"}") >= 6.0);
    assert_eq!(
        api.metric("crystald_requests_total{outcome=\"invalid_json\"}"),
        2.0
    );
    assert_eq!(
        api.metric("crystald_requests_total{outcome=\"payload_too_large\"}"),
        1.0
    );
}

#[test]
fn a_client_sending_headers_slowly_is_cut_off() {
    let api = start("", "read_timeout_s = 1.0");
    let mut s = api.connect();
    let t = Instant::now();
    let mut cut = false;
    for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n" {
        if s.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if t.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    let resp = read_response(&mut s);
    assert_eq!(resp.status, 408, "{resp:?} (cut while writing: {cut})");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // A slow client holds only its own connection.
    assert_eq!(api.call("GET", "/health", None, None).status, 200);
}

#[test]
fn a_client_leaving_mid_stream_cancels_its_request() {
    let api = start("", "");
    let prompt = long_prompt(&api);
    let mut body = chat(&prompt, 400);
    body["stream"] = json!(true);
    let mut s = api.connect();
    s.write_all(&request(
        "POST",
        "/v1/chat/completions",
        Some(KEY),
        Some(body.to_string().as_bytes()),
    ))
    .unwrap();
    let mut first = [0u8; 512];
    let n = s.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(s);
    api.wait_metric("crystald_requests_total{outcome=\"cancelled\"}", 1.0);
    api.wait_metric("crystald_running_requests", 0.0);
    assert!(api.d.log().contains("client left"), "{}", api.d.log());
    // The same for a client waiting for a whole reply.
    let mut s = api.connect();
    s.write_all(&request(
        "POST",
        "/v1/chat/completions",
        Some(KEY),
        Some(chat(&prompt, 400).to_string().as_bytes()),
    ))
    .unwrap();
    api.wait_metric("crystald_running_requests", 1.0);
    drop(s);
    api.wait_metric("crystald_requests_total{outcome=\"cancelled\"}", 2.0);
}

#[test]
fn more_requests_than_the_queue_holds_get_429_and_shutdown_503() {
    // The scalar kernels make the fixture slow enough for the drain below
    // to last while the test asks.
    let mut api = start_with(
        "queue_size = 1\ndrain_timeout_s = 60",
        "",
        &["--kernels", "scalar"],
    );
    let prompt = long_prompt(&api);
    // More long requests than `parallel` (4) and the queue (1) hold at once:
    // four run, one waits, the rest are refused with a hint to retry.
    let addr = api.addr.clone();
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let addr = addr.clone();
            let body = chat(&prompt, 400 - i).to_string();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).unwrap();
                s.write_all(&request(
                    "POST",
                    "/v1/chat/completions",
                    Some(KEY),
                    Some(body.as_bytes()),
                ))
                .unwrap();
                read_response(&mut s)
            })
        })
        .collect();
    let resps: Vec<Resp> = clients
        .into_iter()
        .map(|c| c.join().unwrap_or_else(|_| panic!("{}", api.d.log())))
        .collect();
    let busy: Vec<&Resp> = resps.iter().filter(|r| r.status == 429).collect();
    assert!(!busy.is_empty(), "{resps:?}");
    assert!(
        resps.iter().all(|r| r.status == 200 || r.status == 429),
        "{resps:?}"
    );
    for r in busy {
        assert!(r.head.contains("Retry-After: 1"), "{}", r.head);
        assert_eq!(r.error()["code"], "busy");
    }
    // A kept connection that asks during the drain is told the daemon is
    // stopping.
    let mut kept = api.connect();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut kept).status, 200);
    let mut running = api.connect();
    let mut long = chat(&prompt, 400);
    long["stream"] = json!(true);
    running
        .write_all(&request(
            "POST",
            "/v1/chat/completions",
            Some(KEY),
            Some(long.to_string().as_bytes()),
        ))
        .unwrap();
    let mut first = [0u8; 256];
    let n = running.read(&mut first).unwrap();
    assert!(n > 0);
    signal(&api.d.child, nix::sys::signal::Signal::SIGTERM);
    api.d.wait_log("stopping");
    let body = chat("hi", 4).to_string();
    let mut req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body.as_bytes());
    kept.write_all(&req).unwrap();
    let resp = read_response(&mut kept);
    assert_eq!(
        (resp.status, resp.error()["code"].clone()),
        (503, json!("shutting_down"))
    );
    assert!(resp.head.contains("Retry-After"), "{}", resp.head);
    // The running request was let finish.
    let mut all = first[..n].to_vec();
    let _ = running.read_to_end(&mut all);
    let all = String::from_utf8_lossy(&all);
    assert!(
        all.contains("\"finish_reason\":\"length\"") && all.contains("[DONE]"),
        "{all}"
    );
    assert_eq!(api.d.wait_exit(), 0, "{}", api.d.log());
    assert!(
        !api.unix.exists(),
        "the HTTP socket file is removed at exit"
    );
}

#[test]
fn a_public_address_without_a_key_is_refused_at_start() {
    let mut d = Daemon::spawn_config("", &["--http", "0.0.0.0:0"]);
    assert_ne!(d.wait_exit(), 0);
    let log = d.log();
    assert!(
        log.contains("api_key_file") && log.contains("allow_unauthenticated"),
        "{log}"
    );
    let mut d = Daemon::spawn_config(
        "[http]\nallow_unauthenticated = true\n",
        &["--http", "0.0.0.0:0"],
    );
    d.wait_log("ready:");
    signal(&d.child, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.wait_exit(), 0);
    let mut d = Daemon::spawn_config("[http]\napi_key_file = \"/nonexistent/keys\"\n", &[]);
    assert_ne!(d.wait_exit(), 0);
    assert!(d.log().contains("/nonexistent/keys"), "{}", d.log());
}

/// Every `curl` command in the README's HTTP section, run against a daemon
/// (the README's address and key replaced by the test's).
#[test]
fn the_readme_curl_examples_work() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section: String = readme
        .split("\n### HTTP API")
        .nth(1)
        .expect("README has an HTTP API section")
        .split("\n### ")
        .next()
        .unwrap()
        .to_string();
    let mut commands = Vec::new();
    let mut in_block = false;
    let mut current = String::new();
    for line in section.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        if current.is_empty() && !line.starts_with("curl ") {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if !line.ends_with('\\') {
            commands.push(std::mem::take(&mut current));
        }
    }
    assert!(commands.len() >= 4, "{commands:?}");
    let api = start("", "");
    for cmd in commands {
        let cmd = cmd
            .replace("127.0.0.1:8080", &api.addr)
            .replace("/run/crystald/http.sock", api.unix.to_str().unwrap())
            .replace("$CRYSTALD_API_KEY", KEY);
        let out = Command::new("bash")
            .args(["-c", &format!("set -o pipefail; {cmd}")])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{cmd}\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!stdout.contains("\"error\""), "{cmd}\n{stdout}");
        assert!(!stdout.trim().is_empty(), "{cmd}");
    }
}
