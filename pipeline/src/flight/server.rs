//! The Flight server: named streams, each fed by one producer thread into a window
//! bounded in bytes and read by its named consumers.
//!
//! The window holds batches `[start, end)`. A batch is *pending* while a consumer that
//! needs it (broadcast: every consumer; partition: consumer `p mod N`) has not been sent
//! it; pending batches are never dropped, so the slowest consumer sets the pace. Batches
//! already sent stay as history for reconnects (about half the window behind each
//! consumer) and are dropped, oldest first, only to make room for new ones.

use super::wire::{BatchEncoder, DoGetCodec, Outgoing};
use super::{
    ServerConfig, ENVELOPE, H2_MAX_FRAME, H2_WINDOW, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT,
};
use crate::stream::{batch_bytes, projection, BatchSink, StreamError};
use arrow_array::RecordBatch;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaAsIpc, SchemaResult, Ticket,
};
use arrow_ipc::writer::IpcWriteOptions;
use arrow_schema::SchemaRef;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use schemas::streams::{
    ConsumerStatus, Mode, StreamStatus, Ticket as StreamTicket, AUTH_HEADER, AUTH_SCHEME,
    POSITION_KEY, TICKET_VERSION,
};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use tonic::{Request, Response, Status, Streaming};

/// Accepted connections still open: the server lingers until its consumers close
/// theirs, since closing a socket that still has unread bytes from the peer sends a
/// reset, and the peer then loses what it had not yet read.
#[derive(Default)]
struct Connections {
    open: std::sync::atomic::AtomicUsize,
    changed: tokio::sync::Notify,
}

/// A TCP connection counted in [`Connections`] while it lives.
struct Tracked {
    io: tokio::net::TcpStream,
    conns: Arc<Connections>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.conns.open.fetch_sub(1, Ordering::SeqCst);
        self.conns.changed.notify_waiters();
    }
}

impl tokio::io::AsyncRead for Tracked {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Tracked {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Tracked {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// How long a drained server waits for its consumers to hang up.
const LINGER: Duration = Duration::from_secs(30);

/// One served stream.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    pub name: String,
    pub mode: Mode,
    /// The consumers expected (at least one); tickets name one of them.
    pub consumers: Vec<String>,
    /// The most bytes of batches held at once.
    pub window_bytes: usize,
    /// The position of the first batch written (a resumed producer's).
    pub first_position: u64,
}

struct HubState {
    /// Position of `window[0]`.
    start: u64,
    window: VecDeque<(RecordBatch, usize)>,
    bytes: usize,
    peak_bytes: usize,
    rows: u64,
    /// Set when the producer has finished (`Ok`) or failed.
    end: Option<Result<(), String>>,
    /// Per consumer: the next position it will be sent.
    cursor: Vec<u64>,
    /// Per consumer: bumped by every new connection, so an older one knows to stop.
    generation: Vec<u64>,
    connected: Vec<bool>,
    done: Vec<bool>,
}

impl HubState {
    fn end_pos(&self) -> u64 {
        self.start + self.window.len() as u64
    }
}

struct Hub {
    cfg: StreamConfig,
    schema: SchemaRef,
    st: Mutex<HubState>,
    /// Wakes a producer waiting for room.
    room: Condvar,
    /// Bumped on every change; consumers wait on it.
    changed: tokio::sync::watch::Sender<u64>,
    cancel: Arc<AtomicBool>,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        self.room.notify_all();
    }

    fn needs(&self, c: usize, q: u64) -> bool {
        match self.cfg.mode {
            Mode::Broadcast => true,
            Mode::Partition => q % self.cfg.consumers.len() as u64 == c as u64,
        }
    }

    /// The first position at or after `from` that consumer `c` needs.
    fn next_needed(&self, c: usize, from: u64) -> u64 {
        match self.cfg.mode {
            Mode::Broadcast => from,
            Mode::Partition => {
                let n = self.cfg.consumers.len() as u64;
                from + (c as u64 + n - from % n) % n
            }
        }
    }

