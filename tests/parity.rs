//! Our CPU forward pass against HF transformers `CLIPModel` on random configs made by
//! transformers itself (tests/fixtures/make_model_fixtures.py): ‖ours − theirs‖/‖theirs‖ ≤ 1e-5
//! for image, local and text embeddings and logits.

mod common;

use common::{fixtures, rel_err, tensor};
use setar_engine::backend::cpu::CpuBackend;
use setar_engine::config::ClipConfig;
use setar_engine::model::clip::logits;
use setar_engine::model::Clip;
use setar_engine::weights::WeightsFile;

const TOLERANCE: f64 = 1e-5;

/// Runs the fixture through our model (with `tweak` applied to its config) and returns the
/// worst relative error over the four outputs.
fn worst_error(name: &str, tweak: impl FnOnce(&mut ClipConfig)) -> f64 {
    let dir = fixtures().join("models").join(name);
    let weights = WeightsFile::open(&dir).unwrap();
    let mut config = ClipConfig::for_weights(&weights).unwrap();
    tweak(&mut config);
    let model = Clip::load(CpuBackend::new(), &weights, &config).unwrap();
    let expected = WeightsFile::open(&dir.join("expected.safetensors")).unwrap();

    let (pixels, pshape) = tensor(&expected, "pixel_values");
    let (ids_f, ishape) = tensor(&expected, "input_ids");
    let (mask, _) = tensor(&expected, "attention_mask");
    let ids: Vec<u32> = ids_f.iter().map(|&x| x as u32).collect();
    let seq = ishape[1];
    let lengths: Vec<usize> = mask
        .chunks(seq)
        .map(|r| r.iter().filter(|&&m| m > 0.0).count())
        .collect();

    let image = model.encode_images(&pixels, pshape[0], true).unwrap();
    let text = model.encode_text(&ids, &lengths, seq).unwrap();
    let p = config.projection_dim;
    let ours = [
        ("image_embeds", image.embeds.clone()),
        ("image_local_embeds", image.local.clone().unwrap()),
        ("text_embeds", text.clone()),
        (
            "logits_per_image",
            logits(&image.embeds, &text, p, model.logit_scale),
        ),
    ];
    let mut worst = 0.0f64;
    for (key, got) in ours {
        let (want, _) = tensor(&expected, key);
        let (hf32, _) = tensor(&expected, &format!("{key}_hf32"));
        let err = rel_err(&got, &want);
        println!(
            "{name:>22} {key:<20} ours vs HF-f64 {err:.2e}   (HF-f32 vs HF-f64 {:.2e})",
            rel_err(&hf32, &want)
        );
        worst = worst.max(err);
    }
    worst
}

fn check(name: &str) {
    let err = worst_error(name, |_| {});
    assert!(
        err <= TOLERANCE,
        "{name}: relative error {err:.3e} > {TOLERANCE:e}"
    );
}

#[test]
fn the_check_notices_a_wrong_model() {
    // The exact-erf GELU in place of quick_gelu, or a LayerNorm eps off by 10x, must fail.
    let err = worst_error("narrow_heads_f32", |c| {
        c.vision.tower.act = setar_engine::config::Activation::Gelu
    });
    assert!(err > 1e-3, "wrong activation went unnoticed: {err:.2e}");
    let err = worst_error("gelu_legacy_eos_bf16", |c| c.text.tower.eps *= 10.0);
    assert!(
        err > 10.0 * TOLERANCE,
        "wrong eps went unnoticed: {err:.2e}"
    );
}

#[test]
fn narrow_heads_f32_matches_transformers() {
    check("narrow_heads_f32");
}

#[test]
fn gelu_legacy_eos_bf16_matches_transformers() {
    check("gelu_legacy_eos_bf16");
}

#[test]
fn inferred_f16_without_config_matches_transformers() {
    let dir = fixtures().join("models/inferred_f16");
    assert!(
        !dir.join("config.json").exists(),
        "this fixture must have no config.json"
    );
    check("inferred_f16");
}
