//! OOD detection metrics, as the reference's `Metrics.compute_metrics` computes them.
//!
//! ID is the positive class: the examples are −score (scores are larger for OOD) with label 1
//! for ID images and 0 for OOD images, in the order [ID…, OOD…].
//!
//! - AUROC: `sklearn.metrics.roc_auc_score` (trapezoids over the ROC curve of the distinct
//!   thresholds, ties counted as one threshold).
//! - AUPR-In: `sklearn.metrics.average_precision_score` (ID positive): Σ (R_i − R_{i−1})·P_i
//!   over the distinct thresholds, descending. AUPR-Out: the same with OOD positive on the
//!   negated examples (= the scores). The reference reports AUPR-In only, as `aupr`.
//! - FPR at recall (FPR95 for 0.95) and its cutoff: the reference's `fpr_and_fdr_at_recall`.
//!   The examples are sorted descending and cut at the distinct values; the candidate
//!   thresholds run from the first one at which every ID image is accepted (recall 1) up to
//!   the highest one; the chosen threshold minimises |recall − level| (recall = TP / #ID in
//!   f64), ties going to the LOWER threshold (the larger FPR). FPR = FP / #OOD there, and the
//!   cutoff is that threshold, in example units (−score): an image is called ID when
//!   −score ≥ cutoff.
//!
//! FPR, AUROC and AUPR are percentages (×100) as in the reference's reports; the cutoff is not.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// The recall level of FPR95.
pub const DEFAULT_RECALL_LEVEL: f64 = 0.95;

/// Metrics of one ID set against one OOD set; percentages except `cutoff`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OodMetrics {
    /// FPR (%) at the recall level (FPR95 for 0.95); the reference's `fpr`.
    pub fpr95: f64,
    /// AUROC (%); the reference's `auroc`.
    pub auroc: f64,
    /// AUPR with ID positive (%); the reference's `aupr`.
    pub aupr_in: f64,
    /// AUPR with OOD positive (%); not in the reference.
    pub aupr_out: f64,
    /// The threshold on −score at the recall level; the reference's `cutoff`.
    pub cutoff: f64,
}

/// ROC curve points with ID positive, as `sklearn.metrics.roc_curve` (drop_intermediate):
/// starts at (0, 0) with threshold +∞; thresholds are in example units (−score), decreasing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RocCurve {
    pub fpr: Vec<f64>,
    pub tpr: Vec<f64>,
    pub thresholds: Vec<f64>,
}

/// All the metrics of ID scores against OOD scores (scores: larger = more OOD-like).
pub fn ood_metrics(id_scores: &[f64], ood_scores: &[f64], recall_level: f64) -> Result<OodMetrics> {
    let curve = Curve::new(id_scores, ood_scores)?;
    let (fpr, cutoff) = curve.fpr_at_recall(recall_level)?;
    let out_curve = Curve::out(id_scores, ood_scores);
    Ok(OodMetrics {
        fpr95: 100.0 * fpr,
        auroc: 100.0 * curve.auroc(),
        aupr_in: 100.0 * curve.average_precision(),
        aupr_out: 100.0 * out_curve.average_precision(),
        cutoff,
    })
}

/// AUROC (%) with ID positive.
pub fn auroc(id_scores: &[f64], ood_scores: &[f64]) -> Result<f64> {
    Ok(100.0 * Curve::new(id_scores, ood_scores)?.auroc())
}

/// AUPR-In (%): average precision with ID positive.
pub fn aupr_in(id_scores: &[f64], ood_scores: &[f64]) -> Result<f64> {
    Ok(100.0 * Curve::new(id_scores, ood_scores)?.average_precision())
}

/// AUPR-Out (%): average precision with OOD positive.
pub fn aupr_out(id_scores: &[f64], ood_scores: &[f64]) -> Result<f64> {
    Curve::new(id_scores, ood_scores)?;
    Ok(100.0 * Curve::out(id_scores, ood_scores).average_precision())
}

/// (FPR (%) at the recall level, cutoff) as the reference's `fpr_and_fdr_at_recall`.
pub fn fpr_at_recall(
    id_scores: &[f64],
    ood_scores: &[f64],
    recall_level: f64,
) -> Result<(f64, f64)> {
    let (fpr, cutoff) = Curve::new(id_scores, ood_scores)?.fpr_at_recall(recall_level)?;
    Ok((100.0 * fpr, cutoff))
}

/// The ROC curve (rates in [0, 1]) for plotting.
pub fn roc_curve(id_scores: &[f64], ood_scores: &[f64]) -> Result<RocCurve> {
    Ok(Curve::new(id_scores, ood_scores)?.roc())
}