    /// May the oldest batch be dropped to make room?
    fn evictable(&self, st: &HubState) -> bool {
        let start = st.start;
        let needers: Vec<usize> = (0..self.cfg.consumers.len())
            .filter(|&c| self.needs(c, start))
            .collect();
        if needers.iter().any(|&c| st.cursor[c] <= start) {
            return false; // pending
        }
        let anyone_waiting_on_window = (0..self.cfg.consumers.len())
            .any(|c| self.next_needed(c, st.cursor[c].max(start)) < st.end_pos());
        if !anyone_waiting_on_window {
            return true; // nobody can move without new batches
        }
        let retain = self.cfg.window_bytes / 2;
        needers.iter().all(|&c| {
            st.done[c] || {
                let behind: usize = st
                    .window
                    .iter()
                    .enumerate()
                    .skip(1)
                    .filter(|(i, _)| {
                        let q = start + *i as u64;
                        q < st.cursor[c] && self.needs(c, q)
                    })
                    .map(|(_, (_, b))| b)
                    .sum();
                behind >= retain
            }
        })
    }

    /// Adds a batch, waiting while the window is full of batches still pending.
    fn push(&self, batch: RecordBatch) -> Result<(), StreamError> {
        let bytes = batch_bytes(&batch);
        let mut st = self.lock();
        loop {
            if self.cancel.load(Ordering::SeqCst) {
                return Err(StreamError::Other(format!(
                    "stream '{}': the server is stopping",
                    self.cfg.name
                )));
            }
            if st.window.is_empty() || st.bytes + bytes <= self.cfg.window_bytes {
                break;
            }
            if self.evictable(&st) {
                let (_, b) = st.window.pop_front().expect("not empty");
                st.bytes -= b;
                st.start += 1;
                continue;
            }
            st = self
                .room
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.rows += batch.num_rows() as u64;
        st.window.push_back((batch, bytes));
        st.bytes += bytes;
        st.peak_bytes = st.peak_bytes.max(st.bytes);
        drop(st);
        self.bump();
        Ok(())
    }

    fn finish(&self, end: Result<(), String>) {
        let mut st = self.lock();
        if st.end.is_none() {
            st.end = Some(end);
        }
        drop(st);
        self.bump();
    }

    fn consumer_index(&self, name: Option<&str>) -> Result<usize, Status> {
        let names = &self.cfg.consumers;
        match name {
            None if names.len() == 1 => Ok(0),
            None => Err(Status::invalid_argument(format!(
                "stream '{}' has {} consumers ({}): the ticket must name one",
                self.cfg.name,
                names.len(),
                names.join(", ")
            ))),
            Some(n) => names.iter().position(|c| c == n).ok_or_else(|| {
                Status::not_found(format!(
                    "stream '{}' has no consumer '{n}' (its consumers: {})",
                    self.cfg.name,
                    names.join(", ")
                ))
            }),
        }
    }

    /// A new connection of consumer `c` from `position`; returns its generation.
    fn connect(&self, c: usize, position: u64) -> Result<u64, Status> {
        let mut st = self.lock();
        if position < st.start {
            let missing = (position..st.start).any(|q| self.needs(c, q));
            if missing {
                return Err(Status::out_of_range(format!(
                    "stream '{}': position {position} is no longer held; the window holds positions {}..{} (about half of --window-bytes is kept behind each consumer)",
                    self.cfg.name,
                    st.start,
                    st.end_pos()
                )));
            }
        }
        if let Some(Ok(())) = st.end {
            if position > st.end_pos() {
                return Err(Status::out_of_range(format!(
                    "stream '{}' has {} batches; position {position} is past its end",
                    self.cfg.name,
                    st.end_pos()
                )));
            }
        }
        st.generation[c] += 1;
        st.cursor[c] = position;
        st.connected[c] = true;
        st.done[c] = false;
        let g = st.generation[c];
        drop(st);
        self.bump();
        Ok(g)
    }

    fn disconnect(&self, c: usize, generation: u64) {
        let mut st = self.lock();
        if st.generation[c] == generation {
            st.connected[c] = false;
        }
        drop(st);
        self.bump();
    }

    /// The next batch for consumer `c`, waiting for the producer; `None` at the end.
    async fn next(&self, c: usize, generation: u64) -> Result<Option<(u64, RecordBatch)>, Status> {
        loop {
            let mut rx = self.changed.subscribe();
            {
                let mut st = self.lock();
                if st.generation[c] != generation {
                    return Err(Status::aborted(format!(
                        "consumer '{}' of stream '{}' connected again; this older connection is closed",
                        self.cfg.consumers[c], self.cfg.name
                    )));
                }
                if self.cancel.load(Ordering::SeqCst) {
                    // A failed source is what consumers need to hear, also at shutdown.
                    if let Some(Err(m)) = &st.end {
                        return Err(Status::aborted(format!(
                            "stream '{}': its source failed: {m}",
                            self.cfg.name
                        )));
                    }
                    return Err(Status::unavailable("the server is shutting down"));
                }
                let q = self.next_needed(c, st.cursor[c].max(st.start));
                if q < st.end_pos() {
                    let b = st.window[(q - st.start) as usize].0.clone();
                    st.cursor[c] = q + 1;
                    drop(st);
                    self.bump();
                    return Ok(Some((q, b)));
                }
                match &st.end {
                    Some(Ok(())) => {
                        st.done[c] = true;
                        drop(st);
                        self.bump();
                        return Ok(None);
                    }
                    Some(Err(m)) => {
                        return Err(Status::aborted(format!(
                            "stream '{}': its source failed: {m}",
                            self.cfg.name
                        )))
                    }
                    None => {}
                }
            }
            if rx.changed().await.is_err() {
                return Err(Status::unavailable("the server is shutting down"));
            }
        }
    }

    fn status(&self) -> StreamStatus {
        let st = self.lock();
        StreamStatus {
            name: self.cfg.name.clone(),
            mode: self.cfg.mode,
            batches: st.end_pos(),
            rows: st.rows,
            finished: matches!(st.end, Some(Ok(()))),
            window_start: st.start,
            window_end: st.end_pos(),
            window_bytes: st.bytes as u64,
            window_peak_bytes: st.peak_bytes as u64,
            window_limit_bytes: self.cfg.window_bytes as u64,
            consumers: self
                .cfg
                .consumers
                .iter()
                .enumerate()
                .map(|(i, n)| ConsumerStatus {
                    name: n.clone(),
                    position: st.cursor[i],
                    connected: st.connected[i],
                    done: st.done[i],
                })
                .collect(),
        }
    }

    /// The stream ended and every consumer has been sent all of it (or it failed).
    fn drained(&self) -> bool {
        let st = self.lock();
        match &st.end {
            Some(Ok(())) => st.done.iter().all(|d| *d),
            Some(Err(_)) => true,
            None => false,
        }
    }
}

/// The producer's handle on a served stream: a [`BatchSink`] that blocks while the
/// window is full.
pub struct ServedStream {
    hub: Arc<Hub>,
}

impl ServedStream {
    /// Ends the stream with an error every consumer receives.
    pub fn fail(&self, message: &str) {
        self.hub.finish(Err(message.to_string()));
    }
    pub fn status(&self) -> StreamStatus {
        self.hub.status()
    }
}

impl BatchSink for ServedStream {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), StreamError> {
        if batch.schema().as_ref() != self.hub.schema.as_ref() {
            return Err(StreamError::Other(format!(
                "stream '{}': a batch's schema differs from the stream's",
                self.hub.cfg.name
            )));
        }
        self.hub.push(batch.clone())
    }
    fn finish(&mut self) -> Result<(), StreamError> {
        self.hub.finish(Ok(()));
        Ok(())
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    hubs: Arc<Vec<Arc<Hub>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
    cancel: Arc<AtomicBool>,
    conns: Arc<Connections>,
}

impl Server {
    /// The address bound (the port chosen when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn statuses(&self) -> Vec<StreamStatus> {
        self.hubs.iter().map(|h| h.status()).collect()
    }

