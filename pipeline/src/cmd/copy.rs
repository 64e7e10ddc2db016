//! `pipeline copy FROM... TO`: replay, capture, serve or read through a stream.

use super::{interrupt_flag, parse_bytes, peak_rss_mib, progress, ClientArgs};
use anyhow::{bail, Context, Result};
use pipeline::cli::{consumer_names, parse_mode};
use pipeline::convert::{convert_source, ActDtype};
use pipeline::flight::{self, FlightUrl, ServerConfig, StreamConfig};
use pipeline::shards::{Existing, ShardOptions, ShardWriter};
use pipeline::{open_sources, BatchSink, BatchSource, OpenOptions};
use schemas::streams::Mode;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Streams to read (several are merged round-robin, in this order).
    #[arg(required = true, num_args = 1.., value_name = "FROM")]
    from: Vec<String>,
    /// A shard directory, `grpc://HOST:PORT/NAME` to serve, or `-`.
    #[arg(value_name = "TO")]
    to: String,
    /// Start reading FROM at this position (batch index).
    #[arg(long, default_value_t = 0)]
    position: u64,
    /// Only these columns (comma-separated).
    #[arg(long, value_delimiter = ',')]
    columns: Option<Vec<String>>,
    /// The consumer name to read a Flight stream as.
    #[arg(long)]
    consumer: Option<String>,
    /// Convert the activation columns: float32 or float16 (storage and wire only).
    #[arg(long, value_parser = ActDtype::parse)]
    dtype: Option<ActDtype>,
    /// Shards are closed once they hold this many bytes.
    #[arg(long, value_parser = parse_bytes, default_value = "256MiB")]
    shard_bytes: usize,
    /// Continue a shard directory after its last complete shard (FROM is read from there).
    #[arg(long)]
    resume: bool,
    /// Replace an existing output directory (swapped in once the copy has finished).
    #[arg(long)]
    overwrite: bool,
    /// Serving: `broadcast` (every consumer gets every batch) or `partition` (batch p
    /// goes to consumer p mod N).
    #[arg(long, default_value = "broadcast", value_parser = parse_mode)]
    mode: Mode,
    /// Serving: the consumers, as names (`t0,t1,t2`) or a count (`3` = `0,1,2`).
    #[arg(long, default_value = "1")]
    consumers: String,
    /// Serving: the most bytes of batches the server holds; the slowest consumer sets
    /// the pace, and about half of it is kept behind each consumer for reconnects.
    #[arg(long, value_parser = parse_bytes, default_value = "256MiB")]
    window_bytes: usize,
    /// Serving with TLS (`grpc+tls://` TO): the certificate (PEM).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Serving with TLS: the certificate's private key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Serving: allow a non-loopback address without TLS and a token.
    #[arg(long)]
    insecure: bool,
    #[command(flatten)]
    client: ClientArgs,
    /// Wait this many milliseconds before each batch (to pace a copy or a test).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// `-` only: also print an xxHash3 digest of the batches (IPC bytes, chained).
    #[arg(long)]
    digest: bool,
    /// `-` only: also print the position of every batch received.
    #[arg(long)]
    list_positions: bool,
}

