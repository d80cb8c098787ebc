//! The GPU backend (cargo feature `cuda`): the same forward pass as
//! [`crate::model::forward`], on an NVIDIA GPU.
//!
//! - [`driver`], [`nvrtc`]: the CUDA driver and the runtime compiler, both
//!   opened with `dlopen` when a GPU is asked for, so the binary builds
//!   without a toolkit and runs without a GPU.
//! - `kernels/*.cu`: the CUDA C kernels, embedded at build time and
//!   compiled by NVRTC for the GPU found, at start-up.
//! - [`Gpu`] (here): the device, the compiled kernels and the weights,
//!   uploaded once from the memory map as the file stores them (quantized
//!   blocks stay quantized).
//! - [`forward`]: the engine's step on the GPU, its KV store and scratch.

pub mod driver;
pub mod forward;
pub mod nvrtc;

pub use forward::GpuEngine;

use driver::{check, CuContext, CuDevicePtr, CuFunction, CuModule, Driver};
use std::ffi::{c_int, c_void, CString};

/// The kernel sources, one program, in this order (`common.cu` first).
pub const KERNEL_SOURCE: [(&str, &str); 4] = [
    ("common.cu", include_str!("kernels/common.cu")),
    ("embed_norm.cu", include_str!("kernels/embed_norm.cu")),
    ("matmul.cu", include_str!("kernels/matmul.cu")),
    ("attention.cu", include_str!("kernels/attention.cu")),
];

/// The whole program NVRTC compiles.
pub fn kernel_program() -> String {
    KERNEL_SOURCE
        .iter()
        .map(|(name, src)| format!("// ---- {name}\n{src}\n"))
        .collect()
}

/// Oldest GPU generation the kernels are written for (Pascal: warp
/// shuffles with masks, f16 conversions); Jetson Xavier is 7.2, Orin 8.7.
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (6, 0);

/// GPU memory left free beyond what the engine allocates: the driver, the
/// kernels' own module and launch state.
pub const HEADROOM_BYTES: u64 = 256 << 20;

/// What the log, `health` and `bench` say about the GPU.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    /// Shares its memory with the CPU (Jetson).
    pub integrated: bool,
    pub total_bytes: u64,
    /// Peak DRAM bandwidth from the memory clock and bus width, GB/s.
    pub bandwidth_gbs: f64,
    pub driver_version: i32,
    /// Where the kernels came from: `NVRTC 12.2`, or the PTX cache.
    pub kernels_from: String,
    pub multiprocessors: i32,
}

impl DeviceInfo {
    pub fn summary(&self) -> String {
        format!(
            "{} (sm_{}{}, {} GiB{}, {} SMs, {:.0} GB/s, driver {}.{}, kernels from {})",
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.total_bytes >> 30,
            if self.integrated {
                ", shared with the CPU"
            } else {
                ""
            },
            self.multiprocessors,
            self.bandwidth_gbs,
            self.driver_version / 1000,
            self.driver_version % 1000 / 10,
            self.kernels_from,
        )
    }
}

/// Refuses a GPU the kernels are not written for.
pub fn check_compute_capability(cc: (i32, i32)) -> Result<(), String> {
    if cc < MIN_COMPUTE_CAPABILITY {
        return Err(format!(
            "compute capability {}.{} is not supported (at least {}.{} is needed)",
            cc.0, cc.1, MIN_COMPUTE_CAPABILITY.0, MIN_COMPUTE_CAPABILITY.1
        ));
    }
    Ok(())
}

/// Refuses to start what cannot fit: `needed` bytes of buffers in `free`
/// bytes of GPU memory, keeping [`HEADROOM_BYTES`].
pub fn check_fits(what: &str, needed: u64, free: u64) -> Result<(), String> {
    if needed + HEADROOM_BYTES > free {
        return Err(format!(
            "not enough GPU memory for {what}: {} MiB needed (+{} MiB headroom), {} MiB free",
            needed.div_ceil(1 << 20),
            HEADROOM_BYTES >> 20,
            free >> 20
        ));
    }
    Ok(())
}