    /// Blocks until every stream has ended and been sent to all its consumers and they
    /// have closed their connections (at most [`LINGER`] after the end), or the server
    /// is cancelled; returns whether it drained.
    pub fn wait_drained(&self) -> bool {
        if !self.wait_streams() {
            return false;
        }
        super::runtime().block_on(async {
            let deadline = tokio::time::Instant::now() + LINGER;
            loop {
                let notified = self.conns.changed.notified();
                if self.conns.open.load(Ordering::SeqCst) == 0 || self.cancel.load(Ordering::SeqCst)
                {
                    break;
                }
                let wait = tokio::time::timeout_at(deadline, notified);
                if tokio::time::timeout(Duration::from_millis(200), wait)
                    .await
                    .is_ok_and(|r| r.is_err())
                {
                    break; // lingered long enough
                }
            }
        });
        true
    }

    fn wait_streams(&self) -> bool {
        loop {
            if self.hubs.iter().all(|h| h.drained()) {
                return true;
            }
            if self.cancel.load(Ordering::SeqCst) {
                return false;
            }
            let mut rxs: Vec<_> = self.hubs.iter().map(|h| h.changed.subscribe()).collect();
            if self.hubs.iter().all(|h| h.drained()) {
                return true;
            }
            // Woken by any stream's change, or every 200 ms to look at `cancel`.
            super::runtime().block_on(async {
                let any =
                    futures::future::select_all(rxs.iter_mut().map(|r| Box::pin(r.changed())));
                let _ = tokio::time::timeout(Duration::from_millis(200), any).await;
            });
        }
    }

