//! From features to the search objective: normalised features → scaled cosine logits →
//! per-image LoCoOp statistics (and scores for the metric objectives) → one value.

use super::{Objective, SearchConfig};
use crate::backend::cpu::linear_into;
use crate::backend::{Backend, RowStats};
use crate::error::{Error, Result};
use crate::loss::{self, ImageStats, LossParts};
use crate::metrics::{self, OodMetrics};
use crate::model::clip::l2_normalize_rows;
use crate::score::{self, Scorer};
use rayon::prelude::*;

/// What one ID image contributes to the objective.
#[derive(Clone, Debug, Default)]
pub struct ImageEval {
    pub stats: ImageStats,
    /// The image's score (metric objectives only).
    pub id_score: f64,
    /// Scores of its OOD patches (metric objectives only).
    pub ood_scores: Vec<f64>,
}

/// The objective's value and what it was made of.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    pub value: f64,
    pub loss: Option<LossParts>,
    pub metrics: Option<OodMetrics>,
}

/// Text features normalised once, `[classes, dim]`.
pub fn normalised(mut features: Vec<f32>, dim: usize) -> Result<Vec<f32>> {
    check_finite("text features", &features)?;
    l2_normalize_rows(&mut features, dim);
    Ok(features)
}

fn check_finite(what: &str, v: &[f32]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(Error::invalid(format!(
            "{what} hold a non-finite value ({}) at index {i}: the model produced NaN/inf",
            v[i]
        ))),
        None => Ok(()),
    }
}

/// `scale · normalise(x) · textᵀ`: `[rows, classes]` logits.
pub fn logits(x: &[f32], dim: usize, text: &[f32], scale: f32) -> Result<Vec<f32>> {
    Ok(scaled_cosines(
        &normalised_features(x, dim)?,
        dim,
        text,
        scale,
    ))
}

/// Image features checked for NaN/inf and L2-normalised per row.
pub fn normalised_features(x: &[f32], dim: usize) -> Result<Vec<f32>> {
    check_finite("image features", x)?;
    let mut x = x.to_vec();
    l2_normalize_rows(&mut x, dim);
    Ok(x)
}

/// `scale · x · textᵀ` for already normalised rows.
fn scaled_cosines(x: &[f32], dim: usize, text: &[f32], scale: f32) -> Vec<f32> {
    let rows = x.len() / dim;
    let classes = text.len() / dim;
    let mut out = vec![0.0; rows * classes];
    linear_into(x, rows, text, None, classes, dim, &mut out);
    out.iter_mut().for_each(|v| *v *= scale);
    out
}

/// Evaluates a chunk of images: `global [n, dim]`, `local [n, patches, dim]` (unnormalised),
/// `text [classes, dim]` (normalised), `scale` = exp(logit_scale).
pub fn eval_images(
    global: &[f32],
    local: &[f32],
    text: &[f32],
    dim: usize,
    labels: &[usize],
    scale: f32,
    cfg: &SearchConfig,
) -> Result<Vec<ImageEval>> {
    let (g, l) = (
        normalised_features(global, dim)?,
        normalised_features(local, dim)?,
    );
    eval_normalised(&g, &l, text, dim, labels, scale, cfg)
}

/// As [`eval_images`], for image features that are already normalised (the cached ones).
pub fn eval_normalised(
    global: &[f32],
    local: &[f32],
    text: &[f32],
    dim: usize,
    labels: &[usize],
    scale: f32,
    cfg: &SearchConfig,
) -> Result<Vec<ImageEval>> {
    let classes = text.len() / dim;
    let n = labels.len();
    let patches = local.len() / (n * dim).max(1);
    let g = scaled_cosines(global, dim, text, scale);
    let l = scaled_cosines(local, dim, text, scale);
    let metric_scorer: Option<Scorer> = match cfg.objective {
        Objective::Auroc | Objective::Aupr | Objective::Fpr => Some(cfg.scorer),
        _ => None,
    };
    (0..n)
        .into_par_iter()
        .map(|i| {
            let gi = &g[i * classes..(i + 1) * classes];
            let li = &l[i * patches * classes..(i + 1) * patches * classes];
            let stats = loss::image_stats(gi, li, classes, labels[i], &cfg.locoop)?;
            let mut e = ImageEval {
                stats,
                ..Default::default()
            };
            if let Some(s) = metric_scorer {
                e.id_score = score::score(s, gi, li, classes, cfg.temperature)?;
                let mask_label = if cfg.locoop.use_pred_label {
                    loss::predicted_label(gi)
                } else {
                    labels[i]
                };
                let mask = loss::ood_patch_mask(li, classes, mask_label, cfg.locoop.top_k)?;
                e.ood_scores =
                    score::ood_patch_scores(&[s], li, classes, &mask, cfg.temperature)?.remove(0);
            }
            Ok(e)
        })
        .collect()
}

/// Whether [`eval_on_backend`] can work from [`RowStats`] alone: the loss objectives, and the
/// metric ones with an MCM-family scorer (whose scores are inverse `sum_exp_t`s).
fn row_stats_suffice(cfg: &SearchConfig) -> bool {
    match cfg.objective {
        Objective::Auroc | Objective::Aupr | Objective::Fpr => {
            matches!(cfg.scorer, Scorer::Mcm | Scorer::LMcm | Scorer::GlMcm)
        }
        _ => true,
    }
}

