//! A model file changed on disk while it is memory-mapped.
//!
//! The loader validates every size and offset against the file as it is at
//! load, and the engine then reads weights straight from the map. If the
//! file is later truncated (an interrupted copy over it, `truncate`, a full
//! disk during an in-place rewrite), reading a page past the new end raises
//! SIGBUS, whose default action kills the process without a word. This
//! module turns that into a clear fatal error naming the file and the byte,
//! and exit code [`EXIT_CODE`] (74, `EX_IOERR`), so a supervisor restarts
//! the daemon, whose loader then re-validates the file and either serves it
//! or refuses it with a reason. A SIGBUS anywhere else keeps its previous
//! behaviour (Rust's own handler, or the default action).
//!
//! Bytes rewritten in place without changing the length cannot be detected
//! this way; the weights then have the new values (the output is garbage,
//! never out-of-bounds access: every index was checked at load). Replacing
//! a model is done by writing a new file and renaming it over the old one,
//! as `crystal-quantize` does, which leaves the mapped file intact.

use nix::libc;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Exit status after a mapped model file was truncated (`EX_IOERR`).
pub const EXIT_CODE: i32 = 74;

/// Mappings watched at once; a process maps one model (tests map more).
const SLOTS: usize = 16;

/// One watched mapping: `[start, end)` addresses and the message to print.
/// `start == 0` marks a free slot. The message is leaked (a few hundred
/// bytes per load) so the handler can never read freed memory.
struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    msg: AtomicPtr<u8>,
    msg_len: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    msg: AtomicPtr::new(std::ptr::null_mut()),
    msg_len: AtomicUsize::new(0),
};
static SLOTS_TABLE: [Slot; SLOTS] = [FREE; SLOTS];
/// Serialises registration (the handler only reads).
static REGISTER: Mutex<()> = Mutex::new(());
/// The SIGBUS action in place before ours, restored for faults elsewhere.
static PREVIOUS: OnceLock<SigAction> = OnceLock::new();

/// Watches `map` (the model file at `path`) until the guard is dropped.
pub struct MappingGuard {
    slot: Option<usize>,
}

impl MappingGuard {
    pub fn new(map: &[u8], path: &Path) -> MappingGuard {
        if map.is_empty() || install().is_err() {
            return MappingGuard { slot: None };
        }
        let journal = !std::io::stderr().is_terminal();
        let msg = format!(
            "{}crystald: fatal: the model file {} was truncated or replaced in place while in use \
             (SIGBUS reading byte ",
            if journal { "<2>" } else { "" },
            path.display()
        );
        let msg: &'static mut [u8] = Box::leak(msg.into_bytes().into_boxed_slice());
        let _lock = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = SLOTS_TABLE
            .iter()
            .position(|s| s.start.load(Ordering::Acquire) == 0)
        else {
            return MappingGuard { slot: None };
        };
        let s = &SLOTS_TABLE[i];
        s.msg_len.store(msg.len(), Ordering::Relaxed);
        s.msg.store(msg.as_mut_ptr(), Ordering::Relaxed);
        s.end
            .store(map.as_ptr() as usize + map.len(), Ordering::Relaxed);
        // Published last: the handler reads the rest only after seeing it.
        s.start.store(map.as_ptr() as usize, Ordering::Release);
        MappingGuard { slot: Some(i) }
    }
}

impl Drop for MappingGuard {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let _lock = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
            SLOTS_TABLE[i].start.store(0, Ordering::Release);
        }
    }
}

fn install() -> nix::Result<()> {
    static INSTALLED: OnceLock<nix::Result<()>> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let ours = SigAction::new(
            SigHandler::SigAction(on_sigbus),
            SaFlags::SA_SIGINFO | SaFlags::SA_ONSTACK,
            SigSet::empty(),
        );
        // SAFETY: `on_sigbus` only performs async-signal-safe operations
        // (atomic loads, write(2), _exit(2), sigaction(2)); see its comment.
        let previous = unsafe { signal::sigaction(Signal::SIGBUS, &ours) }?;
        let _ = PREVIOUS.set(previous);
        Ok(())
    })
}

/// SIGBUS handler. Sound because everything it touches is async-signal-safe:
/// it reads the faulting address from `siginfo`, compares it with the
/// watched ranges through atomics, formats a number into a stack buffer,
/// and then either writes the message and calls `_exit` (never returning
/// into the code that faulted on the mapping), or restores the previous
/// action and returns so that the faulting instruction runs again and gets
/// that action (Rust's stack-overflow handler or the default core dump).
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in &SLOTS_TABLE {
        let start = s.start.load(Ordering::Acquire);
        if start == 0 || addr < start || addr >= s.end.load(Ordering::Relaxed) {
            continue;
        }
        let msg = s.msg.load(Ordering::Relaxed);
        let len = s.msg_len.load(Ordering::Relaxed);
        let mut num = [0u8; 20];
        let digits = decimal(addr - start, &mut num);
        let tail: &[u8] = b"). Exiting; restart crystald to re-validate the file.\n";
        // SAFETY: `msg` points to a leaked, never-freed buffer of `len`
        // bytes published before `start`; the others are live locals.
        unsafe {
            libc::write(2, msg.cast(), len);
            libc::write(2, digits.as_ptr().cast(), digits.len());
            libc::write(2, tail.as_ptr().cast(), tail.len());
            libc::_exit(EXIT_CODE);
        }
    }
    if let Some(previous) = PREVIOUS.get() {
        // SAFETY: reinstating the action that was in place before ours.
        let _ = unsafe { signal::sigaction(Signal::SIGBUS, previous) };
    } else {
        // SAFETY: the default action is always valid.
        let _ = unsafe { signal::signal(Signal::SIGBUS, SigHandler::SigDfl) };
    }
}

/// Writes `n` in decimal into `buf`; returns the digits.
fn decimal(mut n: usize, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_formats_without_allocating() {
        let mut b = [0u8; 20];
        assert_eq!(decimal(0, &mut b), b"0");
        assert_eq!(decimal(4096, &mut b), b"4096");
        assert_eq!(
            decimal(usize::MAX, &mut b),
            usize::MAX.to_string().as_bytes()
        );
    }

    #[test]
    fn slots_are_claimed_and_released() {
        let a = vec![0u8; 64];
        let g = MappingGuard::new(&a, Path::new("/x"));
        let i = g.slot.expect("a free slot");
        assert_eq!(
            SLOTS_TABLE[i].start.load(Ordering::SeqCst),
            a.as_ptr() as usize
        );
        drop(g);
        assert_eq!(SLOTS_TABLE[i].start.load(Ordering::SeqCst), 0);
    }
}
