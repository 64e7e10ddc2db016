//! Streams between real `pipeline` processes on loopback: round trips of every stream
//! kind, broadcast and partition, a consumer killed and restarted, merges that do not
//! depend on timing, and a standard Flight client (pyarrow).

mod support;

use pipeline::BatchSource;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::time::Duration;
use support::*;

#[test]
fn every_stream_kind_round_trips_bit_for_bit() {
    let d = tempfile::tempdir().unwrap();
    for (i, kind) in ["tokens", "activations", "batches"].into_iter().enumerate() {
        let spec = format!("synthetic:{kind}?batches=7&rows=50&d=16&hooks=2&context=12&seed={i}");
        let cached = d.path().join(format!("{kind}-cache"));
        run_json(&["copy", &spec, s(&cached), "--shard-bytes", "10KiB"]);
        let mut server = spawn(&["copy", s(&cached), &format!("grpc://127.0.0.1:0/{kind}")]);
        let url = server.served_url();
        let got = d.path().join(format!("{kind}-got"));
        run_json(&["copy", &url, s(&got)]);
        let summary = server.finish_json();
        assert_eq!(summary["batches"], 7);

        let want = batches(&spec);
        assert_eq!(batches(s(&got)), want, "{kind}: batches");
        let (a, b) = (schema_of(&spec), schema_of(s(&got)));
        assert_eq!(a, b, "{kind}: schema and metadata");
        assert!(!b.metadata().is_empty());
        if kind == "activations" {
            assert_eq!(
                b.fields()
                    .iter()
                    .filter(|f| f.name().starts_with("blocks."))
                    .count(),
                2,
                "two hook columns"
            );
        }
    }
}

fn read_args<'a>(url: &'a str, consumer: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "copy",
        url,
        "-",
        "--consumer",
        consumer,
        "--digest",
        "--list-positions",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn broadcast_waits_for_the_slowest_inside_its_window() {
    // 300 batches of ~1 MiB through an 8 MiB window; consumer c is slowed.
    let spec = "synthetic:activations?batches=300&rows=256&d=1024&distinct=8";
    let mut server = spawn(&[
        "copy",
        spec,
        "grpc://127.0.0.1:0/acts",
        "--consumers",
        "a,b,c",
        "--window-bytes",
        "8MiB",
    ]);
    let url = server.served_url();
    let mut clients: Vec<Proc> = ["a", "b", "c"]
        .iter()
        .map(|c| {
            let extra: &[&str] = if *c == "c" { &["--delay-ms", "5"] } else { &[] };
            spawn(&read_args(&url, c, extra))
        })
        .collect();
    let outs: Vec<Value> = clients.iter_mut().map(|c| c.finish_json()).collect();
    let want: Vec<u64> = (0..300).collect();
    for o in &outs {
        assert_eq!(o["batches"], 300);
        assert_eq!(
            o["digest"], outs[0]["digest"],
            "identical batches in the same order"
        );
        let pos: Vec<u64> = serde_json::from_value(o["positions"].clone()).unwrap();
        assert_eq!(pos, want);
    }
    let direct = run_json(&["copy", spec, "-", "--digest"]);
    assert_eq!(
        direct["digest"], outs[0]["digest"],
        "what was served is the stream"
    );

    let summary = server.finish_json();
    let peak = summary["window_peak_bytes"].as_u64().unwrap();
    let batch = outs[0]["bytes"].as_u64().unwrap() / 300;
    assert!(batch > 1 << 20, "~1 MiB batches ({batch} bytes)");
    assert!(peak <= 8 << 20, "window peak {peak} over its 8 MiB limit");
    assert!(peak >= 4 * batch, "the window was used ({peak} bytes)");
    // The stream is ~300 MiB; a server that held it would show it.
    let rss = summary["peak_rss_mib"].as_f64().unwrap();
    eprintln!(
        "server peak RSS {rss:.0} MiB, window peak {:.1} MiB",
        peak as f64 / 1048576.0
    );
    assert!(
        rss < 100.0,
        "server peak RSS {rss} MiB for a 300 MiB stream"
    );
}

