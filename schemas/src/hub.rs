//! Hugging Face hub names, offline first: `gpt2`, `EleutherAI/pythia-70m` or
//! `org/dataset` resolved to a snapshot directory of the local HF cache, laid out as
//! `huggingface_hub` lays it out:
//!
//! ```text
//! $HF_HUB_CACHE (or $HF_HOME/hub, or $XDG_CACHE_HOME/huggingface/hub, or ~/.cache/huggingface/hub)
//!   models--org--name/refs/main          the commit the branch or tag points to
//!   models--org--name/snapshots/<commit>/ the files of that commit (links into blobs/)
//!   datasets--org--name/…                 the same for datasets
//! ```
//!
//! A spec that names an existing path is that path; anything else with the shape of a
//! repo id is looked up here. Files the cache lacks are downloaded into it by `hf-hub`
//! from `$HF_ENDPOINT` (default huggingface.co), with a progress bar, unless
//! `HF_HUB_OFFLINE` is set; then, or when the download fails, the error names the
//! repo, the revision and the files.

use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    fn folder_prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }
    fn noun(self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        }
    }
}

/// The hub cache directory, from the environment as `huggingface_hub` reads it.
pub fn cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = env("HF_HUB_CACHE") {
        return d;
    }
    if let Some(h) = env("HF_HOME") {
        return h.join("hub");
    }
    let base = env("XDG_CACHE_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("huggingface").join("hub")
}

/// Whether `s` has the shape of a hub repo id: `name` or `org/name`, each part of
/// letters, digits, `-`, `_` and `.`, not starting with `.` or `-`.
pub fn is_repo_id(s: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && !p.ends_with('.')
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match s.split_once('/') {
        None => part(s),
        Some((org, name)) => part(org) && part(name),
    }
}

/// Whether an environment flag is set the way `huggingface_hub` reads it (1, ON, YES, TRUE).
fn env_flag(key: &str) -> bool {
    std::env::var(key).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_uppercase().as_str(),
            "1" | "ON" | "YES" | "TRUE"
        )
    })
}

/// What a repo's snapshot must hold to be used.
#[derive(Clone, Copy, Debug)]
pub enum Want<'a> {
    /// These files (paths inside the repo); `optional` ones are fetched along with
    /// them when the hub has them.
    Files {
        required: &'a [&'a str],
        optional: &'a [&'a str],
    },
    /// An HF checkpoint: `config.json` and its safetensors weights (one file or every
    /// shard of the index), with the tokenizer files the repo has.
    Model,
    /// The data files of a dataset repo (JSONL, JSON, CSV, Parquet, Arrow, text).
    Dataset,
}

/// Files a model download brings along when the repo has them (the tokenizer stage
/// reads them from the model directory).
const MODEL_EXTRAS: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// Extensions of the files a dataset directory is read from.
const DATA_EXTENSIONS: &[&str] = &[".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt"];

fn is_data_file(name: &str) -> bool {
    let n = name.to_lowercase();
    DATA_EXTENSIONS.iter().any(|x| n.ends_with(x))
}

/// Where the files of hub repos come from: the local cache first, then (unless
/// offline) the hub, into that same cache.
#[derive(Clone, Debug)]
pub struct Hub {
    /// The cache directory ([`cache_dir`]).
    pub cache: PathBuf,
    /// The hub's address: `$HF_ENDPOINT`, default `https://huggingface.co`.
    pub endpoint: String,
    /// Never download (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// `$HF_TOKEN`, else the token file `huggingface-cli login` writes beside the cache.
    pub token: Option<String>,
}

impl Hub {
    /// The hub as `huggingface_hub` configures it from the environment.
    pub fn from_env() -> Hub {
        let cache = cache_dir();
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .or_else(|| hf_hub::Cache::new(cache.clone()).token());
        Hub {
            cache,
            endpoint: std::env::var("HF_ENDPOINT")
                .ok()
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            offline: env_flag("HF_HUB_OFFLINE"),
            token,
        }
    }

