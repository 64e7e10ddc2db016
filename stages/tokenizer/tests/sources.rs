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
}
