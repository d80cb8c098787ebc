//! `crystald serve` as clients see it: the real binary on a converted
//! fixture, spoken to over its Unix socket. Every wait is bounded, so a hang
//! fails the test instead of stalling CI.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);
/// Long enough to still be running while a test acts on it, yet bounded by
/// the context below.
const LONG: u64 = 400;
const CTX: &str = "448";

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn model() -> PathBuf {
    converted("tiny-a", "q4_0")
}

impl Daemon {
    /// Starts a daemon with `config` (TOML) and waits until it accepts.
    fn start(config: &str) -> Daemon {
        Self::start_with(config, &[], |_| {})
    }

    fn start_with(config: &str, env: &[(&str, &str)], prepare: impl FnOnce(&Path)) -> Daemon {
        let d = Self::spawn(config, env, prepare);
        let until = Instant::now() + WAIT;
        let mut d = d;
        loop {
            if UnixStream::connect(&d.socket).is_ok() {
                return d;
            }
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("daemon exited with {status}: {}", d.log());
            }
            assert!(Instant::now() < until, "daemon did not start: {}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(config: &str, env: &[(&str, &str)], prepare: impl FnOnce(&Path)) -> Daemon {
        let dir = temp_dir();
        prepare(dir.path());
        let socket = dir.path().join("crystald.sock");
        let cfg = dir.path().join("crystald.toml");
        std::fs::write(&cfg, config).unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_crystald"))
            .args([
                "serve",
                "--threads",
                "1",
                "--ctx",
                CTX,
                "--log-level",
                "debug",
            ])
            .arg("--model")
            .arg(model())
            .arg("--socket")
            .arg(&socket)
            .arg("--config")
            .arg(&cfg)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Daemon { child, dir, socket }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn client(&self) -> Client {
        Client::new(UnixStream::connect(&self.socket).expect("connect"))
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Waits for the daemon to exit; returns its exit code.
    fn wait_exit(&mut self) -> i32 {
        let until = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < until,
                "daemon did not exit: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls the log until it contains `what`.
    fn wait_log(&self, what: &str) -> String {
        let until = Instant::now() + WAIT;
        loop {
            let log = self.log();
            if log.contains(what) {
                return log;
            }
            assert!(Instant::now() < until, "log never said {what:?}: {log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    fn new(stream: UnixStream) -> Client {
        stream.set_read_timeout(Some(WAIT)).unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    fn send(&mut self, v: &Value) {
        self.raw(format!("{v}\n").as_bytes());
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// The next reply line; `None` at end of stream.
    fn try_recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))),
            Err(e) => panic!("no reply within {WAIT:?}: {e}"),
        }
    }

    fn recv(&mut self) -> Value {
        self.try_recv().expect("connection closed")
    }

    /// Collects replies until every id in `ids` has had its final event;
    /// returns, per id, the streamed texts and the final event.
    fn finish(&mut self, ids: &[Value]) -> HashMap<String, (Vec<String>, Value)> {
        let mut out: HashMap<String, (Vec<String>, Value)> = HashMap::new();
        let mut pending: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        while !pending.is_empty() {
            let v = self.recv();
            let key = v["id"].to_string();
            assert!(
                pending.contains(&key) || out.contains_key(&key),
                "reply for an unexpected id: {v}"
            );
            let entry = out.entry(key.clone()).or_insert((Vec::new(), Value::Null));
            assert!(entry.1.is_null(), "event after the final one: {v}");
            match v["event"].as_str() {
                Some("token") => entry.0.push(v["text"].as_str().unwrap().to_string()),
                Some("done") | Some("error") => {
                    entry.1 = v;
                    pending.retain(|p| *p != key);
                }
                _ => panic!("unexpected event {v}"),
            }
        }
        out
    }

    /// Sends one request and returns its final event (tokens ignored).
    fn ask(&mut self, req: Value) -> Value {
        let id = req["id"].clone();
        self.send(&req);
        self.finish(std::slice::from_ref(&id))
            .remove(&id.to_string())
            .unwrap()
            .1
    }

    fn expect_error(&mut self, line: &[u8], id: Value, code: &str) -> Value {
        self.raw(line);
        let v = self.recv();
        assert_eq!(v["event"], "error", "{v}");
        assert_eq!(v["code"], code, "{v}");
        assert_eq!(v["id"], id, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        v
    }
}

fn req(id: impl Into<Value>, prompt: &str, max_tokens: u64) -> Value {
    json!({"id": id.into(), "prompt": prompt, "max_tokens": max_tokens, "seed": 7})
}

/// A request that keeps the worker busy: greedy on this fixture does not
/// produce an end-of-turn token within `LONG` tokens.
fn long(id: &str) -> Value {
    json!({"id": id, "prompt": "Once upon a time", "max_tokens": LONG,
           "temperature": 0, "stream": true})
}

fn reader_rejects_then_serves(c: &mut Client) {
    let done = c.ask(req("after", "ok", 2));
    assert_eq!(done["event"], "done", "{done}");
}

#[test]
fn streaming_plain_health_and_logprobs() {
    let d = Daemon::start("");
    let mut c = d.client();
    let mut r = req("s", "Hello there", 12);
    r["stream"] = json!(true);
    c.send(&r);
    let mut got = c.finish(&[json!("s")]);
    let (tokens, done) = got.remove("\"s\"").unwrap();
    assert_eq!(done["event"], "done", "{done}");
    assert!(!tokens.is_empty());
    assert_eq!(tokens.concat(), done["text"].as_str().unwrap());
    let usage = &done["usage"];
    assert_eq!(usage["completion_tokens"].as_u64(), Some(tokens_len(&done)));
    assert!(usage["prompt_tokens"].as_u64().unwrap() >= 3, "{done}");
    assert!(["stop", "length"].contains(&done["finish_reason"].as_str().unwrap()));
    for key in [
        "queued_ms",
        "prompt_ms",
        "generation_ms",
        "generation_tokens_per_s",
    ] {
        assert!(done["timings"][key].is_number(), "{key}: {done}");
    }

    // Without `stream`: only the final event, and the same seed gives the same text.
    let mut r2 = req(5, "Hello there", 12);
    r2["logprobs"] = json!(3);
    c.send(&r2);
    let v = c.recv();
    assert_eq!((&v["id"], &v["event"]), (&json!(5), &json!("done")), "{v}");
    assert_eq!(v["text"], done["text"]);
    let lp = v["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lp.len() as u64, tokens_len(&v));
    assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 3);
    assert!(lp[0]["logprob"].as_f64().unwrap() <= 0.0);

    // Chat messages, and the seed is reported when chosen by the daemon.
    let v = c.ask(json!({"id": "chat", "max_tokens": 4,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}));
    assert_eq!(v["event"], "done", "{v}");
    assert!(v["seed"].is_u64());

    c.send(&json!({"op": "health", "id": "h"}));
    let h = c.recv();
    assert_eq!(
        (&h["event"], &h["id"], &h["status"]),
        (&json!("health"), &json!("h"), &json!("ok"))
    );
    assert_eq!(h["model"], "tiny-a");
    let avail: Vec<&str> = crystald::kernels::available()
        .iter()
        .map(|k| k.name())
        .collect();
    assert_eq!(h["kernels_available"], json!(avail), "{h}");
    assert_eq!(h["kernels"], json!(avail[0]), "auto runs the best set: {h}");
    assert_eq!(h["queue_depth"], 0);
    assert!(h["requests_total"].as_u64().unwrap() >= 3);
    assert!(h["tokens_per_s"].as_f64().unwrap() > 0.0, "{h}");
    assert!(h["avg_tokens_per_s"].as_f64().unwrap() > 0.0, "{h}");
    assert!(h["uptime_s"].as_f64().unwrap() > 0.0);
    // Prompts are not logged at the default level, nor at debug.
    assert!(!d.log().contains("Hello there"));
}

fn tokens_len(done: &Value) -> u64 {
    done["usage"]["completion_tokens"].as_u64().unwrap()
}

#[test]
fn three_clients_at_once_get_their_own_replies() {
    // Six requests, four generating together, two queued. The scalar
    // kernels sum each token's products in the same order whatever shares
    // the step, so a seeded reply is the same text alone or batched (the
    // SIMD sets differ in the last bits: see engine_fixtures.rs).
    let d = Daemon::start("queue_size = 8\nparallel = 4\nkernels = \"scalar\"");
    let prompts = ["The cat", "A dog", "Some fish"];
    // Reference texts, one request at a time.
    let mut c = d.client();
    let solo: Vec<Value> = prompts
        .iter()
        .map(|p| c.ask(req("x", p, 16))["text"].clone())
        .collect();
    drop(c);
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut c = d.client();
            let p = p.to_string();
            std::thread::spawn(move || {
                // The same ids on every connection: ids are per connection.
                let mut a = req("x", &p, 16);
                a["stream"] = json!(true);
                c.send(&a);
                c.send(&req(2, &p, 16));
                let mut got = c.finish(&[json!("x"), json!(2)]);
                let (tokens, done) = got.remove("\"x\"").unwrap();
                assert_eq!(tokens.concat(), done["text"].as_str().unwrap());
                let (none, plain) = got.remove("2").unwrap();
                assert!(none.is_empty());
                assert_eq!(plain["text"], done["text"]);
                done["text"].clone()
            })
        })
        .collect();
    let texts: Vec<Value> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(texts, solo);
}

#[test]
fn a_full_kv_pool_pauses_the_younger_request_and_both_replies_are_whole() {
    // The pool holds one context (448 positions); two replies of 400 tokens
    // cannot both fit. The younger pauses, resumes when the older is done,
    // and both replies are exactly what each gives alone.
    let d = Daemon::start(&format!(
        "parallel = 2\nkv_budget = {CTX}\nkernels = \"scalar\""
    ));
    let mut c = d.client();
    let alone = c.ask(long("alone"));
    assert_eq!(alone["finish_reason"], "length", "{alone}");
    c.send(&long("a"));
    c.send(&long("b"));
    let got = c.finish(&[json!("a"), json!("b")]);
    for id in ["\"a\"", "\"b\""] {
        let (tokens, done) = &got[id];
        assert_eq!(done["finish_reason"], "length", "{done}");
        assert_eq!(done["text"], alone["text"], "{id}");
        assert_eq!(tokens.concat(), alone["text"].as_str().unwrap(), "{id}");
    }
    assert!(
        d.log().contains("KV pool full: a request is paused"),
        "{}",
        d.log()
    );
    let mut probe = d.client();
    probe.send(&json!({"op": "health"}));
    let h = probe.recv();
    assert_eq!(h["kv_pool_tokens"], CTX.parse::<u64>().unwrap(), "{h}");
    assert_eq!(h["kv_in_use_tokens"], 0, "{h}");
}

#[test]
fn the_pool_takes_memory_only_as_its_blocks_fill() {
    // A pool far bigger than the 200 MiB allowed beside it: were it written
    // at start, or kept after use, the daemon's anonymous memory would show.
    const BESIDE_MIB: f64 = 200.0;
    let d = Daemon::start("parallel = 4\nkv_budget = \"512 MiB\"");
    let pid = d.child.id();
    let mut probe = d.client();
    let mut check = |when: &str| {
        probe.send(&json!({"op": "health"}));
        let h = probe.recv();
        let anon = proc_status_kb(pid, "RssAnon") as f64 / 1024.0;
        let per_token = h["kv_pool_mib"].as_f64().unwrap() / h["kv_pool_tokens"].as_f64().unwrap();
        let held =
            h["kv_in_use_tokens"].as_f64().unwrap() + h["kv_cached_tokens"].as_f64().unwrap();
        assert!(
            h["kv_pool_mib"].as_f64().unwrap() >= 511.0,
            "{when}: the pool is the budget: {h}"
        );
        assert!(
            anon <= held * per_token + BESIDE_MIB,
            "{when}: {anon:.0} MiB anonymous with {held} positions held: {h}"
        );
        h["kv_in_use_tokens"].as_u64().unwrap()
    };
    check("idle after start");
    let mut c = d.client();
    for i in 0..4 {
        c.send(&long(&format!("r{i}")));
    }
    // Sampled while all four generate.
    let mut busiest = 0;
    for _ in 0..40 {
        assert_eq!(c.recv()["event"], "token");
        busiest = busiest.max(check("generating"));
    }
    assert!(busiest > 0, "health saw no request running");
    for i in 0..4 {
        c.send(&json!({"op": "cancel", "id": format!("r{i}")}));
    }
    let ids: Vec<Value> = (0..4).map(|i| json!(format!("r{i}"))).collect();
    c.finish(&ids);
    check("after");
}

#[test]
fn full_queue_answers_busy_and_cancel_works() {
    // Two generate at once and one may wait: the fourth is refused.
    let d = Daemon::start("parallel = 2\nqueue_size = 1");
    let mut c = d.client();
    // Each is running once it has streamed a token; until then it holds
    // the one queue place.
    for id in ["run", "run2"] {
        c.send(&long(id));
        loop {
            let v = c.recv();
            assert_eq!(v["event"], "token", "{v}");
            if v["id"] == id {
                break;
            }
        }
    }
    c.send(&long("queued"));
    c.send(&req("third", "x", 2));
    // Token events of the running ones may come first.
    let busy = loop {
        let v = c.recv();
        assert_ne!(v["id"], "queued", "the queued request must wait: {v}");
        if v["id"] == "third" {
            break v;
        }
    };
    assert_eq!(
        (&busy["event"], &busy["code"]),
        (&json!("error"), &json!("busy")),
        "{busy}"
    );
    // Cancelling a queued request answers it at once, before it computes.
    c.send(&json!({"op": "cancel", "id": "queued"}));
    c.send(&json!({"op": "cancel", "id": "run"}));
    c.send(&json!({"op": "cancel", "id": "run2"}));
    let got = c.finish(&[json!("run"), json!("run2"), json!("queued")]);
    let queued = &got["\"queued\""].1;
    assert_eq!(queued["finish_reason"], "cancelled", "{queued}");
    assert_eq!(tokens_len(queued), 0, "{queued}");
    for id in ["\"run\"", "\"run2\""] {
        let run = &got[id].1;
        assert_eq!(run["finish_reason"], "cancelled", "{run}");
        assert!(tokens_len(run) < LONG, "{run}");
    }
    // Cancelling something finished is harmless, and the daemon goes on.
    c.send(&json!({"op": "cancel", "id": "run"}));
    reader_rejects_then_serves(&mut c);
}

#[test]
fn a_client_that_disconnects_cancels_its_requests() {
    let d = Daemon::start("");
    let mut c = d.client();
    c.send(&long("gone"));
    assert_eq!(c.recv()["event"], "token");
    drop(c);
    // Noticed by the reader or by the worker's next write, in either order.
    d.wait_log("hung up");
    d.wait_log("finish cancelled");
    // A client that half-closes (done sending) still gets its reply.
    let s = UnixStream::connect(&d.socket).unwrap();
    let mut c = Client::new(s);
    c.send(&req(1, "Hi", 3));
    c.writer.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(c.recv()["event"], "done");
    assert!(
        c.try_recv().is_none(),
        "the daemon closes after the last reply"
    );
}

#[test]
fn prefix_cache_hit_gives_the_same_output_as_a_cold_run() {
    let system = "You are a terse assistant who answers in one line.";
    let turn1 = json!([{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}]);
    let d = Daemon::start("");
    let mut c = d.client();
    let first = c.ask(json!({"id": 1, "messages": turn1, "max_tokens": 8, "seed": 3}));
    let answer = first["text"].as_str().unwrap();
    let turn2 = json!([
        {"role": "system", "content": system},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Another one?"}
    ]);
    let sampled = json!({"id": 2, "messages": turn2, "max_tokens": 12, "seed": 11, "logprobs": 2});
    let mut greedy = sampled.clone();
    greedy["temperature"] = json!(0);
    greedy["id"] = json!(3);
    let warm = c.ask(sampled.clone());
    let warm_greedy = c.ask(greedy.clone());
    let cached = warm["usage"]["cached_tokens"].as_u64().unwrap();
    let prompt = warm["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        cached > first["usage"]["prompt_tokens"].as_u64().unwrap() / 2 && cached < prompt,
        "the next turn reuses the first: {warm}"
    );
    assert!(warm_greedy["usage"]["cached_tokens"].as_u64().unwrap() >= cached);
    drop(c);
    drop(d);

    let cold_daemon = Daemon::start("");
    let mut c = cold_daemon.client();
    let cold = c.ask(sampled);
    assert_eq!(cold["usage"]["cached_tokens"], 0, "{cold}");
    assert_eq!(cold["text"], warm["text"]);
    assert_eq!(cold["logprobs"], warm["logprobs"]);
    // Another conversation in between does not evict this one: the pool
    // keeps the blocks of every recent request, not only the last.
    let other = c.ask(json!({"id": 4, "prompt": "unrelated", "max_tokens": 1}));
    assert_eq!(other["event"], "done");
    let cold_greedy = c.ask(greedy);
    assert!(
        cold_greedy["usage"]["cached_tokens"].as_u64().unwrap() >= cached,
        "{cold_greedy}"
    );
    assert_eq!(cold_greedy["text"], warm_greedy["text"]);
}

#[test]
fn bad_input_gets_a_clear_error_and_the_connection_keeps_working() {
    let d = Daemon::start("");
    let mut c = d.client();
    let null = Value::Null;
    c.expect_error(b"this is not json\n", null.clone(), "invalid_json");
    c.expect_error(b"[1, 2, 3]\n", null.clone(), "invalid_json");
    c.expect_error(b"\"text\"\n", null.clone(), "invalid_json");
    let e = c.expect_error(
        b"{\"id\": \"t\", \"prompt\": \"a\", \"max_token\": 5}\n",
        json!("t"),
        "invalid_request",
    );
    assert!(e["message"].as_str().unwrap().contains("max_token"), "{e}");
    c.expect_error(
        b"{\"id\": \"w\", \"prompt\": \"a\", \"max_tokens\": \"five\"}\n",
        json!("w"),
        "invalid_request",
    );
    c.expect_error(
        b"{\"id\": 1, \"prompt\": 42}\n",
        json!(1),
        "invalid_request",
    );
    c.expect_error(
        b"{\"id\": 1, \"prompt\": \"a\", \"stream\": 1}\n",
        json!(1),
        "invalid_request",
    );
    let e = c.expect_error(b"{\"prompt\": \"a\"}\n", null.clone(), "invalid_request");
    assert!(e["message"].as_str().unwrap().contains("id"), "{e}");
    c.expect_error(
        b"{\"id\": [1], \"prompt\": \"a\"}\n",
        null.clone(),
        "invalid_request",
    );
    c.expect_error(
        b"{\"id\": \"m\", \"messages\": []}\n",
        json!("m"),
        "invalid_request",
    );
    let e = c.expect_error(
        b"{\"id\": \"r\", \"messages\": [{\"role\": \"robot\", \"content\": \"hi\"}]}\n",
        json!("r"),
        "invalid_request",
    );
    assert!(e["message"].as_str().unwrap().contains("robot"), "{e}");
    c.expect_error(b"{\"id\": \"n\"}\n", json!("n"), "invalid_request");
    c.expect_error(
        b"{\"id\": \"b\", \"prompt\": \"a\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n",
        json!("b"),
        "invalid_request",
    );
    c.expect_error(
        b"{\"id\": \"z\", \"prompt\": \"a\", \"max_tokens\": 0}\n",
        json!("z"),
        "invalid_request",
    );
    c.expect_error(
        b"{\"id\": \"h\", \"prompt\": \"a\", \"max_tokens\": 1000000000}\n",
        json!("h"),
        "invalid_request",
    );
    c.expect_error(
        b"{\"id\": \"neg\", \"prompt\": \"a\", \"max_tokens\": -1}\n",
        json!("neg"),
        "invalid_request",
    );
    c.expect_error(
        b"{\"id\": \"t\", \"prompt\": \"a\", \"temperature\": -1}\n",
        json!("t"),
        "invalid_request",
    );
    c.expect_error(b"{\"op\": \"reboot\"}\n", null.clone(), "invalid_request");
    c.expect_error(
        b"{\"id\": \"u\", \"prompt\": \"\xff\xfe\"}\n",
        null.clone(),
        "invalid_utf8",
    );
    let long_prompt = "word ".repeat(600);
    c.expect_error(
        format!("{}\n", json!({"id": "ctx", "prompt": long_prompt})).as_bytes(),
        json!("ctx"),
        "context_length_exceeded",
    );
    let mut huge = br#"{"id": "big", "prompt": ""#.to_vec();
    huge.extend(vec![b'a'; (1 << 20) + 10]);
    huge.extend_from_slice(b"\"}\n");
    c.expect_error(&huge, null.clone(), "line_too_long");
    // A duplicate id while the first is in flight; after it finishes the id is free.
    c.send(&long("dup"));
    assert_eq!(c.recv()["event"], "token");
    c.raw(format!("{}\n", req("dup", "x", 2)).as_bytes());
    let dup = loop {
        let v = c.recv();
        if v["event"] != "token" {
            break v;
        }
    };
    assert_eq!(
        (&dup["id"], &dup["code"]),
        (&json!("dup"), &json!("duplicate_id")),
        "{dup}"
    );
    c.send(&json!({"op": "cancel", "id": "dup"}));
    c.finish(&[json!("dup")]);
    assert_eq!(c.ask(req("dup", "x", 2))["event"], "done");
    reader_rejects_then_serves(&mut c);

    // Half a line, then gone: nothing breaks for anyone else.
    let mut half = d.client();
    half.raw(br#"{"id": "half", "prompt": "ab"#);
    drop(half);
    let mut other = d.client();
    reader_rejects_then_serves(&mut other);
    reader_rejects_then_serves(&mut c);
}

#[test]
fn a_client_that_never_reads_is_cut_off_without_stalling_others() {
    let d = Daemon::start("max_pending_replies = 16");
    let mut lazy = d.client();
    lazy.send(&long("lazy"));
    // Running, so the worker itself meets the full queue.
    assert_eq!(lazy.recv()["event"], "token");
    // Health replies pile up unread until the socket buffer and the
    // per-connection queue are full.
    let flood = "{\"op\": \"health\"}\n".repeat(20_000);
    let mut w = lazy.writer.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(flood.as_bytes());
    });
    let log = d.wait_log("does not read its replies");
    writer.join().unwrap();
    d.wait_log("finish cancelled");
    let mut other = d.client();
    reader_rejects_then_serves(&mut other);
    // The lazy client finds its connection closed: end of stream, or a
    // reset since the daemon left part of the flood unread.
    let mut sink = [0u8; 65536];
    loop {
        match lazy.reader.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the connection was not closed: {e}"),
        }
    }
    assert!(log.contains("disconnecting"), "{log}");
}

