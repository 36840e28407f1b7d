//! Loading checkpoints: dtypes, zero-copy f32, skipped buffers, config.json vs inferred sizes,
//! and the `init-random` / `info` commands.

mod common;

use setar_engine::backend::cpu::CpuBackend;
use setar_engine::config::ClipConfig;
use setar_engine::model::random::{preset, random_tensors, write_random_model};
use setar_engine::model::Clip;
use setar_engine::weights::{write_safetensors, OwnedTensor, SaveDtype, WeightsFile};
use std::process::Command;

#[test]
fn every_dtype_loads_to_the_same_values_up_to_rounding() {
    let config = preset("tiny").unwrap();
    let reference = random_tensors(&config, 3);
    for (dtype, tol) in [
        (SaveDtype::F32, 0.0f32),
        (SaveDtype::F16, 1e-3),
        (SaveDtype::Bf16, 8e-3),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_random_model(&config, dir.path(), 3, dtype).unwrap();
        let file = WeightsFile::open(dir.path()).unwrap();
        for (name, values, shape) in &reference {
            let got = file.f32(name, shape).unwrap();
            // f32 on disk is read in place from the mapping, other dtypes are converted once.
            assert_eq!(
                got.is_mapped(),
                dtype == SaveDtype::F32 || name == "logit_scale",
                "{name}"
            );
            for (g, w) in got.iter().zip(values) {
                assert!(
                    (g - w).abs() <= tol * w.abs().max(1e-2),
                    "{dtype:?} {name}: {g} vs {w}"
                );
            }
        }
        // The model loads from each, with sizes from config.json equal to the inferred ones.
        let from_json = ClipConfig::for_weights(&file).unwrap();
        let inferred = ClipConfig::infer(&file).unwrap();
        assert_eq!(
            (&from_json.vision, &from_json.text),
            (&inferred.vision, &inferred.text)
        );
        assert_eq!(from_json.projection_dim, inferred.projection_dim);
        Clip::load(CpuBackend::new(), &file, &from_json).unwrap();
    }
}

#[test]
fn position_ids_buffers_are_skipped() {
    let config = preset("tiny").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut tensors: Vec<(String, OwnedTensor)> = random_tensors(&config, 1)
        .into_iter()
        .map(|(n, v, s)| (n, OwnedTensor::from_f32(&v, s, SaveDtype::F32)))
        .collect();
    for (name, len) in [
        ("text_model.embeddings.position_ids", 77),
        ("vision_model.embeddings.position_ids", 17),
    ] {
        let bytes = (0..len as i64).flat_map(|i| i.to_le_bytes()).collect();
        tensors.push((
            name.into(),
            OwnedTensor {
                dtype: safetensors::Dtype::I64,
                shape: vec![1, len],
                bytes,
            },
        ));
    }
    let path = dir.path().join("model.safetensors");
    write_safetensors(&path, &tensors, Default::default()).unwrap();
    let file = WeightsFile::open(&path).unwrap();
    let config = ClipConfig::for_weights(&file).unwrap();
    assert_eq!(config.source, "tensor shapes");
    Clip::load(CpuBackend::new(), &file, &config).unwrap();
}

#[test]
fn init_random_then_info() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_setar-engine");
    let ok = Command::new(bin)
        .args([
            "init-random",
            "--quiet",
            "--preset",
            "tiny",
            "--dtype",
            "bf16",
            "--seed",
            "5",
            "--out",
        ])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(ok.success());
    let out = Command::new(bin)
        .args(["info", "--json", "--weights"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let config = preset("tiny").unwrap();
    let want_params: usize = random_tensors(&config, 0)
        .iter()
        .map(|(_, v, _)| v.len())
        .sum();
    assert_eq!(info["parameters"].as_u64().unwrap() as usize, want_params);
    assert_eq!(
        info["dtypes"]["bf16"].as_u64().unwrap() + 1,
        info["tensors"].as_u64().unwrap()
    );
    assert_eq!(
        info["dtypes"]["f32"].as_u64().unwrap(),
        1,
        "logit_scale stays f32"
    );
    assert_eq!(info["config"]["vision_config"]["patch_size"], 16);
    assert!((info["logit_scale"].as_f64().unwrap() - (1.0f64 / 0.07).ln()).abs() < 1e-6);
}
