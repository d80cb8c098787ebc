//! Shared by the fuzz targets: the real CrystalChat tokenizer, loaded once.

use crystald::tokenizer::{SpecialTokens, Tokenizer};
use std::sync::OnceLock;

/// The checkpoint's `tokenizer.json` (`../shared/crystalchat/` beside the
/// repository), or `$CRYSTALD_FUZZ_TOKENIZER`.
pub fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = std::env::var("CRYSTALD_FUZZ_TOKENIZER").unwrap_or_else(|_| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/crystalchat/tokenizer.json"
            )
            .to_string()
        });
        let json = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read the tokenizer {path}: {e}"));
        Tokenizer::from_json(&json, SPECIAL).expect("the CrystalChat tokenizer loads")
    })
}

/// CrystalChat's control token ids (as its GGUF metadata records them).
pub const SPECIAL: SpecialTokens = SpecialTokens::CRYSTALCHAT;

/// With `CRYSTALD_FUZZ_VERBOSE=1`, prints what each input parsed to (run a
/// target on a few files to see which seeds get past which checks).
pub fn report<T: std::fmt::Debug, E: std::fmt::Display>(what: &str, r: &Result<T, E>) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("CRYSTALD_FUZZ_VERBOSE").is_some_and(|v| v != "0")) {
        match r {
            Ok(v) => eprintln!("{what}: ok: {v:?}"),
            Err(e) => eprintln!("{what}: error: {e}"),
        }
    }
}
