//! Placeholder: filled by the checkpoint-reader work.
