//! Placeholder: filled by the sampling work.
