//! `crystald chat`: an interactive conversation in the terminal, against a
//! running daemon or a model file loaded in this process.
//!
//! The conversation lives here, not in the daemon: every turn sends the
//! whole message list, and the daemon's prefix cache (or, in direct mode,
//! the one [`Session`](crystald::model::Session) kept across turns) makes
//! that cost only the new tokens.

mod backend;
mod interrupt;

use backend::{Backend, Daemon, Direct, Outcome};
use crystald::daemon::config::DEFAULT_SOCKET;
use crystald::generate::Flow;
use crystald::tokenizer::{Message, Role};
use rustyline::error::ReadlineError;
use rustyline::DefaultEditor;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

const OK: i32 = 0;
const FAILED: i32 = 1;
const USAGE: i32 = 2;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The daemon's socket (not used with --model).
    #[arg(long, env = "CRYSTALD_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Load this model file and chat without a daemon.
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// With --model: compute threads (default: the physical cores).
    #[arg(long, requires = "model")]
    threads: Option<usize>,
    /// With --model: kernel set (auto, scalar, avx2, avx512, neon, neon-dotprod).
    #[arg(long, requires = "model")]
    kernels: Option<String>,
    /// With --model: cpu, cuda, or auto (the GPU when one is usable).
    #[arg(long, requires = "model", default_value = "auto", value_parser = super::parse_device)]
    device: crystald::model::DeviceChoice,
    /// With --model: context size in tokens (default: the model's).
    #[arg(long, requires = "model")]
    ctx: Option<usize>,
    #[command(flatten)]
    reply: super::ReplyArgs,
    /// Line history file (default: $XDG_STATE_HOME/crystald/chat_history).
    #[arg(long)]
    history: Option<PathBuf>,
    /// Keep no line history on disk.
    #[arg(long, conflicts_with = "history")]
    no_history: bool,
}

const HELP: &str = "\
Type a message and press Enter. End a line with \\ to continue the message
on the next line. A message starting with // is sent with one / removed.
  /system TEXT   set the system prompt and start a new conversation
  /reset         forget the conversation
  /save FILE     write the conversation as JSON [{\"role\", \"content\"}, ...]
  /help          this text
  /exit          leave (or Ctrl-D; or Ctrl-C twice on an empty line)
Ctrl-C while a reply streams stops the reply; the turn is then forgotten.";

fn note(msg: impl std::fmt::Display) {
    eprintln!("crystald chat: {msg}");
}

pub fn run(a: Args) -> i32 {
    // Before the model loads: its compute threads must inherit the mask.
    if let Err(e) = interrupt::install() {
        note(format!("cannot take over Ctrl-C: {e}"));
        return FAILED;
    }
    let sampling = a.reply.clone();
    let mut backend: Box<dyn Backend> = match &a.model {
        Some(path) => match super::load(path, a.threads, a.kernels.as_deref(), a.device) {
            Ok((model, tok)) => match Direct::new(model, tok, a.ctx, sampling) {
                Ok(d) => Box::new(d),
                Err(e) => {
                    note(e);
                    return USAGE;
                }
            },
            Err(e) => {
                note(format!("{e:#}"));
                return FAILED;
            }
        },
        None => match Daemon::connect(a.socket.clone(), sampling) {
            Ok(d) => Box::new(d),
            Err(e) => {
                note(e.message);
                return e.code;
            }
        },
    };
    let tty = std::io::stdin().is_terminal();
    let mut input = if tty {
        match Input::terminal(history_path(&a)) {
            Ok(i) => i,
            Err(e) => {
                note(format!("cannot set up the terminal: {e}"));
                return FAILED;
            }
        }
    } else {
        Input::Plain(std::io::stdin().lock())
    };
    if tty {
        println!("crystald chat: /help for commands, Ctrl-D to leave.");
    }
    let mut chat = Chat {
        system: a.reply.system.clone(),
        turns: Vec::new(),
        tty,
    };
    let code = {
        let _interactive = tty.then(interrupt::interactive);
        chat.run(&mut input, backend.as_mut())
    };
    input.save_history();
    code
}

fn history_path(a: &Args) -> Option<PathBuf> {
    if a.no_history {
        return None;
    }
    if let Some(p) = &a.history {
        return Some(p.clone());
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| Path::new(&h).join(".local/state"))
        })?;
    Some(state.join("crystald/chat_history"))
}

