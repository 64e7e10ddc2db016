//! The `activations` stream's schema and batches: one `FixedSizeList<Float32>[d]` column
//! per hook (named by the hook), then `seq`, `pos` and `token_id` for provenance.

use crate::stream::StreamError;
use arrow_array::{ArrayRef, Int32Array, RecordBatch, UInt32Array, UInt64Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use schemas::streams::{self, columns, meta};
use std::sync::Arc;

/// How the activations were made (the schema's metadata).
pub struct ActsMeta<'a> {
    pub model: &'a str,
    pub seqpos_slice: Option<&'a str>,
    pub hook_head_index: Option<usize>,
}

/// The schema for `hooks` (name, width).
pub fn activations_schema(hooks: &[(String, usize)], m: &ActsMeta) -> SchemaRef {
    let list = |n: usize| {
        DataType::FixedSizeList(
            Arc::new(Field::new("item", DataType::Float32, false)),
            n as i32,
        )
    };
    let mut fields: Vec<Field> = hooks
        .iter()
        .map(|(h, d)| Field::new(h, list(*d), false))
        .collect();
    fields.push(Field::new(columns::SEQ, DataType::UInt64, false));
    fields.push(Field::new(columns::POS, DataType::UInt32, false));
    fields.push(Field::new(columns::TOKEN_ID, DataType::Int32, false));
    let d_in: serde_json::Map<String, serde_json::Value> = hooks
        .iter()
        .map(|(h, d)| (h.clone(), (*d).into()))
        .collect();
    let mut md = std::collections::HashMap::from([
        (meta::STREAM.to_string(), streams::ACTIVATIONS.to_string()),
        (meta::DTYPE.to_string(), streams::FLOAT32.to_string()),
        (meta::MODEL.to_string(), m.model.to_string()),
        (
            meta::D_IN.to_string(),
            serde_json::Value::Object(d_in).to_string(),
        ),
    ]);
    if let Some(s) = m.seqpos_slice {
        md.insert(meta::SEQPOS_SLICE.into(), s.to_string());
    }
    if let Some(h) = m.hook_head_index {
        md.insert(meta::HEAD_INDEX.into(), h.to_string());
    }
    Arc::new(Schema::new(fields).with_metadata(md))
}

/// One batch: per hook its rows (row-major, the schema's width), and per row its
/// sequence, position and token.
pub fn activations_batch(
    schema: &SchemaRef,
    hooks: Vec<Vec<f32>>,
    seq: Vec<u64>,
    pos: Vec<u32>,
    token_id: Vec<i32>,
) -> Result<RecordBatch, StreamError> {
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(hooks.len() + 3);
    for (values, f) in hooks.into_iter().zip(schema.fields()) {
        let DataType::FixedSizeList(_, d) = f.data_type() else {
            return Err(StreamError::Other(format!(
                "column '{}' is not a list",
                f.name()
            )));
        };
        cols.push(Arc::new(crate::files::f32_rows_column(
            values,
            *d as usize,
        )?));
    }
    cols.push(Arc::new(UInt64Array::from(seq)));
    cols.push(Arc::new(UInt32Array::from(pos)));
    cols.push(Arc::new(Int32Array::from(token_id)));
    RecordBatch::try_new(schema.clone(), cols)
        .map_err(|e| StreamError::Other(format!("activations batch: {e}")))
}
