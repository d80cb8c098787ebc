//! `crystald serve --mqtt-url` against a real Mosquitto broker, started by
//! each test on a free loopback port with a generated configuration.
//! Clients are rumqttc (MQTT 5 and 3.1.1) and the stock mosquitto_pub and
//! mosquitto_sub. Every wait is bounded.

mod common;

use common::services::*;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn request_topic() -> String {
    format!("{PREFIX}/request")
}

fn greedy(id: Value, prompt: &str, max_tokens: u64) -> Value {
    json!({"id": id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

#[test]
fn v5_reply_goes_to_the_response_topic_with_the_correlation_data() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.url(), "", "");
    let c = Peer::v5(broker.port, "app-v5", &["app/replies"], false);
    let req = greedy(json!("a"), "Once upon a time", 6);
    c.publish_with(
        &request_topic(),
        req.to_string().into_bytes(),
        Some(("app/replies", b"corr-\x00\xff")),
        false,
    );
    let (tokens, done) = c.finish();
    assert!(tokens.is_empty());
    assert_eq!(done.topic, "app/replies");
    assert_eq!(done.correlation.as_deref(), Some(&b"corr-\x00\xff"[..]));
    assert_eq!(done.body["event"], "done", "{:?}", done.body);
    assert_eq!(done.body["id"], "a");
    assert_eq!(done.body["usage"]["completion_tokens"], 6);
    // The same request over the Unix socket gets the same reply.
    let unix = d.ask_socket(&req);
    assert_eq!(unix["text"], done.body["text"]);
}

#[test]
fn v311_reply_goes_to_reply_to_or_the_default_topic() {
    let broker = Broker::start();
    let _d = Daemon::start(&broker.url(), "protocol = \"3.1.1\"", "");
    let c = Peer::v4(
        broker.port,
        "app-v4",
        &["legacy/answers", &format!("{PREFIX}/response/+")],
    );
    let mut req = greedy(json!(1), "Hello", 4);
    req["reply_to"] = json!("legacy/answers");
    c.publish(&request_topic(), req.to_string());
    let (_, done) = c.finish();
    assert_eq!(done.topic, "legacy/answers");
    assert_eq!(
        (&done.body["event"], &done.body["id"]),
        (&json!("done"), &json!(1))
    );
    c.publish(
        &request_topic(),
        greedy(json!("b-2"), "Hello", 4).to_string(),
    );
    let (_, done) = c.finish();
    assert_eq!(done.topic, format!("{PREFIX}/response/b-2"));
    assert_eq!(done.body["event"], "done");
}

#[test]
fn streamed_tokens_arrive_in_order_before_done() {
    let broker = Broker::start();
    let _d = Daemon::start(&broker.url(), "", "");
    let c = Peer::v5(broker.port, "streamer", &["app/stream"], false);
    let mut req = greedy(json!("s"), "The", 40);
    req["stream"] = json!(true);
    req["reply_to"] = json!("app/stream");
    c.publish(&request_topic(), req.to_string());
    let (tokens, done) = c.finish();
    assert_eq!(done.body["event"], "done");
    let n = done.body["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert!(
        n > 0 && tokens.len() <= n,
        "{} tokens for {n}",
        tokens.len()
    );
    for (i, t) in tokens.iter().enumerate() {
        assert_eq!(t["index"], i, "out of order: {tokens:?}");
        assert_eq!(t["id"], "s");
    }
    let text: String = tokens.iter().map(|t| t["text"].as_str().unwrap()).collect();
    assert_eq!(text, done.body["text"].as_str().unwrap());
}

#[test]
fn concurrent_clients_get_their_own_answers_once() {
    let broker = Broker::start();
    let _d = Daemon::start(&broker.url(), "", "queue_size = 16");
    let handles: Vec<_> = (0..3)
        .map(|k| {
            let port = broker.port;
            std::thread::spawn(move || {
                let topic = format!("client{k}/inbox");
                let c = Peer::v5(port, &format!("client{k}"), &[&topic], false);
                for j in 0..3 {
                    let mut req = greedy(json!(format!("{k}-{j}")), "Say", 5);
                    req["reply_to"] = json!(topic);
                    req["stream"] = json!(j == 1);
                    c.publish(&request_topic(), req.to_string());
                }
                let mut got = BTreeSet::new();
                while got.len() < 3 {
                    let (_, fin) = c.finish();
                    assert_eq!(fin.topic, topic);
                    assert_eq!(fin.body["event"], "done", "{:?}", fin.body);
                    let id = fin.body["id"].as_str().unwrap().to_string();
                    assert!(id.starts_with(&format!("{k}-")), "crosstalk: {id}");
                    assert!(got.insert(id.clone()), "{id} answered twice");
                }
                c.quiet_for(Duration::from_millis(500));
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn a_redelivered_request_is_answered_once() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.url(), "", "");
    let c = Peer::v5(broker.port, "dup", &["dup/inbox"], false);
    let mut req = greedy(json!("same"), "Hi", 3);
    req["reply_to"] = json!("dup/inbox");
    c.publish(&request_topic(), req.to_string());
    c.publish(&request_topic(), req.to_string());
    let (_, done) = c.finish();
    assert_eq!(done.body["event"], "done");
    c.publish(&request_topic(), req.to_string());
    c.quiet_for(Duration::from_secs(1));
    d.wait_log("delivered again");
    // A new id is a new request.
    req["id"] = json!("other");
    c.publish(&request_topic(), req.to_string());
    assert_eq!(c.finish().1.body["id"], "other");
}

#[test]
fn mosquitto_pub_and_sub_exchange() {
    let broker = Broker::start();
    let _d = Daemon::start(&broker.url(), "", "");
    let port = broker.port.to_string();
    let mut sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
            "-C",
            "1",
            "-W",
            "60",
        ])
        .args(["-t", &format!("{PREFIX}/response/+")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    // mosquitto_sub gives no sign when it has subscribed: publish until it
    // has an answer, each time with a new id.
    let mut sent = 0;
    let (tx, rx) = mpsc::channel();
    let stdout = sub.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let _ = tx.send(line);
    });
    let line = loop {
        sent += 1;
        assert!(sent < 30, "no answer through mosquitto_sub");
        let msg = format!(r#"{{"id": "cli-{sent}", "prompt": "Hi", "max_tokens": 3}}"#);
        run(Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-q", "1"])
            .args(["-t", &request_topic(), "-m", &msg]));
        if let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
            break line;
        }
    };
    assert!(sub.wait().unwrap().success(), "mosquitto_sub failed");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["event"], "done", "{line}");
    assert!(v["id"].as_str().unwrap().starts_with("cli-"));
}

fn status(port: u16) -> Value {
    let c = Peer::v5(port, "watcher", &[&format!("{PREFIX}/status")], false);
    let g = c.recv();
    assert!(g.retain, "the status is retained");
    g.body
}

#[test]
fn status_is_retained_online_then_offline_on_stop() {
    let broker = Broker::start();
    let mut d = Daemon::start(&broker.url(), "", "");
    let s = status(broker.port);
    assert_eq!(s["state"], "online", "{s}");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["model"].is_string() && s["queue_depth"] == 0, "{s}");
    signal(&d.child, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.wait_exit(), 0, "{}", d.log());
    let s = status(broker.port);
    assert_eq!(
        (&s["state"], &s["reason"]),
        (&json!("offline"), &json!("stopped"))
    );
}

