use anyhow::Result;
use crystald::daemon::{self, config, config::Config};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF model file (overrides `model` in the config file).
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// The configuration file; a missing default file is not an error.
    #[arg(long, default_value = daemon::config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Unix socket to listen on [config: socket; default /run/crystald/crystald.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Compute threads [config: threads; default: the physical cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Kernel set: auto, scalar, avx2, avx512, neon, neon-dotprod [config: kernels].
    #[arg(long)]
    kernels: Option<String>,
    /// Where the model runs: cpu, cuda or auto [config: device; default auto].
    #[arg(long)]
    device: Option<String>,
    /// Context window in tokens [config: ctx; default: the model's].
    #[arg(long)]
    ctx: Option<usize>,
    /// KV pool type: f16, f32 or q8_0 [config: kv_type].
    #[arg(long)]
    kv_type: Option<String>,
    /// Requests generating together [config: parallel; default 4].
    #[arg(long)]
    parallel: Option<usize>,
    /// The KV pool for all requests: tokens, or a size like "1536 MiB"
    /// [config: kv_budget; default 4096 tokens].
    #[arg(long)]
    kv_budget: Option<String>,
    /// Requests that may wait while others run [config: queue_size].
    #[arg(long)]
    queue_size: Option<usize>,
    /// Also serve MQTT through this broker: mqtt://HOST[:PORT] or
    /// mqtts://HOST[:PORT] [config: mqtt.url]. Credentials and TLS files
    /// are set in the config file's [mqtt] table.
    #[arg(long)]
    mqtt_url: Option<String>,
    /// Topic prefix [config: mqtt.prefix; default crystal/<hostname>].
    #[arg(long)]
    mqtt_prefix: Option<String>,
    /// Serve requests with the other daemons of this MQTT shared-subscription
    /// group [config: mqtt.share_group].
    #[arg(long, value_name = "NAME")]
    mqtt_share_group: Option<String>,
    /// Also serve the OpenAI-compatible HTTP API on HOST:PORT or
    /// unix:/PATH; repeatable [config: http.listen]. Keys and limits are set
    /// in the config file's [http] table.
    #[arg(long = "http", value_name = "ADDR")]
    http: Vec<String>,
    /// error, warn, info, debug [config: log_level].
    #[arg(long)]
    log_level: Option<String>,
    /// A memory budget that does not fit: error or warn [config: memory_check].
    #[arg(long)]
    memory_check: Option<String>,
    /// mlock the mapped weights [config: lock_weights].
    #[arg(long)]
    lock_weights: bool,
    /// Read the weights in at start: off, background, wait [config: prefetch].
    #[arg(long)]
    prefetch: Option<String>,
    /// Check the model file's checksum before serving [config: verify_model].
    #[arg(long)]
    verify_model: bool,
}

impl Args {
    fn config(self) -> Result<Config, String> {
        let named = self.config.as_os_str() != daemon::config::DEFAULT_CONFIG;
        let mut cfg = Config::load(&self.config, named)?;
        // Flags win over the file.
        macro_rules! set {
            ($($flag:ident => $field:expr),*) => {
                $(if let Some(v) = self.$flag { $field = v; })*
            };
        }
        set!(socket => cfg.socket, queue_size => cfg.queue_size, parallel => cfg.parallel);
        // Named settings read as the config file reads them.
        macro_rules! named {
            ($($flag:ident => $field:expr),*) => {
                $(if let Some(v) = self.$flag {
                    let flag = format!("--{}", stringify!($flag).replace('_', "-"));
                    $field = config::from_name(&flag, &v)?;
                })*
            };
        }
        named!(kv_type => cfg.kv_type, kv_budget => cfg.kv_budget, log_level => cfg.log_level,
               memory_check => cfg.memory_check, prefetch => cfg.prefetch, device => cfg.device);
        cfg.lock_weights |= self.lock_weights;
        cfg.verify_model |= self.verify_model;
        cfg.model = self.model.or(cfg.model);
        cfg.threads = self.threads.or(cfg.threads);
        cfg.kernels = self.kernels.or(cfg.kernels);
        cfg.ctx = self.ctx.or(cfg.ctx);
        if self.mqtt_url.is_some() || self.mqtt_prefix.is_some() || self.mqtt_share_group.is_some()
        {
            let m = cfg.mqtt.get_or_insert_with(Default::default);
            if let Some(url) = self.mqtt_url {
                m.url = url;
            }
            if let Some(prefix) = self.mqtt_prefix {
                m.prefix = Some(prefix);
            }
            if let Some(group) = self.mqtt_share_group {
                m.share_group = Some(group);
            }
        }
        if !self.http.is_empty() {
            cfg.http.get_or_insert_with(Default::default).listen = self.http;
        }
        Ok(cfg)
    }
}

pub fn run(a: Args) -> Result<()> {
    let cfg = a.config().map_err(anyhow::Error::msg)?;
    daemon::serve(cfg, |cfg| {
        let path = cfg.model.as_deref().expect("validated before loading");
        super::load(path, cfg.threads, cfg.kernels.as_deref(), cfg.device)
            .map_err(|e| format!("{e:#}"))
    })
    .map_err(anyhow::Error::msg)
}
