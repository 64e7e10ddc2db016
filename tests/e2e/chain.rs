//! The streaming stages as processes on loopback: tokenizer → activation-producer ×P →
//! shuffler → sae-trainer (two SAEs in one process), on the fixture tiny GPT-2 and corpus.
//! A run through the processes trains the same SAEs, bit for bit, as one producer, as
//! the producers' caches replayed, and as `sae-trainer train --activations` on those
//! caches read as a file.

#[path = "../../pipeline/tests/support/mod.rs"]
mod support;

use e2e::{fx, s};
use std::path::{Path, PathBuf};
use support::*;

const HOOK: &str = "blocks.1.hook_resid_pre";
/// Prompts per LM batch and context: 4 × 32 = 128 rows, one training batch.
const PROMPTS: &str = "4";
const CONTEXT: &str = "32";
/// The shuffler's batches: 2 for the TopK run's norm estimate + 40 steps.
const BATCHES: &str = "42";
/// LM batches the producers make in all.
const LM_BATCHES: u64 = 60;

fn write_configs(dir: &Path) -> (PathBuf, PathBuf) {
    let common = format!(
        "hook_name: {HOOK}\ntrain_batch_size_tokens: 128\ntraining_tokens: 5120\nn_batches_in_buffer: 4\nseed: 7\nlr: 0.003\nlog_frequency: 5\nfeature_sampling_window: 20\n"
    );
    let topk = dir.join("topk.yaml");
    std::fs::write(
        &topk,
        format!("architecture: topk\nk: 8\nd_sae: 256\nnormalize_activations: expected_average_only_in\nn_batches_for_norm_estimate: 2\nb_dec_init_method: geometric_median\n{common}"),
    )
    .unwrap();
    let std_ = dir.join("standard.yaml");
    std::fs::write(
        &std_,
        format!("architecture: standard\nd_sae: 256\nl1_coefficient: 2.0\nb_dec_init_method: mean\n{common}"),
    )
    .unwrap();
    (topk, std_)
}

/// The trained outputs of a run directory, byte for byte.
fn outputs(run: &Path) -> Vec<(String, Vec<u8>)> {
    [
        "cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
        "metrics.jsonl",
    ]
    .iter()
    .map(|f| {
        let b = std::fs::read(run.join(f)).unwrap_or_else(|e| panic!("{}/{f}: {e}", run.display()));
        (f.to_string(), b)
    })
    .collect()
}

fn assert_same_runs(a: &[PathBuf], b: &[PathBuf], what: &str) {
    for (x, y) in a.iter().zip(b) {
        let (ox, oy) = (outputs(x), outputs(y));
        for ((f, bx), (_, by)) in ox.iter().zip(&oy) {
            assert!(
                bx == by,
                "{what}: {f} differs between {} and {}",
                x.display(),
                y.display()
            );
        }
    }
}

/// Starts the trainer on `upstream` with both configs; returns the run directories.
fn train_upstream(
    root: &Path,
    tag: &str,
    upstream: &str,
    cfgs: &(PathBuf, PathBuf),
) -> Vec<PathBuf> {
    let runs = vec![
        root.join(format!("{tag}-topk")),
        root.join(format!("{tag}-standard")),
    ];
    let mut t = spawn_of(
        &workspace_bin("sae-trainer"),
        &[
            "train",
            "--upstream",
            upstream,
            "--config",
            s(&cfgs.0),
            "--config",
            s(&cfgs.1),
            "--output",
            s(&runs[0]),
            "--output",
            s(&runs[1]),
            "--threads",
            "1",
        ],
    );
    let (ok, err) = t.wait(LIMIT);
    assert!(ok, "trainer: {err}");
    runs
}

/// tokenizer → `producers` producers (each caching its stream) → shuffler → trainer.
/// Returns the trainer's run directories and the producers' cache directories.
fn chain(
    root: &Path,
    tag: &str,
    producers: u64,
    cfgs: &(PathBuf, PathBuf),
) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let names: Vec<String> = (0..producers).map(|i| format!("p{i}")).collect();
    let mut tok = spawn_of(
        &workspace_bin("tokenizer"),
        &[
            "stream",
            "--dataset",
            s(&fx().join("pretok/corpus.jsonl")),
            "--tokenizer",
            s(&fx().join("tiny-gpt2")),
            "--context-size",
            CONTEXT,
            "--batch-sequences",
            "16",
            "--listen",
            "127.0.0.1:0",
            "--consumers",
            &names.join(","),
        ],
    );
    let tokens = tok.served_url();
    let per = (LM_BATCHES / producers).to_string();
    let mut prods = Vec::new();
    let mut caches = Vec::new();
    for i in 0..producers {
        let cache = root.join(format!("{tag}-cache{i}"));
        let share = format!("{i}/{producers}");
        let mut p = spawn_of(
            &workspace_bin("activation-producer"),
            &[
                "run",
                "--tokens",
                &tokens,
                "--consumer",
                &names[i as usize],
                "--model",
                s(&fx().join("tiny-gpt2")),
                "--hooks",
                &format!("{HOOK},blocks.0.hook_mlp_out"),
                "--store-batch-size-prompts",
                PROMPTS,
                "--producer",
                &share,
                "--max-batches",
                &per,
                "--listen",
                "127.0.0.1:0",
                "--output",
                s(&cache),
                "--threads",
                "1",
            ],
        );
        let url = p.served_url();
        prods.push((p, url));
        caches.push(cache);
    }
    let mut args = vec!["run", "--upstream"];
    args.extend(prods.iter().map(|(_, u)| u.as_str()));
    args.extend([
        "--train-batch-size-tokens",
        "128",
        "--n-batches-in-buffer",
        "4",
        "--seed",
        "7",
        "--max-batches",
        BATCHES,
        "--listen",
        "127.0.0.1:0",
    ]);
    let mut sh = spawn_of(&workspace_bin("shuffler"), &args);
    let batches = sh.served_url();
    let runs = train_upstream(root, tag, &batches, cfgs);
    let summary = sh.finish_json();
    assert_eq!(summary["batches_written"], 42, "{summary}");
    for (mut p, _) in prods {
        let v = p.finish_json();
        assert_eq!(
            v["batches_written"].as_u64(),
            Some(LM_BATCHES / producers),
            "{v}"
        );
    }
    tok.finish_json();
    (runs, caches)
}

