//! Evaluating candidate low-rank settings, two ways.
//!
//! *Cached* (the default): the SVD of each target is computed once; decided settings are
//! materialised once; while the vision tower is searched the text features are fixed (and the
//! image features while the text tower is); the hidden states entering the target's layer are
//! computed once per chunk of images and shared by every candidate, which re-runs only the
//! layers from the target upward; within the target's Linear, x·Wᵀ and x·V are shared by all
//! candidate ratios, each of which subtracts a prefix of the removed components.
//!
//! *Naive* (the reference's way, for checking): every candidate re-applies all settings and
//! re-runs both towers on everything.

use super::evaluate::{
    eval_images, eval_normalised, normalised, normalised_features, reduce, ImageEval, Outcome,
};
use super::SearchConfig;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::lowrank::{Svd, Target, Tower, WeightType};
use crate::model::clip::Linear;
use crate::model::overrides::{DeltaMemo, LinearOverride, Overrides};
use crate::model::prompts::PromptBuckets;
use crate::model::Clip;
use crate::weights::{F32Data, WeightsFile};
use indicatif::ProgressBar;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The ID validation set, preprocessed once.
pub struct SearchData {
    /// `[n, channels, size, size]`.
    pub pixels: Vec<f32>,
    pub labels: Vec<usize>,
    /// Relative paths, for reports.
    pub images: Vec<String>,
    /// Tokenised prompts, one per class, bucketed by length.
    pub prompts: PromptBuckets,
}

impl SearchData {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Global `[n, dim]` and local `[n, patches, dim]` image features, L2-normalised once.
pub struct ImageFeatureSet {
    pub global: Vec<f32>,
    pub local: Vec<f32>,
}

/// What the search needs of one target weight, computed once per run.
pub struct Prepared {
    pub svd: Svd,
    pub order: Vec<usize>,
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

impl Prepared {
    pub fn k(&self) -> usize {
        self.svd.k()
    }
}

pub struct Engine<'a, B: Backend> {
    pub model: &'a Clip<B>,
    file: &'a WeightsFile,
    data: &'a SearchData,
    cfg: &'a SearchConfig,
    prepared: HashMap<Target, Arc<Prepared>>,
    decided: BTreeMap<Target, usize>,
    materialised: HashMap<Target, Linear<B::Weight>>,
    /// Normalised text features for the decided text settings, and the version they are for.
    text_cache: Option<(u64, Vec<f32>)>,
    /// Image features (global, local) for the decided vision settings.
    image_cache: Option<(u64, Arc<ImageFeatureSet>)>,
    text_version: u64,
    vision_version: u64,
}

fn owned(v: Vec<f32>) -> F32Data {
    F32Data::Owned(Arc::new(v))
}

impl<'a, B: Backend> Engine<'a, B> {
    pub fn new(
        model: &'a Clip<B>,
        file: &'a WeightsFile,
        data: &'a SearchData,
        cfg: &'a SearchConfig,
    ) -> Self {
        Engine {
            model,
            file,
            data,
            cfg,
            prepared: HashMap::new(),
            decided: BTreeMap::new(),
            materialised: HashMap::new(),
            text_cache: None,
            image_cache: None,
            text_version: 0,
            vision_version: 0,
        }
    }

    fn layers(&self, tower: Tower) -> usize {
        match tower {
            Tower::Visual => self.model.config.vision.tower.layers,
            Tower::Text => self.model.config.text.tower.layers,
        }
    }

    /// The SVD and removal order of a target (computed on first use).
    pub fn prepare(&mut self, target: Target) -> Result<Arc<Prepared>> {
        if let Some(p) = self.prepared.get(&target) {
            return Ok(p.clone());
        }
        if let Some(l) = target.layer {
            if l >= self.layers(target.tower) {
                return Err(Error::invalid(format!(
                    "{target}: the {} tower has {} layers",
                    target.tower.name(),
                    self.layers(target.tower)
                )));
            }
        }
        let module = target.module();
        let name = format!("{module}.weight");
        let shape = self.file.shape(&name)?.to_vec();
        if shape.len() != 2 {
            return Err(Error::tensor(self.file.path(), &name, "is not a matrix"));
        }
        let weight = self.file.f32(&name, &shape)?.to_vec();
        let bias_name = format!("{module}.bias");
        let bias = if target.weight == WeightType::P {
            None
        } else {
            Some(self.file.f32(&bias_name, &[shape[0]])?.to_vec())
        };
        let svd = Svd::new(&weight, shape[0], shape[1])?;
        let order = svd.removal_order(self.cfg.prune, &target);
        let p = Arc::new(Prepared {
            svd,
            order,
            weight,
            bias,
        });
        self.prepared.insert(target, p.clone());
        Ok(p)
    }

