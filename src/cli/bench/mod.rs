//! `crystald bench`: prefill and decode speed, start-up time and memory of
//! one model file, each thread count measured in a fresh process so that
//! memory figures do not carry over.

mod parallel;

use super::ModelArgs;
use anyhow::{bail, Context, Result};
use crystald::model::{KvType, Logits, Model, Session};
use crystald::sampling::{Sampler, SamplingParams};
use std::process::Command;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Thread counts to measure, comma-separated.
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    threads_list: Vec<usize>,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Tokens generated for the decode measurement.
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    /// Repetitions per thread count; the table shows medians.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long, default_value = "f16", value_parser = super::eval::parse_kv)]
    kv_type: KvType,
    /// Instead of the per-thread table: continuous batching with these
    /// numbers of streams (e.g. 1,2,4,8), in this process with the first
    /// of --threads-list threads.
    #[arg(long, value_delimiter = ',')]
    parallel: Vec<usize>,
    /// The long prompt that arrives while streams decode (--parallel).
    #[arg(long, default_value_t = 1500)]
    long_prompt: usize,
    /// Internal: measure once in this process and print one JSON line.
    #[arg(long, hide = true)]
    child: bool,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
struct Sample {
    threads: usize,
    load_ms: f64,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    peak_rss_mb: f64,
    anon_rss_mb: f64,
    kv_mb: f64,
    /// GB/s at which `threads` threads read the mapped model file; on a
    /// GPU, its peak memory bandwidth.
    read_gb_s: f64,
    /// `cpu` or `cuda`.
    device: String,
    /// GPU memory in use after the run (weights, KV cache, scratch and
    /// the driver's own), MiB; 0 on the CPU.
    gpu_mb: f64,
}

/// (peak RSS, anonymous RSS) in MiB.
fn memory_mb() -> (f64, f64) {
    let mb = |b: Option<u64>| b.map_or(f64::NAN, |b| b as f64 / (1 << 20) as f64);
    (
        mb(crystald::procfs::peak_rss()),
        mb(crystald::procfs::status_bytes("RssAnon")),
    )
}

