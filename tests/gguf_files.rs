//! Converted fixtures read back through the project's reader and through
//! the reference Python `gguf` package; the reader's handling of damaged
//! and foreign files.

mod common;

use common::*;
use crystal_quantize::checkpoint::{self, Checkpoint};
use crystald::gguf::{checksum, Gguf, GgufWriter, TensorSpec, Value};
use crystald::kernels;
use crystald::model::Model;
use crystald::model_file::{self, Hparams, Kind};
use crystald::quant::{self, GgmlType};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every tensor of the file in file layout (rows, cols), computed from the
/// checkpoint with a naive transpose, independently of the quantizer.
fn expected_tensors(fixture_name: &str, hp: &Hparams) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let ckpt = Checkpoint::open(&fixture(fixture_name)).unwrap();
    let mut out = Vec::new();
    for d in model_file::tensor_descs(hp) {
        let mut src = Vec::new();
        checkpoint::to_f32(&ckpt.get(&d.hf_name).unwrap(), &mut src).unwrap();
        let cols = d.dims[0] as usize;
        let rows = d.dims.get(1).copied().unwrap_or(1) as usize;
        let mut v = vec![0.0f32; rows * cols];
        match d.kind {
            Kind::Linear => {
                let (n_in, n_out) = (d.hf_shape[0] as usize, d.hf_shape[1] as usize);
                for i in 0..n_in {
                    for o in 0..n_out {
                        v[o * cols + i] = src[i * n_out + o];
                    }
                }
            }
            _ => v[..src.len()].copy_from_slice(&src),
        }
        let shape = if d.dims.len() == 1 {
            vec![cols]
        } else {
            vec![rows, cols]
        };
        out.push((d.name, shape, v));
    }
    out
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("CRYSTALD_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.exists(),
        "{} not found: run scripts/setup.sh first (it installs the gguf package into .venv)",
        venv.display()
    );
    venv
}

#[test]
fn converted_fixtures_read_back_exactly_in_rust_and_python() {
    for fx in FIXTURES {
        for preset in PRESETS {
            let path = converted(fx, preset);
            let file = Gguf::open(&path).unwrap();
            let hp = Hparams::from_header(&file.header).unwrap();
            assert_eq!(file.header.version, 3);
            let mut expected = expected_tensors(fx, &hp);
            assert_eq!(
                file.header.tensors.len(),
                expected.len(),
                "{fx} {preset}: tensor count"
            );

            // The project's reader: f32/f16 exact, quantized rows close.
            // A k-quant's expected values become our dequantization of it,
            // which the reference package must reproduce bit for bit.
            for (name, _shape, values) in &mut expected {
                let t = file
                    .header
                    .tensor(name)
                    .unwrap_or_else(|| panic!("{fx} {preset}: {name} missing"));
                let mut back = vec![0.0f32; values.len()];
                let cols = t.dims[0] as usize;
                let row_bytes = t.ty.row_bytes(cols).unwrap();
                for (src, dst) in file
                    .data(t)
                    .chunks_exact(row_bytes)
                    .zip(back.chunks_exact_mut(cols))
                {
                    quant::dequantize_row(t.ty, src, dst);
                }
                match t.ty {
                    GgmlType::F32 => assert_eq!(&back, values, "{fx} {preset}: {name}"),
                    GgmlType::F16 => {
                        let want: Vec<f32> = values
                            .iter()
                            .map(|&v| half::f16::from_f32(v).to_f32())
                            .collect();
                        assert_eq!(back, want, "{fx} {preset}: {name}");
                    }
                    ty => {
                        let err = rel_l2(&back, values);
                        let bound = match ty {
                            GgmlType::Q4_0 | GgmlType::Q4_K => 0.2,
                            GgmlType::Q5_K => 0.1,
                            GgmlType::Q6_K => 0.05,
                            _ => 0.01,
                        };
                        assert!(
                            err < bound,
                            "{fx} {preset}: {name} ({ty}) dequantizes with relative error {err}"
                        );
                        if ty.is_k_quant() {
                            *values = back;
                        }
                    }
                }
            }

            // The reference reader and quantizer.
            let dir = temp_dir();
            let st = dir.path().join("expected.safetensors");
            let views: HashMap<String, safetensors::tensor::TensorView<'_>> = expected
                .iter()
                .map(|(n, shape, v)| {
                    let view = safetensors::tensor::TensorView::new(
                        safetensors::Dtype::F32,
                        shape.clone(),
                        bytemuck::cast_slice(v),
                    )
                    .unwrap();
                    (n.clone(), view)
                })
                .collect();
            safetensors::serialize_to_file(views, &None, &st).unwrap();
            let out = Command::new(python())
                .arg("tests/python/check_gguf.py")
                .arg(&path)
                .arg(&st)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{fx} {preset}: python gguf check failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            // It checked every storage type the file holds.
            let stdout = String::from_utf8_lossy(&out.stdout);
            for t in &file.header.tensors {
                let name = format!("'{}'", t.ty.name().to_uppercase());
                assert!(
                    stdout.contains(&name),
                    "{fx} {preset}: python saw no {name}: {stdout}"
                );
            }
        }
    }
}

