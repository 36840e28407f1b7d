//! The LoCoOp loss, the default objective of the SeTAR search, computed as the reference's
//! `compute_metrics_loss` does, but streamed: each image is reduced to a few sufficient
//! statistics ([`ImageStats`]) and the statistics are then averaged ([`reduce`]).
//!
//! Logits are scaled (cosine × exp(logit_scale)); no temperature is applied here.
//!
//! - `loss_id`: cross-entropy of the global logits against the TRUE label.
//! - OOD patch: a patch whose top-K local logits do not contain the OOD-patch label (the true
//!   label, or with `use_pred_label` the argmax of the global logits, first index on ties).
//! - `loss_ood` = −(mean over OOD patches of −Σ p·ln(p + 1e-5)), p = softmax(local logits of
//!   the patch); 0 when there is no OOD patch.
//! - `locoop_loss = loss_id + λ·loss_ood`; `acc` = % of images whose argmax is the true label;
//!   `ood_patch_percent` = % of patches that are OOD patches.
//!
//! **Top-K with ties.** The label is among the top-K of a patch iff its rank
//! `#{c : x_c > x_label} + #{c < label : x_c = x_label}` is < K, i.e. tied values are taken in
//! index order, lower index first. Values are compared in the total order of
//! [`f32::total_cmp`] (so −0.0 < +0.0). This is what `torch.topk` does on CUDA, where the
//! reference ran (its radix select orders floats by the same bit transform and fills the
//! places left at the K-th value with the tied elements in index order); `torch.topk` on CPU
//! picks among tied elements in an unspecified order. Without ties at the K-th value all agree.
//!
//! **Averaging.** The reference evaluates batches of 512 consecutive images and records each
//! batch's values once per image of the batch; the result is the mean over images, so batches
//! weigh by their size. `loss_id`, `acc` and (with a constant patch count) `ood_patch_percent`
//! come out as whole-set means anyway; only `loss_ood` (a ratio per batch) and hence
//! `locoop_loss` depend on the batching. [`Averaging::WholeSet`] uses one batch of all images.

use crate::backend::fastmath;
use crate::score::{check_finite, max_f32, sum_f64};
use crate::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// The batch size of the reference's search configurations for CLIP.
pub const DEFAULT_BATCH: usize = 512;
/// The ε inside the entropy's logarithm: −Σ p·ln(p + ε).
pub const ENTROPY_EPS: f32 = 1e-5;

/// How the per-image statistics are averaged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Averaging {
    /// The reference: batches of this many consecutive images (dataset order), each image
    /// weighted by its batch's values.
    PerBatch(usize),
    /// One batch holding every image.
    WholeSet,
}

impl Default for Averaging {
    fn default() -> Self {
        Averaging::PerBatch(DEFAULT_BATCH)
    }
}

/// LoCoOp loss settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocoopConfig {
    /// Weight of `loss_ood`.
    pub lambda: f64,
    /// A patch is an OOD patch when the label is not among its `top_k` local logits.
    pub top_k: usize,
    /// Use the predicted label (argmax of the global logits) to find OOD patches.
    pub use_pred_label: bool,
    pub averaging: Averaging,
}

impl LocoopConfig {
    /// λ and K with the reference's defaults otherwise (true label, batches of 512).
    pub fn new(lambda: f64, top_k: usize) -> Self {
        LocoopConfig {
            lambda,
            top_k,
            use_pred_label: false,
            averaging: Averaging::default(),
        }
    }

    /// The settings of one of the reference's search configurations.
    pub fn preset(preset: LocoopPreset) -> Self {
        let (lambda, top_k, batch) = preset.values();
        LocoopConfig {
            averaging: Averaging::PerBatch(batch),
            ..LocoopConfig::new(lambda, top_k)
        }
    }

    pub(crate) fn validate(&self, classes: usize) -> Result<()> {
        if !self.lambda.is_finite() {
            return Err(Error::invalid(format!(
                "LoCoOp lambda must be finite, got {}",
                self.lambda
            )));
        }
        if self.top_k == 0 || self.top_k > classes {
            return Err(Error::invalid(format!(
                "LoCoOp top_k must be in 1..={classes} (the number of classes), got {}",
                self.top_k
            )));
        }
        if self.averaging == Averaging::PerBatch(0) {
            return Err(Error::invalid("LoCoOp batch size must be > 0"));
        }
        Ok(())
    }
}

