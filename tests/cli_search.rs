//! The search/eval/run/apply commands end to end: resuming a killed search, the demo run through
//! a hub cache, applying settings, and the bad-input errors.

mod common;

use common::{fixtures, tiny_model};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_setar-engine");

fn repo() -> PathBuf {
    fixtures().parent().unwrap().parent().unwrap().to_path_buf()
}

fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args).arg("--quiet").current_dir(repo());
    c
}

fn ok(out: Output) -> Output {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failed:\n{err}");
    out
}

fn fails(out: Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure");
    assert!(!err.contains("panicked"), "panicked:\n{err}");
    for n in needles {
        assert!(err.contains(n), "message lacks {n:?}:\n{err}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `search` on the search fixture's images with the e2e model, into `out`.
fn search_cmd(out: &Path) -> Command {
    let model = fixtures().join("models/e2e_real_vocab_f16");
    let labels = out.parent().unwrap().join("labels.txt");
    std::fs::write(&labels, "cat\ncup\nperson\nrocket\n").unwrap();
    let id_val = fixtures().join("search/id_val");
    let mut c = cmd(&[
        "search",
        "--weights",
        s(&model),
        "--id-val",
        s(&id_val),
        "--labels",
        s(&labels),
    ]);
    c.args(["--top-k", "2", "--loss-batch", "10", "--out", s(out)]);
    c
}

#[test]
fn a_killed_search_resumes_to_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let killed = dir.path().join("killed");
    ok(search_cmd(&whole).output().unwrap());

    // Killed right after the second of four steps was saved.
    let out = search_cmd(&killed)
        .env("SETAR_ABORT_AFTER_STEP", "2")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the abort hook must stop the process"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(killed.join("search_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["steps"].as_array().unwrap().len(), 2);
    assert!(!killed.join("lora_settings.json").exists());

    ok(search_cmd(&killed).output().unwrap());
    let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    assert_eq!(
        read(&whole, "lora_settings.json"),
        read(&killed, "lora_settings.json")
    );
    let values = |d: &Path| -> Vec<f64> {
        let st: serde_json::Value = serde_json::from_str(&read(d, "search_state.json")).unwrap();
        st["steps"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| {
                s["candidates"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["value"].as_f64().unwrap())
            })
            .collect()
    };
    assert_eq!(values(&whole), values(&killed));
}

#[test]
fn a_state_file_of_another_search_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    ok(search_cmd(&out).output().unwrap());
    // Same folder, other settings.
    let mut c = search_cmd(&out);
    c.args(["--ratios", "0,0.1"]);
    fails(c.output().unwrap(), &["search_state.json", "other inputs"]);
}

/// A Hugging Face cache holding `dir`'s checkpoint as openai/clip-vit-base-patch16.
fn hub_cache(model: &Path, root: &Path) {
    let repo = root.join("hub/models--openai--clip-vit-base-patch16");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    for f in ["model.safetensors", "config.json"] {
        let blob = repo.join("blobs").join(format!("blob-{f}"));
        std::fs::copy(model.join(f), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snap.join(f)).unwrap();
    }
}

#[test]
fn run_with_no_arguments_runs_the_demo_through_the_hub_cache() {
    let home = tempfile::tempdir().unwrap();
    hub_cache(&tiny_model(), home.path());
    let out = tempfile::tempdir().unwrap();
    let run_out = out.path().join("run");
    ok(cmd(&["run", "--out", s(&run_out)])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_out.join("eval/report.json")).unwrap())
            .unwrap();
    for scorer in ["mcm", "gl_mcm"] {
        for set in ["other_animals", "places", "textures", "Avg"] {
            let auroc = report["metrics"][scorer][set]["auroc"].as_f64().unwrap();
            assert!((0.0..=100.0).contains(&auroc), "{scorer} {set}: {auroc}");
        }
    }
    for f in [
        "search/lora_settings.json",
        "eval/report.md",
        "eval/roc_mcm.svg",
        "eval/hist_gl_mcm_textures.svg",
        "eval/scores_ID_test.csv",
    ] {
        assert!(run_out.join(f).is_file(), "{f} missing");
    }
    // Offline with an empty cache: a clear message saying what to pass.
    let empty = tempfile::tempdir().unwrap();
    fails(
        cmd(&["run", "--out", s(&run_out)])
            .env("HF_HOME", empty.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap(),
        &["openai/clip-vit-base-patch16", "--weights"],
    );
}

