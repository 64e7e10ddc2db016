//! `--query`: SQL over a dataset with DataFusion (the `sql` feature). The dataset is the
//! table `data`, streamed from its files a batch at a time, so a filter or projection
//! runs in bounded memory: `SELECT text FROM data WHERE length(text) > 200`.

use crate::sources::{err, Batches, Dataset, SourceError};
use arrow_array::RecordBatch;
use arrow_schema::{Field, Schema, SchemaRef};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::StreamExt;
use std::path::PathBuf;
use std::sync::Arc;

/// The table name a query reads from.
pub const TABLE: &str = "data";

#[derive(Debug)]
struct DatasetPartition {
    dataset: Dataset,
    schema: SchemaRef,
}

impl PartitionStream for DatasetPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let schema = self.schema.clone();
        let batches = self.dataset.batches().map(move |r| {
            r.and_then(|(path, b)| conform(&path, b, &schema))
                .map_err(|e| DataFusionError::External(Box::new(e)))
        });
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::stream::iter(batches),
        ))
    }
}

/// Brings a later file's batch to the table's schema (same columns, cast where the
/// inferred types differ), or names the column it lacks.
fn conform(
    path: &std::path::Path,
    batch: RecordBatch,
    schema: &SchemaRef,
) -> Result<RecordBatch, SourceError> {
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            let c = batch.column_by_name(f.name()).ok_or_else(|| {
                err(
                    path,
                    format!("has no column '{}' (the first file has)", f.name()),
                )
            })?;
            if c.data_type() == f.data_type() {
                Ok(c.clone())
            } else {
                arrow_cast::cast(c, f.data_type())
                    .map_err(|e| err(path, format!("column '{}': {e}", f.name())))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| err(path, e))
}

/// Runs `sql` over the dataset; the result's schema and its batches, in order.
pub fn query(dataset: &Dataset, sql: &str) -> Result<(SchemaRef, Batches), SourceError> {
    let origin = dataset.spec.clone();
    let fail = |e: DataFusionError| err(&origin, format!("query failed: {e}"));
    let first = dataset.schema()?;
    // Nullable everywhere, so files that differ only in nullability agree.
    let fields: Vec<Field> = first
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let partition = DatasetPartition {
        dataset: dataset.clone(),
        schema: schema.clone(),
    };
    let table = StreamingTable::try_new(schema, vec![Arc::new(partition)]).map_err(fail)?;
    // One partition keeps the dataset's row order (no round-robin repartitioning).
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    ctx.register_table(TABLE, Arc::new(table)).map_err(fail)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| err(&origin, e))?;
    let stream = runtime
        .block_on(async { ctx.sql(sql).await?.execute_stream().await })
        .map_err(fail)?;
    let result_schema = stream.schema();
    Ok((
        result_schema,
        Box::new(QueryBatches {
            runtime,
            stream,
            origin,
        }),
    ))
}

/// The query's result batches, pulled one at a time on a private runtime.
struct QueryBatches {
    runtime: tokio::runtime::Runtime,
    stream: SendableRecordBatchStream,
    origin: PathBuf,
}

impl Iterator for QueryBatches {
    type Item = Result<(PathBuf, RecordBatch), SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        let next = self.runtime.block_on(self.stream.next())?;
        Some(match next {
            Ok(b) => Ok((self.origin.clone(), b)),
            // A source error inside the query comes back as itself.
            Err(DataFusionError::External(e)) => match e.downcast::<SourceError>() {
                Ok(se) => Err(*se),
                Err(e) => Err(err(&self.origin, format!("query failed: {e}"))),
            },
            Err(e) => Err(err(&self.origin, format!("query failed: {e}"))),
        })
    }
}
