//! [`CudaBackend`]: the [`Backend`] trait on one CUDA device. Weights and activations live on
//! the device in the storage dtype; only `to_vec` brings values back.

use super::device::{Device, DeviceBuffer, IndexBuffer};
use super::gemm::{Batched, Gemm, GemmPath};
use super::kernels::{Arg, Kernels, Launch};
use super::svd::EigPath;
use super::DType;
use crate::backend::cpu::CpuBackend;
use crate::backend::row_stats::{self, OodSums, RowStats};
use crate::backend::{
    relative_error, AttentionMask, AttentionShape, Backend, SideSolver, SvdSchedule,
};
use crate::config::Activation;
use crate::error::{Error, Result};
use crate::lowrank::Svd;
use crate::model::prompts::BucketPlan;
use crate::weights::F32Data;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

#[cfg(target_endian = "big")]
compile_error!("kernel arguments are packed for little-endian hosts");

/// How to build a [`CudaBackend`].
#[derive(Clone, Copy, Debug)]
pub struct CudaOptions {
    /// Storage dtype of weights and activations (`--dtype`); accumulation is always f32.
    pub dtype: DType,
    /// Which library runs the Linear layers.
    pub gemm: GemmPath,
    /// Fill each new buffer with NaN before an op writes it, so unwritten outputs show (tests).
    pub poison: bool,
    /// Wait for the device after every op, so a faulting kernel is reported by the op that
    /// launched it (debugging; also set by `SETAR_CUDA_SYNC=1`).
    pub sync_each_op: bool,
    /// Bytes our tensors and weights may hold on the device (`--max-memory`); past it an
    /// allocation is an out-of-memory error.
    pub max_memory: Option<usize>,
    /// Time each op (synchronising around it) and keep the totals (also set by
    /// `SETAR_CUDA_PROFILE=1`; see [`CudaBackend::profile`]).
    pub profile: bool,
    /// With bf16 / f16 storage, keep the residual stream (the hidden states the blocks add
    /// into) in f32: tokens, residual adds and the LayerNorms' inputs; GEMM operands stay in
    /// the storage dtype. About halves the error against f32 (`SETAR_CUDA_NARROW_RESIDUAL=1`
    /// stores it in the storage dtype, as HF's bf16 models do).
    pub wide_residual: bool,
    /// Which attention runs where the fused tensor-core kernel (kernels/attention.cu)
    /// applies (bf16 / f16, head_dim 64); elsewhere always scores GEMM, softmax kernel, P·V
    /// GEMM (`SETAR_CUDA_ATTENTION=auto|fused|unfused`).
    pub attention: AttentionPath,
    /// Add the attention and MLP outputs into the residual stream inside their GEMMs
    /// (cuBLASLt, beta = 1, the stream as C and D) instead of writing each output and adding
    /// it by a kernel (`SETAR_CUDA_SEPARATE_RESIDUAL=1` turns it off).
    pub fused_residual: bool,
    /// Where the search's SVDs run (`SETAR_CUDA_SVD=device|hybrid|host|side`): by default all
    /// by cuSOLVER in f64 up front; `hybrid`: the first target's by cuSOLVER and the rest on
    /// host threads while the search evaluates on the device (faer in f64 as on the CPU,
    /// `search/background.rs`); `host`: all on host threads; `side`: the first by cuSOLVER,
    /// the rest by cuSOLVER on a second stream, beside the search's kernels (not yet timed).
    /// Measured on the H200 machine (BENCHMARKS.md, run 5a): up front 6.43 s, hybrid 6.58 s
    /// and 7.33 s, host 6.99 s. The host SVDs take about a second to arrive, and while they
    /// run the search's own steps slow down (step 1: 0.46 s against 0.25 s).
    pub svd: SvdSchedule,
    /// How the text tower groups prompts: by default few large batches, trading a little
    /// padding for launches (ImageNet's 1000 prompts: 2 batches of 9828 tokens in all against
    /// the CPU's 8 of 9168).
    pub prompt_buckets: BucketPlan,
    /// How cuSOLVER's eigen-decompositions of the SVDs' Gram matrices share the device
    /// (`SETAR_CUDA_EIG=batched|seq`; svd.rs). Batched by default: the 24 SVDs of a ViT-B/16
    /// search took 0.32 s and 0.23 s that way against 0.38 s and 0.31 s one after another
    /// (H200, BENCHMARKS.md runs 5b and 5c, medians of 3).
    pub eig: EigPath,
    /// Run a search candidate's Linear with its W' (one GEMM at the tensor cores' rate) rather
    /// than as the shared-product correction, which reads and writes y0 and is memory-bound
    /// (`SETAR_CUDA_CANDIDATES=weight|delta`; [`Backend::candidates_as_weights`]).
    pub candidate_weights: bool,
    /// Run a text step's candidates stacked into one batch through the layers above the
    /// target ([`Backend::stack_text_candidates`]): the text tower's ops are small and their
    /// launches, not their arithmetic, bound a text candidate (`SETAR_CUDA_TEXT_STACK=0`
    /// runs them one after another).
    pub stack_text: bool,
    /// Warps per block of the fused attention (`SETAR_CUDA_ATTENTION_WARPS=4|8`): 4 (64
    /// queries a block, the kernel measured in runs 4 and 5) or 8 (`flash_attention_wide`,
    /// 128 queries a block: each block streams all of its sequence's keys and values, so 8
    /// warps read them half as often; not yet timed).
    pub attention_warps: u32,
    /// Time cuBLASLt's first 8 algorithms on each new GEMM problem and keep the fastest
    /// (`SETAR_CUDA_GEMM_TUNE=1`; gemm/tune.rs), instead of its heuristic's first. Off by
    /// default: not yet timed, and the pick may differ between processes.
    pub gemm_tune: bool,
}

/// The text batches' fixed cost in tokens for [`BucketPlan::Balanced`]: a layer of a batch is
/// a dozen launches, ~50 µs, what ~2000 tokens' arithmetic takes on an H200.
pub const PROMPT_BATCH_OVERHEAD_TOKENS: usize = 2048;

impl CudaOptions {
    pub fn new(dtype: DType) -> CudaOptions {
        CudaOptions {
            dtype,
            gemm: GemmPath::Auto,
            poison: false,
            sync_each_op: std::env::var("SETAR_CUDA_SYNC").is_ok_and(|v| v == "1"),
            max_memory: None,
            profile: std::env::var("SETAR_CUDA_PROFILE").is_ok_and(|v| v == "1"),
            wide_residual: !std::env::var("SETAR_CUDA_NARROW_RESIDUAL").is_ok_and(|v| v == "1"),
            attention: env_choice(
                "SETAR_CUDA_ATTENTION",
                &[
                    ("auto", AttentionPath::Auto),
                    ("fused", AttentionPath::Fused),
                    ("unfused", AttentionPath::Unfused),
                ],
            ),
            fused_residual: !std::env::var("SETAR_CUDA_SEPARATE_RESIDUAL").is_ok_and(|v| v == "1"),
            svd: env_choice(
                "SETAR_CUDA_SVD",
                &[
                    ("device", SvdSchedule::UpFront),
                    ("hybrid", SvdSchedule::FirstThenBackground),
                    ("host", SvdSchedule::Background),
                    ("side", SvdSchedule::SideStream),
                ],
            ),
            prompt_buckets: BucketPlan::Balanced {
                overhead_tokens: PROMPT_BATCH_OVERHEAD_TOKENS,
                max_rows: 1024,
            },
            eig: env_choice(
                "SETAR_CUDA_EIG",
                &[("batched", EigPath::Batched), ("seq", EigPath::Sequential)],
            ),
            candidate_weights: env_choice(
                "SETAR_CUDA_CANDIDATES",
                &[("weight", true), ("delta", false)],
            ),
            stack_text: env_choice("SETAR_CUDA_TEXT_STACK", &[("1", true), ("0", false)]),
            attention_warps: env_choice("SETAR_CUDA_ATTENTION_WARPS", &[("4", 4), ("8", 8)]),
            gemm_tune: env_choice("SETAR_CUDA_GEMM_TUNE", &[("0", false), ("1", true)]),
        }
    }
}

