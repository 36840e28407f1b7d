//! Every matrix product, through cuBLASLt and cuBLAS. Operands are in the storage dtype
//! (f32, bf16 or f16); accumulation and scaling are always f32 (`CUBLAS_COMPUTE_32F`, no TF32,
//! so f32 results match the CPU to ~1e-6).
//!
//! Row-major vs column-major: cuBLAS is column-major, and a row-major `[r, c]` matrix with row
//! stride `ld` is the same memory as a column-major `c × r` matrix with leading dimension `ld`.
//! So the row-major `Y[rows, out] = X[rows, in] · W[out, in]ᵀ` is the column-major
//! `Y' (out × rows) = op(W') · X'` with `W'` = W seen as `in × out` (ld = in) and op = transpose:
//! `m = out, n = rows, k = in, transa = T, transb = N, lda = ldb = in, ldc = out`.

use super::device::{Device, DeviceBuffer};
use super::DType;
use crate::error::{Error, Result};
use cudarc::cublas::{result as blas_result, sys as blas_sys};
use cudarc::cublaslt::{result as lt_result, sys as lt_sys};
use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::sync::Mutex;

mod tune;
pub use tune::TuneRecord;

/// Which library runs [`Gemm::linear`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GemmPath {
    /// cuBLASLt with the bias fused into the epilogue; cuBLAS when cuBLASLt finds no algorithm.
    #[default]
    Auto,
    /// cuBLASLt only (an error when it finds no algorithm).
    Lt,
    /// cuBLAS `cublasGemmEx`, the bias added by our kernel afterwards.
    Blas,
}

fn blas_type(d: DType) -> blas_sys::cudaDataType {
    match d {
        DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
    }
}

fn lt_type(d: DType) -> lt_sys::cudaDataType {
    match d {
        DType::F32 => lt_sys::cudaDataType::CUDA_R_32F,
        DType::BF16 => lt_sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => lt_sys::cudaDataType::CUDA_R_16F,
    }
}

fn op(transpose: bool) -> blas_sys::cublasOperation_t {
    if transpose {
        blas_sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        blas_sys::cublasOperation_t::CUBLAS_OP_N
    }
}

/// The largest power of two (≤ 256) dividing a device address: cuBLASLt's alignment hint.
fn alignment(ptr: u64) -> u32 {
    1u32 << ptr.trailing_zeros().min(8)
}

fn int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(format!("GEMM {what} = {v} exceeds i32")))
}

fn lt_err(what: &str, e: lt_result::CublasError) -> Error {
    Error::invalid(format!("cuBLASLt {what}: {:?}", e.0))
}

fn blas_err(what: &str, e: blas_result::CublasError) -> Error {
    Error::invalid(format!("cuBLAS {what}: {:?}", e.0))
}

/// One strided-batched product `C_i = alpha · op(A_i) · op(B_i) + beta · C_i`, i < batch,
/// column-major, with `X_i = X + i · stride_x` (elements).
#[derive(Clone, Copy, Debug)]
pub struct Batched {
    pub transa: bool,
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub a: u64,
    pub a_type: DType,
    pub lda: usize,
    pub stride_a: usize,
    pub b: u64,
    pub b_type: DType,
    pub ldb: usize,
    pub stride_b: usize,
    pub beta: f32,
    pub c: u64,
    pub c_type: DType,
    pub ldc: usize,
    pub stride_c: usize,
    pub batch: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PlanKey {
    m: u64,
    n: u64,
    k: u64,
    /// The operands' dtype (A and B).
    dtype: DType,
    /// The output's dtype (C and D, and the bias).
    out: DType,
    bias: bool,
    /// beta ≠ 0 (adds into the output): tuned apart from the same shape with beta = 0.
    accumulate: bool,
    align: [u32; 3],
}

/// A cuBLASLt matmul description, its layouts and the algorithm the heuristic chose.
struct Plan {
    desc: lt_sys::cublasLtMatmulDesc_t,
    a: lt_sys::cublasLtMatrixLayout_t,
    b: lt_sys::cublasLtMatrixLayout_t,
    c: lt_sys::cublasLtMatrixLayout_t,
    algo: lt_sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created once and is destroyed once; errors are ignored.
        unsafe {
            for layout in [self.a, self.b, self.c] {
                if !layout.is_null() {
                    let _ = lt_result::destroy_matrix_layout(layout);
                }
            }
            let _ = lt_result::destroy_matmul_desc(self.desc);
        }
    }
}

