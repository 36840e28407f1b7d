//! The LoCoOp loss, the OOD scores and the OOD metrics against the oracles of
//! `tests/fixtures/make_metric_fixtures.py` (sklearn, and numpy versions of the reference's
//! formulas), plus the error cases.

mod common;

use serde_json::Value;
use setar_engine::loss::{
    self, batch_stats, image_stats, image_stats_with_mask, ood_patch_mask, reduce, Averaging,
    ImageStats, LocoopConfig, LocoopPreset, LossParts,
};
use setar_engine::metrics::{self, ood_metrics, OodMetrics};
use setar_engine::score::{self, ood_patch_scores, scores, Scorer};
use std::collections::HashMap;
use std::sync::OnceLock;

// ------------------------------------------------------------------------------- fixtures

struct Fixtures {
    cases: Value,
    f32s: HashMap<String, Vec<f32>>,
    f64s: HashMap<String, Vec<f64>>,
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let dir = common::fixtures().join("metrics");
        let cases: Value =
            serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
        let bytes = std::fs::read(dir.join("logits.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut f32s = HashMap::new();
        let mut f64s = HashMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            match view.dtype() {
                safetensors::Dtype::F32 => {
                    let v = data
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect();
                    f32s.insert(name, v);
                }
                safetensors::Dtype::F64 => {
                    let v = data
                        .chunks_exact(8)
                        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                        .collect();
                    f64s.insert(name, v);
                }
                d => panic!("{name}: unexpected dtype {d:?}"),
            }
        }
        Fixtures { cases, f32s, f64s }
    })
}

/// One loss/score case: logits and settings.
struct LogitCase<'a> {
    json: &'a Value,
    name: &'a str,
    n: usize,
    p: usize,
    c: usize,
    labels: Vec<usize>,
    global: &'a [f32],
    local: &'a [f32],
    cfg: LocoopConfig,
}

impl LogitCase<'_> {
    fn global(&self, i: usize) -> &[f32] {
        &self.global[i * self.c..(i + 1) * self.c]
    }
    fn local(&self, i: usize) -> &[f32] {
        &self.local[i * self.p * self.c..(i + 1) * self.p * self.c]
    }
    fn ood_label(&self, i: usize) -> usize {
        if self.cfg.use_pred_label {
            loss::predicted_label(self.global(i))
        } else {
            self.labels[i]
        }
    }
}

fn logit_cases() -> Vec<LogitCase<'static>> {
    let f = fixtures();
    f.cases["logit_cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            let u = |k: &str| j[k].as_u64().unwrap() as usize;
            let tensor = j["tensor"].as_str().unwrap();
            let cfg = LocoopConfig {
                lambda: j["lambda"].as_f64().unwrap(),
                top_k: u("top_k"),
                use_pred_label: j["use_pred_label"].as_bool().unwrap(),
                averaging: Averaging::PerBatch(u("batch")),
            };
            let case = LogitCase {
                json: j,
                name: j["name"].as_str().unwrap(),
                n: u("images"),
                p: u("patches"),
                c: u("classes"),
                labels: usizes(&j["labels"]),
                global: &f.f32s[&format!("{tensor}.global")],
                local: &f.f32s[&format!("{tensor}.local")],
                cfg,
            };
            assert_eq!(case.global.len(), case.n * case.c);
            assert_eq!(case.local.len(), case.n * case.p * case.c);
            case
        })
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

// ---------------------------------------------------------------------------- comparisons

/// Tracks the worst relative error (|a − b| / max(|b|, floor)) over many comparisons.
struct Worst {
    what: &'static str,
    tol: f64,
    floor: f64,
    worst: f64,
    at: String,
    count: usize,
}

impl Worst {
    fn new(what: &'static str, tol: f64, floor: f64) -> Self {
        Worst {
            what,
            tol,
            floor,
            worst: 0.0,
            at: String::new(),
            count: 0,
        }
    }

