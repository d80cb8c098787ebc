//! CrystalChat tokenizer: the HF `tokenizers` BPE model for encoding, plus
//! our own table-driven decoding so that whole-text decoding and streaming
//! ([`stream::StreamDecoder`]) share one definition and cannot drift apart.
//!
//! Layout of prompts is in [`chat`]; see the spec section "Tokenizer and
//! chat format" for why prompts are built from ids, not from one string.

pub mod chat;
pub mod stream;

pub use crate::model_file::SpecialTokens;
pub use chat::{render, render_complete, Message, Role, DEFAULT_SYSTEM_PROMPT};
pub use stream::StreamDecoder;

use std::fmt;

/// What went wrong loading the tokenizer, encoding, decoding or rendering a
/// conversation. The message is meant for people (logs, API error bodies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerError(String);

impl TokenizerError {
    pub(crate) fn new(msg: impl Into<String>) -> Self {
        TokenizerError(msg.into())
    }

    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TokenizerError {}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    /// The bytes each id contributes to decoded text, indexed by id (every id
    /// below the length exists; checked at load). SentencePiece vocabularies
    /// mix text pieces with byte-fallback pieces (`<0xE2>`); flattening both
    /// to bytes makes decoding "concatenate, then UTF-8 decode", which a
    /// streaming decoder can reproduce exactly.
    pieces: Vec<Box<[u8]>>,
    is_special: Vec<bool>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.pieces.len())
            .field("special", &self.special)
            .finish_non_exhaustive()
    }
}