/// One device allocation, freed on drop.
pub struct DevBuf {
    ptr: CuDevicePtr,
    bytes: usize,
    d: &'static Driver,
}

impl DevBuf {
    pub fn new(d: &'static Driver, bytes: usize) -> Result<DevBuf, String> {
        let mut ptr = 0;
        // SAFETY: an out-pointer to a live u64; the caller made the
        // context current. Zero bytes is refused by the driver, so ask for 1.
        check(
            d,
            unsafe { (d.cuMemAlloc_v2)(&mut ptr, bytes.max(1)) },
            "cuMemAlloc",
        )
        .map_err(|e| format!("{e} ({} MiB)", bytes.div_ceil(1 << 20)))?;
        Ok(DevBuf { ptr, bytes, d })
    }

    pub fn ptr(&self) -> CuDevicePtr {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Copies `src` to the start of the buffer plus `offset` bytes.
    pub fn upload<T: bytemuck::Pod>(&self, offset: usize, src: &[T]) -> Result<(), String> {
        let bytes: &[u8] = bytemuck::cast_slice(src);
        assert!(offset + bytes.len() <= self.bytes, "upload past the buffer");
        if bytes.is_empty() {
            return Ok(());
        }
        // SAFETY: the range is inside this allocation (asserted) and the
        // host slice is live for the synchronous copy.
        let r = unsafe {
            (self.d.cuMemcpyHtoD_v2)(self.ptr + offset as u64, bytes.as_ptr().cast(), bytes.len())
        };
        check(self.d, r, "cuMemcpyHtoD")
    }

    /// Copies the first `dst.len()` elements back.
    pub fn download<T: bytemuck::Pod>(&self, dst: &mut [T]) -> Result<(), String> {
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(dst);
        assert!(bytes.len() <= self.bytes, "download past the buffer");
        // SAFETY: as in `upload`; the copy waits for the kernels before it.
        let r =
            unsafe { (self.d.cuMemcpyDtoH_v2)(bytes.as_mut_ptr().cast(), self.ptr, bytes.len()) };
        check(self.d, r, "cuMemcpyDtoH")
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // SAFETY: frees the allocation made in `new`, once. An error here
        // (a context already lost) leaves nothing else to do.
        unsafe { (self.d.cuMemFree_v2)(self.ptr) };
    }
}

/// A kernel argument, kept alive while a launch reads it.
#[derive(Clone, Copy)]
pub enum Arg {
    Ptr(CuDevicePtr),
    I32(i32),
    F32(f32),
}

/// The kernels of the program, by name.
pub struct Kernels {
    pub embed: CuFunction,
    pub layer_norm: CuFunction,
    pub matmul_q4_0: CuFunction,
    pub matmul_q8_0: CuFunction,
    pub matmul_f16: CuFunction,
    pub matmul_f32: CuFunction,
    pub matmul_q4_k: CuFunction,
    pub matmul_q5_k: CuFunction,
    pub matmul_q6_k: CuFunction,
    pub rope_store: CuFunction,
    pub attention: CuFunction,
}

/// An opened GPU with the kernels compiled and the model's weights on it.
pub struct Gpu {
    pub info: DeviceInfo,
    d: &'static Driver,
    ctx: CuContext,
    _module: CuModule,
    pub kernels: Kernels,
    /// The file's tensor data, byte for byte, from `data_start` on.
    weights: DevBuf,
    data_start: usize,
}

// SAFETY: a CUDA context may be used from any thread once made current
// there (`make_current`, called by every entry point); the raw handles
// are only passed to the driver, which synchronises its own state.
unsafe impl Send for Gpu {}
// SAFETY: as above; `&Gpu` methods only launch work and read handles.
unsafe impl Sync for Gpu {}

impl Gpu {
    /// Opens GPU 0, compiles the kernels, makes the context current on
    /// this thread and uploads `weights` (the file's tensor data, which
    /// starts at file offset `start`) in [`UPLOAD_CHUNK`]-byte pieces,
    /// calling `done(file range)` after each so the caller can drop those
    /// file pages at once. Every failure names what is missing.
    pub fn open(
        weights: &[u8],
        start: usize,
        done: impl FnMut(std::ops::Range<usize>),
    ) -> Result<Gpu, String> {
        let d = driver::driver()?;
        let mut count = 0;
        // SAFETY (this block's calls): out-pointers to live locals; the
        // name buffer's length is passed with it.
        unsafe {
            check(d, (d.cuDeviceGetCount)(&mut count), "cuDeviceGetCount")?;
            if count == 0 {
                return Err("the CUDA driver found no GPU".into());
            }
            let mut dev = 0;
            check(d, (d.cuDeviceGet)(&mut dev, 0), "cuDeviceGet")?;
            let attr = |a: c_int| -> Result<i32, String> {
                let mut v = 0;
                check(
                    d,
                    (d.cuDeviceGetAttribute)(&mut v, a, dev),
                    "cuDeviceGetAttribute",
                )?;
                Ok(v)
            };
            let cc = (
                attr(driver::ATTR_COMPUTE_CAPABILITY_MAJOR)?,
                attr(driver::ATTR_COMPUTE_CAPABILITY_MINOR)?,
            );
            let mut name = [0u8; 256];
            check(
                d,
                (d.cuDeviceGetName)(name.as_mut_ptr().cast(), 256, dev),
                "cuDeviceGetName",
            )?;
            let name =
                String::from_utf8_lossy(name.split(|&b| b == 0).next().unwrap_or(&[])).into_owned();
            check_compute_capability(cc).map_err(|e| format!("{name}: {e}"))?;
            let mut total = 0;
            check(
                d,
                (d.cuDeviceTotalMem_v2)(&mut total, dev),
                "cuDeviceTotalMem",
            )?;
            let mut version = 0;
            check(
                d,
                (d.cuDriverGetVersion)(&mut version),
                "cuDriverGetVersion",
            )?;
            // kHz × bits × 2 (double data rate) / 8 bits per byte; only
            // reported, so a driver that no longer answers gives 0.
            let bandwidth_gbs = attr(driver::ATTR_MEMORY_CLOCK_RATE).unwrap_or(0) as f64
                * 1e3
                * attr(driver::ATTR_GLOBAL_MEMORY_BUS_WIDTH).unwrap_or(0) as f64
                * 2.0
                / 8.0
                / 1e9;
            let info = DeviceInfo {
                name,
                compute_capability: cc,
                integrated: attr(driver::ATTR_INTEGRATED)? != 0,
                total_bytes: total as u64,
                bandwidth_gbs,
                driver_version: version,
                kernels_from: String::new(),
                multiprocessors: attr(driver::ATTR_MULTIPROCESSOR_COUNT)?,
            };
            let mut ctx: CuContext = std::ptr::null_mut();
            check(
                d,
                (d.cuDevicePrimaryCtxRetain)(&mut ctx, dev),
                "cuDevicePrimaryCtxRetain",
            )?;
            check(d, (d.cuCtxSetCurrent)(ctx), "cuCtxSetCurrent")?;

            let arch = format!("compute_{}{}", cc.0, cc.1);
            let mut info = info;
            let load = |ptx: &[u8]| -> Result<CuModule, String> {
                let mut module: CuModule = std::ptr::null_mut();
                check(
                    d,
                    (d.cuModuleLoadData)(&mut module, ptx.as_ptr().cast()),
                    "cuModuleLoadData",
                )?;
                Ok(module)
            };
            let cached = ptx_cache_file(&arch);
            let hit = cached
                .as_deref()
                .and_then(|p| std::fs::read(p).ok())
                .and_then(|ptx| load(&nul_terminated(ptx)).ok());
            let module = match hit {
                Some(m) => {
                    info.kernels_from = "the PTX cache".into();
                    m
                }
                None => {
                    let ptx = nvrtc::compile(&kernel_program(), "crystald.cu", &arch)?;
                    let (major, minor) = nvrtc::version()?;
                    info.kernels_from = format!("NVRTC {major}.{minor}");
                    let ptx = nul_terminated(ptx);
                    let m = load(&ptx).map_err(|e| format!("{e} (the driver could not load NVRTC's PTX for {arch}; is NVRTC newer than the driver?)"))?;
                    if let Some(p) = &cached {
                        store(p, &ptx[..ptx.len() - 1]);
                    }
                    m
                }
            };
            let f = |n: &str| -> Result<CuFunction, String> {
                let mut func: CuFunction = std::ptr::null_mut();
                let cname = CString::new(n).expect("kernel names have no NUL");
                check(
                    d,
                    (d.cuModuleGetFunction)(&mut func, module, cname.as_ptr()),
                    n,
                )?;
                Ok(func)
            };
            let kernels = Kernels {
                embed: f("embed")?,
                layer_norm: f("layer_norm")?,
                matmul_q4_0: f("matmul_q4_0")?,
                matmul_q8_0: f("matmul_q8_0")?,
                matmul_f16: f("matmul_f16")?,
                matmul_f32: f("matmul_f32")?,
                matmul_q4_k: f("matmul_q4_k")?,
                matmul_q5_k: f("matmul_q5_k")?,
                matmul_q6_k: f("matmul_q6_k")?,
                rope_store: f("rope_store")?,
                attention: f("attention")?,
            };
            let weights = upload_weights(d, weights, start, done)?;
            Ok(Gpu {
                info,
                d,
                ctx,
                _module: module,
                kernels,
                weights,
                data_start: start,
            })
        }
    }