/// (λ, K, batch) of the reference's `configs/training_free/*/SeTAR.json` search configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LocoopPreset {
    /// CLIP ViT-B/16, ImageNet-1K: λ 0.1, K 300, batch 512.
    #[value(name = "clip_b_imagenet")]
    ClipBImagenet,
    /// CLIP ViT-B/16, Pascal-VOC: λ 0.05, K 4, batch 512.
    #[value(name = "clip_b_voc")]
    ClipBVoc,
    /// CLIP ViT-L/14, ImageNet-1K: λ 0.5, K 300, batch 512.
    #[value(name = "clip_l_imagenet")]
    ClipLImagenet,
    /// CLIP ViT-L/14, Pascal-VOC: λ 0.3, K 6, batch 512.
    #[value(name = "clip_l_voc")]
    ClipLVoc,
    /// Swin-v2-B, ImageNet-1K: λ 0.01, K 700, batch 384 (its scores use T = 1).
    #[value(name = "swin_b_imagenet")]
    SwinBImagenet,
}

impl LocoopPreset {
    /// (λ, K, batch size).
    pub fn values(self) -> (f64, usize, usize) {
        match self {
            LocoopPreset::ClipBImagenet => (0.1, 300, 512),
            LocoopPreset::ClipBVoc => (0.05, 4, 512),
            LocoopPreset::ClipLImagenet => (0.5, 300, 512),
            LocoopPreset::ClipLVoc => (0.3, 6, 512),
            LocoopPreset::SwinBImagenet => (0.01, 700, 384),
        }
    }
}

/// What one image contributes to the loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageStats {
    /// Cross-entropy of the global logits against the true label.
    pub ce: f64,
    /// Σ over the OOD patches of −Σ_c p·ln(p + 1e-5).
    pub entropy_sum: f64,
    /// Number of OOD patches.
    pub ood_patches: usize,
    /// Number of patches.
    pub patches: usize,
    /// Whether the argmax of the global logits is the true label.
    pub correct: bool,
}

/// The reduced loss, with the reference's key names (`acc` and `ood_patch_percent` in %).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LossParts {
    pub locoop_loss: f64,
    pub loss_id: f64,
    pub loss_ood: f64,
    pub acc: f64,
    pub ood_patch_percent: f64,
}

/// Index of the largest logit, the first one on ties (as `torch.argmax`).
pub fn predicted_label(global: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in global.iter().enumerate() {
        if x > global[best] {
            best = i;
        }
    }
    best
}

/// Per patch of `local` (`[patches × classes]`): true when `label` is NOT among the patch's
/// `top_k` logits (see the module docs for ties).
pub fn ood_patch_mask(
    local: &[f32],
    classes: usize,
    label: usize,
    top_k: usize,
) -> Result<Vec<bool>> {
    check_local(local, classes)?;
    check_label(label, classes)?;
    if top_k == 0 || top_k > classes {
        return Err(Error::invalid(format!(
            "top_k must be in 1..={classes} (the number of classes), got {top_k}"
        )));
    }
    Ok(local
        .chunks_exact(classes)
        .map(|row| label_rank(row, label) >= top_k)
        .collect())
}

/// The statistics of one image: `global` is `[classes]`, `local` `[patches × classes]`.
pub fn image_stats(
    global: &[f32],
    local: &[f32],
    classes: usize,
    label: usize,
    cfg: &LocoopConfig,
) -> Result<ImageStats> {
    let mut mask = Vec::new();
    image_stats_with_mask(global, local, classes, label, cfg, &mut mask)
}

/// [`image_stats`] that also leaves the image's OOD-patch mask in `mask` (for the OOD-patch
/// scores of the metric objective, [`crate::score::ood_patch_scores`]).
pub fn image_stats_with_mask(
    global: &[f32],
    local: &[f32],
    classes: usize,
    label: usize,
    cfg: &LocoopConfig,
    mask: &mut Vec<bool>,
) -> Result<ImageStats> {
    cfg.validate(classes)?;
    if global.len() != classes {
        return Err(Error::invalid(format!(
            "global logits: {} values for {classes} classes",
            global.len()
        )));
    }
    check_finite("global logits", global)?;
    let patches = check_local(local, classes)?;
    check_label(label, classes)?;

    let pred = predicted_label(global);
    let ood_label = if cfg.use_pred_label { pred } else { label };
    let ce = cross_entropy(global, label);

    mask.clear();
    let mut scratch = vec![0f32; classes];
    let mut entropy_sum = 0.0;
    let mut ood_patches = 0;
    for row in local.chunks_exact(classes) {
        let ood = label_rank(row, ood_label) >= cfg.top_k;
        mask.push(ood);
        if ood {
            ood_patches += 1;
            entropy_sum += patch_entropy(row, &mut scratch);
        }
    }
    Ok(ImageStats {
        ce,
        entropy_sum,
        ood_patches,
        patches,
        correct: pred == label,
    })
}

