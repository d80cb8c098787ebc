//! The OpenAI-compatible HTTP transport: `/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`, `/health` and `/metrics`, over TCP and
//! Unix sockets, feeding the same scheduler as the other transports.
//!
//! One thread per connection, as on the Unix socket: a device serves a
//! handful of clients, generation is the bottleneck, and blocking code lets
//! every wait carry its own limit (see [`wire`]). The worker never blocks
//! on a client: events go through a bounded channel to the connection's
//! thread, which writes them; a client that hangs up has its request
//! cancelled.
//!
//! - [`wire`]: HTTP/1.1 framing, limits and timeouts;
//! - [`openai`]: the API's shapes, to and from the daemon's protocol;
//! - [`auth`]: API keys.

pub mod auth;
pub mod openai;
pub mod wire;

use crate::daemon::access::{peer_of, Access};
use crate::daemon::config::HttpConfig;
use crate::daemon::lifecycle::{self, BoundSocket};
use crate::daemon::logging::{log_debug, log_info, log_warn};
use crate::daemon::protocol::{ErrorCode, Event};
use crate::daemon::scheduler::{EventSink, JobHandle, Scheduler};
use crate::daemon::transport::Connections;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use openai::{HttpError, Kind, Reply};
use serde_json::json;
use std::net::{Shutdown, SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wire::{EventStream, ReadError, Response, Stream};

/// How often a thread waiting for a reply checks whether its client left.
const TICK: Duration = Duration::from_millis(100);
/// Events buffered between the worker and a slow client before it is
/// treated as gone.
const MAX_PENDING_EVENTS: usize = 4096;
/// Request line and headers.
const MAX_HEAD_BYTES: usize = 32 * 1024;

/// A bound listening socket, before the model is loaded.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, BoundSocket),
}

impl Listener {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }
}

/// The listeners and keys, checked and bound at start so that a port in use
/// or a missing key file stops the daemon before it loads the model.
pub struct Bound {
    listeners: Vec<Listener>,
    keys: Option<Arc<auth::Keys>>,
    cfg: HttpConfig,
}

impl Bound {
    /// Where the listeners are, as clients would write it.
    pub fn addresses(&self) -> Vec<String> {
        self.listeners
            .iter()
            .map(|l| match l {
                Listener::Tcp(t) => t
                    .local_addr()
                    .map(|a| format!("http://{a}"))
                    .unwrap_or_default(),
                Listener::Unix(_, b) => format!("unix:{}", b.path.display()),
            })
            .collect()
    }
}

/// Binds every `listen` address. `mode` and `group` apply to Unix socket
/// files, as for the main socket.
pub fn bind(cfg: &HttpConfig, mode: u32, group: Option<&str>) -> Result<Bound, String> {
    let keys = cfg
        .api_key_file
        .as_deref()
        .map(auth::Keys::load)
        .transpose()?
        .map(Arc::new);
    let mut listeners = Vec::new();
    for addr in &cfg.listen {
        if let Some(path) = addr.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("http.listen: 'unix:' needs a path".into());
            }
            let (l, guard) = lifecycle::bind(&PathBuf::from(path), mode, group)
                .map_err(|e| format!("http.listen {addr}: {e}"))?;
            listeners.push(Listener::Unix(l, guard));
            continue;
        }
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| format!("http.listen '{addr}': not HOST:PORT or unix:/PATH ({e})"))?
            .collect();
        let first = addrs
            .first()
            .ok_or_else(|| format!("http.listen '{addr}': resolves to no address"))?;
        if keys.is_none() && !cfg.allow_unauthenticated && !first.ip().is_loopback() {
            return Err(format!(
                "http.listen {addr} is reachable from other machines and no \
                 http.api_key_file is set: set one, or allow_unauthenticated = true"
            ));
        }
        let l = TcpListener::bind(first)
            .map_err(|e| format!("http.listen {addr}: cannot listen: {e}"))?;
        listeners.push(Listener::Tcp(l));
    }
    Ok(Bound {
        listeners,
        keys,
        cfg: cfg.clone(),
    })
}

/// What every connection thread shares.
struct Ctx {
    scheduler: Scheduler,
    access: Access,
    keys: Option<Arc<auth::Keys>>,
    limits: wire::Limits,
    max_connections: usize,
    model: String,
    /// Set at shutdown: kept connections close after their current request.
    stopping: AtomicBool,
    next_id: AtomicU64,
    /// Distinguishes ids across restarts.
    id_stamp: u64,
    conns: Connections<Conn>,
}

struct Conn {
    stream: Stream,
    /// Between reading a request and finishing its response.
    busy: AtomicBool,
}

pub struct HttpServer {
    ctx: Arc<Ctx>,
    wake: Option<UnixStream>,
    acceptor: Option<JoinHandle<()>>,
}

