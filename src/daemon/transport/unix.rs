//! The Unix socket transport: newline-delimited JSON, any number of
//! requests in flight per connection.
//!
//! Each connection has a reader thread (parses lines, submits jobs, handles
//! control messages) and a writer thread draining a bounded queue of reply
//! lines. The inference worker only ever `try_send`s into that queue: a
//! client that stops reading fills it and is disconnected, its jobs
//! cancelled, instead of stalling the worker or growing memory.

use crate::daemon::access::{peer_of, Access, Peer};
use crate::daemon::logging::{log_debug, log_info, log_warn};
use crate::daemon::protocol::{self, ErrorCode, Event, Id, Incoming};
use crate::daemon::scheduler::{EventSink, Scheduler};
use crate::daemon::transport::inflight::{InFlight, Refused};
use crate::daemon::transport::Connections;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct UnixOptions {
    pub max_line_bytes: usize,
    pub max_pending_replies: usize,
    pub max_connections: usize,
}

/// How often blocked loops look at their stop conditions.
const TICK: Duration = Duration::from_millis(100);

type Registry = Connections<Conn>;

/// The running transport; see [`UnixServer::stop_accepting`] and [`UnixServer::close`].
pub struct UnixServer {
    stop: Arc<AtomicBool>,
    /// Dropped to wake the accept loop, which otherwise sleeps in poll
    /// until a client connects (an idle daemon never wakes).
    wake: Option<UnixStream>,
    acceptor: Option<JoinHandle<()>>,
    registry: Arc<Registry>,
}

impl UnixServer {
    /// Serves `listener` (already bound and listening) on a new thread.
    pub fn spawn(
        listener: UnixListener,
        scheduler: Scheduler,
        access: Access,
        opts: UnixOptions,
    ) -> UnixServer {
        let stop = Arc::new(AtomicBool::new(false));
        let registry = Arc::new(Registry::default());
        let (s, r) = (stop.clone(), registry.clone());
        let (wake, woken) = UnixStream::pair().expect("cannot create a socket pair");
        let acceptor = std::thread::Builder::new()
            .name("crystald-accept".into())
            .spawn(move || accept_loop(&listener, &woken, &s, &r, &scheduler, &access, &opts))
            .expect("cannot start the accept thread");
        UnixServer {
            stop,
            wake: Some(wake),
            acceptor: Some(acceptor),
            registry,
        }
    }

    /// Stops accepting connections and closes the listener; open
    /// connections keep being served.
    pub fn stop_accepting(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        drop(self.wake.take());
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }

    /// Stops reading requests from every connection, then waits up to
    /// `timeout` for the replies already produced to be written.
    pub fn close(mut self, timeout: Duration) {
        self.stop_accepting();
        for conn in self.registry.take_all() {
            let _ = conn.stream.shutdown(std::net::Shutdown::Read);
        }
        self.registry.wait_closed(timeout);
    }
}

fn accept_loop(
    listener: &UnixListener,
    woken: &UnixStream,
    stop: &AtomicBool,
    registry: &Arc<Registry>,
    scheduler: &Scheduler,
    access: &Access,
    opts: &UnixOptions,
) {
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(woken.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) if fds[1].any().unwrap_or(false) => continue,
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                log_warn!("polling the listening socket: {e}");
                std::thread::sleep(TICK);
                continue;
            }
        }
        match listener.accept() {
            Ok((stream, _)) => admit(stream, registry, scheduler, access, opts),
            // Out of file descriptors and the like: back off, keep serving.
            Err(e) => {
                log_warn!("accepting a connection: {e}");
                std::thread::sleep(TICK);
            }
        }
    }
}

/// Refuses a connection with one error line. The write is bounded so a
/// peer that does not read cannot hold the accept loop.
fn refuse(mut stream: UnixStream, code: ErrorCode, message: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.write_all(&protocol::reply_line(None, &Event::error(code, message)));
}