/// [`image_stats`] of a batch of images in parallel: `global` is `[images × classes]`, `local`
/// `[images × patches × classes]`, one label per image.
pub fn batch_stats(
    global: &[f32],
    local: &[f32],
    labels: &[usize],
    classes: usize,
    cfg: &LocoopConfig,
) -> Result<Vec<ImageStats>> {
    let n = labels.len();
    if n == 0 || classes == 0 {
        return Err(Error::invalid(
            "no images (or no classes) to compute the loss on",
        ));
    }
    if global.len() != n * classes {
        return Err(Error::invalid(format!(
            "global logits: {} values for {n} images × {classes} classes",
            global.len()
        )));
    }
    if local.is_empty() || local.len() % (n * classes) != 0 {
        return Err(Error::invalid(format!(
            "local logits: {} values is not a positive multiple of {n} images × {classes} classes",
            local.len()
        )));
    }
    let per_image = local.len() / n;
    global
        .par_chunks_exact(classes)
        .zip(local.par_chunks_exact(per_image))
        .zip(labels.par_iter())
        .map(|((g, l), &label)| image_stats(g, l, classes, label, cfg))
        .collect()
}

/// Averages per-image statistics (in dataset order) as `cfg.averaging` says.
pub fn reduce(stats: &[ImageStats], cfg: &LocoopConfig) -> Result<LossParts> {
    if stats.is_empty() {
        return Err(Error::invalid("no images to reduce the loss over"));
    }
    if !cfg.lambda.is_finite() {
        return Err(Error::invalid(format!(
            "LoCoOp lambda must be finite, got {}",
            cfg.lambda
        )));
    }
    if let Some(i) = stats
        .iter()
        .position(|s| !s.ce.is_finite() || !s.entropy_sum.is_finite() || s.ood_patches > s.patches)
    {
        return Err(Error::invalid(format!(
            "image {i}: invalid loss statistics {:?}",
            stats[i]
        )));
    }
    let batch = match cfg.averaging {
        Averaging::PerBatch(0) => return Err(Error::invalid("LoCoOp batch size must be > 0")),
        Averaging::PerBatch(b) => b,
        Averaging::WholeSet => stats.len(),
    };
    let mut out = LossParts::default();
    for chunk in stats.chunks(batch) {
        let nb = chunk.len() as f64;
        let loss_id = chunk.iter().map(|s| s.ce).sum::<f64>() / nb;
        let entropy: f64 = chunk.iter().map(|s| s.entropy_sum).sum();
        let ood: usize = chunk.iter().map(|s| s.ood_patches).sum();
        let patches: usize = chunk.iter().map(|s| s.patches).sum();
        let correct = chunk.iter().filter(|s| s.correct).count();
        let loss_ood = if ood == 0 {
            0.0
        } else {
            -(entropy / ood as f64)
        };
        let percent = if patches == 0 {
            0.0
        } else {
            100.0 * ood as f64 / patches as f64
        };
        out.locoop_loss += nb * (loss_id + cfg.lambda * loss_ood);
        out.loss_id += nb * loss_id;
        out.loss_ood += nb * loss_ood;
        out.acc += nb * (100.0 * correct as f64 / nb);
        out.ood_patch_percent += nb * percent;
    }
    let n = stats.len() as f64;
    Ok(LossParts {
        locoop_loss: out.locoop_loss / n,
        loss_id: out.loss_id / n,
        loss_ood: out.loss_ood / n,
        acc: out.acc / n,
        ood_patch_percent: out.ood_patch_percent / n,
    })
}

fn check_label(label: usize, classes: usize) -> Result<()> {
    if label >= classes {
        return Err(Error::invalid(format!(
            "label {label} out of range for {classes} classes"
        )));
    }
    Ok(())
}

fn check_local(local: &[f32], classes: usize) -> Result<usize> {
    if classes == 0 {
        return Err(Error::invalid("the number of classes must be > 0"));
    }
    if local.is_empty() || local.len() % classes != 0 {
        return Err(Error::invalid(format!(
            "local logits: {} values is not a positive multiple of {classes} classes",
            local.len()
        )));
    }
    check_finite("local logits", local)?;
    Ok(local.len() / classes)
}

/// ln Σ exp(x) − x[label], in f64.
pub(crate) fn cross_entropy(global: &[f32], label: usize) -> f64 {
    let m = max_f32(global) as f64;
    let sum: f64 = global.iter().map(|&x| (x as f64 - m).exp()).sum();
    m + sum.ln() - global[label] as f64
}

/// A key whose signed integer order is the total order of the floats (`f32::total_cmp`).
#[inline(always)]
fn key(x: f32) -> i32 {
    let b = x.to_bits() as i32;
    b ^ (((b >> 31) as u32) >> 1) as i32
}

