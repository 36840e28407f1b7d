//! Prompts grouped by token length: padding every prompt to the longest one (18 tokens for the
//! ImageNet prompts, 8 on average) would more than double the text tower's work. Causal
//! attention makes trailing padding irrelevant to the real tokens, so trimming it is exact.

use crate::backend::Backend;
use crate::error::Result;
use crate::model::overrides::Overrides;
use crate::model::Clip;
use crate::tokenizer::Batch;

/// Prompts of similar length, padded to their own longest.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Bucket {
    /// `[rows.len(), seq]` token ids.
    pub ids: Vec<u32>,
    pub lengths: Vec<usize>,
    pub seq: usize,
    /// Each row's index in the original prompt order.
    pub rows: Vec<usize>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PromptBuckets {
    pub buckets: Vec<Bucket>,
    pub count: usize,
}

impl PromptBuckets {
    /// Sorts a padded batch by length and cuts it into buckets of at most `max_rows` prompts.
    pub fn new(batch: &Batch, max_rows: usize) -> PromptBuckets {
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by_key(|&i| batch.lengths[i]);
        let buckets = order
            .chunks(max_rows.max(1))
            .map(|rows| {
                let seq = rows.iter().map(|&i| batch.lengths[i]).max().unwrap_or(1);
                let ids = rows
                    .iter()
                    .flat_map(|&i| batch.row(i)[..seq].iter().copied())
                    .collect();
                Bucket {
                    ids,
                    lengths: rows.iter().map(|&i| batch.lengths[i]).collect(),
                    seq,
                    rows: rows.to_vec(),
                }
            })
            .collect();
        PromptBuckets {
            buckets,
            count: batch.len(),
        }
    }

    /// Puts per-bucket rows `[bucket rows, dim]` back in the original prompt order.
    pub fn scatter(&self, per_bucket: &[Vec<f32>], dim: usize) -> Vec<f32> {
        let mut out = vec![0.0; self.count * dim];
        for (b, feats) in self.buckets.iter().zip(per_bucket) {
            for (j, &r) in b.rows.iter().enumerate() {
                out[r * dim..(r + 1) * dim].copy_from_slice(&feats[j * dim..(j + 1) * dim]);
            }
        }
        out
    }
}

impl<B: Backend> Clip<B> {
    /// Text features of every prompt, in the original order.
    pub fn encode_prompts(&self, p: &PromptBuckets, ov: &Overrides<B>) -> Result<Vec<f32>> {
        let feats = p
            .buckets
            .iter()
            .map(|b| self.encode_text_with(&b.ids, &b.lengths, b.seq, ov))
            .collect::<Result<Vec<_>>>()?;
        Ok(p.scatter(&feats, self.config.projection_dim))
    }
}
