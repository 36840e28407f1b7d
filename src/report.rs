//! Reports: the search's records in the reference's shapes (`search_results.json`,
//! `search_best_results.csv`), and the evaluation's JSON, Markdown, CSV and SVG plots.

use crate::metrics::py_float_repr;
use crate::search::SearchState;
use serde_json::{json, Map, Value};

/// The reference's `search_results.json`: step → tower → weight type → layer → ratio →
/// {"loss": {...}} or {scorer: {...}} for every candidate (carried ones included, with the
/// carried value).
pub fn reference_search_results(state: &SearchState) -> Value {
    let mut root = Map::new();
    for s in &state.steps {
        for c in &s.candidates {
            let layer = c.target.layer.map_or("null".to_string(), |l| l.to_string());
            let entry = root
                .entry(s.step.to_string())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("object")
                .entry(c.target.tower.name())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("object")
                .entry(c.target.weight.name())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("object")
                .entry(layer)
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("object");
            let mut v = match (&c.loss, &c.metrics) {
                (_, Some(m)) => json!({ state.config.scorer.reference_name(): {
                    "auroc": m.auroc, "aupr": m.aupr_in, "fpr": m.fpr95, "cutoff": m.cutoff } }),
                (Some(l), None) => json!({ "loss": l }),
                (None, None) => json!({ "value": c.value }),
            };
            if c.carried {
                v["carried"] = json!(true);
                v["value"] = json!(c.value);
            }
            entry.insert(py_float_repr(c.ratio), v);
        }
    }
    Value::Object(root)
}

/// The reference's `search_best_results.csv`: one row per step with the decided ratio and the
/// best value (its column starred, as the reference marks the objective).
pub fn reference_best_results_csv(state: &SearchState) -> String {
    let obj = state.config.objective.name();
    let mut s = format!("step,tower_type,weight_type,layer_num,best_ratio,{obj}*,seconds\n");
    for st in &state.steps {
        let t = st.chosen.target;
        s.push_str(&format!(
            "{},{},{},{},{},{},{:.3}\n",
            st.step,
            t.tower.name(),
            t.weight.name(),
            t.layer.map_or(String::new(), |l| l.to_string()),
            py_float_repr(st.chosen.ratio),
            py_float_repr(st.best),
            st.seconds
        ));
    }
    s
}

use crate::error::Result;
use crate::jobs::{write_text, EvalResult, ScoredSet};
use crate::metrics::{cutoffs_csv, metrics_csv, roc_curve, OodMetrics};
use crate::score::Scorer;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What the evaluation was run with, for the report's header.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalMeta {
    pub model: String,
    pub labels: String,
    pub settings: Vec<crate::lowrank::Setting>,
    pub temperature: f64,
    pub backend: String,
}

fn ref_name(scorer: &str) -> String {
    scorer
        .parse::<Scorer>()
        .map(|s| s.reference_name().to_string())
        .unwrap_or_else(|_| scorer.to_string())
}

/// OOD set names in input order, then "Avg".
fn ordered_sets(result: &EvalResult) -> Vec<String> {
    let mut v: Vec<String> = result.ood.iter().map(|s| s.name.clone()).collect();
    v.push("Avg".into());
    v
}

fn scores_csv(set: &ScoredSet) -> String {
    let names: Vec<&String> = set.scores.keys().collect();
    let mut s = String::from("image");
    for n in &names {
        s.push(',');
        s.push_str(&ref_name(n));
    }
    s.push('\n');
    for (i, img) in set.images.iter().enumerate() {
        // Quote paths that need it (commas, quotes).
        if img.contains(',') || img.contains('"') {
            let _ = write!(s, "\"{}\"", img.replace('"', "\"\""));
        } else {
            s.push_str(img);
        }
        for n in &names {
            let _ = write!(s, ",{}", py_float_repr(set.scores[*n][i]));
        }
        s.push('\n');
    }
    s
}