#[test]
fn sigterm_drains_then_cancels_and_exits_cleanly() {
    // The drain ends long before the running requests could.
    let mut d = Daemon::start("queue_size = 4\nparallel = 2\ndrain_timeout_s = 0.05");
    let mut c = d.client();
    c.send(&long("running"));
    c.send(&long("beside"));
    assert_eq!(c.recv()["event"], "token");
    c.send(&long("waiting"));
    // Two run, the third is queued once health says so.
    let mut probe = d.client();
    let until = Instant::now() + WAIT;
    loop {
        probe.send(&json!({"op": "health"}));
        let h = probe.recv();
        if h["queue_depth"] == 1 && h["running"] == 2 {
            break;
        }
        assert!(Instant::now() < until);
    }
    d.signal(nix::sys::signal::Signal::SIGTERM);
    let got = c.finish(&[json!("running"), json!("beside"), json!("waiting")]);
    let beside = &got["\"beside\""].1;
    assert_eq!(beside["event"], "done", "{beside}");
    assert_eq!(beside["finish_reason"], "cancelled", "{beside}");
    let waiting = &got["\"waiting\""].1;
    assert_eq!(
        (&waiting["event"], &waiting["code"]),
        (&json!("error"), &json!("shutting_down")),
        "{waiting}"
    );
    let running = &got["\"running\""].1;
    assert_eq!(running["event"], "done", "{running}");
    assert_eq!(running["finish_reason"], "cancelled", "{running}");
    assert!(
        c.try_recv().is_none(),
        "the connection closes after the last reply"
    );
    assert_eq!(d.wait_exit(), 0, "{}", d.log());
    assert!(!d.socket.exists(), "socket file left behind");
}

