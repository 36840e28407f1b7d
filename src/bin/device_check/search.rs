//! The device check's search and scoring timings (issue 4, item 6), on a random CLIP in the
//! real layout and synthetic validation data (random pixels, ImageNet-1K prompts):
//! - the SVDs of every target of the plan, on the backend (cuSOLVER on a GPU);
//! - a full SeTAR search (visual_text, `mlp.fc1`, the reference's 9 ratios, LoCoOp with the
//!   CLIP-B/ImageNet λ and K), wall time from the model on the device to the last decision;
//! - MCM / GL-MCM scoring throughput (tower + local features + scores, pixels from the host);
//! - the peak of our device memory (`--max-memory` budget accounting).
//!
//! It also writes the data and the plan for the PyTorch peer (scripts/torch_search_peer.py),
//! which runs the same search the reference's way on the same inputs.

use serde_json::{json, Value};
use setar_engine::backend::cuda::{svd, CudaBackend, EigPath};
use setar_engine::backend::{Backend, SvdSchedule};
use setar_engine::data::LabelSet;
use setar_engine::loss::{Averaging, LocoopConfig, LocoopPreset};
use setar_engine::lowrank::{rank_for, PruneType, Target, Tower, WeightType};
use setar_engine::model::prompts::PromptBuckets;
use setar_engine::model::Clip;
use setar_engine::progress::Progress;
use setar_engine::score::Scorer;
use setar_engine::search::engine::{Engine, SearchData, VisionStates};
use setar_engine::search::{self, plan, Objective, Order, SearchConfig};
use setar_engine::tokenizer::Tokenizer;
use setar_engine::weights::WeightsFile;
use setar_engine::{Error, Result};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// `n` synthetic validation images (pixels from `values`) over the first `classes` ImageNet-1K
/// classes, image i of class i mod classes.
pub fn synthetic_data(
    model: &Clip<CudaBackend>,
    n: usize,
    classes: usize,
    values: impl Fn(usize, u64, f32, f32) -> Vec<f32>,
) -> Result<SearchData> {
    let vc = &model.config.vision;
    let labels = LabelSet::resolve("imagenet1k")?;
    let prompts: Vec<String> = labels.prompts().into_iter().take(classes).collect();
    let refs: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
    let batch = Tokenizer::embedded().encode_batch(&refs, model.config.text.context_length);
    Ok(SearchData {
        pixels: values(
            n * vc.channels * vc.image_size * vc.image_size,
            21,
            -2.0,
            2.0,
        ),
        labels: (0..n).map(|i| i % refs.len()).collect(),
        images: (0..n).map(|i| format!("synthetic/{i}")).collect(),
        prompts: PromptBuckets::new(&batch, model.backend.prompt_buckets()),
    })
}

pub fn config(chunk: usize) -> SearchConfig {
    let (lambda, top_k, batch) = LocoopPreset::ClipBImagenet.values();
    SearchConfig {
        order: Order::VisualText,
        objective: Objective::LocoopLoss,
        scorer: Scorer::Mcm,
        ratios: SearchConfig::default_ratios(),
        weight: WeightType::Up,
        prune: PruneType::Minor,
        locoop: LocoopConfig {
            lambda,
            top_k,
            use_pred_label: false,
            averaging: Averaging::PerBatch(batch),
        },
        temperature: 1.0,
        recall_level: 0.95,
        freeze_proj: true,
        batch: chunk,
        naive: false,
    }
}

/// The targets of the search's steps, in order.
fn search_plan(model: &Clip<CudaBackend>, cfg: &SearchConfig) -> Result<Vec<Target>> {
    let c = &model.config;
    plan(
        cfg.order,
        cfg.weight,
        c.vision.tower.layers,
        c.text.tower.layers,
        cfg.freeze_proj,
    )
}