/// As [`eval_normalised`], with the normalised features and text on the backend: the logits
/// stay there, and only per-row [`RowStats`] come back (first the global rows, whose argmax
/// picks the OOD-patch label when `use_pred_label`, then the local rows).
#[allow(clippy::too_many_arguments)]
pub fn eval_on_backend<B: Backend>(
    b: &B,
    global: &B::Tensor,
    local: &B::Tensor,
    text: &B::Tensor,
    dim: usize,
    classes: usize,
    patches: usize,
    labels: &[usize],
    scale: f32,
    cfg: &SearchConfig,
) -> Result<Vec<ImageEval>> {
    if !row_stats_suffice(cfg) {
        let (g, l, t) = (b.to_vec(global)?, b.to_vec(local)?, b.to_vec(text)?);
        return eval_normalised(&g, &l, &t, dim, labels, scale, cfg);
    }
    cfg.locoop.validate(classes)?;
    let t = cfg.temperature;
    let g = b.logit_row_stats(global, text, dim, scale, labels, 1, t)?;
    let ood_labels: Vec<usize> = if cfg.locoop.use_pred_label {
        g.iter().map(|s| s.argmax).collect()
    } else {
        labels.to_vec()
    };
    if let Some(i) = g.iter().position(|s| !s.is_finite()) {
        return Err(non_finite(i));
    }
    let metric = !matches!(
        cfg.objective,
        Objective::LocoopLoss | Objective::LossId | Objective::LossOod
    );
    let top_k = cfg.locoop.top_k;
    let global_stats = |i: usize, label: usize, entropy_sum: f64, ood_patches: usize| ImageStats {
        ce: g[i].cross_entropy,
        entropy_sum,
        ood_patches,
        patches,
        correct: g[i].argmax == label,
    };
    if !metric {
        // The loss needs three numbers per image of the local rows.
        let sums = b.logit_ood_sums(local, text, dim, scale, &ood_labels, patches, top_k)?;
        if let Some(i) = sums.iter().position(|s| s.non_finite > 0) {
            return Err(non_finite(i));
        }
        return Ok(labels
            .iter()
            .zip(&sums)
            .enumerate()
            .map(|(i, (&label, s))| ImageEval {
                stats: global_stats(i, label, s.entropy_sum, s.ood_patches),
                ..Default::default()
            })
            .collect());
    }
    let l = b.logit_row_stats(local, text, dim, scale, &ood_labels, patches, t)?;
    if let Some(i) = l.iter().position(|s| !s.is_finite()) {
        return Err(non_finite(i / patches.max(1)));
    }
    Ok(labels
        .iter()
        .enumerate()
        .map(|(i, &label)| {
            let gi = &g[i];
            let li = &l[i * patches..(i + 1) * patches];
            let ood = |s: &&RowStats| s.label_rank >= top_k;
            let mut e = ImageEval {
                stats: global_stats(
                    i,
                    label,
                    li.iter().filter(ood).map(|s| s.entropy).sum(),
                    li.iter().filter(ood).count(),
                ),
                ..Default::default()
            };
            // The scores of score.rs from Σ exp((x − max)/T): MCM = −1/Σ, L-MCM = −max over
            // patches of 1/Σ, GL-MCM = MCM + L-MCM; OOD patches likewise among themselves.
            let l_mcm = -li
                .iter()
                .map(RowStats::max_prob)
                .fold(f64::NEG_INFINITY, f64::max);
            let mcm = -gi.max_prob();
            e.id_score = match cfg.scorer {
                Scorer::LMcm => l_mcm,
                Scorer::GlMcm => mcm + l_mcm,
                _ => mcm,
            };
            let ood_probs: Vec<f64> = li.iter().filter(ood).map(RowStats::max_prob).collect();
            let ood_l_mcm = -ood_probs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            e.ood_scores = ood_probs
                .iter()
                .map(|p| match cfg.scorer {
                    Scorer::LMcm => ood_l_mcm,
                    Scorer::GlMcm => -p + ood_l_mcm,
                    _ => -p,
                })
                .collect();
            e
        })
        .collect())
}

/// Text features with a non-finite value at `index` (of `[prompts, dim]`, normalised).
pub fn non_finite_text(index: usize, dim: usize) -> Error {
    Error::invalid(format!(
        "text features hold a non-finite value at index {index} (prompt {}, after L2 \
         normalisation): the model produced NaN/inf or an all-zero feature",
        index / dim.max(1)
    ))
}

fn non_finite(image: usize) -> Error {
    Error::invalid(format!(
        "image features hold a non-finite value (image {image} of the chunk): the model produced NaN/inf"
    ))
}

/// Reduces per-image evaluations (in dataset order) to the objective.
pub fn reduce(evals: &[ImageEval], cfg: &SearchConfig) -> Result<Outcome> {
    let stats: Vec<ImageStats> = evals.iter().map(|e| e.stats).collect();
    let parts = loss::reduce(&stats, &cfg.locoop)?;
    let mut out = Outcome {
        value: f64::NAN,
        loss: Some(parts),
        metrics: None,
    };
    out.value = match cfg.objective {
        Objective::LocoopLoss => parts.locoop_loss,
        Objective::LossId => parts.loss_id,
        Objective::LossOod => parts.loss_ood,
        Objective::Auroc | Objective::Aupr | Objective::Fpr => {
            let id: Vec<f64> = evals.iter().map(|e| e.id_score).collect();
            let ood: Vec<f64> = evals
                .iter()
                .flat_map(|e| e.ood_scores.iter().copied())
                .collect();
            if ood.is_empty() {
                return Err(Error::invalid(
                    "the metric objective needs OOD patches, and no validation image has any (raise --top-k?)",
                ));
            }
            let m = metrics::ood_metrics(&id, &ood, cfg.recall_level)?;
            out.metrics = Some(m);
            match cfg.objective {
                Objective::Auroc => m.auroc,
                Objective::Aupr => m.aupr_in,
                _ => m.fpr95,
            }
        }
    };
    if !out.value.is_finite() {
        return Err(Error::invalid(format!(
            "the objective is not finite ({})",
            out.value
        )));
    }
    Ok(out)
}
