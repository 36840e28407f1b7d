//! One device, one stream, and the memory on it.
//!
//! Everything the backend does is ordered on a single non-blocking stream, so cudarc's
//! per-buffer event tracking is switched off (it would create two events per allocation) and
//! buffers are freed stream-ordered (`cuMemFreeAsync`): a buffer dropped right after a launch
//! that reads it is still valid for that launch. The default memory pool keeps freed memory
//! (release threshold = ∞), like PyTorch's caching allocator, so the many per-op allocations of
//! a forward pass cost no driver round trips after the first one.

use super::{cuda_error, DType};
use crate::error::{Error, Result};
use cudarc::driver::{
    sys, CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError, PinnedHostSlice,
};
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// An error unless the CUDA driver library can be loaded (cudarc would panic on first use).
pub fn require_driver() -> Result<()> {
    // SAFETY: only tries to dlopen the library.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::invalid(
            "no CUDA driver library (libcuda.so) on this machine",
        ))
    }
}

/// An error unless cuBLAS and cuBLASLt can be loaded.
pub fn require_blas() -> Result<()> {
    // SAFETY: only tries to dlopen the libraries.
    let (blas, lt) = unsafe {
        (
            cudarc::cublas::sys::is_culib_present(),
            cudarc::cublaslt::sys::is_culib_present(),
        )
    };
    match (blas, lt) {
        (true, true) => Ok(()),
        _ => Err(Error::invalid(format!(
            "CUDA libraries missing: {}{}(CUDA 13: libcublas.so.13, libcublasLt.so.13; put their folder on LD_LIBRARY_PATH)",
            if blas { "" } else { "cuBLAS " },
            if lt { "" } else { "cuBLASLt " }
        ))),
    }
}

/// The bytes our buffers hold on one device, against an optional limit (`--max-memory`).
/// cuBLAS / cuSOLVER workspaces and the context itself are outside it.
#[derive(Debug)]
struct Budget {
    limit: Option<usize>,
    used: AtomicUsize,
    peak: AtomicUsize,
}

/// A share of the budget, given back when the buffer holding it is dropped.
#[derive(Debug)]
struct Lease {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A typed run of device memory: `len` elements of `dtype`.
#[derive(Debug)]
pub struct DeviceBuffer {
    bytes: CudaSlice<u8>,
    len: usize,
    dtype: DType,
    _lease: Lease,
}

impl DeviceBuffer {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device address (for kernel arguments and cuBLAS).
    pub fn ptr(&self) -> u64 {
        // Event tracking is off: this records nothing and waits for nothing.
        let (ptr, _guard) = self.bytes.device_ptr(self.bytes.stream());
        ptr
    }

    /// The address of element `i`.
    pub fn ptr_at(&self, i: usize) -> u64 {
        self.ptr() + (i * self.dtype.size()) as u64
    }
}

/// Plain values on the device (token ids, row numbers, sequence lengths, f64 work arrays).
#[derive(Debug)]
pub struct IndexBuffer {
    bytes: CudaSlice<u8>,
    _lease: Lease,
}

impl IndexBuffer {
    pub fn ptr(&self) -> u64 {
        let (ptr, _guard) = self.bytes.device_ptr(self.bytes.stream());
        ptr
    }
}

/// The context and stream of one device.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    name: String,
    arch: (i32, i32),
    /// Fill every new buffer with NaN bytes (0xFF) before use: tests see unwritten outputs.
    poison: bool,
    budget: Arc<Budget>,
    /// Page-locked host memory that large copies go through (grown on demand, reused): on
    /// the device machine pageable copies ran at ~1 GB/s. None inside: not available, so
    /// copies stay pageable.
    staging: Mutex<Option<PinnedHostSlice<u8>>>,
}

/// Copies of at least this many bytes go through the staging buffer.
const STAGED: usize = 1 << 20;

