//! TLS and tokens, and every failure a user can meet between processes: each is a
//! clear error naming the address, stream, limit or position, in bounded time.

mod support;

use std::time::{Duration, Instant};
use support::*;

struct Pki {
    _dir: tempfile::TempDir,
    ca: String,
    cert: String,
    key: String,
    token: String,
    wrong: String,
}

/// A CA and a server certificate for 127.0.0.1 and localhost, made here.
fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let w = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    Pki {
        ca: w("ca.pem", &ca_cert.pem()),
        cert: w("server.pem", &cert.pem()),
        key: w("server.key", &key.serialize_pem()),
        token: w("token", "s3cret-token\n"),
        wrong: w("wrong", "not-the-token"),
        _dir: dir,
    }
}

#[test]
fn tls_and_token() {
    let p = pki();
    let spec = "synthetic:tokens?batches=5&rows=4&context=8";
    let mut server = spawn(&[
        "copy",
        spec,
        "grpc+tls://127.0.0.1:0/t",
        "--tls-cert",
        &p.cert,
        "--tls-key",
        &p.key,
        "--token-file",
        &p.token,
    ]);
    let url = server.served_url();
    assert!(url.starts_with("grpc+tls://127.0.0.1:"), "{url}");
    // a client reading `from` with `flags`, giving up on connecting after 2 s
    let read = |from: &str, flags: &[&str]| {
        let mut args = vec!["copy", from, "-", "--connect-timeout", "2"];
        args.extend_from_slice(flags);
        run(&args)
    };
    let fails = |from: &str, flags: &[&str]| {
        let o = read(from, flags);
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };

    let e = fails(&url, &["--tls-ca", &p.ca, "--token-file", &p.wrong]);
    assert!(
        e.contains("Unauthenticated") && e.contains("token sent is wrong"),
        "{e}"
    );
    let e = fails(&url, &["--tls-ca", &p.ca]);
    assert!(
        e.contains("Unauthenticated") && e.contains("none was sent"),
        "{e}"
    );
    let plain = url.replace("grpc+tls://", "grpc://");
    let e = fails(&plain, &["--token-file", &p.token]);
    assert!(
        e.contains(&plain) && e.contains("grpc+tls://"),
        "plain text against TLS: {e}"
    );
    let e = fails(&url, &["--token-file", &p.token]);
    assert!(e.contains("--tls-ca"), "{e}");

    let o = read(&url, &["--tls-ca", &p.ca, "--token-file", &p.token]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ok: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ok["batches"], 5);
    server.finish_json();

    // a non-loopback address needs TLS and a token, or --insecure
    let e = run_err(&["copy", spec, "grpc://0.0.0.0:0/t"]);
    assert!(
        e.contains("0.0.0.0:0") && e.contains("not a loopback address") && e.contains("--insecure"),
        "{e}"
    );
}

#[test]
fn listening_and_connecting_fail_clearly() {
    // port in use
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let e = run_err(&[
        "copy",
        "synthetic:tokens?batches=1&rows=1&context=2",
        &format!("grpc://127.0.0.1:{port}/t"),
    ]);
    assert!(
        e.contains(&format!("cannot listen on 127.0.0.1:{port}")) && e.contains("in use"),
        "{e}"
    );

    // nothing listening: retried with backoff for --connect-timeout, then named
    let port = free_port();
    let url = format!("grpc://127.0.0.1:{port}/acts");
    let t0 = Instant::now();
    let e = run_err(&["copy", &url, "-", "--connect-timeout", "2"]);
    let took = t0.elapsed();
    assert!(
        e.contains(&url) && e.contains("cannot connect within 2.0 s"),
        "{e}"
    );
    assert!(took < Duration::from_secs(30), "gave up after {took:?}");
}

