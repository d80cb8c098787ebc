//! Soak: the real daemon on a converted fixture under a mixed load from
//! several clients at once, over the Unix socket, over Mosquitto and over
//! HTTP, with streaming, cancellations, disconnects, malformed lines and
//! bodies, bursts beyond the queue, deadlines, and a broker restart every
//! few seconds.
//!
//! Every request that is not abandoned by its client must get exactly one
//! final event: the test fails if one is lost or duplicated, or if the
//! daemon's RSS grows by more than a small bound. It prints the figures.
//!
//! CI runs a short version (`cargo test --test soak`). The long version:
//!
//! ```sh
//! SOAK_REQUESTS=20000 SOAK_SECONDS=3600 SOAK_RESTART_S=30 \
//!   cargo test --release --test soak -- --nocapture
//! ```

mod common;

use common::http_client::{read_response, request};
use common::proc_status_kb;
use common::services::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How long a client waits for a final event before counting it lost.
const FINAL_WAIT: Duration = Duration::from_secs(60);
/// RSS growth allowed over the run (allocator caches, thread stacks).
const RSS_GROWTH_MAX_KB: i64 = 48 * 1024;

#[derive(Default)]
struct Tally {
    sent: usize,
    /// Final events, by `done:<finish_reason>` or `error:<code>`.
    finals: BTreeMap<String, usize>,
    /// Requests whose client hung up on purpose before the reply.
    abandoned: usize,
    lost: usize,
    duplicated: usize,
    latencies_ms: Vec<f64>,
}

impl Tally {
    fn record(&mut self, v: &Value, started: Instant) {
        let key = match v["event"].as_str() {
            Some("done") => format!("done:{}", v["finish_reason"].as_str().unwrap_or("?")),
            Some("error") => format!("error:{}", v["code"].as_str().unwrap_or("?")),
            other => panic!("not a final event: {other:?} {v}"),
        };
        *self.finals.entry(key).or_default() += 1;
        self.latencies_ms
            .push(started.elapsed().as_secs_f64() * 1e3);
    }
}

