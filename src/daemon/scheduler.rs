//! The one inference worker and the bounded queue in front of it. Every
//! transport submits here; the worker owns the model session, so the KV
//! cache of the last prompt survives between requests (the prefix cache).
//!
//! Jobs run one at a time: on the small devices this daemon targets, one
//! generation already uses every core, and interleaving would only thrash
//! the cache. The worker never blocks on a client: it hands events to an
//! [`EventSink`], which must return at once.

use super::logging::{log_debug, log_error, log_info};
use super::metrics::{self, Metrics};
use super::protocol::{
    ApiError, Done, ErrorCode, Event, Health, Limits, Logprobs, Request, Timings, Usage,
};
use crate::generate::{self, FinishReason, Flow};
use crate::model::{EngineError, KvType, Model, Session};
use crate::tokenizer::Tokenizer;
use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where a job's events go. Called on the worker thread: it must not block.
pub trait EventSink: Send {
    /// Delivers one event; `false` means nobody will read the rest (the
    /// client left or cannot keep up), and the job is cancelled.
    fn send(&mut self, event: Event) -> bool;
}

/// Refers to a submitted job, for cancelling it.
#[derive(Clone, Debug)]
pub struct JobHandle {
    ticket: u64,
    cancel: Arc<AtomicBool>,
}

struct Job {
    ticket: u64,
    prompt: Vec<u32>,
    params: generate::GenerateParams,
    stream: bool,
    arrived: Instant,
    deadline: Option<Instant>,
    cancel: Arc<AtomicBool>,
    sink: Box<dyn EventSink>,
    /// Whether the final event was sent.
    answered: bool,
    metrics: Arc<Metrics>,
}

impl Job {
    fn finish(&mut self, event: Event) {
        debug_assert!(event.is_final());
        match &event {
            Event::Done(d) => self.metrics.done(d),
            Event::Error(e) => self.metrics.error(e.code),
            Event::Token { .. } | Event::Health(_) => {}
        }
        self.answered = true;
        self.sink.send(event);
    }
}

struct State {
    queue: VecDeque<Job>,
    /// The cancel flag of the job the worker is running.
    running: Option<(u64, Arc<AtomicBool>)>,
    accepting: bool,
    next_ticket: u64,
}

#[derive(Default)]
struct Stats {
    requests_total: u64,
    completion_tokens_total: u64,
    /// Tokens from decode steps (the first of each reply comes from prefill).
    decoded_tokens_total: u64,
    decode_secs_total: f64,
    last_tokens_per_s: f64,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a job is queued, when the worker finishes one, and on shutdown.
    changed: Condvar,
    stats: Mutex<Stats>,
    tok: Arc<Tokenizer>,
    limits: Limits,
    capacity: usize,
    model_name: String,
    kernels: &'static str,
    /// Every kernel set this CPU offers, best first (for `health`).
    kernels_available: Vec<&'static str>,
    started: Instant,
    worker_alive: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take the daemon down with it; the
        // state stays consistent because every update is a single step.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes queued jobs whose deadline passed and tells their clients.
    fn expire_queued(&self) {
        let now = Instant::now();
        let expired: Vec<Job> = {
            let mut st = self.lock();
            if !st
                .queue
                .iter()
                .any(|j| j.deadline.is_some_and(|d| d <= now))
            {
                return;
            }
            let (gone, kept): (Vec<Job>, Vec<Job>) = std::mem::take(&mut st.queue)
                .into_iter()
                .partition(|j| j.deadline.is_some_and(|d| d <= now));
            st.queue = kept.into();
            gone
        };
        for mut job in expired {
            job.finish(Event::error(
                ErrorCode::DeadlineExceeded,
                "timeout_ms passed while the request was queued",
            ));
        }
    }
}

pub struct SchedulerConfig {
    /// Requests that may wait behind the running one.
    pub queue_size: usize,
    pub n_ctx: usize,
    pub kv_type: KvType,
    pub default_max_tokens: usize,
    /// Cached tokens kept for prefix reuse when the worker goes idle; the
    /// rest of the KV cache and the scratch memory are given back.
    pub kv_keep_tokens: usize,
}

/// Cheap to clone; every clone talks to the same worker.
#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
}

