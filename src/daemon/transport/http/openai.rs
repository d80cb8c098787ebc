//! OpenAI's chat-completions and completions shapes, translated to and from
//! the daemon's own [`protocol`] request and events.
//!
//! Requests: fields this daemon understands are checked strictly (a wrong
//! type is a 400 naming the field); fields it does not know are ignored, as
//! OpenAI clients send many (`user`, `tools`, `frequency_penalty`...).

use crate::daemon::protocol::{self, ApiError, Done, ErrorCode, Id, Logprobs, Stop, MAX_LOGPROBS};
use crate::generate::FinishReason;
use crate::tokenizer::chat::{Message, Role};
use serde_json::{json, Map, Value};

/// Which endpoint a request came to; decides the shapes of the reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// A request turned into the daemon's own, with what the reply needs.
#[derive(Debug)]
pub struct Translated {
    pub request: protocol::Request,
    pub kind: Kind,
    /// Top log-probabilities to report per token, when asked.
    pub top_logprobs: Option<usize>,
    pub include_usage: bool,
}

/// An OpenAI error object with its HTTP status.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpError {
    pub status: u16,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
}

impl HttpError {
    pub fn new(
        status: u16,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        HttpError {
            status,
            kind,
            code,
            message: message.into(),
            param: None,
        }
    }

    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        HttpError {
            param: Some(param.to_string()),
            ..HttpError::new(400, "invalid_request_error", "invalid_request", message)
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        let (status, kind) = match e.code {
            ErrorCode::Busy => (429, "rate_limit_error"),
            ErrorCode::ShuttingDown => (503, "server_error"),
            ErrorCode::Internal => (500, "server_error"),
            ErrorCode::Forbidden => (403, "permission_error"),
            ErrorCode::PayloadTooLarge | ErrorCode::LineTooLong => (413, "invalid_request_error"),
            ErrorCode::DeadlineExceeded => (408, "timeout_error"),
            ErrorCode::InvalidJson
            | ErrorCode::InvalidUtf8
            | ErrorCode::InvalidRequest
            | ErrorCode::DuplicateId
            | ErrorCode::StaleRequest
            | ErrorCode::ContextLengthExceeded => (400, "invalid_request_error"),
        };
        HttpError::new(status, kind, e.code.as_str(), e.message)
    }
}

type Obj = Map<String, Value>;

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A field's value, `None` when absent or null (OpenAI clients send nulls
/// for unset options).
fn field<'a>(o: &'a Obj, name: &str) -> Option<&'a Value> {
    o.get(name).filter(|v| !v.is_null())
}

fn wrong(name: &str, want: &str, got: &Value) -> HttpError {
    HttpError::invalid(
        name,
        format!("'{name}' must be {want}, got {}", kind_of(got)),
    )
}

fn float(o: &Obj, name: &str) -> Result<Option<f32>, HttpError> {
    field(o, name)
        .map(|v| {
            v.as_f64()
                .map(|f| f as f32)
                .ok_or_else(|| wrong(name, "a number", v))
        })
        .transpose()
}

fn uint(o: &Obj, name: &str) -> Result<Option<u64>, HttpError> {
    field(o, name)
        .map(|v| {
            v.as_u64()
                .ok_or_else(|| wrong(name, "a non-negative integer", v))
        })
        .transpose()
}

fn boolean(o: &Obj, name: &str) -> Result<Option<bool>, HttpError> {
    field(o, name)
        .map(|v| v.as_bool().ok_or_else(|| wrong(name, "true or false", v)))
        .transpose()
}

/// Parses a body into a JSON object, naming what is wrong.
pub fn parse_body(body: &[u8]) -> Result<Obj, HttpError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        HttpError::new(
            400,
            "invalid_request_error",
            "invalid_json",
            format!("the body is not JSON: {e}"),
        )
    })?;
    match value {
        Value::Object(o) => Ok(o),
        other => Err(HttpError::new(
            400,
            "invalid_request_error",
            "invalid_json",
            format!("the body must be a JSON object, got {}", kind_of(&other)),
        )),
    }
}

