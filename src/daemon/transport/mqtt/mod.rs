//! The MQTT transport: requests arrive as messages on `<prefix>/request`,
//! with the same JSON as a line on the Unix socket, and every event of the
//! reply is its own message.
//!
//! Where replies go, in order of preference: the MQTT 5 Response Topic
//! (with the request's Correlation Data copied), the `reply_to` topic in
//! the payload, `<prefix>/response/<id>`. Errors about a message that names
//! no usable destination go to `<prefix>/error`.
//!
//! Threads: the *link* thread drives the connection (reconnecting with
//! backoff) and turns messages into scheduler jobs; the *publisher* thread
//! moves replies from the outbox to the connection while it is up; the
//! *status* thread keeps the retained `<prefix>/status` current.
//!
//! Delivery: replies wait in the outbox (bounded by `max_pending_messages`;
//! token events beyond it are dropped and counted, final events always
//! kept) and, at QoS 1 and 2, stay there until the broker confirms them.
//! When the connection breaks, unconfirmed replies go back to the head of
//! the outbox and are published again after reconnection: at least once,
//! in order, possibly a duplicate around the break.

mod link;
pub mod settings;

pub use settings::Settings;

use crate::daemon::logging::{log_debug, log_info, log_warn};
use crate::daemon::protocol::{self, ApiError, Control, ErrorCode, Event, Health, Id, Incoming};
use crate::daemon::scheduler::{EventSink, JobHandle, Scheduler};
use link::{LinkEvent, Message, Received};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often waiting loops look at their stop conditions.
const TICK: Duration = Duration::from_millis(100);
/// Finished request ids remembered for redelivery detection, at most.
const MAX_REMEMBERED: usize = 10_000;

/// Where the events of one request go.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Route {
    topic: String,
    correlation: Option<Vec<u8>>,
}

struct Topics {
    request: String,
    status: String,
    error: String,
    response: String,
}

struct Entry {
    msg: Message,
    status: bool,
}

#[derive(Default)]
struct Outbox {
    /// Not yet handed to the connection.
    queue: VecDeque<Entry>,
    /// Handed over, waiting for the broker's confirmation (QoS 1 and 2),
    /// with the packet id once it went out.
    unconfirmed: VecDeque<(Option<u16>, Message)>,
    connected: bool,
    /// Token events dropped because the outbox was full.
    dropped: u64,
    /// Messages put back for resending since the last connection.
    resend: usize,
    /// Set at the very end of shutdown: the publisher stops.
    finished: bool,
}

enum Seen {
    Running(Option<JobHandle>),
    Finished(Instant),
}

/// Requests seen recently, by destination and id: QoS 1 may deliver a
/// message twice, and the second copy must not be answered again.
#[derive(Default)]
struct Recent {
    by_key: HashMap<(Route, Id), Seen>,
    finished: VecDeque<(Instant, (Route, Id))>,
}

struct Shared {
    s: Settings,
    topics: Topics,
    client: link::Client,
    scheduler: Scheduler,
    model: String,
    outbox: Mutex<Outbox>,
    /// Signalled when the outbox or the connection state changes.
    wake: Condvar,
    recent: Mutex<Recent>,
    stop: AtomicBool,
    fatal: Mutex<Option<String>>,
}

