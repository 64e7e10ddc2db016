//! Dataset files → documents: JSONL, Parquet, Arrow IPC (file or stream), HF
//! `save_to_disk` directories, plain text (one document per line, as HF's `text`
//! loader), and directories of such files read in name order.
//!
//! The column is chosen as SAELens's ActivationsStore chooses it: `tokens` or
//! `input_ids` (already tokenized), else `text` or `problem`; `column_name` overrides.

use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use serde_json::Value;
use std::fs::File;
use std::path::{Path, PathBuf};

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

fn err(path: &Path, message: impl std::fmt::Display) -> SourceError {
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

/// Reads every document of `path` (a file or a directory).
pub fn read_documents(path: &Path, column_name: Option<&str>) -> Result<Documents, SourceError> {
    if !path.exists() {
        return Err(err(path, "no such file or directory"));
    }
    let files = files_of(path)?;
    let mut out: Option<Documents> = None;
    for f in &files {
        let docs = read_file(f, column_name)?;
        out = Some(match (out, docs) {
            (None, d) => d,
            (Some(Documents::Text(mut a)), Documents::Text(b)) => {
                a.extend(b);
                Documents::Text(a)
            }
            (Some(Documents::Tokens(mut a)), Documents::Tokens(b)) => {
                a.extend(b);
                Documents::Tokens(a)
            }
            _ => {
                return Err(err(
                    f,
                    "mixes text and token columns with the files before it",
                ))
            }
        });
    }
    match out {
        Some(d) if !d.is_empty() => Ok(d),
        _ => Err(SourceError::Empty {
            path: path.to_path_buf(),
        }),
    }
}

/// The data files of a path: itself, the files an HF `save_to_disk` directory lists in
/// `state.json`, or the dataset files of a directory in name order.
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
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| err(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && kind(p).is_some())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(err(
            path,
            "no dataset files (.jsonl, .json, .parquet, .arrow, .txt) in this directory",
        ));
    }
    Ok(files)
}

fn kind(p: &Path) -> Option<&'static str> {
    match p.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "jsonl" | "json" | "ndjson" => Some("jsonl"),
        "parquet" => Some("parquet"),
        "arrow" | "ipc" | "feather" => Some("arrow"),
        "txt" | "text" => Some("text"),
        _ => None,
    }
}

fn read_file(path: &Path, column_name: Option<&str>) -> Result<Documents, SourceError> {
    match kind(path) {
        Some("jsonl") => jsonl(path, column_name),
        Some("text") => {
            let text = std::fs::read_to_string(path).map_err(|e| err(path, e))?;
            Ok(Documents::Text(text.lines().map(str::to_string).collect()))
        }
        Some("parquet") => {
            use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
            let f = File::open(path).map_err(|e| err(path, e))?;
            let batches: Vec<RecordBatch> = ParquetRecordBatchReaderBuilder::try_new(f)
                .and_then(|b| b.build())
                .map_err(|e| err(path, format!("not a readable Parquet file: {e}")))?
                .collect::<Result<_, _>>()
                .map_err(|e| err(path, e))?;
            from_batches(path, &batches, column_name)
        }
        Some("arrow") => {
            let f = File::open(path).map_err(|e| err(path, e))?;
            // Arrow IPC file, or the stream format HF `save_to_disk` writes.
            let batches: Vec<RecordBatch> = match arrow_ipc::reader::FileReader::try_new(f, None) {
                Ok(r) => r.collect::<Result<_, _>>().map_err(|e| err(path, e))?,
                Err(_) => {
                    let f = File::open(path).map_err(|e| err(path, e))?;
                    arrow_ipc::reader::StreamReader::try_new(f, None)
                        .map_err(|e| {
                            err(
                                path,
                                format!("not a readable Arrow IPC file or stream: {e}"),
                            )
                        })?
                        .collect::<Result<_, _>>()
                        .map_err(|e| err(path, e))?
                }
            };
            from_batches(path, &batches, column_name)
        }
        _ => Err(err(
            path,
            "not a dataset file: expected .jsonl/.json, .parquet, .arrow or .txt",
        )),
    }
}

