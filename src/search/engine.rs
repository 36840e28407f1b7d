//! Evaluating candidate low-rank settings, two ways.
//!
//! *Cached* (the default): the SVD of each target is computed once; decided settings are
//! materialised once; while the vision tower is searched the text features are fixed (and the
//! image features while the text tower is); the hidden states entering the target's layer are
//! computed once per chunk of images (from the nearest kept checkpoint below, see
//! `vision_states`) and shared by every candidate, which re-runs only the layers from the
//! target upward (from the target's MLP when the target is `mlp.fc1` or `mlp.fc2`: the
//! block's attention half is shared too); within the target's Linear, x·Wᵀ and x·V are shared
//! by all candidate ratios, each of which subtracts a prefix of the removed components.
//!
//! *Naive* (the reference's way, for checking): every candidate re-applies all settings and
//! re-runs both towers on everything.

use super::background::{BackgroundSvds, TargetWeight};
use super::evaluate::{
    eval_images, eval_on_backend, non_finite_text, normalised, reduce, ImageEval, Outcome,
};
use super::{memory, SearchConfig};
use crate::backend::{AttentionMask, Backend, SvdSchedule};
use crate::error::{Error, Result};
use crate::lowrank::{Svd, Target, Tower, WeightType};
use crate::model::clip::{text_mask, Linear};
use crate::model::overrides::{DeltaMemo, LinearOverride, Overrides};
use crate::model::prompts::{joined, PromptBuckets};
use crate::model::Clip;
use crate::weights::{F32Data, WeightsFile};
use indicatif::ProgressBar;
use std::cell::RefCell;
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

/// Per chunk of images, global `[n, dim]` and local `[n · patches, dim]` image features,
/// L2-normalised once, on the backend.
pub struct ImageFeatureSet<T> {
    pub chunks: Vec<(T, T)>,
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
    /// Normalised text features for the decided text settings (on the backend), and the
    /// version they are for.
    text_cache: Option<(u64, Arc<B::Tensor>)>,
    /// Image features (global, local) for the decided vision settings.
    image_cache: Option<(u64, Arc<ImageFeatureSet<B::Tensor>>)>,
    text_version: u64,
    vision_version: u64,
    /// Per chunk, the hidden states entering vision layers, by layer: layer 0 (the embedded
    /// tokens, which no setting touches, so the pixels go to the backend once per search),
    /// and the layers of `checkpoints` (`memory::vision_state_layers`), kept while no vision setting
    /// below them is decided: a top-down search computes the tower's lower layers once, not
    /// once per step. (A cell: filled while the decided settings' overrides borrow the engine.)
    vision_states: RefCell<Vec<BTreeMap<usize, B::Tensor>>>,
    /// Whether `prepare_all` computes the SVDs up front by the backend or hands (all but the
    /// first of) them to host threads and lets the search go on (see `background.rs`).
    svd_schedule: SvdSchedule,
    /// The SVDs being computed in the background.
    background: Option<BackgroundSvds>,
    /// The vision layers whose entering states `vision_states` keeps besides layer 0: the
    /// checkpoints, unless they do not fit the backend's memory budget beside a chunk.
    checkpoints: Vec<usize>,
    /// Whether a text step stacks its candidates through the layers above the target
    /// ([`Backend::stack_text_candidates`]; see `memory::text_stack` for how many at a time).
    text_stacking: bool,
}

/// The hidden states a search keeps entering vision layers (layer 0, the embedded tokens,
/// always).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VisionStates {
    /// Every layer: no step re-runs a block below its target.
    EveryLayer,
    /// Every ⌈√layers⌉ layers (`memory::checkpoint_layers`).
    Checkpoints,
    /// Only the embedded tokens: each step runs the tower up to its target.
    EmbeddedOnly,
}