fn measure(a: &Args, threads: usize) -> Result<Sample> {
    let started = Instant::now();
    let k = super::kernel_set(a.model.kernels.as_deref())?;
    let mut model = Model::load(&a.model.model, k, threads)?;
    let placed = model.place(a.model.device).map_err(anyhow::Error::msg)?;
    eprintln!("{placed}");
    let n_ctx = a.prompt_tokens + a.gen_tokens + 1;
    let mut session = Session::try_new(&model, n_ctx, a.kv_type).map_err(anyhow::Error::msg)?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;

    // A fixed pseudo-random prompt of ordinary text tokens.
    let vocab = model.hp.vocab_size as u64;
    let prompt: Vec<u32> = (0..a.prompt_tokens as u64)
        .map(|i| (1000 + (i * 7919) % (vocab.min(32000) - 1000)) as u32)
        .collect();
    let t = Instant::now();
    let logits = session.forward(&model, &prompt, Logits::Last)?;
    let mut greedy = Sampler::new(SamplingParams::greedy());
    let mut row = logits.to_vec();
    let mut next = greedy.sample(&mut row, &[]);
    let prefill = t.elapsed().as_secs_f64();

    let t = Instant::now();
    for _ in 0..a.gen_tokens {
        row.copy_from_slice(session.forward(&model, &[next], Logits::Last)?);
        next = greedy.sample(&mut row, &[]);
    }
    let decode = t.elapsed().as_secs_f64();
    let (peak, anon) = memory_mb();
    let read_gb_s = model
        .device()
        .peak_bandwidth_gbs()
        .unwrap_or_else(|| model.read_bandwidth());
    Ok(Sample {
        threads,
        load_ms,
        prefill_tok_s: a.prompt_tokens as f64 / prefill,
        decode_tok_s: a.gen_tokens as f64 / decode,
        peak_rss_mb: peak,
        anon_rss_mb: anon,
        kv_mb: (session.kv_bytes() as u64 + session.engine().gpu_bytes()) as f64 / (1 << 20) as f64,
        read_gb_s,
        device: model.device().name().to_string(),
        gpu_mb: model.device().gpu_memory_used().unwrap_or(0) as f64 / (1 << 20) as f64,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(a: Args) -> Result<()> {
    if a.prompt_tokens == 0 || a.gen_tokens == 0 || a.reps == 0 {
        bail!("--prompt-tokens, --gen-tokens and --reps must be at least 1");
    }
    if !a.parallel.is_empty() {
        let threads = a.threads_list.first().copied().unwrap_or(1);
        let k = super::kernel_set(a.model.kernels.as_deref())?;
        let mut model = Model::load(&a.model.model, k, threads)?;
        eprintln!(
            "{}",
            model.place(a.model.device).map_err(anyhow::Error::msg)?
        );
        eprintln!(
            "model {}, kernels {}, {threads} threads",
            a.model.model.display(),
            k.name()
        );
        return parallel::bench(
            &model,
            &parallel::Options {
                streams: a.parallel.clone(),
                prompt_tokens: a.prompt_tokens,
                gen_tokens: a.gen_tokens,
                long_prompt: a.long_prompt,
                reps: a.reps,
                kv_type: a.kv_type,
            },
        );
    }
    if a.child {
        let threads = a.model.threads.unwrap_or(1);
        println!("{}", serde_json::to_string(&measure(&a, threads)?)?);
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating the crystald binary")?;
    let file_mb = std::fs::metadata(&a.model.model)
        .with_context(|| a.model.model.display().to_string())?
        .len() as f64
        / (1 << 20) as f64;
    eprintln!(
        "model {} ({file_mb:.0} MiB), prompt {} tokens, {} generated, KV {:?}, {} reps",
        a.model.model.display(),
        a.prompt_tokens,
        a.gen_tokens,
        a.kv_type,
        a.reps
    );
    let kernels = super::kernel_set(a.model.kernels.as_deref())?;
    eprintln!(
        "kernels {}; ceiling: decode if every weight byte streamed at the read bandwidth \
         (on a GPU: its peak memory bandwidth)",
        kernels.name()
    );
    println!("| device | threads | prefill tok/s | decode tok/s | load ms | peak RSS MiB | anon RSS MiB | KV MiB | GPU MiB | read GB/s | ceiling tok/s | decode / ceiling |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &threads in &a.threads_list {
        let mut samples = Vec::new();
        for _ in 0..a.reps {
            let mut cmd = Command::new(&exe);
            cmd.arg("bench")
                .arg("--child")
                .arg("--model")
                .arg(&a.model.model)
                .arg("--threads")
                .arg(threads.to_string());
            cmd.arg("--prompt-tokens")
                .arg(a.prompt_tokens.to_string())
                .arg("--gen-tokens")
                .arg(a.gen_tokens.to_string());
            cmd.arg("--kv-type").arg(a.kv_type.name());
            cmd.arg("--device").arg(a.model.device.name());
            if let Some(k) = &a.model.kernels {
                cmd.arg("--kernels").arg(k);
            }
            let out = cmd.output().context("running a bench child")?;
            if !out.status.success() {
                bail!(
                    "bench child failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            samples
                .push(serde_json::from_slice::<Sample>(&out.stdout).context("bench child output")?);
        }
        let m = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        let file_bytes = file_mb * (1 << 20) as f64;
        let ceiling = m(|s| s.read_gb_s) * 1e9 / file_bytes;
        println!(
            "| {} | {threads} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.2} | {:.0} % |",
            samples[0].device,
            m(|s| s.prefill_tok_s),
            m(|s| s.decode_tok_s),
            m(|s| s.load_ms),
            m(|s| s.peak_rss_mb),
            m(|s| s.anon_rss_mb),
            m(|s| s.kv_mb),
            m(|s| s.gpu_mb),
            m(|s| s.read_gb_s),
            ceiling,
            100.0 * m(|s| s.decode_tok_s) / ceiling
        );
    }
    Ok(())
}
