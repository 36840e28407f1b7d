//! The jobs behind the CLI, as a library API: `search` (ID val → settings), `eval` (settings +
//! ID test + OOD sets → scores and metrics), `apply` (write the low-rank model).

use crate::backend::Backend;
use crate::data::{image_folder, LabelSet, LabelledImage};
use crate::embed::preprocess_all;
use crate::error::{Error, Result};
use crate::image::{find_images, ImageEntry};
use crate::lowrank::{rank_for, Setting, Svd, Target, WeightType};
use crate::metrics::{self, OodMetrics};
use crate::model::clip::{l2_normalize_rows, Linear};
use crate::model::overrides::{LinearOverride, Overrides};
use crate::model::prompts::PromptBuckets;
use crate::model::Clip;
use crate::progress::Progress;
use crate::score::{self, Scorer};
use crate::search::engine::{Engine, SearchData};
use crate::search::{self, SearchConfig, SearchState};
use crate::tokenizer::Tokenizer;
use crate::weights::{write_safetensors, F32Data, OwnedTensor, SaveDtype, WeightsFile};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The settings file `search` writes and `eval` / `apply` read.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SettingsFile {
    /// `[[tower, weight_type, layer, ratio], …]` as the reference's `lora_settings`.
    pub lora_settings: Vec<Setting>,
    pub prune: crate::lowrank::PruneType,
    /// Sizes of the model searched, to refuse settings for another model.
    pub vision_layers: usize,
    pub text_layers: usize,
    pub vision_width: usize,
    pub text_width: usize,
}

impl SettingsFile {
    pub fn read(path: &Path) -> Result<SettingsFile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("not a settings file: {e}")))
    }

    /// Refuses settings made for other model sizes.
    pub fn check_model<B: Backend>(&self, path: &Path, model: &Clip<B>) -> Result<()> {
        let c = &model.config;
        let theirs = (
            self.vision_layers,
            self.text_layers,
            self.vision_width,
            self.text_width,
        );
        let ours = (
            c.vision.tower.layers,
            c.text.tower.layers,
            c.vision.tower.hidden,
            c.text.tower.hidden,
        );
        if theirs != ours {
            return Err(Error::file(
                path,
                format!(
                    "these settings are for another model (vision/text layers {}/{}, widths {}/{}), not this one ({}/{}, {}/{})",
                    theirs.0, theirs.1, theirs.2, theirs.3, ours.0, ours.1, ours.2, ours.3
                ),
            ));
        }
        Ok(())
    }
}

/// Tokenised `"a photo of a {class}"` prompts for a label set.
pub fn prompt_batch<B: Backend>(
    model: &Clip<B>,
    tokenizer: &Tokenizer,
    labels: &LabelSet,
) -> crate::tokenizer::Batch {
    let prompts = labels.prompts();
    let refs: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
    tokenizer.encode_batch(&refs, model.config.text.context_length)
}

fn fnv_hex(s: &str) -> String {
    let h = s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x1000_0000_01b3)
    });
    format!("{h:016x}")
}

/// Identifies a search's inputs: the weights file (path, size, modification time), the images
/// and labels, the prompts and the configuration.
pub fn fingerprint(weights: &WeightsFile, data: &SearchData, cfg: &SearchConfig) -> String {
    let meta = std::fs::metadata(weights.path()).ok();
    let key = serde_json::json!({
        "weights": weights.path(),
        "bytes": meta.as_ref().map(|m| m.len()),
        "modified": meta.and_then(|m| m.modified().ok()).map(|t| format!("{t:?}")),
        "images": data.images,
        "labels": data.labels,
        "prompts": data.prompts,
        "config": cfg,
    });
    fnv_hex(&key.to_string())
}

