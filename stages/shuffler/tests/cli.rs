//! The `shuffler` binary as a process: settings that cannot work are refused before any
//! row is read, naming the flag; a run keeps every row it was given, in a new order.
//! (These tests are also what makes `cargo test --workspace` build the binary that the
//! end-to-end tests in `tests/e2e` start.)

use pipeline::{open_source, OpenOptions};
use std::process::{Command, Output};

fn shuffler(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shuffler"))
        .args(args)
        .output()
        .expect("start shuffler")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const ACTS: &str = "synthetic:activations?batches=6&rows=50&d=8&hooks=1&seed=3";

#[test]
fn impossible_settings_are_refused_by_flag() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["--train-batch-size-tokens", "0"],
            "--train-batch-size-tokens must be at least 1",
        ),
        (
            &["--train-batch-size-tokens", "64", "--buffer-tokens", "32"],
            "the buffer (32 tokens) is smaller than one batch (64 tokens)",
        ),
        (
            &["--train-batch-size-tokens", "64", "--snapshot-at", "3"],
            "--snapshot-at needs --snapshots DIR",
        ),
        (
            // 8 floats + seq/pos/token_id per row: 20 rows do not fit 100 bytes.
            &[
                "--train-batch-size-tokens",
                "10",
                "--buffer-tokens",
                "20",
                "--max-buffer-bytes",
                "100",
            ],
            "does not fit --max-buffer-bytes 100",
        ),
    ];
    for (extra, want) in cases {
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("batches");
        let mut args = vec!["run", "--upstream", ACTS, "--output", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = shuffler(&args);
        let e = stderr(&o);
        assert!(!o.status.success(), "{extra:?} was accepted");
        assert!(e.contains(want), "{extra:?}: {e}");
        assert!(!dir.exists(), "{extra:?} left {}", dir.display());
    }
}

/// Every row of a source, as its (seq, pos) provenance, sorted.
fn provenance(spec: &str) -> Vec<(u64, u32)> {
    let mut src = open_source(spec, &OpenOptions::default()).unwrap();
    let mut rows = Vec::new();
    while let Some(b) = src.next_batch().unwrap() {
        let seq = b.column_by_name("seq").unwrap();
        let pos = b.column_by_name("pos").unwrap();
        let seq = seq
            .as_any()
            .downcast_ref::<arrow_array::UInt64Array>()
            .unwrap();
        let pos = pos
            .as_any()
            .downcast_ref::<arrow_array::UInt32Array>()
            .unwrap();
        rows.extend(
            seq.values()
                .iter()
                .copied()
                .zip(pos.values().iter().copied()),
        );
    }
    rows
}

#[test]
fn a_run_mixes_every_row_into_full_batches() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("batches");
    let o = shuffler(&[
        "run",
        "--upstream",
        ACTS,
        "--output",
        dir.to_str().unwrap(),
        "--train-batch-size-tokens",
        "30",
        "--n-batches-in-buffer",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let input = provenance(ACTS);
    let mut output = provenance(dir.to_str().unwrap());
    assert_eq!(input.len(), 300);
    assert_eq!(output.len(), 300, "10 batches of 30: every row, none twice");
    assert_ne!(output, input, "the order changed");
    output.sort_unstable();
    let mut sorted = input.clone();
    sorted.sort_unstable();
    assert_eq!(output, sorted);
    // A second run into the same directory is refused without --overwrite.
    let again = shuffler(&[
        "run",
        "--upstream",
        ACTS,
        "--output",
        dir.to_str().unwrap(),
        "--train-batch-size-tokens",
        "30",
    ]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("--overwrite"), "{}", stderr(&again));
}
