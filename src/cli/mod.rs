//! Subcommands of the `crystald` binary.

pub mod ask;
pub mod bench;
pub mod chat;
pub mod eval;
pub mod generate;
pub mod serve;
pub mod tokenize;
pub mod verify;

use anyhow::{Context, Result};
use crystald::kernels;
use crystald::model::{DeviceChoice, Model};
use crystald::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

/// How a reply is asked of the daemon or the model, shared by `ask` and
/// `chat`; `None` leaves the default.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ReplyArgs {
    /// System prompt (default: the model card's).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long)]
    pub max_tokens: Option<u64>,
    /// 0 = greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
}

impl ReplyArgs {
    /// Sets the sampling fields that were given on a socket request.
    pub fn fill(&self, req: &mut serde_json::Value) {
        for (key, v) in [
            ("max_tokens", self.max_tokens.map(serde_json::Value::from)),
            ("temperature", self.temperature.map(serde_json::Value::from)),
            ("seed", self.seed.map(serde_json::Value::from)),
        ] {
            if let Some(v) = v {
                req[key] = v;
            }
        }
    }
}

/// Options every command that loads a model takes.
#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// The GGUF model file (made by crystal-quantize).
    #[arg(short, long)]
    pub model: PathBuf,
    /// Compute threads (default: the physical cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Kernel set: auto, scalar, avx2, avx512, neon, neon-dotprod (default: CRYSTALD_KERNELS or auto).
    #[arg(long)]
    pub kernels: Option<String>,
    /// Where the model runs: cpu, cuda, or auto (the GPU when one is usable).
    #[arg(long, default_value = "auto", env = "CRYSTALD_DEVICE", value_parser = parse_device)]
    pub device: DeviceChoice,
}

impl ModelArgs {
    pub fn load(&self) -> Result<(Model, Tokenizer)> {
        load(
            &self.model,
            self.threads,
            self.kernels.as_deref(),
            self.device,
        )
    }
}

pub fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse()
}

/// The kernel set `--kernels NAME` names, else `CRYSTALD_KERNELS`, else the best.
pub fn kernel_set(name: Option<&str>) -> Result<&'static dyn kernels::Kernels> {
    match name {
        Some(name) => kernels::select(Some(name)),
        None => kernels::from_env(),
    }
    .map_err(anyhow::Error::msg)
}

/// Loads the model and its tokenizer and places it on `device`; a note
/// goes to stderr when it runs on a GPU or stayed off one it could have used.
pub fn load(
    path: &Path,
    threads: Option<usize>,
    kernels: Option<&str>,
    device: DeviceChoice,
) -> Result<(Model, Tokenizer)> {
    let k = kernel_set(kernels)?;
    let threads = threads.unwrap_or_else(crystald::cpu::physical_cores);
    if threads == 0 {
        anyhow::bail!("--threads must be at least 1");
    }
    let mut model = Model::load(path, k, threads)?;
    let placed = model.place(device).map_err(anyhow::Error::msg)?;
    if placed != "device: cpu" {
        eprintln!("crystald: {placed}");
    }
    let tok = Tokenizer::from_json(model.tokenizer_json(), model.special)
        .with_context(|| format!("{}: embedded tokenizer", path.display()))?;
    Ok((model, tok))
}
