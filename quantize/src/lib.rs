pub mod checkpoint;
pub mod synth;