// ---------------------------------------------------------------- input

enum Input {
    Terminal {
        editor: Box<DefaultEditor>,
        history: Option<PathBuf>,
    },
    /// Scripted use: one line per message, no prompt, no editing.
    Plain(std::io::StdinLock<'static>),
}

enum Line {
    Text(String),
    /// Ctrl-C at the prompt.
    Interrupted,
    Eof,
}

impl Input {
    fn terminal(history: Option<PathBuf>) -> rustyline::Result<Input> {
        let config = rustyline::Config::builder().auto_add_history(false).build();
        let mut editor = DefaultEditor::with_config(config)?;
        if let Some(path) = &history {
            // A missing or unreadable history only means an empty one.
            let _ = editor.load_history(path);
        }
        Ok(Input::Terminal {
            editor: Box::new(editor),
            history,
        })
    }

    fn read(&mut self, prompt: &str) -> std::io::Result<Line> {
        match self {
            Input::Terminal { editor, .. } => match editor.readline(prompt) {
                Ok(line) => {
                    if !line.trim().is_empty() {
                        let _ = editor.add_history_entry(line.as_str());
                    }
                    Ok(Line::Text(line))
                }
                Err(ReadlineError::Interrupted) => Ok(Line::Interrupted),
                Err(ReadlineError::Eof) => Ok(Line::Eof),
                Err(ReadlineError::Io(e)) => Err(e),
                Err(e) => Err(std::io::Error::other(e)),
            },
            Input::Plain(stdin) => {
                let mut line = String::new();
                if stdin.read_line(&mut line)? == 0 {
                    return Ok(Line::Eof);
                }
                let line = line.strip_suffix('\n').unwrap_or(&line);
                let line = line.strip_suffix('\r').unwrap_or(line);
                Ok(Line::Text(line.to_string()))
            }
        }
    }

    /// Reads one message: lines ending in `\` continue on the next line.
    fn message(&mut self) -> std::io::Result<Line> {
        let mut lines: Vec<String> = Vec::new();
        loop {
            let prompt = if lines.is_empty() { ">>> " } else { "... " };
            match self.read(prompt)? {
                Line::Text(line) => match line.strip_suffix('\\') {
                    Some(head) => lines.push(head.to_string()),
                    None => {
                        lines.push(line);
                        return Ok(Line::Text(lines.join("\n")));
                    }
                },
                // Drops a half-typed multi-line message too.
                Line::Interrupted => return Ok(Line::Interrupted),
                Line::Eof if lines.is_empty() => return Ok(Line::Eof),
                Line::Eof => return Ok(Line::Text(lines.join("\n"))),
            }
        }
    }

    fn save_history(&mut self) {
        if let Input::Terminal {
            editor,
            history: Some(path),
        } = self
        {
            // History is a convenience: a read-only home must not break the chat.
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let _ = editor.save_history(path);
        }
    }
}

// ---------------------------------------------------------------- chat

struct Chat {
    system: Option<String>,
    /// Finished turns only: user, assistant, user, assistant, ...
    turns: Vec<Message>,
    tty: bool,
}

enum Next {
    Continue,
    Exit(i32),
}

impl Chat {
    fn messages(&self) -> Vec<Message> {
        let system = self.system.iter().map(|s| Message::system(s.clone()));
        system.chain(self.turns.iter().cloned()).collect()
    }

    /// A remark about the chat itself, kept off stdout in scripted mode so
    /// stdout carries only replies.
    fn say(&self, msg: impl std::fmt::Display) {
        if self.tty {
            println!("({msg})");
        } else {
            note(msg);
        }
    }

