//! The seam between stages: a stream of Arrow record batches with a schema and a
//! position (the index of the next batch). Files, shard directories, Flight endpoints
//! and merges of them are all [`BatchSource`]s; a shard writer and a Flight server are
//! both [`BatchSink`]s, so a stage never knows which it talks to.

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
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
    /// A Flight endpoint or stream, named by its URL.
    #[error("{url}: {message}")]
    Remote { url: String, message: String },
    #[error("{0}")]
    Other(String),
}

/// The name the activation readers have always used.
pub type SourceError = StreamError;

pub(crate) fn file_err(path: &Path, message: impl std::fmt::Display) -> StreamError {
    StreamError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Batches in stream order. Compute threads call it; a source that reads the network
/// fills a bounded queue on the transport runtime and blocks here only when it is empty.
pub trait BatchSource: Send {
    fn schema(&self) -> SchemaRef;
    /// Position of the next batch; after [`BatchSource::next_batch`] returns a batch,
    /// that batch's position is `position() - 1`.
    fn position(&self) -> u64;
    /// The next batch, or `None` at the end of the stream.
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, StreamError>;
    /// What to call this source in messages (a path or URL).
    fn describe(&self) -> String;
}

/// Where batches go, in order, starting at the sink's position.
pub trait BatchSink: Send {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), StreamError>;
    /// The stream has ended: make everything durable/visible.
    fn finish(&mut self) -> Result<(), StreamError>;
}

/// How to open a stream.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// The position to start at.
    pub position: u64,
    /// Only these columns (all when `None`).
    pub columns: Option<Vec<String>>,
    /// The consumer name sent to a Flight server.
    pub consumer: Option<String>,
    /// The column name for sources that have none (a safetensors tensor): the hook.
    pub column_hint: Option<String>,
    pub client: crate::flight::ClientConfig,
}

/// Opens one stream: `grpc://HOST:PORT/STREAM` or `grpc+tls://…` (Flight), a shard
/// directory (`manifest.json`), an activation file or a directory of them, or
/// `synthetic:KIND?…` (generated; see [`crate::synthetic`]).
pub fn open_source(spec: &str, opts: &OpenOptions) -> Result<Box<dyn BatchSource>, StreamError> {
    let mut src: Box<dyn BatchSource> = if crate::flight::is_url(spec) {
        Box::new(crate::flight::FlightSource::open(spec, opts)?)
    } else if let Some(rest) = spec.strip_prefix(crate::synthetic::PREFIX) {
        Box::new(crate::synthetic::Synthetic::open(rest, opts.position)?)
    } else {
        let path = Path::new(spec);
        if crate::shards::is_shard_dir(path)? {
            Box::new(crate::shards::ShardReader::open(path, opts.position)?)
        } else if crate::saelens_cache::is_saelens_cache(path) {
            Box::new(crate::saelens_cache::SaelensCache::open(
                path,
                opts.position,
            )?)
        } else {
            crate::files::open(spec, opts.column_hint.as_deref(), opts.position)?
        }
    };
    // Flight sources project on the server; everything else here.
    if let Some(cols) = &opts.columns {
        if !crate::flight::is_url(spec) {
            src = Box::new(project(src, cols)?);
        }
    }
    Ok(src)
}

/// How many activation rows `spec` holds, where that is known without reading the data:
/// a safetensors file (its header) or a Parquet file (its metadata), or a directory of
/// them; `None` for streams, shard directories, SAELens caches and Arrow IPC files.
pub fn count_rows(spec: &str, column: Option<&str>) -> Result<Option<u64>, StreamError> {
    if crate::flight::is_url(spec) || spec.starts_with(crate::synthetic::PREFIX) {
        return Ok(None);
    }
    let path = Path::new(spec);
    if crate::shards::is_shard_dir(path)? || crate::saelens_cache::is_saelens_cache(path) {
        return Ok(None);
    }
    crate::files::count_rows(spec, column)
}

