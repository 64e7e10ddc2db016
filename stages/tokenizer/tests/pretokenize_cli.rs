//! `tokenizer pretokenize` as a user runs it on the fixture corpus.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tokenizer"))
        .arg("pretokenize")
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn writes_saelens_windows_and_metadata_and_refuses_to_overwrite() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pretok");
    let (corpus, tok) = (fx.join("pretok/corpus.jsonl"), fx.join("tiny-gpt2"));
    let args = [
        "--dataset",
        s(&corpus),
        "--tokenizer",
        s(&tok),
        "--context-size",
        "128",
        // The fixture was made with num_proc 1 (SAELens's default is 4).
        "--num-proc",
        "1",
        "--output",
        s(&out),
    ];
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["sequences"], 700);
    assert_eq!(summary["document_tokens"], 88529);

    // Same ids as SAELens's PretokenizeRunner with its defaults (bos / none / bos).
    let got = pipeline::read_tokens(&out.join("data-00000-of-00001.parquet")).unwrap();
    let want = pipeline::read_tokens(&fx.join("pretok/tokens_all.npy")).unwrap();
    assert_eq!(got, want);
    // sae_lens.json carries SAELens's keys and our settings.
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sae_lens.json")).unwrap()).unwrap();
    let keys: Vec<&str> = meta
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        keys,
        [
            "sae_lens_version",
            "tokenizer_name",
            "original_dataset",
            "original_dataset_name",
            "original_split",
            "original_data_files",
            "original_column_name",
            "context_size",
            "shuffled",
            "seed",
            "begin_batch_token",
            "begin_sequence_token",
            "sequence_separator_token",
            "disable_concat_sequences",
            "use_chat_formatting",
            // Ours, after SAELens's (which reads only tokenizer_name).
            "tokenizer_vocab_hash",
        ]
    );
    let tok_hash = meta["tokenizer_vocab_hash"].as_str().unwrap();
    assert!(tok_hash.len() == 16 && tok_hash.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(
        (
            meta["begin_batch_token"].as_str(),
            meta["begin_sequence_token"].is_null()
        ),
        (Some("bos"), true)
    );

    // Not replaced without --overwrite; with it, replaced whole (shuffled rows now).
    let o = run(&args);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("already exists and is not empty; pass --overwrite"));
    let mut again = args.to_vec();
    again.extend(["--overwrite", "--shuffle", "--seed", "3"]);
    assert!(run(&again).status.success());
    let shuffled = pipeline::read_tokens(&out.join("data-00000-of-00001.parquet")).unwrap();
    assert_ne!(shuffled.ids, want.ids);
    let mut a: Vec<&[i64]> = shuffled.ids.chunks(128).collect();
    let mut b: Vec<&[i64]> = want.ids.chunks(128).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "the same rows, reordered");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left.len(),
        1,
        "no temporary or old directories left: {left:?}"
    );
}

/// SAELens's defaults cut the documents into num_proc = 4 contiguous shards and pack
/// each map batch on its own: with 150 documents, batches of 10 and a 32-token context
/// that is many restarts, every one of which must fall where SAELens's falls.
#[test]
fn packs_shards_and_map_batches_as_saelens() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let corpus = std::fs::read_to_string(fx.join("pretok/corpus.jsonl")).unwrap();
    let first150: Vec<&str> = corpus.lines().take(150).collect();
    let data = dir.path().join("first150.jsonl");
    std::fs::write(&data, first150.join("\n")).unwrap();
    let out = dir.path().join("o");
    let tok = fx.join("tiny-gpt2");
    let args = |extra: &[&str]| -> Output {
        let mut a = vec![
            "--dataset",
            s(&data),
            "--tokenizer",
            s(&tok),
            "--context-size",
            "32",
            "--pretokenize-batch-size",
            "10",
            "--output",
            s(&out),
            "--overwrite",
        ];
        a.extend_from_slice(extra);
        run(&a)
    };
    assert!(args(&[]).status.success(), "num_proc 4 is the default");
    let got = pipeline::read_tokens(&out.join("data-00000-of-00001.parquet")).unwrap();
    let want = pipeline::read_tokens(&fx.join("pretok/tokens_np4_b10_c32.npy")).unwrap();
    assert_eq!((got.n_seq, got.seq_len), (853, 32));
    assert_eq!(got, want);
    // One shard restarts in other places: not SAELens's default windows.
    assert!(args(&["--num-proc", "1"]).status.success());
    let one = pipeline::read_tokens(&out.join("data-00000-of-00001.parquet")).unwrap();
    assert_ne!(one, want);
}

#[test]
fn errors_name_the_problem() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let (corpus, tok) = (fx.join("pretok/corpus.jsonl"), fx.join("tiny-gpt2"));
    let err = |extra: &[&str]| {
        let mut a = vec!["--tokenizer", s(&tok), "--output", s(&out)];
        a.extend_from_slice(extra);
        let o = run(&a);
        assert!(!o.status.success(), "{extra:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = err(&["--dataset", s(&corpus), "--context-size", "300"]);
    assert!(
        e.contains("larger than the tokenizer's model_max_length (256)"),
        "{e}"
    );
    let e = err(&["--dataset", s(&corpus), "--column-name", "body"]);
    assert!(
        e.contains("column 'body' not found (columns: text, source)"),
        "{e}"
    );
    let e = err(&["--dataset", s(&corpus), "--begin-batch-token", "sep"]);
    assert!(e.contains("the tokenizer has no sep_token"), "{e}");
    let e = err(&["--dataset", s(&dir.path().join("missing.jsonl"))]);
    assert!(e.contains("no such file"), "{e}");
    // A model directory: its config.json bounds the context where no tokenizer_config does.
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::copy(tok.join("tokenizer.json"), model.join("tokenizer.json")).unwrap();
    std::fs::write(model.join("config.json"), r#"{"n_positions": 64}"#).unwrap();
    let mut a = vec!["--tokenizer", s(&model), "--output", s(&out)];
    a.extend(["--dataset", s(&corpus), "--context-size", "100"]);
    let o = run(&a);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("--context-size 100 is larger than the model's n_positions (64)"),
        "{e}"
    );
    let tiny = dir.path().join("tiny.jsonl");
    std::fs::write(&tiny, "{\"text\": \"a b\"}\n").unwrap();
    let e = err(&["--dataset", s(&tiny)]);
    assert!(e.contains("fill no window of 128 tokens"), "{e}");
    assert!(!out.exists(), "failed runs write nothing");
}

#[test]
fn bench_reports_throughput() {
    let fx = fixtures();
    let o = Command::new(env!("CARGO_BIN_EXE_tokenizer"))
        .args([
            "bench",
            "--dataset",
            s(&fx.join("pretok/corpus.jsonl")),
            "--tokenizer",
            s(&fx.join("tiny-gpt2")),
            "--repeats",
            "1",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (r["document_tokens"].as_u64(), r["windows"].as_u64()),
        (Some(88529), Some(700))
    );
    assert!(r["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(r["stream_tokens_per_second"].as_f64().unwrap() > 0.0);
}
