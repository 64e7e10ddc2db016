//! `pipeline inspect URL|DIR|FILE`.

use super::ClientArgs;
use anyhow::Result;
use pipeline::flight::{self, RemoteStream};
use pipeline::shards::{self, describe_fields, ShardReader};
use pipeline::{open_source, OpenOptions};
use serde_json::{json, Value};
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// `grpc://HOST:PORT[/STREAM]`, a shard directory, or activation files.
    target: String,
    /// Shard directories: trust the manifest instead of reading every shard.
    #[arg(long)]
    no_verify: bool,
    #[command(flatten)]
    client: ClientArgs,
}

fn remote_json(s: &RemoteStream) -> Value {
    json!({
        "name": s.name,
        "fields": describe_fields(&s.schema),
        "metadata": s.schema.metadata(),
        "total_records": s.total_records,
        "status": s.status,
    })
}

pub fn run(a: Args) -> Result<()> {
    let out = if flight::is_url(&a.target) {
        let url = flight::FlightUrl::parse(&a.target)?;
        let streams = flight::remote_streams(&a.target, &a.client.config()?)?;
        json!({"url": url.base(), "streams": streams.iter().map(remote_json).collect::<Vec<_>>()})
    } else if shards::is_shard_dir(Path::new(&a.target))? {
        let dir = Path::new(&a.target);
        let r = ShardReader::open(dir, 0)?;
        let m = r.manifest().clone();
        if !a.no_verify {
            for i in 0..m.shards.len() {
                r.load(i)?;
            }
        }
        json!({"path": dir, "format": m.format, "complete": m.complete, "batches": m.batches,
               "rows": m.rows, "bytes": m.bytes, "fields": m.fields, "metadata": m.metadata,
               "shards": m.shards, "verified": !a.no_verify})
    } else {
        let mut src = open_source(&a.target, &OpenOptions::default())?;
        let schema = src.schema();
        let mut rows = 0u64;
        while let Some(b) = src.next_batch()? {
            rows += b.num_rows() as u64;
        }
        json!({"path": a.target, "fields": describe_fields(&schema), "metadata": schema.metadata(),
               "batches": src.position(), "rows": rows})
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