impl HttpServer {
    pub fn spawn(bound: Bound, scheduler: Scheduler, access: Access, model: String) -> HttpServer {
        for a in bound.addresses() {
            log_info!("http: listening on {a}");
        }
        let cfg = &bound.cfg;
        let ctx = Arc::new(Ctx {
            scheduler,
            access,
            keys: bound.keys,
            limits: wire::Limits {
                max_head: MAX_HEAD_BYTES,
                max_body: cfg.max_body_bytes,
                read_timeout: Duration::from_secs_f64(cfg.read_timeout_s),
                keep_alive: Duration::from_secs_f64(cfg.keep_alive_s),
            },
            max_connections: cfg.max_connections,
            model,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            id_stamp: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            conns: Connections::default(),
        });
        let (wake, woken) = UnixStream::pair().expect("cannot create a socket pair");
        let c = ctx.clone();
        let listeners = bound.listeners;
        let acceptor = std::thread::Builder::new()
            .name("crystald-http".into())
            .spawn(move || accept_loop(&listeners, &woken, &c))
            .expect("cannot start the HTTP accept thread");
        HttpServer {
            ctx,
            wake: Some(wake),
            acceptor: Some(acceptor),
        }
    }

    /// Stops accepting; requests on open connections are still answered
    /// (with 503 once the scheduler stops taking them).
    pub fn stop_accepting(&mut self) {
        self.ctx.stopping.store(true, Ordering::SeqCst);
        drop(self.wake.take());
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }

    /// Closes idle connections and waits up to `timeout` for the responses
    /// in progress to be written.
    pub fn close(mut self, timeout: Duration) {
        self.stop_accepting();
        for conn in self.ctx.conns.take_all() {
            if !conn.busy.load(Ordering::SeqCst) {
                let _ = conn.stream.shutdown(Shutdown::Read);
            }
        }
        self.ctx.conns.wait_closed(timeout);
    }
}

fn accept_loop(listeners: &[Listener], woken: &UnixStream, ctx: &Arc<Ctx>) {
    while !ctx.stopping.load(Ordering::SeqCst) {
        let mut fds: Vec<PollFd> = listeners
            .iter()
            .map(|l| PollFd::new(l.fd(), PollFlags::POLLIN))
            .collect();
        fds.push(PollFd::new(woken.as_fd(), PollFlags::POLLIN));
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                log_warn!("http: polling the listeners: {e}");
                std::thread::sleep(TICK);
                continue;
            }
        }
        let ready: Vec<bool> = fds.iter().map(|f| f.any().unwrap_or(false)).collect();
        if ready[listeners.len()] {
            continue;
        }
        for (l, _) in listeners.iter().zip(ready).filter(|(_, r)| *r) {
            let accepted = match l {
                Listener::Tcp(t) => t.accept().map(|(s, _)| Stream::Tcp(s)),
                Listener::Unix(u, _) => u.accept().map(|(s, _)| Stream::Unix(s)),
            };
            match accepted {
                Ok(stream) => admit(stream, ctx),
                Err(e) => {
                    log_warn!("http: accepting a connection: {e}");
                    std::thread::sleep(TICK);
                }
            }
        }
    }
}

/// Answers once and closes; the write is bounded so a peer that does not
/// read cannot hold the accept loop.
fn refuse(stream: &Stream, resp: Response) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = resp.write(stream, false);
}

fn error_response(e: &HttpError) -> Response {
    let r = Response::json(e.status, &e.body());
    match e.status {
        429 | 503 => r.with_header("Retry-After", "1"),
        401 => r.with_header("WWW-Authenticate", "Bearer"),
        _ => r,
    }
}

fn admit(stream: Stream, ctx: &Arc<Ctx>) {
    if let Stream::Unix(u) = &stream {
        // The Unix listener keeps the socket transport's permission model.
        match peer_of(u) {
            Ok(peer) if ctx.access.allows(&peer) => {}
            Ok(peer) => {
                log_warn!(
                    "http: refused uid {}: not in allowed_users/allowed_groups",
                    peer.uid
                );
                return refuse(
                    &stream,
                    error_response(&HttpError::new(
                        403,
                        "permission_error",
                        "forbidden",
                        format!("uid {} is not allowed to use this daemon", peer.uid),
                    )),
                );
            }
            Err(e) => {
                log_warn!("http: cannot read the peer's credentials, closing: {e}");
                return;
            }
        }
    }
    {
        if !ctx.conns.admit(ctx.max_connections) {
            log_warn!("http: refused a connection: too many connections");
            return refuse(
                &stream,
                error_response(&HttpError::new(
                    503,
                    "server_error",
                    "busy",
                    format!("too many connections ({})", ctx.max_connections),
                )),
            );
        }
    }
    let reader_stream = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            log_warn!("http: cannot set up a connection: {e}");
            ctx.conns.closed();
            return;
        }
    };
    let conn = Arc::new(Conn {
        stream,
        busy: AtomicBool::new(false),
    });
    ctx.conns.track(&conn);
    let c = ctx.clone();
    let spawned = std::thread::Builder::new()
        .name("crystald-http-c".into())
        .spawn(move || {
            serve(&c, &conn, reader_stream);
            c.conns.closed();
        });
    if let Err(e) = spawned {
        log_warn!("http: cannot start a connection thread: {e}");
        ctx.conns.closed();
    }
}

