//! crystal-quantize: Hugging Face CrystalChat checkpoints in, one GGUF file out.
//!
//! - [`checkpoint`]: zero-copy readers of the checkpoint formats
//!   (safetensors, PyTorch zip-pickle; single or sharded).
//! - [`hf_config`]: `config.json` and `tokenizer.json` into hyper-parameters
//!   and special ids.
//! - [`convert`]: the tensor-by-tensor conversion pipeline.
//! - [`calibrate`]: the optional pass over calibration tokens that weighs
//!   each matrix's rounding by its inputs' energy.
//! - [`synth`]: random-weight checkpoints in the real layouts, for tests and
//!   benchmarks.

pub mod calibrate;
pub mod checkpoint;
pub mod convert;
pub mod hf_config;
pub mod synth;
