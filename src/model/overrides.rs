//! Low-rank replacements of some weights during a forward pass, without touching the loaded
//! model: materialised weights for decided settings, and for the target being searched a
//! correction that shares x·Wᵀ and x·V between all candidate ratios.

use crate::backend::Backend;
use crate::lowrank::Target;
use crate::model::clip::Linear;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// How one target's Linear is computed.
pub enum LinearOverride<'a, B: Backend> {
    /// A materialised W' (bias unchanged).
    Weight(&'a Linear<B::Weight>),
    /// `x·W'ᵀ + b = (x·Wᵀ + b) − (x·V)[:, :rank] · SU[:rank]`: `vt` holds the `kmax` removed
    /// right singular vectors as rows `[kmax, in]`, `su` the matching σᵢuᵢ `[kmax, out]`;
    /// nested ratios use prefixes. `memo` keeps x·Wᵀ + b and x·V per call site. A backend
    /// whose [`Backend::candidates_as_weights`] is true runs x·W'ᵀ + b instead, W' made from
    /// the same factors.
    Delta {
        vt: &'a Linear<B::Weight>,
        su: &'a B::Weight,
        kmax: usize,
        rank: usize,
        memo: &'a DeltaMemo<B::Tensor>,
    },
}

/// The shared products of the current target, per call site (the k-th time the target's
/// Linear runs in one forward pass). Valid for one set of inputs: the search makes a fresh memo
/// per chunk of images and rewinds it before each candidate.
pub struct DeltaMemo<T> {
    entries: Mutex<Vec<std::sync::Arc<(T, T)>>>,
    next: AtomicUsize,
}

impl<T> Default for DeltaMemo<T> {
    fn default() -> Self {
        DeltaMemo {
            entries: Mutex::new(Vec::new()),
            next: AtomicUsize::new(0),
        }
    }
}

impl<T> DeltaMemo<T> {
    /// Starts a new forward pass over the same inputs.
    pub fn rewind(&self) {
        self.next.store(0, Ordering::SeqCst);
    }

    /// The products of the next call site, computed by `make` the first time.
    pub fn next_or<E>(
        &self,
        make: impl FnOnce() -> Result<(T, T), E>,
    ) -> Result<std::sync::Arc<(T, T)>, E> {
        let i = self.next.fetch_add(1, Ordering::SeqCst);
        let mut entries = self.entries.lock().expect("memo lock");
        if i < entries.len() {
            return Ok(entries[i].clone());
        }
        let made = std::sync::Arc::new(make()?);
        entries.push(made.clone());
        Ok(made)
    }
}

/// The overrides of one forward pass.
pub struct Overrides<'a, B: Backend> {
    map: HashMap<Target, LinearOverride<'a, B>>,
}

impl<'a, B: Backend> Default for Overrides<'a, B> {
    fn default() -> Self {
        Overrides {
            map: HashMap::new(),
        }
    }
}

impl<'a, B: Backend> Overrides<'a, B> {
    pub fn none() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, target: Target, o: LinearOverride<'a, B>) {
        self.map.insert(target, o);
    }

    pub fn get(&self, target: &Target) -> Option<&LinearOverride<'a, B>> {
        self.map.get(target)
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
