//! The CPU backend: rayon across rows / sequences, GEMMs through `blas::sgemm`. These are
//! also the plain reference implementations every CUDA kernel is tested against.

use super::blas::{self, Rhs};
use super::fastmath;
use super::{AttentionMask, AttentionShape, Backend};
use crate::config::Activation;
use crate::error::{Error, Result};
use crate::weights::F32Data;
use rayon::prelude::*;
use std::sync::Arc;

#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> CpuBackend {
        CpuBackend
    }
}

/// Asks glibc to keep freed large blocks for reuse instead of returning them to the kernel.
/// The forward pass allocates and frees tens of MB per op; without this every allocation is
/// a fresh mmap whose pages fault in again (about 5% of a ViT-B/16 forward). Process-wide, so
/// the binary and the benches call it; embedders decide for themselves.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Rows per parallel GEMM task: few, large blocks keep the BLAS kernels efficient.
fn row_block(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    rows.div_ceil(threads).max(32)
}

/// `out[rows, out_dim] = x[rows, in_dim] · w[out_dim, in_dim]ᵀ (+ bias)` over rayon threads.
pub fn linear_into(
    x: &[f32],
    rows: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    out_dim: usize,
    in_dim: usize,
    out: &mut [f32],
) {
    let block = row_block(rows);
    out.par_chunks_mut(block * out_dim)
        .zip(x.par_chunks(block * in_dim))
        .for_each(|(o, xi)| {
            let m = xi.len() / in_dim;
            let beta = match bias {
                Some(b) => {
                    o.chunks_mut(out_dim).for_each(|row| row.copy_from_slice(b));
                    1.0
                }
                None => 0.0,
            };
            blas::sgemm(
                m,
                out_dim,
                in_dim,
                1.0,
                xi,
                in_dim,
                w,
                in_dim,
                Rhs::Transposed,
                beta,
                o,
                out_dim,
            );
        });
}

/// LayerNorm of each row of `x[_, dim]` into `out` (two-pass mean and variance).
pub fn layer_norm_into(
    x: &[f32],
    dim: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    out.par_chunks_mut(dim * 16)
        .zip(x.par_chunks(dim * 16))
        .for_each(|(o, xi)| {
            for (orow, xrow) in o.chunks_mut(dim).zip(xi.chunks(dim)) {
                let mean = xrow.iter().sum::<f32>() / dim as f32;
                let var = xrow.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
                let inv = 1.0 / (var + eps).sqrt();
                for i in 0..dim {
                    orow[i] = (xrow[i] - mean) * inv * gamma[i] + beta[i];
                }
            }
        });
}

/// How many leading keys query `i` of a sequence with `len` real tokens may see: both masks
/// hide a suffix of the keys, so the visible keys are always a prefix.
pub fn visible_keys(i: usize, len: usize, causal: bool) -> usize {
    if causal {
        len.min(i + 1)
    } else {
        len
    }
}

/// Attention of one sequence, all heads: k and v are `[seq, heads * head_dim]`, q and out
/// `[queries, heads * head_dim]`.
pub fn attention_one(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    len: usize,
    causal: bool,
    out: &mut [f32],
) {
    let (s, nq, hd, w) = (shape.seq, shape.queries, shape.head_dim, shape.width());
    let scale = 1.0 / (hd as f32).sqrt();
    let mut scores = vec![0.0f32; nq * s];
    for h in 0..shape.heads {
        let off = h * hd;
        blas::sgemm(
            nq,
            s,
            hd,
            scale,
            &q[off..],
            w,
            &k[off..],
            w,
            Rhs::Transposed,
            0.0,
            &mut scores,
            s,
        );
        for (i, row) in scores.chunks_mut(s).enumerate() {
            let n = visible_keys(i, len, causal);
            fastmath::softmax(&mut row[..n]);
            row[n..].iter_mut().for_each(|x| *x = 0.0);
        }
        blas::sgemm(
            nq,
            hd,
            s,
            1.0,
            &scores,
            s,
            &v[off..],
            w,
            Rhs::Plain,
            0.0,
            &mut out[off..],
            w,
        );
    }
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::invalid(format!(
            "{what}: {got} values, expected {want}"
        )));
    }
    Ok(())
}