/// Loads and preprocesses an ID split for the search.
pub fn search_data<B: Backend>(
    model: &Clip<B>,
    tokenizer: &Tokenizer,
    id_val: &Path,
    labels: &LabelSet,
    progress: Progress,
) -> Result<SearchData> {
    let items = image_folder(id_val, labels)?;
    let entries: Vec<ImageEntry> = items.iter().map(|i| i.image.clone()).collect();
    let pixels = preprocess_all(&entries, model.config.vision.image_size, progress)?;
    let batch = prompt_batch(model, tokenizer, labels);
    Ok(SearchData {
        pixels,
        labels: items.iter().map(|i| i.label).collect(),
        images: items.iter().map(|i| i.image.rel.clone()).collect(),
        prompts: PromptBuckets::new(&batch, model.backend.prompt_buckets()),
    })
}

/// Runs (or resumes) a search and writes its outputs into `out`:
/// `search_state.json` (resumable), `lora_settings.json`, `search_results.json` and
/// `search_best_results.csv` (the reference's shapes).
pub fn search<B: Backend>(
    model: &Clip<B>,
    weights: &WeightsFile,
    data: &SearchData,
    cfg: &SearchConfig,
    out: &Path,
    progress: Progress,
) -> Result<(SearchState, SettingsFile)> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let fp = fingerprint(weights, data, cfg);
    let mut engine = Engine::new(model, weights, data, cfg);
    let state = search::run(
        &mut engine,
        cfg,
        &fp,
        Some(&out.join("search_state.json")),
        progress,
    )?;
    let c = &model.config;
    let settings = SettingsFile {
        lora_settings: state.lora_settings(),
        prune: cfg.prune,
        vision_layers: c.vision.tower.layers,
        text_layers: c.text.tower.layers,
        vision_width: c.vision.tower.hidden,
        text_width: c.text.tower.hidden,
    };
    write_json(&out.join("lora_settings.json"), &settings)?;
    write_json(
        &out.join("search_results.json"),
        &crate::report::reference_search_results(&state),
    )?;
    write_text(
        &out.join("search_best_results.csv"),
        &crate::report::reference_best_results_csv(&state),
    )?;
    Ok((state, settings))
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write_text(
        path,
        &serde_json::to_string_pretty(value).expect("serialisable"),
    )
}

/// Writes a text file atomically.
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Low-rank weights for settings, materialised once: W' = W − Σ_removed σᵢuᵢvᵢᵀ per target
/// with r > 0 (bias unchanged).
pub struct AppliedSettings<W> {
    pub linears: HashMap<Target, Linear<W>>,
    /// Host copies of W' by tensor name, for writing the model.
    pub host: BTreeMap<String, Vec<f32>>,
}

pub fn apply_settings<B: Backend>(
    model: &Clip<B>,
    weights: &WeightsFile,
    settings: &SettingsFile,
) -> Result<AppliedSettings<B::Weight>> {
    let mut linears = HashMap::new();
    let mut host = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for s in &settings.lora_settings {
        if !seen.insert(s.target) {
            return Err(Error::invalid(format!(
                "{} appears twice in the settings",
                s.target
            )));
        }
        let name = format!("{}.weight", s.target.module());
        let shape = weights.shape(&name)?.to_vec();
        let full = shape[0].min(shape[1]);
        let rank = rank_for(full, s.ratio, &s.target)?;
        if rank == 0 {
            continue;
        }
        let w = weights.f32(&name, &shape)?.to_vec();
        let svd = Svd::new(&w, shape[0], shape[1])?;
        let order = svd.removal_order(settings.prune, &s.target);
        let pruned = svd.pruned(&w, &order, rank);
        let b = &model.backend;
        let bias = if s.target.weight == WeightType::P {
            None
        } else {
            let bn = format!("{}.bias", s.target.module());
            Some(b.weight(F32Data::Owned(Arc::new(
                weights.f32(&bn, &[shape[0]])?.to_vec(),
            )))?)
        };
        linears.insert(
            s.target,
            Linear {
                weight: b.weight(F32Data::Owned(Arc::new(pruned.clone())))?,
                bias,
                out_dim: shape[0],
                in_dim: shape[1],
            },
        );
        host.insert(name, pruned);
    }
    Ok(AppliedSettings { linears, host })
}

impl<W> AppliedSettings<W> {
    pub fn overrides<B: Backend<Weight = W>>(&self) -> Overrides<'_, B> {
        let mut ov = Overrides::none();
        for (t, l) in &self.linears {
            ov.insert(*t, LinearOverride::Weight(l));
        }
        ov
    }
}

