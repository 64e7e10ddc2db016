//! Activation files: one `[n, d_in]` stream of f32 rows from a safetensors tensor, an
//! Arrow IPC file, a Parquet file (a `FixedSizeList<Float32 | Float16>[d_in]` column,
//! named by the hook), or a directory of such shards read in name order.

use arrow_array::{Array, FixedSizeListArray, Float16Array, Float32Array, RecordBatch};
use arrow_schema::{DataType, Schema};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Rows per chunk read from a safetensors tensor.
const CHUNK_ROWS: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("{}: activation column '{column}' not found (columns: {present})", path.display())]
    MissingColumn {
        path: PathBuf,
        column: String,
        present: String,
    },
    #[error("{}: rows of width {got}, but earlier shards have width {want}", path.display())]
    Width {
        path: PathBuf,
        got: usize,
        want: usize,
    },
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> SourceError {
    SourceError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// A stream of activation rows, `[n, d_in]` row-major f32, in file order.
pub trait RowSource: Send {
    fn d_in(&self) -> usize;
    /// The next rows (a multiple of `d_in` values), or `None` at the end.
    fn next_chunk(&mut self) -> Result<Option<Vec<f32>>, SourceError>;
}

/// Opens `spec`: a file (`.safetensors`, `.arrow`/`.ipc`/`.feather`, `.parquet`), a
/// safetensors `FILE:TENSOR`, or a directory of such files (read in name order).
/// `column` names the Arrow/Parquet column (the hook name); without it, a file's only
/// list-of-floats column is used.
pub fn open(spec: &str, column: Option<&str>) -> Result<Box<dyn RowSource>, SourceError> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(Box::new(Shards::open(path, column)?));
    }
    let (file, tensor) = match spec.rsplit_once(':') {
        Some((f, t)) if !path.exists() && Path::new(f).is_file() => {
            (PathBuf::from(f), Some(t.to_string()))
        }
        _ => (path.to_path_buf(), None),
    };
    open_file(&file, tensor.as_deref(), column)
}

fn kind(path: &Path) -> Option<&'static str> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("safetensors") => Some("safetensors"),
        Some("arrow" | "ipc" | "feather") => Some("arrow"),
        Some("parquet") => Some("parquet"),
        _ => None,
    }
}

fn open_file(
    path: &Path,
    tensor: Option<&str>,
    column: Option<&str>,
) -> Result<Box<dyn RowSource>, SourceError> {
    if !path.exists() {
        return Err(file_err(path, "no such file or directory"));
    }
    match kind(path) {
        Some("safetensors") => Ok(Box::new(Safetensors::open(path, tensor)?)),
        Some("arrow") => Ok(Box::new(ArrowBatches::ipc(path, column)?)),
        Some("parquet") => Ok(Box::new(ArrowBatches::parquet(path, column)?)),
        _ => Err(file_err(
            path,
            "not an activation file: expected .safetensors, .arrow/.ipc/.feather, .parquet, or a directory of them",
        )),
    }
}

/// A safetensors tensor `[..., d_in]` (f32, f16, bf16 or f64), served in chunks.
struct Safetensors {
    values: Vec<f32>,
    d: usize,
    pos: usize,
}

impl Safetensors {
    fn open(path: &Path, tensor: Option<&str>) -> Result<Safetensors, SourceError> {
        use safetensors::{Dtype, SafeTensors};
        let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| file_err(path, format!("not a readable safetensors file: {e}")))?;
        let mut names = st.names();
        names.sort();
        let name = match tensor {
            Some(t) => t.to_string(),
            None if names.len() == 1 => names[0].to_string(),
            None => {
                return Err(file_err(
                    path,
                    format!(
                        "it holds {} tensors ({}); name one as FILE:TENSOR",
                        names.len(),
                        names.join(", ")
                    ),
                ))
            }
        };
        let v = st.tensor(&name).map_err(|_| SourceError::MissingColumn {
            path: path.to_path_buf(),
            column: name.clone(),
            present: names.join(", "),
        })?;
        let shape = v.shape().to_vec();
        if shape.len() < 2 {
            return Err(file_err(
                path,
                format!("tensor '{name}' has shape {shape:?}; activations are [n, d_in]"),
            ));
        }
        let d = *shape.last().unwrap();
        let data = v.data();
        let values: Vec<f32> = match v.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
            other => {
                return Err(file_err(
                    path,
                    format!("tensor '{name}' has dtype {other:?}; expected F32, F16, BF16 or F64"),
                ))
            }
        };
        if values.is_empty() {
            return Err(file_err(path, format!("tensor '{name}' has no rows")));
        }
        Ok(Safetensors { values, d, pos: 0 })
    }
}

impl RowSource for Safetensors {
    fn d_in(&self) -> usize {
        self.d
    }

    fn next_chunk(&mut self) -> Result<Option<Vec<f32>>, SourceError> {
        if self.pos >= self.values.len() {
            return Ok(None);
        }
        let end = (self.pos + CHUNK_ROWS * self.d).min(self.values.len());
        let chunk = self.values[self.pos..end].to_vec();
        self.pos = end;
        Ok(Some(chunk))
    }
}

/// Record batches from an Arrow IPC or Parquet file; one column holds the rows.
struct ArrowBatches {
    path: PathBuf,
    batches: Box<dyn Iterator<Item = Result<RecordBatch, String>> + Send>,
    column: usize,
    d: usize,
}

