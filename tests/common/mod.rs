//! Shared helpers for the integration tests.
#![allow(dead_code)]

pub mod search_fixture;

use setar_engine::weights::WeightsFile;
use std::path::PathBuf;

/// `tests/fixtures`, found through the manifest dir, or relative to the current directory when
/// the test binary runs on another machine (the device machine runs from the repository root).
pub fn fixtures() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    if here.is_dir() {
        here
    } else {
        PathBuf::from("tests/fixtures")
    }
}

/// A named f32 tensor from a safetensors file, with its shape.
pub fn tensor(file: &WeightsFile, name: &str) -> (Vec<f32>, Vec<usize>) {
    let shape = file.shape(name).unwrap().to_vec();
    (file.f32(name, &shape).unwrap().to_vec(), shape)
}

/// ‖a − b‖ / ‖b‖ in f64.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// A random `tiny` CLIP (real vocabulary, 64 px images) written once per test binary.
pub fn tiny_model() -> PathBuf {
    use std::sync::OnceLock;
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let config = setar_engine::model::random::preset("tiny").unwrap();
        setar_engine::model::random::write_random_model(
            &config,
            dir.path(),
            7,
            setar_engine::weights::SaveDtype::F32,
        )
        .unwrap();
        dir
    });
    dir.path().to_path_buf()
}
