//! CLIP towers in the HF `CLIPModel` layout: pre-LN transformer blocks, the vision tower with
//! GL-MCM's local (value-path) patch features, the text tower with causal + padding masks and
//! EOS pooling, the projections and the logits.

use crate::backend::{AttentionMask, AttentionShape, Backend};
use crate::config::{ClipConfig, TowerConfig};
use crate::error::{Error, Result};
use crate::lowrank::{Target, Tower, WeightType};
use crate::model::overrides::{LinearOverride, Overrides};
use crate::weights::{is_skipped_buffer, WeightsFile};
use std::collections::BTreeSet;

/// A Linear layer: weight `[out, in]`, optional bias `[out]`.
pub struct Linear<W> {
    pub weight: W,
    pub bias: Option<W>,
    pub out_dim: usize,
    pub in_dim: usize,
}

pub struct LayerNorm<W> {
    pub gamma: W,
    pub beta: W,
}

/// One pre-LN block: `h += attn(ln1(h)); h += fc2(act(fc1(ln2(h))))`.
pub struct Block<W> {
    pub ln1: LayerNorm<W>,
    pub q: Linear<W>,
    pub k: Linear<W>,
    pub v: Linear<W>,
    pub o: Linear<W>,
    pub ln2: LayerNorm<W>,
    pub fc1: Linear<W>,
    pub fc2: Linear<W>,
}

/// The stack of transformer blocks of one tower (HF's `encoder`).
pub struct Encoder<W> {
    pub config: TowerConfig,
    pub blocks: Vec<Block<W>>,
}

pub struct VisionTower<W> {
    /// The conv patch embedding as a Linear `[hidden, channels·patch²]` (no bias).
    pub patch: Linear<W>,
    pub class_embedding: W,
    pub positions: W,
    pub pre_ln: LayerNorm<W>,
    pub encoder: Encoder<W>,
    pub post_ln: LayerNorm<W>,
    pub projection: Linear<W>,
}

pub struct TextTower<W> {
    pub token_embedding: W,
    pub positions: W,
    pub encoder: Encoder<W>,
    pub final_ln: LayerNorm<W>,
    pub projection: Linear<W>,
}

pub struct Clip<B: Backend> {
    pub backend: B,
    pub config: ClipConfig,
    pub vision: VisionTower<B::Weight>,
    pub text: TextTower<B::Weight>,
    /// The raw `logit_scale` parameter; logits use exp of it.
    pub logit_scale: f32,
}

/// Image features of a batch: projected, not normalised.
pub struct ImageFeatures {
    /// `[n, projection_dim]`.
    pub embeds: Vec<f32>,
    /// `[n, grid², projection_dim]` when asked for.
    pub local: Option<Vec<f32>>,
}

/// Reads tensors by name, checked for shape, and records which names were used.
struct Loader<'a, B: Backend> {
    file: &'a WeightsFile,
    backend: &'a B,
    used: BTreeSet<String>,
}

