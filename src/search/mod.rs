//! The greedy SeTAR search (SETAR.md §3): orders, the strict-improvement rule with the best
//! value carried between steps, per-step records in the reference's shapes, and a state file
//! written atomically after every step so an interrupted search resumes.

pub mod background;
pub mod engine;
pub mod evaluate;
pub mod memory;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::loss::{LocoopConfig, LossParts};
use crate::lowrank::{rank_for, PruneType, Setting, Target, Tower, WeightType};
use crate::metrics::OodMetrics;
use crate::progress::Progress;
use crate::score::Scorer;
use engine::Engine;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// The order in which targets are decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Vision layers L−1 … 0, then text layers L−1 … 0 (the SeTAR default).
    VisualText,
    TextVisual,
    VisualOnly,
    TextOnly,
    /// v L−1, t L−1, v L−2, t L−2, …
    ModalityInterleaved,
    /// At each step try every undecided layer × ratio and fix the best one.
    LayerExhaustive,
}

/// What the search minimises (losses, FPR) or maximises (AUROC, AUPR).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    LocoopLoss,
    LossId,
    LossOod,
    /// AUROC of `scorer` on ID images vs their OOD patches.
    Auroc,
    Aupr,
    Fpr,
}

impl Objective {
    pub fn lower_is_better(self) -> bool {
        !matches!(self, Objective::Auroc | Objective::Aupr)
    }

    /// The reference's `best_metric` name.
    pub fn name(self) -> &'static str {
        match self {
            Objective::LocoopLoss => "locoop_loss",
            Objective::LossId => "loss_id",
            Objective::LossOod => "loss_ood",
            Objective::Auroc => "auroc",
            Objective::Aupr => "aupr",
            Objective::Fpr => "fpr",
        }
    }

    fn better(self, value: f64, best: Option<f64>) -> bool {
        match best {
            None => true,
            Some(b) if self.lower_is_better() => value < b,
            Some(b) => value > b,
        }
    }
}

/// Every knob of one search.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchConfig {
    pub order: Order,
    pub objective: Objective,
    /// The scorer of the metric objectives.
    pub scorer: Scorer,
    pub ratios: Vec<f64>,
    pub weight: WeightType,
    pub prune: PruneType,
    pub locoop: LocoopConfig,
    pub temperature: f64,
    pub recall_level: f64,
    /// Leave the projections alone (the reference's default); else search W_p first per tower.
    pub freeze_proj: bool,
    /// Images per forward chunk (memory, not semantics).
    pub batch: usize,
    /// Evaluate the reference's way (re-run everything per candidate); for checking.
    pub naive: bool,
}

impl SearchConfig {
    /// The reference's candidate ratios: 0, 0.05, …, 0.40.
    pub fn default_ratios() -> Vec<f64> {
        (0..=8)
            .map(|i| (i as f64 * 0.05 * 100.0).round() / 100.0)
            .collect()
    }
}

/// The targets of each step for the fixed orders, as the reference lists them.
pub fn plan(
    order: Order,
    weight: WeightType,
    vision_layers: usize,
    text_layers: usize,
    freeze_proj: bool,
) -> Result<Vec<Target>> {
    let layers = |tower: Tower, n: usize| -> Vec<Target> {
        let proj = (!freeze_proj).then_some(Target {
            tower,
            weight: WeightType::P,
            layer: None,
        });
        proj.into_iter()
            .chain((0..n).rev().map(|l| Target {
                tower,
                weight,
                layer: Some(l),
            }))
            .collect()
    };
    let v = layers(Tower::Visual, vision_layers);
    let t = layers(Tower::Text, text_layers);
    Ok(match order {
        Order::VisualText | Order::LayerExhaustive => [v, t].concat(),
        Order::TextVisual => [t, v].concat(),
        Order::VisualOnly => v,
        Order::TextOnly => t,
        Order::ModalityInterleaved => {
            if vision_layers != text_layers {
                return Err(Error::invalid(format!(
                    "modality_interleaved needs as many vision as text layers ({vision_layers} vs {text_layers})"
                )));
            }
            // Projections first (the reference repeats them per layer, which re-decides
            // them; deciding each once is what it means), then v L−1, t L−1, v L−2, …
            let (vp, vl) = v.split_at(usize::from(!freeze_proj));
            let (tp, tl) = t.split_at(usize::from(!freeze_proj));
            let mut out = [vp, tp].concat();
            for (a, b) in vl.iter().zip(tl) {
                out.push(*a);
                out.push(*b);
            }
            out
        }
    })
}

/// One evaluated (or carried) candidate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CandidateRecord {
    pub target: Target,
    pub ratio: f64,
    pub rank: usize,
    pub value: f64,
    /// Not evaluated: ratio 0 after the first step equals the decided settings, whose value is
    /// the carried best.
    pub carried: bool,
    pub loss: Option<LossParts>,
    pub metrics: Option<OodMetrics>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: usize,
    pub candidates: Vec<CandidateRecord>,
    pub chosen: Setting,
    pub chosen_rank: usize,
    /// The best value after this step.
    pub best: f64,
    pub seconds: f64,
}

/// What is written after every step; a search started again with the same inputs continues.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SearchState {
    pub format: u32,
    /// Identifies the inputs (model, data, configuration); a state for other inputs is refused.
    pub fingerprint: String,
    pub config: SearchConfig,
    pub steps: Vec<StepRecord>,
}

impl SearchState {
    /// The reference's `lora_settings`: every decided target with its ratio, in step order.
    pub fn lora_settings(&self) -> Vec<Setting> {
        self.steps.iter().map(|s| s.chosen).collect()
    }

    pub fn best(&self) -> Option<f64> {
        self.steps.last().map(|s| s.best)
    }
}

