//! Activation files as streams: a safetensors tensor `[n, d_in]` (one list column), an
//! Arrow IPC file, a Parquet file, or a directory of such files read in name order.

use crate::stream::{file_err, BatchSource, StreamError};
use arrow_array::{FixedSizeListArray, Float32Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Rows per record batch made from a safetensors tensor or decoded from Parquet.
pub const CHUNK_ROWS: usize = 8192;

/// Opens `spec`: a file (`.safetensors`, `.arrow`/`.ipc`/`.feather`, `.parquet`), a
/// safetensors `FILE:TENSOR`, or a directory of such files (read in name order), at
/// batch `position`. `column` names a safetensors tensor's column (the hook name; the
/// tensor name otherwise).
pub fn open(
    spec: &str,
    column: Option<&str>,
    position: u64,
) -> Result<Box<dyn BatchSource>, StreamError> {
    let path = Path::new(spec);
    let mut src: Box<dyn BatchSource> = if path.is_dir() {
        Box::new(FileDir::open(path, column)?)
    } else {
        let (file, tensor) = match spec.rsplit_once(':') {
            Some((f, t)) if !path.exists() && Path::new(f).is_file() => {
                (PathBuf::from(f), Some(t.to_string()))
            }
            _ => (path.to_path_buf(), None),
        };
        open_file(&file, tensor.as_deref(), column)?
    };
    skip(src.as_mut(), position)?;
    Ok(src)
}

/// [`crate::stream::count_rows`] for a file, a `FILE:TENSOR` or a directory of files.
pub(crate) fn count_rows(spec: &str, column: Option<&str>) -> Result<Option<u64>, StreamError> {
    let path = Path::new(spec);
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| file_err(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && kind(p).is_some())
            .collect();
        files.sort();
        let mut total = 0;
        for f in files {
            match count_file(&f, None, column)? {
                Some(n) => total += n,
                None => return Ok(None),
            }
        }
        return Ok(Some(total));
    }
    match spec.rsplit_once(':') {
        Some((f, t)) if !path.exists() && Path::new(f).is_file() => {
            count_file(Path::new(f), Some(t), column)
        }
        _ => count_file(path, None, column),
    }
}

fn count_file(
    path: &Path,
    tensor: Option<&str>,
    column: Option<&str>,
) -> Result<Option<u64>, StreamError> {
    match kind(path) {
        Some("safetensors") => {
            use std::io::Read;
            let mut f = File::open(path).map_err(|e| file_err(path, e))?;
            let mut n = [0u8; 8];
            f.read_exact(&mut n).map_err(|e| file_err(path, e))?;
            let mut header = vec![0u8; u64::from_le_bytes(n).min(100 << 20) as usize];
            f.read_exact(&mut header).map_err(|e| file_err(path, e))?;
            let Ok(serde_json::Value::Object(h)) = serde_json::from_slice(&header) else {
                return Ok(None); // opening it says what is wrong
            };
            let shapes: Vec<(&String, Vec<u64>)> = h
                .iter()
                .filter(|(k, _)| *k != "__metadata__")
                .filter_map(|(k, v)| {
                    let s = v.get("shape")?.as_array()?;
                    Some((k, s.iter().filter_map(|d| d.as_u64()).collect()))
                })
                .collect();
            let pick = tensor.or(column);
            let shape = match pick {
                Some(name) => shapes.iter().find(|(k, _)| k.as_str() == name),
                None if shapes.len() == 1 => shapes.first(),
                None => None,
            };
            Ok(shape.and_then(|(name, s)| {
                let s: Vec<usize> = s.iter().map(|&d| d as usize).collect();
                let d = activation_width(name, column, &s).filter(|&d| d > 0)?;
                Some((s.iter().product::<usize>() / d) as u64)
            }))
        }
        Some("parquet") => {
            use parquet::file::reader::{FileReader, SerializedFileReader};
            let f = File::open(path).map_err(|e| file_err(path, e))?;
            let r = SerializedFileReader::new(f)
                .map_err(|e| file_err(path, format!("not a readable Parquet file: {e}")))?;
            Ok(Some(r.metadata().file_metadata().num_rows() as u64))
        }
        _ => Ok(None),
    }
}

/// The width of one activation row of a tensor of `shape`: the last dimension for
/// `[n, d_in]` and `[n_seq, seq_len, d_in]` (TransformerLens's `[batch, pos, d_model]`,
/// what `activation-producer dump` writes); for a `hook_z` (by tensor or column name)
/// the last two, heads side by side, for `[n, n_heads, d_head]` and
/// `[n_seq, seq_len, n_heads, d_head]`. `None` for any other rank.
fn activation_width(name: &str, column: Option<&str>, shape: &[usize]) -> Option<usize> {
    let hook_z = name.ends_with("hook_z") || column.is_some_and(|c| c.ends_with("hook_z"));
    match (hook_z, shape.len()) {
        (_, 2) | (false, 3) => shape.last().copied(),
        (true, 3 | 4) => Some(shape[shape.len() - 2] * shape[shape.len() - 1]),
        _ => None,
    }
}

