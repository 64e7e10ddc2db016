//! Datasets → record batches → documents, with bounded memory: JSONL, CSV, Parquet,
//! Arrow IPC (file or stream), HF `save_to_disk` directories, plain text (one document
//! per line, as HF's `text` loader), directories of such files read in name order, and
//! globs. Each file is read a batch at a time.
//!
//! The column is chosen as SAELens's ActivationsStore chooses it: `tokens` or
//! `input_ids` (already tokenized), else `text` or `problem`; `column_name` overrides.

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch, RecordBatchReader, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use serde_json::Value;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Rows per record batch read from a file.
pub const BATCH_ROWS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("{}: column '{column}' not found (columns: {present})", path.display())]
    MissingColumn {
        path: PathBuf,
        column: String,
        present: String,
    },
    #[error("{}: no documents", path.display())]
    Empty { path: PathBuf },
}

pub(crate) fn err(path: &Path, message: impl std::fmt::Display) -> SourceError {
    SourceError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Documents as text, or already tokenized.
#[derive(Clone, Debug, PartialEq)]
pub enum Documents {
    Text(Vec<String>),
    Tokens(Vec<Vec<u32>>),
}

impl Documents {
    pub fn len(&self) -> usize {
        match self {
            Documents::Text(v) => v.len(),
            Documents::Tokens(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A dataset's files, resolved but not yet read.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// As the user named it (a file, directory or glob).
    pub spec: PathBuf,
    pub files: Vec<PathBuf>,
    /// JSON-lines schemas already inferred (inference reads the whole file).
    inferred: Arc<Mutex<HashMap<PathBuf, SchemaRef>>>,
}

/// A stream of record batches, each with the file it came from.
pub type Batches = Box<dyn Iterator<Item = Result<(PathBuf, RecordBatch), SourceError>> + Send>;
type FileBatches = Box<dyn Iterator<Item = Result<RecordBatch, SourceError>> + Send>;

impl Dataset {
    /// Resolves a file, a directory (HF `save_to_disk` or a folder of dataset files), or
    /// a glob such as `data/*.parquet`.
    pub fn open(spec: &Path) -> Result<Dataset, SourceError> {
        let text = spec.to_string_lossy();
        let files = if spec.exists() {
            files_of(spec)?
        } else if text.contains(['*', '?', '[']) {
            let mut files: Vec<PathBuf> = glob::glob(&text)
                .map_err(|e| err(spec, format!("not a valid glob: {e}")))?
                .filter_map(Result::ok)
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            if let Some(f) = files.iter().find(|f| kind(f).is_none()) {
                return Err(err(f, "matched by the glob but not a dataset file (.jsonl, .json, .csv, .parquet, .arrow, .txt)"));
            }
            if files.is_empty() {
                return Err(err(spec, "the glob matches no files"));
            }
            files
        } else {
            return Err(err(spec, "no such file or directory"));
        };
        Ok(Dataset {
            spec: spec.to_path_buf(),
            files,
            inferred: Default::default(),
        })
    }

    /// The directory the dataset lives in (where `sae_lens.json` would be).
    pub fn home(&self) -> PathBuf {
        if self.spec.is_dir() {
            self.spec.clone()
        } else {
            self.files[0]
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default()
        }
    }

    /// The first file's schema (every file is expected to hold the chosen column).
    pub fn schema(&self) -> Result<SchemaRef, SourceError> {
        Ok(open_file(&self.files[0], &self.inferred)?.0)
    }

    /// Every record batch of every file, in order, one file open at a time.
    pub fn batches(&self) -> Batches {
        let (files, inferred) = (self.files.clone(), self.inferred.clone());
        Box::new(files.into_iter().flat_map(move |f| {
            let it: Box<dyn Iterator<Item = _> + Send> = match open_file(&f, &inferred) {
                Ok((_, batches)) => Box::new(batches.map(move |b| b.map(|b| (f.clone(), b)))),
                Err(e) => Box::new(std::iter::once(Err(e))),
            };
            it
        }))
    }
}

/// The data files of an existing path: itself, the files an HF `save_to_disk`
/// directory lists in `state.json`, or the dataset files of a directory in name order.
fn files_of(path: &Path) -> Result<Vec<PathBuf>, SourceError> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let state = path.join("state.json");
    if state.is_file() {
        let v: Value = std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .ok_or_else(|| err(&state, "not readable JSON"))?;
        let files: Vec<PathBuf> = v["_data_files"]
            .as_array()
            .ok_or_else(|| err(&state, "no _data_files list"))?
            .iter()
            .filter_map(|f| f["filename"].as_str())
            .map(|f| path.join(f))
            .collect();
        if files.is_empty() {
            return Err(err(&state, "lists no data files"));
        }
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| err(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && kind(p).is_some() && !is_metadata(p))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(err(
            path,
            "no dataset files (.jsonl, .json, .csv, .parquet, .arrow, .txt) in this directory",
        ));
    }
    Ok(files)
}

/// Files beside a dataset's data that describe it (SAELens's and HF's) or are hidden.
fn is_metadata(p: &Path) -> bool {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    name.starts_with(['.', '_'])
        || [
            schemas::tokens::METADATA_FILE,
            "dataset_info.json",
            "dataset_dict.json",
            "state.json",
        ]
        .contains(&name.as_ref())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Jsonl,
    Csv,
    Parquet,
    Arrow,
    Text,
}

fn kind(p: &Path) -> Option<Kind> {
    match p.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "jsonl" | "json" | "ndjson" => Some(Kind::Jsonl),
        "csv" => Some(Kind::Csv),
        "parquet" => Some(Kind::Parquet),
        "arrow" | "ipc" | "feather" => Some(Kind::Arrow),
        "txt" | "text" => Some(Kind::Text),
        _ => None,
    }
}

fn open(path: &Path) -> Result<File, SourceError> {
    File::open(path).map_err(|e| err(path, e))
}

/// Opens one file: its schema and a reader of its record batches.
fn open_file(
    path: &Path,
    inferred: &Mutex<HashMap<PathBuf, SchemaRef>>,
) -> Result<(SchemaRef, FileBatches), SourceError> {
    let p = path.to_path_buf();
    let wrap = move |e: arrow_schema::ArrowError| err(&p, e);
    match kind(path) {
        Some(Kind::Jsonl) => {
            let known = inferred.lock().unwrap().get(path).cloned();
            let schema = match known {
                Some(s) => s,
                None => {
                    let s = Arc::new(jsonl_schema(path)?);
                    inferred
                        .lock()
                        .unwrap()
                        .insert(path.to_path_buf(), s.clone());
                    s
                }
            };
            let reader = arrow_json::ReaderBuilder::new(schema.clone())
                .with_batch_size(BATCH_ROWS)
                .build(BufReader::new(open(path)?))
                .map_err(wrap.clone())?;
            let (p, s) = (path.to_path_buf(), schema.clone());
            let wrap = move |e| err(&p, jsonl_error_at(&p, &s, e));
            Ok((schema, Box::new(reader.map(move |b| b.map_err(&wrap)))))
        }
        Some(Kind::Csv) => {
            let mut f = open(path)?;
            let format = arrow_csv::reader::Format::default().with_header(true);
            let (inferred, _) = format
                .infer_schema(&mut f, Some(0))
                .map_err(|e| err(path, format!("not a readable CSV file: {e}")))?;
            // Every column as text: a column of numbers-looking documents stays text.
            let fields: Vec<Field> = inferred
                .fields()
                .iter()
                .map(|f| Field::new(f.name(), DataType::Utf8, true))
                .collect();
            let schema = Arc::new(Schema::new(fields));
            f.rewind().map_err(|e| err(path, e))?;
            let reader = arrow_csv::ReaderBuilder::new(schema.clone())
                .with_format(format)
                .with_batch_size(BATCH_ROWS)
                .build(f)
                .map_err(wrap.clone())?;
            Ok((schema, Box::new(reader.map(move |b| b.map_err(&wrap)))))
        }
        Some(Kind::Parquet) => {
            use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
            let reader = ParquetRecordBatchReaderBuilder::try_new(open(path)?)
                .and_then(|b| b.with_batch_size(BATCH_ROWS).build())
                .map_err(|e| err(path, format!("not a readable Parquet file: {e}")))?;
            Ok((
                reader.schema(),
                Box::new(reader.map(move |b| b.map_err(&wrap))),
            ))
        }
        Some(Kind::Arrow) => {
            // Arrow IPC file, or the stream format HF `save_to_disk` writes.
            match arrow_ipc::reader::FileReader::try_new(open(path)?, None) {
                Ok(r) => Ok((r.schema(), Box::new(r.map(move |b| b.map_err(&wrap))))),
                Err(_) => {
                    let r = arrow_ipc::reader::StreamReader::try_new(open(path)?, None).map_err(
                        |e| {
                            err(
                                path,
                                format!("not a readable Arrow IPC file or stream: {e}"),
                            )
                        },
                    )?;
                    Ok((r.schema(), Box::new(r.map(move |b| b.map_err(&wrap)))))
                }
            }
        }
        Some(Kind::Text) => {
            let schema = Arc::new(Schema::new(vec![Field::new("text", DataType::Utf8, false)]));
            let mut lines = BufReader::new(open(path)?).lines();
            let (s, p) = (schema.clone(), path.to_path_buf());
            let chunks = std::iter::from_fn(move || {
                let chunk: Result<Vec<String>, _> = lines.by_ref().take(BATCH_ROWS).collect();
                match chunk {
                    Err(e) => Some(Err(err(&p, e))),
                    Ok(c) if c.is_empty() => None,
                    Ok(c) => {
                        let col: ArrayRef = Arc::new(StringArray::from(c));
                        Some(RecordBatch::try_new(s.clone(), vec![col]).map_err(|e| err(&p, e)))
                    }
                }
            });
            Ok((schema, Box::new(chunks)))
        }
        None => Err(err(
            path,
            "not a dataset file: expected .jsonl/.json, .csv, .parquet, .arrow or .txt",
        )),
    }
}

/// A JSON-lines file's schema, inferred from every line; a bad line is named.
fn jsonl_schema(path: &Path) -> Result<Schema, SourceError> {
    let mut failure: Option<SourceError> = None;
    let lines = BufReader::new(open(path)?).lines().enumerate();
    let values = lines
        .filter(|(_, l)| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(|(i, line)| {
            let line = line.map_err(|e| e.to_string())?;
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| format!("line {}: not JSON: {e}", i + 1))?;
            if v.is_object() {
                Ok(v)
            } else {
                Err(format!(
                    "line {}: not a JSON object (expected JSON Lines: one object per line)",
                    i + 1
                ))
            }
        })
        .map_while(|r| match r {
            Ok(v) => Some(Ok(v)),
            Err(m) => {
                failure = Some(err(path, m));
                None
            }
        });
    let schema =
        arrow_json::reader::infer_json_schema_from_iterator(values).map_err(|e| err(path, e));
    match failure {
        Some(f) => Err(f),
        None => schema,
    }
}

/// A JSON-lines decode error with its line (the decoder names the field, not where):
/// the lines are decoded one by one until one fails.
fn jsonl_error_at(path: &Path, schema: &SchemaRef, e: arrow_schema::ArrowError) -> String {
    let Ok(f) = File::open(path) else {
        return e.to_string();
    };
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let Ok(mut one) = arrow_json::ReaderBuilder::new(schema.clone()).build_decoder() else {
            break;
        };
        if one
            .decode(line.as_bytes())
            .and_then(|_| one.flush())
            .is_err()
        {
            return format!("line {}: {e}", i + 1);
        }
    }
    e.to_string()
}

/// SAELens's column choice among the schema's columns.
pub fn choose_column(
    path: &Path,
    schema: &Schema,
    column_name: Option<&str>,
) -> Result<String, SourceError> {
    let present: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let wanted: Vec<&str> = match column_name {
        Some(c) => vec![c],
        None => vec!["tokens", "input_ids", "text", "problem"],
    };
    wanted
        .iter()
        .find(|w| present.contains(w))
        .map(|w| w.to_string())
        .ok_or_else(|| SourceError::MissingColumn {
            path: path.to_path_buf(),
            column: wanted.join("' / '"),
            present: present.join(", "),
        })
}

fn is_token_column(t: &DataType) -> bool {
    matches!(
        t,
        DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(_, _)
    )
}

/// Documents of a record-batch stream: the chosen column of each batch.
pub struct DocumentStream {
    batches: Batches,
    column: String,
    tokenized: bool,
}

impl DocumentStream {
    /// `schema` is the stream's (the first file's, or a query's result).
    pub fn new(
        batches: Batches,
        schema: &Schema,
        origin: &Path,
        column_name: Option<&str>,
    ) -> Result<DocumentStream, SourceError> {
        if schema.fields().is_empty() {
            return Err(SourceError::Empty {
                path: origin.to_path_buf(),
            });
        }
        let column = choose_column(origin, schema, column_name)?;
        let t = schema.field_with_name(&column).unwrap().data_type();
        if !is_token_column(t) && !matches!(t, DataType::Utf8 | DataType::LargeUtf8) {
            return Err(err(
                origin,
                format!("column '{column}' is {t}: expected strings or lists of token ids"),
            ));
        }
        Ok(DocumentStream {
            batches,
            tokenized: is_token_column(t),
            column,
        })
    }

    /// The documents of a dataset (no query).
    pub fn of(dataset: &Dataset, column_name: Option<&str>) -> Result<Self, SourceError> {
        Self::new(
            dataset.batches(),
            dataset.schema()?.as_ref(),
            &dataset.files[0],
            column_name,
        )
    }

    /// The chosen column.
    pub fn column(&self) -> &str {
        &self.column
    }

    /// Whether the column holds token ids rather than text.
    pub fn is_tokenized(&self) -> bool {
        self.tokenized
    }
}

impl Iterator for DocumentStream {
    type Item = Result<Documents, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (path, batch) = match self.batches.next()? {
                Ok(x) => x,
                Err(e) => return Some(Err(e)),
            };
            if batch.num_rows() == 0 {
                continue;
            }
            return Some(documents(&path, &batch, &self.column, self.tokenized));
        }
    }
}

