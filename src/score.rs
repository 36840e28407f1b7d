//! Zero-shot OOD scores of one image from its logits, with the reference's formulas and signs
//! (SeTAR `Scorers`): larger = more OOD-like.
//!
//! Logits are the scaled ones (cosine × exp(logit_scale), ≈100 for released CLIPs) and
//! `probs = softmax(logits / T)`, T = [`DEFAULT_TEMPERATURE`] (= 100) for CLIP, 1 for
//! classifiers:
//!
//! | scorer | value |
//! |---|---|
//! | `mcm` | −max(probs_global) |
//! | `l_mcm` | −max over patches and classes of probs_local |
//! | `gl_mcm` | `mcm` + `l_mcm` |
//! | `energy` | −T·logsumexp(logits_global / T) |
//! | `entropy` | −Σ p·ln p of probs_global (natural log, 0·ln 0 = 0) |
//! | `var` | −var(probs_global) (population variance over classes) |
//! | `msp` | −max softmax(logits_global) at T = 1, whatever `temperature` says |
//! | `max_logit` | −max(logits_global) |
//!
//! `msp` and `max_logit` are not in the reference (it scores its Swin classifier with
//! `mcm_score` at T = 1, which equals `msp`); they are here for vision-only models.
//!
//! Everything is accumulated in f64; the exponentials of the rows use the vectorised f32
//! [`fastmath::exp`] (≈1e-7 relative), so a score is within ~1e-7 relative of the exact
//! value computed from the same f32 logits. The reference computes in f32 throughout.

use crate::backend::fastmath;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The softmax temperature the reference uses for CLIP (scaled logits).
pub const DEFAULT_TEMPERATURE: f64 = 100.0;

/// An OOD score. Names: `mcm`, `l_mcm`, `gl_mcm`, `energy`, `entropy`, `var`, `msp`,
/// `max_logit`; the reference's names (`mcm_score`, …) are accepted as aliases.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Scorer {
    #[value(name = "mcm", alias = "mcm_score")]
    #[serde(alias = "mcm_score")]
    Mcm,
    #[value(name = "l_mcm", alias = "l_mcm_score")]
    #[serde(alias = "l_mcm_score")]
    LMcm,
    #[value(name = "gl_mcm", alias = "gl_mcm_score")]
    #[serde(alias = "gl_mcm_score")]
    GlMcm,
    #[value(name = "energy", alias = "energy_score")]
    #[serde(alias = "energy_score")]
    Energy,
    #[value(name = "entropy", alias = "entropy_score")]
    #[serde(alias = "entropy_score")]
    Entropy,
    #[value(name = "var", alias = "var_score")]
    #[serde(alias = "var_score")]
    Var,
    #[value(name = "msp", alias = "msp_score")]
    #[serde(alias = "msp_score")]
    Msp,
    #[value(name = "max_logit", alias = "max_logit_score")]
    #[serde(alias = "max_logit_score")]
    MaxLogit,
}

impl Scorer {
    /// Every scorer, in declaration order.
    pub const ALL: [Scorer; 8] = [
        Scorer::Mcm,
        Scorer::LMcm,
        Scorer::GlMcm,
        Scorer::Energy,
        Scorer::Entropy,
        Scorer::Var,
        Scorer::Msp,
        Scorer::MaxLogit,
    ];
    /// The six scorers of the reference.
    pub const REFERENCE: [Scorer; 6] = [
        Scorer::Mcm,
        Scorer::LMcm,
        Scorer::GlMcm,
        Scorer::Energy,
        Scorer::Entropy,
        Scorer::Var,
    ];

    /// Our name (`mcm`, `l_mcm`, …).
    pub fn name(self) -> &'static str {
        match self {
            Scorer::Mcm => "mcm",
            Scorer::LMcm => "l_mcm",
            Scorer::GlMcm => "gl_mcm",
            Scorer::Energy => "energy",
            Scorer::Entropy => "entropy",
            Scorer::Var => "var",
            Scorer::Msp => "msp",
            Scorer::MaxLogit => "max_logit",
        }
    }

    /// The reference's name, used in its file names and CSV columns (`mcm_score`, …).
    pub fn reference_name(self) -> &'static str {
        match self {
            Scorer::Mcm => "mcm_score",
            Scorer::LMcm => "l_mcm_score",
            Scorer::GlMcm => "gl_mcm_score",
            Scorer::Energy => "energy_score",
            Scorer::Entropy => "entropy_score",
            Scorer::Var => "var_score",
            Scorer::Msp => "msp_score",
            Scorer::MaxLogit => "max_logit_score",
        }
    }

    /// Whether the scorer reads the local (patch) logits.
    pub fn needs_local(self) -> bool {
        matches!(self, Scorer::LMcm | Scorer::GlMcm)
    }
}

impl fmt::Display for Scorer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scorer {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Scorer::ALL
            .into_iter()
            .find(|sc| sc.name() == s || sc.reference_name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Scorer::ALL.iter().map(|s| s.name()).collect();
                Error::invalid(format!(
                    "unknown scorer `{s}` (expected one of: {})",
                    names.join(", ")
                ))
            })
    }
}

