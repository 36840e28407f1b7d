//! Thin SVDs of weight matrices on the device, in f64, through cuBLAS and cuSOLVER.
//!
//! For W `[out, in]` with k = min(out, in): the Gram matrix of the short side (G = WᵀW when
//! in ≤ out, else WWᵀ; k × k) by one strided-batched DGEMM per group of equal shapes, its
//! eigen-decomposition by one `cusolverDnXsyevBatched` per group (or `cusolverDnDsyevd` per
//! matrix; [`EigPath`]) (G = Q Λ Qᵀ, so Q holds the singular vectors of that side and σ = √λ), and the other side's vectors times σ by one more DGEMM (W·vᵢ = σᵢuᵢ,
//! Wᵀ·uᵢ = σᵢvᵢ). The search only ever uses σᵢuᵢ and vᵢ together (W' = W − Σ σᵢuᵢvᵢᵀ), and
//! σᵢuᵢ = W·vᵢ is exact whatever the accuracy of a tiny σᵢ; in f64 the squared condition
//! number costs nothing measurable on CLIP's weights (tests/cuda.rs compares with faer).

use super::device::{Device, IndexBuffer};
use crate::error::{Error, Result};
use crate::lowrank::Svd;
use cudarc::cublas::sys as blas_sys;
use cudarc::cusolver::sys as solver_sys;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::time::Instant;

fn solver_err(what: &str, status: solver_sys::cusolverStatus_t) -> Error {
    Error::invalid(format!("cuSOLVER {what}: {status:?}"))
}

fn blas_err(what: &str, status: blas_sys::cublasStatus_t) -> Error {
    Error::invalid(format!("cuBLAS {what}: {status:?}"))
}

/// An error unless cuSOLVER can be loaded (cudarc would panic on first use).
pub fn require_cusolver() -> Result<()> {
    // SAFETY: only tries to dlopen the library.
    if unsafe { solver_sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::invalid(
            "cuSOLVER missing (CUDA 13: libcusolver.so.12; put its folder on LD_LIBRARY_PATH)",
        ))
    }
}

/// How the Gram matrices' eigen-decompositions run (`SETAR_CUDA_EIG`). Each is cuSOLVER in
/// f64 on the same matrices; they differ in how the matrices of a group share the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EigPath {
    /// `cusolverDnDsyevd`, one matrix after another on the device's stream (`seq`).
    Sequential,
    /// `cusolverDnXsyevBatched`, one call per group of equal shapes (`batched`).
    Batched,
}

/// cuBLAS and cuSOLVER handles on the device's stream, destroyed on drop.
struct Handles {
    blas: blas_sys::cublasHandle_t,
    solver: solver_sys::cusolverDnHandle_t,
}

impl Handles {
    fn new(dev: &Device) -> Result<Handles> {
        require_cusolver()?;
        dev.bind()?;
        let mut h = Handles {
            blas: std::ptr::null_mut(),
            solver: std::ptr::null_mut(),
        };
        // SAFETY: out-pointers into `h` (whose Drop frees what was made); the stream belongs
        // to the bound context.
        unsafe {
            let s = blas_sys::cublasCreate_v2(&mut h.blas);
            if s != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(blas_err("create", s));
            }
            let s = solver_sys::cusolverDnCreate(&mut h.solver);
            if s != solver_sys::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
                return Err(solver_err("create", s));
            }
            let stream = dev.stream().cu_stream();
            let s = blas_sys::cublasSetStream_v2(h.blas, stream as _);
            if s != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(blas_err("set stream", s));
            }
            let s = solver_sys::cusolverDnSetStream(h.solver, stream as _);
            if s != solver_sys::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
                return Err(solver_err("set stream", s));
            }
        }
        Ok(h)
    }
}

impl Drop for Handles {
    fn drop(&mut self) {
        // SAFETY: created in `new`, used by nothing else.
        unsafe {
            if !self.solver.is_null() {
                solver_sys::cusolverDnDestroy(self.solver);
            }
            if !self.blas.is_null() {
                blas_sys::cublasDestroy_v2(self.blas);
            }
        }
    }
}

