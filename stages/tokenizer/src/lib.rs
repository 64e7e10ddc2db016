//! The tokenizer stage's library: text documents → token windows, as SAELens makes them.
//!
//! Today: [`pack`] (SAELens 6's `concat_and_batch_sequences`, every token option) and
//! [`tokenize`] (the `tokenizers` crate, encoding as `tokenizer.encode` does). Dataset
//! sources, the Parquet output and the `tokenizer` command are still to come.

pub mod bench;
pub mod pack;
pub mod pretokenize;
pub mod sources;
pub mod tokenize;