/// The running transport; see [`MqttServer::close`].
pub struct MqttServer {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is one step, so the data stays consistent after a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl MqttServer {
    /// Starts connecting to the broker in the background; requests are
    /// served from the first successful connection on.
    pub fn spawn(s: Settings, scheduler: Scheduler, model: String) -> MqttServer {
        let p = &s.prefix;
        let topics = Topics {
            request: format!("{p}/request"),
            status: format!("{p}/status"),
            error: format!("{p}/error"),
            response: format!("{p}/response"),
        };
        let will = Message {
            topic: topics.status.clone(),
            payload: offline_status(&model, "connection lost"),
            retain: true,
            correlation: None,
        };
        let (client, connection) = link::open(&s, will);
        if let Some(w) = s.packet_limit_warning() {
            log_warn!("mqtt: {w}");
        }
        log_info!(
            "mqtt: connecting to {} as '{}', requests on {}",
            s.url,
            s.client_id,
            topics.request
        );
        let shared = Arc::new(Shared {
            s,
            topics,
            client,
            scheduler,
            model,
            outbox: Mutex::new(Outbox::default()),
            wake: Condvar::new(),
            recent: Mutex::new(Recent::default()),
            stop: AtomicBool::new(false),
            fatal: Mutex::new(None),
        });
        let mut threads = Vec::new();
        let sh = shared.clone();
        threads.push(spawn("crystald-mqtt", move || sh.drive(connection)));
        let sh = shared.clone();
        threads.push(spawn("crystald-mqtt-pub", move || sh.publish_loop()));
        let sh = shared.clone();
        threads.push(spawn("crystald-mqtt-st", move || sh.status_loop()));
        MqttServer { shared, threads }
    }

    /// Set when the transport gave up (`connect_attempts` failed in a row
    /// before any connection): the daemon should exit with this error.
    pub fn fatal(&self) -> Option<String> {
        lock(&self.shared.fatal).clone()
    }

    /// Publishes `offline`, waits up to `timeout` for the replies already
    /// produced to be confirmed, and disconnects.
    pub fn close(self, timeout: Duration) {
        let sh = &self.shared;
        let payload = offline_status(&sh.model, "stopped");
        sh.push_status(payload);
        let until = Instant::now() + timeout;
        {
            let mut ob = lock(&sh.outbox);
            while ob.connected
                && !(ob.queue.is_empty() && ob.unconfirmed.is_empty())
                && Instant::now() < until
            {
                ob = sh
                    .wake
                    .wait_timeout(ob, TICK)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let left = ob.queue.len() + ob.unconfirmed.len();
            if left > 0 {
                log_warn!("mqtt: {left} messages not delivered at shutdown");
            }
            ob.finished = true;
        }
        sh.stop.store(true, Ordering::SeqCst);
        sh.client.disconnect();
        sh.wake.notify_all();
        // The link thread may sit in a connection attempt; it is not
        // worth waiting for at exit.
        let until = Instant::now() + Duration::from_secs(1);
        for t in self.threads {
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("cannot start an MQTT thread")
}

fn offline_status(model: &str, reason: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "state": "offline",
        "reason": reason,
        "model": model,
        "version": env!("CARGO_PKG_VERSION"),
        "updated": unix_now(),
    }))
    .expect("plain JSON")
}

impl Shared {
    fn qos(&self) -> u8 {
        self.s.qos
    }

    // ----- the link thread -------------------------------------------------

    fn drive(self: &Arc<Self>, mut conn: link::Connection) {
        let mut ever_connected = false;
        let mut failures = 0u32;
        let max_wait = Duration::from_secs(self.s.reconnect_max_s);
        let mut wait = Duration::from_secs(1).min(max_wait);
        let mut down_since: Option<Instant> = None;
        while let Some(ev) = conn.next() {
            match ev {
                Ok(LinkEvent::Connected {
                    session_present,
                    dropped_oversize,
                }) => {
                    ever_connected = true;
                    failures = 0;
                    wait = Duration::from_secs(1).min(max_wait);
                    if let Some(n) = dropped_oversize {
                        self.on_oversize_dropped(n);
                    }
                    self.on_connected(session_present, down_since.take());
                }
                Ok(LinkEvent::Received(r)) => self.on_message(r),
                Ok(LinkEvent::Published(pkid)) => self.on_published(pkid),
                Ok(LinkEvent::Confirmed(pkid)) => self.on_confirmed(pkid),
                Ok(LinkEvent::Disconnected) => {
                    if self.stop.load(Ordering::SeqCst) {
                        return;
                    }
                }
                Ok(LinkEvent::Other) => {}
                Err(e) => {
                    if self.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let was_up = self.on_connection_lost(&mut conn);
                    down_since.get_or_insert_with(Instant::now);
                    failures += 1;
                    if was_up {
                        log_warn!("mqtt: connection lost: {}; reconnecting", e.message);
                    } else {
                        log_warn!(
                            "mqtt: cannot connect to {}: {} (attempt {failures}; next in {}s)",
                            self.s.url,
                            e.message,
                            wait.as_secs()
                        );
                    }
                    if !ever_connected
                        && self.s.connect_attempts > 0
                        && failures >= self.s.connect_attempts
                    {
                        *lock(&self.fatal) = Some(format!(
                            "mqtt: giving up after {failures} failed connection attempts to {}: {}",
                            self.s.url, e.message
                        ));
                        return;
                    }
                    if !was_up {
                        let until = Instant::now() + wait;
                        while Instant::now() < until {
                            if self.stop.load(Ordering::SeqCst) {
                                return;
                            }
                            std::thread::sleep(TICK);
                        }
                        wait = (wait * 2).min(max_wait);
                    }
                }
            }
        }
    }