#[test]
fn last_will_marks_the_daemon_offline_when_killed_and_a_restart_corrects_it() {
    let broker = Broker::start();
    let mut d = Daemon::start(&broker.url(), "", "");
    assert_eq!(status(broker.port)["state"], "online");
    signal(&d.child, nix::sys::signal::Signal::SIGKILL);
    d.wait_exit();
    let until = Instant::now() + WAIT;
    loop {
        let s = status(broker.port);
        if s["state"] == "offline" {
            assert_eq!(s["reason"], "connection lost");
            break;
        }
        assert!(Instant::now() < until, "status stayed {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A restarted daemon corrects the retained status.
    let _d = Daemon::start(&broker.url(), "", "");
    let until = Instant::now() + WAIT;
    while status(broker.port)["state"] != "online" {
        assert!(Instant::now() < until, "status not corrected after restart");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_broker_restart_during_a_stream_loses_nothing() {
    let mut broker = Broker::start();
    let d = Daemon::start(&broker.url(), "", "");
    let c = Peer::v5(broker.port, "patient", &["app/long"], true);
    let mut req = greedy(json!("long"), "Tell me", 400);
    req["stream"] = json!(true);
    req["reply_to"] = json!("app/long");
    c.publish(&request_topic(), req.to_string());
    let first = c.recv();
    assert_eq!(first.body["event"], "token", "{:?}", first.body);
    broker.stop();
    std::thread::sleep(Duration::from_millis(500));
    broker.launch();
    // What the README promises: the daemon reconnects, the reply finishes,
    // every token event arrives at least once and in order of first arrival.
    let mut tokens = vec![first.body];
    let (more, done) = c.finish();
    tokens.extend(more);
    assert_eq!(done.body["event"], "done", "{:?}", done.body);
    let n = done.body["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    let mut text: Vec<Option<String>> = vec![None; n];
    let mut next = 0;
    for t in &tokens {
        let i = t["index"].as_u64().unwrap() as usize;
        let piece = t["text"].as_str().unwrap().to_string();
        match &text[i] {
            Some(p) => assert_eq!(p, &piece, "a duplicate differs"),
            None => {
                assert_eq!(i, next, "token {i} arrived before {next}");
                text[i] = Some(piece);
                next += 1;
            }
        }
    }
    let joined: String = text.iter().map_while(|p| p.clone()).collect();
    assert_eq!(joined, done.body["text"].as_str().unwrap());
    d.wait_log("mqtt: reconnected");
}

#[test]
fn tls_with_a_password_works_and_bad_credentials_or_certificates_are_clear_errors() {
    let (broker, pki) = Broker::start_tls();
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let dir = broker.dir.path();
    std::fs::write(dir.join("pw-good"), "s3cret\n").unwrap();
    std::fs::write(dir.join("pw-bad"), "guess\n").unwrap();
    let settings = |pw: &str, ca: &Path, attempts: u32| {
        format!(
            "username = \"crystal\"\npassword_file = \"{}\"\nca_file = \"{}\"\n\
             connect_attempts = {attempts}\nreconnect_max_s = 1\n",
            dir.join(pw).display(),
            ca.display()
        )
    };
    {
        let d = Daemon::start(&url, &settings("pw-good", &pki.ca, 0), "");
        // A client through the same TLS listener, by mosquitto's own tools.
        let out = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
            .args(["-u", "crystal", "-P", "s3cret", "--cafile"])
            .arg(&pki.ca)
            .args(["-t", &format!("{PREFIX}/status"), "-C", "1", "-W", "30"])
            .output()
            .unwrap();
        let s: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert_eq!(
            s["state"],
            "online",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!d.log().contains("s3cret"), "the password is logged");
    }
    // A wrong password: a clear error, and with connect_attempts the daemon
    // gives up with a failure status instead of retrying forever.
    let mut d = Daemon::spawn(&url, &settings("pw-bad", &pki.ca, 2), "");
    assert_ne!(d.wait_exit(), 0);
    let log = d.log();
    assert!(
        log.contains("not authorized") || log.contains("bad user name or password"),
        "{log}"
    );
    assert!(log.contains("giving up after 2"), "{log}");
    // A server certificate from a CA we do not trust.
    let (other_ca, _) = make_ca(dir, "other-ca");
    let mut d = Daemon::spawn(&url, &settings("pw-good", &other_ca, 2), "");
    assert_ne!(d.wait_exit(), 0);
    let log = d.log();
    assert!(log.contains("TLS"), "{log}");
    assert!(log.to_lowercase().contains("certificate"), "{log}");
    // By default the daemon keeps retrying and keeps serving the socket.
    let d = Daemon::spawn(&url, &settings("pw-bad", &pki.ca, 0), "");
    d.wait_log("cannot connect");
    d.wait_log("ready: serving");
    let reply = d.ask_socket(&json!({"op": "health", "id": 1}));
    assert_eq!(reply["event"], "health");
}

#[test]
fn bad_messages_get_errors_on_the_right_topic_and_the_daemon_keeps_serving() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.url(), "", "max_line_bytes = 2048");
    let err_topic = format!("{PREFIX}/error");
    let c = Peer::v5(
        broker.port,
        "hostile",
        &[
            err_topic.as_str(),
            "bad/replies",
            &format!("{PREFIX}/response/+"),
        ],
        false,
    );
    let rt = request_topic();
    let expect = |topic: &str, code: &str| -> Got {
        let g = c.recv();
        assert_eq!(g.topic, topic, "{:?}", g.body);
        assert_eq!(g.body["event"], "error", "{:?}", g.body);
        assert_eq!(g.body["code"], code, "{:?}", g.body);
        g
    };
    // Not JSON: to the MQTT 5 response topic when there is one, else the error topic.
    c.publish_with(&rt, b"{nope".to_vec(), Some(("bad/replies", b"k1")), false);
    let g = expect("bad/replies", "invalid_json");
    assert_eq!(g.correlation.as_deref(), Some(&b"k1"[..]));
    c.publish(&rt, "{nope");
    expect(&err_topic, "invalid_json");
    c.publish(&rt, b"\xff\xfe{}".to_vec());
    expect(&err_topic, "invalid_utf8");
    c.publish(&rt, "[1, 2]");
    expect(&err_topic, "invalid_json");
    // Over the size limit.
    let big = json!({"id": "big", "prompt": "x".repeat(4000), "reply_to": "bad/replies"});
    c.publish(&rt, big.to_string());
    expect(&err_topic, "payload_too_large");
    // No id: the error goes to reply_to when given, else to the error topic.
    c.publish(&rt, r#"{"prompt": "hi", "reply_to": "bad/replies"}"#);
    let g = expect("bad/replies", "invalid_request");
    assert!(
        g.body["message"].as_str().unwrap().contains("id"),
        "{:?}",
        g.body
    );
    c.publish(&rt, r#"{"prompt": "hi"}"#);
    expect(&err_topic, "invalid_request");
    // reply_to that cannot be published to.
    for bad in [json!("a/+/b"), json!("x/#"), json!(""), json!(7)] {
        let req = json!({"id": "r", "prompt": "hi", "reply_to": bad});
        c.publish(&rt, req.to_string());
        let g = expect(&err_topic, "invalid_request");
        assert_eq!(g.body["id"], "r");
        assert!(
            g.body["message"].as_str().unwrap().contains("reply_to"),
            "{:?}",
            g.body
        );
    }
    // An id that cannot be a topic level and no reply_to.
    c.publish(&rt, r#"{"id": "a/b", "prompt": "hi"}"#);
    expect(&err_topic, "invalid_request");
    // An invalid field still answers on the request's own topic.
    c.publish(&rt, r#"{"id": "t", "prompt": "hi", "temperature": "hot"}"#);
    expect(&format!("{PREFIX}/response/t"), "invalid_request");
    // A flood beyond the queue: every request gets exactly one final event.
    let ids: Vec<String> = (0..12).map(|i| format!("f{i}")).collect();
    for id in &ids {
        c.publish(&rt, greedy(json!(id), "Go", 200).to_string());
    }
    let mut finals: HashMap<String, String> = HashMap::new();
    while finals.len() < ids.len() {
        let g = c.recv();
        let id = g.body["id"].as_str().unwrap_or_default().to_string();
        let ev = g.body["event"].as_str().unwrap().to_string();
        assert!(ids.contains(&id), "{:?}", g.body);
        if ev != "token" {
            let code = g.body["code"].as_str().unwrap_or(&ev).to_string();
            assert!(finals.insert(id, code).is_none(), "two final events");
        }
    }
    let busy = finals.values().filter(|c| *c == "busy").count();
    assert!(
        busy > 0 && finals.values().any(|c| c == "done"),
        "{finals:?}"
    );
    c.quiet_for(Duration::from_millis(500));
    // Still serving.
    d.ask_socket(&json!({"op": "health", "id": 1}));
    c.publish(&rt, greedy(json!("after"), "Hi", 2).to_string());
    assert_eq!(c.finish().1.body["event"], "done");
}

#[test]
fn a_retained_request_from_before_the_daemon_is_reported_and_cleared_not_answered() {
    let broker = Broker::start();
    let c = Peer::v5(
        broker.port,
        "oldtimer",
        &[&format!("{PREFIX}/error"), &format!("{PREFIX}/response/+")],
        false,
    );
    c.publish_with(
        &request_topic(),
        greedy(json!("ancient"), "Hi", 2).to_string().into_bytes(),
        None,
        true,
    );
    std::thread::sleep(Duration::from_millis(300));
    // The live copy is delivered to the subscriber above only if it
    // subscribed to the request topic, which it did not.
    let _d = Daemon::start(&broker.url(), "", "");
    let g = c.recv();
    assert_eq!(g.topic, format!("{PREFIX}/error"));
    assert_eq!(
        (&g.body["code"], &g.body["id"]),
        (&json!("stale_request"), &json!("ancient"))
    );
    c.quiet_for(Duration::from_secs(1));
    // The broker no longer holds it.
    let probe = Peer::v5(broker.port, "probe", &[&request_topic()], false);
    if let Ok(g) = probe.rx.recv_timeout(Duration::from_secs(1)) {
        assert!(g.raw.is_empty(), "still retained: {:?}", g.body);
    }
}

/// The daemon's peak resident memory (VmHWM), in bytes.
fn peak_rss(d: &Daemon) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.child.id())).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kb * 1024
}

/// Publishes `size` bytes with mosquitto_pub as an MQTT 3.1.1 client at
/// QoS 1; returns whether the broker took it.
fn publish_big(port: u16, topic: &str, size: usize, retain: bool) -> bool {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv311"])
        .args(["-q", "1", "-t", topic, "-s"]);
    if retain {
        cmd.arg("-r");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_pub");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..size / chunk.len() {
            stdin.write_all(&chunk).unwrap();
        }
    }
    child.wait().unwrap().success()
}

const BIG: usize = 64 << 20;

#[test]
fn v311_a_message_far_over_the_limit_is_dropped_unread_with_no_redelivery_loop() {
    let broker = Broker::start();
    let d = Daemon::start(
        &broker.url(),
        "protocol = \"3.1.1\"",
        "max_line_bytes = 4096",
    );
    // No broker limit stated: the start-up warning says what to set.
    let log = d.log();
    assert!(
        log.contains("MQTT 3.1.1 cannot tell the broker") && log.contains("max_packet_size"),
        "{log}"
    );
    let err_topic = format!("{PREFIX}/error");
    let c = Peer::v4(
        broker.port,
        "bystander",
        &[&err_topic, &format!("{PREFIX}/response/+")],
    );
    let before = peak_rss(&d);
    // Retained, so that it would also come back with every subscription.
    assert!(publish_big(broker.port, &request_topic(), BIG, true));
    let log = d.wait_log("dropped a message of");
    // The size announced in the packet's header: payload, topic, packet id.
    let announced = BIG + 2 + request_topic().len() + 2;
    assert!(log.contains(&format!("of {announced} bytes")), "{log}");
    let g = c.recv();
    assert_eq!(g.topic, err_topic, "{:?}", g.body);
    assert_eq!(g.body["code"], "payload_too_large", "{:?}", g.body);
    let grown = peak_rss(&d).saturating_sub(before);
    assert!(
        grown < (BIG / 4) as u64,
        "the daemon's peak RSS grew by {grown} bytes for a {BIG}-byte message"
    );
    // Reconnected once, then serving MQTT and the socket as before; the
    // message is neither redelivered nor still retained.
    d.wait_log("mqtt: reconnected");
    c.publish(
        &request_topic(),
        greedy(json!("after"), "Hi", 2).to_string(),
    );
    let (_, done) = c.finish();
    assert_eq!(done.body["event"], "done", "{:?}", done.body);
    assert_eq!(
        d.ask_socket(&json!({"op": "health", "id": 1}))["event"],
        "health"
    );
    std::thread::sleep(Duration::from_secs(2));
    let log = d.log();
    assert_eq!(log.matches("dropped a message of").count(), 1, "{log}");
    let probe = Peer::v4(broker.port, "probe", &[&request_topic()]);
    if let Ok(g) = probe.rx.recv_timeout(Duration::from_secs(1)) {
        assert!(g.raw.is_empty(), "still retained: {} bytes", g.raw.len());
    }
}

#[test]
fn v311_with_the_limit_at_the_broker_the_daemon_never_sees_a_big_message() {
    // The README's Mosquitto example: the broker refuses the packet and
    // disconnects its publisher.
    let broker = Broker::with_listener(|_, port| {
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_packet_size 70000\n")
    });
    let d = Daemon::start(
        &broker.url(),
        "protocol = \"3.1.1\"\nbroker_max_packet_size = 70000",
        "max_line_bytes = 4096",
    );
    assert!(!d.log().contains("cannot tell the broker"), "{}", d.log());
    let c = Peer::v4(broker.port, "app", &[&format!("{PREFIX}/response/+")]);
    let before = peak_rss(&d);
    assert!(
        !publish_big(broker.port, &request_topic(), BIG, false),
        "the broker accepted a message over its max_packet_size"
    );
    c.publish(&request_topic(), greedy(json!("next"), "Hi", 2).to_string());
    let (_, done) = c.finish();
    assert_eq!(done.body["event"], "done", "{:?}", done.body);
    let log = d.log();
    assert!(
        !log.contains("connection lost") && !log.contains("dropped a message"),
        "{log}"
    );
    assert!(peak_rss(&d).saturating_sub(before) < (BIG / 4) as u64);
}

// ----- fleets: shared subscriptions -----------------------------------------

/// A broker for fleets: also holds 3.1.1 members to the daemon's
/// `queue_size`, as the README advises, since 3.1.1 cannot state a Receive
/// Maximum.
fn fleet_broker() -> Broker {
    Broker::with_listener(|_, port| {
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 24\n")
    })
}

/// Room for every request a member gets in these tests, so that none is
/// refused as `busy` (Mosquitto 2.0.11 holds to the Receive Maximum only
/// for the first window; see the README).
const FLEET_QUEUE: &str = "queue_size = 24";

/// A member of group `fleet` (joined with the flag) serving
/// [`PREFIX`]`/request`; not waited for.
fn fleet_member_with(url: &str, client_id: &str, protocol: &str, queue: &str) -> Daemon {
    Daemon::spawn_config(
        &format!(
            "{queue}\n[mqtt]\nprefix = \"{PREFIX}\"\nclient_id = \"{client_id}\"\n\
             protocol = \"{protocol}\"\nstatus_interval_s = 1\n"
        ),
        &["--mqtt-url", url, "--mqtt-share-group", "fleet"],
    )
}

fn fleet_member(url: &str, client_id: &str, protocol: &str) -> Daemon {
    fleet_member_with(url, client_id, protocol, FLEET_QUEUE)
}

/// Ids a daemon accepted from MQTT, from its debug log.
fn taken(d: &Daemon) -> BTreeSet<String> {
    d.log()
        .lines()
        .filter_map(|l| {
            let rest = l.split("mqtt: request \"").nth(1)?;
            let (id, tail) = rest.split_once('"')?;
            (tail.trim() == "queued").then(|| id.to_string())
        })
        .collect()
}

/// Publishes a request of id `id` from `c`. MQTT 5 clients name a response
/// topic too, but a 3.1.1 member never sees it, so every request carries
/// `reply_to` (the README's advice for mixed fleets).
fn ask_fleet(c: &Peer, id: &str, inbox: &str, max_tokens: u64) {
    let mut req = greedy(json!(id), "Once upon a time", max_tokens);
    req["reply_to"] = json!(inbox);
    match c.handle {
        Handle::V5(_) => c.publish_with(
            &request_topic(),
            req.to_string().into_bytes(),
            Some((inbox, id.as_bytes())),
            false,
        ),
        Handle::V4(_) => c.publish(&request_topic(), req.to_string()),
    }
}

/// Final events by id until `want` ids are answered or nothing arrives for
/// `quiet`; a second final event for an id fails the test.
fn collect_finals(
    clients: &[&Peer],
    want: usize,
    quiet: Duration,
    finals: &mut HashMap<String, Value>,
) {
    let mut last = Instant::now();
    while finals.len() < want && last.elapsed() < quiet {
        for c in clients {
            while let Ok(g) = c.rx.try_recv() {
                if g.body["event"] == "token" {
                    continue;
                }
                let id = g.body["id"].as_str().unwrap().to_string();
                if let Some(v5_corr) = &g.correlation {
                    assert_eq!(v5_corr, id.as_bytes(), "correlation data of {id}");
                }
                assert!(
                    finals.insert(id.clone(), g.body.clone()).is_none(),
                    "{id} answered twice: {:?}",
                    g.body
                );
                last = Instant::now();
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The retained status of each member that has one, by topic.
fn fleet_statuses(port: u16, want: usize) -> HashMap<String, Value> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let w = Peer::v5(
        port,
        &format!("fleet-watcher-{n}"),
        &[&format!("{PREFIX}/status/+")],
        false,
    );
    let mut got = HashMap::new();
    while got.len() < want {
        let g = w.recv();
        assert!(g.retain, "{:?}", g.body);
        got.insert(g.topic, g.body);
    }
    got
}

#[test]
fn a_fleet_answers_each_request_once_and_every_member_takes_some() {
    let broker = fleet_broker();
    let url = broker.url();
    let members = [
        fleet_member(&url, "m5-a", "5"),
        fleet_member(&url, "m5-b", "5"),
        fleet_member(&url, "m311", "3.1.1"),
    ];
    for m in &members {
        let log = m.wait_log("mqtt: connected");
        assert!(log.contains("$share/fleet/crystal/test/request"), "{log}");
    }
    // One status topic per member, none overwriting another.
    let st = fleet_statuses(broker.port, 3);
    for id in ["m5-a", "m5-b", "m311"] {
        let s = &st[&format!("{PREFIX}/status/{id}")];
        assert_eq!(s["state"], "online", "{s}");
    }
    let v5 = Peer::v5(broker.port, "fleet-app-5", &["app5/in"], false);
    let v4 = Peer::v4(broker.port, "fleet-app-4", &["app4/in"]);
    let ids: Vec<String> = (0..60).map(|i| format!("r{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        if i.is_multiple_of(2) {
            ask_fleet(&v5, id, "app5/in", 8);
        } else {
            ask_fleet(&v4, id, "app4/in", 8);
        }
    }
    let mut finals = HashMap::new();
    collect_finals(&[&v5, &v4], ids.len(), WAIT, &mut finals);
    // Duplicates would come late, if at all.
    collect_finals(
        &[&v5, &v4],
        ids.len() + 1,
        Duration::from_secs(1),
        &mut finals,
    );
    assert_eq!(finals.len(), ids.len(), "unanswered: {finals:?}");
    for (id, f) in &finals {
        // Flow control: nobody was sent more than it can hold, so no `busy`.
        assert_eq!(f["event"], "done", "{id}: {f}");
    }
    // Each request was taken by exactly one member, and each took some.
    let sets: Vec<BTreeSet<String>> = members.iter().map(taken).collect();
    let mut all = BTreeSet::new();
    for (m, s) in members.iter().zip(&sets) {
        assert!(!s.is_empty(), "a member answered nothing: {}", m.log());
        for id in s {
            assert!(all.insert(id.clone()), "{id} taken twice");
        }
    }
    assert_eq!(all, ids.iter().cloned().collect::<BTreeSet<_>>());
    println!(
        "taken: {:?}",
        sets.iter().map(|s| s.len()).collect::<Vec<_>>()
    );
}

#[test]
fn a_killed_fleet_member_loses_the_requests_it_held_and_the_others_serve_on() {
    let broker = fleet_broker();
    let url = broker.url();
    let mut members = [
        fleet_member(&url, "victim", "5"),
        fleet_member(&url, "keeper-5", "5"),
        fleet_member(&url, "keeper-311", "3.1.1"),
    ];
    for m in &members {
        m.wait_log("mqtt: connected");
    }
    let v5 = Peer::v5(broker.port, "kill-app-5", &["k5/in"], false);
    let v4 = Peer::v4(broker.port, "kill-app-4", &["k4/in"]);
    let ask = |id: &str, i: usize, max_tokens| {
        if i.is_multiple_of(2) {
            ask_fleet(&v5, id, "k5/in", max_tokens)
        } else {
            ask_fleet(&v4, id, "k4/in", max_tokens)
        }
    };
    // Wave 1: longer requests, so the victim holds some when it dies.
    let wave1: Vec<String> = (0..30).map(|i| format!("w1-{i}")).collect();
    for (i, id) in wave1.iter().enumerate() {
        ask(id, i, 96);
    }
    let until = Instant::now() + WAIT;
    while taken(&members[0]).len() < 3 {
        assert!(Instant::now() < until, "{}", members[0].log());
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(&members[0].child, nix::sys::signal::Signal::SIGKILL);
    members[0].wait_exit();
    let held = taken(&members[0]);
    // The broker saw the connection close: the Last Will marks the member
    // offline on its own status topic, and its session (with its
    // subscription) is gone.
    let until = Instant::now() + WAIT;
    loop {
        let s = &fleet_statuses(broker.port, 3)[&format!("{PREFIX}/status/victim")];
        if s["state"] == "offline" {
            assert_eq!(s["reason"], "connection lost");
            break;
        }
        assert!(Instant::now() < until, "status stayed {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Wave 2, after the broker noticed: every request goes to the others.
    let wave2: Vec<String> = (0..30).map(|i| format!("w2-{i}")).collect();
    for (i, id) in wave2.iter().enumerate() {
        ask(id, i, 8);
    }
    let mut finals = HashMap::new();
    collect_finals(&[&v5, &v4], 60, Duration::from_secs(5), &mut finals);
    let survivors: BTreeSet<String> = members[1..].iter().flat_map(taken).collect();
    for id in &wave2 {
        assert_eq!(finals[id]["event"], "done", "{id}: {:?}", finals.get(id));
        assert!(survivors.contains(id), "{id} not served by a survivor");
    }
    // What the victim held, or the broker held for it, got nothing: no
    // reply, no error, and no other member saw it.
    let lost: Vec<&String> = wave1
        .iter()
        .filter(|id| !finals.contains_key(*id))
        .collect();
    assert!(!lost.is_empty(), "the victim held nothing when killed");
    for id in &lost {
        assert!(!survivors.contains(*id), "{id} was taken by a survivor");
    }
    // Lost: those it had accepted and not answered, and those the broker
    // had queued for it (never accepted).
    let lost_held = lost.iter().filter(|id| held.contains(**id)).count();
    println!(
        "victim accepted {} before dying; lost {} of wave 1 ({lost_held} accepted by it, \
         {} not yet accepted by it): {lost:?}",
        held.len(),
        lost.len(),
        lost.len() - lost_held
    );
    // The client's remedy: after its timeout, publish again (the same id
    // is fine: no survivor has seen it). Each is answered once.
    let again: Vec<String> = lost.iter().map(|s| s.to_string()).collect();
    for (i, id) in again.iter().enumerate() {
        ask(id, i, 8);
    }
    collect_finals(&[&v5, &v4], 60, WAIT, &mut finals);
    collect_finals(&[&v5, &v4], 61, Duration::from_secs(1), &mut finals);
    assert_eq!(finals.len(), 60);
    assert!(finals.values().all(|f| f["event"] == "done"), "{finals:?}");
}

#[test]
fn a_fleet_member_is_sent_no_more_requests_than_it_can_hold() {
    let broker = fleet_broker();
    // A Receive Maximum of 2.
    let d = fleet_member_with(&broker.url(), "small", "5", "queue_size = 2");
    let log = d.wait_log("mqtt: connected");
    assert!(log.contains("(at most 2 unacknowledged)"), "{log}");
    let c = Peer::v5(broker.port, "eager", &["eager/in"], false);
    let ids: Vec<String> = (0..4).map(|i| format!("e{i}")).collect();
    for id in &ids {
        ask_fleet(&c, id, "eager/in", 300);
    }
    // Until the first reply, the broker holds the rest: the member has
    // taken two and refused none.
    let mut finals = HashMap::new();
    let mut full = false;
    let until = Instant::now() + WAIT;
    while finals.is_empty() {
        let n = taken(&d).len();
        // A third request can only follow an acknowledgement, which
        // follows a reply; give that reply time to reach the client.
        collect_finals(&[&c], 1, Duration::from_millis(200), &mut finals);
        if finals.is_empty() {
            assert!(n <= 2, "sent {n} before any was done: {}", d.log());
            full |= n == 2;
        }
        assert!(Instant::now() < until);
    }
    assert!(
        full,
        "the first reply came before the window filled: {finals:?} {}",
        d.log()
    );
    assert!(!d.log().contains("refused"), "{}", d.log());
    // Then every request is answered once: `done`, or `busy` where
    // Mosquitto 2.0.11 sent more than the window after an acknowledgement.
    collect_finals(&[&c], ids.len(), WAIT, &mut finals);
    collect_finals(
        &[&c],
        ids.len() + 1,
        Duration::from_millis(500),
        &mut finals,
    );
    assert_eq!(finals.len(), ids.len(), "{finals:?}");
    for f in finals.values() {
        assert!(f["event"] == "done" || f["code"] == "busy", "{f}");
    }
}