    /// Stops accepting, lets responses in flight finish, and returns.
    pub fn shutdown(mut self) -> Result<(), StreamError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.cancel.store(true, Ordering::SeqCst);
        for h in self.hubs.iter() {
            h.bump();
        }
        if let Some(t) = self.task.take() {
            let r = super::runtime()
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), t).await });
            if let Ok(Ok(Err(e))) = r {
                return Err(StreamError::Other(format!("the Flight server failed: {e}")));
            }
        }
        Ok(())
    }
}

fn bad_listen(listen: &str, m: impl std::fmt::Display) -> StreamError {
    StreamError::Other(format!("cannot listen on {listen}: {m}"))
}

/// Answers Flight actions (`DoAction`): the rendezvous registry is one.
pub trait Actions: Send + Sync + 'static {
    /// The reply to action `kind` with `body`, or the status to fail it with.
    fn call(&self, kind: &str, body: &[u8]) -> Result<Vec<u8>, Status>;
}

/// Binds `cfg.listen` and serves `streams`; returns the server and one producer handle
/// per stream, in order. A non-loopback address needs TLS and a token, or `insecure`.
pub fn serve(
    cfg: &ServerConfig,
    streams: Vec<(StreamConfig, SchemaRef)>,
) -> Result<(Server, Vec<ServedStream>), StreamError> {
    serve_with(cfg, streams, None)
}

