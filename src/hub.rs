//! Models from the Hugging Face hub cache: found there when cached, downloaded into it when
//! online, and a clear "what to pass instead" when neither works.
//!
//! The cache is the one `huggingface_hub` (and `transformers`) read and write, so a model
//! downloaded by either is found here and the other way round:
//!
//! ```text
//! <cache>/models--<org>--<name>/refs/<revision>          the commit hash, no newline
//!                              /snapshots/<commit>/<file> symlink → ../../blobs/<etag>
//!                              /blobs/<etag>              the bytes (etag: sha256 for LFS
//!                                                         files, git blob sha1 otherwise)
//! ```
//!
//! `<cache>` is `$HF_HUB_CACHE`, else `$HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub` with
//! `HF_HOME` defaulting to `$XDG_CACHE_HOME/huggingface`, then `~/.cache/huggingface`.
//! `HF_HUB_OFFLINE=1` (or `TRANSFORMERS_OFFLINE=1`) forbids the network, `HF_ENDPOINT` moves
//! it, `HF_TOKEN` is sent when set. Everything below [`resolve`] takes these as an explicit
//! [`HubEnv`], so callers (and tests) need not touch the process environment.
//!
//! Downloads follow the hub's protocol: `HEAD …/resolve/<revision>/<file>` (no redirects)
//! gives the commit (`X-Repo-Commit`), the blob name (`X-Linked-Etag` or `ETag`) and size;
//! `GET …/resolve/<commit>/<file>` streams the bytes into `blobs/<etag>.<pid>.incomplete`,
//! which is renamed into place once complete; the snapshot entry is a relative symlink made
//! under a temporary name and renamed too, so an interrupted run never leaves a file that looks
//! whole.
//!
//! Several OpenAI CLIP repositories have no `model.safetensors` on `main` (only
//! `pytorch_model.bin` & co): their safetensors weights live in an open pull request by the
//! hub's conversion bot, titled [`CONVERSION_PR_TITLE`]. Like `transformers`, a `main` without
//! `model.safetensors` is then served from that pull request (`refs/pr/<n>`, cached under
//! `refs/refs/pr/<n>` and that commit's snapshot, whose other files equal `main`'s).

use crate::progress::Progress;
use crate::{Error, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The model `setar-engine run` uses when it is given no `--weights`.
pub const CLIP_B16: &str = "openai/clip-vit-base-patch16";
/// The file a snapshot must have to be usable.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Files fetched beside the weights when the repository has them: `config.json` (without it
/// the sizes are inferred from the tensor shapes, exact for OpenAI's CLIPs) and the tokenizer
/// files (the engine embeds CLIP's vocabulary, so they are only used when present).
pub const EXTRA_FILES: [&str; 4] = ["config.json", "vocab.json", "merges.txt", "tokenizer.json"];
/// The title of the hub's safetensors conversion pull requests (as `transformers` looks it up).
pub const CONVERSION_PR_TITLE: &str = "Adding `safetensors` variant of this model";
/// `HF_ENDPOINT` when unset.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where the cache is and whether (and how) to reach the hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubEnv {
    /// The hub cache folder (the one holding `models--…` folders).
    pub cache: PathBuf,
    /// Never use the network.
    pub offline: bool,
    /// Base URL of the hub, without a trailing slash.
    pub endpoint: String,
    /// Sent as `Authorization: Bearer …` to the endpoint (never to redirect targets).
    pub token: Option<String>,
}

impl HubEnv {
    /// From the process environment (see the module docs for the variables).
    pub fn from_env() -> HubEnv {
        HubEnv::from_vars(|name| std::env::var(name).ok())
    }