/// Owns the worker thread; dropping it without [`Worker::shutdown`] leaves
/// the worker running until the process exits.
pub struct Worker {
    scheduler: Scheduler,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    /// Starts the inference worker. The context is capped at the model's.
    pub fn start(model: Model, tok: Arc<Tokenizer>, cfg: SchedulerConfig) -> Worker {
        let n_ctx = cfg.n_ctx.clamp(1, model.hp.context_length);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::with_capacity(cfg.queue_size),
                running: None,
                accepting: true,
                next_ticket: 0,
            }),
            changed: Condvar::new(),
            stats: Mutex::new(Stats::default()),
            tok,
            limits: Limits {
                n_ctx,
                default_max_tokens: cfg.default_max_tokens,
            },
            capacity: cfg.queue_size,
            model_name: model.name().to_string(),
            kernels: model.kernels.name(),
            kernels_available: crate::kernels::available()
                .iter()
                .map(|k| k.name())
                .collect(),
            started: Instant::now(),
            worker_alive: AtomicBool::new(true),
            metrics: Arc::new(Metrics::default()),
        });
        let for_worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("crystald-worker".into())
            .spawn(move || {
                // Marks the worker dead however it ends, so health and the
                // watchdog notice a panic.
                struct Alive(Arc<Shared>);
                impl Drop for Alive {
                    fn drop(&mut self) {
                        self.0.worker_alive.store(false, Ordering::SeqCst);
                        self.0.changed.notify_all();
                    }
                }
                let alive = Alive(for_worker);
                work(&alive.0, &model, cfg.kv_type, cfg.kv_keep_tokens);
            })
            .expect("cannot start the inference worker thread");
        Worker {
            scheduler: Scheduler { shared },
            thread: Some(thread),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// Checks the request and queues it; errors are for the client. Tokenizing
    /// happens here, on the caller's thread, so bad requests never reach the
    /// queue and the worker only computes.
    pub fn submit(&self, req: &Request, sink: Box<dyn EventSink>) -> Result<JobHandle, ApiError> {
        self.enqueue(req, sink)
            .inspect_err(|e| self.shared.metrics.error(e.code))
    }

    fn enqueue(&self, req: &Request, sink: Box<dyn EventSink>) -> Result<JobHandle, ApiError> {
        let arrived = Instant::now();
        let p = req.prepare(&self.shared.tok, &self.shared.limits, random_seed)?;
        let cancel = Arc::new(AtomicBool::new(false));
        if !self.is_alive() {
            return Err(ApiError::new(
                ErrorCode::Internal,
                "the inference worker has stopped",
            ));
        }
        let mut st = self.shared.lock();
        if !st.accepting {
            return Err(ApiError::new(
                ErrorCode::ShuttingDown,
                "the daemon is shutting down",
            ));
        }
        if st.queue.len() >= self.shared.capacity {
            return Err(ApiError::new(
                ErrorCode::Busy,
                format!(
                    "the queue is full ({} waiting); retry later",
                    self.shared.capacity
                ),
            ));
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queue.push_back(Job {
            ticket,
            prompt: p.prompt,
            params: p.params,
            stream: p.stream,
            arrived,
            deadline: p.timeout.map(|t| arrived + t),
            cancel: cancel.clone(),
            sink,
            answered: false,
            metrics: self.shared.metrics.clone(),
        });
        drop(st);
        self.shared.changed.notify_all();
        Ok(JobHandle { ticket, cancel })
    }

    /// Cancels a job: a queued one is answered at once, a running one stops
    /// at its next token. Its reply is a `done` with `finish_reason: "cancelled"`.
    pub fn cancel(&self, job: &JobHandle) {
        job.cancel.store(true, Ordering::SeqCst);
        let removed = {
            let mut st = self.shared.lock();
            st.queue
                .iter()
                .position(|j| j.ticket == job.ticket)
                .and_then(|i| st.queue.remove(i))
        };
        if let Some(mut j) = removed {
            log_debug!("request cancelled while queued");
            let done = cancelled_before_start(&j);
            j.finish(done);
        }
    }

    pub fn health(&self) -> Health {
        let (queue_depth, running) = {
            let st = self.shared.lock();
            (st.queue.len(), usize::from(st.running.is_some()))
        };
        let stats = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        let alive = self.is_alive();
        Health {
            status: if alive { "ok" } else { "failed" },
            model: self.shared.model_name.clone(),
            kernels: self.shared.kernels,
            kernels_available: self.shared.kernels_available.clone(),
            uptime_s: self.shared.started.elapsed().as_secs_f64(),
            queue_depth,
            queue_capacity: self.shared.capacity,
            running,
            n_ctx: self.shared.limits.n_ctx,
            requests_total: stats.requests_total,
            completion_tokens_total: stats.completion_tokens_total,
            tokens_per_s: stats.last_tokens_per_s,
            avg_tokens_per_s: stats.decoded_tokens_total as f64 / stats.decode_secs_total.max(1e-9),
        }
    }

    /// The Prometheus exposition of the requests served so far.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render(
            &self.health(),
            &metrics::Info {
                version: env!("CARGO_PKG_VERSION"),
                model: &self.shared.model_name,
                kernels: self.shared.kernels,
            },
        )
    }

    /// Records a request refused by a transport before it reached
    /// [`Scheduler::submit`] (a body too large, not JSON...).
    pub fn count_refused(&self, code: ErrorCode) {
        self.shared.metrics.error(code);
    }

    /// Whether the worker thread is still running (it only ends on shutdown
    /// or a panic).
    pub fn is_alive(&self) -> bool {
        self.shared.worker_alive.load(Ordering::SeqCst)
    }
}

