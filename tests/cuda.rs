//! The CUDA backend against its CPU twins: every kernel on fresh random inputs of awkward sizes
//! (not multiples of the block size), outputs poisoned with NaN before each op, in f32, bf16
//! and f16; then whole CLIP models (the parity fixtures) CUDA vs CPU.
//!
//! Without a CUDA device these tests print `SKIP: no CUDA device: …` and pass; with
//! `SETAR_REQUIRE_CUDA=1` they fail instead. The NVRTC compile test needs no GPU, only
//! libnvrtc.so.13 on the loader path (`SETAR_REQUIRE_NVRTC=1` makes its absence a failure).
//! Inputs are drawn from a seed printed by each test; `SETAR_TEST_SEED=N` replays one.
#![cfg(feature = "cuda")]

mod common;

use common::{fixtures, rel_err, tensor};
use setar_engine::backend::cpu::{self, CpuBackend};
use setar_engine::backend::cuda::{
    kernels, AttentionPath, CudaBackend, CudaOptions, DType, EigPath, GemmPath,
};
use setar_engine::backend::{fastmath, AttentionMask, AttentionShape, Backend, SvdSchedule};
use setar_engine::config::{Activation, ClipConfig};
use setar_engine::model::clip::{l2_normalize_rows, logits};
use setar_engine::model::Clip;
use setar_engine::weights::WeightsFile;
use std::sync::OnceLock;

fn env_is(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

const PATHS: [GemmPath; 3] = [GemmPath::Auto, GemmPath::Lt, GemmPath::Blas];

/// The shared backend of this test binary for a dtype and GEMM path (cuda:0, poisoning on,
/// synchronising after each op so a fault names its op), or None after printing why (skip).
fn backend(dtype: DType, gemm: GemmPath) -> Option<&'static CudaBackend> {
    static CELLS: [OnceLock<Result<CudaBackend, String>>; 9] = [const { OnceLock::new() }; 9];
    let di = DType::ALL.iter().position(|&d| d == dtype).unwrap();
    let pi = PATHS.iter().position(|&p| p == gemm).unwrap();
    let made = CELLS[di * 3 + pi].get_or_init(|| {
        let opts = CudaOptions {
            gemm,
            poison: true,
            sync_each_op: true,
            ..CudaOptions::new(dtype)
        };
        CudaBackend::with_options(0, opts).map_err(|e| e.to_string())
    });
    match made {
        Ok(b) => Some(b),
        Err(e) if env_is("SETAR_REQUIRE_CUDA") => {
            panic!("SETAR_REQUIRE_CUDA=1 but no CUDA backend ({dtype}, {gemm:?}): {e}")
        }
        Err(e) => {
            skip(&format!("no CUDA device: {e}"));
            None
        }
    }
}

/// Prints `SKIP: <test>: <why>` straight to stderr: libtest captures `eprintln!` of passing
/// tests, but not writes to the stderr handle, so the skip shows in every run.
fn skip(why: &str) {
    use std::io::Write;
    let test = std::thread::current()
        .name()
        .unwrap_or("?")
        .rsplit("::")
        .next()
        .unwrap_or("?")
        .to_string();
    let _ = writeln!(std::io::stderr(), "SKIP: {test}: {why}");
}

/// A small PCG-style generator; the seed comes from SETAR_TEST_SEED or the clock.
struct Rng(u64);

impl Rng {
    fn new(test: &str) -> Rng {
        let seed = std::env::var("SETAR_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        println!("{test}: SETAR_TEST_SEED={seed}");
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let x = self.0;
        (x ^ (x >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd) ^ (x >> 29)
    }

    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }

    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// What the device stores for `v` in `dtype` (round to nearest even), back in f32.
fn stored(dtype: DType, v: &[f32]) -> Vec<f32> {
    match dtype {
        DType::F32 => v.to_vec(),
        DType::BF16 => v
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect(),
        DType::F16 => v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
    }
}

/// Tolerance on ‖Δ‖/‖ref‖ for one op against its CPU twin fed the same (rounded) inputs:
/// f32 leaves only summation order and libm differences; bf16/f16 add one output rounding.
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2e-5,
        DType::BF16 => 8e-3,
        DType::F16 => 2e-3,
    }
}

fn check(what: &str, dtype: DType, got: &[f32], want: &[f32], tolerance: f64) {
    assert_eq!(got.len(), want.len(), "{what} ({dtype}): length");
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        panic!(
            "{what} ({dtype}): element {i} is {} (unwritten or overflowed)",
            got[i]
        );
    }
    let err = rel_err(got, want);
    println!("{what:<48} {dtype:>4}: ‖Δ‖/‖ref‖ = {err:.2e}");
    assert!(
        err <= tolerance,
        "{what} ({dtype}): relative error {err:.3e} > {tolerance:.1e}"
    );
}

fn up(b: &CudaBackend, v: &[f32]) -> setar_engine::backend::cuda::CudaTensor {
    b.tensor(v.to_vec()).unwrap()
}

fn w(v: Vec<f32>) -> setar_engine::weights::F32Data {
    cpu::owned(v)
}

#[test]
fn kernels_compile_for_sm90_with_nvrtc() {
    if !kernels::nvrtc_available() {
        let why = "libnvrtc.so.13 not on the loader path";
        if env_is("SETAR_REQUIRE_NVRTC") || env_is("SETAR_REQUIRE_CUDA") {
            panic!("NVRTC required but unavailable: {why}");
        }
        skip(&format!("no NVRTC: {why}"));
        return;
    }
    println!("NVRTC {:?}", kernels::nvrtc_version().unwrap());
    let compiled =
        kernels::compile_all("sm_90", &["--ptxas-options=-v"]).unwrap_or_else(|e| panic!("{e}"));
    for (unit, c) in kernels::UNITS.iter().zip(&compiled) {
        let mut entries: Vec<String> = c
            .ptx
            .lines()
            .filter_map(|l| l.split(".entry").nth(1))
            .map(|rest| rest.trim().trim_end_matches('(').trim().to_string())
            .collect();
        entries.sort();
        let mut want = unit.entries();
        want.sort();
        assert_eq!(entries, want, "kernels/{}.cu entry points", unit.name);
        assert!(
            c.cubin.as_ref().is_some_and(|b| b.len() > 64),
            "{}: no CUBIN",
            unit.name
        );
        println!("== kernels/{}.cu\n{}", unit.name, c.log);
        assert!(
            !c.log.contains("warning"),
            "kernels/{}.cu: warnings:\n{}",
            unit.name,
            c.log
        );
        for line in c.log.lines().filter(|l| l.contains("spill")) {
            assert!(
                line.contains("0 bytes spill stores, 0 bytes spill loads"),
                "kernels/{}.cu spills: {line}",
                unit.name
            );
        }
    }
}

#[test]
fn prebuilt_fatbins_cover_every_kernel_file() {
    if !kernels::has_prebuilt() {
        skip("built without nvcc: the kernels compile with NVRTC at run time");
        return;
    }
    for unit in kernels::UNITS {
        assert!(
            kernels::prebuilt_units().contains(&unit.name),
            "no prebuilt fatbin for kernels/{}.cu",
            unit.name
        );
    }
}