    /// Stops the hand-over, empties the connection's buffers and puts
    /// every unconfirmed message back at the head of the outbox, in order:
    /// they go out again, with new packet ids, after reconnection. Returns
    /// whether the connection had been up.
    fn on_connection_lost(&self, conn: &mut link::Connection) -> bool {
        let mut ob = lock(&self.outbox);
        let was_up = std::mem::replace(&mut ob.connected, false);
        conn.forget_pending();
        let back: Vec<_> = ob.unconfirmed.drain(..).collect();
        ob.resend += back.len();
        for (_, msg) in back.into_iter().rev() {
            ob.queue.push_front(Entry { msg, status: false });
        }
        was_up
    }

    fn on_connected(&self, session_present: bool, down_since: Option<Instant>) {
        if let Err(e) = self.client.subscribe(&self.topics.request, self.qos()) {
            log_warn!("mqtt: cannot subscribe to {}: {e}", self.topics.request);
        }
        let resent = {
            let mut ob = lock(&self.outbox);
            ob.connected = true;
            std::mem::take(&mut ob.resend)
        };
        self.wake.notify_all();
        match down_since {
            None => log_info!("mqtt: connected to {}", self.s.url),
            Some(t) => log_info!(
                "mqtt: reconnected to {} after {:.1}s (session {}; {resent} unconfirmed messages sent again)",
                self.s.url,
                t.elapsed().as_secs_f64(),
                if session_present { "kept" } else { "new" }
            ),
        }
        self.push_status(self.online_status(&self.scheduler.health()));
    }

