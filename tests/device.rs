//! `--device`: what each build does without a usable GPU, and (with the
//! `cuda` feature) the GPU kernels compiled by NVRTC, which needs no GPU.
//! `scripts/test.sh` runs this file a second time with `--features cuda`
//! and `CRYSTALD_NVRTC` pointing at the NVRTC it installs.

mod common;

use common::*;
use std::process::{Command, Output};

/// `crystald generate` on the tiny fixture, with no driver to be found.
fn generate(model: &std::path::Path, device: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_crystald"))
        .env("CRYSTALD_CUDA_DRIVER", "/nonexistent/libcuda.so.1")
        .args([
            "generate",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "-p",
            "Hi",
        ])
        .args(["--device", device])
        .arg("-m")
        .arg(model)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn device_cuda_without_a_gpu_is_a_clear_error_and_auto_runs_on_the_cpu() {
    let m = converted("tiny-a", "q4_0");
    let o = generate(&m, "cuda");
    assert!(!o.status.success());
    let why = if cfg!(feature = "cuda") {
        "--device cuda: no CUDA driver: /nonexistent/libcuda.so.1"
    } else {
        "--device cuda: this crystald was built without CUDA support"
    };
    assert!(stderr(&o).contains(why), "{}", stderr(&o));

    let o = generate(&m, "auto");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!o.stdout.is_empty());
    let said = stderr(&o);
    if cfg!(feature = "cuda") {
        assert!(
            said.contains("device: cpu (no usable GPU: no CUDA driver"),
            "auto says why it stayed on the CPU: {said}"
        );
    } else {
        assert!(
            !said.contains("device:"),
            "a CPU-only build has nothing to say: {said}"
        );
    }

    let o = generate(&m, "gpu");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unknown device 'gpu'"),
        "{}",
        stderr(&o)
    );
}

/// Formats the GPU kernels do not read are refused before any driver is
/// looked for, naming the tensor and its type.
#[cfg(feature = "cuda")]
#[test]
fn a_k_quant_model_on_the_gpu_names_the_tensor() {
    let m = converted("tiny-a", "q4_k_m");
    let o = generate(&m, "cuda");
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("--device cuda: tensor 'token_embd.weight' is q6_K")
            && e.contains("q4_0 and q8_0"),
        "{e}"
    );
    let o = generate(&m, "auto");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("device: cpu (no usable GPU: tensor '"),
        "{}",
        stderr(&o)
    );
}

#[cfg(feature = "cuda")]
mod nvrtc {
    use crystald::cuda::{kernel_program, nvrtc};

    /// The kernels compile for the oldest supported GPU, for Jetson Orin
    /// (sm_87) and for Hopper (sm_90), and export every kernel the host
    /// launches.
    #[test]
    fn the_kernels_compile_for_every_target_gpu() {
        let (major, minor) = nvrtc::version().expect("NVRTC (scripts/setup.sh installs it)");
        eprintln!("NVRTC {major}.{minor}");
        for arch in ["compute_60", "compute_87", "compute_90"] {
            let ptx = nvrtc::compile(&kernel_program(), "crystald.cu", arch)
                .unwrap_or_else(|e| panic!("{e}"));
            let ptx = String::from_utf8_lossy(&ptx);
            for k in [
                "embed",
                "layer_norm",
                "matmul_q4_0",
                "matmul_q8_0",
                "matmul_f16",
                "matmul_f32",
                "rope_store",
                "attention",
            ] {
                assert!(
                    ptx.contains(&format!(".entry {k}(")),
                    "{arch}: no kernel {k}"
                );
            }
        }
    }

    #[test]
    fn a_compile_error_carries_the_compiler_log() {
        let bad = "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }";
        let e = nvrtc::compile(bad, "bad.cu", "compute_87").unwrap_err();
        assert!(
            e.contains("NVRTC could not compile bad.cu for compute_87"),
            "{e}"
        );
        assert!(e.contains("undefined_name"), "the log names the error: {e}");
    }
}