fn int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(format!("SVD: {what} = {v} is too large")))
}

/// Column-major DGEMM `C (m × n) = op(A) · op(B)` (alpha 1, beta 0), `batch` times with
/// strides (in elements).
#[allow(clippy::too_many_arguments)]
fn dgemm(
    h: &Handles,
    (ta, tb): (bool, bool),
    (m, n, k): (usize, usize, usize),
    (a, lda, sa): (u64, usize, usize),
    (b, ldb, sb): (u64, usize, usize),
    (c, ldc, sc): (u64, usize, usize),
    batch: usize,
) -> Result<()> {
    let op = |t: bool| {
        if t {
            blas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            blas_sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let (one, zero) = (1.0f64, 0.0f64);
    // SAFETY: the pointers and strides describe ranges inside live device buffers.
    let s = unsafe {
        blas_sys::cublasDgemmStridedBatched(
            h.blas,
            op(ta),
            op(tb),
            int("m", m)?,
            int("n", n)?,
            int("k", k)?,
            &one,
            a as *const f64,
            int("lda", lda)?,
            sa as i64,
            b as *const f64,
            int("ldb", ldb)?,
            sb as i64,
            &zero,
            c as *mut f64,
            int("ldc", ldc)?,
            sc as i64,
            int("batch", batch)?,
        )
    };
    if s != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Err(blas_err(&format!("DGEMM {m}x{n}x{k} x{batch}"), s));
    }
    Ok(())
}

/// Runs [`thin_svds`] once on two small square matrices (the Gram sizes of ViT-B/16's
/// `mlp.fc1` targets), on a stream and a host thread of their own, and returns at once: the
/// cuSOLVER library and the kernels of the f64 GEMMs and of the eigen path are brought into
/// the context while the caller loads the model and reads the images, not inside the search.
/// Best effort: a failure here is dropped (the search's own calls report theirs).
pub fn start_warm_up(dev: &Device, eig_path: EigPath) -> std::thread::JoinHandle<()> {
    let side = dev.with_new_stream();
    std::thread::spawn(move || {
        let Ok(side) = side else { return };
        if side.bind().is_err() {
            return;
        }
        let mats: Vec<(Vec<f32>, usize)> = [768usize, 512]
            .iter()
            .map(|&n| {
                // Symmetric and well conditioned: 2 on the diagonal, small values elsewhere.
                let m = (0..n * n)
                    .map(|i| {
                        let (r, c) = (i / n, i % n);
                        if r == c {
                            2.0
                        } else {
                            ((r + c) % 7) as f32 * 1e-3
                        }
                    })
                    .collect();
                (m, n)
            })
            .collect();
        let args: Vec<(&[f32], usize, usize)> =
            mats.iter().map(|(m, n)| (m.as_slice(), *n, *n)).collect();
        let _ = thin_svds(&side, &args, eig_path, &mut Phases::new(&side, false));
        let _ = side.synchronize();
    })
}

/// Wall time per phase of [`thin_svds`], the device synchronised at each boundary; off (no
/// synchronisation, nothing kept) unless profiling.
pub struct Phases<'a> {
    dev: &'a Device,
    last: Option<Instant>,
    /// Seconds per phase, summed over the shape groups.
    pub seconds: BTreeMap<&'static str, f64>,
}

