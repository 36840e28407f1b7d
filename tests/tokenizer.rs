//! The CLIP tokenizer against Hugging Face `transformers.CLIPTokenizer` (transformers 5.24,
//! tokenizers 0.23): ids recorded by tests/fixtures/make_tokenizer_fixtures.py.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;
use setar_engine::tokenizer::{Batch, Tokenizer, CONTEXT_LENGTH};

#[derive(Deserialize)]
struct Case {
    kind: String,
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct BatchCase {
    texts: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u32>>,
}

fn fixtures() -> PathBuf {
    common::fixtures().join("tokenizer")
}

fn load_cases(name: &str) -> Vec<Case> {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}

fn cases() -> Vec<Case> {
    let cases = load_cases("cases.jsonl");
    assert!(cases.len() >= 2000, "only {} cases", cases.len());
    cases
}

/// Every case through `tok`; on a mismatch, shows the first one and how many there are.
fn check_all(tok: &Tokenizer, cases: &[Case], what: &str) {
    let mut bad = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let got = tok.encode(&c.text, CONTEXT_LENGTH);
        if got != c.ids {
            bad.push((i, got));
        }
    }
    if let Some((i, got)) = bad.first() {
        let c = &cases[*i];
        let tokens = |ids: &[u32]| -> Vec<String> {
            ids.iter()
                .map(|&id| tok.id_to_token(id).unwrap_or("?").to_string())
                .collect()
        };
        panic!(
            "{what}: {} of {} cases differ from HF. First: case {i} ({}) {:?}\n  HF:   {:?}\n        {:?}\n  ours: {:?}\n        {:?}",
            bad.len(),
            cases.len(),
            c.kind,
            c.text,
            c.ids,
            tokens(&c.ids),
            got,
            tokens(got),
        );
    }
    eprintln!("{what}: {} cases identical to HF", cases.len());
}

#[test]
fn embedded_matches_hf() {
    let tok = Tokenizer::embedded();
    assert_eq!(tok.vocab_size(), 49408);
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (49406, 49407, 49407)
    );
    check_all(&tok, &cases(), "embedded vocab");
}

fn write_vocab_merges(tok: &Tokenizer, dir: &Path) {
    std::fs::write(
        dir.join("vocab.json"),
        serde_json::to_string(tok.vocab()).unwrap(),
    )
    .unwrap();
    let mut merges = String::from("#version: 0.2\n");
    for (a, b) in tok.merges() {
        merges.push_str(&format!("{a} {b}\n"));
    }
    std::fs::write(dir.join("merges.txt"), merges).unwrap();
}

fn write_tokenizer_json(tok: &Tokenizer, path: &Path, pairs: bool) {
    let merges: Vec<serde_json::Value> = tok
        .merges()
        .iter()
        .map(|(a, b)| {
            if pairs {
                serde_json::json!([a, b])
            } else {
                serde_json::json!(format!("{a} {b}"))
            }
        })
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "added_tokens": [],
        "model": {"type": "BPE", "end_of_word_suffix": "</w>", "vocab": tok.vocab(), "merges": merges},
    });
    std::fs::write(path, serde_json::to_string(&json).unwrap()).unwrap();
}

#[test]
fn vocab_json_and_merges_txt_match_hf() {
    let dir = tempfile::tempdir().unwrap();
    write_vocab_merges(&Tokenizer::embedded(), dir.path());
    let tok = Tokenizer::from_dir(dir.path())
        .unwrap()
        .expect("files are there");
    assert_eq!(tok.vocab_size(), 49408);
    assert_eq!((tok.bos_id(), tok.eos_id()), (49406, 49407));
    check_all(&tok, &cases(), "vocab.json + merges.txt");
}

#[test]
fn tokenizer_json_matches_hf() {
    let emb = Tokenizer::embedded();
    let cases = cases();
    for pairs in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer_json(&emb, &dir.path().join("tokenizer.json"), pairs);
        // tokenizer.json wins over vocab.json + merges.txt (as in transformers); make those
        // broken to prove they are not read.
        std::fs::write(dir.path().join("vocab.json"), "{").unwrap();
        std::fs::write(dir.path().join("merges.txt"), "x").unwrap();
        let tok = Tokenizer::from_dir(dir.path())
            .unwrap()
            .expect("file is there");
        let what = if pairs {
            "tokenizer.json, [a, b] merges"
        } else {
            "tokenizer.json, \"a b\" merges"
        };
        check_all(&tok, &cases, what);
    }
}

#[test]
fn tiny_hand_made_tokenizer_json_matches_hf() {
    let tok = Tokenizer::from_dir(&fixtures().join("tiny"))
        .unwrap()
        .expect("tokenizer.json is there");
    assert_eq!((tok.bos_id(), tok.eos_id()), (0, 1));
    check_all(&tok, &load_cases("tiny_cases.jsonl"), "tiny tokenizer.json");
}

