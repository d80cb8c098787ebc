//! The one inference worker and the bounded queue in front of it. Every
//! transport submits here; the worker owns the engine and its KV pool.
//!
//! Continuous batching: up to `parallel` requests run together. Each step
//! is one forward pass over the next token of every decoding request plus
//! a chunk of at most one waiting prompt, so a weight is read once for all
//! of them; requests join at the next step and leave when done. A long
//! prompt is read a chunk per step, between the decode steps of the
//! others, so their replies keep flowing; cancel, deadlines and shutdown
//! are looked at before every step.
//!
//! The KV pool is bounded. A request is admitted only when the pool can
//! hold its prompt; a running request that cannot grow takes the blocks
//! of the most recently admitted other one, which goes back to the head of
//! the line and later resumes where it was (its prompt and reply so far
//! recomputed, or found in the prefix index). The pool always holds one
//! full context, so the oldest request always finishes.
//!
//! The worker never blocks on a client: it hands events to an
//! [`EventSink`], which must return at once.

use super::logging::{log_debug, log_error, log_info};
use super::metrics::{self, Metrics};
use super::protocol::{
    ApiError, Done, ErrorCode, Event, Health, Limits, Logprobs, Request, Timings, Usage,
};
use crate::generate::{self, FinishReason, Flow, Generation, Generator, Next};
use crate::model::forward::MAX_BATCH;
use crate::model::{Engine, EngineError, KvType, Logits, Model, Sequence, Step};
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
    /// The cancel flags of the jobs the worker is running.
    running: Vec<(u64, Arc<AtomicBool>)>,
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

