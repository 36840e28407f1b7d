//! Image-tower img/s and text-tower prompts/s on a ViT-B/16-shaped CLIP.
//!
//! `SETAR_BENCH_MODEL=DIR` benchmarks that checkpoint (scripts/bench-cpu.sh passes the same
//! random model to HF transformers); otherwise a random ViT-B/16 is written to a temp folder.
//! `SETAR_BENCH_BATCH` (default 32) images per forward, `SETAR_BENCH_PROMPTS` (default 256)
//! prompts of 16 tokens per forward.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use setar_engine::backend::cpu::CpuBackend;
use setar_engine::config::ClipConfig;
use setar_engine::model::random::{normal, preset, write_random_model};
use setar_engine::model::Clip;
use setar_engine::weights::{SaveDtype, WeightsFile};
use std::path::PathBuf;
use std::time::Duration;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn model_dir() -> (PathBuf, Option<tempfile::TempDir>) {
    if let Ok(dir) = std::env::var("SETAR_BENCH_MODEL") {
        return (PathBuf::from(dir), None);
    }
    let tmp = tempfile::tempdir().unwrap();
    write_random_model(&preset("vit-b-16").unwrap(), tmp.path(), 0, SaveDtype::F32).unwrap();
    (tmp.path().to_path_buf(), Some(tmp))
}

fn towers(c: &mut Criterion) {
    setar_engine::backend::cpu::keep_freed_memory();
    let (dir, _keep) = model_dir();
    let file = WeightsFile::open(&dir).unwrap();
    let config = ClipConfig::for_weights(&file).unwrap();
    let model = Clip::load(CpuBackend::new(), &file, &config).unwrap();
    let v = &config.vision;

    let batch = env_usize("SETAR_BENCH_BATCH", 32);
    let pixels = normal(1, "pixels", batch * 3 * v.image_size * v.image_size, 1.0);
    let mut g = c.benchmark_group("image_tower");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(3))
        .measurement_time(Duration::from_secs(40));
    g.throughput(Throughput::Elements(batch as u64));
    g.bench_function(format!("global_b{batch}"), |b| {
        b.iter(|| model.encode_images(&pixels, batch, false).unwrap())
    });
    g.bench_function(format!("global_and_local_b{batch}"), |b| {
        b.iter(|| model.encode_images(&pixels, batch, true).unwrap())
    });
    g.finish();

    // Prompts of 16 tokens: BOS, 14 ordinary ids, EOS.
    let n = env_usize("SETAR_BENCH_PROMPTS", 256);
    let seq = 16;
    let ids: Vec<u32> = (0..n * seq)
        .map(|i| match i % seq {
            0 => 49406,
            15 => 49407,
            j => (1000 + 37 * (i / seq) + 101 * j) as u32 % 49000,
        })
        .collect();
    let lengths = vec![seq; n];
    let mut g = c.benchmark_group("text_tower");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(format!("prompts{n}_len{seq}"), |b| {
        b.iter(|| model.encode_text(&ids, &lengths, seq).unwrap())
    });
    g.finish();
}

criterion_group!(benches, towers);
criterion_main!(benches);
