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
pub mod data;
pub mod embed;
pub mod hub;
pub mod jobs;
pub mod loss;
pub mod lowrank;
pub mod metrics;
pub mod model;
pub mod progress;
pub mod report;
pub mod score;
pub mod search;
pub mod weights;
