//! `crystald bench --parallel 1,2,4,8`: what continuous batching gives.
//! For each number of streams, with the daemon's chunking policy:
//! aggregate decode speed, the time to first token of a request arriving
//! while the others decode, and the longest gap between the others'
//! tokens while a long prompt is read.

use anyhow::{bail, Result};
use crystald::daemon::scheduler::prefill_budget;
use crystald::model::{Engine, KvType, Logits, Model, Sequence, Step};
use crystald::sampling::{Sampler, SamplingParams};
use std::time::Instant;

pub struct Options {
    pub streams: Vec<usize>,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub long_prompt: usize,
    pub reps: usize,
    pub kv_type: KvType,
}

/// A fixed pseudo-random prompt of ordinary text tokens; `salt` makes
/// prompts differ from the first token, so no prefix is shared.
fn prompt(model: &Model, n: usize, salt: u64) -> Vec<u32> {
    let vocab = model.hp.vocab_size.min(32000) as u64;
    (0..n as u64)
        .map(|i| (1000 + (i * 7919 + salt * 104729) % (vocab - 1000)) as u32)
        .collect()
}

struct Stream {
    seq: Sequence,
    /// Tokens still to run (a prompt, or the next token).
    todo: Vec<u32>,
}

/// Runs steps as the daemon plans them until the newcomer (the last
/// stream, if `newcomer`) has its first logits, or for `steps` steps when
/// there is none. Returns each step's time in seconds.
fn run(
    model: &Model,
    engine: &mut Engine,
    streams: &mut [Stream],
    newcomer: bool,
    steps: usize,
) -> Result<Vec<f64>> {
    let vocab = model.hp.vocab_size;
    let mut times = Vec::new();
    let n = streams.len();
    loop {
        if !newcomer && times.len() == steps {
            return Ok(times);
        }
        let decoding = streams.iter().any(|s| s.todo.len() == 1);
        let mut budget = prefill_budget(decoding);
        let mut plan = Vec::new();
        for s in streams.iter() {
            let take = if s.todo.len() == 1 {
                1
            } else {
                let t = s.todo.len().min(budget);
                budget -= t;
                t
            };
            plan.push(take);
        }
        let t = Instant::now();
        let mut batch: Vec<Step> = streams
            .iter_mut()
            .zip(&plan)
            .filter(|(_, &take)| take > 0)
            .map(|(s, &take)| Step {
                seq: &mut s.seq,
                tokens: &s.todo[..take],
                logits: if take == s.todo.len() {
                    Logits::Last
                } else {
                    Logits::None
                },
            })
            .collect();
        let out = engine.step(model, &mut batch)?.to_vec();
        drop(batch);
        times.push(t.elapsed().as_secs_f64());
        let mut rows = out.chunks_exact(vocab);
        let mut newcomer_done = false;
        for (i, (s, &take)) in streams.iter_mut().zip(&plan).enumerate() {
            if take == 0 {
                continue;
            }
            if take < s.todo.len() {
                s.todo.drain(..take);
                continue;
            }
            let mut row = rows.next().expect("one row per finished prompt").to_vec();
            s.todo = vec![Sampler::new(SamplingParams::greedy()).sample(&mut row, &[])];
            newcomer_done |= newcomer && i == n - 1;
        }
        if newcomer_done {
            return Ok(times);
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn bench(model: &Model, o: &Options) -> Result<()> {
    if o.streams.contains(&0) {
        bail!("--parallel: every number of streams must be at least 1");
    }
    let most = *o.streams.iter().max().unwrap_or(&1);
    // The streams keep decoding while the arriving prompts are read, a
    // chunk of at least 16 tokens per step.
    let growth = (o.prompt_tokens + o.long_prompt) / 16 + 2;
    let per_stream = o.prompt_tokens + o.gen_tokens + growth + 1;
    let n_ctx = (per_stream + 16)
        .max(o.long_prompt + 1)
        .min(model.hp.context_length);
    if o.long_prompt >= n_ctx || per_stream > n_ctx {
        bail!(
            "the prompts do not fit the model's context ({})",
            model.hp.context_length
        );
    }
    // Whole blocks of 16 per stream, and the arriving prompts.
    let pool = most * (per_stream + 16) + o.long_prompt.max(o.prompt_tokens) + 32;
    eprintln!(
        "streams of {} prompt tokens, {} decode steps; a {}-token request and a {}-token prompt arriving while the others decode; KV {}; {} reps",
        o.prompt_tokens, o.gen_tokens, o.prompt_tokens, o.long_prompt, o.kv_type.name(), o.reps
    );
    println!("| streams | aggregate decode tok/s | × 1 stream | per-stream tok/s | TTFT of an arriving request s | longest gap while a {}-token prompt is read s | its TTFT s |", o.long_prompt);
    println!("|---|---|---|---|---|---|---|");
    let mut single = None;
    for &n in &o.streams {
        let mut agg = Vec::new();
        let mut ttft = Vec::new();
        let mut gap = Vec::new();
        let mut long_ttft = Vec::new();
        for _ in 0..o.reps {
            let mut engine =
                Engine::new(model, n_ctx, pool, o.kv_type).map_err(anyhow::Error::msg)?;
            let mut streams: Vec<Stream> = (0..n)
                .map(|i| Stream {
                    seq: Sequence::default(),
                    todo: prompt(model, o.prompt_tokens, i as u64 + 1),
                })
                .collect();
            // Prompts in, then decode together.
            for s in streams.iter_mut() {
                run(model, &mut engine, std::slice::from_mut(s), true, 0)?;
            }
            let t = Instant::now();
            run(model, &mut engine, &mut streams, false, o.gen_tokens)?;
            agg.push((n * o.gen_tokens) as f64 / t.elapsed().as_secs_f64());
            // One more arrives while n - 1 decode (alone for n = 1).
            let last = streams.pop().expect("n >= 1");
            engine.pool_mut().release(last.seq);
            let arriving = |len: usize,
                            salt: u64,
                            engine: &mut Engine,
                            streams: &mut Vec<Stream>|
             -> Result<Vec<f64>> {
                streams.push(Stream {
                    seq: Sequence::default(),
                    todo: prompt(model, len, salt),
                });
                let times = run(model, engine, streams, true, 0)?;
                let s = streams.pop().expect("pushed");
                engine.pool_mut().release(s.seq);
                Ok(times)
            };
            let times = arriving(o.prompt_tokens, 1000, &mut engine, &mut streams)?;
            ttft.push(times.iter().sum::<f64>());
            if o.long_prompt > 0 {
                let times = arriving(o.long_prompt, 2000, &mut engine, &mut streams)?;
                gap.push(times.iter().cloned().fold(0.0, f64::max));
                long_ttft.push(times.iter().sum::<f64>());
            }
        }
        let agg = median(agg);
        let base = *single.get_or_insert(agg);
        let gap_text = if n == 1 || o.long_prompt == 0 {
            "–".to_string()
        } else {
            format!("{:.2}", median(gap))
        };
        let long_text = if o.long_prompt == 0 {
            "–".to_string()
        } else {
            format!("{:.1}", median(long_ttft))
        };
        println!(
            "| {n} | {agg:.2} | {:.2} | {:.2} | {:.2} | {gap_text} | {long_text} |",
            agg / base,
            agg / n as f64,
            median(ttft),
        );
    }
    Ok(())
}
