//! Each streaming stage as a process: the producer's stream equals `activation-producer
//! dump`; the shuffler permutes rows, holds to its cap, refuses what cannot fit and
//! resumes from a snapshot with the identical batches; a stage killed mid-run is named
//! downstream and leaves no half file; and the errors a user meets are clear.

#[path = "../../pipeline/tests/support/mod.rs"]
mod support;

use arrow_array::{Array, FixedSizeListArray, Int32Array, RecordBatch, UInt32Array, UInt64Array};
use e2e::{fx, s};
use std::path::Path;
use support::*;

fn model() -> String {
    s(&fx().join("tiny-gpt2")).to_string()
}

fn tokens_npy() -> String {
    s(&fx().join("acts/tokens.npy")).to_string()
}

fn producer() -> std::path::PathBuf {
    workspace_bin("activation-producer")
}

/// All values of one list column over a stream, widened to f32.
fn column(batches: &[RecordBatch], name: &str) -> Vec<f32> {
    let mut v = Vec::new();
    for b in batches {
        let l = b
            .column_by_name(name)
            .unwrap_or_else(|| panic!("no column {name}"))
            .as_any()
            .downcast_ref::<FixedSizeListArray>()
            .unwrap();
        v.extend(pipeline::source::rows_f32(Path::new("t"), l, l.value_length() as usize).unwrap());
    }
    v
}

fn ints<T: Array + 'static>(
    batches: &[RecordBatch],
    name: &str,
    f: impl Fn(&T) -> Vec<i64>,
) -> Vec<i64> {
    batches
        .iter()
        .flat_map(|b| {
            f(b.column_by_name(name)
                .unwrap()
                .as_any()
                .downcast_ref::<T>()
                .unwrap())
        })
        .collect()
}

