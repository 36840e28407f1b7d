//! Random CLIP checkpoints in the real HF layout and sizes, for tests and benchmarks, made
//! without Python. Initialisation follows HF `CLIPPreTrainedModel._init_weights` (factor 1).

use crate::config::{Activation, ClipConfig, TextConfig, TowerConfig, VisionConfig};
use crate::error::{Error, Result};
use crate::weights::{write_safetensors, OwnedTensor, SaveDtype};
use rayon::prelude::*;
use std::path::Path;

/// The sizes of released CLIPs, and a tiny one for tests.
pub fn preset(name: &str) -> Result<ClipConfig> {
    let tower = |hidden, layers| TowerConfig {
        hidden,
        intermediate: hidden * 4,
        heads: hidden / 64,
        layers,
        eps: 1e-5,
        act: Activation::QuickGelu,
    };
    let text = |hidden, layers| TextConfig {
        tower: tower(hidden, layers),
        vocab_size: 49408,
        context_length: 77,
        eos_token_id: 49407,
    };
    let (vision, text, projection_dim) = match name {
        "vit-b-16" => (
            VisionConfig {
                tower: tower(768, 12),
                image_size: 224,
                patch_size: 16,
                channels: 3,
            },
            text(512, 12),
            512,
        ),
        "vit-b-32" => (
            VisionConfig {
                tower: tower(768, 12),
                image_size: 224,
                patch_size: 32,
                channels: 3,
            },
            text(512, 12),
            512,
        ),
        "vit-l-14" => (
            VisionConfig {
                tower: tower(1024, 24),
                image_size: 224,
                patch_size: 14,
                channels: 3,
            },
            text(768, 12),
            768,
        ),
        "tiny" => (
            VisionConfig {
                tower: tower(128, 2),
                image_size: 64,
                patch_size: 16,
                channels: 3,
            },
            text(128, 2),
            64,
        ),
        other => {
            return Err(Error::invalid(format!(
                "unknown preset \"{other}\" (vit-b-16, vit-b-32, vit-l-14, tiny)"
            )))
        }
    };
    Ok(ClipConfig {
        vision,
        text,
        projection_dim,
        source: format!("preset {name}"),
    })
}

/// SplitMix64: tiny, seedable, identical everywhere.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x1000_0000_01b3)
    })
}

/// `n` normal(0, std) values, reproducible from (seed, name) whatever the thread count.
pub fn normal(seed: u64, name: &str, n: usize, std: f32) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0.0f32; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng =
                SplitMix(seed ^ name_hash(name) ^ (c as u64).wrapping_mul(0xA24B_AED4_963E_E407));
            for pair in chunk.chunks_mut(2) {
                let (u1, u2) = (rng.uniform(), rng.uniform());
                let r = (-2.0 * u1.ln()).sqrt();
                let t = std::f64::consts::TAU * u2;
                pair[0] = (r * t.cos()) as f32 * std;
                if pair.len() > 1 {
                    pair[1] = (r * t.sin()) as f32 * std;
                }
            }
        });
    out
}