/// `<0xHH>` is how byte-fallback tokens are spelled; the HF `ByteFallback`
/// decoder recognises exactly this shape, so we do too.
fn byte_fallback_value(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

impl Tokenizer {
    /// Loads an HF `tokenizer.json` and checks that `special` names the
    /// tokens the chat layout relies on, so that a model file whose metadata
    /// disagrees with its tokenizer fails at load rather than producing
    /// prompts the model never saw.
    pub fn from_json(json: &str, special: SpecialTokens) -> Result<Self, TokenizerError> {
        let mut inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| TokenizerError::new(format!("cannot parse tokenizer.json: {e}")))?;
        // A truncation or padding setting in the file would silently change
        // prompts; chat rendering decides lengths itself.
        inner
            .with_truncation(None)
            .map_err(|e| TokenizerError::new(format!("cannot disable truncation: {e}")))?;
        inner.with_padding(None);
        // Prompt-injection guard: special-token strings in text must encode
        // as plain text; only `chat::render` may place control ids.
        inner.set_encode_special_tokens(true);

        let vocab = inner.get_vocab(true);
        let size = vocab
            .values()
            .map(|&id| id as usize + 1)
            .max()
            .ok_or_else(|| TokenizerError::new("tokenizer vocabulary is empty"))?;
        let special_ids: Vec<u32> = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, tok)| tok.special)
            .map(|(&id, _)| id)
            .collect();

        let mut pieces = Vec::with_capacity(size);
        let mut is_special = vec![false; size];
        for id in 0..size as u32 {
            let token = inner.id_to_token(id).ok_or_else(|| {
                TokenizerError::new(format!(
                    "tokenizer vocabulary has a gap: no token for id {id} (size {size})"
                ))
            })?;
            let bytes: Box<[u8]> = match byte_fallback_value(&token) {
                Some(b) => Box::new([b]),
                // Same as the file's decoder: "▁" stands for a space.
                None => token
                    .replace('\u{2581}', " ")
                    .into_bytes()
                    .into_boxed_slice(),
            };
            pieces.push(bytes);
        }
        for id in special_ids {
            if let Some(flag) = is_special.get_mut(id as usize) {
                *flag = true;
            }
        }

        let tok = Tokenizer {
            inner,
            special,
            pieces,
            is_special,
        };
        let expected = [
            ("bos", special.bos, "<s>"),
            ("eos", special.eos, "</s>"),
            ("im_start", special.im_start, "<|im_start|>"),
            ("im_end", special.im_end, "<|im_end|>"),
            ("sys_start", special.sys_start, "<|sys_start|>"),
            ("sys_end", special.sys_end, "<|sys_end|>"),
        ];
        for (name, id, want) in expected {
            match tok.id_to_piece(id) {
                Some(got) if got == want => {}
                Some(got) => {
                    return Err(TokenizerError::new(format!(
                        "special token {name} has id {id}, which the tokenizer spells {got:?}, \
                         expected {want:?}"
                    )))
                }
                None => {
                    return Err(TokenizerError::new(format!(
                        "special token {name} has id {id}, outside the tokenizer's vocabulary \
                         (size {})",
                        tok.vocab_size()
                    )))
                }
            }
            if !tok.is_special(id) {
                return Err(TokenizerError::new(format!(
                    "token {want:?} (id {id}) is not marked special in tokenizer.json"
                )));
            }
        }
        Ok(tok)
    }

    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// The tokenizer's own vocabulary size (ids `0..vocab_size()`). The
    /// model's embedding table may be larger (padded); ids in that padding
    /// are not decodable.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Whether `id` is a control token (`<s>`, `<|im_start|>`, the code
    /// markers, ...) rather than text.
    pub fn is_special(&self, id: u32) -> bool {
        self.is_special.get(id as usize).copied().unwrap_or(false)
    }

    /// The ids of `text` alone, exactly as training encoded each text
    /// segment: the normalizer's leading "▁" included, no `<s>`, and
    /// special-token strings treated as plain text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::new(format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// A raw completion prompt: `<s>` followed by `encode(text)`.
    pub fn encode_raw_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = vec![self.special.bos];
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// Text of `ids`. Control tokens appear as their spelling (`<s>`), so a
    /// decoded prompt shows its structure; callers that stream a reply stop
    /// before control ids anyway. Byte-fallback runs that are not valid UTF-8
    /// become U+FFFD (one per maximal invalid sequence, as
    /// `String::from_utf8_lossy`), and one leading space of the whole text is
    /// dropped, as the file's `Strip` decoder does.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.piece_bytes(id)?);
        }
        let text = String::from_utf8_lossy(&bytes);
        Ok(text.strip_prefix(' ').unwrap_or(&text).to_owned())
    }

    /// The vocabulary spelling of `id` (`"▁Hello"`, `"<0x0A>"`, `"<s>"`).
    pub fn id_to_piece(&self, id: u32) -> Option<String> {
        if id as usize >= self.pieces.len() {
            return None;
        }
        self.inner.id_to_token(id)
    }

    pub(crate) fn piece_bytes(&self, id: u32) -> Result<&[u8], TokenizerError> {
        self.pieces.get(id as usize).map(|p| &**p).ok_or_else(|| {
            TokenizerError::new(format!(
                "token id {id} is outside the tokenizer's vocabulary (size {})",
                self.pieces.len()
            ))
        })
    }

    /// The HF decoder's output, for checking our own decoding against it.
    #[cfg(test)]
    fn hf_decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).expect("hf decode")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(name: &str) -> String {
        let path = format!(
            "{}/../shared/crystalchat/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn real() -> Tokenizer {
        Tokenizer::from_json(&shared("tokenizer.json"), SpecialTokens::CRYSTALCHAT).unwrap()
    }

    #[test]
    fn byte_fallback_spelling() {
        assert_eq!(byte_fallback_value("<0x0A>"), Some(0x0a));
        assert_eq!(byte_fallback_value("<0xe2>"), Some(0xe2));
        assert_eq!(byte_fallback_value("<0x0A0>"), None);
        assert_eq!(byte_fallback_value("<s>"), None);
        assert_eq!(byte_fallback_value("<0xZZ>"), None);
    }

    #[test]
    fn decode_matches_hf_decoder_on_real_data() {
        let tok = real();
        let sample = shared("chat_sample.jsonl");
        for (n, line) in sample.lines().enumerate() {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            let ids: Vec<u32> = row["token_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(tok.decode(&ids).unwrap(), tok.hf_decode(&ids), "row {n}");
        }
        // Valid multi-byte characters spread over byte tokens, and text.
        let ids = tok.encode("😀 你好 naïve ∑").unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), tok.hf_decode(&ids));
    }

    #[test]
    fn wrong_special_ids_are_rejected() {
        let json = shared("tokenizer.json");
        let mut sp = SpecialTokens::CRYSTALCHAT;
        sp.im_start = 32019;
        let err = Tokenizer::from_json(&json, sp).unwrap_err();
        assert!(err.to_string().contains("im_start"), "{err}");
        let mut sp = SpecialTokens::CRYSTALCHAT;
        sp.eos = 40000;
        let err = Tokenizer::from_json(&json, sp).unwrap_err();
        assert!(err.to_string().contains("40000"), "{err}");
    }
}
