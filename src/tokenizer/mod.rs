//! Placeholder: filled by the tokenizer work.
