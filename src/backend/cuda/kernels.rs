//! Our CUDA C kernels: their sources, compilation and loading.
//!
//! The sources in `kernels/*.cu` are embedded in the binary. At run time each file becomes a
//! module, from the first of:
//! 1. the fatbin `build.rs` made with nvcc (sm_90 code + compute_90 PTX), when nvcc was on
//!    the PATH at build time and the device loads it;
//! 2. a CUBIN cached on disk by an earlier run (same sources, options, NVRTC and device);
//! 3. NVRTC, compiling for the device's own architecture (`sm_XY`), then cached.
//!
//! `SETAR_CUDA_KERNELS=nvrtc` skips (1); `SETAR_KERNEL_CACHE=off` skips the disk cache,
//! `SETAR_KERNEL_CACHE=DIR` moves it (default `$XDG_CACHE_HOME/setar-engine/kernels` or
//! `~/.cache/setar-engine/kernels`). NVRTC needs `libnvrtc.so.13` (and its
//! `libnvrtc-builtins`) on the loader path; no CUDA headers are needed.

use super::device::Device;
use super::DType;
use crate::error::{Error, Result};
use cudarc::driver::{CudaFunction, CudaModule};
use cudarc::nvrtc::{sys as nvrtc_sys, Ptx};
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// CUBINs compiled by NVRTC in this process, by cache file name (so a second backend on the
/// same kind of device does not compile again, even with the disk cache off).
static COMPILED: Mutex<Option<HashMap<String, Vec<u8>>>> = Mutex::new(None);

fn memory_cache_get(key: &str) -> Option<Vec<u8>> {
    let guard = COMPILED.lock().unwrap_or_else(|e| e.into_inner());
    guard.as_ref().and_then(|m| m.get(key).cloned())
}

fn memory_cache_put(key: String, cubin: &[u8]) {
    let mut guard = COMPILED.lock().unwrap_or_else(|e| e.into_inner());
    guard
        .get_or_insert_with(HashMap::new)
        .insert(key, cubin.to_vec());
}

/// The header every kernel file includes.
pub const HEADER: (&str, &str) = ("common.cuh", include_str!("../../../kernels/common.cuh"));

/// One kernel file: its entry points are `<op>_<dtype>` for each op and dtype.
#[derive(Clone, Copy, Debug)]
pub struct Unit {
    pub name: &'static str,
    pub source: &'static str,
    pub ops: &'static [&'static str],
    pub dtypes: &'static [DType],
}

impl Unit {
    /// The entry points this file must define.
    pub fn entries(&self) -> Vec<String> {
        self.ops
            .iter()
            .flat_map(|op| {
                self.dtypes
                    .iter()
                    .map(move |d| format!("{op}_{}", d.name()))
            })
            .collect()
    }
}

const ALL: &[DType] = &[DType::F32, DType::BF16, DType::F16];
const HALVES: &[DType] = &[DType::BF16, DType::F16];

/// Every kernel file. Keep in sync with `kernels/` (a test checks the entry points).
pub const UNITS: &[Unit] = &[
    Unit {
        name: "activation",
        source: include_str!("../../../kernels/activation.cu"),
        ops: &["bias_act", "activate"],
        dtypes: ALL,
    },
    Unit {
        name: "attention",
        source: include_str!("../../../kernels/attention.cu"),
        ops: &["flash_attention", "flash_attention_wide"],
        dtypes: HALVES,
    },
    Unit {
        name: "convert",
        source: include_str!("../../../kernels/convert.cu"),
        ops: &["cast_from_f32", "cast_to_f32"],
        dtypes: HALVES,
    },
    Unit {
        name: "embed",
        source: include_str!("../../../kernels/embed.cu"),
        ops: &[
            "patchify",
            "vision_tokens",
            "vision_tokens_to_f32",
            "text_tokens",
            "text_tokens_to_f32",
            "gather_rows",
        ],
        dtypes: ALL,
    },
    Unit {
        name: "finite",
        source: include_str!("../../../kernels/finite.cu"),
        ops: &["first_non_finite"],
        dtypes: ALL,
    },
    Unit {
        name: "l2norm",
        source: include_str!("../../../kernels/l2norm.cu"),
        ops: &["l2_normalize"],
        dtypes: ALL,
    },
    Unit {
        name: "layernorm",
        source: include_str!("../../../kernels/layernorm.cu"),
        ops: &["layer_norm", "layer_norm_from_f32", "layer_norm_f32_to_f32"],
        dtypes: ALL,
    },
    Unit {
        name: "residual",
        source: include_str!("../../../kernels/residual.cu"),
        ops: &["add_assign", "add_assign_into_f32"],
        dtypes: ALL,
    },
    Unit {
        name: "rowstats",
        source: include_str!("../../../kernels/rowstats.cu"),
        ops: &["row_stats", "ood_sums"],
        dtypes: &[DType::F32],
    },
    Unit {
        name: "softmax",
        source: include_str!("../../../kernels/softmax.cu"),
        ops: &["softmax"],
        dtypes: ALL,
    },
];

