//! The stage processes of a run: started with their output going to `logs/<stage>.log`,
//! the address a server bound read from its first stdout line, stopped together.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a stopped stage gets between SIGTERM and SIGKILL (trainers checkpoint).
pub const GRACE: Duration = Duration::from_secs(30);

pub struct Stage {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    /// The stream it serves, as it told the rendezvous.
    pub url: Option<String>,
    /// Every JSON line it printed on stdout after the first (its summaries).
    pub json: Arc<Mutex<Vec<Value>>>,
    pub status: Option<ExitStatus>,
    /// The most resident memory seen (`VmHWM`, kB), read while it runs.
    pub peak_rss_kb: u64,
    /// The SAEs it trains (trainers).
    pub points: Vec<String>,
    /// When it started and when its exit was first seen (its mean rate).
    pub started: Instant,
    pub ended: Option<Instant>,
}

/// A stage binary: beside this executable, else on `PATH`.
pub fn find_bin(name: &str) -> Result<PathBuf> {
    let here = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)));
    if let Some(p) = here.filter(|p| p.is_file()) {
        return Ok(p);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("the stage binary `{name}` is neither beside this `pipeline` nor on PATH (build the workspace: cargo build --workspace --bins)")
}

/// Runs a stage binary to completion (a check mode, the eval tokens, an eval); returns
/// its last stdout JSON line, or its own error message.
pub fn run_to_end(bin: &Path, args: &[String], what: &str) -> Result<Value> {
    let out = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let msg = err
            .lines()
            .rev()
            .find(|l| l.starts_with("error"))
            .unwrap_or(err.trim());
        bail!("{what}: {}", msg.trim_start_matches("error: "));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| anyhow!("{what}: {} printed no JSON", bin.display()))
}

impl Stage {
    /// Starts `bin args` (where it serves comes from the rendezvous, not from here).
    pub fn start(name: &str, bin: &Path, args: &[String], logs: &Path) -> Result<Stage> {
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        writeln!(&file, "# {} {}", bin.display(), args.join(" "))?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file.try_clone()?));
        // SAFETY: prctl is async-signal-safe; it makes the stage die with `pipeline`
        // (a `kill -9` of the orchestrator leaves no stage behind).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let json = Arc::new(Mutex::new(Vec::new()));
        {
            let json = json.clone();
            let mut file = file;
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = writeln!(file, "{line}");
                    // every JSON line but a server's `{"listening": ..}` is a summary
                    match serde_json::from_str::<Value>(&line) {
                        Ok(v) if v.get("listening").is_none() => {
                            json.lock().expect("not poisoned").push(v)
                        }
                        _ => {}
                    }
                }
            });
        }
        Ok(Stage {
            name: name.to_string(),
            child,
            log,
            url: None,
            json,
            status: None,
            peak_rss_kb: 0,
            points: Vec::new(),
            started: Instant::now(),
            ended: None,
        })
    }

    pub fn running(&self) -> bool {
        self.status.is_none()
    }

    /// Polls the process; true once it has exited.
    pub fn poll(&mut self) -> Result<bool> {
        if self.status.is_none() {
            // Its high-water mark, while /proc still has it.
            let hwm = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("VmHWM:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                });
            self.peak_rss_kb = self.peak_rss_kb.max(hwm.unwrap_or(0));
            self.status = self.child.try_wait()?;
            if self.status.is_some() {
                self.ended = Some(Instant::now());
            }
        }
        Ok(self.status.is_some())
    }

    pub fn failed(&self) -> bool {
        self.status.is_some_and(|s| !s.success())
    }

    pub fn signal(&self, sig: i32) {
        if self.status.is_none() {
            // SAFETY: a plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(self.child.id() as i32, sig);
            }
        }
    }

    /// "stage `x` failed (exit status 1); the end of its log …".
    pub fn failure(&self) -> String {
        let status = match self.status {
            Some(s) => s.to_string(),
            None => "still running".into(),
        };
        format!(
            "stage `{}` failed ({status}); the end of {}:\n{}",
            self.name,
            self.log.display(),
            tail(&self.log, 12)
        )
    }

    /// Its JSON summary lines so far.
    pub fn summaries(&self) -> Vec<Value> {
        self.json.lock().expect("not poisoned").clone()
    }

    /// Tokens it reported making in its final summary: the tokenizer's sequences ×
    /// `context_size`, a producer's `tokens`, the shuffler's rows, a trainer's most
    /// trained SAE.
    pub fn summary_tokens(&self) -> Option<u64> {
        self.summaries()
            .iter()
            .filter_map(|v| {
                v["tokens"]
                    .as_u64()
                    .or(v["rows_written"].as_u64())
                    .or_else(|| {
                        Some(v["sequences_written"].as_u64()? * v["context_size"].as_u64()?)
                    })
            })
            .max()
    }

    /// Seconds from its start to its exit (or to now while it runs).
    pub fn seconds(&self) -> f64 {
        self.ended
            .unwrap_or_else(Instant::now)
            .duration_since(self.started)
            .as_secs_f64()
    }
}

/// The last `n` lines of a file, indented.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// SIGTERM to every running stage, then SIGKILL to those still running after `grace`.
pub fn stop_all(stages: &mut [Stage], grace: Duration) {
    for s in stages.iter() {
        s.signal(libc::SIGTERM);
    }
    let t0 = Instant::now();
    while t0.elapsed() < grace {
        let mut alive = false;
        for s in stages.iter_mut() {
            alive |= !s.poll().unwrap_or(true);
        }
        if !alive {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for s in stages.iter_mut() {
        s.signal(libc::SIGKILL);
        let _ = s.child.wait().map(|st| s.status = Some(st));
    }
}