/// Index and width of the activation column: the one named `column`, else the only
/// `FixedSizeList` of floats.
fn pick_column(
    path: &Path,
    schema: &Schema,
    column: Option<&str>,
) -> Result<(usize, usize), SourceError> {
    let present = || {
        schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let width = |dt: &DataType| match dt {
        DataType::FixedSizeList(item, n)
            if matches!(item.data_type(), DataType::Float32 | DataType::Float16) =>
        {
            Some(*n as usize)
        }
        _ => None,
    };
    match column {
        Some(name) => {
            let (i, f) =
                schema
                    .column_with_name(name)
                    .ok_or_else(|| SourceError::MissingColumn {
                        path: path.to_path_buf(),
                        column: name.into(),
                        present: present(),
                    })?;
            let d = width(f.data_type()).ok_or_else(|| {
                file_err(
                    path,
                    format!(
                        "column '{name}' is {}, expected FixedSizeList<Float32>[d_in]",
                        f.data_type()
                    ),
                )
            })?;
            Ok((i, d))
        }
        None => {
            let lists: Vec<(usize, usize)> = schema
                .fields()
                .iter()
                .enumerate()
                .filter_map(|(i, f)| width(f.data_type()).map(|d| (i, d)))
                .collect();
            match lists.as_slice() {
                [one] => Ok(*one),
                _ => Err(file_err(
                    path,
                    format!(
                        "{} activation columns (FixedSizeList of floats) among: {}; name one with hook_name",
                        lists.len(),
                        present()
                    ),
                )),
            }
        }
    }
}

impl ArrowBatches {
    fn ipc(path: &Path, column: Option<&str>) -> Result<ArrowBatches, SourceError> {
        let f = File::open(path).map_err(|e| file_err(path, e))?;
        let reader = arrow_ipc::reader::FileReader::try_new(f, None)
            .map_err(|e| file_err(path, format!("not a readable Arrow IPC file: {e}")))?;
        let (col, d) = pick_column(path, &reader.schema(), column)?;
        Ok(ArrowBatches {
            path: path.to_path_buf(),
            batches: Box::new(reader.map(|b| b.map_err(|e| e.to_string()))),
            column: col,
            d,
        })
    }

    fn parquet(path: &Path, column: Option<&str>) -> Result<ArrowBatches, SourceError> {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        use parquet::arrow::ProjectionMask;
        let f = File::open(path).map_err(|e| file_err(path, e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(f)
            .map_err(|e| file_err(path, format!("not a readable Parquet file: {e}")))?;
        let (col, d) = pick_column(path, builder.schema(), column)?;
        // decode only the activation column
        let mask = ProjectionMask::roots(builder.parquet_schema(), [col]);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(CHUNK_ROWS)
            .build()
            .map_err(|e| file_err(path, e))?;
        Ok(ArrowBatches {
            path: path.to_path_buf(),
            batches: Box::new(reader.map(|b| b.map_err(|e| e.to_string()))),
            column: 0,
            d,
        })
    }
}

impl RowSource for ArrowBatches {
    fn d_in(&self) -> usize {
        self.d
    }

    fn next_chunk(&mut self) -> Result<Option<Vec<f32>>, SourceError> {
        let Some(batch) = self.batches.next() else {
            return Ok(None);
        };
        let batch =
            batch.map_err(|e| file_err(&self.path, format!("cannot read a record batch: {e}")))?;
        let col = batch.column(self.column);
        let list = col
            .as_any()
            .downcast_ref::<FixedSizeListArray>()
            .ok_or_else(|| file_err(&self.path, "activation column is not a FixedSizeList"))?;
        if list.null_count() > 0 {
            return Err(file_err(
                &self.path,
                format!("{} null activation rows", list.null_count()),
            ));
        }
        let (start, n) = (list.offset() * self.d, list.len() * self.d);
        let values = list.values();
        let out = if let Some(v) = values.as_any().downcast_ref::<Float32Array>() {
            v.values()[start..start + n].to_vec()
        } else if let Some(v) = values.as_any().downcast_ref::<Float16Array>() {
            v.values()[start..start + n]
                .iter()
                .map(|h| h.to_f32())
                .collect()
        } else {
            return Err(file_err(
                &self.path,
                "activation values are not Float32 or Float16",
            ));
        };
        Ok(Some(out))
    }
}

/// A directory of activation shards, read in file-name order.
struct Shards {
    files: Vec<PathBuf>,
    next: usize,
    current: Box<dyn RowSource>,
    column: Option<String>,
    d: usize,
}

impl Shards {
    fn open(dir: &Path, column: Option<&str>) -> Result<Shards, SourceError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| file_err(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && kind(p).is_some())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(file_err(
                dir,
                "no activation shards (.safetensors, .arrow, .parquet) in this directory",
            ));
        }
        let current = open_file(&files[0], None, column)?;
        let d = current.d_in();
        Ok(Shards {
            files,
            next: 1,
            current,
            column: column.map(str::to_string),
            d,
        })
    }
}

impl RowSource for Shards {
    fn d_in(&self) -> usize {
        self.d
    }

    fn next_chunk(&mut self) -> Result<Option<Vec<f32>>, SourceError> {
        loop {
            if let Some(c) = self.current.next_chunk()? {
                return Ok(Some(c));
            }
            let Some(path) = self.files.get(self.next) else {
                return Ok(None);
            };
            self.next += 1;
            let src = open_file(path, None, self.column.as_deref())?;
            if src.d_in() != self.d {
                return Err(SourceError::Width {
                    path: path.clone(),
                    got: src.d_in(),
                    want: self.d,
                });
            }
            self.current = src;
        }
    }
}
