//! A stage's output: its stream served over Flight, cached as shards, or both at once.
//! Every batch goes to each; the server's window and the shard writer both hold it to
//! their bounds, so a slow consumer slows the stage.

use crate::flight::{self, ServedStream, Server, ServerConfig, StreamConfig};
use crate::shards::{ShardOptions, ShardWriter};
use crate::stream::{BatchSink, StreamError};
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use schemas::streams::Mode;
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;

/// Where a stage's stream goes.
pub struct OutputSpec {
    /// The stream's name (`tokens`, `activations`, `batches`).
    pub name: String,
    /// A Flight server to start, and the consumers it expects.
    pub serve: Option<(ServerConfig, Vec<String>)>,
    pub window_bytes: usize,
    /// A cache directory to write.
    pub cache: Option<Cache>,
    /// The position of the first batch (a resumed stage's).
    pub first_position: u64,
}

/// How a stream is cached.
pub enum Cache {
    /// Our shards (`manifest.json` + `shard-NNNNN.arrow`).
    Shards(PathBuf, ShardOptions),
    /// SAELens's cache layout (whole sequences of this many tokens), replacing an
    /// existing directory only if `overwrite`.
    Saelens {
        dir: PathBuf,
        context: usize,
        shard_bytes: u64,
        overwrite: bool,
    },
}

impl Cache {
    /// Our shards in `dir`: an existing directory is refused, replaced (`overwrite`) or
    /// continued (`resume`, a stage restarted at a position).
    pub fn shards(dir: PathBuf, shard_bytes: usize, overwrite: bool, resume: bool) -> Cache {
        let existing = if overwrite {
            crate::shards::Existing::Overwrite
        } else if resume {
            crate::shards::Existing::Resume
        } else {
            crate::shards::Existing::Refuse
        };
        Cache::Shards(
            dir,
            ShardOptions {
                shard_bytes: shard_bytes as u64,
                existing,
                ..Default::default()
            },
        )
    }
}

pub struct Output {
    name: String,
    server: Option<(Server, ServedStream)>,
    shards: Option<(PathBuf, Box<dyn BatchSink>)>,
    position: u64,
    rows: u64,
}

impl Output {
    /// Starts the server (printing `{"listening", "stream"}` as the first stdout line)
    /// and opens the shard directory. A shard directory being resumed must continue at
    /// `first_position`.
    pub fn open(spec: OutputSpec, schema: SchemaRef) -> Result<Output, StreamError> {
        if spec.serve.is_none() && spec.cache.is_none() {
            return Err(StreamError::Other(
                "nowhere to send the output: give --listen ADDR, --output DIR, or both".into(),
            ));
        }
        let shards: Option<(PathBuf, Box<dyn BatchSink>)> = match spec.cache {
            Some(Cache::Shards(dir, opts)) => {
                let w = ShardWriter::create(&dir, schema.clone(), opts)?;
                if w.position() != spec.first_position {
                    return Err(StreamError::Other(format!(
                        "{} continues at position {}, but this run starts at {}",
                        dir.display(),
                        w.position(),
                        spec.first_position
                    )));
                }
                Some((dir, Box::new(w)))
            }
            Some(Cache::Saelens {
                dir,
                context,
                shard_bytes,
                overwrite,
            }) => {
                if spec.first_position != 0 {
                    return Err(StreamError::Other(format!(
                        "{}: a SAELens cache is written whole; it cannot continue a run",
                        dir.display()
                    )));
                }
                let w = crate::saelens_cache::SaelensCacheWriter::create(
                    &dir,
                    &schema,
                    context,
                    shard_bytes,
                    overwrite,
                )?;
                Some((dir, Box::new(w)))
            }
            None => None,
        };
        let server = match spec.serve {
            Some((cfg, consumers)) => {
                let stream = StreamConfig {
                    name: spec.name.clone(),
                    mode: Mode::Broadcast,
                    consumers,
                    window_bytes: spec.window_bytes,
                    first_position: spec.first_position,
                };
                let tls = cfg.tls_cert.is_some() || cfg.tls_pem.is_some();
                let (server, mut served) = flight::serve(&cfg, vec![(stream, schema)])?;
                let scheme = if tls { "grpc+tls" } else { "grpc" };
                let base = match &cfg.advertise {
                    Some(h) => format!("{scheme}://{h}:{}", server.addr().port()),
                    None => format!("{scheme}://{}", server.addr()),
                };
                crate::rendezvous::register(&format!("{base}/{}", spec.name));
                let mut out = std::io::stdout().lock();
                writeln!(
                    out,
                    "{}",
                    json!({"listening": base, "stream": format!("{base}/{}", spec.name)})
                )
                .and_then(|_| out.flush())
                .map_err(|e| StreamError::Other(format!("cannot write to stdout: {e}")))?;
                Some((server, served.remove(0)))
            }
            None => None,
        };
        Ok(Output {
            name: spec.name,
            server,
            shards,
            position: spec.first_position,
            rows: 0,
        })
    }

    /// The position the next batch will have.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Ends the stream: on success, finishes the shards and serves to the end (waiting
    /// for every consumer); on failure, tells the consumers why. Returns a summary.
    pub fn close(mut self, result: Result<(), String>) -> Result<Value, StreamError> {
        let mut summary = json!({"stream": self.name, "batches_written": self.position,
                                 "rows_written": self.rows});
        if let Err(m) = &result {
            if let Some((server, served)) = self.server.take() {
                served.fail(m);
                let _ = server.shutdown();
            }
            return Err(StreamError::Other(m.clone()));
        }
        if let Some((dir, w)) = &mut self.shards {
            w.finish()?;
            summary["output"] = json!(dir);
        }
        if let Some((server, mut served)) = self.server.take() {
            served.finish()?;
            let drained = server.wait_drained();
            let status = server.statuses().remove(0);
            server.shutdown()?;
            if !drained {
                return Err(StreamError::Other(format!(
                    "interrupted while serving '{}' (at position {})",
                    self.name, status.batches
                )));
            }
            summary["window_peak_bytes"] = json!(status.window_peak_bytes);
            summary["consumers"] = json!(status.consumers);
        }
        Ok(summary)
    }
}

impl BatchSink for Output {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), StreamError> {
        if let Some((_, w)) = &mut self.shards {
            w.write(batch)?;
        }
        if let Some((_, s)) = &mut self.server {
            s.write(batch)?;
        }
        self.position += 1;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }
    fn finish(&mut self) -> Result<(), StreamError> {
        if let Some((_, w)) = &mut self.shards {
            w.finish()?;
        }
        if let Some((_, s)) = &mut self.server {
            s.finish()?;
        }
        Ok(())
    }
}