    /// From any variable lookup; empty values count as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> HubEnv {
        let get = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let home = get("HOME")
            .or_else(|| get("USERPROFILE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        let expand = |v: String| match v.strip_prefix('~') {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => {
                home.join(rest.trim_start_matches('/'))
            }
            _ => PathBuf::from(v),
        };
        let hf_home = get("HF_HOME").map(&expand).unwrap_or_else(|| {
            get("XDG_CACHE_HOME")
                .map(&expand)
                .unwrap_or_else(|| home.join(".cache"))
                .join("huggingface")
        });
        let cache = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(&expand)
            .unwrap_or_else(|| hf_home.join("hub"));
        let truthy = |name: &str| {
            get(name).is_some_and(|v| {
                matches!(
                    v.trim().to_ascii_uppercase().as_str(),
                    "1" | "ON" | "YES" | "TRUE"
                )
            })
        };
        HubEnv {
            cache,
            offline: truthy("HF_HUB_OFFLINE") || truthy("TRANSFORMERS_OFFLINE"),
            endpoint: get("HF_ENDPOINT")
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
                .trim_end_matches('/')
                .to_string(),
            token: get("HF_TOKEN"),
        }
    }
}

/// A complete snapshot in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubModel {
    pub repo_id: String,
    /// The commit hash the snapshot is of.
    pub commit: String,
    /// `<cache>/models--…/snapshots/<commit>`: holds `model.safetensors`, `config.json` and the
    /// tokenizer files the repository has. Pass it as `--weights`.
    pub dir: PathBuf,
}

impl HubModel {
    pub fn weights(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// A file of the snapshot, when it is there (e.g. `vocab.json`).
    pub fn file(&self, name: &str) -> Option<PathBuf> {
        let path = self.dir.join(name);
        path.is_file().then_some(path)
    }
}

/// The snapshot folder of `repo_id` at `main`, from the cache or downloaded into it, with the
/// settings of the process environment. See [`resolve_in`].
pub fn resolve(repo_id: &str, progress: Progress) -> Result<PathBuf> {
    Ok(resolve_in(&HubEnv::from_env(), repo_id, "main", progress)?.dir)
}

/// `repo_id` at `revision` (a branch, tag or commit hash): the cached snapshot when it has the
/// weights (no network at all, except one try to add a missing `config.json` when online),
/// else downloaded when `env` allows it, else an error that says what to download where, or to
/// pass `--weights`.
pub fn resolve_in(
    env: &HubEnv,
    repo_id: &str,
    revision: &str,
    progress: Progress,
) -> Result<HubModel> {
    check_repo_id(repo_id)?;
    if revision.is_empty() || revision.contains("..") || revision.starts_with('/') {
        return Err(Error::invalid(format!("bad revision `{revision}`")));
    }
    let state = match cached_in(&env.cache, repo_id, revision) {
        Cached::Complete(model) => {
            if !env.offline && !model.dir.join("config.json").is_file() {
                // E.g. the weights of a conversion pull request cached by transformers, which
                // reads config.json from main's snapshot. Best effort: the sizes can be
                // inferred from the tensor shapes.
                let _ = fetch_files(env, &model, &["config.json"], progress);
            }
            return Ok(model);
        }
        Cached::Incomplete(why) => why,
    };
    if env.offline {
        return Err(Error::invalid(format!(
            "{repo_id} ({revision}) is not usable from the Hugging Face cache: {state}. \
             HF_HUB_OFFLINE is set, so it is not downloaded.\n{}",
            what_to_do(env, repo_id, true)
        )));
    }
    download(env, repo_id, revision, progress).map_err(|e| {
        Error::invalid(format!(
            "could not download {repo_id} ({revision}) into the Hugging Face cache {}: {e}\n{}",
            env.cache.display(),
            what_to_do(env, repo_id, false)
        ))
    })
}

/// `models--org--name`: the folder of `repo_id` in the cache.
pub fn repo_folder_name(repo_id: &str) -> String {
    format!("models--{}", repo_id.replace('/', "--"))
}

/// What the cache holds for `repo_id` at `revision`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cached {
    Complete(HubModel),
    /// Why not (one sentence, naming the paths).
    Incomplete(String),
}