impl VisionStates {
    /// `SETAR_SEARCH_STATES=every|checkpoints|embedded`, which overrides the choice by memory
    /// (for comparisons; an unknown value is warned about and ignored).
    fn from_env() -> Option<VisionStates> {
        let v = std::env::var("SETAR_SEARCH_STATES").ok()?;
        match v.as_str() {
            "every" => Some(VisionStates::EveryLayer),
            "checkpoints" => Some(VisionStates::Checkpoints),
            "embedded" => Some(VisionStates::EmbeddedOnly),
            _ => {
                eprintln!(
                    "warning: SETAR_SEARCH_STATES={v} is not one of every, checkpoints, embedded; ignored"
                );
                None
            }
        }
    }
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
        let mut engine = Engine {
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
            vision_states: RefCell::new(Vec::new()),
            svd_schedule: model.backend.svd_schedule(),
            text_stacking: model.backend.stack_text_candidates(),
            background: None,
            checkpoints: Vec::new(),
        };
        let b = &model.backend;
        engine.checkpoints = memory::vision_state_layers(
            &model.config,
            file.parameter_count(),
            b.value_bytes(),
            data.len(),
            cfg.batch,
            b.memory_budget(),
            b.room_for_vision_states(),
        );
        if let Some(kept) = VisionStates::from_env() {
            engine.set_vision_states(kept);
        }
        engine
    }

    /// Which vision states the search keeps (by default what the backend's memory allows,
    /// see `memory::vision_state_layers`). All give the same values; more states save work.
    pub fn set_vision_states(&mut self, kept: VisionStates) {
        let layers = self.layers(Tower::Visual);
        self.checkpoints = match kept {
            VisionStates::EveryLayer => memory::every_layer(layers),
            VisionStates::Checkpoints => memory::checkpoint_layers(layers),
            VisionStates::EmbeddedOnly => Vec::new(),
        };
    }

    /// The vision layers (besides layer 0) whose entering states this search keeps.
    pub fn kept_vision_layers(&self) -> &[usize] {
        &self.checkpoints
    }

    /// Stacks a text step's candidates in one batch above the target (the backend's choice by
    /// default) or runs them one after another. Either gives the same values.
    pub fn set_text_stacking(&mut self, on: bool) {
        self.text_stacking = on;
    }

    /// How many candidates of a text step run stacked (`memory::text_stack`): as many as the
    /// activations of a vision chunk would hold, judged by the largest prompt batch.
    fn text_stack(&self, candidates: usize) -> usize {
        let (tokens, seq) = self
            .data
            .prompts
            .buckets
            .iter()
            .map(|bk| (bk.lengths.len() * bk.seq, bk.seq))
            .max()
            .unwrap_or((0, 0));
        memory::text_stack(
            &self.model.config,
            self.model.backend.value_bytes(),
            self.cfg.batch.min(self.data.len()),
            tokens,
            seq,
            candidates,
        )
    }

    /// Chooses where `prepare_all` computes the SVDs (any schedule gives the same decisions).
    pub fn set_svd_schedule(&mut self, schedule: SvdSchedule) {
        self.svd_schedule = schedule;
    }

    /// Seconds the search has waited for background SVDs (0 when they run up front).
    pub fn svd_wait_seconds(&self) -> f64 {
        self.background
            .as_ref()
            .map_or(0.0, |bg| bg.waited_seconds())
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
        let (svd, weight, bias) = match &mut self.background {
            Some(bg) if bg.has(target) => {
                let (svd, w) = bg.wait(target)?;
                (svd, w.weight, w.bias)
            }
            _ => {
                let (weight, bias, out_dim, in_dim) = self.load_target(target)?;
                let svd = self
                    .model
                    .backend
                    .thin_svds(&[(&weight, out_dim, in_dim)])?
                    .remove(0);
                (svd, weight, bias)
            }
        };
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

    /// k = min(out, in) of a target's weight: its number of singular values, known before
    /// its SVD is.
    pub fn rank_dim(&self, target: Target) -> Result<usize> {
        if let Some(p) = self.prepared.get(&target) {
            return Ok(p.k());
        }
        let (out_dim, in_dim) = self.target_shape(target)?;
        Ok(out_dim.min(in_dim))
    }

    /// `[out, in]` of a target's weight in the weights file.
    fn target_shape(&self, target: Target) -> Result<(usize, usize)> {
        if let Some(l) = target.layer {
            if l >= self.layers(target.tower) {
                return Err(Error::invalid(format!(
                    "{target}: the {} tower has {} layers",
                    target.tower.name(),
                    self.layers(target.tower)
                )));
            }
        }
        let name = format!("{}.weight", target.module());
        match *self.file.shape(&name)? {
            [out_dim, in_dim] => Ok((out_dim, in_dim)),
            _ => Err(Error::tensor(self.file.path(), &name, "is not a matrix")),
        }
    }

    /// The f32 weight (and bias) of a target from the weights file, with `[out, in]`.
    #[allow(clippy::type_complexity)]
    fn load_target(&self, target: Target) -> Result<(Vec<f32>, Option<Vec<f32>>, usize, usize)> {
        let (out_dim, in_dim) = self.target_shape(target)?;
        let module = target.module();
        let name = format!("{module}.weight");
        let shape = [out_dim, in_dim];
        let weight = self.file.f32(&name, &shape)?.to_vec();
        let bias_name = format!("{module}.bias");
        let bias = if target.weight == WeightType::P {
            None
        } else {
            Some(self.file.f32(&bias_name, &[shape[0]])?.to_vec())
        };
        Ok((weight, bias, shape[0], shape[1]))
    }

    /// Computes the SVDs of `targets` not prepared yet, in one batch (the backend groups
    /// equal shapes; the CPU runs them in parallel), or, with background SVDs, starts them on
    /// host threads in this order and returns ([`Engine::prepare`] waits for each).
    pub fn prepare_all(&mut self, targets: &[Target]) -> Result<()> {
        let todo: Vec<Target> = targets
            .iter()
            .copied()
            .filter(|t| !self.prepared.contains_key(t))
            .filter(|t| !self.background.as_ref().is_some_and(|bg| bg.has(*t)))
            .collect();
        if self.svd_schedule != SvdSchedule::UpFront && !todo.is_empty() {
            // One pool at a time: first take in what an earlier call started.
            let earlier = self
                .background
                .as_ref()
                .map_or(Vec::new(), |bg| bg.pending());
            for t in earlier {
                self.prepare(t)?;
            }
            let (first, rest) = match self.svd_schedule {
                SvdSchedule::FirstThenBackground | SvdSchedule::SideStream => {
                    (Some(todo[0]), &todo[1..])
                }
                _ => (None, &todo[..]),
            };
            let mut mats = Vec::with_capacity(rest.len());
            for &target in rest {
                let (weight, bias, out_dim, in_dim) = self.load_target(target)?;
                mats.push(TargetWeight {
                    target,
                    weight,
                    bias,
                    out_dim,
                    in_dim,
                });
            }
            let bg = match self.svd_schedule {
                SvdSchedule::SideStream => {
                    BackgroundSvds::start_side(mats, self.model.backend.side_svd_solver()?)?
                }
                _ => BackgroundSvds::start(mats, BackgroundSvds::default_threads())?,
            };
            self.background = Some(bg);
            // The host threads are busy with the rest while the backend does this one.
            if let Some(t) = first {
                self.prepare(t)?;
            }
            return Ok(());
        }
        if todo.len() < 2 {
            for t in todo {
                self.prepare(t)?;
            }
            return Ok(());
        }
        let mut loaded = Vec::with_capacity(todo.len());
        for &t in &todo {
            loaded.push(self.load_target(t)?);
        }
        let mats: Vec<(&[f32], usize, usize)> = loaded
            .iter()
            .map(|(w, _, o, i)| (w.as_slice(), *o, *i))
            .collect();
        let svds = self.model.backend.thin_svds(&mats)?;
        for ((t, (weight, bias, _, _)), svd) in todo.into_iter().zip(loaded).zip(svds) {
            let order = svd.removal_order(self.cfg.prune, &t);
            self.prepared.insert(
                t,
                Arc::new(Prepared {
                    svd,
                    order,
                    weight,
                    bias,
                }),
            );
        }
        Ok(())
    }

    /// W' for `rank` as a Linear on the backend: by the backend from the model's weight and
    /// the removed factors when it can (a device), else on the host in f64.
    fn materialise(&self, p: &Prepared, rank: usize, target: Target) -> Result<Linear<B::Weight>> {
        let b = &self.model.backend;
        let base = self.model.base_linear(target)?;
        let (vt, su) = p.svd.removed_factors(&p.order, rank);
        let on_backend = b.lowrank_weight(
            &base.weight,
            &b.weight(owned(vt))?,
            &b.weight(owned(su))?,
            rank,
            p.svd.out_dim,
            p.svd.in_dim,
        )?;
        let weight = match on_backend {
            Some(w) => w,
            None => b.weight(owned(p.svd.pruned(&p.weight, &p.order, rank)))?,
        };
        Ok(Linear {
            weight,
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
            let lin = self.materialise(&p, rank, target)?;
            self.materialised.insert(target, lin);
            match target.tower {
                Tower::Visual => self.vision_version += 1,
                Tower::Text => self.text_version += 1,
            }
            // States entering layers above a changed vision block are stale.
            if let (Tower::Visual, Some(d)) = (target.tower, target.layer) {
                for states in self.vision_states.get_mut() {
                    states.retain(|&l, _| l <= d);
                }
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

    /// Embeds every chunk's pixels once (layer 0 of `vision_states`).
    fn embed_chunks(&mut self) -> Result<()> {
        if self.vision_states.get_mut().is_empty() {
            let mut all = Vec::new();
            for r in self.chunks() {
                let e = self.model.vision_embed(self.pixels(&r), r.len())?;
                all.push(BTreeMap::from([(0, e)]));
            }
            *self.vision_states.get_mut() = all;
        }
        Ok(())
    }

    /// A fresh copy of chunk `ci`'s hidden states entering vision layer `layer` under the
    /// decided settings: from the nearest kept state at or below it, keeping the checkpoints
    /// passed on the way.
    fn state_entering(&self, ci: usize, layer: usize, n: usize) -> Result<B::Tensor> {
        let b = &self.model.backend;
        let ov = &self.base_overrides();
        let (mut at, mut h) = {
            let states = self.vision_states.borrow();
            let (&at, t) = states[ci]
                .range(..=layer)
                .next_back()
                .ok_or_else(|| Error::invalid("the embedded tokens are missing"))?;
            (at, b.duplicate(t)?)
        };
        let from = at;
        for &next in self.checkpoints.iter().filter(|&&c| c > from && c <= layer) {
            self.model.vision_layers(&mut h, n, at..next, ov)?;
            self.vision_states.borrow_mut()[ci].insert(next, b.duplicate(&h)?);
            at = next;
        }
        self.model.vision_layers(&mut h, n, at..layer, ov)?;
        Ok(h)
    }

    fn classes(&self) -> usize {
        self.data.prompts.count
    }

    fn patches(&self) -> usize {
        let g = self.model.config.vision.grid();
        g * g
    }

    /// Text features with the decided settings, normalised, on the backend (cached while only
    /// the vision tower changes).
    fn text_features(&mut self) -> Result<Arc<B::Tensor>> {
        if let Some((v, t)) = &self.text_cache {
            if *v == self.text_version {
                return Ok(t.clone());
            }
        }
        let t = self
            .model
            .encode_prompts_tensor(&self.data.prompts, &self.base_overrides())?;
        let t = Arc::new(self.normalised_text(t)?);
        self.text_cache = Some((self.text_version, t.clone()));
        Ok(t)
    }

    /// Text features L2-normalised and checked on the backend (one index comes back, not the
    /// features).
    fn normalised_text(&self, mut t: B::Tensor) -> Result<B::Tensor> {
        let b = &self.model.backend;
        let dim = self.model.config.projection_dim;
        b.l2_normalize(&mut t, dim)?;
        match b.first_non_finite(&t)? {
            Some(i) => Err(non_finite_text(i, dim)),
            None => Ok(t),
        }
    }

    /// Normalised global and local features of a chunk from its hidden states before the
    /// last vision block, on the backend.
    fn head_features(
        &self,
        h: B::Tensor,
        n: usize,
        ov: &Overrides<B>,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let b = &self.model.backend;
        let dim = self.model.config.projection_dim;
        let (mut g, l) = self.model.vision_head_tensors(h, n, true, ov)?;
        let mut l = l.expect("local features");
        b.l2_normalize(&mut g, dim)?;
        b.l2_normalize(&mut l, dim)?;
        Ok((g, l))
    }

    /// Image features with the decided settings, per chunk, on the backend (cached while only
    /// the text tower changes; shared, not copied: the local features of 1,000 images are
    /// 400 MB in f32).
    fn image_features(&mut self, bar: &ProgressBar) -> Result<Arc<ImageFeatureSet<B::Tensor>>> {
        if let Some((v, f)) = &self.image_cache {
            if *v == self.vision_version {
                return Ok(f.clone());
            }
        }
        self.embed_chunks()?;
        let ov = self.base_overrides();
        let layers = self.layers(Tower::Visual);
        let mut chunks = Vec::new();
        for (ci, r) in self.chunks().into_iter().enumerate() {
            bar.set_message(format!("image features {}/{}", r.end, self.data.len()));
            let n = r.len();
            let h = self.state_entering(ci, layers - 1, n)?;
            chunks.push(self.head_features(h, n, &ov)?);
        }
        drop(ov);
        let f = Arc::new(ImageFeatureSet { chunks });
        self.image_cache = Some((self.vision_version, f.clone()));
        Ok(f)
    }

    /// Evaluates one chunk's normalised features against the normalised text features.
    fn eval_chunk(
        &self,
        g: &B::Tensor,
        l: &B::Tensor,
        text: &B::Tensor,
        r: &std::ops::Range<usize>,
    ) -> Result<Vec<ImageEval>> {
        eval_on_backend(
            &self.model.backend,
            g,
            l,
            text,
            self.model.config.projection_dim,
            self.classes(),
            self.patches(),
            &self.data.labels[r.clone()],
            self.scale(),
            self.cfg,
        )
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

    /// Evaluates the cached image features against `text`, by chunk.
    fn eval_features(
        &self,
        features: &ImageFeatureSet<B::Tensor>,
        text: &B::Tensor,
        bar: &ProgressBar,
    ) -> Result<Vec<ImageEval>> {
        let mut evals = Vec::with_capacity(self.data.len());
        for ((g, l), r) in features.chunks.iter().zip(self.chunks()) {
            evals.extend(self.eval_chunk(g, l, text, &r)?);
            bar.inc(1);
        }
        Ok(evals)
    }

    /// The first `kmax` removed components of `target` on the backend, as the Linear x ↦ x·V
    /// and the rows σᵢuᵢ (waits for its SVD when that runs in the background).
    fn removed_factors(
        &mut self,
        target: Target,
        kmax: usize,
    ) -> Result<(Linear<B::Weight>, B::Weight)> {
        let p = self.prepare(target)?;
        let b = &self.model.backend;
        let (vt, su) = p.svd.removed_factors(&p.order, kmax);
        let vt = Linear {
            weight: b.weight(owned(vt))?,
            bias: None,
            out_dim: kmax,
            in_dim: p.svd.in_dim,
        };
        Ok((vt, b.weight(owned(su))?))
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
        // The shared x·V gets kmax columns, rounded up to a multiple of 8 so that its rows
        // stay 16-byte aligned in 16-bit dtypes, as cuBLAS's fast kernels need (the extra
        // columns are the next components in removal order; no candidate uses them).
        let kmax = ranks
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .next_multiple_of(8)
            .min(self.rank_dim(target)?);
        let b = &self.model.backend;
        let mut evals: Vec<Vec<ImageEval>> = vec![Vec::with_capacity(self.data.len()); ranks.len()];
        let dim = self.model.config.projection_dim;
        // In each branch the target's factors are asked for only after the work that does not
        // need them is queued, so a background SVD overlaps it.
        match target.tower {
            Tower::Visual => {
                let text = self.text_features()?;
                self.embed_chunks()?;
                let (vt, su) = self.removed_factors(target, kmax)?;
                let layers = self.layers(Tower::Visual);
                let start = target.layer.unwrap_or(layers - 1);
                // The last block is run by the head, which handles its own attention.
                let mlp_only = is_mlp(target) && start < layers - 1;
                let tokens = self.model.config.vision.tokens();
                let base = self.base_overrides();
                for (ci, r) in self.chunks().into_iter().enumerate() {
                    let n = r.len();
                    let mut h = self.state_entering(ci, start, n)?;
                    if mlp_only {
                        let mask = AttentionMask::default();
                        self.model.attention_residual(
                            &mut h,
                            Tower::Visual,
                            start,
                            n,
                            tokens,
                            &mask,
                            &base,
                        )?;
                    }
                    let memo = DeltaMemo::default();
                    for (ri, &rank) in ranks.iter().enumerate() {
                        memo.rewind();
                        let ov = self.candidate_overrides(target, &vt, &su, kmax, rank, &memo);
                        let mut hc = b.duplicate(&h)?;
                        let mut from = start;
                        if mlp_only {
                            self.model.mlp_residual(
                                &mut hc,
                                n * tokens,
                                Tower::Visual,
                                start,
                                &ov,
                            )?;
                            from += 1;
                        }
                        self.model
                            .vision_layers(&mut hc, n, from..layers - 1, &ov)?;
                        let (g, l) = self.head_features(hc, n, &ov)?;
                        evals[ri].extend(self.eval_chunk(&g, &l, &text, &r)?);
                        bar.inc(1);
                    }
                }
            }
            Tower::Text => {
                let features = self.image_features(bar)?;
                let layers = self.layers(Tower::Text);
                let start = target.layer.unwrap_or(layers);
                let mlp_only = is_mlp(target) && start < layers;
                let d = self.data;
                let base = self.base_overrides();
                // Hidden states entering the target layer (past its attention half when the
                // target is in the MLP), per prompt bucket.
                let mut states = Vec::with_capacity(d.prompts.buckets.len());
                for bk in &d.prompts.buckets {
                    let mut h = self.model.text_embed(&bk.ids, &bk.lengths, bk.seq)?;
                    self.model
                        .text_layers(&mut h, &bk.lengths, bk.seq, 0..start, &base)?;
                    if mlp_only {
                        let mask = text_mask(&bk.lengths);
                        let n = bk.lengths.len();
                        self.model.attention_residual(
                            &mut h,
                            Tower::Text,
                            start,
                            n,
                            bk.seq,
                            &mask,
                            &base,
                        )?;
                    }
                    states.push(h);
                }
                drop(base);
                let (vt, su) = self.removed_factors(target, kmax)?;
                let base = self.base_overrides();
                // A candidate runs its target's layer on its own; the layers above and the
                // head hold only decided settings, so the candidates of a group run them
                // stacked in one batch. (A projection target is in the head: no stacking.)
                let own_end = if target.layer.is_some() {
                    start + 1
                } else {
                    layers
                };
                let stack = if target.layer.is_some() && self.text_stacking {
                    self.text_stack(ranks.len())
                } else {
                    1
                };
                // One memo per bucket: its shared products are for that bucket's inputs.
                let memos: Vec<DeltaMemo<B::Tensor>> =
                    states.iter().map(|_| DeltaMemo::default()).collect();
                let order: Vec<usize> = (0..ranks.len()).collect();
                for group in order.chunks(stack) {
                    let g = group.len();
                    // Per bucket, the g candidates' features stacked, left on the backend.
                    let mut feats = Vec::with_capacity(d.prompts.buckets.len());
                    for ((bk, h), memo) in d.prompts.buckets.iter().zip(&states).zip(&memos) {
                        let n = bk.lengths.len();
                        let ov_of = |ri: usize| {
                            memo.rewind();
                            self.candidate_overrides(target, &vt, &su, kmax, ranks[ri], memo)
                        };
                        let mut parts = Vec::with_capacity(g);
                        for &ri in group {
                            let ov = ov_of(ri);
                            let mut hc = b.duplicate(h)?;
                            let mut from = start;
                            if mlp_only {
                                self.model.mlp_residual(
                                    &mut hc,
                                    n * bk.seq,
                                    Tower::Text,
                                    start,
                                    &ov,
                                )?;
                                from += 1;
                            }
                            self.model.text_layers(
                                &mut hc,
                                &bk.lengths,
                                bk.seq,
                                from..own_end,
                                &ov,
                            )?;
                            parts.push(hc);
                        }
                        let mut hs = joined(b, parts)?;
                        let lengths = bk.lengths.repeat(g);
                        self.model.text_layers(
                            &mut hs,
                            &lengths,
                            bk.seq,
                            own_end..layers,
                            &base,
                        )?;
                        // A projection target (never stacked) is the candidate's own head.
                        let own_head;
                        let head_ov = if target.layer.is_some() {
                            &base
                        } else {
                            own_head = ov_of(group[0]);
                            &own_head
                        };
                        feats.push(self.model.text_head_tensor(
                            &hs,
                            &bk.ids.repeat(g),
                            bk.seq,
                            head_ov,
                        )?);
                    }
                    let rows = d.prompts.stacked_rows(g);
                    let all = self.normalised_text(joined(b, feats)?)?;
                    for (&ri, rows) in group.iter().zip(&rows) {
                        let text = b.gather_rows(&all, dim, rows)?;
                        evals[ri] = self.eval_features(&features, &text, bar)?;
                    }
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
            let candidate = self.materialise(&p, rank, target)?;
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

/// Whether `target` is in a block's MLP, after the block's attention half.
fn is_mlp(target: Target) -> bool {
    target.layer.is_some() && matches!(target.weight, WeightType::Up | WeightType::Down)
}
