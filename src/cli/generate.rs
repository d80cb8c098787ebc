use super::ModelArgs;
use anyhow::Result;
use crystald::generate::{self, Flow, GenerateParams};
use crystald::model::{KvType, Session};
use crystald::sampling::SamplingParams;
use crystald::tokenizer::{chat, Message, Role};
use std::io::Write;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The user's message (or, with --raw, the text to continue).
    #[arg(short, long)]
    prompt: String,
    /// System prompt (default: the model card's).
    #[arg(long)]
    system: Option<String>,
    /// Raw completion: the prompt follows <s> directly, no chat template.
    #[arg(long)]
    raw: bool,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.1)]
    repeat_penalty: f32,
    /// Seed for a reproducible run (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop strings (repeatable); not included in the output.
    #[arg(long)]
    stop: Vec<String>,
    /// Context size in tokens (default: the model's).
    #[arg(long)]
    ctx: Option<usize>,
    #[arg(long, default_value = "f16", value_parser = super::eval::parse_kv)]
    kv_type: KvType,
}

pub fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32)
}

pub fn run(a: Args) -> Result<()> {
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        seed: a.seed.unwrap_or_else(random_seed),
        ..SamplingParams::default()
    };
    sampling.validate().map_err(anyhow::Error::msg)?;
    if a.max_tokens == 0 {
        anyhow::bail!("--max-tokens must be at least 1");
    }
    let (model, tok) = a.model.load()?;
    let prompt = if a.raw {
        tok.encode_raw_prompt(&a.prompt)?
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &a.system {
            messages.push(Message {
                role: Role::System,
                content: system.clone(),
            });
        }
        messages.push(Message {
            role: Role::User,
            content: a.prompt.clone(),
        });
        chat::render(&tok, &messages)?
    };
    let n_ctx = a.ctx.unwrap_or(model.hp.context_length);
    let mut session = Session::try_new(&model, n_ctx, a.kv_type).map_err(anyhow::Error::msg)?;
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        sampling,
        stop: a.stop,
        logprobs: 0,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let g = generate::generate(&model, &mut session, &tok, &prompt, &params, &mut |piece| {
        // A closed stdout (e.g. `| head`) ends generation quietly.
        if out
            .write_all(piece.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            Flow::Cancel
        } else {
            Flow::Continue
        }
    })?;
    let _ = writeln!(out);
    eprintln!(
        "prompt: {} tokens in {:.2}s ({:.1} tok/s); generated: {} tokens in {:.2}s ({:.1} tok/s); finish: {}; kernels: {}, threads: {}",
        g.prompt_tokens,
        g.prefill_time.as_secs_f64(),
        g.prefill_tokens_per_s(),
        g.completion_tokens(),
        g.decode_time.as_secs_f64(),
        g.decode_tokens_per_s(),
        g.finish.as_str(),
        model.kernels.name(),
        model.threads(),
    );
    Ok(())
}
