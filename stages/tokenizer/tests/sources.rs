//! Every dataset format reads back the same documents; bad files say why.

use arrow_array::builder::{Int32Builder, ListBuilder};
use arrow_array::{ArrayRef, RecordBatch, StringArray};
use std::path::Path;
use std::sync::Arc;
use tokenizer::sources::{read_documents, Documents};

fn texts() -> Vec<String> {
    vec![
        "first document".into(),
        "second, longer document".into(),
        "".into(),
    ]
}

fn text_batch(col: &str) -> RecordBatch {
    let a: ArrayRef = Arc::new(StringArray::from(texts()));
    let other: ArrayRef = Arc::new(StringArray::from(vec!["a", "b", "c"]));
    RecordBatch::try_from_iter([("source", other), (col, a)]).unwrap()
}

fn write_parquet(path: &Path, b: &RecordBatch) {
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        b.schema(),
        None,
    )
    .unwrap();
    w.write(b).unwrap();
    w.close().unwrap();
}

#[test]
fn jsonl_parquet_arrow_text_and_hf_directories() {
    let dir = tempfile::tempdir().unwrap();
    let want = Documents::Text(texts());
    let p = |n: &str| dir.path().join(n);

    let lines: Vec<String> = texts()
        .iter()
        .map(|t| serde_json::json!({"text": t, "source": "x"}).to_string())
        .collect();
    std::fs::write(p("d.jsonl"), lines.join("\n")).unwrap();
    assert_eq!(read_documents(&p("d.jsonl"), None).unwrap(), want);

    write_parquet(&p("d.parquet"), &text_batch("text"));
    assert_eq!(read_documents(&p("d.parquet"), None).unwrap(), want);

    let b = text_batch("problem");
    let mut w = arrow_ipc::writer::FileWriter::try_new(
        std::fs::File::create(p("d.arrow")).unwrap(),
        &b.schema(),
    )
    .unwrap();
    w.write(&b).unwrap();
    w.finish().unwrap();
    assert_eq!(
        read_documents(&p("d.arrow"), None).unwrap(),
        want,
        "'problem' is SAELens's second choice"
    );

    // An HF save_to_disk directory: a stream-format Arrow file named by state.json.
    let hf = p("hf");
    std::fs::create_dir(&hf).unwrap();
    let mut lists = ListBuilder::new(Int32Builder::new());
    lists.append_value([Some(1), Some(2), Some(3)]);
    lists.append_value([Some(4), Some(5)]);
    let ids: ArrayRef = Arc::new(lists.finish());
    let b = RecordBatch::try_from_iter([("input_ids", ids)]).unwrap();
    let mut w = arrow_ipc::writer::StreamWriter::try_new(
        std::fs::File::create(hf.join("data-00000-of-00001.arrow")).unwrap(),
        &b.schema(),
    )
    .unwrap();
    w.write(&b).unwrap();
    w.finish().unwrap();
    std::fs::write(
        hf.join("state.json"),
        r#"{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}"#,
    )
    .unwrap();
    assert_eq!(
        read_documents(&hf, None).unwrap(),
        Documents::Tokens(vec![vec![1, 2, 3], vec![4, 5]])
    );

    std::fs::write(p("d.txt"), texts().join("\n")).unwrap();
    let Documents::Text(t) = read_documents(&p("d.txt"), None).unwrap() else {
        panic!()
    };
    assert_eq!(
        t,
        texts()[..2],
        "one document per line (the trailing empty line is no line)"
    );

    // A directory of files in name order; column_name picks another column.
    let many = p("many");
    std::fs::create_dir(&many).unwrap();
    std::fs::write(many.join("b.jsonl"), r#"{"text": "two", "title": "T2"}"#).unwrap();
    std::fs::write(many.join("a.jsonl"), r#"{"text": "one", "title": "T1"}"#).unwrap();
    std::fs::write(many.join("notes.md"), "ignored").unwrap();
    assert_eq!(
        read_documents(&many, None).unwrap(),
        Documents::Text(vec!["one".into(), "two".into()])
    );
    assert_eq!(
        read_documents(&many, Some("title")).unwrap(),
        Documents::Text(vec!["T1".into(), "T2".into()])
    );
}

#[test]
fn bad_datasets_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let e = |path: &Path, col: Option<&str>| read_documents(path, col).unwrap_err().to_string();
    assert!(e(&p("absent.jsonl"), None).contains("no such file"));
    std::fs::write(p("x.jsonl"), r#"{"body": "hi", "id": 1}"#).unwrap();
    let m = e(&p("x.jsonl"), None);
    assert!(
        m.contains("column 'tokens' / 'input_ids' / 'text' / 'problem' not found")
            && m.contains("body")
            && m.contains("id"),
        "{m}"
    );
    write_parquet(&p("x.parquet"), &text_batch("text"));
    let m = e(&p("x.parquet"), Some("body"));
    assert!(
        m.contains("column 'body' not found (columns: source, text)"),
        "{m}"
    );
    std::fs::write(p("bad.parquet"), b"PAR1 not really").unwrap();
    assert!(e(&p("bad.parquet"), None).contains("not a readable Parquet file"));
    std::fs::write(p("bad.arrow"), b"garbage").unwrap();
    assert!(e(&p("bad.arrow"), None).contains("not a readable Arrow IPC file or stream"));
    std::fs::write(p("empty.jsonl"), "\n\n").unwrap();
    assert!(e(&p("empty.jsonl"), None).contains("no documents"));
    std::fs::write(p("broken.jsonl"), "{\"text\": \"a\"}\n{oops\n").unwrap();
    assert!(e(&p("broken.jsonl"), None).contains("line 2: not JSON"));
    // issue 18: a value of the wrong type is named by its line too
    std::fs::write(
        p("typed.jsonl"),
        "{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n{\"text\": 5}\n{\"text\": \"c\"}\n",
    )
    .unwrap();
    let m = e(&p("typed.jsonl"), None);
    assert!(
        m.contains("typed.jsonl: line 4: ") && m.contains("expected string got 5"),
        "{m}"
    );
}

#[test]
fn csv_globs_token_lists_and_batches_of_bounded_size() {
    use tokenizer::sources::{Dataset, DocumentStream, BATCH_ROWS};
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);

    // CSV: every column is text, quoted commas and newlines kept.
    std::fs::write(
        p("d.csv"),
        "id,text\n1,\"first, with a comma\"\n2,\"two\nlines\"\n3,42\n",
    )
    .unwrap();
    assert_eq!(
        read_documents(&p("d.csv"), None).unwrap(),
        Documents::Text(vec![
            "first, with a comma".into(),
            "two\nlines".into(),
            "42".into()
        ])
    );

    // A glob over shards, in name order; other files in the folder are not read.
    let shards = p("shards");
    std::fs::create_dir(&shards).unwrap();
    for (i, t) in ["zero", "one", "two"].iter().enumerate() {
        write_parquet(
            &shards.join(format!("part-{i}.parquet")),
            &RecordBatch::try_from_iter([(
                "text",
                Arc::new(StringArray::from(vec![*t])) as ArrayRef,
            )])
            .unwrap(),
        );
    }
    std::fs::write(shards.join("README.md"), "not data").unwrap();
    let glob = shards.join("part-*.parquet");
    assert_eq!(
        read_documents(&glob, None).unwrap(),
        Documents::Text(vec!["zero".into(), "one".into(), "two".into()])
    );
    let e = read_documents(&shards.join("nope-*.parquet"), None).unwrap_err();
    assert!(e.to_string().contains("the glob matches no files"), "{e}");
    let e = read_documents(&shards.join("*"), None).unwrap_err();
    assert!(
        e.to_string()
            .contains("README.md: matched by the glob but not a dataset file"),
        "{e}"
    );

    // JSONL token lists are already-tokenized documents.
    std::fs::write(p("t.jsonl"), "{\"tokens\": [1, 2, 3]}\n{\"tokens\": [4]}\n").unwrap();
    assert_eq!(
        read_documents(&p("t.jsonl"), None).unwrap(),
        Documents::Tokens(vec![vec![1, 2, 3], vec![4]])
    );

    // A big text file comes in batches of BATCH_ROWS documents, never all at once.
    let n = BATCH_ROWS * 2 + 5;
    let lines: Vec<String> = (0..n).map(|i| format!("document {i}")).collect();
    std::fs::write(p("big.txt"), lines.join("\n")).unwrap();
    let ds = Dataset::open(&p("big.txt")).unwrap();
    let sizes: Vec<usize> = DocumentStream::of(&ds, None)
        .unwrap()
        .map(|d| d.unwrap().len())
        .collect();
    assert_eq!(sizes, [BATCH_ROWS, BATCH_ROWS, 5]);
    let lines: Vec<String> = (0..n)
        .map(|i| serde_json::json!({"text": format!("d{i}")}).to_string())
        .collect();
    std::fs::write(p("big.jsonl"), lines.join("\n")).unwrap();
    let ds = Dataset::open(&p("big.jsonl")).unwrap();
    let chunks: Vec<Documents> = DocumentStream::of(&ds, None)
        .unwrap()
        .map(|d| d.unwrap())
        .collect();
    assert_eq!(chunks.len(), 3);
    assert_eq!(
        chunks[2],
        Documents::Text(vec![
            format!("d{}", n - 5),
            format!("d{}", n - 4),
            format!("d{}", n - 3),
            format!("d{}", n - 2),
            format!("d{}", n - 1)
        ])
    );
}

#[test]
fn more_bad_datasets_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let e = |path: &Path| read_documents(path, None).unwrap_err().to_string();
    // A Parquet file with the column but no rows.
    let empty = RecordBatch::try_from_iter([(
        "text",
        Arc::new(StringArray::from(Vec::<String>::new())) as ArrayRef,
    )])
    .unwrap();
    write_parquet(&p("empty.parquet"), &empty);
    assert!(e(&p("empty.parquet")).contains("empty.parquet: no documents"));
    // A JSON array is not JSON Lines.
    std::fs::write(p("array.json"), r#"[{"text": "a"}]"#).unwrap();
    let m = e(&p("array.json"));
    assert!(
        m.contains("line 1: not a JSON object (expected JSON Lines"),
        "{m}"
    );
    // Text in one shard, token ids in the next.
    let mixed = p("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::write(mixed.join("a.jsonl"), r#"{"text": "words"}"#).unwrap();
    std::fs::write(mixed.join("b.jsonl"), r#"{"text": [1, 2]}"#).unwrap();
    let m = e(&mixed);
    assert!(
        m.contains("b.jsonl: column 'text' is List") && m.contains("text in the files before"),
        "{m}"
    );
    // A shard without the column names itself and what it has.
    std::fs::write(mixed.join("b.jsonl"), r#"{"body": "words"}"#).unwrap();
    let m = e(&mixed);
    assert!(
        m.contains("b.jsonl: column 'text' not found (columns: body)"),
        "{m}"
    );
    // A truncated Parquet file (a valid one cut short).
    write_parquet(&p("whole.parquet"), &text_batch("text"));
    let bytes = std::fs::read(p("whole.parquet")).unwrap();
    std::fs::write(p("cut.parquet"), &bytes[..bytes.len() / 2]).unwrap();
    assert!(e(&p("cut.parquet")).contains("not a readable Parquet file"));
    // An unknown extension.
    std::fs::write(p("d.xlsx"), "x").unwrap();
    assert!(e(&p("d.xlsx")).contains("not a dataset file"));
}

#[cfg(feature = "sql")]
#[test]
fn sql_filters_and_projects_any_format() {
    use tokenizer::sources::{Dataset, DocumentStream};
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let lines: Vec<String> = (0..3000)
        .map(|i| serde_json::json!({"text": "x".repeat(i % 10), "lang": if i % 3 == 0 {"en"} else {"de"}}).to_string())
        .collect();
    std::fs::write(p("d.jsonl"), lines.join("\n")).unwrap();
    let query = |path: &Path, sql: &str| -> Result<Vec<String>, String> {
        let ds = Dataset::open(path).map_err(|e| e.to_string())?;
        let docs =
            tokenizer::windows::documents(&ds, Some(sql), None).map_err(|e| format!("{e:#}"))?;
        let mut out = Vec::new();
        for d in docs {
            match d.map_err(|e| e.to_string())? {
                Documents::Text(t) => out.extend(t),
                Documents::Tokens(_) => panic!("text expected"),
            }
        }
        Ok(out)
    };
    let got = query(
        &p("d.jsonl"),
        "SELECT text FROM data WHERE length(text) > 7 AND lang = 'en'",
    )
    .unwrap();
    let want: Vec<String> = (0..3000)
        .filter(|i| i % 10 > 7 && i % 3 == 0)
        .map(|i| "x".repeat(i % 10))
        .collect();
    assert_eq!(got, want, "filtered, in the dataset's order");
    // Over a directory of Parquet shards, renaming a column to the one SAELens reads.
    let shards = p("shards");
    std::fs::create_dir(&shards).unwrap();
    write_parquet(&shards.join("a.parquet"), &text_batch("body"));
    write_parquet(&shards.join("b.parquet"), &text_batch("body"));
    let got = query(
        &shards,
        "SELECT upper(body) AS text FROM data WHERE source <> 'b'",
    )
    .unwrap();
    assert_eq!(got, ["FIRST DOCUMENT", "", "FIRST DOCUMENT", ""]);
    let ds = Dataset::open(&shards).unwrap();
    assert!(
        DocumentStream::of(&ds, None).is_err(),
        "no text column without the query"
    );
    let e = query(&p("d.jsonl"), "SELECT nope FROM data").unwrap_err();
    assert!(e.contains("query failed") && e.contains("nope"), "{e}");
    let e = query(&p("d.jsonl"), "SELECT lang AS other FROM data").unwrap_err();
    assert!(e.contains("(query): column 'tokens' / 'input_ids' / 'text' / 'problem' not found (columns: other)"), "{e}");
}

#[test]
fn documents_shuffle_through_a_seeded_buffer() {
    use tokenizer::sources::{Dataset, DocumentStream, ShuffledDocuments};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.txt");
    let lines: Vec<String> = (0..3000).map(|i| format!("doc {i}")).collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    let ds = Dataset::open(&path).unwrap();
    let shuffled = |buffer: usize, seed: u64| -> Vec<String> {
        let docs = DocumentStream::of(&ds, None).unwrap();
        ShuffledDocuments::new(docs, buffer, seed)
            .flat_map(|d| match d.unwrap() {
                Documents::Text(t) => t,
                Documents::Tokens(_) => panic!(),
            })
            .collect()
    };
    let a = shuffled(500, 1);
    assert_ne!(a, lines, "reordered");
    assert_eq!(a, shuffled(500, 1), "the same for the same seed");
    assert_ne!(a, shuffled(500, 2), "another seed, another order");
    let mut sorted = a.clone();
    sorted.sort();
    let mut want = lines.clone();
    want.sort();
    assert_eq!(sorted, want, "every document exactly once");
    // A buffer of 500 cannot move a document more than 500 places earlier.
    for (pos, d) in a.iter().enumerate() {
        let orig: usize = d[4..].parse().unwrap();
        assert!(pos + 500 >= orig, "{d} at {pos}");
    }
}
