//! The CUDA backend (feature `cuda`), through cudarc with dynamic loading so it builds on
//! machines without CUDA. So far: device discovery; the kernels and the `Backend`
//! implementation come with the CUDA engine issue.

use crate::error::{Error, Result};

/// Names of the visible CUDA devices, or an error saying why there are none.
pub fn devices() -> Result<Vec<String>> {
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::invalid(
            "no CUDA driver library (libcuda.so) on this machine",
        ));
    }
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| Error::invalid(format!("CUDA: {e}")))?;
    (0..count as usize)
        .map(|i| {
            let ctx = cudarc::driver::CudaContext::new(i)
                .map_err(|e| Error::invalid(format!("CUDA device {i}: {e}")))?;
            let name = ctx
                .name()
                .map_err(|e| Error::invalid(format!("CUDA device {i}: {e}")))?;
            let (major, minor) = ctx
                .compute_capability()
                .map_err(|e| Error::invalid(format!("CUDA device {i}: {e}")))?;
            Ok(format!("cuda:{i} {name} (sm_{major}{minor})"))
        })
        .collect()
}
