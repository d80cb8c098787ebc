//! The `crystal-quantize` command on good and bad checkpoints: every failure
//! names the file or tensor, exits non-zero, and leaves no output behind.

use crystal_quantize::synth::{self, SynthFormat, SynthOptions, SynthShape};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

fn synth_checkpoint(dir: &Path, format: SynthFormat) {
    let opts = SynthOptions {
        shape: SynthShape::Tiny,
        format,
        seed: 7,
        tokenizer_json: shared().join("crystalchat/tokenizer.json"),
    };
    synth::write_synthetic(dir, &opts, &mut |_, _, _| {}).unwrap();
}

fn quantize(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_crystal-quantize"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs a conversion that must fail; checks the message and that the output
/// directory holds nothing new.
fn expect_failure(input: &Path, out_dir: &Path, must_mention: &[&str]) -> String {
    let out = out_dir.join("model.gguf");
    let r = quantize(&[
        input.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
        "--quiet".as_ref(),
    ]);
    let err = String::from_utf8_lossy(&r.stderr).to_string();
    assert!(
        !r.status.success(),
        "conversion of {} succeeded unexpectedly",
        input.display()
    );
    for m in must_mention {
        assert!(err.contains(m), "error should mention '{m}': {err}");
    }
    let left: Vec<_> = std::fs::read_dir(out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "output directory not clean after failure: {left:?}"
    );
    err
}

#[test]
fn converts_all_formats_and_refuses_to_overwrite() {
    for format in [
        SynthFormat::SafetensorsBf16,
        SynthFormat::BinF32Sharded { shards: 2 },
    ] {
        let src = tempfile::tempdir().unwrap();
        synth_checkpoint(src.path(), format);
        let out_dir = tempfile::tempdir().unwrap();
        let out = out_dir.path().join("m.gguf");
        let r = quantize(&[src.path().as_os_str(), "-o".as_ref(), out.as_os_str()]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let summary = String::from_utf8_lossy(&r.stderr);
        assert!(
            summary.contains("bits/weight") && summary.contains("GB/s"),
            "summary missing: {summary}"
        );
        assert!(
            summary.contains("q4_0") && summary.contains("q8_0") && summary.contains("f32"),
            "{summary}"
        );
        let before = std::fs::read(&out).unwrap();
        let r = quantize(&[
            src.path().as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
            "--type".as_ref(),
            "f16".as_ref(),
        ]);
        assert!(!r.status.success());
        assert!(String::from_utf8_lossy(&r.stderr).contains("--force"));
        assert_eq!(
            std::fs::read(&out).unwrap(),
            before,
            "existing output was modified"
        );
        let r = quantize(&[
            src.path().as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
            "--type".as_ref(),
            "f16".as_ref(),
            "--force".as_ref(),
        ]);
        assert!(r.status.success());
        assert_ne!(std::fs::read(&out).unwrap(), before);
    }
}

#[test]
fn missing_config_or_tokenizer() {
    for file in ["config.json", "tokenizer.json"] {
        let src = tempfile::tempdir().unwrap();
        synth_checkpoint(src.path(), SynthFormat::SafetensorsBf16);
        std::fs::remove_file(src.path().join(file)).unwrap();
        let out = tempfile::tempdir().unwrap();
        expect_failure(src.path(), out.path(), &[file]);
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut cfg);
    std::fs::write(&p, serde_json::to_string(&cfg).unwrap()).unwrap();
}

#[test]
fn wrong_model_type_and_shape_contradicting_config() {
    let src = tempfile::tempdir().unwrap();
    synth_checkpoint(src.path(), SynthFormat::SafetensorsBf16);
    edit_config(src.path(), |c| c["model_type"] = "llama".into());
    let out = tempfile::tempdir().unwrap();
    expect_failure(src.path(), out.path(), &["model_type", "llama"]);

    edit_config(src.path(), |c| {
        c["model_type"] = "crystalcoder".into();
        c["n_inner"] = 352.into();
    });
    expect_failure(
        src.path(),
        out.path(),
        &["transformer.h.0.mlp.c_fc.weight", "shape"],
    );
}

#[test]
fn missing_tensor() {
    let src = tempfile::tempdir().unwrap();
    synth_checkpoint(src.path(), SynthFormat::SafetensorsBf16);
    // One more layer than the file has.
    edit_config(src.path(), |c| {
        c["n_layer"] = (c["n_layer"].as_u64().unwrap() + 1).into()
    });
    let out = tempfile::tempdir().unwrap();
    expect_failure(src.path(), out.path(), &["transformer.h.2.", "missing"]);
}

#[test]
fn truncated_shard_and_corrupted_zip_and_pickle() {
    let src = tempfile::tempdir().unwrap();
    synth_checkpoint(src.path(), SynthFormat::BinF32Sharded { shards: 2 });
    let shard = src.path().join("pytorch_model-00002-of-00002.bin");
    let good = std::fs::read(&shard).unwrap();
    let out = tempfile::tempdir().unwrap();

    std::fs::write(&shard, &good[..good.len() * 2 / 3]).unwrap();
    expect_failure(
        src.path(),
        out.path(),
        &["pytorch_model-00002-of-00002.bin"],
    );

    // Garble the zip's end-of-central-directory record.
    let mut bad = good.clone();
    let eocd = bad.windows(4).rposition(|w| w == b"PK\x05\x06").unwrap();
    bad[eocd + 16..eocd + 20].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&shard, &bad).unwrap();
    expect_failure(
        src.path(),
        out.path(),
        &["pytorch_model-00002-of-00002.bin"],
    );

    // Garble the pickle: overwrite its opcodes after the protocol header.
    let mut bad = good.clone();
    let pkl = bad.windows(8).position(|w| w == b"data.pkl").unwrap();
    let body = bad[pkl..]
        .windows(2)
        .position(|w| w == [0x80, 0x02])
        .unwrap()
        + pkl;
    bad[body + 2..body + 40].fill(0xFF);
    std::fs::write(&shard, &bad).unwrap();
    expect_failure(
        src.path(),
        out.path(),
        &["pytorch_model-00002-of-00002.bin"],
    );
}

#[test]
fn non_finite_weight_is_named() {
    let src = tempfile::tempdir().unwrap();
    synth_checkpoint(src.path(), SynthFormat::SafetensorsBf16);
    let p = src.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let name = "transformer.h.1.attn.c_proj.weight";
    let start = header[name]["data_offsets"][0].as_u64().unwrap() as usize + 8 + n;
    bytes[start + 20..start + 22].copy_from_slice(&0x7FC0u16.to_le_bytes()); // bf16 NaN
    std::fs::write(&p, &bytes).unwrap();
    let out = tempfile::tempdir().unwrap();
    expect_failure(src.path(), out.path(), &[name, "NaN"]);
}

#[test]
fn unwritable_and_full_output_locations() {
    let src = tempfile::tempdir().unwrap();
    synth_checkpoint(src.path(), SynthFormat::SafetensorsBf16);
    let out = tempfile::tempdir().unwrap();
    // A path below a regular file cannot be created, even by root.
    let file = out.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let target = file.join("model.gguf");
    let r = quantize(&[src.path().as_os_str(), "-o".as_ref(), target.as_os_str()]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("plain-file"), "{err}");

    // A full disk, simulated with a file-size limit (SIGXFSZ ignored so the
    // write fails with EFBIG the way ENOSPC would).
    let full = tempfile::tempdir().unwrap();
    let target = full.path().join("model.gguf");
    let script = format!(
        "trap '' XFSZ; ulimit -f 200; exec '{}' '{}' -o '{}' --quiet",
        env!("CARGO_BIN_EXE_crystal-quantize"),
        src.path().display(),
        target.display()
    );
    let r = Command::new("bash").arg("-c").arg(script).output().unwrap();
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("model.gguf") && err.contains("too large"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(full.path()).unwrap().count(),
        0,
        "partial output left behind"
    );
}

#[test]
fn interrupted_conversion_leaves_nothing_behind() {
    let src = tempfile::tempdir().unwrap();
    synth_checkpoint(src.path(), SynthFormat::BinF32Sharded { shards: 2 });
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("model.gguf");
    for signal in ["INT", "TERM"] {
        // The signal must land while the temporary file is written; on a
        // fast, idle machine the conversion sometimes finishes first (the
        // finished file is then kept, which is right), so it is tried again.
        let mut interrupted = false;
        for _attempt in 0..20 {
            let mut child = Command::new(env!("CARGO_BIN_EXE_crystal-quantize"))
                .arg(src.path())
                .arg("-o")
                .arg(&target)
                .args(["--type", "f32", "--quiet", "--threads", "1"])
                .spawn()
                .unwrap();
            let started = std::time::Instant::now();
            while std::fs::read_dir(out.path()).unwrap().count() == 0
                && started.elapsed().as_secs() < 20
            {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let killed = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status()
                .unwrap();
            assert!(killed.success());
            let status = child.wait().unwrap();
            let left: Vec<_> = std::fs::read_dir(out.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            if left.is_empty() {
                assert_eq!(status.code(), Some(130), "SIG{signal}: {status}");
                interrupted = true;
                break;
            }
            // Too late: only the finished file, never a partial one.
            assert_eq!(left, ["model.gguf"], "SIG{signal} left {left:?}");
            std::fs::remove_file(&target).unwrap();
        }
        assert!(
            interrupted,
            "SIG{signal} never landed mid-write in 20 tries"
        );
    }
}

/// SIGKILL runs no handler, so the temporary file stays. What must hold:
/// the output path never exists until the finished file is renamed there,
/// the leftover has a temporary name and is refused by the model loader as
/// truncated, and the next conversion to the same path removes it.
#[test]
fn sigkill_mid_write_leaves_no_valid_output() {
    let src = tempfile::tempdir().unwrap();
    synth_checkpoint(src.path(), SynthFormat::SafetensorsBf16);
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("model.gguf");
    let mut leftover = None;
    // The f32 output is ~17 MB written through an 8 MB buffer: the kill
    // lands once the first part is on disk. Retried if the conversion wins.
    for _ in 0..10 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crystal-quantize"))
            .arg(src.path())
            .arg("-o")
            .arg(&target)
            .args(["--type", "f32", "--quiet", "--threads", "1", "--force"])
            .spawn()
            .unwrap();
        let tmp = out.path().join(format!(".model.gguf.tmp-{}", child.id()));
        let started = std::time::Instant::now();
        let mut partial = false;
        while started.elapsed().as_secs() < 20 && child.try_wait().unwrap().is_none() {
            if std::fs::metadata(&tmp).is_ok_and(|m| m.len() > 0) {
                partial = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        child.kill().unwrap_or(()); // SIGKILL
        let status = child.wait().unwrap();
        if partial && status.code().is_none() {
            leftover = Some(tmp);
            break;
        }
        let _ = std::fs::remove_file(&target);
    }
    let leftover = leftover.expect("could not kill a conversion mid-write in 10 tries");
    assert!(!target.exists(), "the output path exists after SIGKILL");
    let left: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(left, vec![leftover.clone()]);
    let err = match crystald::gguf::Gguf::open(&leftover) {
        Ok(_) => panic!("a partial file passed the loader's checks"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("truncated"), "{err}");

    let r = quantize(&[
        src.path().as_os_str(),
        "-o".as_ref(),
        target.as_os_str(),
        "--type".as_ref(),
        "q8_0".as_ref(),
        "--quiet".as_ref(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("removed") && err.contains(".model.gguf.tmp-"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("model.gguf")]);
    crystald::gguf::Gguf::open(&target).unwrap();
}

/// `--calibrate`: a good file (both line formats) is run and recorded in
/// the output's metadata; every bad one is refused by name, line and
/// reason, with nothing left behind.
#[test]
fn calibration_file_is_checked_and_recorded() {
    let src = tempfile::tempdir().unwrap();
    synth_checkpoint(src.path(), SynthFormat::SafetensorsBf16);
    let data = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = data.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let run = |calib: &Path, extra: &[&str], out: &Path| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            src.path().as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
            "--type".as_ref(),
            "q4_k_m".as_ref(),
            "--calibrate".as_ref(),
            calib.as_os_str(),
        ];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        quantize(&args)
    };

    let good = file(
        "good.jsonl",
        "[1, 415, 2936, 9060, 285]\n\n{\"token_ids\": [1, 29871, 13, 4013, 338, 263]}\n",
    );
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("m.gguf");
    let r = run(&good, &[], &out);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(err.contains("calibrated on 11 tokens"), "{err}");
    let g = crystald::gguf::Gguf::open(&out).unwrap();
    assert_eq!(
        g.header
            .get("quantize.imatrix.file")
            .and_then(|v| v.as_str()),
        Some("good.jsonl")
    );
    assert_eq!(
        g.header
            .get("quantize.imatrix.chunks_count")
            .and_then(|v| v.as_u64()),
        Some(2)
    );
    // The token budget cuts the file.
    let r = run(&good, &["--calibrate-tokens", "3", "--force"], &out);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        r.status.success() && err.contains("calibrated on 3 tokens"),
        "{err}"
    );

    let cases: [(&str, &str, &[&str]); 6] = [
        ("empty.jsonl", "\n\n", &["holds no token ids"]),
        (
            "text.jsonl",
            "[1, 2]\nhello world\n",
            &["line 2", "not JSON"],
        ),
        (
            "vocab.jsonl",
            "[1, 2, 99999]\n",
            &["line 1", "token id 99999", "vocabulary"],
        ),
        (
            "negative.jsonl",
            "[1, -3]\n",
            &["line 1", "position 1", "not a token id"],
        ),
        (
            "object.jsonl",
            "{\"ids\": [1, 2]}\n",
            &["line 1", "token_ids"],
        ),
        ("scalar.jsonl", "42\n", &["line 1", "expected a JSON array"]),
    ];
    for (name, text, needles) in cases {
        let p = file(name, text);
        let out_dir = tempfile::tempdir().unwrap();
        let r = run(&p, &[], &out_dir.path().join("m.gguf"));
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{name} was accepted");
        for n in needles.iter().chain(&[name]) {
            assert!(err.contains(n), "{name}: error should mention '{n}': {err}");
        }
        assert_eq!(
            std::fs::read_dir(out_dir.path()).unwrap().count(),
            0,
            "{name}: output left behind"
        );
    }
    let out_dir = tempfile::tempdir().unwrap();
    let r = run(
        &data.path().join("missing.jsonl"),
        &[],
        &out_dir.path().join("m.gguf"),
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("cannot open the calibration file"),
        "{err}"
    );
    let r = run(
        &good,
        &["--calibrate-tokens", "0"],
        &out_dir.path().join("m.gguf"),
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("not a positive number"),
        "{err}"
    );
    let r = quantize(&[
        src.path().as_os_str(),
        "-o".as_ref(),
        out_dir.path().join("m.gguf").as_os_str(),
        "--calibrate-tokens".as_ref(),
        "5".as_ref(),
    ]);
    assert!(
        !r.status.success(),
        "--calibrate-tokens without --calibrate was accepted"
    );
    assert_eq!(std::fs::read_dir(out_dir.path()).unwrap().count(), 0);
}
