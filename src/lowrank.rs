//! Low-rank approximation of one weight (SETAR.md §2): the SVD of each target computed once,
//! which components a ratio removes (minor / principal / random), and the pruned weight
//! W' = W − Σ_removed σᵢ uᵢ vᵢᵀ. Ratio 0 leaves W bit-identical.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Which tower a setting applies to (the reference's `tower_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Tower {
    #[serde(rename = "visual")]
    Visual,
    #[serde(rename = "text")]
    Text,
}

impl Tower {
    pub fn name(self) -> &'static str {
        match self {
            Tower::Visual => "visual",
            Tower::Text => "text",
        }
    }
}

/// Which weight of a block (or the tower's projection) a setting replaces.
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
pub enum WeightType {
    /// `mlp.fc1`, the SeTAR default.
    #[serde(rename = "W_up")]
    #[value(name = "W_up")]
    Up,
    /// `mlp.fc2`.
    #[serde(rename = "W_down")]
    #[value(name = "W_down")]
    Down,
    #[serde(rename = "W_q")]
    #[value(name = "W_q")]
    Q,
    #[serde(rename = "W_k")]
    #[value(name = "W_k")]
    K,
    #[serde(rename = "W_v")]
    #[value(name = "W_v")]
    V,
    #[serde(rename = "W_o")]
    #[value(name = "W_o")]
    O,
    /// The tower's projection (`visual_projection` / `text_projection`), no layer.
    #[serde(rename = "W_p")]
    #[value(name = "W_p")]
    P,
}

impl WeightType {
    pub fn name(self) -> &'static str {
        match self {
            WeightType::Up => "W_up",
            WeightType::Down => "W_down",
            WeightType::Q => "W_q",
            WeightType::K => "W_k",
            WeightType::V => "W_v",
            WeightType::O => "W_o",
            WeightType::P => "W_p",
        }
    }

    /// The HF module name of this weight in `tower` (layer ignored for `W_p`).
    pub fn module(self, tower: Tower, layer: usize) -> String {
        let prefix = match tower {
            Tower::Visual => "vision_model",
            Tower::Text => "text_model",
        };
        let l = format!("{prefix}.encoder.layers.{layer}");
        match self {
            WeightType::Up => format!("{l}.mlp.fc1"),
            WeightType::Down => format!("{l}.mlp.fc2"),
            WeightType::Q => format!("{l}.self_attn.q_proj"),
            WeightType::K => format!("{l}.self_attn.k_proj"),
            WeightType::V => format!("{l}.self_attn.v_proj"),
            WeightType::O => format!("{l}.self_attn.out_proj"),
            WeightType::P => match tower {
                Tower::Visual => "visual_projection".into(),
                Tower::Text => "text_projection".into(),
            },
        }
    }
}

impl FromStr for WeightType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        serde_json::from_value(serde_json::Value::String(s.into())).map_err(|_| {
            Error::invalid(format!(
                "unknown weight type \"{s}\" (W_up, W_down, W_q, W_k, W_v, W_o, W_p)"
            ))
        })
    }
}

/// One weight matrix of the model that can be made low rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Target {
    pub tower: Tower,
    pub weight: WeightType,
    /// `None` for `W_p`.
    pub layer: Option<usize>,
}

impl Target {
    pub fn module(&self) -> String {
        self.weight.module(self.tower, self.layer.unwrap_or(0))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.layer {
            Some(l) => write!(f, "{}-{}-{l}", self.tower.name(), self.weight.name()),
            None => write!(f, "{}-{}", self.tower.name(), self.weight.name()),
        }
    }
}

/// `[tower, weight_type, layer, ratio]`, the reference's `lora_settings` entry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Setting {
    pub target: Target,
    pub ratio: f64,
}

impl Serialize for Setting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        // Whole ratios (the reference's candidate 0 is the int 0) are written as integers.
        if self.ratio.fract() == 0.0 && self.ratio.abs() < 1e15 {
            (
                self.target.tower,
                self.target.weight,
                self.target.layer,
                self.ratio as i64,
            )
                .serialize(s)
        } else {
            (
                self.target.tower,
                self.target.weight,
                self.target.layer,
                self.ratio,
            )
                .serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Setting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let (tower, weight, layer, ratio) =
            <(Tower, WeightType, Option<usize>, f64)>::deserialize(d)?;
        Ok(Setting {
            target: Target {
                tower,
                weight,
                layer,
            },
            ratio,
        })
    }
}