/// Looks `repo_id` at `revision` up in `cache` without any network. For `main` without
/// `model.safetensors`, a cached conversion pull request (`refs/refs/pr/<n>`) with the weights
/// is used instead (the highest `n` when there are several).
pub fn cached_in(cache: &Path, repo_id: &str, revision: &str) -> Cached {
    let repo = cache.join(repo_folder_name(repo_id));
    if !repo.is_dir() {
        return Cached::Incomplete(format!("{} does not exist", repo.display()));
    }
    let why = match snapshot_of(&repo, revision) {
        Ok((commit, dir)) => match weights_problem(&dir) {
            None => {
                return Cached::Complete(HubModel {
                    repo_id: repo_id.to_string(),
                    commit,
                    dir,
                })
            }
            Some(problem) => problem,
        },
        Err(problem) => problem,
    };
    if revision == "main" {
        let prs = repo.join("refs/refs/pr");
        let mut numbers: Vec<u64> = std::fs::read_dir(&prs)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        numbers.sort_unstable_by(|a, b| b.cmp(a));
        for n in numbers {
            if let Ok((commit, dir)) = snapshot_of(&repo, &format!("refs/pr/{n}")) {
                if weights_problem(&dir).is_none() {
                    return Cached::Complete(HubModel {
                        repo_id: repo_id.to_string(),
                        commit,
                        dir,
                    });
                }
            }
        }
    }
    Cached::Incomplete(why)
}

/// The commit and snapshot folder `revision` names in the cached `repo`, or why there is none.
fn snapshot_of(repo: &Path, revision: &str) -> std::result::Result<(String, PathBuf), String> {
    let snapshots = repo.join("snapshots");
    let commit = if is_commit_hash(revision) && snapshots.join(revision).is_dir() {
        revision.to_string()
    } else {
        let ref_file = repo.join("refs").join(revision);
        let text = std::fs::read_to_string(&ref_file).map_err(|_| {
            format!(
                "{} does not exist (revision `{revision}` was never downloaded)",
                ref_file.display()
            )
        })?;
        let commit = text.trim().to_string();
        if !is_commit_hash(&commit) {
            return Err(format!(
                "{} holds `{commit}`, not a commit hash (a broken cache: delete {} to start over)",
                ref_file.display(),
                repo.display()
            ));
        }
        commit
    };
    let dir = snapshots.join(&commit);
    if !dir.is_dir() {
        return Err(format!(
            "refs/{revision} points at commit {commit} but its snapshot {} is missing (a broken \
             cache: delete {} to start over)",
            dir.display(),
            repo.display()
        ));
    }
    Ok((commit, dir))
}

/// Why `dir` has no usable `model.safetensors`, if it has none.
fn weights_problem(dir: &Path) -> Option<String> {
    let path = dir.join(WEIGHTS_FILE);
    if path.is_file() {
        return None;
    }
    Some(match std::fs::read_link(&path) {
        Ok(target) => format!(
            "{} is a symlink to {}, which is missing",
            path.display(),
            target.display()
        ),
        Err(_) if dir.join("pytorch_model.bin").exists() => format!(
            "{} has pytorch_model.bin but no {WEIGHTS_FILE} (only safetensors is read)",
            dir.display()
        ),
        Err(_) => format!("{} is missing", path.display()),
    })
}

/// The advice appended to every failure: which files, which command, which folder.
fn what_to_do(env: &HubEnv, repo_id: &str, offline: bool) -> String {
    let files = std::iter::once(WEIGHTS_FILE)
        .chain(EXTRA_FILES)
        .collect::<Vec<_>>()
        .join(" ");
    let folder = repo_folder_name(repo_id);
    let mut out = format!(
        "Any one of these fixes it:\n\
         - pass --weights FOLDER, FOLDER holding model.safetensors (and config.json) of \
         {repo_id}, e.g. downloaded on a machine with network by `hf download {repo_id} {files} \
         --local-dir FOLDER` (pip install -U huggingface_hub; add `--revision refs/pr/N` when \
         main has no model.safetensors and the repository's open pull request \
         \"{CONVERSION_PR_TITLE}\" is number N), or from {endpoint}/{repo_id}/tree/main;\n\
         - or fill the cache: run `hf download {repo_id} {files}` (same --revision note) on a \
         machine with network and copy its ~/.cache/huggingface/hub/{folder} to \
         {cache}/{folder} here (the cache is $HF_HUB_CACHE, else $HF_HOME/hub)",
        endpoint = env.endpoint,
        cache = env.cache.display(),
    );
    if offline {
        out.push_str(&format!(
            ";\n- or unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) so that setar-engine \
             downloads them into {} itself.",
            env.cache.display()
        ));
    } else {
        out.push('.');
    }
    out
}