    /// The cache at `cache` alone: nothing is downloaded.
    pub fn offline(cache: &Path) -> Hub {
        Hub {
            cache: cache.to_path_buf(),
            endpoint: String::new(),
            offline: true,
            token: None,
        }
    }

    /// The snapshot of `repo_id` at `revision` (a branch, a tag or a commit; default
    /// `main`) holding what `want` asks for: from the cache when it is all there, else
    /// downloaded into the cache. Errors name the repo, the revision and the files.
    pub fn resolve(
        &self,
        repo_id: &str,
        kind: RepoKind,
        revision: Option<&str>,
        want: Want,
    ) -> Result<PathBuf, String> {
        let miss = match self.cached(repo_id, kind, revision, want) {
            Ok(dir) => return Ok(dir),
            Err(miss) => miss,
        };
        if self.offline {
            return Err(format!(
                "{miss}; HF_HUB_OFFLINE is set, so nothing was downloaded"
            ));
        }
        self.download(repo_id, kind, revision.unwrap_or("main"), want)
            .map_err(|e| format!("{miss}; downloading it from {} failed: {e}", self.endpoint))?;
        self.cached(repo_id, kind, revision, want)
    }

    fn cached(
        &self,
        repo_id: &str,
        kind: RepoKind,
        revision: Option<&str>,
        want: Want,
    ) -> Result<PathBuf, String> {
        let required: &[&str] = match want {
            Want::Files { required, .. } => required,
            Want::Model => &["config.json"],
            Want::Dataset => &[],
        };
        let dir = snapshot(&self.cache, repo_id, kind, revision, required)?;
        let rev = revision.unwrap_or("main");
        let lacks = |what: String| {
            format!(
                "{} '{repo_id}' (revision {rev}): the cached snapshot {} lacks {what}",
                kind.noun(),
                dir.display()
            )
        };
        match want {
            Want::Model => {
                let missing = model_files_missing(&dir);
                if !missing.is_empty() {
                    return Err(lacks(missing.join(", ")));
                }
            }
            Want::Dataset => {
                let any_data = walk(&dir).iter().any(|f| is_data_file(f));
                if !any_data {
                    return Err(lacks(format!(
                        "data files ({})",
                        DATA_EXTENSIONS.join(", ")
                    )));
                }
            }
            Want::Files { .. } => {}
        }
        Ok(dir)
    }

