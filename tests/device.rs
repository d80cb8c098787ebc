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
                "matmul_q4_k",
                "matmul_q5_k",
                "matmul_q6_k",
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

/// The GPU backend end to end on the CPU stand-in for the driver
/// (`tests/cuda_emu`): the real kernels, host code and driver calls.
#[cfg(feature = "cuda")]
mod emulated {
    use super::*;
    use serde_json::Value;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    /// crystald on the emulated GPU, with an empty PTX cache of its own (a
    /// run that must compile is never served by another run's cache).
    fn crystald() -> Command {
        static CACHE: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cache = CACHE.get_or_init(temp_dir).path().join(format!("run{n}"));
        let mut c = Command::new(env!("CARGO_BIN_EXE_crystald"));
        c.env("CRYSTALD_CUDA_DRIVER", cuda_emulator())
            .env("CRYSTALD_CACHE_DIR", cache);
        c
    }

    /// The compiled kernels are kept on disk: the next start loads them
    /// without NVRTC, and a cache file the driver refuses is compiled again
    /// and replaced.
    #[test]
    fn compiled_kernels_are_cached_and_a_bad_cache_file_is_replaced() {
        let dir = temp_dir();
        let cache = dir.path().join("cache");
        let m = converted("tiny-a", "q4_0");
        let run = |nvrtc: Option<&str>| {
            let mut c = crystald();
            c.env("CRYSTALD_CACHE_DIR", &cache);
            if let Some(path) = nvrtc {
                c.env("CRYSTALD_NVRTC", path);
            }
            let o = c
                .args([
                    "generate",
                    "--device",
                    "cuda",
                    "--max-tokens",
                    "1",
                    "-p",
                    "Hi",
                    "-m",
                ])
                .arg(&m)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", stderr(&o));
            stderr(&o)
        };
        assert!(
            run(None).contains("kernels from NVRTC 12."),
            "first start compiles"
        );
        let files: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let file = &files[0];
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("kernels-compute_87-") && name.ends_with(".ptx"),
            "{name}"
        );
        let ptx = std::fs::read_to_string(file).unwrap();
        assert!(ptx.contains(".entry matmul_q4_0("), "PTX in the cache");

        let said = run(Some("/nonexistent/libnvrtc.so"));
        assert!(said.contains("kernels from the PTX cache"), "{said}");