/// Which components a ratio removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PruneType {
    /// The r smallest (SeTAR; the reference's `small`).
    Minor,
    /// The r largest (`large`).
    Principal,
    /// r components drawn by a permutation seeded per target.
    Random { seed: u64 },
}

/// Round half to even, as Python's `round`.
pub fn round_half_even(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// Components removed for `ratio` of a weight with `full` = min(out, in) singular values:
/// round_half_even(full · ratio). Removing all of them is refused, as the reference asserts.
pub fn rank_for(full: usize, ratio: f64, target: &Target) -> Result<usize> {
    if !(0.0..1.0).contains(&ratio) || !ratio.is_finite() {
        return Err(Error::invalid(format!(
            "{target}: ratio {ratio} is not in [0, 1)"
        )));
    }
    let r = round_half_even(full as f64 * ratio) as usize;
    if r >= full {
        return Err(Error::invalid(format!(
            "{target}: ratio {ratio} removes all {full} components"
        )));
    }
    Ok(r)
}

/// Thin SVD W = U Σ Vᵀ of a row-major `[out, in]` f32 weight, computed in f64, singular
/// values descending.
pub struct Svd {
    pub out_dim: usize,
    pub in_dim: usize,
    /// `[out, k]` row-major, k = min(out, in).
    pub u: Vec<f64>,
    pub s: Vec<f64>,
    /// `[in, k]` row-major (columns are the right singular vectors).
    pub v: Vec<f64>,
}

impl Svd {
    pub fn new(w: &[f32], out_dim: usize, in_dim: usize) -> Result<Svd> {
        if w.len() != out_dim * in_dim {
            return Err(Error::invalid(format!(
                "SVD: {} values for [{out_dim}, {in_dim}]",
                w.len()
            )));
        }
        let m = faer::Mat::<f64>::from_fn(out_dim, in_dim, |i, j| w[i * in_dim + j] as f64);
        let svd = m
            .thin_svd()
            .map_err(|e| Error::invalid(format!("SVD did not converge: {e:?}")))?;
        let k = out_dim.min(in_dim);
        let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
        // Sort descending explicitly, whatever order the library returns.
        let mut idx: Vec<usize> = (0..k).collect();
        idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
        let mut out = Svd {
            out_dim,
            in_dim,
            u: vec![0.0; out_dim * k],
            s: vec![0.0; k],
            v: vec![0.0; in_dim * k],
        };
        for (c, &j) in idx.iter().enumerate() {
            out.s[c] = s[j];
            for i in 0..out_dim {
                out.u[i * k + c] = u[(i, j)];
            }
            for i in 0..in_dim {
                out.v[i * k + c] = v[(i, j)];
            }
        }
        Ok(out)
    }

    pub fn k(&self) -> usize {
        self.s.len()
    }

    /// The order in which components are removed: removing r means removing `order[..r]`,
    /// so nested ratios share prefixes.
    pub fn removal_order(&self, prune: PruneType, target: &Target) -> Vec<usize> {
        let k = self.k();
        match prune {
            PruneType::Minor => (0..k).rev().collect(),
            PruneType::Principal => (0..k).collect(),
            PruneType::Random { seed } => {
                let mut order: Vec<usize> = (0..k).collect();
                let mut state = seed ^ fnv(&target.to_string());
                for i in (1..k).rev() {
                    let j = (splitmix(&mut state) % (i as u64 + 1)) as usize;
                    order.swap(i, j);
                }
                order
            }
        }
    }

    /// The factors of the first `r` removed components, for the correction
    /// `x·W'ᵀ = x·Wᵀ − (x·V_r)·(Σ_r U_rᵀ)`: `vt [r, in]` (rows are vᵢ) and `su [r, out]`
    /// (rows are σᵢ uᵢ), both row-major f32.
    pub fn removed_factors(&self, order: &[usize], r: usize) -> (Vec<f32>, Vec<f32>) {
        let k = self.k();
        let mut vt = Vec::with_capacity(r * self.in_dim);
        let mut su = Vec::with_capacity(r * self.out_dim);
        for &c in &order[..r] {
            vt.extend((0..self.in_dim).map(|i| self.v[i * k + c] as f32));
            su.extend((0..self.out_dim).map(|i| (self.s[c] * self.u[i * k + c]) as f32));
        }
        (vt, su)
    }

    /// W' = W − Σ_{i ∈ order[..r]} σᵢ uᵢ vᵢᵀ, accumulated in f64. r = 0 returns W unchanged.
    pub fn pruned(&self, w: &[f32], order: &[usize], r: usize) -> Vec<f32> {
        if r == 0 {
            return w.to_vec();
        }
        let k = self.k();
        let removed = &order[..r];
        let mut out = vec![0.0f32; w.len()];
        use rayon::prelude::*;
        out.par_chunks_mut(self.in_dim)
            .enumerate()
            .for_each(|(i, row)| {
                let coeff: Vec<f64> = removed
                    .iter()
                    .map(|&c| self.s[c] * self.u[i * k + c])
                    .collect();
                for (j, o) in row.iter_mut().enumerate() {
                    let vrow = &self.v[j * k..(j + 1) * k];
                    let delta: f64 = removed.iter().zip(&coeff).map(|(&c, a)| a * vrow[c]).sum();
                    *o = (w[i * self.in_dim + j] as f64 - delta) as f32;
                }
            });
        out
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x1000_0000_01b3)
    })
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            tower: Tower::Visual,
            weight: WeightType::Up,
            layer: Some(3),
        }
    }

    #[test]
    fn python_rounding() {
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(3.5), 4);
        assert_eq!(round_half_even(38.4), 38);
        assert_eq!(round_half_even(38.5), 38);
        assert_eq!(round_half_even(39.5), 40);
        // ViT-B/16 fc1: min(3072, 768) = 768; 768 · 0.05 = 38.4 → 38.
        assert_eq!(rank_for(768, 0.05, &target()).unwrap(), 38);
        assert_eq!(rank_for(768, 0.0, &target()).unwrap(), 0);
        assert!(rank_for(10, 0.96, &target()).is_err());
    }

    #[test]
    fn svd_reconstructs_and_prunes() {
        let (m, n) = (7, 5);
        let w: Vec<f32> = (0..m * n)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let svd = Svd::new(&w, m, n).unwrap();
        assert!(svd.s.windows(2).all(|p| p[0] >= p[1]));
        let order = svd.removal_order(PruneType::Minor, &target());
        // Removing everything reconstructs zero; removing nothing is bit-identical.
        let zero = svd.pruned(&w, &order, svd.k());
        assert!(zero.iter().all(|x| x.abs() < 1e-5), "{zero:?}");
        assert_eq!(svd.pruned(&w, &order, 0), w);
        // The factors give the same correction as the pruned weight.
        let r = 2;
        let (vt, su) = svd.removed_factors(&order, r);
        let pruned = svd.pruned(&w, &order, r);
        for i in 0..m {
            for j in 0..n {
                let corr: f32 = (0..r).map(|c| su[c * m + i] * vt[c * n + j]).sum();
                assert!((w[i * n + j] - corr - pruned[i * n + j]).abs() < 1e-5);
            }
        }
        // Minor removes the smallest, principal the largest, random is a seeded permutation.
        assert_eq!(order[0], svd.k() - 1);
        assert_eq!(svd.removal_order(PruneType::Principal, &target())[0], 0);
        let a = svd.removal_order(PruneType::Random { seed: 3 }, &target());
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..svd.k()).collect::<Vec<_>>());
        assert_eq!(
            a,
            svd.removal_order(PruneType::Random { seed: 3 }, &target())
        );
    }

    #[test]
    fn settings_use_the_reference_json_shape() {
        let s = Setting {
            target: target(),
            ratio: 0.15,
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"["visual","W_up",3,0.15]"#);
        let back: Setting = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let p: Setting = serde_json::from_str(r#"["text","W_p",null,0.1]"#).unwrap();
        assert_eq!(p.target.layer, None);
    }
}
