//! The request/reply vocabulary shared by every transport: what a client
//! may send, how it is checked, and the events it gets back. Framing (one
//! JSON document per line on the Unix socket) belongs to the transport.
//!
//! Field names follow the OpenAI chat API where one exists, so clients
//! written for it need little more than a different transport.

use crate::generate::{FinishReason, GenerateParams, TokenLogprob};
use crate::sampling::SamplingParams;
use crate::tokenizer::{chat, Message, Tokenizer};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// A client-chosen request id, echoed in every reply: a string or an integer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(untagged, expecting = "a string or an integer")]
pub enum Id {
    Text(String),
    Number(i64),
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Text(s) => write!(f, "{s:?}"),
            Id::Number(n) => write!(f, "{n}"),
        }
    }
}

/// Why a request or line was refused; `as_str` is the wire `code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The line is not JSON, or not a JSON object.
    InvalidJson,
    /// The line is longer than the configured limit.
    LineTooLong,
    /// The line is not UTF-8.
    InvalidUtf8,
    /// Well-formed JSON that is not a valid request (unknown field, wrong type, bad value).
    InvalidRequest,
    /// The id is already used by a request of this connection that has not finished.
    DuplicateId,
    /// The prompt does not leave room in the context for a reply.
    ContextLengthExceeded,
    /// The queue is full; retry later.
    Busy,
    /// The daemon is stopping.
    ShuttingDown,
    /// The request's `timeout_ms` passed before it started.
    DeadlineExceeded,
    /// The peer's credentials are not in the allowed users or groups.
    Forbidden,
    /// A failure inside the daemon; the message says what.
    Internal,
    /// An MQTT payload is larger than the configured limit.
    PayloadTooLarge,
    /// An MQTT request that the broker kept as retained: it was published
    /// before the daemon subscribed, maybe long ago, and is not answered.
    StaleRequest,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::LineTooLong => "line_too_long",
            ErrorCode::InvalidUtf8 => "invalid_utf8",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::DuplicateId => "duplicate_id",
            ErrorCode::ContextLengthExceeded => "context_length_exceeded",
            ErrorCode::Busy => "busy",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Internal => "internal",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::StaleRequest => "stale_request",
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::InvalidRequest, message)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

/// `stop` as OpenAI spells it: one string or a list.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged, expecting = "a string or an array of strings")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A generation request as it arrives. Unknown fields are refused so that
/// a typo (`max_token`) is an error rather than a silently ignored setting.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub id: Id,
    /// A conversation, rendered with the chat template.
    pub messages: Option<Vec<Message>>,
    /// Raw completion text (follows `<s>` directly, no template).
    pub prompt: Option<String>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    /// Top-N log-probabilities per generated token.
    #[serde(default)]
    pub logprobs: usize,
    /// Give up if the reply is not finished this many milliseconds after
    /// the request arrived.
    pub timeout_ms: Option<u64>,
}

/// Control messages, told apart from requests by their `op` field.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Control {
    Cancel { id: Id },
    Health { id: Option<Id> },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Incoming {
    Request(Box<Request>),
    Control(Control),
}

/// A refused line: the error, and the id when it could be read, so the
/// client can tell which of its requests failed.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub id: Option<Id>,
    pub error: ApiError,
}

/// Parses one line (without its newline).
pub fn parse_line(line: &[u8]) -> Result<Incoming, Rejection> {
    parse_object(parse_json_object(line)?)
}

/// The first step of [`parse_line`]: UTF-8, JSON, and an object. Transports
/// that carry fields of their own (MQTT's `reply_to`) take them out before
/// [`parse_object`].
pub fn parse_json_object(
    bytes: &[u8],
) -> Result<serde_json::Map<String, serde_json::Value>, Rejection> {
    let reject = |code, message: String| Rejection {
        id: None,
        error: ApiError::new(code, message),
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        reject(
            ErrorCode::InvalidUtf8,
            format!("the message is not valid UTF-8 ({e})"),
        )
    })?;
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| reject(ErrorCode::InvalidJson, format!("not JSON: {e}")))?;
    match value {
        serde_json::Value::Object(obj) => Ok(obj),
        other => Err(reject(
            ErrorCode::InvalidJson,
            format!("a request must be a JSON object, got {}", json_kind(&other)),
        )),
    }
}

/// The id of a request object when it has a readable one, so that errors
/// about other fields can still name it.
pub fn id_of(obj: &serde_json::Map<String, serde_json::Value>) -> Option<Id> {
    obj.get("id").and_then(|v| Id::deserialize(v).ok())
}