/// Loads a state file if it exists and belongs to these inputs.
pub fn load_state(path: &Path, fingerprint: &str) -> Result<Option<SearchState>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let state: SearchState = serde_json::from_str(&text)
        .map_err(|e| Error::file(path, format!("not a search state file: {e}")))?;
    if state.fingerprint != fingerprint {
        return Err(Error::file(
            path,
            "this state file belongs to a search with other inputs (model, data or settings): delete it or choose another --out",
        ));
    }
    Ok(Some(state))
}

/// Writes the state atomically (temp file + rename) so a kill never leaves half a file.
pub fn save_state(path: &Path, state: &SearchState) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_string_pretty(state).expect("state serialises");
    std::fs::write(&tmp, json).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Runs (or resumes) the search. `state_path`: where the state is kept, if anywhere.
pub fn run<B: Backend>(
    engine: &mut Engine<B>,
    cfg: &SearchConfig,
    fingerprint: &str,
    state_path: Option<&Path>,
    progress: Progress,
) -> Result<SearchState> {
    let vision_layers = engine.model.config.vision.tower.layers;
    let text_layers = engine.model.config.text.tower.layers;
    let plan = plan(
        cfg.order,
        cfg.weight,
        vision_layers,
        text_layers,
        cfg.freeze_proj,
    )?;
    if cfg.ratios.is_empty() {
        return Err(Error::invalid("no candidate ratios"));
    }
    let mut state = match state_path {
        Some(p) => load_state(p, fingerprint)?,
        None => None,
    }
    .unwrap_or(SearchState {
        format: 1,
        fingerprint: fingerprint.into(),
        config: cfg.clone(),
        steps: vec![],
    });
    // Every target's SVD up front, in one batch (the backend groups equal shapes), or started
    // on host threads to run beside the search (a device backend).
    engine.prepare_all(&plan)?;
    // Replay the decisions of a resumed search.
    for s in &state.steps {
        engine.decide(s.chosen.target, s.chosen_rank)?;
    }
    let total_steps = plan.len();
    let per_target = |steps_left: usize| -> u64 {
        if cfg.order == Order::LayerExhaustive {
            (1..=steps_left)
                .map(|n| engine.units(n * cfg.ratios.len()))
                .sum()
        } else {
            engine.units(cfg.ratios.len()) * steps_left as u64
        }
    };
    let bar = progress.bar(
        per_target(total_steps - state.steps.len().min(total_steps)) as usize,
        "search",
        "evals",
    );
    while state.steps.len() < total_steps {
        let step = state.steps.len();
        let started = Instant::now();
        let targets: Vec<Target> = if cfg.order == Order::LayerExhaustive {
            plan.iter()
                .filter(|t| !engine.decided().contains_key(t))
                .copied()
                .collect()
        } else {
            vec![plan[step]]
        };
        let mut best = state.best();
        // The value of the decided settings alone, which any ratio-0 candidate reproduces.
        let mut baseline = best;
        let mut chosen = (targets[0], 0.0, 0usize);
        let mut records = Vec::new();
        for target in &targets {
            bar.set_message(format!("step {}/{total_steps}: {target}", step + 1));
            let k = engine.rank_dim(*target)?;
            let ranks: Vec<usize> = cfg
                .ratios
                .iter()
                .map(|&r| rank_for(k, r, target))
                .collect::<Result<_>>()?;
            // Ratio 0 leaves the decided settings as they are: after the first evaluation its
            // value is the carried best, so it is not run again.
            let mut distinct: Vec<usize> = Vec::new();
            for &r in &ranks {
                let carried = r == 0 && baseline.is_some();
                if !carried && !distinct.contains(&r) {
                    distinct.push(r);
                }
            }
            let outcomes = if cfg.naive {
                engine.evaluate_naive(*target, &distinct, &bar)?
            } else {
                engine.evaluate(*target, &distinct, &bar)?
            };
            if let Some(i) = distinct.iter().position(|&r| r == 0) {
                baseline = Some(outcomes[i].value);
            }
            for (&ratio, &rank) in cfg.ratios.iter().zip(&ranks) {
                let (value, loss, metrics, was_carried) =
                    match distinct.iter().position(|&r| r == rank) {
                        Some(i) => (
                            outcomes[i].value,
                            outcomes[i].loss,
                            outcomes[i].metrics,
                            false,
                        ),
                        None => (
                            baseline.expect("ratio 0 is carried only after a first value"),
                            None,
                            None,
                            true,
                        ),
                    };
                if cfg.objective.better(value, best) {
                    best = Some(value);
                    chosen = (*target, ratio, rank);
                }
                records.push(CandidateRecord {
                    target: *target,
                    ratio,
                    rank,
                    value,
                    carried: was_carried,
                    loss,
                    metrics,
                });
            }
        }
        let (target, ratio, rank) = chosen;
        engine.decide(target, rank)?;
        state.steps.push(StepRecord {
            step,
            candidates: records,
            chosen: Setting { target, ratio },
            chosen_rank: rank,
            best: best.expect("at least one candidate was evaluated"),
            seconds: started.elapsed().as_secs_f64(),
        });
        if let Some(p) = state_path {
            save_state(p, &state)?;
        }
        abort_for_tests(step + 1);
    }
    bar.finish_and_clear();
    Ok(state)
}

/// `SETAR_ABORT_AFTER_STEP=k` aborts the process right after step k's state is saved: the tests
/// use it to kill a search midway at a known point.
fn abort_for_tests(steps_done: usize) {
    if let Ok(v) = std::env::var("SETAR_ABORT_AFTER_STEP") {
        if v.parse::<usize>().ok() == Some(steps_done) {
            std::process::abort();
        }
    }
}
