//! `crystald ask`: one question to a running daemon, the answer streamed to
//! stdout. Exit codes follow sysexits(3) so scripts can tell "try again
//! later" from "fix the request".

use crystald::daemon::config::DEFAULT_SOCKET;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// The answer was printed in full (finish_reason stop, length or context).
pub const OK: i32 = 0;
/// Anything else: an internal daemon error, stdout not writable.
pub const FAILED: i32 = 1;
/// The question is empty (usage errors from the parser are 2 too).
pub const USAGE: i32 = 2;
/// The daemon refused the request as invalid (too long for the context...).
pub const DATAERR: i32 = 65;
/// No daemon is listening on the socket.
pub const UNAVAILABLE: i32 = 69;
/// Temporary: busy, shutting down, timed out, or cancelled mid-answer.
pub const TEMPFAIL: i32 = 75;
/// The connection broke or the daemon sent something unreadable.
pub const PROTOCOL: i32 = 76;
/// Not allowed to use the socket or the daemon.
pub const NOPERM: i32 = 77;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The daemon's socket.
    #[arg(long, env = "CRYSTALD_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(flatten)]
    reply: super::ReplyArgs,
    /// Give up after this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// The question; read from stdin when absent.
    question: Vec<String>,
}

fn fail(code: i32, msg: impl std::fmt::Display) -> i32 {
    eprintln!("crystald ask: {msg}");
    code
}

/// Exit code for an `error` event's code.
fn code_for(error: &str) -> i32 {
    match error {
        "busy" | "shutting_down" | "deadline_exceeded" => TEMPFAIL,
        "forbidden" => NOPERM,
        "internal" => FAILED,
        _ => DATAERR,
    }
}

pub fn run(a: Args) -> i32 {
    let question = if a.question.is_empty() {
        let mut s = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut s) {
            return fail(USAGE, format!("cannot read the question from stdin: {e}"));
        }
        s
    } else {
        a.question.join(" ")
    };
    let question = question.trim();
    if question.is_empty() {
        return fail(USAGE, "the question is empty");
    }
    let mut messages = Vec::new();
    if let Some(system) = &a.reply.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": question}));
    let mut req = json!({
        "id": format!("ask-{}", std::process::id()),
        "messages": messages,
        "stream": true,
    });
    a.reply.fill(&mut req);
    if let Some(t) = a.timeout {
        req["timeout_ms"] = Value::from((t * 1e3).max(1.0) as u64);
    }
    let shown = a.socket.display();
    let mut stream = match UnixStream::connect(&a.socket) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return fail(NOPERM, format!("no permission to connect to {shown}: {e}"))
        }
        Err(e) => {
            return fail(
                UNAVAILABLE,
                format!("cannot connect to {shown}: {e} (is crystald serve running?)"),
            )
        }
    };
    let mut line = req.to_string();
    line.push('\n');
    if let Err(e) = stream.write_all(line.as_bytes()) {
        return fail(PROTOCOL, format!("sending the question: {e}"));
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut ended_with_newline = true;
    for reply in BufReader::new(stream).lines() {
        let reply = match reply {
            Ok(r) => r,
            Err(e) => return fail(PROTOCOL, format!("reading the answer: {e}")),
        };
        let v: Value = match serde_json::from_str(&reply) {
            Ok(v) => v,
            Err(e) => return fail(PROTOCOL, format!("unreadable reply from the daemon: {e}")),
        };
        match v["event"].as_str() {
            Some("token") => {
                let text = v["text"].as_str().unwrap_or_default();
                if text.is_empty() {
                    continue;
                }
                ended_with_newline = text.ends_with('\n');
                let written = out.write_all(text.as_bytes()).and_then(|()| out.flush());
                match written {
                    Ok(()) => {}
                    // `| head` closing the pipe is the reader's choice, not a failure.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return OK,
                    Err(e) => return fail(FAILED, format!("writing the answer: {e}")),
                }
            }
            Some("done") => {
                if !ended_with_newline {
                    let _ = writeln!(out);
                }
                let _ = out.flush();
                return match v["finish_reason"].as_str() {
                    Some("cancelled") => fail(TEMPFAIL, "the daemon cancelled the answer"),
                    Some("length") => {
                        eprintln!("crystald ask: (stopped at max_tokens)");
                        OK
                    }
                    Some("context") => {
                        eprintln!("crystald ask: (stopped: the context is full)");
                        OK
                    }
                    _ => OK,
                };
            }
            Some("error") => {
                let code = v["code"].as_str().unwrap_or("internal");
                let msg = v["message"].as_str().unwrap_or("");
                return fail(code_for(code), format!("{code}: {msg}"));
            }
            _ => {}
        }
    }
    fail(
        PROTOCOL,
        "the daemon closed the connection before the answer was complete",
    )
}