/// Every tensor of a random CLIP with these sizes, as (name, f32 values, shape).
pub fn random_tensors(config: &ClipConfig, seed: u64) -> Vec<(String, Vec<f32>, Vec<usize>)> {
    let mut out = Vec::new();
    let mut add =
        |name: String, values: Vec<f32>, shape: Vec<usize>| out.push((name, values, shape));
    let tower =
        |add: &mut dyn FnMut(String, Vec<f32>, Vec<usize>), prefix: &str, t: &TowerConfig| {
            let (d, i) = (t.hidden, t.intermediate);
            let in_std = (d as f32).powf(-0.5) * ((2 * t.layers) as f32).powf(-0.5);
            let out_std = (d as f32).powf(-0.5);
            let fc_std = ((2 * d) as f32).powf(-0.5);
            for l in 0..t.layers {
                let p = format!("{prefix}.encoder.layers.{l}");
                for (name, o, inp, std) in [
                    ("self_attn.q_proj", d, d, in_std),
                    ("self_attn.k_proj", d, d, in_std),
                    ("self_attn.v_proj", d, d, in_std),
                    ("self_attn.out_proj", d, d, out_std),
                    ("mlp.fc1", i, d, fc_std),
                    ("mlp.fc2", d, i, in_std),
                ] {
                    let w = format!("{p}.{name}.weight");
                    add(w.clone(), normal(seed, &w, o * inp, std), vec![o, inp]);
                    add(format!("{p}.{name}.bias"), vec![0.0; o], vec![o]);
                }
                for ln in ["layer_norm1", "layer_norm2"] {
                    add(format!("{p}.{ln}.weight"), vec![1.0; d], vec![d]);
                    add(format!("{p}.{ln}.bias"), vec![0.0; d], vec![d]);
                }
            }
        };
    let v = &config.vision;
    let (dv, dt, p) = (
        v.tower.hidden,
        config.text.tower.hidden,
        config.projection_dim,
    );
    let n = "vision_model.embeddings.class_embedding";
    add(
        n.into(),
        normal(seed, n, dv, (dv as f32).powf(-0.5)),
        vec![dv],
    );
    let n = "vision_model.embeddings.patch_embedding.weight";
    add(
        n.into(),
        normal(seed, n, dv * v.channels * v.patch_size * v.patch_size, 0.02),
        vec![dv, v.channels, v.patch_size, v.patch_size],
    );
    let n = "vision_model.embeddings.position_embedding.weight";
    add(
        n.into(),
        normal(seed, n, v.tokens() * dv, 0.02),
        vec![v.tokens(), dv],
    );
    for ln in ["vision_model.pre_layrnorm", "vision_model.post_layernorm"] {
        add(format!("{ln}.weight"), vec![1.0; dv], vec![dv]);
        add(format!("{ln}.bias"), vec![0.0; dv], vec![dv]);
    }
    tower(&mut add, "vision_model", &v.tower);
    let t = &config.text;
    let n = "text_model.embeddings.token_embedding.weight";
    add(
        n.into(),
        normal(seed, n, t.vocab_size * dt, 0.02),
        vec![t.vocab_size, dt],
    );
    let n = "text_model.embeddings.position_embedding.weight";
    add(
        n.into(),
        normal(seed, n, t.context_length * dt, 0.01),
        vec![t.context_length, dt],
    );
    add(
        "text_model.final_layer_norm.weight".into(),
        vec![1.0; dt],
        vec![dt],
    );
    add(
        "text_model.final_layer_norm.bias".into(),
        vec![0.0; dt],
        vec![dt],
    );
    tower(&mut add, "text_model", &t.tower);
    let n = "visual_projection.weight";
    add(
        n.into(),
        normal(seed, n, p * dv, (dv as f32).powf(-0.5)),
        vec![p, dv],
    );
    let n = "text_projection.weight";
    add(
        n.into(),
        normal(seed, n, p * dt, (dt as f32).powf(-0.5)),
        vec![p, dt],
    );
    add("logit_scale".into(), vec![(1.0f32 / 0.07).ln()], vec![]);
    out
}

/// Writes `model.safetensors` + `config.json` for a random CLIP into `dir`.
pub fn write_random_model(
    config: &ClipConfig,
    dir: &Path,
    seed: u64,
    dtype: SaveDtype,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors: Vec<(String, OwnedTensor)> = random_tensors(config, seed)
        .into_iter()
        .map(|(name, values, shape)| {
            // logit_scale stays f32, as HF keeps it.
            let dt = if name == "logit_scale" {
                SaveDtype::F32
            } else {
                dtype
            };
            (name, OwnedTensor::from_f32(&values, shape, dt))
        })
        .collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join("model.safetensors"), &tensors, meta)?;
    let cfg = dir.join("config.json");
    let json = serde_json::to_string_pretty(&config.to_hf_json()).expect("config serialises");
    std::fs::write(&cfg, json).map_err(|e| Error::io(&cfg, e))
}
