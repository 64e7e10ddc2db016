//! The pipeline's streams: their names, columns and schema-metadata keys, the Flight
//! ticket a consumer sends, the status a server reports, and the shard manifest. The
//! Arrow schemas themselves are built in `pipeline` (this crate has no Arrow).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The stream of token windows (one row per sequence).
pub const TOKENS: &str = "tokens";
/// Hook activations (one row per token position).
pub const ACTIVATIONS: &str = "activations";
/// Shuffled training batches (one record batch per training step).
pub const BATCHES: &str = "batches";
/// Every stream kind, in pipeline order.
pub const KINDS: [&str; 3] = [TOKENS, ACTIVATIONS, BATCHES];

/// Provenance columns of the `activations` and `batches` streams.
pub mod columns {
    /// Index of the sequence in the `tokens` stream.
    pub const SEQ: &str = "seq";
    /// Position of the token inside its sequence.
    pub const POS: &str = "pos";
    /// The token id at that position.
    pub const TOKEN_ID: &str = "token_id";
}

/// Schema-metadata keys set by the pipeline (beside `sae_lens` on `tokens`).
pub mod meta {
    /// Which stream kind this is ([`super::KINDS`]).
    pub const STREAM: &str = "saestream.stream";
    /// Storage/wire dtype of the activation columns: [`super::FLOAT32`] or [`super::FLOAT16`].
    pub const DTYPE: &str = "saestream.dtype";
    /// The model the activations come from.
    pub const MODEL: &str = "saestream.model";
    /// JSON object `{hook: d_in}`.
    pub const D_IN: &str = "saestream.d_in";
    /// SAELens's `seqpos_slice`, as JSON.
    pub const SEQPOS_SLICE: &str = "saestream.seqpos_slice";
    /// SAELens's `hook_head_index`, as JSON.
    pub const HEAD_INDEX: &str = "saestream.hook_head_index";
    /// The shuffler's seed (`batches`).
    pub const SHUFFLE_SEED: &str = "saestream.shuffle_seed";
    /// Tokens per sequence, where a source knows it (a SAELens cache).
    pub const CONTEXT_SIZE: &str = "saestream.context_size";
    /// Batch size in rows (`batches`).
    pub const BATCH_ROWS: &str = "saestream.batch_rows";
    /// Marks a generated stream (`pipeline bench-flight`, tests).
    pub const SYNTHETIC: &str = "saestream.synthetic";
}

/// Activation dtypes as the metadata spells them.
pub const FLOAT32: &str = "float32";
pub const FLOAT16: &str = "float16";

/// URL schemes of Flight endpoints: `grpc://HOST:PORT/STREAM`, `grpc+tls://…`.
pub const SCHEME_GRPC: &str = "grpc";
pub const SCHEME_GRPC_TLS: &str = "grpc+tls";
/// Query keys of a stream URL (`grpc://h:p/acts?consumer=t0&columns=a,b`).
pub mod url_keys {
    pub const CONSUMER: &str = "consumer";
    pub const COLUMNS: &str = "columns";
}
/// The header carrying the shared token (`authorization: Bearer <token>`).
pub const AUTH_HEADER: &str = "authorization";
pub const AUTH_SCHEME: &str = "Bearer ";

/// Version of [`Ticket`]; a ticket without it is not ours.
pub const TICKET_VERSION: u32 = 1;

/// What a consumer asks a Flight server for (the `DoGet` ticket, as JSON). Tickets are
/// data, never paths: `stream` must be one of the names the server serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ticket {
    /// [`TICKET_VERSION`].
    pub saestream: u32,
    pub stream: String,
    /// Index of the first batch wanted.
    #[serde(default)]
    pub position: u64,
    /// Only these columns cross the wire (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// Which of the stream's consumers this is (may be omitted where there is one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
}

impl Ticket {
    pub fn new(stream: &str, position: u64) -> Ticket {
        Ticket {
            saestream: TICKET_VERSION,
            stream: stream.to_string(),
            position,
            columns: None,
            consumer: None,
        }
    }
}

/// Key of the per-batch Flight `app_metadata` object: the batch's position.
pub const POSITION_KEY: &str = "position";

/// How a served stream is split among its consumers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every consumer receives every batch.
    Broadcast,
    /// Batch `p` goes to consumer `p mod N` only.
    Partition,
}

/// One consumer as a server sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConsumerStatus {
    pub name: String,
    /// The next position it will be sent.
    pub position: u64,
    pub connected: bool,
    /// It has received the whole stream.
    pub done: bool,
}

/// A served stream's state (`FlightInfo.app_metadata`, `pipeline inspect`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamStatus {
    pub name: String,
    pub mode: Mode,
    /// Batches and rows produced so far.
    pub batches: u64,
    pub rows: u64,
    /// The source has ended (the totals are final).
    pub finished: bool,
    /// Positions held: `[window_start, window_end)`.
    pub window_start: u64,
    pub window_end: u64,
    pub window_bytes: u64,
    pub window_peak_bytes: u64,
    pub window_limit_bytes: u64,
    pub consumers: Vec<ConsumerStatus>,
}

/// The file describing a shard directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// A shuffler snapshot directory: its state and its buffer's rows (Arrow IPC file).
pub const SNAPSHOT_STATE_FILE: &str = "state.json";
pub const SNAPSHOT_BUFFER_FILE: &str = "buffer.arrow";
pub const SNAPSHOT_FORMAT: &str = "saestream.shuffler-snapshot/1";
/// `format` of a manifest written by this version.
pub const MANIFEST_FORMAT: &str = "saestream.shards/1";
/// Shard file names: `shard-00000.arrow`, …
pub const SHARD_PREFIX: &str = "shard-";
pub const SHARD_EXT: &str = "arrow";

/// One column of a schema, as the manifest shows it to people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldDesc {
    pub name: String,
    #[serde(rename = "type")]
    pub data_type: String,
    pub nullable: bool,
}

/// One complete shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    pub file: String,
    /// Position of its first batch in the stream.
    pub first_position: u64,
    pub batches: u64,
    pub rows: u64,
    pub bytes: u64,
    /// xxHash3-64 of the file's bytes, 16 hex digits.
    pub xxh3: String,
}

/// `manifest.json`: the stream's schema and metadata and the list of complete shards.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    /// The Arrow schema, IPC-encoded, base64 (exact; what readers use).
    pub schema_ipc: String,
    /// The same schema for people.
    pub fields: Vec<FieldDesc>,
    pub metadata: BTreeMap<String, String>,
    /// The writer finished the stream (an interrupted writer leaves `false`).
    pub complete: bool,
    pub batches: u64,
    pub rows: u64,
    pub bytes: u64,
    pub shards: Vec<ShardEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_strict_json() {
        let mut t = Ticket::new("acts", 5);
        t.consumer = Some("t0".into());
        let j = serde_json::to_string(&t).unwrap();
        assert_eq!(
            j,
            r#"{"saestream":1,"stream":"acts","position":5,"consumer":"t0"}"#
        );
        assert_eq!(serde_json::from_str::<Ticket>(&j).unwrap(), t);
        assert!(serde_json::from_str::<Ticket>(r#"{"stream":"acts"}"#).is_err());
        assert!(
            serde_json::from_str::<Ticket>(r#"{"saestream":1,"stream":"a","path":"/etc"}"#)
                .is_err()
        );
    }
}