#[test]
fn stream_errors_name_what_went_wrong() {
    let spec = "synthetic:activations?batches=3&rows=128&d=1024";
    let mut server = spawn(&[
        "copy",
        spec,
        "grpc://127.0.0.1:0/acts",
        "--max-message-bytes",
        "100000",
    ]);
    let url = server.served_url();
    let base = url.trim_end_matches("/acts").to_string();

    // unknown stream
    let e = run_err(&["copy", &format!("{base}/nope"), "-"]);
    assert!(
        e.contains("no stream 'nope'") && e.contains("streams: acts"),
        "{e}"
    );
    // unknown consumer
    let e = run_err(&["copy", &url, "-", "--consumer", "zed"]);
    assert!(
        e.contains("no consumer 'zed'") && e.contains("its consumers: 0"),
        "{e}"
    );
    // a ticket that is not ours
    let got = pipeline::flight::runtime().block_on(async {
        let ch = tonic::transport::Channel::from_shared(base.replace("grpc://", "http://"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = arrow_flight::flight_service_client::FlightServiceClient::new(ch);
        c.do_get(arrow_flight::Ticket::new("SELECT * FROM /etc/passwd"))
            .await
            .err()
            .unwrap()
    });
    assert_eq!(got.code(), tonic::Code::InvalidArgument);
    assert!(
        got.message().contains("not a saestream ticket"),
        "{}",
        got.message()
    );
    // a batch (~520 KB) over the server's message limit
    let e = run_err(&["copy", &url, "-"]);
    assert!(
        e.contains("batch 0 of stream 'acts'")
            && e.contains("over this server's limit of 100000 bytes"),
        "{e}"
    );
    drop(server);

    // over the client's limit
    let mut server = spawn(&["copy", spec, "grpc://127.0.0.1:0/acts"]);
    let url = server.served_url();
    let e = run_err(&["copy", &url, "-", "--max-message-bytes", "100000"]);
    assert!(
        e.contains("this client accepts messages up to 100000 bytes"),
        "{e}"
    );
    drop(server);

    // upstreams of different schemas cannot be merged
    let mut a = spawn(&[
        "copy",
        "synthetic:activations?batches=2&rows=4&d=8",
        "grpc://127.0.0.1:0/x",
    ]);
    let mut b = spawn(&[
        "copy",
        "synthetic:activations?batches=2&rows=4&d=9",
        "grpc://127.0.0.1:0/x",
    ]);
    let (ua, ub) = (a.served_url(), b.served_url());
    let e = run_err(&["copy", &ua, &ub, "-"]);
    assert!(
        e.contains("cannot merge") && e.contains(&ua) && e.contains(&ub),
        "{e}"
    );
    assert!(
        e.contains("FixedSizeList(8") && e.contains("FixedSizeList(9"),
        "{e}"
    );
}

#[test]
fn an_upstream_killed_mid_stream_is_named_with_the_last_position() {
    let spec = "synthetic:tokens?batches=500&rows=4&context=8&delay_ms=20";
    let mut server = spawn(&["copy", spec, "grpc://127.0.0.1:0/t"]);
    let url = server.served_url();
    let base = url.trim_end_matches("/t").to_string();
    let mut client = spawn(&["copy", &url, "-"]);
    wait_for("the client to be sent a few batches", || {
        consumer_position(&base, 0) >= 5
    });
    server.child.kill().unwrap();
    let (ok, e) = client.wait(LIMIT);
    assert!(!ok);
    assert!(
        e.contains(&url)
            && e.contains("the stream broke after position")
            && e.contains("resume from position")
            && !e.contains("TLS"),
        "{e}"
    );
}

#[test]
fn with_reconnect_a_client_continues_from_its_position_on_a_restarted_upstream() {
    let spec = "synthetic:activations?batches=120&rows=16&d=32&seed=2";
    let port = free_port();
    let listen = format!("grpc://127.0.0.1:{port}/acts");
    let slow = format!("{spec}&delay_ms=15");
    let mut server = spawn(&["copy", &slow, &listen]);
    let url = server.served_url();
    let mut client = spawn(&[
        "copy",
        &url,
        "-",
        "--digest",
        "--reconnect",
        "--connect-timeout",
        "60",
    ]);
    let base = url.trim_end_matches("/acts").to_string();
    wait_for("the client to be sent 20 batches", || {
        consumer_position(&base, 0) >= 20
    });
    server.child.kill().unwrap();
    server.wait(LIMIT);
    // the same stream again on the same port; the client asks for its next position
    let mut again = spawn(&["copy", spec, &listen]);
    assert_eq!(again.served_url(), url);
    let out = client.finish_json();
    again.finish_json();
    assert_eq!(out["batches"], 120);
    assert_eq!(
        out["digest"],
        run_json(&["copy", spec, "-", "--digest"])["digest"]
    );
}
