//! Ctrl-C for `crystald chat`.
//!
//! SIGINT is blocked in every thread and taken by one thread with
//! sigwait(2), so no handler runs in signal context (and no `unsafe` is
//! needed), and neither rustyline, which swaps handlers in and out around
//! each prompt, nor the compute threads can see it. What a SIGINT means
//! depends on where the chat is:
//!
//! - a reply is streaming in an interactive chat: stop that reply (the
//!   backend polls [`count`]);
//! - elsewhere in an interactive chat: nothing. At the prompt the terminal
//!   is in raw mode, so a typed Ctrl-C reaches rustyline as a key; in the
//!   moments between a reply and the next prompt a stray press must not
//!   end the whole conversation;
//! - anywhere else (loading the model, a scripted chat on a piped stdin):
//!   exit 130, as an ordinary program would.
//!
//! The ctrlc crate is not used: with its `termination` feature (which the
//! daemon needs) it would also swallow SIGTERM and SIGHUP.

use nix::sys::signal::{SigSet, Signal};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

const ELSEWHERE: u8 = 0;
const STREAMING: u8 = 1;
const INTERACTIVE: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(ELSEWHERE);
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// Takes over SIGINT. Call before any other thread is started: threads
/// inherit the signal mask, and one without SIGINT blocked would get it
/// delivered with the default action (exit).
pub fn install() -> std::io::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.thread_block().map_err(std::io::Error::from)?;
    std::thread::Builder::new()
        .name("sigint".into())
        .spawn(move || {
            while set.wait().is_ok() {
                match STATE.load(Ordering::SeqCst) {
                    STREAMING => {
                        COUNT.fetch_add(1, Ordering::SeqCst);
                    }
                    INTERACTIVE => {}
                    _ => std::process::exit(130),
                }
            }
        })?;
    Ok(())
}

/// Ctrl-C presses since the current reply started.
pub fn count() -> usize {
    COUNT.load(Ordering::SeqCst)
}

/// Marks a reply as streaming (Ctrl-C stops it) until the guard is dropped.
pub fn streaming() -> Guard {
    COUNT.store(0, Ordering::SeqCst);
    enter(STREAMING)
}

/// Marks an interactive chat (Ctrl-C does not exit) until the guard is dropped.
pub fn interactive() -> Guard {
    enter(INTERACTIVE)
}

fn enter(state: u8) -> Guard {
    Guard(STATE.swap(state, Ordering::SeqCst))
}

/// Restores the state it replaced.
pub struct Guard(u8);

impl Drop for Guard {
    fn drop(&mut self) {
        STATE.store(self.0, Ordering::SeqCst);
    }
}
