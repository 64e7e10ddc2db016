//! `--tokenizer` and `--dataset` as Hugging Face repo ids, read from an HF cache built
//! here (`models--org--tok`, `datasets--org--text`); nothing is downloaded.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn snapshot(cache: &Path, folder: &str, commit: &str) -> PathBuf {
    let repo = cache.join(folder);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let s = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&s).unwrap();
    s
}

fn bench(cache: &Path, dataset: &str, tokenizer: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tokenizer"))
        .args([
            "bench",
            "--dataset",
            dataset,
            "--tokenizer",
            tokenizer,
            "--repeats",
            "1",
        ])
        .args(["--context-size", "32"])
        .env("HF_HUB_CACHE", cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

#[test]
fn tokenizer_and_dataset_repo_ids_read_the_cache() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("hub");
    let tok = snapshot(&cache, "models--org--tok", &"1".repeat(40));
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("tiny-gpt2").join(f), tok.join(f)).unwrap();
    }
    let data = snapshot(&cache, "datasets--org--text", &"2".repeat(40));
    std::fs::create_dir_all(data.join("data")).unwrap();
    std::fs::copy(
        fixtures().join("pretok/corpus.jsonl"),
        data.join("data/train.jsonl"),
    )
    .unwrap();

    let by_path = bench(
        &cache,
        data.join("data").to_str().unwrap(),
        tok.to_str().unwrap(),
    );
    assert!(
        by_path.status.success(),
        "{}",
        String::from_utf8_lossy(&by_path.stderr)
    );
    let by_id = bench(&cache, "org/text", "org/tok");
    assert!(
        by_id.status.success(),
        "{}",
        String::from_utf8_lossy(&by_id.stderr)
    );
    let tokens = |o: &std::process::Output| {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (
            v["document_tokens"].clone(),
            v["windows"].clone(),
            v["documents"].clone(),
        )
    };
    assert_eq!(tokens(&by_path), tokens(&by_id));

    let e = bench(&cache, "org/text", "org/none");
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success()
            && err.contains("model 'org/none' (revision main) is not in the Hugging Face cache"),
        "{err}"
    );
    let e = bench(&cache, "org/text@v2", "org/tok");
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success()
            && err.contains("dataset 'org/text' (revision v2)")
            && err.contains("no ref 'v2'"),
        "{err}"
    );
}
