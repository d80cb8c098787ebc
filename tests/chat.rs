//! `crystald chat` as a person (through a pseudo-terminal) and a script (a
//! pipe) use it, against a real daemon on a converted fixture and directly
//! on the model file. The fixture has random weights, so replies are
//! gibberish, but with temperature 0 they are deterministic. Every wait is
//! bounded, so a hang fails the test instead of stalling CI.

mod common;

use common::services::Daemon;
use common::*;
use rexpect::process::wait::WaitStatus;
use rexpect::session::{spawn_with_options, Options, PtySession};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);
const PROMPT: &str = ">>> ";

fn model() -> PathBuf {
    converted("tiny-a", "q4_0")
}

/// A daemon on the fixture with room for long replies.
fn start_daemon() -> Daemon {
    Daemon::serving("", &["--ctx", "512"])
}

/// `(prompt tokens, cached tokens)` of every finished request, in order.
fn requests(d: &Daemon) -> Vec<(u64, u64)> {
    d.log()
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("request done: ")? + "request done: ".len()..];
            let mut words = rest
                .split(|c: char| !c.is_ascii_digit())
                .filter(|w| !w.is_empty());
            Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
        })
        .collect()
}

/// `crystald chat` in a pseudo-terminal, greedy.
fn chat_in_pty(args: &[&str]) -> PtySession {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crystald"));
    cmd.arg("chat")
        .args(["--temperature", "0"])
        .args(args)
        .env("TERM", "xterm")
        .env_remove("CRYSTALD_SOCKET");
    let mut p = spawn_with_options(
        cmd,
        Options {
            timeout_ms: Some(WAIT.as_millis() as u64),
            strip_ansi_escape_codes: true,
        },
    )
    .expect("spawn crystald chat in a pty");
    p.exp_string(PROMPT).expect("first prompt");
    p
}

/// Sends a line and waits for the next prompt; returns what came before it.
fn say(p: &mut PtySession, line: &str) -> String {
    p.send_line(line).unwrap();
    p.exp_string(PROMPT)
        .unwrap_or_else(|e| panic!("no prompt after {line:?}: {e}"))
}