/// The score of one image: `global` is `[classes]`, `local` is `[patches × classes]` (may be
/// empty unless the scorer [needs it](Scorer::needs_local)).
pub fn score(
    scorer: Scorer,
    global: &[f32],
    local: &[f32],
    classes: usize,
    temperature: f64,
) -> Result<f64> {
    Ok(scores(&[scorer], global, local, classes, temperature)?[0])
}

/// Several scores of one image (in the order of `scorers`), sharing the work on the patches.
pub fn scores(
    scorers: &[Scorer],
    global: &[f32],
    local: &[f32],
    classes: usize,
    temperature: f64,
) -> Result<Vec<f64>> {
    let t = check_temperature(temperature)?;
    check_row("global logits", global, classes)?;
    let needs_local = scorers.iter().any(|s| s.needs_local());
    if needs_local {
        check_rows("local logits", local, classes)?;
    }
    let mut scratch = Vec::with_capacity(classes);
    let l_mcm = if needs_local {
        -max_prob_over_rows(local, classes, t, &mut scratch)
    } else {
        0.0
    };
    Ok(scorers
        .iter()
        .map(|&s| match s {
            Scorer::LMcm => l_mcm,
            Scorer::GlMcm => row_score(Scorer::Mcm, global, t, &mut scratch) + l_mcm,
            _ => row_score(s, global, t, &mut scratch),
        })
        .collect())
}

/// The reference's OOD scores for the metric objective of the search: for one ID image, every
/// OOD patch (`ood_mask[p]`, see [`crate::loss::ood_patch_mask`]) is an "OOD image" whose
/// global logits are that patch's logits and whose local logits are all of the image's OOD
/// patches. Returns, per scorer, one score per OOD patch in patch order (empty when the image
/// has no OOD patch, as the reference skips it).
pub fn ood_patch_scores(
    scorers: &[Scorer],
    local: &[f32],
    classes: usize,
    ood_mask: &[bool],
    temperature: f64,
) -> Result<Vec<Vec<f64>>> {
    let t = check_temperature(temperature)?;
    let patches = check_rows("local logits", local, classes)?;
    if ood_mask.len() != patches {
        return Err(Error::invalid(format!(
            "OOD patch mask has {} entries for {patches} patches",
            ood_mask.len()
        )));
    }
    let rows: Vec<&[f32]> = local
        .chunks_exact(classes)
        .zip(ood_mask)
        .filter(|(_, &ood)| ood)
        .map(|(row, _)| row)
        .collect();
    let mut scratch = Vec::with_capacity(classes);
    // mcm of each OOD patch; the shared l_mcm is minus the largest of their max probabilities.
    let needs_local = scorers.iter().any(|s| s.needs_local());
    let max_probs: Vec<f64> = if needs_local {
        rows.iter()
            .map(|row| 1.0 / softmax_sum(row, t, &mut scratch).1)
            .collect()
    } else {
        Vec::new()
    };
    let l_mcm = -max_probs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Ok(scorers
        .iter()
        .map(|&s| match s {
            Scorer::LMcm => vec![l_mcm; rows.len()],
            Scorer::GlMcm => max_probs.iter().map(|p| -p + l_mcm).collect(),
            _ => rows
                .iter()
                .map(|row| row_score(s, row, t, &mut scratch))
                .collect(),
        })
        .collect())
}

fn check_temperature(t: f64) -> Result<f64> {
    if t.is_finite() && t > 0.0 {
        Ok(t)
    } else {
        Err(Error::invalid(format!(
            "temperature must be finite and > 0, got {t}"
        )))
    }
}

fn check_row(what: &str, row: &[f32], classes: usize) -> Result<()> {
    if classes == 0 {
        return Err(Error::invalid("the number of classes must be > 0"));
    }
    if row.len() != classes {
        return Err(Error::invalid(format!(
            "{what}: {} values for {classes} classes",
            row.len()
        )));
    }
    check_finite(what, row)
}

/// Checks `[rows × classes]` (at least one row) and returns the number of rows.
fn check_rows(what: &str, xs: &[f32], classes: usize) -> Result<usize> {
    if classes == 0 {
        return Err(Error::invalid("the number of classes must be > 0"));
    }
    if xs.is_empty() || xs.len() % classes != 0 {
        return Err(Error::invalid(format!(
            "{what}: {} values is not a positive multiple of {classes} classes",
            xs.len()
        )));
    }
    check_finite(what, xs)?;
    Ok(xs.len() / classes)
}

pub(crate) fn check_finite(what: &str, xs: &[f32]) -> Result<()> {
    // Exponent all ones = inf or NaN; the fold vectorises, unlike `all`.
    let bad = xs.iter().fold(false, |acc, x| {
        acc | (x.to_bits() & 0x7f80_0000 == 0x7f80_0000)
    });
    if bad {
        let i = xs.iter().position(|x| !x.is_finite()).unwrap_or(0);
        return Err(Error::invalid(format!(
            "{what}: non-finite value {} at index {i}",
            xs[i]
        )));
    }
    Ok(())
}