    fn check(&mut self, got: f64, want: f64, at: impl FnOnce() -> String) {
        self.count += 1;
        let err = if got == want {
            0.0
        } else {
            (got - want).abs() / want.abs().max(self.floor)
        };
        let err = if err.is_nan() { f64::INFINITY } else { err };
        if err > self.worst {
            self.worst = err;
            self.at = format!("{}: got {got:e}, want {want:e}", at());
        }
    }

    fn assert(&self) {
        println!(
            "{}: {} comparisons, worst relative error {:.3e} {}",
            self.what, self.count, self.worst, self.at
        );
        assert!(self.count > 0, "{}: nothing compared", self.what);
        assert!(
            self.worst <= self.tol,
            "{}: worst relative error {:.3e} > {:.1e} at {}",
            self.what,
            self.worst,
            self.tol,
            self.at
        );
    }
}

fn parts_fields(p: &LossParts) -> [(&'static str, f64); 5] {
    [
        ("locoop_loss", p.locoop_loss),
        ("loss_id", p.loss_id),
        ("loss_ood", p.loss_ood),
        ("acc", p.acc),
        ("ood_patch_percent", p.ood_patch_percent),
    ]
}

// ------------------------------------------------------------------------------------ loss

#[test]
fn image_stats_and_masks_match_the_oracle() {
    let mut ce = Worst::new("cross-entropy", 1e-9, 1e-3);
    let mut ent = Worst::new("entropy sum", 1e-6, 1e-3);
    let mut images = 0;
    for case in logit_cases() {
        let Some(stats) = case.json.get("image_stats") else {
            continue;
        };
        let want_ce = f64s(&stats["ce"]);
        let want_ent = f64s(&stats["entropy_sum"]);
        let want_ood = usizes(&stats["ood_patches"]);
        let want_correct: Vec<bool> = stats["correct"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_bool().unwrap())
            .collect();
        let mut mask = Vec::new();
        for i in 0..case.n {
            let s = image_stats_with_mask(
                case.global(i),
                case.local(i),
                case.c,
                case.labels[i],
                &case.cfg,
                &mut mask,
            )
            .unwrap();
            let at = || format!("{} image {i}", case.name);
            ce.check(s.ce, want_ce[i], at);
            ent.check(s.entropy_sum, want_ent[i], at);
            assert_eq!(s.ood_patches, want_ood[i], "{}", at());
            assert_eq!(s.patches, case.p, "{}", at());
            assert_eq!(s.correct, want_correct[i], "{}", at());
            let want_mask: Vec<bool> = usizes(&stats["mask"][i])
                .into_iter()
                .map(|m| m == 1)
                .collect();
            assert_eq!(mask, want_mask, "mask of {}", at());
            // The standalone mask agrees.
            let alone =
                ood_patch_mask(case.local(i), case.c, case.ood_label(i), case.cfg.top_k).unwrap();
            assert_eq!(alone, want_mask, "standalone mask of {}", at());
            // image_stats is image_stats_with_mask.
            let plain = image_stats(
                case.global(i),
                case.local(i),
                case.c,
                case.labels[i],
                &case.cfg,
            )
            .unwrap();
            assert_eq!(plain, s);
            images += 1;
        }
    }
    assert!(images > 50);
    ce.assert();
    ent.assert();
}

#[test]
fn reduced_loss_matches_the_oracle_per_batch_and_whole_set() {
    let mut w = Worst::new("loss parts", 1e-6, 1e-3);
    let mut differ = false;
    for case in logit_cases() {
        let stats = batch_stats(case.global, case.local, &case.labels, case.c, &case.cfg).unwrap();
        assert_eq!(stats.len(), case.n);
        for (averaging, key) in [
            (case.cfg.averaging, "per_batch"),
            (Averaging::WholeSet, "whole_set"),
        ] {
            let cfg = LocoopConfig {
                averaging,
                ..case.cfg
            };
            let got = reduce(&stats, &cfg).unwrap();
            let want = &case.json["losses"][key];
            for (field, v) in parts_fields(&got) {
                w.check(v, want[field].as_f64().unwrap(), || {
                    format!("{} {key} {field}", case.name)
                });
            }
        }
        let pb = &case.json["losses"]["per_batch"]["loss_ood"];
        let ws = &case.json["losses"]["whole_set"]["loss_ood"];
        differ |= (pb.as_f64().unwrap() - ws.as_f64().unwrap()).abs() > 1e-3;
    }
    assert!(differ, "no case tells per-batch from whole-set averaging");
    w.assert();
}

#[test]
fn batch_stats_equals_image_stats_one_by_one() {
    for case in logit_cases() {
        let all = batch_stats(case.global, case.local, &case.labels, case.c, &case.cfg).unwrap();
        for (i, s) in all.iter().enumerate() {
            let one = image_stats(
                case.global(i),
                case.local(i),
                case.c,
                case.labels[i],
                &case.cfg,
            )
            .unwrap();
            assert_eq!(*s, one, "{} image {i}", case.name);
        }
    }
}

#[test]
fn reduce_weighs_batches_by_size() {
    // Two batches: 2 images with entropy 1 per OOD patch, 1 image with entropy 4.
    let s = |ent: f64, ood: usize, correct: bool| ImageStats {
        ce: 1.0,
        entropy_sum: ent,
        ood_patches: ood,
        patches: 4,
        correct,
    };
    let stats = [s(2.0, 2, true), s(1.0, 1, false), s(8.0, 2, true)];
    let cfg = LocoopConfig {
        lambda: 0.5,
        top_k: 1,
        use_pred_label: false,
        averaging: Averaging::PerBatch(2),
    };
    let got = reduce(&stats, &cfg).unwrap();
    // batch 1: loss_ood −1; batch 2: −4 → (2·(−1) + 1·(−4)) / 3 = −2.
    assert!((got.loss_ood + 2.0).abs() < 1e-15, "{got:?}");
    assert!((got.locoop_loss - 0.0).abs() < 1e-15, "{got:?}");
    assert!((got.acc - 200.0 / 3.0).abs() < 1e-12);
    assert!((got.ood_patch_percent - 100.0 * 5.0 / 12.0).abs() < 1e-12);
    let whole = reduce(
        &stats,
        &LocoopConfig {
            averaging: Averaging::WholeSet,
            ..cfg
        },
    )
    .unwrap();
    assert!((whole.loss_ood + 11.0 / 5.0).abs() < 1e-15);
    // A batch without OOD patches contributes loss_ood = 0.
    let none = reduce(&[s(0.0, 0, true)], &cfg).unwrap();
    assert_eq!(none.loss_ood, 0.0);
    assert_eq!(none.locoop_loss, 1.0);
}

#[test]
fn top_k_ties_go_to_the_lower_index() {
    // Label 2 ties with classes 1 and 4 at the top: ranks 0 (class 1), 1 (class 2), 2 (class 4).
    let row = [0.5f32, 3.0, 3.0, 1.0, 3.0];
    let mask = |label, k| ood_patch_mask(&row, 5, label, k).unwrap()[0];
    assert!(mask(2, 1)); // only class 1 fits in the top-1
    assert!(!mask(2, 2));
    assert!(!mask(1, 1));
    assert!(mask(4, 2));
    assert!(!mask(4, 3));
    assert!(mask(0, 4));
    assert!(!mask(0, 5));
    // K = C: every label is in the top-K, no OOD patch.
    for label in 0..5 {
        assert!(!mask(label, 5));
    }
    // All equal: the label is in the top-K iff its index is < K.
    let flat = [7.0f32; 6];
    for label in 0..6 {
        for k in 1..=6 {
            assert_eq!(
                ood_patch_mask(&flat, 6, label, k).unwrap()[0],
                label >= k,
                "label {label} k {k}"
            );
        }
    }
    // −0.0 sorts below +0.0 (CUDA's radix order, f32::total_cmp).
    let zeros = [0.0f32, -0.0, 0.0];
    assert!(ood_patch_mask(&zeros, 3, 1, 2).unwrap()[0]);
    assert!(!ood_patch_mask(&zeros, 3, 2, 2).unwrap()[0]);
    // The predicted label is the first maximum.
    assert_eq!(loss::predicted_label(&row), 1);
}

#[test]
fn image_stats_is_accurate_and_fast_at_clip_scale() {
    // 196 patches × 1000 classes, CLIP-like logits (100 × cosines around 0.2), against a plain
    // f64 computation.
    let (p, c) = (196, 1000);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut gauss = || {
        let (u, v) = (next().max(1e-300), next());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    };
    let global: Vec<f32> = (0..c)
        .map(|_| (100.0 * (0.2 + 0.03 * gauss())) as f32)
        .collect();
    let local: Vec<f32> = (0..p * c)
        .map(|_| (100.0 * (0.2 + 0.03 * gauss())) as f32)
        .collect();
    let label = 17;
    let cfg = LocoopConfig::preset(LocoopPreset::ClipBImagenet);
    let s = image_stats(&global, &local, c, label, &cfg).unwrap();
    let mask = ood_patch_mask(&local, c, label, cfg.top_k).unwrap();
    let mut want = 0.0;
    for (row, &ood) in local.chunks_exact(c).zip(&mask) {
        if ood {
            let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
            let e: Vec<f64> = row.iter().map(|&x| (x as f64 - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            want -= e
                .iter()
                .map(|&e| e / sum * (e / sum + 1e-5).ln())
                .sum::<f64>();
        }
    }
    let rel = (s.entropy_sum - want).abs() / want;
    println!(
        "entropy sum over {} OOD patches: {} vs {want} (relative error {rel:.2e})",
        s.ood_patches, s.entropy_sum
    );
    assert!(s.ood_patches > 50 && s.ood_patches < p);
    assert!(rel < 2e-7, "relative error {rel:e}");
    let start = std::time::Instant::now();
    let reps = 20;
    for _ in 0..reps {
        std::hint::black_box(image_stats(&global, &local, c, label, &cfg).unwrap());
    }
    println!(
        "image_stats, 196 × 1000: {:.3} ms per image",
        start.elapsed().as_secs_f64() * 1e3 / reps as f64
    );
}

#[test]
fn presets_are_the_reference_configs() {
    let cfg = LocoopConfig::preset(LocoopPreset::ClipBImagenet);
    assert_eq!((cfg.lambda, cfg.top_k), (0.1, 300));
    assert_eq!(cfg.averaging, Averaging::PerBatch(512));
    assert!(!cfg.use_pred_label);
    assert_eq!(LocoopPreset::ClipBVoc.values(), (0.05, 4, 512));
    assert_eq!(LocoopPreset::ClipLImagenet.values(), (0.5, 300, 512));
    assert_eq!(LocoopPreset::ClipLVoc.values(), (0.3, 6, 512));
    assert_eq!(LocoopPreset::SwinBImagenet.values(), (0.01, 700, 384));
    let json = serde_json::to_string(&cfg).unwrap();
    assert_eq!(serde_json::from_str::<LocoopConfig>(&json).unwrap(), cfg);
    let parts = LossParts::default();
    let v = serde_json::to_value(parts).unwrap();
    for key in [
        "locoop_loss",
        "loss_id",
        "loss_ood",
        "acc",
        "ood_patch_percent",
    ] {
        assert!(v.get(key).is_some(), "{key}");
    }
}

// ---------------------------------------------------------------------------------- scores

#[test]
fn scores_match_the_oracle() {
    let mut w = Worst::new("image scores", 1e-6, 1e-12);
    for case in logit_cases() {
        for per_t in case.json["scores"].as_array().unwrap() {
            let t = per_t["temperature"].as_f64().unwrap();
            for i in 0..case.n {
                let got = scores(&Scorer::ALL, case.global(i), case.local(i), case.c, t).unwrap();
                for (s, g) in Scorer::ALL.iter().zip(&got) {
                    let want = per_t["image"][s.name()][i].as_f64().unwrap();
                    w.check(*g, want, || format!("{} T={t} image {i} {s}", case.name));
                    // The single-scorer entry point agrees.
                    let one = score::score(*s, case.global(i), case.local(i), case.c, t).unwrap();
                    assert_eq!(one, *g);
                }
            }
        }
    }
    w.assert();
}

#[test]
fn ood_patch_scores_match_the_oracle() {
    let mut w = Worst::new("OOD-patch scores", 1e-6, 1e-12);
    let mut patches = 0;
    for case in logit_cases() {
        for per_t in case.json["scores"].as_array().unwrap() {
            let t = per_t["temperature"].as_f64().unwrap();
            for i in 0..case.n {
                let mask = ood_patch_mask(case.local(i), case.c, case.ood_label(i), case.cfg.top_k)
                    .unwrap();
                let got = ood_patch_scores(&Scorer::ALL, case.local(i), case.c, &mask, t).unwrap();
                let want = &per_t["ood_patch"][i];
                for (s, g) in Scorer::ALL.iter().zip(&got) {
                    let want = f64s(&want[s.name()]);
                    assert_eq!(g.len(), want.len(), "{} image {i} {s}", case.name);
                    assert_eq!(g.len(), mask.iter().filter(|&&m| m).count());
                    for (j, (g, w_)) in g.iter().zip(&want).enumerate() {
                        w.check(*g, *w_, || {
                            format!("{} T={t} image {i} OOD patch {j} {s}", case.name)
                        });
                    }
                    patches += g.len();
                }
            }
        }
    }
    assert!(patches > 100);
    w.assert();
}

#[test]
fn scorer_signs_follow_the_reference() {
    // A confident image scores lower (more ID-like) than a flat one with every scorer.
    let c = 10;
    let confident: Vec<f32> = (0..c).map(|i| if i == 3 { 40.0 } else { 20.0 }).collect();
    let flat = vec![20.0f32; c];
    for s in Scorer::ALL {
        let a = score::score(s, &confident, &confident, c, 1.0).unwrap();
        let b = score::score(s, &flat, &flat, c, 1.0).unwrap();
        assert!(a < b, "{s}: confident {a} vs flat {b}");
    }
    assert!(Scorer::GlMcm.needs_local() && !Scorer::Energy.needs_local());
    assert_eq!(Scorer::Mcm.reference_name(), "mcm_score");
}

// --------------------------------------------------------------------------------- metrics

struct MetricCase {
    name: String,
    id: Vec<f64>,
    ood: Vec<f64>,
    json: &'static Value,
}

fn metric_cases() -> Vec<MetricCase> {
    let f = fixtures();
    f.cases["metric_cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            let name = j["name"].as_str().unwrap().to_string();
            MetricCase {
                id: f.f64s[&format!("{name}.id")].clone(),
                ood: f.f64s[&format!("{name}.ood")].clone(),
                name,
                json: j,
            }
        })
        .collect()
}

#[test]
fn metrics_match_sklearn_and_the_reference() {
    let mut w = Worst::new("metrics", 1e-9, 1e-9);
    let mut levels = 0;
    for case in metric_cases() {
        for level in case.json["fpr"].as_array().unwrap() {
            let r = level["recall_level"].as_f64().unwrap();
            let m = ood_metrics(&case.id, &case.ood, r).unwrap();
            let at = |what: &str| format!("{} recall {r} {what}", case.name);
            for (field, got) in [
                ("auroc", m.auroc),
                ("aupr_in", m.aupr_in),
                ("aupr_out", m.aupr_out),
            ] {
                w.check(got, case.json[field].as_f64().unwrap(), || at(field));
            }
            w.check(m.fpr95, level["fpr"].as_f64().unwrap(), || at("fpr"));
            // The cutoff is one of the scores, negated, exactly; serde_json may read the
            // expected value one ulp off, hence the tolerance.
            let want_cutoff = level["cutoff"].as_f64().unwrap();
            assert!(
                (m.cutoff - want_cutoff).abs() <= 1e-15 * want_cutoff.abs(),
                "{}: {} vs {want_cutoff}",
                at("cutoff"),
                m.cutoff
            );
            assert!(
                case.id.iter().chain(&case.ood).any(|&s| -s == m.cutoff),
                "{}",
                at("cutoff is a score")
            );
            // The single-metric functions agree.
            assert_eq!(
                metrics::fpr_at_recall(&case.id, &case.ood, r).unwrap(),
                (m.fpr95, m.cutoff)
            );
            levels += 1;
        }
        let m = ood_metrics(&case.id, &case.ood, 0.95).unwrap();
        assert_eq!(metrics::auroc(&case.id, &case.ood).unwrap(), m.auroc);
        assert_eq!(metrics::aupr_in(&case.id, &case.ood).unwrap(), m.aupr_in);
        assert_eq!(metrics::aupr_out(&case.id, &case.ood).unwrap(), m.aupr_out);
    }
    assert!(levels > 20);
    w.assert();
}

#[test]
fn roc_curve_matches_sklearn() {
    let mut n = 0;
    for case in metric_cases() {
        let Some(want) = case.json.get("roc") else {
            continue;
        };
        let got = metrics::roc_curve(&case.id, &case.ood).unwrap();
        let fpr = f64s(&want["fpr"]);
        let tpr = f64s(&want["tpr"]);
        let thr: Vec<f64> = want["thresholds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap_or(f64::INFINITY))
            .collect();
        assert_eq!(got.fpr.len(), fpr.len(), "{}", case.name);
        for i in 0..fpr.len() {
            assert!(
                (got.fpr[i] - fpr[i]).abs() < 1e-12,
                "{} fpr[{i}]",
                case.name
            );
            assert!(
                (got.tpr[i] - tpr[i]).abs() < 1e-12,
                "{} tpr[{i}]",
                case.name
            );
            // serde_json may read the expected value one ulp off.
            let t = got.thresholds[i];
            assert!(
                t == thr[i] || (t - thr[i]).abs() <= 1e-15 * thr[i].abs(),
                "{} thresholds[{i}]: {t} vs {}",
                case.name,
                thr[i]
            );
        }
        n += 1;
    }
    assert!(n >= 4);
}

#[test]
fn metrics_invariants() {
    // Swapping ID and OOD mirrors AUROC and swaps the AUPRs.
    for case in metric_cases() {
        let a = ood_metrics(&case.id, &case.ood, 0.95).unwrap();
        let b = ood_metrics(&case.ood, &case.id, 0.95).unwrap();
        assert!((a.auroc + b.auroc - 100.0).abs() < 1e-9, "{}", case.name);
        // Negating the scores swaps the roles of ID and OOD in the AUPRs.
        let neg = |v: &[f64]| v.iter().map(|x| -x).collect::<Vec<_>>();
        let c = ood_metrics(&neg(&case.ood), &neg(&case.id), 0.95).unwrap();
        assert!((a.aupr_in - c.aupr_out).abs() < 1e-9, "{}", case.name);
        assert!((a.aupr_out - c.aupr_in).abs() < 1e-9, "{}", case.name);
    }
    let m = OodMetrics::default();
    let v = serde_json::to_value(m).unwrap();
    for key in ["fpr95", "auroc", "aupr_in", "aupr_out", "cutoff"] {
        assert!(v.get(key).is_some(), "{key}");
    }
}

#[test]
fn top1_accuracy_uses_the_first_maximum() {
    let logits = [1.0f32, 3.0, 3.0, 0.0, 5.0, 2.0, 2.0, 2.0, 2.0];
    assert_eq!(
        metrics::top1_accuracy(&logits, 3, &[1, 1, 0]).unwrap(),
        100.0
    );
    assert!((metrics::top1_accuracy(&logits, 3, &[2, 1, 1]).unwrap() - 100.0 / 3.0).abs() < 1e-12);
    // Against the fixtures' correct flags.
    for case in logit_cases() {
        let Some(stats) = case.json.get("image_stats") else {
            continue;
        };
        let correct = stats["correct"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b.as_bool().unwrap())
            .count();
        let acc = metrics::top1_accuracy(case.global, case.c, &case.labels).unwrap();
        assert!((acc - 100.0 * correct as f64 / case.n as f64).abs() < 1e-12);
    }
}

// ---------------------------------------------------------------------------------- errors

fn err_contains<T: std::fmt::Debug>(r: setar_engine::Result<T>, needle: &str) {
    match r {
        Ok(v) => panic!("expected an error containing `{needle}`, got Ok({v:?})"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(needle), "`{msg}` does not contain `{needle}`");
        }
    }
}

#[test]
fn loss_rejects_bad_input() {
    let c = 4;
    let g = vec![1.0f32, 2.0, 3.0, 4.0];
    let l = vec![0.5f32; 3 * c];
    let cfg = LocoopConfig::new(0.1, 2);
    assert!(image_stats(&g, &l, c, 1, &cfg).is_ok());

    let mut bad = g.clone();
    bad[2] = f32::NAN;
    err_contains(image_stats(&bad, &l, c, 1, &cfg), "non-finite");
    let mut bad = l.clone();
    bad[7] = f32::INFINITY;
    err_contains(image_stats(&g, &bad, c, 1, &cfg), "non-finite");
    bad[7] = f32::NEG_INFINITY;
    err_contains(ood_patch_mask(&bad, c, 1, 2), "non-finite");
    err_contains(image_stats(&g[..3], &l, c, 1, &cfg), "global logits");
    err_contains(image_stats(&g, &l[..5], c, 1, &cfg), "local logits");
    err_contains(image_stats(&g, &[], c, 1, &cfg), "local logits");
    err_contains(image_stats(&g, &l, c, 4, &cfg), "label 4 out of range");
    err_contains(image_stats(&g, &l, 0, 0, &cfg), "top_k");
    err_contains(
        image_stats(&g, &l, c, 1, &LocoopConfig::new(0.1, 5)),
        "top_k must be in 1..=4",
    );
    err_contains(
        image_stats(&g, &l, c, 1, &LocoopConfig::new(0.1, 0)),
        "top_k",
    );
    err_contains(
        image_stats(&g, &l, c, 1, &LocoopConfig::new(f64::NAN, 2)),
        "lambda",
    );
    err_contains(ood_patch_mask(&l, c, 1, 5), "top_k");
    err_contains(ood_patch_mask(&l, c, 9, 2), "out of range");
    err_contains(ood_patch_mask(&l, 0, 0, 1), "classes");

    // Batches.
    err_contains(batch_stats(&g, &l, &[], c, &cfg), "no images");
    err_contains(batch_stats(&g, &l, &[0, 1], c, &cfg), "global logits");
    err_contains(
        batch_stats(&[g.clone(), g.clone()].concat(), &l[..4], &[0, 1], c, &cfg),
        "local logits",
    );
    let mut l2 = l.clone();
    l2.extend_from_slice(&l);
    let g2 = [g.clone(), g.clone()].concat();
    assert_eq!(batch_stats(&g2, &l2, &[0, 1], c, &cfg).unwrap().len(), 2);
    err_contains(batch_stats(&g2, &l2, &[0, 7], c, &cfg), "label 7");

    // Reduction.
    err_contains(reduce(&[], &cfg), "no images");
    let s = image_stats(&g, &l, c, 1, &cfg).unwrap();
    err_contains(
        reduce(
            &[s],
            &LocoopConfig {
                averaging: Averaging::PerBatch(0),
                ..cfg
            },
        ),
        "batch size",
    );
    let broken = ImageStats {
        ood_patches: 9,
        ..s
    };
    err_contains(reduce(&[s, broken], &cfg), "image 1");
    let nan = ImageStats { ce: f64::NAN, ..s };
    err_contains(reduce(&[nan], &cfg), "image 0");
}

#[test]
fn scores_reject_bad_input() {
    let c = 3;
    let g = vec![1.0f32, 2.0, 3.0];
    let l = vec![0.5f32; 2 * c];
    assert!(score::score(Scorer::GlMcm, &g, &l, c, 100.0).is_ok());
    // Global-only scorers do not need local logits.
    assert!(score::score(Scorer::Mcm, &g, &[], c, 100.0).is_ok());
    err_contains(
        score::score(Scorer::LMcm, &g, &[], c, 100.0),
        "local logits",
    );
    err_contains(
        score::score(Scorer::GlMcm, &g, &l[..4], c, 100.0),
        "local logits",
    );
    err_contains(
        score::score(Scorer::Mcm, &g[..2], &l, c, 100.0),
        "global logits",
    );
    err_contains(score::score(Scorer::Mcm, &g, &l, 0, 100.0), "classes");
    let mut bad = g.clone();
    bad[0] = f32::NAN;
    err_contains(
        score::score(Scorer::Energy, &bad, &l, c, 100.0),
        "non-finite",
    );
    let mut bad = l.clone();
    bad[5] = f32::INFINITY;
    err_contains(score::score(Scorer::LMcm, &g, &bad, c, 100.0), "non-finite");
    for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        err_contains(score::score(Scorer::Mcm, &g, &l, c, t), "temperature");
    }
    err_contains(
        ood_patch_scores(&[Scorer::Mcm], &l, c, &[true], 100.0),
        "mask has 1 entries for 2 patches",
    );
    err_contains(
        ood_patch_scores(&[Scorer::Mcm], &bad, c, &[true, true], 100.0),
        "non-finite",
    );
    // No OOD patch: empty lists, as the reference skips the image.
    let none = ood_patch_scores(&Scorer::ALL, &l, c, &[false, false], 100.0).unwrap();
    assert!(none.iter().all(|v| v.is_empty()));
    err_contains("bogus".parse::<Scorer>(), "unknown scorer");
}

#[test]
fn metrics_reject_bad_input() {
    let id = [0.1, 0.2];
    let ood = [0.3];
    assert!(ood_metrics(&id, &ood, 0.95).is_ok());
    err_contains(ood_metrics(&[], &ood, 0.95), "0 ID and 1 OOD");
    err_contains(ood_metrics(&id, &[], 0.95), "2 ID and 0 OOD");
    err_contains(
        ood_metrics(&[0.1, f64::NAN], &ood, 0.95),
        "ID score 1 is not finite",
    );
    err_contains(
        ood_metrics(&id, &[f64::INFINITY], 0.95),
        "OOD score 0 is not finite",
    );
    for r in [0.0, -0.1, 1.5, f64::NAN] {
        err_contains(ood_metrics(&id, &ood, r), "recall level");
    }
    err_contains(metrics::auroc(&[], &ood), "OOD metrics need");
    err_contains(metrics::aupr_out(&id, &[]), "OOD metrics need");
    err_contains(metrics::roc_curve(&id, &[f64::NAN]), "not finite");
    err_contains(metrics::top1_accuracy(&[1.0, 2.0], 2, &[]), "no images");
    err_contains(metrics::top1_accuracy(&[1.0, 2.0], 2, &[0, 1]), "logits");
    err_contains(metrics::top1_accuracy(&[1.0, 2.0], 2, &[2]), "label 2");
    err_contains(
        metrics::top1_accuracy(&[1.0, f32::NAN], 2, &[0]),
        "non-finite",
    );
}