#[test]
fn batches_match_hf() {
    let path = fixtures().join("batches.json");
    let batches: Vec<BatchCase> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let tok = Tokenizer::embedded();
    for (k, b) in batches.iter().enumerate() {
        let texts: Vec<&str> = b.texts.iter().map(String::as_str).collect();
        let got: Batch = tok.encode_batch(&texts, CONTEXT_LENGTH);
        let n = b.input_ids.len();
        let seq_len = b.input_ids[0].len();
        assert_eq!((got.len(), got.seq_len), (n, seq_len), "batch {k}: shape");
        let want_ids: Vec<u32> = b.input_ids.concat();
        let want_mask: Vec<u32> = b.attention_mask.concat();
        for i in 0..n {
            assert_eq!(
                got.row(i),
                &b.input_ids[i][..],
                "batch {k} row {i} {:?}",
                b.texts[i]
            );
        }
        assert_eq!(got.ids, want_ids, "batch {k}: ids");
        assert_eq!(got.attention_mask(), want_mask, "batch {k}: attention mask");
        let want_lengths: Vec<usize> = b
            .attention_mask
            .iter()
            .map(|m| m.iter().filter(|&&x| x == 1).count())
            .collect();
        assert_eq!(got.lengths, want_lengths, "batch {k}: lengths");
    }
    let empty = tok.encode_batch(&[], CONTEXT_LENGTH);
    assert!(empty.is_empty() && empty.ids.is_empty() && empty.seq_len == 0);
}

#[test]
fn truncation_and_context_length() {
    let tok = Tokenizer::embedded();
    let long = "cat ".repeat(200);
    let ids = tok.encode(&long, CONTEXT_LENGTH);
    assert_eq!(ids.len(), 77);
    assert_eq!((ids[0], ids[76]), (49406, 49407));
    assert_eq!(tok.encode_plain(&long).len(), 200);
    assert_eq!(tok.encode(&long, 10).len(), 10);
    assert_eq!(tok.encode(&long, 2), [49406, 49407]);
    assert_eq!(tok.encode(&long, 0), [49406, 49407]);
    assert_eq!(tok.encode("", CONTEXT_LENGTH), [49406, 49407]);
    // A literal special token counts toward the limit like any other id.
    assert_eq!(tok.encode("<|endoftext|> cat", 3), [49406, 49407, 49407]);
}

#[test]
fn for_model_dir_falls_back_to_embedded() {
    let tok = Tokenizer::for_model_dir(None).unwrap();
    assert_eq!(tok.vocab_size(), 49408);
    let dir = tempfile::tempdir().unwrap();
    assert!(Tokenizer::from_dir(dir.path()).unwrap().is_none());
    let tok = Tokenizer::for_model_dir(Some(dir.path())).unwrap();
    assert_eq!(
        tok.encode("a photo of a cat", 77),
        [49406, 320, 1125, 539, 320, 2368, 49407]
    );
    let tok = Tokenizer::for_model_dir(Some(&fixtures().join("tiny"))).unwrap();
    assert_eq!(tok.bos_id(), 0);
}

/// Writes `files` into a fresh folder and expects `from_dir` to fail naming `culprit`.
fn expect_error(files: &[(&str, &[u8])], culprit: &str, needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    let err = match Tokenizer::from_dir(dir.path()) {
        Ok(_) => panic!("{files:?}: expected an error naming {culprit}"),
        Err(e) => e.to_string(),
    };
    let path = dir.path().join(culprit);
    assert!(
        err.contains(&path.display().to_string()),
        "error does not name {culprit}: {err}"
    );
    assert!(err.contains(needle), "error lacks {needle:?}: {err}");
    eprintln!("ok: {err}");
}