fn check_repo_id(repo_id: &str) -> Result<()> {
    let parts: Vec<&str> = repo_id.split('/').collect();
    let ok = (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && !p.contains("--")
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "`{repo_id}` is not a Hugging Face model id (expected `org/name`, e.g. {CLIP_B16})"
        )))
    }
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

// ---------------------------------------------------------------------------------------------
// Download.
// ---------------------------------------------------------------------------------------------

/// What `HEAD …/resolve/…` says about one file.
struct Remote {
    commit: Option<String>,
    etag: String,
    size: Option<u64>,
}

fn agent(redirects: u32) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(redirects)
        .max_redirects_will_error(redirects > 0)
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .user_agent(concat!("setar-engine/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

fn download(env: &HubEnv, repo_id: &str, revision: &str, progress: Progress) -> Result<HubModel> {
    let repo = env.cache.join(repo_folder_name(repo_id));
    let head_agent = agent(0);
    // The weights first: where they are decides the snapshot.
    let (weights_rev, remote) = match head(&head_agent, env, repo_id, revision, WEIGHTS_FILE)? {
        Some(remote) => (revision.to_string(), remote),
        None if revision == "main" => {
            let pr = conversion_pr(env, repo_id)?.ok_or_else(|| {
                Error::invalid(format!(
                    "{}/{repo_id} has no {WEIGHTS_FILE} on main (only other formats, such as \
                     pytorch_model.bin, which this engine does not read) and no open pull \
                     request \"{CONVERSION_PR_TITLE}\"",
                    env.endpoint
                ))
            })?;
            let rev = format!("refs/pr/{pr}");
            match head(&head_agent, env, repo_id, &rev, WEIGHTS_FILE)? {
                Some(remote) => (rev, remote),
                None => {
                    return Err(Error::invalid(format!(
                        "{}/{repo_id}: pull request {pr} has no {WEIGHTS_FILE}",
                        env.endpoint
                    )))
                }
            }
        }
        None => {
            return Err(Error::invalid(format!(
                "{}/{repo_id} has no {WEIGHTS_FILE} at revision {revision}",
                env.endpoint
            )))
        }
    };
    let commit = match remote.commit.clone() {
        Some(c) if is_commit_hash(&c) => c,
        _ if is_commit_hash(&weights_rev) => weights_rev.clone(),
        other => {
            return Err(Error::invalid(format!(
                "{}: the hub's answer for {WEIGHTS_FILE} has no valid X-Repo-Commit header \
                 ({other:?})",
                env.endpoint
            )))
        }
    };
    if commit != weights_rev {
        write_atomic(&repo.join("refs").join(&weights_rev), commit.as_bytes())?;
    }
    let model = HubModel {
        repo_id: repo_id.to_string(),
        dir: repo.join("snapshots").join(&commit),
        commit,
    };
    store(env, &model, WEIGHTS_FILE, &remote, progress)?;
    // The other files from the same commit, so that every file comes from one snapshot even
    // if the branch moves meanwhile.
    fetch_files(env, &model, &EXTRA_FILES, progress)?;
    Ok(model)
}

/// Fetches those of `files` the snapshot lacks and the repository has, at the snapshot's
/// commit.
fn fetch_files(env: &HubEnv, model: &HubModel, files: &[&str], progress: Progress) -> Result<()> {
    let head_agent = agent(0);
    for name in files {
        if model.dir.join(name).is_file() {
            continue;
        }
        if let Some(remote) = head(&head_agent, env, &model.repo_id, &model.commit, name)? {
            store(env, model, name, &remote, progress)?;
        }
    }
    Ok(())
}

/// Puts `name` into the snapshot: the blob (downloaded unless already there), then the link.
fn store(
    env: &HubEnv,
    model: &HubModel,
    name: &str,
    remote: &Remote,
    progress: Progress,
) -> Result<()> {
    let pointer = model.dir.join(name);
    if pointer.is_file() {
        return Ok(());
    }
    let repo = model
        .dir
        .parent()
        .and_then(Path::parent)
        .expect("snapshots/<commit>");
    let blob = repo.join("blobs").join(&remote.etag);
    if !blob.is_file() {
        let url = resolve_url(env, &model.repo_id, &model.commit, name);
        fetch(&agent(10), env, &url, &blob, remote.size, name, progress)?;
    }
    link_into_snapshot(&blob, &pointer)
}

/// The number of the repository's open safetensors conversion pull request, if any (found
/// like `transformers` does: by its title, through the discussions API, newest first).
fn conversion_pr(env: &HubEnv, repo_id: &str) -> Result<Option<u64>> {
    let agent = agent(10);
    for page in 0..20 {
        let url = format!("{}/api/models/{repo_id}/discussions?p={page}", env.endpoint);
        let mut resp = with_auth(agent.get(&url), env)
            .call()
            .map_err(|e| Error::invalid(format!("{url}: {e}")))?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(Error::invalid(format!("{url}: HTTP {status}")));
        }
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| Error::invalid(format!("{url}: {e}")))?;
        let body: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(format!("{url}: not the expected JSON: {e}")))?;
        let list = body["discussions"].as_array().cloned().unwrap_or_default();
        for d in &list {
            if d["title"].as_str() == Some(CONVERSION_PR_TITLE)
                && d["status"].as_str() == Some("open")
                && d["isPullRequest"].as_bool() == Some(true)
            {
                if let Some(n) = d["num"].as_u64() {
                    return Ok(Some(n));
                }
            }
        }
        let seen = body["start"].as_u64().unwrap_or(0) + list.len() as u64;
        if list.is_empty() || seen >= body["count"].as_u64().unwrap_or(0) {
            break;
        }
    }
    Ok(None)
}