/// The host memory available to new allocations (Linux: `MemAvailable` of /proc/meminfo),
/// if known.
fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

impl Backend for CpuBackend {
    type Tensor = Vec<f32>;
    type Weight = F32Data;

    /// A quarter of the host's available memory: a demo search's states are megabytes; a
    /// 1000-image ViT-B/16 search's 9 more are 5.4 GB, kept where the host has 22 GB free.
    fn room_for_vision_states(&self) -> Option<usize> {
        available_memory().map(|b| b / 4)
    }

    fn name(&self) -> String {
        format!(
            "cpu ({} threads, {})",
            rayon::current_num_threads(),
            blas::gemm_name()
        )
    }

    fn weight(&self, data: F32Data) -> Result<F32Data> {
        Ok(data)
    }

    fn tensor(&self, data: Vec<f32>) -> Result<Vec<f32>> {
        Ok(data)
    }

    fn to_vec(&self, t: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(t.clone())
    }

    fn duplicate(&self, t: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(t.clone())
    }

    fn linear(
        &self,
        x: &Vec<f32>,
        rows: usize,
        w: &F32Data,
        bias: Option<&F32Data>,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Vec<f32>> {
        check_len("linear input", x.len(), rows * in_dim)?;
        check_len("linear weight", w.len(), out_dim * in_dim)?;
        let mut out = vec![0.0; rows * out_dim];
        linear_into(x, rows, w, bias.map(|b| &b[..]), out_dim, in_dim, &mut out);
        Ok(out)
    }

    fn layer_norm(
        &self,
        x: &Vec<f32>,
        dim: usize,
        gamma: &F32Data,
        beta: &F32Data,
        eps: f32,
    ) -> Result<Vec<f32>> {
        let mut out = vec![0.0; x.len()];
        layer_norm_into(x, dim, gamma, beta, eps, &mut out);
        Ok(out)
    }

    fn activate(&self, x: &mut Vec<f32>, act: Activation) -> Result<()> {
        x.par_chunks_mut(1 << 14)
            .for_each(|c| fastmath::activate(c, act));
        Ok(())
    }

    fn add_assign(&self, x: &mut Vec<f32>, y: &Vec<f32>) -> Result<()> {
        check_len("residual", y.len(), x.len())?;
        x.par_chunks_mut(1 << 14)
            .zip(y.par_chunks(1 << 14))
            .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
        Ok(())
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        shape: AttentionShape,
        mask: &AttentionMask,
    ) -> Result<Vec<f32>> {
        let per_seq = shape.seq * shape.width();
        let per_q = shape.queries * shape.width();
        check_len("q", q.len(), shape.batch * per_q)?;
        check_len("k", k.len(), shape.batch * per_seq)?;
        check_len("v", v.len(), shape.batch * per_seq)?;
        if shape.queries > shape.seq {
            return Err(Error::invalid(format!(
                "{} queries for {} keys",
                shape.queries, shape.seq
            )));
        }
        if let Some(l) = &mask.lengths {
            check_len("attention lengths", l.len(), shape.batch)?;
        }
        let mut out = vec![0.0; q.len()];
        out.par_chunks_mut(per_q).enumerate().for_each(|(b, o)| {
            let len = mask
                .lengths
                .as_ref()
                .map_or(shape.seq, |l| l[b].min(shape.seq));
            let r = b * per_seq..(b + 1) * per_seq;
            attention_one(
                &q[b * per_q..(b + 1) * per_q],
                &k[r.clone()],
                &v[r],
                shape,
                len,
                mask.causal,
                o,
            );
        });
        Ok(out)
    }

    fn patchify(
        &self,
        pixels: &Vec<f32>,
        batch: usize,
        channels: usize,
        size: usize,
        patch: usize,
    ) -> Result<Vec<f32>> {
        check_len("pixels", pixels.len(), batch * channels * size * size)?;
        let grid = size / patch;
        let row = channels * patch * patch;
        let mut out = vec![0.0; batch * grid * grid * row];
        out.par_chunks_mut(grid * grid * row)
            .enumerate()
            .for_each(|(b, o)| {
                let img = &pixels[b * channels * size * size..(b + 1) * channels * size * size];
                for gy in 0..grid {
                    for gx in 0..grid {
                        let dst = &mut o[(gy * grid + gx) * row..][..row];
                        for c in 0..channels {
                            for py in 0..patch {
                                let src = c * size * size + (gy * patch + py) * size + gx * patch;
                                dst[(c * patch + py) * patch..][..patch]
                                    .copy_from_slice(&img[src..src + patch]);
                            }
                        }
                    }
                }
            });
        Ok(out)
    }

    fn vision_tokens(
        &self,
        patches: &Vec<f32>,
        batch: usize,
        class_embedding: &F32Data,
        positions: &F32Data,
        dim: usize,
    ) -> Result<Vec<f32>> {
        let tokens = positions.len() / dim;
        check_len(
            "patch embeddings",
            patches.len(),
            batch * (tokens - 1) * dim,
        )?;
        let mut out = vec![0.0; batch * tokens * dim];
        out.par_chunks_mut(tokens * dim)
            .enumerate()
            .for_each(|(b, o)| {
                o[..dim].copy_from_slice(class_embedding);
                o[dim..].copy_from_slice(
                    &patches[b * (tokens - 1) * dim..(b + 1) * (tokens - 1) * dim],
                );
                o.iter_mut()
                    .zip(positions.iter())
                    .for_each(|(x, p)| *x += p);
            });
        Ok(out)
    }

    fn text_tokens(
        &self,
        ids: &[u32],
        seq: usize,
        table: &F32Data,
        positions: &F32Data,
        dim: usize,
    ) -> Result<Vec<f32>> {
        super::check_text_tokens(ids, seq, table.len(), positions.len(), dim)?;
        let mut out = vec![0.0; ids.len() * dim];
        out.par_chunks_mut(dim).enumerate().for_each(|(r, o)| {
            let id = ids[r] as usize;
            let t = r % seq;
            for i in 0..dim {
                o[i] = table[id * dim + i] + positions[t * dim + i];
            }
        });
        Ok(out)
    }

    fn lowrank_correct(
        &self,
        y0: &Vec<f32>,
        xv: &Vec<f32>,
        rows: usize,
        kmax: usize,
        rank: usize,
        su: &F32Data,
        out_dim: usize,
    ) -> Result<Vec<f32>> {
        check_len("y0", y0.len(), rows * out_dim)?;
        check_len("x·V", xv.len(), rows * kmax)?;
        check_len("σu", su.len(), kmax * out_dim)?;
        if rank > kmax {
            return Err(Error::invalid(format!(
                "rank {rank} exceeds the {kmax} prepared components"
            )));
        }
        let mut out = y0.clone();
        if rank == 0 {
            return Ok(out);
        }
        let block = row_block(rows);
        out.par_chunks_mut(block * out_dim)
            .zip(xv.par_chunks(block * kmax))
            .for_each(|(o, x)| {
                let m = x.len() / kmax;
                blas::sgemm(
                    m,
                    out_dim,
                    rank,
                    -1.0,
                    x,
                    kmax,
                    su,
                    out_dim,
                    Rhs::Plain,
                    1.0,
                    o,
                    out_dim,
                );
            });
        Ok(out)
    }

    fn gather_rows(&self, x: &Vec<f32>, dim: usize, rows: &[usize]) -> Result<Vec<f32>> {
        let n = x.len() / dim;
        let mut out = Vec::with_capacity(rows.len() * dim);
        for &r in rows {
            if r >= n {
                return Err(Error::invalid(format!("row {r} out of {n}")));
            }
            out.extend_from_slice(&x[r * dim..(r + 1) * dim]);
        }
        Ok(out)
    }

    fn concat_rows(&self, parts: &[Vec<f32>]) -> Result<Vec<f32>> {
        Ok(parts.concat())
    }

    fn l2_normalize(&self, x: &mut Vec<f32>, dim: usize) -> Result<()> {
        crate::model::clip::l2_normalize_rows(x, dim);
        Ok(())
    }
}

/// Owned f32 data as a weight (for random models and tests).
pub fn owned(v: Vec<f32>) -> F32Data {
    F32Data::Owned(Arc::new(v))
}