/// The value of environment variable `var` among `choices` (name, value); unset: the first.
/// An unknown name is warned about and gives the first too.
fn env_choice<T: Copy>(var: &str, choices: &[(&str, T)]) -> T {
    let default = choices[0].1;
    let Ok(set) = std::env::var(var) else {
        return default;
    };
    if let Some(&(_, v)) = choices.iter().find(|(name, _)| *name == set) {
        return v;
    }
    let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
    eprintln!(
        "warning: {var}={set} is not one of {}; using {}",
        names.join(", "),
        choices[0].0
    );
    default
}

/// The attention of [`CudaOptions::attention`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AttentionPath {
    /// The fused kernel if it passes the backend's start-up self-check against the CPU on
    /// this device (else the unfused path, and [`CudaBackend::attention_note`] says why).
    #[default]
    Auto,
    /// The fused kernel; failing the self-check is an error.
    Fused,
    /// Scores GEMM, softmax kernel, P·V GEMM.
    Unfused,
}

/// The most blocks a launch may have along the grid's y or z axis.
const GRID_YZ: usize = 65_535;

/// A tensor (or weight) on the device: `len` values of the backend's dtype.
#[derive(Debug)]
pub struct CudaTensor {
    buf: DeviceBuffer,
    /// An f32 copy made on first use when the tensor is a bias a GEMM adds into the f32
    /// residual stream (cuBLASLt takes the bias in the output's type); only read-only weights
    /// are used as biases, so the copy never goes stale.
    wide: OnceLock<DeviceBuffer>,
}

impl From<DeviceBuffer> for CudaTensor {
    fn from(buf: DeviceBuffer) -> CudaTensor {
        CudaTensor {
            buf,
            wide: OnceLock::new(),
        }
    }
}

impl CudaTensor {
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn dtype(&self) -> DType {
        self.buf.dtype()
    }

    pub fn buffer(&self) -> &DeviceBuffer {
        &self.buf
    }

    fn ptr(&self) -> u64 {
        self.buf.ptr()
    }
}

/// Activation codes of `kernels/activation.cu`.
const ACT_NONE: i32 = 0;

fn act_code(act: Activation) -> i32 {
    match act {
        Activation::QuickGelu => 1,
        Activation::Gelu => 2,
        Activation::GeluTanh => 3,
    }
}

/// The head size `kernels/attention.cu` is written for.
const FUSED_HEAD_DIM: usize = 64;

/// f32 logits held at once by `logit_row_stats` (256 MiB).
const LOGIT_CHUNK: usize = 64 << 20;

/// Elements per launch of the flat in-place kernels (keeps `int` column counts in range).
const CHUNK: usize = 1 << 30;

/// The index cache's size: arrays and bytes per array (larger ones are uploaded each time).
const INDEX_CACHE: usize = 32;
const INDEX_CACHE_BYTES: usize = 4 << 20;

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::invalid(format!(
            "{what}: {got} values, expected {want}"
        )));
    }
    Ok(())
}

fn i32_of(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(format!("{what} = {v} is too large for a kernel")))
}

fn i64_of(v: usize) -> i64 {
    v as i64
}

