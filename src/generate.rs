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
    pending: &'a mut String,
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
        std::mem::take(self.pending)
    }
}

/// What [`Generator::advance`] asks for next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Run this token and call `advance` with the logits after it.
    Feed(u32),
    /// The reply is finished; call [`Generator::finish`].
    Done,
}

/// One reply in progress: sampling, streaming text and the stop rules,
/// fed the logits after each token by whoever runs the model (the
/// single-sequence [`generate`], or the daemon's batched scheduler). Its
/// result does not depend on what else ran beside it.
pub struct Generator<'t> {
    tok: &'t Tokenizer,
    params: GenerateParams,
    sampler: Sampler,
    /// Prompt and reply so far, for the repetition penalty.
    recent: Vec<u32>,
    decoder: StreamDecoder<'t>,
    stops: Vec<String>,
    pending: String,
    stopped_by_string: bool,
    out: Generation,
    started: Instant,
    decode_start: Option<Instant>,
    done: bool,
}

impl<'t> Generator<'t> {
    /// `cached`: how many prompt tokens were already in the cache.
    pub fn new(
        tok: &'t Tokenizer,
        prompt: &[u32],
        params: &GenerateParams,
        cached: usize,
    ) -> Generator<'t> {
        Generator {
            tok,
            params: params.clone(),
            sampler: Sampler::new(params.sampling.clone()),
            recent: prompt.to_vec(),
            decoder: StreamDecoder::new(tok),
            stops: params.stop.clone(),
            pending: String::new(),
            stopped_by_string: false,
            out: Generation {
                text: String::new(),
                tokens: Vec::new(),
                finish: FinishReason::Length,
                prompt_tokens: prompt.len(),
                cached_tokens: cached,
                logprobs: Vec::new(),
                prefill_time: Duration::ZERO,
                decode_time: Duration::ZERO,
            },
            started: Instant::now(),
            decode_start: None,
            done: false,
        }
    }

    /// The tokens generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.out.tokens
    }

    /// Stops the reply (the caller left, or its time is up).
    pub fn cancel(&mut self) {
        self.out.finish = FinishReason::Cancelled;
        self.done = true;
    }

    /// Takes the logits after the last token (the prompt's, then each
    /// token `Feed` asked for); `room`: whether the context can take one
    /// more token. Text goes to `sink` as it becomes safe to show.
    pub fn advance(
        &mut self,
        logits: &mut [f32],
        room: bool,
        sink: &mut dyn FnMut(&str) -> Flow,
    ) -> Next {
        if self.decode_start.is_none() {
            self.out.prefill_time = self.started.elapsed();
            self.decode_start = Some(Instant::now());
        }
        if self.done {
            return Next::Done;
        }
        let id = self.choose(logits);
        let next = self.take(id, room, sink);
        self.done = next == Next::Done;
        next
    }

    fn choose(&mut self, logits: &mut [f32]) -> Option<u32> {
        if self.out.tokens.len() >= self.params.max_tokens {
            return None;
        }
        // The model's vocabulary is padded past the tokenizer's (32032 vs
        // 32022): those rows were never trained and have no text.
        if let Some(pad) = logits.get_mut(self.tok.vocab_size()..) {
            pad.fill(f32::NEG_INFINITY);
        }
        let n = self.params.logprobs;
        let lp = (n > 0).then(|| (sampling::top_logprobs(logits, n), logits.to_vec()));
        let id = self.sampler.sample(logits, &self.recent);
        if let Some((top, raw)) = lp {
            self.out.logprobs.push(TokenLogprob {
                id,
                logprob: sampling::logprob_of(&raw, id),
                top,
            });
        }
        Some(id)
    }

    fn take(&mut self, id: Option<u32>, room: bool, sink: &mut dyn FnMut(&str) -> Flow) -> Next {
        let Some(id) = id else {
            self.out.finish = FinishReason::Length;
            return Next::Done;
        };
        if chat::ends_reply(self.tok.special(), id) {
            self.out.finish = FinishReason::Stop;
            return Next::Done;
        }
        self.out.tokens.push(id);
        self.recent.push(id);
        // Ids past the tokenizer are masked above, so every id here has text.
        let piece = self
            .decoder
            .push(id)
            .expect("sampled ids are in the tokenizer's vocabulary");
        let (safe, stopped) = self.matcher().push(&piece);
        if self.emit(&safe, sink) == Flow::Cancel {
            self.out.finish = FinishReason::Cancelled;
            return Next::Done;
        }
        if stopped {
            self.out.finish = FinishReason::Stop;
            self.stopped_by_string = true;
            return Next::Done;
        }
        if self.out.tokens.len() >= self.params.max_tokens {
            self.out.finish = FinishReason::Length;
            return Next::Done;
        }
        if !room {
            self.out.finish = FinishReason::Context;
            return Next::Done;
        }
        Next::Feed(id)
    }

    fn matcher(&mut self) -> StopMatcher<'_> {
        StopMatcher {
            stops: &self.stops,
            pending: &mut self.pending,
        }
    }

    fn emit(&mut self, text: &str, sink: &mut dyn FnMut(&str) -> Flow) -> Flow {
        if text.is_empty() {
            return Flow::Continue;
        }
        self.out.text.push_str(text);
        sink(text)
    }

    /// The finished reply. Text held back (an incomplete character, a
    /// possible stop-string prefix) belongs to it unless it was cut by a
    /// stop string or the caller went away.
    pub fn finish(mut self, sink: &mut dyn FnMut(&str) -> Flow) -> Generation {
        if self.out.finish != FinishReason::Cancelled && !self.stopped_by_string {
            let tail = self.decoder.finish();
            let (safe, stopped) = self.matcher().push(&tail);
            let rest = if stopped {
                safe
            } else {
                safe + &self.matcher().flush()
            };
            let _ = self.emit(&rest, sink);
        }
        if let Some(t) = self.decode_start {
            self.out.decode_time = t.elapsed();
        } else {
            self.out.prefill_time = self.started.elapsed();
        }
        self.out
    }
}

/// How many of `prompt`'s tokens a cache holding `history` can serve: the
/// common prefix, but at least the last prompt token is recomputed, since
/// its logits start the reply.
pub fn reusable_prefix(history: &[u32], prompt: &[u32]) -> usize {
    let common = history
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count();
    common.min(prompt.len().saturating_sub(1))
}

/// Generates a reply to `prompt` (token ids, template already applied) on
/// a single-sequence session.
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
    let cached = reusable_prefix(session.history(), prompt);
    session.truncate(cached);
    let mut g = Generator::new(tok, prompt, params, cached);
    let mut logits = session
        .forward(model, &prompt[cached..], Logits::Last)?
        .to_vec();
    while let Next::Feed(id) = g.advance(&mut logits, session.pos() < session.n_ctx(), sink) {
        logits.clear();
        logits.extend_from_slice(session.forward(model, &[id], Logits::Last)?);
    }
    Ok(g.finish(sink))
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut pending = String::new();
        let mut m = StopMatcher {
            stops: &stops,
            pending: &mut pending,
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
