//! Half precision as a storage and wire option: the activation columns
//! (`FixedSizeList<Float32 | Float16>`) of a stream converted to f16 or back to f32.
//! The SAE math always reads f32 ([`crate::source::rows_f32`] widens f16).

use crate::stream::{BatchSource, Mapped, StreamError};
use arrow_array::{Array, ArrayRef, FixedSizeListArray, Float16Array, Float32Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use half::slice::HalfFloatSliceExt;
use schemas::streams::{meta, FLOAT16, FLOAT32};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActDtype {
    F32,
    F16,
}

impl ActDtype {
    pub fn parse(s: &str) -> Result<ActDtype, String> {
        match s {
            "f32" | "float32" => Ok(ActDtype::F32),
            "f16" | "float16" => Ok(ActDtype::F16),
            _ => Err(format!(
                "dtype '{s}': expected float32 (f32) or float16 (f16)"
            )),
        }
    }
    fn arrow(self) -> DataType {
        match self {
            ActDtype::F32 => DataType::Float32,
            ActDtype::F16 => DataType::Float16,
        }
    }
    fn name(self) -> &'static str {
        match self {
            ActDtype::F32 => FLOAT32,
            ActDtype::F16 => FLOAT16,
        }
    }
}

fn is_activation(dt: &DataType) -> Option<(&Arc<Field>, i32)> {
    match dt {
        DataType::FixedSizeList(item, n)
            if matches!(item.data_type(), DataType::Float32 | DataType::Float16) =>
        {
            Some((item, *n))
        }
        _ => None,
    }
}

/// `schema` with its activation columns in `dtype` (unchanged when it has none).
pub fn convert_schema(schema: &Schema, dtype: ActDtype) -> SchemaRef {
    let mut any = false;
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match is_activation(f.data_type()) {
            Some((item, n)) => {
                any = true;
                let item = Arc::new(item.as_ref().clone().with_data_type(dtype.arrow()));
                f.as_ref()
                    .clone()
                    .with_data_type(DataType::FixedSizeList(item, n))
            }
            None => f.as_ref().clone(),
        })
        .collect();
    let mut md = schema.metadata().clone();
    if any {
        md.insert(meta::DTYPE.into(), dtype.name().into());
    }
    Arc::new(Schema::new(fields).with_metadata(md))
}

fn convert_column(col: &ArrayRef, field: &Field) -> Result<ArrayRef, StreamError> {
    let Some((item, n)) = is_activation(field.data_type()) else {
        return Ok(col.clone());
    };
    if col.data_type() == field.data_type() {
        return Ok(col.clone());
    }
    let list = col
        .as_any()
        .downcast_ref::<FixedSizeListArray>()
        .ok_or_else(|| StreamError::Other(format!("column '{}' is not a list", field.name())))?;
    if list.null_count() > 0 {
        return Err(StreamError::Other(format!(
            "column '{}' has null rows",
            field.name()
        )));
    }
    let (start, len) = (list.offset() * n as usize, list.len() * n as usize);
    let values = list.values();
    let out: ArrayRef = if let Some(v) = values.as_any().downcast_ref::<Float32Array>() {
        let mut h = vec![half::f16::ZERO; len];
        h.convert_from_f32_slice(&v.values()[start..start + len]);
        Arc::new(Float16Array::from(h))
    } else if let Some(v) = values.as_any().downcast_ref::<Float16Array>() {
        let mut f = vec![0f32; len];
        v.values()[start..start + len].convert_to_f32_slice(&mut f);
        Arc::new(Float32Array::from(f))
    } else {
        return Err(StreamError::Other(format!(
            "column '{}' holds neither f32 nor f16",
            field.name()
        )));
    };
    Ok(Arc::new(
        FixedSizeListArray::try_new(item.clone(), n, out, None)
            .map_err(|e| StreamError::Other(e.to_string()))?,
    ))
}

/// `batch` in the column types of `schema` (from [`convert_schema`]).
pub fn convert_batch(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, StreamError> {
    let cols = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| convert_column(c, f))
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), cols).map_err(|e| StreamError::Other(e.to_string()))
}

/// `inner` with its activation columns converted to `dtype`.
pub fn convert_source(inner: Box<dyn BatchSource>, dtype: ActDtype) -> Mapped {
    let schema = convert_schema(&inner.schema(), dtype);
    let target = schema.clone();
    Mapped::new(inner, schema, move |b| convert_batch(&b, &target))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::Synthetic;

    #[test]
    fn f16_round_trip_is_what_half_gives() {
        let mut s = Synthetic::open("activations?batches=1&rows=3&d=5&hooks=2", 0).unwrap();
        let b = s.next_batch().unwrap().unwrap();
        let h = convert_schema(&b.schema(), ActDtype::F16);
        assert_eq!(h.metadata()[meta::DTYPE], FLOAT16);
        let hb = convert_batch(&b, &h).unwrap();
        let back = convert_batch(&hb, &convert_schema(&h, ActDtype::F32)).unwrap();
        let path = std::path::Path::new("x");
        for c in 0..2 {
            let list = |b: &RecordBatch| {
                b.column(c)
                    .as_any()
                    .downcast_ref::<FixedSizeListArray>()
                    .unwrap()
                    .clone()
            };
            let orig = crate::source::rows_f32(path, &list(&b), 5).unwrap();
            let got = crate::source::rows_f32(path, &list(&back), 5).unwrap();
            let want: Vec<f32> = orig
                .iter()
                .map(|&x| half::f16::from_f32(x).to_f32())
                .collect();
            assert_eq!(got, want);
            assert_ne!(got, orig, "f16 rounds");
        }
        // provenance columns untouched
        assert_eq!(back.column(2), b.column(2));
    }
}
