//! The search's SVDs on host threads, while the search runs.
//!
//! On a device backend the host mostly waits while the device evaluates candidates, so the
//! plan's SVDs (faer in f64, exactly [`Svd::new`], the CPU's own) are handed to a thread pool
//! of their own at the start, in plan order, and each step waits only for its own target's.
//! The pool is not rayon's global one: the search's own parallel loops on the host (rounding
//! pixels, assembling results) would otherwise queue behind SVDs of a few hundred ms each.
//!
//! Or ([`BackgroundSvds::start_side`]) one thread hands them to a [`SideSolver`], a run of
//! equal shapes at a time: a device's solver on a second stream, so the device computes them
//! beside the search while the host's cores stay free.

use crate::backend::SideSolver;
use crate::error::{Error, Result};
use crate::lowrank::{Svd, Target};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A finished SVD and the weight it was computed from (handed back to the engine).
type Done = (Result<Svd>, Vec<f32>);

/// A target's weight as the search loads it: row-major `[out, in]`, with its bias.
pub struct TargetWeight {
    pub target: Target,
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub out_dim: usize,
    pub in_dim: usize,
}

#[derive(Default)]
struct Shared {
    done: Mutex<HashMap<Target, Done>>,
    ready: Condvar,
    /// Set when the search ends early: SVDs not started yet are skipped.
    cancelled: AtomicBool,
}

/// SVDs being computed in the background; [`BackgroundSvds::wait`] takes one out.
pub struct BackgroundSvds {
    shared: Arc<Shared>,
    /// Targets handed out and not taken back yet, with their biases (which stay here).
    pending: HashMap<Target, Option<Vec<f32>>>,
    /// Time the search spent waiting for results.
    waited: Duration,
    // Kept so that its threads live as long as the work (a dropped pool lets queued jobs
    // finish; the cancel flag makes those return at once). None for a side solver, whose
    // thread checks the flag between runs.
    _pool: Option<rayon::ThreadPool>,
}

