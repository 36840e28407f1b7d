//! The search against the reference procedure (tests/fixtures/make_search_fixtures.py: HF
//! transformers, settings re-applied from the original weights per candidate, torch SVD, the
//! reference's per-batch loss averaging): same ratio at every step, each candidate's objective
//! within 1e-5 relative. Also: the cached search and the naive one agree.

mod common;

use common::search_fixture::{load, rel, run, TOLERANCE};
use setar_engine::backend::cpu::CpuBackend;

fn check_against_reference(name: &str) {
    let f = load(name, CpuBackend::new());
    let ours = run(&f, false);
    common::search_fixture::check_against_reference(name, &f.json, &ours, TOLERANCE);
}

#[test]
fn visual_text_locoop_matches_reference() {
    check_against_reference("vt_locoop_minor");
}

#[test]
fn text_visual_loss_id_matches_reference() {
    check_against_reference("tv_lossid_minor");
}

#[test]
fn modality_interleaved_auroc_matches_reference() {
    check_against_reference("mi_auroc_glmcm_minor");
}

#[test]
fn visual_only_predicted_label_matches_reference() {
    check_against_reference("vo_locoop_pred_minor");
}

#[test]
fn layer_exhaustive_principal_matches_reference() {
    check_against_reference("le_locoop_pred_principal");
}

#[test]
fn text_only_loss_ood_matches_reference() {
    check_against_reference("to_lossood_minor");
}

#[test]
fn cached_and_naive_searches_agree() {
    let f = load("vt_locoop_minor", CpuBackend::new());
    let cached = run(&f, false);
    let naive = run(&f, true);
    for (a, b) in cached.steps.iter().zip(&naive.steps) {
        assert_eq!(a.chosen, b.chosen, "step {}", a.step);
        for (x, y) in a.candidates.iter().zip(&b.candidates) {
            assert!(
                rel(x.value, y.value) <= 1e-6,
                "step {} ratio {}: {} vs {}",
                a.step,
                x.ratio,
                x.value,
                y.value
            );
        }
    }
}