struct Conn {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Conn {
    fn open(path: &PathBuf) -> Conn {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(FINAL_WAIT)).unwrap();
        Conn {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    fn send_raw(&mut self, line: &str) {
        self.w.write_all(line.as_bytes()).unwrap();
        self.w.write_all(b"\n").unwrap();
    }

    /// Reads until each of `ids` has had a final event; `on_token` sees
    /// token events. Counts lost and duplicated finals into `t`.
    fn collect(
        &mut self,
        ids: &[String],
        started: Instant,
        t: &Mutex<Tally>,
        mut on_token: impl FnMut(&mut Conn, &Value),
    ) {
        let mut open: Vec<String> = ids.to_vec();
        while !open.is_empty() {
            let mut line = String::new();
            match self.r.read_line(&mut line) {
                Ok(n) if n > 0 => {}
                _ => {
                    t.lock().unwrap().lost += open.len();
                    return;
                }
            }
            let v: Value = serde_json::from_str(&line).unwrap();
            let id = v["id"].as_str().unwrap_or("").to_string();
            if v["event"] == "token" {
                on_token(self, &v);
                continue;
            }
            match open.iter().position(|i| *i == id) {
                Some(k) => {
                    open.remove(k);
                    t.lock().unwrap().record(&v, started);
                }
                None if ids.contains(&id) => t.lock().unwrap().duplicated += 1,
                None if id.is_empty() => {
                    // A malformed line: its error carries no id.
                    let k = open.iter().position(|i| i.starts_with("bad-")).unwrap();
                    open.remove(k);
                    t.lock().unwrap().record(&v, started);
                }
                None => panic!("reply for a request not sent here: {v}"),
            }
        }
    }
}

fn req(id: &str, max_tokens: u64, stream: bool) -> Value {
    json!({"id": id, "prompt": "Once upon a time", "max_tokens": max_tokens,
           "temperature": 0.7, "stream": stream})
}

/// One socket client: a mix of request kinds until `budget` runs out.
fn socket_client(
    k: usize,
    sock: PathBuf,
    budget: Arc<AtomicUsize>,
    deadline: Instant,
    t: Arc<Mutex<Tally>>,
) {
    let mut c = Conn::open(&sock);
    let mut n = 0usize;
    while Instant::now() < deadline && take(&budget, 1) {
        n += 1;
        let id = format!("s{k}-{n}");
        let started = Instant::now();
        t.lock().unwrap().sent += 1;
        match n % 8 {
            0 => {
                c.send_raw(&req(&id, 8, false).to_string());
                c.collect(&[id], started, &t, |_, _| {});
            }
            1 => {
                c.send_raw(&req(&id, 16, true).to_string());
                c.collect(&[id], started, &t, |_, _| {});
            }
            2 => {
                // Cancel after the first token.
                c.send_raw(&req(&id, 200, true).to_string());
                let mut cancelled = false;
                let cancel = json!({"op": "cancel", "id": id}).to_string();
                c.collect(&[id], started, &t, |c, _| {
                    if !cancelled {
                        cancelled = true;
                        c.send_raw(&cancel);
                    }
                });
            }
            3 => {
                // Hang up mid-stream on a second connection.
                let mut d = Conn::open(&sock);
                d.send_raw(&req(&id, 200, true).to_string());
                let mut line = String::new();
                let _ = d.r.read_line(&mut line);
                drop(d);
                t.lock().unwrap().abandoned += 1;
            }
            4 => {
                let bad = format!("bad-{id}");
                c.send_raw("{\"id\": oops");
                c.collect(&[bad], started, &t, |_, _| {});
            }
            5 => {
                // A burst beyond the queue: some get `busy`.
                let ids: Vec<String> = (0..6).map(|j| format!("{id}-b{j}")).collect();
                t.lock().unwrap().sent += ids.len() - 1;
                take(&budget, ids.len() - 1);
                for i in &ids {
                    c.send_raw(&req(i, 24, false).to_string());
                }
                c.collect(&ids, started, &t, |_, _| {});
            }
            6 => {
                let chat = json!({"id": id, "messages": [
                    // One system prompt for all: its blocks are shared.
                    {"role": "system", "content": "You are the assistant of a sensor gateway. Be brief: answer in one short sentence."},
                    {"role": "user", "content": format!("Question {n}?")}],
                    "max_tokens": 12});
                c.send_raw(&chat.to_string());
                c.collect(&[id], started, &t, |_, _| {});
            }
            _ => {
                let mut r = req(&id, 64, false);
                r["timeout_ms"] = json!(5);
                c.send_raw(&r.to_string());
                c.collect(&[id], started, &t, |_, _| {});
            }
        }
    }
}

/// One MQTT client (persistent session, so replies survive broker restarts).
fn mqtt_client(
    k: usize,
    port: u16,
    budget: Arc<AtomicUsize>,
    deadline: Instant,
    t: Arc<Mutex<Tally>>,
) {
    let inbox = format!("soak/{k}/inbox");
    let c = Peer::v5(port, &format!("soak-{k}"), &[&inbox], true);
    let topic = format!("{PREFIX}/request");
    let mut n = 0usize;
    while Instant::now() < deadline && take(&budget, 1) {
        n += 1;
        let id = format!("m{k}-{n}");
        let started = Instant::now();
        t.lock().unwrap().sent += 1;
        match n % 4 {
            0 => {
                // Malformed: the error comes back on the response topic.
                c.publish_with(
                    &topic,
                    b"{nope".to_vec(),
                    Some((&inbox, id.as_bytes())),
                    false,
                );
            }
            k4 => {
                let mut r = req(&id, 8 + 8 * k4 as u64, k4 == 1);
                r["reply_to"] = json!(inbox);
                c.publish(&topic, r.to_string());
            }
        }
        // Wait for this request's final event; ignore tokens and
        // duplicates of earlier finals (at-least-once delivery).
        let until = Instant::now() + FINAL_WAIT;
        loop {
            let Some(left) = until.checked_duration_since(Instant::now()) else {
                t.lock().unwrap().lost += 1;
                break;
            };
            let Ok(g) = c.rx.recv_timeout(left) else {
                t.lock().unwrap().lost += 1;
                break;
            };
            if g.body["event"] == "token" {
                continue;
            }
            let mine = g.body["id"] == json!(id) || g.correlation.as_deref() == Some(id.as_bytes());
            if mine {
                t.lock().unwrap().record(&g.body, started);
                break;
            }
        }
    }
}

/// One HTTP request on a new connection; records its outcome the way the
/// socket records final events (`done:<finish_reason>`, `error:<code>`).
fn http_call(addr: &str, path: &str, body: &[u8], started: Instant, t: &Mutex<Tally>) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        t.lock().unwrap().lost += 1;
        return;
    };
    s.write_all(&request("POST", path, None, Some(body)))
        .unwrap();
    let r = read_response(&mut s);
    let text = String::from_utf8_lossy(&r.body).to_string();
    if r.status != 200 {
        let v: Value = serde_json::from_str(&text).unwrap();
        let e = json!({"event": "error", "code": v["error"]["code"]});
        return t.lock().unwrap().record(&e, started);
    }
    if !r.head.contains("text/event-stream") {
        let v: Value = serde_json::from_str(&text).unwrap();
        let d = json!({"event": "done", "finish_reason": v["choices"][0]["finish_reason"]});
        return t.lock().unwrap().record(&d, started);
    }
    // A stream: exactly one chunk with a finish reason, then [DONE].
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let finals: Vec<Value> = events
        .iter()
        .filter(|e| **e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter(|v| !v["choices"][0]["finish_reason"].is_null() || v["error"].is_object())
        .collect();
    let mut t = t.lock().unwrap();
    match finals.as_slice() {
        [] => t.lost += 1,
        [v, rest @ ..] => {
            t.duplicated += rest.len();
            let e = if v["error"].is_object() {
                json!({"event": "error", "code": v["error"]["code"]})
            } else {
                json!({"event": "done", "finish_reason": v["choices"][0]["finish_reason"]})
            };
            t.record(&e, started);
        }
    }
}

/// One HTTP client: chat and completions, whole and streamed, hang-ups,
/// bad and oversized bodies, bursts beyond the queue.
fn http_client(
    k: usize,
    addr: String,
    budget: Arc<AtomicUsize>,
    deadline: Instant,
    t: Arc<Mutex<Tally>>,
) {
    let chat = "/v1/chat/completions";
    let mut n = 0usize;
    while Instant::now() < deadline && take(&budget, 1) {
        n += 1;
        let started = Instant::now();
        t.lock().unwrap().sent += 1;
        let msg = |max: u64, stream: bool| {
            json!({"messages": [{"role": "user", "content": format!("Client {k}, question {n}?")}],
                   "max_tokens": max, "temperature": 0.7, "stream": stream})
            .to_string()
        };
        match n % 6 {
            0 => http_call(&addr, chat, msg(8, false).as_bytes(), started, &t),
            1 => {
                let body = json!({"prompt": "Once upon a time", "max_tokens": 16, "stream": true});
                http_call(
                    &addr,
                    "/v1/completions",
                    body.to_string().as_bytes(),
                    started,
                    &t,
                );
            }
            2 => {
                // Hang up after the first bytes of a long stream.
                let mut s = TcpStream::connect(&addr).unwrap();
                s.write_all(&request(
                    "POST",
                    chat,
                    None,
                    Some(msg(200, true).as_bytes()),
                ))
                .unwrap();
                s.set_read_timeout(Some(FINAL_WAIT)).unwrap();
                let mut first = [0u8; 64];
                let _ = s.read(&mut first);
                drop(s);
                t.lock().unwrap().abandoned += 1;
            }
            3 => http_call(&addr, chat, b"{\"messages\": oops", started, &t),
            4 => http_call(&addr, chat, &vec![b' '; 5000], started, &t),
            _ => {
                // A burst beyond the queue: some get 429.
                t.lock().unwrap().sent += 3;
                take(&budget, 3);
                let burst: Vec<_> = (0..4)
                    .map(|_| {
                        let (a, b, t) = (addr.clone(), msg(24, false), t.clone());
                        std::thread::spawn(move || http_call(&a, chat, b.as_bytes(), started, &t))
                    })
                    .collect();
                for b in burst {
                    b.join().unwrap();
                }
            }
        }
    }
}

/// Takes `n` from the shared request budget; false when it is spent.
fn take(budget: &AtomicUsize, n: usize) -> bool {
    budget
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(n))
        .is_ok()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn soak() {
    let requests = env_or("SOAK_REQUESTS", 1500) as usize;
    let seconds = env_or("SOAK_SECONDS", 240);
    let restart_every = Duration::from_secs(env_or("SOAK_RESTART_S", 4));
    let mut broker = Broker::start();
    let d = Daemon::start(
        &broker.url(),
        "",
        "queue_size = 4\nparallel = 4\nmax_line_bytes = 4096\n[http]\nlisten = [\"127.0.0.1:0\"]\nmax_body_bytes = 4096",
    );
    let http_addr = d
        .log()
        .lines()
        .find_map(|l| l.split("http: listening on http://").nth(1))
        .expect("the HTTP address in the log")
        .trim()
        .to_string();
    let pid = d.child.id();
    let sock = d.dir.path().join("sock");
    // Warm up, so the first figure includes the KV cache and thread stacks.
    d.ask_socket(&req("warm", 32, false));
    let rss_start = proc_status_kb(pid, "VmRSS");

    let began = Instant::now();
    let deadline = began + Duration::from_secs(seconds);
    let budget = Arc::new(AtomicUsize::new(requests));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut clients = Vec::new();
    for k in 0..3 {
        let (s, b, t) = (sock.clone(), budget.clone(), tally.clone());
        clients.push(std::thread::spawn(move || {
            socket_client(k, s, b, deadline, t)
        }));
    }
    for k in 0..2 {
        let (p, b, t) = (broker.port, budget.clone(), tally.clone());
        clients.push(std::thread::spawn(move || {
            mqtt_client(k, p, b, deadline, t)
        }));
    }
    for k in 0..2 {
        let (a, b, t) = (http_addr.clone(), budget.clone(), tally.clone());
        clients.push(std::thread::spawn(move || {
            http_client(k, a, b, deadline, t)
        }));
    }
    let mut restarts = 0;
    // The first restart comes early, so even a short run has one.
    let mut next_restart = Instant::now() + restart_every.min(Duration::from_millis(500));
    while !clients.iter().all(|c| c.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
        if Instant::now() >= next_restart {
            broker.stop();
            std::thread::sleep(Duration::from_millis(300));
            broker.launch();
            restarts += 1;
            next_restart = Instant::now() + restart_every;
        }
    }
    for c in clients {
        c.join().unwrap();
    }
    let elapsed = began.elapsed();
    // Still serving after all that.
    assert_eq!(d.ask_socket(&req("after", 4, false))["event"], "done");
    let rss_end = proc_status_kb(pid, "VmRSS");

    let mut t = tally.lock().unwrap();
    t.latencies_ms.sort_by(f64::total_cmp);
    let answered: usize = t.finals.values().sum();
    println!(
        "soak: {:.0} s, {restarts} broker restarts, machine load {}",
        elapsed.as_secs_f64(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!("  requests sent {}, final events {answered}, abandoned by their client {}, lost {}, duplicated {}",
        t.sent, t.abandoned, t.lost, t.duplicated);
    for (kind, n) in &t.finals {
        println!("  {kind:<32} {n}");
    }
    println!(
        "  latency to final event: p50 {:.0} ms, p99 {:.0} ms",
        percentile(&t.latencies_ms, 0.5),
        percentile(&t.latencies_ms, 0.99)
    );
    println!("  daemon RSS: {rss_start} kB at start, {rss_end} kB at end");
    assert_eq!(t.lost, 0, "requests without a final event");
    assert_eq!(
        t.duplicated, 0,
        "requests with two final events on the socket"
    );
    assert_eq!(
        answered + t.abandoned,
        t.sent,
        "every request accounted for"
    );
    assert!(
        rss_end - rss_start <= RSS_GROWTH_MAX_KB,
        "RSS grew from {rss_start} kB to {rss_end} kB"
    );
    assert!(restarts > 0 || seconds < restart_every.as_secs());
    // The mix really happened.
    for kind in [
        "done:length",
        "done:cancelled",
        "error:invalid_json",
        "error:busy",
        "error:payload_too_large",
    ] {
        assert!(t.finals.contains_key(kind), "no {kind} in {:?}", t.finals);
    }
}