/// The options both endpoints share.
fn common(o: &Obj, kind: Kind, id: String) -> Result<Translated, HttpError> {
    if let Some(n) = field(o, "n") {
        if n.as_u64() != Some(1) {
            return Err(HttpError::invalid(
                "n",
                format!("only n = 1 is supported, got {n}"),
            ));
        }
    }
    let max_tokens = match uint(o, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => uint(o, "max_tokens")?,
    };
    let seed = field(o, "seed")
        .map(|v| {
            // OpenAI's seeds are signed 64-bit; the bits are the seed.
            v.as_i64()
                .map(|s| s as u64)
                .or_else(|| v.as_u64())
                .ok_or_else(|| wrong("seed", "an integer", v))
        })
        .transpose()?;
    let stop = match field(o, "stop") {
        None => None,
        Some(Value::String(s)) => Some(Stop::One(s.clone())),
        Some(Value::Array(items)) => Some(Stop::Many(
            items
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| wrong("stop", "a string or an array of strings", s))
                })
                .collect::<Result<_, _>>()?,
        )),
        Some(other) => return Err(wrong("stop", "a string or an array of strings", other)),
    };
    let stream = boolean(o, "stream")?.unwrap_or(false);
    let include_usage = match field(o, "stream_options") {
        None => false,
        Some(Value::Object(so)) => boolean(so, "include_usage")
            .map_err(|e| HttpError {
                param: Some("stream_options.include_usage".into()),
                ..e
            })?
            .unwrap_or(false),
        Some(other) => return Err(wrong("stream_options", "an object", other)),
    };
    let top_logprobs = match kind {
        // Chat: `logprobs: true` turns them on, `top_logprobs` says how many alternatives.
        Kind::Chat => match boolean(o, "logprobs")? {
            Some(true) => Some(uint(o, "top_logprobs")?.unwrap_or(0) as usize),
            _ => None,
        },
        // Completions: `logprobs: N` (OpenAI allows up to 5).
        Kind::Completion => uint(o, "logprobs")?.map(|n| n as usize),
    };
    if let Some(n) = top_logprobs.filter(|&n| n > MAX_LOGPROBS) {
        return Err(HttpError::invalid(
            if kind == Kind::Chat {
                "top_logprobs"
            } else {
                "logprobs"
            },
            format!("at most {MAX_LOGPROBS} top_logprobs per token, got {n}"),
        ));
    }
    let request = protocol::Request {
        id: Id::Text(id),
        messages: None,
        prompt: None,
        max_tokens,
        temperature: float(o, "temperature")?,
        top_k: uint(o, "top_k")?.map(|k| k as usize),
        top_p: float(o, "top_p")?,
        min_p: float(o, "min_p")?,
        repeat_penalty: float(o, "repeat_penalty")?,
        seed,
        stop,
        stream,
        // The engine reports the chosen token's log-probability only
        // beside at least one alternative; extra ones are cut in the reply.
        logprobs: top_logprobs.map_or(0, |n| n.max(1)),
        timeout_ms: None,
    };
    Ok(Translated {
        request,
        kind,
        top_logprobs,
        include_usage,
    })
}

fn message(i: usize, v: &Value) -> Result<Message, HttpError> {
    let param = format!("messages[{i}]");
    let o = v.as_object().ok_or_else(|| {
        HttpError::invalid(
            &param,
            format!("{param} must be an object, got {}", kind_of(v)),
        )
    })?;
    let role = match field(o, "role").and_then(Value::as_str) {
        Some("system") | Some("developer") => Role::System,
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        Some(other) => {
            return Err(HttpError::invalid(
                &format!("{param}.role"),
                format!(
                    "{param}.role '{other}' is not supported (system, developer, user, assistant)"
                ),
            ))
        }
        None => {
            return Err(HttpError::invalid(
                &format!("{param}.role"),
                format!("{param} needs a 'role' string"),
            ))
        }
    };
    let content = match field(o, "content") {
        // An assistant turn that only called tools has no content.
        None if role == Role::Assistant => String::new(),
        None => {
            return Err(HttpError::invalid(
                &format!("{param}.content"),
                format!("{param} needs 'content'"),
            ))
        }
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let p = format!("{param}.content[{j}]");
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (Some("text"), None) => {
                        return Err(HttpError::invalid(&p, format!("{p} needs a 'text' string")))
                    }
                    (Some(other), _) => {
                        return Err(HttpError::invalid(
                            &p,
                            format!(
                            "{p}: content parts of type '{other}' are not supported, only 'text'"
                        ),
                        ))
                    }
                    (None, _) => return Err(HttpError::invalid(&p, format!("{p} needs a 'type'"))),
                }
            }
            text
        }
        Some(other) => {
            return Err(wrong(
                &format!("{param}.content"),
                "a string or an array of text parts",
                other,
            ))
        }
    };
    Ok(Message { role, content })
}

