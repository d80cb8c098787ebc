//! Shared helpers of the integration tests: where the shared fixtures are,
//! and fixture checkpoints converted once per test process.
#![allow(dead_code)]

pub mod http_client;
pub mod services;
pub mod startup;

use crystal_quantize::convert::{self, Preset, Progress};
use crystald::quant::GgmlType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// `../shared` beside the project, or `CRYSTALD_SHARED` (a test binary run
/// elsewhere: `scripts/gpu-check.sh`).
pub fn shared() -> PathBuf {
    match std::env::var_os("CRYSTALD_SHARED") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"),
    }
}

pub fn fixture(name: &str) -> PathBuf {
    let p = shared().join("fixtures").join(name);
    assert!(
        p.join("config.json").exists(),
        "fixture {} not found: tests need ../shared beside the project",
        p.display()
    );
    p
}

pub const FIXTURES: [&str; 2] = ["tiny-a", "tiny-b"];

/// [`FIXTURES`], or the ones `CRYSTALD_TEST_FIXTURES` names (the GPU check
/// carries tiny-a only: a device run's files are size-limited).
pub fn fixtures() -> Vec<&'static str> {
    let Ok(only) = std::env::var("CRYSTALD_TEST_FIXTURES") else {
        return FIXTURES.to_vec();
    };
    let only: Vec<&str> = only.split(',').map(str::trim).collect();
    for n in &only {
        assert!(
            FIXTURES.contains(n),
            "CRYSTALD_TEST_FIXTURES names '{n}', not a fixture"
        );
    }
    FIXTURES.into_iter().filter(|f| only.contains(f)).collect()
}

/// Loads a model on the device `CRYSTALD_TEST_DEVICE` names: `cpu` (the
/// default), `cuda` (a real GPU: `scripts/gpu-check.sh`) or
/// `cuda-emulated` (the GPU backend on [`cuda_emulator`]: `scripts/test.sh`).
/// A GPU that cannot be used is then a failure, not a fallback.
pub fn load_model(
    path: &Path,
    kernels: &'static dyn crystald::kernels::Kernels,
    threads: usize,
) -> crystald::model::Model {
    use crystald::model::DeviceChoice;
    let mut model = crystald::model::Model::load(path, kernels, threads).unwrap();
    let device = match std::env::var("CRYSTALD_TEST_DEVICE").as_deref() {
        Err(_) | Ok("cpu") => DeviceChoice::Cpu,
        Ok("cuda") => DeviceChoice::Cuda,
        Ok("cuda-emulated") => {
            use_cuda_emulator();
            DeviceChoice::Cuda
        }
        Ok(other) => panic!("CRYSTALD_TEST_DEVICE={other}: cpu, cuda or cuda-emulated"),
    };
    if device != DeviceChoice::Cpu {
        let line = model
            .place(DeviceChoice::Cuda)
            .unwrap_or_else(|e| panic!("{e}"));
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| eprintln!("{line}"));
    }
    model
}
/// Every storage type: q4_k_m holds Q4_K and Q6_K, q5_k_m Q5_K.
pub const PRESETS: [&str; 6] = ["f32", "f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m"];

/// The kernel sets whose Q4_0 products give each row · token the same bits
/// however many tokens share the call (each keeps one accumulator per row ·
/// token, fed block by block in the same order), so a request decodes the
/// same alone or batched. `tests/kernels.rs` proves it per product;
/// `tests/engine_fixtures.rs` relies on it for whole batched steps.
pub const Q4_0_SAME_BITS_AT_ANY_BATCH: [&str; 2] = ["scalar", "avx2"];

struct Silent;
impl Progress for Silent {
    fn start(&mut self, _: u64, _: usize) {}
    fn tensor_done(&mut self, _: &str, _: GgmlType, _: u64) {}
    fn finish(&mut self) {}
}

fn work_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
        .path()
}

