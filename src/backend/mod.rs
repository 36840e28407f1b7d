//! One small trait of tensor ops; the CLIP towers are written once against it.
//! `cpu` is the default backend; CUDA (feature `cuda`) implements the same trait.

pub mod blas;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fastmath;
pub mod row_stats;

use crate::config::Activation;
use crate::error::{Error, Result};
use crate::lowrank::Svd;
use crate::model::prompts::{BucketPlan, PROMPT_BUCKET};
use crate::weights::F32Data;
use rayon::prelude::*;
pub use row_stats::RowStats;

/// Batched multi-head attention: keys and values are `[batch * seq, heads * head_dim]`,
/// queries `[batch * queries, heads * head_dim]` — the first `queries` positions of each
/// sequence (all of them, or just the class token when only pooled features are needed).
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub queries: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Which keys a query may see.
#[derive(Clone, Debug, Default)]
pub struct AttentionMask {
    /// Query i sees keys j <= i only (the text tower).
    pub causal: bool,
    /// Per sequence, the number of real (non-padding) tokens; keys at or past it are hidden.
    pub lengths: Option<Vec<usize>>,
}

/// ‖got − want‖ / ‖want‖ in f64: how the CUDA self-checks and the device check compare a
/// backend with the CPU (NaN when the lengths differ; an all-zero reference counts as 1e-30).
pub fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::NAN;
    }
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Checks token ids `[batch, seq]` against an embedding table of `table` values and
/// `positions` position-embedding values, rows of `dim`: shared by every backend's
/// `text_tokens`, so a bad id or an over-long sequence is an error, never an out-of-bounds read.
pub fn check_text_tokens(
    ids: &[u32],
    seq: usize,
    table: usize,
    positions: usize,
    dim: usize,
) -> Result<()> {
    if dim == 0 {
        return Err(Error::invalid("text tokens: dim 0"));
    }
    let vocab = table / dim;
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(Error::invalid(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    if seq * dim > positions {
        return Err(Error::invalid(format!(
            "{seq} tokens exceed the model's {} positions",
            positions / dim
        )));
    }
    Ok(())
}

/// Where a search computes the SVDs of its targets: by the backend's [`Backend::thin_svds`]
/// or on host threads (faer in f64, [`Svd::new`]). The schedule changes only when each SVD is
/// ready, not the search's decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvdSchedule {
    /// All by [`Backend::thin_svds`] before the first step.
    UpFront,
    /// All on host threads beside the search (a device backend: the host mostly waits), each
    /// step waiting only for its own target's.
    Background,
    /// The first target's by [`Backend::thin_svds`], since the first step needs it at once, and
    /// the rest on host threads beside the search.
    FirstThenBackground,
    /// The first target's by [`Backend::thin_svds`], the rest by [`Backend::side_svd_solver`]
    /// (a device: the same cuSOLVER arithmetic on a second stream, beside the search's work)
    /// from one host thread, a run of equal shapes at a time, in plan order.
    SideStream,
}

/// Computes the SVDs of a run of matrices (`[out, in]` row-major, as [`Svd::new`] takes
/// them) apart from the backend's own queue, called from a thread of its own
/// ([`SvdSchedule::SideStream`]); a device batches a run of equal shapes.
pub type SideSolver = Box<dyn Fn(&[(&[f32], usize, usize)]) -> Result<Vec<Svd>> + Send>;

/// Tensor ops the model needs. Activations are row-major `[rows, dim]` f32.
pub trait Backend: Send + Sync {
    /// Mutable activations living on the backend.
    type Tensor: Send + Sync;
    /// Read-only parameters living on the backend.
    type Weight: Send + Sync;

    fn name(&self) -> String;
    /// Bytes per stored value of tensors and weights (4 for f32).
    fn value_bytes(&self) -> usize {
        4
    }
    /// The device memory our buffers may hold (`--max-memory`), if capped.
    fn memory_budget(&self) -> Option<usize> {
        None
    }
    fn weight(&self, data: F32Data) -> Result<Self::Weight>;
    fn tensor(&self, data: Vec<f32>) -> Result<Self::Tensor>;
    /// [`Backend::tensor`] from borrowed values (a device copies them without an
    /// intermediate host vector). Default: a copy, then `tensor`.
    fn tensor_from(&self, data: &[f32]) -> Result<Self::Tensor> {
        self.tensor(data.to_vec())
    }
    fn to_vec(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// A copy of `t` on the same device.
    fn duplicate(&self, t: &Self::Tensor) -> Result<Self::Tensor>;

    /// `x[rows, in] · w[out, in]ᵀ + bias[out]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        rows: usize,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Self::Tensor>;
    /// `h += x[rows, in] · w[out, in]ᵀ + bias[out]`: a block's output added into the residual
    /// stream `h[rows, out]`. Default: [`Backend::linear`], then [`Backend::add_assign`]; a
    /// device may fuse the two (the add in the GEMM's epilogue).
    #[allow(clippy::too_many_arguments)]
    fn linear_add(
        &self,
        h: &mut Self::Tensor,
        x: &Self::Tensor,
        rows: usize,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<()> {
        let y = self.linear(x, rows, w, bias, out_dim, in_dim)?;
        self.add_assign(h, &y)
    }
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        dim: usize,
        gamma: &Self::Weight,
        beta: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Tensor>;
    /// A LayerNorm whose output starts the residual stream (the vision pre-LN): a backend
    /// may keep it wider than its storage dtype. Default: [`Backend::layer_norm`].
    fn layer_norm_stream(
        &self,
        x: &Self::Tensor,
        dim: usize,
        gamma: &Self::Weight,
        beta: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Tensor> {
        self.layer_norm(x, dim, gamma, beta, eps)
    }
    fn activate(&self, x: &mut Self::Tensor, act: Activation) -> Result<()>;
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// softmax(q·kᵀ / √head_dim + mask) · v, per sequence and head.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        shape: AttentionShape,
        mask: &AttentionMask,
    ) -> Result<Self::Tensor>;
    /// Images `[batch, channels, size, size]` → patches `[batch * grid², channels * patch²]`,
    /// each patch flattened in (channel, row, column) order like a conv weight.
    fn patchify(
        &self,
        pixels: &Self::Tensor,
        batch: usize,
        channels: usize,
        size: usize,
        patch: usize,
    ) -> Result<Self::Tensor>;
    /// `[batch * grid², dim]` patch embeddings → `[batch * (grid² + 1), dim]` tokens: the class
    /// embedding first, then the patches, plus position embeddings.
    fn vision_tokens(
        &self,
        patches: &Self::Tensor,
        batch: usize,
        class_embedding: &Self::Weight,
        positions: &Self::Weight,
        dim: usize,
    ) -> Result<Self::Tensor>;
    /// Token embeddings of `ids` (`[batch, seq]`) plus position embeddings.
    fn text_tokens(
        &self,
        ids: &[u32],
        seq: usize,
        table: &Self::Weight,
        positions: &Self::Weight,
        dim: usize,
    ) -> Result<Self::Tensor>;
    /// The low-rank correction of a Linear: `y0[rows, out] − xv[:, :rank] · su[:rank, :]` with
    /// `xv = x·V` of shape `[rows, kmax]` and `su` (rows σᵢuᵢ) of shape `[kmax, out]`.
    #[allow(clippy::too_many_arguments)]
    fn lowrank_correct(
        &self,
        y0: &Self::Tensor,
        xv: &Self::Tensor,
        rows: usize,
        kmax: usize,
        rank: usize,
        su: &Self::Weight,
        out_dim: usize,
    ) -> Result<Self::Tensor>;
    /// Rows `rows` of `x[_, dim]`, in that order.
    fn gather_rows(&self, x: &Self::Tensor, dim: usize, rows: &[usize]) -> Result<Self::Tensor>;
    /// The rows of `parts`, one after another, in one tensor (same dtype for all). Default:
    /// through the host.
    fn concat_rows(&self, parts: &[Self::Tensor]) -> Result<Self::Tensor> {
        let mut all = Vec::new();
        for p in parts {
            all.extend(self.to_vec(p)?);
        }
        self.tensor(all)
    }

    /// L2-normalises each row of `x[_, dim]` in place. Default: on the host.
    fn l2_normalize(&self, x: &mut Self::Tensor, dim: usize) -> Result<()> {
        let mut v = self.to_vec(x)?;
        crate::model::clip::l2_normalize_rows(&mut v, dim);
        *x = self.tensor(v)?;
        Ok(())
    }

    /// The index of the first non-finite value (NaN or ±inf) of `x`, if any: one number
    /// leaves the backend. Default: on the host.
    fn first_non_finite(&self, x: &Self::Tensor) -> Result<Option<usize>> {
        Ok(self.to_vec(x)?.iter().position(|v| !v.is_finite()))
    }

    /// [`RowStats`] of each row of the logits `scale · x[rows, dim] · text[classes, dim]ᵀ`,
    /// row r against `labels[r / rows_per_label]`, `sum_exp_t` at `temperature`: what the
    /// loss and the scores need, without the logits leaving the backend. Default: the logits
    /// on the host, then [`row_stats::row_stats_host`] (the CPU twin of the device kernel).
    #[allow(clippy::too_many_arguments)]
    fn logit_row_stats(
        &self,
        x: &Self::Tensor,
        text: &Self::Tensor,
        dim: usize,
        scale: f32,
        labels: &[usize],
        rows_per_label: usize,
        temperature: f64,
    ) -> Result<Vec<RowStats>> {
        let (x, text) = (self.to_vec(x)?, self.to_vec(text)?);
        let (rows, classes) = row_stats::logit_shape(x.len(), text.len(), dim)?;
        let mut logits = vec![0.0; rows * classes];
        cpu::linear_into(&x, rows, &text, None, classes, dim, &mut logits);
        logits.iter_mut().for_each(|v| *v *= scale);
        row_stats::row_stats_host(&logits, classes, labels, rows_per_label, temperature)
    }

    /// Per image, the [`row_stats::OodSums`] of its `patches` local rows of logits
    /// `scale · x · textᵀ` against `labels[image]` and `top_k`: three numbers per image leave
    /// the backend. Default: [`Backend::logit_row_stats`], then [`row_stats::ood_sums_host`].
    #[allow(clippy::too_many_arguments)]
    fn logit_ood_sums(
        &self,
        x: &Self::Tensor,
        text: &Self::Tensor,
        dim: usize,
        scale: f32,
        labels: &[usize],
        patches: usize,
        top_k: usize,
    ) -> Result<Vec<row_stats::OodSums>> {
        let stats = self.logit_row_stats(x, text, dim, scale, labels, patches, 1.0)?;
        Ok(row_stats::ood_sums_host(&stats, patches, top_k))
    }

    /// W' = `w[out, in]` − `su[:rank]ᵀ · vt[:rank]` (a low-rank setting's weight) computed by
    /// the backend, from the factors of [`Svd::removed_factors`]; `None` when the backend
    /// leaves it to the caller (the CPU: `Svd::pruned` in f64, as the reference fixtures expect).
    #[allow(clippy::too_many_arguments)]
    fn lowrank_weight(
        &self,
        _w: &Self::Weight,
        _vt: &Self::Weight,
        _su: &Self::Weight,
        _rank: usize,
        _out_dim: usize,
        _in_dim: usize,
    ) -> Result<Option<Self::Weight>> {
        Ok(None)
    }

    /// Images per forward batch when the user gives no `--batch`. Default (the CPU): 32, where
    /// a larger batch is no faster and holds more memory.
    fn default_batch(&self) -> usize {
        32
    }

    /// How the text tower groups prompts into batches. Default (the CPU): sorted by length,
    /// [`PROMPT_BUCKET`] at a time, the least padding.
    fn prompt_buckets(&self) -> BucketPlan {
        BucketPlan::Fixed {
            rows: PROMPT_BUCKET,
        }
    }

    /// Whether the search runs a candidate's Linear with its own W' (made by
    /// [`Backend::lowrank_weight`]) instead of the shared-product correction
    /// `y0 − (x·V)[:, :rank]·SU[:rank]`. Default (the CPU): the correction, whose rank is below
    /// the Linear's input width, so it is the less arithmetic. A device's tensor cores make the
    /// full GEMM cheap and the correction's reading and writing of y0 the cost.
    fn candidates_as_weights(&self) -> bool {
        false
    }

    /// Whether a text step runs its candidates stacked into one batch through the layers
    /// above the target (each candidate's target layer runs alone): the same values with a
    /// fraction of the launches. Default: yes.
    fn stack_text_candidates(&self) -> bool {
        true
    }

    /// Bytes the search may spend keeping the hidden states entering every vision layer
    /// beyond its checkpoints (`memory::vision_state_layers`), or None to keep only the
    /// checkpoints. Default: None.
    fn room_for_vision_states(&self) -> Option<usize> {
        None
    }

    /// Where the search computes its SVDs. Default (the CPU, whose cores the search itself
    /// uses): all up front.
    fn svd_schedule(&self) -> SvdSchedule {
        SvdSchedule::UpFront
    }

    /// A hint that SVDs are coming (a search): a device may load its solver now, beside the
    /// caller's other work, rather than inside the first [`Backend::thin_svds`]. Default: nothing.
    fn warm_up_svds(&self) {}

    /// The solver of [`SvdSchedule::SideStream`]. Default: faer ([`Svd::new`]) on the calling
    /// thread, one matrix after another.
    fn side_svd_solver(&self) -> Result<SideSolver> {
        Ok(Box::new(|mats| {
            mats.iter().map(|(w, o, i)| Svd::new(w, *o, *i)).collect()
        }))
    }

    /// Thin SVDs of row-major `[out, in]` weights, as [`Svd::new`] computes them. Default: faer
    /// on the CPU, the matrices in parallel.
    fn thin_svds(&self, mats: &[(&[f32], usize, usize)]) -> Result<Vec<Svd>> {
        mats.par_iter()
            .map(|(w, o, i)| Svd::new(w, *o, *i))
            .collect()
    }
}
