//! How many images a chunk of the search may hold under a device memory budget
//! (`--max-memory`): the weights and the cached features stay for the whole search; each image
//! of a chunk adds the activations of one vision block (the largest tower) at a time.

use crate::config::ClipConfig;
use crate::error::{Error, Result};

/// A size such as `24G`, `24GiB`, `24GB`, `512M`, `1.5g` or a plain byte count; K/M/G/T are
/// binary (GiB = 2³⁰ bytes) whatever the spelling, as GPU memory is quoted.
pub fn parse_bytes(s: &str) -> Result<usize> {
    let t = s.trim().to_ascii_lowercase();
    let t = t
        .strip_suffix("ib")
        .or_else(|| t.strip_suffix('b'))
        .unwrap_or(&t);
    let (num, shift) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 10),
        Some('m') => (&t[..t.len() - 1], 20),
        Some('g') => (&t[..t.len() - 1], 30),
        Some('t') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| Error::invalid(format!("--max-memory {s}: not a size (e.g. 24G, 512M)")))?;
    if !v.is_finite() || v <= 0.0 {
        return Err(Error::invalid(format!(
            "--max-memory {s}: must be positive"
        )));
    }
    Ok((v * (1u64 << shift) as f64) as usize)
}

/// Peak bytes one image of a chunk adds in a vision block during the search: the hidden
/// states and the candidate's copy, LayerNorm, q/k/v, attention scores (f32) and
/// probabilities, attention and output projections, the MLP's hidden layer twice (the block
/// output and the low-rank candidate's shared x·Wᵀ), and the MLP output.
pub fn vision_bytes_per_image(c: &ClipConfig, value_bytes: usize) -> usize {
    let v = &c.vision.tower;
    let t = c.vision.tokens();
    let rows = value_bytes * t * (9 * v.hidden + 2 * v.intermediate);
    let attention = v.heads * t * t * (4 + value_bytes);
    rows + attention
}

/// Peak bytes one token of a text batch adds in a text block during the search, counted as
/// [`vision_bytes_per_image`] counts an image's tokens (`seq`: the batch's padded length).
pub fn text_bytes_per_token(c: &ClipConfig, value_bytes: usize, seq: usize) -> usize {
    let t = &c.text.tower;
    value_bytes * (9 * t.hidden + 2 * t.intermediate) + t.heads * seq * (4 + value_bytes)
}

/// How many of a text step's `candidates` run stacked in one batch through the text tower
/// (`tokens` per candidate in the largest prompt batch, padded to `seq`): as many as fit in
/// the activations of a vision chunk of `chunk` images, which the search holds only while
/// the vision tower runs (so a budget that fits the chunk fits the stack); at least 1.
pub fn text_stack(
    c: &ClipConfig,
    value_bytes: usize,
    chunk: usize,
    tokens: usize,
    seq: usize,
    candidates: usize,
) -> usize {
    let room = chunk.max(1) * vision_bytes_per_image(c, value_bytes);
    let per = (tokens * text_bytes_per_token(c, value_bytes, seq)).max(1);
    (room / per).clamp(1, candidates.max(1))
}

/// Every how many vision layers the search keeps the hidden states entering a layer
/// (⌈√layers⌉: a step then re-runs at most that many − 1 blocks below its target).
pub fn checkpoint_stride(layers: usize) -> usize {
    ((layers as f64).sqrt().ceil() as usize).max(1)
}

/// The layers whose entering hidden states the search keeps besides layer 0: the multiples
/// of [`checkpoint_stride`] below the last layer (which the head runs).
pub fn checkpoint_layers(layers: usize) -> Vec<usize> {
    let stride = checkpoint_stride(layers);
    (1..layers).filter(|l| l % stride == 0).collect()
}

/// Every layer above the first: a top-down search then re-runs no block below its target.
pub fn every_layer(layers: usize) -> Vec<usize> {
    (1..layers).collect()
}

/// Bytes of one layer's entering hidden states for `images` images (the residual stream, f32
/// on every backend).
pub fn state_bytes(c: &ClipConfig, images: usize) -> usize {
    4 * images * c.vision.tokens() * c.vision.tower.hidden
}

/// Bytes held for the whole search: the weights; the normalised global and local image
/// features of `images` images (cached while the text tower is searched); and the vision
/// hidden states of every image entering layer 0 and `kept` more layers.
pub fn resident_bytes(
    c: &ClipConfig,
    params: usize,
    value_bytes: usize,
    images: usize,
    kept: usize,
) -> usize {
    let patches = c.vision.grid() * c.vision.grid();
    value_bytes * (params + images * (patches + 1) * c.projection_dim)
        + (1 + kept) * state_bytes(c, images)
}

/// What fits under `budget` bytes, with a 10% margin for the libraries' workspaces.
fn usable(budget: usize) -> usize {
    budget - budget / 10
}