/// [`serve`], also answering actions.
pub fn serve_with(
    cfg: &ServerConfig,
    streams: Vec<(StreamConfig, SchemaRef)>,
    actions: Option<Arc<dyn Actions>>,
) -> Result<(Server, Vec<ServedStream>), StreamError> {
    let addr: SocketAddr = {
        use std::net::ToSocketAddrs;
        cfg.listen
            .to_socket_addrs()
            .map_err(|e| {
                bad_listen(
                    &cfg.listen,
                    format!("not an address ({e}); expected HOST:PORT"),
                )
            })?
            .next()
            .ok_or_else(|| bad_listen(&cfg.listen, "no such address"))?
    };
    let read = |p: &std::path::PathBuf| {
        std::fs::read(p).map_err(|e| crate::stream::file_err(p, format!("cannot read: {e}")))
    };
    let tls = match (&cfg.tls_cert, &cfg.tls_key, &cfg.tls_pem) {
        (_, _, Some((c, k))) => Some((c.clone(), k.clone())),
        (Some(c), Some(k), None) => Some((read(c)?, read(k)?)),
        (None, None, None) => None,
        _ => {
            return Err(bad_listen(
                &cfg.listen,
                "TLS needs both a certificate and its key (--tls-cert, --tls-key)",
            ))
        }
    };
    if !addr.ip().is_loopback() && !cfg.insecure && (tls.is_none() || cfg.token.is_none()) {
        return Err(bad_listen(
            &cfg.listen,
            "it is not a loopback address: serving it needs TLS and a token (--tls-cert, --tls-key, --token-file), or --insecure to serve it in the clear to anyone",
        ));
    }
    let mut names = std::collections::HashSet::new();
    for (s, _) in &streams {
        if s.consumers.is_empty() {
            return Err(StreamError::Other(format!(
                "stream '{}' needs at least one consumer",
                s.name
            )));
        }
        if !names.insert(s.name.clone()) {
            return Err(StreamError::Other(format!(
                "stream '{}' is served twice",
                s.name
            )));
        }
        let mut c = s.consumers.clone();
        c.sort();
        c.dedup();
        if c.len() != s.consumers.len() {
            return Err(StreamError::Other(format!(
                "stream '{}': consumer names repeat",
                s.name
            )));
        }
    }
    let hubs: Vec<Arc<Hub>> = streams
        .into_iter()
        .map(|(s, schema)| {
            let n = s.consumers.len();
            let first = s.first_position;
            Arc::new(Hub {
                schema,
                st: Mutex::new(HubState {
                    start: first,
                    window: VecDeque::new(),
                    bytes: 0,
                    peak_bytes: 0,
                    rows: 0,
                    end: None,
                    cursor: vec![first; n],
                    generation: vec![0; n],
                    connected: vec![false; n],
                    done: vec![false; n],
                }),
                room: Condvar::new(),
                changed: tokio::sync::watch::channel(0).0,
                cancel: cfg.cancel.clone(),
                cfg: s,
            })
        })
        .collect();
    let hubs = Arc::new(hubs);
    let service = Service {
        hubs: hubs.clone(),
        max_message: cfg.max_message_bytes,
        actions,
    };
    let token = cfg.token.as_ref().map(|t| format!("{AUTH_SCHEME}{t}"));
    let auth = move |req: Request<()>| -> Result<Request<()>, Status> {
        let Some(want) = &token else { return Ok(req) };
        match req.metadata().get(AUTH_HEADER) {
            None => Err(Status::unauthenticated(
                "this server requires a token: none was sent (give the client --token-file)",
            )),
            Some(got) if constant_time_eq(got.as_bytes(), want.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated(
                "the token sent is wrong (check the client's --token-file)",
            )),
        }
    };
    let service = Arc::new(service);
    let router = Router {
        flight: FlightServiceServer::from_arc(service.clone())
            .max_decoding_message_size(cfg.max_message_bytes + ENVELOPE)
            .max_encoding_message_size(cfg.max_message_bytes + ENVELOPE),
        service,
        max_message: cfg.max_message_bytes,
    };
    let svc = tonic::service::interceptor::InterceptedService::new(router, auth);

    let rt = super::runtime();
    let _guard = rt.enter();
    let listener = std::net::TcpListener::bind(addr).map_err(|e| bad_listen(&cfg.listen, e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| bad_listen(&cfg.listen, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| bad_listen(&cfg.listen, e))?;
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|e| bad_listen(&cfg.listen, e))?;
    let conns = Arc::new(Connections::default());
    let counted = conns.clone();
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map(move |r| {
            r.map(|io| {
                counted.open.fetch_add(1, Ordering::SeqCst);
                Tracked {
                    io,
                    conns: counted.clone(),
                }
            })
        });
    let mut builder = tonic::transport::Server::builder()
        .initial_stream_window_size(H2_WINDOW)
        .initial_connection_window_size(H2_WINDOW)
        .max_frame_size(H2_MAX_FRAME)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    if let Some((cert, key)) = tls {
        let identity = tonic::transport::Identity::from_pem(cert, key);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| bad_listen(&cfg.listen, format!("bad TLS certificate or key: {e}")))?;
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(
        builder
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            }),
    );
    let served = hubs
        .iter()
        .map(|h| ServedStream { hub: h.clone() })
        .collect();
    Ok((
        Server {
            addr: bound,
            hubs,
            stop: Some(stop_tx),
            task: Some(task),
            cancel: cfg.cancel.clone(),
            conns,
        },
        served,
    ))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Clone)]
struct Service {
    hubs: Arc<Vec<Arc<Hub>>>,
    max_message: usize,
    actions: Option<Arc<dyn Actions>>,
}

impl Service {
    fn find(&self, name: &str) -> Result<&Arc<Hub>, Status> {
        self.hubs
            .iter()
            .find(|h| h.cfg.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.hubs.iter().map(|h| h.cfg.name.as_str()).collect();
                Status::not_found(format!(
                    "no stream '{name}' is served here (streams: {})",
                    names.join(", ")
                ))
            })
    }

    fn info(&self, hub: &Hub) -> Result<FlightInfo, Status> {
        let status = hub.status();
        let endpoints = status
            .consumers
            .iter()
            .map(|c| {
                let mut t = StreamTicket::new(&hub.cfg.name, c.position);
                t.consumer = Some(c.name.clone());
                FlightEndpoint::new().with_ticket(Ticket::new(
                    serde_json::to_vec(&t).expect("ticket serialises"),
                ))
            })
            .collect();
        let mut info = FlightInfo::new()
            .try_with_schema(&hub.schema)
            .map_err(|e| Status::internal(e.to_string()))?
            .with_descriptor(FlightDescriptor::new_path(vec![hub.cfg.name.clone()]))
            .with_endpoints(endpoints)
            .with_ordered(true)
            .with_app_metadata(serde_json::to_vec(&status).expect("status serialises"));
        if status.finished {
            info = info.with_total_records(status.rows as i64);
        }
        Ok(info)
    }

    fn descriptor_hub(&self, d: &FlightDescriptor) -> Result<&Arc<Hub>, Status> {
        match d.path.as_slice() {
            [name] => self.find(name),
            _ => Err(Status::invalid_argument(
                "the descriptor must be a path of one element: the stream's name",
            )),
        }
    }
}

