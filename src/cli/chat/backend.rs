//! Where replies come from: a running daemon over its socket, or a model
//! loaded in this process.

use super::interrupt;
use crystald::generate::{self, Flow, GenerateParams};
use crystald::model::{KvType, Model, Session};
use crystald::sampling::SamplingParams;
use crystald::tokenizer::{chat, Message, Tokenizer};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// How one turn ended.
pub enum Outcome {
    /// The final text and the finish reason (`stop`, `length`, `context`,
    /// `cancelled`).
    Reply { text: String, finish: String },
    /// No reply; the message says why.
    Failed(String),
}

use crate::cli::ReplyArgs;

pub trait Backend {
    /// Generates the assistant's reply to `messages` (ending with the
    /// user's turn), passing text to `sink` as it comes. A Ctrl-C
    /// ([`interrupt::count`]) or `sink` returning [`Flow::Cancel`] stops it.
    fn reply(&mut self, messages: &[Message], sink: &mut dyn FnMut(&str) -> Flow) -> Outcome;
}

// ---------------------------------------------------------------- daemon

/// How often a blocked read wakes up to look for a Ctrl-C.
const POLL: Duration = Duration::from_millis(50);

pub struct Daemon {
    socket: PathBuf,
    sampling: ReplyArgs,
    conn: Option<Conn>,
    next_id: u64,
}

struct Conn {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

/// Why the daemon could not be reached; `code` is the sysexits status
/// `crystald ask` would use.
pub struct ConnectError {
    pub code: i32,
    pub message: String,
}

fn connect(socket: &std::path::Path) -> Result<Conn, ConnectError> {
    use crate::cli::ask::{NOPERM, UNAVAILABLE};
    let shown = socket.display();
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        ErrorKind::PermissionDenied => ConnectError {
            code: NOPERM,
            message: format!("no permission to connect to {shown}: {e}"),
        },
        _ => ConnectError {
            code: UNAVAILABLE,
            message: format!("cannot connect to {shown}: {e} (is crystald serve running?)"),
        },
    })?;
    let io = |e: std::io::Error| ConnectError {
        code: UNAVAILABLE,
        message: format!("{shown}: {e}"),
    };
    stream.set_read_timeout(Some(POLL)).map_err(io)?;
    Ok(Conn {
        reader: BufReader::new(stream.try_clone().map_err(io)?),
        writer: stream,
    })
}

impl Daemon {
    /// Connects now, so a missing daemon is reported before the first prompt.
    pub fn connect(socket: PathBuf, sampling: ReplyArgs) -> Result<Daemon, ConnectError> {
        let conn = connect(&socket)?;
        Ok(Daemon {
            socket,
            sampling,
            conn: Some(conn),
            next_id: 0,
        })
    }

    fn request(&mut self, messages: &[Message]) -> (String, String) {
        self.next_id += 1;
        let id = format!("chat-{}-{}", std::process::id(), self.next_id);
        let mut req = json!({"id": id, "messages": messages, "stream": true});
        self.sampling.fill(&mut req);
        let mut line = req.to_string();
        line.push('\n');
        (id, line)
    }
}