fn admit(
    stream: UnixStream,
    registry: &Arc<Registry>,
    scheduler: &Scheduler,
    access: &Access,
    opts: &UnixOptions,
) {
    let peer = match peer_of(&stream) {
        Ok(p) => p,
        Err(e) => {
            log_warn!("cannot read the peer's credentials, closing: {e}");
            return;
        }
    };
    if !access.allows(&peer) {
        log_warn!(
            "refused connection from pid {} uid {} gid {}: not in allowed_users/allowed_groups",
            peer.pid,
            peer.uid,
            peer.gid
        );
        return refuse(
            stream,
            ErrorCode::Forbidden,
            &format!("uid {} is not allowed to use this daemon", peer.uid),
        );
    }
    if !registry.admit(opts.max_connections) {
        log_warn!(
            "refused connection from pid {}: too many connections",
            peer.pid
        );
        return refuse(
            stream,
            ErrorCode::Busy,
            &format!("too many connections ({})", opts.max_connections),
        );
    }
    let (writer_stream, reader_stream) = match (stream.try_clone(), stream.try_clone()) {
        (Ok(w), Ok(r)) => (w, r),
        (Err(e), _) | (_, Err(e)) => {
            log_warn!("cannot set up a connection: {e}");
            registry.closed();
            return;
        }
    };
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(opts.max_pending_replies);
    let conn = Arc::new(Conn {
        stream,
        peer,
        inflight: InFlight::default(),
        out: tx,
        dropped: AtomicBool::new(false),
        scheduler: scheduler.clone(),
    });
    log_debug!(
        "connection from pid {} uid {} gid {}",
        peer.pid,
        peer.uid,
        peer.gid
    );
    registry.track(&conn);
    let reg = registry.clone();
    let writer = std::thread::Builder::new()
        .name("crystald-conn-w".into())
        .spawn(move || {
            let mut s = writer_stream;
            for line in rx {
                if s.write_all(&line).is_err() {
                    // The reader sees the hang-up and cancels the jobs.
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    break;
                }
            }
            reg.closed();
        });
    if let Err(e) = writer {
        log_warn!("cannot start a connection thread: {e}");
        registry.closed();
        return;
    }
    let max_line = opts.max_line_bytes;
    let reader = std::thread::Builder::new()
        .name("crystald-conn-r".into())
        .spawn(move || conn.serve(reader_stream, max_line));
    if let Err(e) = reader {
        // The writer ends once the connection (held by the closure) is gone.
        log_warn!("cannot start a connection thread: {e}");
    }
}

struct Conn {
    stream: UnixStream,
    peer: Peer,
    /// Requests of this connection that have not had their final event.
    inflight: InFlight<Id>,
    out: SyncSender<Vec<u8>>,
    /// Set when the connection was cut for not reading its replies.
    dropped: AtomicBool,
    scheduler: Scheduler,
}

/// Outcome of reading one line.
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    Line,
    TooLong,
    /// End of input; `partial` bytes of an unterminated line were dropped.
    Eof {
        partial: usize,
    },
}

/// Reads up to the next `\n` into `buf` (without it), holding at most
/// `max` bytes: the rest of a longer line is read and discarded.
fn read_line(r: &mut impl BufRead, max: usize, buf: &mut Vec<u8>) -> std::io::Result<LineRead> {
    buf.clear();
    let mut seen = 0usize;
    loop {
        let avail = match r.fill_buf() {
            Ok(a) => a,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok(LineRead::Eof { partial: seen });
        }
        let (chunk, used, end) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (&avail[..i], i + 1, true),
            None => (avail, avail.len(), false),
        };
        seen += chunk.len();
        if seen <= max {
            buf.extend_from_slice(chunk);
        } else {
            buf.clear();
        }
        r.consume(used);
        if end {
            if seen > max {
                return Ok(LineRead::TooLong);
            }
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(LineRead::Line);
        }
    }
}

impl Conn {
    fn serve(self: Arc<Self>, stream: UnixStream, max_line: usize) {
        let mut r = BufReader::with_capacity(64 * 1024, stream);
        let mut buf = Vec::new();
        loop {
            match read_line(&mut r, max_line, &mut buf) {
                Ok(LineRead::Line) => self.handle(&buf),
                Ok(LineRead::TooLong) => self.reply(
                    None,
                    Event::error(
                        ErrorCode::LineTooLong,
                        format!("the line is longer than {max_line} bytes"),
                    ),
                ),
                Ok(LineRead::Eof { partial }) => {
                    if partial > 0 {
                        log_debug!(
                            "pid {}: {partial} bytes without a final newline ignored",
                            self.peer.pid
                        );
                    }
                    break;
                }
                Err(e) => {
                    log_debug!("pid {}: read error: {e}", self.peer.pid);
                    break;
                }
            }
            if self.dropped.load(Ordering::SeqCst) {
                break;
            }
        }
        self.linger();
        log_debug!("pid {}: connection closed", self.peer.pid);
    }

