//! One small trait of tensor ops; the CLIP towers are written once against it.
//! `cpu` is the default backend; CUDA (feature `cuda`) implements the same trait.

pub mod blas;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fastmath;

use crate::config::Activation;
use crate::error::Result;
use crate::weights::F32Data;

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

/// Tensor ops the model needs. Activations are row-major `[rows, dim]` f32.
pub trait Backend: Send + Sync {
    /// Mutable activations living on the backend.
    type Tensor: Send + Sync;
    /// Read-only parameters living on the backend.
    type Weight: Send + Sync;

    fn name(&self) -> String;
    fn weight(&self, data: F32Data) -> Result<Self::Weight>;
    fn tensor(&self, data: Vec<f32>) -> Result<Self::Tensor>;
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
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        dim: usize,
        gamma: &Self::Weight,
        beta: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Tensor>;
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
}
