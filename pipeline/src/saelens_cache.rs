//! SAELens's activation cache (what its `CacheActivationsRunner` writes and
//! `cached_activations_path` reads): an HF `save_to_disk` directory of Arrow IPC
//! *stream* files `data-XXXXX-of-YYYYY.arrow` plus `dataset_info.json` and `state.json`;
//! one row per sequence, each hook as `Array2D(context_size, d_in)` (stored as
//! `list<list<float>>` with HF's extension type) and `token_ids`.
//!
//! [`SaelensCache`] reads one as an `activations` stream (one record batch per stored
//! batch, a row per token); [`SaelensCacheWriter`] writes one from an `activations`
//! stream of whole sequences.

use crate::stream::{file_err, BatchSink, BatchSource, StreamError};
use arrow_array::cast::AsArray;
use arrow_array::types::Float32Type;
use arrow_array::{Array, ArrayRef, FixedSizeListArray, Int32Array, ListArray, RecordBatch};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use schemas::streams::{columns, meta};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const DATASET_INFO: &str = "dataset_info.json";
pub const STATE: &str = "state.json";
/// The column of token ids SAELens writes.
pub const TOKEN_IDS: &str = "token_ids";
const ARRAY2D: &str = "datasets.features.features.Array2DExtensionType";
const HF_META_KEY: &str = "huggingface";

/// A hook column of a cache: name, context size, width.
#[derive(Clone, Debug, PartialEq)]
struct HookFeature {
    name: String,
    context: usize,
    d: usize,
}

fn read_json(path: &Path) -> Result<Value, StreamError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| file_err(path, format!("not valid JSON: {e}")))
}

/// Whether `dir` is an HF `save_to_disk` directory holding an `Array2D` column.
pub fn is_saelens_cache(dir: &Path) -> bool {
    dir.join(DATASET_INFO).is_file()
        && dir.join(STATE).is_file()
        && read_json(&dir.join(DATASET_INFO)).is_ok_and(|v| {
            v["features"]
                .as_object()
                .is_some_and(|f| f.values().any(|x| x["_type"] == "Array2D"))
        })
}

fn hook_features(dir: &Path, info: &Value) -> Result<Vec<HookFeature>, StreamError> {
    let path = dir.join(DATASET_INFO);
    let features = info["features"]
        .as_object()
        .ok_or_else(|| file_err(&path, "no 'features'"))?;
    let mut hooks = Vec::new();
    for (name, f) in features {
        if f["_type"] != "Array2D" {
            continue;
        }
        if f["dtype"] != "float32" {
            return Err(file_err(
                &path,
                format!(
                    "column '{name}' is Array2D of {}; only float32 caches are read",
                    f["dtype"]
                ),
            ));
        }
        let shape: Vec<usize> = serde_json::from_value(f["shape"].clone()).map_err(|_| {
            file_err(
                &path,
                format!("column '{name}': shape is not [context_size, d_in]"),
            )
        })?;
        let [context, d] = shape[..] else {
            return Err(file_err(
                &path,
                format!("column '{name}': shape {shape:?} is not [context_size, d_in]"),
            ));
        };
        hooks.push(HookFeature {
            name: name.clone(),
            context,
            d,
        });
    }
    if hooks.is_empty() {
        return Err(file_err(&path, "no Array2D activation column"));
    }
    if hooks.iter().any(|h| h.context != hooks[0].context) {
        return Err(file_err(
            &path,
            "its activation columns differ in context_size",
        ));
    }
    Ok(hooks)
}

/// The `activations` schema of a cache with these hooks.
fn stream_schema(dir: &Path, hooks: &[HookFeature]) -> SchemaRef {
    let names: Vec<(String, usize)> = hooks.iter().map(|h| (h.name.clone(), h.d)).collect();
    let model = format!("saelens cache {}", dir.display());
    let s = crate::acts::activations_schema(
        &names,
        &crate::acts::ActsMeta {
            model: &model,
            seqpos_slice: None,
            hook_head_index: None,
        },
    );
    let mut md = s.metadata().clone();
    md.insert(meta::CONTEXT_SIZE.into(), hooks[0].context.to_string());
    Arc::new(s.as_ref().clone().with_metadata(md))
}

