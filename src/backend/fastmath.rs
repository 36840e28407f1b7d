//! Vectorisable elementwise math for the CPU backend: exp (Cephes polynomial, ~1 ulp), the
//! GELU family, and a numerically safe softmax. Loops are plain f32 code that LLVM
//! vectorises; on x86-64 an AVX2 copy is picked at run time.

// The Cephes constants are written as published.
#![allow(clippy::excessive_precision)]

use crate::config::Activation;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5·2²³: adding it rounds a float to the nearest integer in its low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// e^x for |x| < 87; saturates outside (never returns inf or NaN for finite x).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    let ni = t.to_bits() as i32 - ROUND_MAGIC.to_bits() as i32;
    y * f32::from_bits(((ni + 127) << 23) as u32)
}

#[inline(always)]
fn quick_gelu(x: f32) -> f32 {
    x / (1.0 + exp(-1.702 * x))
}

#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    let u = 0.797_884_6 * (x + 0.044_715 * x * x * x);
    // tanh(u) = 1 − 2 / (e^{2u} + 1)
    0.5 * x * (2.0 - 2.0 / (exp(2.0 * u) + 1.0))
}

fn gelu_erf(x: f32) -> f32 {
    (0.5 * x as f64 * (1.0 + libm::erf(x as f64 / std::f64::consts::SQRT_2))) as f32
}

/// Runs `$body` (a function of a `&mut [f32]`) through an AVX2 copy when the CPU has it.
macro_rules! dispatch {
    ($name:ident, $xs:ident, $body:block) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn $name($xs: &mut [f32]) $body
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the features were detected just above.
                unsafe { $name($xs) };
                return;
            }
        }
        $body
    }};
}

/// Applies the activation in place.
pub fn activate(xs: &mut [f32], act: Activation) {
    match act {
        Activation::QuickGelu => dispatch!(quick_gelu_avx2, xs, {
            for v in xs.iter_mut() {
                *v = quick_gelu(*v);
            }
        }),
        Activation::GeluTanh => dispatch!(gelu_tanh_avx2, xs, {
            for v in xs.iter_mut() {
                *v = gelu_tanh(*v);
            }
        }),
        Activation::Gelu => xs.iter_mut().for_each(|v| *v = gelu_erf(*v)),
    }
}

/// e^x in place.
pub fn exp_inplace(xs: &mut [f32]) {
    dispatch!(exp_avx2, xs, {
        for v in xs.iter_mut() {
            *v = exp(*v);
        }
    })
}

/// Softmax of one row in place.
pub fn softmax(xs: &mut [f32]) {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    xs.iter_mut().for_each(|v| *v -= max);
    exp_inplace(xs);
    let inv = 1.0 / xs.iter().sum::<f32>();
    xs.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0.0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0123;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
    }

    #[test]
    fn activations_match_their_definitions() {
        let xs: Vec<f32> = (-400..400).map(|i| i as f32 * 0.025).collect();
        for act in [
            Activation::QuickGelu,
            Activation::GeluTanh,
            Activation::Gelu,
        ] {
            let mut got = xs.clone();
            activate(&mut got, act);
            for (&x, &g) in xs.iter().zip(&got) {
                let x = x as f64;
                let want = match act {
                    Activation::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
                    Activation::GeluTanh => {
                        0.5 * x * (1.0 + (0.7978845608028654 * (x + 0.044715 * x * x * x)).tanh())
                    }
                    Activation::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
                };
                assert!(
                    (g as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "{act:?}({x}) = {g}, want {want}"
                );
            }
        }
    }

    #[test]
    fn softmax_sums_to_one_and_survives_large_inputs() {
        let mut row = vec![1000.0, 999.0, -1000.0, 0.5];
        softmax(&mut row);
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
        let want = 1.0 / (1.0 + (-1.0f64).exp());
        assert!((row[0] as f64 - want).abs() < 1e-6);
    }
}