struct Handles {
    blas: blas_sys::cublasHandle_t,
    lt: lt_sys::cublasLtHandle_t,
    workspace: DeviceBuffer,
    plans: HashMap<PlanKey, Plan>,
    /// Problems cuBLASLt has no algorithm for (asked once; then straight to cuBLAS).
    no_plan: HashSet<PlanKey>,
    /// Time cuBLASLt's first few algorithms on each new problem and keep the fastest
    /// (`CudaOptions::gemm_tune`), instead of the heuristic's first.
    tune: bool,
    /// What tuning found, one record per problem tuned.
    tuned: Vec<TuneRecord>,
}

// SAFETY: the handles are only used under the Mutex in `Gemm`, with the context bound.
unsafe impl Send for Handles {}

impl Drop for Handles {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created in `Gemm::new`, destroyed once; errors are ignored.
        unsafe {
            let _ = blas_result::destroy_handle(self.blas);
            let _ = lt_result::destroy_handle(self.lt);
        }
    }
}

/// cuBLAS and cuBLASLt handles bound to the device's stream, and cached cuBLASLt plans.
pub struct Gemm {
    inner: Mutex<Handles>,
    path: GemmPath,
}

/// cuBLASLt workspace: 32 MiB, what NVIDIA recommends for Hopper.
const WORKSPACE: usize = 32 << 20;