fn serve(ctx: &Ctx, conn: &Conn, stream: Stream) {
    let mut reader = wire::Reader::new(stream);
    let out = &conn.stream;
    loop {
        let req = match reader.next(&ctx.limits, out) {
            Ok(r) => r,
            Err(e) => {
                if let Some(reply) = e.reply() {
                    log_debug!("http: bad request: {}", reply.message);
                    if matches!(e, ReadError::BodyTooLarge { .. }) {
                        ctx.scheduler.count_refused(ErrorCode::PayloadTooLarge);
                    }
                    let _ = error_response(&reply).write(out, false);
                } else if let ReadError::Io(e) = e {
                    log_debug!("http: read error: {e}");
                }
                break;
            }
        };
        conn.busy.store(true, Ordering::SeqCst);
        let answered = handle(ctx, &req, out);
        let keep = answered && req.keep_alive && !ctx.stopping.load(Ordering::SeqCst);
        conn.busy.store(false, Ordering::SeqCst);
        if !keep {
            break;
        }
    }
    let _ = out.shutdown(Shutdown::Both);
}

/// Answers one request; `false` when the connection must close.
fn handle(ctx: &Ctx, req: &wire::Request, out: &Stream) -> bool {
    let keep = req.keep_alive;
    let path = req.path.trim_end_matches('/');
    let method = req.method.as_str();
    let write = |r: Response| r.write(out, keep).is_ok();
    if (method, path) == ("GET", "/health") {
        // Unauthenticated, for load balancers and watchdogs.
        let h = ctx.scheduler.health();
        let status = if h.status == "ok" && !ctx.stopping.load(Ordering::SeqCst) {
            200
        } else {
            503
        };
        return write(Response::json(
            status,
            &serde_json::to_value(&h).expect("health serialises"),
        ));
    }
    let allowed: &[&str] = match path {
        "/v1/chat/completions" | "/v1/completions" => &["POST"],
        "/v1/models" | "/metrics" => &["GET"],
        p if p.starts_with("/v1/models/") => &["GET"],
        _ => {
            return write(error_response(&HttpError::new(
                404,
                "invalid_request_error",
                "not_found",
                format!("no such endpoint: {method} {}", req.path),
            )))
        }
    };
    if let Some(keys) = &ctx.keys {
        if !keys.allows(req.header("authorization")) {
            return write(error_response(&HttpError::new(
                401,
                "invalid_request_error",
                "invalid_api_key",
                "a valid API key is needed: Authorization: Bearer KEY",
            )));
        }
    }
    if !allowed.contains(&method) {
        return write(
            error_response(&HttpError::new(
                405,
                "invalid_request_error",
                "method_not_allowed",
                format!("{} takes {}", req.path, allowed.join(", ")),
            ))
            .with_header("Allow", allowed.join(", ")),
        );
    }
    match path {
        "/metrics" => write(Response::new(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            ctx.scheduler.metrics_text().into_bytes(),
        )),
        "/v1/models" => write(Response::json(
            200,
            &json!({"object": "list", "data": [model_object(ctx)]}),
        )),
        "/v1/chat/completions" => generate(ctx, req, out, Kind::Chat),
        "/v1/completions" => generate(ctx, req, out, Kind::Completion),
        p => {
            let id = &p["/v1/models/".len()..];
            if id == ctx.model {
                write(Response::json(200, &model_object(ctx)))
            } else {
                write(error_response(&HttpError::new(
                    404,
                    "invalid_request_error",
                    "model_not_found",
                    format!("no model '{id}'; this daemon serves '{}'", ctx.model),
                )))
            }
        }
    }
}

fn model_object(ctx: &Ctx) -> serde_json::Value {
    json!({"id": ctx.model, "object": "model", "created": ctx.id_stamp, "owned_by": "crystald"})
}

/// Hands a job's events to the connection thread.
struct ChannelSink(SyncSender<Event>);

