//! The search fixtures (tests/fixtures/make_search_fixtures.py: HF transformers, settings
//! re-applied from the original weights per candidate, torch SVD, the reference's per-batch
//! loss averaging), loadable on any backend, and the step-by-step comparison with them.

use super::fixtures;
use serde_json::Value;
use setar_engine::backend::{Backend, SvdSchedule};
use setar_engine::config::ClipConfig;
use setar_engine::data::LabelSet;
use setar_engine::jobs::{prompt_batch, search_data};
use setar_engine::loss::{Averaging, LocoopConfig};
use setar_engine::lowrank::{PruneType, WeightType};
use setar_engine::model::prompts::{BucketPlan, PromptBuckets};
use setar_engine::model::Clip;
use setar_engine::progress::Progress;
use setar_engine::score::Scorer;
use setar_engine::search::engine::{Engine, SearchData};
use setar_engine::search::{self, Objective, Order, SearchConfig, SearchState};
use setar_engine::tokenizer::{Batch, Tokenizer};
use setar_engine::weights::WeightsFile;

/// Every reference search fixture.
pub const NAMES: [&str; 6] = [
    "vt_locoop_minor",
    "tv_lossid_minor",
    "mi_auroc_glmcm_minor",
    "vo_locoop_pred_minor",
    "le_locoop_pred_principal",
    "to_lossood_minor",
];

pub const TOLERANCE: f64 = 1e-5;

pub struct Fixture<B: Backend> {
    pub json: Value,
    pub weights: WeightsFile,
    pub model: Clip<B>,
    pub data: SearchData,
    pub cfg: SearchConfig,
    /// The tokenised prompts, ungrouped.
    pub prompts: Batch,
}

pub fn load<B: Backend>(name: &str, backend: B) -> Fixture<B> {
    let root = fixtures().join("search");
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join(format!("{name}.json"))).unwrap())
            .unwrap();
    let repo = fixtures().parent().unwrap().parent().unwrap().to_path_buf();
    let model_dir = repo.join(json["model_dir"].as_str().unwrap());
    let weights = WeightsFile::open(&model_dir).unwrap();
    let config = ClipConfig::for_weights(&weights).unwrap();
    let model = Clip::load(backend, &weights, &config).unwrap();
    let labels_file = tempfile::NamedTempFile::new().unwrap();
    let classes: Vec<String> = serde_json::from_value(json["class_names"].clone()).unwrap();
    std::fs::write(labels_file.path(), classes.join("\n")).unwrap();
    let labels = LabelSet::resolve(labels_file.path().to_str().unwrap()).unwrap();
    let tokenizer = Tokenizer::embedded();
    let data = search_data(
        &model,
        &tokenizer,
        &repo.join(json["id_val_dir"].as_str().unwrap()),
        &labels,
        Progress { quiet: true },
    )
    .unwrap();
    let prompts = prompt_batch(&model, &tokenizer, &labels);
    let want_images: Vec<String> = serde_json::from_value(json["images"].clone()).unwrap();
    assert_eq!(data.images, want_images, "image order");
    let p = &json["params"];
    let order: Order = serde_json::from_value(p["searcher"].clone()).unwrap();
    let objective: Objective = serde_json::from_value(p["best_metric"].clone()).unwrap();
    let scorer = match p["best_scorer"].as_str().unwrap() {
        "loss" => Scorer::Mcm,
        s => s.parse().unwrap(),
    };
    let cfg = SearchConfig {
        order,
        objective,
        scorer,
        ratios: serde_json::from_value(p["candi_ratios"].clone()).unwrap(),
        weight: p["weight_type"]
            .as_str()
            .unwrap()
            .parse::<WeightType>()
            .unwrap(),
        prune: match p["prune_type"].as_str().unwrap() {
            "minor" => PruneType::Minor,
            "principal" => PruneType::Principal,
            other => panic!("prune {other}"),
        },
        locoop: LocoopConfig {
            lambda: p["locoop_lambda"].as_f64().unwrap(),
            top_k: p["locoop_top_k"].as_u64().unwrap() as usize,
            use_pred_label: p["use_pred_label"].as_bool().unwrap(),
            averaging: Averaging::PerBatch(p["loss_batch_size"].as_u64().unwrap() as usize),
        },
        temperature: p["temperature"].as_f64().unwrap(),
        recall_level: p["recall_level"].as_f64().unwrap(),
        freeze_proj: p["freeze_proj"].as_bool().unwrap(),
        batch: 7,
        naive: false,
    };
    Fixture {
        json,
        weights,
        model,
        data,
        cfg,
        prompts,
    }
}