impl BackgroundSvds {
    /// Starts the SVDs of `mats`, first to last, on `threads` threads (each SVD may use
    /// several of them).
    pub fn start(mats: Vec<TargetWeight>, threads: usize) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("setar-svd-{i}"))
            .build()
            .map_err(|e| Error::invalid(format!("cannot start the SVD threads: {e}")))?;
        let shared = Arc::new(Shared::default());
        let mut pending = HashMap::new();
        for m in mats {
            let TargetWeight {
                target,
                weight,
                bias,
                out_dim,
                in_dim,
            } = m;
            pending.insert(target, bias);
            let shared = shared.clone();
            // FIFO, so the plan's first targets (needed first) are done first.
            pool.spawn_fifo(move || {
                if shared.cancelled.load(Ordering::Relaxed) {
                    return;
                }
                let svd = std::panic::catch_unwind(|| Svd::new(&weight, out_dim, in_dim))
                    .unwrap_or_else(|_| {
                        Err(Error::invalid(format!("the SVD of {target} panicked")))
                    });
                let mut done = shared.done.lock().unwrap_or_else(|p| p.into_inner());
                done.insert(target, (svd, weight));
                shared.ready.notify_all();
            });
        }
        Ok(BackgroundSvds {
            shared,
            pending,
            waited: Duration::ZERO,
            _pool: Some(pool),
        })
    }

    /// Starts the SVDs of `mats` on one thread that hands each run of consecutive equal
    /// shapes, first to last, to `solver` in one call (a device batches them).
    pub fn start_side(mats: Vec<TargetWeight>, solver: SideSolver) -> Result<Self> {
        let shared = Arc::new(Shared::default());
        let mut pending = HashMap::new();
        // Runs of consecutive equal shapes: ((out, in), [(target, weight)]).
        type Run = ((usize, usize), Vec<(Target, Vec<f32>)>);
        let mut runs: Vec<Run> = Vec::new();
        for m in mats {
            pending.insert(m.target, m.bias);
            let shape = (m.out_dim, m.in_dim);
            match runs.last_mut() {
                Some((s, run)) if *s == shape => run.push((m.target, m.weight)),
                _ => runs.push((shape, vec![(m.target, m.weight)])),
            }
        }
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("setar-svd-side".into())
            .spawn(move || {
                for ((o, i), run) in runs {
                    if worker.cancelled.load(Ordering::Relaxed) {
                        return;
                    }
                    let args: Vec<(&[f32], usize, usize)> =
                        run.iter().map(|(_, w)| (w.as_slice(), o, i)).collect();
                    let svds =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| solver(&args)))
                            .unwrap_or_else(|_| Err(Error::invalid("the SVD solver panicked")))
                            .and_then(|v| match v.len() == run.len() {
                                true => Ok(v),
                                false => Err(Error::invalid(format!(
                                    "the SVD solver gave {} results for {} matrices",
                                    v.len(),
                                    run.len()
                                ))),
                            });
                    let mut done = worker.done.lock().unwrap_or_else(|p| p.into_inner());
                    match svds {
                        Ok(v) => {
                            for ((target, w), svd) in run.into_iter().zip(v) {
                                done.insert(target, (Ok(svd), w));
                            }
                        }
                        Err(e) => {
                            for (target, w) in run {
                                let e = Error::invalid(format!("the SVD of {target}: {e}"));
                                done.insert(target, (Err(e), w));
                            }
                        }
                    }
                    worker.ready.notify_all();
                }
            })
            .map_err(|e| Error::invalid(format!("cannot start the SVD thread: {e}")))?;
        Ok(BackgroundSvds {
            shared,
            pending,
            waited: Duration::ZERO,
            _pool: None,
        })
    }

    /// Threads for the background SVDs: half the cores. The other half stay free for the
    /// thread driving the device and the search's own host work. With all cores but one busy
    /// (BENCHMARKS.md, run 4b) the search's steps took 0.36 s longer in all than beside
    /// cuSOLVER's SVDs up front (6.86 s against 6.50 s; one run each, so maybe noise), and half
    /// the cores still finish the 23 SVDs after the first in about a second.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get() / 2)
            .unwrap_or(1)
            .max(1)
    }

    /// The targets started here and not taken yet.
    pub fn pending(&self) -> Vec<Target> {
        self.pending.keys().copied().collect()
    }

    /// Whether `target`'s SVD was started here and not taken yet.
    pub fn has(&self, target: Target) -> bool {
        self.pending.contains_key(&target)
    }

    /// The SVD of `target` (blocking until it is done), with its weight and bias.
    pub fn wait(&mut self, target: Target) -> Result<(Svd, TargetWeight)> {
        let Some(bias) = self.pending.remove(&target) else {
            return Err(Error::invalid(format!(
                "no background SVD was started for {target}"
            )));
        };
        let started = Instant::now();
        let mut done = self.shared.done.lock().unwrap_or_else(|p| p.into_inner());
        let (svd, weight) = loop {
            if let Some(d) = done.remove(&target) {
                break d;
            }
            done = self
                .shared
                .ready
                .wait(done)
                .unwrap_or_else(|p| p.into_inner());
        };
        drop(done);
        self.waited += started.elapsed();
        let svd = svd?;
        let (out_dim, in_dim) = (svd.out_dim, svd.in_dim);
        Ok((
            svd,
            TargetWeight {
                target,
                weight,
                bias,
                out_dim,
                in_dim,
            },
        ))
    }

    /// Seconds spent in [`BackgroundSvds::wait`].
    pub fn waited_seconds(&self) -> f64 {
        self.waited.as_secs_f64()
    }
}

