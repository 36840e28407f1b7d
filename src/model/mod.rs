//! The CLIP model, written once against the `Backend` trait.

pub mod clip;
pub mod random;

pub use clip::{Clip, ImageFeatures};
pub mod overrides;
pub mod prompts;