        std::fs::write(file, "not PTX").unwrap();
        assert!(
            run(None).contains("kernels from NVRTC 12."),
            "a refused file is recompiled"
        );
        assert!(std::fs::read_to_string(file)
            .unwrap()
            .contains(".entry matmul_q4_0("));
    }

    /// Greedy text from the GPU equals the CPU's (f32: the two agree to
    /// 1e-6, so the same tokens are a fair demand).
    #[test]
    fn greedy_replies_on_the_gpu_equal_the_cpu() {
        let m = converted("tiny-a", "f32");
        let run = |device: &str| {
            let o = crystald()
                .args(["generate", "--device", device, "--max-tokens", "12"])
                .args(["--temperature", "0", "--raw", "-p", "def fibonacci(n):"])
                .arg("-m")
                .arg(&m)
                .output()
                .unwrap();
            assert!(o.status.success(), "{device}: {}", stderr(&o));
            (String::from_utf8(o.stdout.clone()).unwrap(), stderr(&o))
        };
        let (cpu, _) = run("cpu");
        let (gpu, said) = run("cuda");
        assert!(
            said.contains("device: cuda, crystald CPU emulation"),
            "{said}"
        );
        assert!(!cpu.trim().is_empty(), "the CPU replied nothing");
        assert_eq!(gpu, cpu);
    }

    /// Every file type on the GPU gives the CPU's logits: to float rounding
    /// for f32/f16 (with an f16 KV cache, whose roundings the two orders of
    /// summation can tip either way), and within the CPU's own activation quantization (Q8_0,
    /// Q8_K: about 2-3 %) for the quantized types. A wrong level or scale
    /// in a kernel moves them by the size of the logits.
    #[test]
    fn every_file_type_gives_the_cpus_logits() {
        use crystald::model::{DeviceChoice, KvType, Logits, Model, Session};
        use_cuda_emulator();
        let tokens: Vec<u32> = expected("tiny-a").tokens[0].clone();
        for (preset, bound) in [
            ("f32", 1e-4),
            ("f16", 1e-4),
            ("q8_0", 0.05),
            ("q4_0", 0.05),
            ("q4_k_m", 0.06),
            ("q5_k_m", 0.06),
            ("q6_k", 0.06),
        ] {
            let path = converted("tiny-a", preset);
            let logits = |device: DeviceChoice| {
                let mut model =
                    Model::load(&path, crystald::kernels::select(None).unwrap(), 1).unwrap();
                model.place(device).unwrap();
                assert_eq!(model.device().name(), device.name());
                let mut s = Session::try_new(&model, tokens.len(), KvType::F16).unwrap();
                s.forward(&model, &tokens, Logits::All).unwrap().to_vec()
            };
            let (cpu, gpu) = (logits(DeviceChoice::Cpu), logits(DeviceChoice::Cuda));
            let err = rel_l2(&gpu, &cpu);
            eprintln!("{preset}: GPU vs CPU logits, relative L2 {err:.2e}");
            assert!(err <= bound, "{preset}: {err:.3e} > {bound}");
        }
    }

    /// What `--device cuda` needs and lacks is named, and `auto` says it
    /// stayed on the CPU for that reason: a GPU too small for the weights
    /// (with the sizes), and no NVRTC to compile the kernels.
    #[test]
    fn a_gpu_too_small_or_without_nvrtc_is_named() {
        let m = converted("tiny-a", "f32");
        let run = |device: &str, env: (&str, &str)| {
            crystald()
                .env(env.0, env.1)
                .args([
                    "generate",
                    "--device",
                    device,
                    "--max-tokens",
                    "2",
                    "-p",
                    "Hi",
                ])
                .arg("-m")
                .arg(&m)
                .output()
                .unwrap()
        };
        // 280 MiB: the 38 MiB of weights plus the 256 MiB headroom do not fit.
        let small = ("CRYSTALD_EMU_GPU_BYTES", "293601280");
        let o = run("cuda", small);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(
            e.contains("--device cuda: not enough GPU memory for the weights: 38 MiB needed (+256 MiB headroom), 280 MiB free"),
            "{e}"
        );
        // 300 MiB: the weights fit, the KV cache and scratch then do not.
        let o = run("cuda", ("CRYSTALD_EMU_GPU_BYTES", "314572800"));
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(
            e.contains("not enough GPU memory for the KV cache and scratch: ")
                && e.contains(" MiB needed (+256 MiB headroom), "),
            "{e}"
        );
        let o = run("auto", small);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("device: cpu (no usable GPU: not enough GPU memory"),
            "{}",
            stderr(&o)
        );

        let no_nvrtc = ("CRYSTALD_NVRTC", "/nonexistent/libnvrtc.so");
        let o = run("cuda", no_nvrtc);
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains("--device cuda: no NVRTC (the CUDA runtime compiler)"),
            "{}",
            stderr(&o)
        );
    }

    /// `serve --device cuda`: health reports the device and its memory, a
    /// request is answered, and a q8_0 KV cache is refused at start-up.
    #[test]
    fn the_daemon_serves_from_the_gpu() {
        let dir = temp_dir();
        let m = converted("tiny-a", "q4_0");
        let socket = dir.path().join("s.sock");
        let serve = |kv: &str| {
            crystald()
                .args([
                    "serve",
                    "--device",
                    "cuda",
                    "--config",
                    "/dev/null",
                    "--threads",
                    "1",
                    "--ctx",
                    "256",
                ])
                .args(["--kv-type", kv])
                .arg("--model")
                .arg(&m)
                .arg("--socket")
                .arg(&socket)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let refused = serve("q8_0").wait_with_output().unwrap();
        assert!(!refused.status.success());
        let e = String::from_utf8_lossy(&refused.stderr);
        assert!(
            e.contains("kv_type q8_0 is not supported on the GPU"),
            "{e}"
        );

        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let _d = Kill(serve("f16"));
        let until = Instant::now() + Duration::from_secs(60);
        let ask = |req: &str| -> Value {
            let s = loop {
                match UnixStream::connect(&socket) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    Err(e) => panic!("daemon not serving: {e}"),
                }
            };
            writeln!(&s, "{req}").unwrap();
            let mut r = BufReader::new(s);
            loop {
                let mut line = String::new();
                assert!(r.read_line(&mut line).unwrap() > 0, "connection closed");
                let v: Value = serde_json::from_str(&line).unwrap();
                if v["event"] != "token" {
                    return v;
                }
            }
        };
        let h = ask(r#"{"op": "health"}"#);
        assert_eq!(
            (&h["status"], &h["device"]),
            (&"ok".into(), &"cuda".into()),
            "{h}"
        );
        assert!(h["gpu_mib"].as_f64().unwrap() > 1.0, "{h}");
        assert!(h["rss_mib"].as_f64().unwrap() > 1.0, "{h}");
        let done = ask(r#"{"id": "g", "prompt": "Hello", "max_tokens": 6, "temperature": 0}"#);
        assert_eq!(done["event"], "done", "{done}");
        assert!(
            done["usage"]["prompt_tokens"].as_u64().unwrap() > 1,
            "{done}"
        );
    }
}
