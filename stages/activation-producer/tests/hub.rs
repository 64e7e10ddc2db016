//! `--model` given as a Hugging Face repo id, read from an HF cache directory laid out
//! as `huggingface_hub` writes it (refs/, snapshots/<commit>/ with links into blobs/),
//! built here (`HF_HUB_OFFLINE=1`: nothing is downloaded), or downloaded into it from a
//! hub look-alike on loopback (`schemas::fake_hub`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn run_with(cache: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_activation-producer"))
        .args(args)
        .env("HF_HUB_CACHE", cache)
        .env_remove("HF_HOME")
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_HUB_OFFLINE")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Puts the files of `src` into `cache` as repo `repo_id` at `commit` (each a link to
/// a blob, as the hub client stores them) and points `refs/<ref>` at it.
fn cache_repo(cache: &Path, repo_id: &str, src: &Path, commit: &str, r#ref: &str) {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "reference.safetensors" || name == "hf_hooks.safetensors" {
            continue;
        }
        let blob = repo.join("blobs").join(format!("{commit}-{name}"));
        std::fs::copy(e.path(), &blob).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{commit}-{name}"), snap.join(&name))
            .unwrap();
    }
    std::fs::write(repo.join("refs").join(r#ref), commit).unwrap();
}

/// 2 × 12 token ids below 256 (every fixture model's vocabulary) as an int64 .npy.
fn tokens(dir: &Path) -> PathBuf {
    let path = dir.join("tokens.npy");
    let mut header = "{'descr': '<i8', 'fortran_order': False, 'shape': (2, 12), }".to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    for i in 0..24i64 {
        bytes.extend((i * 37 % 256).to_le_bytes());
    }
    std::fs::write(&path, bytes).unwrap();
    path
}

fn dump(cache: &Path, model: &str, out: &Path) -> Output {
    dump_with(cache, model, out, &[("HF_HUB_OFFLINE", "1")])
}

fn dump_with(cache: &Path, model: &str, out: &Path, env: &[(&str, &str)]) -> Output {
    let tokens = tokens(out.parent().unwrap());
    run_with(
        cache,
        &[
            "dump",
            "--model",
            model,
            "--tokens",
            tokens.to_str().unwrap(),
            "--hooks",
            "blocks.0.hook_resid_post",
            "--output",
            out.to_str().unwrap(),
        ],
        env,
    )
}

#[test]
fn a_repo_id_reads_the_cached_snapshot_of_its_revision() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("hub");
    let (c1, c2) = ("a".repeat(40), "b".repeat(40));
    // main: the tiny GPT-2; tag v1: the sharded Qwen2 checkpoint (3 shards + index).
    cache_repo(
        &cache,
        "org/tiny",
        &fixtures().join("tiny-gpt2"),
        &c1,
        "main",
    );
    cache_repo(
        &cache,
        "org/tiny",
        &fixtures().join("lm/qwen2-tied-sharded"),
        &c2,
        "v1",
    );

    let by_path = t.path().join("path.safetensors");
    let o = dump(
        &cache,
        fixtures().join("tiny-gpt2").to_str().unwrap(),
        &by_path,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let by_id = t.path().join("id.safetensors");
    let o = dump(&cache, "org/tiny", &by_id);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(&by_path).unwrap(),
        std::fs::read(&by_id).unwrap()
    );

    // A pinned revision, by tag and by commit: the sharded Qwen2 (d_model 64).
    for rev in ["v1", c2.as_str()] {
        let out = t.path().join(format!("{rev}.safetensors"));
        let o = dump(&cache, &format!("org/tiny@{rev}"), &out);
        assert!(
            o.status.success(),
            "@{rev}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let (_, acts) = sae::io::read_tensor(&out, Some("blocks.0.hook_resid_post")).unwrap();
        assert_eq!(acts.shape[1], 64, "@{rev} is the Qwen2 checkpoint");
    }
}

#[test]
fn a_repo_missing_from_the_cache_is_named_with_what_is_missing() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("hub");
    let c = "c".repeat(40);
    cache_repo(
        &cache,
        "org/tiny",
        &fixtures().join("lm/qwen2-tied-sharded"),
        &c,
        "main",
    );
    let out = t.path().join("x.safetensors");
    let err = |model: &str| String::from_utf8_lossy(&dump(&cache, model, &out).stderr).into_owned();

    let e = err("EleutherAI/pythia-70m");
    assert!(
        e.contains(
            "model 'EleutherAI/pythia-70m' (revision main) is not in the Hugging Face cache"
        ),
        "{e}"
    );
    assert!(
        e.contains(&format!(
            "{}",
            cache.join("models--EleutherAI--pythia-70m").display()
        )),
        "{e}"
    );
    let e = err("org/tiny@step1000");
    assert!(
        e.contains("no ref 'step1000'") && e.contains("refs there: main"),
        "{e}"
    );
    // A shard the index names is gone from the snapshot.
    std::fs::remove_file(cache.join(format!(
        "models--org--tiny/snapshots/{c}/model-00002-of-00003.safetensors"
    )))
    .unwrap();
    let e = err("org/tiny");
    assert!(
        e.contains("model 'org/tiny' (revision main): the cached snapshot")
            && e.contains("lacks model-00002-of-00003.safetensors")
            && e.contains("HF_HUB_OFFLINE is set, so nothing was downloaded"),
        "{e}"
    );
    assert!(!out.exists());
    // Not a path and not a repo id.
    let e = err("./no/such/dir");
    assert!(
        e.contains("./no/such/dir: no such file or directory"),
        "{e}"
    );
}