/// A SAELens cache read as an `activations` stream.
pub struct SaelensCache {
    dir: PathBuf,
    files: Vec<PathBuf>,
    hooks: Vec<HookFeature>,
    schema: SchemaRef,
    next_file: usize,
    reader: Option<(
        PathBuf,
        arrow_ipc::reader::StreamReader<std::io::BufReader<std::fs::File>>,
    )>,
    position: u64,
    next_seq: u64,
}

impl SaelensCache {
    pub fn open(dir: &Path, position: u64) -> Result<SaelensCache, StreamError> {
        let info = read_json(&dir.join(DATASET_INFO))?;
        let state = read_json(&dir.join(STATE))?;
        let files: Vec<PathBuf> = state["_data_files"]
            .as_array()
            .ok_or_else(|| file_err(&dir.join(STATE), "no '_data_files'"))?
            .iter()
            .map(|f| {
                f["filename"]
                    .as_str()
                    .filter(|n| !n.contains('/') && !n.contains(".."))
                    .map(|n| dir.join(n))
                    .ok_or_else(|| {
                        file_err(
                            &dir.join(STATE),
                            "a '_data_files' entry has no plain filename",
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        if let Some(f) = files.iter().find(|f| !f.is_file()) {
            return Err(file_err(f, format!("listed in {STATE} but missing")));
        }
        let hooks = hook_features(dir, &info)?;
        let mut c = SaelensCache {
            schema: stream_schema(dir, &hooks),
            dir: dir.to_path_buf(),
            files,
            hooks,
            next_file: 0,
            reader: None,
            position: 0,
            next_seq: 0,
        };
        while c.position < position {
            if c.next_batch()?.is_none() {
                return Err(file_err(
                    dir,
                    format!(
                        "cannot start at position {position}: the cache has {} batches",
                        c.position
                    ),
                ));
            }
        }
        Ok(c)
    }

    fn next_stored(&mut self) -> Result<Option<(PathBuf, RecordBatch)>, StreamError> {
        loop {
            if let Some((path, r)) = &mut self.reader {
                match r.next() {
                    Some(b) => {
                        return Ok(Some((
                            path.clone(),
                            b.map_err(|e| file_err(path, e.to_string()))?,
                        )))
                    }
                    None => self.reader = None,
                }
            }
            let Some(path) = self.files.get(self.next_file).cloned() else {
                return Ok(None);
            };
            self.next_file += 1;
            let f = std::fs::File::open(&path).map_err(|e| file_err(&path, e.to_string()))?;
            let r = arrow_ipc::reader::StreamReader::try_new(std::io::BufReader::new(f), None)
                .map_err(|e| file_err(&path, format!("not an Arrow IPC stream: {e}")))?;
            self.reader = Some((path, r));
        }
    }

    /// One stored batch (a row per sequence) as token rows.
    fn convert(&self, path: &Path, b: &RecordBatch) -> Result<RecordBatch, StreamError> {
        let ctx = self.hooks[0].context;
        let n = b.num_rows();
        let mut cols = Vec::new();
        for h in &self.hooks {
            let col = b
                .column_by_name(&h.name)
                .ok_or_else(|| file_err(path, format!("no column '{}'", h.name)))?;
            cols.push(array2d_values(path, &h.name, col, ctx, h.d)?);
        }
        let tok = b
            .column_by_name(TOKEN_IDS)
            .ok_or_else(|| file_err(path, format!("no column '{TOKEN_IDS}'")))?;
        let mut token_id = Vec::with_capacity(n * ctx);
        for r in 0..n {
            let ids = crate::tokens::list_row_ids(path, tok, r)?;
            if ids.len() != ctx {
                return Err(file_err(
                    path,
                    format!("row {r} has {} token ids, context_size is {ctx}", ids.len()),
                ));
            }
            token_id.extend(ids.iter().map(|&t| t as i32));
        }
        let seq: Vec<u64> = (0..n as u64)
            .flat_map(|s| std::iter::repeat_n(self.next_seq + s, ctx))
            .collect();
        let pos: Vec<u32> = (0..n).flat_map(|_| 0..ctx as u32).collect();
        crate::acts::activations_batch(&self.schema, cols, seq, pos, token_id)
    }
}

/// The values of an `Array2D(ctx, d)` column (`list<list<float>>`) as `[rows*ctx, d]`.
fn array2d_values(
    path: &Path,
    name: &str,
    col: &ArrayRef,
    ctx: usize,
    d: usize,
) -> Result<Vec<f32>, StreamError> {
    let bad = |m: String| file_err(path, format!("column '{name}': {m}"));
    let outer = col.as_list_opt::<i32>().ok_or_else(|| {
        bad(format!(
            "is {}, expected list<list<float>>",
            col.data_type()
        ))
    })?;
    let inner = outer
        .values()
        .as_list_opt::<i32>()
        .ok_or_else(|| bad("rows are not lists of lists".into()))?;
    let vals = inner
        .values()
        .as_primitive_opt::<Float32Type>()
        .ok_or_else(|| bad("values are not float32".into()))?;
    if outer.null_count() > 0 || inner.null_count() > 0 || vals.null_count() > 0 {
        return Err(bad("holds nulls".into()));
    }
    let (oo, io, v) = (outer.value_offsets(), inner.value_offsets(), vals.values());
    let mut out = Vec::with_capacity(outer.len() * ctx * d);
    for r in 0..outer.len() {
        let (a, b) = (oo[r] as usize, oo[r + 1] as usize);
        if b - a != ctx {
            return Err(bad(format!(
                "row {r} has {} positions, context_size is {ctx}",
                b - a
            )));
        }
        for j in a..b {
            let (s, e) = (io[j] as usize, io[j + 1] as usize);
            if e - s != d {
                return Err(bad(format!(
                    "a position of row {r} has {} values, d_in is {d}",
                    e - s
                )));
            }
            out.extend_from_slice(&v[s..e]);
        }
    }
    Ok(out)
}

impl BatchSource for SaelensCache {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn position(&self) -> u64 {
        self.position
    }
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, StreamError> {
        let Some((path, b)) = self.next_stored()? else {
            return Ok(None);
        };
        let out = self.convert(&path, &b)?;
        self.next_seq += b.num_rows() as u64;
        self.position += 1;
        Ok(Some(out))
    }
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

/// Writes an `activations` stream of whole sequences as a SAELens cache. The directory
/// is staged and appears complete at [`BatchSink::finish`], or not at all.
pub struct SaelensCacheWriter {
    dir: PathBuf,
    staged: Option<crate::staging::Staged>,
    hooks: Vec<HookFeature>,
    /// The input columns of the hooks.
    hook_cols: Vec<usize>,
    schema: SchemaRef,
    shard_bytes: u64,
    /// Sequences pending for the current shard: per hook values, token ids.
    pending: (Vec<Vec<f32>>, Vec<i32>),
    shards: Vec<PathBuf>,
    hasher: twox_hash::XxHash3_64,
    overwrite: bool,
}

impl SaelensCacheWriter {
    /// `input`: the `activations` schema (float32 hook columns); `context`: the
    /// sequence length.
    pub fn create(
        dir: &Path,
        input: &Schema,
        context: usize,
        shard_bytes: u64,
        overwrite: bool,
    ) -> Result<SaelensCacheWriter, StreamError> {
        if dir.exists() && !overwrite {
            return Err(file_err(
                dir,
                "already exists; pass --overwrite to replace it",
            ));
        }
        let mut hooks = Vec::new();
        let mut hook_cols = Vec::new();
        for (i, f) in input.fields().iter().enumerate() {
            if let DataType::FixedSizeList(item, d) = f.data_type() {
                if item.data_type() != &DataType::Float32 {
                    return Err(file_err(dir, format!("column '{}' is {}; SAELens caches here are written in float32 (--dtype float32)", f.name(), item.data_type())));
                }
                hooks.push(HookFeature {
                    name: f.name().clone(),
                    context,
                    d: *d as usize,
                });
                hook_cols.push(i);
            }
        }
        if hooks.is_empty() {
            return Err(file_err(dir, "the stream has no activation column"));
        }
        let features = features_json(&hooks);
        let hf = py_json(&json!({"info": {"features": features}}));
        let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
        let mut fields: Vec<Field> = hooks
            .iter()
            .map(|h| {
                Field::new(&h.name, list(list(DataType::Float32)), true).with_metadata(
                    [
                        ("ARROW:extension:name".to_string(), ARRAY2D.to_string()),
                        (
                            "ARROW:extension:metadata".to_string(),
                            py_json(&json!([[h.context, h.d], "float32"])),
                        ),
                    ]
                    .into(),
                )
            })
            .collect();
        fields.push(Field::new(
            TOKEN_IDS,
            DataType::FixedSizeList(
                Arc::new(Field::new("item", DataType::Int32, true)),
                context as i32,
            ),
            true,
        ));
        let schema =
            Arc::new(Schema::new(fields).with_metadata([(HF_META_KEY.to_string(), hf)].into()));
        let staged = crate::staging::Staged::dir(dir).map_err(|e| file_err(dir, e.to_string()))?;
        Ok(SaelensCacheWriter {
            dir: dir.to_path_buf(),
            staged: Some(staged),
            pending: (vec![Vec::new(); hooks.len()], Vec::new()),
            hooks,
            hook_cols,
            schema,
            shard_bytes,
            shards: Vec::new(),
            hasher: twox_hash::XxHash3_64::new(),
            overwrite,
        })
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        let ctx = self.hooks[0].context;
        let n = self.pending.1.len() / ctx;
        if n == 0 {
            return Ok(());
        }
        let mut cols: Vec<ArrayRef> = Vec::new();
        for (h, v) in self.hooks.iter().zip(std::mem::take(&mut self.pending.0)) {
            let floats = arrow_array::Float32Array::from(v);
            let inner = ListArray::new(
                Arc::new(Field::new("item", DataType::Float32, true)),
                OffsetBuffer::from_lengths(std::iter::repeat_n(h.d, n * ctx)),
                Arc::new(floats),
                None,
            );
            let outer = ListArray::new(
                Arc::new(Field::new("item", inner.data_type().clone(), true)),
                OffsetBuffer::from_lengths(std::iter::repeat_n(ctx, n)),
                Arc::new(inner),
                None,
            );
            cols.push(Arc::new(outer));
        }
        let tok = Int32Array::from(std::mem::take(&mut self.pending.1));
        cols.push(Arc::new(
            FixedSizeListArray::try_new(
                Arc::new(Field::new("item", DataType::Int32, true)),
                ctx as i32,
                Arc::new(tok),
                None,
            )
            .map_err(|e| file_err(&self.dir, e.to_string()))?,
        ));
        self.pending.0 = vec![Vec::new(); self.hooks.len()];
        let b = RecordBatch::try_new(self.schema.clone(), cols)
            .map_err(|e| file_err(&self.dir, e.to_string()))?;
        let tmp = &self.staged.as_ref().expect("open").tmp;
        let path = tmp.join(format!("shard-{:05}.partial", self.shards.len()));
        let e = |m: String| file_err(&path, m);
        let f = std::fs::File::create(&path).map_err(|x| e(x.to_string()))?;
        let mut w =
            arrow_ipc::writer::StreamWriter::try_new(std::io::BufWriter::new(f), &self.schema)
                .map_err(|x| e(x.to_string()))?;
        w.write(&b).map_err(|x| e(x.to_string()))?;
        w.finish().map_err(|x| e(x.to_string()))?;
        let f = w.into_inner().map_err(|x| e(x.to_string()))?;
        f.into_inner()
            .map_err(|x| e(x.to_string()))?
            .sync_all()
            .map_err(|x| e(x.to_string()))?;
        std::hash::Hasher::write(
            &mut self.hasher,
            path.file_name().unwrap().as_encoded_bytes(),
        );
        std::hash::Hasher::write_u64(
            &mut self.hasher,
            std::fs::metadata(&path).map_or(0, |m| m.len()),
        );
        self.shards.push(path);
        Ok(())
    }
}

/// JSON as Python's `json.dumps` writes it (`", "` and `": "` separators), which is
/// how HF datasets spells the metadata inside its Arrow files.
fn py_json(v: &Value) -> String {
    struct Py;
    impl serde_json::ser::Formatter for Py {
        fn begin_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            self.begin_array_value(w, first)
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
        ) -> std::io::Result<()> {
            w.write_all(b": ")
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Py);
    serde::Serialize::serialize(v, &mut ser).expect("JSON serialises");
    String::from_utf8(out).expect("UTF-8")
}

fn features_json(hooks: &[HookFeature]) -> Value {
    let mut f = serde_json::Map::new();
    for h in hooks {
        f.insert(
            h.name.clone(),
            json!({"shape": [h.context, h.d], "dtype": "float32", "_type": "Array2D"}),
        );
    }
    f.insert(
        TOKEN_IDS.into(),
        json!({"feature": {"dtype": "int32", "_type": "Value"}, "length": hooks[0].context, "_type": "List"}),
    );
    Value::Object(f)
}

impl BatchSink for SaelensCacheWriter {
    fn write(&mut self, b: &RecordBatch) -> Result<(), StreamError> {
        let ctx = self.hooks[0].context;
        let whole = || {
            file_err(
                &self.dir,
                format!("a SAELens cache holds whole sequences of {ctx} tokens: --seqpos-slice and --exclude-special-tokens cannot be used with --format saelens"),
            )
        };
        let pos = b
            .column_by_name(columns::POS)
            .and_then(|c| c.as_primitive_opt::<arrow_array::types::UInt32Type>())
            .ok_or_else(|| file_err(&self.dir, "the stream has no 'pos' column"))?;
        if !b.num_rows().is_multiple_of(ctx)
            || pos
                .values()
                .iter()
                .enumerate()
                .any(|(i, &p)| p as usize != i % ctx)
        {
            return Err(whole());
        }
        for (k, &c) in self.hook_cols.iter().enumerate() {
            let l = b.column(c).as_fixed_size_list();
            let d = self.hooks[k].d;
            self.pending.0[k].extend(crate::source::rows_f32(&self.dir, l, d)?);
        }
        let tok = b
            .column_by_name(columns::TOKEN_ID)
            .and_then(|c| c.as_primitive_opt::<arrow_array::types::Int32Type>())
            .ok_or_else(|| file_err(&self.dir, "the stream has no 'token_id' column"))?;
        self.pending.1.extend_from_slice(tok.values());
        let row_bytes: usize = self.hooks.iter().map(|h| h.d * 4).sum::<usize>() + 4;
        if (self.pending.1.len() * row_bytes) as u64 >= self.shard_bytes {
            self.flush()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        self.flush()?;
        let Some(staged) = self.staged.take() else {
            return Ok(());
        };
        let n = self.shards.len();
        let mut names = Vec::new();
        for (i, p) in self.shards.iter().enumerate() {
            let name = format!("data-{i:05}-of-{n:05}.arrow");
            std::fs::rename(p, staged.tmp.join(&name)).map_err(|e| file_err(p, e.to_string()))?;
            names.push(json!({"filename": name}));
        }
        let info = json!({"citation": "", "description": "", "features": features_json(&self.hooks),
                          "homepage": "", "license": ""});
        let fingerprint = format!("{:016x}", std::hash::Hasher::finish(&self.hasher));
        let state = json!({"_data_files": names, "_fingerprint": fingerprint, "_format_columns": null,
                           "_format_kwargs": {}, "_format_type": null, "_output_all_columns": false,
                           "_split": null});
        let w = |name: &str, v: &Value| {
            std::fs::write(
                staged.tmp.join(name),
                serde_json::to_string_pretty(v).expect("json"),
            )
            .map_err(|e| file_err(&self.dir, e.to_string()))
        };
        w(DATASET_INFO, &info)?;
        w(STATE, &state)?;
        if self.overwrite && self.dir.exists() {
            let old = self
                .dir
                .with_extension(format!("old-{}", std::process::id()));
            std::fs::rename(&self.dir, &old).map_err(|e| file_err(&self.dir, e.to_string()))?;
            staged
                .commit()
                .map_err(|e| file_err(&self.dir, e.to_string()))?;
            std::fs::remove_dir_all(&old).map_err(|e| file_err(&old, e.to_string()))?;
        } else {
            staged
                .commit()
                .map_err(|e| file_err(&self.dir, e.to_string()))?;
        }
        Ok(())
    }
}
