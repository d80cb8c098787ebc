//! Incremental detokenizing for streamed replies.
//!
//! [`Tokenizer::decode`] is "concatenate each id's bytes, UTF-8 decode
//! lossily, drop one leading space". This decoder does the same thing one id
//! at a time: bytes of a character split over byte-fallback tokens wait in a
//! small buffer until the character is complete, and a sequence that can no
//! longer become valid is emitted as U+FFFD at once, so nothing is held
//! forever. Hence the concatenation of all pieces equals `decode(all ids)`.

use super::{Tokenizer, TokenizerError};

pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    /// Bytes of an incomplete character (at most 3).
    pending: Vec<u8>,
    /// No character has been emitted yet, so a leading space is still the
    /// one the decoder strips.
    at_start: bool,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        StreamDecoder {
            tok,
            pending: Vec::with_capacity(4),
            at_start: true,
        }
    }

    /// Adds one id and returns the text that became final (possibly empty).
    /// An id outside the vocabulary is an error and changes nothing.
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        let bytes = self.tok.piece_bytes(id)?;
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut used = 0;
        loop {
            match std::str::from_utf8(&self.pending[used..]) {
                Ok(s) => {
                    out.push_str(s);
                    used = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[used..used + valid]));
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            used += valid + bad;
                        }
                        // Could still complete with the next token's bytes.
                        None => {
                            used += valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..used);
        Ok(self.emit(out))
    }

    /// Ends the stream: an incomplete character still buffered becomes
    /// U+FFFD, as in [`Tokenizer::decode`]. Pushing afterwards continues the
    /// same text (the leading-space rule does not apply again).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        self.emit(out)
    }

    /// Bytes waiting for the rest of a character.
    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }

    fn emit(&mut self, mut out: String) -> String {
        if self.at_start && !out.is_empty() {
            self.at_start = false;
            if out.starts_with(' ') {
                out.remove(0);
            }
        }
        out
    }
}
