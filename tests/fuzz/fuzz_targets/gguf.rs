//! The GGUF reader (header, metadata, tensor table) and the model loader's
//! validation on top of it, on arbitrary file contents.
#![no_main]

use crystald::gguf::Header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parsed = Header::parse(data);
    crystald_fuzz::report("header", &parsed.as_ref().map(|h| h.tensors.len()));
    let Ok(h) = parsed else {
        return;
    };
    // What `Gguf::data` and the engine rely on.
    assert!(h.alignment.is_power_of_two());
    assert!(h.data_offset % h.alignment == 0);
    for t in &h.tensors {
        let end = t.offset.checked_add(t.n_bytes).expect("range overflows");
        assert!(
            end <= data.len() as u64,
            "tensor '{}' lies past the input",
            t.name
        );
        assert!(t.offset >= h.data_offset && t.offset % h.alignment == 0);
        assert!(!t.dims.is_empty() && t.dims.len() <= 4);
        let rows: u64 = t.dims[1..].iter().product();
        let row =
            t.ty.row_bytes(t.dims[0] as usize)
                .expect("validated row length");
        assert_eq!(rows * row as u64, t.n_bytes);
    }
    // A header the engine accepts names every tensor it will index.
    let checked = crystald::model::check_header(&h);
    crystald_fuzz::report("model", &checked);
    if checked.is_ok() {
        let hp = crystald::model_file::Hparams::from_header(&h).unwrap();
        for d in crystald::model_file::tensor_descs(&hp) {
            assert_eq!(h.tensor(&d.name).map(|t| &t.dims), Some(&d.dims));
        }
    }
});
