//! `crystald serve`: the long-running daemon.
//!
//! - [`protocol`]: requests, replies and their checks (transport-neutral);
//! - [`scheduler`]: the bounded queue and the inference worker;
//! - [`transport`]: how clients connect (the Unix socket, MQTT, HTTP);
//! - [`metrics`]: counters and histograms of the requests served;
//! - [`access`]: which peers are served;
//! - [`budget`]: the memory the daemon needs, checked at start;
//! - [`lifecycle`]: sockets, signals, systemd notifications;
//! - [`config`], [`logging`].
//!
//! The daemon has no unsafe code except adopting a socket-activation
//! descriptor (see [`lifecycle`]).
#![deny(unsafe_code)]

pub mod access;
pub mod budget;
pub mod config;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod scheduler;
pub mod transport;

use crate::gguf::checksum::Verdict;
use crate::model::{KvPool, KvType, Model, Prefetch};
use crate::tokenizer::Tokenizer;
use config::{Config, MemoryCheck};
use logging::{log_error, log_info, log_warn};
use scheduler::{Scheduler, SchedulerConfig};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use transport::http::HttpServer;
use transport::mqtt::MqttServer;
use transport::unix::{UnixOptions, UnixServer};

/// How long replies already produced may take to reach clients at exit.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the daemon until SIGINT or SIGTERM. `load` loads the model named in
/// the configuration; it is called after the socket is claimed, so a second
/// daemon fails before spending time on it.
pub fn serve(
    cfg: Config,
    load: impl FnOnce(&Config) -> Result<(Model, Tokenizer), String>,
) -> Result<(), String> {
    cfg.validate()?;
    logging::set_level(cfg.log_level);
    let mqtt_settings = match &cfg.mqtt {
        Some(m) => Some(
            transport::mqtt::Settings::resolve(m, cfg.max_line_bytes)
                .map_err(|e| format!("mqtt: {e}"))?,
        ),
        None => None,
    };
    let access = access::Access::resolve(&cfg.allowed_users, &cfg.allowed_groups)?;
    let signals = lifecycle::signals()?;
    // Bound before loading, so a port in use fails at once.
    let http_bound = match &cfg.http {
        Some(h) => Some(transport::http::bind(
            h,
            cfg.socket_mode.0,
            cfg.socket_group.as_deref(),
        )?),
        None => None,
    };
    let (listener, bound) = match lifecycle::inherited_listener()? {
        Some(l) => {
            log_info!("using the socket passed by systemd");
            (l, None)
        }
        None => {
            let (l, guard) =
                lifecycle::bind(&cfg.socket, cfg.socket_mode.0, cfg.socket_group.as_deref())?;
            (l, Some(guard))
        }
    };
    let model_path = cfg.model.clone().expect("validated");
    lifecycle::notify("STATUS=Loading the model");
    log_info!("loading {}", model_path.display());
    let (model, tok) = load(&cfg)?;
    if signals.try_recv().is_ok() {
        log_info!("stop requested while loading; exiting");
        return Ok(());
    }
    let n_ctx = cfg
        .ctx
        .unwrap_or(model.hp.context_length)
        .min(model.hp.context_length);
    let kv_type = cfg.kv_type;
    let name = model.name().to_string();
    log_info!(
        "model {name}: {} layers, context {} (serving {n_ctx}), device {}, kernels {}, {} threads",
        model.hp.n_layer,
        model.hp.context_length,
        model.device().name(),
        model.kernels.name(),
        model.threads()
    );
    let bytes_per_token = KvPool::full_bytes(kv_type, model.hp.n_layer, model.hp.n_embd, 1)
        / crate::model::kv_pool::BLOCK as u64;
    let pool_tokens = cfg.kv_budget.tokens(bytes_per_token);
    if pool_tokens < n_ctx {
        return Err(format!(
            "kv_budget holds {pool_tokens} tokens, less than one full context \
             (ctx = {n_ctx}): raise kv_budget or lower ctx"
        ));
    }
    log_info!(
        "KV pool: {pool_tokens} tokens ({} MiB of {}), up to {} requests at once",
        KvPool::full_bytes(kv_type, model.hp.n_layer, model.hp.n_embd, pool_tokens) >> 20,
        kv_type.name(),
        cfg.parallel
    );
    prepare(&cfg, &model, pool_tokens, kv_type)?;
    if signals.try_recv().is_ok() {
        log_info!("stop requested while preparing; exiting");
        return Ok(());
    }
    let worker = Scheduler::start(
        model,
        Arc::new(tok),
        SchedulerConfig {
            queue_size: cfg.queue_size,
            parallel: cfg.parallel,
            n_ctx,
            kv_pool_tokens: pool_tokens,
            kv_type,
            default_max_tokens: cfg.default_max_tokens,
            kv_keep_tokens: cfg.kv_keep_tokens,
        },
    )?;
    let mut server = UnixServer::spawn(
        listener,
        worker.scheduler().clone(),
        access.clone(),
        UnixOptions {
            max_line_bytes: cfg.max_line_bytes,
            max_pending_replies: cfg.max_pending_replies,
            max_connections: cfg.max_connections,
        },
    );
    let mqtt =
        mqtt_settings.map(|s| MqttServer::spawn(s, worker.scheduler().clone(), name.clone()));
    let mut http = http_bound
        .map(|b| HttpServer::spawn(b, worker.scheduler().clone(), access.clone(), name.clone()));
    let sched = worker.scheduler().clone();
    let watchdog = lifecycle::start_watchdog(move || sched.is_alive());
    let where_ = match &bound {
        Some(b) => b.path.display().to_string(),
        None => "the systemd socket".into(),
    };
    lifecycle::notify(&format!("READY=1\nSTATUS=Serving {name} on {where_}"));
    log_info!("ready: serving {name} on {where_}");

    // Any message, or the handler's channel closing, means stop; so does
    // an MQTT connection that was configured to give up.
    let mut failure = None;
    match &mqtt {
        // Nothing else to watch: sleep until a signal (an idle daemon wakes
        // for nothing).
        None => {
            let _ = signals.recv();
        }
        Some(m) => {
            while let Err(mpsc::RecvTimeoutError::Timeout) =
                signals.recv_timeout(Duration::from_millis(250))
            {
                if let Some(e) = m.fatal() {
                    log_error!("{e}");
                    failure = Some(e);
                    break;
                }
            }
        }
    }
    lifecycle::notify("STOPPING=1\nSTATUS=Stopping: finishing the running request");
    log_info!(
        "stopping: no new connections, draining for up to {}s",
        cfg.drain_timeout_s
    );
    server.stop_accepting();
    if let Some(h) = &mut http {
        h.stop_accepting();
    }
    drop(bound);
    worker.shutdown(Duration::from_secs_f64(cfg.drain_timeout_s), &signals);
    server.close(FLUSH_TIMEOUT);
    if let Some(m) = mqtt {
        m.close(FLUSH_TIMEOUT);
    }
    if let Some(h) = http {
        h.close(FLUSH_TIMEOUT);
    }
    if let Some(w) = watchdog {
        w.store(true, Ordering::SeqCst);
    }
    log_info!("stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What happens between loading the model and serving: the memory budget,
/// the integrity check, locking and prefetching the weights. Errors stop
/// the daemon before it reports READY.
fn prepare(cfg: &Config, model: &Model, pool_tokens: usize, kv_type: KvType) -> Result<(), String> {
    let budget = budget::Budget::new(model, pool_tokens, kv_type);
    match budget.shortfall() {
        Ok(None) => log_info!("memory budget: {} fits", budget.summary()),
        Ok(Some(why)) if cfg.memory_check == MemoryCheck::Warn => {
            log_warn!("{why} (memory_check = warn)")
        }
        Ok(Some(why)) => return Err(why),
        Err(e) => log_warn!("memory budget not checked: {e}"),
    }
    let path = cfg.model.as_deref().expect("validated").display();
    if cfg.verify_model {
        lifecycle::notify("STATUS=Verifying the model file");
        let t = Instant::now();
        match model.verify() {
            v @ Verdict::Match(_) => log_info!(
                "{path}: {} in {:.1}s",
                v.describe(),
                t.elapsed().as_secs_f64()
            ),
            v @ Verdict::Mismatch { .. } => return Err(format!("{path}: {}", v.describe())),
            v @ Verdict::Absent => log_warn!("{path}: {}", v.describe()),
        }
        model.check_scales().map_err(|e| format!("{path}: {e}"))?;
    } else if !model.has_checksum() {
        log_info!("note: {path}: {}", Verdict::Absent.describe());
    }
    if cfg.lock_weights {
        lifecycle::notify("STATUS=Locking the weights in memory");
        let t = Instant::now();
        model.lock_weights()?;
        log_info!(
            "locked the model's {} MiB in memory in {:.1}s",
            model.file_bytes() >> 20,
            t.elapsed().as_secs_f64()
        );
    }
    let how = cfg.prefetch;
    if how != Prefetch::Off {
        let name = format!("{how:?}").to_lowercase();
        lifecycle::notify("STATUS=Reading the weights in");
        let t = Instant::now();
        model
            .prefetch(how)
            .map_err(|e| format!("prefetch = {name}: {e}"))?;
        log_info!("prefetch {name}: {:.1}s", t.elapsed().as_secs_f64());
    }
    Ok(())
}