impl<'a> Phases<'a> {
    pub fn new(dev: &'a Device, on: bool) -> Phases<'a> {
        Phases {
            dev,
            last: on.then(Instant::now),
            seconds: BTreeMap::new(),
        }
    }

    /// Ends phase `name` (the time since the previous boundary).
    fn mark(&mut self, name: &'static str) -> Result<()> {
        if let Some(last) = self.last {
            self.dev.synchronize()?;
            let now = Instant::now();
            *self.seconds.entry(name).or_default() += (now - last).as_secs_f64();
            self.last = Some(now);
        }
        Ok(())
    }
}

/// Thin SVDs of row-major `[out, in]` f32 weights (each as [`Svd::new`] gives: singular values
/// descending, `u [out, k]`, `v [in, k]` row-major), timing the phases into `phases`.
pub fn thin_svds(
    dev: &Device,
    mats: &[(&[f32], usize, usize)],
    eig_path: EigPath,
    phases: &mut Phases,
) -> Result<Vec<Svd>> {
    for (i, (w, o, n)) in mats.iter().enumerate() {
        if w.len() != o * n || *o == 0 || *n == 0 {
            return Err(Error::invalid(format!(
                "SVD {i}: {} values for [{o}, {n}]",
                w.len()
            )));
        }
    }
    let h = Handles::new(dev)?;
    // Groups of equal shape share one DGEMM launch for the Gram matrices and one for the
    // other side's vectors.
    let mut groups: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
    for (i, (_, o, n)) in mats.iter().enumerate() {
        groups.entry((*o, *n)).or_default().push(i);
    }
    let mut out: Vec<Option<Svd>> = (0..mats.len()).map(|_| None).collect();
    for ((o, n), members) in groups {
        let svds = group(dev, &h, mats, &members, (o, n), eig_path, phases)?;
        for (i, s) in members.into_iter().zip(svds) {
            out[i] = Some(s);
        }
    }
    Ok(out.into_iter().map(|s| s.expect("every matrix")).collect())
}

/// The SVDs of `members` of `mats`, all `[o, n]`.
fn group(
    dev: &Device,
    h: &Handles,
    mats: &[(&[f32], usize, usize)],
    members: &[usize],
    (o, n): (usize, usize),
    eig_path: EigPath,
    phases: &mut Phases,
) -> Result<Vec<Svd>> {
    let b = members.len();
    let k = o.min(n);
    let wide = o < n; // Gram of the rows (W Wᵀ, out × out) instead of the columns.
    let mut host = vec![0f64; b * o * n];
    host.par_chunks_mut(o * n)
        .zip(members)
        .for_each(|(dst, &i)| {
            dst.iter_mut()
                .zip(mats[i].0)
                .for_each(|(d, &x)| *d = x as f64)
        });
    let w = dev.upload_indices(&host)?;
    phases.mark("svd: f64 copy + upload")?;
    let gram = dev.alloc_raw(b * k * k * 8)?;
    // The row-major [o, n] W is the column-major M = Wᵀ (n × o), ld n.
    let (wp, gp) = (w.ptr(), gram.ptr());
    if wide {
        // W Wᵀ = Mᵀ M (o × o).
        dgemm(
            h,
            (true, false),
            (o, o, n),
            (wp, n, o * n),
            (wp, n, o * n),
            (gp, o, o * o),
            b,
        )?;
    } else {
        // Wᵀ W = M Mᵀ (n × n).
        dgemm(
            h,
            (false, true),
            (n, n, o),
            (wp, n, o * n),
            (wp, n, o * n),
            (gp, n, n * n),
            b,
        )?;
    }
    phases.mark("svd: Gram DGEMM")?;
    let eig = dev.alloc_raw(b * k * 8)?;
    let info = dev.alloc_raw(b * 4)?;
    match eig_path {
        EigPath::Sequential => syevd(dev, h, &gram, &eig, &info, k, b)?,
        EigPath::Batched => syev_batched(dev, h, &gram, &eig, &info, k, b)?,
    }
    check_info(dev, &info, k, b)?;
    phases.mark("svd: eigen-decomposition")?;
    // The other side times σ: W·Q (o × k, for Q = V) or Wᵀ·Q (n × k, for Q = U), column-major.
    let other_dim = if wide { n } else { o };
    let other = dev.alloc_raw(b * other_dim * k * 8)?;
    let op = other.ptr();
    if wide {
        // Wᵀ Q = M Q: (n × o)·(o × k).
        dgemm(
            h,
            (false, false),
            (n, k, o),
            (wp, n, o * n),
            (gp, o, k * k),
            (op, n, n * k),
            b,
        )?;
    } else {
        // W Q = Mᵀ Q: (o × n)·(n × k).
        dgemm(
            h,
            (true, false),
            (o, k, n),
            (wp, n, o * n),
            (gp, n, k * k),
            (op, o, o * k),
            b,
        )?;
    }
    phases.mark("svd: other side DGEMM")?;
    let q: Vec<f64> = dev.download_raw(&gram, b * k * k)?;
    let lambda: Vec<f64> = dev.download_raw(&eig, b * k)?;
    let scaled: Vec<f64> = dev.download_raw(&other, b * other_dim * k)?;
    phases.mark("svd: download")?;
    // Assemble each matrix's factors (in parallel: the writes are column-wise).
    let svds = (0..b)
        .into_par_iter()
        .map(|j| {
            let q = &q[j * k * k..(j + 1) * k * k];
            let lambda = &lambda[j * k..(j + 1) * k];
            let scaled = &scaled[j * other_dim * k..(j + 1) * other_dim * k];
            let mut svd = Svd {
                out_dim: o,
                in_dim: n,
                u: vec![0.0; o * k],
                s: vec![0.0; k],
                v: vec![0.0; n * k],
            };
            // syevd's eigenvalues ascend: component c of the SVD is eigenpair k − 1 − c.
            for c in 0..k {
                let e = k - 1 - c;
                let sigma = lambda[e].max(0.0).sqrt();
                svd.s[c] = sigma;
                let inv = if sigma > 0.0 { 1.0 / sigma } else { 0.0 };
                let (q_side, other_side, q_rows, other_rows) = if wide {
                    (&mut svd.u, &mut svd.v, o, n)
                } else {
                    (&mut svd.v, &mut svd.u, n, o)
                };
                for r in 0..q_rows {
                    q_side[r * k + c] = q[e * q_rows + r];
                }
                for r in 0..other_rows {
                    other_side[r * k + c] = scaled[e * other_rows + r] * inv;
                }
            }
            svd
        })
        .collect();
    phases.mark("svd: assemble on the host")?;
    Ok(svds)
}

/// `cusolverDnDsyevd`'s device workspace for `k × k` matrices, in f64 elements.
fn syevd_lwork(
    h: solver_sys::cusolverDnHandle_t,
    gram: &IndexBuffer,
    eig: &IndexBuffer,
    k: usize,
) -> Result<usize> {
    let n = int("k", k)?;
    let mut lwork = 0i32;
    // SAFETY: a size query on live buffers.
    let s = unsafe {
        solver_sys::cusolverDnDsyevd_bufferSize(
            h,
            solver_sys::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR,
            solver_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
            n,
            gram.ptr() as *const f64,
            n,
            eig.ptr() as *const f64,
            &mut lwork,
        )
    };
    if s != solver_sys::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
        return Err(solver_err("Dsyevd buffer size", s));
    }
    Ok(lwork.max(1) as usize)
}

