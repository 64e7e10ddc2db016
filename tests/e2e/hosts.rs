//! Several hosts on one machine: network namespaces made here, joined by veth links to a
//! bridge in a namespace of their own (no traffic leaves them but loopback's). The
//! tokenizer runs in one, two producers in two others, the shuffler and the trainers in
//! a fourth with the orchestrator (`pipeline run --launcher manual`), every connection
//! over TLS with the run's token; the SAEs equal a local run's bit for bit. Then a stage
//! with the wrong token and a producer with a certificate for another host: each stops
//! the run with a clear error in bounded time. Needs root (CI runs as root).

#[path = "../../pipeline/tests/support/mod.rs"]
mod support;

use e2e::{
    checkpointed_sweep_yaml, first_checkpoint_written, outputs, s, sae_weights, short_sweep_yaml,
    POINTS,
};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

/// The shortened sweep with 2 producers and 2 trainers.
fn sweep_yaml() -> String {
    short_sweep_yaml("  producers: 2\n  trainers: 2\n")
}

fn ip(args: &[&str]) {
    let o = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        o.status.success(),
        "ip {}: {} (these tests make network namespaces: they need root and iproute2)",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr).trim()
    );
}

/// Four "hosts" (namespaces `h1`..`h4` at 10.77.0.1..4) on one bridge; removed with
/// everything in them when dropped.
struct Hosts {
    names: Vec<String>,
    bridge: String,
    tag: String,
}

