//! The runtime every stage shares. Today: activation sources (safetensors, Arrow IPC and
//! Parquet files, directories of shards) and training batches drawn from them, in order
//! or through SAELens's seeded mixing buffer.

pub mod batches;
pub mod source;
pub mod staging;
pub mod sys;
pub mod tokens;

pub use batches::Batches;
pub use source::{open, RowSource, SourceError};
pub use tokens::{read_tokens, TokenRows};