/// `dump` of `hooks` with `extra` flags: each hook's values (f32, f16 widened).
fn dump(dir: &Path, name: &str, hooks: &str, extra: &[&str]) -> Vec<(String, Vec<f32>)> {
    let out = dir.join(format!("{name}.safetensors"));
    let mut args = vec!["dump", "--model", &*model(), "--tokens", &*tokens_npy()]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    args.extend(["--hooks", hooks, "--output", s(&out), "--batch-size", "3"].map(String::from));
    args.extend(extra.iter().map(|x| x.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run_of(&producer(), &a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    sae::io::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.values))
        .collect()
}

/// `run` of `hooks` with `extra` flags into shards; every batch.
fn stream(dir: &Path, name: &str, hooks: &str, extra: &[&str]) -> Vec<RecordBatch> {
    let out = dir.join(name);
    let mut args = vec![
        "run",
        "--tokens",
        &*tokens_npy(),
        "--model",
        &*model(),
        "--hooks",
        hooks,
        "--store-batch-size-prompts",
        "3",
        "--output",
        s(&out),
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|x| x.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run_of(&producer(), &a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    batches(s(&out))
}

#[test]
fn the_producer_streams_what_dump_writes() {
    let d = tempfile::tempdir().unwrap();
    let hooks = "blocks.0.hook_resid_post,blocks.1.hook_mlp_out";
    // positions 1..127 of 8 sequences of 128, stored as f16 both ways
    let flags = ["--seqpos-slice", "1:-1", "--dtype", "float16"];
    let want = dump(d.path(), "a", hooks, &flags);
    let got = stream(d.path(), "a", hooks, &flags);
    assert_eq!(got.len(), 3, "8 sequences in LM batches of 3");
    for (h, v) in &want {
        assert_eq!(&column(&got, h), v, "{h}");
    }
    let f = got[0]
        .schema()
        .field_with_name("blocks.0.hook_resid_post")
        .unwrap()
        .clone();
    assert!(format!("{}", f.data_type()).contains("Float16"), "{f:?}");
    let seq = ints::<UInt64Array>(&got, "seq", |a| {
        a.values().iter().map(|&x| x as i64).collect()
    });
    let pos = ints::<UInt32Array>(&got, "pos", |a| {
        a.values().iter().map(|&x| x as i64).collect()
    });
    let expect_seq: Vec<i64> = (0..8).flat_map(|q| std::iter::repeat_n(q, 126)).collect();
    let expect_pos: Vec<i64> = (0..8).flat_map(|_| 1..127).collect();
    assert_eq!((seq, pos), (expect_seq, expect_pos));

    // one head of a q hook, f32
    let flags = ["--hook-head-index", "1"];
    let want = dump(d.path(), "b", "blocks.1.attn.hook_q", &flags);
    let got = stream(d.path(), "b", "blocks.1.attn.hook_q", &flags);
    assert_eq!(column(&got, "blocks.1.attn.hook_q"), want[0].1);

    // special tokens excluded: the model's (BOS = EOS = 4095 here) rows are absent and
    // the rest are dump's rows, in order
    let hooks = "blocks.1.hook_resid_pre";
    let all = stream(d.path(), "c", hooks, &[]);
    let kept = stream(d.path(), "d", hooks, &["--exclude-special-tokens"]);
    let tok_all = ints::<Int32Array>(&all, "token_id", |a| {
        a.values().iter().map(|&x| x as i64).collect()
    });
    let tok_kept = ints::<Int32Array>(&kept, "token_id", |a| {
        a.values().iter().map(|&x| x as i64).collect()
    });
    let special = tok_all.iter().filter(|&&t| t == 4095).count();
    assert!(special > 0, "the fixture's tokens hold BOS tokens");
    assert_eq!(tok_kept.len(), tok_all.len() - special);
    assert!(!tok_kept.contains(&4095));
    let (va, vk) = (column(&all, hooks), column(&kept, hooks));
    let filtered: Vec<f32> = va
        .chunks(128)
        .zip(&tok_all)
        .filter(|(_, &t)| t != 4095)
        .flat_map(|(r, _)| r.to_vec())
        .collect();
    assert_eq!(vk, filtered);
    // and an explicit id list
    let kept2 = stream(d.path(), "e", hooks, &["--exclude-special-tokens", "4095"]);
    assert_eq!(column(&kept2, hooks), vk);
}

/// Rows of a stream as sortable byte strings (every column).
fn row_keys(batches: &[RecordBatch]) -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    for b in batches {
        let vals = column(std::slice::from_ref(b), "blocks.0.hook_resid_pre");
        let d = vals.len() / b.num_rows();
        let seq = b
            .column_by_name("seq")
            .unwrap()
            .as_any()
            .downcast_ref::<UInt64Array>()
            .unwrap()
            .clone();
        for r in 0..b.num_rows() {
            let mut k: Vec<u8> = seq.value(r).to_le_bytes().to_vec();
            for x in &vals[r * d..(r + 1) * d] {
                k.extend(x.to_le_bytes());
            }
            keys.push(k);
        }
    }
    keys
}

#[test]
fn the_shuffler_permutes_holds_its_cap_and_resumes_exactly() {
    let d = tempfile::tempdir().unwrap();
    let up = "synthetic:activations?batches=20&rows=32&d=8&hooks=2&seed=4";
    let shuffler = workspace_bin("shuffler");
    let out = d.path().join("full");
    let snaps = d.path().join("snaps");
    // 640 rows in, batches of 64, a buffer of 4 batches; row = 2×8×4 + 16 bytes = 80
    let o = run_of(
        &shuffler,
        &[
            "run",
            "--upstream",
            up,
            "--train-batch-size-tokens",
            "64",
            "--n-batches-in-buffer",
            "4",
            "--max-buffer-bytes",
            "30000",
            "--seed",
            "3",
            "--output",
            s(&out),
            "--snapshot-at",
            "3,7",
            "--snapshots",
            s(&snaps),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    let full = batches(s(&out));
    assert_eq!(full.len(), 10);
    assert!(full.iter().all(|b| b.num_rows() == 64));
    let (mut a, mut b) = (row_keys(&batches(up)), row_keys(&full));
    assert_ne!(a, b, "the rows were mixed");
    a.sort();
    b.sort();
    assert_eq!(a, b, "the output is a permutation of the input");
    let peak = summary["buffer_peak_bytes"].as_u64().unwrap();
    assert!(peak > 0 && peak <= 30000, "{summary}");

    // resumed from the snapshot at position 3, it serves batches 3.. again, identical
    let mut sh = spawn_of(
        &shuffler,
        &[
            "run",
            "--upstream",
            up,
            "--train-batch-size-tokens",
            "64",
            "--n-batches-in-buffer",
            "4",
            "--seed",
            "3",
            "--listen",
            "127.0.0.1:0",
            "--resume",
            s(&snaps.join("3")),
        ],
    );
    let url = sh.served_url();
    let part = d.path().join("part");
    let v = run_json(&["copy", &url, s(&part), "--position", "3"]);
    assert_eq!(v["batches_written"], 7, "{v}");
    sh.finish_json();
    let tail = batches(s(&part));
    assert_eq!(tail.len(), 7);
    assert_eq!(tail, full[3..].to_vec());

    // a buffer that cannot fit its cap, and one smaller than a batch, are refused up front
    let e = run_err_of(
        &shuffler,
        &[
            "run",
            "--upstream",
            up,
            "--train-batch-size-tokens",
            "64",
            "--buffer-tokens",
            "1000",
            "--max-buffer-bytes",
            "50000",
            "--output",
            s(&d.path().join("x")),
        ],
    );
    assert!(
        e.contains("1000 tokens × 80 bytes") && e.contains("80000") && e.contains("50000"),
        "{e}"
    );
    let e = run_err_of(
        &shuffler,
        &[
            "run",
            "--upstream",
            up,
            "--train-batch-size-tokens",
            "64",
            "--buffer-tokens",
            "32",
            "--output",
            s(&d.path().join("y")),
        ],
    );
    assert!(e.contains("smaller than one batch"), "{e}");
    assert!(!d.path().join("x").exists() && !d.path().join("y").exists());
}

fn run_err_of(bin: &Path, args: &[&str]) -> String {
    let o = run_of(bin, args);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "should fail: {}", args.join(" "));
    e
}

#[test]
fn a_killed_producer_is_named_downstream_and_leaves_no_half_file() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    // small windows: the producer blocks once the shuffler stops reading
    // 700 sequences, 88 LM batches of 540 KB: far more than the windows and queues hold
    let tokens = fx().join("pretok/tokens_all.npy");
    let mut p = spawn_of(
        &producer(),
        &[
            "run",
            "--tokens",
            s(&tokens),
            "--model",
            &model(),
            "--hooks",
            "blocks.1.hook_resid_pre",
            "--store-batch-size-prompts",
            "8",
            "--listen",
            "127.0.0.1:0",
            "--window-bytes",
            "200KiB",
            "--output",
            s(&cache),
            "--shard-bytes",
            "100KiB",
        ],
    );
    let acts = p.served_url();
    let mut sh = spawn_of(
        &workspace_bin("shuffler"),
        &[
            "run",
            "--upstream",
            &acts,
            "--train-batch-size-tokens",
            "64",
            "--n-batches-in-buffer",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--window-bytes",
            "100KiB",
            "--queue-bytes",
            "1MiB",
        ],
    );
    let batches_url = sh.served_url();
    // once the shuffler's window is full (3 batches of 64 × 528 bytes in 100 KiB) it
    // blocks until a trainer reads: each upstream batch (8 × 128 rows) leaves a dozen
    // more batches ready in its buffer, so it is blocked sending, not reading upstream,
    // and cannot see the producer die before a trainer drains them
    wait_for("the shuffler's window to fill", || {
        run_json(&["inspect", &batches_url])["streams"][0]["status"]["batches"] == 3
    });
    assert!(cache.join("shard-00000.arrow").exists());
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    let cfg = d.path().join("c.yaml");
    std::fs::write(&cfg, "architecture: topk\nk: 4\nd_sae: 64\nhook_name: blocks.1.hook_resid_pre\ntrain_batch_size_tokens: 64\ntraining_tokens: 64000\n").unwrap();
    let run = d.path().join("run");
    let o = run_of(
        &workspace_bin("sae-trainer"),
        &[
            "train",
            "--upstream",
            &batches_url,
            "--config",
            s(&cfg),
            "--output",
            s(&run),
        ],
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        e.contains(&batches_url) && e.contains(&acts),
        "the trainer names the shuffler and the dead producer: {e}"
    );
    let (ok, e) = sh.wait(LIMIT);
    assert!(
        !ok && e.contains(&acts) && e.contains("resume from position"),
        "{e}"
    );
    // nothing half written under a final name: the cache verifies, the run has no SAE
    let v = run_json(&["inspect", s(&cache)]);
    assert!(v.to_string().contains("\"complete\":false"), "{v}");
    assert!(!run.join("sae_weights.safetensors").exists());
}

#[test]
fn stage_errors_name_what_is_wrong() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("a");
    // the producer on the fixture tokens and model, with these hooks and flags
    let producer_err = |hooks: &str, extra: &[&str]| {
        let (tokens, model) = (tokens_npy(), model());
        let mut args = vec![
            "run", "--tokens", &tokens, "--model", &model, "--hooks", hooks,
        ];
        args.extend(extra);
        args.extend(["--output", s(&out)]);
        run_err_of(&producer(), &args)
    };
    let e = producer_err("blocks.0.hook_resid_middle", &[]);
    assert!(
        e.contains("blocks.0.hook_resid_middle") && e.contains("blocks.1.hook_resid_post"),
        "valid names listed: {e}"
    );
    let e = producer_err("blocks.9.hook_resid_pre", &[]);
    assert!(
        e.contains("layer 9 is out of range") && e.contains("2 layers"),
        "{e}"
    );
    let e = producer_err("blocks.0.hook_resid_pre", &["--producer", "3/2"]);
    assert!(e.contains("'3/2'") && e.contains("0 <= I < N"), "{e}");
    assert!(!out.exists());

    // a batches stream without the config's hook, or of another width
    let up = "synthetic:batches?batches=4&rows=64&d=8&hooks=1";
    let trainer = workspace_bin("sae-trainer");
    let trainer_err = |name: &str, text: &str| {
        let c = d.path().join(name);
        std::fs::write(&c, text).unwrap();
        let run = d.path().join("r");
        run_err_of(
            &trainer,
            &[
                "train",
                "--upstream",
                up,
                "--config",
                s(&c),
                "--output",
                s(&run),
            ],
        )
    };
    let e = trainer_err("a.yaml", "architecture: topk\nk: 2\nd_sae: 16\nhook_name: blocks.3.hook_resid_post\ntrain_batch_size_tokens: 64\ntraining_tokens: 128\n");
    assert!(
        e.contains("blocks.3.hook_resid_post")
            && e.contains("blocks.0.hook_resid_pre, seq, pos, token_id"),
        "{e}"
    );
    let e = trainer_err("b.yaml", "architecture: topk\nk: 2\nd_sae: 16\nd_in: 12\nhook_name: blocks.0.hook_resid_pre\ntrain_batch_size_tokens: 64\ntraining_tokens: 128\n");
    assert!(e.contains("d_in is 12") && e.contains("have 8"), "{e}");
    let e = trainer_err("c.yaml", "architecture: topk\nk: 2\nd_sae: 16\nhook_name: blocks.0.hook_resid_pre\ntrain_batch_size_tokens: 32\ntraining_tokens: 128\n");
    assert!(
        e.contains("has 64 rows") && e.contains("train_batch_size_tokens is 32"),
        "{e}"
    );
    assert!(!d.path().join("r").join("sae_weights.safetensors").exists());
}

#[test]
fn the_tokenizer_serves_from_any_position() {
    let d = tempfile::tempdir().unwrap();
    let tok = workspace_bin("tokenizer");
    let (corpus, tokenizer) = (fx().join("pretok/corpus.jsonl"), fx().join("tiny-gpt2"));
    let base = [
        "stream",
        "--dataset",
        s(&corpus),
        "--tokenizer",
        s(&tokenizer),
        "--context-size",
        "64",
        "--batch-sequences",
        "10",
    ];
    let full = d.path().join("full");
    let mut args = base.to_vec();
    args.extend(["--output", s(&full)]);
    let o = run_of(&tok, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let all = batches(s(&full));
    assert!(all.len() > 5 && all[..all.len() - 1].iter().all(|b| b.num_rows() == 10));
    // served from batch 3 (= sequence 30): a client reading from 3 gets batches 3..
    let mut args = base.to_vec();
    args.extend(["--position", "3", "--listen", "127.0.0.1:0"]);
    let mut server = spawn_of(&tok, &args);
    let url = server.served_url();
    let part = d.path().join("part");
    let v = run_json(&["copy", &url, s(&part), "--position", "3"]);
    assert_eq!(
        v["batches_written"].as_u64(),
        Some(all.len() as u64 - 3),
        "{v}"
    );
    server.finish_json();
    assert_eq!(batches(s(&part)), all[3..].to_vec());
}

/// A producer restarted at output position J reads a tokenizer restarted at the batch
/// holding its first sequence, and emits what the uninterrupted producer emitted from J.
#[test]
fn a_producer_resumes_on_a_resumed_tokenizer() {
    let d = tempfile::tempdir().unwrap();
    let (corpus, tokenizer) = (fx().join("pretok/corpus.jsonl"), fx().join("tiny-gpt2"));
    let tok = |extra: &[&str]| {
        let mut args = vec![
            "stream",
            "--dataset",
            s(&corpus),
            "--tokenizer",
            s(&tokenizer),
            "--context-size",
            "32",
            "--batch-sequences",
            "4",
        ];
        args.extend_from_slice(extra);
        args.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let toks = d.path().join("tokens");
    let args = tok(&["--output", s(&toks)]);
    let o = run_of(
        &workspace_bin("tokenizer"),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let producer_args = |tokens: &str, extra: &[&str]| {
        let mut a = vec![
            "run".to_string(),
            "--tokens".into(),
            tokens.into(),
            "--model".into(),
            model(),
            "--hooks".into(),
            "blocks.0.hook_resid_pre".into(),
            "--store-batch-size-prompts".into(),
            "2".into(),
        ];
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let full = d.path().join("full");
    let a = producer_args(s(&toks), &["--max-batches", "8", "--output", s(&full)]);
    let o = run_of(
        &producer(),
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = batches(s(&full));

    // tokenizer from its batch 3 (sequences 12..), producer from its batch 6 (sequences 12, 13)
    let args = tok(&["--position", "3", "--listen", "127.0.0.1:0"]);
    let mut t = spawn_of(
        &workspace_bin("tokenizer"),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let url = t.served_url();
    let a = producer_args(
        &url,
        &[
            "--position",
            "6",
            "--max-batches",
            "2",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let mut p = spawn_of(
        &producer(),
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let acts = p.served_url();
    let part = d.path().join("part");
    let v = run_json(&["copy", &acts, s(&part), "--position", "6"]);
    assert_eq!(v["batches_written"], 2, "{v}");
    p.finish_json();
    t.finish_json();
    assert_eq!(batches(s(&part)), want[6..8].to_vec());
}