/// The Markdown summary people read.
pub fn markdown(result: &EvalResult, meta: &EvalMeta) -> String {
    let mut s = String::from("# SeTAR evaluation\n\n");
    let _ = writeln!(s, "- model: `{}` on {}", meta.model, meta.backend);
    let _ = writeln!(
        s,
        "- labels: {} ({} ID test images)",
        meta.labels,
        result.id.images.len()
    );
    let decided: Vec<String> = meta
        .settings
        .iter()
        .filter(|x| x.ratio > 0.0)
        .map(|x| format!("{} {}", x.target, x.ratio))
        .collect();
    let _ = writeln!(
        s,
        "- low-rank settings: {}",
        if decided.is_empty() {
            "none (vanilla)".into()
        } else {
            decided.join(", ")
        }
    );
    let _ = writeln!(s, "- ID top-1 accuracy: {:.2}%", result.accuracy);
    let fpr = format!("FPR{}", (100.0 * result.recall_level).round() as i64);
    for scorer in &result.scorers {
        let per_set = &result.metrics[scorer];
        let _ = writeln!(s, "\n## {scorer}\n\n| OOD set | images | {fpr} ↓ | AUROC ↑ | AUPR-In ↑ | AUPR-Out ↑ |\n|---|---|---|---|---|---|");
        for name in ordered_sets(result) {
            let m = &per_set[&name];
            let n = result
                .ood
                .iter()
                .find(|o| o.name == name)
                .map_or(String::from("–"), |o| o.images.len().to_string());
            let row = if name == "Avg" {
                format!("**{name}**")
            } else {
                name.clone()
            };
            let _ = writeln!(
                s,
                "| {row} | {n} | {:.2} | {:.2} | {:.2} | {:.2} |",
                m.fpr95, m.auroc, m.aupr_in, m.aupr_out
            );
        }
    }
    s.push_str("\nPlots: `hist_<scorer>_<ood>.svg` (score histograms with the FPR95 cutoff), `roc_<scorer>.svg`.\n");
    s
}

/// Writes every report file into `dir` and returns their paths.
pub fn write_eval(result: &EvalResult, meta: &EvalMeta, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    let mut written = Vec::new();
    let mut put = |name: String, text: String| -> Result<()> {
        let p = dir.join(name);
        write_text(&p, &text)?;
        written.push(p);
        Ok(())
    };
    let report = serde_json::json!({
        "meta": meta,
        "id_accuracy": result.accuracy,
        "recall_level": result.recall_level,
        "metrics": result.metrics,
        "ood_sets": result.ood.iter().map(|o| serde_json::json!({"name": o.name, "images": o.images.len()})).collect::<Vec<_>>(),
        "id_images": result.id.images.len(),
    });
    put(
        "report.json".into(),
        serde_json::to_string_pretty(&report).expect("json"),
    )?;
    put("report.md".into(), markdown(result, meta))?;
    put(
        "metrics_classify_test.json".into(),
        serde_json::to_string_pretty(&serde_json::json!({ "ID": result.accuracy })).expect("json"),
    )?;
    for scorer in &result.scorers {
        let per_set = &result.metrics[scorer];
        let rows: Vec<(&str, OodMetrics)> = result
            .ood
            .iter()
            .map(|o| (o.name.as_str(), per_set[&o.name]))
            .collect();
        let r = ref_name(scorer);
        put(
            format!("metrics_{r}_test.csv"),
            metrics_csv(&rows, result.recall_level),
        )?;
        let cut: Vec<(&str, f64)> = rows.iter().map(|(n, m)| (*n, m.cutoff)).collect();
        put(format!("cutoffs_{r}_test.csv"), cutoffs_csv(&cut))?;
        let id = &result.id.scores[scorer];
        let mut curves = Vec::new();
        for o in &result.ood {
            let ood = &o.scores[scorer];
            put(
                format!("hist_{scorer}_{}.svg", file_safe(&o.name)),
                histogram_svg(scorer, &o.name, id, ood, -per_set[&o.name].cutoff),
            )?;
            curves.push((o.name.clone(), roc_curve(id, ood)?, per_set[&o.name].auroc));
        }
        put(format!("roc_{scorer}.svg"), roc_svg(scorer, &curves))?;
    }
    put("scores_ID_test.csv".into(), scores_csv(&result.id))?;
    for o in &result.ood {
        put(
            format!("scores_OOD_{}_test.csv", file_safe(&o.name)),
            scores_csv(o),
        )?;
    }
    put(
        "scores.json".into(),
        serde_json::to_string(&serde_json::json!({"id": result.id, "ood": result.ood}))
            .expect("json"),
    )?;
    Ok(written)
}

fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

const W: f64 = 640.0;
const H: f64 = 400.0;
const PAD: f64 = 56.0;

fn svg_open(title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        W / 2.0,
        xml(title)
    )
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn axes(s: &mut String, xlabel: &str, ylabel: &str, xr: (f64, f64), yr: (f64, f64)) {
    let (x0, x1, y0, y1) = (PAD, W - 20.0, H - PAD, 36.0);
    let _ = writeln!(s, "<line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\" stroke=\"black\"/><line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x0}\" y2=\"{y1}\" stroke=\"black\"/>");
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let x = x0 + f * (x1 - x0);
        let y = y0 - f * (y0 - y1);
        let _ = writeln!(
            s,
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            y0 + 16.0,
            tick(xr.0 + f * (xr.1 - xr.0), xr.1 - xr.0)
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            x0 - 4.0,
            y + 4.0,
            tick(yr.0 + f * (yr.1 - yr.0), yr.1 - yr.0)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
        (x0 + x1) / 2.0,
        H - 14.0,
        xml(xlabel)
    );
    let _ = writeln!(
        s,
        "<text transform=\"translate(14,{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        (y0 + y1) / 2.0,
        xml(ylabel)
    );
}