    /// Downloads what `want` needs of `repo_id` at `revision` into the cache, all from
    /// the one commit the revision names now, and points `refs/<revision>` at it.
    fn download(
        &self,
        repo_id: &str,
        kind: RepoKind,
        revision: &str,
        want: Want,
    ) -> Result<(), String> {
        use hf_hub::api::sync::ApiBuilder;
        let cache = std::path::absolute(&self.cache)
            .map_err(|e| format!("{}: {e}", self.cache.display()))?;
        let api = ApiBuilder::from_cache(hf_hub::Cache::new(cache.clone()))
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
            .with_progress(true)
            .build()
            .map_err(|e| e.to_string())?;
        let repo_type = match kind {
            RepoKind::Model => hf_hub::RepoType::Model,
            RepoKind::Dataset => hf_hub::RepoType::Dataset,
        };
        let what = format!("{} '{repo_id}' (revision {revision})", kind.noun());
        let info = api
            .repo(hf_hub::Repo::with_revision(
                repo_id.into(),
                repo_type,
                revision.into(),
            ))
            .info()
            .map_err(|e| match e.to_string() {
                s if s.contains("404") => {
                    format!("the hub has no {what} (or it is gated or private: set HF_TOKEN) ({s})")
                }
                s => format!("listing {what}: {s}"),
            })?;
        let names: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
        let has = |f: &str| names.contains(&f);
        let at = format!("{what} at commit {}", info.sha);
        let absent = |f: &str| {
            let mut shown: Vec<&str> = names.iter().copied().take(12).collect();
            if names.len() > shown.len() {
                shown.push("…");
            }
            format!("{at} has no {f} (its files: {})", shown.join(", "))
        };
        // Pinned to the commit, so that every file comes from the same one.
        let pinned = api.repo(hf_hub::Repo::with_revision(
            repo_id.into(),
            repo_type,
            info.sha.clone(),
        ));
        let snap = cache
            .join(format!(
                "{}--{}",
                kind.folder_prefix(),
                repo_id.replace('/', "--")
            ))
            .join("snapshots")
            .join(&info.sha);
        let get = |f: &str| -> Result<(), String> {
            if snap.join(f).exists() {
                return Ok(());
            }
            pinned
                .download(f)
                .map(|_| ())
                .map_err(|e| format!("{f} of {at}: {e}"))
        };
        let mut files: Vec<String> = Vec::new();
        match want {
            Want::Files { required, optional } => {
                if let Some(f) = required.iter().find(|f| !has(f)) {
                    return Err(absent(f));
                }
                files.extend(required.iter().map(|f| f.to_string()));
                files.extend(optional.iter().filter(|f| has(f)).map(|f| f.to_string()));
            }
            Want::Model => {
                if !has("config.json") {
                    return Err(absent("config.json"));
                }
                files.push("config.json".into());
                if has("model.safetensors") {
                    files.push("model.safetensors".into());
                } else if has("model.safetensors.index.json") {
                    get("model.safetensors.index.json")?;
                    files.push("model.safetensors.index.json".into());
                    let shards = index_shards(&snap.join("model.safetensors.index.json"))?;
                    if let Some(s) = shards.iter().find(|s| !has(s)) {
                        return Err(absent(&format!("{s} (a shard its index names)")));
                    }
                    files.extend(shards);
                } else {
                    return Err(absent(
                        "safetensors weights (model.safetensors or model.safetensors.index.json)",
                    ));
                }
                files.extend(
                    MODEL_EXTRAS
                        .iter()
                        .filter(|f| has(f))
                        .map(|f| f.to_string()),
                );
            }
            Want::Dataset => {
                files.extend(
                    names
                        .iter()
                        .filter(|f| is_data_file(f))
                        .map(|f| f.to_string()),
                );
                if files.is_empty() {
                    return Err(absent(&format!(
                        "data files ({})",
                        DATA_EXTENSIONS.join(", ")
                    )));
                }
            }
        }
        let todo: Vec<&String> = files.iter().filter(|f| !snap.join(f).exists()).collect();
        if !todo.is_empty() {
            eprintln!(
                "downloading {} file(s) of {at} from {} into {}",
                todo.len(),
                self.endpoint,
                cache.display()
            );
        }
        for f in todo {
            get(f)?;
        }
        // hf-hub points refs/<the revision it was given> at the commit; that is the
        // commit itself here, which huggingface_hub never writes as a ref.
        let refs = snap.parent().unwrap().parent().unwrap().join("refs");
        let _ = std::fs::remove_file(refs.join(&info.sha));
        if revision != info.sha {
            let r = refs.join(revision);
            std::fs::create_dir_all(r.parent().unwrap())
                .and_then(|_| {
                    let tmp = r.with_extension(format!("tmp-{}", std::process::id()));
                    std::fs::write(&tmp, &info.sha)?;
                    std::fs::rename(&tmp, &r)
                })
                .map_err(|e| format!("{}: {e}", r.display()))?;
        }
        Ok(())
    }
}

/// The shard files a `model.safetensors.index.json` names, in order.
fn index_shards(index: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(index).map_err(|e| format!("{}: {e}", index.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| format!("{}: no weight_map", index.display()))?;
    let shards: std::collections::BTreeSet<String> = map
        .values()
        .filter_map(|f| f.as_str().map(String::from))
        .collect();
    Ok(shards.into_iter().collect())
}

/// Every file under `dir` (following links), as paths relative to it.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(dir) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// `path` if it exists, else the snapshot of hub repo `spec` at `revision` holding
/// what `want` asks for (from the cache, or downloaded into it).
pub fn local_or_hub(
    spec: &str,
    kind: RepoKind,
    revision: Option<&str>,
    want: Want,
) -> Result<PathBuf, String> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if !is_repo_id(spec) {
        return Err(format!(
            "{spec}: no such file or directory (and not a Hugging Face repo id)"
        ));
    }
    Hub::from_env()
        .resolve(spec, kind, revision, want)
        .map_err(|e| format!("{spec}: no such path here; as a Hugging Face repo id: {e}"))
}

