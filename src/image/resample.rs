//! Pillow's `ImagingResample` for 8-bit images (bicubic, a = -0.5), bit for bit.
//!
//! Pillow computes, per output coordinate, the window of input samples and their filter weights
//! in double precision, normalises the weights to sum to one, turns them into fixed point with
//! 22 fractional bits (`PRECISION_BITS = 32 - 8 - 2`), then runs a horizontal pass over only the
//! rows the vertical pass needs, and a vertical pass; each pass rounds (`+ 1 << 21`, arithmetic
//! shift) and clips to 0..=255. A pass whose size does not change is skipped. This is a Rust
//! re-implementation of that algorithm (Pillow 10.4 `src/libImaging/Resample.c`), not a copy.

use super::RgbImage;

/// Fractional bits of the fixed-point filter weights.
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Bicubic filter support (in output-sample units at scale 1).
const BICUBIC_SUPPORT: f64 = 2.0;

/// Keys' cubic convolution kernel with a = -0.5, evaluated in Pillow's operation order.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point weights of one resampling direction: output sample `i` reads input samples
/// `start[i] .. start[i] + len[i]` with weights `weights[i * ksize ..][.. len[i]]`.
struct Coeffs {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
}

impl Coeffs {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the box `0 .. in_size`.
    fn new(in_size: usize, out_size: usize) -> Coeffs {
        // Pillow passes the box as float32; `in1 - in0` is exact for any realistic size.
        let in0 = 0.0f64;
        let in1 = in_size as f32 as f64;
        let scale = (in1 - in0) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = BICUBIC_SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut start = Vec::with_capacity(out_size);
        let mut len = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut k = vec![0f64; ksize];
        let ss = 1.0 / filterscale;
        for xx in 0..out_size {
            let center = in0 + (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero; negative values are clamped to 0 anyway.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let n = (xmax - xmin).max(0) as usize;
            let mut ww = 0.0f64;
            for (x, kx) in k.iter_mut().enumerate().take(n) {
                let w = bicubic(((x as i64 + xmin) as f64 - center + 0.5) * ss);
                *kx = w;
                ww += w;
            }
            let row = &mut weights[xx * ksize..xx * ksize + n];
            for (dst, &w) in row.iter_mut().zip(&k[..n]) {
                let w = if ww != 0.0 { w / ww } else { w };
                let f = w * (1u32 << PRECISION_BITS) as f64;
                *dst = if w < 0.0 {
                    (-0.5 + f) as i32
                } else {
                    (0.5 + f) as i32
                };
            }
            start.push(xmin as usize);
            len.push(n);
        }
        Coeffs {
            ksize,
            start,
            len,
            weights,
        }
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let at = i * self.ksize;
        (self.start[i], &self.weights[at..at + self.len[i]])
    }
}

/// Round a fixed-point accumulator (which already holds the +0.5 bias) and clip to 0..=255.
#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass over input rows `row0 .. row0 + rows`.
fn horizontal(img: &RgbImage, out_w: usize, row0: usize, rows: usize, c: &Coeffs) -> RgbImage {
    let in_stride = img.width * 3;
    let mut data = vec![0u8; out_w * 3 * rows];
    for (y, out_row) in data.chunks_exact_mut(out_w * 3).enumerate() {
        let src = &img.data[(row0 + y) * in_stride..(row0 + y + 1) * in_stride];
        for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
            let (x0, k) = c.taps(xx);
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            for (s, &w) in src[x0 * 3..(x0 + k.len()) * 3].chunks_exact(3).zip(k) {
                r += s[0] as i32 * w;
                g += s[1] as i32 * w;
                b += s[2] as i32 * w;
            }
            px[0] = clip8(r);
            px[1] = clip8(g);
            px[2] = clip8(b);
        }
    }
    RgbImage {
        width: out_w,
        height: rows,
        data,
    }
}

/// Vertical pass; `c.start` is relative to the first row of `img`, shifted by `row0`.
fn vertical(img: &RgbImage, out_h: usize, row0: usize, c: &Coeffs) -> RgbImage {
    let stride = img.width * 3;
    let mut data = vec![0u8; stride * out_h];
    let mut acc = vec![0i32; stride];
    for (yy, out_row) in data.chunks_exact_mut(stride).enumerate() {
        let (y0, k) = c.taps(yy);
        acc.fill(HALF);
        for (dy, &w) in k.iter().enumerate() {
            let y = y0 - row0 + dy;
            let src = &img.data[y * stride..(y + 1) * stride];
            for (a, &s) in acc.iter_mut().zip(src) {
                *a += s as i32 * w;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    RgbImage {
        width: img.width,
        height: out_h,
        data,
    }
}

/// PIL's `img.resize((width, height), Image.BICUBIC)` for an 8-bit RGB image (no box, no
/// reducing_gap): antialiased when shrinking. Sizes of zero give an empty image.
/// `img.data` must hold `width * height * 3` bytes.
pub fn resize_bicubic(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    assert_eq!(
        img.data.len(),
        img.width * img.height * 3,
        "RgbImage data length does not match its size"
    );
    if width == 0 || height == 0 || img.width == 0 || img.height == 0 {
        return RgbImage {
            width,
            height,
            data: vec![0; width * height * 3],
        };
    }
    if width == img.width && height == img.height {
        return img.clone();
    }
    let need_h = width != img.width;
    let need_v = height != img.height;
    let cv = Coeffs::new(img.height, height);
    // Rows of the input the vertical pass reads.
    let first = cv.start[0];
    let last = cv.start[height - 1] + cv.len[height - 1];
    if need_h {
        let ch = Coeffs::new(img.width, width);
        let tmp = horizontal(img, width, first, last - first, &ch);
        if need_v {
            vertical(&tmp, height, first, &cv)
        } else {
            tmp
        }
    } else {
        vertical(img, height, 0, &cv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(500, 224), (7, 224), (224, 224), (1, 5), (1000, 3)] {
            let c = Coeffs::new(i, o);
            for xx in 0..o {
                let s: i64 = c.taps(xx).1.iter().map(|&w| w as i64).sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= c.ksize as i64,
                    "{i}->{o} at {xx}: {s}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage {
            width: 13,
            height: 7,
            data: [10u8, 200, 255].repeat(13 * 7),
        };
        for (w, h) in [(1, 1), (5, 3), (40, 90), (13, 30), (30, 7)] {
            let out = resize_bicubic(&img, w, h);
            assert_eq!((out.width, out.height), (w, h));
            assert!(out.data.chunks(3).all(|p| p == [10, 200, 255]), "{w}x{h}");
        }
    }
}
