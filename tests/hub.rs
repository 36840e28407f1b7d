//! The Hugging Face hub cache: lookups in the hub's exact layout, the offline and broken-cache
//! errors, the environment variables, and a download into the cache from a local stand-in for
//! the hub (a loopback HTTP server in this process: no test touches the network).

#![cfg(unix)]

mod common;

use common::tiny_model;
use setar_engine::config::ClipConfig;
use setar_engine::hub::{self, Cached, HubEnv, CLIP_B16};
use setar_engine::progress::Progress;
use setar_engine::weights::WeightsFile;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const COMMIT: &str = "8d052a0f05efbaefbc9e8786ba291cfdf93e5bff";
const PR_COMMIT: &str = "d15b5f29721ca72dac15f8526b284be910de18be";
const QUIET: Progress = Progress { quiet: true };
/// Nothing listens there: any attempt to use the network fails at once.
const NO_HUB: &str = "http://127.0.0.1:9";

fn env(cache: &Path, offline: bool) -> HubEnv {
    HubEnv {
        cache: cache.to_path_buf(),
        offline,
        endpoint: NO_HUB.into(),
        token: None,
    }
}

/// Puts `files` (name, bytes, blob name) into `cache` exactly as `huggingface_hub` does:
/// `refs/main`, `blobs/<etag>`, `snapshots/<commit>/<name>` → `../../blobs/<etag>`.
fn populate(
    cache: &Path,
    repo_id: &str,
    commit: &str,
    files: &[(&str, Vec<u8>, String)],
) -> PathBuf {
    populate_ref(cache, repo_id, "main", commit, files)
}

/// The same for any revision (`refs/pr/66` is stored as `refs/refs/pr/66`).
fn populate_ref(
    cache: &Path,
    repo_id: &str,
    revision: &str,
    commit: &str,
    files: &[(&str, Vec<u8>, String)],
) -> PathBuf {
    let repo = cache.join(hub::repo_folder_name(repo_id));
    let snapshot = repo.join("snapshots").join(commit);
    let ref_file = repo.join("refs").join(revision);
    std::fs::create_dir_all(ref_file.parent().unwrap()).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::write(ref_file, commit).unwrap();
    for (name, bytes, etag) in files {
        std::fs::write(repo.join("blobs").join(etag), bytes).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{etag}"), snapshot.join(name)).unwrap();
    }
    repo
}

fn tiny_files() -> Vec<(&'static str, Vec<u8>, String)> {
    let dir = tiny_model();
    vec![
        (
            "model.safetensors",
            std::fs::read(dir.join("model.safetensors")).unwrap(),
            // LFS files are stored under their sha256, others under their git blob sha1.
            "a".repeat(64),
        ),
        (
            "config.json",
            std::fs::read(dir.join("config.json")).unwrap(),
            "b".repeat(40),
        ),
    ]
}

fn err_text(r: setar_engine::Result<hub::HubModel>) -> String {
    match r {
        Ok(m) => panic!("expected an error, got {m:?}"),
        Err(e) => {
            // Shown with --nocapture: the messages are for people, read them.
            eprintln!("--- error text:\n{e}");
            e.to_string()
        }
    }
}

#[test]
fn resolves_a_cached_model_without_network() {
    let cache = tempfile::tempdir().unwrap();
    let repo = populate(cache.path(), CLIP_B16, COMMIT, &tiny_files());
    // Online, but with a hub that does not exist: a complete cache must not need it.
    for offline in [true, false] {
        let model = hub::resolve_in(&env(cache.path(), offline), CLIP_B16, "main", QUIET).unwrap();
        assert_eq!(model.dir, repo.join("snapshots").join(COMMIT));
        assert_eq!(model.commit, COMMIT);
        assert_eq!(model.repo_id, CLIP_B16);
        assert!(model.file("vocab.json").is_none());
    }
    // The snapshot folder works as --weights: the weights through the symlink, and the
    // config.json beside it (also a symlink) is the one read.
    let model = hub::resolve_in(&env(cache.path(), true), CLIP_B16, "main", QUIET).unwrap();
    let file = WeightsFile::open(&model.dir).unwrap();
    let config = ClipConfig::for_weights(&file).unwrap();
    let expected = ClipConfig::for_weights(&WeightsFile::open(&tiny_model()).unwrap()).unwrap();
    assert_eq!(
        (&config.vision, &config.text),
        (&expected.vision, &expected.text)
    );
    assert!(config.source.ends_with("config.json"), "{}", config.source);
    // A commit hash as the revision finds the snapshot without a ref.
    let by_hash = hub::resolve_in(&env(cache.path(), true), CLIP_B16, COMMIT, QUIET).unwrap();
    assert_eq!(by_hash.dir, model.dir);
}

