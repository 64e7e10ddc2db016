//! Runs whose stages start elsewhere: by hand on other hosts (`--launcher manual`, each
//! host runs `pipeline stage ROLE`), or in a Slurm heterogeneous job (`--launcher
//! slurm`). The orchestrator follows them through the rendezvous only; the run
//! directory is shared (a cluster file system) and TLS + the token are always on.

use super::launch::{self, Net, Role, StageSpec, RENDEZVOUS_FILE, STAGES_FILE};
use super::{write_atomic, Ctx};
use anyhow::{anyhow, bail, Result};
use pipeline::rendezvous::{self, Client, Listing, SILENCE_LIMIT};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long to wait, after asking the stages to stop, for the trainers to checkpoint.
const STOP_GRACE: Duration = Duration::from_secs(60);

/// Makes the run's TLS material (unless there) and writes the stage list.
pub fn prepare(run_dir: &Path, specs: &[StageSpec]) -> Result<()> {
    pipeline::tls::make_run_pki(&launch::tls_dir(run_dir))?;
    write_atomic(
        &run_dir.join(STAGES_FILE),
        serde_json::to_string_pretty(specs)?.as_bytes(),
    )
}

/// Serves the run's rendezvous on `listen` with TLS, for `host`; writes
/// `rendezvous.json`. Returns the server, its registry and its URL.
pub fn serve_rendezvous(
    run_dir: &Path,
    listen: &str,
    host: &str,
) -> Result<(
    pipeline::flight::Server,
    std::sync::Arc<rendezvous::Registry>,
    String,
)> {
    let tls = launch::tls_dir(run_dir);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let cfg = pipeline::flight::ServerConfig {
        listen: listen.to_string(),
        tls_pem: Some(pipeline::tls::issue(
            &tls.join(pipeline::tls::CA_KEY),
            &[bare.to_string()],
        )?),
        token: Some(pipeline::flight::read_token(
            &tls.join(pipeline::tls::TOKEN),
        )?),
        ..Default::default()
    };
    let (server, reg) = rendezvous::serve(&cfg)?;
    let url = format!("grpc+tls://{host}:{}", server.addr().port());
    write_atomic(
        &run_dir.join(RENDEZVOUS_FILE),
        serde_json::to_string_pretty(&json!({ "url": url }))?.as_bytes(),
    )?;
    Ok((server, reg, url))
}

/// The URL in a run directory's `rendezvous.json`, once there.
pub fn rendezvous_url(run_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(run_dir.join(RENDEZVOUS_FILE)).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["url"].as_str().map(str::to_string)
}

/// The net of a cluster run's stages: every interface, TLS, the run's rendezvous.
pub fn net(run_dir: &Path, rendezvous: &str) -> Net {
    Net {
        rendezvous: rendezvous.to_string(),
        listen: "0.0.0.0:0".into(),
        tls: Some(launch::tls_dir(run_dir)),
    }
}

/// What a Slurm job is doing: `PENDING`, `RUNNING`, …; from `sacct` once it left the
/// queue.
pub fn job_state(job: &str) -> Option<String> {
    let out = |cmd: &str, args: &[&str]| -> Option<String> {
        let o = std::process::Command::new(cmd).args(args).output().ok()?;
        let t = String::from_utf8_lossy(&o.stdout);
        t.lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(|l| l.split_whitespace().next().unwrap_or(l).to_string())
    };
    out("squeue", &["-h", "-j", job, "-o", "%T"])
        .or_else(|| out("sacct", &["-n", "-X", "-P", "-j", job, "-o", "State"]))
}

/// How long a job whose trainers are done gets to end (its rendezvous lingers 10 s).
const JOB_END_WAIT: Duration = Duration::from_secs(120);

/// Slurm states of a job that has not ended.
const ACTIVE: [&str; 4] = ["PENDING", "RUNNING", "CONFIGURING", "COMPLETING"];