pub fn run(a: Args) -> Result<()> {
    let interrupted = interrupt_flag()?;
    let mut opts = OpenOptions {
        position: a.position,
        columns: a.columns.clone(),
        consumer: a.consumer.clone(),
        column_hint: None,
        client: a.client.config()?,
    };
    if a.to == "-" {
        return read_through(&a, &opts, &interrupted);
    }
    if flight::is_url(&a.to) {
        return serve(&a, &opts, interrupted);
    }
    let dir = PathBuf::from(&a.to);
    if a.resume && a.overwrite {
        bail!("--resume and --overwrite contradict each other");
    }
    if a.resume && pipeline::shards::is_shard_dir(&dir)? {
        let m = pipeline::shards::read_manifest(&dir)?;
        if a.position != 0 && a.position != m.batches {
            bail!(
                "--position {} disagrees with {}, which continues at {}",
                a.position,
                dir.display(),
                m.batches
            );
        }
        opts.position = m.batches;
    }
    let mut src = source(&a, &opts)?;
    let existing = match (a.resume, a.overwrite) {
        (true, _) => Existing::Resume,
        (_, true) => Existing::Overwrite,
        _ => Existing::Refuse,
    };
    let mut w = ShardWriter::create(
        &dir,
        src.schema(),
        ShardOptions {
            shard_bytes: a.shard_bytes as u64,
            existing,
            ..Default::default()
        },
    )?;
    let start = w.position();
    let bar = progress(&format!("copy to {}", dir.display()));
    let t0 = Instant::now();
    let (n, rows) = pump(&a, src.as_mut(), &mut w, &interrupted, &bar)?;
    bar.finish_and_clear();
    if interrupted.load(Ordering::SeqCst) {
        bail!(
            "interrupted at position {}: {} holds every complete shard; --resume continues it",
            w.position(),
            dir.display()
        );
    }
    w.finish()?;
    let m = w.manifest();
    println!(
        "{}",
        json!({"output": dir, "from_position": start, "batches_written": n, "rows_written": rows,
               "batches": m.batches, "rows": m.rows, "shards": m.shards.len(), "bytes": m.bytes,
               "seconds": t0.elapsed().as_secs_f64()})
    );
    Ok(())
}

fn source(a: &Args, opts: &OpenOptions) -> Result<Box<dyn BatchSource>> {
    let src = open_sources(&a.from, opts)?;
    Ok(match a.dtype {
        Some(d) => Box::new(convert_source(src, d)),
        None => src,
    })
}

/// Copies every batch of `src` into `sink` (not finishing it); returns batches and rows.
fn pump(
    a: &Args,
    src: &mut dyn BatchSource,
    sink: &mut dyn BatchSink,
    interrupted: &AtomicBool,
    bar: &indicatif::ProgressBar,
) -> Result<(u64, u64)> {
    let (mut n, mut rows) = (0u64, 0u64);
    while !interrupted.load(Ordering::SeqCst) {
        if a.delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(a.delay_ms));
        }
        let Some(b) = src.next_batch()? else { break };
        sink.write(&b)?;
        n += 1;
        rows += b.num_rows() as u64;
        bar.inc(1);
        bar.set_message(format!("{rows} rows"));
    }
    Ok((n, rows))
}

fn serve(a: &Args, opts: &OpenOptions, interrupted: Arc<AtomicBool>) -> Result<()> {
    let url = FlightUrl::parse(&a.to)?;
    let Some(name) = url.stream.clone() else {
        bail!("{}: name the stream to serve: grpc://HOST:PORT/NAME", a.to);
    };
    if url.tls != a.tls_cert.is_some() {
        bail!(
            "{}: grpc+tls:// is served with --tls-cert and --tls-key, grpc:// without them",
            a.to
        );
    }
    let mut src = source(a, opts)?;
    let cfg = ServerConfig {
        listen: format!("{}:{}", url.host, url.port),
        tls_cert: a.tls_cert.clone(),
        tls_key: a.tls_key.clone(),
        token: opts.client.token.clone(),
        insecure: a.insecure,
        max_message_bytes: opts.client.max_message_bytes,
        cancel: interrupted.clone(),
        ..Default::default()
    };
    if a.insecure && !cfg.listen.starts_with("127.") && !cfg.listen.starts_with("[::1]") {
        eprintln!("warning: serving {} in the clear (--insecure)", cfg.listen);
    }
    let stream = StreamConfig {
        name: name.clone(),
        mode: a.mode,
        consumers: consumer_names(&a.consumers)?,
        window_bytes: a.window_bytes,
        first_position: src.position(),
    };
    let (server, mut served) = flight::serve(&cfg, vec![(stream, src.schema())])?;
    let scheme = if url.tls { "grpc+tls" } else { "grpc" };
    let base = format!("{scheme}://{}", server.addr());
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{}",
            json!({"listening": base, "stream": format!("{base}/{name}")})
        )?;
        out.flush()?;
    }
    let mut sink = served.remove(0);
    let bar = progress(&format!("serve {name}"));
    let copied = pump(a, src.as_mut(), &mut sink, &interrupted, &bar);
    bar.finish_and_clear();
    match &copied {
        Ok(_) if !interrupted.load(Ordering::SeqCst) => sink.finish()?,
        Ok(_) => sink.fail("the server was interrupted"),
        Err(e) => sink.fail(&format!("{e:#}")),
    }
    let drained = copied.is_ok() && server.wait_drained();
    let status = server.statuses().remove(0);
    server.shutdown()?;
    copied.context("the stream being served failed")?;
    if !drained {
        bail!(
            "interrupted while serving {name} (at position {})",
            status.batches
        );
    }
    println!(
        "{}",
        json!({"served": name, "batches": status.batches, "rows": status.rows,
               "window_peak_bytes": status.window_peak_bytes,
               "window_limit_bytes": status.window_limit_bytes,
               "consumers": status.consumers, "peak_rss_mib": peak_rss_mib()})
    );
    Ok(())
}

