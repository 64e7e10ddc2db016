//! Tokenize + pack the fixture corpus and compare with SAELens 6.54.12's own
//! `PretokenizeRunner` output on it (`tests/fixtures/pretok`): exact equality of every id.

use std::path::PathBuf;
use tokenizer::pack::{pack_documents, PackOptions};
use tokenizer::tokenize::TextTokenizer;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn packs_the_corpus_exactly_as_saelens() {
    let fx = fixtures();
    let settings: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fx.join("pretok/pretokenize_settings.json")).unwrap(),
    )
    .unwrap();
    let s = &settings["settings"];
    let tok = TextTokenizer::load(&fx.join("tiny-gpt2")).unwrap();
    // The recorded settings: bos / none / bos, resolved by SAELens to 4095, -, 4095.
    let opt = |k: &str| s[k].as_str().unwrap_or("none").to_string();
    let opts = PackOptions {
        context_size: s["context_size"].as_u64().unwrap() as usize,
        begin_batch_token: tok.special_token(&opt("begin_batch_token")).unwrap(),
        begin_sequence_token: tok.special_token(&opt("begin_sequence_token")).unwrap(),
        sequence_separator_token: tok.special_token(&opt("sequence_separator_token")).unwrap(),
        disable_concat_sequences: s["disable_concat_sequences"].as_bool().unwrap(),
    };
    let resolved = &settings["resolved_special_tokens"];
    assert_eq!(
        opts.begin_batch_token,
        resolved["begin_batch_token_id"].as_u64().map(|v| v as u32)
    );
    assert_eq!(
        opts.sequence_separator_token,
        resolved["sequence_separator_token_id"]
            .as_u64()
            .map(|v| v as u32)
    );
    assert_eq!(opts.begin_sequence_token, None);

    let texts: Vec<String> = std::fs::read_to_string(fx.join("pretok/corpus.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()
                [s["column_name"].as_str().unwrap()]
            .as_str()
            .unwrap()
            .to_string()
        })
        .collect();
    assert_eq!(texts.len(), 500);
    let docs = tok.encode_all(&texts).unwrap();
    let n_tokens: usize = docs.iter().map(|d| d.len()).sum();
    assert_eq!(
        n_tokens,
        settings["n_document_tokens_total"].as_u64().unwrap() as usize
    );
    let group = s["pretokenize_batch_size"].as_u64().unwrap() as usize;
    let windows = pack_documents(docs.iter().map(|d| d.as_slice()), opts, group);

    let want = pipeline::read_tokens(&fx.join("pretok/tokens_all.npy")).unwrap();
    assert_eq!((windows.len(), 128), (want.n_seq, want.seq_len));
    for (i, (w, r)) in windows.iter().zip(want.ids.chunks(128)).enumerate() {
        let r: Vec<u32> = r.iter().map(|&v| v as u32).collect();
        assert_eq!(w, &r, "window {i}");
    }
}

#[test]
fn token_options_resolve_or_say_why() {
    let tok = TextTokenizer::load(&fixtures().join("tiny-gpt2")).unwrap();
    assert_eq!(tok.special_token("bos").unwrap(), Some(4095));
    assert_eq!(tok.special_token("eos").unwrap(), Some(4095));
    assert_eq!(tok.special_token("7").unwrap(), Some(7));
    assert_eq!(tok.special_token("none").unwrap(), None);
    let e = tok.special_token("sep").unwrap_err().to_string();
    assert!(e.contains("the tokenizer has no sep_token"), "{e}");
    let e = tok.special_token("4096").unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary (0..4096)"), "{e}");
    let e = tok.special_token("bso").unwrap_err().to_string();
    assert!(
        e.contains("expected bos, eos, sep, none or a token id"),
        "{e}"
    );
    let e = TextTokenizer::load(&fixtures().join("acts"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a readable tokenizer.json"), "{e}");
}
