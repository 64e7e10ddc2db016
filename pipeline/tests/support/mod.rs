//! Shared set-up of the process tests: start processes (killed when dropped, also when a
//! test fails), read the address a server bound, wait with deadlines. Used by the
//! `pipeline` crate's tests (its own binary) and by the end-to-end tests in `tests/`
//! (every stage binary, found beside the test executable).
#![allow(dead_code)]

use arrow_array::RecordBatch;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `pipeline` binary: cargo's for this crate's tests, else the workspace's.
pub fn bin() -> std::path::PathBuf {
    option_env!("CARGO_BIN_EXE_pipeline")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_bin("pipeline"))
}

/// A workspace binary: in the target directory above the test executable
/// (`target/debug/deps/TEST` → `target/debug/NAME`), built by `cargo test --workspace`.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the stage binaries first (cargo test --workspace builds them)",
        p.display()
    );
    p
}
/// Deadline for anything a test waits on.
pub const LIMIT: Duration = Duration::from_secs(120);

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    pub what: String,
    stdout: Option<mpsc::Receiver<String>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn cmd(args: &[&str]) -> Command {
    cmd_of(&bin(), args)
}

pub fn cmd_of(bin: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.args(args).env("RUST_LOG", "warn");
    c
}

/// Starts `pipeline ARGS` with stdout read line by line on a thread.
pub fn spawn(args: &[&str]) -> Proc {
    spawn_of(&bin(), args)
}

/// Starts `BIN ARGS` with stdout read line by line on a thread.
pub fn spawn_of(bin: &Path, args: &[&str]) -> Proc {
    let mut child = cmd_of(bin, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let name = bin
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    Proc {
        child,
        what: format!("{name} {}", args.join(" ")),
        stdout: Some(rx),
    }
}

impl Proc {
    /// The next stdout line as JSON, waiting at most [`LIMIT`].
    pub fn json_line(&mut self) -> Value {
        let rx = self.stdout.as_ref().expect("stdout is read");
        match rx.recv_timeout(LIMIT) {
            Ok(l) => serde_json::from_str(&l)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l}", self.what)),
            Err(_) => {
                let _ = self.child.kill();
                let out = self.stderr_text();
                panic!("{}: no output line (stderr: {out})", self.what)
            }
        }
    }

    /// A server's stream URL (its first stdout line).
    pub fn served_url(&mut self) -> String {
        let v = self.json_line();
        v["stream"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"))
            .to_string()
    }

    pub fn stderr_text(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    /// Waits for exit (at most `limit`); returns success and stderr.
    pub fn wait(&mut self, limit: Duration) -> (bool, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st.success(), self.stderr_text());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("{}: still running after {limit:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a successful exit and returns its last stdout line as JSON.
    pub fn finish_json(&mut self) -> Value {
        let (ok, err) = self.wait(LIMIT);
        assert!(ok, "{} failed: {err}", self.what);
        let rx = self.stdout.take().expect("stdout");
        let last = rx
            .iter()
            .last()
            .unwrap_or_else(|| panic!("{}: no stdout", self.what));
        serde_json::from_str(&last).unwrap()
    }
}

/// Runs `pipeline ARGS` to the end within [`LIMIT`].
pub fn run(args: &[&str]) -> Output {
    run_of(&bin(), args)
}

/// Runs `BIN ARGS` to the end within [`LIMIT`].
pub fn run_of(bin: &Path, args: &[&str]) -> Output {
    let mut p = spawn_of(bin, args);
    let deadline = Instant::now() + LIMIT;
    loop {
        if p.child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "{}: still running", p.what);
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = p.child.wait().unwrap();
    let stderr = p.stderr_text().into_bytes();
    let stdout: Vec<String> = p.stdout.take().unwrap().iter().collect();
    Output {
        status,
        stdout: stdout.join("\n").into_bytes(),
        stderr,
    }
}

/// `pipeline run FILE --output RUN_DIR` (no progress lines), which must succeed.
pub fn run_sweep(file: &Path, run_dir: &Path) {
    let (f, r) = (file.to_str().unwrap(), run_dir.to_str().unwrap());
    let o = run(&["run", f, "--output", r, "--progress-every", "1000"]);
    assert!(
        o.status.success(),
        "pipeline run {f}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs and expects success; the last stdout line as JSON.
pub fn run_json(args: &[&str]) -> Value {
    let o = run(args);
    assert!(
        o.status.success(),
        "pipeline {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8(o.stdout).unwrap();
    // one JSON document (inspect), or JSON lines of which the last is the summary
    serde_json::from_str(&text)
        .or_else(|_| serde_json::from_str(text.lines().last().expect("output")))
        .unwrap_or_else(|e| panic!("pipeline {}: not JSON ({e}): {text}", args.join(" ")))
}

/// Runs and expects failure; stderr.
pub fn run_err(args: &[&str]) -> String {
    let o = run(args);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success(),
        "pipeline {} should fail: {e}",
        args.join(" ")
    );
    e
}

/// Waits for `cond` (polled every 20 ms) at most [`LIMIT`].
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every batch of a stream spec (files, shards, synthetic).
pub fn batches(spec: &str) -> Vec<RecordBatch> {
    let mut s = pipeline::open_source(spec, &Default::default()).unwrap();
    let mut v = vec![];
    while let Some(b) = s.next_batch().unwrap() {
        v.push(b);
    }
    v
}

pub fn schema_of(spec: &str) -> arrow_schema::SchemaRef {
    pipeline::open_source(spec, &Default::default())
        .unwrap()
        .schema()
}

/// A loopback port nothing listens on (bound by the OS, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// True when a test needing `what` should run; prints "skipped" otherwise, and
/// panics instead when `SAESTREAM_REQUIRE_<SWITCH>=1`.
pub fn available(ok: bool, what: &str, switch: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var(format!("SAESTREAM_REQUIRE_{switch}")).as_deref() == Ok("1") {
        panic!("{what} is required (SAESTREAM_REQUIRE_{switch}=1) but missing");
    }
    eprintln!("skipped: {what} is not available");
    false
}

/// The position a server will next send to consumer `i` of its first stream, as
/// `pipeline inspect` reports it (0 while it cannot be asked).
pub fn consumer_position(base: &str, i: usize) -> u64 {
    let o = run(&["inspect", base]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    v["streams"][0]["status"]["consumers"][i]["position"]
        .as_u64()
        .unwrap_or(0)
}
