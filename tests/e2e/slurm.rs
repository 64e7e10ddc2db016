//! A real Slurm: `tests/slurm/start.sh` starts munged, slurmctld and four virtual nodes on
//! this host (as root, no systemd); `pipeline run --launcher slurm` submits the shortened
//! example sweep as a heterogeneous job, follows it, and the SAEs equal a local run's bit
//! for bit. Skipped, saying so, only where Slurm is not installed and
//! SAESTREAM_REQUIRE_SLURM is unset (`.ci/run` installs it and sets it).

#[path = "../../pipeline/tests/support/mod.rs"]
mod support;

use e2e::{
    checkpointed_sweep_yaml, first_checkpoint_written, outputs, s, sae_weights, short_sweep_yaml,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

fn scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("slurm")
}

/// Slurm started in `dir`, stopped when dropped.
struct Slurm {
    dir: PathBuf,
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(scripts().join("stop.sh"))
            .arg(&self.dir)
            .status();
    }
}

fn installed() -> bool {
    ["slurmctld", "slurmd", "sbatch", "munged"].iter().all(|b| {
        Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// One Slurm for both parts (its daemons take fixed ports).
#[test]
fn the_example_sweep_through_slurm_equals_the_local_run_and_ctrl_c_cancels_after_a_checkpoint() {
    if !installed() {
        assert!(
            std::env::var_os("SAESTREAM_REQUIRE_SLURM").is_none(),
            "SAESTREAM_REQUIRE_SLURM is set but Slurm (slurmctld, slurmd, sbatch, munged) is not installed"
        );
        eprintln!("skipped: Slurm is not installed here (apt-get install slurmctld slurmd slurm-client munge)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let slurm = Slurm {
        dir: d.path().join("slurm"),
    };
    let o = Command::new("bash")
        .arg(scripts().join("start.sh"))
        .arg(&slurm.dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "Slurm did not start: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // this test binary's one test: every `pipeline` it starts talks to this Slurm
    std::env::set_var("SLURM_CONF", slurm.dir.join("slurm.conf"));
    let file = d.path().join("sweep.yaml");
    std::fs::write(
        &file,
        short_sweep_yaml(
            "  producers: 2\n  trainers: 2\n  slurm:\n    time: \"00:10:00\"\n    producer: {cpus: 1}\n",
        ),
    )
    .unwrap();
    let local = d.path().join("local");
    run_sweep(&file, &local);

    let rd = d.path().join("slurm-run");
    let o = cmd(&[
        "run",
        "--launcher",
        "slurm",
        s(&file),
        "--output",
        s(&rd),
        "--progress-every",
        "1000",
    ])
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "the Slurm run failed: {err}");
    assert!(err.contains("submitted Slurm job"), "{err}");
    let script = std::fs::read_to_string(rd.join("job.sbatch")).unwrap();
    assert_eq!(script.matches("#SBATCH hetjob").count(), 3, "{script}");
    for p in ["topk-k8", "topk-k16"] {
        assert!(
            sae_weights(&rd, p) == sae_weights(&local, p),
            "{p}: the SAEs differ"
        );
    }
    ctrl_c_then_resume(d.path());
}

/// Ctrl-C of `pipeline run --launcher slurm` after the first planned checkpoint: the
/// stages are told to stop (the trainers checkpoint), the job is cancelled and leaves the
/// queue, exit status 130; `--resume --launcher slurm` then ends bit-identical to an
/// uninterrupted local run.
fn ctrl_c_then_resume(d: &Path) {
    let file = d.join("checkpointed.yaml");
    std::fs::write(
        &file,
        checkpointed_sweep_yaml("  slurm:\n    time: \"00:10:00\"\n"),
    )
    .unwrap();
    let local = d.join("checkpointed-local");
    run_sweep(&file, &local);
    let rd = d.join("checkpointed-slurm");
    let mut p = spawn(&[
        "run",
        "--launcher",
        "slurm",
        s(&file),
        "--output",
        s(&rd),
        "--progress-every",
        "1000",
    ]);
    let t0 = Instant::now();
    while !first_checkpoint_written(&rd) {
        assert!(t0.elapsed() < LIMIT, "no checkpoint within {LIMIT:?}");
        assert!(
            p.child.try_wait().unwrap().is_none(),
            "the run ended early: {}",
            p.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let job = std::fs::read_to_string(rd.join("slurm_job")).unwrap();
    let job = job.trim();
    let o = Command::new("kill")
        .args(["-INT", &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(o.success());
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "pipeline ignored Ctrl-C");
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = p.stderr_text();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    // the job is cancelled: it leaves the queue
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = Command::new("squeue")
            .args(["-h", "-j", job])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&o.stdout).trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "job {job} is still queued after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = run(&[
        "run",
        "--resume",
        s(&rd),
        "--launcher",
        "slurm",
        "--progress-every",
        "1000",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "the resumed Slurm run failed: {err}");
    assert!(
        err.contains("resuming at batch"),
        "did not resume from a checkpoint: {err}"
    );
    for ((f, a), (_, b)) in outputs(&local).iter().zip(&outputs(&rd)) {
        assert!(
            a == b,
            "after Ctrl-C and --resume through Slurm, {f} differs from the local run"
        );
    }
}
