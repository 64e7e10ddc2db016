//! SAELens's activation cache both ways: the cache SAELens's own CacheActivationsRunner
//! wrote (`fixtures/saelens_cache/`) read as an activations source, equal to its
//! TransformerLens activations and trained on as the same rows from a file; and the
//! cache `activation-producer run --format saelens` writes, laid out as SAELens's
//! (schema checked with pyarrow) and read back.

#[path = "../../pipeline/tests/support/mod.rs"]
mod support;

use e2e::{fx, s};
use std::path::Path;
use support::*;

const HOOK: &str = "blocks.1.hook_resid_pre";

fn cache() -> std::path::PathBuf {
    fx().join("saelens_cache/cache")
}

/// A little-endian f32 `.npy` array's values.
fn npy_f32(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..6], b"\x93NUMPY");
    let header_len = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = String::from_utf8_lossy(&b[10..10 + header_len]);
    assert!(
        header.contains("'<f4'") && header.contains("False"),
        "{header}"
    );
    b[10 + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn rows(spec: &str, column: &str) -> Vec<f32> {
    let mut r = pipeline::open(spec, Some(column)).unwrap();
    let mut v = Vec::new();
    while let Some(c) = r.next_chunk().unwrap() {
        v.extend(c);
    }
    v
}

fn token_ids(spec: &str) -> Vec<i64> {
    batches(spec)
        .iter()
        .flat_map(|b| {
            let a = b
                .column_by_name("token_id")
                .unwrap()
                .as_any()
                .downcast_ref::<arrow_array::Int32Array>()
                .unwrap()
                .clone();
            a.values().iter().map(|&t| t as i64).collect::<Vec<_>>()
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn saelens_s_own_cache_reads_as_its_activations() {
    let spec = s(&cache()).to_string();
    let got = rows(&spec, HOOK);
    // 36 sequences: SAELens's store cycles the 32 it was given to fill its last buffer
    assert_eq!(got.len(), 36 * 128 * 128);
    // the first 8 sequences as TransformerLens computed them; SAELens's run of the same
    // model on CPU agrees to ~1e-6, so 1e-5 absolute (activations are O(1))
    let tl = npy_f32(&fx().join("saelens_cache/tl_acts_first8.npy"));
    let d = max_abs_diff(&got[..tl.len()], &tl);
    assert!(d < 1e-5, "max |cache - TransformerLens| = {d}");
    let tokens = pipeline::read_tokens(&fx().join("saelens_cache/tokens.npy")).unwrap();
    let cycled: Vec<i64> = tokens
        .ids
        .iter()
        .chain(&tokens.ids[..4 * 128])
        .copied()
        .collect();
    assert_eq!(token_ids(&spec), cycled);
    assert_eq!(
        &got[32 * 128 * 128..],
        &got[..4 * 128 * 128],
        "the cycled rows repeat"
    );
    let schema = schema_of(&spec);
    assert_eq!(schema.metadata()["saestream.context_size"], "128");
    let all = batches(&spec);
    assert_eq!(all.len(), 3, "one batch per stored batch");
    // starting at a position skips whole stored batches
    let from1 = pipeline::open_source(
        &spec,
        &pipeline::OpenOptions {
            position: 1,
            ..Default::default()
        },
    )
    .unwrap()
    .next_batch()
    .unwrap()
    .unwrap();
    assert_eq!(from1, all[1]);
}

#[test]
fn training_from_a_saelens_cache_equals_training_from_its_rows_in_a_file() {
    let d = tempfile::tempdir().unwrap();
    let spec = s(&cache()).to_string();
    let values = rows(&spec, HOOK);
    let file = d.path().join("acts.safetensors");
    sae::io::write_safetensors(
        &file,
        &[sae::io::OutTensor {
            name: HOOK,
            shape: vec![values.len() / 128, 128],
            values,
            dtype: schemas::Dtype::F32,
        }],
        false,
    )
    .unwrap();
    let cfg = d.path().join("c.yaml");
    let text = format!("architecture: topk\nk: 8\nd_sae: 256\nhook_name: {HOOK}\ncontext_size: 128\ntrain_batch_size_tokens: 256\ntraining_tokens: 3584\nshuffle: false\nnormalize_activations: expected_average_only_in\nn_batches_for_norm_estimate: 2\nb_dec_init_method: mean\nn_batches_in_buffer: 4\nlr: 0.001\n");
    std::fs::write(&cfg, &text).unwrap();
    let trainer = workspace_bin("sae-trainer");
    let train = |acts: &str, out: &Path| {
        let o = run_of(
            &trainer,
            &[
                "train",
                "--activations",
                acts,
                "--config",
                s(&cfg),
                "--output",
                s(out),
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (a, b) = (d.path().join("from-cache"), d.path().join("from-file"));
    train(&spec, &a);
    train(s(&file), &b);
    for f in [
        "sae_weights.safetensors",
        "sparsity.safetensors",
        "metrics.jsonl",
    ] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} differs"
        );
    }

    // a config whose context_size or d_in disagrees with the cache is refused up front
    let bad = d.path().join("bad.yaml");
    std::fs::write(&bad, text.replace("context_size: 128", "context_size: 64")).unwrap();
    let o = run_of(
        &trainer,
        &[
            "train",
            "--activations",
            &spec,
            "--config",
            s(&bad),
            "--output",
            s(&d.path().join("x")),
        ],
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && e.contains("context_size is 64")
            && e.contains("sequences of 128 tokens"),
        "{e}"
    );
    std::fs::write(&bad, text.replace("d_sae: 256", "d_sae: 256\nd_in: 64")).unwrap();
    let o = run_of(
        &trainer,
        &[
            "train",
            "--activations",
            &spec,
            "--config",
            s(&bad),
            "--output",
            s(&d.path().join("x")),
        ],
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("d_in is 64") && e.contains("have 128"),
        "{e}"
    );
    assert!(!d.path().join("x").join("sae_weights.safetensors").exists());
}

#[test]
fn the_producer_writes_a_saelens_cache() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("cache");
    let o = run_of(
        &workspace_bin("activation-producer"),
        &[
            "run",
            "--tokens",
            s(&fx().join("saelens_cache/tokens.npy")),
            "--model",
            s(&fx().join("tiny-gpt2")),
            "--hooks",
            HOOK,
            "--store-batch-size-prompts",
            "4",
            "--output",
            s(&out),
            "--format",
            "saelens",
            "--shard-bytes",
            "700KiB",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "data-00000-of-00003.arrow",
            "data-00001-of-00003.arrow",
            "data-00002-of-00003.arrow",
            "dataset_info.json",
            "state.json"
        ]
    );
    // the same features as SAELens's, and the same rows (to the LM's tolerance)
    let info = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("dataset_info.json")).unwrap())
            .unwrap()
    };
    assert_eq!(info(&out)["features"], info(&cache())["features"]);
    // (SAELens's holds 4 more sequences, cycled: compare the 32 fed to both)
    let ours = rows(s(&out), HOOK);
    let theirs = rows(s(&cache()), HOOK);
    let diff = max_abs_diff(&ours, &theirs[..ours.len()]);
    assert!(diff < 1e-5, "max |ours - SAELens's cache| = {diff}");
    assert_eq!(token_ids(s(&out))[..], token_ids(s(&cache()))[..32 * 128]);

    // pyarrow sees SAELens's schema: list<list<float>> with HF's Array2D extension type,
    // fixed-size token ids, the `huggingface` metadata; Arrow IPC stream files
    let have = std::process::Command::new("python3")
        .args(["-c", "import pyarrow"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var_os("SAESTREAM_REQUIRE_PYARROW").is_none(),
            "pyarrow is required here"
        );
        eprintln!("skipped the pyarrow check: python3 with pyarrow not found");
        return;
    }
    let script = "import pyarrow as pa, sys\n\
        a = pa.ipc.open_stream(sys.argv[1]).schema\n\
        b = pa.ipc.open_stream(sys.argv[2]).schema\n\
        assert a.equals(b, check_metadata=True), (a, b)\n\
        print('ok')";
    let o = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            s(&out.join("data-00000-of-00003.arrow")),
            s(&cache().join("data-00000-of-00003.arrow")),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // whole sequences only
    let o = run_of(
        &workspace_bin("activation-producer"),
        &[
            "run",
            "--tokens",
            s(&fx().join("saelens_cache/tokens.npy")),
            "--model",
            s(&fx().join("tiny-gpt2")),
            "--hooks",
            HOOK,
            "--seqpos-slice",
            "1:",
            "--output",
            s(&d.path().join("sliced")),
            "--format",
            "saelens",
        ],
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("whole sequences"), "{e}");
    assert!(!d.path().join("sliced").exists());
}
