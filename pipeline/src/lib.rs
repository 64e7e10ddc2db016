//! The runtime every stage shares: the stream seam ([`stream`]: Arrow record batches
//! with a position, from files, shard directories or Flight endpoints, to shards or a
//! Flight server), Arrow Flight transport ([`flight`]), deterministic merges
//! ([`merge`]), shard caches ([`shards`]), activation rows and training batches drawn
//! from any stream ([`source`], [`batches`]), token files ([`tokens`]).

pub mod acts;
pub mod batches;
pub mod cli;
pub mod convert;
pub mod files;
pub mod flight;
pub use schemas::hub;
pub mod merge;
pub mod mixer;
pub mod output;
pub mod queue;
pub mod rendezvous;
pub mod saelens_cache;
pub mod shards;
pub mod source;
pub mod staging;
pub mod stream;
pub mod synthetic;
pub mod sys;
pub mod tls;
pub mod tokens;

pub use arrow_array::RecordBatch;
pub use batches::Batches;
pub use source::{open, RowSource};
pub use stream::{
    open_source, open_sources, BatchSink, BatchSource, OpenOptions, SourceError, StreamError,
};
pub use tokens::{read_tokens, TokenRows};