/// Writes the low-rank model in the same layout (`model.safetensors` + `config.json`, and the
/// tokenizer files beside the source weights), so HF transformers and this engine load it.
pub fn write_applied(
    weights: &WeightsFile,
    applied: &AppliedSettings<impl Sized>,
    config: &crate::config::ClipConfig,
    out: &Path,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut tensors = Vec::new();
    for (name, info) in weights.tensors() {
        if crate::weights::is_skipped_buffer(name) {
            continue;
        }
        let dtype = match info.dtype {
            crate::weights::DiskDtype::F16 => SaveDtype::F16,
            crate::weights::DiskDtype::BF16 => SaveDtype::Bf16,
            _ => SaveDtype::F32,
        };
        let values = match applied.host.get(name) {
            Some(v) => v.clone(),
            None => weights.f32(name, &info.shape)?.to_vec(),
        };
        tensors.push((
            name.clone(),
            OwnedTensor::from_f32(&values, info.shape.clone(), dtype),
        ));
    }
    let file = out.join("model.safetensors");
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&file, &tensors, meta)?;
    write_json(&out.join("config.json"), &config.to_hf_json())?;
    if let Some(src) = weights.path().parent() {
        for f in [
            "vocab.json",
            "merges.txt",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            if src.join(f).is_file() {
                std::fs::copy(src.join(f), out.join(f)).map_err(|e| Error::io(src.join(f), e))?;
            }
        }
    }
    Ok(file)
}

/// Scores of one image set under every scorer.
#[derive(Clone, Debug, Serialize)]
pub struct ScoredSet {
    pub name: String,
    pub images: Vec<String>,
    pub scores: BTreeMap<String, Vec<f64>>,
}

/// What `eval` measures.
#[derive(Clone, Debug, Serialize)]
pub struct EvalResult {
    pub id: ScoredSet,
    /// ID top-1 accuracy (%) of zero-shot classification.
    pub accuracy: f64,
    pub ood: Vec<ScoredSet>,
    /// Scorer names in the order asked for.
    pub scorers: Vec<String>,
    /// scorer → OOD set name (and "Avg") → metrics.
    pub metrics: BTreeMap<String, BTreeMap<String, OodMetrics>>,
    pub recall_level: f64,
}

