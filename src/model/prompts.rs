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

/// Prompts per text-tower batch on the CPU (sorted by length, each padded to its own longest).
pub const PROMPT_BUCKET: usize = 128;

/// How prompts are grouped into text-tower batches (every grouping gives the same features).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketPlan {
    /// Sorted by length and cut every `rows` prompts: the CPU, whose cost is its arithmetic,
    /// so small buckets with little padding are best.
    Fixed { rows: usize },
    /// Sorted by length and cut where the padding saved outweighs a batch's fixed cost,
    /// counted in tokens (a device, where each layer of each batch is a dozen launches whether
    /// it holds 100 prompts or 1000), at most `max_rows` prompts a batch.
    Balanced {
        overhead_tokens: usize,
        max_rows: usize,
    },
}

impl PromptBuckets {
    /// Sorts a padded batch by length and groups it as `plan` says.
    pub fn new(batch: &Batch, plan: BucketPlan) -> PromptBuckets {
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by_key(|&i| batch.lengths[i]);
        let sorted: Vec<usize> = order.iter().map(|&i| batch.lengths[i]).collect();
        let cuts = match plan {
            BucketPlan::Fixed { rows } => fixed_cuts(sorted.len(), rows),
            BucketPlan::Balanced {
                overhead_tokens,
                max_rows,
            } => balanced_cuts(&sorted, overhead_tokens, max_rows),
        };
        let buckets = cuts
            .windows(2)
            .map(|w| {
                let rows = &order[w[0]..w[1]];
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

    /// Tokens the text tower runs over, padding included.
    pub fn padded_tokens(&self) -> usize {
        self.buckets.iter().map(|b| b.lengths.len() * b.seq).sum()
    }

    /// Where each prompt's features lie when the buckets' outputs are concatenated in bucket
    /// order, each bucket holding `copies` stacked candidates (candidate c's rows at
    /// `c·n..(c+1)·n` of a bucket of n prompts): per candidate, the rows in the original
    /// prompt order, for one `gather_rows`.
    pub fn stacked_rows(&self, copies: usize) -> Vec<Vec<usize>> {
        let mut out = vec![vec![0; self.count]; copies];
        let mut offset = 0;
        for b in &self.buckets {
            let n = b.rows.len();
            for (c, rows) in out.iter_mut().enumerate() {
                for (j, &r) in b.rows.iter().enumerate() {
                    rows[r] = offset + c * n + j;
                }
            }
            offset += copies * n;
        }
        out
    }
}

impl<B: Backend> Clip<B> {
    /// Text features of every prompt, in the original order.
    pub fn encode_prompts(&self, p: &PromptBuckets, ov: &Overrides<B>) -> Result<Vec<f32>> {
        self.backend.to_vec(&self.encode_prompts_tensor(p, ov)?)
    }

    /// [`Clip::encode_prompts`], left on the backend: `[prompts, projection_dim]`.
    pub fn encode_prompts_tensor(&self, p: &PromptBuckets, ov: &Overrides<B>) -> Result<B::Tensor> {
        let feats = p
            .buckets
            .iter()
            .map(|b| {
                let mut h = self.text_embed(&b.ids, &b.lengths, b.seq)?;
                let layers = 0..self.config.text.tower.layers;
                self.text_layers(&mut h, &b.lengths, b.seq, layers, ov)?;
                self.text_head_tensor(&h, &b.ids, b.seq, ov)
            })
            .collect::<Result<Vec<_>>>()?;
        let rows = p.stacked_rows(1).pop().expect("one copy");
        in_prompt_order(&self.backend, feats, &rows, self.config.projection_dim)
    }
}

/// The rows of `parts`, one after another (no copy for a single part).
pub fn joined<B: Backend>(b: &B, mut parts: Vec<B::Tensor>) -> Result<B::Tensor> {
    match parts.len() {
        1 => Ok(parts.pop().expect("one part")),
        _ => b.concat_rows(&parts),
    }
}

/// The rows `rows` of the concatenated `parts` (no gather when they are already in order).
fn in_prompt_order<B: Backend>(
    b: &B,
    parts: Vec<B::Tensor>,
    rows: &[usize],
    dim: usize,
) -> Result<B::Tensor> {
    let all = joined(b, parts)?;
    if rows.iter().enumerate().all(|(i, &r)| i == r) {
        return Ok(all);
    }
    b.gather_rows(&all, dim, rows)
}

/// Bucket boundaries (0, …, n) every `rows` prompts.
fn fixed_cuts(n: usize, rows: usize) -> Vec<usize> {
    let rows = rows.max(1);
    let mut cuts: Vec<usize> = (0..n).step_by(rows).collect();
    cuts.push(n);
    cuts
}

/// Bucket boundaries over ascending `lengths` minimising the padded tokens plus
/// `overhead` per bucket, with at most `max_rows` prompts a bucket (dynamic programming over
/// the cut points: a bucket costs its row count times its longest, the last, length).
fn balanced_cuts(lengths: &[usize], overhead: usize, max_rows: usize) -> Vec<usize> {
    let n = lengths.len();
    let max_rows = max_rows.max(1);
    // best[j]: the least cost of bucketing the first j prompts; from[j]: its last cut.
    let mut best = vec![usize::MAX; n + 1];
    let mut from = vec![0; n + 1];
    best[0] = 0;
    for j in 1..=n {
        for i in j.saturating_sub(max_rows)..j {
            let cost = best[i] + (j - i) * lengths[j - 1] + overhead;
            if cost < best[j] {
                best[j] = cost;
                from[j] = i;
            }
        }
    }
    let mut cuts = vec![n];
    let mut j = n;
    while j > 0 {
        j = from[j];
        cuts.push(j);
    }
    cuts.reverse();
    cuts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cost of a grouping: padded tokens plus `overhead` per bucket.
    fn cost(lengths: &[usize], cuts: &[usize], overhead: usize) -> usize {
        cuts.windows(2)
            .map(|w| (w[1] - w[0]) * lengths[w[1] - 1] + overhead)
            .sum()
    }

    /// Every grouping of `lengths` into contiguous buckets of at most `max_rows`, as cuts.
    fn all_cuts(n: usize, max_rows: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![0]];
        }
        let mut out = Vec::new();
        for last in n.saturating_sub(max_rows)..n {
            for mut c in all_cuts(last, max_rows) {
                c.push(n);
                out.push(c);
            }
        }
        out
    }

    #[test]
    fn balanced_cuts_are_the_cheapest_grouping() {
        let lengths = [2, 3, 3, 3, 5, 6, 6, 9, 9, 11, 18];
        for overhead in [0, 1, 4, 10, 40, 1000] {
            for max_rows in [1, 3, 4, 11] {
                let cuts = balanced_cuts(&lengths, overhead, max_rows);
                assert_eq!((cuts[0], *cuts.last().unwrap()), (0, lengths.len()));
                assert!(cuts
                    .windows(2)
                    .all(|w| w[0] < w[1] && w[1] - w[0] <= max_rows));
                let best = all_cuts(lengths.len(), max_rows)
                    .iter()
                    .map(|c| cost(&lengths, c, overhead))
                    .min()
                    .unwrap();
                assert_eq!(
                    cost(&lengths, &cuts, overhead),
                    best,
                    "{overhead} {max_rows}"
                );
            }
        }
        assert_eq!(balanced_cuts(&[], 5, 4), vec![0]);
        // No overhead: no padding at all; a large one: a single bucket.
        let sum: usize = lengths.iter().sum();
        assert_eq!(cost(&lengths, &balanced_cuts(&lengths, 0, 11), 0), sum);
        assert_eq!(balanced_cuts(&lengths, 1000, 11), vec![0, 11]);
    }

    #[test]
    fn stacked_rows_find_each_candidates_prompts() {
        let lengths = vec![4, 2, 7, 3, 2, 7, 5];
        let batch = Batch {
            ids: vec![1; lengths.len() * 8],
            lengths: lengths.clone(),
            seq_len: 8,
        };
        let p = PromptBuckets::new(&batch, BucketPlan::Fixed { rows: 3 });
        assert!(p.buckets.len() > 1);
        for copies in [1, 3] {
            // The stacked layout itself: bucket by bucket, candidate by candidate, each row
            // tagged (candidate, prompt).
            let stacked: Vec<(usize, usize)> = p
                .buckets
                .iter()
                .flat_map(|b| (0..copies).flat_map(move |c| b.rows.iter().map(move |&r| (c, r))))
                .collect();
            let rows = p.stacked_rows(copies);
            assert_eq!(rows.len(), copies);
            for (c, rows) in rows.iter().enumerate() {
                let got: Vec<(usize, usize)> = rows.iter().map(|&i| stacked[i]).collect();
                let want: Vec<(usize, usize)> = (0..lengths.len()).map(|r| (c, r)).collect();
                assert_eq!(got, want, "{copies} copies");
            }
        }
    }

    #[test]
    fn fixed_cuts_step_by_rows() {
        assert_eq!(fixed_cuts(10, 4), vec![0, 4, 8, 10]);
        assert_eq!(fixed_cuts(8, 4), vec![0, 4, 8]);
        assert_eq!(fixed_cuts(0, 4), vec![0]);
    }

    #[test]
    fn buckets_hold_every_prompt_once_trimmed_to_their_longest() {
        let lengths = vec![4, 2, 7, 3, 2, 7, 5];
        let seq = 8;
        let ids: Vec<u32> = lengths
            .iter()
            .enumerate()
            .flat_map(|(r, &l)| (0..seq).map(move |j| if j < l { (r * 10 + j) as u32 } else { 0 }))
            .collect();
        let batch = Batch {
            ids,
            lengths: lengths.clone(),
            seq_len: seq,
        };
        for plan in [
            BucketPlan::Fixed { rows: 3 },
            BucketPlan::Balanced {
                overhead_tokens: 6,
                max_rows: 4,
            },
        ] {
            let p = PromptBuckets::new(&batch, plan);
            let mut seen: Vec<usize> = p.buckets.iter().flat_map(|b| b.rows.clone()).collect();
            seen.sort();
            assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>(), "{plan:?}");
            for b in &p.buckets {
                assert_eq!(b.seq, *b.lengths.iter().max().unwrap());
                for (j, &r) in b.rows.iter().enumerate() {
                    assert_eq!(b.lengths[j], lengths[r]);
                    assert_eq!(&b.ids[j * b.seq..(j + 1) * b.seq], &batch.row(r)[..b.seq]);
                }
            }
        }
    }
}