fn documents(
    path: &Path,
    batch: &RecordBatch,
    col: &str,
    tokenized: bool,
) -> Result<Documents, SourceError> {
    let a = batch.column_by_name(col).ok_or_else(|| {
        let present: Vec<&str> = batch
            .schema_ref()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        SourceError::MissingColumn {
            path: path.to_path_buf(),
            column: col.to_string(),
            present: present.join(", "),
        }
    })?;
    let mismatch = || {
        err(
            path,
            format!(
                "column '{col}' is {} here but {} in the files before",
                a.data_type(),
                if tokenized { "token ids" } else { "text" }
            ),
        )
    };
    if tokenized != is_token_column(a.data_type()) {
        return Err(mismatch());
    }
    match a.data_type() {
        // A missing text is an empty document, as an empty string would be.
        DataType::Utf8 => Ok(Documents::Text(
            a.as_string::<i32>()
                .iter()
                .map(|s| s.unwrap_or("").to_string())
                .collect(),
        )),
        DataType::LargeUtf8 => Ok(Documents::Text(
            a.as_string::<i64>()
                .iter()
                .map(|s| s.unwrap_or("").to_string())
                .collect(),
        )),
        t if is_token_column(t) => {
            let mut rows = Vec::with_capacity(a.len());
            for r in 0..a.len() {
                let row = pipeline::tokens::list_row_ids(path, a, r).map_err(|e| err(path, e))?;
                let row: Option<Vec<u32>> =
                    row.into_iter().map(|t| u32::try_from(t).ok()).collect();
                rows.push(row.ok_or_else(|| {
                    err(
                        path,
                        format!("column '{col}' holds a negative or too large token id"),
                    )
                })?);
            }
            Ok(Documents::Tokens(rows))
        }
        _ => Err(mismatch()),
    }
}