#[test]
fn partition_sends_each_batch_to_exactly_one_consumer() {
    let spec = "synthetic:batches?batches=41&rows=32&d=8&seed=3";
    let serve = || {
        let args = ["--mode", "partition", "--consumers", "2"];
        spawn(&[&["copy", spec, "grpc://127.0.0.1:0/b"][..], &args].concat())
    };
    let mut server = serve();
    let url = server.served_url();
    let mut c0 = spawn(&read_args(&url, "0", &[]));
    let mut c1 = spawn(&read_args(&url, "1", &[]));
    let (o0, o1) = (c0.finish_json(), c1.finish_json());
    server.finish_json();
    let p0: Vec<u64> = serde_json::from_value(o0["positions"].clone()).unwrap();
    let p1: Vec<u64> = serde_json::from_value(o1["positions"].clone()).unwrap();
    assert!(p0.iter().all(|p| p % 2 == 0) && p1.iter().all(|p| p % 2 == 1));
    let mut all: Vec<u64> = p0.iter().chain(&p1).copied().collect();
    all.sort();
    assert_eq!(all, (0..41).collect::<Vec<_>>(), "every batch exactly once");

    // merging the two partitions in consumer order gives the stream back
    let mut server = serve();
    let url = server.served_url();
    let merged = run_json(&[
        "copy",
        &format!("{url}?consumer=0"),
        &format!("{url}?consumer=1"),
        "-",
        "--digest",
    ]);
    server.finish_json();
    assert_eq!(
        merged["digest"],
        run_json(&["copy", spec, "-", "--digest"])["digest"]
    );
}