#[test]
fn offline_with_an_empty_cache_says_what_to_pass() {
    let cache = tempfile::tempdir().unwrap();
    let msg = err_text(hub::resolve_in(
        &env(cache.path(), true),
        CLIP_B16,
        "main",
        QUIET,
    ));
    for needle in [
        CLIP_B16,
        "HF_HUB_OFFLINE",
        "--weights",
        "model.safetensors",
        "config.json",
        "hf download openai/clip-vit-base-patch16",
        "models--openai--clip-vit-base-patch16",
        &cache.path().display().to_string(),
    ] {
        assert!(msg.contains(needle), "`{needle}` missing from:\n{msg}");
    }
}

#[test]
fn a_ref_to_a_missing_snapshot_is_a_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    let repo = populate(cache.path(), CLIP_B16, COMMIT, &tiny_files());
    std::fs::remove_dir_all(repo.join("snapshots").join(COMMIT)).unwrap();
    let msg = err_text(hub::resolve_in(
        &env(cache.path(), true),
        CLIP_B16,
        "main",
        QUIET,
    ));
    for needle in ["refs/main", COMMIT, "missing", "broken cache", "--weights"] {
        assert!(msg.contains(needle), "`{needle}` missing from:\n{msg}");
    }
}

#[test]
fn a_dangling_symlink_and_a_bad_ref_are_named() {
    let cache = tempfile::tempdir().unwrap();
    let repo = populate(cache.path(), CLIP_B16, COMMIT, &tiny_files());
    std::fs::remove_file(repo.join("blobs").join("a".repeat(64))).unwrap();
    match hub::cached_in(cache.path(), CLIP_B16, "main") {
        Cached::Incomplete(why) => {
            assert!(why.contains("model.safetensors"), "{why}");
            assert!(why.contains("symlink"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    std::fs::write(repo.join("refs/main"), "not-a-hash\n").unwrap();
    let msg = err_text(hub::resolve_in(
        &env(cache.path(), true),
        CLIP_B16,
        "main",
        QUIET,
    ));
    assert!(msg.contains("not a commit hash"), "{msg}");
}

#[test]
fn bad_repo_ids_are_refused() {
    let cache = tempfile::tempdir().unwrap();
    for bad in ["", "a/b/c", "../x", "a/..", "org/na me"] {
        let msg = err_text(hub::resolve_in(
            &env(cache.path(), true),
            bad,
            "main",
            QUIET,
        ));
        assert!(msg.contains("not a Hugging Face model id"), "{bad}: {msg}");
    }
}

#[test]
fn environment_variables_are_read_like_huggingface_hub() {
    let from = |pairs: &[(&str, &str)]| {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubEnv::from_vars(|k| map.get(k).cloned())
    };
    let e = from(&[("HOME", "/home/u")]);
    assert_eq!(e.cache, PathBuf::from("/home/u/.cache/huggingface/hub"));
    assert!(!e.offline);
    assert_eq!(e.endpoint, "https://huggingface.co");
    assert_eq!(e.token, None);
    let e = from(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]);
    assert_eq!(e.cache, PathBuf::from("/xdg/huggingface/hub"));
    let e = from(&[
        ("HOME", "/home/u"),
        ("HF_HOME", "~/hf"),
        ("XDG_CACHE_HOME", "/xdg"),
    ]);
    assert_eq!(e.cache, PathBuf::from("/home/u/hf/hub"));
    let e = from(&[("HF_HOME", "/hf"), ("HUGGINGFACE_HUB_CACHE", "/old")]);
    assert_eq!(e.cache, PathBuf::from("/old"));
    let e = from(&[
        ("HF_HOME", "/hf"),
        ("HUGGINGFACE_HUB_CACHE", "/old"),
        ("HF_HUB_CACHE", "/new"),
    ]);
    assert_eq!(e.cache, PathBuf::from("/new"));
    let e = from(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "")]);
    assert_eq!(e.cache, PathBuf::from("/hf/hub"), "empty counts as unset");
    for (value, offline) in [
        ("1", true),
        ("true", true),
        ("YES", true),
        ("0", false),
        ("", false),
    ] {
        assert_eq!(
            from(&[("HF_HUB_OFFLINE", value)]).offline,
            offline,
            "{value:?}"
        );
    }
    assert!(from(&[("TRANSFORMERS_OFFLINE", "1")]).offline);
    let e = from(&[("HF_ENDPOINT", "http://mirror:8080/"), ("HF_TOKEN", "t")]);
    assert_eq!(e.endpoint, "http://mirror:8080");
    assert_eq!(e.token.as_deref(), Some("t"));
}

// ---------------------------------------------------------------------------------------------
// A stand-in for the hub on 127.0.0.1, answering like huggingface.co does today:
// `HEAD resolve/<rev>/<f>` of a small file is a relative 307 to `/api/resolve-cache/…`, which
// answers with X-Repo-Commit and the ETag; of an LFS file a 302 to the file storage with
// X-Linked-Etag / X-Linked-Size / X-Repo-Commit; a missing file is a 404 EntryNotFound;
// `/api/models/<repo>/discussions` lists pull requests.
// ---------------------------------------------------------------------------------------------

/// (name, bytes, etag, is LFS)
type File = (&'static str, Vec<u8>, String, bool);

/// One commit of the fake repository and the revision names (as in URLs) that reach it.
struct Tree {
    revs: Vec<String>,
    commit: &'static str,
    files: Vec<File>,
}

struct FakeHub {
    endpoint: String,
    requests: Arc<AtomicUsize>,
}

fn fake_hub(repo_id: &'static str, trees: Vec<Tree>, discussions: &'static str) -> FakeHub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap_or("").to_string();
            let path = parts.next().unwrap_or("").to_string();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                    break;
                }
            }
            let mut headers = vec!["Connection: close".to_string()];
            let mut status = "404 Not Found";
            let mut body: Vec<u8> = Vec::new();
            let resolve = format!("/{repo_id}/resolve/");
            let cache = format!("/api/resolve-cache/models/{repo_id}/");
            if let Some(rest) = path.strip_prefix(&resolve) {
                let (rev, name) = rest.split_once('/').unwrap();
                let tree = trees
                    .iter()
                    .find(|t| t.revs.iter().any(|r| r == rev) || t.commit == rev)
                    .unwrap_or_else(|| panic!("unexpected revision {rev}"));
                headers.push(format!("X-Repo-Commit: {}", tree.commit));
                match tree.files.iter().find(|f| f.0 == name) {
                    Some((_, bytes, etag, true)) => {
                        status = "302 Found";
                        headers.push(format!("X-Linked-Etag: \"{etag}\""));
                        headers.push(format!("X-Linked-Size: {}", bytes.len()));
                        headers.push(format!("Location: http://{}/storage/{etag}", host(&stream)));
                    }
                    Some((_, _, _, false)) => {
                        status = "307 Temporary Redirect";
                        headers.push(format!("Location: {cache}{}/{name}", tree.commit));
                    }
                    None => headers.push("X-Error-Code: EntryNotFound".into()),
                }
            } else if let Some(rest) = path.strip_prefix(&cache) {
                let (commit, name) = rest.split_once('/').unwrap();
                let tree = trees.iter().find(|t| t.commit == commit).unwrap();
                if let Some((_, bytes, etag, _)) = tree.files.iter().find(|f| f.0 == name) {
                    status = "200 OK";
                    headers.push(format!("X-Repo-Commit: {commit}"));
                    headers.push(format!("ETag: \"{etag}\""));
                    body = bytes.clone();
                }
            } else if let Some(etag) = path.strip_prefix("/storage/") {
                let all = trees.iter().flat_map(|t| t.files.iter());
                if let Some((_, bytes, _, _)) = all.clone().find(|f| f.2 == etag) {
                    status = "200 OK";
                    body = bytes.clone();
                }
            } else if path.starts_with(&format!("/api/models/{repo_id}/discussions")) {
                status = "200 OK";
                body = discussions.as_bytes().to_vec();
            }
            headers.push(format!("Content-Length: {}", body.len()));
            let mut out =
                format!("HTTP/1.1 {status}\r\n{}\r\n\r\n", headers.join("\r\n")).into_bytes();
            if method != "HEAD" {
                out.extend_from_slice(&body);
            }
            let _ = stream.write_all(&out);
        }
    });
    FakeHub { endpoint, requests }
}

