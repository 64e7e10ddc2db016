//! Seeded synthetic streams of every kind, for benchmarks and tests of the transport:
//! `synthetic:activations?batches=200&rows=4096&d=768&hooks=2&seed=1`. Batch `p` is a
//! function of the seed and `p` (of `p mod distinct` when `distinct` is given, which
//! keeps generation out of a transport benchmark), so any position can be a start.

use crate::stream::{BatchSource, StreamError};
use arrow_array::{
    ArrayRef, FixedSizeListArray, Int32Array, RecordBatch, UInt32Array, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use schemas::streams::{self, columns, meta};
use std::collections::HashMap;
use std::sync::Arc;

pub const PREFIX: &str = "synthetic:";

#[derive(Clone, Debug)]
struct Spec {
    kind: &'static str,
    batches: u64,
    rows: usize,
    d: usize,
    hooks: usize,
    context: usize,
    seed: u64,
    distinct: Option<u64>,
    delay_ms: u64,
}

fn bad(spec: &str, m: impl std::fmt::Display) -> StreamError {
    StreamError::Other(format!("{PREFIX}{spec}: {m}"))
}

impl Spec {
    fn parse(spec: &str) -> Result<Spec, StreamError> {
        let (kind, query) = spec.split_once('?').unwrap_or((spec, ""));
        let kind = streams::KINDS
            .into_iter()
            .find(|k| *k == kind)
            .ok_or_else(|| {
                bad(
                    spec,
                    format!("kind '{kind}' is not one of {:?}", streams::KINDS),
                )
            })?;
        let mut s = Spec {
            kind,
            batches: 16,
            rows: 4096,
            d: 768,
            hooks: 1,
            context: 128,
            seed: 0,
            distinct: None,
            delay_ms: 0,
        };
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(spec, format!("'{kv}' is not key=value")))?;
            let n: u64 = v
                .parse()
                .map_err(|_| bad(spec, format!("{k}={v}: expected a whole number")))?;
            match k {
                "batches" => s.batches = n,
                "rows" => s.rows = n as usize,
                "d" => s.d = n as usize,
                "hooks" => s.hooks = n as usize,
                "context" => s.context = n as usize,
                "seed" => s.seed = n,
                "distinct" => s.distinct = Some(n.max(1)),
                "delay_ms" => s.delay_ms = n,
                _ => return Err(bad(
                    spec,
                    format!("unknown key '{k}' (batches, rows, d, hooks, context, seed, distinct, delay_ms)"),
                )),
            }
        }
        if s.rows == 0 || s.d == 0 || s.context == 0 || s.hooks == 0 {
            return Err(bad(spec, "rows, d, context and hooks must be at least 1"));
        }
        Ok(s)
    }
}

/// The hook column names of a synthetic activation stream.
pub fn hook_names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("blocks.{i}.hook_resid_pre"))
        .collect()
}

pub struct Synthetic {
    spec: Spec,
    text: String,
    schema: SchemaRef,
    position: u64,
    cache: HashMap<u64, RecordBatch>,
}