#[test]
fn bad_files_are_errors_naming_the_file() {
    const VOCAB: &str = r#"{"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2, "b": 3, "ab": 4, "b</w>": 5, "ab</w>": 6}"#;
    const MERGES: &str = "#version: 0.2\na b\na b</w>\n";
    let v = VOCAB.as_bytes();
    let m = MERGES.as_bytes();
    // A good pair, as a baseline.
    {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vocab.json"), v).unwrap();
        std::fs::write(dir.path().join("merges.txt"), m).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap().unwrap();
        assert_eq!(tok.encode("ab", 77), [0, 6, 1]);
        assert_eq!(tok.encode("ab b", 77), [0, 6, 5, 1]);
    }
    // Truncated vocab.json.
    expect_error(
        &[("vocab.json", &v[..40]), ("merges.txt", m)],
        "vocab.json",
        "JSON",
    );
    // Wrong JSON shapes.
    expect_error(
        &[("vocab.json", b"[1, 2]"), ("merges.txt", m)],
        "vocab.json",
        "JSON",
    );
    expect_error(
        &[("vocab.json", br#"{"a": -1}"#), ("merges.txt", m)],
        "vocab.json",
        "JSON",
    );
    expect_error(
        &[("vocab.json", b""), ("merges.txt", m)],
        "vocab.json",
        "JSON",
    );
    // Not UTF-8.
    expect_error(
        &[("vocab.json", b"{\"\xff\": 1}"), ("merges.txt", m)],
        "vocab.json",
        "UTF-8",
    );
    // No special tokens.
    expect_error(
        &[
            ("vocab.json", br#"{"a": 0, "b": 1, "ab": 2}"#),
            ("merges.txt", b"a b\n"),
        ],
        "vocab.json",
        "<|startoftext|>",
    );
    // Garbled merges.txt: three tokens, one token, a blank line.
    expect_error(
        &[("vocab.json", v), ("merges.txt", b"a b c\n")],
        "merges.txt",
        "line 1",
    );
    expect_error(
        &[("vocab.json", v), ("merges.txt", b"#version: 0.2\nab\n")],
        "merges.txt",
        "line 2",
    );
    expect_error(
        &[("vocab.json", v), ("merges.txt", b"a b\n\na b</w>\n")],
        "merges.txt",
        "line 2",
    );
    // A merge whose token is not in the vocabulary; truncated merges.txt mid-token.
    expect_error(
        &[("vocab.json", v), ("merges.txt", b"a c\n")],
        "merges.txt",
        "\"c\"",
    );
    expect_error(
        &[("vocab.json", v), ("merges.txt", b"a b</\n")],
        "merges.txt",
        "b</",
    );
    // Binary garbage.
    expect_error(
        &[("vocab.json", v), ("merges.txt", b"\x1f\x8b\x08\x00\xff")],
        "merges.txt",
        "UTF-8",
    );
    // One of the pair missing.
    expect_error(&[("vocab.json", v)], "merges.txt", "missing");
    expect_error(&[("merges.txt", m)], "vocab.json", "missing");

    // tokenizer.json: truncated, wrong model, bad merges.
    let tj = format!(
        r#"{{"model": {{"type": "BPE", "vocab": {VOCAB}, "merges": ["a b", ["a", "b</w>"]]}}}}"#
    );
    {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), &tj).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap().unwrap();
        assert_eq!(tok.encode("ab b", 77), [0, 6, 5, 1]);
    }
    let tjb = tj.as_bytes();
    expect_error(
        &[("tokenizer.json", &tjb[..tjb.len() / 2])],
        "tokenizer.json",
        "tokenizer.json",
    );
    expect_error(&[("tokenizer.json", b"{}")], "tokenizer.json", "model");
    expect_error(
        &[(
            "tokenizer.json",
            tj.replace("\"BPE\"", "\"WordPiece\"").as_bytes(),
        )],
        "tokenizer.json",
        "WordPiece",
    );
    expect_error(
        &[(
            "tokenizer.json",
            tj.replace("[\"a\", \"b</w>\"]", "[\"a\"]").as_bytes(),
        )],
        "tokenizer.json",
        "model.merges[1]",
    );
    expect_error(
        &[(
            "tokenizer.json",
            tj.replace("\"a b\"", "\"a  b\"").as_bytes(),
        )],
        "tokenizer.json",
        "model.merges[0]",
    );
    expect_error(
        &[(
            "tokenizer.json",
            tj.replace("\"a b\"", "\"a x\"").as_bytes(),
        )],
        "tokenizer.json",
        "\"x\"",
    );
}

#[test]
fn fast_enough() {
    // A tokenizer of its own (cold cache), not the shared embedded one.
    let dir = tempfile::tempdir().unwrap();
    write_vocab_merges(&Tokenizer::embedded(), dir.path());
    let t0 = Instant::now();
    let tok = Tokenizer::from_dir(dir.path()).unwrap().unwrap();
    let load = t0.elapsed();
    let cases = cases();
    let texts: Vec<&str> = cases.iter().take(2000).map(|c| c.text.as_str()).collect();
    let t0 = Instant::now();
    let batch = tok.encode_batch(&texts, CONTEXT_LENGTH);
    let cold = t0.elapsed();
    let t0 = Instant::now();
    let again = tok.encode_batch(&texts, CONTEXT_LENGTH);
    let warm = t0.elapsed();
    assert_eq!(batch, again);
    eprintln!(
        "load from vocab.json + merges.txt {load:?}; 2000 texts: cold {cold:?}, warm {warm:?}"
    );
    assert!(cold.as_secs_f64() < 1.0, "2000 texts took {cold:?}");
}