/// Top-1 accuracy (%) of `logits` (`[images × classes]`) against `labels`; the prediction is
/// the first largest logit (as `torch.argmax`).
pub fn top1_accuracy(logits: &[f32], classes: usize, labels: &[usize]) -> Result<f64> {
    if labels.is_empty() || classes == 0 {
        return Err(Error::invalid("accuracy of no images (or no classes)"));
    }
    if logits.len() != labels.len() * classes {
        return Err(Error::invalid(format!(
            "logits: {} values for {} images × {classes} classes",
            logits.len(),
            labels.len()
        )));
    }
    crate::score::check_finite("logits", logits)?;
    if let Some(&l) = labels.iter().find(|&&l| l >= classes) {
        return Err(Error::invalid(format!(
            "label {l} out of range for {classes} classes"
        )));
    }
    let correct = logits
        .chunks_exact(classes)
        .zip(labels)
        .filter(|(row, &l)| crate::loss::predicted_label(row) == l)
        .count();
    Ok(100.0 * correct as f64 / labels.len() as f64)
}

/// The reference's `metrics_{scorer}_{split}.csv`: a row per OOD set, then `Avg` (the mean of
/// each column), values with two decimals. AUPR is AUPR-In.
pub fn metrics_csv(rows: &[(&str, OodMetrics)], recall_level: f64) -> String {
    let fpr_name = format!("FPR{}", (100.0 * recall_level) as i64);
    let mut s = format!("OOD dataset,{fpr_name},AUROC,AUPR\n");
    for (name, m) in rows {
        let _ = writeln!(s, "{name},{:.2},{:.2},{:.2}", m.fpr95, m.auroc, m.aupr_in);
    }
    if !rows.is_empty() {
        let n = rows.len() as f64;
        let mean = |f: fn(&OodMetrics) -> f64| rows.iter().map(|(_, m)| f(m)).sum::<f64>() / n;
        let _ = writeln!(
            s,
            "Avg,{:.2},{:.2},{:.2}",
            mean(|m| m.fpr95),
            mean(|m| m.auroc),
            mean(|m| m.aupr_in)
        );
    }
    s
}

/// The reference's `cutoffs_{scorer}_{split}.csv`: `OOD dataset,Cutoff`, values as Python's
/// `repr`.
pub fn cutoffs_csv(rows: &[(&str, f64)]) -> String {
    let mut s = String::from("OOD dataset,Cutoff\n");
    for (name, c) in rows {
        let _ = writeln!(s, "{name},{}", py_float_repr(*c));
    }
    s
}

/// A float as Python's `repr` writes it (shortest round-trip digits; exponent form below
/// 1e-4 or from 1e16 on, e.g. `1e-05`, `1.5e+16`; `.0` on integral values).
pub fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let sci = format!("{:e}", x.abs());
    let (mant, exp) = sci.split_once('e').expect("`{:e}` writes an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` writes an integer exponent");
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let sign = if x < 0.0 { "-" } else { "" };
    if !(-4..16).contains(&exp) {
        let mant = if digits.len() == 1 {
            digits
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{mant}e{esign}{:02}", exp.abs());
    }
    let point = exp + 1; // digits before the decimal point
    let body = if point <= 0 {
        format!("0.{}{}", "0".repeat((-point) as usize), digits)
    } else if point as usize >= digits.len() {
        format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
    } else {
        format!(
            "{}.{}",
            &digits[..point as usize],
            &digits[point as usize..]
        )
    };
    format!("{sign}{body}")
}

/// Counts at the distinct thresholds of the examples sorted descending (`_binary_clf_curve`).
struct Curve {
    /// True positives with example ≥ threshold, increasing.
    tps: Vec<f64>,
    /// False positives with example ≥ threshold, increasing.
    fps: Vec<f64>,
    /// Distinct example values, decreasing.
    thresholds: Vec<f64>,
}

impl Curve {
    /// ID positive, examples −score; validates the inputs.
    fn new(id_scores: &[f64], ood_scores: &[f64]) -> Result<Curve> {
        if id_scores.is_empty() || ood_scores.is_empty() {
            return Err(Error::invalid(format!(
                "OOD metrics need ID and OOD scores, got {} ID and {} OOD",
                id_scores.len(),
                ood_scores.len()
            )));
        }
        for (what, xs) in [("ID", id_scores), ("OOD", ood_scores)] {
            if let Some(i) = xs.iter().position(|x| !x.is_finite()) {
                return Err(Error::invalid(format!(
                    "{what} score {i} is not finite: {}",
                    xs[i]
                )));
            }
        }
        let examples: Vec<(f64, bool)> = id_scores
            .iter()
            .map(|&s| (-s, true))
            .chain(ood_scores.iter().map(|&s| (-s, false)))
            .collect();
        Ok(Curve::from_examples(examples))
    }

    /// OOD positive, examples = score.
    fn out(id_scores: &[f64], ood_scores: &[f64]) -> Curve {
        let examples: Vec<(f64, bool)> = id_scores
            .iter()
            .map(|&s| (s, false))
            .chain(ood_scores.iter().map(|&s| (s, true)))
            .collect();
        Curve::from_examples(examples)
    }

