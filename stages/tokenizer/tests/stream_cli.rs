//! `tokenizer stream` (the `tokens` stream as an Arrow file) on text and on pretokenized
//! datasets, and `tokenizer train`, as a user runs them.

use arrow_array::cast::AsArray;
use arrow_schema::DataType;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tokenizer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tokenizer"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> serde_json::Value {
    let o = tokenizer(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let o = tokenizer(args);
    assert!(!o.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The rows and schema of a `tokens` stream file.
fn read_stream(path: &Path) -> (Vec<Vec<u32>>, arrow_schema::SchemaRef) {
    let r =
        arrow_ipc::reader::FileReader::try_new(std::fs::File::open(path).unwrap(), None).unwrap();
    let schema = r.schema();
    let mut rows = Vec::new();
    for b in r {
        let b = b.unwrap();
        let col = b.column(0).as_fixed_size_list();
        for i in 0..b.num_rows() {
            let v = col.value(i);
            rows.push(
                v.as_primitive::<arrow_array::types::Int32Type>()
                    .values()
                    .iter()
                    .map(|&t| t as u32)
                    .collect(),
            );
        }
    }
    (rows, schema)
}

fn saelens_windows(width: usize) -> Vec<Vec<u32>> {
    let t = pipeline::read_tokens(&fixtures().join("pretok/tokens_all.npy")).unwrap();
    t.ids
        .chunks(t.seq_len)
        .map(|r| r[..width].iter().map(|&v| v as u32).collect())
        .collect()
}

#[test]
fn text_becomes_the_tokens_stream() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tokens.arrow");
    let (corpus, tok) = (fx.join("pretok/corpus.jsonl"), fx.join("tiny-gpt2"));
    let args = [
        "stream",
        "--dataset",
        s(&corpus),
        "--tokenizer",
        s(&tok),
        "--output",
        s(&out),
    ];
    let summary = ok(&args);
    assert_eq!(
        (
            summary["sequences"].as_u64(),
            summary["pretokenized"].as_bool()
        ),
        (Some(700), Some(false))
    );
    let (rows, schema) = read_stream(&out);
    assert_eq!(rows, saelens_windows(128));
    let DataType::FixedSizeList(_, 128) = schema.field(0).data_type() else {
        panic!("{schema:?}")
    };
    assert_eq!(schema.field(0).name(), "input_ids");
    let meta = pipeline::tokens::tokens_metadata(&schema).unwrap().unwrap();
    assert_eq!(
        (meta.context_size, meta.original_column_name.as_deref()),
        (128, Some("text"))
    );
    assert_eq!(
        meta.begin_batch_token,
        Some(schemas::TokenSpec::Named("bos".into()))
    );
    // The activation producer's token reader takes the file as it is.
    let back = pipeline::read_tokens(&out).unwrap();
    assert_eq!((back.n_seq, back.seq_len), (700, 128));
    let e = fails(&args);
    assert!(
        e.contains("already exists and is not empty; pass --overwrite"),
        "{e}"
    );
}

#[test]
fn saelens_pretokenized_dataset_is_checked_and_sliced() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.arrow");
    let ds = fx.join("pretok/saelens_dataset");
    let tok = fx.join("tiny-gpt2");
    let run = |ctx: &str| {
        tokenizer(&[
            "stream",
            "--dataset",
            s(&ds),
            "--tokenizer",
            s(&tok),
            "--context-size",
            ctx,
            "--output",
            s(&out),
            "--overwrite",
        ])
    };
    // As SAELens's ActivationsStore: rows cut to context_size, with a warning.
    let o = run("64");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["pretokenized"], true);
    let warnings = summary["warnings"].to_string();
    assert!(
        warnings.contains("only the first 64 of each are used"),
        "{warnings}"
    );
    // Its sae_lens.json names `<fixtures>/tokenizer`, not loadable here: ids are checked.
    assert!(
        warnings.contains("'<fixtures>/tokenizer' cannot be loaded here"),
        "{warnings}"
    );
    let (rows, schema) = read_stream(&out);
    assert_eq!(rows, saelens_windows(64));
    let meta = pipeline::tokens::tokens_metadata(&schema).unwrap().unwrap();
    assert_eq!(
        (meta.context_size, meta.tokenizer_name.as_str()),
        (64, "<fixtures>/tokenizer")
    );
    // Longer than the dataset's windows: refused, as SAELens refuses.
    let o = run("200");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("the pretokenized windows have 128 tokens (sae_lens.json context_size) but --context-size is 200"), "{e}");
    // pretokenize reads text only.
    let e = fails(&[
        "pretokenize",
        "--dataset",
        s(&ds),
        "--tokenizer",
        s(&tok),
        "--output",
        s(&dir.path().join("p")),
    ]);
    assert!(
        e.contains("already tokenized; pretokenize reads text"),
        "{e}"
    );
}