/// The sharded Qwen2 checkpoint's files, as the hub would serve them.
fn hub_files(src: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "reference.safetensors")
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.push(("README.md".into(), b"# not needed".to_vec()));
    files
}

#[test]
fn a_repo_missing_from_the_cache_is_downloaded_into_it_then_read_offline() {
    let hub = schemas::fake_hub::FakeHub::start();
    let src = fixtures().join("lm/qwen2-tied-sharded");
    let files = hub_files(&src);
    let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let c = "d".repeat(40);
    hub.add(
        schemas::hub::RepoKind::Model,
        "org/qwen",
        &c,
        &["main"],
        &refs,
    );

    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("hub");
    let by_path = t.path().join("path.safetensors");
    let o = dump(&cache, src.to_str().unwrap(), &by_path);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Offline with an empty cache: refused, naming the repo and why nothing came.
    let by_id = t.path().join("id.safetensors");
    let e = dump(&cache, "org/qwen", &by_id);
    let msg = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success()
            && msg.contains("model 'org/qwen' (revision main) is not in the Hugging Face cache")
            && msg.contains("HF_HUB_OFFLINE is set"),
        "{msg}"
    );
    assert!(
        hub.log().is_empty(),
        "offline means no request: {:?}",
        hub.log()
    );

    // Online: every shard lands in the cache, and the activations equal the path run's.
    let endpoint = [("HF_ENDPOINT", hub.endpoint.as_str())];
    let o = dump_with(&cache, "org/qwen", &by_id, &endpoint);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(&by_path).unwrap(),
        std::fs::read(&by_id).unwrap()
    );
    let snap = cache.join(format!("models--org--qwen/snapshots/{c}"));
    for (name, bytes) in &files {
        match name.as_str() {
            "README.md" => assert!(!snap.join(name).exists(), "only what the model needs"),
            _ => assert_eq!(&std::fs::read(snap.join(name)).unwrap(), bytes, "{name}"),
        }
    }
    assert_eq!(
        std::fs::read_to_string(cache.join("models--org--qwen/refs/main")).unwrap(),
        c
    );

    // Then offline again: the cache answers and nothing more is asked of the hub.
    let n = hub.log().len();
    let again = t.path().join("again.safetensors");
    let o = dump(&cache, "org/qwen", &again);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(&by_path).unwrap(),
        std::fs::read(&again).unwrap()
    );
    assert_eq!(hub.log().len(), n);
}