impl Synthetic {
    /// `spec` without the `synthetic:` prefix.
    pub fn open(spec: &str, position: u64) -> Result<Synthetic, StreamError> {
        let s = Spec::parse(spec)?;
        if position > s.batches {
            return Err(bad(
                spec,
                format!(
                    "cannot start at position {position}: the stream has {} batches",
                    s.batches
                ),
            ));
        }
        let mut md: HashMap<String, String> = [
            (meta::STREAM.to_string(), s.kind.to_string()),
            // no parameters here: merges of synthetic streams must match
            (meta::SYNTHETIC.to_string(), "true".to_string()),
        ]
        .into();
        let list = |t: DataType, n: usize| {
            DataType::FixedSizeList(Arc::new(Field::new("item", t, false)), n as i32)
        };
        let fields = if s.kind == streams::TOKENS {
            let tm = schemas::TokenizationMetadata::new("synthetic", "synthetic", s.context);
            md.insert(
                schemas::tokens::STREAM_METADATA_KEY.into(),
                serde_json::to_string(&tm).expect("serialises"),
            );
            vec![Field::new(
                schemas::columns::INPUT_IDS,
                list(DataType::Int32, s.context),
                false,
            )]
        } else {
            md.insert(meta::DTYPE.into(), streams::FLOAT32.into());
            let d_in: serde_json::Map<String, serde_json::Value> = hook_names(s.hooks)
                .into_iter()
                .map(|h| (h, s.d.into()))
                .collect();
            md.insert(
                meta::D_IN.into(),
                serde_json::Value::Object(d_in).to_string(),
            );
            if s.kind == streams::BATCHES {
                md.insert(meta::SHUFFLE_SEED.into(), s.seed.to_string());
                md.insert(meta::BATCH_ROWS.into(), s.rows.to_string());
            }
            let mut f: Vec<Field> = hook_names(s.hooks)
                .into_iter()
                .map(|h| Field::new(h, list(DataType::Float32, s.d), false))
                .collect();
            f.push(Field::new(columns::SEQ, DataType::UInt64, false));
            f.push(Field::new(columns::POS, DataType::UInt32, false));
            f.push(Field::new(columns::TOKEN_ID, DataType::Int32, false));
            f
        };
        Ok(Synthetic {
            spec: s,
            text: format!("{PREFIX}{spec}"),
            schema: Arc::new(Schema::new(fields).with_metadata(md)),
            position,
            cache: HashMap::new(),
        })
    }

    fn make(&self, p: u64) -> Result<RecordBatch, StreamError> {
        let s = &self.spec;
        let mut rng = ChaCha8Rng::seed_from_u64(s.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ p);
        let err = |e: arrow_schema::ArrowError| StreamError::Other(format!("{}: {e}", self.text));
        let cols: Vec<ArrayRef> = if s.kind == streams::TOKENS {
            let ids: Int32Array = (0..s.rows * s.context)
                .map(|_| rng.random_range(0..50_000))
                .collect();
            let item = Arc::new(Field::new("item", DataType::Int32, false));
            vec![Arc::new(
                FixedSizeListArray::try_new(item, s.context as i32, Arc::new(ids), None)
                    .map_err(err)?,
            )]
        } else {
            let mut cols: Vec<ArrayRef> = Vec::new();
            for _ in 0..s.hooks {
                let v: Vec<f32> = (0..s.rows * s.d)
                    .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                    .collect();
                cols.push(Arc::new(crate::files::f32_rows_column(v, s.d)?));
            }
            let g0 = p * s.rows as u64;
            let c = s.context as u64;
            cols.push(Arc::new(UInt64Array::from_iter_values(
                (g0..g0 + s.rows as u64).map(|g| g / c),
            )));
            cols.push(Arc::new(UInt32Array::from_iter_values(
                (g0..g0 + s.rows as u64).map(|g| (g % c) as u32),
            )));
            cols.push(Arc::new(Int32Array::from_iter_values(
                (0..s.rows).map(|_| rng.random_range(0..50_000)),
            )));
            cols
        };
        RecordBatch::try_new(self.schema.clone(), cols).map_err(err)
    }
}

impl BatchSource for Synthetic {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn position(&self) -> u64 {
        self.position
    }
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, StreamError> {
        if self.position >= self.spec.batches {
            return Ok(None);
        }
        if self.spec.delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(self.spec.delay_ms));
        }
        let p = self.position;
        let b = match self.spec.distinct {
            Some(k) => {
                let key = p % k;
                if !self.cache.contains_key(&key) {
                    let b = self.make(key)?;
                    self.cache.insert(key, b);
                }
                self.cache[&key].clone()
            }
            None => self.make(p)?,
        };
        self.position += 1;
        Ok(Some(b))
    }
    fn describe(&self) -> String {
        self.text.clone()
    }
}