#[test]
fn a_trained_tokenizer_round_trips_and_mismatches_are_caught() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let corpus = fx.join("pretok/corpus.jsonl");
    let train = |out: &Path| {
        ok(&[
            "train",
            "--dataset",
            s(&corpus),
            "--vocab-size",
            "600",
            "--model-max-length",
            "512",
            "--output",
            s(out),
        ])
    };
    let summary = train(&p("tok"));
    assert_eq!(
        (
            summary["documents"].as_u64(),
            summary["vocab_size"].as_u64()
        ),
        (Some(500), Some(600))
    );
    // Deterministic: the same corpus gives the same file.
    train(&p("tok2"));
    assert_eq!(
        std::fs::read(p("tok/tokenizer.json")).unwrap(),
        std::fs::read(p("tok2/tokenizer.json")).unwrap()
    );
    let t = tokenizer::tokenize::TextTokenizer::load(&p("tok")).unwrap();
    assert_eq!(
        t.special_token("bos").unwrap(),
        Some(0),
        "the special token comes first"
    );
    let text = "Byte-level BPE keeps every byte: naïve café, tabs\tand 🙂.";
    let ids = t.tokenizer.encode(text, true).unwrap().get_ids().to_vec();
    assert!(ids.iter().all(|&i| i < 600));
    assert_eq!(t.tokenizer.decode(&ids, false).unwrap(), text);
    assert_eq!(t.max_context().unwrap().0, 512);
    // Trained on a query's documents only.
    #[cfg(feature = "sql")]
    {
        let q = ok(&[
            "train",
            "--dataset",
            s(&corpus),
            "--query",
            "SELECT text FROM data WHERE length(text) > 500",
            "--vocab-size",
            "300",
            "--output",
            s(&p("tok_q")),
        ]);
        assert_eq!(
            q["documents"], 208,
            "the documents longer than 500 characters"
        );
    }
    let e = fails(&["train", "--dataset", s(&corpus), "--output", s(&p("tok"))]);
    assert!(e.contains("already exists"), "{e}");
    let e = fails(&[
        "train",
        "--dataset",
        s(&corpus),
        "--vocab-size",
        "100",
        "--output",
        s(&p("t3")),
    ]);
    assert!(
        e.contains("--vocab-size 100 is below the 256 bytes plus 1 special tokens"),
        "{e}"
    );

    // Pretokenized with the trained tokenizer, then read with the fixture one: refused,
    // by our vocabulary hash and (SAELens's way) by loading the named tokenizer.
    ok(&[
        "pretokenize",
        "--dataset",
        s(&corpus),
        "--tokenizer",
        s(&p("tok")),
        "--context-size",
        "32",
        "--output",
        s(&p("pre")),
    ]);
    let fixture_tok = fx.join("tiny-gpt2");
    let read = |ds: &Path| {
        fails(&[
            "stream",
            "--dataset",
            s(ds),
            "--tokenizer",
            s(&fixture_tok),
            "--context-size",
            "32",
            "--output",
            s(&p("x.arrow")),
        ])
    };
    let e = read(&p("pre"));
    assert!(
        e.contains("whose vocabulary differs from") && e.contains("tokenize it again"),
        "{e}"
    );
    let meta_path = p("pre/sae_lens.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    meta.as_object_mut().unwrap().remove("tokenizer_vocab_hash");
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    let e = read(&p("pre"));
    assert!(e.contains("whose vocabulary differs from"), "{e}");
    assert!(!p("x.arrow").exists(), "failed runs write nothing");
    // With its own tokenizer it reads back exactly what pretokenize wrote.
    ok(&[
        "stream",
        "--dataset",
        s(&p("pre")),
        "--tokenizer",
        s(&p("tok")),
        "--context-size",
        "32",
        "--output",
        s(&p("y.arrow")),
    ]);
    let written = pipeline::read_tokens(&p("pre/data-00000-of-00001.parquet")).unwrap();
    let (rows, _) = read_stream(&p("y.arrow"));
    let flat: Vec<i64> = rows.iter().flatten().map(|&t| t as i64).collect();
    assert_eq!(flat, written.ids);
}

#[test]
fn pretokenized_rows_must_fit_the_context_and_the_vocabulary() {
    use arrow_array::builder::{Int32Builder, ListBuilder};
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let write = |rows: &[&[i32]]| {
        let mut lists = ListBuilder::new(Int32Builder::new());
        for r in rows {
            lists.append_value(r.iter().map(|&t| Some(t)));
        }
        let col: arrow_array::ArrayRef = std::sync::Arc::new(lists.finish());
        let b = arrow_array::RecordBatch::try_from_iter([("input_ids", col)]).unwrap();
        let path = dir.path().join("ids.parquet");
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&path).unwrap(),
            b.schema(),
            None,
        )
        .unwrap();
        w.write(&b).unwrap();
        w.close().unwrap();
        path
    };
    let tok = fx.join("tiny-gpt2");
    let out = dir.path().join("o.arrow");
    let args = |ds: &Path| -> Vec<String> {
        [
            "stream",
            "--dataset",
            s(ds),
            "--tokenizer",
            s(&tok),
            "--context-size",
            "4",
            "--output",
            s(&out),
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |ds: &Path| {
        let a = args(ds);
        tokenizer(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let o = run(&write(&[&[1, 2, 3, 4, 5], &[6, 7]]));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("ids.parquet: row 1 has 2 tokens, fewer than --context-size 4"),
        "{e}"
    );
    let o = run(&write(&[&[1, 2, 3, 4], &[6, 7, 9999, 1]]));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("row 1 holds token id 9999, outside the tokenizer's vocabulary (0..4096)"),
        "{e}"
    );
    let o = run(&write(&[&[1, 2, 3, 4, 5], &[6, 7, 8, 9]]));
    assert!(o.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(summary["warnings"]
        .to_string()
        .contains("no sae_lens.json, so the dataset's tokenizer cannot be checked"));
    // issue 18: said on stderr as it happens, not only in the summary
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("warning: ")
            && String::from_utf8_lossy(&o.stderr)
                .contains("no sae_lens.json, so the dataset's tokenizer cannot be checked"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(read_stream(&out).0, [vec![1, 2, 3, 4], vec![6, 7, 8, 9]]);
}