#[test]
fn apply_writes_a_model_that_gives_the_low_rank_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("search");
    ok(search_cmd(&out).output().unwrap());
    let applied = dir.path().join("applied");
    let model = fixtures().join("models/e2e_real_vocab_f16");
    ok(cmd(&[
        "apply",
        "--weights",
        s(&model),
        "--settings",
        s(&out.join("lora_settings.json")),
        "--out",
        s(&applied),
    ])
    .output()
    .unwrap());
    // Vanilla eval of the applied model equals eval of the original with the settings.
    let labels = dir.path().join("labels.txt");
    let id = fixtures().join("search/id_val");
    let ood = format!("imgs={}", s(&repo().join("examples/images")));
    let eval = |weights: &Path, settings: Option<&Path>, o: &Path| {
        let mut c = cmd(&[
            "eval",
            "--weights",
            s(weights),
            "--id-test",
            s(&id),
            "--ood",
            &ood,
            "--labels",
            s(&labels),
            "--out",
            s(o),
        ]);
        if let Some(st) = settings {
            c.args(["--settings", s(st)]);
        }
        ok(c.output().unwrap());
        std::fs::read_to_string(o.join("scores_OOD_imgs_test.csv")).unwrap()
    };
    let a = eval(&applied, None, &dir.path().join("ea"));
    let b = eval(
        &model,
        Some(&out.join("lora_settings.json")),
        &dir.path().join("eb"),
    );
    let nums = |t: &str| -> Vec<f64> {
        t.lines()
            .skip(1)
            .flat_map(|l| {
                l.split(',')
                    .skip(1)
                    .map(|v| v.parse::<f64>().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    // The applied model is stored in f16 like its source, so allow f16 rounding of W'.
    for (x, y) in nums(&a).iter().zip(nums(&b)) {
        assert!((x - y).abs() <= 1e-3 * y.abs().max(1e-3), "{x} vs {y}");
    }
}

#[test]
fn bad_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/e2e_real_vocab_f16");
    let id = fixtures().join("search/id_val");
    // Class folders that are not in the label set.
    let out = dir.path().join("o");
    fails(
        cmd(&[
            "search",
            "--weights",
            s(&model),
            "--id-val",
            s(&id),
            "--labels",
            "voc",
            "--out",
            s(&out),
        ])
        .output()
        .unwrap(),
        &["cat", "not in the label set voc"],
    );
    // An empty OOD set.
    let labels = dir.path().join("labels.txt");
    std::fs::write(&labels, "cat\ncup\nperson\nrocket\n").unwrap();
    let empty = dir.path().join("empty_ood");
    std::fs::create_dir(&empty).unwrap();
    let ood = format!("nothing={}", s(&empty));
    fails(
        cmd(&[
            "eval",
            "--weights",
            s(&model),
            "--id-test",
            s(&id),
            "--ood",
            &ood,
            "--labels",
            s(&labels),
            "--out",
            s(&out),
        ])
        .output()
        .unwrap(),
        &[s(&empty)],
    );
    assert!(!out.join("report.json").exists(), "no partial report");
    // Settings made for another model.
    let other = dir.path().join("other.json");
    std::fs::write(&other, r#"{"lora_settings":[["visual","W_up",11,0.1]],"prune":"minor","vision_layers":12,"text_layers":12,"vision_width":768,"text_width":512}"#).unwrap();
    let ood = format!("imgs={}", s(&repo().join("examples/images")));
    fails(
        cmd(&[
            "eval",
            "--weights",
            s(&model),
            "--settings",
            s(&other),
            "--id-test",
            s(&id),
            "--ood",
            &ood,
            "--labels",
            s(&labels),
            "--out",
            s(&out),
        ])
        .output()
        .unwrap(),
        &[s(&other), "another model"],
    );
}

#[test]
fn bad_max_memory_is_named() {
    let model = fixtures().join("models/e2e_real_vocab_f16");
    fails(
        cmd(&["info", "--weights", s(&model), "--max-memory", "lots"])
            .output()
            .unwrap(),
        &["--max-memory lots", "not a size"],
    );
    fails(
        cmd(&["info", "--weights", s(&model), "--max-memory", "24G"])
            .output()
            .unwrap(),
        &["--max-memory", "--device cuda"],
    );
}