#[test]
fn a_missing_device_is_an_error_not_a_panic() {
    let err = CudaBackend::new(9999, DType::F32)
        .err()
        .expect("cuda:9999 cannot exist");
    println!("cuda:9999 → {err}");
}

#[test]
fn out_of_memory_is_an_error_and_the_backend_survives() {
    let Some(b) = backend(DType::F32, GemmPath::Auto) else {
        return;
    };
    let err = b.empty(1 << 48).expect_err("a 1 PiB allocation must fail");
    println!("1 PiB → {err}");
    let t = up(b, &[1.0, 2.0, 3.0]);
    assert_eq!(b.to_vec(&t).unwrap(), vec![1.0, 2.0, 3.0]);
}

/// Large copies go through the page-locked staging buffer (grown on demand): exact round trips
/// of growing sizes, and a small one (pageable) between them.
#[test]
fn large_copies_round_trip_exactly() {
    let Some(b) = backend(DType::F32, GemmPath::Auto) else {
        return;
    };
    let mut rng = Rng::new("staged copies");
    for n in [300_001, 1_000, 1_700_003, 400_000] {
        let v = rng.vec(n, -1e4, 1e4);
        let t = up(b, &v);
        let back = b.to_vec(&t).unwrap();
        assert!(
            back.iter().zip(&v).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{n} values: round trip differs"
        );
        let copy = b.duplicate(&t).unwrap();
        assert_eq!(b.to_vec(&copy).unwrap(), v, "{n} values: device copy");
    }
}

#[test]
fn uploads_round_like_the_half_crate() {
    let mut rng = Rng::new("round trip");
    let mut v = rng.vec(10_007, -70_000.0, 70_000.0);
    v.extend(rng.vec(1_001, -1e-6, 1e-6));
    v.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-40,
        65_520.0,
        3.0e38,
    ]);
    for dtype in DType::ALL {
        let Some(b) = backend(dtype, GemmPath::Auto) else {
            return;
        };
        let want = stored(dtype, &v);
        // Rounded on the host (the upload path), and by the `cast_from_f32` kernel.
        for (how, t) in [
            ("host", up(b, &v)),
            ("kernel", b.upload_f32_cast_on_device(&v).unwrap()),
        ] {
            let got = b.to_vec(&t).unwrap();
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g.to_bits() == e.to_bits(),
                    "{dtype} ({how}): {} stored as {g}, half gives {e} (index {i})",
                    v[i]
                );
            }
        }
        let nan = b.to_vec(&up(b, &[f32::NAN])).unwrap();
        assert!(nan[0].is_nan(), "{dtype}: NaN became {}", nan[0]);
        let nan = b
            .to_vec(&b.upload_f32_cast_on_device(&[f32::NAN]).unwrap())
            .unwrap();
        assert!(nan[0].is_nan(), "{dtype} (kernel): NaN became {}", nan[0]);
    }
}

#[test]
fn linear_matches_cpu() {
    let mut rng = Rng::new("linear");
    for (rows, out_dim, in_dim) in [(67, 45, 131), (1, 3, 7), (129, 96, 64), (5, 770, 33)] {
        let x = rng.vec(rows * in_dim, -1.0, 1.0);
        let wt = rng.vec(out_dim * in_dim, -0.5, 0.5);
        let bias = rng.vec(out_dim, -1.0, 1.0);
        for dtype in DType::ALL {
            let (xs, ws, bs) = (stored(dtype, &x), stored(dtype, &wt), stored(dtype, &bias));
            let cpu = CpuBackend::new();
            for with_bias in [true, false] {
                let bias_w = w(bs.clone());
                let want = cpu
                    .linear(
                        &xs,
                        rows,
                        &w(ws.clone()),
                        with_bias.then_some(&bias_w),
                        out_dim,
                        in_dim,
                    )
                    .unwrap();
                for path in PATHS {
                    let Some(b) = backend(dtype, path) else {
                        return;
                    };
                    let db = up(b, &bs);
                    let y = b
                        .linear(
                            &up(b, &xs),
                            rows,
                            &up(b, &ws),
                            with_bias.then_some(&db),
                            out_dim,
                            in_dim,
                        )
                        .unwrap();
                    check(
                        &format!("linear {rows}x{in_dim}→{out_dim} bias {with_bias} {path:?}"),
                        dtype,
                        &b.to_vec(&y).unwrap(),
                        &want,
                        tol(dtype),
                    );
                }
            }
        }
    }
}

/// With `gemm_tune`, each new problem times several cuBLASLt algorithms before its first real
/// run: the results still match the CPU, and an accumulating GEMM (beta = 1) adds exactly once
/// (its timing runs write a scratch buffer, not the residual stream).
#[test]
fn tuned_gemms_match_cpu() {
    let mut rng = Rng::new("tuned gemm");
    let cpu = CpuBackend::new();
    for dtype in DType::ALL {
        let Some(shared) = backend(dtype, GemmPath::Lt) else {
            return;
        };
        let opts = CudaOptions {
            gemm_tune: true,
            ..shared.options()
        };
        let b = CudaBackend::with_options(0, opts).unwrap();
        for (rows, out_dim, in_dim) in [(67, 45, 131), (300, 256, 192)] {
            let x = stored(dtype, &rng.vec(rows * in_dim, -1.0, 1.0));
            let wt = stored(dtype, &rng.vec(out_dim * in_dim, -0.5, 0.5));
            let bias = stored(dtype, &rng.vec(out_dim, -1.0, 1.0));
            let h0 = rng.vec(rows * out_dim, -3.0, 3.0);
            let bias_w = w(bias.clone());
            let y = cpu
                .linear(&x, rows, &w(wt.clone()), Some(&bias_w), out_dim, in_dim)
                .unwrap();
            let (dx, dw, db) = (up(&b, &x), up(&b, &wt), up(&b, &bias));
            let got = b
                .linear(&dx, rows, &dw, Some(&db), out_dim, in_dim)
                .unwrap();
            let what = format!("tuned linear {rows}x{in_dim}→{out_dim}");
            check(&what, dtype, &b.to_vec(&got).unwrap(), &y, tol(dtype));
            let mut want = h0.clone();
            cpu.add_assign(&mut want, &y).unwrap();
            let mut h = b.tensor_f32(&h0).unwrap();
            b.linear_add(&mut h, &dx, rows, &dw, Some(&db), out_dim, in_dim)
                .unwrap();
            let what = format!("tuned linear_add {rows}x{in_dim}→{out_dim}");
            check(&what, dtype, &b.to_vec(&h).unwrap(), &want, tol(dtype));
        }
        let records = b.gemm_tune_records();
        assert!(!records.is_empty(), "{dtype}: nothing was tuned");
        assert!(
            records.iter().any(|r| r.beta == 1.0),
            "{dtype}: no accumulating GEMM tuned"
        );
        for r in &records {
            assert!(
                r.micros[r.chosen].is_some(),
                "{dtype}: kept a failed algorithm: {r:?}"
            );
        }
        println!(
            "{dtype}: {} problems tuned, {} away from the heuristic's first",
            records.len(),
            records.iter().filter(|r| r.chosen != 0).count()
        );
    }
}