fn resolve_url(env: &HubEnv, repo_id: &str, revision: &str, file: &str) -> String {
    format!(
        "{}/{repo_id}/resolve/{}/{file}",
        env.endpoint,
        revision.replace('/', "%2F")
    )
}

fn with_auth<B>(req: ureq::RequestBuilder<B>, env: &HubEnv) -> ureq::RequestBuilder<B> {
    match &env.token {
        Some(token) => req.header("Authorization", format!("Bearer {token}")),
        None => req,
    }
}

/// `HEAD` of one file; `None` when the repository has no such file.
fn head(
    agent: &ureq::Agent,
    env: &HubEnv,
    repo_id: &str,
    revision: &str,
    file: &str,
) -> Result<Option<Remote>> {
    let mut url = resolve_url(env, repo_id, revision, file);
    // Renamed repositories answer with a relative redirect to the new name: follow those
    // (a few), but not the absolute ones to the file storage, whose headers are not the hub's.
    for _ in 0..5 {
        let resp = with_auth(agent.head(&url), env)
            .header("Accept-Encoding", "identity")
            .call()
            .map_err(|e| Error::invalid(format!("{url}: {e}")))?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        if matches!(status, 301 | 302 | 307 | 308) && header("x-linked-etag").is_none() {
            if let Some(location) = header("location").filter(|l| l.starts_with('/')) {
                url = format!("{}{location}", env.endpoint);
                continue;
            }
        }
        let error_code = header("x-error-code").unwrap_or_default();
        match status {
            200..=299 | 301 | 302 | 307 | 308 => {}
            404 if error_code == "EntryNotFound" || error_code.is_empty() => return Ok(None),
            401 | 403 if error_code == "GatedRepo" => {
                return Err(Error::invalid(format!(
                    "{url}: {repo_id} is gated: accept its terms on {}/{repo_id} and set HF_TOKEN",
                    env.endpoint
                )))
            }
            401 | 404 if error_code == "RepoNotFound" || status == 401 => {
                return Err(Error::invalid(format!(
                    "{url}: repository {repo_id} not found (or private: then set HF_TOKEN)"
                )))
            }
            _ => {
                let detail = header("x-error-message").unwrap_or(error_code);
                return Err(Error::invalid(format!("{url}: HTTP {status} {detail}")));
            }
        }
        let etag = header("x-linked-etag")
            .or_else(|| header("etag"))
            .map(|e| {
                e.trim()
                    .trim_start_matches("W/")
                    .trim_matches('"')
                    .to_string()
            })
            .filter(|e| {
                !e.is_empty()
                    && e.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
            })
            .ok_or_else(|| Error::invalid(format!("{url}: no usable ETag in the answer")))?;
        let size = header("x-linked-size")
            .or_else(|| {
                // The content length of a redirect is the redirect's, not the file's.
                (200..300)
                    .contains(&status)
                    .then(|| header("content-length"))
                    .flatten()
            })
            .and_then(|s| s.trim().parse().ok());
        return Ok(Some(Remote {
            commit: header("x-repo-commit").map(|c| c.trim().to_string()),
            etag,
            size,
        }));
    }
    Err(Error::invalid(format!("{url}: too many redirects")))
}

