//! Cached vs naive candidate evaluation on a ViT-B/16-shaped CLIP (issue: "fast by structure").
//!
//! Writes a random ViT-B/16 (or uses `SETAR_BENCH_MODEL`), makes `SETAR_BENCH_IMAGES` (default
//! 200) validation images in 10 ImageNet classes (random pixels: speed does not depend on
//! content), prompts for all 1,000 ImageNet classes, and times one search step — all candidate
//! ratios of one target — for several targets, the cached way and the naive (reference) way.
//! Prints a JSON object (BENCHMARKS.md's search-step tables were written from it).
//! `SETAR_BENCH_TOWERS=text|vision` times one tower's targets only; `SETAR_BENCH_TEXT_STACK=0`
//! runs a text step's candidates one after another instead of stacked.

use setar_engine::backend::cpu::CpuBackend;
use setar_engine::backend::Backend;
use setar_engine::config::ClipConfig;
use setar_engine::data::LabelSet;
use setar_engine::jobs::search_data;
use setar_engine::loss::{Averaging, LocoopConfig};
use setar_engine::lowrank::{rank_for, PruneType, Target, Tower, WeightType};
use setar_engine::model::random::{normal, preset, write_random_model};
use setar_engine::model::Clip;
use setar_engine::progress::Progress;
use setar_engine::score::Scorer;
use setar_engine::search::engine::Engine;
use setar_engine::search::{Objective, Order, SearchConfig};
use setar_engine::tokenizer::Tokenizer;
use setar_engine::weights::{SaveDtype, WeightsFile};
use std::time::Instant;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    setar_engine::backend::cpu::keep_freed_memory();
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` support
    }
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = match std::env::var("SETAR_BENCH_MODEL") {
        Ok(d) => d.into(),
        Err(_) => {
            write_random_model(&preset("vit-b-16").unwrap(), tmp.path(), 0, SaveDtype::F32)
                .unwrap();
            tmp.path().to_path_buf()
        }
    };
    let n_images = env_usize("SETAR_BENCH_IMAGES", 200);
    let labels = LabelSet::resolve("imagenet1k").unwrap();
    let id_val = tmp.path().join("id_val");
    for i in 0..n_images {
        let class = &labels.classes[i % 10];
        let dir = id_val.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        let px: Vec<u8> = normal(i as u64, "px", 256 * 256 * 3, 60.0)
            .iter()
            .map(|v| (128.0 + v).clamp(0.0, 255.0) as u8)
            .collect();
        let f = std::fs::File::create(dir.join(format!("{i:04}.png"))).unwrap();
        let mut enc = png::Encoder::new(f, 256, 256);
        enc.set_color(png::ColorType::Rgb);
        enc.write_header().unwrap().write_image_data(&px).unwrap();
    }
    let weights = WeightsFile::open(&model_dir).unwrap();
    let config = ClipConfig::for_weights(&weights).unwrap();
    let model = Clip::load(CpuBackend::new(), &weights, &config).unwrap();
    let tokenizer = Tokenizer::for_model_dir(weights.path().parent()).unwrap();
    let data = search_data(
        &model,
        &tokenizer,
        &id_val,
        &labels,
        Progress { quiet: true },
    )
    .unwrap();
    let ratios = SearchConfig::default_ratios();
    let cfg = SearchConfig {
        order: Order::VisualText,
        objective: Objective::LocoopLoss,
        scorer: Scorer::Mcm,
        ratios: ratios.clone(),
        weight: WeightType::Up,
        prune: PruneType::Minor,
        locoop: LocoopConfig {
            lambda: 0.1,
            top_k: 300,
            use_pred_label: false,
            averaging: Averaging::PerBatch(512),
        },
        temperature: 100.0,
        recall_level: 0.95,
        freeze_proj: true,
        batch: 32,
        naive: false,
    };
    let vl = config.vision.tower.layers;
    let tl = config.text.tower.layers;
    let targets: Vec<(Target, bool)> = [
        (Tower::Visual, vl - 1, true),
        (Tower::Visual, vl / 2, false),
        (Tower::Visual, 0, false),
        (Tower::Text, tl - 1, true),
        (Tower::Text, 0, false),
    ]
    .iter()
    .filter(
        |&&(tower, _, _)| match std::env::var("SETAR_BENCH_TOWERS").as_deref() {
            Ok("text") => tower == Tower::Text,
            Ok("vision") => tower == Tower::Visual,
            _ => true,
        },
    )
    .map(|&(tower, layer, naive)| {
        (
            Target {
                tower,
                weight: WeightType::Up,
                layer: Some(layer),
            },
            naive,
        )
    })
    .collect();
    let naive_candidates = env_usize("SETAR_BENCH_NAIVE_CANDIDATES", 2);
    let mut rows = Vec::new();
    let bar = indicatif::ProgressBar::hidden();
    for (target, with_naive) in targets {
        let mut engine = Engine::new(&model, &weights, &data, &cfg);
        if std::env::var("SETAR_BENCH_TEXT_STACK").is_ok_and(|v| v == "0") {
            engine.set_text_stacking(false);
        }
        let k = engine.prepare(target).unwrap().k();
        // A step evaluates ratios 0.05 … 0.40 (ratio 0 is the carried best after step 0).
        let ranks: Vec<usize> = ratios[1..]
            .iter()
            .map(|&r| rank_for(k, r, &target).unwrap())
            .collect();
        if target.tower == Tower::Text {
            // The image features the text step reuses: made once per tower phase, timed apart.
            let t = Instant::now();
            engine.evaluate(target, &ranks[..1], &bar).unwrap();
            rows.push(serde_json::json!({"target": target.to_string(), "way": "cached", "what": "warm-up (image features once per text phase + 1 candidate)", "seconds": t.elapsed().as_secs_f64()}));
        }
        let t = Instant::now();
        engine.evaluate(target, &ranks, &bar).unwrap();
        let cached = t.elapsed().as_secs_f64();
        rows.push(serde_json::json!({"target": target.to_string(), "way": "cached", "candidates": ranks.len(), "seconds": cached, "per_candidate": cached / ranks.len() as f64}));
        eprintln!(
            "{target}: cached {:.2} s per candidate",
            cached / ranks.len() as f64
        );
        if with_naive && naive_candidates > 0 {
            let t = Instant::now();
            engine
                .evaluate_naive(target, &ranks[..naive_candidates], &bar)
                .unwrap();
            let naive = t.elapsed().as_secs_f64();
            rows.push(serde_json::json!({"target": target.to_string(), "way": "naive", "candidates": naive_candidates, "seconds": naive, "per_candidate": naive / naive_candidates as f64}));
            eprintln!(
                "{target}: naive {:.2} s per candidate",
                naive / naive_candidates as f64
            );
        }
    }
    println!(
        "{}",
        serde_json::json!({"images": n_images, "classes": labels.classes.len(), "threads": rayon::current_num_threads(), "backend": model.backend.name(), "rows": rows})
    );
}