impl Device {
    /// Opens `cuda:ordinal`.
    pub fn open(ordinal: usize, poison: bool) -> Result<Device> {
        require_driver()?;
        let what = format!("cuda:{ordinal}");
        let count = CudaContext::device_count().map_err(|e| cuda_error("CUDA", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::invalid(format!(
                "{what}: no such device ({count} CUDA device{} visible)",
                if count == 1 { "" } else { "s" }
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_error(&what, e))?;
        // SAFETY: every buffer of this context lives on the one stream made below, so no
        // cross-stream synchronisation is needed; buffers made before this call: none.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| cuda_error(&what, e))?;
        let name = ctx.name().map_err(|e| cuda_error(&what, e))?;
        let arch = ctx.compute_capability().map_err(|e| cuda_error(&what, e))?;
        if ctx.has_async_alloc() {
            keep_freed_memory(&ctx).map_err(|e| cuda_error(&format!("{what}: memory pool"), e))?;
        }
        Ok(Device {
            ctx,
            stream,
            ordinal,
            name,
            arch,
            poison,
            budget: Arc::new(Budget {
                limit: None,
                used: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
            }),
            staging: Mutex::new(None),
        })
    }

    /// The same device and memory budget with a stream (and staging buffer) of its own: work
    /// queued on it runs beside this one's. Buffers made on either belong to that stream; the
    /// caller orders any sharing between the two.
    pub fn with_new_stream(&self) -> Result<Device> {
        let stream = self.ctx.new_stream().map_err(|e| self.err("stream", e))?;
        Ok(Device {
            ctx: self.ctx.clone(),
            stream,
            ordinal: self.ordinal,
            name: self.name.clone(),
            arch: self.arch,
            poison: self.poison,
            budget: self.budget.clone(),
            staging: Mutex::new(None),
        })
    }

    /// Runs `f` on the first `bytes` of the staging buffer; `None` for small copies or when
    /// page-locked memory cannot be had (the caller then copies from pageable memory).
    fn staged<R>(&self, bytes: usize, f: impl FnOnce(&mut [u8]) -> Result<R>) -> Result<Option<R>> {
        if bytes < STAGED {
            return Ok(None);
        }
        let mut guard = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        if guard.as_ref().is_none_or(|s| s.len() < bytes) {
            *guard = None;
            // SAFETY: the memory is written (uploads) or overwritten by the copy (downloads)
            // before it is read. Flags 0: plain page-locked memory, readable from the host.
            match unsafe {
                self.ctx
                    .alloc_pinned_with_flags::<u8>(bytes.next_power_of_two(), 0)
            } {
                Ok(s) => *guard = Some(s),
                Err(_) => return Ok(None),
            }
        }
        let host = guard
            .as_mut()
            .expect("just made")
            .as_mut_slice()
            .map_err(|e| self.err("staging buffer", e))?;
        f(&mut host[..bytes]).map(Some)
    }

    fn copy_to_host(&self, src: &CudaSlice<u8>, dst: &mut [u8]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        let staged = self.staged(dst.len(), |host| {
            let (ptr, _sync) = src.device_ptr(&self.stream);
            // SAFETY: `host` is page-locked and outlives the copy (we wait for it below); the
            // source holds at least `host.len()` bytes.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(host, ptr, self.stream.cu_stream())
            }
            .map_err(|e| self.err("device → host copy", e))?;
            self.synchronize()?;
            dst.par_chunks_mut(STAGED)
                .zip(host.par_chunks(STAGED))
                .for_each(|(d, h)| d.copy_from_slice(h));
            Ok(())
        })?;
        if staged.is_none() {
            let src = src.slice(..dst.len());
            self.stream
                .memcpy_dtoh(&src, dst)
                .map_err(|e| self.err("device → host copy", e))?;
            self.synchronize()?;
        }
        Ok(())
    }

    /// Caps the bytes our buffers may hold (`--max-memory`); an allocation past it is an
    /// out-of-memory error, as if the device were that small.
    pub fn with_memory_limit(mut self, limit: Option<usize>) -> Device {
        self.budget = Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        });
        self
    }

    /// Bytes our buffers hold now, and at most since the last [`Device::reset_peak`].
    pub fn memory_in_use(&self) -> (usize, usize) {
        (
            self.budget.used.load(Ordering::Relaxed),
            self.budget.peak.load(Ordering::Relaxed),
        )
    }