#[test]
fn four_processes_train_what_one_file_trains() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let cfgs = write_configs(root);

    let (two, caches) = chain(root, "two", 2, &cfgs);
    let (again, _) = chain(root, "again", 2, &cfgs);
    assert_same_runs(&two, &again, "the chain run twice");
    let (one, _) = chain(root, "one", 1, &cfgs);
    assert_same_runs(&two, &one, "1 producer vs 2");

    // (b) the producers' caches replayed through the shuffler
    let mut args = vec!["run", "--upstream", s(&caches[0]), s(&caches[1])];
    args.extend([
        "--train-batch-size-tokens",
        "128",
        "--n-batches-in-buffer",
        "4",
        "--seed",
        "7",
        "--max-batches",
        BATCHES,
        "--listen",
        "127.0.0.1:0",
    ]);
    let mut sh = spawn_of(&workspace_bin("shuffler"), &args);
    let url = sh.served_url();
    let replay = train_upstream(root, "replay", &url, &cfgs);
    sh.finish_json();
    assert_same_runs(&two, &replay, "replayed caches");

    // (c) those caches merged into one directory, read by the trainer as a file
    let merged = root.join("merged");
    let o = run_of(&bin(), &["copy", s(&caches[0]), s(&caches[1]), s(&merged)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let file = vec![root.join("file-topk"), root.join("file-standard")];
    let o = run_of(
        &workspace_bin("sae-trainer"),
        &[
            "train",
            "--activations",
            s(&merged),
            "--config",
            s(&cfgs.0),
            "--config",
            s(&cfgs.1),
            "--output",
            s(&file[0]),
            "--output",
            s(&file[1]),
            "--threads",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same_runs(&two, &file, "trainer on the cache as a file");

    // and the TopK SAE did learn: explained variance from ~0 to over 0.3 in 40 steps
    let ev: Vec<f64> = std::fs::read_to_string(two[0].join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["metrics/explained_variance"].as_f64())
        .collect();
    assert!(
        ev[0] < 0.2 && *ev.last().unwrap() > 0.3,
        "explained variance {ev:?}"
    );
}

/// A trainer killed after a checkpoint resumes from it, and the shuffler from its
/// snapshot at the checkpoint's batch: the run ends with the SAE of the uninterrupted one.
#[test]
fn the_chain_resumes_from_a_trainer_checkpoint_and_a_shuffler_snapshot() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let (topk, _) = write_configs(root);
    let text = std::fs::read_to_string(&topk).unwrap() + "n_checkpoints: 1\n";
    std::fs::write(&topk, text).unwrap();
    // an activation cache to replay: tokenizer -> producer, as files
    let tokens = root.join("tokens");
    let o = run_of(
        &workspace_bin("tokenizer"),
        &[
            "stream",
            "--dataset",
            s(&fx().join("pretok/corpus.jsonl")),
            "--tokenizer",
            s(&fx().join("tiny-gpt2")),
            "--context-size",
            CONTEXT,
            "--output",
            s(&tokens),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let acts = root.join("acts");
    let o = run_of(
        &workspace_bin("activation-producer"),
        &[
            "run",
            "--tokens",
            s(&tokens),
            "--model",
            s(&fx().join("tiny-gpt2")),
            "--hooks",
            HOOK,
            "--store-batch-size-prompts",
            PROMPTS,
            "--max-batches",
            "60",
            "--output",
            s(&acts),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let every: Vec<String> = (1..=42).map(|p| p.to_string()).collect();
    let snaps = root.join("snapshots");
    let shuffler = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--upstream",
            s(&acts),
            "--train-batch-size-tokens",
            "128",
            "--n-batches-in-buffer",
            "4",
            "--seed",
            "7",
            "--max-batches",
            BATCHES,
            "--listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        spawn_of(&workspace_bin("shuffler"), &args)
    };
    let trainer = workspace_bin("sae-trainer");

    let joined = every.join(",");
    let mut sh = shuffler(&["--snapshot-at", &joined, "--snapshots", s(&snaps)]);
    let url = sh.served_url();
    let whole = root.join("whole");
    let o = run_of(
        &trainer,
        &[
            "train",
            "--upstream",
            &url,
            "--config",
            s(&topk),
            "--output",
            s(&whole),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    sh.finish_json();

    let ckpt = std::fs::read_dir(whole.join("checkpoints"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap())
            .unwrap();
    let at = state["counters"]["batches_consumed"].as_u64().unwrap();
    assert!(at > 2 && at < 42, "checkpoint at batch {at}");

    let mut sh = shuffler(&["--resume", s(&snaps.join(at.to_string()))]);
    let url = sh.served_url();
    let resumed = root.join("resumed");
    let o = run_of(
        &trainer,
        &[
            "train",
            "--upstream",
            &url,
            "--config",
            s(&topk),
            "--output",
            s(&resumed),
            "--resume",
            s(&ckpt),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    sh.finish_json();
    for f in ["sae_weights.safetensors", "sparsity.safetensors"] {
        assert!(
            std::fs::read(whole.join(f)).unwrap() == std::fs::read(resumed.join(f)).unwrap(),
            "{f}: the resumed run differs from the whole run"
        );
    }
}