/// `POST /v1/chat/completions`.
pub fn chat_request(o: &Obj, id: String) -> Result<Translated, HttpError> {
    let messages = match field(o, "messages") {
        Some(Value::Array(m)) if m.is_empty() => {
            return Err(HttpError::invalid("messages", "'messages' is empty"))
        }
        Some(Value::Array(m)) => m
            .iter()
            .enumerate()
            .map(|(i, v)| message(i, v))
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => return Err(wrong("messages", "an array", other)),
        None => return Err(HttpError::invalid("messages", "'messages' is required")),
    };
    let mut t = common(o, Kind::Chat, id)?;
    t.request.messages = Some(messages);
    Ok(t)
}

/// `POST /v1/completions`.
pub fn completion_request(o: &Obj, id: String) -> Result<Translated, HttpError> {
    let prompt = match field(o, "prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => s.clone(),
            _ => {
                return Err(HttpError::invalid(
                    "prompt",
                    "'prompt' must be one string (a list of one string is accepted)",
                ))
            }
        },
        Some(other) => return Err(wrong("prompt", "a string", other)),
        None => return Err(HttpError::invalid("prompt", "'prompt' is required")),
    };
    if boolean(o, "echo")? == Some(true) {
        return Err(HttpError::invalid("echo", "echo is not supported"));
    }
    if field(o, "suffix").is_some_and(|s| s.as_str() != Some("")) {
        return Err(HttpError::invalid("suffix", "suffix is not supported"));
    }
    let mut t = common(o, Kind::Completion, id)?;
    t.request.prompt = Some(prompt);
    Ok(t)
}

pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        // OpenAI has one reason for running out of room.
        FinishReason::Length | FinishReason::Context => "length",
        FinishReason::Cancelled => "cancelled",
    }
}

/// Everything a reply repeats: its id, creation time and model.
pub struct Reply<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub kind: Kind,
    pub top_logprobs: Option<usize>,
}

