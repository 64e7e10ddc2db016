//! A real Slurm: `tests/slurm/start.sh` starts munged, slurmctld and four virtual nodes on
//! this host (as root, no systemd); `pipeline run --launcher slurm` submits the shortened
//! example sweep as a heterogeneous job, follows it, and the SAEs equal a local run's bit
//! for bit. Skipped, saying so, only where Slurm is not installed and
//! SAESTREAM_REQUIRE_SLURM is unset (`.ci/run` installs it and sets it).

#[path = "../../pipeline/tests/support/mod.rs"]
mod support;

use e2e::{s, sae_weights, short_sweep_yaml};
use std::path::PathBuf;
use std::process::Command;
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

#[test]
fn the_example_sweep_through_slurm_equals_the_local_run() {
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
    let conf = slurm.dir.join("slurm.conf");
    let file = d.path().join("sweep.yaml");
    std::fs::write(
        &file,
        short_sweep_yaml(
            "  producers: 2\n  trainers: 2\n  slurm:\n    time: \"00:10:00\"\n    producer: {cpus: 1}\n",
        ),
    )
    .unwrap();
    let local = d.path().join("local");
    let o = run(&[
        "run",
        s(&file),
        "--output",
        s(&local),
        "--progress-every",
        "1000",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

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
    .env("SLURM_CONF", &conf)
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
}
