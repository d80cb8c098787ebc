use super::ModelArgs;
use anyhow::{bail, Context, Result};
use crystald::model::{KvType, Logits, Session};
use crystald::sampling::{Sampler, SamplingParams};
use std::io::BufWriter;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids, e.g. 1,32020,887.
    #[arg(long)]
    tokens: String,
    /// Write the logits at every position as float32 .npy, shape [T, vocab].
    #[arg(long)]
    dump_logits: Option<PathBuf>,
    /// Greedy continuation tokens to generate after the input.
    #[arg(long, default_value_t = 0)]
    generate: usize,
    /// KV cache storage; f32 so that the numbers measure the weights.
    #[arg(long, default_value = "f32", value_parser = parse_kv)]
    kv_type: KvType,
}

pub fn parse_kv(s: &str) -> Result<KvType, String> {
    crystald::daemon::config::from_name("KV cache type", s)
}

fn parse_tokens(s: &str) -> Result<Vec<u32>> {
    let ids: Vec<u32> = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("'{t}' is not a token id"))
        })
        .collect::<Result<_>>()?;
    if ids.is_empty() {
        bail!("--tokens is empty");
    }
    Ok(ids)
}

pub fn run(a: Args) -> Result<()> {
    let tokens = parse_tokens(&a.tokens)?;
    let (model, _tok) = a.model.load()?;
    let vocab = model.hp.vocab_size;
    let needed = tokens.len() + a.generate;
    if needed > model.hp.context_length {
        bail!(
            "{} input + {} generated tokens exceed the context of {}",
            tokens.len(),
            a.generate,
            model.hp.context_length
        );
    }
    let mut session = Session::try_new(&model, needed, a.kv_type).map_err(anyhow::Error::msg)?;
    let logits = session.forward(&model, &tokens, Logits::All)?;
    if let Some(path) = &a.dump_logits {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = BufWriter::new(file);
        crystald::npy::write_f32(&mut w, &[tokens.len(), vocab], logits)
            .with_context(|| format!("writing {}", path.display()))?;
        std::io::Write::flush(&mut w).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut last = logits[(tokens.len() - 1) * vocab..].to_vec();
    let mut greedy = Sampler::new(SamplingParams::greedy());
    let mut generated = Vec::with_capacity(a.generate);
    for i in 0..a.generate {
        let id = greedy.sample(&mut last, &[]);
        generated.push(id);
        if i + 1 < a.generate {
            last.copy_from_slice(session.forward(&model, &[id], Logits::Last)?);
        }
    }
    println!(
        "{}",
        serde_json::json!({ "tokens": tokens, "generated": generated })
    );
    Ok(())
}