/// The snapshot directory of `repo_id` at `revision` in the cache at `cache`, checked
/// to hold `required`.
pub fn snapshot(
    cache: &Path,
    repo_id: &str,
    kind: RepoKind,
    revision: Option<&str>,
    required: &[&str],
) -> Result<PathBuf, String> {
    let rev = revision.unwrap_or("main");
    let repo = cache.join(format!(
        "{}--{}",
        kind.folder_prefix(),
        repo_id.replace('/', "--")
    ));
    let what = format!("{} '{repo_id}' (revision {rev})", kind.noun());
    let how = "download it with `huggingface-cli download` (or `hf download`) into this cache, or give a local directory";
    if !repo.is_dir() {
        return Err(format!(
            "{what} is not in the Hugging Face cache: no {} ({how}; the cache is $HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub)",
            repo.display()
        ));
    }
    let ref_file = repo.join("refs").join(rev);
    let commit = if ref_file.is_file() {
        let c = std::fs::read_to_string(&ref_file)
            .map_err(|e| format!("{}: {e}", ref_file.display()))?;
        c.trim().to_string()
    } else if rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit()) {
        rev.to_string()
    } else {
        let refs = list(&repo.join("refs"));
        return Err(format!(
            "{what}: the cache at {} has no ref '{rev}' (refs there: {}); give a branch or tag it has, or a 40-hex commit",
            repo.display(),
            if refs.is_empty() { "none".into() } else { refs.join(", ") }
        ));
    };
    let snap = repo.join("snapshots").join(&commit);
    if !snap.is_dir() {
        return Err(format!(
            "{what}: commit {commit} has no snapshot in the cache ({} is missing; {how})",
            snap.display()
        ));
    }
    let missing: Vec<&str> = required
        .iter()
        .copied()
        .filter(|f| !snap.join(f).exists())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{what}: the cached snapshot {} lacks {} ({how})",
            snap.display(),
            missing.join(", ")
        ));
    }
    Ok(snap)
}

/// The files an HF model checkpoint needs: `config.json` and its safetensors weights
/// (one file, or the shards an index names). `dir` is checked, not trusted.
pub fn model_files_missing(dir: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    if !dir.join("config.json").exists() {
        missing.push("config.json".to_string());
    }
    let index = dir.join("model.safetensors.index.json");
    if let Ok(text) = std::fs::read_to_string(&index) {
        let shards: std::collections::BTreeSet<String> =
            serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| {
                    v.get("weight_map")?.as_object().map(|m| {
                        m.values()
                            .filter_map(|f| f.as_str().map(String::from))
                            .collect()
                    })
                })
                .unwrap_or_default();
        missing.extend(shards.into_iter().filter(|s| !dir.join(s).exists()));
    } else if !dir.join("model.safetensors").exists() {
        missing.push("model.safetensors (or model.safetensors.index.json)".to_string());
    }
    missing
}

/// `org/name@revision` (as in `hf://` paths) split into name and revision, unless
/// `spec` is an existing path.
pub fn split_revision(spec: &str) -> (&str, Option<&str>) {
    match spec.rsplit_once('@') {
        Some((n, r)) if !Path::new(spec).exists() && is_repo_id(n) && !r.is_empty() => (n, Some(r)),
        _ => (spec, None),
    }
}

/// A tokenizer from a path (a `tokenizer.json` or a directory holding one) or a hub
/// repo id (`@revision` optional) whose snapshot has `tokenizer.json`.
pub fn tokenizer_path(spec: &str) -> Result<PathBuf, String> {
    let (name, rev) = split_revision(spec);
    let want = Want::Files {
        required: &["tokenizer.json"],
        optional: &["tokenizer_config.json", "special_tokens_map.json"],
    };
    local_or_hub(name, RepoKind::Model, rev, want)
}