    pub fn reset_peak(&self) {
        self.budget
            .peak
            .store(self.budget.used.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Reserves `bytes` of the budget, or says why not.
    fn lease(&self, bytes: usize) -> Result<Lease> {
        let b = &self.budget;
        let used = b.used.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let lease = Lease {
            budget: b.clone(),
            bytes,
        };
        if let Some(limit) = b.limit {
            if used > limit {
                drop(lease);
                let mib = |x: usize| x as f64 / (1 << 20) as f64;
                return Err(Error::invalid(format!(
                    "cuda:{}: out of memory: allocating {:.1} MiB would pass the --max-memory budget of {:.1} MiB ({:.1} MiB in use); lower --batch or raise --max-memory",
                    self.ordinal,
                    mib(bytes),
                    mib(limit),
                    mib(used - bytes)
                )));
            }
        }
        b.peak.fetch_max(used, Ordering::Relaxed);
        Ok(lease)
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability, e.g. (9, 0) for an H100 / H200.
    pub fn arch(&self) -> (i32, i32) {
        self.arch
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn err(&self, what: &str, e: DriverError) -> Error {
        cuda_error(&format!("cuda:{} {what}", self.ordinal), e)
    }

    /// Makes this device's context current on the calling thread (cuBLAS and raw launches
    /// need it; cudarc's safe calls do it themselves).
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| self.err("bind", e))
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| self.err("memory info", e))
    }

    /// An uninitialised buffer (NaN-filled when poisoning). Out of memory is an error that
    /// says how much was asked for and how much is free.
    pub fn alloc(&self, len: usize, dtype: DType) -> Result<DeviceBuffer> {
        let bytes = len.checked_mul(dtype.size()).ok_or_else(|| {
            Error::invalid(format!(
                "{len} elements of {dtype} overflow the address space"
            ))
        })?;
        let _lease = self.lease(bytes)?;
        let buf = DeviceBuffer {
            bytes: self.alloc_bytes(bytes)?,
            len,
            dtype,
            _lease,
        };
        if self.poison {
            self.fill_bytes(&buf, 0xFF)?;
        }
        Ok(buf)
    }

    fn alloc_bytes(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        // SAFETY: the memory is uninitialised; every op writes its output before reading it,
        // and poisoning fills it.
        unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(|e| {
            if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                let (free, total) = self.memory().unwrap_or((0, 0));
                Error::invalid(format!(
                    "cuda:{}: out of memory allocating {:.1} MiB ({:.1} of {:.1} MiB free)",
                    self.ordinal,
                    bytes as f64 / (1 << 20) as f64,
                    free as f64 / (1 << 20) as f64,
                    total as f64 / (1 << 20) as f64
                ))
            } else {
                self.err(&format!("allocating {bytes} bytes"), e)
            }
        })
    }

    fn copy_in(&self, dst: &mut CudaSlice<u8>, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        let staged = self.staged(src.len(), |host| {
            host.par_chunks_mut(STAGED)
                .zip(src.par_chunks(STAGED))
                .for_each(|(h, s)| h.copy_from_slice(s));
            self.bind()?;
            let (ptr, _sync) = dst.device_ptr_mut(&self.stream);
            // SAFETY: `host` is page-locked and stays untouched until the copy is done (we
            // wait for it: the buffer is reused by the next copy).
            unsafe {
                cudarc::driver::result::memcpy_htod_async(ptr, host, self.stream.cu_stream())
            }
            .map_err(|e| self.err("host → device copy", e))?;
            self.synchronize()
        })?;
        if staged.is_none() {
            let mut dst = dst.slice_mut(..src.len());
            self.stream
                .memcpy_htod(src, &mut dst)
                .map_err(|e| self.err("host → device copy", e))?;
        }
        Ok(())
    }

    /// Copies indices (token ids, row numbers, lengths) to the device.
    pub fn upload_indices<T: bytemuck::Pod>(&self, data: &[T]) -> Result<IndexBuffer> {
        let src: &[u8] = bytemuck::cast_slice(data);
        let mut buf = self.alloc_raw(src.len())?;
        self.copy_in(&mut buf.bytes, src)?;
        Ok(buf)
    }