/// `cusolverDnDsyevd` on matrix `j` of `gram` (its eigenvalues into slot `j` of `eig`).
#[allow(clippy::too_many_arguments)]
fn syevd_one(
    h: solver_sys::cusolverDnHandle_t,
    gram: &IndexBuffer,
    eig: &IndexBuffer,
    info: &IndexBuffer,
    work: &IndexBuffer,
    lwork: usize,
    k: usize,
    j: usize,
) -> Result<()> {
    let n = int("k", k)?;
    // SAFETY: matrix j, its eigenvalues and its info slot lie inside the buffers; the
    // workspace holds `lwork` f64.
    let s = unsafe {
        solver_sys::cusolverDnDsyevd(
            h,
            solver_sys::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR,
            solver_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
            n,
            (gram.ptr() + (j * k * k * 8) as u64) as *mut f64,
            n,
            (eig.ptr() + (j * k * 8) as u64) as *mut f64,
            work.ptr() as *mut f64,
            int("lwork", lwork)?,
            (info.ptr() + (j * 4) as u64) as *mut i32,
        )
    };
    if s != solver_sys::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
        return Err(solver_err(&format!("Dsyevd {k}x{k}"), s));
    }
    Ok(())
}

/// In place, each of `batch` column-major `k × k` symmetric matrices → its eigenvectors
/// (columns), eigenvalues ascending into `eig`, one after another on the device's stream.
fn syevd(
    dev: &Device,
    h: &Handles,
    gram: &IndexBuffer,
    eig: &IndexBuffer,
    info: &IndexBuffer,
    k: usize,
    batch: usize,
) -> Result<()> {
    let lwork = syevd_lwork(h.solver, gram, eig, k)?;
    let work = dev.alloc_raw(lwork * 8)?;
    for j in 0..batch {
        syevd_one(h.solver, gram, eig, info, &work, lwork, k, j)?;
    }
    Ok(())
}