/// Maximum of a non-empty row, in 8 independent lanes so that it vectorises.
pub(crate) fn max_f32(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    let mut m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    for l in lanes {
        m = m.max(l);
    }
    m
}

/// Σ xs in f64 (8 lanes, vectorises).
pub(crate) fn sum_f64(xs: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x as f64;
        }
    }
    let rest: f64 = chunks.remainder().iter().map(|&x| x as f64).sum();
    lanes.iter().sum::<f64>() + rest
}

/// Fills `scratch` with e_c = exp((x_c − max)/T) and returns (max, Σ e_c). softmax = e / Σ.
pub(crate) fn softmax_sum(row: &[f32], t: f64, scratch: &mut Vec<f32>) -> (f32, f64) {
    let m = max_f32(row);
    let inv_t = (1.0 / t) as f32;
    scratch.clear();
    scratch.extend(row.iter().map(|&x| (x - m) * inv_t));
    fastmath::exp_inplace(scratch);
    (m, sum_f64(scratch))
}

/// max over rows and classes of softmax(row / T).
fn max_prob_over_rows(local: &[f32], classes: usize, t: f64, scratch: &mut Vec<f32>) -> f64 {
    // The largest probability of a row is 1 / Σ_c exp((x_c − max)/T).
    let min_sum = local
        .chunks_exact(classes)
        .map(|row| softmax_sum(row, t, scratch).1)
        .fold(f64::INFINITY, f64::min);
    1.0 / min_sum
}

/// A score computed from one row of logits alone (all but `l_mcm` / `gl_mcm`).
fn row_score(scorer: Scorer, row: &[f32], t: f64, scratch: &mut Vec<f32>) -> f64 {
    match scorer {
        Scorer::Mcm => -1.0 / softmax_sum(row, t, scratch).1,
        Scorer::Msp => -1.0 / softmax_sum(row, 1.0, scratch).1,
        Scorer::MaxLogit => -(max_f32(row) as f64),
        Scorer::Energy => {
            // −T·logsumexp(x/T) = −max − T·ln Σ exp((x − max)/T)
            let (m, sum) = softmax_sum(row, t, scratch);
            -(m as f64) - t * sum.ln()
        }
        Scorer::Entropy => {
            // −Σ p ln p with ln p_c = a_c − ln Σ, a_c = (x_c − max)/T the exponent used above.
            let (m, sum) = softmax_sum(row, t, scratch);
            let inv_t = (1.0 / t) as f32;
            let ea: f64 = scratch
                .iter()
                .zip(row)
                .map(|(&e, &x)| e as f64 * ((x - m) * inv_t) as f64)
                .sum();
            sum.ln() - ea / sum
        }
        Scorer::Var => {
            // The deviations from the mean are small next to the probabilities themselves at
            // T = 100, so this one uses exact f64 exponentials (one row: cheap).
            let m = max_f32(row) as f64;
            let e: Vec<f64> = row.iter().map(|&x| ((x as f64 - m) / t).exp()).collect();
            let sum: f64 = e.iter().sum();
            let n = row.len() as f64;
            let mean = e.iter().map(|&e| e / sum).sum::<f64>() / n;
            let ss: f64 = e
                .iter()
                .map(|&e| {
                    let d = e / sum - mean;
                    d * d
                })
                .sum();
            -ss / n
        }
        Scorer::LMcm | Scorer::GlMcm => unreachable!("patch scorers are handled by the callers"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in Scorer::ALL {
            assert_eq!(s.name().parse::<Scorer>().unwrap(), s);
            assert_eq!(s.reference_name().parse::<Scorer>().unwrap(), s);
            assert_eq!(s.to_string(), s.name());
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.name()));
            let back: Scorer =
                serde_json::from_str(&format!("\"{}\"", s.reference_name())).unwrap();
            assert_eq!(back, s);
            use clap::ValueEnum;
            assert_eq!(<Scorer as ValueEnum>::from_str(s.name(), false).unwrap(), s);
            assert_eq!(
                <Scorer as ValueEnum>::from_str(s.reference_name(), false).unwrap(),
                s
            );
        }
        assert!("nope".parse::<Scorer>().is_err());
    }

    #[test]
    fn uniform_logits_give_closed_forms() {
        let c = 4;
        let g = vec![2.0f32; c];
        let l = vec![2.0f32; 3 * c];
        let s = scores(&Scorer::ALL, &g, &l, c, 100.0).unwrap();
        let want = [
            -0.25,
            -0.25,
            -0.5,
            -2.0 - 100.0 * (4.0f64).ln(),
            (4.0f64).ln(),
            0.0,
            -0.25,
            -2.0,
        ];
        for (got, want) in s.iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
    }
}
