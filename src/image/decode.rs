//! Reading image files into 8-bit RGB exactly as `PIL.Image.open(f).convert("RGB")` does
//! (Pillow 10.4). The format is recognised by its leading bytes, as PIL does, not by the
//! file name. Measured PIL behaviour that this reproduces:
//! - PNG grey 1/2/4-bit: scaled to 0..255 (×255, ×85, ×17); 16-bit grey opens as mode `I;16`,
//!   whose conversion to RGB *clips*: a sample below 256 keeps its value, anything else is 255.
//! - PNG 16-bit RGB, RGBA and grey+alpha: the high byte of each sample.
//! - PNG palette: index → palette entry, an index past the palette's end → black;
//!   transparency (tRNS) and alpha channels are dropped without compositing.
//! - WebP (lossy and lossless, via `image-webp`): alpha dropped.
//! - JPEG: see [`super::jpeg`].

use std::io::Cursor;
use std::path::Path;

use super::jpeg::decode_jpeg;
use super::RgbImage;
use crate::{Error, Result};

/// PIL's decompression-bomb limit: `Image.open` refuses more than twice `MAX_IMAGE_PIXELS`.
pub const MAX_PIXELS: usize = 2 * (1024 * 1024 * 1024 / 4 / 3);

/// Read a file and decode it to RGB (PIL `open` + `convert("RGB")`).
pub fn decode_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_rgb_bytes(&bytes, path)
}

/// Decode an image held in memory to RGB; `path_for_errors` names it in error messages.
pub fn decode_rgb_bytes(bytes: &[u8], path_for_errors: &Path) -> Result<RgbImage> {
    let result = if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        decode_jpeg(bytes).map_err(|m| format!("JPEG: {m}"))
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        decode_png(bytes).map_err(|m| format!("PNG: {m}"))
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        decode_webp(bytes).map_err(|m| format!("WebP: {m}"))
    } else if bytes.is_empty() {
        Err("empty file, not an image".to_string())
    } else {
        Err("not a JPEG, PNG or WebP image (unrecognised leading bytes)".to_string())
    };
    result.map_err(|msg| Error::file(path_for_errors, msg))
}

/// Refuse sizes that PIL refuses (and that would exhaust memory on a corrupt header).
pub(super) fn check_size(width: usize, height: usize) -> std::result::Result<(), String> {
    let pixels = width.saturating_mul(height);
    if pixels > MAX_PIXELS {
        return Err(format!(
            "image size ({width}x{height} = {pixels} pixels) exceeds the limit of {MAX_PIXELS} \
             pixels, could be a decompression bomb"
        ));
    }
    Ok(())
}

/// A zeroed pixel buffer, failing with a message instead of aborting when memory is short.
pub(super) fn alloc_pixels(
    width: usize,
    height: usize,
    channels: usize,
) -> std::result::Result<Vec<u8>, String> {
    let n = width
        .checked_mul(height)
        .and_then(|p| p.checked_mul(channels))
        .ok_or_else(|| format!("image size {width}x{height} overflows"))?;
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| format!("out of memory for a {width}x{height} image"))?;
    v.resize(n, 0);
    Ok(v)
}

/// PIL's `cmyk2rgb`: `nk = 255 - k; out = clip(nk - muldiv255(c, nk))`.
pub(super) fn cmyk_to_rgb(
    cmyk: &[u8],
    width: usize,
    height: usize,
) -> std::result::Result<Vec<u8>, String> {
    let mut rgb = alloc_pixels(width, height, 3)?;
    for (o, p) in rgb.chunks_exact_mut(3).zip(cmyk.chunks_exact(4)) {
        let nk = 255 - p[3] as i32;
        for c in 0..3 {
            let t = p[c] as i32 * nk + 128;
            let mul = ((t >> 8) + t) >> 8;
            o[c] = (nk - mul).clamp(0, 255) as u8;
        }
    }
    Ok(rgb)
}

