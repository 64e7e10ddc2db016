//! The tokenizer stage's library: datasets → token windows, as SAELens makes them.
//!
//! [`sources`] reads datasets a record batch at a time ([`sql`] filters them with
//! DataFusion, behind the `sql` feature); [`tokenize`] encodes with the `tokenizers`
//! crate; [`pack`] is SAELens 6's `concat_and_batch_sequences`; [`windows`] joins them
//! into the `tokens` stream. The commands: [`pretokenize`] (SAELens's PretokenizeRunner
//! output), [`stream`] (the stream as an Arrow file), [`train`] (a BPE tokenizer) and
//! [`bench`].

pub mod bench;
pub mod pack;
pub mod pretokenize;
pub mod sources;
#[cfg(feature = "sql")]
pub mod sql;
pub mod stream;
pub mod tokenize;
pub mod train;
pub mod windows;
