//! GEMM tuning: cuBLASLt's heuristic ranks its algorithms by a model of the GPU, and for some
//! of our shapes (tall and narrow: 50 000 rows × 768) one it ranks lower may run faster. With
//! tuning on (`CudaOptions::gemm_tune`), each new problem times the heuristic's first
//! [`CANDIDATES`] algorithms on the device (a warm-up run, then [`REPS`] runs each) and keeps
//! the fastest. The pick is by timing, so two processes may pick different algorithms for
//! one problem, and their results may then differ in the last bits.

use super::{run_plan, Handles, Plan, PlanKey};
use crate::backend::cuda::device::Device;
use crate::error::Result;
use cudarc::cublaslt::sys as lt_sys;
use std::time::Instant;

/// Algorithms asked of the heuristic and timed per problem.
pub const CANDIDATES: usize = 8;
/// Timed runs per algorithm, after one warm-up.
const REPS: usize = 3;

/// One problem tuned: its shape and what each candidate took.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TuneRecord {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub dtype: String,
    pub out: String,
    pub bias: bool,
    pub beta: f32,
    /// Mean µs per run of each candidate, in the heuristic's order (`None`: it failed).
    pub micros: Vec<Option<f64>>,
    /// The index of the one kept (0: the heuristic's own first choice).
    pub chosen: usize,
}

/// `plan` with the fastest of `candidates` on the operands `(w, x, out)`. With beta = 0 every
/// run overwrites `out`, so the runs time in place; otherwise they would add into it, so they
/// write a scratch buffer (and keep the heuristic's choice if that cannot be allocated).
pub(super) fn fastest(
    h: &mut Handles,
    dev: &Device,
    mut plan: Plan,
    key: &PlanKey,
    candidates: &[lt_sys::cublasLtMatmulHeuristicResult_t],
    (w, x, out): (u64, u64, u64),
    beta: f32,
) -> Result<Plan> {
    let scratch = match beta == 0.0 {
        true => None,
        false => match dev.alloc((key.m * key.n) as usize, key.out) {
            Ok(b) => Some(b),
            Err(_) => return Ok(plan),
        },
    };
    let target = scratch.as_ref().map_or(out, |b| b.ptr());
    let micros = candidates
        .iter()
        .map(|c| time(h, dev, &plan, &c.algo, (w, x, target), beta))
        .collect::<Result<Vec<_>>>()?;
    let chosen = micros
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.map(|t| (i, t)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(0, |(i, _)| i);
    plan.algo = candidates[chosen].algo;
    h.tuned.push(TuneRecord {
        m: key.m,
        n: key.n,
        k: key.k,
        dtype: key.dtype.name().into(),
        out: key.out.name().into(),
        bias: key.bias,
        beta,
        micros,
        chosen,
    });
    Ok(plan)
}

/// Mean µs per run of `algo`, or `None` if cuBLASLt refuses it.
fn time(
    h: &Handles,
    dev: &Device,
    plan: &Plan,
    algo: &lt_sys::cublasLtMatmulAlgo_t,
    operands: (u64, u64, u64),
    beta: f32,
) -> Result<Option<f64>> {
    if run_plan(h, dev, plan, algo, operands, beta).is_err() {
        return Ok(None);
    }
    dev.synchronize()?;
    let t = Instant::now();
    for _ in 0..REPS {
        if run_plan(h, dev, plan, algo, operands, beta).is_err() {
            return Ok(None);
        }
    }
    dev.synchronize()?;
    Ok(Some(t.elapsed().as_secs_f64() * 1e6 / REPS as f64))
}
