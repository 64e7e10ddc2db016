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
//! repo id is looked up here. Files missing from the cache are an error naming the
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

/// `path` if it exists, else the snapshot of hub repo `spec` in the cache at
/// `revision` (a branch, a tag or a commit; default `main`) holding every file of
/// `required` (paths inside the repo).
pub fn local_or_cached(
    spec: &str,
    kind: RepoKind,
    revision: Option<&str>,
    required: &[&str],
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
    snapshot(&cache_dir(), spec, kind, revision, required)
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
/// repo id (`@revision` optional) whose cached snapshot has `tokenizer.json`.
pub fn tokenizer_path(spec: &str) -> Result<PathBuf, String> {
    let (name, rev) = split_revision(spec);
    local_or_cached(name, RepoKind::Model, rev, &["tokenizer.json"])
}

/// A dataset from a path or a hub dataset repo id (`@revision` optional): the cached
/// snapshot directory (or its `data/` when the files are there), read as a directory
/// of data files.
pub fn dataset_path(spec: &str) -> Result<PathBuf, String> {
    if spec.contains(['*', '?', '[']) {
        return Ok(PathBuf::from(spec)); // a glob of local files
    }
    let (name, rev) = split_revision(spec);
    let dir = local_or_cached(name, RepoKind::Dataset, rev, &[])?;
    // Hub dataset repos often keep their files under data/ (one of the places HF
    // `datasets` looks by default).
    let has_data = |d: &Path| {
        std::fs::read_dir(d).is_ok_and(|rd| {
            rd.filter_map(|e| e.ok()).any(|e| {
                let n = e.file_name().to_string_lossy().to_lowercase();
                [".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt"]
                    .iter()
                    .any(|x| n.ends_with(x))
            })
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
    let dir = local_or_cached(name, RepoKind::Model, rev, &["config.json"])?;
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
}
