//! Streams over Arrow Flight: a server that serves named streams to named consumers
//! (broadcast or partition, inside a bounded window) and a client source that reads
//! one. Transport runs on one tokio runtime per process ([`runtime`]); compute threads
//! meet it at bounded queues.

mod client;
mod server;
mod wire;

pub use client::ActionClient;
pub use client::{remote_streams, FlightSource, RemoteStream};
pub use server::{serve, serve_with, Actions, ServedStream, Server, StreamConfig};

use crate::stream::StreamError;
use schemas::streams::{url_keys, SCHEME_GRPC, SCHEME_GRPC_TLS};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// HTTP/2 stream and connection windows (hyper's defaults of 64 KiB–1 MiB cap a
/// loopback stream at a fraction of what it can carry; DEPENDENCIES.md).
pub const H2_WINDOW: u32 = 16 << 20;
/// The largest HTTP/2 frame there is (2^24 - 1).
pub const H2_MAX_FRAME: u32 = (1 << 24) - 1;
/// Default limit on one Flight message (one record batch).
pub const DEFAULT_MAX_MESSAGE: usize = 256 << 20;
/// Room for the Flight envelope around a batch's IPC body.
const ENVELOPE: usize = 64 << 10;
/// HTTP/2 pings: a peer that stops answering is dropped after interval + timeout.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

static RUNTIME_THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sets the transport runtime's threads (before its first use): a stage told to use
/// `--threads N` keeps its transport inside the same budget.
pub fn set_runtime_threads(n: usize) {
    RUNTIME_THREADS.store(n.max(1), std::sync::atomic::Ordering::SeqCst);
}

/// The process's transport runtime.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        let threads = match RUNTIME_THREADS.load(std::sync::atomic::Ordering::SeqCst) {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4)),
            n => n,
        };
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("flight")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime")
    })
}

/// How a client reaches servers.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// CA certificate (PEM) that signed the server's; required for `grpc+tls://`.
    pub tls_ca: Option<PathBuf>,
    /// The name to verify in the server's certificate (default: the URL's host).
    pub tls_domain: Option<String>,
    /// Shared token, sent as `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Connection attempts are retried with backoff for this long.
    pub connect_timeout: Duration,
    /// The largest message accepted.
    pub max_message_bytes: usize,
    /// Batches received ahead of the consumer, at most this many bytes.
    pub queue_bytes: usize,
    /// After a transport failure, reconnect and continue from the last position.
    pub reconnect: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            tls_ca: None,
            tls_domain: None,
            token: None,
            connect_timeout: Duration::from_secs(30),
            max_message_bytes: DEFAULT_MAX_MESSAGE,
            queue_bytes: 64 << 20,
            reconnect: false,
        }
    }
}

/// How a server listens.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// `HOST:PORT`; port 0 picks a free one.
    pub listen: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Certificate and key (PEM) made in memory: the ones issued at start by the run's CA.
    pub tls_pem: Option<(Vec<u8>, Vec<u8>)>,
    pub token: Option<String>,
    /// Serve a non-loopback address without TLS and token.
    pub insecure: bool,
    pub max_message_bytes: usize,
    /// The host to put in the served URL (default: the address bound).
    pub advertise: Option<String>,
    /// Set to stop: producers blocked on a full window give up, consumers are told.
    pub cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:0".into(),
            tls_cert: None,
            tls_key: None,
            tls_pem: None,
            token: None,
            insecure: false,
            max_message_bytes: DEFAULT_MAX_MESSAGE,
            advertise: None,
            cancel: Default::default(),
        }
    }
}

/// Reads a token file (surrounding whitespace ignored); an empty one is an error.
pub fn read_token(path: &std::path::Path) -> Result<String, StreamError> {
    let t = std::fs::read_to_string(path)
        .map_err(|e| crate::stream::file_err(path, format!("cannot read the token: {e}")))?;
    let t = t.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(crate::stream::file_err(
            path,
            "the token file must hold one token of printable ASCII without spaces",
        ));
    }
    Ok(t.to_string())
}