/// NVRTC options besides the architecture. Keep in sync with scripts/compile-kernels.sh.
pub const NVRTC_OPTIONS: &[&str] = &["--std=c++17"];

// Fatbins nvcc made at build time (`PREBUILT: &[(unit, bytes)]`, empty without nvcc).
include!(concat!(env!("OUT_DIR"), "/prebuilt_kernels.rs"));

/// Whether `build.rs` embedded nvcc-compiled kernels.
pub fn has_prebuilt() -> bool {
    !PREBUILT.is_empty()
}

/// The kernel files `build.rs` prebuilt.
pub fn prebuilt_units() -> Vec<&'static str> {
    PREBUILT.iter().map(|(name, _)| *name).collect()
}

/// Whether NVRTC can be loaded (without it cudarc would panic on first use).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { nvrtc_sys::is_culib_present() }
}

/// NVRTC's version, e.g. (13, 0).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    require_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::invalid(format!("NVRTC version: {:?}", e.0)))?;
    Ok((major, minor))
}

fn require_nvrtc() -> Result<()> {
    if nvrtc_available() {
        Ok(())
    } else {
        Err(Error::invalid(
            "NVRTC (libnvrtc.so.13) not found: the CUDA kernels cannot be compiled at run time; \
             put its folder (e.g. site-packages/nvidia/cu13/lib of PyPI nvidia-cuda-nvrtc) on LD_LIBRARY_PATH",
        ))
    }
}

/// The output of compiling one kernel file.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub unit: &'static str,
    /// `sm_XY` (CUBIN and PTX) or `compute_XY` (PTX only).
    pub arch: String,
    pub ptx: String,
    pub cubin: Option<Vec<u8>>,
    /// NVRTC's log (warnings; with `-Xptxas -v`, registers and spills).
    pub log: String,
}