/// A tick label with enough decimals to tell ticks a quarter of `span` apart.
fn tick(v: f64, span: f64) -> String {
    if v.abs() >= 1e5 {
        return format!("{v:.3e}");
    }
    let decimals = (-(span.abs().max(1e-12) / 4.0).log10()).ceil().max(0.0) as usize + 1;
    format!("{v:.*}", decimals.min(10))
}

/// ID and OOD score histograms (densities) with the FPR95 cutoff as a vertical line.
pub fn histogram_svg(
    scorer: &str,
    ood_name: &str,
    id: &[f64],
    ood: &[f64],
    cutoff_score: f64,
) -> String {
    const BINS: usize = 40;
    let all = id
        .iter()
        .chain(ood)
        .copied()
        .chain(std::iter::once(cutoff_score));
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let span = if hi > lo { hi - lo } else { 1.0 };
    let hist = |v: &[f64]| -> Vec<f64> {
        let mut h = vec![0.0; BINS];
        for &x in v {
            let b = (((x - lo) / span) * BINS as f64)
                .floor()
                .clamp(0.0, BINS as f64 - 1.0) as usize;
            h[b] += 1.0 / v.len().max(1) as f64;
        }
        h
    };
    let (hi_d, ho_d) = (hist(id), hist(ood));
    let ymax = hi_d
        .iter()
        .chain(&ho_d)
        .copied()
        .fold(0.0, f64::max)
        .max(1e-9);
    let mut s = svg_open(&format!("{scorer}: ID vs {ood_name}"));
    axes(
        &mut s,
        &format!("{scorer} score (larger = more OOD-like)"),
        "fraction of images",
        (lo, lo + span),
        (0.0, ymax),
    );
    let (x0, x1, y0, y1) = (PAD, W - 20.0, H - PAD, 36.0);
    let bw = (x1 - x0) / BINS as f64;
    for (h, color) in [(&hi_d, "#1f77b4"), (&ho_d, "#d62728")] {
        for (i, v) in h.iter().enumerate() {
            let bh = v / ymax * (y0 - y1);
            let _ = writeln!(s, "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{bh:.1}\" fill=\"{color}\" fill-opacity=\"0.45\"/>", x0 + i as f64 * bw, y0 - bh);
        }
    }
    let cx = x0 + (cutoff_score - lo) / span * (x1 - x0);
    let _ = writeln!(s, "<line x1=\"{cx:.1}\" y1=\"{y0}\" x2=\"{cx:.1}\" y2=\"{y1}\" stroke=\"black\" stroke-dasharray=\"5,4\"/>");
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\">cutoff (95% ID kept)</text>",
        cx + 4.0,
        y1 + 14.0
    );
    for (i, (label, color)) in [
        (format!("ID ({})", id.len()), "#1f77b4"),
        (format!("{ood_name} ({})", ood.len()), "#d62728"),
    ]
    .iter()
    .enumerate()
    {
        let y = y1 + 30.0 + 16.0 * i as f64;
        let _ = writeln!(s, "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{color}\" fill-opacity=\"0.6\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>", x0 + 10.0, y - 10.0, x0 + 28.0, y, xml(label));
    }
    s.push_str("</svg>\n");
    s
}

/// ROC curves (ID positive) of one scorer against every OOD set.
pub fn roc_svg(scorer: &str, curves: &[(String, crate::metrics::RocCurve, f64)]) -> String {
    const COLORS: [&str; 6] = [
        "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf",
    ];
    let mut s = svg_open(&format!("ROC, {scorer} (ID positive)"));
    axes(
        &mut s,
        "false positive rate (OOD kept)",
        "true positive rate (ID kept)",
        (0.0, 1.0),
        (0.0, 1.0),
    );
    let (x0, x1, y0, y1) = (PAD, W - 20.0, H - PAD, 36.0);
    let _ = writeln!(s, "<line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y1}\" stroke=\"#999\" stroke-dasharray=\"3,3\"/>");
    for (i, (name, c, auroc)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = c
            .fpr
            .iter()
            .zip(&c.tpr)
            .map(|(f, t)| format!("{:.1},{:.1}", x0 + f * (x1 - x0), y0 - t * (y0 - y1)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            pts.join(" ")
        );
        let y = y0 - 20.0 - 16.0 * (curves.len() - 1 - i) as f64;
        let _ = writeln!(s, "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"12\" height=\"3\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\">{} (AUROC {auroc:.2})</text>", x1 - 220.0, y - 4.0, x1 - 202.0, y, xml(name));
    }
    s.push_str("</svg>\n");
    s
}