/// Opens several upstreams of one schema as one stream taken round-robin in the given
/// order ([`crate::merge::Merge`]); one spec is just that stream.
pub fn open_sources(
    specs: &[String],
    opts: &OpenOptions,
) -> Result<Box<dyn BatchSource>, StreamError> {
    match specs {
        [] => Err(StreamError::Other("no stream to read".into())),
        [one] => open_source(one, opts),
        many => Ok(Box::new(crate::merge::Merge::open(many, opts)?)),
    }
}

/// Indices of `columns` in `schema`, or an error listing the columns there are.
pub fn projection(schema: &arrow_schema::Schema, columns: &[String]) -> Result<Vec<usize>, String> {
    columns
        .iter()
        .map(|c| {
            schema.index_of(c).map_err(|_| {
                let present: Vec<&str> =
                    schema.fields().iter().map(|f| f.name().as_str()).collect();
                format!(
                    "no column '{c}' in this stream (columns: {})",
                    present.join(", ")
                )
            })
        })
        .collect()
}

/// A source whose batches pass through `f` into `schema` (a projection, a dtype
/// conversion).
pub struct Mapped {
    inner: Box<dyn BatchSource>,
    schema: SchemaRef,
    #[allow(clippy::type_complexity)]
    f: Box<dyn FnMut(RecordBatch) -> Result<RecordBatch, StreamError> + Send>,
}

impl Mapped {
    pub fn new(
        inner: Box<dyn BatchSource>,
        schema: SchemaRef,
        f: impl FnMut(RecordBatch) -> Result<RecordBatch, StreamError> + Send + 'static,
    ) -> Mapped {
        Mapped {
            inner,
            schema,
            f: Box::new(f),
        }
    }
}

impl BatchSource for Mapped {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn position(&self) -> u64 {
        self.inner.position()
    }
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, StreamError> {
        self.inner.next_batch()?.map(&mut self.f).transpose()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Only `columns` of `inner` (metadata kept).
fn project(inner: Box<dyn BatchSource>, columns: &[String]) -> Result<Mapped, StreamError> {
    let other = |e: arrow_schema::ArrowError| StreamError::Other(e.to_string());
    let indices = projection(&inner.schema(), columns)
        .map_err(|m| StreamError::Other(format!("{}: {m}", inner.describe())))?;
    let schema = std::sync::Arc::new(inner.schema().project(&indices).map_err(other)?);
    Ok(Mapped::new(inner, schema, move |b| {
        b.project(&indices).map_err(other)
    }))
}

/// Bytes of data in a batch: what queues and windows count and benchmarks report.
/// Counted from the logical shape, since a batch decoded from one IPC message has
/// every column pointing into the same body buffer (Arrow's own memory sizes would
/// count that buffer once per column).
pub fn batch_bytes(b: &RecordBatch) -> usize {
    use arrow_array::Array;
    use arrow_schema::DataType;
    b.columns()
        .iter()
        .map(|c| {
            let width = |t: &DataType| t.primitive_width();
            match c.data_type() {
                DataType::FixedSizeList(item, n) => width(item.data_type())
                    .map(|w| w * *n as usize * c.len())
                    .unwrap_or_else(|| c.get_array_memory_size()),
                t => width(t)
                    .map(|w| w * c.len())
                    .unwrap_or_else(|| c.get_array_memory_size()),
            }
        })
        .sum()
}

/// Bytes one row of `schema` takes: every column must be of fixed width (primitive, or
/// a fixed-size list of primitives), as activation streams are.
pub fn row_bytes(schema: &arrow_schema::Schema) -> Result<usize, String> {
    use arrow_schema::DataType;
    let width = |t: &DataType| t.primitive_width();
    schema
        .fields()
        .iter()
        .map(|f| {
            match f.data_type() {
                DataType::FixedSizeList(item, n) => {
                    width(item.data_type()).map(|w| w * *n as usize)
                }
                t => width(t),
            }
            .ok_or_else(|| {
                format!(
                    "column '{}' ({}) is not of fixed width",
                    f.name(),
                    f.data_type()
                )
            })
        })
        .sum()
}