/// Writes what the PyTorch peer needs: `pixels.f32` (raw, `[n, 3, size, size]`) and
/// `search.json` (labels, token ids, the plan with each ratio's rank, the loss settings).
pub fn write_peer_data(
    dir: &Path,
    model: &Clip<CudaBackend>,
    data: &SearchData,
    cfg: &SearchConfig,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let px = dir.join("pixels.f32");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&px).map_err(|e| Error::io(&px, e))?);
    f.write_all(bytemuck::cast_slice(&data.pixels))
        .and_then(|_| f.flush())
        .map_err(|e| Error::io(&px, e))?;
    let c = &model.config;
    let targets = search_plan(model, cfg)?;
    let steps: Vec<Value> = targets
        .iter()
        .map(|t| {
            let (o, i) = match t.tower {
                setar_engine::lowrank::Tower::Visual => {
                    (c.vision.tower.intermediate, c.vision.tower.hidden)
                }
                setar_engine::lowrank::Tower::Text => {
                    (c.text.tower.intermediate, c.text.tower.hidden)
                }
            };
            let ranks: Vec<usize> = cfg
                .ratios
                .iter()
                .map(|&r| rank_for(o.min(i), r, t))
                .collect::<Result<_>>()?;
            Ok(json!({"tower": t.tower.name(), "layer": t.layer, "module": t.module(), "ranks": ranks}))
        })
        .collect::<Result<_>>()?;
    let mut ids = Vec::new();
    let mut lengths = vec![0usize; data.prompts.count];
    let mut rows: Vec<(usize, Vec<u32>)> = Vec::new();
    for b in &data.prompts.buckets {
        for (j, &r) in b.rows.iter().enumerate() {
            lengths[r] = b.lengths[j];
            rows.push((r, b.ids[j * b.seq..(j + 1) * b.seq].to_vec()));
        }
    }
    rows.sort_by_key(|(r, _)| *r);
    let seq = rows.iter().map(|(_, v)| v.len()).max().unwrap_or(1);
    for (_, mut v) in rows {
        v.resize(seq, 0);
        ids.push(v);
    }
    let meta = json!({
        "images": data.len(),
        "image_size": c.vision.image_size,
        "labels": data.labels,
        "input_ids": ids,
        "lengths": lengths,
        "ratios": cfg.ratios,
        "steps": steps,
        "lambda": cfg.locoop.lambda,
        "top_k": cfg.locoop.top_k,
        "loss_batch": match cfg.locoop.averaging { Averaging::PerBatch(b) => b, Averaging::WholeSet => data.len() },
    });
    let path = dir.join("search.json");
    std::fs::write(&path, meta.to_string()).map_err(|e| Error::io(&path, e))
}