/// Streams `url` into `blob`, through a temporary file renamed into place when complete.
fn fetch(
    agent: &ureq::Agent,
    env: &HubEnv,
    url: &str,
    blob: &Path,
    size: Option<u64>,
    what: &str,
    progress: Progress,
) -> Result<()> {
    let dir = blob.parent().expect("blobs/<etag>");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let resp = with_auth(agent.get(url), env)
        .header("Accept-Encoding", "identity")
        .call()
        .map_err(|e| Error::invalid(format!("{url}: {e}")))?;
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(Error::invalid(format!("{url}: HTTP {status}")));
    }
    let len = size.or_else(|| resp.body().content_length());
    let tmp = blob.with_file_name(format!(
        "{}.{}.incomplete",
        blob.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut out = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let bar = byte_bar(progress, len, what);
        let mut reader = resp.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| Error::invalid(format!("{url}: {e}")))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(|e| Error::io(&tmp, e))?;
            got += n as u64;
            bar.set_position(got);
        }
        bar.finish_and_clear();
        if let Some(want) = len {
            if got != want {
                return Err(Error::invalid(format!(
                    "{url}: got {got} bytes, expected {want}"
                )));
            }
        }
        out.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(out);
        std::fs::rename(&tmp, blob).map_err(|e| Error::io(blob, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn byte_bar(progress: Progress, len: Option<u64>, what: &str) -> ProgressBar {
    if progress.quiet {
        return ProgressBar::with_draw_target(len, ProgressDrawTarget::hidden());
    }
    let bar = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    };
    let template = if len.is_some() {
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"
    } else {
        "{prefix} {bytes} {bytes_per_sec}"
    };
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("downloading {what}"));
    bar
}

/// `snapshots/<commit>/<file>` → `../../blobs/<etag>` (a relative symlink, as the hub makes;
/// a copy where symlinks are not available), made under a temporary name then renamed.
fn link_into_snapshot(blob: &Path, pointer: &Path) -> Result<()> {
    let dir = pointer.parent().expect("snapshots/<commit>/<file>");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = pointer.with_file_name(format!(
        ".{}.{}.tmp",
        pointer.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    #[cfg(unix)]
    let made = {
        let target = Path::new("../..")
            .join("blobs")
            .join(blob.file_name().unwrap());
        std::os::unix::fs::symlink(&target, &tmp)
    };
    #[cfg(not(unix))]
    let made = std::fs::copy(blob, &tmp).map(|_| ());
    made.map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, pointer).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(pointer, e)
    })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().expect("a file in a folder");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}