#[test]
fn a_killed_consumer_restarts_at_its_last_position() {
    let d = tempfile::tempdir().unwrap();
    // 800 batches of ~256 KiB (200 MiB) through a 96 MiB window, which keeps ~48 MiB
    // behind b: more than b's lag (its 2 MiB queue, the 16 MiB HTTP/2 window, socket
    // buffers and the 1 MiB shard it was writing).
    let spec = "synthetic:activations?batches=800&rows=64&d=1024&seed=9";
    let mut server = spawn(&[
        "copy",
        spec,
        "grpc://127.0.0.1:0/acts",
        "--consumers",
        "a,b",
        "--window-bytes",
        "96MiB",
    ]);
    let url = server.served_url();
    let mut a = spawn(&read_args(&url, "a", &[]));
    let out = d.path().join("b");
    let b_args = |extra: &[&str]| {
        let mut v = vec![
            "copy".to_string(),
            url.clone(),
            s(&out).to_string(),
            "--consumer".into(),
            "b".into(),
            "--shard-bytes".into(),
            "1MiB".into(),
            "--queue-bytes".into(),
            "2MiB".into(),
        ];
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let args: Vec<String> = b_args(&["--delay-ms", "10"]);
    let mut b = spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let manifest = out.join("manifest.json");
    wait_for("consumer b's third shard", || {
        pipeline::shards::read_manifest(&out).is_ok_and(|m| m.shards.len() >= 3)
            && manifest.exists()
    });
    b.child.kill().unwrap(); // SIGKILL
    b.wait(LIMIT);
    let before = pipeline::shards::read_manifest(&out).unwrap();
    assert!(!before.complete && before.batches < 800);

    let args = b_args(&["--resume"]);
    let mut b = spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let resumed = b.finish_json();
    assert_eq!(resumed["from_position"], before.batches);
    a.finish_json();
    server.finish_json();
    assert_eq!(
        batches(s(&out)),
        batches(spec),
        "b has the whole stream, unchanged"
    );
}

#[test]
fn a_merge_does_not_depend_on_start_order_or_timing() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("random seed {seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let specs: Vec<String> = (0..3)
        .map(|i| {
            format!(
                "synthetic:activations?batches={}&rows=16&d=8&seed={i}",
                9 + i % 2
            )
        })
        .collect();
    // the expected stream: the upstreams taken round-robin in order
    let srcs: Vec<Box<dyn BatchSource>> = specs
        .iter()
        .map(|sp| pipeline::open_source(sp, &Default::default()).unwrap())
        .collect();
    let mut m = pipeline::merge::Merge::new(srcs, 0).unwrap();
    let mut want = vec![];
    while let Some(b) = m.next_batch().unwrap() {
        want.push(b);
    }
    assert_eq!(want.len(), 28);

    let d = tempfile::tempdir().unwrap();
    for run_i in 0..2 {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let urls: Vec<String> = ports
            .iter()
            .map(|p| format!("grpc://127.0.0.1:{p}/acts"))
            .collect();
        // the reader starts first and waits for its upstreams
        let out = d.path().join(format!("run{run_i}"));
        let mut args = vec!["copy"];
        args.extend(urls.iter().map(String::as_str));
        args.push(s(&out));
        let mut reader = spawn(&args);
        let mut order = vec![0usize, 1, 2];
        for i in (1..3).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut servers = vec![];
        for &i in &order {
            std::thread::sleep(Duration::from_millis(rng.random_range(0..400)));
            let delay = rng.random_range(0..30);
            let spec = format!("{}&delay_ms={delay}", specs[i]);
            let listen = format!("grpc://127.0.0.1:{}/acts", ports[i]);
            servers.push(spawn(&["copy", &spec, &listen]));
        }
        reader.finish_json();
        for mut sv in servers {
            sv.finish_json();
        }
        assert_eq!(batches(s(&out)), want, "run {run_i}, start order {order:?}");
    }
}

#[test]
fn pyarrow_flight_lists_and_reads_our_stream() {
    let have = std::process::Command::new("python3")
        .args(["-c", "import pyarrow.flight"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !available(have, "python3 with pyarrow", "PYARROW") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let spec = "synthetic:activations?batches=5&rows=20&d=6&hooks=2&seed=4";
    let mut server = spawn(&["copy", spec, "grpc://127.0.0.1:0/acts"]);
    let url = server.served_url();
    let base = url
        .trim_end_matches("/acts")
        .replace("grpc://", "grpc+tcp://");
    let table = d.path().join("t.arrow");
    let script = r#"
import json, sys
import pyarrow as pa, pyarrow.flight as fl
c = fl.connect(sys.argv[1])
names = [f.descriptor.path[0].decode() for f in c.list_flights()]
info = c.get_flight_info(fl.FlightDescriptor.for_path("acts"))
schema = c.get_schema(fl.FlightDescriptor.for_path("acts")).schema
meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
# the server exits once its one consumer has everything: read last
t = c.do_get(info.endpoints[0].ticket).read_all()
with pa.OSFile(sys.argv[2], "wb") as f:
    w = pa.ipc.new_file(f, t.schema)
    w.write_table(t)
    w.close()
print(json.dumps({"names": names, "rows": t.num_rows,
                  "columns": schema.names, "metadata": meta}))
"#;
    let o = std::process::Command::new("python3")
        .args(["-c", script, &base, s(&table)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["names"], serde_json::json!(["acts"]));
    assert_eq!(v["rows"], 100);
    server.finish_json();

    let want = batches(spec);
    let schema = want[0].schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(v["columns"], serde_json::json!(names), "GetSchema");
    assert_eq!(
        v["metadata"],
        serde_json::json!(schema.metadata()),
        "GetSchema metadata"
    );
    let want = arrow_select::concat::concat_batches(&schema, &want).unwrap();
    let got = batches(s(&table));
    let got = arrow_select::concat::concat_batches(&got[0].schema(), &got).unwrap();
    assert_eq!(got.schema(), schema, "schema and metadata as we serve them");
    assert_eq!(
        got.columns(),
        want.columns(),
        "pyarrow's table equals our stream"
    );
}