    pub fn driver(&self) -> &'static Driver {
        self.d
    }

    /// Makes the context current on the calling thread (the daemon's
    /// worker is not the thread that loaded the model).
    pub fn make_current(&self) -> Result<(), String> {
        // SAFETY: the context was retained in `open` and is never released.
        check(
            self.d,
            unsafe { (self.d.cuCtxSetCurrent)(self.ctx) },
            "cuCtxSetCurrent",
        )
    }

    /// Waits for the launched kernels; a kernel's own failure shows here.
    pub fn synchronize(&self) -> Result<(), String> {
        // SAFETY: no arguments; the context is current (callers' entry points).
        check(
            self.d,
            unsafe { (self.d.cuCtxSynchronize)() },
            "cuCtxSynchronize",
        )
    }

    /// (free, total) bytes of GPU memory.
    pub fn memory(&self) -> Result<(u64, u64), String> {
        self.make_current()?;
        memory(self.d)
    }

    /// Device address of the tensor at file offset `offset`.
    pub fn weight_ptr(&self, offset: usize) -> CuDevicePtr {
        debug_assert!(offset >= self.data_start);
        self.weights.ptr() + (offset - self.data_start) as u64
    }

    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes()
    }

    /// Launches `f` on the default stream (asynchronous: errors of the
    /// kernel itself surface at the next copy back).
    pub(crate) fn launch(
        &self,
        f: CuFunction,
        grid: (u32, u32),
        block: u32,
        args: &[Arg],
    ) -> Result<(), String> {
        let mut vals = args.to_vec();
        let mut ptrs: Vec<*mut c_void> = vals
            .iter_mut()
            .map(|a| match a {
                Arg::Ptr(p) => (p as *mut u64).cast(),
                Arg::I32(v) => (v as *mut i32).cast(),
                Arg::F32(v) => (v as *mut f32).cast(),
            })
            .collect();
        // SAFETY: `ptrs` points at `vals`, which outlive the call (the
        // driver copies the arguments before cuLaunchKernel returns); the
        // argument list matches the kernel's signature (each call site
        // lists them in the .cu parameter order).
        let r = unsafe {
            (self.d.cuLaunchKernel)(
                f,
                grid.0,
                grid.1,
                1,
                block,
                1,
                1,
                0,
                std::ptr::null_mut(),
                ptrs.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        check(self.d, r, "cuLaunchKernel")
    }
}

/// The cached PTX of this kernel source for `arch`, if there is a cache
/// directory: `CRYSTALD_CACHE_DIR`, systemd's `CACHE_DIRECTORY`
/// (`CacheDirectory=` in the unit), `$XDG_CACHE_HOME/crystald` or
/// `~/.cache/crystald`. NVRTC takes seconds on a Jetson's cores; a hit
/// makes start-up skip it (NVRTC is then not even opened). The name holds
/// a hash of the source, so a new crystald never loads old kernels, and a
/// file the driver refuses is compiled again and replaced.
pub fn ptx_cache_file(arch: &str) -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let dir = env("CRYSTALD_CACHE_DIR")
        .or_else(|| env("CACHE_DIRECTORY"))
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("crystald")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/crystald")))?;
    let hash = xxhash_rust::xxh3::xxh3_64(kernel_program().as_bytes());
    Some(dir.join(format!("kernels-{arch}-{hash:016x}.ptx")))
}

