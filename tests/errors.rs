//! Bad input gets a clear error naming the file (and tensor), a non-zero exit, and no panic.

mod common;

use common::{fixtures, tiny_model};
use setar_engine::weights::{write_safetensors, OwnedTensor, SaveDtype, WeightsFile};
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_setar-engine");

/// Runs the CLI and returns (success, stderr).
fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--quiet")
        .output()
        .expect("binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("panicked"),
        "the binary panicked:\n{stderr}"
    );
    (out.status.success(), stderr)
}

/// Asserts the command fails and its message contains every `needle`.
fn fails_with(args: &[&str], needles: &[&str]) {
    let (ok, err) = cli(args);
    assert!(!ok, "expected failure for {args:?}");
    for n in needles {
        assert!(err.contains(n), "message for {args:?} lacks {n:?}:\n{err}");
    }
    assert!(err.starts_with("error: "), "{err}");
}

fn fixture_model() -> PathBuf {
    fixtures().join("models/narrow_heads_f32")
}

/// Copies the fixture model into `dir`, letting `edit` change its tensors first.
fn edited_model(dir: &Path, edit: impl FnOnce(&mut Vec<(String, OwnedTensor)>)) -> PathBuf {
    edited_copy(&fixture_model(), dir, edit)
}

/// Copies `model` (a fixture folder) into `dir` in f32, letting `edit` change its tensors.
fn edited_copy(
    model: &Path,
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(String, OwnedTensor)>),
) -> PathBuf {
    let src = WeightsFile::open(model).unwrap();
    let mut tensors: Vec<(String, OwnedTensor)> = src
        .tensors()
        .iter()
        .map(|(name, info)| {
            let v = src.f32(name, &info.shape).unwrap();
            (
                name.clone(),
                OwnedTensor::from_f32(&v, info.shape.clone(), SaveDtype::F32),
            )
        })
        .collect();
    edit(&mut tensors);
    // Everything else the folder holds (config, tokenizer) as it is.
    for e in std::fs::read_dir(model).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "safetensors") {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    let path = dir.join("model.safetensors");
    write_safetensors(&path, &tensors, Default::default()).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn truncated_weights_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture_model().join("model.safetensors")).unwrap();
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(&["info", "--weights", s(&path)], &[s(&path), "truncated"]);
    std::fs::write(&path, &bytes[..5]).unwrap();
    fails_with(&["info", "--weights", s(&path)], &[s(&path), "truncated"]);
}

#[test]
fn bad_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let header = b"{\"a\": not json}";
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    std::fs::write(&path, &bytes).unwrap();
    fails_with(
        &["info", "--weights", s(&path)],
        &[s(&path), "bad safetensors header"],
    );
}

#[test]
fn missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_model(dir.path(), |t| {
        t.retain(|(n, _)| n != "text_projection.weight")
    });
    fails_with(
        &["info", "--weights", s(&path)],
        &[s(&path), "text_projection.weight", "missing"],
    );
}

#[test]
fn unexpected_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_model(dir.path(), |t| {
        t.push((
            "vision_model.encoder.layers.9.mlp.fc1.weight".into(),
            OwnedTensor::from_f32(&[0.0; 4], vec![2, 2], SaveDtype::F32),
        ))
    });
    fails_with(
        &["info", "--weights", s(&path)],
        &[s(&path), "layers.9.mlp.fc1.weight", "unexpected"],
    );
}

#[test]
fn wrong_shape() {
    let dir = tempfile::tempdir().unwrap();
    let name = "vision_model.encoder.layers.1.mlp.fc1.weight";
    let path = edited_model(dir.path(), |t| {
        let e = t.iter_mut().find(|(n, _)| n == name).unwrap();
        e.1.shape = vec![e.1.shape[1], e.1.shape[0]];
    });
    fails_with(
        &["info", "--weights", s(&path)],
        &[s(&path), name, "does not fit"],
    );
}

#[test]
fn unsupported_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let name = "text_projection.weight";
    // A model with the real vocabulary, which the ImageNet-style prompts need.
    let model = fixtures().join("models/e2e_real_vocab_f16");
    let path = edited_copy(&model, dir.path(), |t| {
        let e = t.iter_mut().find(|(n, _)| n == name).unwrap();
        e.1.dtype = safetensors::Dtype::I32;
    });
    fails_with(
        &["info", "--weights", s(&path)],
        &[s(&path), name, "unsupported dtype"],
    );
}

#[test]
fn nan_in_weights() {
    let dir = tempfile::tempdir().unwrap();
    let name = "vision_model.encoder.layers.0.self_attn.k_proj.bias";
    let path = edited_model(dir.path(), |t| {
        let e = t.iter_mut().find(|(n, _)| n == name).unwrap();
        e.1.bytes[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    fails_with(
        &["info", "--weights", s(&path)],
        &[s(&path), name, "non-finite", "index 2"],
    );
}

#[test]
fn missing_weights_and_folder_without_model() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    fails_with(
        &["info", "--weights", s(&missing)],
        &[s(&missing), "no such file"],
    );
    fails_with(
        &["info", "--weights", s(dir.path())],
        &[s(dir.path()), "no model.safetensors"],
    );
}

#[test]
fn bad_config_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_model(dir.path(), |_| {});
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"quick_gelu\"", "\"swish\"");
    std::fs::write(&cfg, text).unwrap();
    fails_with(
        &["info", "--weights", s(&path)],
        &[s(&cfg), "hidden_act", "swish"],
    );
}