/// `http://<the address this connection reached>`: the storage redirect is absolute, as the
/// hub's is.
fn host(stream: &std::net::TcpStream) -> String {
    stream.local_addr().unwrap().to_string()
}

/// The tiny model plus a vocab.json, as files of a fake repository.
fn repo_files() -> Vec<File> {
    tiny_files()
        .into_iter()
        .map(|(name, bytes, etag)| (name, bytes, etag, name == "model.safetensors"))
        .chain([("vocab.json", b"{\"a\": 0}".to_vec(), "c".repeat(40), false)])
        .collect()
}

const NO_PRS: &str = r#"{"discussions": [], "count": 0, "start": 0}"#;

#[test]
fn downloads_into_the_hub_layout_then_works_offline() {
    let files = repo_files();
    let main = Tree {
        revs: vec!["main".into()],
        commit: COMMIT,
        files: files.clone(),
    };
    let server = fake_hub(CLIP_B16, vec![main], NO_PRS);
    let cache = tempfile::tempdir().unwrap();
    let online = HubEnv {
        endpoint: server.endpoint.clone(),
        ..env(cache.path(), false)
    };
    let model = hub::resolve_in(&online, CLIP_B16, "main", QUIET).unwrap();
    let repo = cache.path().join("models--openai--clip-vit-base-patch16");
    assert_eq!(model.dir, repo.join("snapshots").join(COMMIT));
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );
    for (name, bytes, etag, _) in &files {
        let pointer = model.dir.join(name);
        assert_eq!(
            std::fs::read_link(&pointer).unwrap(),
            PathBuf::from(format!("../../blobs/{etag}")),
            "{name}"
        );
        assert_eq!(&std::fs::read(&pointer).unwrap(), bytes, "{name}");
    }
    assert!(model.file("vocab.json").is_some());
    assert!(
        model.file("merges.txt").is_none(),
        "absent upstream: skipped"
    );
    assert_no_leftovers(&repo);
    WeightsFile::open(&model.dir).unwrap();

    // Now cached: online asks nothing more, offline finds the same snapshot.
    let before = server.requests.load(Ordering::SeqCst);
    let again = hub::resolve_in(&online, CLIP_B16, "main", QUIET).unwrap();
    assert_eq!(again, model);
    assert_eq!(server.requests.load(Ordering::SeqCst), before);
    let offline = hub::resolve_in(&env(cache.path(), true), CLIP_B16, "main", QUIET).unwrap();
    assert_eq!(offline, model);

    // A lost blob is fetched again.
    std::fs::remove_file(repo.join("blobs").join("a".repeat(64))).unwrap();
    let repaired = hub::resolve_in(&online, CLIP_B16, "main", QUIET).unwrap();
    assert_eq!(
        std::fs::read(repaired.weights()).unwrap(),
        files[0].1,
        "model.safetensors restored"
    );
}

