//! Image input: decoding and CLIP preprocessing that reproduce the SeTAR reference's
//! `Image.open(f).convert("RGB")` → `Resize(n, BICUBIC)` → `CenterCrop(n)` → `ToTensor()` →
//! `Normalize(mean, std)` (PIL 10.4 + torchvision) bit for bit on the 8-bit stages and in the
//! same float operation order afterwards.
//!
//! - [`decode`]: JPEG (libjpeg-turbo algorithms via mozjpeg), PNG (all bit depths and colour
//!   types) and WebP to RGB with PIL's conversions.
//! - [`resample`]: Pillow's fixed-point antialiased bicubic resampler.
//! - [`files`]: listing the images of a folder tree.

pub mod decode;
pub mod files;
mod jpeg;
pub mod resample;

use std::path::Path;

pub use decode::{decode_rgb, decode_rgb_bytes, MAX_PIXELS};
pub use files::{find_images, is_image_path, ImageEntry, IMAGE_EXTENSIONS};
pub use resample::resize_bicubic;

use crate::{Error, Result};

/// An 8-bit RGB image, rows top to bottom, pixels interleaved `R G B`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// `width * height * 3` bytes.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// The pixel at column `x`, row `y`.
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

/// Per-channel normalisation `(x / 255 - mean) / std`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalize {
    /// CLIP's constants, rounded from the Python floats to f32 exactly as
    /// `torch.as_tensor(mean, dtype=torch.float32)` does (f64 → f32, not decimal → f32).
    pub const CLIP: Normalize = Normalize {
        mean: [
            0.48145466f64 as f32,
            0.4578275f64 as f32,
            0.40821073f64 as f32,
        ],
        std: [
            0.26862954f64 as f32,
            0.26130258f64 as f32,
            0.27577711f64 as f32,
        ],
    };
}

/// torchvision `Resize(size)` with an int: the short side becomes `size`, the long side
/// `int(size * long / short)`; bicubic as in PIL. An image already of that size is returned
/// unchanged (as torchvision does).
pub fn resize_short_side(img: &RgbImage, size: usize) -> RgbImage {
    let (w, h) = (img.width, img.height);
    if w == 0 || h == 0 {
        return img.clone();
    }
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    // Python's `int(size * long / short)`: a correctly rounded float division, truncated.
    let new_long = ((size * long) as f64 / short as f64) as usize;
    let (nw, nh) = if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    };
    resize_bicubic(img, nw, nh)
}

/// Python's `round(x / 2.0)` for a non-negative integer `x` (ties to even).
fn half_round_even(x: usize) -> usize {
    let m = x / 2;
    if x % 2 == 1 && m % 2 == 1 {
        m + 1
    } else {
        m
    }
}

/// torchvision `CenterCrop(size)`: offsets `int(round((h - size) / 2.0))` (ties to even);
/// a side shorter than `size` is first padded with black as torchvision does.
pub fn center_crop(img: &RgbImage, size: usize) -> RgbImage {
    let (w, h) = (img.width, img.height);
    // torchvision pads a short side to exactly `size`, (size - side) / 2 (floored) before it.
    let pad_left = size.saturating_sub(w) / 2;
    let pad_top = size.saturating_sub(h) / 2;
    let (padded_w, padded_h) = (w.max(size), h.max(size));
    let left = half_round_even(padded_w - size);
    let top = half_round_even(padded_h - size);
    let mut data = vec![0u8; size * size * 3];
    for y in 0..size {
        // Row `y + top` of the padded image is row `y + top - pad_top` of the image.
        let Some(sy) = (y + top).checked_sub(pad_top).filter(|&sy| sy < h) else {
            continue;
        };
        for x in 0..size {
            let Some(sx) = (x + left).checked_sub(pad_left).filter(|&sx| sx < w) else {
                continue;
            };
            let s = (sy * w + sx) * 3;
            data[(y * size + x) * 3..][..3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    RgbImage {
        width: size,
        height: size,
        data,
    }
}

/// `ToTensor()` + `Normalize`: a `[3, height, width]` float32 tensor, each value computed as
/// `(x as f32 / 255 - mean) / std` in f32, the order torchvision uses.
pub fn to_chw_normalized(img: &RgbImage, norm: &Normalize) -> Vec<f32> {
    let plane = img.width * img.height;
    let mut out = vec![0f32; 3 * plane];
    for c in 0..3 {
        // One table per channel: the same f32 operations, done once per level.
        let lut: Vec<f32> = (0..=255u8)
            .map(|v| (v as f32 / 255.0 - norm.mean[c]) / norm.std[c])
            .collect();
        for (o, px) in out[c * plane..(c + 1) * plane]
            .iter_mut()
            .zip(img.data.chunks_exact(3))
        {
            *o = lut[px[c] as usize];
        }
    }
    out
}

/// The whole CLIP preprocessing of a decoded image: resize the short side to `size`, crop the
/// centre `size`×`size`, normalise with `norm`. Returns `[3, size, size]` values.
pub fn preprocess_rgb(img: &RgbImage, size: usize, norm: &Normalize) -> Vec<f32> {
    let resized = resize_short_side(img, size);
    let cropped = center_crop(&resized, size);
    to_chw_normalized(&cropped, norm)
}

/// Read, decode and preprocess one image file with CLIP's normalisation:
/// `[3, size, size]` float32 values, as the reference's torchvision pipeline gives them.
pub fn preprocess_file(path: &Path, size: usize) -> Result<Vec<f32>> {
    if size == 0 {
        return Err(Error::invalid("image size must be positive"));
    }
    let img = decode_rgb(path)?;
    Ok(preprocess_rgb(&img, size, &Normalize::CLIP))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_round_half_even() {
        let want = [0, 0, 1, 2, 2, 2, 3, 4, 4, 4]; // round(x / 2.0) for x = 0..10
        for (x, &w) in want.iter().enumerate() {
            assert_eq!(half_round_even(x), w, "x = {x}");
        }
    }

    #[test]
    fn crop_pads_like_torchvision() {
        let img = RgbImage {
            width: 1,
            height: 3,
            data: vec![9; 9],
        };
        // Width 1 → 4: pad 1 left, 2 right. Height 3 → 4: pad 0 above, 1 below.
        let out = center_crop(&img, 4);
        let col: Vec<u8> = (0..4).map(|y| out.pixel(1, y)[0]).collect();
        assert_eq!(col, [9, 9, 9, 0]);
        assert_eq!(out.pixel(0, 0), [0, 0, 0]);
        assert_eq!(out.pixel(2, 0), [0, 0, 0]);
    }
}
