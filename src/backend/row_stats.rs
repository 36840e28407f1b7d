//! What the loss and the scores need of one row of logits, so that a device backend returns
//! these few numbers per row instead of the `[rows, classes]` logits (kernels/rowstats.cu).
//! [`row_stats_host`] is the CPU twin, built from the loss's and the scores' own formulas.

use crate::error::{Error, Result};
use crate::loss::{cross_entropy, label_rank, patch_entropy};
use crate::score::{max_f32, softmax_sum};
use rayon::prelude::*;

/// Statistics of one row `x` of scaled logits against its label.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowStats {
    /// Index of the largest logit, the first on ties (`torch.argmax`).
    pub argmax: usize,
    /// ln Σ exp(x) − x[label] (the cross-entropy against the label).
    pub cross_entropy: f64,
    /// `#{c : x_c > x_label} + #{c < label : x_c = x_label}`: the label is in the top K iff
    /// this is < K.
    pub label_rank: usize,
    /// −Σ p·ln(p + 1e-5), p = softmax(x).
    pub entropy: f64,
    /// Σ exp((x − max)/T): MCM's largest probability at temperature T is its inverse.
    pub sum_exp_t: f64,
}

impl RowStats {
    /// MCM's largest softmax probability at the temperature the stats were made for.
    pub fn max_prob(&self) -> f64 {
        1.0 / self.sum_exp_t
    }

    /// Whether all fields are finite (NaN features give NaN stats).
    pub fn is_finite(&self) -> bool {
        self.cross_entropy.is_finite() && self.entropy.is_finite() && self.sum_exp_t.is_finite()
    }
}

/// `[rows, dim]` features against `[classes, dim]` text features: (rows, classes).
pub fn logit_shape(features: usize, text: usize, dim: usize) -> Result<(usize, usize)> {
    if dim == 0 || features % dim != 0 || text % dim != 0 {
        return Err(Error::invalid(format!(
            "logit statistics: {features} and {text} values are not rows of {dim}"
        )));
    }
    Ok((features / dim, text / dim))
}

pub fn check_temperature(temperature: f64) -> Result<()> {
    if temperature.is_nan() || temperature <= 0.0 {
        return Err(Error::invalid(format!(
            "temperature must be > 0, got {temperature}"
        )));
    }
    Ok(())
}

/// Checks the label layout shared by the host twin and the device kernel: row r's label is
/// `labels[r / rows_per_label]`.
pub fn check_labels(
    rows: usize,
    classes: usize,
    labels: &[usize],
    rows_per_label: usize,
) -> Result<()> {
    if classes == 0 {
        return Err(Error::invalid("row statistics: no classes"));
    }
    if rows_per_label == 0 || labels.len() * rows_per_label != rows {
        return Err(Error::invalid(format!(
            "row statistics: {} labels × {rows_per_label} rows each for {rows} rows",
            labels.len()
        )));
    }
    if let Some(&l) = labels.iter().find(|&&l| l >= classes) {
        return Err(Error::invalid(format!(
            "label {l} out of range for {classes} classes"
        )));
    }
    Ok(())
}

/// The CPU twin: statistics of each row of `logits [rows, classes]`.
pub fn row_stats_host(
    logits: &[f32],
    classes: usize,
    labels: &[usize],
    rows_per_label: usize,
    temperature: f64,
) -> Result<Vec<RowStats>> {
    check_labels(
        logits.len() / classes.max(1),
        classes,
        labels,
        rows_per_label,
    )?;
    check_temperature(temperature)?;
    Ok(logits
        .par_chunks_exact(classes)
        .enumerate()
        .map_init(
            || (vec![0f32; classes], Vec::with_capacity(classes)),
            |(scratch, scratch_t), (r, row)| {
                let label = labels[r / rows_per_label];
                let m = max_f32(row);
                RowStats {
                    argmax: row.iter().position(|&x| x == m).unwrap_or(0),
                    cross_entropy: cross_entropy(row, label),
                    label_rank: label_rank(row, label),
                    entropy: patch_entropy(row, scratch),
                    sum_exp_t: softmax_sum(row, temperature, scratch_t).1,
                }
            },
        )
        .collect())
}

/// Per image, what the LoCoOp loss needs of its local rows: the entropies of its OOD patches
/// (label rank ≥ K) summed, their number, and how many rows had non-finite statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OodSums {
    pub entropy_sum: f64,
    pub ood_patches: usize,
    pub non_finite: usize,
}

/// The CPU twin of `ood_sums_f32`: `stats` holds `patches` consecutive rows per image.
pub fn ood_sums_host(stats: &[RowStats], patches: usize, top_k: usize) -> Vec<OodSums> {
    stats
        .chunks(patches.max(1))
        .map(|rows| {
            let mut o = OodSums::default();
            for s in rows {
                o.non_finite += !s.is_finite() as usize;
                if s.label_rank >= top_k {
                    o.entropy_sum += s.entropy;
                    o.ood_patches += 1;
                }
            }
            o
        })
        .collect()
}