    /// `bytes` of uninitialised plain memory (f64 work arrays of cuSOLVER, kernel results).
    pub fn alloc_raw(&self, bytes: usize) -> Result<IndexBuffer> {
        let _lease = self.lease(bytes)?;
        Ok(IndexBuffer {
            bytes: self.alloc_bytes(bytes)?,
            _lease,
        })
    }

    /// The first `len` values of a plain buffer (waits for the stream).
    pub fn download_raw<T: bytemuck::Pod + Default>(
        &self,
        buf: &IndexBuffer,
        len: usize,
    ) -> Result<Vec<T>> {
        let mut out = vec![T::default(); len];
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
        if dst.len() > buf.bytes.len() {
            return Err(Error::invalid(format!(
                "download: {} bytes from a buffer of {}",
                dst.len(),
                buf.bytes.len()
            )));
        }
        self.copy_to_host(&buf.bytes, dst)?;
        self.synchronize()?;
        Ok(out)
    }

    /// Copies `src` into `dst` (same dtype and length), stream-ordered.
    pub fn copy(&self, src: &DeviceBuffer, dst: &DeviceBuffer) -> Result<()> {
        if src.len != dst.len {
            return Err(Error::invalid(format!(
                "device copy: {} {} into {} {}",
                src.len, src.dtype, dst.len, dst.dtype
            )));
        }
        self.copy_at(src, dst, 0)
    }

    /// Copies all of `src` into `dst` from element `at` on (same dtype), stream-ordered.
    pub fn copy_at(&self, src: &DeviceBuffer, dst: &DeviceBuffer, at: usize) -> Result<()> {
        if src.dtype != dst.dtype || at + src.len > dst.len {
            return Err(Error::invalid(format!(
                "device copy: {} {} into {} {} at {at}",
                src.len, src.dtype, dst.len, dst.dtype
            )));
        }
        let bytes = src.len * src.dtype.size();
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both ranges lie inside live allocations (checked above); ordered on our
        // stream.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                dst.ptr_at(at),
                src.ptr(),
                bytes,
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| self.err("device → device copy", e))
    }

    /// Sets every byte of `buf` to `value` (0xFF makes NaNs of every float type).
    pub fn fill_bytes(&self, buf: &DeviceBuffer, value: u8) -> Result<()> {
        self.bind()?;
        // SAFETY: the range is inside the allocation; ordered on our stream.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                buf.ptr(),
                value,
                buf.len * buf.dtype.size(),
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| self.err("memset", e))
    }

    /// Copies plain host values (f32, i32, i64, u32, …) into a new buffer of `dtype`, whose
    /// element size must be the host type's.
    pub fn upload<T: bytemuck::Pod>(&self, data: &[T], dtype: DType) -> Result<DeviceBuffer> {
        if std::mem::size_of::<T>() != dtype.size() {
            return Err(Error::invalid(format!(
                "upload: {}-byte host values into {dtype}",
                std::mem::size_of::<T>()
            )));
        }
        let mut buf = self.alloc(data.len(), dtype)?;
        self.copy_in(&mut buf.bytes, bytemuck::cast_slice(data))?;
        Ok(buf)
    }

    /// Copies a buffer back into host values of the same element size (waits for the stream).
    pub fn download<T: bytemuck::Pod + Default>(&self, buf: &DeviceBuffer) -> Result<Vec<T>> {
        if std::mem::size_of::<T>() != buf.dtype.size() {
            return Err(Error::invalid(format!(
                "download: {} into {}-byte host values",
                buf.dtype,
                std::mem::size_of::<T>()
            )));
        }
        let mut out = vec![T::default(); buf.len];
        self.copy_to_host(&buf.bytes, bytemuck::cast_slice_mut(&mut out))?;
        self.synchronize()?;
        Ok(out)
    }

    /// Waits for all queued work; reports any error a kernel or copy left behind.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| self.err("synchronize", e))?;
        self.ctx
            .check_err()
            .map_err(|e| self.err("deferred error", e))
    }
}

/// Keeps freed memory in the default pool instead of returning it to the driver at each
/// synchronisation.
fn keep_freed_memory(ctx: &CudaContext) -> std::result::Result<(), DriverError> {
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: plain driver queries on a valid device; `threshold` outlives the call.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()?;
        let mut threshold: u64 = u64::MAX;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )
        .result()
    }
}
