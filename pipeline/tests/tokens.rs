//! Token files in every supported format read back the same ids; bad files are refused
//! with the reason.

use arrow_array::builder::{Int32Builder, ListBuilder};
use arrow_array::{ArrayRef, Float32Array, RecordBatch};
use pipeline::{read_tokens, TokenRows};
use std::path::Path;
use std::sync::Arc;

fn fixture_tokens() -> TokenRows {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/acts/tokens.npy");
    read_tokens(&p).unwrap()
}

#[test]
fn npy_fixture_reads_as_numpy_wrote_it() {
    let t = fixture_tokens();
    assert_eq!((t.n_seq, t.seq_len), (8, 128));
    // Every row of the SAELens-packed fixture starts with BOS (4095).
    assert!((0..8).all(|r| t.ids[r * 128] == 4095));
    assert!(t.ids.iter().all(|&i| (0..4096).contains(&i)));
}

fn write_parquet(path: &Path, batch: &RecordBatch) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

fn write_npy(path: &Path, descr: &str, shape: &str, data: &[u8]) {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn safetensors_parquet_arrow_and_int32_npy_agree() {
    let want = fixture_tokens();
    let dir = tempfile::tempdir().unwrap();
    let i32s: Vec<u8> = want
        .ids
        .iter()
        .flat_map(|&v| (v as i32).to_le_bytes())
        .collect();

    let npy = dir.path().join("t.npy");
    write_npy(&npy, "<i4", "(8, 128)", &i32s);
    assert_eq!(read_tokens(&npy).unwrap(), want);

    let st = dir.path().join("t.safetensors");
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![8, 128], &i32s).unwrap();
    safetensors::serialize_to_file([("input_ids", view)], None, &st).unwrap();
    assert_eq!(read_tokens(&st).unwrap(), want);

    // A SAELens pretokenized dataset: `input_ids` as list<int32>, beside other columns.
    let mut lists = ListBuilder::new(Int32Builder::new());
    for row in want.ids.chunks(128) {
        lists.append_value(row.iter().map(|&v| Some(v as i32)));
    }
    let ids: ArrayRef = Arc::new(lists.finish());
    let other: ArrayRef = Arc::new(Float32Array::from(vec![0.0; 8]));
    let batch = RecordBatch::try_from_iter([("score", other), ("input_ids", ids)]).unwrap();
    let pq = dir.path().join("t.parquet");
    write_parquet(&pq, &batch);
    assert_eq!(read_tokens(&pq).unwrap(), want);

    let ipc = dir.path().join("t.arrow");
    let mut w = arrow_ipc::writer::FileWriter::try_new(
        std::fs::File::create(&ipc).unwrap(),
        &batch.schema(),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
    assert_eq!(read_tokens(&ipc).unwrap(), want);

    // The stream format, as HF `save_to_disk` writes it.
    let stream = dir.path().join("data-00000-of-00001.arrow");
    let f = std::fs::File::create(&stream).unwrap();
    let mut w = arrow_ipc::writer::StreamWriter::try_new(f, &batch.schema()).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
    assert_eq!(read_tokens(&stream).unwrap(), want);
}

#[test]
fn bad_token_files_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let err = |p: &Path| read_tokens(p).unwrap_err().to_string();

    let f = dir.path().join("floats.npy");
    write_npy(&f, "<f4", "(1, 2)", &[0; 8]);
    assert!(
        err(&f).contains("must be integers") && err(&f).contains("f4"),
        "{}",
        err(&f)
    );
    let f = dir.path().join("flat.npy");
    write_npy(&f, "<i8", "(4,)", &[0; 32]);
    assert!(
        err(&f).contains("must be 2-D [n_seq, context_size]"),
        "{}",
        err(&f)
    );
    let f = dir.path().join("short.npy");
    write_npy(&f, "<i8", "(2, 4)", &[0; 32]);
    assert!(err(&f).contains("4 values for shape [2, 4]"), "{}", err(&f));

    let mut lists = ListBuilder::new(Int32Builder::new());
    lists.append_value([Some(1), Some(2), Some(3)]);
    lists.append_value([Some(1), Some(2)]);
    let ids: ArrayRef = Arc::new(lists.finish());
    let batch = RecordBatch::try_from_iter([("tokens", ids.clone())]).unwrap();
    let f = dir.path().join("named.parquet");
    write_parquet(&f, &batch);
    assert!(
        err(&f).contains("'input_ids' not found (columns: tokens)"),
        "{}",
        err(&f)
    );
    let batch = RecordBatch::try_from_iter([("input_ids", ids)]).unwrap();
    let f = dir.path().join("ragged.parquet");
    write_parquet(&f, &batch);
    assert!(
        err(&f).contains("row 1 of 'input_ids' has 2 tokens, earlier rows 3"),
        "{}",
        err(&f)
    );

    let f = dir.path().join("tokens.txt");
    std::fs::write(&f, "1 2 3").unwrap();
    assert!(err(&f).contains("not a token file"));
    assert!(err(&dir.path().join("absent.npy")).contains("no such file"));
}