    /// `examples`: (value, positive), finite, non-empty.
    fn from_examples(examples: Vec<(f64, bool)>) -> Curve {
        // numpy's reversed stable ascending argsort: descending values, equal values in
        // decreasing index order, so the last of a group (the threshold reported) is the one
        // with the smallest index. Only the sign of a zero can tell them apart.
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.sort_by(|&a, &b| {
            examples[b]
                .0
                .partial_cmp(&examples[a].0)
                .expect("finite")
                .then(b.cmp(&a))
        });
        let mut tps = Vec::new();
        let mut fps = Vec::new();
        let mut thresholds = Vec::new();
        let mut tp = 0usize;
        for (i, &j) in order.iter().enumerate() {
            tp += examples[j].1 as usize;
            let last = i + 1 == order.len() || examples[order[i + 1]].0 != examples[j].0;
            if last {
                tps.push(tp as f64);
                fps.push((i + 1 - tp) as f64);
                thresholds.push(examples[j].0);
            }
        }
        Curve {
            tps,
            fps,
            thresholds,
        }
    }

    /// `roc_curve` with `drop_intermediate=True`.
    fn roc(&self) -> RocCurve {
        let n = self.tps.len();
        let keep: Vec<usize> = (0..n)
            .filter(|&i| {
                i == 0
                    || i + 1 == n
                    || n <= 2
                    || (self.fps[i + 1] - 2.0 * self.fps[i] + self.fps[i - 1]) != 0.0
                    || (self.tps[i + 1] - 2.0 * self.tps[i] + self.tps[i - 1]) != 0.0
            })
            .collect();
        let (p, nn) = (self.tps[n - 1], self.fps[n - 1]);
        let mut roc = RocCurve {
            fpr: vec![0.0],
            tpr: vec![0.0],
            thresholds: vec![f64::INFINITY],
        };
        for i in keep {
            roc.fpr.push(self.fps[i] / nn);
            roc.tpr.push(self.tps[i] / p);
            roc.thresholds.push(self.thresholds[i]);
        }
        roc
    }

    /// `roc_auc_score`: trapezoids over [`Curve::roc`].
    fn auroc(&self) -> f64 {
        let roc = self.roc();
        roc.fpr
            .windows(2)
            .zip(roc.tpr.windows(2))
            .map(|(x, y)| (x[1] - x[0]) * (y[1] + y[0]) / 2.0)
            .sum()
    }

    /// `average_precision_score`: Σ (R_i − R_{i−1})·P_i, clipped at 0.
    fn average_precision(&self) -> f64 {
        let p = *self.tps.last().expect("non-empty");
        let mut prev_recall = 0.0;
        let mut ap = 0.0;
        for (&tp, &fp) in self.tps.iter().zip(&self.fps) {
            let recall = tp / p;
            let precision = if tp + fp != 0.0 { tp / (tp + fp) } else { 0.0 };
            ap += (recall - prev_recall) * precision;
            prev_recall = recall;
        }
        ap.max(0.0)
    }

    /// (FPR in [0, 1], cutoff) of `fpr_and_fdr_at_recall`.
    fn fpr_at_recall(&self, level: f64) -> Result<(f64, f64)> {
        if !(level > 0.0 && level <= 1.0) {
            return Err(Error::invalid(format!(
                "recall level must be in (0, 1], got {level}"
            )));
        }
        let total = *self.tps.last().expect("non-empty");
        // The first threshold at which every positive is in (searchsorted left).
        let last = self
            .tps
            .iter()
            .position(|&t| t >= total)
            .expect("the last entry equals the total");
        // Walk the recall curve reversed (recall decreasing); keep the first minimum.
        let mut best = last;
        let mut best_d = (self.tps[last] / total - level).abs();
        for i in (0..last).rev() {
            let d = (self.tps[i] / total - level).abs();
            if d < best_d {
                best = i;
                best_d = d;
            }
        }
        // The reference appends (recall 1, fps 0) after the reversed curve; its distance equals
        // that of `last` (recall exactly 1), which comes first, so it is never chosen.
        let negatives = self.fps.last().expect("non-empty");
        Ok((self.fps[best] / negatives, self.thresholds[best]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_repr() {
        for (x, want) in [
            (0.0010951064759865403, "0.0010951064759865403"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (100.0, "100.0"),
            (1e16, "1e+16"),
            (1.2345e16, "1.2345e+16"),
            (123456789012345.0, "123456789012345.0"),
            (-2.5, "-2.5"),
            (0.1, "0.1"),
            (65.47800000000001, "65.47800000000001"),
            (0.0, "0.0"),
        ] {
            assert_eq!(py_float_repr(x), want);
        }
    }

    #[test]
    fn csv_shapes() {
        let m = OodMetrics {
            fpr95: 30.4,
            auroc: 94.52,
            aupr_in: 98.82,
            aupr_out: 1.0,
            cutoff: 0.0010951064759865403,
        };
        let csv = metrics_csv(&[("OOD_iNaturalist", m), ("OOD_Sun", m)], 0.95);
        assert_eq!(
            csv,
            "OOD dataset,FPR95,AUROC,AUPR\nOOD_iNaturalist,30.40,94.52,98.82\n\
             OOD_Sun,30.40,94.52,98.82\nAvg,30.40,94.52,98.82\n"
        );
        assert_eq!(
            cutoffs_csv(&[("OOD_Sun", m.cutoff)]),
            "OOD dataset,Cutoff\nOOD_Sun,0.0010951064759865403\n"
        );
    }
}