/// The second step of [`parse_line`]: a request or a control message.
pub fn parse_object(
    obj: serde_json::Map<String, serde_json::Value>,
) -> Result<Incoming, Rejection> {
    let id = id_of(&obj);
    let is_control = obj.contains_key("op");
    let value = serde_json::Value::Object(obj);
    let parsed = if is_control {
        Control::deserialize(&value).map(Incoming::Control)
    } else {
        Request::deserialize(&value).map(|r| Incoming::Request(Box::new(r)))
    };
    parsed.map_err(|e| Rejection {
        id,
        error: ApiError::new(ErrorCode::InvalidRequest, e.to_string()),
    })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Daemon-wide bounds a request is checked against.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Context window of the session, in tokens.
    pub n_ctx: usize,
    /// `max_tokens` when the request has none.
    pub default_max_tokens: usize,
}

/// Most log-probabilities per token a request may ask for (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 20;
/// Most stop strings per request (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// A checked request, ready for the inference worker.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    pub stream: bool,
    pub timeout: Option<Duration>,
}

impl Request {
    /// Checks every field and builds the prompt ids. `random_seed` is only
    /// called when the request has no seed.
    pub fn prepare(
        &self,
        tok: &Tokenizer,
        limits: &Limits,
        random_seed: impl FnOnce() -> u64,
    ) -> Result<Prepared, ApiError> {
        let prompt = match (&self.messages, &self.prompt) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "give either 'messages' or 'prompt', not both",
                ))
            }
            (None, None) => {
                return Err(ApiError::invalid(
                    "a request needs 'messages' (chat) or 'prompt' (raw completion)",
                ))
            }
            (Some(m), None) if m.is_empty() => {
                return Err(ApiError::invalid("'messages' is empty"))
            }
            (Some(m), None) => chat::render(tok, m).map_err(|e| ApiError::invalid(e.message()))?,
            (None, Some(p)) => tok
                .encode_raw_prompt(p)
                .map_err(|e| ApiError::invalid(e.message()))?,
        };
        // At least one generated token must fit after the prompt.
        if prompt.len() >= limits.n_ctx {
            return Err(ApiError::new(
                ErrorCode::ContextLengthExceeded,
                format!(
                    "the prompt is {} tokens; the context holds {} including the reply",
                    prompt.len(),
                    limits.n_ctx
                ),
            ));
        }
        let max_tokens = match self.max_tokens {
            None => limits.default_max_tokens.min(limits.n_ctx),
            Some(n) if n == 0 || n > limits.n_ctx as u64 => {
                return Err(ApiError::invalid(format!(
                    "max_tokens must be between 1 and the context size {}, got {n}",
                    limits.n_ctx
                )))
            }
            Some(n) => n as usize,
        };
        if self.logprobs > MAX_LOGPROBS {
            return Err(ApiError::invalid(format!(
                "logprobs must be between 0 and {MAX_LOGPROBS}, got {}",
                self.logprobs
            )));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP {
            return Err(ApiError::invalid(format!(
                "at most {MAX_STOP} stop strings, got {}",
                stop.len()
            )));
        }
        let d = SamplingParams::default();
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(d.repeat_penalty),
            seed: match self.seed {
                Some(s) => s,
                None => random_seed(),
            },
            ..d
        };
        sampling.validate().map_err(ApiError::invalid)?;
        if self.timeout_ms == Some(0) {
            return Err(ApiError::invalid("timeout_ms must be at least 1"));
        }
        Ok(Prepared {
            prompt,
            params: GenerateParams {
                max_tokens,
                sampling,
                stop,
                logprobs: self.logprobs,
            },
            stream: self.stream,
            timeout: self.timeout_ms.map(Duration::from_millis),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose cache entries were reused from the previous request.
    pub cached_tokens: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Timings {
    /// From arrival to the start of the work.
    pub queued_ms: f64,
    /// Computing the uncached part of the prompt.
    pub prompt_ms: f64,
    pub generation_ms: f64,
    pub prompt_tokens_per_s: f64,
    pub generation_tokens_per_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub id: u32,
    pub logprob: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenInfo {
    pub token: String,
    pub id: u32,
    pub logprob: f32,
    pub top_logprobs: Vec<TopLogprob>,
}

/// `logprobs` as OpenAI's chat API nests it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Logprobs {
    pub content: Vec<TokenInfo>,
}

impl Logprobs {
    pub fn from_generation(tok: &Tokenizer, lps: &[TokenLogprob]) -> Logprobs {
        let text = |id: u32| {
            tok.piece_bytes(id)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        Logprobs {
            content: lps
                .iter()
                .map(|t| TokenInfo {
                    token: text(t.id),
                    id: t.id,
                    logprob: t.logprob,
                    top_logprobs: t
                        .top
                        .iter()
                        .map(|&(id, logprob)| TopLogprob {
                            token: text(id),
                            id,
                            logprob,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

fn finish_str<S: serde::Serializer>(f: &FinishReason, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(f.as_str())
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Done {
    /// The whole reply, also when it was streamed.
    pub text: String,
    #[serde(serialize_with = "finish_str")]
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
    /// The seed used, so a run without one can be repeated.
    pub seed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Logprobs>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Health {
    pub status: &'static str,
    pub model: String,
    /// The kernel set computing, and every set this CPU could run (best
    /// first), for `--kernels` / `CRYSTALD_KERNELS`.
    pub kernels: &'static str,
    pub kernels_available: Vec<&'static str>,
    /// Where the model runs: `cpu` or `cuda` (`device` in the config).
    pub device: &'static str,
    /// GPU memory the model holds (weights, KV cache, scratch); absent on the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_mib: Option<f64>,
    /// The daemon's resident memory on the host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_mib: Option<f64>,
    pub uptime_s: f64,
    /// Requests waiting for the worker (not counting the running one).
    pub queue_depth: usize,
    pub queue_capacity: usize,
    pub running: usize,
    /// Requests that may generate together.
    pub parallel: usize,
    pub n_ctx: usize,
    /// The KV pool: positions it holds for all requests together, its
    /// size, positions held by running requests, and positions of finished
    /// ones kept for prefix reuse.
    pub kv_pool_tokens: usize,
    pub kv_pool_mib: f64,
    pub kv_in_use_tokens: usize,
    pub kv_cached_tokens: usize,
    pub requests_total: u64,
    pub completion_tokens_total: u64,
    /// Generation speed of the last finished request.
    pub tokens_per_s: f64,
    /// Generation speed over every request so far.
    pub avg_tokens_per_s: f64,
}

/// What a client receives about one request (or a control message).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// A streamed piece of the reply; `index` counts the pieces from 0, so
    /// a client of an at-least-once transport (MQTT) can drop duplicates.
    Token {
        index: usize,
        text: String,
    },
    Done(Box<Done>),
    Error(ApiError),
    Health(Box<Health>),
}

impl Event {
    /// Whether this is the last event about its request.
    pub fn is_final(&self) -> bool {
        !matches!(self, Event::Token { .. })
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Event {
        Event::Error(ApiError::new(code, message))
    }
}

#[derive(Serialize)]
struct Line<'a> {
    id: Option<&'a Id>,
    #[serde(flatten)]
    event: &'a Event,
}

/// One reply as a JSON document (an MQTT message).
pub fn reply_json(id: Option<&Id>, event: &Event) -> Vec<u8> {
    serde_json::to_vec(&Line { id, event }).expect("replies contain only serialisable data")
}

/// One reply line, newline included.
pub fn reply_line(id: Option<&Id>, event: &Event) -> Vec<u8> {
    let mut out = reply_json(id, event);
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(line: &str) -> Rejection {
        parse_line(line.as_bytes()).expect_err(line)
    }

    #[test]
    fn requests_and_controls_parse() {
        let r =
            parse_line(br#"{"id": "a", "prompt": "hi", "max_tokens": 3, "stop": "x"}"#).unwrap();
        let Incoming::Request(r) = r else { panic!() };
        assert_eq!(r.id, Id::Text("a".into()));
        assert_eq!(r.stop, Some(Stop::One("x".into())));
        assert_eq!(
            parse_line(br#"{"op": "cancel", "id": 7}"#).unwrap(),
            Incoming::Control(Control::Cancel { id: Id::Number(7) })
        );
        assert_eq!(
            parse_line(br#"{"op": "health"}"#).unwrap(),
            Incoming::Control(Control::Health { id: None })
        );
    }

    #[test]
    fn bad_lines_say_why_and_keep_the_id() {
        assert_eq!(rejected("{nope").error.code, ErrorCode::InvalidJson);
        let e = rejected("[1, 2]");
        assert_eq!(e.error.code, ErrorCode::InvalidJson);
        assert!(e.error.message.contains("an array"), "{}", e.error.message);
        let e = rejected(r#"{"id": "x", "prompt": "a", "max_token": 3}"#);
        assert_eq!(e.error.code, ErrorCode::InvalidRequest);
        assert_eq!(e.id, Some(Id::Text("x".into())));
        assert!(e.error.message.contains("max_token"), "{}", e.error.message);
        let e = rejected(r#"{"id": 3, "prompt": "a", "temperature": "hot"}"#);
        assert_eq!(
            (e.id, e.error.code),
            (Some(Id::Number(3)), ErrorCode::InvalidRequest)
        );
        let e = rejected(r#"{"prompt": "a"}"#);
        assert_eq!((e.id, e.error.code), (None, ErrorCode::InvalidRequest));
        assert!(e.error.message.contains("id"), "{}", e.error.message);
        let e = rejected(r#"{"id": 1, "messages": [{"role": "bot", "content": "x"}]}"#);
        assert!(e.error.message.contains("bot"), "{}", e.error.message);
        let e = rejected(r#"{"op": "cancel", "id": 1, "extra": 2}"#);
        assert_eq!(e.error.code, ErrorCode::InvalidRequest);
        let e = rejected(r#"{"op": "restart"}"#);
        assert_eq!(e.error.code, ErrorCode::InvalidRequest);
        let e = parse_line(b"{\"id\": \"\xff\"}").unwrap_err();
        assert_eq!(e.error.code, ErrorCode::InvalidUtf8);
        let e = rejected(r#"{"id": 1.5, "prompt": "a"}"#);
        assert_eq!((e.id, e.error.code), (None, ErrorCode::InvalidRequest));
    }

    fn tokenizer() -> Tokenizer {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/crystalchat/tokenizer.json"
        );
        let json = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        Tokenizer::from_json(&json, crate::tokenizer::SpecialTokens::CRYSTALCHAT).unwrap()
    }

    fn request(extra: serde_json::Value) -> Request {
        let mut v = serde_json::json!({"id": 1});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        Request::deserialize(&v).unwrap()
    }

    #[test]
    fn prepare_checks_values_and_fills_defaults() {
        let tok = tokenizer();
        let limits = Limits {
            n_ctx: 64,
            default_max_tokens: 512,
        };
        let prep = |extra| request(extra).prepare(&tok, &limits, || 99);
        let err = |extra| prep(extra).unwrap_err();

        let p = prep(serde_json::json!({"prompt": "Hello", "stop": ["a", "b"]})).unwrap();
        assert_eq!(p.prompt[0], 1, "raw prompts start with <s>");
        assert_eq!(
            p.params.max_tokens, 64,
            "the default is capped at the context"
        );
        assert_eq!(p.params.sampling.seed, 99, "no seed: a random one");
        assert_eq!(p.params.stop, ["a", "b"]);
        let p = prep(
            serde_json::json!({"messages": [{"role": "user", "content": "Hi"}],
            "seed": 5, "max_tokens": 3, "temperature": 0.0}),
        )
        .unwrap();
        assert_eq!((p.params.sampling.seed, p.params.max_tokens), (5, 3));
        assert_eq!(p.params.sampling.temperature, 0.0);

        for (extra, needle) in [
            (serde_json::json!({}), "needs"),
            (
                serde_json::json!({"prompt": "a", "messages": []}),
                "not both",
            ),
            (serde_json::json!({"messages": []}), "empty"),
            (
                serde_json::json!({"prompt": "a", "max_tokens": 0}),
                "max_tokens",
            ),
            (
                serde_json::json!({"prompt": "a", "max_tokens": 65}),
                "max_tokens",
            ),
            (
                serde_json::json!({"prompt": "a", "logprobs": 21}),
                "logprobs",
            ),
            (
                serde_json::json!({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}),
                "stop",
            ),
            (serde_json::json!({"prompt": "a", "top_p": 0.0}), "top_p"),
            (
                serde_json::json!({"prompt": "a", "timeout_ms": 0}),
                "timeout_ms",
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": "a"},
                {"role": "user", "content": "b"}]}),
                "",
            ),
        ] {
            let e = err(extra.clone());
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{extra}");
            assert!(e.message.contains(needle), "{extra}: {}", e.message);
        }
        let e = err(serde_json::json!({"prompt": "word ".repeat(100)}));
        assert_eq!(e.code, ErrorCode::ContextLengthExceeded);
    }

    #[test]
    fn reply_lines_are_one_json_object_per_line() {
        let line = reply_line(
            Some(&Id::Text("q".into())),
            &Event::Token {
                index: 3,
                text: "a\nb".into(),
            },
        );
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "q", "event": "token", "index": 3, "text": "a\nb"})
        );
        let v: serde_json::Value =
            serde_json::from_slice(&reply_line(None, &Event::error(ErrorCode::Busy, "full")))
                .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": null, "event": "error", "code": "busy", "message": "full"})
        );
    }
}