fn decode_png(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    use png::{BitDepth, ColorType};
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    // Raw samples: all conversions below follow PIL, not libpng/the png crate.
    decoder.set_transformations(png::Transformations::IDENTITY);
    // The size is checked below against PIL's limit instead of the crate's 64 MiB default.
    decoder.set_limits(png::Limits { bytes: usize::MAX });
    let mut reader = decoder.read_info().map_err(png_message)?;
    let info = reader.info();
    let (w, h) = (info.width as usize, info.height as usize);
    let (color, depth) = (info.color_type, info.bit_depth);
    let palette = info
        .palette
        .as_ref()
        .map(|p| p.to_vec())
        .unwrap_or_default();
    check_size(w, h)?;
    if color == ColorType::Indexed && palette.is_empty() {
        return Err("palette image without a PLTE chunk".into());
    }
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| format!("image size {w}x{h} overflows"))?;
    let mut raw = alloc_pixels(size, 1, 1)?;
    let frame = reader.next_frame(&mut raw).map_err(png_message)?;
    let line = frame.line_size;
    let mut data = alloc_pixels(w, h, 3)?;
    let bits = depth as usize;
    for (row, out) in raw.chunks(line).zip(data.chunks_exact_mut(w * 3)) {
        let px = out.chunks_exact_mut(3);
        match (color, depth) {
            (ColorType::Grayscale, BitDepth::Sixteen) => {
                for (o, s) in px.zip(row.chunks_exact(2)) {
                    o.fill(if s[0] == 0 { s[1] } else { 255 });
                }
            }
            (ColorType::Grayscale, _) => {
                let scale = 255 / ((1u16 << bits) - 1) as u8;
                for (x, o) in px.enumerate() {
                    o.fill(packed(row, x, bits) * scale);
                }
            }
            (ColorType::Indexed, _) => {
                for (x, o) in px.enumerate() {
                    let i = packed(row, x, bits) as usize * 3;
                    match palette.get(i..i + 3) {
                        Some(c) => o.copy_from_slice(c),
                        None => o.fill(0),
                    }
                }
            }
            (ColorType::GrayscaleAlpha, _) | (ColorType::Rgb, _) | (ColorType::Rgba, _) => {
                let bytes_per_sample = bits / 8;
                let channels = color.samples();
                let stride = channels * bytes_per_sample;
                for (o, s) in px.zip(row.chunks_exact(stride)) {
                    // The first byte of a 16-bit sample is its high byte (PNG is big-endian).
                    if channels >= 3 {
                        for c in 0..3 {
                            o[c] = s[c * bytes_per_sample];
                        }
                    } else {
                        o.fill(s[0]);
                    }
                }
            }
        }
    }
    Ok(RgbImage {
        width: w,
        height: h,
        data,
    })
}

/// Sample `x` of a row packed with `bits` (1, 2, 4 or 8) bits per sample, most significant first.
fn packed(row: &[u8], x: usize, bits: usize) -> u8 {
    if bits == 8 {
        return row[x];
    }
    let per_byte = 8 / bits;
    let shift = 8 - bits * (x % per_byte + 1);
    (row[x / per_byte] >> shift) & ((1u16 << bits) - 1) as u8
}

fn png_message(e: png::DecodingError) -> String {
    match e {
        png::DecodingError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "image file is truncated".into()
        }
        e => e.to_string(),
    }
}

fn decode_webp(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    use ::image::ImageDecoder;
    let decoder =
        ::image::codecs::webp::WebPDecoder::new(Cursor::new(bytes)).map_err(|e| e.to_string())?;
    let (w, h) = decoder.dimensions();
    check_size(w as usize, h as usize)?;
    let img = ::image::DynamicImage::from_decoder(decoder).map_err(|e| e.to_string())?;
    // `into_rgb8` drops alpha without compositing, as PIL's RGBA → RGB does.
    let rgb = img.into_rgb8();
    Ok(RgbImage {
        width: w as usize,
        height: h as usize,
        data: rgb.into_raw(),
    })
}