/// The Backend trait on one CUDA device.
pub struct CudaBackend {
    // Drop order: library handles and modules before the device's stream and context.
    gemm: Gemm,
    kernels: Kernels,
    /// Index arrays (labels, lengths, token ids, row numbers) uploaded lately, by content,
    /// most recent last: the same arrays recur at every layer and candidate, and a copy from
    /// pageable host memory waits for the stream, draining the queue of launched work.
    indices: Mutex<Vec<(Vec<u8>, Arc<IndexBuffer>)>>,
    dev: Device,
    opts: CudaOptions,
    /// Per op: seconds and calls, when profiling.
    profile: Option<Mutex<BTreeMap<&'static str, (f64, usize)>>>,
    /// Whether the fused attention kernel runs where it applies (the options, resolved by the
    /// self-check), and why not when `Auto` fell back.
    fused_attention: bool,
    attention_note: Option<String>,
    /// The SVDs' warm-up thread ([`Backend::warm_up_svds`]), joined before the first SVDs.
    svd_warm_up: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl CudaBackend {
    /// `cuda:ordinal` with `dtype` storage and default options.
    pub fn new(ordinal: usize, dtype: DType) -> Result<CudaBackend> {
        CudaBackend::with_options(ordinal, CudaOptions::new(dtype))
    }

    /// Opens the device, loads the kernels, creates the cuBLAS handles and runs a small
    /// self-check of every library entry point the backend uses. No device, a missing
    /// library, a kernel that does not compile, or a library that panics: an `Error`.
    pub fn with_options(ordinal: usize, opts: CudaOptions) -> Result<CudaBackend> {
        let built = catch_unwind(AssertUnwindSafe(|| -> Result<CudaBackend> {
            let dev = Device::open(ordinal, opts.poison)?.with_memory_limit(opts.max_memory);
            let kernels = Kernels::load(&dev)?;
            let gemm = Gemm::new(&dev, opts.gemm, opts.gemm_tune)?;
            let mut backend = CudaBackend {
                gemm,
                kernels,
                indices: Mutex::new(Vec::new()),
                dev,
                opts,
                profile: opts.profile.then(Default::default),
                fused_attention: false,
                attention_note: None,
                svd_warm_up: Mutex::new(None),
            };
            backend.self_check()?;
            if opts.attention != AttentionPath::Unfused && opts.dtype != DType::F32 {
                match backend.check_fused_attention() {
                    Ok(()) => backend.fused_attention = true,
                    Err(e) if opts.attention == AttentionPath::Fused => return Err(e),
                    Err(e) => {
                        // A faulting kernel leaves the context unusable: say how to avoid it.
                        backend.dev.synchronize().map_err(|fault| {
                            Error::invalid(format!(
                                "{fault} (after the fused attention's self-check failed: {e}; \
                                 SETAR_CUDA_ATTENTION=unfused avoids the kernel)"
                            ))
                        })?;
                        let note = format!("fused attention off: {e}");
                        eprintln!("warning: cuda:{ordinal}: {note}");
                        backend.attention_note = Some(note);
                    }
                }
            }
            Ok(backend)
        }));
        built.unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::invalid(format!(
                "cuda:{ordinal}: a CUDA library failed: {msg}"
            )))
        })
    }

    pub fn dtype(&self) -> DType {
        self.opts.dtype
    }

    /// Whether attention runs through the fused kernel where it applies.
    pub fn uses_fused_attention(&self) -> bool {
        self.fused_attention
    }

    /// Why `AttentionPath::Auto` fell back to the unfused attention, if it did.
    pub fn attention_note(&self) -> Option<&str> {
        self.attention_note.as_deref()
    }

    pub fn options(&self) -> CudaOptions {
        self.opts
    }

    /// Runs one op, timed (device synchronised before and after) when profiling.
    fn profiled<T>(&self, op: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let Some(p) = &self.profile else {
            return f();
        };
        self.dev.synchronize()?;
        let t = Instant::now();
        let r = f()?;
        self.dev.synchronize()?;
        let mut m = p.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(op).or_insert((0.0, 0));
        e.0 += t.elapsed().as_secs_f64();
        e.1 += 1;
        Ok(r)
    }

    /// Seconds and calls per op since the last [`CudaBackend::reset_profile`], most time
    /// first (empty unless built with `profile`).
    pub fn profile(&self) -> Vec<(&'static str, f64, usize)> {
        let Some(p) = &self.profile else {
            return Vec::new();
        };
        let m = p.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = m.iter().map(|(k, (s, n))| (*k, *s, *n)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    pub fn reset_profile(&self) {
        if let Some(p) = &self.profile {
            p.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// Row statistics of the logits `scale · x · textᵀ`, left on the device: `rows × 5`
    /// doubles (kernels/rowstats.cu). The logits are made a bounded number of rows at a time
    /// (whole label groups) by one GEMM into f32 (alpha = scale), then `row_stats_f32`.
    #[allow(clippy::too_many_arguments)]
    fn row_stats_on_device(
        &self,
        x: &CudaTensor,
        text: &CudaTensor,
        dim: usize,
        scale: f32,
        labels: &[usize],
        rows_per_label: usize,
        temperature: f64,
    ) -> Result<(IndexBuffer, usize)> {
        let (rows, classes) = row_stats::logit_shape(x.len(), text.len(), dim)?;
        self.storage("image features", x)?;
        self.storage("text features", text)?;
        row_stats::check_labels(rows, classes, labels, rows_per_label)?;
        row_stats::check_temperature(temperature)?;
        let out = self.dev.alloc_raw(rows * 5 * 8)?;
        if rows == 0 {
            return Ok((out, 0));
        }
        let groups_per_chunk = (LOGIT_CHUNK / (classes * rows_per_label)).max(1);
        let chunk_rows = groups_per_chunk * rows_per_label;
        let logits = self.dev.alloc(chunk_rows.min(rows) * classes, DType::F32)?;
        let label_ids: Vec<i32> = labels.iter().map(|&l| l as i32).collect();
        let dev_labels = self.indices(&label_ids)?;
        let d = self.opts.dtype;
        for start in (0..rows).step_by(chunk_rows) {
            let n = chunk_rows.min(rows - start);
            // Column-major: logits' (classes × n) = scale · T'ᵀ (classes × dim) · X' (dim × n).
            self.gemm.batched(
                &self.dev,
                &Batched {
                    transa: true,
                    transb: false,
                    m: classes,
                    n,
                    k: dim,
                    alpha: scale,
                    a: text.ptr(),
                    a_type: d,
                    lda: dim,
                    stride_a: 0,
                    b: x.buf.ptr_at(start * dim),
                    b_type: d,
                    ldb: dim,
                    stride_b: 0,
                    beta: 0.0,
                    c: logits.ptr(),
                    c_type: DType::F32,
                    ldc: classes,
                    stride_c: 0,
                    batch: 1,
                },
            )?;
            self.after("logits GEMM")?;
            self.kernels.launch(
                &self.dev,
                "row_stats_f32",
                Launch::rows(n as u64)?,
                &[
                    Arg::Ptr(logits.ptr()),
                    Arg::Ptr(dev_labels.ptr() + (start / rows_per_label * 4) as u64),
                    Arg::I32(i32_of("rows per label", rows_per_label)?),
                    Arg::I32(i32_of("rows", n)?),
                    Arg::I32(i32_of("classes", classes)?),
                    Arg::F32((1.0 / temperature) as f32),
                    Arg::Ptr(out.ptr() + (start * 5 * 8) as u64),
                ],
            )?;
            self.after("row_stats_f32")?;
        }
        Ok((out, rows))
    }

    /// `data` on the device, from the index cache when the same array was uploaded lately
    /// (arrays up to `INDEX_CACHE_BYTES`, the last `INDEX_CACHE` of them).
    fn indices<T: bytemuck::Pod>(&self, data: &[T]) -> Result<Arc<IndexBuffer>> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.len() > INDEX_CACHE_BYTES {
            return Ok(Arc::new(self.dev.upload_indices(data)?));
        }
        let mut cache = self.indices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = cache.iter().position(|(k, _)| k.as_slice() == bytes) {
            let hit = cache.remove(i);
            let buf = hit.1.clone();
            cache.push(hit);
            return Ok(buf);
        }
        let buf = Arc::new(self.dev.upload_indices(data)?);
        if cache.len() >= INDEX_CACHE {
            cache.remove(0);
        }
        cache.push((bytes.to_vec(), buf.clone()));
        Ok(buf)
    }

    /// Peak bytes held by our buffers since the last [`CudaBackend::reset_peak_memory`].
    pub fn peak_memory(&self) -> usize {
        self.dev.memory_in_use().1
    }

    pub fn reset_peak_memory(&self) {
        self.dev.reset_peak()
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Where the kernels came from: "prebuilt", "cache", "nvrtc" (or a mix, "cache+nvrtc").
    pub fn kernel_origin(&self) -> String {
        self.kernels.summary()
    }

    /// Waits for all queued work and reports deferred errors.
    pub fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    /// Milliseconds of device time `f` queues, measured with CUDA events.
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f32> {
        use cudarc::driver::sys::CUevent_flags;
        let ctx = self.dev.context();
        let start = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| self.dev.err("event", e))?;
        let end = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| self.dev.err("event", e))?;
        start
            .record(self.dev.stream())
            .map_err(|e| self.dev.err("event", e))?;
        f()?;
        end.record(self.dev.stream())
            .map_err(|e| self.dev.err("event", e))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| self.dev.err("event", e))?;
        self.dev.synchronize()?;
        Ok(ms)
    }

    fn kernel(&self, op: &str) -> String {
        format!("{op}_{}", self.opts.dtype.name())
    }

    fn launch(&self, op: &str, cfg: Launch, args: &[Arg]) -> Result<()> {
        let name = self.kernel(op);
        self.kernels.launch(&self.dev, &name, cfg, args)?;
        self.after(&name)
    }

    fn after(&self, what: &str) -> Result<()> {
        if self.opts.sync_each_op {
            self.dev
                .synchronize()
                .map_err(|e| Error::invalid(format!("after {what}: {e}")))?;
        }
        Ok(())
    }

    /// A new tensor of `len` values (NaN when poisoning).
    pub fn empty(&self, len: usize) -> Result<CudaTensor> {
        self.empty_of(len, self.opts.dtype)
    }

    fn empty_of(&self, len: usize, dtype: DType) -> Result<CudaTensor> {
        Ok(self.dev.alloc(len, dtype)?.into())
    }

    /// The dtype of the residual stream: f32 when widened, else the storage dtype.
    fn stream_dtype(&self) -> DType {
        if self.opts.wide_residual {
            DType::F32
        } else {
            self.opts.dtype
        }
    }

    /// `op` for the storage dtype, or its `_to_f32` form when the stream is widened.
    fn to_stream(&self, op: &str) -> String {
        if self.stream_dtype() == DType::F32 && self.opts.dtype != DType::F32 {
            format!("{op}_to_f32")
        } else {
            op.to_string()
        }
    }

    /// An error unless `t` holds the storage dtype (GEMM operands).
    fn storage(&self, what: &str, t: &CudaTensor) -> Result<()> {
        if t.dtype() != self.opts.dtype {
            return Err(Error::invalid(format!(
                "{what}: a {} tensor where the backend's {} was expected",
                t.dtype(),
                self.opts.dtype
            )));
        }
        Ok(())
    }

    /// Host f32 → a tensor of the storage dtype. bf16 / f16 are rounded on the host (round
    /// to nearest even, as the `half` crate and our `cast_from_f32` kernel do), so half the
    /// bytes cross the bus (pixel uploads are bandwidth-bound).
    fn upload_f32(&self, data: &[f32]) -> Result<CudaTensor> {
        use rayon::prelude::*;
        let d = self.opts.dtype;
        let buf = match d {
            DType::F32 => self.dev.upload(data, DType::F32)?,
            DType::BF16 => {
                let bits: Vec<u16> = data
                    .par_iter()
                    .map(|&x| half::bf16::from_f32(x).to_bits())
                    .collect();
                self.dev.upload(&bits, d)?
            }
            DType::F16 => {
                let bits: Vec<u16> = data
                    .par_iter()
                    .map(|&x| half::f16::from_f32(x).to_bits())
                    .collect();
                self.dev.upload(&bits, d)?
            }
        };
        Ok(buf.into())
    }

    /// Host f32 → an f32 tensor whatever the storage dtype (a widened residual stream).
    pub fn tensor_f32(&self, data: &[f32]) -> Result<CudaTensor> {
        Ok(self.dev.upload(data, DType::F32)?.into())
    }

    /// The same as the upload of [`Backend::tensor`], but rounding on the device: f32 across
    /// the bus, then `cast_from_f32` (twice the bytes; for checking the two agree).
    pub fn upload_f32_cast_on_device(&self, data: &[f32]) -> Result<CudaTensor> {
        let d = self.opts.dtype;
        if d == DType::F32 {
            return self.upload_f32(data);
        }
        let staging = self.dev.upload(data, DType::F32)?;
        let out = self.empty(data.len())?;
        if !data.is_empty() {
            self.launch(
                "cast_from_f32",
                Launch::elementwise(data.len() as u64),
                &[
                    Arg::Ptr(staging.ptr()),
                    Arg::Ptr(out.ptr()),
                    Arg::I64(i64_of(data.len())),
                ],
            )?;
        }
        Ok(out)
    }

    fn download_f32(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        if t.dtype() == DType::F32 {
            return self.dev.download::<f32>(&t.buf);
        }
        let staging = self.dev.alloc(t.len(), DType::F32)?;
        self.cast_to_f32(t, &staging)?;
        self.dev.download::<f32>(&staging)
    }

    /// `dst` (f32, as long as `t`) = `t` (storage dtype), on the device.
    fn cast_to_f32(&self, t: &CudaTensor, dst: &DeviceBuffer) -> Result<()> {
        if t.is_empty() {
            return Ok(());
        }
        self.launch(
            "cast_to_f32",
            Launch::elementwise(t.len() as u64),
            &[
                Arg::Ptr(t.ptr()),
                Arg::Ptr(dst.ptr()),
                Arg::I64(i64_of(t.len())),
            ],
        )
    }

    /// In place: `x[r, c] = act(x[r, c] + bias[c])` (`act` as in kernels/activation.cu).
    fn bias_act(&self, x: u64, bias: Option<u64>, rows: usize, dim: usize, act: i32) -> Result<()> {
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        self.launch(
            "bias_act",
            Launch::columns_by_rows(rows as u64, dim as u64),
            &[
                Arg::Ptr(x),
                Arg::Ptr(bias.unwrap_or(0)),
                Arg::I64(i64_of(rows)),
                Arg::I32(i32_of("columns", dim)?),
                Arg::I32(act),
            ],
        )
    }

    /// The address of `b`'s f32 copy (see [`CudaTensor`]'s `wide`), made on first use.
    fn widened(&self, b: &CudaTensor) -> Result<u64> {
        if let Some(w) = b.wide.get() {
            return Ok(w.ptr());
        }
        let w = self.dev.alloc(b.len(), DType::F32)?;
        self.cast_to_f32(b, &w)?;
        // A concurrent first use may have won: its copy is as good (ours is freed in order).
        let _ = b.wide.set(w);
        Ok(b.wide.get().map_or(0, |w| w.ptr()))
    }

    /// L2-normalises each row of `x[_, dim]` in place (CPU twin:
    /// `model::clip::l2_normalize_rows`).
    pub fn l2_normalize_rows(&self, x: &mut CudaTensor, dim: usize) -> Result<()> {
        if dim == 0 || x.len() % dim != 0 {
            return Err(Error::invalid(format!(
                "l2 normalise: {} values are not rows of {dim}",
                x.len()
            )));
        }
        let rows = x.len() / dim;
        if rows == 0 {
            return Ok(());
        }
        self.launch(
            "l2_normalize",
            Launch::rows(rows as u64)?,
            &[
                Arg::Ptr(x.ptr()),
                Arg::I32(i32_of("rows", rows)?),
                Arg::I32(i32_of("dim", dim)?),
            ],
        )
    }

    /// The index of the first non-finite value of `x` (any dtype) by `first_non_finite`: one
    /// 8-byte integer comes back (kernels/finite.cu).
    pub fn first_non_finite_index(&self, x: &CudaTensor) -> Result<Option<usize>> {
        let n = x.len();
        if n == 0 {
            return Ok(None);
        }
        let first = self.dev.upload_indices(&[u64::MAX])?;
        let name = format!("first_non_finite_{}", x.dtype().name());
        self.kernels.launch(
            &self.dev,
            &name,
            Launch::elementwise(n as u64),
            &[Arg::Ptr(x.ptr()), Arg::I64(n as i64), Arg::Ptr(first.ptr())],
        )?;
        self.after(&name)?;
        let got: Vec<u64> = self.dev.download_raw(&first, 1)?;
        Ok((got[0] != u64::MAX).then_some(got[0] as usize))
    }

    /// The masked softmax of attention, on its own: `scores` are f32 rows
    /// `[batch, heads, queries, ld]` (the first `seq` columns valid); returns the probabilities
    /// `[rows, seq]` after a round trip through the storage dtype. For tests and checks.
    #[allow(clippy::too_many_arguments)]
    pub fn masked_softmax(
        &self,
        scores: &[f32],
        batch: usize,
        heads: usize,
        queries: usize,
        seq: usize,
        ld: usize,
        mask: &AttentionMask,
    ) -> Result<Vec<f32>> {
        let rows = batch * heads * queries;
        check_len("scores", scores.len(), rows * ld)?;
        if ld < seq {
            return Err(Error::invalid(format!("ld {ld} < seq {seq}")));
        }
        let s = self.dev.upload(scores, DType::F32)?;
        let probs = self.empty(rows * ld)?;
        self.softmax(&s, &probs.buf, batch, heads, queries, seq, ld, mask)?;
        let all = self.download_f32(&probs)?;
        Ok(all
            .chunks(ld.max(1))
            .flat_map(|r| r[..seq].iter().copied())
            .collect())
    }

    /// LayerNorm kernel `op` (layernorm.cu) of `x` into a new `out_dtype` tensor.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_as(
        &self,
        op: &str,
        x: &CudaTensor,
        dim: usize,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
        out_dtype: DType,
    ) -> Result<CudaTensor> {
        if dim == 0 || x.len() % dim != 0 {
            return Err(Error::invalid(format!(
                "layer norm: {} values are not rows of {dim}",
                x.len()
            )));
        }
        check_len("layer norm weight", gamma.len(), dim)?;
        check_len("layer norm bias", beta.len(), dim)?;
        let rows = x.len() / dim;
        let out = self.empty_of(x.len(), out_dtype)?;
        if rows > 0 {
            self.launch(
                op,
                Launch::rows(rows as u64)?,
                &[
                    Arg::Ptr(x.ptr()),
                    Arg::Ptr(gamma.ptr()),
                    Arg::Ptr(beta.ptr()),
                    Arg::Ptr(out.ptr()),
                    Arg::I32(i32_of("rows", rows)?),
                    Arg::I32(i32_of("dim", dim)?),
                    Arg::F32(eps),
                ],
            )?;
        }
        Ok(out)
    }

    /// `kernels/attention.cu`: scores, softmax and P·V in one kernel, nothing in memory
    /// between them (bf16 / f16, head_dim 64).
    fn fused_attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        out: &CudaTensor,
        shape: AttentionShape,
        mask: &AttentionMask,
    ) -> Result<()> {
        let lengths: Option<Arc<IndexBuffer>> = match &mask.lengths {
            Some(l) => {
                check_len("attention lengths", l.len(), shape.batch)?;
                let l32: Vec<i32> = l.iter().map(|&x| x.min(i32::MAX as usize) as i32).collect();
                Some(self.indices(&l32)?)
            }
            None => None,
        };
        if shape.heads > GRID_YZ {
            return Err(Error::invalid(format!(
                "fused attention: {} heads is too many",
                shape.heads
            )));
        }
        let (op, warps) = match self.opts.attention_warps {
            4 => ("flash_attention", 4u32),
            8 => ("flash_attention_wide", 8),
            w => {
                return Err(Error::invalid(format!(
                    "fused attention: {w} warps per block (4 or 8)"
                )))
            }
        };
        // Sequences go on the grid's z axis (at most 65535), so a larger batch (stacked text
        // candidates) runs in slices, each from its own offsets.
        let elem = q.dtype().size() as u64;
        let width = shape.width() as u64;
        for first in (0..shape.batch).step_by(GRID_YZ) {
            let n = GRID_YZ.min(shape.batch - first);
            let (b0, rows_q, rows_kv) = (
                first as u64,
                (first * shape.queries) as u64,
                (first * shape.seq) as u64,
            );
            let cfg = Launch {
                grid: (
                    shape.queries.div_ceil(16 * warps as usize) as u32,
                    shape.heads as u32,
                    n as u32,
                ),
                block: (32 * warps, 1, 1),
            };
            self.launch(
                op,
                cfg,
                &[
                    Arg::Ptr(q.ptr() + rows_q * width * elem),
                    Arg::Ptr(k.ptr() + rows_kv * width * elem),
                    Arg::Ptr(v.ptr() + rows_kv * width * elem),
                    Arg::Ptr(out.ptr() + rows_q * width * elem),
                    Arg::I32(i32_of("seq", shape.seq)?),
                    Arg::I32(i32_of("queries", shape.queries)?),
                    Arg::I32(i32_of("heads", shape.heads)?),
                    Arg::F32(1.0 / (shape.head_dim as f32).sqrt()),
                    Arg::I32(mask.causal as i32),
                    Arg::Ptr(lengths.as_ref().map_or(0, |l| l.ptr() + b0 * 4)),
                ],
            )?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn softmax(
        &self,
        scores: &DeviceBuffer,
        probs: &DeviceBuffer,
        batch: usize,
        heads: usize,
        queries: usize,
        seq: usize,
        ld: usize,
        mask: &AttentionMask,
    ) -> Result<()> {
        let rows = batch * heads * queries;
        if rows == 0 {
            return Ok(());
        }
        let lengths: Option<Arc<IndexBuffer>> = match &mask.lengths {
            Some(l) => {
                check_len("attention lengths", l.len(), batch)?;
                let l32: Vec<i32> = l.iter().map(|&x| x.min(i32::MAX as usize) as i32).collect();
                Some(self.indices(&l32)?)
            }
            None => None,
        };
        self.launch(
            "softmax",
            Launch::rows(rows as u64)?,
            &[
                Arg::Ptr(scores.ptr()),
                Arg::Ptr(probs.ptr()),
                Arg::I64(i64_of(rows)),
                Arg::I32(i32_of("seq", seq)?),
                Arg::I32(i32_of("ld", ld)?),
                Arg::I32(i32_of("queries", queries)?),
                Arg::I32(i32_of("heads", heads)?),
                Arg::I32(mask.causal as i32),
                Arg::Ptr(lengths.as_ref().map_or(0, |l| l.ptr())),
            ],
        )
    }

    /// The GEMM problems tuned so far (with `CudaOptions::gemm_tune`) and their timings.
    pub fn gemm_tune_records(&self) -> Vec<super::gemm::TuneRecord> {
        self.gemm.tune_records()
    }

    /// Device TFLOP/s of the Linear GEMM `[n, k] · [m, k]ᵀ` in this backend's dtype and GEMM
    /// path (random operands; median of `reps` timed runs after 3 warm-ups).
    pub fn bench_gemm(&self, m: usize, n: usize, k: usize, reps: usize) -> Result<f64> {
        let x = self.upload_f32(&pseudo_random(n * k, 1))?;
        let w = self.upload_f32(&pseudo_random(m * k, 2))?;
        let out = self.empty(n * m)?;
        let run = || {
            self.gemm
                .linear(
                    &self.dev,
                    x.ptr(),
                    n,
                    w.ptr(),
                    None,
                    out.ptr(),
                    m,
                    k,
                    self.opts.dtype,
                )
                .map(|_| ())
        };
        for _ in 0..3 {
            run()?;
        }
        let mut times: Vec<f32> = (0..reps.max(1))
            .map(|_| self.time_ms(run))
            .collect::<Result<_>>()?;
        times.sort_by(f32::total_cmp);
        let ms = times[times.len() / 2] as f64;
        Ok(2.0 * m as f64 * n as f64 * k as f64 / (ms * 1e-3) / 1e12)
    }

    /// The fused attention kernel against the CPU's attention on two small head_dim-64
    /// problems that cross a 64-key tile (causal with padding, all queries; no mask, the class
    /// token alone), inputs exact in bf16 and f16: an error unless they agree to the rounding
    /// of the probabilities.
    fn check_fused_attention(&self) -> Result<()> {
        let cpu = CpuBackend::new();
        let cases = [
            (
                AttentionShape {
                    batch: 2,
                    seq: 70,
                    queries: 70,
                    heads: 2,
                    head_dim: FUSED_HEAD_DIM,
                },
                AttentionMask {
                    causal: true,
                    lengths: Some(vec![70, 41]),
                },
            ),
            (
                AttentionShape {
                    batch: 3,
                    seq: 70,
                    queries: 1,
                    heads: 1,
                    head_dim: FUSED_HEAD_DIM,
                },
                AttentionMask::default(),
            ),
        ];
        for (i, (shape, mask)) in cases.iter().enumerate() {
            let w = shape.width();
            // Multiples of 1/8 in [-1, 1): exact in both 16-bit types.
            let vals = |n: usize, seed: usize| -> Vec<f32> {
                (0..n)
                    .map(|j| (((j * 37 + seed * 11) % 16) as f32 - 8.0) * 0.125)
                    .collect()
            };
            let q = vals(shape.batch * shape.queries * w, 1 + i);
            let k = vals(shape.batch * shape.seq * w, 4 + i);
            let v = vals(shape.batch * shape.seq * w, 7 + i);
            let want = cpu.attention(&q, &k, &v, *shape, mask)?;
            let out = self.empty(q.len())?;
            let (dq, dk, dv) = (
                self.upload_f32(&q)?,
                self.upload_f32(&k)?,
                self.upload_f32(&v)?,
            );
            self.fused_attention(&dq, &dk, &dv, &out, *shape, mask)?;
            let got = self.download_f32(&out)?;
            if let Some(j) = got.iter().position(|x| !x.is_finite()) {
                return Err(Error::invalid(format!(
                    "self-check: fused attention case {i}: element {j} is {}",
                    got[j]
                )));
            }
            let err = relative_error(&got, &want);
            if err.is_nan() || err > 2e-2 {
                return Err(Error::invalid(format!(
                    "self-check: fused attention case {i} differs from the CPU by {err:.2e} (‖Δ‖/‖ref‖)"
                )));
            }
        }
        Ok(())
    }

    /// Runs the Linear GEMM (both library paths where the options allow) and a tiny masked
    /// attention against the CPU once, so a broken library fails here, as an error.
    fn self_check(&self) -> Result<()> {
        let cpu = CpuBackend::new();
        // Small multiples of 1/4: exact in bf16 and f16, so only output rounding differs.
        let vals = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7 + seed * 3) % 9) as f32 - 4.0) * 0.25)
                .collect()
        };
        let (rows, out_dim, in_dim) = (3, 5, 4);
        let x = vals(rows * in_dim, 1);
        let w = vals(out_dim * in_dim, 2);
        let bias = vals(out_dim, 3);
        let owned = |v: &[f32]| crate::backend::cpu::owned(v.to_vec());
        let want = cpu.linear(&x, rows, &owned(&w), Some(&owned(&bias)), out_dim, in_dim)?;
        let (dx, dw, db) = (
            self.upload_f32(&x)?,
            self.upload_f32(&w)?,
            self.upload_f32(&bias)?,
        );
        let paths: &[GemmPath] = match self.opts.gemm {
            GemmPath::Blas => &[GemmPath::Blas],
            _ => &[GemmPath::Lt, GemmPath::Blas],
        };
        for &path in paths {
            let out = self.empty(rows * out_dim)?;
            let res = self.gemm.linear_with(
                path,
                &self.dev,
                dx.ptr(),
                rows,
                dw.ptr(),
                Some(db.ptr()),
                out.ptr(),
                out_dim,
                in_dim,
                self.opts.dtype,
            );
            let fused = match res {
                Ok(f) => f,
                // Auto falls back to cuBLAS, which is checked next.
                Err(_) if path == GemmPath::Lt && self.opts.gemm == GemmPath::Auto => continue,
                Err(e) => return Err(e),
            };
            if !fused {
                self.bias_act(out.ptr(), Some(db.ptr()), rows, out_dim, ACT_NONE)?;
            }
            let got = self.download_f32(&out)?;
            close("self-check: Linear", path, &got, &want, 1e-2)?;
        }
        let shape = AttentionShape {
            batch: 2,
            seq: 3,
            queries: 3,
            heads: 2,
            head_dim: 2,
        };
        let n = shape.batch * shape.seq * shape.width();
        let (q, k, v) = (vals(n, 4), vals(n, 5), vals(n, 6));
        let mask = AttentionMask {
            causal: true,
            lengths: Some(vec![3, 2]),
        };
        let want = cpu.attention(&q, &k, &v, shape, &mask)?;
        let got = self.attention(
            &self.upload_f32(&q)?,
            &self.upload_f32(&k)?,
            &self.upload_f32(&v)?,
            shape,
            &mask,
        )?;
        close(
            "self-check: attention",
            GemmPath::Blas,
            &self.download_f32(&got)?,
            &want,
            1e-2,
        )
    }
}