impl Reply<'_> {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        })
    }

    pub fn usage(d: &Done) -> Value {
        json!({
            "prompt_tokens": d.usage.prompt_tokens,
            "completion_tokens": d.usage.completion_tokens,
            "total_tokens": d.usage.prompt_tokens + d.usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": d.usage.cached_tokens},
        })
    }

    fn logprobs(&self, lp: Option<&Logprobs>) -> Value {
        let (Some(n), Some(lp)) = (self.top_logprobs, lp) else {
            return Value::Null;
        };
        match self.kind {
            Kind::Chat => json!({"content": lp.content.iter().map(|t| json!({
                "token": t.token,
                "logprob": t.logprob,
                "bytes": t.token.as_bytes(),
                "top_logprobs": t.top_logprobs.iter().take(n).map(|a| json!({
                    "token": a.token, "logprob": a.logprob, "bytes": a.token.as_bytes(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>()}),
            Kind::Completion => {
                let mut offset = 0;
                let mut offsets = Vec::new();
                for t in &lp.content {
                    offsets.push(offset);
                    offset += t.token.len();
                }
                json!({
                    "tokens": lp.content.iter().map(|t| &t.token).collect::<Vec<_>>(),
                    "token_logprobs": lp.content.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": lp.content.iter().map(|t| t.top_logprobs.iter().take(n)
                        .map(|a| (a.token.clone(), json!(a.logprob))).collect::<Map<_, _>>()).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
        }
    }

    /// The whole reply of a request that was not streamed.
    pub fn complete(&self, d: &Done) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": d.text, "refusal": null},
                "logprobs": self.logprobs(d.logprobs.as_ref()),
                "finish_reason": finish_reason(d.finish_reason),
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": d.text,
                "logprobs": self.logprobs(d.logprobs.as_ref()),
                "finish_reason": finish_reason(d.finish_reason),
            }),
        };
        let mut v = self.envelope(false, json!([choice]));
        v["usage"] = Self::usage(d);
        v
    }

    /// The first chunk of a chat stream names the role.
    pub fn role_chunk(&self) -> Option<Value> {
        (self.kind == Kind::Chat).then(|| {
            self.envelope(
                true,
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": null}]),
            )
        })
    }

    /// A streamed piece of text.
    pub fn text_chunk(&self, text: &str) -> Value {
        self.envelope(
            true,
            json!([self.chunk_choice(json!(text), Value::Null, Value::Null)]),
        )
    }

    fn chunk_choice(&self, text: Value, logprobs: Value, finish: Value) -> Value {
        match self.kind {
            Kind::Chat => {
                let delta = if text.is_null() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": if text.is_null() { json!("") } else { text }, "logprobs": logprobs, "finish_reason": finish})
            }
        }
    }

    /// The chunk that ends a stream: the finish reason, and the
    /// log-probabilities of the whole reply when asked.
    pub fn final_chunk(&self, d: &Done) -> Value {
        let choice = self.chunk_choice(
            Value::Null,
            self.logprobs(d.logprobs.as_ref()),
            json!(finish_reason(d.finish_reason)),
        );
        self.envelope(true, json!([choice]))
    }

    /// `stream_options.include_usage`: a last chunk with no choices.
    pub fn usage_chunk(&self, d: &Done) -> Value {
        let mut v = self.envelope(true, json!([]));
        v["usage"] = Self::usage(d);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Obj {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn chat_requests_translate_with_their_options() {
        let t = chat_request(
            &obj(json!({
                "model": "anything", "user": "ignored", "tools": [],
                "messages": [
                    {"role": "developer", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                    {"role": "assistant", "content": null, "tool_calls": []},
                    {"role": "user", "content": "Again"}
                ],
                "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0, "seed": -1,
                "stop": "x", "stream": true, "stream_options": {"include_usage": true},
                "logprobs": true, "top_logprobs": 0, "top_k": 5, "n": 1
            })),
            "chatcmpl-1".into(),
        )
        .unwrap();
        let r = &t.request;
        let m = r.messages.as_ref().unwrap();
        assert_eq!(m[0], Message::system("Be brief."));
        assert_eq!(m[1], Message::user("Hi there"));
        assert_eq!(m[2].content, "");
        assert_eq!(
            (r.max_tokens, r.seed, r.top_k),
            (Some(7), Some(u64::MAX), Some(5))
        );
        assert_eq!(r.stop, Some(Stop::One("x".into())));
        assert!(r.stream && t.include_usage);
        assert_eq!((t.top_logprobs, r.logprobs), (Some(0), 1));
    }

    #[test]
    fn bad_chat_requests_name_the_field() {
        for (body, param) in [
            (json!({}), "messages"),
            (json!({"messages": []}), "messages"),
            (json!({"messages": "hi"}), "messages"),
            (
                json!({"messages": [{"role": "tool", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "user"}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages[0].content[0]",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}], "n": 2}),
                "n",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}], "temperature": "hot"}),
                "temperature",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": -3}),
                "max_tokens",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}], "stream": "yes"}),
                "stream",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}], "stop": [1]}),
                "stop",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}], "logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
        ] {
            let e = chat_request(&obj(body.clone()), "x".into()).unwrap_err();
            assert_eq!(
                (e.status, e.param.as_deref()),
                (400, Some(param)),
                "{body}: {e:?}"
            );
            assert!(
                e.message.contains(param.split('[').next().unwrap()),
                "{body}: {}",
                e.message
            );
        }
        assert_eq!(parse_body(b"{nope").unwrap_err().code, "invalid_json");
        assert_eq!(parse_body(b"[1]").unwrap_err().status, 400);
    }

    #[test]
    fn completion_requests_take_one_prompt() {
        let t = completion_request(
            &obj(json!({"prompt": ["def f():"], "logprobs": 2})),
            "c".into(),
        )
        .unwrap();
        assert_eq!(t.request.prompt.as_deref(), Some("def f():"));
        assert_eq!(t.top_logprobs, Some(2));
        for body in [
            json!({}),
            json!({"prompt": ["a", "b"]}),
            json!({"prompt": "a", "echo": true}),
            json!({"prompt": 3}),
        ] {
            assert_eq!(
                completion_request(&obj(body.clone()), "c".into())
                    .unwrap_err()
                    .status,
                400,
                "{body}"
            );
        }
    }

    #[test]
    fn daemon_errors_map_to_statuses() {
        for (code, status) in [
            (ErrorCode::Busy, 429),
            (ErrorCode::ShuttingDown, 503),
            (ErrorCode::ContextLengthExceeded, 400),
            (ErrorCode::Internal, 500),
        ] {
            let e = HttpError::from(ApiError::new(code, "m"));
            assert_eq!((e.status, e.code), (status, code.as_str()));
            assert_eq!(e.body()["error"]["message"], "m");
        }
    }
}
