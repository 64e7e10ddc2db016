//! The Flight client: a [`BatchSource`] reading one stream of a server. A task on the
//! transport runtime decodes batches into a queue bounded in bytes; `next_batch` takes
//! them from it on the caller's thread.

use super::{
    status_text, ClientConfig, FlightUrl, ENVELOPE, H2_MAX_FRAME, H2_WINDOW, KEEPALIVE_INTERVAL,
    KEEPALIVE_TIMEOUT,
};
use crate::queue;
use crate::stream::{batch_bytes, BatchSource, OpenOptions, StreamError};
use arrow_array::RecordBatch;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::FlightData;
use arrow_flight::{Criteria, FlightDescriptor, FlightInfo};
use arrow_schema::SchemaRef;
use futures::TryStreamExt;
use schemas::streams::{StreamStatus, Ticket, AUTH_HEADER, AUTH_SCHEME, POSITION_KEY};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Adds the token to every call.
#[derive(Clone)]
pub(crate) struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(AUTH_HEADER, v.clone());
        }
        Ok(req)
    }
}

type Client = FlightServiceClient<InterceptedService<Channel, Auth>>;

fn chain(e: &dyn std::error::Error) -> String {
    super::with_causes(e.to_string(), e.source())
}

/// A hint when the two ends may disagree on TLS.
fn tls_hint(url: &FlightUrl, text: &str) -> &'static str {
    let t = text.to_ascii_lowercase();
    if url.tls
        && (t.contains("invalidcontenttype")
            || t.contains("corrupt message")
            || t.contains("wrong version"))
    {
        " (the server does not seem to speak TLS: use grpc://)"
    } else if !url.tls
        && (t.contains("connection reset")
            || t.contains("broken pipe")
            || t.contains("frame with invalid size")
            || t.contains("connection closed")
            || t.contains("connection error")
            || t.contains("bytes remaining on stream")
            || t.contains("http2 error")
            || t.contains("h2 protocol error")
            // a plain-text client whose first frames the TLS server dropped
            || t.contains("connection was not ready"))
    {
        " (if the server uses TLS, connect with grpc+tls:// and --tls-ca)"
    } else {
        ""
    }
}

/// The HTTP/2 receive window: no more than the queue the batches go into, so that what
/// a reader has taken from its upstream but not used stays within `queue_bytes` twice
/// (in the queue and in flight), not an extra 16 MiB: a stage that dies or loses its
/// link must still be needed. At least 64 KiB (HTTP/2's default).
fn receive_window(cfg: &ClientConfig) -> u32 {
    (cfg.queue_bytes.min(H2_WINDOW as usize) as u32).max(64 << 10)
}

async fn connect_once(url: &FlightUrl, cfg: &ClientConfig) -> Result<Client, (bool, String)> {
    let fatal = |m: String| (false, m);
    let mut ep = Channel::from_shared(url.endpoint_uri())
        .map_err(|e| fatal(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(receive_window(cfg))
        .initial_connection_window_size(receive_window(cfg))
        .max_frame_size(H2_MAX_FRAME)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    if url.tls {
        let ca = cfg.tls_ca.as_ref().ok_or_else(|| {
            fatal("grpc+tls:// needs the CA certificate that signed the server's (--tls-ca)".into())
        })?;
        let pem = std::fs::read(ca).map_err(|e| {
            fatal(format!(
                "cannot read the CA certificate {}: {e}",
                ca.display()
            ))
        })?;
        let domain = cfg
            .tls_domain
            .clone()
            .unwrap_or_else(|| url.bare_host().to_string());
        ep = ep
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem))
                    .domain_name(domain),
            )
            .map_err(|e| fatal(format!("bad TLS settings: {}", chain(&e))))?;
    }
    let channel = ep.connect().await.map_err(|e| {
        let text = chain(&e);
        let t = text.to_ascii_lowercase();
        let retry =
            t.contains("connection refused") || t.contains("dns error") || t.contains("timed out");
        (retry, format!("{text}{}", tls_hint(url, &text)))
    })?;
    let token = match &cfg.token {
        Some(t) => Some(
            MetadataValue::try_from(format!("{AUTH_SCHEME}{t}"))
                .map_err(|_| fatal("the token is not valid header text".into()))?,
        ),
        None => None,
    };
    Ok(FlightServiceClient::with_interceptor(channel, Auth(token))
        .max_decoding_message_size(cfg.max_message_bytes + ENVELOPE)
        .max_encoding_message_size(cfg.max_message_bytes + ENVELOPE))
}