/// Reads and drops batches up to `position`.
pub(crate) fn skip(src: &mut dyn BatchSource, position: u64) -> Result<(), StreamError> {
    while src.position() < position {
        if src.next_batch()?.is_none() {
            return Err(StreamError::Other(format!(
                "{}: cannot start at batch {position}: the stream has only {}",
                src.describe(),
                src.position()
            )));
        }
    }
    Ok(())
}

pub(crate) fn kind(path: &Path) -> Option<&'static str> {
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
) -> Result<Box<dyn BatchSource>, StreamError> {
    if !path.exists() {
        return Err(file_err(path, "no such file or directory"));
    }
    match kind(path) {
        Some("safetensors") => Ok(Box::new(Safetensors::open(path, tensor, column)?)),
        Some("arrow") => Ok(Box::new(Reader::ipc(path)?)),
        Some("parquet") => Ok(Box::new(Reader::parquet(path)?)),
        _ => Err(file_err(
            path,
            "not an activation file: expected .safetensors, .arrow/.ipc/.feather, .parquet, or a directory of them",
        )),
    }
}

/// A `[n, d_in]` list-of-f32 record batch column.
pub fn f32_rows_column(values: Vec<f32>, d: usize) -> Result<FixedSizeListArray, StreamError> {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    FixedSizeListArray::try_new(item, d as i32, Arc::new(Float32Array::from(values)), None)
        .map_err(|e| StreamError::Other(e.to_string()))
}

/// A safetensors tensor `[..., d_in]` (f32, f16, bf16 or f64) as batches of
/// [`CHUNK_ROWS`] rows in one `FixedSizeList<Float32>[d_in]` column.
struct Safetensors {
    path: PathBuf,
    values: Vec<f32>,
    d: usize,
    next_row: usize,
    position: u64,
    schema: SchemaRef,
}

