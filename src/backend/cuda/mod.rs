//! The CUDA backend (feature `cuda`), through cudarc with dynamic loading so it builds on
//! machines without CUDA: nothing CUDA is needed to compile, and a missing driver or library
//! is an `Error` at run time, never a panic.
//!
//! One idea per file:
//! - [`device`]: the context, the stream and device memory ([`DeviceBuffer`]);
//! - [`kernels`]: our CUDA C kernels (`kernels/*.cu`): prebuilt by `build.rs` when nvcc was
//!   there, else compiled by NVRTC at run time (cached on disk);
//! - [`gemm`]: every matrix product through cuBLASLt / cuBLAS (f32, or bf16 / f16 with f32
//!   accumulation; strided-batched for attention);
//! - [`svd`]: thin SVDs of weights in f64 through cuBLAS + cuSOLVER (Gram + `Dsyevd`);
//! - [`backend`]: [`CudaBackend`], the [`crate::backend::Backend`] implementation.
//!
//! ```no_run
//! use setar_engine::backend::cuda::{CudaBackend, DType};
//! let backend = CudaBackend::new(0, DType::BF16)?; // cuda:0, bf16 storage, f32 accumulation
//! # Ok::<(), setar_engine::Error>(())
//! ```

pub mod backend;
pub mod device;
pub mod gemm;
pub mod kernels;
pub mod svd;

pub use backend::{AttentionPath, CudaBackend, CudaOptions, CudaTensor};
pub use device::{Device, DeviceBuffer};
pub use gemm::GemmPath;
pub use svd::EigPath;

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// How tensors and weights are stored on the device. Arithmetic inside kernels and GEMM
/// accumulation is always f32; the host side always speaks f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub const ALL: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The suffix of the kernels for this type (`layer_norm_bf16`), also its CLI name.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = Error;
    /// `f32|bf16|f16` (also `fp32`, `float32`, `bfloat16`, `fp16`, `float16`, `half`).
    fn from_str(s: &str) -> Result<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
            _ => Err(Error::invalid(format!(
                "unknown dtype \"{s}\" (f32, bf16, f16)"
            ))),
        }
    }
}

/// The device ordinal of a `--device` value: `cuda` → 0, `cuda:N` → N.
pub fn ordinal_of(device: &str) -> Result<usize> {
    match device.strip_prefix("cuda") {
        Some("") => Ok(0),
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Error::invalid(format!("bad CUDA device \"{device}\" (cuda, cuda:N)"))),
        None => Err(Error::invalid(format!(
            "\"{device}\" is not a CUDA device (cuda, cuda:N)"
        ))),
    }
}

/// Names of the visible CUDA devices, or an error saying why there are none.
pub fn devices() -> Result<Vec<String>> {
    device::require_driver()?;
    let count = cudarc::driver::CudaContext::device_count().map_err(|e| cuda_error("CUDA", e))?;
    (0..count as usize)
        .map(|i| {
            let ctx = cudarc::driver::CudaContext::new(i)
                .map_err(|e| cuda_error(&format!("CUDA device {i}"), e))?;
            let name = ctx
                .name()
                .map_err(|e| cuda_error(&format!("CUDA device {i}"), e))?;
            let (major, minor) = ctx
                .compute_capability()
                .map_err(|e| cuda_error(&format!("CUDA device {i}"), e))?;
            Ok(format!("cuda:{i} {name} (sm_{major}{minor})"))
        })
        .collect()
}

/// `what: <driver error name>: <its description>`.
pub(crate) fn cuda_error(what: &str, e: cudarc::driver::DriverError) -> Error {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Error::invalid(format!("{what}: {name}: {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_and_devices_parse() {
        assert_eq!("bf16".parse::<DType>().unwrap(), DType::BF16);
        assert_eq!("FP16".parse::<DType>().unwrap(), DType::F16);
        assert_eq!("float32".parse::<DType>().unwrap(), DType::F32);
        assert!("int8".parse::<DType>().is_err());
        assert_eq!(ordinal_of("cuda").unwrap(), 0);
        assert_eq!(ordinal_of("cuda:3").unwrap(), 3);
        assert!(ordinal_of("cuda:x").is_err());
        assert!(ordinal_of("cpu").is_err());
    }
}