/// True for `grpc://` and `grpc+tls://` specs, and `@ROLE` (a stage of the run, found
/// through its rendezvous).
pub fn is_url(spec: &str) -> bool {
    spec.starts_with("grpc://") || spec.starts_with("grpc+tls://") || spec.starts_with('@')
}

/// `grpc[+tls]://HOST:PORT[/STREAM][?consumer=NAME&columns=A,B]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlightUrl {
    pub tls: bool,
    /// As written (an IPv6 literal keeps its brackets).
    pub host: String,
    pub port: u16,
    pub stream: Option<String>,
    pub consumer: Option<String>,
    pub columns: Option<Vec<String>>,
}

impl FlightUrl {
    pub fn parse(spec: &str) -> Result<FlightUrl, StreamError> {
        let bad = |m: &str| {
            StreamError::Remote {
            url: spec.to_string(),
            message: format!(
                "{m}; expected {SCHEME_GRPC}://HOST:PORT/STREAM or {SCHEME_GRPC_TLS}://HOST:PORT/STREAM"
            ),
        }
        };
        let (scheme, rest) = spec.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let tls = match scheme {
            SCHEME_GRPC => false,
            SCHEME_GRPC_TLS => true,
            _ => return Err(bad(&format!("unknown scheme '{scheme}'"))),
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = authority.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| bad(&format!("port '{port}' is not a number")))?;
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let mut u = FlightUrl {
            tls,
            host: host.to_string(),
            port,
            stream: Some(path.trim_end_matches('/').to_string()).filter(|s| !s.is_empty()),
            consumer: None,
            columns: None,
        };
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some((url_keys::CONSUMER, v)) => u.consumer = Some(v.to_string()),
                Some((url_keys::COLUMNS, v)) => {
                    u.columns = Some(v.split(',').map(str::to_string).collect())
                }
                _ => {
                    return Err(bad(&format!(
                        "unknown query '{kv}' ({}=NAME and {}=A,B are known)",
                        url_keys::CONSUMER,
                        url_keys::COLUMNS
                    )))
                }
            }
        }
        Ok(u)
    }

    /// `grpc://host:port` (no stream, no query).
    pub fn base(&self) -> String {
        let scheme = if self.tls {
            SCHEME_GRPC_TLS
        } else {
            SCHEME_GRPC
        };
        format!("{scheme}://{}:{}", self.host, self.port)
    }

    /// The URL without its query: what messages call this stream.
    pub fn name(&self) -> String {
        match &self.stream {
            Some(s) => format!("{}/{s}", self.base()),
            None => self.base(),
        }
    }

    /// The URI tonic connects to.
    fn endpoint_uri(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }

    /// The host without IPv6 brackets (for certificate names).
    fn bare_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }
}

/// `text` followed by every cause in `src`'s chain not already in it, on one line.
pub(crate) fn with_causes(mut text: String, mut src: Option<&dyn std::error::Error>) -> String {
    while let Some(e) = src {
        let m = e.to_string();
        if !text.contains(&m) {
            text.push_str(": ");
            text.push_str(&m);
        }
        src = e.source();
    }
    text
}

/// A status and its causes, on one line.
pub(crate) fn status_text(s: &tonic::Status) -> String {
    use std::error::Error;
    with_causes(format!("{:?}: {}", s.code(), s.message()), s.source())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = FlightUrl::parse("grpc://127.0.0.1:5000/acts?consumer=t1&columns=a,b").unwrap();
        assert_eq!(u.base(), "grpc://127.0.0.1:5000");
        assert_eq!(u.name(), "grpc://127.0.0.1:5000/acts");
        assert_eq!(u.consumer.as_deref(), Some("t1"));
        assert_eq!(u.columns, Some(vec!["a".to_string(), "b".to_string()]));
        let u = FlightUrl::parse("grpc+tls://[::1]:7/x").unwrap();
        assert!(u.tls && u.bare_host() == "::1" && u.endpoint_uri() == "https://[::1]:7");
        for (bad, says) in [
            ("http://a:1/x", "unknown scheme"),
            ("grpc://a/x", "no port"),
            ("grpc://a:99999/x", "not a number"),
            ("grpc://a:1/x?path=/etc", "unknown query"),
        ] {
            let e = FlightUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains(bad), "{e}");
        }
    }
}