    /// W' for `rank` as a Linear on the backend.
    fn materialise(&self, p: &Prepared, rank: usize) -> Result<Linear<B::Weight>> {
        let b = &self.model.backend;
        let w = p.svd.pruned(&p.weight, &p.order, rank);
        Ok(Linear {
            weight: b.weight(owned(w))?,
            bias: match &p.bias {
                Some(v) => Some(b.weight(owned(v.clone()))?),
                None => None,
            },
            out_dim: p.svd.out_dim,
            in_dim: p.svd.in_dim,
        })
    }

    /// Fixes a decision: later evaluations run with W' for `rank` at `target`.
    pub fn decide(&mut self, target: Target, rank: usize) -> Result<()> {
        self.decided.insert(target, rank);
        if rank > 0 {
            let p = self.prepare(target)?;
            let lin = self.materialise(&p, rank)?;
            self.materialised.insert(target, lin);
            match target.tower {
                Tower::Visual => self.vision_version += 1,
                Tower::Text => self.text_version += 1,
            }
        }
        Ok(())
    }

    pub fn decided(&self) -> &BTreeMap<Target, usize> {
        &self.decided
    }

    fn base_overrides(&self) -> Overrides<'_, B> {
        let mut ov = Overrides::none();
        for (t, lin) in &self.materialised {
            ov.insert(*t, LinearOverride::Weight(lin));
        }
        ov
    }

    fn scale(&self) -> f32 {
        self.model.logit_scale.exp()
    }

    fn chunks(&self) -> Vec<std::ops::Range<usize>> {
        let n = self.data.len();
        let b = self.cfg.batch.max(1);
        (0..n.div_ceil(b))
            .map(|i| i * b..((i + 1) * b).min(n))
            .collect()
    }

    fn pixels(&self, r: &std::ops::Range<usize>) -> &[f32] {
        let per = self.data.pixels.len() / self.data.len().max(1);
        &self.data.pixels[r.start * per..r.end * per]
    }

    /// Text features with the decided settings (cached while only the vision tower changes).
    fn text_features(&mut self) -> Result<Vec<f32>> {
        if let Some((v, t)) = &self.text_cache {
            if *v == self.text_version {
                return Ok(t.clone());
            }
        }
        let t = self
            .model
            .encode_prompts(&self.data.prompts, &self.base_overrides())?;
        let t = normalised(t, self.model.config.projection_dim)?;
        self.text_cache = Some((self.text_version, t.clone()));
        Ok(t)
    }

    /// Image features with the decided settings (cached while only the text tower changes;
    /// shared, not copied: the local features of 1,000 images are 400 MB).
    fn image_features(&mut self, bar: &ProgressBar) -> Result<Arc<ImageFeatureSet>> {
        if let Some((v, f)) = &self.image_cache {
            if *v == self.vision_version {
                return Ok(f.clone());
            }
        }
        let (mut g, mut l) = (Vec::new(), Vec::new());
        let ov = self.base_overrides();
        for r in self.chunks() {
            bar.set_message(format!("image features {}/{}", r.end, self.data.len()));
            let f = self
                .model
                .encode_images_with(self.pixels(&r), r.len(), true, &ov)?;
            g.extend(f.embeds);
            l.extend(f.local.expect("local features"));
        }
        drop(ov);
        let dim = self.model.config.projection_dim;
        let f = Arc::new(ImageFeatureSet {
            global: normalised_features(&g, dim)?,
            local: normalised_features(&l, dim)?,
        });
        self.image_cache = Some((self.vision_version, f.clone()));
        Ok(f)
    }