impl Service {
    /// Starts a `DoGet`: the schema message, then the consumer's batches.
    fn open_get(
        &self,
        ticket: &Ticket,
    ) -> Result<BoxStream<'static, Result<Outgoing, Status>>, Status> {
        let t = parse_ticket(&ticket.ticket)?;
        let hub = self.find(&t.stream)?.clone();
        let consumer = hub.consumer_index(t.consumer.as_deref())?;
        let (projection, schema) = match &t.columns {
            Some(cols) => {
                let p = projection(&hub.schema, cols).map_err(Status::invalid_argument)?;
                let s = hub
                    .schema
                    .project(&p)
                    .map_err(|e| Status::internal(e.to_string()))?;
                (Some(p), Arc::new(s))
            }
            None => (None, hub.schema.clone()),
        };
        let encoder = BatchEncoder::new(&schema)?;
        let generation = hub.connect(consumer, t.position)?;
        let sending = Sending {
            hub,
            consumer,
            generation,
            projection,
            max_message: self.max_message,
            encoder,
            queued: VecDeque::from([Outgoing::schema(&schema)]),
            stopped: false,
        };
        Ok(futures::stream::unfold(sending, |mut s| async move {
            let item = s.next().await?;
            Some((item, s))
        })
        .boxed())
    }
}

const DO_GET_PATH: &str = "/arrow.flight.protocol.FlightService/DoGet";

/// The Flight service with `DoGet` answered through [`DoGetCodec`] (batches copied
/// once on their way out) and every other call through arrow-flight's server.
#[derive(Clone)]
struct Router {
    flight: FlightServiceServer<Service>,
    service: Arc<Service>,
    max_message: usize,
}

struct DoGet(Arc<Service>);

impl tonic::server::ServerStreamingService<Ticket> for DoGet {
    type Response = Outgoing;
    type ResponseStream = BoxStream<'static, Result<Outgoing, Status>>;
    type Future = futures::future::Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, req: Request<Ticket>) -> Self::Future {
        futures::future::ready(self.0.open_get(req.get_ref()).map(Response::new))
    }
}

impl<B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for Router
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        if req.uri().path() != DO_GET_PATH {
            return self.flight.call(req);
        }
        let (service, max) = (self.service.clone(), self.max_message);
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(DoGetCodec)
                .apply_max_message_size_config(Some(64 << 10), Some(max + ENVELOPE));
            Ok(grpc.server_streaming(DoGet(service), req).await)
        })
    }
}

impl tonic::server::NamedService for Router {
    const NAME: &'static str = <FlightServiceServer<Service> as tonic::server::NamedService>::NAME;
}

fn parse_ticket(bytes: &[u8]) -> Result<StreamTicket, Status> {
    let not_ours = |why: String| {
        Status::invalid_argument(format!(
            "not a saestream ticket ({why}); expected JSON {{\"saestream\": {TICKET_VERSION}, \"stream\": NAME, \"position\": N, \"columns\": [..], \"consumer\": NAME}}"
        ))
    };
    let t: StreamTicket = serde_json::from_slice(bytes).map_err(|e| not_ours(e.to_string()))?;
    if t.saestream != TICKET_VERSION {
        return Err(not_ours(format!(
            "version {}, this server speaks {TICKET_VERSION}",
            t.saestream
        )));
    }
    Ok(t)
}

/// Per-connection state of a `DoGet` response.
struct Sending {
    hub: Arc<Hub>,
    consumer: usize,
    generation: u64,
    projection: Option<Vec<usize>>,
    max_message: usize,
    encoder: BatchEncoder,
    /// Messages encoded and not yet sent (a batch with dictionaries makes several).
    queued: VecDeque<Outgoing>,
    stopped: bool,
}