    /// The connection broke at the header of a message over the client's
    /// limit and this one started a clean session without it. A retained
    /// one would come straight back with the subscription, so the request
    /// topic's retained message is cleared first (retained requests are
    /// never answered anyway), directly rather than through the outbox so
    /// that it goes out before the subscription.
    fn on_oversize_dropped(&self, size: usize) {
        let limit = self.s.max_incoming_packet();
        log_warn!(
            "mqtt: dropped a message of {size} bytes on a subscribed topic (the daemon reads at most {limit}) \
             by starting a clean broker session; requests queued in the old session are lost. \
             Limit messages at the broker (max_packet_size) to avoid this"
        );
        let clear = Message {
            topic: self.topics.request.clone(),
            payload: Vec::new(),
            retain: true,
            correlation: None,
        };
        if self.client.try_publish(clear, 0).is_err() {
            log_warn!(
                "mqtt: cannot clear a retained message on {}",
                self.topics.request
            );
        }
        self.error_to(
            None,
            None,
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "a message of {size} bytes was dropped unread (the limit is {limit}), \
                     with the requests queued behind it: send them again"
                ),
            ),
        );
    }

    fn on_published(&self, pkid: u16) {
        // Packet id 0: a QoS 0 publish, which no confirmation follows.
        if self.qos() == 0 || pkid == 0 {
            return;
        }
        let mut ob = lock(&self.outbox);
        if ob.unconfirmed.iter().any(|(p, _)| *p == Some(pkid)) {
            return; // a resend of a known packet
        }
        if let Some(slot) = ob.unconfirmed.iter_mut().find(|(p, _)| p.is_none()) {
            slot.0 = Some(pkid);
        }
    }

    fn on_confirmed(&self, pkid: u16) {
        let mut ob = lock(&self.outbox);
        if let Some(i) = ob.unconfirmed.iter().position(|(p, _)| *p == Some(pkid)) {
            ob.unconfirmed.remove(i);
            drop(ob);
            self.wake.notify_all();
        }
    }

    // ----- requests --------------------------------------------------------

    fn on_message(self: &Arc<Self>, r: Received) {
        if r.topic != self.topics.request {
            log_debug!("mqtt: ignoring a message on {}", r.topic);
            return;
        }
        if r.payload.is_empty() {
            // What clearing a retained message looks like to subscribers.
            return;
        }
        // The MQTT 5 response topic, when usable, also carries errors.
        let v5_route = match r.response_topic {
            Some(t) => match settings::check_topic_name(&t) {
                Ok(()) => Some(Route {
                    topic: t,
                    correlation: r.correlation.clone(),
                }),
                Err(e) => {
                    // Brokers check this, so it is rare; nowhere to answer.
                    log_warn!("mqtt: request with an invalid response topic: {e}");
                    self.error_to(
                        None,
                        None,
                        ApiError::new(
                            ErrorCode::InvalidRequest,
                            format!("the response topic is not valid: {e}"),
                        ),
                    );
                    return;
                }
            },
            None => None,
        };
        if r.retain {
            self.on_stale(&r.payload);
            return;
        }
        if r.payload.len() > self.s.max_payload {
            let e = ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "the message is {} bytes; the limit is {}",
                    r.payload.len(),
                    self.s.max_payload
                ),
            );
            return self.error_to(v5_route.as_ref(), None, e);
        }
        let mut obj = match protocol::parse_json_object(&r.payload) {
            Ok(o) => o,
            Err(rej) => return self.error_to(v5_route.as_ref(), None, rej.error),
        };
        let id = protocol::id_of(&obj);
        let reply_to = match obj.remove("reply_to") {
            None => None,
            Some(serde_json::Value::String(t)) => match settings::check_topic_name(&t) {
                Ok(()) => Some(t),
                Err(e) => {
                    let e = ApiError::new(ErrorCode::InvalidRequest, format!("reply_to: {e}"));
                    return self.error_to(v5_route.as_ref(), id.as_ref(), e);
                }
            },
            Some(_) => {
                let e = ApiError::new(ErrorCode::InvalidRequest, "reply_to must be a topic string");
                return self.error_to(v5_route.as_ref(), id.as_ref(), e);
            }
        };
        let route = v5_route
            .or_else(|| {
                reply_to.map(|topic| Route {
                    topic,
                    correlation: None,
                })
            })
            .or_else(|| id.as_ref().and_then(|id| self.default_route(id)));
        match protocol::parse_object(obj) {
            Err(rej) => self.error_to(route.as_ref(), rej.id.as_ref(), rej.error),
            Ok(incoming) => match route {
                None => self.error_to(
                    None,
                    id.as_ref(),
                    ApiError::new(
                        ErrorCode::InvalidRequest,
                        "no reply destination: give an 'id' (replies go to <prefix>/response/<id>), a 'reply_to' topic, or an MQTT 5 response topic",
                    ),
                ),
                Some(route) => self.on_incoming(incoming, route),
            },
        }
    }

    /// `<prefix>/response/<id>`, when the id makes a valid topic level.
    fn default_route(&self, id: &Id) -> Option<Route> {
        let level = match id {
            Id::Text(t) => t.clone(),
            Id::Number(n) => n.to_string(),
        };
        let ok = settings::check_topic_level("id", &level).is_ok();
        ok.then(|| Route {
            topic: format!("{}/{level}", self.topics.response),
            correlation: None,
        })
    }

    /// A retained request was stored by the broker before we subscribed,
    /// perhaps long ago: answering it at every reconnection would repeat
    /// it. It is reported on the error topic and cleared from the broker.
    fn on_stale(&self, payload: &[u8]) {
        let id = protocol::parse_json_object(payload)
            .ok()
            .and_then(|o| protocol::id_of(&o));
        log_warn!(
            "mqtt: ignoring a retained request{} on {}; clearing it",
            id.as_ref()
                .map(|i| format!(" (id {i})"))
                .unwrap_or_default(),
            self.topics.request
        );
        self.error_to(
            None,
            id.as_ref(),
            ApiError::new(
                ErrorCode::StaleRequest,
                "a retained request is not answered: publish requests without the retain flag",
            ),
        );
        self.push(
            Message {
                topic: self.topics.request.clone(),
                payload: Vec::new(),
                retain: true,
                correlation: None,
            },
            true,
        );
    }

    fn on_incoming(self: &Arc<Self>, incoming: Incoming, route: Route) {
        match incoming {
            Incoming::Request(req) => self.submit(&req, route),
            Incoming::Control(Control::Cancel { id }) => {
                let key = (route, id);
                let job = match lock(&self.recent).by_key.get(&key) {
                    Some(Seen::Running(job)) => job.clone(),
                    _ => None,
                };
                match job {
                    Some(job) => self.scheduler.cancel(&job),
                    None => log_debug!("mqtt: cancel of {}, not in flight", key.1),
                }
            }
            Incoming::Control(Control::Health { id }) => {
                let health = self.scheduler.health();
                self.reply(&route, id.as_ref(), &Event::Health(Box::new(health)), true);
            }
        }
    }

    fn submit(self: &Arc<Self>, req: &protocol::Request, route: Route) {
        let key = (route.clone(), req.id.clone());
        {
            let mut recent = lock(&self.recent);
            recent.expire(Duration::from_secs(self.s.dedup_window_s));
            if recent.by_key.contains_key(&key) {
                log_info!(
                    "mqtt: request {} delivered again; already answered or running, ignored",
                    req.id
                );
                return;
            }
            recent.by_key.insert(key.clone(), Seen::Running(None));
        }
        let sink = MqttSink {
            shared: self.clone(),
            route: route.clone(),
            id: req.id.clone(),
        };
        match self.scheduler.submit(req, Box::new(sink)) {
            Ok(job) => {
                log_debug!("mqtt: request {} queued", req.id);
                if let Some(Seen::Running(slot)) = lock(&self.recent).by_key.get_mut(&key) {
                    *slot = Some(job);
                }
            }
            Err(e) => {
                // Refused requests may be sent again with the same id.
                lock(&self.recent).by_key.remove(&key);
                log_info!("mqtt: request {} refused: {e}", req.id);
                self.reply(&route, Some(&req.id), &Event::Error(e), true);
            }
        }
    }

    fn error_to(&self, route: Option<&Route>, id: Option<&Id>, e: ApiError) {
        log_info!(
            "mqtt: rejected a message{}: {e}",
            id.map(|i| format!(" (id {i})")).unwrap_or_default()
        );
        let fallback = Route {
            topic: self.topics.error.clone(),
            correlation: None,
        };
        self.reply(route.unwrap_or(&fallback), id, &Event::Error(e), true);
    }

    fn reply(&self, route: &Route, id: Option<&Id>, event: &Event, keep: bool) {
        self.push(
            Message {
                topic: route.topic.clone(),
                payload: protocol::reply_json(id, event),
                retain: false,
                correlation: route.correlation.clone(),
            },
            keep,
        );
    }

    // ----- the outbox ------------------------------------------------------

    /// Queues a message; `keep` messages are never dropped (final events:
    /// at most one per request, and requests are bounded by the queue).
    fn push(&self, msg: Message, keep: bool) {
        let mut ob = lock(&self.outbox);
        if !keep && ob.queue.len() + ob.unconfirmed.len() >= self.s.max_pending_messages {
            ob.dropped += 1;
            let n = ob.dropped;
            drop(ob);
            if n.is_power_of_two() {
                log_warn!(
                    "mqtt: {n} token events dropped so far: {} messages wait for the broker",
                    self.s.max_pending_messages
                );
            }
            return;
        }
        ob.queue.push_back(Entry { msg, status: false });
        drop(ob);
        self.wake.notify_all();
    }

    /// Queues a status message, replacing one that has not gone out yet.
    fn push_status(&self, payload: Vec<u8>) {
        let msg = Message {
            topic: self.topics.status.clone(),
            payload,
            retain: true,
            correlation: None,
        };
        let mut ob = lock(&self.outbox);
        match ob.queue.iter_mut().find(|e| e.status) {
            Some(e) => e.msg = msg,
            None => ob.queue.push_back(Entry { msg, status: true }),
        }
        drop(ob);
        self.wake.notify_all();
    }

    /// Moves messages from the outbox to the connection while it is up.
    /// The hand-over happens under the outbox lock and never blocks, so the
    /// link thread, which resets the connection's buffers under the same
    /// lock, knows exactly which messages the connection holds.
    fn publish_loop(&self) {
        let mut ob = lock(&self.outbox);
        loop {
            if ob.finished && (ob.queue.is_empty() || !ob.connected) {
                return;
            }
            let mut stalled = false;
            while ob.connected && !stalled {
                let Some(e) = ob.queue.pop_front() else { break };
                let kept = e.msg.clone();
                match self.client.try_publish(e.msg, self.qos()) {
                    Ok(()) => {
                        if self.qos() > 0 {
                            ob.unconfirmed.push_back((None, kept));
                        }
                    }
                    Err(msg) => {
                        // The channel is full: wait for the connection to drain it.
                        ob.queue.push_front(Entry {
                            msg,
                            status: e.status,
                        });
                        stalled = true;
                    }
                }
            }
            let wait = if stalled {
                Duration::from_millis(5)
            } else {
                TICK
            };
            ob = self
                .wake
                .wait_timeout(ob, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    // ----- status ----------------------------------------------------------

    fn online_status(&self, h: &Health) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "state": if h.status == "ok" { "online" } else { "failed" },
            "model": h.model,
            "version": env!("CARGO_PKG_VERSION"),
            "queue_depth": h.queue_depth,
            "queue_capacity": h.queue_capacity,
            "running": h.running,
            "requests_total": h.requests_total,
            "uptime_s": h.uptime_s.round(),
            "updated": unix_now(),
        }))
        .expect("plain JSON")
    }

    /// Publishes the status when the load changes, and every
    /// `status_interval_s` so that its `updated` shows the daemon is alive.
    fn status_loop(&self) {
        let interval = Duration::from_secs(self.s.status_interval_s);
        let mut last: Option<(usize, usize, &'static str)> = None;
        let mut last_at = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(TICK * 2);
            if !lock(&self.outbox).connected {
                continue;
            }
            let h = self.scheduler.health();
            let now = (h.queue_depth, h.running, h.status);
            if last.is_some() && last != Some(now) || last_at.elapsed() >= interval {
                self.push_status(self.online_status(&h));
                last_at = Instant::now();
            }
            last = Some(now);
        }
    }
}