/// Like openai/clip-vit-base-patch32 today: `main` has pytorch_model.bin but no
/// model.safetensors, which sits in the open pull request of the conversion bot.
#[test]
fn main_without_safetensors_uses_the_conversion_pull_request() {
    let files = repo_files();
    let main_files: Vec<File> = files
        .iter()
        .filter(|f| f.0 != "model.safetensors")
        .cloned()
        .chain([("pytorch_model.bin", vec![0u8; 16], "d".repeat(64), true)])
        .collect();
    let main = Tree {
        revs: vec!["main".into()],
        commit: COMMIT,
        files: main_files,
    };
    let pr = Tree {
        revs: vec!["refs%2Fpr%2F7".into()],
        commit: PR_COMMIT,
        files: files.clone(),
    };
    let discussions = r#"{"discussions": [
        {"num": 9, "title": "Update README.md", "status": "open", "isPullRequest": true},
        {"num": 8, "title": "Adding `safetensors` variant of this model", "status": "closed",
         "isPullRequest": true},
        {"num": 7, "title": "Adding `safetensors` variant of this model", "status": "open",
         "isPullRequest": true, "author": {"name": "SFconvertbot"}}
    ], "count": 3, "start": 0}"#;
    let server = fake_hub(CLIP_B16, vec![main, pr], discussions);
    let cache = tempfile::tempdir().unwrap();
    let online = HubEnv {
        endpoint: server.endpoint.clone(),
        ..env(cache.path(), false)
    };
    let model = hub::resolve_in(&online, CLIP_B16, "main", QUIET).unwrap();
    let repo = cache.path().join("models--openai--clip-vit-base-patch16");
    assert_eq!(model.commit, PR_COMMIT);
    assert_eq!(model.dir, repo.join("snapshots").join(PR_COMMIT));
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/refs/pr/7")).unwrap(),
        PR_COMMIT,
        "cached under the pull request's ref, as huggingface_hub does"
    );
    assert!(!repo.join("refs/main").exists(), "main is not this commit");
    assert!(model.file("config.json").is_some());
    assert_no_leftovers(&repo);
    // Offline, `main` finds the pull request's snapshot.
    let offline = hub::resolve_in(&env(cache.path(), true), CLIP_B16, "main", QUIET).unwrap();
    assert_eq!(offline, model);

    // Without such a pull request the error says why.
    let main_only = Tree {
        revs: vec!["main".into()],
        commit: COMMIT,
        files: vec![("pytorch_model.bin", vec![0u8; 16], "d".repeat(64), true)],
    };
    let server = fake_hub(CLIP_B16, vec![main_only], NO_PRS);
    let other_cache = tempfile::tempdir().unwrap();
    let online = HubEnv {
        endpoint: server.endpoint.clone(),
        ..env(other_cache.path(), false)
    };
    let msg = err_text(hub::resolve_in(&online, CLIP_B16, "main", QUIET));
    assert!(msg.contains("no model.safetensors on main"), "{msg}");
    assert!(msg.contains("--weights"), "{msg}");
}