/// Whether the states of `kept` layers fit under `budget` beside chunks of `batch` images.
fn states_fit(
    c: &ClipConfig,
    params: usize,
    value_bytes: usize,
    images: usize,
    batch: usize,
    budget: usize,
    kept: usize,
) -> bool {
    let chunk = batch.clamp(1, images.max(1));
    resident_bytes(c, params, value_bytes, images, kept)
        + chunk * vision_bytes_per_image(c, value_bytes)
        <= usable(budget)
}

/// Whether the vision checkpoints fit under `budget` beside chunks of `batch` images. They
/// only save work, so they give way to the chunk size: a search keeps them when they fit.
pub fn keep_checkpoints(
    c: &ClipConfig,
    params: usize,
    value_bytes: usize,
    images: usize,
    batch: usize,
    budget: usize,
) -> bool {
    let kept = checkpoint_layers(c.vision.tower.layers).len();
    states_fit(c, params, value_bytes, images, batch, budget, kept)
}

/// The vision layers whose entering states a search keeps besides layer 0:
/// - [`every_layer`] where the backend has `room` for them (bytes beyond the checkpoints'; a
///   device with memory to spare, see [`crate::backend::Backend::room_for_vision_states`])
///   and they fit under `budget`;
/// - else the [`checkpoint_layers`] if they fit under `budget` (or there is none);
/// - else none (only the embedded tokens).
///
/// All three give the same values; each keeps more states and re-runs fewer blocks per step.
pub fn vision_state_layers(
    c: &ClipConfig,
    params: usize,
    value_bytes: usize,
    images: usize,
    batch: usize,
    budget: Option<usize>,
    room: Option<usize>,
) -> Vec<usize> {
    let layers = c.vision.tower.layers;
    let fits = |kept: &[usize]| {
        budget.is_none_or(|b| states_fit(c, params, value_bytes, images, batch, b, kept.len()))
    };
    let (every, sparse) = (every_layer(layers), checkpoint_layers(layers));
    if let Some(room) = room {
        let extra = (every.len() - sparse.len()) * state_bytes(c, images);
        if extra <= room && fits(&every) {
            return every;
        }
    }
    if fits(&sparse) {
        sparse
    } else {
        Vec::new()
    }
}

