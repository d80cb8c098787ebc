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
//!
//! Fleets (`share_group`): several daemons take requests from one topic
//! through an MQTT shared subscription, each message delivered to one of
//! them; each keeps its own status topic and queue. There requests are
//! acknowledged only when the daemon is done with them (`acks.rs`), and an
//! MQTT 5 broker is told how many the daemon can hold (Receive Maximum).

mod acks;
mod dedup;
mod link;
mod outbox;
mod routing;
pub mod settings;

pub use settings::Settings;

use crate::daemon::logging::{log_error, log_info, log_warn};
use crate::daemon::protocol::{ApiError, ErrorCode, Health, Id};
use crate::daemon::scheduler::Scheduler;
use crate::daemon::transport::inflight::InFlight;
use dedup::Answered;
use link::{LinkEvent, Message};
use outbox::Outbox;
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
    /// Where requests are published, and the topic they arrive under.
    request: String,
    /// What the daemon subscribes to: `request`, or its shared subscription.
    subscription: String,
    status: String,
    error: String,
    response: String,
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
    /// Requests queued or running, by destination and id.
    inflight: InFlight<(Route, Id)>,
    answered: Mutex<Answered<(Route, Id)>>,
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
            request: s.request_topic(),
            subscription: s.request_filter(),
            status: s.status_topic(),
            error: format!("{p}/error"),
            response: format!("{p}/response"),
        };
        let will = Message {
            topic: topics.status.clone(),
            payload: offline_status(&model, "connection lost"),
            retain: true,
            correlation: None,
        };
        // What the daemon can take at once without refusing any: its
        // queue. Not more: a burst reaches the queue before the worker
        // starts any of it.
        let capacity = scheduler.health().queue_capacity;
        let (client, connection) = link::open(&s, will, capacity);
        if let Some(w) = s.packet_limit_warning() {
            log_warn!("mqtt: {w}");
        }
        log_info!(
            "mqtt: connecting to {} as '{}', requests on {}{}",
            s.url,
            s.client_id,
            topics.subscription,
            if s.flow_control() {
                format!(" (at most {capacity} unacknowledged)")
            } else {
                String::new()
            }
        );
        let s_dedup_window = s.dedup_window_s;
        let shared = Arc::new(Shared {
            s,
            topics,
            client,
            scheduler,
            model,
            outbox: Mutex::new(Outbox::default()),
            wake: Condvar::new(),
            inflight: InFlight::default(),
            answered: Mutex::new(Answered::new(
                Duration::from_secs(s_dedup_window),
                MAX_REMEMBERED,
            )),
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
            while ob.connected && ob.pending() > 0 && Instant::now() < until {
                ob = sh
                    .wake
                    .wait_timeout(ob, TICK)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let left = ob.pending();
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
                Ok(LinkEvent::SubscribeRefused(why)) => log_error!(
                    "mqtt: the broker refused the subscription to {}: {why}",
                    self.topics.subscription
                ),
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
        conn.forget_pending();
        ob.connection_lost()
    }

    fn on_connected(&self, session_present: bool, down_since: Option<Instant>) {
        if let Err(e) = self.client.subscribe(&self.topics.subscription, self.qos()) {
            log_warn!(
                "mqtt: cannot subscribe to {}: {e}",
                self.topics.subscription
            );
        }
        let resent = { lock(&self.outbox).reconnected() };
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
        if self.qos() > 0 {
            lock(&self.outbox).published(pkid);
        }
    }

    fn on_confirmed(&self, pkid: u16) {
        if lock(&self.outbox).confirmed(pkid) {
            self.wake.notify_all();
        }
    }

    // ----- the outbox ------------------------------------------------------

    /// Queues a message; `keep` messages are never dropped (final events).
    fn push(&self, msg: Message, keep: bool) {
        let pushed = lock(&self.outbox).push(msg, keep, self.s.max_pending_messages);
        match pushed {
            Ok(()) => self.wake.notify_all(),
            Err(n) if n.is_power_of_two() => log_warn!(
                "mqtt: {n} token events dropped so far: {} messages wait for the broker",
                self.s.max_pending_messages
            ),
            Err(_) => {}
        }
    }

    /// The daemon is done with a received request (flow control): it is
    /// acknowledged after what is queued now, its reply among it.
    fn ack(&self, t: acks::Ticket) {
        lock(&self.outbox).ack_after_queued(t);
        self.wake.notify_all();
    }

    /// Queues a status message, replacing one that has not gone out yet.
    fn push_status(&self, payload: Vec<u8>) {
        lock(&self.outbox).push_status(Message {
            topic: self.topics.status.clone(),
            payload,
            retain: true,
            correlation: None,
        });
        self.wake.notify_all();
    }

    /// Moves messages from the outbox to the connection while it is up.
    /// The hand-over happens under the outbox lock and never blocks, so the
    /// link thread, which resets the connection's buffers under the same
    /// lock, knows exactly which messages the connection holds.
    fn publish_loop(&self) {
        let mut ob = lock(&self.outbox);
        loop {
            if ob.finished && (!ob.has_queued() || !ob.connected) {
                return;
            }
            let stalled = ob.hand_over(
                self.qos(),
                |m| self.client.try_publish(m, self.qos()),
                |pkid, qos| self.client.ack(pkid, qos),
            );
            // A full channel: wait for the connection to drain it.
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