impl Gemm {
    pub fn new(dev: &Device, path: GemmPath, tune: bool) -> Result<Gemm> {
        super::device::require_blas()?;
        dev.bind()?;
        let blas = blas_result::create_handle().map_err(|e| blas_err("create", e))?;
        let lt = match lt_result::create_handle() {
            Ok(h) => h,
            Err(e) => {
                // SAFETY: just created.
                let _ = unsafe { blas_result::destroy_handle(blas) };
                return Err(lt_err("create", e));
            }
        };
        let workspace = match dev.alloc(WORKSPACE / 4, DType::F32) {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: just created.
                unsafe {
                    let _ = blas_result::destroy_handle(blas);
                    let _ = lt_result::destroy_handle(lt);
                }
                return Err(e);
            }
        };
        let handles = Handles {
            blas,
            lt,
            workspace,
            plans: HashMap::new(),
            no_plan: HashSet::new(),
            tune,
            tuned: Vec::new(),
        };
        // SAFETY: valid handle and stream of this context.
        unsafe { blas_result::set_stream(handles.blas, dev.stream().cu_stream() as _) }
            .map_err(|e| blas_err("set stream", e))?;
        Ok(Gemm {
            inner: Mutex::new(handles),
            path,
        })
    }

    pub fn path(&self) -> GemmPath {
        self.path
    }

    /// The problems tuned so far and what was measured (empty unless tuning is on).
    pub fn tune_records(&self) -> Vec<TuneRecord> {
        self.lock().tuned.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Handles> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `out[rows, out_dim] = x[rows, in_dim] · w[out_dim, in_dim]ᵀ (+ bias)`, all in `dtype`,
    /// through this Gemm's path. Returns whether the bias was applied (on the cuBLAS path the
    /// caller adds it).
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        dev: &Device,
        x: u64,
        rows: usize,
        w: u64,
        bias: Option<u64>,
        out: u64,
        out_dim: usize,
        in_dim: usize,
        dtype: DType,
    ) -> Result<bool> {
        self.linear_with(
            self.path, dev, x, rows, w, bias, out, out_dim, in_dim, dtype,
        )
    }

    /// [`Gemm::linear`] through a given path.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_with(
        &self,
        path: GemmPath,
        dev: &Device,
        x: u64,
        rows: usize,
        w: u64,
        bias: Option<u64>,
        out: u64,
        out_dim: usize,
        in_dim: usize,
        dtype: DType,
    ) -> Result<bool> {
        let (m, n, k) = (int("m", out_dim)?, int("n", rows)?, int("k", in_dim)?);
        dev.bind()?;
        let mut h = self.lock();
        if path != GemmPath::Blas {
            let io = (dtype, dtype, 0.0);
            match lt_linear(&mut h, dev, x, w, bias, out, (m, n, k), io) {
                Ok(()) => return Ok(true),
                Err(e) if path == GemmPath::Lt => return Err(e),
                Err(_) => {} // no cuBLASLt algorithm for this shape: cuBLAS below
            }
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: pointers are live device buffers of the sizes the dimensions imply (checked
        // by the backend); alpha/beta are host f32 (compute type 32F).
        unsafe {
            blas_result::gemm_ex(
                h.blas,
                op(true),
                op(false),
                m,
                n,
                k,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                blas_type(dtype),
                k,
                x as *const c_void,
                blas_type(dtype),
                k,
                &beta as *const f32 as *const c_void,
                out as *mut c_void,
                blas_type(dtype),
                m,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
        .map_err(|e| blas_err(&format!("GemmEx {out_dim}x{rows}x{in_dim} {dtype}"), e))?;
        Ok(false)
    }

    /// `h[rows, out_dim] += x[rows, in_dim] · w[out_dim, in_dim]ᵀ (+ bias)` in one cuBLASLt
    /// call (beta = 1, C = D = h): x, w in `dtype`; h and the bias in `h_type` (f32 for the
    /// widened residual stream). An error when cuBLASLt has no algorithm (the caller then
    /// adds a separate product), or when this Gemm is pinned to cuBLAS.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_accumulate(
        &self,
        dev: &Device,
        x: u64,
        rows: usize,
        w: u64,
        bias: Option<u64>,
        h: u64,
        h_type: DType,
        out_dim: usize,
        in_dim: usize,
        dtype: DType,
    ) -> Result<()> {
        if self.path == GemmPath::Blas {
            return Err(Error::invalid("accumulating GEMM: cuBLASLt only"));
        }
        let (m, n, k) = (int("m", out_dim)?, int("n", rows)?, int("k", in_dim)?);
        dev.bind()?;
        let mut h_lock = self.lock();
        lt_linear(
            &mut h_lock,
            dev,
            x,
            w,
            bias,
            h,
            (m, n, k),
            (dtype, h_type, 1.0),
        )
    }

    /// A strided-batched product (attention), through `cublasGemmStridedBatchedEx`.
    pub fn batched(&self, dev: &Device, g: &Batched) -> Result<()> {
        let (m, n, k) = (int("m", g.m)?, int("n", g.n)?, int("k", g.k)?);
        let (lda, ldb, ldc) = (int("lda", g.lda)?, int("ldb", g.ldb)?, int("ldc", g.ldc)?);
        let batch = int("batch", g.batch)?;
        if g.a_type != g.b_type {
            return Err(Error::invalid("batched GEMM: A and B must share a dtype"));
        }
        dev.bind()?;
        let h = self.lock();
        // SAFETY: as in `linear`; strides and counts describe ranges inside live buffers.
        unsafe {
            blas_result::gemm_strided_batched_ex(
                h.blas,
                op(g.transa),
                op(g.transb),
                m,
                n,
                k,
                &g.alpha as *const f32 as *const c_void,
                g.a as *const c_void,
                blas_type(g.a_type),
                lda,
                g.stride_a as i64,
                g.b as *const c_void,
                blas_type(g.b_type),
                ldb,
                g.stride_b as i64,
                &g.beta as *const f32 as *const c_void,
                g.c as *mut c_void,
                blas_type(g.c_type),
                ldc,
                g.stride_c as i64,
                batch,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
        .map_err(|e| {
            blas_err(
                &format!(
                    "GemmStridedBatchedEx {}x{}x{} x{} {}·{}→{}",
                    g.m, g.n, g.k, g.batch, g.a_type, g.b_type, g.c_type
                ),
                e,
            )
        })
    }
}

/// cuBLASLt `D = op(A)·B (+ bias) + beta·C`, with A = w (transposed), B = x, C = D = out;
/// `(dtype, out_type, beta)`: the operands' dtype, the output's (and bias's), and beta (0 or
/// 1). Plans cached by shape, dtypes, bias and pointer alignment.
#[allow(clippy::too_many_arguments)]
fn lt_linear(
    h: &mut Handles,
    dev: &Device,
    x: u64,
    w: u64,
    bias: Option<u64>,
    out: u64,
    (m, n, k): (i32, i32, i32),
    (dtype, out_type, beta): (DType, DType, f32),
) -> Result<()> {
    let key = PlanKey {
        m: m as u64,
        n: n as u64,
        k: k as u64,
        dtype,
        out: out_type,
        bias: bias.is_some(),
        accumulate: beta != 0.0,
        align: [alignment(w), alignment(x), alignment(out)],
    };
    if h.no_plan.contains(&key) {
        return Err(Error::invalid(format!(
            "cuBLASLt has no algorithm for {m}x{n}x{k} {dtype}→{out_type}"
        )));
    }
    let new_plan = !h.plans.contains_key(&key);
    if new_plan {
        let count = if h.tune { tune::CANDIDATES } else { 1 };
        match make_plan(h, &key, count) {
            Ok((plan, candidates)) => {
                if let Some(b) = bias {
                    set_bias(&plan, b)?;
                }
                let plan = match h.tune && candidates.len() > 1 {
                    true => tune::fastest(h, dev, plan, &key, &candidates, (w, x, out), beta)?,
                    false => plan,
                };
                h.plans.insert(key, plan);
            }
            Err(e) => {
                h.no_plan.insert(key);
                return Err(e);
            }
        }
    }
    let plan = h
        .plans
        .get(&key)
        .ok_or_else(|| Error::invalid("cuBLASLt plan cache"))?;
    if let (Some(b), false) = (bias, new_plan) {
        set_bias(plan, b)?;
    }
    run_plan(h, dev, plan, &plan.algo, (w, x, out), beta)
        .map_err(|e| lt_err(&format!("matmul {m}x{n}x{k} {dtype}→{out_type}"), e))
}

fn set_bias(plan: &Plan, bias: u64) -> Result<()> {
    set_desc(
        plan.desc,
        lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
        &bias,
    )
}

/// `out = w'ᵀ·x' (+ bias) + beta·out` by `plan` with `algo`, on the device's stream.
fn run_plan(
    h: &Handles,
    dev: &Device,
    plan: &Plan,
    algo: &lt_sys::cublasLtMatmulAlgo_t,
    (w, x, out): (u64, u64, u64),
    beta: f32,
) -> std::result::Result<(), lt_result::CublasError> {
    let alpha = 1.0f32;
    // SAFETY: the plan describes exactly these buffers' shapes; C and D are the same memory
    // with the same layout (in place, as cuBLASLt allows); the workspace belongs to this
    // handle set; `algo` came from the heuristic for this plan.
    unsafe {
        lt_result::matmul(
            h.lt,
            plan.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            w as *const c_void,
            plan.a,
            x as *const c_void,
            plan.b,
            out as *const c_void,
            plan.c,
            out as *mut c_void,
            plan.c,
            algo,
            h.workspace.ptr() as *mut c_void,
            WORKSPACE,
            dev.stream().cu_stream() as _,
        )
    }
}

fn set_desc<T>(
    desc: lt_sys::cublasLtMatmulDesc_t,
    attr: lt_sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<()> {
    // SAFETY: `value` has the size and type cuBLASLt documents for `attr`.
    unsafe {
        lt_result::set_matmul_desc_attribute(
            desc,
            attr,
            value as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
    .map_err(|e| lt_err(&format!("{attr:?}"), e))
}

/// The plan for `key` with the heuristic's first algorithm, and its first `count` algorithms
/// (those that fit the workspace).
fn make_plan(
    h: &Handles,
    key: &PlanKey,
    count: usize,
) -> Result<(Plan, Vec<lt_sys::cublasLtMatmulHeuristicResult_t>)> {
    use lt_sys::cublasLtMatmulDescAttributes_t as D;
    use lt_sys::cublasLtMatmulPreferenceAttributes_t as P;
    let (t, out) = (lt_type(key.dtype), lt_type(key.out));
    let desc = lt_result::create_matmul_desc(
        lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        lt_sys::cudaDataType::CUDA_R_32F,
    )
    .map_err(|e| lt_err("matmul desc", e))?;
    // From here on `plan` owns what was created, so an error frees it.
    let mut plan = Plan {
        desc,
        a: std::ptr::null_mut(),
        b: std::ptr::null_mut(),
        c: std::ptr::null_mut(),
        algo: lt_sys::cublasLtMatmulAlgo_t { data: [0; 8] },
    };
    // cublasOperation_t: 0 = N, 1 = T (int32).
    set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
    set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?;
    let epilogue = if key.bias {
        lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
    } else {
        lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
    };
    set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
    if key.bias {
        // The bias vector has the output's dtype (as cuBLASLt requires outside FP8), length m.
        set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &out)?;
    }
    // A = W' stored k × m (transposed by the op), B = X' stored k × n, C = D = Y' m × n.
    plan.a = lt_result::create_matrix_layout(t, key.k, key.m, key.k as i64)
        .map_err(|e| lt_err("layout A", e))?;
    plan.b = lt_result::create_matrix_layout(t, key.k, key.n, key.k as i64)
        .map_err(|e| lt_err("layout B", e))?;
    plan.c = lt_result::create_matrix_layout(out, key.m, key.n, key.m as i64)
        .map_err(|e| lt_err("layout C", e))?;
    let pref = lt_result::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
    let chosen = (|| {
        let set = |attr: P, value: *const c_void, size: usize| {
            // SAFETY: value points to a live value of `size` bytes, as `attr` expects.
            unsafe { lt_result::set_matmul_pref_attribute(pref, attr, value, size) }
                .map_err(|e| lt_err(&format!("{attr:?}"), e))
        };
        let ws = WORKSPACE as u64;
        set(
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &ws as *const u64 as *const c_void,
            8,
        )?;
        let [aw, ax, ao] = key.align;
        for (attr, a) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, aw),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, ax),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, ao),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, ao),
        ] {
            set(attr, &a as *const u32 as *const c_void, 4)?;
        }
        // SAFETY: all handles are valid and describe one consistent problem.
        unsafe { heuristics(h, &plan, pref, count) }.map_err(|e| {
            lt_err(
                &format!(
                    "no algorithm for {}x{}x{} {}→{} (bias {})",
                    key.m, key.n, key.k, key.dtype, key.out, key.bias
                ),
                e,
            )
        })
    })();
    // SAFETY: created above, destroyed once.
    let _ = unsafe { lt_result::destroy_matmul_pref(pref) };
    let candidates = chosen?;
    plan.algo = candidates[0].algo;
    Ok((plan, candidates))
}

/// cuBLASLt's first `count` algorithms for `plan`, best first by its heuristic, without
/// those that failed or want more than our workspace; an error when none is left.
///
/// # Safety
/// `plan` and `pref` must be valid handles describing one problem.
unsafe fn heuristics(
    h: &Handles,
    plan: &Plan,
    pref: lt_sys::cublasLtMatmulPreference_t,
    count: usize,
) -> std::result::Result<Vec<lt_sys::cublasLtMatmulHeuristicResult_t>, lt_result::CublasError> {
    // SAFETY: a plain C struct, all zeroes a valid value; cuBLASLt fills `got` of them.
    let mut out =
        vec![unsafe { std::mem::zeroed::<lt_sys::cublasLtMatmulHeuristicResult_t>() }; count];
    let mut got = 0i32;
    unsafe {
        lt_sys::cublasLtMatmulAlgoGetHeuristic(
            h.lt,
            plan.desc,
            plan.a,
            plan.b,
            plan.c,
            plan.c,
            pref,
            count as i32,
            out.as_mut_ptr(),
            &mut got,
        )
    }
    .result()?;
    out.truncate(got.max(0) as usize);
    out.retain(|r| {
        r.state == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS && r.workspaceSize <= WORKSPACE
    });
    if out.is_empty() {
        return Err(lt_result::CublasError(
            lt_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
        ));
    }
    Ok(out)
}
