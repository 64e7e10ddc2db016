//! `pipeline bench-flight`: Flight throughput between two processes on loopback, and
//! raw TCP in the same run as the ceiling.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Batches per setting.
    #[arg(long, default_value_t = 200)]
    batches: u64,
    /// Rows (tokens) per batch.
    #[arg(long, default_value_t = 4096)]
    rows: usize,
    /// Activation width.
    #[arg(long, default_value_t = 768)]
    d: usize,
    /// Runs per setting: loopback figures on a small machine vary from run to run, so
    /// each line gives the median and every run.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

/// Kills the child when dropped (a failed bench leaves no server behind).
struct Reaped(Child);
impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn flight(a: &Args, dtype: &str, streams: usize) -> Result<Value> {
    let exe = std::env::current_exe()?;
    let spec = format!(
        "synthetic:activations?batches={}&rows={}&d={}&distinct=4",
        a.batches, a.rows, a.d
    );
    let mut server = Reaped(
        Command::new(&exe)
            .args([
                "copy",
                &spec,
                "grpc://127.0.0.1:0/acts",
                "--mode",
                "partition",
            ])
            .args(["--consumers", &streams.to_string(), "--dtype", dtype])
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the server process")?,
    );
    let mut line = String::new();
    BufReader::new(server.0.stdout.as_mut().expect("piped")).read_line(&mut line)?;
    let first: Value =
        serde_json::from_str(&line).with_context(|| format!("server said: {line}"))?;
    let url = first["stream"]
        .as_str()
        .context("no stream URL")?
        .to_string();
    let froms: Vec<String> = (0..streams)
        .map(|i| format!("{url}?consumer={i}"))
        .collect();
    let client = Command::new(&exe)
        .arg("copy")
        .args(&froms)
        .arg("-")
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run the client process")?;
    if !client.status.success() {
        bail!("the client failed");
    }
    let s: Value = serde_json::from_slice(&client.stdout)?;
    let _ = server.0.wait();
    let secs = s["seconds"].as_f64().unwrap_or(f64::NAN);
    Ok(
        json!({"bench": "flight", "transport": "flight", "dtype": dtype, "streams": streams,
        "batches": s["batches"], "rows": s["rows"], "bytes": s["bytes"], "seconds": secs,
        "gb_per_s": s["gb_per_s"], "tokens_per_s": s["rows_per_s"]}),
    )
}

/// Raw TCP on loopback: `streams` connections each carrying its share of the batches,
/// the reader summing every f32 as the Flight client does.
fn tcp(a: &Args, streams: usize) -> Result<Value> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let batch_bytes = a.rows * a.d * 4;
    let per = a.batches as usize / streams;
    let writer = std::thread::spawn(move || -> Result<()> {
        let buf: Vec<u8> = (0..batch_bytes).map(|i| (i % 251) as u8).collect();
        let mut conns = Vec::new();
        for _ in 0..streams {
            conns.push(listener.accept()?.0);
        }
        let handles: Vec<_> = conns
            .into_iter()
            .map(|mut c| {
                let buf = buf.clone();
                std::thread::spawn(move || -> std::io::Result<()> {
                    for _ in 0..per {
                        c.write_all(&buf)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().expect("writer thread")?;
        }
        Ok(())
    });
    let t0 = Instant::now();
    let readers: Vec<_> = (0..streams)
        .map(|_| {
            std::thread::spawn(move || -> std::io::Result<f64> {
                let mut c = std::net::TcpStream::connect(addr)?;
                // an aligned buffer read as f32, as Arrow's decoder gives its reader
                let mut buf = arrow_buffer::MutableBuffer::from_len_zeroed(batch_bytes);
                let mut sum = 0f64;
                for _ in 0..per {
                    c.read_exact(buf.as_slice_mut())?;
                    sum += super::sum_f32(buf.typed_data::<f32>());
                }
                Ok(sum)
            })
        })
        .collect();
    for r in readers {
        r.join().expect("reader thread")?;
    }
    let secs = t0.elapsed().as_secs_f64();
    writer.join().expect("writer")?;
    let n = (per * streams) as u64;
    let bytes = n * batch_bytes as u64;
    let rows = n * a.rows as u64;
    Ok(
        json!({"bench": "flight", "transport": "tcp", "dtype": "float32", "streams": streams,
        "batches": n, "rows": rows, "bytes": bytes, "seconds": secs,
        "gb_per_s": bytes as f64 / secs / 1e9, "tokens_per_s": rows as f64 / secs}),
    )
}

/// Runs `once` `a.repeat` times; the median run's line, with every run's GB/s.
fn median(a: &Args, mut once: impl FnMut() -> Result<Value>) -> Result<Value> {
    let mut runs: Vec<Value> = (0..a.repeat.max(1))
        .map(|_| once())
        .collect::<Result<_>>()?;
    let gbs = |v: &Value| v["gb_per_s"].as_f64().unwrap_or(f64::NAN);
    runs.sort_by(|x, y| gbs(x).total_cmp(&gbs(y)));
    let all: Vec<f64> = runs
        .iter()
        .map(|r| (gbs(r) * 1000.0).round() / 1000.0)
        .collect();
    let mut mid = runs[runs.len() / 2].clone();
    mid["runs_gb_per_s"] = all.into();
    Ok(mid)
}

pub fn run(a: Args) -> Result<()> {
    if a.batches < 2 || a.rows == 0 || a.d == 0 {
        bail!("--batches must be at least 2, --rows and --d at least 1");
    }
    for streams in [1, 2] {
        println!("{}", median(&a, || tcp(&a, streams))?);
        for dtype in ["float32", "float16"] {
            println!("{}", median(&a, || flight(&a, dtype, streams))?);
        }
    }
    Ok(())
}
