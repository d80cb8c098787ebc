//! The CUDA driver API, opened at run time (`libcuda.so.1`): the calls the
//! GPU backend makes and nothing more, each checked into a `Result` whose
//! error names the call and the driver's own name for the failure.
//!
//! Only ABI-stable entry points are used (the `_v2` names that CUDA 12 and
//! 13 both export), so one binary serves JetPack 6 and current drivers.

use libloading::Library;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

pub type CuResult = c_int;
pub type CuDevice = c_int;
pub type CuContext = *mut c_void;
pub type CuModule = *mut c_void;
pub type CuFunction = *mut c_void;
pub type CuDevicePtr = u64;

pub const ATTR_MULTIPROCESSOR_COUNT: c_int = 16;
pub const ATTR_INTEGRATED: c_int = 18;
pub const ATTR_MEMORY_CLOCK_RATE: c_int = 36;
pub const ATTR_GLOBAL_MEMORY_BUS_WIDTH: c_int = 37;
pub const ATTR_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
pub const ATTR_COMPUTE_CAPABILITY_MINOR: c_int = 76;

/// Names tried in order: the versioned name the driver package always
/// installs, then the development link. `CRYSTALD_CUDA_DRIVER` (a path)
/// replaces them: a driver outside the loader's path, or none for a test.
pub fn library_names() -> Vec<String> {
    match std::env::var("CRYSTALD_CUDA_DRIVER") {
        Ok(path) => vec![path],
        Err(_) => vec!["libcuda.so.1".into(), "libcuda.so".into()],
    }
}

/// A struct of function pointers resolved from a dlopen'ed library by
/// their C names, with the library kept beside them (the driver's and
/// NVRTC's tables both).
macro_rules! library_api {
    ($(#[$doc:meta])* $vis:vis struct $api:ident { $($name:ident: fn($($arg:ty),*) -> $ret:ty;)* }) => {
        $(#[$doc])*
        #[allow(non_snake_case)]
        $vis struct $api {
            $(pub $name: unsafe extern "C" fn($($arg),*) -> $ret,)*
            /// Keeps the library mapped while the pointers above are used.
            _lib: libloading::Library,
        }

        impl $api {
            fn resolve(lib: libloading::Library, path: &str) -> Result<$api, String> {
                // SAFETY: each symbol is looked up by its documented name
                // and given the signature of its C header; the library
                // outlives the pointers (stored beside them in a struct
                // that lives in a static and is never dropped).
                unsafe {
                    Ok($api {
                        $($name: *lib
                            .get(concat!(stringify!($name), "\0").as_bytes())
                            .map_err(|e| format!("{path}: {e}"))?,)*
                        _lib: lib,
                    })
                }
            }
        }
    };
}
pub(crate) use library_api;

library_api! {
    /// The driver's entry points, resolved once.
    pub struct Driver {
    cuInit: fn(c_uint) -> CuResult;
    cuDriverGetVersion: fn(*mut c_int) -> CuResult;
    cuDeviceGetCount: fn(*mut c_int) -> CuResult;
    cuDeviceGet: fn(*mut CuDevice, c_int) -> CuResult;
    cuDeviceGetName: fn(*mut c_char, c_int, CuDevice) -> CuResult;
    cuDeviceGetAttribute: fn(*mut c_int, c_int, CuDevice) -> CuResult;
    cuDeviceTotalMem_v2: fn(*mut usize, CuDevice) -> CuResult;
    cuDevicePrimaryCtxRetain: fn(*mut CuContext, CuDevice) -> CuResult;
    cuCtxSetCurrent: fn(CuContext) -> CuResult;
    cuCtxSynchronize: fn() -> CuResult;
    cuMemGetInfo_v2: fn(*mut usize, *mut usize) -> CuResult;
    cuMemAlloc_v2: fn(*mut CuDevicePtr, usize) -> CuResult;
    cuMemFree_v2: fn(CuDevicePtr) -> CuResult;
    cuMemcpyHtoD_v2: fn(CuDevicePtr, *const c_void, usize) -> CuResult;
    cuMemcpyDtoH_v2: fn(*mut c_void, CuDevicePtr, usize) -> CuResult;
    cuModuleLoadData: fn(*mut CuModule, *const c_void) -> CuResult;
    cuModuleGetFunction: fn(*mut CuFunction, CuModule, *const c_char) -> CuResult;
    cuLaunchKernel: fn(CuFunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, *mut c_void, *mut *mut c_void, *mut *mut c_void) -> CuResult;
    cuGetErrorName: fn(CuResult, *mut *const c_char) -> CuResult;
}
}

/// Opens the first library of `names` that loads; on failure, what each
/// attempt said.
pub(crate) fn open_first(names: &[&str]) -> Result<(Library, String), String> {
    let mut tried = Vec::new();
    for name in names {
        // SAFETY: loading runs the library's initialisers; the CUDA
        // driver and NVRTC are designed to be dlopen'ed this way (it is
        // how the CUDA runtime itself finds the driver).
        match unsafe { Library::new(name) } {
            Ok(lib) => return Ok((lib, name.to_string())),
            Err(e) => tried.push(format!("{name}: {e}")),
        }
    }
    Err(tried.join("; "))
}

impl Driver {
    fn open() -> Result<Driver, String> {
        let names = library_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let (lib, path) = open_first(&names).map_err(|tried| {
            format!("no CUDA driver: {tried} (is the NVIDIA driver installed?)")
        })?;
        Driver::resolve(lib, &path)
    }
}

static DRIVER: OnceLock<Result<Driver, String>> = OnceLock::new();

/// The driver, opened and initialised on first use.
pub fn driver() -> Result<&'static Driver, String> {
    DRIVER
        .get_or_init(|| {
            let d = Driver::open()?;
            // SAFETY: cuInit takes flags (must be 0) and is safe to call
            // more than once.
            check(&d, unsafe { (d.cuInit)(0) }, "cuInit")?;
            Ok(d)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// `Err` naming the call and the driver's name for a non-zero result.
pub fn check(d: &Driver, r: CuResult, call: &str) -> Result<(), String> {
    if r == 0 {
        return Ok(());
    }
    let mut name: *const c_char = std::ptr::null();
    // SAFETY: cuGetErrorName writes a pointer to a static string (or
    // leaves it null for an unknown code).
    unsafe { (d.cuGetErrorName)(r, &mut name) };
    let name = if name.is_null() {
        format!("error {r}")
    } else {
        // SAFETY: non-null means a NUL-terminated static string.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    };
    Err(format!("{call} failed: {name}"))
}
