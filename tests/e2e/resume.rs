//! `pipeline run --resume`: after `kill -9` of a producer, the shuffler, a trainer or
//! `pipeline` itself, part-way through a sweep (after the first planned checkpoint), the
//! resumed run ends with SAEs bit-identical to an uninterrupted run.

#[path = "../../pipeline/tests/support/mod.rs"]
mod support;

use e2e::{checkpointed_sweep_yaml, examples, first_checkpoint_written, outputs, s, Files};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use support::*;

fn sweep_yaml() -> String {
    checkpointed_sweep_yaml("")
}

/// The uninterrupted run, made once for every test of this file.
fn reference() -> &'static Files {
    static REF: OnceLock<(tempfile::TempDir, Files)> = OnceLock::new();
    &REF.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("sweep.yaml");
        std::fs::write(&file, sweep_yaml()).unwrap();
        let run_dir = d.path().join("run");
        run_sweep(&file, &run_dir);
        let out = outputs(&run_dir);
        (d, out)
    })
    .1
}

/// The pid of a stage, from the run's plan.json.
fn stage_pid(run_dir: &Path, stage: &str) -> i32 {
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("plan.json")).unwrap()).unwrap();
    let st = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == stage)
        .unwrap_or_else(|| panic!("no stage {stage} in {plan}"));
    st["pid"].as_i64().unwrap() as i32
}

fn alive(pid: i32) -> bool {
    // a zombie (exited, not yet reaped) counts as gone
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
}

/// Starts the sweep in a new directory (`run/` inside it) and waits until the shuffler
/// holds its first snapshot and every SAE its first checkpoint.
fn start_until_first_checkpoint(pipeline_extra: &str) -> (tempfile::TempDir, Proc) {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("sweep.yaml");
    std::fs::write(&file, checkpointed_sweep_yaml(pipeline_extra)).unwrap();
    let run_dir = d.path().join("run");
    let mut p = spawn(&[
        "run",
        s(&file),
        "--output",
        s(&run_dir),
        "--progress-every",
        "1000",
    ]);
    let deadline = Instant::now() + LIMIT;
    while !first_checkpoint_written(&run_dir) {
        assert!(Instant::now() < deadline, "no checkpoint within {LIMIT:?}");
        assert!(
            p.child.try_wait().unwrap().is_none(),
            "the run ended early: {}",
            p.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    (d, p)
}

/// Runs the sweep, kills `victim` (a stage of plan.json, or `pipeline`) with SIGKILL once
/// every SAE has its first checkpoint and the shuffler its snapshot, then resumes and
/// compares with the uninterrupted run.
fn kill_and_resume(victim: &str) -> tempfile::TempDir {
    kill_and_resume_with(victim, "")
}

fn kill_and_resume_with(victim: &str, pipeline_extra: &str) -> tempfile::TempDir {
    let expected = reference();
    let (d, mut p) = start_until_first_checkpoint(pipeline_extra);
    let run_dir = d.path().join("run");
    let stages: Vec<i32> = [
        "tokenizer",
        "producer-0",
        "producer-1",
        "shuffler",
        "trainer-0",
        "trainer-1",
    ]
    .iter()
    .map(|n| stage_pid(&run_dir, n))
    .collect();
    let target = if victim == "pipeline" {
        p.child.id() as i32
    } else {
        stage_pid(&run_dir, victim)
    };
    assert!(
        alive(target),
        "{victim} had already exited: nothing to kill"
    );
    // SAFETY: kill(2) on a pid of this test's own run.
    assert_eq!(unsafe { libc_kill(target, 9) }, 0);
    let (ok, err) = p.wait(LIMIT);
    assert!(!ok, "the run survived the kill of {victim}");
    if victim != "pipeline" {
        assert!(err.contains("failed (signal: 9"), "{err}");
    }
    // every stage is gone (with pipeline killed, they die with it)
    let deadline = Instant::now() + Duration::from_secs(60);
    while stages.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "stages left running after the kill of {victim}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = run(&["run", "--resume", s(&run_dir), "--progress-every", "1000"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("resuming at batch"),
        "did not resume from a checkpoint: {err}"
    );
    let got = outputs(&run_dir);
    for ((f, a), (_, b)) in expected.iter().zip(&got) {
        assert!(
            a == b,
            "after kill -9 of {victim}: {f} differs from the uninterrupted run"
        );
    }
    d
}

/// SIGTERM to `pipeline` (what Ctrl-C does to the whole group): every stage stops, the
/// trainers write a checkpoint, exit status 130; `--resume` then finishes the run with the
/// uninterrupted run's SAEs.
#[test]
fn sigterm_stops_with_130_and_the_run_resumes() {
    let expected = reference();
    let (d, mut p) = start_until_first_checkpoint("");
    let run_dir = d.path().join("run");
    // SAFETY: kill(2) on this test's child.
    assert_eq!(unsafe { libc_kill(p.child.id() as i32, 15) }, 0);
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "pipeline ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = p.stderr_text();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let o = run(&["run", "--resume", s(&run_dir), "--progress-every", "1000"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for ((f, a), (_, b)) in expected.iter().zip(&outputs(&run_dir)) {
        assert!(
            a == b,
            "after SIGTERM: {f} differs from the uninterrupted run"
        );
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn kill_9_of_a_producer_then_resume() {
    kill_and_resume("producer-1");
}

/// With `pipeline.cache`, a resumed run cuts each producer's cache back to its last whole
/// shard before the resume position and continues it: replayed, the cache trains the
/// same SAEs.
#[test]
fn a_cache_written_across_a_kill_replays_whole() {
    let d = kill_and_resume_with("producer-0", "  cache: cache\n  shard_bytes: 200KiB\n");
    let run_dir = d.path().join("run");
    let shards: usize = (0..2)
        .map(|i| {
            pipeline::shards::read_manifest(&run_dir.join(format!("cache/producer-{i}")))
                .unwrap()
                .shards
                .len()
        })
        .sum();
    assert!(
        shards > 4,
        "the cache should be several shards, has {shards}"
    );
    let text = sweep_yaml().replace(
        &format!(
            "dataset_path: {}",
            examples().join("corpus.jsonl").display()
        ),
        &format!(
            "use_cached_activations: true\ncached_activations_path: {}",
            run_dir.join("cache").display()
        ),
    );
    let file = d.path().join("replay.yaml");
    std::fs::write(&file, text).unwrap();
    let replay = d.path().join("replay");
    run_sweep(&file, &replay);
    let (a, b) = (outputs(&run_dir), outputs(&replay));
    for ((f, x), (_, y)) in a.iter().zip(&b) {
        // cfg.json names the dataset, which the replay does not read
        if !f.ends_with("cfg.json") {
            assert!(x == y, "replayed cache: {f} differs");
        }
    }
}

#[test]
fn kill_9_of_the_shuffler_then_resume() {
    kill_and_resume("shuffler");
}

#[test]
fn kill_9_of_a_trainer_then_resume() {
    kill_and_resume("trainer-1");
}

#[test]
fn kill_9_of_pipeline_itself_then_resume() {
    kill_and_resume("pipeline");
}