/// The SVDs of every target, then the whole search; times, decisions and memory.
pub fn time_search(
    model: &Clip<CudaBackend>,
    weights: &WeightsFile,
    data: &SearchData,
    cfg: &SearchConfig,
    states: Option<VisionStates>,
) -> Result<Value> {
    let b = &model.backend;
    b.reset_peak_memory();
    let targets = search_plan(model, cfg)?;
    b.synchronize()?;
    let t0 = Instant::now();
    let mut engine = Engine::new(model, weights, data, cfg);
    if let Some(kept) = states {
        engine.set_vision_states(kept);
    }
    engine.prepare_all(&targets)?;
    b.synchronize()?;
    // Up front (cuSOLVER) this is the SVDs' time; in the background, the time to read the
    // weights and start them, plus (below) the time the search waited for them.
    let svd_start_s = t0.elapsed().as_secs_f64();
    let state = search::run(
        &mut engine,
        cfg,
        "device-check",
        None,
        Progress { quiet: true },
    )?;
    b.synchronize()?;
    let total_s = t0.elapsed().as_secs_f64();
    let svd_s = svd_start_s + engine.svd_wait_seconds();
    let candidates: usize = state
        .steps
        .iter()
        .map(|s| s.candidates.iter().filter(|c| !c.carried).count())
        .sum();
    let res = json!({
        "images": data.len(),
        "classes": data.prompts.count,
        "steps": state.steps.len(),
        "ratios": cfg.ratios.len(),
        "candidates_evaluated": candidates,
        "chunk": cfg.batch,
        "svd_path": match b.svd_schedule() {
            SvdSchedule::UpFront => "cuSOLVER up front (f64)",
            SvdSchedule::Background => "host threads beside the search (faer, f64)",
            SvdSchedule::FirstThenBackground => "the first by cuSOLVER (f64), the rest on host threads beside the search (faer, f64)",
            SvdSchedule::SideStream => "the first by cuSOLVER (f64), the rest by cuSOLVER on a second stream beside the search (f64)",
        },
        "vision_states_kept": engine.kept_vision_layers(),
        "prompt_batches": data.prompts.buckets.len(),
        "prompt_tokens_padded": data.prompts.padded_tokens(),
        "svd_seconds": svd_s,
        "svd_wait_seconds": engine.svd_wait_seconds(),
        "seconds": total_s,
        "step_seconds": state.steps.iter().map(|s| s.seconds).collect::<Vec<_>>(),
        "chosen_ratios": state.steps.iter().map(|s| s.chosen.ratio).collect::<Vec<_>>(),
        "step_values": state.steps.iter().map(|s| s.candidates.iter().map(|c| c.value).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "best": state.best(),
        "peak_device_memory_bytes": b.peak_memory(),
    });
    eprintln!(
        "  search {} images × {} classes, {} steps × {} ratios: {:.2} s (SVDs {:.2} s of it, {}), peak memory {:.2} GiB",
        data.len(),
        data.prompts.count,
        state.steps.len(),
        cfg.ratios.len(),
        total_s,
        svd_s,
        res["svd_path"].as_str().unwrap_or("?"),
        b.peak_memory() as f64 / (1u64 << 30) as f64
    );
    Ok(res)
}

/// MCM and GL-MCM of `total` images (the pixels of `data` reused), `chunk` at a time: the
/// tower with local features, normalisation and the scores' row statistics on the device,
/// two numbers per image back.
pub fn time_scoring(
    model: &Clip<CudaBackend>,
    data: &SearchData,
    total: usize,
    chunk: usize,
) -> Result<Value> {
    let b = &model.backend;
    let c = &model.config;
    let dim = c.projection_dim;
    let text = model.encode_prompts(&data.prompts, &Default::default())?;
    let mut text = b.tensor(text)?;
    b.l2_normalize(&mut text, dim)?;
    let per = data.pixels.len() / data.len();
    let patches = c.vision.grid() * c.vision.grid();
    let scale = model.logit_scale.exp();
    let score = |n: usize, offset: usize| -> Result<Vec<(f64, f64)>> {
        let px = &data.pixels[offset * per..(offset + n) * per];
        let mut h = model.vision_embed(px, n)?;
        let ov = Default::default();
        model.vision_layers(&mut h, n, 0..c.vision.tower.layers - 1, &ov)?;
        let (mut g, l) = model.vision_head_tensors(h, n, true, &ov)?;
        let mut l = l.expect("local features");
        b.l2_normalize(&mut g, dim)?;
        b.l2_normalize(&mut l, dim)?;
        let zeros = vec![0usize; n];
        let gs = b.logit_row_stats(&g, &text, dim, scale, &zeros, 1, 1.0)?;
        let ls = b.logit_row_stats(&l, &text, dim, scale, &zeros, patches, 1.0)?;
        Ok((0..n)
            .map(|i| {
                let mcm = gs[i].max_prob();
                let l_mcm = ls[i * patches..(i + 1) * patches]
                    .iter()
                    .map(|s| s.max_prob())
                    .fold(0.0, f64::max);
                (mcm, mcm + l_mcm)
            })
            .collect())
    };
    let chunk = chunk.min(data.len());
    score(chunk, 0)?; // warm-up
    b.synchronize()?;
    let t = Instant::now();
    let mut done = 0;
    let mut checksum = 0.0;
    while done < total {
        let n = chunk.min(total - done);
        let offset = (done % data.len()).min(data.len() - n);
        for (m, gl) in score(n, offset)? {
            checksum += m + gl;
        }
        done += n;
    }
    let s = t.elapsed().as_secs_f64();
    if !checksum.is_finite() {
        return Err(Error::invalid("scoring: non-finite scores"));
    }
    eprintln!(
        "  scoring (MCM + GL-MCM) {total} images: {s:.2} s, {:.0} img/s",
        total as f64 / s
    );
    Ok(json!({"images": total, "chunk": chunk, "seconds": s, "img_per_s": total as f64 / s}))
}

/// The plan's SVDs (24 for ViT-B/16 over `mlp.fc1`) by each way of running cuSOLVER's
/// eigen-decompositions: seconds for all of them, after one warm-up call, median of 3.
pub fn time_svd_paths(
    model: &Clip<CudaBackend>,
    weights: &WeightsFile,
    cfg: &SearchConfig,
) -> Result<Value> {
    let dev = model.backend.device();
    let mut mats = Vec::new();
    for t in search_plan(model, cfg)? {
        let name = format!("{}.weight", t.module());
        let shape = weights.shape(&name)?.to_vec();
        let [o, i] = shape[..] else {
            return Err(Error::invalid(format!("{name} is not a matrix")));
        };
        mats.push((weights.f32(&name, &shape)?.to_vec(), o, i));
    }
    let args: Vec<(&[f32], usize, usize)> = mats
        .iter()
        .map(|(w, o, i)| (w.as_slice(), *o, *i))
        .collect();
    let mut out = serde_json::Map::new();
    for (name, path) in [("seq", EigPath::Sequential), ("batched", EigPath::Batched)] {
        let run = || -> Result<f64> {
            let t = Instant::now();
            svd::thin_svds(dev, &args, path, &mut svd::Phases::new(dev, false))?;
            Ok(t.elapsed().as_secs_f64())
        };
        let timed = run().and_then(|_| (0..3).map(|_| run()).collect::<Result<Vec<f64>>>());
        let v = match timed {
            Ok(mut reps) => {
                reps.sort_by(f64::total_cmp);
                json!({"seconds": reps[1], "reps": reps})
            }
            Err(e) => json!({"error": e.to_string()}),
        };
        eprintln!("  the {} SVDs, eigen path {name}: {v}", args.len());
        out.insert(name.into(), v);
    }
    Ok(Value::Object(out))
}

/// Where the time goes, op by op, on a backend built with `profile` (each op synchronised:
/// the totals are slower than the search's own): the SVDs of the plan, phase by phase; a
/// vision step (`mlp.fc1` of layer 10: one block and the head per candidate); and a text step
/// (layer 0: the whole text tower per candidate); each step over the 8 non-zero ratios.
pub fn profile_steps(
    model: &Clip<CudaBackend>,
    weights: &WeightsFile,
    data: &SearchData,
    cfg: &SearchConfig,
) -> Result<Value> {
    let b = &model.backend;
    let c = &model.config;
    let bar = indicatif::ProgressBar::hidden();
    let mut engine = Engine::new(model, weights, data, cfg);
    let mut out = serde_json::Map::new();
    let targets = [
        (
            "vision_layer_10",
            Tower::Visual,
            c.vision.tower.layers.saturating_sub(2),
        ),
        ("text_layer_0", Tower::Text, 0),
    ];
    for (name, tower, layer) in targets {
        let target = Target {
            tower,
            weight: cfg.weight,
            layer: Some(layer),
        };
        let k = engine.prepare(target)?.k();
        let ranks = cfg.ratios[1..]
            .iter()
            .map(|&r| rank_for(k, r, &target))
            .collect::<Result<Vec<_>>>()?;
        // Warm-up: the features the step reuses (text features, or the image features of a
        // text step) and the cuBLASLt plans.
        engine.evaluate(target, &ranks[..1], &bar)?;
        b.synchronize()?;
        b.reset_profile();
        let t = Instant::now();
        engine.evaluate(target, &ranks, &bar)?;
        b.synchronize()?;
        let seconds = t.elapsed().as_secs_f64();
        let ops: Vec<Value> = b
            .profile()
            .into_iter()
            .map(|(op, s, calls)| json!({"op": op, "ms": s * 1e3, "calls": calls}))
            .collect();
        eprintln!(
            "  {name}: {} candidates in {seconds:.3} s (profiled): {}",
            ranks.len(),
            ops.iter()
                .map(|o| format!(
                    "{} {:.1} ms",
                    o["op"].as_str().unwrap_or("?"),
                    o["ms"].as_f64().unwrap_or(0.0)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        out.insert(
            name.into(),
            json!({"candidates": ranks.len(), "seconds_profiled": seconds, "ops": ops}),
        );
    }
    Ok(Value::Object(out))
}
