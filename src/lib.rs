//! crystald: CrystalChat inference for small Linux devices.
//!
//! Layers, bottom up:
//! - [`quant`]: tensor storage types (ggml-compatible f32, f16, Q8_0, Q4_0).
//! - [`gguf`]: the model file format, reader and writer.
//! - [`model_file`]: the CrystalCoder conventions inside a GGUF file
//!   (metadata keys, tensor names), shared by the quantizer and the engine.
//! - [`ops`]: the forward pass's normalisation and element-wise math, shared
//!   by the engine and the quantizer's calibration pass.
//!
//! With the `runtime` feature (default), the engine and daemon on top.

pub mod gguf;
pub mod model_file;
pub mod quant;

#[cfg(feature = "runtime")]
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "runtime")]
pub mod daemon;
#[cfg(feature = "runtime")]
pub mod device;
#[cfg(feature = "runtime")]
pub mod generate;
#[cfg(feature = "runtime")]
pub mod kernels;
#[cfg(feature = "runtime")]
pub mod model;
pub mod npy;
pub mod ops;
pub mod procfs;
#[cfg(feature = "runtime")]
pub mod sampling;
#[cfg(feature = "runtime")]
pub mod tokenizer;