/// The cache `transformers` leaves for such a repository: config.json (and
/// pytorch_model.bin) in main's snapshot, model.safetensors alone in the pull request's.
#[test]
fn a_transformers_cache_with_the_weights_in_a_pull_request_resolves() {
    let cache = tempfile::tempdir().unwrap();
    let files = tiny_files();
    let config = &files[1];
    populate(cache.path(), CLIP_B16, COMMIT, std::slice::from_ref(config));
    let repo = populate_ref(cache.path(), CLIP_B16, "refs/pr/66", PR_COMMIT, &files[..1]);
    let model = hub::resolve_in(&env(cache.path(), true), CLIP_B16, "main", QUIET).unwrap();
    assert_eq!(model.dir, repo.join("snapshots").join(PR_COMMIT));
    // No config.json beside the weights: the sizes come from the tensor shapes.
    let file = WeightsFile::open(&model.dir).unwrap();
    let inferred = ClipConfig::for_weights(&file).unwrap();
    assert_eq!(inferred.source, "tensor shapes");
    // Online, the missing config.json is added to that snapshot (same blob as main's).
    let pr = Tree {
        revs: vec!["refs%2Fpr%2F66".into()],
        commit: PR_COMMIT,
        files: repo_files(),
    };
    let server = fake_hub(CLIP_B16, vec![pr], NO_PRS);
    let online = HubEnv {
        endpoint: server.endpoint.clone(),
        ..env(cache.path(), false)
    };
    let model = hub::resolve_in(&online, CLIP_B16, "main", QUIET).unwrap();
    assert_eq!(
        std::fs::read(model.config()).unwrap(),
        config.1,
        "config.json linked in"
    );
}

#[test]
fn a_failed_download_says_what_to_pass() {
    let cache = tempfile::tempdir().unwrap();
    // Online, but nobody answers.
    let msg = err_text(hub::resolve_in(
        &env(cache.path(), false),
        CLIP_B16,
        "main",
        QUIET,
    ));
    for needle in ["could not download", CLIP_B16, "--weights", "hf download"] {
        assert!(msg.contains(needle), "`{needle}` missing from:\n{msg}");
    }
}

fn assert_no_leftovers(repo: &Path) {
    let leftovers: Vec<_> = walk(repo)
        .into_iter()
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.ends_with(".incomplete") || n.ends_with(".tmp")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && !path.is_symlink() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