/// Connects, retrying refused connections with backoff for `cfg.connect_timeout`.
async fn connect(url: &FlightUrl, cfg: &ClientConfig) -> Result<Client, String> {
    let deadline = Instant::now() + cfg.connect_timeout;
    let mut delay = Duration::from_millis(50);
    let mut tries = 0;
    loop {
        tries += 1;
        match connect_once(url, cfg).await {
            Ok(c) => return Ok(c),
            Err((true, m)) if Instant::now() + delay < deadline => {
                tracing::debug!("{}: {m}; retrying in {delay:?}", url.base());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
                let _ = m;
            }
            Err((true, m)) => {
                return Err(format!(
                    "cannot connect within {:.1} s ({tries} attempts): {m}",
                    cfg.connect_timeout.as_secs_f64()
                ))
            }
            Err((false, m)) => return Err(format!("cannot connect: {m}")),
        }
    }
}

/// The text of a failed call, with hints where the cause is likely on this side.
/// `url` is `None` once the stream has begun (TLS cannot be the cause any more).
fn call_error(url: Option<&FlightUrl>, cfg: &ClientConfig, s: &Status) -> String {
    let text = status_text(s);
    let mut hint = url.map_or("", |u| tls_hint(u, &text)).to_string();
    if text.contains("message length too large") {
        hint = format!(
            " (this client accepts messages up to {} bytes: --max-message-bytes)",
            cfg.max_message_bytes
        );
    }
    format!("{text}{hint}")
}

type Messages = tonic::Streaming<FlightData>;

/// What one message carries.
enum Payload {
    Schema(SchemaRef),
    Batch(RecordBatch),
    Nothing,
}

/// Decodes a message. A batch is always copied out of tonic's receive buffer into
/// memory of its own (aligned for Arrow): a batch that kept pointing into that buffer
/// would make tonic allocate a fresh one, page faults and all, for every message.
fn decode(fd: &FlightData, schema: Option<&SchemaRef>) -> Result<Payload, String> {
    use arrow_ipc::MessageHeader;
    let message = arrow_ipc::root_as_message(&fd.data_header)
        .map_err(|e| format!("not an Arrow IPC message: {e}"))?;
    match message.header_type() {
        MessageHeader::Schema => arrow_schema::Schema::try_from(fd)
            .map(|s| Payload::Schema(Arc::new(s)))
            .map_err(|e| format!("bad schema message: {e}")),
        MessageHeader::RecordBatch => {
            let schema = schema.ok_or("a record batch came before the schema")?;
            arrow_flight::utils::flight_data_to_arrow_batch(fd, schema.clone(), &Default::default())
                .map(Payload::Batch)
                .map_err(|e| format!("bad record batch: {e}"))
        }
        MessageHeader::NONE => Ok(Payload::Nothing),
        other => Err(format!(
            "unexpected {} message (dictionary-encoded columns are not part of our streams)",
            other.variant_name().unwrap_or("unknown")
        )),
    }
}

/// Starts a `DoGet` and reads the schema message.
async fn start(
    client: &mut Client,
    url: &FlightUrl,
    cfg: &ClientConfig,
    ticket: &Ticket,
) -> Result<(SchemaRef, Messages), (Option<Code>, String)> {
    let t = arrow_flight::Ticket::new(serde_json::to_vec(ticket).expect("ticket serialises"));
    let status = |s: Status| (Some(s.code()), call_error(Some(url), cfg, &s));
    let mut msgs = client
        .do_get(Request::new(t))
        .await
        .map_err(status)?
        .into_inner();
    loop {
        match msgs.message().await.map_err(status)? {
            Some(fd) => match decode(&fd, None).map_err(|m| (None, m))? {
                Payload::Schema(s) => return Ok((s, msgs)),
                Payload::Nothing => continue,
                Payload::Batch(_) => unreachable!("decode refuses a batch before the schema"),
            },
            None => return Err((None, "the stream ended before its schema".into())),
        }
    }
}

/// Codes that mean the connection, not the request, failed: worth a reconnect.
fn transient(code: Option<Code>) -> bool {
    matches!(
        code,
        Some(Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled) | None
    )
}

enum Msg {
    Batch(u64, RecordBatch),
    End,
    Fail(String),
}

/// One stream of a Flight server, read from a position.
pub struct FlightSource {
    name: String,
    schema: SchemaRef,
    position: u64,
    ended: bool,
    rx: queue::Receiver<Msg>,
    task: tokio::task::JoinHandle<()>,
}

struct Pump {
    url: FlightUrl,
    cfg: ClientConfig,
    ticket: Ticket,
    schema: SchemaRef,
    client: Client,
    tx: queue::Sender<Msg>,
    /// Next position expected, and batches received.
    position: u64,
    received: u64,
}

