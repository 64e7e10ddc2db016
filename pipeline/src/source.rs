//! Activation rows: one `[n, d_in]` f32 stream taken from one column of any batch
//! stream ([`crate::stream`]): files, shard directories, Flight endpoints. The column is
//! a `FixedSizeList<Float32 | Float16>[d_in]` named by the hook.

use crate::stream::{file_err, open_source, BatchSource, OpenOptions, SourceError};
use arrow_array::{Array, FixedSizeListArray, Float16Array, Float32Array};
use arrow_schema::{DataType, Schema};
use std::path::{Path, PathBuf};

/// A stream of activation rows, `[n, d_in]` row-major f32, in stream order.
pub trait RowSource: Send {
    fn d_in(&self) -> usize;
    /// The next rows (a multiple of `d_in` values), or `None` at the end.
    fn next_chunk(&mut self) -> Result<Option<Vec<f32>>, SourceError>;
    /// What is read (for messages).
    fn describe(&self) -> String {
        String::new()
    }
    /// Tokens per sequence, where the source records it (a SAELens cache).
    fn context_size(&self) -> Option<i64> {
        None
    }
}

/// Opens `spec` (anything [`open_source`] opens: a file, a safetensors `FILE:TENSOR`, a
/// directory of files or shards, a `grpc://` stream) as rows of one column. `column`
/// names it (the hook name); without it, the only list-of-floats column is used.
pub fn open(spec: &str, column: Option<&str>) -> Result<Box<dyn RowSource>, SourceError> {
    let opts = OpenOptions {
        column_hint: column.map(str::to_string),
        ..Default::default()
    };
    Ok(Box::new(Rows::new(open_source(spec, &opts)?, column)?))
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

/// The index and width of the activation column `name` in the schema of `what`.
pub fn activation_column(
    what: &str,
    schema: &Schema,
    name: &str,
) -> Result<(usize, usize), SourceError> {
    pick_column(Path::new(what), schema, Some(name))
}

/// The rows of activation column `i` (width `d`) of a batch from `what`, as f32.
pub fn batch_rows(
    what: &str,
    batch: &arrow_array::RecordBatch,
    i: usize,
    d: usize,
) -> Result<Vec<f32>, SourceError> {
    let path = Path::new(what);
    let list = batch
        .column(i)
        .as_any()
        .downcast_ref::<FixedSizeListArray>()
        .ok_or_else(|| file_err(path, "activation column is not a FixedSizeList"))?;
    rows_f32(path, list, d)
}

/// Rows of one activation column of a batch stream.
pub struct Rows {
    src: Box<dyn BatchSource>,
    /// As asked: without a name, each batch's only list column (files in a directory
    /// may name theirs differently).
    column: Option<String>,
    d: usize,
}

impl Rows {
    pub fn new(src: Box<dyn BatchSource>, column: Option<&str>) -> Result<Rows, SourceError> {
        let path = PathBuf::from(src.describe());
        let schema = src.schema();
        let (_, d) = pick_column(&path, &schema, column)?;
        Ok(Rows {
            column: column.map(str::to_string),
            src,
            d,
        })
    }
}

impl RowSource for Rows {
    fn d_in(&self) -> usize {
        self.d
    }

    fn describe(&self) -> String {
        self.src.describe()
    }

    fn context_size(&self) -> Option<i64> {
        self.src
            .schema()
            .metadata()
            .get(schemas::streams::meta::CONTEXT_SIZE)
            .and_then(|c| c.parse().ok())
    }

    fn next_chunk(&mut self) -> Result<Option<Vec<f32>>, SourceError> {
        let Some(batch) = self.src.next_batch()? else {
            return Ok(None);
        };
        let path = PathBuf::from(self.src.describe());
        let (i, d) = pick_column(&path, &batch.schema(), self.column.as_deref())?;
        if d != self.d {
            return Err(SourceError::Width {
                path,
                got: d,
                want: self.d,
            });
        }
        let list = batch
            .column(i)
            .as_any()
            .downcast_ref::<FixedSizeListArray>()
            .ok_or_else(|| file_err(&path, "activation column is not a FixedSizeList"))?;
        rows_f32(&path, list, d).map(Some)
    }
}

/// The values of a `FixedSizeList<Float32 | Float16>[d]` column as f32 rows.
pub fn rows_f32(path: &Path, list: &FixedSizeListArray, d: usize) -> Result<Vec<f32>, SourceError> {
    if list.null_count() > 0 {
        return Err(file_err(
            path,
            format!("{} null activation rows", list.null_count()),
        ));
    }
    let (start, n) = (list.offset() * d, list.len() * d);
    let values = list.values();
    if let Some(v) = values.as_any().downcast_ref::<Float32Array>() {
        Ok(v.values()[start..start + n].to_vec())
    } else if let Some(v) = values.as_any().downcast_ref::<Float16Array>() {
        Ok(v.values()[start..start + n]
            .iter()
            .map(|h| h.to_f32())
            .collect())
    } else {
        Err(file_err(
            path,
            "activation values are not Float32 or Float16",
        ))
    }
}