/// Converts `fixture` with `preset` (once per test process) and returns the
/// GGUF path. `PRESET+calibrated` calibrates on the shared fine-tuning
/// sample (`chat_sample.jsonl`, the default token budget).
pub fn converted(fixture_name: &str, preset: &str) -> PathBuf {
    static DONE: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let done = DONE.get_or_init(Default::default);
    let mut done = done.lock().unwrap_or_else(|e| e.into_inner());
    let key = format!("{fixture_name}-{preset}");
    if let Some(p) = done.get(&key) {
        return p.clone();
    }
    let out = work_dir().join(format!("{key}.gguf"));
    let (preset, calibrated) = match preset.strip_suffix("+calibrated") {
        Some(p) => (p, true),
        None => (preset, false),
    };
    let opts = convert::Options {
        input: fixture(fixture_name),
        output: out.clone(),
        preset: Preset::parse(preset).expect("known preset"),
        force: true,
        threads: 2,
        calibration: calibrated.then(|| convert::CalibrationInput {
            path: shared().join("crystalchat/chat_sample.jsonl"),
            max_tokens: crystal_quantize::calibrate::DEFAULT_TOKENS,
        }),
    };
    convert::convert(&opts, &mut Silent).unwrap_or_else(|e| panic!("converting {key}: {e:#}"));
    done.insert(key, out.clone());
    out
}

/// A fresh temporary directory for one test.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Reference outputs of a fixture (`expected.safetensors`).
pub struct Expected {
    pub tokens: Vec<Vec<u32>>,
    pub logits: Vec<Vec<f32>>,
    pub greedy: Vec<Vec<u32>>,
}

pub fn expected(fixture_name: &str) -> Expected {
    let bytes = std::fs::read(fixture(fixture_name).join("expected.safetensors"))
        .expect("expected.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let ints = |name: &str| -> Vec<u32> {
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("{name} in expected.safetensors"));
        t.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect()
    };
    let floats = |name: &str| -> Vec<f32> {
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("{name} in expected.safetensors"));
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let n = (0..)
        .take_while(|i| st.tensor(&format!("tokens_{i}")).is_ok())
        .count();
    Expected {
        tokens: (0..n).map(|i| ints(&format!("tokens_{i}"))).collect(),
        logits: (0..n).map(|i| floats(&format!("logits_{i}"))).collect(),
        greedy: (0..n).map(|i| ints(&format!("greedy_{i}"))).collect(),
    }
}

/// ‖a − b‖₂ / ‖b‖₂
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((*x - *y) as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let lse = max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v as f64 - lse).collect()
}

/// Mean over positions of KL(reference ‖ ours), rows of `vocab`.
pub fn mean_kl(ours: &[f32], reference: &[f32], vocab: usize) -> f64 {
    let rows = reference.len() / vocab;
    let mut total = 0.0;
    for (a, b) in ours.chunks_exact(vocab).zip(reference.chunks_exact(vocab)) {
        let (la, lb) = (log_softmax(a), log_softmax(b));
        total += lb
            .iter()
            .zip(&la)
            .map(|(p, q)| p.exp() * (p - q))
            .sum::<f64>();
    }
    total / rows as f64
}

pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Fraction of positions where both pick the same top token.
pub fn top1_agreement(ours: &[f32], reference: &[f32], vocab: usize) -> f64 {
    let pairs: Vec<bool> = ours
        .chunks_exact(vocab)
        .zip(reference.chunks_exact(vocab))
        .map(|(a, b)| argmax(a) == argmax(b))
        .collect();
    pairs.iter().filter(|&&x| x).count() as f64 / pairs.len() as f64
}

/// A memory field of `/proc/PID/status` (`VmRSS`, `RssAnon`, …), in kB.
pub fn proc_status_kb(pid: u32, field: &str) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// The stand-in CUDA driver that runs the GPU kernels on the CPU
/// (`tests/cuda_emu/emu.cpp`), built once per test process with g++.
pub fn cuda_emulator() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let out = dir.join("libcuda-emu.so");
        let tmp = dir.join(format!("libcuda-emu.so.{}", std::process::id()));
        let status = std::process::Command::new("g++")
            .args([
                "-std=c++17",
                "-O2",
                "-Wall",
                "-Wno-unknown-pragmas",
                "-shared",
                "-fPIC",
            ])
            .arg("-I")
            .arg(root.join("src/cuda/kernels"))
            .arg("-o")
            .arg(&tmp)
            .arg(root.join("tests/cuda_emu/emu.cpp"))
            .status()
            .expect("g++ (scripts/setup.sh installs it)");
        assert!(status.success(), "building the CUDA emulator failed");
        std::fs::rename(&tmp, &out).unwrap();
        out
    })
    .clone()
}

/// Points this process's CUDA driver lookup at [`cuda_emulator`].
pub fn use_cuda_emulator() {
    static SET: std::sync::Once = std::sync::Once::new();
    SET.call_once(|| std::env::set_var("CRYSTALD_CUDA_DRIVER", cuda_emulator()));
}