    /// After the client stopped sending: a half-closed connection still
    /// gets its replies, a closed one gets its jobs cancelled.
    fn linger(&self) {
        loop {
            if self.inflight.is_empty() {
                return;
            }
            // POLLHUP is only reported once both directions are shut: the
            // peer closed its socket (or we cut the connection).
            let mut fds = [PollFd::new(self.stream.as_fd(), PollFlags::empty())];
            match poll(&mut fds, PollTimeout::from(TICK.as_millis() as u16)) {
                Ok(n) if n > 0 => {
                    let ev = fds[0].revents().unwrap_or(PollFlags::empty());
                    if ev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                        log_debug!("pid {}: hung up, cancelling its requests", self.peer.pid);
                        self.cancel_all();
                        return;
                    }
                    // Readable at EOF only: wait without spinning.
                    std::thread::sleep(TICK);
                }
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    log_warn!("polling a connection: {e}");
                    self.cancel_all();
                    return;
                }
            }
        }
    }

    fn cancel_all(&self) {
        self.inflight.cancel_all(&self.scheduler);
    }

    /// Queues a reply line; never blocks. A full queue means the client is
    /// not reading: the connection is cut.
    fn send_line(&self, line: Vec<u8>) -> bool {
        match self.out.try_send(line) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                if !self.dropped.swap(true, Ordering::SeqCst) {
                    log_warn!(
                        "pid {}: client does not read its replies; disconnecting it",
                        self.peer.pid
                    );
                    let _ = self.stream.shutdown(std::net::Shutdown::Both);
                }
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    fn reply(&self, id: Option<&Id>, event: Event) {
        self.send_line(protocol::reply_line(id, &event));
    }

    fn handle(self: &Arc<Self>, line: &[u8]) {
        // Blank lines (a stray Enter in socat) are not requests.
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        match protocol::parse_line(line) {
            Err(rej) => {
                log_debug!("pid {}: rejected line: {}", self.peer.pid, rej.error);
                self.reply(rej.id.as_ref(), Event::Error(rej.error));
            }
            Ok(Incoming::Request(req)) => self.submit(&req),
            Ok(Incoming::Control(c)) => {
                if let Some((id, reply)) = self.inflight.control(&self.scheduler, c, |id| id) {
                    self.reply(id.as_ref(), reply);
                }
            }
        }
    }

    fn submit(self: &Arc<Self>, req: &protocol::Request) {
        let id = req.id.clone();
        let sink = ConnSink {
            conn: self.clone(),
            id: id.clone(),
        };
        match self
            .inflight
            .submit(&self.scheduler, id.clone(), req, Box::new(sink))
        {
            Ok(()) => log_debug!("pid {}: request {id} queued", self.peer.pid),
            Err(Refused::Duplicate) => self.reply(
                Some(&id),
                Event::error(
                    ErrorCode::DuplicateId,
                    format!("request {id} is still in flight on this connection"),
                ),
            ),
            Err(Refused::Scheduler(e)) => {
                log_info!("pid {}: request {id} refused: {e}", self.peer.pid);
                self.reply(Some(&id), Event::Error(e));
            }
        }
    }
}

/// Delivers one job's events to its connection.
struct ConnSink {
    conn: Arc<Conn>,
    id: Id,
}

impl EventSink for ConnSink {
    fn send(&mut self, event: Event) -> bool {
        if event.is_final() {
            // Released before the reply is queued, so a client reusing the id
            // right after reading the reply is never told it is a duplicate.
            self.conn.inflight.release(&self.id);
        }
        self.conn
            .send_line(protocol::reply_line(Some(&self.id), &event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<(LineRead, Vec<u8>)> {
        // A tiny buffer so lines span several fills.
        let mut r = BufReader::with_capacity(3, input);
        let mut out = Vec::new();
        loop {
            let mut buf = Vec::new();
            let res = read_line(&mut r, max, &mut buf).unwrap();
            let eof = matches!(res, LineRead::Eof { .. });
            out.push((res, buf));
            if eof {
                return out;
            }
        }
    }

    #[test]
    fn lines_are_split_limited_and_resynchronised() {
        let got = lines(b"ab\r\n0123456789\nok\nhalf", 5);
        assert_eq!(
            got,
            vec![
                (LineRead::Line, b"ab".to_vec()),
                (LineRead::TooLong, Vec::new()),
                (LineRead::Line, b"ok".to_vec()),
                (LineRead::Eof { partial: 4 }, b"half".to_vec()),
            ]
        );
    }
}