#[test]
fn sigterm_lets_a_request_finish_within_the_drain_timeout() {
    let mut d = Daemon::start("drain_timeout_s = 60");
    let mut c = d.client();
    let mut r = req("short", "Hello", 40);
    r["stream"] = json!(true);
    c.send(&r);
    assert_eq!(c.recv()["event"], "token");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    let done = c.finish(&[json!("short")]).remove("\"short\"").unwrap().1;
    assert_eq!(done["event"], "done", "{done}");
    assert_ne!(done["finish_reason"], "cancelled", "{done}");
    assert_eq!(d.wait_exit(), 0, "{}", d.log());
    assert!(UnixStream::connect(&d.socket).is_err());
}

#[test]
fn ready_is_notified_after_the_socket_accepts() {
    let notify_dir = temp_dir();
    let notify = notify_dir.path().join("notify");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener.set_read_timeout(Some(WAIT)).unwrap();
    let mut d = Daemon::spawn(
        "",
        &[
            ("NOTIFY_SOCKET", notify.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
        |_| {},
    );
    let mut buf = [0u8; 512];
    let mut seen = Vec::new();
    loop {
        let n = listener.recv(&mut buf).expect("no READY=1 from the daemon");
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        if msg.lines().any(|l| l == "READY=1") {
            // Ready means ready: the very next connect is served.
            let mut c = d.client();
            c.send(&json!({"op": "health"}));
            assert_eq!(c.recv()["status"], "ok");
            assert!(msg.contains("STATUS="), "{msg}");
            break;
        }
        seen.push(msg);
    }
    assert!(seen.iter().any(|m| m.starts_with("STATUS=")), "{seen:?}");
    // Watchdog pings at half the interval.
    let n = listener.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"WATCHDOG=1");
    d.signal(nix::sys::signal::Signal::SIGINT);
    loop {
        let n = listener.recv(&mut buf).expect("no STOPPING=1");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
    assert_eq!(d.wait_exit(), 0);
}

#[test]
fn stale_sockets_are_replaced_live_daemons_are_not() {
    // A crash leaves a socket file with nobody behind it.
    let d = Daemon::start_with("", &[], |dir| {
        let l = std::os::unix::net::UnixListener::bind(dir.join("crystald.sock")).unwrap();
        drop(l);
    });
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let out = Command::new(env!("CARGO_BIN_EXE_crystald"))
        .args(["serve", "--config", "/nonexistent-default-is-not-used"])
        .arg("--model")
        .arg(model())
        .arg("--socket")
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read"),
        "a named config must exist: {err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_crystald"))
        .arg("serve")
        .arg("--model")
        .arg(model())
        .arg("--socket")
        .arg(&d.socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already listening"), "{err}");
    // The first daemon is unharmed.
    reader_rejects_then_serves(&mut d.client());
}

#[test]
fn peer_credentials_restrict_who_is_served() {
    let me = nix::unistd::getuid().as_raw();
    let other = if me == 4_000_000 {
        4_000_001
    } else {
        4_000_000
    };
    let d = Daemon::start(&format!(
        "allowed_users = [{other}]\nallowed_groups = [{other}]"
    ));
    let mut c = d.client();
    let v = c.recv();
    assert_eq!(
        (&v["event"], &v["code"]),
        (&json!("error"), &json!("forbidden")),
        "{v}"
    );
    assert!(c.try_recv().is_none(), "a refused connection is closed");
    drop(d);
    let d = Daemon::start(&format!("allowed_users = [{other}, {me}]"));
    reader_rejects_then_serves(&mut d.client());
}

#[test]
fn ask_streams_an_answer_with_script_friendly_exit_codes() {
    let d = Daemon::start("");
    let ask = |args: &[&str], stdin: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crystald"))
            .arg("ask")
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = ask(
        &[
            "--max-tokens",
            "6",
            "--seed",
            "1",
            "--system",
            "Be brief.",
            "Hi there",
        ],
        "",
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.trim().is_empty() && text.ends_with('\n'));
    let piped = ask(
        &["--max-tokens", "6", "--seed", "1", "--system", "Be brief."],
        "Hi there\n",
    );
    assert_eq!(piped.status.code(), Some(0));
    assert_eq!(String::from_utf8(piped.stdout).unwrap(), text);
    let bad = ask(&["--max-tokens", "0", "Hi"], "");
    assert_eq!(bad.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("max_tokens"));
    let empty = ask(&[], "  \n");
    assert_eq!(empty.status.code(), Some(2));
    let nobody = Command::new(env!("CARGO_BIN_EXE_crystald"))
        .args(["ask", "--socket", "/nonexistent/crystald.sock", "Hi"])
        .output()
        .unwrap();
    assert_eq!(nobody.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("cannot connect"));
}
