//! The quantizer's non-executing pickle machine and state-dict reader.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let r = crystal_quantize::checkpoint::fuzzing::pickle(data);
    crystald_fuzz::report("pickle", &r);
});