/// `cpu::layer_norm_into` in f64. With the test's common offset of 30, the f32 twin's own
/// sequential sums are off: over 300 random 3×1030 draws its relative error against this was
/// 9.4e-6 (median) to 2.6e-5 (worst), above the f32 tolerance of 2e-5 (the H200's check
/// failed once so, at 2.15e-5, in run 5b). The kernel is held to the exact values instead.
fn layer_norm_f64(x: &[f32], dim: usize, gamma: &[f32], beta: &[f32], eps: f64) -> Vec<f32> {
    x.chunks(dim)
        .flat_map(|row| {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
            let inv = 1.0 / (var + eps).sqrt();
            row.iter()
                .zip(gamma.iter().zip(beta))
                .map(move |(&v, (&g, &b))| ((v as f64 - mean) * inv * g as f64 + b as f64) as f32)
        })
        .collect()
}

#[test]
fn layer_norm_matches_cpu() {
    let mut rng = Rng::new("layer norm");
    // The plain loop (193, 1030: wider than the registers hold, 31) and the 4-value loads
    // (768; 20: lanes past the row's end; 1024: every register chunk).
    for (rows, dim) in [(37, 193), (3, 1030), (1, 31), (70, 768), (5, 20), (9, 1024)] {
        // A large common offset checks the two-pass variance.
        let x: Vec<f32> = rng
            .vec(rows * dim, -2.0, 2.0)
            .iter()
            .map(|v| v + 30.0)
            .collect();
        let gamma = rng.vec(dim, 0.5, 1.5);
        let beta = rng.vec(dim, -0.5, 0.5);
        for dtype in DType::ALL {
            let Some(b) = backend(dtype, GemmPath::Auto) else {
                return;
            };
            let (xs, gs, bs) = (
                stored(dtype, &x),
                stored(dtype, &gamma),
                stored(dtype, &beta),
            );
            let want = layer_norm_f64(&xs, dim, &gs, &bs, 1e-5);
            let y = b
                .layer_norm(&up(b, &xs), dim, &up(b, &gs), &up(b, &bs), 1e-5)
                .unwrap();
            check(
                &format!("layer_norm {rows}x{dim}"),
                dtype,
                &b.to_vec(&y).unwrap(),
                &want,
                tol(dtype),
            );
        }
    }
}

#[test]
fn activations_match_cpu() {
    let mut rng = Rng::new("activations");
    let all = rng.vec(100_003, -6.0, 6.0);
    // The short cases from [-3, 3]: GELU of x below about -5.4 is under f16's smallest
    // subnormal, so a lone such value rounds to 0 on the device (rightly) against a nonzero
    // f32 reference, a relative error of 1 (seen on the H200 with x = -5.92). The long case
    // keeps the tails.
    let short = rng.vec(7, -3.0, 3.0);
    // Fewer values than one 16-byte load, a partial load, and many loads plus a tail.
    for x in [&short[..1], &short[..], &all[..]] {
        for act in [
            Activation::QuickGelu,
            Activation::Gelu,
            Activation::GeluTanh,
        ] {
            for dtype in DType::ALL {
                let Some(b) = backend(dtype, GemmPath::Auto) else {
                    return;
                };
                let xs = stored(dtype, x);
                let mut want = xs.clone();
                fastmath::activate(&mut want, act);
                let mut t = up(b, &xs);
                b.activate(&mut t, act).unwrap();
                check(
                    &format!("activate {act:?} n={}", x.len()),
                    dtype,
                    &b.to_vec(&t).unwrap(),
                    &want,
                    tol(dtype),
                );
            }
        }
    }
}

#[test]
fn add_assign_matches_cpu() {
    let mut rng = Rng::new("add_assign");
    let (x, y) = (rng.vec(77_777, -3.0, 3.0), rng.vec(77_777, -3.0, 3.0));
    for dtype in DType::ALL {
        let Some(b) = backend(dtype, GemmPath::Auto) else {
            return;
        };
        let (xs, ys) = (stored(dtype, &x), stored(dtype, &y));
        let want: Vec<f32> = xs.iter().zip(&ys).map(|(a, c)| a + c).collect();
        let mut t = up(b, &xs);
        b.add_assign(&mut t, &up(b, &ys)).unwrap();
        check(
            "add_assign n=77777",
            dtype,
            &b.to_vec(&t).unwrap(),
            &want,
            tol(dtype),
        );
        assert!(b.add_assign(&mut t, &up(b, &[1.0])).is_err());
    }
}