/// A dataset from a path or a hub dataset repo id (`@revision` optional): the
/// snapshot directory (or its `data/` when the files are there), read as a directory
/// of data files.
pub fn dataset_path(spec: &str) -> Result<PathBuf, String> {
    if spec.contains(['*', '?', '[']) {
        return Ok(PathBuf::from(spec)); // a glob of local files
    }
    let (name, rev) = split_revision(spec);
    let dir = local_or_hub(name, RepoKind::Dataset, rev, Want::Dataset)?;
    // Hub dataset repos often keep their files under data/ (one of the places HF
    // `datasets` looks by default).
    let has_data = |d: &Path| {
        std::fs::read_dir(d).is_ok_and(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| is_data_file(&e.file_name().to_string_lossy()))
        })
    };
    if !Path::new(name).exists() && !has_data(&dir) && dir.join("data").is_dir() {
        return Ok(dir.join("data"));
    }
    Ok(dir)
}

/// A model directory from a path or a hub repo id (with `@revision` after it, as in
/// `EleutherAI/pythia-70m@step1000`), its config and weights checked.
pub fn model_dir(spec: &str) -> Result<PathBuf, String> {
    let (name, rev) = split_revision(spec);
    let dir = local_or_hub(name, RepoKind::Model, rev, Want::Model)?;
    if !dir.is_dir() {
        return Err(format!(
            "{}: a model is a directory (config.json + safetensors weights)",
            dir.display()
        ));
    }
    let missing = model_files_missing(&dir);
    if !missing.is_empty() {
        let origin = match Path::new(name).exists() {
            true => String::new(),
            false => format!(" (the cached snapshot of '{name}')"),
        };
        return Err(format!(
            "{}{origin}: missing {}; models are HF checkpoints in safetensors",
            dir.display(),
            missing.join(", ")
        ));
    }
    Ok(dir)
}