/// Runs images through the (low-rank) model and scores them: returns the scores per scorer and
/// the global logits (for accuracy).
#[allow(clippy::too_many_arguments)]
fn score_images<B: Backend>(
    model: &Clip<B>,
    ov: &Overrides<B>,
    text: &[f32],
    entries: &[ImageEntry],
    scorers: &[Scorer],
    temperature: f64,
    batch: usize,
    what: &str,
    progress: Progress,
) -> Result<(Vec<Vec<f64>>, Vec<f32>)> {
    let dim = model.config.projection_dim;
    let classes = text.len() / dim;
    let scale = model.logit_scale.exp();
    let size = model.config.vision.image_size;
    let bar = progress.bar(entries.len(), what, "img");
    let mut per_scorer = vec![Vec::with_capacity(entries.len()); scorers.len()];
    let mut all_global = Vec::with_capacity(entries.len() * classes);
    for chunk in entries.chunks(batch.max(1)) {
        let pixels = preprocess_all(chunk, size, Progress { quiet: true })?;
        let f = model.encode_images_with(&pixels, chunk.len(), true, ov)?;
        let local = f.local.expect("local features");
        let g = crate::search::evaluate::logits(&f.embeds, dim, text, scale)?;
        let l = crate::search::evaluate::logits(&local, dim, text, scale)?;
        let patches = l.len() / (chunk.len() * classes);
        let rows: Vec<Vec<f64>> = (0..chunk.len())
            .into_par_iter()
            .map(|i| {
                let gi = &g[i * classes..(i + 1) * classes];
                let li = &l[i * patches * classes..(i + 1) * patches * classes];
                score::scores(scorers, gi, li, classes, temperature)
            })
            .collect::<Result<_>>()?;
        for row in rows {
            for (s, v) in row.into_iter().enumerate() {
                per_scorer[s].push(v);
            }
        }
        all_global.extend(g);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok((per_scorer, all_global))
}

/// Evaluation: zero-shot accuracy on the ID test split and OOD metrics of every scorer against
/// every OOD set, with the settings applied.
#[allow(clippy::too_many_arguments)]
pub fn evaluate<B: Backend>(
    model: &Clip<B>,
    tokenizer: &Tokenizer,
    applied: &AppliedSettings<B::Weight>,
    labels: &LabelSet,
    id_test: &Path,
    ood: &[(String, PathBuf)],
    scorers: &[Scorer],
    temperature: f64,
    recall_level: f64,
    batch: usize,
    progress: Progress,
) -> Result<EvalResult> {
    if ood.is_empty() {
        return Err(Error::invalid(
            "no OOD sets: pass --ood NAME=DIR at least once",
        ));
    }
    let id_items: Vec<LabelledImage> = image_folder(id_test, labels)?;
    // Check every folder before the long work starts.
    let ood_entries: Vec<(String, Vec<ImageEntry>)> = ood
        .iter()
        .map(|(n, d)| Ok((n.clone(), find_images(d)?)))
        .collect::<Result<_>>()?;
    let ov = applied.overrides::<B>();
    let prompts = PromptBuckets::new(
        &prompt_batch(model, tokenizer, labels),
        model.backend.prompt_buckets(),
    );
    let mut text = model.encode_prompts(&prompts, &ov)?;
    l2_normalize_rows(&mut text, model.config.projection_dim);
    let id_entries: Vec<ImageEntry> = id_items.iter().map(|i| i.image.clone()).collect();
    let (id_scores, id_logits) = score_images(
        model,
        &ov,
        &text,
        &id_entries,
        scorers,
        temperature,
        batch,
        "ID test",
        progress,
    )?;
    let id_labels: Vec<usize> = id_items.iter().map(|i| i.label).collect();
    let accuracy = metrics::top1_accuracy(&id_logits, labels.classes.len(), &id_labels)?;
    let names: Vec<String> = scorers.iter().map(|s| s.name().to_string()).collect();
    let as_map = |v: Vec<Vec<f64>>| names.iter().cloned().zip(v).collect::<BTreeMap<_, _>>();
    let mut metrics_out: BTreeMap<String, BTreeMap<String, OodMetrics>> = BTreeMap::new();
    let mut ood_sets = Vec::new();
    for (name, entries) in &ood_entries {
        let (scores, _) = score_images(
            model,
            &ov,
            &text,
            entries,
            scorers,
            temperature,
            batch,
            name,
            progress,
        )?;
        for ((s, sc), id) in names.iter().zip(&scores).zip(&id_scores) {
            let m = metrics::ood_metrics(id, sc, recall_level)?;
            metrics_out
                .entry(s.clone())
                .or_default()
                .insert(name.clone(), m);
        }
        ood_sets.push(ScoredSet {
            name: name.clone(),
            images: entries.iter().map(|e| e.rel.clone()).collect(),
            scores: as_map(scores),
        });
    }
    for per_set in metrics_out.values_mut() {
        let n = per_set.len() as f64;
        let mean = |f: fn(&OodMetrics) -> f64| per_set.values().map(f).sum::<f64>() / n;
        let avg = OodMetrics {
            fpr95: mean(|m| m.fpr95),
            auroc: mean(|m| m.auroc),
            aupr_in: mean(|m| m.aupr_in),
            aupr_out: mean(|m| m.aupr_out),
            cutoff: mean(|m| m.cutoff),
        };
        per_set.insert("Avg".into(), avg);
    }
    Ok(EvalResult {
        id: ScoredSet {
            name: "ID".into(),
            images: id_entries.iter().map(|e| e.rel.clone()).collect(),
            scores: as_map(id_scores.clone()),
        },
        accuracy,
        ood: ood_sets,
        scorers: names,
        metrics: metrics_out,
        recall_level,
    })
}
