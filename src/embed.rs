//! The `embed` job: images and prompts through the model, written as safetensors.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::image::{find_images, preprocess_file, ImageEntry};
use crate::model::Clip;
use crate::progress::Progress;
use crate::tokenizer::Tokenizer;
use crate::weights::{write_safetensors, OwnedTensor, SaveDtype};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;

/// Features of a set of images, in the order of `images`.
pub struct ImageSet {
    pub images: Vec<ImageEntry>,
    /// `[n, projection_dim]`.
    pub embeds: Vec<f32>,
    /// `[n, grid², projection_dim]`.
    pub local: Vec<f32>,
}

/// Decodes and preprocesses `entries` (in parallel), then runs them through the vision tower
/// in batches of `batch`.
pub fn embed_images<B: Backend>(
    model: &Clip<B>,
    entries: Vec<ImageEntry>,
    batch: usize,
    progress: Progress,
) -> Result<ImageSet> {
    let size = model.config.vision.image_size;
    let bar = progress.bar(entries.len(), "images", "img");
    let (mut embeds, mut local) = (Vec::new(), Vec::new());
    for chunk in entries.chunks(batch.max(1)) {
        let pixels = preprocess_all(chunk, size, Progress { quiet: true })?;
        let f = model.encode_images(&pixels, chunk.len(), true)?;
        embeds.extend(f.embeds);
        local.extend(f.local.expect("asked for local features"));
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(ImageSet {
        images: entries,
        embeds,
        local,
    })
}

/// Decodes and preprocesses images in parallel into one `[n, 3, size, size]` buffer.
pub fn preprocess_all(entries: &[ImageEntry], size: usize, progress: Progress) -> Result<Vec<f32>> {
    let bar = progress.bar(entries.len(), "preprocess", "img");
    let per = 3 * size * size;
    let mut out = vec![0.0f32; entries.len() * per];
    out.par_chunks_mut(per)
        .zip(entries.par_iter())
        .try_for_each(|(o, e)| -> Result<()> {
            o.copy_from_slice(&preprocess_file(&e.path, size)?);
            bar.inc(1);
            Ok(())
        })?;
    bar.finish_and_clear();
    Ok(out)
}

/// Text features of `prompts`, tokenised for the model's context and run in batches.
pub fn embed_texts<B: Backend>(
    model: &Clip<B>,
    tokenizer: &Tokenizer,
    prompts: &[String],
    batch: usize,
    progress: Progress,
) -> Result<Vec<f32>> {
    let bar = progress.bar(prompts.len(), "prompts", "prompts");
    let mut out = Vec::with_capacity(prompts.len() * model.config.projection_dim);
    for chunk in prompts.chunks(batch.max(1)) {
        let texts: Vec<&str> = chunk.iter().map(|s| s.as_str()).collect();
        let b = tokenizer.encode_batch(&texts, model.config.text.context_length);
        out.extend(model.encode_text(&b.ids, &b.lengths, b.seq_len)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// One prompt per line; a blank line is an error (it is almost always a mistake).
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let prompts: Vec<String> = text
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect();
    if let Some(i) = prompts.iter().position(|p| p.trim().is_empty()) {
        return Err(Error::file(
            path,
            format!("line {} is empty (one prompt per line)", i + 1),
        ));
    }
    if prompts.is_empty() {
        return Err(Error::file(path, "holds no prompts (one prompt per line)"));
    }
    Ok(prompts)
}

pub struct EmbedJob<'a> {
    pub images_dir: &'a Path,
    pub prompts_file: &'a Path,
    pub out: &'a Path,
    pub batch: usize,
    pub progress: Progress,
}

/// Runs `embed` end to end and writes the safetensors file; returns (images, prompts) counts.
pub fn run_embed<B: Backend>(
    model: &Clip<B>,
    tokenizer: &Tokenizer,
    job: &EmbedJob,
) -> Result<(usize, usize)> {
    let prompts = read_prompts(job.prompts_file)?;
    let entries = find_images(job.images_dir)?;
    // Inputs are all checked above before the long work starts.
    let text = embed_texts(model, tokenizer, &prompts, 256, job.progress)?;
    let set = embed_images(model, entries, job.batch, job.progress)?;
    let (n, t, p) = (set.images.len(), prompts.len(), model.config.projection_dim);
    let g2 = model.config.vision.grid() * model.config.vision.grid();
    let f32t = |v: &[f32], shape: Vec<usize>| OwnedTensor::from_f32(v, shape, SaveDtype::F32);
    let tensors = vec![
        ("image_embeds".to_string(), f32t(&set.embeds, vec![n, p])),
        (
            "image_local_embeds".to_string(),
            f32t(&set.local, vec![n, g2, p]),
        ),
        ("text_embeds".to_string(), f32t(&text, vec![t, p])),
        (
            "logit_scale".to_string(),
            f32t(&[model.logit_scale], vec![]),
        ),
    ];
    let rel: Vec<&str> = set.images.iter().map(|e| e.rel.as_str()).collect();
    let meta = HashMap::from([
        (
            "images".to_string(),
            serde_json::to_string(&rel).expect("strings serialise"),
        ),
        (
            "prompts".to_string(),
            serde_json::to_string(&prompts).expect("strings serialise"),
        ),
    ]);
    write_safetensors(job.out, &tensors, meta)?;
    Ok((n, t))
}
