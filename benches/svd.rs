//! One thin SVD of a search target's weight on the host (faer, f64: `Svd::new`, what the CPU
//! search and a device search's background threads compute), for the two ViT-B/16 `mlp.fc1`
//! shapes: vision 3072×768 and text 2048×512. One thread per SVD, as each background job is
//! when the pool is busy (`RAYON_NUM_THREADS` sets faer's threads for this bench).

use criterion::{criterion_group, criterion_main, Criterion};
use setar_engine::lowrank::Svd;
use setar_engine::model::random::normal;

fn svds(c: &mut Criterion) {
    let mut g = c.benchmark_group("svd");
    g.sample_size(10);
    for (out_dim, in_dim) in [(3072usize, 768usize), (2048, 512)] {
        let w = normal(0, "svd", out_dim * in_dim, 0.02);
        g.bench_function(format!("{out_dim}x{in_dim}"), |b| {
            b.iter(|| Svd::new(&w, out_dim, in_dim).expect("SVD"))
        });
    }
    g.finish();
}

criterion_group!(benches, svds);
criterion_main!(benches);