fn close(what: &str, path: GemmPath, got: &[f32], want: &[f32], tol: f64) -> Result<()> {
    let err = relative_error(got, want);
    if err.is_nan() || err > tol || got.len() != want.len() {
        return Err(Error::invalid(format!(
            "{what} ({path:?}) differs from the CPU: relative error {err:.3e} (got {got:?}, want {want:?})"
        )));
    }
    Ok(())
}

/// Deterministic values in [-1, 1) (an LCG), for benchmarks: never time zeros.
fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaTensor;

    fn value_bytes(&self) -> usize {
        self.opts.dtype.size()
    }

    fn memory_budget(&self) -> Option<usize> {
        self.opts.max_memory
    }

    fn name(&self) -> String {
        let (major, minor) = self.dev.arch();
        format!(
            "cuda:{} {} (sm_{major}{minor}, {}, kernels: {}, GEMM: {:?}, attention: {})",
            self.dev.ordinal(),
            self.dev.name(),
            self.opts.dtype,
            self.kernels.summary(),
            self.opts.gemm,
            if self.fused_attention {
                "fused"
            } else {
                "unfused"
            }
        )
    }

    fn weight(&self, data: F32Data) -> Result<CudaTensor> {
        self.upload_f32(&data)
    }

    fn tensor(&self, data: Vec<f32>) -> Result<CudaTensor> {
        self.upload_f32(&data)
    }

    fn tensor_from(&self, data: &[f32]) -> Result<CudaTensor> {
        self.upload_f32(data)
    }

    fn to_vec(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        self.download_f32(t)
    }

    fn duplicate(&self, t: &CudaTensor) -> Result<CudaTensor> {
        self.profiled("copy", || {
            let out = self.empty_of(t.len(), t.dtype())?;
            self.dev.copy(&t.buf, &out.buf)?;
            Ok(out)
        })
    }

    fn linear(
        &self,
        x: &CudaTensor,
        rows: usize,
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<CudaTensor> {
        self.profiled("linear", || {
            self.storage("linear input", x)?;
            check_len("linear input", x.len(), rows * in_dim)?;
            check_len("linear weight", w.len(), out_dim * in_dim)?;
            if let Some(b) = bias {
                check_len("linear bias", b.len(), out_dim)?;
            }
            let out = self.empty(rows * out_dim)?;
            if rows == 0 || out_dim == 0 {
                return Ok(out);
            }
            let fused = if in_dim == 0 {
                self.dev.fill_bytes(&out.buf, 0)?;
                false
            } else {
                let fused = self.gemm.linear(
                    &self.dev,
                    x.ptr(),
                    rows,
                    w.ptr(),
                    bias.map(|b| b.ptr()),
                    out.ptr(),
                    out_dim,
                    in_dim,
                    self.opts.dtype,
                )?;
                self.after("GEMM")?;
                fused
            };
            if let (false, Some(b)) = (fused, bias) {
                self.bias_act(out.ptr(), Some(b.ptr()), rows, out_dim, ACT_NONE)?;
            }
            Ok(out)
        })
    }

    /// `h += x·wᵀ + bias` in one cuBLASLt call when it can (the stream `h` as C and D, the
    /// bias in its dtype); else, or with `fused_residual` off, a Linear and a residual add.
    fn linear_add(
        &self,
        h: &mut CudaTensor,
        x: &CudaTensor,
        rows: usize,
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<()> {
        let separate = |h: &mut CudaTensor| {
            let y = self.linear(x, rows, w, bias, out_dim, in_dim)?;
            self.add_assign(h, &y)
        };
        let h_type = h.dtype();
        if !self.opts.fused_residual
            || self.gemm.path() == GemmPath::Blas
            || rows == 0
            || out_dim == 0
            || in_dim == 0
            || (h_type != self.opts.dtype && h_type != DType::F32)
        {
            return separate(h);
        }
        let fused = self.profiled("linear+residual", || {
            self.storage("linear input", x)?;
            check_len("linear input", x.len(), rows * in_dim)?;
            check_len("linear weight", w.len(), out_dim * in_dim)?;
            check_len("residual", h.len(), rows * out_dim)?;
            // cuBLASLt takes the bias in the output's dtype: widened (once) for an f32 stream.
            let bias = match bias {
                None => None,
                Some(b) => {
                    check_len("linear bias", b.len(), out_dim)?;
                    Some(if b.dtype() == h_type {
                        b.ptr()
                    } else {
                        self.widened(b)?
                    })
                }
            };
            let r = self.gemm.linear_accumulate(
                &self.dev,
                x.ptr(),
                rows,
                w.ptr(),
                bias,
                h.ptr(),
                h_type,
                out_dim,
                in_dim,
                self.opts.dtype,
            );
            if r.is_ok() {
                self.after("GEMM + residual")?;
            }
            Ok(r.is_ok())
        })?;
        if fused {
            Ok(())
        } else {
            // No cuBLASLt algorithm for this problem (remembered by the Gemm).
            separate(h)
        }
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        dim: usize,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        self.profiled("layer_norm", || {
            let op = match (x.dtype(), self.opts.dtype) {
                (a, b) if a == b => "layer_norm",
                (DType::F32, _) => "layer_norm_from_f32",
                (a, b) => {
                    return Err(Error::invalid(format!(
                        "layer norm of a {a} tensor on a {b} backend"
                    )))
                }
            };
            self.layer_norm_as(op, x, dim, gamma, beta, eps, self.opts.dtype)
        })
    }

    /// The vision pre-LN, whose output starts the residual stream: f32 when widened.
    fn layer_norm_stream(
        &self,
        x: &CudaTensor,
        dim: usize,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        if self.stream_dtype() == self.opts.dtype {
            return self.layer_norm(x, dim, gamma, beta, eps);
        }
        self.profiled("layer_norm", || {
            if x.dtype() != DType::F32 {
                return Err(Error::invalid(format!(
                    "stream layer norm of a {} tensor (expected f32)",
                    x.dtype()
                )));
            }
            self.layer_norm_as(
                "layer_norm_f32_to_f32",
                x,
                dim,
                gamma,
                beta,
                eps,
                DType::F32,
            )
        })
    }

    /// The vectorised `activate` kernel (16-byte loads; buffers are 256-byte aligned, and the
    /// check keeps it honest), else `bias_act` without a bias, one value per thread.
    fn activate(&self, x: &mut CudaTensor, act: Activation) -> Result<()> {
        self.profiled("activation", || {
            self.storage("activation input", x)?;
            if x.is_empty() {
                return Ok(());
            }
            if x.ptr() % 16 != 0 {
                let mut start = 0;
                while start < x.len() {
                    let n = CHUNK.min(x.len() - start);
                    self.bias_act(x.buf.ptr_at(start), None, 1, n, act_code(act))?;
                    start += n;
                }
                return Ok(());
            }
            let per_load = (16 / x.dtype().size()) as u64;
            self.launch(
                "activate",
                Launch::elementwise((x.len() as u64).div_ceil(per_load)),
                &[
                    Arg::Ptr(x.ptr()),
                    Arg::I64(i64_of(x.len())),
                    Arg::I32(act_code(act)),
                ],
            )
        })
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        self.profiled("residual add", || {
            check_len("residual", y.len(), x.len())?;
            self.storage("residual add's block output", y)?;
            let op = match x.dtype() {
                d if d == y.dtype() => "add_assign",
                DType::F32 => "add_assign_into_f32",
                d => {
                    return Err(Error::invalid(format!(
                        "residual add of {} into a {d} tensor",
                        y.dtype()
                    )))
                }
            };
            if x.is_empty() {
                return Ok(());
            }
            self.launch(
                op,
                Launch::elementwise(x.len() as u64),
                &[
                    Arg::Ptr(x.ptr()),
                    Arg::Ptr(y.ptr()),
                    Arg::I64(i64_of(x.len())),
                ],
            )
        })
    }

    /// Per head h, strided-batched over the sequences: `S = scale · Q_h·K_hᵀ` into f32 scores
    /// `[batch, heads, queries, ld]` (ld = seq rounded up to 8, for aligned bf16 rows), the
    /// masked softmax into probabilities in the storage dtype (in place for f32), then
    /// `O_h = P·V_h` straight into the head's columns of the output.
    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        shape: AttentionShape,
        mask: &AttentionMask,
    ) -> Result<CudaTensor> {
        self.profiled("attention", || {
            let (batch, seq, nq, heads, hd) = (
                shape.batch,
                shape.seq,
                shape.queries,
                shape.heads,
                shape.head_dim,
            );
            let w = shape.width();
            check_len("q", q.len(), batch * nq * w)?;
            check_len("k", k.len(), batch * seq * w)?;
            check_len("v", v.len(), batch * seq * w)?;
            if nq > seq {
                return Err(Error::invalid(format!("{nq} queries for {seq} keys")));
            }
            if let Some(l) = &mask.lengths {
                check_len("attention lengths", l.len(), batch)?;
            }
            let out = self.empty(q.len())?;
            if q.is_empty() {
                return Ok(out);
            }
            let d = self.opts.dtype;
            // The kernel copies 16 bytes at a time (cp.async); buffers are 256-byte aligned,
            // and a view that is not falls back to the unfused path.
            let aligned = [q.ptr(), k.ptr(), v.ptr(), out.ptr()]
                .iter()
                .all(|p| p % 16 == 0);
            if self.fused_attention && d != DType::F32 && hd == FUSED_HEAD_DIM && aligned {
                self.fused_attention(q, k, v, &out, shape, mask)?;
                return Ok(out);
            }
            let ld = seq.next_multiple_of(8);
            let rows = batch * heads * nq;
            let scores = self.dev.alloc(rows * ld, DType::F32)?;
            let scale = 1.0 / (hd as f32).sqrt();
            for h in 0..heads {
                self.gemm.batched(
                    &self.dev,
                    &Batched {
                        transa: true,
                        transb: false,
                        m: seq,
                        n: nq,
                        k: hd,
                        alpha: scale,
                        a: k.buf.ptr_at(h * hd),
                        a_type: d,
                        lda: w,
                        stride_a: seq * w,
                        b: q.buf.ptr_at(h * hd),
                        b_type: d,
                        ldb: w,
                        stride_b: nq * w,
                        beta: 0.0,
                        c: scores.ptr_at(h * nq * ld),
                        c_type: DType::F32,
                        ldc: ld,
                        stride_c: heads * nq * ld,
                        batch,
                    },
                )?;
            }
            self.after("attention scores")?;
            let probs_buf;
            let probs = if d == DType::F32 {
                &scores
            } else {
                probs_buf = self.dev.alloc(rows * ld, d)?;
                &probs_buf
            };
            self.softmax(&scores, probs, batch, heads, nq, seq, ld, mask)?;
            for h in 0..heads {
                self.gemm.batched(
                    &self.dev,
                    &Batched {
                        transa: false,
                        transb: false,
                        m: hd,
                        n: nq,
                        k: seq,
                        alpha: 1.0,
                        a: v.buf.ptr_at(h * hd),
                        a_type: d,
                        lda: w,
                        stride_a: seq * w,
                        b: probs.ptr_at(h * nq * ld),
                        b_type: d,
                        ldb: ld,
                        stride_b: heads * nq * ld,
                        beta: 0.0,
                        c: out.buf.ptr_at(h * hd),
                        c_type: d,
                        ldc: w,
                        stride_c: nq * w,
                        batch,
                    },
                )?;
            }
            self.after("attention output")?;
            Ok(out)
        })
    }

    fn patchify(
        &self,
        pixels: &CudaTensor,
        batch: usize,
        channels: usize,
        size: usize,
        patch: usize,
    ) -> Result<CudaTensor> {
        self.profiled("patch embedding", || {
            check_len("pixels", pixels.len(), batch * channels * size * size)?;
            if patch == 0 {
                return Err(Error::invalid("patch size 0"));
            }
            let grid = size / patch;
            let out = self.empty(batch * grid * grid * channels * patch * patch)?;
            if !out.is_empty() {
                self.launch(
                    "patchify",
                    Launch::elementwise(out.len() as u64),
                    &[
                        Arg::Ptr(pixels.ptr()),
                        Arg::Ptr(out.ptr()),
                        Arg::I32(i32_of("batch", batch)?),
                        Arg::I32(i32_of("channels", channels)?),
                        Arg::I32(i32_of("size", size)?),
                        Arg::I32(i32_of("patch", patch)?),
                    ],
                )?;
            }
            Ok(out)
        })
    }

    fn vision_tokens(
        &self,
        patches: &CudaTensor,
        batch: usize,
        class_embedding: &CudaTensor,
        positions: &CudaTensor,
        dim: usize,
    ) -> Result<CudaTensor> {
        self.profiled("patch embedding", || {
            if dim == 0 || positions.len() % dim != 0 || positions.len() < dim {
                return Err(Error::invalid(format!(
                    "position embeddings: {} values are not tokens of {dim}",
                    positions.len()
                )));
            }
            let tokens = positions.len() / dim;
            check_len("class embedding", class_embedding.len(), dim)?;
            check_len(
                "patch embeddings",
                patches.len(),
                batch * (tokens - 1) * dim,
            )?;
            self.storage("patch embeddings", patches)?;
            let out = self.empty_of(batch * tokens * dim, self.stream_dtype())?;
            if !out.is_empty() {
                self.launch(
                    &self.to_stream("vision_tokens"),
                    Launch::elementwise(out.len() as u64),
                    &[
                        Arg::Ptr(patches.ptr()),
                        Arg::Ptr(class_embedding.ptr()),
                        Arg::Ptr(positions.ptr()),
                        Arg::Ptr(out.ptr()),
                        Arg::I32(i32_of("batch", batch)?),
                        Arg::I32(i32_of("tokens", tokens)?),
                        Arg::I32(i32_of("dim", dim)?),
                    ],
                )?;
            }
            Ok(out)
        })
    }

    fn text_tokens(
        &self,
        ids: &[u32],
        seq: usize,
        table: &CudaTensor,
        positions: &CudaTensor,
        dim: usize,
    ) -> Result<CudaTensor> {
        self.profiled("token embedding", || {
            crate::backend::check_text_tokens(ids, seq, table.len(), positions.len(), dim)?;
            let out = self.empty_of(ids.len() * dim, self.stream_dtype())?;
            if ids.is_empty() {
                return Ok(out);
            }
            if seq == 0 {
                return Err(Error::invalid("text tokens: sequence length 0"));
            }
            let dev_ids = self.indices(ids)?;
            self.launch(
                &self.to_stream("text_tokens"),
                Launch::elementwise(out.len() as u64),
                &[
                    Arg::Ptr(dev_ids.ptr()),
                    Arg::Ptr(table.ptr()),
                    Arg::Ptr(positions.ptr()),
                    Arg::Ptr(out.ptr()),
                    Arg::I64(i64_of(ids.len())),
                    Arg::I32(i32_of("seq", seq)?),
                    Arg::I32(i32_of("dim", dim)?),
                ],
            )?;
            Ok(out)
        })
    }

    /// `y0 − xv[:, :rank] · su[:rank, :]`: one cuBLAS GEMM (alpha −1, beta 1) on a copy of
    /// y0. Column-major: `Y' (out × rows) −= SU' (out × rank, ld out) · XV' (rank × rows, ld
    /// kmax)`. (The fused kernel for a nest of ranks is still to come: kernels/README.md.)
    fn lowrank_correct(
        &self,
        y0: &CudaTensor,
        xv: &CudaTensor,
        rows: usize,
        kmax: usize,
        rank: usize,
        su: &CudaTensor,
        out_dim: usize,
    ) -> Result<CudaTensor> {
        self.profiled("low-rank correction", || {
            check_len("y0", y0.len(), rows * out_dim)?;
            check_len("x·V", xv.len(), rows * kmax)?;
            check_len("σu", su.len(), kmax * out_dim)?;
            if rank > kmax {
                return Err(Error::invalid(format!(
                    "rank {rank} exceeds the {kmax} prepared components"
                )));
            }
            let out = self.empty(y0.len())?;
            self.dev.copy(&y0.buf, &out.buf)?;
            if rank == 0 || rows == 0 || out_dim == 0 {
                return Ok(out);
            }
            let d = self.opts.dtype;
            self.gemm.batched(
                &self.dev,
                &Batched {
                    transa: false,
                    transb: false,
                    m: out_dim,
                    n: rows,
                    k: rank,
                    alpha: -1.0,
                    a: su.ptr(),
                    a_type: d,
                    lda: out_dim,
                    stride_a: 0,
                    b: xv.ptr(),
                    b_type: d,
                    ldb: kmax,
                    stride_b: 0,
                    beta: 1.0,
                    c: out.ptr(),
                    c_type: d,
                    ldc: out_dim,
                    stride_c: 0,
                    batch: 1,
                },
            )?;
            self.after("low-rank correction")?;
            Ok(out)
        })
    }

    fn gather_rows(&self, x: &CudaTensor, dim: usize, rows: &[usize]) -> Result<CudaTensor> {
        self.profiled("gather rows", || {
            if dim == 0 {
                return Err(Error::invalid("gather rows: dim 0"));
            }
            let n = x.len() / dim;
            if let Some(&r) = rows.iter().find(|&&r| r >= n) {
                return Err(Error::invalid(format!("row {r} out of {n}")));
            }
            // Any dtype (residual-stream rows are f32 when widened).
            let out = self.empty_of(rows.len() * dim, x.dtype())?;
            if rows.is_empty() {
                return Ok(out);
            }
            let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
            let dev_rows = self.indices(&idx)?;
            let name = format!("gather_rows_{}", x.dtype().name());
            // Rows of whole 16-byte words go a warp per row (the kernel checks the same; any
            // grid is correct, this one has no idle blocks).
            let words = (dim * x.dtype().size()) % 16 == 0 && x.ptr() % 16 == 0;
            let cfg = if words {
                Launch::rows(rows.len() as u64)?
            } else {
                Launch::elementwise(out.len() as u64)
            };
            self.kernels.launch(
                &self.dev,
                &name,
                cfg,
                &[
                    Arg::Ptr(x.ptr()),
                    Arg::Ptr(dev_rows.ptr()),
                    Arg::Ptr(out.ptr()),
                    Arg::I64(i64_of(rows.len())),
                    Arg::I32(i32_of("dim", dim)?),
                ],
            )?;
            self.after(&name)?;
            Ok(out)
        })
    }

    fn concat_rows(&self, parts: &[CudaTensor]) -> Result<CudaTensor> {
        self.profiled("copy", || {
            let dtype = parts.first().map_or(self.opts.dtype, |p| p.dtype());
            let out = self.empty_of(parts.iter().map(CudaTensor::len).sum(), dtype)?;
            let mut at = 0;
            for p in parts {
                self.dev.copy_at(&p.buf, &out.buf, at)?;
                at += p.len();
            }
            Ok(out)
        })
    }

    fn l2_normalize(&self, x: &mut CudaTensor, dim: usize) -> Result<()> {
        self.profiled("l2 normalise", || self.l2_normalize_rows(x, dim))
    }

    fn first_non_finite(&self, x: &CudaTensor) -> Result<Option<usize>> {
        self.profiled("finite check", || self.first_non_finite_index(x))
    }

    fn logit_row_stats(
        &self,
        x: &CudaTensor,
        text: &CudaTensor,
        dim: usize,
        scale: f32,
        labels: &[usize],
        rows_per_label: usize,
        temperature: f64,
    ) -> Result<Vec<RowStats>> {
        self.profiled("logits + row stats", || {
            let (out, rows) =
                self.row_stats_on_device(x, text, dim, scale, labels, rows_per_label, temperature)?;
            let raw: Vec<f64> = self.dev.download_raw(&out, rows * 5)?;
            Ok(raw
                .chunks_exact(5)
                .map(|r| RowStats {
                    argmax: r[0] as usize,
                    cross_entropy: r[1],
                    label_rank: r[2] as usize,
                    entropy: r[3],
                    sum_exp_t: r[4],
                })
                .collect())
        })
    }

    /// Row statistics on the device, then `ood_sums_f32` per image: three doubles per image
    /// come back.
    fn logit_ood_sums(
        &self,
        x: &CudaTensor,
        text: &CudaTensor,
        dim: usize,
        scale: f32,
        labels: &[usize],
        patches: usize,
        top_k: usize,
    ) -> Result<Vec<OodSums>> {
        self.profiled("logits + OOD sums", || {
            let (stats, rows) =
                self.row_stats_on_device(x, text, dim, scale, labels, patches, 1.0)?;
            let images = rows / patches.max(1);
            let out = self.dev.alloc_raw(images * 3 * 8)?;
            if images > 0 {
                self.kernels.launch(
                    &self.dev,
                    "ood_sums_f32",
                    Launch::elementwise(images as u64),
                    &[
                        Arg::Ptr(stats.ptr()),
                        Arg::I32(i32_of("images", images)?),
                        Arg::I32(i32_of("patches", patches)?),
                        Arg::I32(i32_of("top_k", top_k)?),
                        Arg::Ptr(out.ptr()),
                    ],
                )?;
                self.after("ood_sums_f32")?;
            }
            let raw: Vec<f64> = self.dev.download_raw(&out, images * 3)?;
            Ok(raw
                .chunks_exact(3)
                .map(|r| OodSums {
                    entropy_sum: r[0],
                    ood_patches: r[1] as usize,
                    non_finite: r[2] as usize,
                })
                .collect())
        })
    }

    /// `w − su[:rank]ᵀ · vt[:rank]` by one GEMM on a copy of w. Column-major: W' (in × out)
    /// −= VT' (in × rank, ld in) · SU'ᵀ (rank × out; SU' is out × rank, ld out).
    fn lowrank_weight(
        &self,
        w: &CudaTensor,
        vt: &CudaTensor,
        su: &CudaTensor,
        rank: usize,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Option<CudaTensor>> {
        check_len("weight", w.len(), out_dim * in_dim)?;
        if in_dim == 0 || out_dim == 0 {
            return Err(Error::invalid("low-rank weight: empty matrix"));
        }
        let kmax = vt.len() / in_dim;
        if vt.len() != kmax * in_dim || su.len() != kmax * out_dim || rank > kmax {
            return Err(Error::invalid(format!(
                "low-rank weight: rank {rank} from factors of {} and {} values for [{out_dim}, {in_dim}]",
                vt.len(),
                su.len()
            )));
        }
        let out = self.duplicate(w)?;
        if rank == 0 {
            return Ok(Some(out));
        }
        let d = self.opts.dtype;
        self.gemm.batched(
            &self.dev,
            &Batched {
                transa: false,
                transb: true,
                m: in_dim,
                n: out_dim,
                k: rank,
                alpha: -1.0,
                a: vt.ptr(),
                a_type: d,
                lda: in_dim,
                stride_a: 0,
                b: su.ptr(),
                b_type: d,
                ldb: out_dim,
                stride_b: 0,
                beta: 1.0,
                c: out.ptr(),
                c_type: d,
                ldc: in_dim,
                stride_c: 0,
                batch: 1,
            },
        )?;
        self.after("low-rank weight")?;
        Ok(Some(out))
    }

    fn svd_schedule(&self) -> SvdSchedule {
        self.opts.svd
    }

    /// 256: the batch every device figure was measured at (BENCHMARKS.md; the search's chunk
    /// 250). At the CPU's 32 (not timed on a GPU), a ViT-B/16 layer's GEMMs have 6304 rows,
    /// a few waves of tiles, so the last wave's idle multiprocessors and each op's launch
    /// weigh 8× more. A search under `--max-memory` lowers it to fit.
    fn default_batch(&self) -> usize {
        256
    }

    fn prompt_buckets(&self) -> BucketPlan {
        self.opts.prompt_buckets
    }

    fn candidates_as_weights(&self) -> bool {
        self.opts.candidate_weights
    }

    fn stack_text_candidates(&self) -> bool {
        self.opts.stack_text
    }

    /// Half the device's free memory: ViT-B/16's 9 more states for 1000 images (5.4 GB)
    /// fit on an H200 many times over; CLIP-L/14's 19 (20 GB) do not fit on a 24 GB card.
    fn room_for_vision_states(&self) -> Option<usize> {
        self.dev.memory().ok().map(|(free, _)| free / 2)
    }

    fn warm_up_svds(&self) {
        let mut slot = self.svd_warm_up.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(super::svd::start_warm_up(&self.dev, self.opts.eig));
        }
    }

    /// cuSOLVER (svd.rs) on a stream of its own: its kernels run beside the search's, and
    /// only the thread calling it waits for them.
    fn side_svd_solver(&self) -> Result<SideSolver> {
        let side = self.dev.with_new_stream()?;
        let eig = self.opts.eig;
        Ok(Box::new(move |mats| {
            side.bind()?;
            super::svd::thin_svds(&side, mats, eig, &mut super::svd::Phases::new(&side, false))
        }))
    }

    /// cuSOLVER (svd.rs); when profiling, each phase is an op of [`CudaBackend::profile`].
    fn thin_svds(&self, mats: &[(&[f32], usize, usize)]) -> Result<Vec<Svd>> {
        // A warm-up still running would only compete with these; it cannot fail them.
        let warm_up = self
            .svd_warm_up
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = warm_up {
            let _ = t.join();
        }
        let mut phases = super::svd::Phases::new(&self.dev, self.profile.is_some());
        let svds = super::svd::thin_svds(&self.dev, mats, self.opts.eig, &mut phases)?;
        self.after("SVD")?;
        if let Some(p) = &self.profile {
            let mut m = p.lock().unwrap_or_else(|e| e.into_inner());
            for (phase, s) in phases.seconds {
                let e = m.entry(phase).or_insert((0.0, 0));
                e.0 += s;
                e.1 += 1;
            }
        }
        Ok(svds)
    }
}