/// The KV pool as the last step left it, for `health`.
#[derive(Default, Clone, Copy)]
struct PoolStats {
    tokens: usize,
    in_use_tokens: usize,
    cached_tokens: usize,
    bytes: u64,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a job is queued, when the worker finishes one, and on shutdown.
    changed: Condvar,
    stats: Mutex<Stats>,
    pool: Mutex<PoolStats>,
    tok: Arc<Tokenizer>,
    limits: Limits,
    capacity: usize,
    parallel: usize,
    model_name: String,
    kernels: &'static str,
    device: &'static str,
    gpu_bytes: Option<u64>,
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
    /// Requests that may wait behind the running ones.
    pub queue_size: usize,
    /// Requests generating together.
    pub parallel: usize,
    pub n_ctx: usize,
    /// Positions the KV pool holds, for all requests together (at least `n_ctx`).
    pub kv_pool_tokens: usize,
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
    /// Fails when the pool cannot be reserved.
    pub fn start(
        model: Model,
        tok: Arc<Tokenizer>,
        cfg: SchedulerConfig,
    ) -> Result<Worker, String> {
        let n_ctx = cfg.n_ctx.clamp(1, model.hp.context_length);
        let engine = Engine::new(&model, n_ctx, cfg.kv_pool_tokens.max(n_ctx), cfg.kv_type)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::with_capacity(cfg.queue_size),
                running: Vec::new(),
                accepting: true,
                next_ticket: 0,
            }),
            changed: Condvar::new(),
            stats: Mutex::new(Stats::default()),
            pool: Mutex::new(pool_stats(&engine)),
            tok,
            limits: Limits {
                n_ctx,
                default_max_tokens: cfg.default_max_tokens,
            },
            capacity: cfg.queue_size,
            parallel: cfg.parallel.max(1),
            model_name: model.name().to_string(),
            kernels: model.kernels.name(),
            device: model.device().name(),
            gpu_bytes: model
                .device()
                .weight_bytes()
                .map(|w| w + engine.gpu_bytes()),
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
                Batcher {
                    shared: &alive.0,
                    model: &model,
                    engine,
                    active: Vec::new(),
                    preempted: VecDeque::new(),
                    keep: cfg.kv_keep_tokens,
                    logits: Vec::new(),
                    device_failed: false,
                }
                .work();
            })
            .map_err(|e| format!("cannot start the inference worker thread: {e}"))?;
        Ok(Worker {
            scheduler: Scheduler { shared },
            thread: Some(thread),
        })
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
    /// before the next step. Its reply is a `done` with `finish_reason: "cancelled"`.
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
            (st.queue.len(), st.running.len())
        };
        let pool = *self.shared.pool.lock().unwrap_or_else(|e| e.into_inner());
        let stats = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        let alive = self.is_alive();
        Health {
            status: if alive { "ok" } else { "failed" },
            model: self.shared.model_name.clone(),
            kernels: self.shared.kernels,
            kernels_available: self.shared.kernels_available.clone(),
            device: self.shared.device,
            gpu_mib: self.shared.gpu_bytes.map(|b| b as f64 / (1 << 20) as f64),
            rss_mib: crate::procfs::status_bytes("VmRSS").map(|b| b as f64 / (1 << 20) as f64),
            uptime_s: self.shared.started.elapsed().as_secs_f64(),
            queue_depth,
            queue_capacity: self.shared.capacity,
            running,
            parallel: self.shared.parallel,
            n_ctx: self.shared.limits.n_ctx,
            kv_pool_tokens: pool.tokens,
            kv_pool_mib: pool.bytes as f64 / (1 << 20) as f64,
            kv_in_use_tokens: pool.in_use_tokens,
            kv_cached_tokens: pool.cached_tokens,
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
    /// lets the running ones finish for up to `drain`, then cancels them.
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
        while !st.running.is_empty() && self.scheduler.is_alive() {
            let now = Instant::now();
            if now >= until || hurry.try_recv().is_ok() {
                for (_, cancel) in &st.running {
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

/// Prompt tokens per step while other requests decode: their next token
/// waits for the chunk, so this bounds the gap between their tokens.
const BUSY_CHUNK: usize = 16;

/// Prompt tokens a step may read: a full batch when nobody waits for a
/// token, a short chunk while others decode.
pub fn prefill_budget(others_decoding: bool) -> usize {
    if others_decoding {
        BUSY_CHUNK
    } else {
        MAX_BATCH
    }
}

fn pool_stats(engine: &Engine) -> PoolStats {
    let pool = engine.pool();
    let block = crate::model::kv_pool::BLOCK;
    PoolStats {
        tokens: pool.capacity(),
        in_use_tokens: pool.blocks_in_use() * block,
        cached_tokens: pool.blocks_cached() * block,
        bytes: pool.bytes() as u64,
    }
}

/// A request the worker has taken on.
struct Active<'t> {
    job: Job,
    gen: Generator<'t>,
    seq: Sequence,
    /// The prompt, then every reply token the generator asked to run: what
    /// `seq` must hold before the next logits.
    tokens: Vec<u32>,
    /// Pieces of text streamed so far.
    pieces: usize,
    /// From arrival to the first admission.
    queued: Duration,
}

impl Active<'_> {
    /// Tokens still to run before the next logits: 1 while decoding, more
    /// while a prompt (or a preempted reply) is read.
    fn pending(&self) -> usize {
        self.tokens.len() - self.seq.len()
    }
}

/// Streams a job's text and notices a client that left.
fn text_sink<'s>(job: &'s mut Job, pieces: &'s mut usize) -> impl FnMut(&str) -> Flow + 's {
    move |piece| {
        if job.stream
            && !job.sink.send(Event::Token {
                index: *pieces,
                text: piece.to_string(),
            })
        {
            job.cancel.store(true, Ordering::SeqCst);
            return Flow::Cancel;
        }
        *pieces += 1;
        Flow::Continue
    }
}

/// The worker: the engine, the requests running on it, and those waiting
/// to resume after a preemption (they go before the queue).
struct Batcher<'a> {
    shared: &'a Shared,
    model: &'a Model,
    engine: Engine,
    active: Vec<Active<'a>>,
    preempted: VecDeque<Active<'a>>,
    /// Cached tokens kept when idle.
    keep: usize,
    logits: Vec<f32>,
    /// Set when the GPU failed: its state is unknown, so the worker stops
    /// (health turns "failed", systemd's watchdog restarts the daemon).
    device_failed: bool,
}

impl<'a> Batcher<'a> {
    /// Runs steps until shutdown empties the queue and every request is answered.
    fn work(mut self) {
        let mut released = true;
        let mut last_expiry_check = Instant::now();
        loop {
            if !self.admit(&mut released) {
                return;
            }
            released = false;
            // Queued jobs must hear about their deadline even while long
            // generations hold the worker.
            if last_expiry_check.elapsed() > Duration::from_millis(100) {
                last_expiry_check = Instant::now();
                self.shared.expire_queued();
            }
            // A bug in one step must not end the service: its clients get
            // an error and the engine, whose state is unknown, starts afresh.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            if outcome.is_err() {
                self.recover();
            }
            if self.device_failed {
                self.stop_after_device_failure();
                return;
            }
            *self.shared.pool.lock().unwrap_or_else(|e| e.into_inner()) = pool_stats(&self.engine);
        }
    }

    /// Takes waiting requests while there is room; when nothing runs,
    /// gives memory back and sleeps. False once shut down with nothing left.
    fn admit(&mut self, released: &mut bool) -> bool {
        loop {
            while self.active.len() < self.shared.parallel {
                if let Some(a) = self.preempted.front() {
                    if !self.fits(a.tokens.len()) {
                        break;
                    }
                    let mut a = self.preempted.pop_front().expect("front");
                    a.seq = self.lookup(&a.tokens);
                    self.active.push(a);
                    continue;
                }
                let job = {
                    let mut st = self.shared.lock();
                    match st.queue.front() {
                        Some(j) if self.fits(j.prompt.len()) => {
                            let j = st.queue.pop_front().expect("front");
                            st.running.push((j.ticket, j.cancel.clone()));
                            j
                        }
                        _ => break,
                    }
                };
                self.start(job);
            }
            if !self.active.is_empty() {
                return true;
            }
            let st = self.shared.lock();
            if !st.queue.is_empty() {
                continue;
            }
            if !st.accepting {
                return false;
            }
            if !*released {
                // Idle now: give back what the last requests grew, but not
                // between queued requests (they may share a prefix).
                drop(st);
                self.engine.release_memory(self.keep);
                *released = true;
                *self.shared.pool.lock().unwrap_or_else(|e| e.into_inner()) =
                    pool_stats(&self.engine);
                log_debug!(
                    "idle: kept {} cached tokens",
                    self.engine.pool().blocks_cached() * crate::model::kv_pool::BLOCK
                );
                continue;
            }
            drop(
                self.shared
                    .changed
                    .wait(st)
                    .unwrap_or_else(|e| e.into_inner()),
            );
        }
    }

    /// Whether a sequence of `tokens` may start: always when nothing else
    /// runs (the pool holds a full context), otherwise when the pool has
    /// room for all of it, so running requests keep room to grow.
    fn fits(&self, tokens: usize) -> bool {
        let pool = self.engine.pool();
        self.active.is_empty()
            || tokens.div_ceil(crate::model::kv_pool::BLOCK) <= pool.blocks_available()
    }

    /// The longest cached prefix of `tokens`, leaving the last one to run:
    /// its logits are the next ones.
    fn lookup(&mut self, tokens: &[u32]) -> Sequence {
        self.engine.pool_mut().lookup(tokens, tokens.len() - 1)
    }

    fn start(&mut self, job: Job) {
        let now = Instant::now();
        let mut job = job;
        if job.cancel.load(Ordering::SeqCst) {
            let done = cancelled_before_start(&job);
            job.finish(done);
        } else if job.deadline.is_some_and(|d| d <= now) {
            job.finish(Event::error(
                ErrorCode::DeadlineExceeded,
                "timeout_ms passed while the request was queued",
            ));
        } else {
            let seq = self.lookup(&job.prompt);
            let tok: &'a Tokenizer = &self.shared.tok;
            let gen = Generator::new(tok, &job.prompt, &job.params, seq.len());
            self.active.push(Active {
                tokens: job.prompt.clone(),
                queued: now - job.arrived,
                job,
                gen,
                seq,
                pieces: 0,
            });
            return;
        }
        self.shared.forget(job.ticket);
    }

    /// One forward pass over the next tokens of every running request.
    fn step(&mut self) {
        let now = Instant::now();
        for i in (0..self.active.len()).rev() {
            let j = &self.active[i].job;
            if j.cancel.load(Ordering::SeqCst) || j.deadline.is_some_and(|d| d <= now) {
                let mut a = self.active.remove(i);
                a.gen.cancel();
                self.finish(a);
            }
        }
        if self.active.is_empty() {
            return;
        }
        let plan = loop {
            let plan = self.plan();
            let pool = self.engine.pool();
            let needed: usize = plan
                .iter()
                .map(|&(i, n, _)| pool.blocks_needed(&self.active[i].seq, n))
                .sum();
            if needed <= pool.blocks_available() || self.active.len() == 1 {
                break plan;
            }
            self.preempt_youngest();
        };

        let n_ctx = self.engine.n_ctx();
        let mut steps: Vec<Step<'_>> = Vec::with_capacity(plan.len());
        let mut planned = plan.iter().peekable();
        for (i, a) in self.active.iter_mut().enumerate() {
            let Some(&(_, n, logits)) = planned.next_if(|p| p.0 == i) else {
                continue;
            };
            let from = a.seq.len();
            steps.push(Step {
                seq: &mut a.seq,
                tokens: &a.tokens[from..from + n],
                logits,
            });
        }
        let result = self.engine.step(self.model, &mut steps);
        drop(steps);
        match result {
            Ok(out) => {
                self.logits.clear();
                self.logits.extend_from_slice(out);
            }
            Err(e) => {
                // Checked before each step, so this is a bug or the GPU
                // failing; only the requests in the step can be blamed.
                log_error!("a step failed: {e}");
                for &(i, _, _) in plan.iter().rev() {
                    let mut a = self.active.remove(i);
                    self.engine.pool_mut().release(std::mem::take(&mut a.seq));
                    a.job
                        .finish(Event::error(ErrorCode::Internal, e.to_string()));
                    self.shared.forget(a.job.ticket);
                }
                self.device_failed = matches!(e, EngineError::Device(_));
                return;
            }
        }

        let vocab = self.model.hp.vocab_size;
        let mut rows = self.logits.chunks_exact_mut(vocab);
        let mut done = Vec::new();
        for &(i, _, logits) in &plan {
            if logits != Logits::Last {
                continue;
            }
            let row = rows.next().expect("one row per Last step");
            let a = &mut self.active[i];
            let room = a.seq.len() < n_ctx;
            let Active {
                job, gen, pieces, ..
            } = a;
            match gen.advance(row, room, &mut text_sink(job, pieces)) {
                Next::Feed(id) => a.tokens.push(id),
                Next::Done => done.push(i),
            }
        }
        for &i in done.iter().rev() {
            let a = self.active.remove(i);
            self.finish(a);
        }
    }

    /// What each running request runs this step: `(index, tokens, logits)`.
    /// Every decoding request its one token; the waiting prompts share a
    /// chunk, small while others decode so that their tokens keep coming.
    fn plan(&self) -> Vec<(usize, usize, Logits)> {
        let decoding = self.active.iter().any(|a| a.pending() == 1);
        let mut budget = prefill_budget(decoding);
        let mut plan = Vec::with_capacity(self.active.len());
        for (i, a) in self.active.iter().enumerate() {
            let p = a.pending();
            if p == 1 {
                plan.push((i, 1, Logits::Last));
            } else if budget > 0 {
                let n = p.min(budget);
                budget -= n;
                let logits = if n == p { Logits::Last } else { Logits::None };
                plan.push((i, n, logits));
            }
        }
        plan
    }

    /// Gives the pool blocks of the most recently admitted request to the
    /// others; it resumes when there is room again. Its indexed blocks stay
    /// cached, so a resume often finds most of them.
    fn preempt_youngest(&mut self) {
        let mut a = self.active.pop().expect("more than one running");
        self.engine.pool_mut().release(std::mem::take(&mut a.seq));
        log_info!(
            "KV pool full: a request is paused at {} tokens until others finish",
            a.tokens.len()
        );
        self.preempted.push_front(a);
    }

    fn finish(&mut self, a: Active<'a>) {
        let Active {
            mut job,
            gen,
            seq,
            mut pieces,
            queued,
            ..
        } = a;
        self.engine.pool_mut().release(seq);
        let g = gen.finish(&mut text_sink(&mut job, &mut pieces));
        let event = done_event(self.shared, &job, g, queued);
        job.finish(event);
        self.shared.forget(job.ticket);
    }

    /// After a GPU error: every other request, running or queued, gets an
    /// error now rather than waiting on a worker that is about to stop.
    fn stop_after_device_failure(&mut self) {
        log_error!(
            "the GPU failed; the worker stops and the daemon reports \"failed\" \
             until it is restarted (under systemd the watchdog restarts it)"
        );
        let why = "the GPU failed; the daemon must be restarted";
        let queued: Vec<Job> = {
            let mut st = self.shared.lock();
            st.accepting = false;
            st.queue.drain(..).collect()
        };
        for mut job in queued {
            job.finish(Event::error(ErrorCode::Internal, why));
        }
        self.fail_in_flight(why);
    }

    /// Every running or preempted request that has not been answered gets
    /// an `internal` error saying `why`, and leaves the worker.
    fn fail_in_flight(&mut self, why: &str) {
        let all: Vec<Active<'a>> = self
            .active
            .drain(..)
            .chain(self.preempted.drain(..))
            .collect();
        for mut a in all {
            if !a.job.answered {
                a.job.finish(Event::error(ErrorCode::Internal, why));
            }
            self.shared.forget(a.job.ticket);
        }
    }

    /// After a panic: every request in flight gets an error, and the engine
    /// starts afresh.
    fn recover(&mut self) {
        log_error!("a step panicked; its requests fail and the KV pool is reset");
        self.fail_in_flight("the request failed inside the daemon");
        let pool = self.engine.pool();
        let (n_ctx, tokens, ty) = (self.engine.n_ctx(), pool.capacity(), pool.kv_type());
        self.engine = Engine::new(self.model, n_ctx, tokens, ty)
            .unwrap_or_else(|e| panic!("cannot rebuild the engine: {e}"));
    }
}

impl Shared {
    /// A job left the worker: shutdown may be waiting for that.
    fn forget(&self, ticket: u64) {
        self.lock().running.retain(|(t, _)| *t != ticket);
        self.changed.notify_all();
    }
}

fn done_event(shared: &Shared, job: &Job, g: Generation, queued: Duration) -> Event {
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
