//! `setar-engine embed` end to end against HF: real photos preprocessed by PIL + torchvision,
//! prompts tokenised by HF CLIPTokenizer, a CLIP with CLIP's real vocabulary run by
//! transformers in float64 (tests/fixtures/make_model_fixtures.py, `make_e2e`).

mod common;

use common::{fixtures, rel_err, tensor};
use setar_engine::weights::WeightsFile;
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    fixtures().parent().unwrap().parent().unwrap().to_path_buf()
}

#[test]
fn embed_matches_transformers_end_to_end() {
    let model = fixtures().join("models/e2e_real_vocab_f16");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("embeds.safetensors");
    let status = Command::new(env!("CARGO_BIN_EXE_setar-engine"))
        .args(["embed", "--quiet", "--batch", "3", "--weights"])
        .arg(&model)
        .arg("--images")
        .arg(repo().join("examples/images"))
        .arg("--prompts")
        .arg(repo().join("examples/prompts.txt"))
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());

    let ours = WeightsFile::open(&out).unwrap();
    let expected = WeightsFile::open(&model.join("expected.safetensors")).unwrap();
    for key in ["images", "prompts"] {
        let a: Vec<String> = serde_json::from_str(&ours.metadata()[key]).unwrap();
        let b: Vec<String> = serde_json::from_str(&expected.metadata()[key]).unwrap();
        assert_eq!(a, b, "metadata {key}");
    }
    for (key, want_key) in [
        ("image_embeds", "image_embeds"),
        ("image_local_embeds", "image_local_embeds"),
        ("text_embeds", "text_embeds"),
        ("logit_scale", "logit_scale"),
    ] {
        let (got, gshape) = tensor(&ours, key);
        let (want, wshape) = tensor(&expected, want_key);
        assert_eq!(
            gshape.iter().product::<usize>(),
            wshape.iter().product::<usize>(),
            "{key} size"
        );
        let err = rel_err(&got, &want);
        println!("{key:<20} shape {gshape:?} relative error vs HF-f64 {err:.2e}");
        assert!(err <= 1e-5, "{key}: relative error {err:.3e}");
    }
    // image_local_embeds is [N, G², P]; logit_scale is the raw parameter, a scalar.
    assert_eq!(ours.shape("image_local_embeds").unwrap().len(), 3);
    assert_eq!(ours.shape("logit_scale").unwrap().len(), 0);
}