/// Reads every value of every batch (the float columns are summed so nothing is
/// skipped) and prints a summary.
fn read_through(a: &Args, opts: &OpenOptions, interrupted: &AtomicBool) -> Result<()> {
    let mut src = source(a, opts)?;
    let first = src.position();
    let t0 = Instant::now();
    let (mut n, mut rows, mut bytes, mut sum) = (0u64, 0u64, 0u64, 0f64);
    let mut positions = Vec::new();
    let mut hash = twox_hash::XxHash3_64::new();
    let gen = arrow_ipc::writer::IpcDataGenerator::default();
    let mut tracker = arrow_ipc::writer::DictionaryTracker::new(false);
    let mut ctx = arrow_ipc::writer::IpcWriteContext::default();
    let ipc_opts = arrow_ipc::writer::IpcWriteOptions::default();
    let bar = progress("read");
    while !interrupted.load(Ordering::SeqCst) {
        if a.delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(a.delay_ms));
        }
        let Some(b) = src.next_batch()? else { break };
        n += 1;
        rows += b.num_rows() as u64;
        bytes += pipeline::stream::batch_bytes(&b) as u64;
        sum += sum_floats(&b);
        if a.list_positions {
            positions.push(src.position() - 1);
        }
        if a.digest {
            use std::hash::Hasher;
            let (_, enc) = gen.encode(&b, &mut tracker, &ipc_opts, &mut ctx)?;
            hash.write(&enc.ipc_message);
            hash.write(&enc.arrow_data);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if interrupted.load(Ordering::SeqCst) {
        bail!("interrupted at position {}", src.position());
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut out = json!({"from": a.from, "first_position": first, "next_position": src.position(),
        "batches": n, "rows": rows, "bytes": bytes, "seconds": secs,
        "gb_per_s": bytes as f64 / secs / 1e9, "rows_per_s": rows as f64 / secs, "sum": sum});
    if a.digest {
        use std::hash::Hasher;
        out["digest"] = format!("{:016x}", hash.finish()).into();
    }
    if a.list_positions {
        out["positions"] = positions.into();
    }
    println!("{out}");
    Ok(())
}

/// The sum of every f32/f16 list value of a batch (reading each one).
fn sum_floats(b: &arrow_array::RecordBatch) -> f64 {
    use arrow_array::{Array, FixedSizeListArray, Float16Array, Float32Array};
    let mut s = 0f64;
    for c in b.columns() {
        let Some(l) = c.as_any().downcast_ref::<FixedSizeListArray>() else {
            continue;
        };
        let d = l.value_length() as usize;
        let (start, len) = (l.offset() * d, l.len() * d);
        let v = l.values();
        if let Some(f) = v.as_any().downcast_ref::<Float32Array>() {
            s += super::sum_f32(&f.values()[start..start + len]);
        } else if let Some(h) = v.as_any().downcast_ref::<Float16Array>() {
            // widened in blocks, as a consumer of f16 activations would
            let mut block = [0f32; 4096];
            for ch in h.values()[start..start + len].chunks(4096) {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(ch, &mut block[..ch.len()]);
                s += super::sum_f32(&block[..ch.len()]);
            }
        }
    }
    s
}