impl EventSink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        match self.0.try_send(event) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// Whether the client closed its side (or the connection broke).
fn hung_up(out: &Stream) -> bool {
    // POLLRDHUP (Linux): the peer shut its sending side, which an HTTP
    // client only does when it is gone; pipelined bytes are POLLIN only.
    let gone =
        PollFlags::from_bits_retain(nix::libc::POLLRDHUP) | PollFlags::POLLHUP | PollFlags::POLLERR;
    let mut fds = [PollFd::new(out.as_fd(), gone)];
    // Only those events (and POLLNVAL) can be reported, so any is the
    // answer; nix cannot decode POLLRDHUP in `revents`.
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// The next event of a job, or `None` once the client has left (the job is
/// then cancelled).
fn next_event(ctx: &Ctx, rx: &Receiver<Event>, out: &Stream, job: &JobHandle) -> Option<Event> {
    loop {
        match rx.recv_timeout(TICK) {
            Ok(e) => return Some(e),
            Err(RecvTimeoutError::Timeout) => {
                if hung_up(out) {
                    log_debug!("http: client left; cancelling its request");
                    ctx.scheduler.cancel(job);
                    return None;
                }
            }
            // The scheduler always sends a final event; a lost sink means
            // the job is gone.
            Err(RecvTimeoutError::Disconnected) => return None,
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn generate(ctx: &Ctx, req: &wire::Request, out: &Stream, kind: Kind) -> bool {
    let keep = req.keep_alive;
    let write = |r: Response| r.write(out, keep).is_ok();
    let n = ctx.next_id.fetch_add(1, Ordering::Relaxed);
    let prefix = if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let id = format!("{prefix}-{:x}{n:06x}", ctx.id_stamp);
    let refuse = |code: ErrorCode, e: HttpError| {
        ctx.scheduler.count_refused(code);
        write(error_response(&e))
    };
    let body = match openai::parse_body(&req.body) {
        Ok(o) => o,
        Err(e) => return refuse(ErrorCode::InvalidJson, e),
    };
    let translated = match kind {
        Kind::Chat => openai::chat_request(&body, id.clone()),
        Kind::Completion => openai::completion_request(&body, id.clone()),
    };
    let t = match translated {
        Ok(t) => t,
        Err(e) => return refuse(ErrorCode::InvalidRequest, e),
    };
    let (tx, rx) = mpsc::sync_channel(MAX_PENDING_EVENTS);
    let job = match ctx.scheduler.submit(&t.request, Box::new(ChannelSink(tx))) {
        Ok(j) => j,
        Err(e) => return write(error_response(&HttpError::from(e))),
    };
    let reply = Reply {
        id: &id,
        created: unix_now(),
        model: &ctx.model,
        kind,
        top_logprobs: t.top_logprobs,
    };
    if !t.request.stream {
        return match next_event(ctx, &rx, out, &job) {
            Some(Event::Done(d)) => write(Response::json(200, &reply.complete(&d))),
            Some(Event::Error(e)) => write(error_response(&HttpError::from(e))),
            Some(_) | None => false,
        };
    }
    // Streamed: errors found before the first token (a full queue, a
    // prompt too long) still get their own status, since nothing was sent.
    let first = match next_event(ctx, &rx, out, &job) {
        Some(Event::Error(e)) => return write(error_response(&HttpError::from(e))),
        Some(e) => e,
        None => return false,
    };
    let mut events = match EventStream::start(out, keep) {
        Ok(s) => s,
        Err(_) => {
            ctx.scheduler.cancel(&job);
            return false;
        }
    };
    let send = |v: &serde_json::Value, events: &mut EventStream| {
        events
            .send(&serde_json::to_vec(v).expect("JSON values serialise"))
            .is_ok()
    };
    if let Some(role) = reply.role_chunk() {
        if !send(&role, &mut events) {
            ctx.scheduler.cancel(&job);
            return false;
        }
    }
    let mut next = Some(first);
    while let Some(event) = next.take() {
        let ok = match event {
            Event::Token { text, .. } => send(&reply.text_chunk(&text), &mut events),
            Event::Done(d) => {
                let mut ok = send(&reply.final_chunk(&d), &mut events);
                if t.include_usage {
                    ok = ok && send(&reply.usage_chunk(&d), &mut events);
                }
                return ok && events.send(b"[DONE]").is_ok() && events.finish().is_ok();
            }
            Event::Error(e) => {
                let ok = send(&HttpError::from(e).body(), &mut events);
                return ok && events.send(b"[DONE]").is_ok() && events.finish().is_ok();
            }
            Event::Health(_) => true,
        };
        if !ok {
            log_debug!("http: client left mid-stream; cancelling its request");
            ctx.scheduler.cancel(&job);
            return false;
        }
        next = next_event(ctx, &rx, out, &job);
    }
    false
}
