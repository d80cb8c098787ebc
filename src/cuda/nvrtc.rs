//! NVRTC, the CUDA C compiler as a library, opened at run time: the
//! kernels are compiled to PTX for the GPU found, at start-up, so nothing
//! is compiled for CUDA at build time.

use super::driver::{library_api, open_first};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::sync::OnceLock;

type NvrtcResult = c_int;
type Program = *mut c_void;

/// Where toolkits and JetPack put NVRTC when it is not on the loader path.
const SEARCH_DIRS: [&str; 4] = [
    "/usr/local/cuda/lib64",
    "/usr/local/cuda/targets/aarch64-linux/lib",
    "/usr/local/cuda/targets/x86_64-linux/lib",
    "/usr/lib/aarch64-linux-gnu/nvidia",
];

library_api! {
    struct Nvrtc {
    nvrtcVersion: fn(*mut c_int, *mut c_int) -> NvrtcResult;
    nvrtcGetErrorString: fn(NvrtcResult) -> *const c_char;
    nvrtcCreateProgram: fn(*mut Program, *const c_char, *const c_char, c_int, *const *const c_char, *const *const c_char) -> NvrtcResult;
    nvrtcCompileProgram: fn(Program, c_int, *const *const c_char) -> NvrtcResult;
    nvrtcGetPTXSize: fn(Program, *mut usize) -> NvrtcResult;
    nvrtcGetPTX: fn(Program, *mut c_char) -> NvrtcResult;
    nvrtcGetProgramLogSize: fn(Program, *mut usize) -> NvrtcResult;
    nvrtcGetProgramLog: fn(Program, *mut c_char) -> NvrtcResult;
    nvrtcDestroyProgram: fn(*mut Program) -> NvrtcResult;
}
}

/// The library names to try: `CRYSTALD_NVRTC` (a path) if set, the
/// development link, each major version's soname, then any
/// `libnvrtc.so.*` in the usual toolkit directories.
fn candidates() -> Vec<String> {
    let mut names: Vec<String> = std::env::var("CRYSTALD_NVRTC").into_iter().collect();
    names.extend(
        [
            "libnvrtc.so",
            "libnvrtc.so.13",
            "libnvrtc.so.12",
            "libnvrtc.so.11.2",
        ]
        .map(String::from),
    );
    for dir in SEARCH_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut found: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("libnvrtc.so."))
            .map(|n| Path::new(dir).join(n).to_string_lossy().into_owned())
            .collect();
        found.sort();
        names.extend(found.into_iter().rev());
    }
    names
}

static NVRTC: OnceLock<Result<Nvrtc, String>> = OnceLock::new();

fn nvrtc() -> Result<&'static Nvrtc, String> {
    NVRTC
        .get_or_init(|| {
            let names = candidates();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let (lib, path) = open_first(&names).map_err(|tried| {
                format!(
                    "no NVRTC (the CUDA runtime compiler): {tried} \
                     (install the CUDA toolkit's NVRTC, or set CRYSTALD_NVRTC to libnvrtc.so's path)"
                )
            })?;
            Nvrtc::resolve(lib, &path)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// NVRTC's version, `(major, minor)`.
pub fn version() -> Result<(i32, i32), String> {
    let n = nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to live integers.
    check(
        n,
        unsafe { (n.nvrtcVersion)(&mut major, &mut minor) },
        "nvrtcVersion",
    )?;
    Ok((major, minor))
}

fn check(n: &Nvrtc, r: NvrtcResult, call: &str) -> Result<(), String> {
    if r == 0 {
        return Ok(());
    }
    // SAFETY: returns a static NUL-terminated string for any code.
    let msg = unsafe { CStr::from_ptr((n.nvrtcGetErrorString)(r)) };
    Err(format!("{call} failed: {}", msg.to_string_lossy()))
}

/// Compiles CUDA C `source` to PTX for `arch` (`compute_87`, ...). A
/// compile error returns NVRTC's log.
pub fn compile(source: &str, name: &str, arch: &str) -> Result<Vec<u8>, String> {
    let n = nvrtc()?;
    let src = CString::new(source).map_err(|_| "kernel source has a NUL byte".to_string())?;
    let cname = CString::new(name).expect("program names have no NUL");
    let opts: Vec<CString> = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        // Division, square root and denormals as IEEE: the CPU engine's
        // numbers are the reference.
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--fmad=true".into(),
    ]
    .into_iter()
    .map(|o| CString::new(o).expect("no NUL"))
    .collect();
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: Program = std::ptr::null_mut();
    // SAFETY: source and name are NUL-terminated and outlive the call; no
    // headers are passed (count 0, null arrays).
    let r = unsafe {
        (n.nvrtcCreateProgram)(
            &mut prog,
            src.as_ptr(),
            cname.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    check(n, r, "nvrtcCreateProgram")?;
    // SAFETY: `prog` was created above; the option strings outlive the call.
    let compiled =
        unsafe { (n.nvrtcCompileProgram)(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
    let result = if compiled == 0 {
        ptx(n, prog)
    } else {
        Err(format!(
            "NVRTC could not compile {name} for {arch}: {}\n{}",
            check(n, compiled, "nvrtcCompileProgram").unwrap_err(),
            log(n, prog)
        ))
    };
    // SAFETY: destroys the program created above, once.
    unsafe { (n.nvrtcDestroyProgram)(&mut prog) };
    result
}

fn ptx(n: &Nvrtc, prog: Program) -> Result<Vec<u8>, String> {
    let mut size = 0;
    // SAFETY: `prog` compiled successfully; the buffer has the size NVRTC
    // reported (which includes the terminating NUL).
    unsafe {
        check(n, (n.nvrtcGetPTXSize)(prog, &mut size), "nvrtcGetPTXSize")?;
        let mut buf = vec![0u8; size];
        check(
            n,
            (n.nvrtcGetPTX)(prog, buf.as_mut_ptr().cast()),
            "nvrtcGetPTX",
        )?;
        Ok(buf)
    }
}

fn log(n: &Nvrtc, prog: Program) -> String {
    let mut size = 0;
    // SAFETY: as in `ptx`, for the log.
    unsafe {
        if (n.nvrtcGetProgramLogSize)(prog, &mut size) != 0 || size == 0 {
            return String::new();
        }
        let mut buf = vec![0u8; size];
        if (n.nvrtcGetProgramLog)(prog, buf.as_mut_ptr().cast()) != 0 {
            return String::new();
        }
        String::from_utf8_lossy(&buf)
            .trim_end_matches('\0')
            .trim()
            .to_string()
    }
}