/// Owns an nvrtcProgram; destroyed on drop (errors ignored).
struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram, destroyed once.
        unsafe {
            let _ = nvrtc_sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

impl Program {
    fn log(&self) -> String {
        let mut size = 0usize;
        // SAFETY: valid program; the buffer has the size NVRTC asked for.
        unsafe {
            if nvrtc_sys::nvrtcGetProgramLogSize(self.0, &mut size)
                .result()
                .is_err()
            {
                return String::new();
            }
            let mut buf = vec![0u8; size.max(1)];
            if nvrtc_sys::nvrtcGetProgramLog(self.0, buf.as_mut_ptr() as *mut c_char)
                .result()
                .is_err()
            {
                return String::new();
            }
            CStr::from_bytes_until_nul(&buf)
                .map(|s| s.to_string_lossy().trim().to_string())
                .unwrap_or_default()
        }
    }
}

/// Compiles one kernel file with NVRTC for `arch` (`sm_90`: CUBIN + PTX; `compute_90`: PTX),
/// with `extra` options after [`NVRTC_OPTIONS`]. A compile error is an `Error` carrying
/// NVRTC's log.
pub fn compile(unit: &Unit, arch: &str, extra: &[&str]) -> Result<Compiled> {
    require_nvrtc()?;
    let fail = |what: &str, e: cudarc::nvrtc::result::NvrtcError| {
        Error::invalid(format!("NVRTC {}: {what}: {:?}", unit.name, e.0))
    };
    let src = CString::new(unit.source).map_err(|_| Error::invalid("NUL in a kernel source"))?;
    let name = CString::new(format!("{}.cu", unit.name)).unwrap_or_default();
    let header = CString::new(HEADER.1).map_err(|_| Error::invalid("NUL in common.cuh"))?;
    let header_name = CString::new(HEADER.0).unwrap_or_default();
    let headers = [header.as_ptr()];
    let header_names = [header_name.as_ptr()];
    let mut raw: nvrtc_sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer is a NUL-terminated string that outlives the program.
    unsafe {
        nvrtc_sys::nvrtcCreateProgram(
            &mut raw,
            src.as_ptr(),
            name.as_ptr(),
            1,
            headers.as_ptr(),
            header_names.as_ptr(),
        )
    }
    .result()
    .map_err(|e| fail("create", e))?;
    let prog = Program(raw);
    let mut options: Vec<String> = vec![format!("--gpu-architecture={arch}")];
    options.extend(NVRTC_OPTIONS.iter().map(|s| s.to_string()));
    options.extend(extra.iter().map(|s| s.to_string()));
    let c_opts: Vec<CString> = options
        .iter()
        .map(|o| CString::new(o.as_str()).unwrap_or_default())
        .collect();
    let opt_ptrs: Vec<*const c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: valid program and option strings.
    let compiled =
        unsafe { nvrtc_sys::nvrtcCompileProgram(prog.0, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) };
    let log = prog.log();
    if let Err(e) = compiled.result() {
        return Err(Error::invalid(format!(
            "kernels/{}.cu does not compile for {arch} ({:?}):\n{log}",
            unit.name, e.0
        )));
    }
    // SAFETY: valid, compiled program; buffers sized as NVRTC reports.
    let ptx = unsafe {
        let mut size = 0usize;
        nvrtc_sys::nvrtcGetPTXSize(prog.0, &mut size)
            .result()
            .map_err(|e| fail("PTX size", e))?;
        let mut buf = vec![0u8; size.max(1)];
        nvrtc_sys::nvrtcGetPTX(prog.0, buf.as_mut_ptr() as *mut c_char)
            .result()
            .map_err(|e| fail("PTX", e))?;
        CStr::from_bytes_until_nul(&buf)
            .map(|s| s.to_string_lossy().into_owned())
            .map_err(|_| Error::invalid("NVRTC returned PTX without a terminating NUL"))?
    };
    let cubin = if arch.starts_with("sm_") {
        // SAFETY: as above.
        unsafe {
            let mut size = 0usize;
            nvrtc_sys::nvrtcGetCUBINSize(prog.0, &mut size)
                .result()
                .map_err(|e| fail("CUBIN size", e))?;
            let mut buf = vec![0u8; size];
            nvrtc_sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr() as *mut c_char)
                .result()
                .map_err(|e| fail("CUBIN", e))?;
            Some(buf)
        }
    } else {
        None
    };
    Ok(Compiled {
        unit: unit.name,
        arch: arch.to_string(),
        ptx,
        cubin,
        log,
    })
}

/// Compiles every kernel file for `arch`, in parallel.
pub fn compile_all(arch: &str, extra: &[&str]) -> Result<Vec<Compiled>> {
    std::thread::scope(|s| {
        let jobs: Vec<_> = UNITS
            .iter()
            .map(|u| s.spawn(move || compile(u, arch, extra)))
            .collect();
        jobs.into_iter()
            .map(|j| {
                j.join()
                    .unwrap_or_else(|_| Err(Error::invalid("NVRTC compile thread panicked")))
            })
            .collect()
    })
}

/// 64-bit FNV-1a: a stable key for the disk cache.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("SETAR_KERNEL_CACHE") {
        Some(v) if v == "off" || v == "0" => None,
        Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|d| d.join("setar-engine").join("kernels")),
    }
}

