//! The quantizer's zip reader alone (end records, zip64, central directory,
//! local headers).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let r = crystal_quantize::checkpoint::fuzzing::zip(data);
    crystald_fuzz::report("zip", &r);
});