/// Reads every document of a dataset into memory (small datasets, tests, the bench).
pub fn read_documents(path: &Path, column_name: Option<&str>) -> Result<Documents, SourceError> {
    let dataset = Dataset::open(path)?;
    let stream = DocumentStream::of(&dataset, column_name)?;
    let mut out = if stream.is_tokenized() {
        Documents::Tokens(Vec::new())
    } else {
        Documents::Text(Vec::new())
    };
    for docs in stream {
        match (&mut out, docs?) {
            (Documents::Text(a), Documents::Text(b)) => a.extend(b),
            (Documents::Tokens(a), Documents::Tokens(b)) => a.extend(b),
            _ => unreachable!("a stream's documents are all of one kind"),
        }
    }
    if out.is_empty() {
        return Err(SourceError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// Documents through a seeded shuffle buffer (the scheme of HF's streaming
/// `shuffle(seed, buffer_size)`): the buffer fills, then each new document takes the
/// place of a random one, which comes out; at the end the rest come out shuffled. Memory
/// is bounded by the buffer; the order is the same for the same seed.
pub struct ShuffledDocuments {
    inner: DocumentStream,
    buffer: Documents,
    size: usize,
    rng: rand_chacha::ChaCha8Rng,
    done: bool,
}

impl ShuffledDocuments {
    pub fn new(inner: DocumentStream, buffer_size: usize, seed: u64) -> ShuffledDocuments {
        use rand::SeedableRng;
        let buffer = if inner.is_tokenized() {
            Documents::Tokens(Vec::new())
        } else {
            Documents::Text(Vec::new())
        };
        ShuffledDocuments {
            inner,
            buffer,
            size: buffer_size.max(1),
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            done: false,
        }
    }
}

/// Feeds `incoming` through the buffer `buf` of capacity `size`; what leaves is returned.
fn exchange<T>(
    buf: &mut Vec<T>,
    incoming: Vec<T>,
    size: usize,
    rng: &mut impl rand::Rng,
) -> Vec<T> {
    let mut out = Vec::new();
    for item in incoming {
        if buf.len() < size {
            buf.push(item);
        } else {
            let i = rng.random_range(0..size);
            out.push(std::mem::replace(&mut buf[i], item));
        }
    }
    out
}

impl Iterator for ShuffledDocuments {
    type Item = Result<Documents, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        use rand::seq::SliceRandom;
        while !self.done {
            let out = match (self.inner.next(), &mut self.buffer) {
                (None, _) => {
                    self.done = true;
                    break;
                }
                (Some(Err(e)), _) => return Some(Err(e)),
                (Some(Ok(Documents::Text(t))), Documents::Text(b)) => {
                    Documents::Text(exchange(b, t, self.size, &mut self.rng))
                }
                (Some(Ok(Documents::Tokens(t))), Documents::Tokens(b)) => {
                    Documents::Tokens(exchange(b, t, self.size, &mut self.rng))
                }
                _ => unreachable!("a stream's documents are all of one kind"),
            };
            if !out.is_empty() {
                return Some(Ok(out));
            }
        }
        let rest = match &mut self.buffer {
            Documents::Text(b) => {
                b.shuffle(&mut self.rng);
                Documents::Text(std::mem::take(b))
            }
            Documents::Tokens(b) => {
                b.shuffle(&mut self.rng);
                Documents::Tokens(std::mem::take(b))
            }
        };
        (!rest.is_empty()).then_some(Ok(rest))
    }
}