/// The cache file name of a unit's CUBIN for `arch`: sources, options and NVRTC version hashed.
fn cache_name(unit: &Unit, arch: &str, nvrtc: (i32, i32)) -> String {
    let version = format!("{}.{}", nvrtc.0, nvrtc.1);
    let key = fnv1a(&[
        HEADER.1.as_bytes(),
        unit.source.as_bytes(),
        NVRTC_OPTIONS.join(" ").as_bytes(),
        version.as_bytes(),
        arch.as_bytes(),
    ]);
    format!("{}-{arch}-{key:016x}.cubin", unit.name)
}

/// Loaded kernel functions by entry-point name.
pub struct Kernels {
    funcs: HashMap<String, CudaFunction>,
    /// Where each unit came from ("prebuilt", "cache", "nvrtc"), for `name()` and reports.
    pub origin: Vec<(&'static str, &'static str)>,
}

impl Kernels {
    /// Loads every unit onto `dev` (see the module docs for the order of sources).
    pub fn load(dev: &Device) -> Result<Kernels> {
        dev.bind()?;
        let (major, minor) = dev.arch();
        let arch = format!("sm_{major}{minor}");
        let use_prebuilt = std::env::var("SETAR_CUDA_KERNELS").map_or(true, |v| v != "nvrtc");
        let mut funcs = HashMap::new();
        let mut origin = Vec::new();
        let mut pending = Vec::new();
        for unit in UNITS {
            let prebuilt = PREBUILT
                .iter()
                .find(|(name, _)| *name == unit.name)
                .filter(|_| use_prebuilt);
            let module = prebuilt.and_then(|(_, bytes)| load_image(dev, bytes).ok());
            match module {
                Some(m) => {
                    add_functions(&m, unit, &mut funcs)?;
                    origin.push((unit.name, "prebuilt"));
                }
                None => pending.push(unit),
            }
        }
        if !pending.is_empty() {
            let nvrtc = nvrtc_version().map_err(|e| {
                Error::invalid(format!(
                    "{e} (kernels needing it: {})",
                    pending
                        .iter()
                        .map(|u| u.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            // Cached CUBINs first (this process's, then the disk's); compile the rest in parallel.
            let mut to_compile = Vec::new();
            for unit in pending {
                let name = cache_name(unit, &arch, nvrtc);
                let path = cache_dir().map(|d| d.join(&name));
                let cached = memory_cache_get(&name)
                    .or_else(|| path.as_ref().and_then(|p| std::fs::read(p).ok()))
                    .and_then(|bytes| load_image(dev, &bytes).ok());
                match cached {
                    Some(m) => {
                        add_functions(&m, unit, &mut funcs)?;
                        origin.push((unit.name, "cache"));
                    }
                    None => to_compile.push((unit, name, path)),
                }
            }
            let compiled: Vec<Result<Compiled>> = std::thread::scope(|s| {
                let jobs: Vec<_> = to_compile
                    .iter()
                    .map(|(u, _, _)| {
                        let arch = arch.as_str();
                        s.spawn(move || compile(u, arch, &[]))
                    })
                    .collect();
                jobs.into_iter()
                    .map(|j| {
                        j.join().unwrap_or_else(|_| {
                            Err(Error::invalid("NVRTC compile thread panicked"))
                        })
                    })
                    .collect()
            });
            for ((unit, name, path), c) in to_compile.into_iter().zip(compiled) {
                let c = c?;
                let cubin = c.cubin.ok_or_else(|| {
                    Error::invalid(format!("NVRTC gave no CUBIN for {}", unit.name))
                })?;
                let m = load_image(dev, &cubin)
                    .map_err(|e| Error::invalid(format!("kernels/{}.cu: {e}", unit.name)))?;
                add_functions(&m, unit, &mut funcs)?;
                if let Some(p) = path {
                    store_in_cache(&p, &cubin);
                }
                memory_cache_put(name, &cubin);
                origin.push((unit.name, "nvrtc"));
            }
        }
        Ok(Kernels { funcs, origin })
    }

    /// The function `name` (e.g. `layer_norm_bf16`).
    pub fn get(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs
            .get(name)
            .ok_or_else(|| Error::invalid(format!("CUDA kernel {name} is not loaded")))
    }

    /// "prebuilt" / "cache" / "nvrtc", or "mixed".
    pub fn summary(&self) -> String {
        let mut kinds: Vec<&str> = self.origin.iter().map(|(_, o)| *o).collect();
        kinds.sort();
        kinds.dedup();
        kinds.join("+")
    }
}

fn load_image(dev: &Device, bytes: &[u8]) -> Result<Arc<CudaModule>> {
    dev.context()
        .load_module(Ptx::from_binary(bytes.to_vec()))
        .map_err(|e| dev.err("loading a kernel module", e))
}

fn add_functions(
    module: &Arc<CudaModule>,
    unit: &Unit,
    funcs: &mut HashMap<String, CudaFunction>,
) -> Result<()> {
    for entry in unit.entries() {
        let f = module.load_function(&entry).map_err(|e| {
            Error::invalid(format!(
                "kernels/{}.cu: entry point {entry}: {e:?}",
                unit.name
            ))
        })?;
        funcs.insert(entry, f);
    }
    Ok(())
}

/// Writes a cache file atomically; a failure only costs a recompilation next time.
fn store_in_cache(path: &std::path::Path, bytes: &[u8]) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Grid and block of a kernel launch.
#[derive(Clone, Copy, Debug)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

/// Threads per block of every kernel (`SETAR_BLOCK` in common.cuh).
pub const BLOCK: u32 = 256;
/// Rows per block of the warp-per-row kernels (`SETAR_ROWS_PER_BLOCK`).
pub const ROWS_PER_BLOCK: u64 = (BLOCK / 32) as u64;

impl Launch {
    /// Grid-stride elementwise kernels over `n` elements (`n > 0`).
    pub fn elementwise(n: u64) -> Launch {
        let blocks = n.div_ceil(BLOCK as u64).clamp(1, 1 << 20) as u32;
        Launch {
            grid: (blocks, 1, 1),
            block: (BLOCK, 1, 1),
        }
    }

    /// One warp per row (`rows > 0`).
    pub fn rows(rows: u64) -> Result<Launch> {
        let blocks = rows.div_ceil(ROWS_PER_BLOCK);
        if blocks > u32::MAX as u64 {
            return Err(Error::invalid(format!(
                "{rows} rows is too many for one launch"
            )));
        }
        Ok(Launch {
            grid: (blocks as u32, 1, 1),
            block: (BLOCK, 1, 1),
        })
    }

    /// x over the `dim` columns, y over rows (the kernel loops past 65535 rows).
    pub fn columns_by_rows(rows: u64, dim: u64) -> Launch {
        Launch {
            grid: (
                dim.div_ceil(BLOCK as u64).max(1) as u32,
                rows.clamp(1, 65_535) as u32,
                1,
            ),
            block: (BLOCK, 1, 1),
        }
    }
}

/// A kernel argument, passed by value exactly as the kernel declares it.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// A device pointer (`T*`), 0 for null.
    Ptr(u64),
    /// `int`.
    I32(i32),
    /// `long long`.
    I64(i64),
    /// `float`.
    F32(f32),
}

impl Kernels {
    /// Launches `name` on the device's stream. Launch-configuration errors come back at once;
    /// faults inside the kernel at the next synchronisation.
    pub fn launch(&self, dev: &Device, name: &str, cfg: Launch, args: &[Arg]) -> Result<()> {
        let f = self.get(name)?;
        dev.bind()?;
        // Each argument's value lives in `values` (8-byte slots; a 4-byte argument sits in the
        // low half, which comes first on little-endian x86-64); the kernel gets pointers to them.
        let mut values: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => p,
                Arg::I64(x) => x as u64,
                Arg::I32(x) => x as u32 as u64,
                Arg::F32(x) => x.to_bits() as u64,
            })
            .collect();
        let mut params: Vec<*mut c_void> = values
            .iter_mut()
            .map(|v| v as *mut u64 as *mut c_void)
            .collect();
        // SAFETY: `name` takes exactly these arguments (checked by the per-op wrappers in
        // backend.rs against the kernel signatures); the pointers are live device buffers.
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                cfg.grid,
                cfg.block,
                0,
                dev.stream().cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| dev.err(&format!("launching {name}"), e))
    }
}