impl Pump {
    async fn run(mut self, mut msgs: Messages) {
        loop {
            let err = match msgs.message().await {
                Ok(Some(fd)) => match decode(&fd, Some(&self.schema)) {
                    Ok(Payload::Batch(b)) => {
                        let q = position_of(&fd.app_metadata).unwrap_or(self.position);
                        drop(fd);
                        self.position = q + 1;
                        self.received += 1;
                        let bytes = batch_bytes(&b);
                        if self.tx.send(Msg::Batch(q, b), bytes).await.is_err() {
                            return; // the reader is gone
                        }
                        continue;
                    }
                    Ok(_) => continue,
                    Err(m) => (Some(Code::DataLoss), m),
                },
                Ok(None) => {
                    let _ = self.tx.send(Msg::End, 0).await;
                    return;
                }
                Err(s) => (Some(s.code()), call_error(None, &self.cfg, &s)),
            };
            let last = match self.received {
                0 => format!(
                    "before any batch (it was asked for position {})",
                    self.ticket.position
                ),
                n => format!(
                    "after position {} ({n} batches received)",
                    self.position - 1
                ),
            };
            if self.cfg.reconnect && transient(err.0) {
                match self.reconnect().await {
                    Ok(d) => {
                        msgs = d;
                        continue;
                    }
                    Err(m) => {
                        let msg = format!(
                            "the stream broke {last}: {}; reconnecting failed: {m}",
                            err.1
                        );
                        let _ = self.tx.send(Msg::Fail(msg), 0).await;
                        return;
                    }
                }
            }
            let resume = if transient(err.0) {
                format!("; resume from position {}", self.position)
            } else {
                String::new()
            };
            let msg = format!("the stream broke {last}: {}{resume}", err.1);
            let _ = self.tx.send(Msg::Fail(msg), 0).await;
            return;
        }
    }