/// Waits (bounded) for a job whose trainers are done to leave the queue, so that the run
/// ends with its job; says so if it does not.
pub fn wait_job_end(job: &str) {
    let t0 = Instant::now();
    while job_state(job).is_some_and(|s| ACTIVE.contains(&s.as_str())) {
        if t0.elapsed() > JOB_END_WAIT {
            eprintln!(
                "warning: every SAE is trained, but Slurm job {job} is still running after {} s",
                JOB_END_WAIT.as_secs()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Follows the stages through the rendezvous until every trainer is done; returns the
/// trainers' summaries. A failed stage, a stage silent for [`SILENCE_LIMIT`], or the
/// Slurm job ending first stops the run with the reason.
pub(super) fn follow(
    c: &Ctx,
    specs: &[StageSpec],
    rdv_url: &dyn Fn() -> Option<String>,
    job: Option<&str>,
) -> Result<Vec<Value>> {
    let client_cfg = launch::client_config(Some(&launch::tls_dir(c.run_dir)))?;
    let mut rdv: Option<Client> = None;
    let t0 = Instant::now();
    let mut last_ok = Instant::now();
    let mut last_line = Instant::now();
    let mut last_job = Instant::now() - Duration::from_secs(60);
    let trainers: Vec<&StageSpec> = specs.iter().filter(|s| s.role == Role::Trainer).collect();
    let mut refresh = super::Refresh::new();
    loop {
        refresh.tick(c.sweep, c.run_dir);
        if c.cancel.load(Ordering::SeqCst) {
            if let Some(r) = rdv.as_mut() {
                return Err(stop_and_wait(r, &trainers, "interrupted (Ctrl-C)"));
            }
            bail!("interrupted");
        }
        if let Some(job) = job.filter(|_| last_job.elapsed() > Duration::from_secs(3)) {
            last_job = Instant::now();
            let st = job_state(job).unwrap_or_else(|| "UNKNOWN".into());
            if !ACTIVE.contains(&st.as_str()) {
                // one last look: the trainers may have finished as the job ended
                if let Some(l) = rdv.as_mut().and_then(|r| r.list().ok()) {
                    if let Some(s) = summaries(&l, &trainers) {
                        return Ok(s);
                    }
                }
                bail!(
                    "Slurm job {job} ended ({st}) before every trainer was done; its output is in {}",
                    c.run_dir.join("logs").display()
                );
            }
        }
        if rdv.is_none() {
            if let Some(u) = rdv_url() {
                rdv = Some(Client::new(&u, &client_cfg)?);
                last_ok = Instant::now();
            }
        }
        if let Some(r) = rdv.as_mut() {
            match r.list() {
                Ok(l) => {
                    last_ok = Instant::now();
                    if let Some(s) = summaries(&l, &trainers) {
                        refresh.flush(c.sweep, c.run_dir);
                        return Ok(s);
                    }
                    if let Some(reason) = trouble(&l, specs) {
                        return Err(stop_and_wait(r, &trainers, &reason));
                    }
                    if last_line.elapsed().as_secs_f64() >= c.every {
                        last_line = Instant::now();
                        eprintln!(
                            "[{:>6.0} s] {}",
                            t0.elapsed().as_secs_f64(),
                            states(&l, specs)
                        );
                    }
                }
                Err(e) if last_ok.elapsed() > SILENCE_LIMIT => {
                    bail!(
                        "no answer from the run's rendezvous for {} s: {e}",
                        SILENCE_LIMIT.as_secs()
                    )
                }
                Err(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Every trainer's summaries, once all are done.
fn summaries(l: &Listing, trainers: &[&StageSpec]) -> Option<Vec<Value>> {
    let mut out = Vec::new();
    for t in trainers {
        let m = l.members.iter().find(|m| m.report.role == t.name)?;
        if m.report.state != "done" {
            return None;
        }
        out.extend(m.report.summaries.iter().cloned());
    }
    Some(out)
}

/// Why the run must stop, if it must: the first failure the rendezvous heard of (the
/// cause; the stages it stopped fail after it), else a stage gone silent.
fn trouble(l: &Listing, specs: &[StageSpec]) -> Option<String> {
    if l.stop.is_some() {
        return l.stop.clone();
    }
    for m in &l.members {
        let r = &m.report;
        if r.state == "failed" {
            return Some(format!(
                "stage `{}` on {} failed: {}",
                r.role,
                r.host,
                r.message.as_deref().unwrap_or("no reason given")
            ));
        }
        let expected = specs.iter().any(|s| s.name == r.role);
        if expected && r.state == "running" && m.silent_s > SILENCE_LIMIT.as_secs_f64() {
            return Some(format!(
                "no word from stage `{}` on {} (pid {}) for {:.0} s: its host is down, cut off, or the process was killed",
                r.role, r.host, r.pid, m.silent_s
            ));
        }
    }
    None
}

/// `tokenizer: running on h1, producer-0: waiting, …`.
fn states(l: &Listing, specs: &[StageSpec]) -> String {
    specs
        .iter()
        .map(
            |s| match l.members.iter().find(|m| m.report.role == s.name) {
                Some(m) => format!("{}: {} on {}", s.name, m.report.state, m.report.host),
                None => format!("{}: not started", s.name),
            },
        )
        .collect::<Vec<_>>()
        .join(", ")
}

/// Tells every stage to stop, waits (bounded) for the trainers to checkpoint and say
/// so; the error to end the run with.
fn stop_and_wait(r: &mut Client, trainers: &[&StageSpec], reason: &str) -> anyhow::Error {
    eprintln!("stopping the run: {reason}");
    if let Err(e) = r.stop(reason) {
        return anyhow!("{reason}; and the rendezvous could not be told to stop the stages: {e}");
    }
    let t0 = Instant::now();
    while t0.elapsed() < STOP_GRACE {
        let Ok(l) = r.list() else { break };
        let ended = trainers.iter().all(|t| {
            l.members
                .iter()
                .find(|m| m.report.role == t.name)
                .is_none_or(|m| {
                    m.report.state != "running" || m.silent_s > SILENCE_LIMIT.as_secs_f64()
                })
        });
        if ended {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    anyhow!("{reason}")
}

/// The command a host runs for each stage of a manual launch.
pub fn manual_commands(run_dir: &Path, specs: &[StageSpec]) -> Vec<String> {
    let me = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "pipeline".into());
    specs
        .iter()
        .map(|s| {
            format!(
                "{me} stage {} --index {} --run-dir {}",
                s.role.name(),
                s.index(),
                run_dir.display()
            )
        })
        .collect()
}

/// `pipeline stage`: one stage process of a planned run, on this host.
#[derive(clap::Args)]
pub struct StageArgs {
    /// tokenizer, producer, shuffler or trainer.
    role: String,
    /// Which of its role (default: $SLURM_PROCID, else 0).
    #[arg(long)]
    index: Option<usize>,
    /// The run directory `pipeline plan` or `pipeline run` wrote (shared by the hosts).
    #[arg(long)]
    run_dir: std::path::PathBuf,
    /// The run's rendezvous (default: the one `rendezvous.json` names, once it does).
    #[arg(long)]
    rendezvous: Option<String>,
    /// Where the stage's server binds.
    #[arg(long, default_value = "0.0.0.0:0")]
    listen: String,
    /// The host others reach this stage at (default: this host's address toward the
    /// rendezvous).
    #[arg(long)]
    advertise: Option<String>,
    /// More flags for the stage binary (after `--`); one the run also sets (such as
    /// --token-file or --tls-cert with --tls-key) replaces the run's.
    #[arg(last = true)]
    extra: Vec<String>,
}

/// How long `pipeline stage` waits for the run's rendezvous to say where it is.
const RENDEZVOUS_WAIT: Duration = Duration::from_secs(600);

pub fn stage(a: StageArgs) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let role = Role::parse(&a.role)?;
    let index = match a.index {
        Some(i) => i,
        None => match std::env::var("SLURM_PROCID") {
            Ok(v) => v
                .parse()
                .map_err(|_| anyhow!("SLURM_PROCID is '{v}', not an index"))?,
            Err(_) => 0,
        },
    };
    let specs = launch::read_specs(&a.run_dir)?;
    let spec = launch::find_spec(&specs, role, index)?;
    let url = match a.rendezvous {
        Some(u) => u,
        None => {
            let t0 = Instant::now();
            loop {
                if let Some(u) = rendezvous_url(&a.run_dir) {
                    break u;
                }
                if t0.elapsed() > RENDEZVOUS_WAIT {
                    bail!(
                        "{} did not appear within {} s: is the run's rendezvous (pipeline run, or the Slurm job's first host) up?",
                        a.run_dir.join(RENDEZVOUS_FILE).display(),
                        RENDEZVOUS_WAIT.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    let mut n = net(&a.run_dir, &url);
    n.listen = a.listen;
    let mut args = n.args(spec);
    // A flag given after `--` replaces the run's own (each of these takes one value);
    // the user's certificate replaces the one the stage would issue itself.
    let mut replaced: Vec<&str> = a
        .extra
        .iter()
        .filter(|x| x.starts_with("--"))
        .map(String::as_str)
        .collect();
    if replaced.contains(&"--tls-cert") {
        replaced.push("--tls-ca-key");
    }
    for flag in replaced {
        if let Some(i) = args.iter().position(|x| x == flag) {
            args.drain(i..(i + 2).min(args.len()));
        }
    }
    if let Some(h) = a.advertise.filter(|_| role.serves()) {
        args.extend(["--advertise".into(), h]);
    }
    args.extend(a.extra);
    let bin = super::procs::find_bin(role.bin())?;
    let err = std::process::Command::new(&bin).args(&args).exec();
    bail!("cannot start {}: {err}", bin.display())
}

/// `pipeline rendezvous`: a cluster run's rendezvous (the Slurm job starts it on its
/// first host).
#[derive(clap::Args)]
pub struct RendezvousArgs {
    /// The run directory (`rendezvous.json` is written there; at the end, `members.json`).
    #[arg(long)]
    run_dir: std::path::PathBuf,
    /// Where to listen (port 0: any free port).
    #[arg(long, default_value = "0.0.0.0:0")]
    listen: String,
    /// The host the stages reach it at (default: this host's name).
    #[arg(long)]
    advertise: Option<String>,
}

/// How long the rendezvous stays up after the last stage ended (for the orchestrator's
/// last look).
const LINGER: Duration = Duration::from_secs(10);

pub fn rendezvous_cmd(a: RendezvousArgs) -> Result<()> {
    let specs = launch::read_specs(&a.run_dir)?;
    let host = a.advertise.unwrap_or_else(rendezvous::hostname);
    let (server, reg, url) = serve_rendezvous(&a.run_dir, &a.listen, &host)?;
    eprintln!("rendezvous of {} at {url}", a.run_dir.display());
    let cancel = pipeline::cli::interrupt_flag()?;
    let mut ended_at: Option<Instant> = None;
    while !cancel.load(Ordering::SeqCst) {
        let l = reg.listing();
        let ended = specs.iter().all(|s| {
            l.members
                .iter()
                .any(|m| m.report.role == s.name && m.report.state != "running")
        });
        if ended {
            let t = *ended_at.get_or_insert_with(Instant::now);
            if t.elapsed() > LINGER {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    write_atomic(
        &a.run_dir.join("members.json"),
        serde_json::to_string_pretty(&reg.listing())?.as_bytes(),
    )?;
    let _ = server.shutdown();
    Ok(())
}
