//! Token windows: SAELens's pretokenized-dataset metadata (`sae_lens.json`) and the
//! `tokens` stream's schema metadata, which carries the same record.

use serde::{Deserialize, Serialize};

/// The metadata file SAELens writes beside a pretokenized dataset.
pub const METADATA_FILE: &str = "sae_lens.json";
/// The one data file `tokenizer pretokenize` writes (HF's shard naming).
pub const DATA_FILE: &str = "data-00000-of-00001.parquet";
/// Schema-metadata key of a `tokens` stream; its value is [`TokenizationMetadata`] as JSON.
pub const STREAM_METADATA_KEY: &str = "sae_lens";

/// A SAELens token option as written: `"bos"`/`"eos"`/`"sep"` or a token id
/// (`None` where SAELens writes null).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenSpec {
    Id(u32),
    Named(String),
}

impl TokenSpec {
    /// Parses the command-line spelling: `bos`, `eos`, `sep`, a token id, or `none`.
    pub fn parse(spec: &str) -> Option<TokenSpec> {
        match spec {
            "none" | "null" | "" => None,
            s => Some(
                s.parse::<u32>()
                    .map_or_else(|_| TokenSpec::Named(s.to_string()), TokenSpec::Id),
            ),
        }
    }
}

/// SAELens 6's `PretokenizedDatasetMetadata`, field for field and in its order. Our
/// own key (`tokenizer_vocab_hash`) follows; SAELens ignores keys it does not read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizationMetadata {
    pub sae_lens_version: String,
    pub tokenizer_name: String,
    pub original_dataset: String,
    pub original_dataset_name: Option<String>,
    pub original_split: Option<String>,
    pub original_data_files: Option<Vec<String>>,
    pub original_column_name: Option<String>,
    pub context_size: usize,
    pub shuffled: bool,
    pub seed: Option<u64>,
    pub begin_batch_token: Option<TokenSpec>,
    pub begin_sequence_token: Option<TokenSpec>,
    pub sequence_separator_token: Option<TokenSpec>,
    pub disable_concat_sequences: bool,
    #[serde(default)]
    pub use_chat_formatting: bool,
    /// xxHash64 of the tokenizer's vocabulary (see the tokenizer stage), so a mismatch is
    /// caught even where `tokenizer_name` is a hub name that cannot be loaded offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_vocab_hash: Option<String>,
}

impl TokenizationMetadata {
    /// A record of the current SAELens format with nothing inserted or shuffled; callers
    /// fill in what they did.
    pub fn new(tokenizer_name: &str, original_dataset: &str, context_size: usize) -> Self {
        TokenizationMetadata {
            sae_lens_version: crate::SAELENS_FORMAT_VERSION.to_string(),
            tokenizer_name: tokenizer_name.to_string(),
            original_dataset: original_dataset.to_string(),
            original_dataset_name: None,
            original_split: None,
            original_data_files: None,
            original_column_name: None,
            context_size,
            shuffled: false,
            seed: None,
            begin_batch_token: None,
            begin_sequence_token: None,
            sequence_separator_token: None,
            disable_concat_sequences: false,
            use_chat_formatting: false,
            tokenizer_vocab_hash: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_saelens_metadata_and_writes_it_back_in_its_spelling() {
        let text = r#"{"sae_lens_version": "6.54.12", "tokenizer_name": "gpt2",
            "original_dataset": "json", "original_dataset_name": null, "original_split": "train",
            "original_data_files": ["a.jsonl"], "original_column_name": "text", "context_size": 128,
            "shuffled": false, "seed": null, "begin_batch_token": "bos",
            "begin_sequence_token": null, "sequence_separator_token": 50256,
            "disable_concat_sequences": false, "use_chat_formatting": false}"#;
        let m: TokenizationMetadata = serde_json::from_str(text).unwrap();
        assert_eq!(m.begin_batch_token, Some(TokenSpec::Named("bos".into())));
        assert_eq!(m.sequence_separator_token, Some(TokenSpec::Id(50256)));
        assert_eq!(m.begin_sequence_token, None);
        let back: serde_json::Value = serde_json::to_value(&m).unwrap();
        let orig: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(back, orig, "no key added, dropped or respelled");
        assert_eq!(
            TokenSpec::parse("eos"),
            Some(TokenSpec::Named("eos".into()))
        );
        assert_eq!(TokenSpec::parse("7"), Some(TokenSpec::Id(7)));
        assert_eq!(TokenSpec::parse("none"), None);
    }
}