/// As [`syevd`], by one `cusolverDnXsyevBatched` call for the whole group.
fn syev_batched(
    dev: &Device,
    h: &Handles,
    gram: &IndexBuffer,
    eig: &IndexBuffer,
    info: &IndexBuffer,
    k: usize,
    batch: usize,
) -> Result<()> {
    use solver_sys::cudaDataType::CUDA_R_64F;
    let jobz = solver_sys::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR;
    let uplo = solver_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
    let (n, nb) = (k as i64, batch as i64);
    let mut params: solver_sys::cusolverDnParams_t = std::ptr::null_mut();
    // SAFETY: an out-pointer; destroyed below on every path.
    let s = unsafe { solver_sys::cusolverDnCreateParams(&mut params) };
    if s != solver_sys::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
        return Err(solver_err("params", s));
    }
    let run = || -> Result<()> {
        let (mut dev_bytes, mut host_bytes) = (0usize, 0usize);
        // SAFETY: a size query on live buffers.
        let s = unsafe {
            solver_sys::cusolverDnXsyevBatched_bufferSize(
                h.solver,
                params,
                jobz,
                uplo,
                n,
                CUDA_R_64F,
                gram.ptr() as *const c_void,
                n,
                CUDA_R_64F,
                eig.ptr() as *const c_void,
                CUDA_R_64F,
                &mut dev_bytes,
                &mut host_bytes,
                nb,
            )
        };
        if s != solver_sys::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
            return Err(solver_err("XsyevBatched buffer size", s));
        }
        let work = dev.alloc_raw(dev_bytes.max(1))?;
        let mut host_work = vec![0u8; host_bytes.max(1)];
        // SAFETY: the buffers hold `batch` matrices, eigenvalue vectors and info slots; the
        // workspaces have the sizes cuSOLVER asked for.
        let s = unsafe {
            solver_sys::cusolverDnXsyevBatched(
                h.solver,
                params,
                jobz,
                uplo,
                n,
                CUDA_R_64F,
                gram.ptr() as *mut c_void,
                n,
                CUDA_R_64F,
                eig.ptr() as *mut c_void,
                CUDA_R_64F,
                work.ptr() as *mut c_void,
                dev_bytes,
                host_work.as_mut_ptr() as *mut c_void,
                host_bytes,
                info.ptr() as *mut i32,
                nb,
            )
        };
        if s != solver_sys::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
            return Err(solver_err(&format!("XsyevBatched {k}x{k} x{batch}"), s));
        }
        // The host workspace may be used until the call's work is done.
        dev.synchronize()
    };
    let result = run();
    // SAFETY: created above, destroyed once.
    unsafe { solver_sys::cusolverDnDestroyParams(params) };
    result
}

/// An error naming the first matrix whose eigen-decomposition did not converge.
fn check_info(dev: &Device, info: &IndexBuffer, k: usize, batch: usize) -> Result<()> {
    let info: Vec<i32> = dev.download_raw(info, batch)?;
    if let Some((j, i)) = info.iter().enumerate().find(|(_, &i)| i != 0) {
        return Err(Error::invalid(format!(
            "cuSOLVER eigen-decomposition of matrix {j} of a {k}x{k} group: info {i} (did not converge)"
        )));
    }
    Ok(())
}