impl Sending {
    fn encode(&mut self, position: u64, batch: &RecordBatch) -> Result<(), Status> {
        let batch = match &self.projection {
            Some(p) => batch
                .project(p)
                .map_err(|e| Status::internal(e.to_string()))?,
            None => batch.clone(),
        };
        let meta = format!("{{\"{POSITION_KEY}\":{position}}}").into_bytes();
        for m in self.encoder.encode(&batch, meta.into())? {
            if m.len() > self.max_message {
                return Err(Status::resource_exhausted(format!(
                    "batch {position} of stream '{}' is {} bytes as one Flight message, over this server's limit of {} bytes (--max-message-bytes): raise the limit on both ends or make batches smaller",
                    self.hub.cfg.name, m.len(), self.max_message
                )));
            }
            self.queued.push_back(m);
        }
        Ok(())
    }

    /// The next message to send, waiting for the producer; `None` at the end.
    async fn next(&mut self) -> Option<Result<Outgoing, Status>> {
        loop {
            if let Some(m) = self.queued.pop_front() {
                return Some(Ok(m));
            }
            if self.stopped {
                return None;
            }
            let res = match self.hub.clone().next(self.consumer, self.generation).await {
                Ok(Some((q, b))) => self.encode(q, &b),
                Ok(None) => return None,
                Err(e) => Err(e),
            };
            if let Err(e) = res {
                self.stopped = true;
                return Some(Err(e));
            }
        }
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.hub.disconnect(self.consumer, self.generation);
    }
}

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not offered: streams are read with DoGet (tickets from ListFlights/GetFlightInfo)"
    ))
}

#[tonic::async_trait]
impl FlightService for Service {
    type HandshakeStream = BoxStream<'static, Result<HandshakeResponse, Status>>;
    type ListFlightsStream = BoxStream<'static, Result<FlightInfo, Status>>;
    type DoGetStream = BoxStream<'static, Result<FlightData, Status>>;
    type DoPutStream = BoxStream<'static, Result<PutResult, Status>>;
    type DoExchangeStream = BoxStream<'static, Result<FlightData, Status>>;
    type DoActionStream = BoxStream<'static, Result<arrow_flight::Result, Status>>;
    type ListActionsStream = BoxStream<'static, Result<ActionType, Status>>;

    async fn handshake(
        &self,
        _: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        Err(Status::unimplemented(
            "no handshake: send the token as 'authorization: Bearer <token>' on every call",
        ))
    }

    async fn list_flights(
        &self,
        _: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        let infos: Vec<Result<FlightInfo, Status>> =
            self.hubs.iter().map(|h| self.info(h)).collect();
        Ok(Response::new(futures::stream::iter(infos).boxed()))
    }

    async fn get_flight_info(
        &self,
        req: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let hub = self.descriptor_hub(req.get_ref())?;
        Ok(Response::new(self.info(hub)?))
    }

    async fn poll_flight_info(
        &self,
        req: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        let hub = self.descriptor_hub(req.get_ref())?;
        Ok(Response::new(PollInfo::new().with_info(self.info(hub)?)))
    }

    async fn get_schema(
        &self,
        req: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        let hub = self.descriptor_hub(req.get_ref())?;
        let r: SchemaResult = SchemaAsIpc::new(&hub.schema, &IpcWriteOptions::default())
            .try_into()
            .map_err(|e: arrow_schema::ArrowError| Status::internal(e.to_string()))?;
        Ok(Response::new(r))
    }

    /// Reached only where this service is mounted without [`Router`]: the same
    /// messages as arrow-flight's type.
    async fn do_get(&self, req: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        let out = self.open_get(req.get_ref())?;
        Ok(Response::new(
            out.map_ok(Outgoing::into_flight_data).boxed(),
        ))
    }

    async fn do_put(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        Err(unimplemented("DoPut"))
    }

    async fn do_exchange(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(unimplemented("DoExchange"))
    }

    async fn do_action(
        &self,
        req: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        let Some(actions) = &self.actions else {
            return Err(unimplemented("DoAction"));
        };
        let a = req.into_inner();
        let body = actions.call(&a.r#type, &a.body)?;
        let one = arrow_flight::Result { body: body.into() };
        Ok(Response::new(futures::stream::iter([Ok(one)]).boxed()))
    }

    async fn list_actions(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        Ok(Response::new(futures::stream::empty().boxed()))
    }
}