fn nul_terminated(mut ptx: Vec<u8>) -> Vec<u8> {
    if ptx.last() != Some(&0) {
        ptx.push(0);
    }
    ptx
}

/// Writes the cache file whole (a temporary file renamed into place) or not
/// at all: a cache that cannot be written only costs the next start-up.
fn store(path: &std::path::Path, ptx: &[u8]) {
    let Some(dir) = path.parent() else { return };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&tmp, ptx))
        .and_then(|_| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// (free, total) bytes of the current context's GPU memory.
fn memory(d: &Driver) -> Result<(u64, u64), String> {
    let (mut free, mut total) = (0, 0);
    // SAFETY: two out-pointers to live locals.
    check(
        d,
        unsafe { (d.cuMemGetInfo_v2)(&mut free, &mut total) },
        "cuMemGetInfo",
    )?;
    Ok((free as u64, total as u64))
}

/// Bytes per copy of the weights upload: the file pages behind each piece
/// are dropped before the next is read.
pub const UPLOAD_CHUNK: usize = 64 << 20;

/// The weights' one allocation, filled piece by piece (see [`Gpu::open`]).
fn upload_weights(
    d: &'static Driver,
    data: &[u8],
    start: usize,
    mut done: impl FnMut(std::ops::Range<usize>),
) -> Result<DevBuf, String> {
    let (free, _) = memory(d)?;
    check_fits("the weights", data.len() as u64, free)?;
    let buf = DevBuf::new(d, data.len())?;
    for (at, piece) in upload_plan(data.len(), UPLOAD_CHUNK) {
        buf.upload(at, &data[at..at + piece])?;
        done(start + at..start + at + piece);
    }
    Ok(buf)
}

/// Pieces `(offset, bytes)` that copy `total` bytes, at most `chunk` each.
pub fn upload_plan(total: usize, chunk: usize) -> Vec<(usize, usize)> {
    let chunk = chunk.max(1);
    (0..total)
        .step_by(chunk)
        .map(|at| (at, chunk.min(total - at)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upload_covers_the_data_once_in_bounded_pieces() {
        for (total, chunk) in [(0, 64), (1, 64), (64, 64), (65, 64), (1000, 7)] {
            let plan = upload_plan(total, chunk);
            let mut next = 0;
            for &(at, n) in &plan {
                assert_eq!(at, next);
                assert!(n > 0 && n <= chunk);
                next += n;
            }
            assert_eq!(next, total);
        }
    }

    #[test]
    fn old_gpus_and_small_memories_are_named() {
        check_compute_capability((8, 7)).unwrap();
        check_compute_capability((6, 0)).unwrap();
        let e = check_compute_capability((5, 3)).unwrap_err();
        assert!(e.contains("5.3") && e.contains("6.0"), "{e}");
        check_fits("the weights", 1 << 30, 2 << 30).unwrap();
        let e = check_fits("the weights", 3900 << 20, 4000 << 20).unwrap_err();
        assert!(
            e.contains("3900 MiB needed") && e.contains("4000 MiB free"),
            "{e}"
        );
    }
}