/// `h += x·wᵀ + bias` (the residual-fused Linear) against the CPU's Linear then add, for an
/// f32 stream and a storage-dtype stream, on every GEMM path, fused and separate; and the
/// fused form must really run in one cuBLASLt call where cuBLASLt is asked for.
#[test]
fn linear_add_matches_cpu() {
    let mut rng = Rng::new("linear_add");
    let cases: Vec<_> = [(67, 45, 131), (1, 3, 7), (197, 96, 64), (5, 770, 33)]
        .into_iter()
        .map(|(rows, out_dim, in_dim)| {
            let x = rng.vec(rows * in_dim, -1.0, 1.0);
            let wt = rng.vec(out_dim * in_dim, -0.5, 0.5);
            let bias = rng.vec(out_dim, -1.0, 1.0);
            let h0 = rng.vec(rows * out_dim, -3.0, 3.0);
            ((rows, out_dim, in_dim), x, wt, bias, h0)
        })
        .collect();
    let cpu = CpuBackend::new();
    for dtype in DType::ALL {
        for path in PATHS {
            let Some(shared) = backend(dtype, path) else {
                return;
            };
            for fused in [true, false] {
                let opts = CudaOptions {
                    fused_residual: fused,
                    profile: true,
                    ..shared.options()
                };
                let b = CudaBackend::with_options(0, opts).unwrap();
                for ((rows, out_dim, in_dim), x, wt, bias, h0) in &cases {
                    let (rows, out_dim, in_dim) = (*rows, *out_dim, *in_dim);
                    let (xs, ws, bs) = (stored(dtype, x), stored(dtype, wt), stored(dtype, bias));
                    for (wide, with_bias) in
                        [(false, false), (false, true), (true, false), (true, true)]
                    {
                        let hs = if wide { h0.clone() } else { stored(dtype, h0) };
                        let bias_w = w(bs.clone());
                        let y = cpu
                            .linear(
                                &xs,
                                rows,
                                &w(ws.clone()),
                                with_bias.then_some(&bias_w),
                                out_dim,
                                in_dim,
                            )
                            .unwrap();
                        let mut want = hs.clone();
                        cpu.add_assign(&mut want, &y).unwrap();
                        let db = up(&b, &bs);
                        // Twice with the same bias: the first use widens it, the second reuses.
                        for call in 0..2 {
                            let mut h = if wide {
                                b.tensor_f32(&hs).unwrap()
                            } else {
                                up(&b, &hs)
                            };
                            b.reset_profile();
                            b.linear_add(
                                &mut h,
                                &up(&b, &xs),
                                rows,
                                &up(&b, &ws),
                                with_bias.then_some(&db),
                                out_dim,
                                in_dim,
                            )
                            .unwrap();
                            let what = format!(
                                "linear_add {rows}x{in_dim}→{out_dim} bias {with_bias} wide {wide} {path:?} fused {fused} call {call}"
                            );
                            check(&what, dtype, &b.to_vec(&h).unwrap(), &want, tol(dtype));
                            let ran: Vec<_> = b.profile().iter().map(|p| p.0).collect();
                            if fused && path == GemmPath::Lt {
                                assert!(
                                    ran.contains(&"linear+residual")
                                        && !ran.contains(&"residual add"),
                                    "{what} ({dtype}): cuBLASLt did not fuse the add (ops {ran:?})"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

fn masks(batch: usize, seq: usize, rng: &mut Rng) -> Vec<(&'static str, AttentionMask)> {
    // Lengths include 0, 1 and the full sequence.
    let lengths: Vec<usize> = (0..batch)
        .map(|i| match i {
            0 => seq,
            1 => 0,
            2 => 1,
            _ => rng.below(seq + 3),
        })
        .collect();
    vec![
        ("none", AttentionMask::default()),
        (
            "causal",
            AttentionMask {
                causal: true,
                lengths: None,
            },
        ),
        (
            "padding",
            AttentionMask {
                causal: false,
                lengths: Some(lengths.clone()),
            },
        ),
        (
            "causal+padding",
            AttentionMask {
                causal: true,
                lengths: Some(lengths),
            },
        ),
    ]
}

#[test]
fn softmax_matches_cpu_with_masks() {
    let mut rng = Rng::new("softmax");
    let (batch, heads, queries, seq, ld) = (4, 3, 5, 37, 40);
    let scores = rng.vec(batch * heads * queries * ld, -8.0, 8.0);
    for (name, mask) in masks(batch, seq, &mut rng) {
        let mut want = Vec::new();
        for (r, row) in scores.chunks(ld).enumerate() {
            let b = r / (heads * queries);
            let i = r % queries;
            let len = mask.lengths.as_ref().map_or(seq, |l| l[b].min(seq));
            let n = cpu::visible_keys(i, len, mask.causal);
            let mut p = row[..seq].to_vec();
            fastmath::softmax(&mut p[..n]);
            p[n..].iter_mut().for_each(|x| *x = 0.0);
            want.extend(p);
        }
        for dtype in DType::ALL {
            let Some(b) = backend(dtype, GemmPath::Auto) else {
                return;
            };
            let got = b
                .masked_softmax(&scores, batch, heads, queries, seq, ld, &mask)
                .unwrap();
            check(
                &format!("softmax mask {name}"),
                dtype,
                &got,
                &want,
                tol(dtype),
            );
        }
    }
}

/// The unfused attention (scores GEMM, softmax kernel, P·V GEMM), which also serves every
/// head_dim the fused kernel does not, against the CPU.
#[test]
fn attention_matches_cpu() {
    let mut rng = Rng::new("attention");
    let mut unfused = Vec::new();
    for dtype in DType::ALL {
        let Some(shared) = backend(dtype, GemmPath::Auto) else {
            return;
        };
        let opts = CudaOptions {
            attention: AttentionPath::Unfused,
            ..shared.options()
        };
        unfused.push((dtype, CudaBackend::with_options(0, opts).unwrap()));
    }
    let shapes = [
        (3, 13, 13, 3, 7),
        (5, 9, 9, 2, 16),
        (2, 197, 1, 2, 64),
        (2, 50, 50, 1, 64),
    ];
    for (batch, seq, queries, heads, head_dim) in shapes {
        let shape = AttentionShape {
            batch,
            seq,
            queries,
            heads,
            head_dim,
        };
        let wd = shape.width();
        let q = rng.vec(batch * queries * wd, -1.5, 1.5);
        let k = rng.vec(batch * seq * wd, -1.5, 1.5);
        let v = rng.vec(batch * seq * wd, -1.0, 1.0);
        for (name, mask) in masks(batch, seq, &mut rng) {
            for (dtype, b) in &unfused {
                let (dtype, b) = (*dtype, b);
                let (qs, ks, vs) = (stored(dtype, &q), stored(dtype, &k), stored(dtype, &v));
                let want = CpuBackend::new()
                    .attention(&qs, &ks, &vs, shape, &mask)
                    .unwrap();
                let got = b
                    .attention(&up(b, &qs), &up(b, &ks), &up(b, &vs), shape, &mask)
                    .unwrap();
                // A sequence of length 0 gives exact zeros on both sides.
                check(
                    &format!("attention {batch}x{seq} q{queries} h{heads}x{head_dim} {name}"),
                    dtype,
                    &b.to_vec(&got).unwrap(),
                    &want,
                    // The probabilities are rounded to the storage dtype before P·V.
                    2.0 * tol(dtype),
                );
            }
        }
    }
}

/// By default (`AttentionPath::Auto`) a bf16 / f16 backend runs the fused attention kernel:
/// it must pass the start-up self-check on this device (else the fallback is reported here).
#[test]
fn auto_attention_uses_the_fused_kernel() {
    for dtype in [DType::BF16, DType::F16] {
        let Some(shared) = backend(dtype, GemmPath::Auto) else {
            return;
        };
        let b = CudaBackend::with_options(
            0,
            CudaOptions {
                attention: AttentionPath::Auto,
                ..shared.options()
            },
        )
        .unwrap();
        assert!(
            b.uses_fused_attention(),
            "{dtype}: {}",
            b.attention_note().unwrap_or("fused attention off")
        );
    }
    if let Some(b) = backend(DType::F32, GemmPath::Auto) {
        assert!(!b.uses_fused_attention(), "f32 has no fused attention");
    }
}

/// The fused tensor-core attention (kernels/attention.cu, bf16 / f16, head_dim 64) against
/// the CPU on CLIP's shapes (197 and 257 tokens: 4 and 5 key tiles through the two
/// shared-memory stages; the class token alone; 77 text tokens), whole tiles, awkward sizes,
/// and every mask, with 4 and with 8 warps a block.
#[test]
fn fused_attention_matches_cpu() {
    let mut rng = Rng::new("fused attention");
    let shapes = [
        (3, 197, 197, 2, 64),
        (2, 197, 1, 3, 64),
        (1, 257, 257, 2, 64),
        (2, 128, 128, 1, 64),
        (4, 77, 77, 2, 64),
        (2, 50, 50, 1, 64),
        (1, 130, 70, 1, 64),
        (3, 9, 9, 2, 64),
        // More sequences than a grid axis holds (65535): launched in slices.
        (65_537, 3, 3, 1, 64),
    ];
    for (dtype, warps) in [DType::BF16, DType::F16]
        .into_iter()
        .flat_map(|d| [(d, 4), (d, 8)])
    {
        if backend(dtype, GemmPath::Auto).is_none() {
            return;
        }
        let opts = CudaOptions {
            poison: true,
            sync_each_op: true,
            attention: AttentionPath::Fused,
            attention_warps: warps,
            ..CudaOptions::new(dtype)
        };
        let b = CudaBackend::with_options(0, opts).unwrap();
        for (batch, seq, queries, heads, head_dim) in shapes {
            let shape = AttentionShape {
                batch,
                seq,
                queries,
                heads,
                head_dim,
            };
            let wd = shape.width();
            let q = stored(dtype, &rng.vec(batch * queries * wd, -1.5, 1.5));
            let k = stored(dtype, &rng.vec(batch * seq * wd, -1.5, 1.5));
            let v = stored(dtype, &rng.vec(batch * seq * wd, -1.0, 1.0));
            for (name, mask) in masks(batch, seq, &mut rng) {
                let want = CpuBackend::new()
                    .attention(&q, &k, &v, shape, &mask)
                    .unwrap();
                let got = b
                    .attention(&up(&b, &q), &up(&b, &k), &up(&b, &v), shape, &mask)
                    .unwrap();
                let got = b.to_vec(&got).unwrap();
                let what =
                    format!("fused attention/{warps} {batch}x{seq} q{queries} h{heads} {name}");
                // The probabilities are rounded to the storage dtype before P·V.
                check(&what, dtype, &got, &want, 2.0 * tol(dtype));
                // Past a grid axis, the later slices on their own (a whole-tensor error
                // would hide two wrong sequences among 65537).
                let tail = 65_535.min(batch) * queries * wd;
                if tail < got.len() {
                    let what = format!("{what}, sequences from 65535");
                    check(&what, dtype, &got[tail..], &want[tail..], 2.0 * tol(dtype));
                }
            }
        }
    }
}

#[test]
fn patchify_and_vision_tokens_match_cpu() {
    let mut rng = Rng::new("patchify");
    let (batch, channels, size, patch, dim) = (2, 3, 37, 8, 19);
    let grid = size / patch;
    let px = rng.vec(batch * channels * size * size, -2.0, 2.0);
    let cls = rng.vec(dim, -1.0, 1.0);
    let pos = rng.vec((grid * grid + 1) * dim, -1.0, 1.0);
    let emb = rng.vec(batch * grid * grid * dim, -1.0, 1.0);
    let cpu = CpuBackend::new();
    for dtype in DType::ALL {
        let Some(b) = backend(dtype, GemmPath::Auto) else {
            return;
        };
        let pxs = stored(dtype, &px);
        let want = cpu.patchify(&pxs, batch, channels, size, patch).unwrap();
        let got = b
            .patchify(&up(b, &pxs), batch, channels, size, patch)
            .unwrap();
        check(
            "patchify 2x3x37x37 / 8",
            dtype,
            &b.to_vec(&got).unwrap(),
            &want,
            0.0,
        );
        let (es, cs, ps) = (
            stored(dtype, &emb),
            stored(dtype, &cls),
            stored(dtype, &pos),
        );
        let want = cpu
            .vision_tokens(&es, batch, &w(cs.clone()), &w(ps.clone()), dim)
            .unwrap();
        let got = b
            .vision_tokens(&up(b, &es), batch, &up(b, &cs), &up(b, &ps), dim)
            .unwrap();
        check(
            "vision_tokens",
            dtype,
            &b.to_vec(&got).unwrap(),
            &want,
            tol(dtype),
        );
        assert!(b.patchify(&up(b, &pxs), batch, channels, size, 0).is_err());
    }
}

#[test]
fn text_tokens_and_gather_rows_match_cpu() {
    let mut rng = Rng::new("text tokens");
    let (vocab, dim, seq, batch) = (1013, 37, 11, 3);
    let table = rng.vec(vocab * dim, -1.0, 1.0);
    let pos = rng.vec(13 * dim, -1.0, 1.0);
    let ids: Vec<u32> = (0..batch * seq).map(|_| rng.below(vocab) as u32).collect();
    let rows: Vec<usize> = (0..29).map(|_| rng.below(batch * seq)).collect();
    let cpu = CpuBackend::new();
    for dtype in DType::ALL {
        let Some(b) = backend(dtype, GemmPath::Auto) else {
            return;
        };
        let (ts, ps) = (stored(dtype, &table), stored(dtype, &pos));
        let (tw, pw) = (w(ts.clone()), w(ps.clone()));
        let (tt, pt) = (up(b, &ts), up(b, &ps));
        let want = cpu.text_tokens(&ids, seq, &tw, &pw, dim).unwrap();
        let got = b.text_tokens(&ids, seq, &tt, &pt, dim).unwrap();
        check(
            "text_tokens",
            dtype,
            &b.to_vec(&got).unwrap(),
            &want,
            tol(dtype),
        );
        // Gathers copy exactly: rows of the tokens (the residual stream's dtype, f32 when
        // widened) and of a storage-dtype tensor.
        let tokens = b.to_vec(&got).unwrap();
        let want_rows = cpu.gather_rows(&tokens, dim, &rows).unwrap();
        let got_rows = b.gather_rows(&got, dim, &rows).unwrap();
        check(
            "gather_rows (tokens)",
            dtype,
            &b.to_vec(&got_rows).unwrap(),
            &want_rows,
            0.0,
        );
        let table_rows: Vec<usize> = (0..31).map(|_| rng.below(vocab)).collect();
        let want_rows = cpu.gather_rows(&ts, dim, &table_rows).unwrap();
        let got_rows = b.gather_rows(&tt, dim, &table_rows).unwrap();
        check(
            "gather_rows (storage dtype)",
            dtype,
            &b.to_vec(&got_rows).unwrap(),
            &want_rows,
            0.0,
        );
        assert!(b.text_tokens(&[vocab as u32], 1, &tt, &pt, dim).is_err());
        assert!(b.text_tokens(&ids, 14, &tt, &pt, dim).is_err());
        assert!(b.gather_rows(&got, dim, &[batch * seq]).is_err());
    }
}

/// Rows of whole 16-byte words take the warp-per-row copy (768 values in every dtype; 8 in
/// bf16 / f16 is one word, 4 in bf16 / f16 is half a word: the per-element path), 2500 rows
/// over many blocks, rows repeated.
#[test]
fn gather_rows_of_every_width_match_cpu() {
    let mut rng = Rng::new("gather widths");
    let cpu = CpuBackend::new();
    for dim in [768, 8, 4] {
        let n = 700;
        let x = rng.vec(n * dim, -1.0, 1.0);
        let rows: Vec<usize> = (0..2500).map(|_| rng.below(n)).collect();
        for dtype in DType::ALL {
            let Some(b) = backend(dtype, GemmPath::Auto) else {
                return;
            };
            let xs = stored(dtype, &x);
            let want = cpu.gather_rows(&xs, dim, &rows).unwrap();
            let got = b.gather_rows(&up(b, &xs), dim, &rows).unwrap();
            check(
                &format!("gather_rows {}x{dim}", rows.len()),
                dtype,
                &b.to_vec(&got).unwrap(),
                &want,
                0.0,
            );
        }
    }
}

/// Index arrays are cached on the device by content (`CudaBackend::indices`): more distinct
/// row sets than the cache holds, then the same sets again in reverse, must all gather right.
#[test]
fn gathers_with_recurring_row_sets_stay_correct() {
    let Some(b) = backend(DType::F32, GemmPath::Auto) else {
        return;
    };
    let mut rng = Rng::new("gather cache");
    let (n, dim) = (50, 7);
    let x = rng.vec(n * dim, -1.0, 1.0);
    let cpu = CpuBackend::new();
    let t = up(b, &x);
    let sets: Vec<Vec<usize>> = (0..40)
        .map(|i| (0..5 + i % 3).map(|j| (i * 7 + j * 3) % n).collect())
        .collect();
    for rows in sets.iter().chain(sets.iter().rev()) {
        let want = cpu.gather_rows(&x, dim, rows).unwrap();
        let got = b.to_vec(&b.gather_rows(&t, dim, rows).unwrap()).unwrap();
        assert_eq!(got, want, "rows {rows:?}");
    }
}

#[test]
fn l2_normalize_matches_cpu() {
    let mut rng = Rng::new("l2 normalise");
    let (rows, dim) = (45, 517);
    let x = rng.vec(rows * dim, -2.0, 2.0);
    for dtype in DType::ALL {
        let Some(b) = backend(dtype, GemmPath::Auto) else {
            return;
        };
        let xs = stored(dtype, &x);
        let mut want = xs.clone();
        l2_normalize_rows(&mut want, dim);
        let mut t = up(b, &xs);
        b.l2_normalize_rows(&mut t, dim).unwrap();
        check(
            "l2_normalize 45x517",
            dtype,
            &b.to_vec(&t).unwrap(),
            &want,
            tol(dtype),
        );
    }
}

#[test]
fn first_non_finite_matches_cpu() {
    let mut rng = Rng::new("first non-finite");
    for n in [1usize, 7, 1031, 300_007] {
        let x = rng.vec(n, -2.0, 2.0);
        // None; one at the end; several, the first not the first written.
        let mut cases = vec![x.clone()];
        let mut last = x.clone();
        last[n - 1] = f32::NAN;
        cases.push(last);
        if n > 4 {
            let mut many = x.clone();
            for (i, v) in [
                (n - 2, f32::NEG_INFINITY),
                (n / 3, f32::INFINITY),
                (n / 2, f32::NAN),
            ] {
                many[i] = v;
            }
            cases.push(many);
        }
        for dtype in DType::ALL {
            let Some(b) = backend(dtype, GemmPath::Auto) else {
                return;
            };
            for case in &cases {
                let xs = stored(dtype, case);
                let want = CpuBackend::new().first_non_finite(&xs).unwrap();
                let got = b.first_non_finite_index(&up(b, &xs)).unwrap();
                assert_eq!(got, want, "first_non_finite {dtype}, n = {n}");
            }
        }
    }
}

#[test]
fn lowrank_correct_matches_cpu() {
    let mut rng = Rng::new("low-rank correction");
    let (rows, kmax, out_dim) = (29, 11, 23);
    let y0 = rng.vec(rows * out_dim, -2.0, 2.0);
    let xv = rng.vec(rows * kmax, -1.0, 1.0);
    let su = rng.vec(kmax * out_dim, -1.0, 1.0);
    for dtype in DType::ALL {
        let Some(b) = backend(dtype, GemmPath::Auto) else {
            return;
        };
        let (ys, xs, ss) = (stored(dtype, &y0), stored(dtype, &xv), stored(dtype, &su));
        for rank in [0, 5, 11] {
            let want = CpuBackend::new()
                .lowrank_correct(&ys, &xs, rows, kmax, rank, &w(ss.clone()), out_dim)
                .unwrap();
            let got = b
                .lowrank_correct(
                    &up(b, &ys),
                    &up(b, &xs),
                    rows,
                    kmax,
                    rank,
                    &up(b, &ss),
                    out_dim,
                )
                .unwrap();
            check(
                &format!("lowrank_correct rank {rank}"),
                dtype,
                &b.to_vec(&got).unwrap(),
                &want,
                tol(dtype),
            );
        }
        let (yt, xt, st) = (up(b, &ys), up(b, &xs), up(b, &ss));
        assert!(b
            .lowrank_correct(&yt, &xt, rows, kmax, 12, &st, out_dim)
            .is_err());
    }
}

/// `row_stats_f32` against its CPU twin on the very same logits: `text` is the identity, so
/// the logits are `scale · x` exactly in every dtype, and the argmax and label ranks must agree
/// exactly (ties planted: copies of the label's logit before and after it); the sums within
/// f32 rounding. Then with real normalised features, where the GEMMs differ by rounding.
#[test]
fn logit_row_stats_match_cpu() {
    let mut rng = Rng::new("row stats");
    let (groups, per) = (7, 13);
    // Each of the kernel's paths: rows in registers of 8, 16 and 32 values a lane (200, 301
    // and ImageNet's 1000 classes), and streamed past 1024 classes (1030).
    for classes in [301, 200, 1000, 1030] {
        let rows = groups * per;
        let mut x = rng.vec(rows * classes, -5.0, 5.0);
        let labels: Vec<usize> = (0..groups).map(|_| rng.below(classes)).collect();
        for r in (0..rows).step_by(3) {
            let l = labels[r / per];
            let v = x[r * classes + l];
            for _ in 0..2 {
                let c = rng.below(classes);
                x[r * classes + c] = v;
            }
        }
        let eye: Vec<f32> = (0..classes * classes)
            .map(|i| if i / classes == i % classes { 1.0 } else { 0.0 })
            .collect();
        let cpu = CpuBackend::new();
        for dtype in DType::ALL {
            let Some(b) = backend(dtype, GemmPath::Auto) else {
                return;
            };
            let xs = stored(dtype, &x);
            // T = 1 (the loss's case) shares the kernel's exponentials between the two sums.
            for (rpl, labels, t) in [
                (per, labels.clone(), 0.7),
                (1, (0..rows).map(|r| labels[r / per]).collect(), 0.7),
                (per, labels.clone(), 1.0),
            ] {
                let want = cpu
                    .logit_row_stats(&xs, &eye, classes, 1.7, &labels, rpl, t)
                    .unwrap();
                let got = b
                    .logit_row_stats(&up(b, &xs), &up(b, &eye), classes, 1.7, &labels, rpl, t)
                    .unwrap();
                assert_eq!(got.len(), rows);
                for (i, (g, c)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.argmax, c.argmax,
                        "{dtype} {classes} classes, row {i}: argmax"
                    );
                    assert_eq!(
                        g.label_rank, c.label_rank,
                        "{dtype} {classes} classes, row {i}: label rank"
                    );
                }
                for (what, f) in [
                    (
                        "cross-entropy",
                        (|s: &setar_engine::backend::RowStats| s.cross_entropy) as fn(&_) -> f64,
                    ),
                    ("entropy", |s| s.entropy),
                    ("sum exp / T", |s| s.sum_exp_t),
                ] {
                    let (g, c): (Vec<f32>, Vec<f32>) = got
                        .iter()
                        .zip(&want)
                        .map(|(g, c)| (f(g) as f32, f(c) as f32))
                        .unzip();
                    check(
                        &format!("row stats {what} ({classes} classes, rows per label {rpl})"),
                        dtype,
                        &g,
                        &c,
                        1e-5,
                    );
                }
            }
            // Per image: the OOD patches' entropy sums and counts (`ood_sums_f32`), K = 40.
            let want = cpu
                .logit_ood_sums(&xs, &eye, classes, 1.7, &labels, per, 40)
                .unwrap();
            let got = b
                .logit_ood_sums(&up(b, &xs), &up(b, &eye), classes, 1.7, &labels, per, 40)
                .unwrap();
            assert_eq!(got.len(), groups);
            for (i, (g, c)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.ood_patches, c.ood_patches,
                    "{dtype} {classes} classes, image {i}: OOD patches"
                );
                assert_eq!(g.non_finite, 0, "{dtype} image {i}: non-finite rows");
            }
            let (g, c): (Vec<f32>, Vec<f32>) = got
                .iter()
                .zip(&want)
                .map(|(g, c)| (g.entropy_sum as f32, c.entropy_sum as f32))
                .unzip();
            check(
                &format!("OOD entropy sums, {classes} classes"),
                dtype,
                &g,
                &c,
                1e-5,
            );
            // Normalised features against normalised text: the GEMMs round differently, so the
            // sums are compared (ranks may flip on near-ties).
            let dim = 37;
            let mut f = rng.vec(rows * dim, -1.0, 1.0);
            let mut t = rng.vec(classes * dim, -1.0, 1.0);
            l2_normalize_rows(&mut f, dim);
            l2_normalize_rows(&mut t, dim);
            let (fs, ts) = (stored(dtype, &f), stored(dtype, &t));
            let want = cpu
                .logit_row_stats(&fs, &ts, dim, 100.0, &labels, per, 1.0)
                .unwrap();
            let got = b
                .logit_row_stats(&up(b, &fs), &up(b, &ts), dim, 100.0, &labels, per, 1.0)
                .unwrap();
            let (g, c): (Vec<f32>, Vec<f32>) = got
                .iter()
                .zip(&want)
                .map(|(g, c)| (g.cross_entropy as f32, c.cross_entropy as f32))
                .unzip();
            check(
                &format!("row stats cross-entropy, GEMM, {classes} classes"),
                dtype,
                &g,
                &c,
                tol(dtype),
            );
            assert!(b
                .logit_row_stats(&up(b, &fs), &up(b, &ts), dim, 1.0, &labels[1..], per, 1.0)
                .is_err());
        }
    }
}

/// W' = W − Σ σᵢuᵢvᵢᵀ on the device (`lowrank_weight`) against `Svd::pruned` in f64.
#[test]
fn lowrank_weight_matches_host_pruning() {
    use setar_engine::lowrank::{PruneType, Svd, Target, Tower, WeightType};
    let mut rng = Rng::new("low-rank weight");
    let (out_dim, in_dim) = (41, 27);
    let weight = rng.vec(out_dim * in_dim, -1.0, 1.0);
    let target = Target {
        tower: Tower::Visual,
        weight: WeightType::Up,
        layer: Some(0),
    };
    let svd = Svd::new(&weight, out_dim, in_dim).unwrap();
    let order = svd.removal_order(PruneType::Minor, &target);
    for dtype in DType::ALL {
        let Some(b) = backend(dtype, GemmPath::Auto) else {
            return;
        };
        let ws = stored(dtype, &weight);
        for rank in [0, 1, 9, 26] {
            let (vt, su) = svd.removed_factors(&order, rank);
            let got = b
                .lowrank_weight(&up(b, &ws), &up(b, &vt), &up(b, &su), rank, out_dim, in_dim)
                .unwrap()
                .expect("the device computes W'");
            let want = svd.pruned(&weight, &order, rank);
            check(
                &format!("lowrank_weight rank {rank}"),
                dtype,
                &b.to_vec(&got).unwrap(),
                &want,
                2.0 * tol(dtype),
            );
        }
        let (vt, su) = svd.removed_factors(&order, 3);
        assert!(b
            .lowrank_weight(&up(b, &ws), &up(b, &vt), &up(b, &su), 4, out_dim, in_dim)
            .is_err());
    }
}

/// The cuSOLVER SVDs (tall, wide and square; two of one shape share a batch, and nine of
/// another) against faer's, by every eigen path:
/// singular values, and W' for several ranks (which does not depend on signs or on the
/// basis chosen inside repeated singular values).
#[test]
fn cusolver_svds_match_faer() {
    use setar_engine::lowrank::{PruneType, Svd, Target, Tower, WeightType};
    let Some(b) = backend(DType::F32, GemmPath::Auto) else {
        return;
    };
    let mut rng = Rng::new("svd");
    let mut shapes = vec![(67, 23), (23, 67), (67, 23), (31, 31), (300, 77)];
    shapes.extend([(45, 19); 9]);
    let mats: Vec<Vec<f32>> = shapes
        .iter()
        .map(|&(o, i)| rng.vec(o * i, -1.0, 1.0))
        .collect();
    let args: Vec<(&[f32], usize, usize)> = mats
        .iter()
        .zip(&shapes)
        .map(|(m, &(o, i))| (m.as_slice(), o, i))
        .collect();
    let target = Target {
        tower: Tower::Text,
        weight: WeightType::Down,
        layer: Some(1),
    };
    for eig in [EigPath::Sequential, EigPath::Batched] {
        let b = CudaBackend::with_options(0, CudaOptions { eig, ..b.options() }).unwrap();
        let got = b.thin_svds(&args).unwrap();
        for ((m, &(o, i)), g) in mats.iter().zip(&shapes).zip(&got) {
            let want = Svd::new(m, o, i).unwrap();
            assert_eq!((g.out_dim, g.in_dim, g.k()), (o, i, o.min(i)));
            let (gs, ws): (Vec<f32>, Vec<f32>) =
                g.s.iter()
                    .zip(&want.s)
                    .map(|(a, b)| (*a as f32, *b as f32))
                    .unzip();
            check(
                &format!("{eig:?}: singular values {o}x{i}"),
                DType::F32,
                &gs,
                &ws,
                1e-7,
            );
            for prune in [PruneType::Minor, PruneType::Principal] {
                for r in [1, o.min(i) / 3, o.min(i) - 1] {
                    let a = g.pruned(m, &g.removal_order(prune, &target), r);
                    let w = want.pruned(m, &want.removal_order(prune, &target), r);
                    check(
                        &format!("{eig:?}: W' {o}x{i} {prune:?} rank {r}"),
                        DType::F32,
                        &a,
                        &w,
                        1e-6,
                    );
                }
            }
        }
        assert!(b.thin_svds(&[(&mats[0][1..], 67, 23)]).is_err());
    }
}

/// HF transformers' own bf16 run against its float64 run on the fixture's inputs
/// (`<key>_hfbf16` against `<key>`, written by tests/fixtures/make_model_fixtures.py), or None
/// where the fixture lacks either.
fn hf_bf16_err(expected: &WeightsFile, key: &str) -> Option<f64> {
    let bf16 = format!("{key}_hfbf16");
    if expected.shape(key).is_err() || expected.shape(&bf16).is_err() {
        return None;
    }
    Some(rel_err(
        &tensor(expected, &bf16).0,
        &tensor(expected, key).0,
    ))
}

/// Whole-model parity, CUDA vs CPU: image, local and text embeddings and logits. In bf16, where
/// the fixture supplied the inputs and carries HF's own bf16 outputs, HF bf16's error against
/// HF float64 is printed beside ours (for scale; not asserted).
fn model_parity(dir: &std::path::Path, dtype: DType) -> Option<f64> {
    let b = backend(dtype, GemmPath::Auto)?;
    let weights = WeightsFile::open(dir).unwrap();
    let config = ClipConfig::for_weights(&weights).unwrap();
    let opts = b.options();
    let gpu = Clip::load(
        CudaBackend::with_options(0, opts).unwrap(),
        &weights,
        &config,
    )
    .unwrap();
    let cpu = Clip::load(CpuBackend::new(), &weights, &config).unwrap();
    let vc = &config.vision;
    let expected = WeightsFile::open(&dir.join("expected.safetensors")).ok();
    let has = |k: &str| expected.as_ref().is_some_and(|e| e.shape(k).is_ok());
    let mut rng = Rng::new("model parity");
    let fixture_pixels = has("pixel_values");
    let (pixels, n) = if fixture_pixels {
        let (p, s) = tensor(expected.as_ref().unwrap(), "pixel_values");
        (p, s[0])
    } else {
        (
            rng.vec(3 * vc.channels * vc.image_size * vc.image_size, -2.0, 2.0),
            3,
        )
    };
    let fixture_ids = has("input_ids") && has("attention_mask");
    let (ids, lengths, seq): (Vec<u32>, Vec<usize>, usize) = if fixture_ids {
        let e = expected.as_ref().unwrap();
        let (ids_f, shape) = tensor(e, "input_ids");
        let (mask, _) = tensor(e, "attention_mask");
        let seq = shape[1];
        let lengths = mask
            .chunks(seq)
            .map(|r| r.iter().filter(|&&m| m > 0.0).count())
            .collect();
        (ids_f.iter().map(|&x| x as u32).collect(), lengths, seq)
    } else {
        let seq = 9.min(config.text.context_length);
        // Ended by EOS (or the largest id when EOS is outside the vocabulary).
        let vocab = config.text.vocab_size as u32;
        let top = (config.text.eos_token_id as u32).min(vocab - 1);
        let lengths: Vec<usize> = vec![seq, 4, 2];
        let ids = lengths
            .iter()
            .flat_map(|&l| {
                (0..seq).map(move |j| match j {
                    j if j + 1 == l => top,
                    j if j >= l || top < 2 => 0,
                    j => 1 + (j as u32 * 37 + 11) % (top - 1),
                })
            })
            .collect();
        (ids, lengths, seq)
    };
    let ci = cpu.encode_images(&pixels, n, true).unwrap();
    let gi = gpu.encode_images(&pixels, n, true).unwrap();
    let ct = cpu.encode_text(&ids, &lengths, seq).unwrap();
    let gt = gpu.encode_text(&ids, &lengths, seq).unwrap();
    let p = config.projection_dim;
    // (our name, the fixture's key, whether the fixture supplied this quantity's inputs, …)
    let pairs = [
        (
            "image_embeds",
            "image_embeds",
            fixture_pixels,
            gi.embeds.clone(),
            ci.embeds.clone(),
        ),
        (
            "image_local_embeds",
            "image_local_embeds",
            fixture_pixels,
            gi.local.clone().unwrap(),
            ci.local.clone().unwrap(),
        ),
        (
            "text_embeds",
            "text_embeds",
            fixture_ids,
            gt.clone(),
            ct.clone(),
        ),
        (
            "logits",
            "logits_per_image",
            fixture_pixels && fixture_ids,
            logits(&gi.embeds, &gt, p, gpu.logit_scale),
            logits(&ci.embeds, &ct, p, cpu.logit_scale),
        ),
    ];
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let mut worst = 0.0f64;
    for (key, fixture_key, same_inputs, got, want) in pairs {
        assert!(
            got.iter().all(|x| x.is_finite()),
            "{name} {key} {dtype}: non-finite"
        );
        let err = rel_err(&got, &want);
        let hf = match &expected {
            Some(e) if dtype == DType::BF16 && same_inputs => hf_bf16_err(e, fixture_key),
            _ => None,
        }
        .map(|e| format!(" (HF bf16 vs f64: {e:.2e})"))
        .unwrap_or_default();
        println!("{name:>22} {key:<20} {dtype:>4} CUDA vs CPU {err:.2e}{hf}");
        worst = worst.max(err);
    }
    Some(worst)
}

fn model_dirs() -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(fixtures().join("models"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("model.safetensors").is_file())
        .collect();
    dirs.sort();
    dirs.push(common::tiny_model());
    dirs
}

#[test]
fn models_match_cpu_f32() {
    for dir in model_dirs() {
        let Some(err) = model_parity(&dir, DType::F32) else {
            return;
        };
        assert!(
            err <= 1e-4,
            "{}: f32 CUDA vs CPU {err:.3e} > 1e-4",
            dir.display()
        );
    }
}

#[test]
fn models_match_cpu_bf16_and_f16() {
    for dtype in [DType::BF16, DType::F16] {
        for dir in model_dirs() {
            let Some(err) = model_parity(&dir, dtype) else {
                return;
            };
            assert!(
                err <= 1e-2,
                "{}: {dtype} CUDA vs CPU f32 {err:.3e} > 1e-2",
                dir.display()
            );
        }
    }
}

/// The reference search fixtures on CUDA f32: the same decision at every step and the same
/// final settings as the reference (and so as the CPU, which tests/search.rs holds to it),
/// candidates within 1e-4 of the reference's objective (f32 GEMMs, other summation orders).
#[test]
fn search_fixtures_take_the_reference_decisions_f32() {
    use common::search_fixture::{check_against_reference, load, run_with, run_with_svds, NAMES};
    let Some(b) = backend(DType::F32, GemmPath::Auto) else {
        return;
    };
    for name in NAMES {
        let f = load(name, CudaBackend::with_options(0, b.options()).unwrap());
        // The SVDs every way: cuSOLVER up front (the default), faer on host threads beside the
        // search, the first by cuSOLVER with the rest on host threads, and the first by
        // cuSOLVER with the rest by cuSOLVER on a second stream.
        for (schedule, how) in [
            (SvdSchedule::UpFront, "cuSOLVER SVDs"),
            (SvdSchedule::Background, "host SVDs"),
            (SvdSchedule::FirstThenBackground, "hybrid SVDs"),
            (SvdSchedule::SideStream, "side-stream SVDs"),
        ] {
            let ours = run_with_svds(&f, false, Some(schedule));
            let worst = check_against_reference(name, &f.json, &ours, 1e-4);
            println!(
                "search {name:<26} f32 CUDA, {how}: same decisions, worst candidate error {worst:.2e}"
            );
        }
        // Text candidates one after another instead of stacked in one batch (the default).
        let ours = run_with(&f, &f.cfg, |e| e.set_text_stacking(false));
        let worst = check_against_reference(name, &f.json, &ours, 1e-4);
        println!(
            "search {name:<26} f32 CUDA, text candidates unstacked: same decisions, worst candidate error {worst:.2e}"
        );
    }
}

/// The same fixtures in bf16 and f16: how often the decisions agree with the reference's
/// (reported, as the issue asks; low precision can flip close calls, so not asserted).
#[test]
fn search_fixtures_agreement_in_bf16_and_f16() {
    use common::search_fixture::{load, run, NAMES};
    for dtype in [DType::BF16, DType::F16] {
        let Some(b) = backend(dtype, GemmPath::Auto) else {
            return;
        };
        let (mut same, mut total) = (0, 0);
        for name in NAMES {
            let f = load(name, CudaBackend::with_options(0, b.options()).unwrap());
            let ours = run(&f, false);
            let want = f.json["steps"].as_array().unwrap();
            let agree = ours
                .steps
                .iter()
                .zip(want)
                .filter(|(s, w)| serde_json::to_value(s.chosen).unwrap() == w["chosen"])
                .count();
            println!(
                "search {name:<26} {dtype:>4} CUDA: {agree}/{} decisions as the reference",
                want.len()
            );
            same += agree;
            total += want.len();
        }
        println!(
            "search fixtures {dtype:>4} CUDA: {same}/{total} decisions agree with the reference"
        );
    }
}