    fn run(&mut self, input: &mut Input, backend: &mut dyn Backend) -> i32 {
        let mut interrupted = false;
        loop {
            let text = match input.message() {
                Ok(Line::Text(t)) => t,
                Ok(Line::Interrupted) => {
                    if interrupted {
                        return OK;
                    }
                    interrupted = true;
                    self.say("Ctrl-C again or Ctrl-D to leave");
                    continue;
                }
                Ok(Line::Eof) => return OK,
                Err(e) => {
                    note(format!("reading input: {e}"));
                    return FAILED;
                }
            };
            interrupted = false;
            if text.trim().is_empty() {
                continue;
            }
            let text = match text.strip_prefix('/') {
                Some(rest) if rest.starts_with('/') => rest.to_string(),
                Some(command) => match self.command(command) {
                    Next::Continue => continue,
                    Next::Exit(code) => return code,
                },
                None => text,
            };
            if let Next::Exit(code) = self.turn(text, backend) {
                return code;
            }
        }
    }

    fn command(&mut self, line: &str) -> Next {
        let (name, arg) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let arg = arg.trim();
        match name {
            "exit" | "quit" => return Next::Exit(OK),
            "help" => println!("{HELP}"),
            "reset" => {
                self.turns.clear();
                self.say("conversation reset");
            }
            "system" if arg.is_empty() => note("usage: /system TEXT"),
            "system" => {
                self.system = Some(arg.to_string());
                self.turns.clear();
                self.say("system prompt set; conversation reset");
            }
            "save" if arg.is_empty() => note("usage: /save FILE"),
            "save" => {
                let json =
                    serde_json::to_string_pretty(&self.messages()).expect("messages serialise");
                match std::fs::write(arg, json + "\n") {
                    Ok(()) => self.say(format_args!("saved to {arg}")),
                    Err(e) => note(format!("cannot write {arg}: {e}")),
                }
            }
            _ => note(format!("unknown command /{name} (/help lists them)")),
        }
        Next::Continue
    }

    /// One user message and its reply. A reply that fails or is stopped
    /// leaves the conversation as it was, so the next turn starts from the
    /// last complete exchange.
    fn turn(&mut self, text: String, backend: &mut dyn Backend) -> Next {
        let mut messages = self.messages();
        messages.push(Message::user(text));
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let mut printed = false;
        let mut ended_with_newline = false;
        let mut write_error: Option<std::io::Error> = None;
        let outcome = {
            // A scripted chat keeps the default: Ctrl-C ends it.
            let _streaming = self.tty.then(interrupt::streaming);
            backend.reply(&messages, &mut |piece| {
                if piece.is_empty() {
                    return Flow::Continue;
                }
                printed = true;
                ended_with_newline = piece.ends_with('\n');
                match out.write_all(piece.as_bytes()).and_then(|()| out.flush()) {
                    Ok(()) => Flow::Continue,
                    Err(e) => {
                        write_error = Some(e);
                        Flow::Cancel
                    }
                }
            })
        };
        if let Some(e) = write_error {
            // `| head` closing the pipe is the reader's choice, not a failure.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Next::Exit(OK);
            }
            note(format!("writing the reply: {e}"));
            return Next::Exit(FAILED);
        }
        // Every reply, even an empty one, ends in a newline, so a script
        // reading stdout sees one reply per message; a failed turn prints
        // nothing of its own.
        let replied = matches!(outcome, Outcome::Reply { .. });
        if (printed || replied) && !ended_with_newline {
            let _ = writeln!(out);
        }
        let _ = out.flush();
        drop(out);
        match outcome {
            Outcome::Reply { text, finish } => {
                if finish == "cancelled" {
                    self.say("stopped; this turn is forgotten");
                    return Next::Continue;
                }
                match finish.as_str() {
                    "length" => self.say("stopped at max_tokens"),
                    "context" => self.say("the context is full; /reset starts over"),
                    _ => {}
                }
                let user = messages.pop().expect("the user's message");
                debug_assert_eq!(user.role, Role::User);
                self.turns.push(user);
                self.turns.push(Message::assistant(text));
            }
            Outcome::Failed(msg) => note(msg),
        }
        Next::Continue
    }
}
