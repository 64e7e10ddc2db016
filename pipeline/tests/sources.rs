//! Activation sources and batches on small files written here.

use arrow_array::{FixedSizeListArray, Float32Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use pipeline::{open, Batches};
use std::path::Path;
use std::sync::Arc;

const D: usize = 4;

fn rows(n: usize, start: usize) -> Vec<f32> {
    (0..n * D).map(|i| (start * D + i) as f32).collect()
}

fn batch(vals: &[f32], hook: &str) -> RecordBatch {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let list = FixedSizeListArray::try_new(
        item.clone(),
        D as i32,
        Arc::new(Float32Array::from(vals.to_vec())),
        None,
    )
    .unwrap();
    let n = vals.len() / D;
    let seq = Int64Array::from((0..n as i64).collect::<Vec<_>>());
    let schema = Schema::new(vec![
        Field::new("seq", DataType::Int64, false),
        Field::new(hook, DataType::FixedSizeList(item, D as i32), false),
    ]);
    RecordBatch::try_new(Arc::new(schema), vec![Arc::new(seq), Arc::new(list)]).unwrap()
}

fn write_ipc(path: &Path, batches: &[RecordBatch]) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = arrow_ipc::writer::FileWriter::try_new(f, &batches[0].schema()).unwrap();
    for b in batches {
        w.write(b).unwrap();
    }
    w.finish().unwrap();
}

fn write_parquet(path: &Path, batches: &[RecordBatch]) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batches[0].schema(), None).unwrap();
    for b in batches {
        w.write(b).unwrap();
    }
    w.close().unwrap();
}

fn write_safetensors(path: &Path, name: &str, vals: &[f32], shape: Vec<usize>) {
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes).unwrap();
    let data = safetensors::serialize([(name, view)], None).unwrap();
    std::fs::write(path, data).unwrap();
}

fn read_all(spec: &str, column: Option<&str>) -> Vec<f32> {
    let mut s = open(spec, column).unwrap();
    let mut out = Vec::new();
    while let Some(c) = s.next_chunk().unwrap() {
        out.extend(c);
    }
    out
}

#[test]
fn every_format_reads_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (rows(5, 0), rows(7, 5));
    let hook = "blocks.0.hook_resid_pre";
    let ipc = dir.path().join("a.arrow");
    write_ipc(&ipc, &[batch(&a, hook), batch(&b, hook)]);
    let pq = dir.path().join("a.parquet");
    write_parquet(&pq, &[batch(&a, hook), batch(&b, hook)]);
    let st = dir.path().join("a.safetensors");
    let all: Vec<f32> = a.iter().chain(&b).copied().collect();
    write_safetensors(&st, "acts", &all, vec![12, D]);
    for p in [&ipc, &pq, &st] {
        assert_eq!(
            read_all(p.to_str().unwrap(), Some(hook).filter(|_| p != &st)),
            all,
            "{}",
            p.display()
        );
        // without a column name the only list column is used
        assert_eq!(read_all(p.to_str().unwrap(), None), all);
    }
    assert_eq!(read_all(&format!("{}:acts", st.display()), None), all);
    // a directory of shards, read in name order
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    write_parquet(&shards.join("001.parquet"), &[batch(&b, hook)]);
    write_ipc(&shards.join("000.arrow"), &[batch(&a, hook)]);
    std::fs::write(shards.join("manifest.json"), "{}").unwrap(); // ignored
    assert_eq!(read_all(shards.to_str().unwrap(), Some(hook)), all);
}

#[test]
fn clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = |spec: &str, col: Option<&str>| open(spec, col).err().expect(spec).to_string();
    let hook = "blocks.0.hook_resid_pre";
    let ipc = dir.path().join("a.arrow");
    write_ipc(&ipc, &[batch(&rows(3, 0), hook)]);
    let s = ipc.to_str().unwrap();
    let msg = e(s, Some("blocks.1.hook_resid_pre"));
    assert!(
        msg.contains("'blocks.1.hook_resid_pre' not found")
            && msg.contains("seq, blocks.0.hook_resid_pre"),
        "{msg}"
    );
    let msg = e(s, Some("seq"));
    assert!(msg.contains("column 'seq' is Int64"), "{msg}");
    assert!(e("/no/such.parquet", None).contains("no such file"));
    let txt = dir.path().join("a.csv");
    std::fs::write(&txt, "1,2").unwrap();
    assert!(e(txt.to_str().unwrap(), None).contains("not an activation file"));
    // corrupt and truncated files
    let bad = dir.path().join("bad.parquet");
    std::fs::write(&bad, b"PAR1 this is not parquet").unwrap();
    assert!(e(bad.to_str().unwrap(), None).contains("not a readable Parquet file"));
    let good = std::fs::read(&ipc).unwrap();
    let cut = dir.path().join("cut.arrow");
    std::fs::write(&cut, &good[..good.len() / 2]).unwrap();
    assert!(e(cut.to_str().unwrap(), None).contains("not a readable Arrow IPC file"));
    let st = dir.path().join("e.safetensors");
    write_safetensors(&st, "acts", &[], vec![0, D]);
    assert!(e(st.to_str().unwrap(), None).contains("no rows"));
    write_safetensors(&st, "acts", &[1.0; 4], vec![4]);
    assert!(e(st.to_str().unwrap(), None).contains("[n, d_in]"));
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(e(empty.to_str().unwrap(), None).contains("no activation shards"));
    // shards of different widths
    let mixed = dir.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    write_safetensors(&mixed.join("0.safetensors"), "a", &[0.0; 8], vec![2, 4]);
    write_safetensors(&mixed.join("1.safetensors"), "a", &[0.0; 6], vec![2, 3]);
    let mut src = open(mixed.to_str().unwrap(), None).unwrap();
    src.next_chunk().unwrap();
    let msg = src.next_chunk().unwrap_err().to_string();
    assert!(msg.contains("width 3") && msg.contains("width 4"), "{msg}");
}

