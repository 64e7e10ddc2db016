//! Tokenization with the `tokenizers` crate, as SAELens's `tokenizer.encode(text)`
//! does it (special tokens added by the tokenizer's post-processor, if it has one).

use rayon::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("{}: {message}", path.display())]
    Load { path: PathBuf, message: String },
    #[error("document {index}: {message}")]
    Encode { index: usize, message: String },
    #[error("token option '{spec}': {message}")]
    Token { spec: String, message: String },
}

/// A tokenizer and the special tokens its HF wrapper names (`bos_token`, ...).
pub struct TextTokenizer {
    pub tokenizer: Tokenizer,
    /// `tokenizer_config.json` next to `tokenizer.json`, if present.
    config: Option<Value>,
    /// The model's `config.json` there, if present (an HF model directory).
    model_config: Option<Value>,
}

impl TextTokenizer {
    /// Loads `PATH` (a `tokenizer.json`) or `PATH/tokenizer.json` (an HF model or
    /// tokenizer directory); `tokenizer_config.json` beside it names bos/eos/sep.
    pub fn load(path: &Path) -> Result<TextTokenizer, TokenizeError> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let tokenizer = Tokenizer::from_file(&file).map_err(|e| TokenizeError::Load {
            path: file.clone(),
            message: format!("not a readable tokenizer.json: {e}"),
        })?;
        let beside = |name: &str| {
            file.parent()
                .map(|d| d.join(name))
                .and_then(|p| std::fs::read_to_string(p).ok())
                .and_then(|t| serde_json::from_str(&t).ok())
        };
        Ok(TextTokenizer {
            tokenizer,
            config: beside("tokenizer_config.json"),
            model_config: beside("config.json"),
        })
    }

    /// The longest context the tokenizer or its model allows, and who says so:
    /// `model_max_length` in `tokenizer_config.json` (HF writes a huge sentinel when
    /// there is none), or the model's `config.json` beside it (`n_positions`, `n_ctx`,
    /// `max_position_embeddings`).
    pub fn max_context(&self) -> Option<(usize, String)> {
        let from_tok = self.config.as_ref().and_then(|c| {
            let v = c["model_max_length"].as_f64()?;
            (v > 0.0 && v < 1e12)
                .then(|| (v as usize, "the tokenizer's model_max_length".to_string()))
        });
        let from_model = self.model_config.as_ref().and_then(|c| {
            ["n_positions", "n_ctx", "max_position_embeddings"]
                .iter()
                .find_map(|k| Some((c[*k].as_u64()? as usize, format!("the model's {k}"))))
        });
        [from_tok, from_model]
            .into_iter()
            .flatten()
            .min_by_key(|(n, _)| *n)
    }

    /// xxHash64 of the vocabulary (every id and its token, added tokens included), as
    /// 16 hex digits: two tokenizers with equal hashes map text to the same ids.
    pub fn vocab_hash(&self) -> String {
        use std::hash::Hasher;
        let mut h = twox_hash::XxHash64::with_seed(0);
        for id in 0..self.vocab_size() {
            if let Some(t) = self.tokenizer.id_to_token(id) {
                h.write(&id.to_le_bytes());
                h.write(t.as_bytes());
            }
        }
        format!("{:016x}", h.finish())
    }

    /// Ids run from 0 to this (added tokens included).
    pub fn vocab_size(&self) -> u32 {
        self.tokenizer.get_vocab_size(true) as u32
    }

    /// Token ids of every document, in parallel across cores.
    pub fn encode_all(&self, texts: &[String]) -> Result<Vec<Vec<u32>>, TokenizeError> {
        texts
            .par_iter()
            .enumerate()
            .map(|(index, t)| {
                self.tokenizer
                    .encode(t.as_str(), true)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| TokenizeError::Encode {
                        index,
                        message: e.to_string(),
                    })
            })
            .collect()
    }

    /// Resolves a SAELens token option: `bos`, `eos`, `sep`, a token id, or `none`.
    pub fn special_token(&self, spec: &str) -> Result<Option<u32>, TokenizeError> {
        let err = |message: String| TokenizeError::Token {
            spec: spec.to_string(),
            message,
        };
        match spec {
            "none" | "null" | "" => Ok(None),
            "bos" | "eos" | "sep" => {
                let key = format!("{spec}_token");
                let content = self
                    .config
                    .as_ref()
                    .map(|c| &c[&key])
                    .and_then(|v| v.as_str().or_else(|| v["content"].as_str()))
                    .ok_or_else(|| {
                        err(format!(
                            "the tokenizer has no {key} (tokenizer_config.json beside tokenizer.json names it); give a token id instead"
                        ))
                    })?;
                self.tokenizer
                    .token_to_id(content)
                    .map(Some)
                    .ok_or_else(|| err(format!("{key} '{content}' is not in the vocabulary")))
            }
            id => {
                let id: u32 = id
                    .parse()
                    .map_err(|_| err("expected bos, eos, sep, none or a token id".into()))?;
                let vocab = self.vocab_size();
                if id >= vocab {
                    return Err(err(format!(
                        "token id {id} is outside the vocabulary (0..{vocab})"
                    )));
                }
                Ok(Some(id))
            }
        }
    }
}