impl Worker {
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Stops taking requests, answers the queued ones with `shutting_down`,
    /// lets the running one finish for up to `drain`, then cancels it.
    /// `hurry` ends the drain early when it receives anything (a second
    /// signal).
    pub fn shutdown(mut self, drain: Duration, hurry: &std::sync::mpsc::Receiver<()>) {
        let shared = &self.scheduler.shared;
        let queued: Vec<Job> = {
            let mut st = shared.lock();
            st.accepting = false;
            st.queue.drain(..).collect()
        };
        shared.changed.notify_all();
        for mut job in queued {
            job.finish(Event::error(
                ErrorCode::ShuttingDown,
                "the daemon is shutting down",
            ));
        }
        let until = Instant::now() + drain;
        let mut st = shared.lock();
        while st.running.is_some() && self.scheduler.is_alive() {
            let now = Instant::now();
            if now >= until || hurry.try_recv().is_ok() {
                if let Some((_, cancel)) = &st.running {
                    cancel.store(true, Ordering::SeqCst);
                }
                break;
            }
            let wait = (until - now).min(Duration::from_millis(100));
            st = shared
                .changed
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(st);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A seed nobody can predict, from the process's randomly keyed hasher.
fn random_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn cancelled_before_start(job: &Job) -> Event {
    Event::Done(Box::new(Done {
        text: String::new(),
        finish_reason: FinishReason::Cancelled,
        usage: Usage {
            prompt_tokens: job.prompt.len(),
            completion_tokens: 0,
            cached_tokens: 0,
        },
        timings: Timings {
            queued_ms: ms(job.arrived.elapsed()),
            prompt_ms: 0.0,
            generation_ms: 0.0,
            prompt_tokens_per_s: 0.0,
            generation_tokens_per_s: 0.0,
        },
        seed: job.params.sampling.seed,
        logprobs: None,
    }))
}

/// The worker loop: takes jobs until shutdown empties the queue.
fn work(shared: &Shared, model: &Model, kv_type: KvType, keep: usize) {
    let mut session = Session::new(model, shared.limits.n_ctx, kv_type);
    let mut released = true;
    loop {
        let job = {
            let mut st = shared.lock();
            loop {
                if let Some(job) = st.queue.pop_front() {
                    st.running = Some((job.ticket, job.cancel.clone()));
                    break job;
                }
                if !st.accepting {
                    return;
                }
                if !released {
                    // Idle now: give back what the last requests grew, but
                    // not between queued requests (they may share a prefix).
                    drop(st);
                    session.release(keep);
                    released = true;
                    log_debug!("idle: kept {} cached tokens", session.pos());
                    st = shared.lock();
                    continue;
                }
                st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        released = false;
        // A bug in one request must not end the service: the client gets
        // an error and the session, whose state is unknown, starts afresh.
        let mut job = job;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(shared, model, &mut session, &mut job)
        }));
        if outcome.is_err() {
            log_error!("a request panicked; the KV cache is reset");
            session = Session::new(model, shared.limits.n_ctx, kv_type);
            if !job.answered {
                job.finish(Event::error(
                    ErrorCode::Internal,
                    "the request failed inside the daemon",
                ));
            }
        }
        shared.lock().running = None;
        shared.changed.notify_all();
        shared.expire_queued();
    }
}

fn run(shared: &Shared, model: &Model, session: &mut Session, job: &mut Job) {
    if job.cancel.load(Ordering::SeqCst) {
        let done = cancelled_before_start(job);
        job.finish(done);
        return;
    }
    let started = Instant::now();
    if job.deadline.is_some_and(|d| d <= started) {
        job.finish(Event::error(
            ErrorCode::DeadlineExceeded,
            "timeout_ms passed while the request was queued",
        ));
        return;
    }
    let queued = started - job.arrived;
    let mut last_expiry_check = started;
    let mut pieces = 0usize;
    let (sink, cancel, deadline, stream) = (&mut job.sink, &job.cancel, job.deadline, job.stream);
    let result = generate::generate(
        model,
        session,
        &shared.tok,
        &job.prompt,
        &job.params,
        &mut |piece| {
            let now = Instant::now();
            // Queued jobs must hear about their deadline even while a long
            // generation holds the worker.
            if now - last_expiry_check > Duration::from_millis(100) {
                last_expiry_check = now;
                shared.expire_queued();
            }
            if cancel.load(Ordering::SeqCst) || deadline.is_some_and(|d| d <= now) {
                return Flow::Cancel;
            }
            if stream
                && !sink.send(Event::Token {
                    index: pieces,
                    text: piece.to_string(),
                })
            {
                cancel.store(true, Ordering::SeqCst);
                return Flow::Cancel;
            }
            pieces += 1;
            Flow::Continue
        },
    );
    let event = match result {
        Ok(g) => {
            let mut stats = shared.stats.lock().unwrap_or_else(|e| e.into_inner());
            stats.requests_total += 1;
            stats.completion_tokens_total += g.completion_tokens() as u64;
            stats.decode_secs_total += g.decode_time.as_secs_f64();
            let decoded = g.completion_tokens().saturating_sub(1) as u64;
            stats.decoded_tokens_total += decoded;
            // A one-token reply has no decode speed; keep the last known one.
            if decoded > 0 {
                stats.last_tokens_per_s = g.decode_tokens_per_s();
            }
            drop(stats);
            // Sizes and speeds only: prompts and replies stay out of the journal.
            log_info!(
                "request done: {} prompt tokens ({} cached), {} generated, {:.1} tok/s, finish {}",
                g.prompt_tokens,
                g.cached_tokens,
                g.completion_tokens(),
                g.decode_tokens_per_s(),
                g.finish.as_str()
            );
            Event::Done(Box::new(Done {
                finish_reason: g.finish,
                usage: Usage {
                    prompt_tokens: g.prompt_tokens,
                    completion_tokens: g.completion_tokens(),
                    cached_tokens: g.cached_tokens,
                },
                timings: Timings {
                    queued_ms: ms(queued),
                    prompt_ms: ms(g.prefill_time),
                    generation_ms: ms(g.decode_time),
                    prompt_tokens_per_s: g.prefill_tokens_per_s(),
                    generation_tokens_per_s: g.decode_tokens_per_s(),
                },
                seed: job.params.sampling.seed,
                logprobs: (job.params.logprobs > 0)
                    .then(|| Logprobs::from_generation(&shared.tok, &g.logprobs)),
                text: g.text,
            }))
        }
        Err(EngineError::ContextFull { needed, capacity }) => Event::error(
            ErrorCode::ContextLengthExceeded,
            format!("{needed} tokens needed, the context holds {capacity}"),
        ),
        Err(e) => {
            log_error!("generation failed: {e}");
            Event::error(ErrorCode::Internal, e.to_string())
        }
    };
    job.finish(event);
}
