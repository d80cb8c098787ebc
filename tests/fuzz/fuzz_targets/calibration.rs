//! The quantizer's calibration token file (`crystal-quantize --calibrate`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // CrystalChat's vocabulary, short chunks and a budget so one input
    // exercises the chunking and the cut-off too.
    let r = crystal_quantize::calibrate::parse_token_lines(data, "fuzz input", 32032, 7, 100);
    if let Ok(chunks) = &r {
        assert!(chunks.iter().all(|c| !c.is_empty() && c.len() <= 7));
        assert!(chunks.iter().map(Vec::len).sum::<usize>() <= 100);
        assert!(chunks.iter().flatten().all(|&id| id < 32032));
    }
    crystald_fuzz::report("calibration", &r);
});