/// A folder with `n` good PNGs and the prompts file, for the embed error cases.
fn embed_inputs(dir: &Path) -> (PathBuf, PathBuf) {
    let images = dir.join("images");
    std::fs::create_dir_all(images.join("sub")).unwrap();
    let png = fixtures().join("images");
    let any_png = std::fs::read_dir(&png)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .expect("a PNG among the image fixtures");
    std::fs::copy(&any_png, images.join("sub/a.png")).unwrap();
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "a photo of a cat\na photo of a dog\n").unwrap();
    (images, prompts)
}

fn embed_args<'a>(
    weights: &'a str,
    images: &'a str,
    prompts: &'a str,
    out: &'a str,
) -> Vec<&'a str> {
    vec![
        "embed",
        "--weights",
        weights,
        "--images",
        images,
        "--prompts",
        prompts,
        "--out",
        out,
    ]
}

#[test]
fn corrupt_image_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (images, prompts) = embed_inputs(dir.path());
    let bad = images.join("sub/broken.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 this is not really a jpeg").unwrap();
    let out = dir.path().join("out.safetensors");
    let w = tiny_model();
    fails_with(
        &embed_args(s(&w), s(&images), s(&prompts), s(&out)),
        &[s(&bad)],
    );
    assert!(!out.exists(), "no partial output");
}

#[test]
fn non_image_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (images, prompts) = embed_inputs(dir.path());
    let txt = images.join("notes.txt");
    std::fs::write(&txt, "hello").unwrap();
    let out = dir.path().join("out.safetensors");
    let w = tiny_model();
    fails_with(
        &embed_args(s(&w), s(&images), s(&prompts), s(&out)),
        &[s(&txt)],
    );
}

#[test]
fn empty_image_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (_, prompts) = embed_inputs(dir.path());
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = dir.path().join("out.safetensors");
    let w = tiny_model();
    fails_with(
        &embed_args(s(&w), s(&empty), s(&prompts), s(&out)),
        &[s(&empty)],
    );
}

#[test]
fn blank_prompt_line() {
    let dir = tempfile::tempdir().unwrap();
    let (images, prompts) = embed_inputs(dir.path());
    std::fs::write(&prompts, "a photo of a cat\n\na photo of a dog\n").unwrap();
    let out = dir.path().join("out.safetensors");
    let w = tiny_model();
    fails_with(
        &embed_args(s(&w), s(&images), s(&prompts), s(&out)),
        &[s(&prompts), "line 2 is empty"],
    );
}

#[test]
fn device_and_dtype_flags_are_checked() {
    let w = fixture_model();
    fails_with(
        &["info", "--weights", s(&w), "--dtype", "bf16"],
        &["--dtype bf16", "cuda"],
    );
    fails_with(
        &["info", "--weights", s(&w), "--device", "tpu"],
        &["--device tpu"],
    );
    // Without a GPU (or without the feature) asking for CUDA is an error, not a panic.
    fails_with(
        &["info", "--weights", s(&w), "--device", "cuda:0"],
        &["CUDA"],
    );
}

#[test]
fn zero_batch_is_refused() {
    let w = fixture_model();
    let dir = tempfile::tempdir().unwrap();
    let (images, prompts) = embed_inputs(dir.path());
    let out = dir.path().join("out.safetensors");
    let mut args = embed_args(s(&w), s(&images), s(&prompts), s(&out));
    args.extend(["--batch", "0"]);
    fails_with(&args, &["--batch", "at least 1"]);
}

/// Finite weights whose text features overflow: the search stops with an error naming the
/// text features (checked where they are made, on the backend), not a NaN loss.
#[test]
fn overflowing_text_features_stop_the_search() {
    let dir = tempfile::tempdir().unwrap();
    let name = "text_projection.weight";
    // A model with the real vocabulary, which the ImageNet-style prompts need.
    let model = fixtures().join("models/e2e_real_vocab_f16");
    let path = edited_copy(&model, dir.path(), |t| {
        let e = t.iter_mut().find(|(n, _)| n == name).unwrap();
        for v in e.1.bytes.chunks_exact_mut(4) {
            let x = f32::from_le_bytes(v.try_into().unwrap());
            v.copy_from_slice(&(x.signum() * 3e38).to_le_bytes());
        }
    });
    let labels = dir.path().join("labels.txt");
    std::fs::write(&labels, "cat\ncup\nperson\nrocket\n").unwrap();
    let id_val = fixtures().join("search/id_val");
    let out = dir.path().join("search");
    fails_with(
        &[
            "search",
            "--weights",
            s(&path),
            "--id-val",
            s(&id_val),
            "--labels",
            s(&labels),
            "--top-k",
            "2",
            "--out",
            s(&out),
        ],
        &["text features hold a non-finite value", "prompt 0"],
    );
}
