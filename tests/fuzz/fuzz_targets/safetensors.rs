//! The quantizer's safetensors reader: header length, JSON header, offsets.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let r = crystal_quantize::checkpoint::fuzzing::safetensors(data);
    crystald_fuzz::report("safetensors", &r);
});