impl Safetensors {
    fn open(
        path: &Path,
        tensor: Option<&str>,
        column: Option<&str>,
    ) -> Result<Safetensors, StreamError> {
        use safetensors::{Dtype, SafeTensors};
        let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| file_err(path, format!("not a readable safetensors file: {e}")))?;
        let mut names = st.names();
        names.sort();
        // An explicit FILE:TENSOR is the user's answer; otherwise the tensor must be the
        // one hook_name names, so a mismatch is not recorded in the SAE as if it were
        // right.
        let name = match (tensor, column) {
            (Some(t), _) => t.to_string(),
            (None, Some(c)) if names.contains(&c) => c.to_string(),
            (None, Some(c)) if names.len() == 1 => {
                return Err(file_err(
                    path,
                    format!(
                        "its tensor is '{t}', but hook_name is '{c}'; correct hook_name, or name the tensor as {}:{t} to train on it anyway",
                        path.display(),
                        t = names[0]
                    ),
                ))
            }
            (None, _) if names.len() == 1 => names[0].to_string(),
            (None, _) => {
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
        let v = st.tensor(&name).map_err(|_| StreamError::MissingColumn {
            path: path.to_path_buf(),
            column: name.clone(),
            present: names.join(", "),
        })?;
        let shape = v.shape().to_vec();
        let Some(d) = activation_width(&name, column, &shape) else {
            return Err(file_err(
                path,
                format!(
                    "tensor '{name}' has shape {shape:?}; activations are [n, d_in] or [n_seq, seq_len, d_in] (a hook_z: [n, n_heads, d_head] or [n_seq, seq_len, n_heads, d_head])"
                ),
            ));
        };
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
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let field = Field::new(
            column.unwrap_or(&name),
            DataType::FixedSizeList(item, d as i32),
            false,
        );
        Ok(Safetensors {
            path: path.to_path_buf(),
            values,
            d,
            next_row: 0,
            position: 0,
            schema: Arc::new(Schema::new(vec![field])),
        })
    }
}

impl BatchSource for Safetensors {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn position(&self) -> u64 {
        self.position
    }
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, StreamError> {
        let n = self.values.len() / self.d;
        if self.next_row >= n {
            return Ok(None);
        }
        let end = (self.next_row + CHUNK_ROWS).min(n);
        let chunk = self.values[self.next_row * self.d..end * self.d].to_vec();
        self.next_row = end;
        self.position += 1;
        let col = f32_rows_column(chunk, self.d)?;
        RecordBatch::try_new(self.schema.clone(), vec![Arc::new(col)])
            .map(Some)
            .map_err(|e| file_err(&self.path, e))
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Record batches read from an Arrow IPC or Parquet file.
struct Reader {
    path: PathBuf,
    batches: Box<dyn Iterator<Item = Result<RecordBatch, arrow_schema::ArrowError>> + Send>,
    schema: SchemaRef,
    position: u64,
}

impl Reader {
    fn ipc(path: &Path) -> Result<Reader, StreamError> {
        let f = File::open(path).map_err(|e| file_err(path, e))?;
        let reader = arrow_ipc::reader::FileReader::try_new_buffered(f, None)
            .map_err(|e| file_err(path, format!("not a readable Arrow IPC file: {e}")))?;
        Ok(Reader {
            path: path.to_path_buf(),
            schema: reader.schema(),
            batches: Box::new(reader),
            position: 0,
        })
    }

    /// Decoded [`CHUNK_ROWS`] rows at a time.
    fn parquet(path: &Path) -> Result<Reader, StreamError> {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let f = File::open(path).map_err(|e| file_err(path, e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(f)
            .map_err(|e| file_err(path, format!("not a readable Parquet file: {e}")))?;
        let schema = builder.schema().clone();
        let reader = builder
            .with_batch_size(CHUNK_ROWS)
            .build()
            .map_err(|e| file_err(path, e))?;
        Ok(Reader {
            path: path.to_path_buf(),
            batches: Box::new(reader),
            schema,
            position: 0,
        })
    }
}

impl BatchSource for Reader {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn position(&self) -> u64 {
        self.position
    }
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, StreamError> {
        match self.batches.next() {
            None => Ok(None),
            Some(b) => {
                self.position += 1;
                b.map(Some)
                    .map_err(|e| file_err(&self.path, format!("cannot read a record batch: {e}")))
            }
        }
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// A directory of activation files, read in file-name order as one stream.
struct FileDir {
    dir: PathBuf,
    files: Vec<PathBuf>,
    next: usize,
    current: Box<dyn BatchSource>,
    column: Option<String>,
    position: u64,
}

impl FileDir {
    fn open(dir: &Path, column: Option<&str>) -> Result<FileDir, StreamError> {
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
        Ok(FileDir {
            dir: dir.to_path_buf(),
            files,
            next: 1,
            current,
            column: column.map(str::to_string),
            position: 0,
        })
    }
}

impl BatchSource for FileDir {
    /// The first file's schema; every file is read as it comes (the row readers check
    /// widths file by file).
    fn schema(&self) -> SchemaRef {
        self.current.schema()
    }
    fn position(&self) -> u64 {
        self.position
    }
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, StreamError> {
        loop {
            if let Some(b) = self.current.next_batch()? {
                self.position += 1;
                return Ok(Some(b));
            }
            let Some(path) = self.files.get(self.next) else {
                return Ok(None);
            };
            self.next += 1;
            self.current = open_file(path, None, self.column.as_deref())?;
        }
    }
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

/// A whole stream written as one Arrow IPC file, appearing under its name only once
/// finished (staged under a temporary name until then).
pub struct IpcFileSink {
    staged: Option<crate::staging::Staged>,
    w: Option<arrow_ipc::writer::FileWriter<std::io::BufWriter<std::fs::File>>>,
    path: PathBuf,
}

impl IpcFileSink {
    pub fn create(
        path: &Path,
        schema: &arrow_schema::SchemaRef,
    ) -> Result<IpcFileSink, StreamError> {
        let e = |m: String| file_err(path, m);
        let staged = crate::staging::Staged::file(path).map_err(|x| e(x.to_string()))?;
        let f = std::fs::File::create(&staged.tmp).map_err(|x| e(x.to_string()))?;
        let w = arrow_ipc::writer::FileWriter::try_new(std::io::BufWriter::new(f), schema)
            .map_err(|x| e(x.to_string()))?;
        Ok(IpcFileSink {
            staged: Some(staged),
            w: Some(w),
            path: path.to_path_buf(),
        })
    }
}

impl crate::stream::BatchSink for IpcFileSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), StreamError> {
        let w = self
            .w
            .as_mut()
            .ok_or_else(|| file_err(&self.path, "already finished"))?;
        w.write(batch)
            .map_err(|x| file_err(&self.path, x.to_string()))
    }
    fn finish(&mut self) -> Result<(), StreamError> {
        let e = |m: String| file_err(&self.path, m);
        if let Some(mut w) = self.w.take() {
            w.finish().map_err(|x| e(x.to_string()))?;
            let f = w.into_inner().map_err(|x| e(x.to_string()))?;
            f.into_inner()
                .map_err(|x| e(x.to_string()))?
                .sync_all()
                .map_err(|x| e(x.to_string()))?;
        }
        if let Some(s) = self.staged.take() {
            s.commit().map_err(|x| e(x.to_string()))?;
        }
        Ok(())
    }
}
