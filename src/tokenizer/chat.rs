//! Conversation -> prompt ids, in the layout of the fine-tuning data:
//!
//! ```text
//! <s> <|sys_start|> enc(system) <|sys_end|>
//!     [<|im_start|> enc(user) <|im_end|>] enc(assistant)
//!     [<|im_start|> enc(user) <|im_end|> enc(assistant)]* </s>
//! ```
//!
//! Built from ids, never from one string: tokenizing the model card's
//! "<s> <|sys_start|> ..." string inserts space tokens the model never saw.
//! In the training sample an assistant turn is followed directly by the next
//! `<|im_start|>`: no `</s>`, newline or space token separates turns, and
//! `</s>` appears once, at the end of the whole conversation.
//!
//! Accepted conversations:
//! - an optional system message, only as the first message (otherwise
//!   [`DEFAULT_SYSTEM_PROMPT`] is used);
//! - then at least one user or assistant message, strictly alternating.
//!   The first may be an assistant message: the training data contains
//!   conversations that resume with assistant text right after
//!   `<|sys_end|>` (e.g. a greeting before the user speaks);
//! - empty contents are allowed (the data has empty assistant replies).
//!
//! A trailing user message leaves the prompt ending in `<|im_end|>`, ready
//! for the reply. A trailing assistant message is a prefix of the reply for
//! the model to continue, so nothing follows it. Note the prefix is encoded
//! on its own, so its last token may split a word differently from how the
//! finished reply would be tokenized.

use super::{SpecialTokens, Tokenizer, TokenizerError};
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Message::new(Role::System, content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Message::new(Role::User, content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Message::new(Role::Assistant, content)
    }
}

/// The model card's default system prompt.
pub const DEFAULT_SYSTEM_PROMPT: &str =
    "You are an AI assistant. You will be given a task. You must generate a detailed and long answer.";

/// Checks the conversation shape and returns the system prompt and the
/// alternating turns after it.
fn split_system(messages: &[Message]) -> Result<(&str, &[Message]), TokenizerError> {
    let (system, turns) = match messages.split_first() {
        None => return Err(TokenizerError::new("conversation has no messages")),
        Some((first, rest)) if first.role == Role::System => (first.content.as_str(), rest),
        Some(_) => (DEFAULT_SYSTEM_PROMPT, messages),
    };
    let offset = messages.len() - turns.len();
    if turns.is_empty() {
        return Err(TokenizerError::new(
            "conversation has only a system message; it needs a user or assistant message",
        ));
    }
    let mut previous: Option<Role> = None;
    for (i, m) in turns.iter().enumerate() {
        let index = i + offset;
        if m.role == Role::System {
            return Err(TokenizerError::new(format!(
                "message {index}: a system message is only allowed as the first message"
            )));
        }
        if previous == Some(m.role) {
            // The layout has no separator between two same-role turns, so
            // they would silently merge into one.
            return Err(TokenizerError::new(format!(
                "message {index}: two {} messages in a row; user and assistant messages must \
                 alternate",
                m.role
            )));
        }
        previous = Some(m.role);
    }
    Ok((system, turns))
}

fn render_into(
    tok: &Tokenizer,
    messages: &[Message],
    out: &mut Vec<u32>,
) -> Result<(), TokenizerError> {
    let (system, turns) = split_system(messages)?;
    let sp = *tok.special();
    out.extend([sp.bos, sp.sys_start]);
    out.extend(tok.encode(system)?);
    out.push(sp.sys_end);
    for m in turns {
        match m.role {
            Role::User => {
                out.push(sp.im_start);
                out.extend(tok.encode(&m.content)?);
                out.push(sp.im_end);
            }
            Role::Assistant => out.extend(tok.encode(&m.content)?),
            Role::System => unreachable!("split_system rejects later system messages"),
        }
    }
    Ok(())
}

/// The prompt ids for `messages` (see the module docs for what is accepted).
pub fn render(tok: &Tokenizer, messages: &[Message]) -> Result<Vec<u32>, TokenizerError> {
    let mut out = Vec::new();
    render_into(tok, messages, &mut out)?;
    Ok(out)
}

/// A finished conversation as it appears in training: [`render`] followed by
/// `</s>`. The last message must be the assistant's reply.
pub fn render_complete(tok: &Tokenizer, messages: &[Message]) -> Result<Vec<u32>, TokenizerError> {
    match messages.last() {
        Some(m) if m.role == Role::Assistant => {}
        Some(m) => {
            return Err(TokenizerError::new(format!(
                "a complete conversation ends with an assistant message, not {}",
                m.role
            )))
        }
        None => return Err(TokenizerError::new("conversation has no messages")),
    }
    let mut out = Vec::new();
    render_into(tok, messages, &mut out)?;
    out.push(tok.special().eos);
    Ok(out)
}

/// Whether a generated `id` ends the assistant's reply. `</s>` ends it, and
/// the model may open the next user turn itself with `<|im_start|>`. The
/// other chat control tokens never occur inside a reply in training, so
/// producing one also means the model has left the reply.
pub fn ends_reply(special: &SpecialTokens, id: u32) -> bool {
    [
        special.eos,
        special.im_start,
        special.im_end,
        special.bos,
        special.sys_start,
        special.sys_end,
    ]
    .contains(&id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(spec: &[(Role, &str)]) -> Vec<Message> {
        spec.iter().map(|&(r, c)| Message::new(r, c)).collect()
    }

    #[test]
    fn shape_validation() {
        use Role::*;
        let ok = |m: &[(Role, &str)]| split_system(&msgs(m)).is_ok();
        assert!(!ok(&[]));
        assert!(!ok(&[(System, "s")]));
        assert!(ok(&[(User, "u")]));
        assert!(ok(&[(System, "s"), (User, "u")]));
        assert!(ok(&[(Assistant, "hi"), (User, "u")]));
        assert!(ok(&[
            (System, "s"),
            (User, "u"),
            (Assistant, "a"),
            (User, "v")
        ]));
        assert!(!ok(&[(User, "u"), (User, "v")]));
        assert!(!ok(&[(User, "u"), (Assistant, "a"), (Assistant, "b")]));
        assert!(!ok(&[(User, "u"), (System, "s")]));
        assert!(!ok(&[(System, "s"), (System, "t"), (User, "u")]));

        let err = split_system(&msgs(&[(System, "s"), (User, "u"), (User, "v")])).unwrap_err();
        assert!(err.to_string().contains("message 2"), "{err}");
        let only_user = msgs(&[(User, "u")]);
        let (sys, turns) = split_system(&only_user).unwrap();
        assert_eq!(sys, DEFAULT_SYSTEM_PROMPT);
        assert_eq!(turns.len(), 1);
    }

    #[test]
    fn message_json_shape() {
        let m: Message = serde_json::from_str(r#"{"role":"user","content":"hi"}"#).unwrap();
        assert_eq!(m, Message::user("hi"));
        assert!(serde_json::from_str::<Message>(r#"{"role":"User","content":"hi"}"#).is_err());
        assert!(
            serde_json::from_str::<Message>(r#"{"role":"user","content":"hi","name":"x"}"#)
                .is_err()
        );
        assert_eq!(
            serde_json::to_string(&Message::assistant("a")).unwrap(),
            r#"{"role":"assistant","content":"a"}"#
        );
    }
}