    /// The decided settings plus the candidate `rank` at `target`, as a shared-product delta.
    fn candidate_overrides<'o>(
        &'o self,
        target: Target,
        vt: &'o Linear<B::Weight>,
        su: &'o B::Weight,
        kmax: usize,
        rank: usize,
        memo: &'o DeltaMemo<B::Tensor>,
    ) -> Overrides<'o, B> {
        let mut ov = self.base_overrides();
        ov.insert(
            target,
            LinearOverride::Delta {
                vt,
                su,
                kmax,
                rank,
                memo,
            },
        );
        ov
    }

    /// Evaluates fixed image features `g [n, dim]`, `l [n, patches, dim]` against `text`, by chunk.
    fn eval_features(
        &self,
        g: &[f32],
        l: &[f32],
        text: &[f32],
        bar: &ProgressBar,
    ) -> Result<Vec<ImageEval>> {
        let (d, dim) = (self.data, self.model.config.projection_dim);
        let patches = l.len() / (d.len() * dim).max(1);
        let mut evals = Vec::with_capacity(d.len());
        for r in self.chunks() {
            let gr = &g[r.start * dim..r.end * dim];
            let lr = &l[r.start * patches * dim..r.end * patches * dim];
            evals.extend(eval_normalised(
                gr,
                lr,
                text,
                dim,
                &d.labels[r.clone()],
                self.scale(),
                self.cfg,
            )?);
            bar.inc(1);
        }
        Ok(evals)
    }

    /// The objective for decided settings + `target` at each rank in `ranks` (cached way).
    pub fn evaluate(
        &mut self,
        target: Target,
        ranks: &[usize],
        bar: &ProgressBar,
    ) -> Result<Vec<Outcome>> {
        if self.decided.contains_key(&target) {
            return Err(Error::invalid(format!("{target} is already decided")));
        }
        let p = self.prepare(target)?;
        let kmax = ranks.iter().copied().max().unwrap_or(0);
        let b = &self.model.backend;
        let (vt, su) = p.svd.removed_factors(&p.order, kmax);
        let vt = Linear {
            weight: b.weight(owned(vt))?,
            bias: None,
            out_dim: kmax,
            in_dim: p.svd.in_dim,
        };
        let su = b.weight(owned(su))?;
        let mut evals: Vec<Vec<ImageEval>> = vec![Vec::with_capacity(self.data.len()); ranks.len()];
        let dim = self.model.config.projection_dim;
        match target.tower {
            Tower::Visual => {
                let text = self.text_features()?;
                let layers = self.layers(Tower::Visual);
                let start = target.layer.unwrap_or(layers - 1);
                let base = self.base_overrides();
                for r in self.chunks() {
                    let n = r.len();
                    let mut h = self.model.vision_embed(self.pixels(&r), n)?;
                    self.model.vision_layers(&mut h, n, 0..start, &base)?;
                    let memo = DeltaMemo::default();
                    for (ci, &rank) in ranks.iter().enumerate() {
                        memo.rewind();
                        let ov = self.candidate_overrides(target, &vt, &su, kmax, rank, &memo);
                        let mut hc = b.duplicate(&h)?;
                        self.model
                            .vision_layers(&mut hc, n, start..layers - 1, &ov)?;
                        let f = self.model.vision_head(&hc, n, true, &ov)?;
                        let local = f.local.expect("local features");
                        let labels = &self.data.labels[r.clone()];
                        evals[ci].extend(eval_images(
                            &f.embeds,
                            &local,
                            &text,
                            dim,
                            labels,
                            self.scale(),
                            self.cfg,
                        )?);
                        bar.inc(1);
                    }
                }
            }
            Tower::Text => {
                let features = self.image_features(bar)?;
                let (g, l) = (&features.global, &features.local);
                let layers = self.layers(Tower::Text);
                let start = target.layer.unwrap_or(layers);
                let d = self.data;
                let base = self.base_overrides();
                // Hidden states entering the target layer, per prompt bucket.
                let mut states = Vec::with_capacity(d.prompts.buckets.len());
                for bk in &d.prompts.buckets {
                    let mut h = self.model.text_embed(&bk.ids, &bk.lengths, bk.seq)?;
                    self.model
                        .text_layers(&mut h, &bk.lengths, bk.seq, 0..start, &base)?;
                    states.push(h);
                }
                let memo = DeltaMemo::default();
                for (ci, &rank) in ranks.iter().enumerate() {
                    memo.rewind();
                    let ov = self.candidate_overrides(target, &vt, &su, kmax, rank, &memo);
                    let mut feats = Vec::with_capacity(states.len());
                    for (bk, h) in d.prompts.buckets.iter().zip(&states) {
                        let mut hc = b.duplicate(h)?;
                        self.model
                            .text_layers(&mut hc, &bk.lengths, bk.seq, start..layers, &ov)?;
                        feats.push(self.model.text_head(&hc, &bk.ids, bk.seq, &ov)?);
                    }
                    let text = normalised(d.prompts.scatter(&feats, dim), dim)?;
                    evals[ci] = self.eval_features(g, l, &text, bar)?;
                }
            }
        }
        evals.iter().map(|e| reduce(e, self.cfg)).collect()
    }

    /// The same objective, the reference's way: all settings re-applied, everything re-run.
    pub fn evaluate_naive(
        &mut self,
        target: Target,
        ranks: &[usize],
        bar: &ProgressBar,
    ) -> Result<Vec<Outcome>> {
        let p = self.prepare(target)?;
        let d = self.data;
        let dim = self.model.config.projection_dim;
        let mut out = Vec::with_capacity(ranks.len());
        for &rank in ranks {
            let candidate = self.materialise(&p, rank)?;
            let mut ov = self.base_overrides();
            ov.insert(target, LinearOverride::Weight(&candidate));
            let text = normalised(self.model.encode_prompts(&d.prompts, &ov)?, dim)?;
            let mut evals = Vec::with_capacity(d.len());
            for r in self.chunks() {
                let f = self
                    .model
                    .encode_images_with(self.pixels(&r), r.len(), true, &ov)?;
                let local = f.local.expect("local features");
                evals.extend(eval_images(
                    &f.embeds,
                    &local,
                    &text,
                    dim,
                    &d.labels[r.clone()],
                    self.scale(),
                    self.cfg,
                )?);
                bar.inc(1);
            }
            out.push(reduce(&evals, self.cfg)?);
        }
        Ok(out)
    }

    /// Progress units `evaluate` and `evaluate_naive` report for `n` ranks.
    pub fn units(&self, n: usize) -> u64 {
        (n * self.chunks().len()) as u64
    }
}