impl<B: Backend> Loader<'_, B> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<B::Weight> {
        self.used.insert(name.to_string());
        self.backend.weight(self.file.f32(name, shape)?)
    }

    fn linear(
        &mut self,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
    ) -> Result<Linear<B::Weight>> {
        Ok(Linear {
            weight: self.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?,
            bias: if bias {
                Some(self.get(&format!("{prefix}.bias"), &[out_dim])?)
            } else {
                None
            },
            out_dim,
            in_dim,
        })
    }

    fn norm(&mut self, prefix: &str, dim: usize) -> Result<LayerNorm<B::Weight>> {
        Ok(LayerNorm {
            gamma: self.get(&format!("{prefix}.weight"), &[dim])?,
            beta: self.get(&format!("{prefix}.bias"), &[dim])?,
        })
    }

    fn tower(&mut self, prefix: &str, config: &TowerConfig) -> Result<Encoder<B::Weight>> {
        let (d, i) = (config.hidden, config.intermediate);
        let blocks = (0..config.layers)
            .map(|l| {
                let p = format!("{prefix}.encoder.layers.{l}");
                Ok(Block {
                    ln1: self.norm(&format!("{p}.layer_norm1"), d)?,
                    q: self.linear(&format!("{p}.self_attn.q_proj"), d, d, true)?,
                    k: self.linear(&format!("{p}.self_attn.k_proj"), d, d, true)?,
                    v: self.linear(&format!("{p}.self_attn.v_proj"), d, d, true)?,
                    o: self.linear(&format!("{p}.self_attn.out_proj"), d, d, true)?,
                    ln2: self.norm(&format!("{p}.layer_norm2"), d)?,
                    fc1: self.linear(&format!("{p}.mlp.fc1"), i, d, true)?,
                    fc2: self.linear(&format!("{p}.mlp.fc2"), d, i, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Encoder {
            config: config.clone(),
            blocks,
        })
    }
}

impl<B: Backend> Clip<B> {
    /// Loads every tensor of an HF `CLIPModel` checkpoint; a missing, unexpected or misshapen
    /// tensor is an error naming it.
    pub fn load(backend: B, file: &WeightsFile, config: &ClipConfig) -> Result<Clip<B>> {
        let vc = &config.vision;
        let tc = &config.text;
        let (dv, dt, p) = (vc.tower.hidden, tc.tower.hidden, config.projection_dim);
        let mut l = Loader {
            file,
            backend: &backend,
            used: BTreeSet::new(),
        };
        let patch_len = vc.channels * vc.patch_size * vc.patch_size;
        let patch_name = "vision_model.embeddings.patch_embedding.weight";
        let patch = Linear {
            weight: l.get(patch_name, &[dv, vc.channels, vc.patch_size, vc.patch_size])?,
            bias: None,
            out_dim: dv,
            in_dim: patch_len,
        };
        let vision = VisionTower {
            patch,
            class_embedding: l.get("vision_model.embeddings.class_embedding", &[dv])?,
            positions: l.get(
                "vision_model.embeddings.position_embedding.weight",
                &[vc.tokens(), dv],
            )?,
            pre_ln: l.norm("vision_model.pre_layrnorm", dv)?,
            encoder: l.tower("vision_model", &vc.tower)?,
            post_ln: l.norm("vision_model.post_layernorm", dv)?,
            projection: l.linear("visual_projection", p, dv, false)?,
        };
        let text = TextTower {
            token_embedding: l.get(
                "text_model.embeddings.token_embedding.weight",
                &[tc.vocab_size, dt],
            )?,
            positions: l.get(
                "text_model.embeddings.position_embedding.weight",
                &[tc.context_length, dt],
            )?,
            encoder: l.tower("text_model", &tc.tower)?,
            final_ln: l.norm("text_model.final_layer_norm", dt)?,
            projection: l.linear("text_projection", p, dt, false)?,
        };
        let scale_shape = file.shape("logit_scale")?.to_vec();
        if scale_shape.iter().product::<usize>() != 1 || scale_shape.len() > 1 {
            return Err(Error::tensor(
                file.path(),
                "logit_scale",
                format!("shape {scale_shape:?}, expected [] or [1]"),
            ));
        }
        let logit_scale = file.f32("logit_scale", &scale_shape)?[0];
        l.used.insert("logit_scale".into());
        if let Some(extra) = file
            .tensors()
            .keys()
            .find(|n| !l.used.contains(*n) && !is_skipped_buffer(n))
        {
            return Err(Error::tensor(
                file.path(),
                extra,
                format!(
                    "unexpected: not part of a CLIPModel with these sizes ({} vision and {} text layers, sizes from {})",
                    vc.tower.layers, tc.tower.layers, config.source
                ),
            ));
        }
        Ok(Clip {
            backend,
            config: config.clone(),
            vision,
            text,
            logit_scale,
        })
    }

    fn linear(&self, x: &B::Tensor, rows: usize, lin: &Linear<B::Weight>) -> Result<B::Tensor> {
        self.backend.linear(
            x,
            rows,
            &lin.weight,
            lin.bias.as_ref(),
            lin.out_dim,
            lin.in_dim,
        )
    }

    /// The model's own Linear at `target` (no overrides).
    pub fn base_linear(&self, target: Target) -> Result<&Linear<B::Weight>> {
        let (tw, _) = self.tower(target.tower);
        if target.weight == WeightType::P {
            return Ok(match target.tower {
                Tower::Visual => &self.vision.projection,
                Tower::Text => &self.text.projection,
            });
        }
        let block = target
            .layer
            .and_then(|l| tw.blocks.get(l))
            .ok_or_else(|| Error::invalid(format!("{target}: no such layer")))?;
        Ok(match target.weight {
            WeightType::Q => &block.q,
            WeightType::K => &block.k,
            WeightType::V => &block.v,
            WeightType::O => &block.o,
            WeightType::Up => &block.fc1,
            WeightType::Down => &block.fc2,
            WeightType::P => unreachable!("handled above"),
        })
    }

    /// A search candidate's W' (bias unchanged) where the backend runs candidates that way
    /// ([`Backend::candidates_as_weights`]); None for the shared-product correction.
    fn candidate_weight(
        &self,
        base: &Linear<B::Weight>,
        entry: Option<&LinearOverride<B>>,
    ) -> Result<Option<B::Weight>> {
        match entry {
            Some(LinearOverride::Delta { vt, su, rank, .. })
                if self.backend.candidates_as_weights() =>
            {
                self.backend.lowrank_weight(
                    &base.weight,
                    &vt.weight,
                    su,
                    *rank,
                    base.out_dim,
                    base.in_dim,
                )
            }
            _ => Ok(None),
        }
    }

    /// A Linear of `tower` (layer `layer`, or the projection for `W_p`), honouring overrides.
    fn target_linear(
        &self,
        x: &B::Tensor,
        rows: usize,
        base: &Linear<B::Weight>,
        target: Target,
        ov: &Overrides<B>,
    ) -> Result<B::Tensor> {
        let entry = ov.get(&target);
        if let Some(w) = self.candidate_weight(base, entry)? {
            let b = base.bias.as_ref();
            return self
                .backend
                .linear(x, rows, &w, b, base.out_dim, base.in_dim);
        }
        match entry {
            None => self.linear(x, rows, base),
            Some(LinearOverride::Weight(w)) => self.linear(x, rows, w),
            Some(LinearOverride::Delta {
                vt,
                su,
                kmax,
                rank,
                memo,
            }) => {
                let shared = memo.next_or(|| {
                    Ok::<_, Error>((self.linear(x, rows, base)?, self.linear(x, rows, vt)?))
                })?;
                let (y0, xv) = (&shared.0, &shared.1);
                self.backend
                    .lowrank_correct(y0, xv, rows, *kmax, *rank, su, base.out_dim)
            }
        }
    }

    /// `h += ` the Linear of `target` applied to `x` (a block output joining the residual
    /// stream), fused by the backend when the Linear is a plain weight.
    fn target_linear_add(
        &self,
        h: &mut B::Tensor,
        x: &B::Tensor,
        rows: usize,
        base: &Linear<B::Weight>,
        target: Target,
        ov: &Overrides<B>,
    ) -> Result<()> {
        let entry = ov.get(&target);
        let candidate = self.candidate_weight(base, entry)?;
        let weight = match (&candidate, entry) {
            (Some(w), _) => w,
            (None, None) => &base.weight,
            (None, Some(LinearOverride::Weight(w))) => &w.weight,
            (None, Some(LinearOverride::Delta { .. })) => {
                let y = self.target_linear(x, rows, base, target, ov)?;
                return self.backend.add_assign(h, &y);
            }
        };
        // A materialised W' keeps the base bias, as does a candidate's.
        let bias = match entry {
            Some(LinearOverride::Weight(w)) => w.bias.as_ref(),
            _ => base.bias.as_ref(),
        };
        self.backend
            .linear_add(h, x, rows, weight, bias, base.out_dim, base.in_dim)
    }

    fn norm(
        &self,
        x: &B::Tensor,
        dim: usize,
        ln: &LayerNorm<B::Weight>,
        eps: f32,
    ) -> Result<B::Tensor> {
        self.backend.layer_norm(x, dim, &ln.gamma, &ln.beta, eps)
    }

    fn tower(&self, tower: Tower) -> (&Encoder<B::Weight>, &TowerConfig) {
        match tower {
            Tower::Visual => (&self.vision.encoder, &self.config.vision.tower),
            Tower::Text => (&self.text.encoder, &self.config.text.tower),
        }
    }

    /// `h += fc2(act(fc1(ln2(h))))` for block `layer` of `tower`.
    pub fn mlp_residual(
        &self,
        h: &mut B::Tensor,
        rows: usize,
        tower: Tower,
        layer: usize,
        ov: &Overrides<B>,
    ) -> Result<()> {
        let (tw, cfg) = self.tower(tower);
        let block = &tw.blocks[layer];
        let t = |weight| Target {
            tower,
            weight,
            layer: Some(layer),
        };
        let x = self.norm(h, cfg.hidden, &block.ln2, cfg.eps)?;
        let mut m = self.target_linear(&x, rows, &block.fc1, t(WeightType::Up), ov)?;
        self.backend.activate(&mut m, cfg.act)?;
        self.target_linear_add(h, &m, rows, &block.fc2, t(WeightType::Down), ov)
    }

    /// One full block of `tower` on `[batch·seq, hidden]` hidden states.
    #[allow(clippy::too_many_arguments)]
    pub fn block_forward(
        &self,
        h: &mut B::Tensor,
        tower: Tower,
        layer: usize,
        batch: usize,
        seq: usize,
        mask: &AttentionMask,
        ov: &Overrides<B>,
    ) -> Result<()> {
        self.attention_residual(h, tower, layer, batch, seq, mask, ov)?;
        self.mlp_residual(h, batch * seq, tower, layer, ov)
    }

    /// `h += out_proj(attention(ln1(h)))` for block `layer` of `tower`: the first half of a
    /// block (the search runs it once for candidates that only change the MLP).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_residual(
        &self,
        h: &mut B::Tensor,
        tower: Tower,
        layer: usize,
        batch: usize,
        seq: usize,
        mask: &AttentionMask,
        ov: &Overrides<B>,
    ) -> Result<()> {
        let (tw, cfg) = self.tower(tower);
        let block = &tw.blocks[layer];
        let t = |weight| Target {
            tower,
            weight,
            layer: Some(layer),
        };
        let rows = batch * seq;
        let x = self.norm(h, cfg.hidden, &block.ln1, cfg.eps)?;
        let q = self.target_linear(&x, rows, &block.q, t(WeightType::Q), ov)?;
        let k = self.target_linear(&x, rows, &block.k, t(WeightType::K), ov)?;
        let v = self.target_linear(&x, rows, &block.v, t(WeightType::V), ov)?;
        let shape = AttentionShape {
            batch,
            seq,
            queries: seq,
            heads: cfg.heads,
            head_dim: cfg.head_dim(),
        };
        let a = self.backend.attention(&q, &k, &v, shape, mask)?;
        self.target_linear_add(h, &a, rows, &block.o, t(WeightType::O), ov)
    }

    /// The vision tower's token states after `pre_layrnorm`: `[n · tokens, hidden]`.
    pub fn vision_embed(&self, pixels: &[f32], n: usize) -> Result<B::Tensor> {
        let vc = &self.config.vision;
        let want = n * vc.channels * vc.image_size * vc.image_size;
        if pixels.len() != want {
            return Err(Error::invalid(format!(
                "pixels: {} values for {n} images, expected {want}",
                pixels.len()
            )));
        }
        let px = self.backend.tensor_from(pixels)?;
        self.vision_embed_tensor(&px, n)
    }

    /// [`Clip::vision_embed`] of pixels already on the backend (`[n, channels, size, size]`).
    pub fn vision_embed_tensor(&self, px: &B::Tensor, n: usize) -> Result<B::Tensor> {
        let vc = &self.config.vision;
        let b = &self.backend;
        let patches = b.patchify(px, n, vc.channels, vc.image_size, vc.patch_size)?;
        let emb = self.linear(&patches, n * vc.grid() * vc.grid(), &self.vision.patch)?;
        let tokens = b.vision_tokens(
            &emb,
            n,
            &self.vision.class_embedding,
            &self.vision.positions,
            vc.tower.hidden,
        )?;
        let ln = &self.vision.pre_ln;
        b.layer_norm_stream(&tokens, vc.tower.hidden, &ln.gamma, &ln.beta, vc.tower.eps)
    }

    /// Runs vision blocks `layers` (all but the last block, which `vision_head` runs).
    pub fn vision_layers(
        &self,
        h: &mut B::Tensor,
        n: usize,
        layers: std::ops::Range<usize>,
        ov: &Overrides<B>,
    ) -> Result<()> {
        let t = self.config.vision.tokens();
        for l in layers {
            self.block_forward(h, Tower::Visual, l, n, t, &AttentionMask::default(), ov)?;
        }
        Ok(())
    }

    /// Global (and optionally local) image features of `n` preprocessed images
    /// (`[n, channels, size, size]`).
    pub fn encode_images(&self, pixels: &[f32], n: usize, local: bool) -> Result<ImageFeatures> {
        self.encode_images_with(pixels, n, local, &Overrides::none())
    }

    pub fn encode_images_with(
        &self,
        pixels: &[f32],
        n: usize,
        local: bool,
        ov: &Overrides<B>,
    ) -> Result<ImageFeatures> {
        let layers = self.config.vision.tower.layers;
        if layers == 0 {
            return Err(Error::invalid("the vision tower has no layers"));
        }
        let mut h = self.vision_embed(pixels, n)?;
        self.vision_layers(&mut h, n, 0..layers - 1, ov)?;
        self.vision_head(h, n, local, ov)
    }

    /// The last vision block and the projection, computing only what the features need: the
    /// class token's query and MLP for the pooled feature, and for the local features GL-MCM's
    /// value path on the patch tokens, `x + out_proj(v_proj(ln1(x)))` then the MLP residual,
    /// which reuses the block's own `v_proj(ln1(x))` and the same (possibly low-rank) weights.
    /// Takes the hidden states, whose storage the local features' value path reuses.
    pub fn vision_head(
        &self,
        h: B::Tensor,
        n: usize,
        local: bool,
        ov: &Overrides<B>,
    ) -> Result<ImageFeatures> {
        let (g, l) = self.vision_head_tensors(h, n, local, ov)?;
        let b = &self.backend;
        Ok(ImageFeatures {
            embeds: b.to_vec(&g)?,
            local: l.map(|l| b.to_vec(&l)).transpose()?,
        })
    }

    /// [`Clip::vision_head`] leaving the features on the backend: global `[n, proj]` and, when
    /// asked, local `[n · patches, proj]`.
    pub fn vision_head_tensors(
        &self,
        mut h: B::Tensor,
        n: usize,
        local: bool,
        ov: &Overrides<B>,
    ) -> Result<(B::Tensor, Option<B::Tensor>)> {
        let (b, cfg) = (&self.backend, &self.config.vision.tower);
        let layer = cfg.layers - 1;
        let block = &self.vision.encoder.blocks[layer];
        let t = |weight| Target {
            tower: Tower::Visual,
            weight,
            layer: Some(layer),
        };
        let proj = Target {
            tower: Tower::Visual,
            weight: WeightType::P,
            layer: None,
        };
        let tokens = self.config.vision.tokens();
        let rows = n * tokens;
        let cls_rows: Vec<usize> = (0..n).map(|i| i * tokens).collect();
        let xn = self.norm(&h, cfg.hidden, &block.ln1, cfg.eps)?;
        let k = self.target_linear(&xn, rows, &block.k, t(WeightType::K), ov)?;
        let v = self.target_linear(&xn, rows, &block.v, t(WeightType::V), ov)?;
        let q = self.target_linear(
            &b.gather_rows(&xn, cfg.hidden, &cls_rows)?,
            n,
            &block.q,
            t(WeightType::Q),
            ov,
        )?;
        let shape = AttentionShape {
            batch: n,
            seq: tokens,
            queries: 1,
            heads: cfg.heads,
            head_dim: cfg.head_dim(),
        };
        let a = b.attention(&q, &k, &v, shape, &AttentionMask::default())?;
        let mut cls = b.gather_rows(&h, cfg.hidden, &cls_rows)?;
        self.target_linear_add(&mut cls, &a, n, &block.o, t(WeightType::O), ov)?;
        self.mlp_residual(&mut cls, n, Tower::Visual, layer, ov)?;
        let cls = self.norm(&cls, cfg.hidden, &self.vision.post_ln, cfg.eps)?;
        let embeds = self.target_linear(&cls, n, &self.vision.projection, proj, ov)?;
        let local = if local {
            // The value path of every row, in the hidden states' own storage; then the patch
            // rows of the projected features. The class rows' value path is computed and
            // dropped (1/tokens of the work): cheaper than gathering the patch rows of the
            // stream and of v, both hidden-wide, before it.
            self.target_linear_add(&mut h, &v, rows, &block.o, t(WeightType::O), ov)?;
            self.mlp_residual(&mut h, rows, Tower::Visual, layer, ov)?;
            let val = self.norm(&h, cfg.hidden, &self.vision.post_ln, cfg.eps)?;
            drop(h);
            let all = self.target_linear(&val, rows, &self.vision.projection, proj, ov)?;
            let patch_rows: Vec<usize> = (0..n)
                .flat_map(|i| (1..tokens).map(move |j| i * tokens + j))
                .collect();
            let dim = self.config.projection_dim;
            Some(b.gather_rows(&all, dim, &patch_rows)?)
        } else {
            None
        };
        Ok((embeds, local))
    }

    /// Where HF pools each sequence: the first EOS id, or the argmax of the ids for legacy
    /// configs whose `eos_token_id` is 2.
    pub fn eos_positions(&self, ids: &[u32], seq: usize) -> Vec<usize> {
        let eos = self.config.text.eos_token_id;
        ids.chunks(seq)
            .map(|row| {
                if eos == 2 {
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&x| x == max).unwrap_or(0)
                } else {
                    row.iter().position(|&x| x as usize == eos).unwrap_or(0)
                }
            })
            .collect()
    }

    /// Token + position embeddings of a padded batch of ids `[n, seq]`, checked.
    pub fn text_embed(&self, ids: &[u32], lengths: &[usize], seq: usize) -> Result<B::Tensor> {
        let tc = &self.config.text;
        if seq == 0 || ids.len() % seq != 0 || ids.len() / seq != lengths.len() {
            return Err(Error::invalid(format!(
                "text batch: {} ids, {} lengths and sequence length {seq} do not agree",
                ids.len(),
                lengths.len()
            )));
        }
        if seq > tc.context_length {
            return Err(Error::invalid(format!(
                "{seq} tokens exceed the context length {}",
                tc.context_length
            )));
        }
        self.backend.text_tokens(
            ids,
            seq,
            &self.text.token_embedding,
            &self.text.positions,
            tc.tower.hidden,
        )
    }

    /// Runs text blocks `layers` (causal + padding masks).
    pub fn text_layers(
        &self,
        h: &mut B::Tensor,
        lengths: &[usize],
        seq: usize,
        layers: std::ops::Range<usize>,
        ov: &Overrides<B>,
    ) -> Result<()> {
        let mask = text_mask(lengths);
        for l in layers {
            self.block_forward(h, Tower::Text, l, lengths.len(), seq, &mask, ov)?;
        }
        Ok(())
    }

    /// Final LayerNorm at the pooled (EOS) positions and the text projection.
    pub fn text_head(
        &self,
        h: &B::Tensor,
        ids: &[u32],
        seq: usize,
        ov: &Overrides<B>,
    ) -> Result<Vec<f32>> {
        self.backend
            .to_vec(&self.text_head_tensor(h, ids, seq, ov)?)
    }

    /// [`Clip::text_head`], left on the backend: `[n, projection_dim]`.
    pub fn text_head_tensor(
        &self,
        h: &B::Tensor,
        ids: &[u32],
        seq: usize,
        ov: &Overrides<B>,
    ) -> Result<B::Tensor> {
        let cfg = &self.config.text.tower;
        let b = &self.backend;
        let rows: Vec<usize> = self
            .eos_positions(ids, seq)
            .iter()
            .enumerate()
            .map(|(i, p)| i * seq + p)
            .collect();
        let pooled = b.gather_rows(h, cfg.hidden, &rows)?;
        let pooled = self.norm(&pooled, cfg.hidden, &self.text.final_ln, cfg.eps)?;
        let proj = Target {
            tower: Tower::Text,
            weight: WeightType::P,
            layer: None,
        };
        self.target_linear(&pooled, rows.len(), &self.text.projection, proj, ov)
    }

    /// Text features of a padded batch of token ids `[n, seq]` with each row's real length.
    pub fn encode_text(&self, ids: &[u32], lengths: &[usize], seq: usize) -> Result<Vec<f32>> {
        self.encode_text_with(ids, lengths, seq, &Overrides::none())
    }

    pub fn encode_text_with(
        &self,
        ids: &[u32],
        lengths: &[usize],
        seq: usize,
        ov: &Overrides<B>,
    ) -> Result<Vec<f32>> {
        let mut h = self.text_embed(ids, lengths, seq)?;
        self.text_layers(&mut h, lengths, seq, 0..self.config.text.tower.layers, ov)?;
        self.text_head(&h, ids, seq, ov)
    }
}

/// The text tower's attention mask: causal, and padding past each sequence's length.
pub fn text_mask(lengths: &[usize]) -> AttentionMask {
    AttentionMask {
        causal: true,
        lengths: Some(lengths.to_vec()),
    }
}

/// L2-normalises each row of `x[_, dim]` in place.
pub fn l2_normalize_rows(x: &mut [f32], dim: usize) {
    for row in x.chunks_mut(dim) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= norm);
    }
}

/// `exp(logit_scale) · cos(image, text)`: `[n_images, n_texts]` from unnormalised features.
pub fn logits(image: &[f32], text: &[f32], dim: usize, logit_scale: f32) -> Vec<f32> {
    let mut a = image.to_vec();
    let mut t = text.to_vec();
    l2_normalize_rows(&mut a, dim);
    l2_normalize_rows(&mut t, dim);
    let (n, m) = (a.len() / dim, t.len() / dim);
    let mut out = vec![0.0; n * m];
    crate::backend::blas::sgemm(
        n,
        m,
        dim,
        logit_scale.exp(),
        &a,
        dim,
        &t,
        dim,
        crate::backend::blas::Rhs::Transposed,
        0.0,
        &mut out,
        m,
    );
    out
}
