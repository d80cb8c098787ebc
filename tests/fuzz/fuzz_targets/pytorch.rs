//! The quantizer's PyTorch `.bin` reader end to end: zip directory, the
//! pickled state dict, and each tensor's storage lookup.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let r = crystal_quantize::checkpoint::fuzzing::pytorch(data);
    crystald_fuzz::report("pytorch", &r);
});
