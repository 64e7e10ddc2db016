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

/// Every combination of begin-batch / begin-sequence / separator token (none, the
/// "bos" 100, a token 7 that also occurs in the data), disable_concat_sequences and
/// context sizes 1, 2, 5, 16, on documents from empty to longer than two windows, some
/// starting with a special token: SAELens 6.54.12's own windows
/// (`tests/tokenizer/make_pack_combos.py`), equal id for id.
#[test]
fn every_token_option_combination_packs_as_saelens() {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("pretok/pack_combos.json")).unwrap(),
    )
    .unwrap();
    let docs: Vec<Vec<u32>> = serde_json::from_value(v["documents"].clone()).unwrap();
    assert!(docs.iter().any(|d| d.len() > 32) && docs.iter().any(|d| d.is_empty()));
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3 * 3 * 3 * 2 * 4);
    let id = |c: &serde_json::Value, k: &str| c[k].as_u64().map(|t| t as u32);
    let (mut compared, mut refused) = (0, 0);
    for c in cases {
        let opts = PackOptions {
            context_size: c["context_size"].as_u64().unwrap() as usize,
            begin_batch_token: id(c, "begin_batch_token"),
            begin_sequence_token: id(c, "begin_sequence_token"),
            sequence_separator_token: id(c, "sequence_separator_token"),
            disable_concat_sequences: c["disable_concat_sequences"].as_bool().unwrap(),
        };
        if c["windows"] == "endless" {
            // SAELens never returns here; we refuse the settings instead.
            assert!(opts.check().is_err(), "{opts:?} should be refused");
            refused += 1;
            continue;
        }
        assert!(opts.check().is_ok(), "{opts:?}");
        let want: Vec<Vec<u32>> = serde_json::from_value(c["windows"].clone()).unwrap();
        let got = pack_documents(docs.iter().map(|d| d.as_slice()), opts, 0);
        assert_eq!(got, want, "{opts:?}");
        compared += 1;
    }
    assert_eq!((compared, refused), (198, 18));
}

/// The streaming path (dataset → groups of 1000 documents → windows) gives the same
/// 700 windows as SAELens, a chunk at a time.
#[test]
fn the_window_stream_equals_saelens_pretokenize() {
    let fx = fixtures();
    let args = tokenizer::windows::TokensArgs::new(
        &fx.join("pretok/corpus.jsonl"),
        &fx.join("tiny-gpt2"),
        128,
    );
    let saelens = tokenizer::windows::Grouping {
        batch_size: 1000,
        num_proc: 1,
    };
    let mut windows = args.open(saelens).unwrap();
    assert!(!windows.is_pretokenized());
    let got: Vec<Vec<u32>> = windows.by_ref().flat_map(|c| c.unwrap()).collect();
    let want = pipeline::read_tokens(&fx.join("pretok/tokens_all.npy")).unwrap();
    let want: Vec<Vec<u32>> = want
        .ids
        .chunks(128)
        .map(|r| r.iter().map(|&t| t as u32).collect())
        .collect();
    assert_eq!(got, want);
    assert_eq!(windows.counts.documents, 500);
    assert_eq!(windows.counts.document_tokens, 88529);
    assert_eq!(windows.counts.windows, 700);
    // Groups of 7 documents restart the window 72 times: fewer windows.
    let small = tokenizer::windows::Grouping {
        batch_size: 7,
        num_proc: 1,
    };
    let n: usize = args.open(small).unwrap().map(|c| c.unwrap().len()).sum();
    assert!(n < 700, "{n}");
}
