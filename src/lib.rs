//! setar-engine: SeTAR out-of-distribution detection with a hand-written CLIP.
//!
//! Data flows one way: files → weights/config → model on a backend → features/logits →
//! loss or scores → metrics → report.

pub mod error;
pub mod image;
pub mod tokenizer;

pub use error::{Error, Result};
pub mod backend;
pub mod config;
pub mod embed;
pub mod model;
pub mod progress;
pub mod weights;
pub mod hub;
pub mod loss;
pub mod metrics;
pub mod score;