/// The fixture's prompts grouped into text batches by `plan` instead of the backend's way.
pub fn regroup_prompts<B: Backend>(f: &mut Fixture<B>, plan: BucketPlan) {
    f.data.prompts = PromptBuckets::new(&f.prompts, plan);
}

pub fn run<B: Backend>(f: &Fixture<B>, naive: bool) -> SearchState {
    run_with_svds(f, naive, None)
}

/// As [`run`]; `schedule`: force where the SVDs run (`None`: the backend's default).
pub fn run_with_svds<B: Backend>(
    f: &Fixture<B>,
    naive: bool,
    schedule: Option<SvdSchedule>,
) -> SearchState {
    let cfg = SearchConfig {
        naive,
        ..f.cfg.clone()
    };
    run_with(f, &cfg, |e| {
        if let Some(s) = schedule {
            e.set_svd_schedule(s);
        }
    })
}

/// The search of `cfg` on the fixture, the engine set up by `setup` first.
pub fn run_with<B: Backend>(
    f: &Fixture<B>,
    cfg: &SearchConfig,
    setup: impl FnOnce(&mut Engine<B>),
) -> SearchState {
    let mut engine = Engine::new(&f.model, &f.weights, &f.data, cfg);
    setup(&mut engine);
    search::run(&mut engine, cfg, "test", None, Progress { quiet: true }).unwrap()
}

pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// Compares a search with the reference's, step by step: each candidate's objective within
/// `tolerance` relative (fragile candidates: within the oracle's range), the same decision at
/// every step, the same final settings. Returns the worst candidate error.
pub fn check_against_reference(
    name: &str,
    json: &Value,
    ours: &SearchState,
    tolerance: f64,
) -> f64 {
    let f = json;
    let steps = f["steps"].as_array().unwrap();
    assert_eq!(ours.steps.len(), steps.len(), "{name}: number of steps");
    let mut worst = 0.0f64;
    for (s, want) in ours.steps.iter().zip(steps) {
        for c in &s.candidates {
            let wc = want["candidates"]
                .as_array()
                .unwrap()
                .iter()
                .find(|w| {
                    w["tower"].as_str() == Some(c.target.tower.name())
                        && w["layer"].as_u64().map(|l| l as usize) == c.target.layer
                        && (w["ratio"].as_f64().unwrap() - c.ratio).abs() < 1e-12
                })
                .unwrap_or_else(|| {
                    panic!(
                        "{name}: step {} has no reference candidate {} {}",
                        s.step, c.target, c.ratio
                    )
                });
            // A "fragile" candidate has a top-K membership, predicted label or score pair within
            // float noise of flipping; the oracle gives the range of values the flips can give.
            let err = if wc["fragile"].as_bool() == Some(true) {
                let (lo, hi) = (
                    wc["value_lo"].as_f64().unwrap(),
                    wc["value_hi"].as_f64().unwrap(),
                );
                if c.value >= lo.min(hi) && c.value <= lo.max(hi) {
                    0.0
                } else {
                    rel(c.value, lo).min(rel(c.value, hi))
                }
            } else {
                rel(c.value, wc["value"].as_f64().unwrap())
            };
            worst = worst.max(err);
            assert!(
                err <= tolerance,
                "{name}: step {} {} ratio {}: ours {} vs reference {} (rel {err:.2e})",
                s.step,
                c.target,
                c.ratio,
                c.value,
                wc["value"]
            );
        }
        let chosen = serde_json::to_value(s.chosen).unwrap();
        assert_eq!(chosen, want["chosen"], "{name}: step {} decision", s.step);
    }
    let settings = serde_json::to_value(ours.lora_settings()).unwrap();
    assert_eq!(settings, f["lora_settings"], "{name}: final settings");
    println!(
        "{name}: {} steps, same decisions, worst candidate error {worst:.2e}",
        ours.steps.len()
    );
    worst
}