/// `#{c : x_c > x_label} + #{c < label : x_c = x_label}` in the total order; the label is in
/// the top-K iff this is < K. One branch-free pass, which vectorises.
pub(crate) fn label_rank(row: &[f32], label: usize) -> usize {
    let k = key(row[label]);
    let before = row[..label]
        .iter()
        .fold(0u32, |n, &x| n.wrapping_add((key(x) >= k) as u32));
    let after = row[label + 1..]
        .iter()
        .fold(0u32, |n, &x| n.wrapping_add((key(x) > k) as u32));
    before as usize + after as usize
}

/// −Σ p·ln(p + ε) with p = softmax(row); `scratch` has the row's length.
pub(crate) fn patch_entropy(row: &[f32], scratch: &mut [f32]) -> f64 {
    let m = max_f32(row);
    for (s, &x) in scratch.iter_mut().zip(row) {
        *s = x - m;
    }
    fastmath::exp_inplace(scratch);
    let inv = (1.0 / sum_f64(scratch)) as f32;
    entropy_terms(scratch, inv);
    -sum_f64(scratch)
}

/// e ← (e·inv)·ln(e·inv + ε) in place (pure f32, so that it vectorises 8 wide); through an
/// AVX2 + FMA copy when the CPU has it.
fn entropy_terms(e: &mut [f32], inv: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(e: &mut [f32], inv: f32) {
            entropy_terms_body(e, inv)
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected just above.
            return unsafe { avx2(e, inv) };
        }
    }
    entropy_terms_body(e, inv)
}

#[inline(always)]
fn entropy_terms_body(e: &mut [f32], inv: f32) {
    for x in e.iter_mut() {
        let p = *x * inv;
        *x = p * ln(p + ENTROPY_EPS);
    }
}

/// ln x for positive normal x (Cephes `logf` polynomial, ~1 ulp), branch-free so that it
/// vectorises.
#[inline(always)]
#[allow(clippy::excessive_precision)]
fn ln(x: f32) -> f32 {
    const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    let bits = x.to_bits();
    // x = m·2^e with m in [0.5, 1).
    let mut e = (((bits >> 23) & 0xff) as i32).wrapping_sub(126);
    let m = f32::from_bits((bits & 0x807f_ffff) | 0x3f00_0000);
    // Move m to [√½, √2) − 1.
    let small = m < SQRT_HALF;
    e = e.wrapping_sub(small as i32);
    let m = if small { m + m - 1.0 } else { m - 1.0 };
    let ef = e as f32;
    let z = m * m;
    let mut y = 7.037_683_6e-2_f32;
    y = y * m - 1.151_461_03e-1;
    y = y * m + 1.167_699_87e-1;
    y = y * m - 1.242_014_08e-1;
    y = y * m + 1.424_932_28e-1;
    y = y * m - 1.666_805_77e-1;
    y = y * m + 2.000_071_48e-1;
    y = y * m - 2.499_999_4e-1;
    y = y * m + 3.333_333_1e-1;
    y = y * m * z;
    y += -2.121_944_4e-4 * ef;
    y += -0.5 * z;
    let r = m + y;
    r + 0.693_359_4 * ef
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_ln_is_accurate_on_the_entropy_domain() {
        let mut worst = 0.0f64;
        let mut x = 1e-5f32;
        while x < 1.00001 {
            let got = ln(x) as f64;
            let want = (x as f64).ln();
            let err = (got - want).abs() / want.abs().max(1e-30);
            // Near 1 the relative error of ln blows up; judge it absolutely there.
            let err = if want.abs() < 1e-3 {
                (got - want).abs()
            } else {
                err
            };
            worst = worst.max(err);
            x *= 1.000_37;
        }
        assert!(worst < 3e-7, "worst error {worst}");
    }

    #[test]
    fn key_orders_like_total_cmp() {
        let xs = [f32::MIN, -1.5, -1e-40, -0.0, 0.0, 1e-40, 1.0, 2.5, f32::MAX];
        for a in xs {
            for b in xs {
                assert_eq!(key(a).cmp(&key(b)), a.total_cmp(&b), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn rank_takes_ties_in_index_order() {
        let row = [1.0f32, 2.0, 2.0, 0.0, 2.0, 3.0];
        assert_eq!(label_rank(&row, 5), 0);
        assert_eq!(label_rank(&row, 1), 1);
        assert_eq!(label_rank(&row, 2), 2);
        assert_eq!(label_rank(&row, 4), 3);
        assert_eq!(label_rank(&row, 0), 4);
        assert_eq!(label_rank(&row, 3), 5);
        // −0.0 ranks below +0.0 (CUDA's radix order).
        let row = [0.0f32, -0.0, 0.0];
        assert_eq!(label_rank(&row, 1), 2);
        assert_eq!(label_rank(&row, 2), 1);
    }
}
