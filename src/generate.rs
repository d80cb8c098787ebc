//! The generation loop shared by the command line and the daemon: prefix
//! reuse, prefill, sampling, streaming text, and the stop rules.

use crate::model::{EngineError, Logits, Model, Session};
use crate::sampling::{self, Sampler, SamplingParams};
use crate::tokenizer::{chat, StreamDecoder, Tokenizer};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Strings that end the reply; they are not part of the output.
    pub stop: Vec<String>,
    /// Top-N log-probabilities to report per generated token (0 = none).
    pub logprobs: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End of turn, a stop token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The context window is full.
    Context,
    /// The caller asked to stop.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Context => "context",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Debug)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose cache entries were reused from the previous request.
    pub cached_tokens: usize,
    pub logprobs: Vec<TokenLogprob>,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

impl Generation {
    pub fn completion_tokens(&self) -> usize {
        self.tokens.len()
    }
    pub fn prefill_tokens_per_s(&self) -> f64 {
        (self.prompt_tokens - self.cached_tokens) as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }
    pub fn decode_tokens_per_s(&self) -> f64 {
        // The first token comes out of prefill; decode produced the rest.
        self.tokens.len().saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// What the sink tells the loop after each piece of text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Cancel,
}

/// Holds back text that might be the start of a stop string, so a stop
/// string is never streamed out before it is recognised.
struct StopMatcher<'a> {
    stops: &'a [String],
    pending: String,
}

impl<'a> StopMatcher<'a> {
    /// Adds text; returns the text now safe to emit and whether a stop string was found.
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = found {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Longest suffix of pending that is a proper prefix of some stop string.
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.pending.len() + 1))
                    .rev()
                    .find(|&n| s.is_char_boundary(n) && self.pending.ends_with(&s[..n]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Generates a reply to `prompt` (token ids, template already applied).
///
/// The session's cache is reused for the longest common prefix with its
/// history; the output is identical to a cold run because the cached
/// entries are exactly what recomputation would give.
pub fn generate(
    model: &Model,
    session: &mut Session,
    tok: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    sink: &mut dyn FnMut(&str) -> Flow,
) -> Result<Generation, EngineError> {
    if prompt.is_empty() {
        return Err(EngineError::EmptyInput);
    }
    if prompt.len() > session.n_ctx() {
        return Err(EngineError::ContextFull {
            needed: prompt.len(),
            capacity: session.n_ctx(),
        });
    }
    let common = session
        .history()
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count();
    // At least the last prompt token is recomputed: its logits start the reply.
    let cached = common.min(prompt.len() - 1);
    session.truncate(cached);

    let started = Instant::now();
    let mut logits = session
        .forward(model, &prompt[cached..], Logits::Last)?
        .to_vec();
    let prefill_time = started.elapsed();

    let mut sampler = Sampler::new(params.sampling.clone());
    let mut recent: Vec<u32> = prompt.to_vec();
    let mut decoder = StreamDecoder::new(tok);
    let mut matcher = StopMatcher {
        stops: &params.stop,
        pending: String::new(),
    };
    let mut out = Generation {
        text: String::new(),
        tokens: Vec::new(),
        finish: FinishReason::Length,
        prompt_tokens: prompt.len(),
        cached_tokens: cached,
        logprobs: Vec::new(),
        prefill_time,
        decode_time: Duration::ZERO,
    };
    let mut stopped_by_string = false;
    let decode_start = Instant::now();
    let mut emit = |text: &str, out: &mut Generation| -> Flow {
        if text.is_empty() {
            return Flow::Continue;
        }
        out.text.push_str(text);
        sink(text)
    };
    loop {
        if out.tokens.len() >= params.max_tokens {
            out.finish = FinishReason::Length;
            break;
        }
        // The model's vocabulary is padded past the tokenizer's (32032 vs
        // 32022): those rows were never trained and have no text.
        if let Some(pad) = logits.get_mut(tok.vocab_size()..) {
            pad.fill(f32::NEG_INFINITY);
        }
        let lp = (params.logprobs > 0).then(|| {
            (
                sampling::top_logprobs(&logits, params.logprobs),
                logits.clone(),
            )
        });
        let id = sampler.sample(&mut logits, &recent);
        if let Some((top, raw)) = lp {
            out.logprobs.push(TokenLogprob {
                id,
                logprob: sampling::logprob_of(&raw, id),
                top,
            });
        }
        if chat::ends_reply(tok.special(), id) {
            out.finish = FinishReason::Stop;
            break;
        }
        out.tokens.push(id);
        recent.push(id);
        // Ids past the tokenizer are masked below, so every id here has text.
        let piece = decoder
            .push(id)
            .expect("sampled ids are in the tokenizer's vocabulary");
        let (safe, stopped) = matcher.push(&piece);
        if emit(&safe, &mut out) == Flow::Cancel {
            out.finish = FinishReason::Cancelled;
            break;
        }
        if stopped {
            out.finish = FinishReason::Stop;
            stopped_by_string = true;
            break;
        }
        if out.tokens.len() >= params.max_tokens {
            out.finish = FinishReason::Length;
            break;
        }
        if session.pos() >= session.n_ctx() {
            out.finish = FinishReason::Context;
            break;
        }
        logits.clear();
        logits.extend_from_slice(session.forward(model, &[id], Logits::Last)?);
    }
    // Text held back (an incomplete character, a possible stop-string
    // prefix) belongs to the reply unless it was cut by a stop string or the
    // caller went away.
    if out.finish != FinishReason::Cancelled && !stopped_by_string {
        let (safe, stopped) = matcher.push(&decoder.finish());
        let rest = if stopped {
            safe
        } else {
            safe + &matcher.flush()
        };
        let _ = emit(&rest, &mut out);
    }
    out.decode_time = decode_start.elapsed();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher {
            stops: &stops,
            pending: String::new(),
        };
        let mut out = String::new();
        for p in pieces {
            let (s, stop) = m.push(p);
            out += &s;
            if stop {
                return (out, true);
            }
        }
        out += &m.flush();
        (out, false)
    }

    #[test]
    fn stop_string_split_across_pieces_is_not_emitted() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D more"]),
            ("hello ".into(), true)
        );
    }

    #[test]
    fn near_miss_is_released() {
        assert_eq!(
            run(&["END"], &["hello EN", "X"]),
            ("hello ENX".into(), false)
        );
    }

    #[test]
    fn held_text_is_released_at_the_end() {
        assert_eq!(run(&["END"], &["abc E"]), ("abc E".into(), false));
    }

    #[test]
    fn multibyte_stop_strings() {
        assert_eq!(run(&["é!"], &["caf", "é", "!x"]), ("caf".into(), true));
    }
}