#[test]
fn batches_in_order_and_shuffled() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("a.safetensors");
    let n = 103;
    write_safetensors(&st, "acts", &rows(n, 0), vec![n, D]);
    let spec = st.to_str().unwrap();
    let collect = |shuffle: bool, seed: u64| {
        let mut b = Batches::new(open(spec, None).unwrap(), 10, shuffle, 4, seed);
        let mut out = vec![];
        while let Some(x) = b.next_batch().unwrap() {
            assert_eq!(x.len(), 10 * D);
            out.push(x);
        }
        out
    };
    // file order, partial last batch dropped
    let plain = collect(false, 0);
    assert_eq!(plain.len(), 10);
    assert_eq!(plain.concat(), rows(100, 0));
    // shuffled: deterministic per seed, a permutation of whole rows
    let s1 = collect(true, 7);
    assert_eq!(s1, collect(true, 7));
    assert_ne!(s1, collect(true, 8));
    assert_ne!(s1.concat(), rows(100, 0));
    let mut firsts: Vec<u32> = s1
        .concat()
        .chunks(D)
        .map(|r| {
            assert!(r.windows(2).all(|w| w[1] == w[0] + 1.0), "rows stay whole");
            r[0] as u32 / D as u32
        })
        .collect();
    assert_eq!(firsts.len(), 100);
    firsts.sort();
    firsts.dedup();
    assert_eq!(firsts.len(), 100, "no row served twice");
    // each served row knows its row in the file (row r holds r*D, r*D+1, ...)
    for shuffle in [false, true] {
        let mut b = Batches::new(open(spec, None).unwrap(), 10, shuffle, 4, 7);
        while let Some(x) = b.next_batch().unwrap() {
            let at: Vec<u64> = x.chunks(D).map(|r| r[0] as u64 / D as u64).collect();
            assert_eq!(b.last_rows(), at.as_slice(), "shuffle {shuffle}");
        }
    }
    // skipping k batches then reading gives the same as reading all
    let mut b = Batches::new(open(spec, None).unwrap(), 10, true, 4, 7);
    b.skip(3).unwrap();
    assert_eq!(b.next_batch().unwrap().unwrap(), s1[3]);
    assert_eq!(b.served, 4);
}

#[test]
fn shard_directories_are_activation_sources() {
    use arrow_array::Array;
    use pipeline::shards::{ShardOptions, ShardWriter};
    use pipeline::{BatchSink, BatchSource};
    let dir = tempfile::tempdir().unwrap();
    let spec = "activations?batches=5&rows=7&d=4&hooks=2";
    let mut src = pipeline::synthetic::Synthetic::open(spec, 0).unwrap();
    let out = dir.path().join("cache");
    let mut w = ShardWriter::create(&out, src.schema(), ShardOptions::default()).unwrap();
    let mut want = Vec::new();
    let hook = "blocks.1.hook_resid_pre";
    while let Some(b) = src.next_batch().unwrap() {
        let col = b.column_by_name(hook).unwrap();
        let list = col.as_any().downcast_ref::<FixedSizeListArray>().unwrap();
        want.extend(pipeline::source::rows_f32(Path::new("x"), list, D).unwrap());
        w.write(&b).unwrap();
    }
    w.finish().unwrap();
    assert_eq!(read_all(out.to_str().unwrap(), Some(hook)), want);
    // two hook columns: the hook must be named
    let e = open(out.to_str().unwrap(), None).err().unwrap().to_string();
    assert!(
        e.contains("2 activation columns") && e.contains("hook_name"),
        "{e}"
    );
}
