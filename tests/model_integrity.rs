//! The model file's checksum: recorded by the quantizer, checked by
//! `crystald verify` and by `serve` with `verify_model`. A single flipped
//! byte anywhere, in any tensor type's data or in the metadata, is caught;
//! files without a checksum still load.

mod common;

use common::startup::{rewrite, rewrite_model, Serve};
use common::*;
use crystald::gguf::Gguf;
use crystald::quant::GgmlType;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

fn verify(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_crystald"))
        .arg("verify")
        .arg(path)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn flipped(src: &Path, dst: &Path, at: usize) {
    let mut bytes = std::fs::read(src).unwrap();
    bytes[at] ^= 0x10;
    std::fs::write(dst, bytes).unwrap();
}

#[test]
fn verify_catches_a_flipped_byte_in_every_tensor_type_region() {
    let dir = temp_dir();
    let mut types_seen = BTreeMap::new();
    for preset in PRESETS {
        let path = converted("tiny-a", preset);
        let ok = verify(&path);
        assert_eq!(ok.status.code(), Some(0), "{preset}: {}", text(&ok));
        let out = text(&ok);
        assert!(
            out.contains("checksum ok") && out.contains("GB in"),
            "{out}"
        );

        // One tensor of each storage type in this file, a byte in its middle.
        let file = Gguf::open(&path).unwrap();
        let mut by_type = BTreeMap::new();
        for t in &file.header.tensors {
            by_type.entry(t.ty.name()).or_insert(t);
        }
        for (ty, t) in by_type {
            let bad = dir.path().join(format!("{preset}-{ty}.gguf"));
            flipped(&path, &bad, (t.offset + t.n_bytes / 2) as usize);
            let o = verify(&bad);
            assert_eq!(o.status.code(), Some(1), "{preset} {ty}: {}", text(&o));
            let e = text(&o);
            assert!(
                e.contains("checksum mismatch") && e.contains("corrupt"),
                "{preset} {ty}: {e}"
            );
            *types_seen.entry(ty).or_insert(0) += 1;
        }
        // The metadata is covered too: a byte of the embedded tokenizer.
        let bytes = std::fs::read(&path).unwrap();
        let at = bytes
            .windows(12)
            .position(|w| w == b"<|im_start|>")
            .unwrap();
        let bad = dir.path().join(format!("{preset}-meta.gguf"));
        flipped(&path, &bad, at + 3);
        let o = verify(&bad);
        assert_eq!(o.status.code(), Some(1), "{preset} metadata: {}", text(&o));
    }
    let types: Vec<_> = types_seen.keys().copied().collect();
    assert_eq!(
        types,
        ["f16", "f32", "q4_0", "q4_K", "q5_K", "q6_K", "q8_0"],
        "every type was tried"
    );
}

#[test]
fn a_file_without_a_checksum_loads_with_a_note() {
    let dir = temp_dir();
    let old = dir.path().join("old.gguf");
    rewrite_model(&converted("tiny-a", "q4_0"), &old, |_| {});
    assert!(Gguf::open(&old).unwrap().header.checksum.is_none());

    let o = verify(&old);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("no checksum recorded"), "{}", text(&o));

    let s = Serve::ready(&old, &[], &[]);
    assert!(s.log().contains("no checksum recorded"), "{}", s.log());
    drop(s);
    // Asked to verify, it still serves the file, with a warning.
    let s = Serve::ready(&old, &["--verify-model"], &[]);
    // "<4>": a warning in the journal's priority prefix.
    assert!(
        s.log()
            .lines()
            .any(|l| l.starts_with("<4>") && l.contains("no checksum recorded")),
        "{}",
        s.log()
    );
}

#[test]
fn serve_with_verify_model_refuses_a_corrupt_file_and_serves_a_good_one() {
    let good = converted("tiny-a", "q8_0");
    let s = Serve::ready(&good, &["--verify-model"], &[]);
    assert!(s.log().contains("checksum ok"), "{}", s.log());
    drop(s);

    let dir = temp_dir();
    let bad = dir.path().join("bad.gguf");
    let file = Gguf::open(&good).unwrap();
    let t = file.header.tensors.last().unwrap();
    flipped(&good, &bad, t.offset as usize);
    let log = Serve::refused(&bad, &["--verify-model"], &[], None);
    assert!(
        log.contains("bad.gguf") && log.contains("checksum mismatch"),
        "{log}"
    );
    // Without verify_model the (cheap) start does not read the whole file.
    let s = Serve::ready(&bad, &[], &[]);
    assert!(!s.log().contains("checksum"), "{}", s.log());
}

#[test]
fn non_finite_block_scales_are_refused_by_verify_and_verify_model() {
    let src = converted("tiny-a", "q4_k_m");
    let g = Gguf::open(&src).unwrap();
    let dir = temp_dir();
    const NAN: [u8; 2] = 0x7E00u16.to_le_bytes();
    const INF: [u8; 2] = 0xFC00u16.to_le_bytes(); // −Inf
                                                  // (type, byte offset of the damaged f16 in a block, value)
    let cases = [
        (GgmlType::Q4_K, 0, NAN),         // d
        (GgmlType::Q4_K, 2, INF),         // dmin
        (GgmlType::Q6_K, 208, NAN),       // d, at the end of the block
        (GgmlType::F32, 2, [0x80, 0x7F]), // an f32 exponent of all ones
    ];
    for (i, (ty, at, value)) in cases.into_iter().enumerate() {
        let t = g.header.tensors.iter().find(|t| t.ty == ty).unwrap();
        let bad = dir.path().join(format!("bad-{i}.gguf"));
        let block = 3;
        let mut edited = false;
        // A fresh, valid checksum over the damage: what the scale scan is for.
        let edit = |name: &str, d: &mut [u8]| {
            if name == t.name {
                let off = block * ty.type_size() + at;
                d[off..off + 2].copy_from_slice(&value);
                edited = true;
            }
        };
        rewrite(&src, &bad, |_| {}, edit, true);
        assert!(edited, "no tensor {}", t.name);
        let o = verify(&bad);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(1), "{ty}: {out}");
        let unit = if ty == GgmlType::F32 {
            "value"
        } else {
            "block"
        };
        assert!(
            out.contains(&t.name)
                && out.contains(&format!("{unit} {block} has a NaN or infinite scale")),
            "{ty}: {out}"
        );
        if i == 0 {
            let log = Serve::refused(&bad, &["--verify-model"], &[], None);
            assert!(
                log.contains(&t.name) && log.contains("NaN or infinite"),
                "{log}"
            );
        }
    }
    // The undamaged file passes both checks.
    let o = verify(&src);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}