/// The chunk size under `budget` bytes: `requested` when it fits (with the vision
/// checkpoints if they fit beside it, see [`keep_checkpoints`]), else lowered to what fits
/// without them; an error when not even one image fits.
pub fn fit_batch(
    c: &ClipConfig,
    params: usize,
    value_bytes: usize,
    images: usize,
    requested: usize,
    budget: usize,
) -> Result<usize> {
    if keep_checkpoints(c, params, value_bytes, images, requested, budget) {
        return Ok(requested.max(1));
    }
    let resident = resident_bytes(c, params, value_bytes, images, 0);
    let usable = usable(budget);
    let per = vision_bytes_per_image(c, value_bytes);
    if resident + per > usable {
        return Err(Error::invalid(format!(
            "--max-memory {:.2} GiB is too small: the weights and cached features of {images} images take {:.2} GiB, and one image's activations {:.1} MiB more",
            budget as f64 / (1u64 << 30) as f64,
            resident as f64 / (1u64 << 30) as f64,
            per as f64 / (1u64 << 20) as f64
        )));
    }
    Ok(requested.clamp(1, (usable - resident) / per))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_bytes("24G").unwrap(), 24 << 30);
        assert_eq!(parse_bytes("24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_bytes("24gb").unwrap(), 24 << 30);
        assert_eq!(parse_bytes("512M").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        for bad in ["", "G", "-1G", "lots", "0"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_stacks_fit_in_a_vision_chunk() {
        let c = crate::model::random::preset("vit-b-16").unwrap();
        // ImageNet's 1000 prompts in one batch of 16 tokens beside a chunk of 512 images in
        // bf16: all 8 candidates of a step fit.
        assert_eq!(text_stack(&c, 2, 512, 16_000, 16, 8), 8);
        // A chunk of one image holds less than one candidate's batch: still one at a time.
        assert_eq!(text_stack(&c, 2, 1, 16_000, 16, 8), 1);
        // In between, the stack is what fits.
        let per = 16_000 * text_bytes_per_token(&c, 4, 16);
        let chunk = 3 * per / vision_bytes_per_image(&c, 4) + 1;
        assert_eq!(text_stack(&c, 4, chunk, 16_000, 16, 8), 3);
        assert_eq!(text_stack(&c, 4, 1 << 20, 16_000, 16, 0), 1);
    }

    #[test]
    fn checkpoints_split_the_tower_evenly() {
        assert_eq!(checkpoint_layers(12), vec![4, 8]);
        assert_eq!(checkpoint_layers(24), vec![5, 10, 15, 20]);
        assert_eq!(checkpoint_layers(3), vec![2]);
        assert!(checkpoint_layers(1).is_empty());
    }

    #[test]
    fn batch_shrinks_to_the_budget_and_fails_when_nothing_fits() {
        let c = crate::model::random::preset("vit-l-14").unwrap();
        let params = 428_000_000;
        let per = vision_bytes_per_image(&c, 2);
        let budget = 24usize << 30;
        let usable = budget - budget / 10;
        // 10k images and a chunk too large for the budget: lowered to what fits without the
        // checkpoints (which alone would pass it).
        let resident = resident_bytes(&c, params, 2, 10_000, 0);
        let b = fit_batch(&c, params, 2, 10_000, 100_000, budget).unwrap();
        assert!(b >= 1 && resident + b * per <= usable);
        assert!(resident + (b + 1) * per > usable);
        assert!(!keep_checkpoints(&c, params, 2, 10_000, b, budget));
        // The search's default chunk fits beside the checkpoints under 24 GiB.
        assert_eq!(fit_batch(&c, params, 2, 1000, 512, budget).unwrap(), 512);
        assert!(keep_checkpoints(&c, params, 2, 1000, 512, budget));
        assert!(fit_batch(&c, params, 2, 1000, 32, 1 << 30).is_err());
    }

    #[test]
    fn checkpoints_give_way_to_the_chunk() {
        let c = crate::model::random::preset("vit-l-14").unwrap();
        let params = 428_000_000;
        let per = vision_bytes_per_image(&c, 2);
        let with = resident_bytes(&c, params, 2, 1000, 4);
        let without = resident_bytes(&c, params, 2, 1000, 0);
        // Four checkpoint layers of 1000 × 257 × 1024 f32 states.
        assert_eq!(with - without, 4 * 4 * 1000 * 257 * 1024);
        // A budget where 512 images fit only without the checkpoints: the chunk stays 512
        // and the checkpoints go.
        let budget = ((without + 512 * per) as f64 / 0.9) as usize + (1 << 20);
        assert!(with + 512 * per > budget - budget / 10);
        assert_eq!(fit_batch(&c, params, 2, 1000, 512, budget).unwrap(), 512);
        assert!(!keep_checkpoints(&c, params, 2, 1000, 512, budget));
        // Fewer images than the chunk: only the images count.
        assert!(keep_checkpoints(&c, params, 2, 40, 512, 24 << 30));
    }

    #[test]
    fn every_layer_is_kept_where_the_device_has_room() {
        let c = crate::model::random::preset("vit-b-16").unwrap();
        let params = 150_000_000;
        let one = state_bytes(&c, 1000);
        assert_eq!(one, 4 * 1000 * 197 * 768);
        assert_eq!(every_layer(12), (1..12).collect::<Vec<_>>());
        let extra = (11 - 2) * one;
        let plan = |budget, room| vision_state_layers(&c, params, 2, 1000, 250, budget, room);
        // No room given (the CPU): the checkpoints, as before.
        assert_eq!(plan(None, None), vec![4, 8]);
        // Room for the 9 more states: every layer; one byte less: the checkpoints.
        assert_eq!(plan(None, Some(extra)), every_layer(12));
        assert_eq!(plan(None, Some(extra - 1)), vec![4, 8]);
        // A budget holds them back too: one where every layer fits exactly, then a byte less.
        let need = resident_bytes(&c, params, 2, 1000, 11) + 250 * vision_bytes_per_image(&c, 2);
        let budget = (need as f64 / 0.9).ceil() as usize + 16;
        assert!(need <= usable(budget));
        assert_eq!(plan(Some(budget), Some(usize::MAX)), every_layer(12));
        let tight = resident_bytes(&c, params, 2, 1000, 2) + 250 * vision_bytes_per_image(&c, 2);
        let budget = (tight as f64 / 0.9).ceil() as usize + 16;
        assert_eq!(plan(Some(budget), Some(usize::MAX)), vec![4, 8]);
        // Not even the checkpoints: only the embedded tokens.
        let bare = resident_bytes(&c, params, 2, 1000, 0) + 250 * vision_bytes_per_image(&c, 2);
        let budget = (bare as f64 / 0.9).ceil() as usize + 16;
        assert!(plan(Some(budget), Some(usize::MAX)).is_empty());
        // CLIP-L/14 under 24 GiB: its 23 states (25 GB) do not fit, its 4 checkpoints do.
        let l = crate::model::random::preset("vit-l-14").unwrap();
        let kept =
            vision_state_layers(&l, 428_000_000, 2, 1000, 512, Some(24 << 30), Some(1 << 40));
        assert_eq!(kept, checkpoint_layers(24));
    }
}