fn save(p: &mut PtySession, path: &Path) -> Vec<(String, String)> {
    let out = say(p, &format!("/save {}", path.display()));
    assert!(out.contains("saved to"), "{out}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|m| {
            assert_eq!(m.as_object().unwrap().len(), 2, "{m}");
            (
                m["role"].as_str().unwrap().to_string(),
                m["content"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn roles(messages: &[(String, String)]) -> Vec<&str> {
    messages.iter().map(|(r, _)| r.as_str()).collect()
}

fn exits_with(p: &mut PtySession, code: i32) {
    p.exp_eof().expect("the chat ends");
    let until = Instant::now() + WAIT;
    loop {
        match p.process.status() {
            Some(WaitStatus::Exited(_, c)) => {
                assert_eq!(c, code);
                return;
            }
            Some(WaitStatus::StillAlive) | None => {}
            Some(other) => panic!("chat ended with {other:?}"),
        }
        assert!(Instant::now() < until, "chat did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_conversation_keeps_its_turns_until_reset() {
    let d = start_daemon();
    let dir = temp_dir();
    let history = dir.path().join("state/history");
    let socket = d.socket();
    let socket = socket.to_str().unwrap();
    let mut p = chat_in_pty(&[
        "--socket",
        socket,
        "--max-tokens",
        "8",
        "--history",
        history.to_str().unwrap(),
    ]);

    // Greedy on this fixture, both get a non-empty reply.
    say(&mut p, "What is a Raspberry Pi?");
    say(&mut p, "Why?");
    let saved = save(&mut p, &dir.path().join("two.json"));
    assert_eq!(
        roles(&saved),
        ["user", "assistant", "user", "assistant"],
        "{saved:?}"
    );
    assert_eq!(saved[0].1, "What is a Raspberry Pi?");
    assert_eq!(saved[2].1, "Why?");
    assert!(
        !saved[1].1.is_empty() && !saved[3].1.is_empty(),
        "{saved:?}"
    );
    // The second request carried the first turn: a longer prompt, whose
    // start the daemon's prefix cache already held.
    d.wait_log("finish");
    let until = Instant::now() + WAIT;
    let reqs = loop {
        let reqs = requests(&d);
        if reqs.len() >= 2 {
            break reqs;
        }
        assert!(Instant::now() < until, "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(reqs[1].0 > reqs[0].0 && reqs[1].1 > 0, "{reqs:?}");

    let out = say(&mut p, "/reset");
    assert!(out.contains("conversation reset"), "{out}");
    say(&mut p, "Fresh start");
    let saved = save(&mut p, &dir.path().join("reset.json"));
    assert_eq!(roles(&saved), ["user", "assistant"], "{saved:?}");
    assert_eq!(saved[0].1, "Fresh start");

    // A message over two lines, and a system prompt (which starts over).
    say(&mut p, "/system Be brief.");
    p.send_line("first line\\").unwrap();
    p.exp_string("... ").expect("continuation prompt");
    say(&mut p, "second line");
    let saved = save(&mut p, &dir.path().join("system.json"));
    assert_eq!(roles(&saved), ["system", "user", "assistant"], "{saved:?}");
    assert_eq!(saved[0].1, "Be brief.");
    assert_eq!(saved[1].1, "first line\nsecond line");

    let out = say(&mut p, "/bogus");
    assert!(out.contains("unknown command /bogus"), "{out}");
    let out = say(&mut p, "/help");
    assert!(out.contains("/reset"), "{out}");
    p.send_line("/exit").unwrap();
    exits_with(&mut p, 0);
    let lines = std::fs::read_to_string(&history).expect("history written");
    assert!(
        lines.contains("first line\\") && lines.contains("/bogus"),
        "{lines}"
    );
}

#[test]
fn ctrl_c_stops_a_reply_and_the_chat_goes_on() {
    let d = start_daemon();
    let dir = temp_dir();
    // Long enough to still be streaming when Ctrl-C arrives.
    let socket = d.socket();
    let socket = socket.to_str().unwrap();
    let mut p = chat_in_pty(&["--socket", socket, "--max-tokens", "480", "--no-history"]);
    interrupt_a_reply(&mut p);
    d.wait_log("finish cancelled");

    // The stopped turn is forgotten; the next one works.
    say(&mut p, "Short one");
    let saved = save(&mut p, &dir.path().join("after.json"));
    assert_eq!(roles(&saved), ["user", "assistant"], "{saved:?}");
    assert_eq!(saved[0].1, "Short one");

    // Ctrl-C at the prompt clears the line; a second one in a row leaves.
    p.send("half a line").unwrap();
    p.send_control('c').unwrap();
    p.exp_string("Ctrl-C again").unwrap();
    p.send_control('c').unwrap();
    exits_with(&mut p, 0);
}

#[test]
fn ctrl_c_stops_a_reply_in_direct_mode_too() {
    let dir = temp_dir();
    let model = model();
    let mut p = chat_in_pty(&[
        "--model",
        model.to_str().unwrap(),
        "--threads",
        "1",
        "--max-tokens",
        "480",
        "--no-history",
    ]);
    interrupt_a_reply(&mut p);
    say(&mut p, "Why?");
    let saved = save(&mut p, &dir.path().join("after.json"));
    assert_eq!(roles(&saved), ["user", "assistant"], "{saved:?}");
    // Ctrl-D leaves.
    p.send_control('d').unwrap();
    exits_with(&mut p, 0);
}

/// Asks for a long reply, presses Ctrl-C once it streams, and checks the
/// chat stopped it and is still there.
fn interrupt_a_reply(p: &mut PtySession) {
    p.send_line("Tell me a long story").unwrap();
    p.exp_string("Tell me a long story").unwrap();
    // The first piece of the reply: it is streaming now.
    let until = Instant::now() + WAIT;
    let mut seen = String::new();
    while seen.trim().is_empty() {
        match p.try_read() {
            Some(c) => seen.push(c),
            None => std::thread::sleep(Duration::from_millis(1)),
        }
        assert!(Instant::now() < until, "no reply streamed");
    }
    p.send_control('c').unwrap();
    let out = p.exp_string(PROMPT).expect("the prompt comes back");
    assert!(out.contains("stopped"), "{out}");
    assert_eq!(p.process.status(), Some(WaitStatus::StillAlive));
}

#[test]
fn scripted_direct_chat_answers_each_line() {
    let dir = temp_dir();
    let saved = dir.path().join("chat.json");
    // Greedy, "Hello there" gets an empty reply: still one line of stdout.
    let script = format!("Hello there\nWhy?\n/save {}\n", saved.display());
    let model = model();
    let out = scripted(
        &[
            "--model".as_ref(),
            model.as_os_str(),
            "--threads".as_ref(),
            "1".as_ref(),
            "--temperature".as_ref(),
            "0".as_ref(),
            "--max-tokens".as_ref(),
            "6".as_ref(),
        ],
        &script,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        !stdout.contains(PROMPT),
        "no prompt when scripted: {stdout:?}"
    );
    let v: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert_eq!(v.len(), 4, "{v:?}");
    // stdout is exactly the two replies, each ended by a newline.
    let replies: Vec<&str> = [&v[1], &v[3]]
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    let expected: String = replies
        .iter()
        .map(|r| {
            if r.ends_with('\n') {
                r.to_string()
            } else {
                format!("{r}\n")
            }
        })
        .collect();
    assert_eq!(stdout, expected);
}

#[test]
fn daemon_errors_are_printed_and_the_chat_goes_on() {
    let d = start_daemon();
    let dir = temp_dir();
    let saved = dir.path().join("chat.json");
    // More than the daemon's context: every turn is refused.
    let script = format!("Hi\nAgain\n/bogus\n/save {}\n", saved.display());
    let socket = d.socket();
    let out = scripted(
        &[
            "--socket".as_ref(),
            socket.as_os_str(),
            "--max-tokens".as_ref(),
            "100000".as_ref(),
        ],
        &script,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stderr.matches("invalid_request").count(), 2, "{stderr}");
    assert!(stderr.contains("unknown command /bogus"), "{stderr}");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "");
    // The refused turns are not part of the conversation.
    assert_eq!(std::fs::read_to_string(&saved).unwrap().trim(), "[]");
}

#[test]
fn bad_flags_in_direct_mode_are_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_crystald"))
        .arg("chat")
        .arg("--model")
        .arg(model())
        .args(["--threads", "1", "--temperature=-1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("temperature"));
}

#[test]
fn no_daemon_is_exit_69() {
    let dir = temp_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_crystald"))
        .arg("chat")
        .arg("--socket")
        .arg(dir.path().join("nobody.sock"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdin.take());
    let out = wait_output(child);
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

/// `wait_with_output` with a deadline: the child is killed if it hangs.
/// `crystald chat ARGS` with `script` on a pipe as its standard input.
fn scripted(args: &[&std::ffi::OsStr], script: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crystald"))
        .arg("chat")
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
        .write_all(script.as_bytes())
        .unwrap();
    wait_output(child)
}

fn wait_output(child: Child) -> std::process::Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("crystald chat did not exit within {WAIT:?}");
        }
    }
}