impl Recent {
    fn expire(&mut self, window: Duration) {
        let now = Instant::now();
        while let Some((at, _)) = self.finished.front() {
            if now.duration_since(*at) < window && self.finished.len() <= MAX_REMEMBERED {
                break;
            }
            let (at, key) = self.finished.pop_front().expect("non-empty");
            if matches!(self.by_key.get(&key), Some(Seen::Finished(t)) if *t == at) {
                self.by_key.remove(&key);
            }
        }
    }

    fn finish(&mut self, key: (Route, Id), window: Duration) {
        if window.is_zero() {
            self.by_key.remove(&key);
            return;
        }
        let now = Instant::now();
        self.by_key.insert(key.clone(), Seen::Finished(now));
        self.finished.push_back((now, key));
    }
}

/// Delivers one job's events as messages.
struct MqttSink {
    shared: Arc<Shared>,
    route: Route,
    id: Id,
}

impl EventSink for MqttSink {
    fn send(&mut self, event: Event) -> bool {
        let last = event.is_final();
        if last {
            let window = Duration::from_secs(self.shared.s.dedup_window_s);
            lock(&self.shared.recent).finish((self.route.clone(), self.id.clone()), window);
        }
        self.shared.reply(&self.route, Some(&self.id), &event, last);
        // A full outbox drops tokens, not the job: the final event carries
        // the whole text.
        true
    }
}