impl Hosts {
    fn new() -> Hosts {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let tag = format!(
            "{}{}",
            std::process::id() % 100_000,
            (b'a' + n as u8) as char
        );
        let bridge = format!("sae{tag}br");
        ip(&["netns", "add", &bridge]);
        let mut h = Hosts {
            names: Vec::new(),
            bridge: bridge.clone(),
            tag: tag.clone(),
        };
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &bridge, "link", "set", "br0", "up"]);
        for i in 1..=4 {
            let ns = format!("sae{tag}h{i}");
            ip(&["netns", "add", &ns]);
            h.names.push(ns.clone());
            let (a, b) = (format!("s{tag}v{i}"), format!("s{tag}b{i}"));
            ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
            ip(&["link", "set", &a, "netns", &ns]);
            ip(&["link", "set", &b, "netns", &bridge]);
            ip(&["-n", &bridge, "link", "set", &b, "master", "br0"]);
            ip(&["-n", &bridge, "link", "set", &b, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.77.0.{i}/24"),
                "dev",
                &a,
            ]);
            ip(&["-n", &ns, "link", "set", &a, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            // Small TCP buffers on these hosts (the sysctls are per namespace): with
            // Linux's defaults (up to 4 + 6 MiB a connection) on top of HTTP/2's 16 MiB
            // window, a producer could have handed the kernel its whole stream by the
            // first checkpoint, and a link cut then would hit nothing.
            let st = Command::new("ip")
                .args(["netns", "exec", &ns, "sh", "-c"])
                .arg("echo '4096 65536 262144' > /proc/sys/net/ipv4/tcp_rmem && echo '4096 65536 262144' > /proc/sys/net/ipv4/tcp_wmem")
                .status()
                .expect("ip netns exec");
            assert!(st.success(), "cannot size the TCP buffers in {ns}");
        }
        h
    }

    fn ns(&self, host: usize) -> &str {
        &self.names[host - 1]
    }

    /// Sets host `h`'s link to the bridge up or down (a cable pulled).
    fn link(&self, h: usize, up: bool) {
        let dev = format!("s{}v{h}", self.tag);
        ip(&[
            "-n",
            self.ns(h),
            "link",
            "set",
            &dev,
            if up { "up" } else { "down" },
        ]);
    }

    /// SIGKILL to every process on host `h` (the host dies).
    fn kill_all(&self, h: usize) -> usize {
        let o = Command::new("ip")
            .args(["netns", "pids", self.ns(h)])
            .output()
            .unwrap();
        let pids: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        for p in &pids {
            let _ = Command::new("kill").args(["-9", p]).status();
        }
        pids.len()
    }

    /// `pipeline ARGS` on host `h` (1..4).
    fn spawn(&self, h: usize, args: &[&str]) -> Proc {
        let pipeline = bin();
        let mut a = vec!["netns", "exec", self.ns(h), s(&pipeline)];
        a.extend_from_slice(args);
        let mut p = spawn_of(Path::new("ip"), &a);
        p.what = format!("host {h}: pipeline {}", args.join(" "));
        p
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in self.names.iter().chain([&self.bridge]) {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn wait_for(path: &Path, limit: Duration) {
    let t0 = Instant::now();
    while !path.is_file() {
        assert!(
            t0.elapsed() < limit,
            "{} did not appear in {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the orchestrator on host 4 and waits for its rendezvous.
fn orchestrate(hosts: &Hosts, file: &Path, run_dir: &Path) -> Proc {
    let p = hosts.spawn(
        4,
        &[
            "run",
            s(file),
            "--output",
            s(run_dir),
            "--launcher",
            "manual",
            "--advertise",
            "10.77.0.4",
            "--progress-every",
            "1000",
        ],
    );
    wait_for(&run_dir.join("rendezvous.json"), LIMIT);
    p
}

/// `pipeline stage ROLE --index I --run-dir RUN [-- EXTRA]` on host `h`.
fn stage(
    hosts: &Hosts,
    h: usize,
    role: &str,
    index: usize,
    run_dir: &Path,
    extra: &[&str],
) -> Proc {
    let i = index.to_string();
    let mut a = vec!["stage", role, "--index", &i, "--run-dir", s(run_dir)];
    if !extra.is_empty() {
        a.push("--");
        a.extend_from_slice(extra);
    }
    hosts.spawn(h, &a)
}

#[test]
fn a_sweep_across_four_hosts_with_tls_equals_the_local_run() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("sweep.yaml");
    std::fs::write(&file, sweep_yaml()).unwrap();
    let local = d.path().join("local");
    run_sweep(&file, &local);

    let hosts = Hosts::new();
    let rd = d.path().join("hosts");
    let mut orch = orchestrate(&hosts, &file, &rd);
    let rdv = std::fs::read_to_string(rd.join("rendezvous.json")).unwrap();
    assert!(rdv.contains("grpc+tls://10.77.0.4:"), "{rdv}");
    // the run's secrets are the owner's alone
    for f in ["ca.key", "token"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(rd.join("tls").join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "tls/{f}");
    }
    let mut procs = start_stages(&hosts, &rd);
    let (ok, err) = orch.wait(Duration::from_secs(300));
    assert!(ok, "the orchestrator failed: {err}");
    for p in procs.iter_mut() {
        let (ok, err) = p.wait(LIMIT);
        assert!(ok, "{} failed: {err}", p.what);
    }
    // Each producer served on its own host's address, over TLS.
    for (i, h) in [(1, 2), (2, 3)] {
        let url = procs[i].json_line()["stream"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            url.starts_with(&format!("grpc+tls://10.77.0.{h}:")),
            "{url}"
        );
    }
    for p in ["topk-k8", "topk-k16"] {
        assert!(
            sae_weights(&rd, p) == sae_weights(&local, p),
            "{p}: the SAEs differ"
        );
    }
}

#[test]
fn a_wrong_token_or_a_certificate_for_another_host_stops_the_run_clearly() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("sweep.yaml");
    std::fs::write(&file, sweep_yaml()).unwrap();
    let local = d.path().join("local");
    run_sweep(&file, &local);
    let same_as_local = |rd: &Path, what: &str| {
        for p in POINTS {
            assert!(
                sae_weights(rd, p) == sae_weights(&local, p),
                "{what}: {p} differs from the local run"
            );
        }
    };
    let hosts = Hosts::new();

    // A stage with the wrong token: the rendezvous refuses it at once; the run waits on,
    // and the stage started right joins it.
    let rd = d.path().join("token");
    let mut orch = orchestrate(&hosts, &file, &rd);
    let bad = d.path().join("bad-token");
    std::fs::write(&bad, "not-the-run-token\n").unwrap();
    let mut p = stage(&hosts, 1, "tokenizer", 0, &rd, &["--token-file", s(&bad)]);
    let (ok, err) = p.wait(LIMIT);
    assert!(!ok);
    assert!(
        err.contains("token sent is wrong") && err.contains("10.77.0.4"),
        "{err}"
    );
    let _procs = start_stages(&hosts, &rd);
    let (ok, err) = orch.wait(Duration::from_secs(300));
    assert!(ok, "after the refused stage: {err}");
    same_as_local(&rd, "after a wrong token");

    // A producer serving under a certificate (from the run's CA) for another host: the
    // shuffler, dialing 10.77.0.2, refuses it and the run stops, saying why; resumed with
    // the stage's own certificate, the run ends as the local one.
    let rd = d.path().join("cert");
    let mut orch = orchestrate(&hosts, &file, &rd);
    let (cert, key) =
        pipeline::tls::issue(&rd.join("tls").join("ca.key"), &["10.77.0.99".into()]).unwrap();
    let (cf, kf) = (d.path().join("other.pem"), d.path().join("other.key"));
    std::fs::write(&cf, cert).unwrap();
    std::fs::write(&kf, key).unwrap();
    let t0 = Instant::now();
    let mut procs = [
        stage(&hosts, 1, "tokenizer", 0, &rd, &[]),
        stage(
            &hosts,
            2,
            "producer",
            0,
            &rd,
            &["--tls-cert", s(&cf), "--tls-key", s(&kf)],
        ),
        stage(&hosts, 3, "producer", 1, &rd, &[]),
        stage(&hosts, 4, "shuffler", 0, &rd, &[]),
        stage(&hosts, 4, "trainer", 0, &rd, &[]),
        stage(&hosts, 4, "trainer", 1, &rd, &[]),
    ];
    let (ok, err) = orch.wait(LIMIT);
    assert!(!ok, "the run should have stopped");
    assert!(
        err.contains("shuffler") && err.contains("10.77.0.2") && err.contains("certificate"),
        "{err}"
    );
    eprintln!(
        "the run stopped {:.1} s after the stages started",
        t0.elapsed().as_secs_f64()
    );
    for p in procs.iter_mut() {
        p.wait(LIMIT);
    }
    // nothing half written: no SAE directory has weights
    for p in POINTS {
        assert!(!rd
            .join("saes")
            .join(p)
            .join("sae_weights.safetensors")
            .exists());
    }
    let (mut orch, _procs) = resume_on_hosts(&hosts, &rd);
    let (ok, err) = orch.wait(Duration::from_secs(300));
    assert!(ok, "the resumed run failed: {err}");
    same_as_local(&rd, "resumed after a wrong certificate");
}

#[test]
fn the_slurm_script_and_the_jobset_have_a_component_per_role() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("sweep.yaml");
    let yaml = sweep_yaml().replace("k: [8, 16]", "k: [4, 8, 16]").replace(
        "  trainers: 2\n",
        "  trainers: 3\n  rendezvous_port: 29417\n  k8s_image: registry.example/saestream:1\n  slurm:\n    partition: gpu\n    time: \"02:00:00\"\n    extra: [\"#SBATCH --qos=high\"]\n    producer: {cpus: 8, gpus: 1, mem: 64G}\n    trainer: {cpus: 4, gpus: 1}\n    shuffler: {cpus: 2, mem: 16G, partition: cpu}\n",
    );
    std::fs::write(&file, yaml).unwrap();
    let rd = d.path().join("run");
    let o = run(&["plan", s(&file), "--output", s(&rd), "--slurm", "--k8s"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let script = std::fs::read_to_string(rd.join("job.sbatch")).unwrap();
    // One component per role, in order, separated by `hetjob`.
    let comps: Vec<&str> = script.split("#SBATCH hetjob\n").collect();
    assert_eq!(comps.len(), 4, "{script}");
    let want = [
        ("tokenizer", vec!["--ntasks=1", "--partition=gpu"]),
        (
            "producer",
            vec![
                "--ntasks=2",
                "--gpus-per-task=1",
                "--cpus-per-task=8",
                "--mem=64G",
            ],
        ),
        (
            "shuffler",
            vec!["--ntasks=1", "--partition=cpu", "--mem=16G"],
        ),
        (
            "trainer",
            vec!["--ntasks=3", "--gpus-per-task=1", "--cpus-per-task=4"],
        ),
    ];
    for (k, (role, lines)) in want.iter().enumerate() {
        let c = comps[k];
        assert!(c.contains(&format!("# component {k}: {role}")), "{c}");
        for l in lines {
            assert!(
                c.contains(&format!("#SBATCH {l}\n")),
                "component {k} lacks {l}: {c}"
            );
        }
        assert!(c.contains("#SBATCH --time=02:00:00"), "{c}");
        assert!(
            script.contains(&format!("srun --het-group={k} --kill-on-bad-exit=1 \"$PIPELINE\" stage {role} --run-dir \"$RUN\" &")),
            "{script}"
        );
    }
    assert!(
        !comps[0].contains("--gpus-per-task"),
        "the tokenizer takes no GPU"
    );
    assert!(script.contains("#SBATCH --qos=high\n"));
    assert!(script.contains("rendezvous --run-dir \"$RUN\" --listen 0.0.0.0:29417"));
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(rd.join("job.sbatch"))
        .output()
        .unwrap();
    assert!(
        syntax.status.success(),
        "{}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    // The stage list the job's processes read: 1 + 2 + 1 + 3 stages, upstreams by role.
    let specs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rd.join("stages.json")).unwrap()).unwrap();
    let names: Vec<&str> = specs
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "tokenizer",
            "producer-0",
            "producer-1",
            "shuffler",
            "trainer-0",
            "trainer-1",
            "trainer-2"
        ]
    );

    let text = std::fs::read_to_string(rd.join("jobset.yaml")).unwrap();
    let docs: Vec<serde_json::Value> = text
        .split("\n---\n")
        .filter_map(|d| serde_norway::from_str(d).ok())
        .collect();
    let js = &docs[0];
    assert_eq!(js["kind"], "JobSet");
    let jobs = js["spec"]["replicatedJobs"].as_array().unwrap();
    let got: Vec<(String, u64)> = jobs
        .iter()
        .map(|j| {
            (
                j["name"].as_str().unwrap().to_string(),
                j["template"]["spec"]["parallelism"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("tokenizer".into(), 1),
            ("producer".into(), 2),
            ("shuffler".into(), 1),
            ("trainer".into(), 3)
        ]
    );
    for j in jobs {
        let pod = &j["template"]["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert_eq!(c["image"], "registry.example/saestream:1");
        let gpus = &c["resources"]["limits"]["nvidia.com/gpu"];
        let wants_gpu = ["producer", "trainer"].contains(&j["name"].as_str().unwrap());
        assert_eq!(gpus.as_u64() == Some(1), wants_gpu, "{j}");
        assert_eq!(pod["volumes"][1]["secret"]["secretName"], "saestream-tls");
        let cmd = c["command"].to_string();
        assert!(cmd.contains("stage") && cmd.contains("29417"), "{cmd}");
    }
}

/// `pipeline run --resume RUN --launcher manual` on host 4 and the stages again; the
/// orchestrator and the stages.
fn resume_on_hosts(hosts: &Hosts, rd: &Path) -> (Proc, Vec<Proc>) {
    // the stages must find the new rendezvous, not the last one's file
    std::fs::remove_file(rd.join("rendezvous.json")).unwrap();
    let orch = hosts.spawn(
        4,
        &[
            "run",
            "--resume",
            s(rd),
            "--launcher",
            "manual",
            "--advertise",
            "10.77.0.4",
            "--progress-every",
            "1000",
        ],
    );
    wait_for(&rd.join("rendezvous.json"), LIMIT);
    (orch, start_stages(hosts, rd))
}

/// The six stages of a run on their hosts: tokenizer on 1, producers on 2 and 3, the
/// shuffler and trainers on 4.
fn start_stages(hosts: &Hosts, rd: &Path) -> Vec<Proc> {
    vec![
        stage(hosts, 1, "tokenizer", 0, rd, &[]),
        stage(hosts, 2, "producer", 0, rd, &[]),
        stage(hosts, 3, "producer", 1, rd, &[]),
        stage(hosts, 4, "shuffler", 0, rd, &[]),
        stage(hosts, 4, "trainer", 0, rd, &[]),
        stage(hosts, 4, "trainer", 1, rd, &[]),
    ]
}

/// A fault made part-way through a run, and what must follow.
struct Fault<'a> {
    name: &'a str,
    make: &'a dyn Fn(),
    /// Undoes it before the resume.
    mend: &'a dyn Fn(),
    /// Words the run's error must hold.
    says: &'a [&'a str],
    /// The run must stop within this.
    limit: Duration,
}

/// Runs the checkpointed sweep across the hosts until the first checkpoint, makes the
/// fault, checks that the run stops in time with an error saying what, that no SAE is
/// half written, then resumes it (after the mend) and compares with the uninterrupted
/// local run.
fn fault_then_resume(hosts: &Hosts, d: &Path, expected: &e2e::Files, f: Fault) {
    let Fault {
        name,
        make,
        mend,
        says,
        limit,
    } = f;
    let file = d.join("sweep.yaml");
    let rd = d.join(name);
    let mut orch = orchestrate(hosts, &file, &rd);
    let mut procs = start_stages(hosts, &rd);
    let t0 = Instant::now();
    while !first_checkpoint_written(&rd) {
        assert!(
            t0.elapsed() < LIMIT,
            "{name}: no checkpoint within {LIMIT:?}"
        );
        assert!(
            orch.child.try_wait().unwrap().is_none(),
            "{name}: the run ended early: {}",
            orch.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    make();
    let t0 = Instant::now();
    let (ok, err) = orch.wait(limit + Duration::from_secs(90));
    let took = t0.elapsed();
    assert!(!ok, "{name}: the run survived the fault");
    for w in says {
        assert!(
            err.contains(w),
            "{name}: the error does not say '{w}': {err}"
        );
    }
    assert!(
        took < limit,
        "{name}: the run took {took:?} to stop (limit {limit:?}): {err}"
    );
    eprintln!(
        "{name}: the run stopped {:.1} s after the fault",
        took.as_secs_f64()
    );
    for p in procs.iter_mut() {
        p.wait(Duration::from_secs(90));
    }
    for p in POINTS {
        assert!(!rd
            .join("saes")
            .join(p)
            .join("sae_weights.safetensors")
            .exists());
    }
    mend();
    let (mut orch, _procs) = resume_on_hosts(hosts, &rd);
    let (ok, err) = orch.wait(Duration::from_secs(300));
    assert!(ok, "{name}: the resumed run failed: {err}");
    assert!(
        err.contains("resuming at batch"),
        "{name}: did not resume from a checkpoint: {err}"
    );
    for ((f, a), (_, b)) in expected.iter().zip(&outputs(&rd)) {
        assert!(
            a == b,
            "{name}: after the fault and --resume, {f} differs from the uninterrupted run"
        );
    }
}

/// A producer's host dies (every process on it SIGKILLed), then another producer's link
/// goes down mid-run: each stops the run, naming the host's address, in bounded time (the dead host
/// at once, through its broken connections; the cut link within the 30 s silence limit),
/// and `--resume` ends bit-identical to an uninterrupted run.
#[test]
fn a_dead_host_or_a_cut_link_stops_the_run_and_resume_ends_bit_identical() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("sweep.yaml");
    std::fs::write(&file, checkpointed_sweep_yaml("")).unwrap();
    let local = d.path().join("local");
    run_sweep(&file, &local);
    let expected = outputs(&local);
    let hosts = Hosts::new();

    fault_then_resume(
        &hosts,
        d.path(),
        &expected,
        Fault {
            name: "dead-host",
            make: &|| assert!(hosts.kill_all(2) > 0, "nothing ran on host 2"),
            mend: &|| {},
            says: &["10.77.0.2"],
            limit: Duration::from_secs(60),
        },
    );
    fault_then_resume(
        &hosts,
        d.path(),
        &expected,
        Fault {
            name: "cut-link",
            make: &|| hosts.link(3, false),
            mend: &|| hosts.link(3, true),
            says: &["10.77.0.3"],
            limit: Duration::from_secs(75),
        },
    );
}