    async fn reconnect(&mut self) -> Result<Messages, String> {
        tracing::warn!(
            "{}: reconnecting at position {}",
            self.url.name(),
            self.position
        );
        let deadline = Instant::now() + self.cfg.connect_timeout;
        let mut ticket = self.ticket.clone();
        ticket.position = self.position;
        loop {
            let attempt = async {
                self.client = connect(&self.url, &self.cfg).await.map_err(|m| (None, m))?;
                start(&mut self.client, &self.url, &self.cfg, &ticket).await
            }
            .await;
            match attempt {
                Ok((s, dec)) if s == self.schema => return Ok(dec),
                Ok(_) => return Err("the stream's schema changed".into()),
                Err((code, m)) if transient(code) && Instant::now() < deadline => {
                    tracing::debug!("reconnect: {m}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err((_, m)) => return Err(m),
            }
        }
    }
}

fn position_of(app_metadata: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(app_metadata).ok()?;
    v.get(POSITION_KEY)?.as_u64()
}

impl FlightSource {
    /// Connects to `spec` (`grpc[+tls]://HOST:PORT/STREAM[?consumer=..&columns=..]`)
    /// and starts reading at `opts.position`; the consumer and columns of `opts` win
    /// over the URL's.
    pub fn open(spec: &str, opts: &OpenOptions) -> Result<FlightSource, StreamError> {
        let url = FlightUrl::parse(&crate::rendezvous::resolve(spec)?)?;
        let name = url.name();
        let remote = |m: String| StreamError::Remote {
            url: name.clone(),
            message: m,
        };
        let stream = url
            .stream
            .clone()
            .ok_or_else(|| remote("name the stream to read: grpc://HOST:PORT/STREAM".into()))?;
        let ticket = Ticket {
            saestream: schemas::streams::TICKET_VERSION,
            stream,
            position: opts.position,
            columns: opts.columns.clone().or_else(|| url.columns.clone()),
            consumer: opts.consumer.clone().or_else(|| url.consumer.clone()),
        };
        let cfg = opts.client.clone();
        let rt = super::runtime();
        let (client, schema, dec) = rt
            .block_on(async {
                let mut c = connect(&url, &cfg).await?;
                let (s, d) = start(&mut c, &url, &cfg, &ticket).await.map_err(|e| e.1)?;
                Ok::<_, String>((c, s, d))
            })
            .map_err(remote)?;
        let (tx, rx) = queue::bounded(cfg.queue_bytes);
        let pump = Pump {
            url,
            cfg,
            position: ticket.position,
            ticket,
            schema: schema.clone(),
            client,
            tx,
            received: 0,
        };
        let task = rt.spawn(pump.run(dec));
        Ok(FlightSource {
            name,
            schema,
            position: opts.position,
            ended: false,
            rx,
            task,
        })
    }
}

impl BatchSource for FlightSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn position(&self) -> u64 {
        self.position
    }
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, StreamError> {
        if self.ended {
            return Ok(None);
        }
        match self.rx.blocking_recv() {
            Some(Msg::Batch(q, b)) => {
                self.position = q + 1;
                Ok(Some(b))
            }
            Some(Msg::End) => {
                self.ended = true;
                Ok(None)
            }
            Some(Msg::Fail(m)) => Err(StreamError::Remote {
                url: self.name.clone(),
                message: m,
            }),
            None => Err(StreamError::Remote {
                url: self.name.clone(),
                message: "the transport task stopped".into(),
            }),
        }
    }
    fn describe(&self) -> String {
        self.name.clone()
    }
}

impl Drop for FlightSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A stream as a server describes it.
#[derive(Clone, Debug)]
pub struct RemoteStream {
    pub name: String,
    pub schema: SchemaRef,
    /// Our servers' state of the stream (absent from other Flight servers).
    pub status: Option<StreamStatus>,
    /// -1 while unknown.
    pub total_records: i64,
}

fn remote_stream(info: FlightInfo) -> Result<RemoteStream, String> {
    let name = info
        .flight_descriptor
        .as_ref()
        .and_then(|d| d.path.first().cloned())
        .unwrap_or_default();
    let status = serde_json::from_slice(&info.app_metadata).ok();
    let total_records = info.total_records;
    let schema = info
        .try_decode_schema()
        .map_err(|e| format!("stream '{name}': bad schema: {e}"))?;
    Ok(RemoteStream {
        name,
        schema: Arc::new(schema),
        status,
        total_records,
    })
}

/// What a server says of its streams: of the one the URL names (`GetFlightInfo`), or
/// of every stream it serves (`ListFlights`).
pub fn remote_streams(spec: &str, cfg: &ClientConfig) -> Result<Vec<RemoteStream>, StreamError> {
    let url = FlightUrl::parse(&crate::rendezvous::resolve(spec)?)?;
    let failed = |s: Status| call_error(Some(&url), cfg, &s);
    super::runtime()
        .block_on(async {
            let mut c = connect(&url, cfg).await?;
            let infos: Vec<FlightInfo> = match &url.stream {
                Some(name) => {
                    let d = FlightDescriptor::new_path(vec![name.clone()]);
                    vec![c
                        .get_flight_info(Request::new(d))
                        .await
                        .map_err(failed)?
                        .into_inner()]
                }
                None => c
                    .list_flights(Request::new(Criteria::default()))
                    .await
                    .map_err(failed)?
                    .into_inner()
                    .try_collect()
                    .await
                    .map_err(failed)?,
            };
            infos
                .into_iter()
                .map(remote_stream)
                .collect::<Result<Vec<_>, String>>()
        })
        .map_err(|m| StreamError::Remote {
            url: url.name(),
            message: m,
        })
}

/// Calls Flight actions on one server, keeping the connection between calls.
pub struct ActionClient {
    url: FlightUrl,
    cfg: ClientConfig,
    client: Option<Client>,
}

impl ActionClient {
    pub fn new(spec: &str, cfg: &ClientConfig) -> Result<ActionClient, StreamError> {
        Ok(ActionClient {
            url: FlightUrl::parse(spec)?,
            cfg: cfg.clone(),
            client: None,
        })
    }

    /// The server's reply to action `kind`; a call gets at most `limit`.
    pub fn call(
        &mut self,
        kind: &str,
        body: &[u8],
        limit: Duration,
    ) -> Result<Vec<u8>, StreamError> {
        let (url, cfg) = (&self.url, &self.cfg);
        let slot = &mut self.client;
        let action = arrow_flight::Action::new(kind, body.to_vec());
        let r = super::runtime().block_on(async {
            let call = async {
                if slot.is_none() {
                    *slot = Some(connect(url, cfg).await?);
                }
                let c = slot.as_mut().expect("connected");
                let mut replies = c
                    .do_action(Request::new(action))
                    .await
                    .map_err(|s| call_error(Some(url), cfg, &s))?
                    .into_inner();
                let first = replies
                    .message()
                    .await
                    .map_err(|s| call_error(Some(url), cfg, &s))?;
                Ok::<_, String>(first.map(|r| r.body.to_vec()).unwrap_or_default())
            };
            tokio::time::timeout(limit, call)
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {:.0} s", limit.as_secs_f64())))
        });
        if r.is_err() {
            // a fresh connection next time: this one may be the broken part
            self.client = None;
        }
        r.map_err(|m| StreamError::Remote {
            url: url.base(),
            message: m,
        })
    }
}