impl Backend for Daemon {
    fn reply(&mut self, messages: &[Message], sink: &mut dyn FnMut(&str) -> Flow) -> Outcome {
        // A connection that broke on an earlier turn (daemon restarted) is
        // replaced here; the conversation itself lives in this process.
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => match connect(&self.socket) {
                Ok(c) => c,
                Err(e) => return Outcome::Failed(e.message),
            },
        };
        let (id, line) = self.request(messages);
        if let Err(e) = conn.writer.write_all(line.as_bytes()) {
            return Outcome::Failed(format!("sending the request: {e}"));
        }
        let mut stop = false;
        let mut cancel_sent = false;
        let mut buf = Vec::new();
        loop {
            let presses = interrupt::count();
            if (stop || presses > 0) && !cancel_sent {
                let cancel = format!("{}\n", json!({"op": "cancel", "id": id}));
                if let Err(e) = conn.writer.write_all(cancel.as_bytes()) {
                    return Outcome::Failed(format!("sending the cancel: {e}"));
                }
                cancel_sent = true;
            }
            // A second Ctrl-C: stop waiting for a daemon that does not
            // answer the cancel. The connection is dropped with its
            // unfinished request, which cancels it daemon-side too.
            if presses > 1 {
                return Outcome::Failed("stopped waiting for the daemon".into());
            }
            // read_until keeps what it has read in `buf` when the poll
            // timeout interrupts a line, so nothing is lost between polls.
            match conn.reader.read_until(b'\n', &mut buf) {
                Ok(0) => {
                    return Outcome::Failed(
                        "the daemon closed the connection before the reply was complete".into(),
                    )
                }
                Ok(_) if buf.last() != Some(&b'\n') => continue,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Outcome::Failed(format!("reading the reply: {e}")),
            }
            let v: Value = match serde_json::from_slice(&buf) {
                Ok(v) => v,
                Err(e) => return Outcome::Failed(format!("unreadable reply from the daemon: {e}")),
            };
            buf.clear();
            if v["id"] != id.as_str() {
                continue;
            }
            match v["event"].as_str() {
                Some("token") => {
                    let text = v["text"].as_str().unwrap_or_default();
                    if !stop && !cancel_sent && sink(text) == Flow::Cancel {
                        stop = true;
                    }
                }
                Some("done") => {
                    self.conn = Some(conn);
                    return Outcome::Reply {
                        text: v["text"].as_str().unwrap_or_default().to_string(),
                        finish: v["finish_reason"].as_str().unwrap_or("stop").to_string(),
                    };
                }
                Some("error") => {
                    let code = v["code"].as_str().unwrap_or("internal");
                    let msg = v["message"].as_str().unwrap_or("");
                    // The daemon closes the connection after `forbidden`;
                    // every other error leaves it usable.
                    if code != "forbidden" {
                        self.conn = Some(conn);
                    }
                    let hint = if code == "context_length_exceeded" {
                        " (/reset starts a new conversation)"
                    } else {
                        ""
                    };
                    return Outcome::Failed(format!("{code}: {msg}{hint}"));
                }
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------- direct

/// The model in this process. One [`Session`] serves the whole chat, so
/// each turn reuses the cache of the conversation so far and only the new
/// tokens are computed.
pub struct Direct {
    model: Model,
    tok: Tokenizer,
    session: Session,
    sampling: ReplyArgs,
}

/// The daemon's default reply length, so both modes behave alike.
const DEFAULT_MAX_TOKENS: u64 = 512;

impl Direct {
    /// Fails on flags no turn could use, so they are reported once, up front.
    pub fn new(
        model: Model,
        tok: Tokenizer,
        n_ctx: Option<usize>,
        sampling: ReplyArgs,
    ) -> Result<Direct, String> {
        let n_ctx = n_ctx.unwrap_or(model.hp.context_length);
        if n_ctx == 0 {
            return Err("--ctx must be at least 1".into());
        }
        let session = Session::try_new(&model, n_ctx, KvType::F16)?;
        let direct = Direct {
            model,
            tok,
            session,
            sampling,
        };
        direct.params()?;
        Ok(direct)
    }

    fn params(&self) -> Result<GenerateParams, String> {
        let s = &self.sampling;
        let sampling = SamplingParams {
            temperature: s
                .temperature
                .unwrap_or(SamplingParams::default().temperature),
            seed: s.seed.unwrap_or_else(crate::cli::generate::random_seed),
            ..SamplingParams::default()
        };
        sampling.validate()?;
        let max_tokens = s.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        if max_tokens == 0 {
            return Err("--max-tokens must be at least 1".into());
        }
        Ok(GenerateParams {
            // Capped like the daemon caps it: the context bounds it anyway.
            max_tokens: (max_tokens as usize).min(self.session.n_ctx()),
            sampling,
            stop: Vec::new(),
            logprobs: 0,
        })
    }
}

impl Backend for Direct {
    fn reply(&mut self, messages: &[Message], sink: &mut dyn FnMut(&str) -> Flow) -> Outcome {
        let params = match self.params() {
            Ok(p) => p,
            Err(e) => return Outcome::Failed(e),
        };
        let prompt = match chat::render(&self.tok, messages) {
            Ok(p) => p,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let n_ctx = self.session.n_ctx();
        if prompt.len() >= n_ctx {
            return Outcome::Failed(format!(
                "context_length_exceeded: the conversation is {} tokens, the context {n_ctx} \
                 (/reset starts a new conversation)",
                prompt.len()
            ));
        }
        let mut on_text = |piece: &str| {
            if interrupt::count() > 0 {
                return Flow::Cancel;
            }
            sink(piece)
        };
        match generate::generate(
            &self.model,
            &mut self.session,
            &self.tok,
            &prompt,
            &params,
            &mut on_text,
        ) {
            Ok(g) => Outcome::Reply {
                text: g.text,
                finish: g.finish.as_str().to_string(),
            },
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
}
