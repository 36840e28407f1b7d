//! Single-precision GEMM for the CPU backend.
//!
//! OpenBLAS is loaded at run time (libloading) when the machine has it — its AVX-512 kernels are
//! about twice as fast as the pure-Rust `gemm` crate on stable Rust — and the `gemm` crate is the
//! fallback, so the engine builds and runs everywhere. `SETAR_BLAS=off` forces the fallback,
//! `SETAR_BLAS=/path/libopenblas.so` picks a library. OpenBLAS runs single-threaded per call:
//! the callers split work across rayon threads themselves.

use std::sync::OnceLock;

type CblasSgemm = unsafe extern "C" fn(
    order: i32,
    trans_a: i32,
    trans_b: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    a: *const f32,
    lda: i32,
    b: *const f32,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
);

struct OpenBlas {
    sgemm: CblasSgemm,
    name: String,
    _lib: libloading::Library,
}

fn load_openblas() -> Option<OpenBlas> {
    let choice = std::env::var("SETAR_BLAS").unwrap_or_default();
    if choice == "off" {
        return None;
    }
    let candidates: Vec<String> = if choice.is_empty() {
        vec!["libopenblas.so.0".into(), "libopenblas.so".into()]
    } else {
        vec![choice]
    };
    for name in candidates {
        // SAFETY: loading a shared library runs its initialisers; OpenBLAS's are benign.
        let Ok(lib) = (unsafe { libloading::Library::new(&name) }) else {
            continue;
        };
        // SAFETY: the symbols have the C signatures declared above (the CBLAS interface).
        unsafe {
            let Ok(sgemm) = lib.get::<CblasSgemm>(b"cblas_sgemm\0") else {
                continue;
            };
            let sgemm = *sgemm;
            if let Ok(set_threads) =
                lib.get::<unsafe extern "C" fn(i32)>(b"openblas_set_num_threads\0")
            {
                set_threads(1);
            }
            let core = lib
                .get::<unsafe extern "C" fn() -> *const std::ffi::c_char>(
                    b"openblas_get_corename\0",
                )
                .ok()
                .map(|f| std::ffi::CStr::from_ptr(f()).to_string_lossy().into_owned())
                .unwrap_or_default();
            return Some(OpenBlas {
                sgemm,
                name: format!("OpenBLAS ({name}, {core})"),
                _lib: lib,
            });
        }
    }
    None
}

fn openblas() -> Option<&'static OpenBlas> {
    static LIB: OnceLock<Option<OpenBlas>> = OnceLock::new();
    LIB.get_or_init(load_openblas).as_ref()
}

/// Which GEMM the CPU backend uses, for reports.
pub fn gemm_name() -> String {
    match openblas() {
        Some(b) => b.name.clone(),
        None => "gemm crate (pure Rust)".into(),
    }
}

/// Layout of the right-hand matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rhs {
    /// `b` is `[n, k]` (a Linear weight): c = a·bᵀ.
    Transposed,
    /// `b` is `[k, n]`: c = a·b.
    Plain,
}

/// Row-major `c[m, n] = alpha · a[m, k] · op(b) + beta · c`, single-threaded, with leading
/// dimensions (so sub-matrices such as one attention head can be addressed in place).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    rhs: Rhs,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    sgemm_with(
        openblas(),
        m,
        n,
        k,
        alpha,
        a,
        lda,
        b,
        ldb,
        rhs,
        beta,
        c,
        ldc,
    )
}

#[allow(clippy::too_many_arguments)]
fn sgemm_with(
    blas: Option<&OpenBlas>,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    rhs: Rhs,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Bounds that make the raw-pointer calls below sound.
    assert!(a.len() >= (m - 1) * lda + k && lda >= k);
    let (b_rows, b_cols) = match rhs {
        Rhs::Transposed => (n, k),
        Rhs::Plain => (k, n),
    };
    assert!(b_rows == 0 || (b.len() >= (b_rows - 1) * ldb + b_cols && ldb >= b_cols));
    assert!(c.len() >= (m - 1) * ldc + n && ldc >= n);
    if k == 0 {
        c.chunks_mut(ldc)
            .take(m)
            .for_each(|row| row[..n].iter_mut().for_each(|x| *x *= beta));
        return;
    }
    if let Some(blas) = blas {
        const ROW_MAJOR: i32 = 101;
        const NO_TRANS: i32 = 111;
        const TRANS: i32 = 112;
        let tb = if rhs == Rhs::Transposed {
            TRANS
        } else {
            NO_TRANS
        };
        // SAFETY: the asserts above keep every access inside the slices.
        unsafe {
            (blas.sgemm)(
                ROW_MAJOR,
                NO_TRANS,
                tb,
                m as i32,
                n as i32,
                k as i32,
                alpha,
                a.as_ptr(),
                lda as i32,
                b.as_ptr(),
                ldb as i32,
                beta,
                c.as_mut_ptr(),
                ldc as i32,
            );
        }
        return;
    }
    let (rhs_cs, rhs_rs) = match rhs {
        Rhs::Transposed => (ldb as isize, 1),
        Rhs::Plain => (1, ldb as isize),
    };
    // SAFETY: as above; the gemm crate computes dst = alpha·dst + beta·lhs·rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            beta != 0.0,
            a.as_ptr(),
            1,
            lda as isize,
            b.as_ptr(),
            rhs_cs,
            rhs_rs,
            beta,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], rhs: Rhs) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let bv = match rhs {
                        Rhs::Transposed => b[j * k + p],
                        Rhs::Plain => b[p * n + j],
                    };
                    c[i * n + j] += a[i * k + p] as f64 * bv as f64;
                }
            }
        }
        c
    }

    #[test]
    fn sgemm_matches_naive_for_both_layouts_and_accumulation() {
        let (m, n, k) = (37, 29, 53);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let b: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0)
            .collect();
        // Both the loaded library (when this machine has one) and the pure-Rust fallback.
        for (blas, rhs) in [
            (openblas(), Rhs::Transposed),
            (openblas(), Rhs::Plain),
            (None, Rhs::Transposed),
            (None, Rhs::Plain),
        ] {
            let want = naive(m, n, k, &a, &b, rhs);
            let ldb = if rhs == Rhs::Transposed { k } else { n };
            let mut c = vec![1.0f32; m * n];
            sgemm_with(blas, m, n, k, 2.0, &a, k, &b, ldb, rhs, 0.5, &mut c, n);
            for (g, w) in c.iter().zip(&want) {
                assert!(
                    (*g as f64 - (2.0 * w + 0.5)).abs() < 1e-4,
                    "{g} vs {}",
                    2.0 * w + 0.5
                );
            }
        }
    }
}