/// SAELens's column choice among `present`.
fn choose(
    path: &Path,
    present: &[String],
    column_name: Option<&str>,
) -> Result<String, SourceError> {
    let wanted: Vec<&str> = match column_name {
        Some(c) => vec![c],
        None => vec!["tokens", "input_ids", "text", "problem"],
    };
    wanted
        .iter()
        .find(|w| present.iter().any(|p| p == *w))
        .map(|w| w.to_string())
        .ok_or_else(|| SourceError::MissingColumn {
            path: path.to_path_buf(),
            column: wanted.join("' / '"),
            present: present.join(", "),
        })
}

fn jsonl(path: &Path, column_name: Option<&str>) -> Result<Documents, SourceError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, e))?;
    let mut column: Option<String> = None;
    let (mut texts, mut tokens) = (Vec::new(), Vec::new());
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line)
            .map_err(|e| err(path, format!("line {}: not JSON: {e}", i + 1)))?;
        let obj = v
            .as_object()
            .ok_or_else(|| err(path, format!("line {}: not a JSON object", i + 1)))?;
        let col = match &column {
            Some(c) => c.clone(),
            None => {
                let present: Vec<String> = obj.keys().cloned().collect();
                let c = choose(path, &present, column_name)?;
                column = Some(c.clone());
                c
            }
        };
        let cell = obj
            .get(&col)
            .ok_or_else(|| err(path, format!("line {}: no '{col}'", i + 1)))?;
        match cell {
            Value::String(s) => texts.push(s.clone()),
            Value::Array(a) => tokens.push(
                a.iter()
                    .map(|t| t.as_u64().map(|t| t as u32))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| {
                        err(
                            path,
                            format!("line {}: '{col}' is not a list of token ids", i + 1),
                        )
                    })?,
            ),
            _ => {
                return Err(err(
                    path,
                    format!(
                        "line {}: '{col}' is neither text nor a list of token ids",
                        i + 1
                    ),
                ))
            }
        }
    }
    match (texts.is_empty(), tokens.is_empty()) {
        (false, false) => Err(err(path, "mixes text and token lists in one column")),
        (true, false) => Ok(Documents::Tokens(tokens)),
        _ => Ok(Documents::Text(texts)),
    }
}

fn from_batches(
    path: &Path,
    batches: &[RecordBatch],
    column_name: Option<&str>,
) -> Result<Documents, SourceError> {
    let Some(first) = batches.first() else {
        return Ok(Documents::Text(Vec::new()));
    };
    let present: Vec<String> = first
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let col = choose(path, &present, column_name)?;
    let mut texts = Vec::new();
    let mut tokens = Vec::new();
    for b in batches {
        let a = b.column_by_name(&col).unwrap();
        match a.data_type() {
            DataType::Utf8 => texts.extend(
                a.as_string::<i32>()
                    .iter()
                    .map(|s| s.unwrap_or("").to_string()),
            ),
            DataType::LargeUtf8 => texts.extend(
                a.as_string::<i64>()
                    .iter()
                    .map(|s| s.unwrap_or("").to_string()),
            ),
            DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(_, _) => {
                for r in 0..a.len() {
                    let row =
                        pipeline::tokens::list_row_ids(path, a, r).map_err(|e| err(path, e))?;
                    let row: Option<Vec<u32>> =
                        row.into_iter().map(|t| u32::try_from(t).ok()).collect();
                    tokens.push(row.ok_or_else(|| {
                        err(
                            path,
                            format!("column '{col}' holds a negative or too large token id"),
                        )
                    })?);
                }
            }
            other => {
                return Err(err(
                    path,
                    format!("column '{col}' is {other}: expected strings or lists of token ids"),
                ))
            }
        }
    }
    Ok(if tokens.is_empty() {
        Documents::Text(texts)
    } else {
        Documents::Tokens(tokens)
    })
}