fn load_err(path: &Path) -> String {
    match Model::load(path, kernels::select(Some("scalar")).unwrap(), 1) {
        Ok(_) => panic!("{} loaded, expected an error", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_files_are_rejected_at_every_cut() {
    let path = converted("tiny-a", "q4_0");
    let bytes = std::fs::read(&path).unwrap();
    let dir = temp_dir();
    let cut_path = dir.path().join("cut.gguf");
    let header_end = Gguf::open(&path).unwrap().header.data_offset as usize;
    let cuts = [
        0,
        3,
        4,
        8,
        16,
        24,
        100,
        1000,
        header_end - 1,
        header_end,
        header_end + 1000,
        bytes.len() / 2,
        bytes.len() - 1,
    ];
    for cut in cuts {
        std::fs::write(&cut_path, &bytes[..cut]).unwrap();
        let e = load_err(&cut_path);
        assert!(
            e.contains("cut.gguf"),
            "cut at {cut}: error does not name the file: {e}"
        );
        assert!(
            e.contains("ends")
                || e.contains("truncated")
                || e.contains("not a GGUF")
                || e.contains("past the end"),
            "cut at {cut}: unclear error: {e}"
        );
    }
}

/// Writes a small GGUF with the given metadata and tensors (zero data).
fn write_gguf(path: &Path, metadata: &[(String, Value)], tensors: Vec<TensorSpec>) {
    let mut buf = Vec::new();
    let mut w = GgufWriter::new(&mut buf, metadata, tensors.clone(), 32).unwrap();
    for t in &tensors {
        w.write_data(&vec![0u8; t.n_bytes() as usize]).unwrap();
    }
    w.finish().unwrap();
    std::fs::write(path, buf).unwrap();
}

#[test]
fn corrupted_headers_are_rejected_with_clear_errors() {
    let path = converted("tiny-a", "f32");
    let good = std::fs::read(&path).unwrap();
    let dir = temp_dir();
    let p = dir.path().join("bad.gguf");
    let patch = |at: usize, bytes: &[u8]| {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&p, b).unwrap();
        load_err(&p)
    };
    assert!(patch(0, b"GGML").contains("not a GGUF file"));
    assert!(patch(4, &7u32.to_le_bytes()).contains("version 7"));
    assert!(patch(8, &u64::MAX.to_le_bytes()).contains("tensor count"));
    assert!(patch(16, &(1u64 << 40).to_le_bytes()).contains("metadata count"));

    // A tensor table entry with an unknown type, an absurd offset, and absurd dims.
    let hdr = Gguf::open(&path).unwrap().header;
    let first = &hdr.tensors[0];
    let name_at = good
        .windows(first.name.len())
        .position(|w| w == first.name.as_bytes())
        .unwrap();
    let dims_at = name_at + first.name.len() + 4;
    let type_at = dims_at + 8 * first.dims.len();
    let e = patch(type_at, &99u32.to_le_bytes());
    assert!(e.contains(&first.name) && e.contains("type id 99"), "{e}");
    assert!(
        e.contains("12 = q4_K") && e.contains("14 = q6_K"),
        "lists what is supported: {e}"
    );
    let e = patch(type_at + 4, &(1u64 << 50).to_le_bytes());
    assert!(e.contains(&first.name) && e.contains("past the end"), "{e}");
    let e = patch(type_at + 4, &8u64.to_le_bytes());
    assert!(e.contains(&first.name) && e.contains("alignment"), "{e}");
    let e = patch(dims_at, &u64::MAX.to_le_bytes());
    assert!(e.contains(&first.name), "{e}");
    let e = patch(dims_at, &33u64.to_le_bytes());
    assert!(e.contains(&first.name), "{e}");
}

/// A k-quant row must hold whole 256-value super-blocks: a q4_K tensor
/// whose rows are 736 values (whole 32-blocks, 2.875 super-blocks) is an
/// error naming the tensor, the type and the block size.
#[test]
fn k_quant_rows_that_do_not_fill_super_blocks_are_rejected() {
    let path = converted("tiny-a", "q4_k_m");
    let good = std::fs::read(&path).unwrap();
    let name = "blk.0.ffn_down.weight";
    let hdr = Gguf::open(&path).unwrap().header;
    let t = hdr.tensor(name).unwrap();
    assert_eq!((t.ty, t.dims[0]), (GgmlType::Q4_K, 768));
    let at = good
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .unwrap()
        + name.len()
        + 4;
    let mut bad = good.clone();
    bad[at..at + 8].copy_from_slice(&736u64.to_le_bytes());
    let dir = temp_dir();
    let p = dir.path().join("bad.gguf");
    std::fs::write(&p, bad).unwrap();
    let e = load_err(&p);
    assert!(
        e.contains(name) && e.contains("row length 736") && e.contains("q4_K block size 256"),
        "{e}"
    );
}

#[test]
fn foreign_and_incomplete_models_are_rejected() {
    let dir = temp_dir();
    let p = dir.path().join("llama.gguf");
    write_gguf(
        &p,
        &[("general.architecture".into(), Value::String("llama".into()))],
        vec![TensorSpec {
            name: "token_embd.weight".into(),
            dims: vec![32, 4],
            ty: GgmlType::Q4_0,
        }],
    );
    let e = load_err(&p);
    assert!(e.contains("architecture is 'llama'"), "{e}");

    // Right architecture and hyper-parameters, but a tensor missing.
    let good = Gguf::open(&converted("tiny-a", "q4_0")).unwrap().header;
    let tensors: Vec<TensorSpec> = good
        .tensors
        .iter()
        .filter(|t| t.name != "blk.1.ffn_down.weight")
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty,
        })
        .collect();
    let meta: Vec<(String, Value)> = good
        .metadata
        .iter()
        .filter(|(k, _)| k != "general.alignment" && k != checksum::KEY)
        .cloned()
        .collect();
    let p = dir.path().join("missing.gguf");
    write_gguf(&p, &meta, tensors.clone());
    let e = load_err(&p);
    assert!(
        e.contains("blk.1.ffn_down.weight") && e.contains("missing"),
        "{e}"
    );

    // A shape that contradicts the hyper-parameters.
    let mut wrong = tensors;
    wrong.push(TensorSpec {
        name: "blk.1.ffn_down.weight".into(),
        dims: vec![64, 256],
        ty: GgmlType::Q4_0,
    });
    let p = dir.path().join("shape.gguf");
    write_gguf(&p, &meta, wrong);
    let e = load_err(&p);
    assert!(
        e.contains("blk.1.ffn_down.weight") && e.contains("dims"),
        "{e}"
    );

    // An empty file and a directory.
    let p = dir.path().join("empty.gguf");
    std::fs::write(&p, b"").unwrap();
    assert!(load_err(&p).contains("empty.gguf"));
    assert!(load_err(dir.path()).contains(&dir.path().display().to_string()));
}