impl Drop for BackgroundSvds {
    fn drop(&mut self) {
        self.shared.cancelled.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lowrank::{Tower, WeightType};

    fn target(layer: usize) -> Target {
        Target {
            tower: Tower::Visual,
            weight: WeightType::Up,
            layer: Some(layer),
        }
    }

    fn weight(o: usize, i: usize, seed: usize) -> Vec<f32> {
        (0..o * i)
            .map(|k| (((k + seed) * 2654435761) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    }

    fn target_weight(l: usize, weight: Vec<f32>, out_dim: usize, in_dim: usize) -> TargetWeight {
        TargetWeight {
            target: target(l),
            weight,
            bias: Some(vec![l as f32; out_dim]),
            out_dim,
            in_dim,
        }
    }

    #[test]
    fn background_svds_equal_the_direct_ones_in_any_order() {
        let mats: Vec<_> = (0..5)
            .map(|l| target_weight(l, weight(40 + l, 24, l), 40 + l, 24))
            .collect();
        let copies: Vec<Vec<f32>> = mats.iter().map(|m| m.weight.clone()).collect();
        let mut bg = BackgroundSvds::start(mats, 3).unwrap();
        // Taken in another order than started.
        for &l in &[3usize, 0, 4, 1, 2] {
            let (svd, w) = bg.wait(target(l)).unwrap();
            assert_eq!(w.weight, copies[l], "the weight comes back unchanged");
            assert_eq!(w.bias, Some(vec![l as f32; 40 + l]), "and its bias");
            let direct = Svd::new(&copies[l], 40 + l, 24).unwrap();
            assert_eq!(svd.s, direct.s);
            assert_eq!(svd.u, direct.u);
            assert_eq!(svd.v, direct.v);
            assert!(!bg.has(target(l)));
        }
        assert!(bg.wait(target(0)).is_err(), "taken twice");
    }

    #[test]
    fn side_solver_takes_runs_of_equal_shapes_in_order() {
        // Two shapes, the first interrupted: three runs.
        let dims = [(30, 20), (30, 20), (20, 12), (30, 20)];
        let mats: Vec<_> = dims
            .iter()
            .enumerate()
            .map(|(l, &(o, i))| target_weight(l, weight(o, i, l), o, i))
            .collect();
        let copies: Vec<Vec<f32>> = mats.iter().map(|m| m.weight.clone()).collect();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let solver: SideSolver = Box::new(move |m: &[(&[f32], usize, usize)]| {
            seen.lock().unwrap().push((m.len(), m[0].1, m[0].2));
            m.iter().map(|(w, o, i)| Svd::new(w, *o, *i)).collect()
        });
        let mut bg = BackgroundSvds::start_side(mats, solver).unwrap();
        for &l in &[2usize, 3, 0, 1] {
            let (o, i) = dims[l];
            let (svd, w) = bg.wait(target(l)).unwrap();
            assert_eq!(w.weight, copies[l]);
            assert_eq!(w.bias, Some(vec![l as f32; o]));
            assert_eq!(svd.s, Svd::new(&copies[l], o, i).unwrap().s);
        }
        assert_eq!(
            *calls.lock().unwrap(),
            vec![(2, 30, 20), (1, 20, 12), (1, 30, 20)]
        );
    }

    #[test]
    fn a_failed_side_run_is_an_error_for_its_targets_only() {
        let mats = vec![
            target_weight(0, weight(6, 4, 0), 6, 4),
            target_weight(1, weight(6, 4, 1), 6, 4),
            target_weight(2, weight(5, 3, 2), 5, 3),
        ];
        let solver: SideSolver = Box::new(|m: &[(&[f32], usize, usize)]| {
            if m[0].1 == 6 {
                Err(Error::invalid("out of device memory"))
            } else {
                m.iter().map(|(w, o, i)| Svd::new(w, *o, *i)).collect()
            }
        });
        let mut bg = BackgroundSvds::start_side(mats, solver).unwrap();
        for l in [0, 1] {
            let err = bg.wait(target(l)).err().expect("the run failed");
            assert!(err.to_string().contains("out of device memory"), "{err}");
            assert!(err.to_string().contains(&target(l).to_string()), "{err}");
        }
        assert_eq!(bg.wait(target(2)).unwrap().0.k(), 3);
    }

    #[test]
    fn a_failed_svd_is_an_error_for_its_target_only() {
        let mats = vec![
            target_weight(0, vec![0.0; 7], 3, 3),
            target_weight(1, weight(6, 4, 1), 6, 4),
        ];
        let mut bg = BackgroundSvds::start(mats, 2).unwrap();
        let err = bg.wait(target(0)).err().expect("7 values for [3, 3]");
        assert!(err.to_string().contains("7 values"), "{err}");
        assert_eq!(bg.wait(target(1)).unwrap().0.k(), 4);
    }
}
