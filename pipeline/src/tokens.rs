//! Token files: `[n_seq, context_size]` token ids from a NumPy `.npy` array, a
//! safetensors tensor, or the `input_ids` column of a Parquet / Arrow IPC file (a
//! SAELens pretokenized dataset).

use crate::stream::SourceError;
use arrow_array::cast::AsArray;
use arrow_array::types::{Int16Type, Int32Type, Int64Type, UInt16Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use schemas::columns::INPUT_IDS;
use std::fs::File;
use std::path::Path;

/// Token ids, row-major `[n_seq, seq_len]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRows {
    pub ids: Vec<i64>,
    pub n_seq: usize,
    pub seq_len: usize,
}

fn err(path: &Path, message: impl std::fmt::Display) -> SourceError {
    SourceError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Reads a token file by extension: `.npy`, `.safetensors` (the tensor `input_ids`,
/// or the only one), `.parquet`, `.arrow`/`.ipc`/`.feather` (column `input_ids`).
pub fn read_tokens(path: &Path) -> Result<TokenRows, SourceError> {
    if !path.is_file() {
        return Err(err(path, "no such file"));
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let rows =
        match ext.as_str() {
            "npy" => npy(path)?,
            "safetensors" => safetensors(path)?,
            "parquet" | "arrow" | "ipc" | "feather" => arrow(path, &ext)?,
            _ => return Err(err(
                path,
                "not a token file: expected .npy, .safetensors, .parquet or .arrow/.ipc/.feather",
            )),
        };
    if rows.n_seq == 0 || rows.seq_len == 0 {
        return Err(err(path, "holds no tokens"));
    }
    Ok(rows)
}

fn ints(path: &Path, bytes: &[u8], kind: &str) -> Result<Vec<i64>, SourceError> {
    macro_rules! conv {
        ($t:ty) => {
            bytes
                .chunks_exact(std::mem::size_of::<$t>())
                .map(|b| <$t>::from_le_bytes(b.try_into().unwrap()) as i64)
                .collect()
        };
    }
    Ok(match kind {
        "i8" => conv!(i64),
        "i4" => conv!(i32),
        "i2" => conv!(i16),
        "u4" => conv!(u32),
        "u2" => conv!(u16),
        "u8" => bytes
            .chunks_exact(8)
            .map(|b| {
                let x = u64::from_le_bytes(b.try_into().unwrap());
                i64::try_from(x)
                    .map_err(|_| err(path, format!("token id {x} does not fit in int64")))
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(err(
                path,
                format!(
                    "token ids must be integers (int16/32/64, uint16/32/64), found dtype {other}"
                ),
            ))
        }
    })
}

fn two_d(path: &Path, shape: &[usize]) -> Result<(usize, usize), SourceError> {
    match shape {
        [n, t] => Ok((*n, *t)),
        _ => Err(err(
            path,
            format!("token ids must be 2-D [n_seq, context_size], found shape {shape:?}"),
        )),
    }
}

/// NumPy format 1.0–3.0, little-endian, C order.
fn npy(path: &Path) -> Result<TokenRows, SourceError> {
    let bytes = std::fs::read(path).map_err(|e| err(path, e))?;
    let bad = |m: &str| err(path, format!("not a readable .npy file: {m}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("missing the \\x93NUMPY magic"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
            12,
        ),
        v => return Err(bad(&format!("unsupported version {v}"))),
    };
    let header = bytes
        .get(start..start + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header"))?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}'"))? + key.len() + 2;
        Some(header[i..].trim_start_matches([':', ' ']))
    };
    let descr = field("descr")
        .and_then(|s| s.strip_prefix('\''))
        .and_then(|s| s.split('\'').next())
        .ok_or_else(|| bad("no descr"))?;
    if field("fortran_order").is_some_and(|s| s.starts_with("True")) {
        return Err(bad(
            "Fortran-ordered arrays are not supported (save with C order)",
        ));
    }
    let shape: Vec<usize> = field("shape")
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_, _>>()?;
    let kind = match descr.as_bytes().first() {
        Some(b'<' | b'|') => &descr[1..],
        Some(b'>') => return Err(bad("big-endian arrays are not supported")),
        _ => descr,
    };
    let (n, t) = two_d(path, &shape)?;
    let data = &bytes[start + hlen..];
    let ids = ints(path, data, kind)?;
    if ids.len() != n * t {
        return Err(bad(&format!("{} values for shape {shape:?}", ids.len())));
    }
    Ok(TokenRows {
        ids,
        n_seq: n,
        seq_len: t,
    })
}

fn safetensors(path: &Path) -> Result<TokenRows, SourceError> {
    use safetensors::{Dtype, SafeTensors};
    let bytes = std::fs::read(path).map_err(|e| err(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| err(path, format!("not a readable safetensors file: {e}")))?;
    let mut names = st.names();
    names.sort();
    let name = if names.contains(&INPUT_IDS) || names.len() != 1 {
        INPUT_IDS
    } else {
        names[0]
    };
    let v = st.tensor(name).map_err(|_| SourceError::MissingColumn {
        path: path.to_path_buf(),
        column: INPUT_IDS.into(),
        present: names.join(", "),
    })?;
    let kind = match v.dtype() {
        Dtype::I64 => "i8",
        Dtype::I32 => "i4",
        Dtype::I16 => "i2",
        Dtype::U64 => "u8",
        Dtype::U32 => "u4",
        Dtype::U16 => "u2",
        other => {
            return Err(err(
                path,
                format!("tensor '{name}' is {other:?}; token ids must be integers"),
            ))
        }
    };
    let (n, t) = two_d(path, v.shape())?;
    Ok(TokenRows {
        ids: ints(path, v.data(), kind)?,
        n_seq: n,
        seq_len: t,
    })
}

fn arrow(path: &Path, ext: &str) -> Result<TokenRows, SourceError> {
    let f = File::open(path).map_err(|e| err(path, e))?;
    let batches: Vec<RecordBatch> = if ext == "parquet" {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        ParquetRecordBatchReaderBuilder::try_new(f)
            .and_then(|b| b.build())
            .map_err(|e| err(path, format!("not a readable Parquet file: {e}")))?
            .collect::<Result<_, _>>()
            .map_err(|e| err(path, e))?
    } else {
        match arrow_ipc::reader::FileReader::try_new(f, None) {
            Ok(r) => r.collect::<Result<_, _>>().map_err(|e| err(path, e))?,
            // HF `save_to_disk` writes the IPC stream format.
            Err(_) => arrow_ipc::reader::StreamReader::try_new(
                File::open(path).map_err(|e| err(path, e))?,
                None,
            )
            .map_err(|e| {
                err(
                    path,
                    format!("not a readable Arrow IPC file or stream: {e}"),
                )
            })?
            .collect::<Result<_, _>>()
            .map_err(|e| err(path, e))?,
        }
    };
    let (mut ids, mut n, mut t) = (Vec::new(), 0usize, None::<usize>);
    for b in &batches {
        let col = b.column_by_name(INPUT_IDS).ok_or_else(|| {
            let present: Vec<_> = b
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect();
            SourceError::MissingColumn {
                path: path.to_path_buf(),
                column: INPUT_IDS.into(),
                present: present.join(", "),
            }
        })?;
        for row in 0..col.len() {
            let values = list_row_ids(path, col, row)?;
            let len = values.len();
            match t {
                None => t = Some(len),
                Some(t) if t != len => {
                    return Err(err(
                        path,
                        format!("row {n} of '{INPUT_IDS}' has {len} tokens, earlier rows {t}: every row must have the same context size"),
                    ))
                }
                _ => {}
            }
            ids.extend(values);
            n += 1;
        }
    }
    Ok(TokenRows {
        ids,
        n_seq: n,
        seq_len: t.unwrap_or(0),
    })
}

/// Token ids of row `row` of a list column (List / LargeList / FixedSizeList of
/// integers), as stored in pretokenized datasets; `path` names the file in errors.
pub fn list_row_ids(path: &Path, col: &ArrayRef, row: usize) -> Result<Vec<i64>, SourceError> {
    ints_of(path, &list_item(path, col, row)?)
}

fn list_item(path: &Path, col: &ArrayRef, row: usize) -> Result<ArrayRef, SourceError> {
    if col.is_null(row) {
        return Err(err(path, format!("row {row} of '{INPUT_IDS}' is null")));
    }
    Ok(match col.data_type() {
        DataType::List(_) => col.as_list::<i32>().value(row),
        DataType::LargeList(_) => col.as_list::<i64>().value(row),
        DataType::FixedSizeList(_, _) => col.as_fixed_size_list().value(row),
        other => {
            return Err(err(
                path,
                format!("column '{INPUT_IDS}' is {other}, expected a list of integers"),
            ))
        }
    })
}

fn ints_of(path: &Path, a: &ArrayRef) -> Result<Vec<i64>, SourceError> {
    if a.null_count() > 0 {
        return Err(err(path, format!("'{INPUT_IDS}' holds null token ids")));
    }
    Ok(match a.data_type() {
        DataType::Int64 => a.as_primitive::<Int64Type>().values().to_vec(),
        DataType::Int32 => a
            .as_primitive::<Int32Type>()
            .values()
            .iter()
            .map(|&v| v as i64)
            .collect(),
        DataType::Int16 => a
            .as_primitive::<Int16Type>()
            .values()
            .iter()
            .map(|&v| v as i64)
            .collect(),
        DataType::UInt32 => a
            .as_primitive::<UInt32Type>()
            .values()
            .iter()
            .map(|&v| v as i64)
            .collect(),
        DataType::UInt16 => a
            .as_primitive::<UInt16Type>()
            .values()
            .iter()
            .map(|&v| v as i64)
            .collect(),
        DataType::UInt64 => a
            .as_primitive::<UInt64Type>()
            .values()
            .iter()
            .map(|&v| {
                i64::try_from(v)
                    .map_err(|_| err(path, format!("token id {v} does not fit in int64")))
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(err(
                path,
                format!("'{INPUT_IDS}' items are {other}, expected integers"),
            ))
        }
    })
}

/// The `tokens` stream's schema: one `input_ids: FixedSizeList<Int32>[context_size]`
/// column, and the tokenization record under [`schemas::tokens::STREAM_METADATA_KEY`].
pub fn tokens_schema(meta: &schemas::TokenizationMetadata) -> arrow_schema::SchemaRef {
    use arrow_schema::{Field, Schema};
    let item = std::sync::Arc::new(Field::new("item", DataType::Int32, false));
    let field = Field::new(
        INPUT_IDS,
        DataType::FixedSizeList(item, meta.context_size as i32),
        false,
    );
    let json = serde_json::to_string(meta).expect("metadata serialises");
    let md = [(schemas::tokens::STREAM_METADATA_KEY.to_string(), json)];
    std::sync::Arc::new(Schema::new(vec![field]).with_metadata(md.into_iter().collect()))
}

/// One `tokens` record batch from windows of exactly `context_size` ids.
pub fn tokens_batch(
    schema: &arrow_schema::SchemaRef,
    windows: &[Vec<u32>],
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    use arrow_array::{FixedSizeListArray, Int32Array};
    let DataType::FixedSizeList(item, size) = schema.field(0).data_type() else {
        unreachable!("tokens_schema makes a FixedSizeList column")
    };
    let values: Int32Array = windows.iter().flatten().map(|&t| t as i32).collect();
    if let Some(w) = windows.iter().find(|w| w.len() != *size as usize) {
        return Err(arrow_schema::ArrowError::InvalidArgumentError(format!(
            "a token window has {} ids, the stream's context_size is {size}",
            w.len()
        )));
    }
    let list = FixedSizeListArray::try_new(item.clone(), *size, std::sync::Arc::new(values), None)?;
    RecordBatch::try_new(schema.clone(), vec![std::sync::Arc::new(list)])
}

/// The tokenization record of a `tokens` stream, if its schema carries one.
pub fn tokens_metadata(
    schema: &arrow_schema::Schema,
) -> Option<Result<schemas::TokenizationMetadata, serde_json::Error>> {
    schema
        .metadata()
        .get(schemas::tokens::STREAM_METADATA_KEY)
        .map(|j| serde_json::from_str(j))
}

/// Token sequences read in order from a token file (read whole), a `tokens` stream
/// (`grpc://`) or its shards (read a batch at a time).
pub struct TokenStream {
    what: String,
    seq_len: usize,
    inner: TokenInner,
    /// Index of the next sequence.
    next: u64,
}

enum TokenInner {
    Rows(TokenRows),
    Stream {
        src: Box<dyn crate::BatchSource>,
        col: usize,
        pending: std::collections::VecDeque<Vec<i64>>,
    },
}

impl TokenStream {
    /// Opens `spec`: a `grpc[+tls]://` URL or a shard directory as a stream, anything
    /// else as a token file ([`read_tokens`]).
    pub fn open(spec: &str, opts: &crate::OpenOptions) -> Result<TokenStream, SourceError> {
        Self::open_at(spec, opts, 0)
    }

    /// Opens `spec` where sequence `first` (or the batch holding it) begins: a stream
    /// whose schema records its batch size (`saestream.batch_rows`, as `tokenizer
    /// stream` writes) is opened at that batch, so a producer resuming at a later
    /// position reads from a tokenizer resumed there too; otherwise from the start.
    pub fn open_at(
        spec: &str,
        opts: &crate::OpenOptions,
        first: u64,
    ) -> Result<TokenStream, SourceError> {
        let streamed = crate::flight::is_url(spec) || crate::shards::is_shard_dir(Path::new(spec))?;
        if streamed && first > 0 {
            let schema = if crate::flight::is_url(spec) {
                let spec = crate::rendezvous::resolve(spec)?;
                let url = crate::flight::FlightUrl::parse(&spec)?;
                crate::flight::remote_streams(&spec, &opts.client)?
                    .into_iter()
                    .find(|r| Some(&r.name) == url.stream.as_ref())
                    .map(|r| r.schema)
            } else {
                Some(crate::open_source(spec, opts)?.schema())
            };
            let k: Option<u64> = schema.and_then(|s| {
                s.metadata()
                    .get(schemas::streams::meta::BATCH_ROWS)
                    .and_then(|v| v.parse().ok())
            });
            if let Some(k) = k.filter(|&k| k > 0) {
                let mut o = opts.clone();
                o.position = first / k;
                let mut t = Self::open_streamed(spec, &o)?;
                t.next = o.position * k;
                return Ok(t);
            }
        }
        if streamed {
            return Self::open_streamed(spec, opts);
        }
        let rows = read_tokens(Path::new(spec))?;
        Ok(TokenStream {
            what: spec.to_string(),
            seq_len: rows.seq_len,
            inner: TokenInner::Rows(rows),
            next: 0,
        })
    }

    fn open_streamed(spec: &str, opts: &crate::OpenOptions) -> Result<TokenStream, SourceError> {
        let src = crate::open_source(spec, opts)?;
        let schema = src.schema();
        let (col, f) = schema.column_with_name(INPUT_IDS).ok_or_else(|| {
            err(
                Path::new(spec),
                format!("not a tokens stream: no '{INPUT_IDS}' column"),
            )
        })?;
        let DataType::FixedSizeList(_, n) = f.data_type() else {
            return Err(err(
                Path::new(spec),
                format!(
                    "'{INPUT_IDS}' is {}, expected FixedSizeList<Int32>[context_size]",
                    f.data_type()
                ),
            ));
        };
        Ok(TokenStream {
            what: src.describe(),
            seq_len: *n as usize,
            inner: TokenInner::Stream {
                src,
                col,
                pending: Default::default(),
            },
            next: 0,
        })
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub fn describe(&self) -> &str {
        &self.what
    }

    /// The index of the next sequence.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Up to `n` next sequences, flattened (`[k, seq_len]`); empty at the end.
    pub fn next_seqs(&mut self, n: usize) -> Result<Vec<i64>, SourceError> {
        let mut out = Vec::with_capacity(n * self.seq_len);
        let mut k = 0;
        match &mut self.inner {
            TokenInner::Rows(r) => {
                let start = (self.next as usize).min(r.n_seq);
                k = n.min(r.n_seq - start);
                out.extend_from_slice(&r.ids[start * r.seq_len..(start + k) * r.seq_len]);
            }
            TokenInner::Stream { src, col, pending } => {
                while k < n {
                    if let Some(s) = pending.pop_front() {
                        out.extend(s);
                        k += 1;
                        continue;
                    }
                    let Some(b) = src.next_batch()? else { break };
                    let c = b.column(*col);
                    for row in 0..b.num_rows() {
                        pending.push_back(list_row_ids(Path::new(&self.what), c, row)?);
                    }
                }
            }
        }
        self.next += k as u64;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_batches_carry_their_tokenization_and_read_back_as_rows() {
        let meta: schemas::TokenizationMetadata = serde_json::from_value(serde_json::json!({
            "sae_lens_version": "6.54.12", "tokenizer_name": "t", "original_dataset": "d",
            "original_dataset_name": null, "original_split": null, "original_data_files": null,
            "original_column_name": "text", "context_size": 3, "shuffled": false, "seed": null,
            "begin_batch_token": "bos", "begin_sequence_token": null,
            "sequence_separator_token": 7, "disable_concat_sequences": false
        }))
        .unwrap();
        let schema = tokens_schema(&meta);
        let b = tokens_batch(&schema, &[vec![1, 2, 3], vec![4, 5, 6]]).unwrap();
        assert_eq!(b.num_rows(), 2);
        assert_eq!(
            list_row_ids(Path::new("x"), b.column(0), 1).unwrap(),
            [4, 5, 6]
        );
        assert_eq!(tokens_metadata(&b.schema()).unwrap().unwrap(), meta);
        let e = tokens_batch(&schema, &[vec![1, 2]])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("has 2 ids") && e.contains("context_size is 3"),
            "{e}"
        );
    }
}