fn list(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, text: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// A cache with `models--org--tiny` at two commits (main → c1…, tag v1 → c2…), c1
    /// sharded and complete, c2 missing a shard.
    fn cache() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let repo = t.path().join("models--org--tiny");
        let (c1, c2) = ("1".repeat(40), "2".repeat(40));
        write(&repo.join("refs/main"), &c1);
        write(&repo.join("refs/v1"), &format!("{c2}\n"));
        let index = r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#;
        for (c, shards) in [(&c1, 2), (&c2, 1)] {
            let s = repo.join("snapshots").join(c);
            write(&s.join("config.json"), "{}");
            write(&s.join("model.safetensors.index.json"), index);
            for i in 1..=shards {
                write(&s.join(format!("model-0000{i}-of-00002.safetensors")), "");
            }
        }
        write(&t.path().join("datasets--org--text/refs/main"), &c1);
        write(
            &t.path().join(format!(
                "datasets--org--text/snapshots/{c1}/data/train.jsonl"
            )),
            "",
        );
        t
    }

    #[test]
    fn repo_ids_and_paths_are_told_apart() {
        for ok in [
            "gpt2",
            "EleutherAI/pythia-70m",
            "google/gemma-2-2b",
            "a.b_c-d/e",
        ] {
            assert!(is_repo_id(ok), "{ok}");
        }
        for bad in [
            "",
            "/abs/path",
            "./rel",
            "a/b/c",
            "../x",
            "-x",
            "x.",
            "a b",
            "a//b",
        ] {
            assert!(!is_repo_id(bad), "{bad}");
        }
    }

    #[test]
    fn revisions_resolve_through_refs_or_as_commits() {
        let t = cache();
        let c = t.path();
        let main = snapshot(c, "org/tiny", RepoKind::Model, None, &["config.json"]).unwrap();
        assert!(main.ends_with(format!("snapshots/{}", "1".repeat(40))));
        let tag = snapshot(c, "org/tiny", RepoKind::Model, Some("v1"), &[]).unwrap();
        assert!(
            tag.ends_with(format!("snapshots/{}", "2".repeat(40))),
            "refs are trimmed"
        );
        let pinned = snapshot(c, "org/tiny", RepoKind::Model, Some(&"2".repeat(40)), &[]).unwrap();
        assert_eq!(pinned, tag);
        let data = snapshot(
            c,
            "org/text",
            RepoKind::Dataset,
            None,
            &["data/train.jsonl"],
        )
        .unwrap();
        assert!(data.join("data/train.jsonl").is_file());
        assert!(
            model_files_missing(&main).is_empty(),
            "both shards are there"
        );
    }

    #[test]
    fn every_miss_names_the_repo_revision_and_what_is_missing() {
        let t = cache();
        let c = t.path();
        let e = snapshot(c, "org/none", RepoKind::Model, None, &[]).unwrap_err();
        assert!(
            e.contains("model 'org/none' (revision main) is not in the Hugging Face cache")
                && e.contains("models--org--none"),
            "{e}"
        );
        let e = snapshot(c, "org/tiny", RepoKind::Model, Some("dev"), &[]).unwrap_err();
        assert!(
            e.contains("no ref 'dev'") && e.contains("refs there: main, v1"),
            "{e}"
        );
        let e = snapshot(c, "org/tiny", RepoKind::Model, Some(&"3".repeat(40)), &[]).unwrap_err();
        assert!(
            e.contains(&format!("commit {} has no snapshot", "3".repeat(40))),
            "{e}"
        );
        let e = snapshot(
            c,
            "org/tiny",
            RepoKind::Model,
            None,
            &["tokenizer.json", "config.json"],
        )
        .unwrap_err();
        assert!(e.ends_with("lacks tokenizer.json (download it with `huggingface-cli download` (or `hf download`) into this cache, or give a local directory)"), "{e}");
        let e = snapshot(c, "org/text", RepoKind::Model, None, &[]).unwrap_err();
        assert!(
            e.contains("model 'org/text'"),
            "a dataset is not a model: {e}"
        );
        let v1 = snapshot(c, "org/tiny", RepoKind::Model, Some("v1"), &[]).unwrap();
        assert_eq!(
            model_files_missing(&v1),
            vec!["model-00002-of-00002.safetensors"]
        );
    }

    use crate::fake_hub::FakeHub;

    fn online(cache: &Path, hub: &FakeHub) -> Hub {
        Hub {
            cache: cache.to_path_buf(),
            endpoint: hub.endpoint.clone(),
            offline: false,
            token: None,
        }
    }

    fn bytes(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    const INDEX: &str = r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#;

    /// `org/gpt` (one weights file, tokenizer, a README nobody needs) and `org/sharded`
    /// (main → c1 sharded, tag v1 → c2 single-file), and dataset `org/text`.
    fn hub() -> FakeHub {
        let h = FakeHub::start();
        let (c1, c2, c3) = ("a".repeat(40), "b".repeat(40), "c".repeat(40));
        h.add(
            RepoKind::Model,
            "org/gpt",
            &c1,
            &["main"],
            &[
                ("config.json", bytes(r#"{"model_type": "gpt2"}"#)),
                ("model.safetensors", vec![7u8; 3000]),
                ("tokenizer.json", bytes("{}")),
                ("README.md", bytes("# gpt")),
            ],
        );
        h.add(
            RepoKind::Model,
            "org/sharded",
            &c1,
            &["main"],
            &[
                ("config.json", bytes("{}")),
                ("model.safetensors.index.json", bytes(INDEX)),
                ("model-00001-of-00002.safetensors", vec![1u8; 100]),
                ("model-00002-of-00002.safetensors", vec![2u8; 100]),
            ],
        );
        h.add(
            RepoKind::Model,
            "org/sharded",
            &c2,
            &["v1"],
            &[
                ("config.json", bytes("{\"v\": 1}")),
                ("model.safetensors", vec![3u8; 10]),
            ],
        );
        h.add(
            RepoKind::Model,
            "org/broken",
            &c3,
            &["main"],
            &[
                ("config.json", bytes("{}")),
                ("model.safetensors.index.json", bytes(INDEX)),
                ("model-00001-of-00002.safetensors", vec![1u8; 100]),
            ],
        );
        h.add(
            RepoKind::Model,
            "org/noweights",
            &c3,
            &["main"],
            &[
                ("config.json", bytes("{}")),
                ("pytorch_model.bin", vec![0u8; 4]),
            ],
        );
        h.add(
            RepoKind::Dataset,
            "org/text",
            &c1,
            &["main"],
            &[
                ("README.md", bytes("# text")),
                ("data/train-00000.jsonl", bytes("{\"text\": \"a\"}\n")),
                ("data/train-00001.jsonl", bytes("{\"text\": \"b\"}\n")),
            ],
        );
        h
    }

    #[test]
    fn a_model_missing_from_the_cache_is_downloaded_into_it_once() {
        let h = hub();
        let t = tempfile::tempdir().unwrap();
        let hub = online(t.path(), &h);
        let dir = hub
            .resolve("org/gpt", RepoKind::Model, None, Want::Model)
            .unwrap();
        assert!(dir.ends_with(format!("models--org--gpt/snapshots/{}", "a".repeat(40))));
        assert_eq!(
            std::fs::read(dir.join("model.safetensors")).unwrap(),
            vec![7u8; 3000]
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("tokenizer.json")).unwrap(),
            "{}"
        );
        assert!(!dir.join("README.md").exists(), "only what a model needs");
        // Laid out as huggingface_hub lays it out: links into blobs/, refs/main.
        assert!(std::fs::symlink_metadata(dir.join("config.json"))
            .unwrap()
            .is_symlink());
        let repo = t.path().join("models--org--gpt");
        assert_eq!(
            std::fs::read_to_string(repo.join("refs/main")).unwrap(),
            "a".repeat(40)
        );
        assert_eq!(list(&repo.join("refs")), vec!["main"]);
        let n = h.log().len();
        assert!(n >= 4, "{:?}", h.log());
        // Offline first: the second time the cache answers, nothing goes over the wire.
        assert_eq!(
            hub.resolve("org/gpt", RepoKind::Model, None, Want::Model)
                .unwrap(),
            dir
        );
        assert_eq!(h.log().len(), n);
    }

    #[test]
    fn a_sharded_checkpoint_and_a_pinned_revision_download_what_they_name() {
        let h = hub();
        let t = tempfile::tempdir().unwrap();
        let hub = online(t.path(), &h);
        let main = hub
            .resolve("org/sharded", RepoKind::Model, None, Want::Model)
            .unwrap();
        assert!(model_files_missing(&main).is_empty());
        assert_eq!(
            std::fs::read(main.join("model-00002-of-00002.safetensors")).unwrap(),
            vec![2u8; 100]
        );
        // A tag, then the same commit by hash: one snapshot, no ref named by a hash.
        let v1 = hub
            .resolve("org/sharded", RepoKind::Model, Some("v1"), Want::Model)
            .unwrap();
        assert!(v1.ends_with("b".repeat(40)));
        assert_eq!(
            std::fs::read(v1.join("model.safetensors")).unwrap(),
            vec![3u8; 10]
        );
        let c2 = "b".repeat(40);
        let pinned = hub
            .resolve("org/sharded", RepoKind::Model, Some(&c2), Want::Model)
            .unwrap();
        assert_eq!(pinned, v1);
        let repo = t.path().join("models--org--sharded");
        assert_eq!(list(&repo.join("refs")), vec!["main", "v1"]);
        // A cache with the config but not the weights gets the weights.
        let t2 = tempfile::tempdir().unwrap();
        let snap = t2
            .path()
            .join(format!("models--org--sharded/snapshots/{}", "a".repeat(40)));
        write(&snap.join("config.json"), "{}");
        write(
            &t2.path().join("models--org--sharded/refs/main"),
            &"a".repeat(40),
        );
        let got = online(t2.path(), &h)
            .resolve("org/sharded", RepoKind::Model, None, Want::Model)
            .unwrap();
        assert_eq!(got, snap);
        assert!(model_files_missing(&got).is_empty());
    }

    #[test]
    fn a_dataset_downloads_its_data_files() {
        let h = hub();
        let t = tempfile::tempdir().unwrap();
        let dir = online(t.path(), &h)
            .resolve("org/text", RepoKind::Dataset, None, Want::Dataset)
            .unwrap();
        assert!(dir.starts_with(t.path().join("datasets--org--text")));
        let mut files = walk(&dir);
        files.sort();
        assert_eq!(
            files,
            vec!["data/train-00000.jsonl", "data/train-00001.jsonl"]
        );
        let tok = online(t.path(), &h)
            .resolve(
                "org/gpt",
                RepoKind::Model,
                None,
                Want::Files {
                    required: &["tokenizer.json"],
                    optional: &["tokenizer_config.json"],
                },
            )
            .unwrap();
        assert!(tok.join("tokenizer.json").is_file() && !tok.join("config.json").exists());
    }

    #[test]
    fn every_download_failure_names_the_repo_the_revision_and_the_files() {
        let h = hub();
        let t = tempfile::tempdir().unwrap();
        let hub = online(t.path(), &h);
        let e = |id: &str, rev: Option<&str>| {
            hub.resolve(id, RepoKind::Model, rev, Want::Model)
                .unwrap_err()
        };
        let m = e("org/none", None);
        assert!(
            m.contains("model 'org/none' (revision main) is not in the Hugging Face cache")
                && m.contains(&format!("downloading it from {} failed", h.endpoint))
                && m.contains("the hub has no model 'org/none' (revision main)"),
            "{m}"
        );
        let m = e("org/gpt", Some("dev"));
        assert!(
            m.contains("the hub has no model 'org/gpt' (revision dev)"),
            "{m}"
        );
        let m = e("org/broken", None);
        assert!(
            m.contains("has no model-00002-of-00002.safetensors (a shard its index names)"),
            "{m}"
        );
        let m = e("org/noweights", None);
        assert!(
            m.contains("has no safetensors weights")
                && m.contains("its files: config.json, pytorch_model.bin"),
            "{m}"
        );
        let m = hub
            .resolve(
                "org/gpt",
                RepoKind::Model,
                None,
                Want::Files {
                    required: &["vocab.txt"],
                    optional: &[],
                },
            )
            .unwrap_err();
        assert!(
            m.contains(&format!("at commit {} has no vocab.txt", "a".repeat(40))),
            "{m}"
        );
        let m = hub
            .resolve("org/gpt", RepoKind::Dataset, None, Want::Dataset)
            .unwrap_err();
        assert!(m.contains("the hub has no dataset 'org/gpt'"), "{m}");
        // Nothing listening there: the network error, and still what is missing.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = dead.local_addr().unwrap();
        drop(dead);
        let m = Hub {
            endpoint: format!("http://{addr}"),
            ..hub.clone()
        }
        .resolve("org/gpt", RepoKind::Model, None, Want::Model)
        .unwrap_err();
        assert!(
            m.contains("model 'org/gpt' (revision main) is not in the Hugging Face cache")
                && m.contains(&format!("downloading it from http://{addr} failed")),
            "{m}"
        );
        // Offline: the cache's answer alone, saying why nothing was fetched.
        let before = h.log().len();
        let m = Hub::offline(t.path())
            .resolve("org/gpt", RepoKind::Model, None, Want::Model)
            .unwrap_err();
        assert!(
            m.contains("model 'org/gpt' (revision main) is not in the Hugging Face cache")
                && m.ends_with("HF_HUB_OFFLINE is set, so nothing was downloaded"),
            "{m}"
        );
        assert_eq!(h.log().len(), before);
        assert!(
            !t.path().join("models--org--none").exists()
                || walk(&t.path().join("models--org--none")).is_empty(),
            "a failed download leaves no files"
        );
    }

    #[test]
    fn hf_hub_offline_reads_as_huggingface_hub_reads_it() {
        for (v, want) in [
            ("1", true),
            ("ON", true),
            ("yes", true),
            ("True", true),
            ("0", false),
            ("", false),
            ("no", false),
        ] {
            let key = format!("SAESTREAM_TEST_FLAG_{v}_{want}");
            // SAFETY: a key of this test's own, read only here.
            unsafe { std::env::set_var(&key, v) };
            assert_eq!(env_flag(&key), want, "{v:?}");
        }
    }
}
