//! Rendezvous: how the stages of a run find each other and how the run hears of them,
//! through one well-known address (the orchestrator's, or on Slurm the first host's).
//!
//! A rendezvous is a Flight server answering four actions with JSON bodies:
//! `report` (a stage says who it is, where it serves, and how it is doing; sent at its
//! start, every [`HEARTBEAT`] and at its end), `lookup` (where a role serves), `list`
//! (every stage, for the orchestrator) and `stop` (the run is ending: the reply to every
//! later `report` tells the stage to stop, which it does as on SIGTERM). Stages name
//! their upstreams `@ROLE` and learn the address from `lookup`, so every stage can start
//! at once and on any host; the local launcher works the same way.

use crate::flight::{self, ActionClient, Actions, ClientConfig, Server, ServerConfig};
use crate::stream::StreamError;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const REPORT: &str = "report";
pub const LOOKUP: &str = "lookup";
pub const LIST: &str = "list";
pub const STOP: &str = "stop";

/// How often a stage reports.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A stage not heard from this long is taken for gone, and a stage that cannot reach
/// the rendezvous this long stops: HTTP/2 keepalive's bound (interval + timeout).
pub const SILENCE_LIMIT: Duration =
    Duration::from_secs(flight::KEEPALIVE_INTERVAL.as_secs() + flight::KEEPALIVE_TIMEOUT.as_secs());
/// How long a stage waits for an upstream to register (it may be loading a model).
pub const LOOKUP_LIMIT: Duration = Duration::from_secs(1800);
/// One action call's limit.
const CALL_LIMIT: Duration = Duration::from_secs(10);

/// What a stage reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub role: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    /// The stream it serves, once it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub pid: u32,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Its JSON summaries (at the end).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub summaries: Vec<Value>,
}

/// What `list` answers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Listing {
    pub members: Vec<Member>,
    /// Set once the run is stopping: why.
    pub stop: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Member {
    #[serde(flatten)]
    pub report: Report,
    /// Seconds since its last report.
    pub silent_s: f64,
}

/// Each role's last report and when it came; why the run stops, once it does.
type Members = (BTreeMap<String, (Report, Instant)>, Option<String>);

/// The registry a rendezvous server keeps.
#[derive(Default)]
pub struct Registry {
    st: Mutex<Members>,
}

fn bad(m: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::invalid_argument(m.to_string())
}

impl Registry {
    /// Tells every stage to stop (at its next report).
    pub fn stop(&self, reason: &str) {
        let mut st = self.st.lock().expect("not poisoned");
        st.1.get_or_insert_with(|| reason.to_string());
    }

    pub fn listing(&self) -> Listing {
        let st = self.st.lock().expect("not poisoned");
        Listing {
            members: st
                .0
                .values()
                .map(|(r, t)| Member {
                    report: r.clone(),
                    silent_s: t.elapsed().as_secs_f64(),
                })
                .collect(),
            stop: st.1.clone(),
        }
    }
}

impl Actions for Registry {
    fn call(&self, kind: &str, body: &[u8]) -> Result<Vec<u8>, tonic::Status> {
        let mut st = self.st.lock().expect("not poisoned");
        let reply = match kind {
            REPORT => {
                let mut r: Report = serde_json::from_slice(body).map_err(bad)?;
                if r.role.is_empty() {
                    return Err(bad("a report needs a role"));
                }
                if let Some((old, _)) = st.0.get(&r.role) {
                    // The address stays known after the stage that served it reports again
                    // without one; a stage restarted under the same role replaces it.
                    if r.url.is_none() && old.pid == r.pid {
                        r.url = old.url.clone();
                    }
                }
                if r.state == "failed" && st.1.is_none() {
                    // one stage failing ends the run, whoever launched it
                    st.1 = Some(format!(
                        "stage `{}` on {} failed: {}",
                        r.role,
                        r.host,
                        r.message.as_deref().unwrap_or("no reason given")
                    ));
                }
                st.0.insert(r.role.clone(), (r, Instant::now()));
                serde_json::json!({ "stop": st.1 })
            }
            LOOKUP => {
                let q: Value = serde_json::from_slice(body).map_err(bad)?;
                let role = q["role"].as_str().ok_or_else(|| bad("lookup needs a role"))?;
                let url = st.0.get(role).and_then(|(r, _)| r.url.clone());
                serde_json::json!({ "url": url, "stop": st.1 })
            }
            LIST => {
                drop(st);
                return serde_json::to_vec(&self.listing()).map_err(bad);
            }
            STOP => {
                let q: Value = serde_json::from_slice(body).unwrap_or_default();
                let reason = q["reason"].as_str().unwrap_or("stopped");
                st.1.get_or_insert_with(|| reason.to_string());
                serde_json::json!({ "stop": st.1 })
            }
            _ => {
                return Err(tonic::Status::unimplemented(format!(
                    "unknown action '{kind}' (this is a rendezvous: {REPORT}, {LOOKUP}, {LIST}, {STOP})"
                )))
            }
        };
        serde_json::to_vec(&reply).map_err(bad)
    }
}

/// Serves a rendezvous on `cfg.listen`.
pub fn serve(cfg: &ServerConfig) -> Result<(Server, Arc<Registry>), StreamError> {
    let reg = Arc::new(Registry::default());
    let (server, _) = flight::serve_with(cfg, Vec::new(), Some(reg.clone()))?;
    Ok((server, reg))
}

/// A client of a rendezvous (the orchestrator's view, or a stage's lookups).
pub struct Client {
    url: String,
    inner: ActionClient,
}

impl Client {
    pub fn new(url: &str, cfg: &ClientConfig) -> Result<Client, StreamError> {
        Ok(Client {
            url: url.to_string(),
            inner: ActionClient::new(url, cfg)?,
        })
    }

    fn call(&mut self, kind: &str, body: &Value) -> Result<Value, StreamError> {
        let reply = self
            .inner
            .call(kind, body.to_string().as_bytes(), CALL_LIMIT)?;
        serde_json::from_slice(&reply).map_err(|e| StreamError::Remote {
            url: self.url.clone(),
            message: format!("the rendezvous answered {kind} with bad JSON: {e}"),
        })
    }

    pub fn list(&mut self) -> Result<Listing, StreamError> {
        let v = self.call(LIST, &Value::Null)?;
        serde_json::from_value(v).map_err(|e| StreamError::Remote {
            url: self.url.clone(),
            message: format!("bad listing: {e}"),
        })
    }

    pub fn stop(&mut self, reason: &str) -> Result<(), StreamError> {
        self.call(STOP, &serde_json::json!({ "reason": reason }))
            .map(|_| ())
    }

    /// Where `role` serves, waiting (up to [`LOOKUP_LIMIT`]) until it says.
    pub fn lookup(&mut self, role: &str) -> Result<String, StreamError> {
        let t0 = Instant::now();
        let mut delay = Duration::from_millis(20);
        loop {
            let v = self.call(LOOKUP, &serde_json::json!({ "role": role }))?;
            if let Some(u) = v["url"].as_str() {
                return Ok(u.to_string());
            }
            if let Some(s) = v["stop"].as_str() {
                return Err(StreamError::Other(format!(
                    "@{role}: the run is stopping ({s}) before it served"
                )));
            }
            if t0.elapsed() > LOOKUP_LIMIT {
                return Err(StreamError::Remote {
                    url: self.url.clone(),
                    message: format!(
                        "@{role} has not said where it serves within {} s",
                        LOOKUP_LIMIT.as_secs()
                    ),
                });
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }
}

/// This process as a member of a run (when started with `--rendezvous` and `--role`).
struct Membership {
    rendezvous: String,
    cfg: ClientConfig,
    client: Mutex<ActionClient>,
    report: Mutex<Report>,
}

static MEMBER: OnceLock<Membership> = OnceLock::new();

impl Membership {
    fn send(&self) -> Result<Option<String>, StreamError> {
        let body =
            serde_json::to_vec(&*self.report.lock().expect("not poisoned")).expect("serializable");
        let reply = self
            .client
            .lock()
            .expect("not poisoned")
            .call(REPORT, &body, CALL_LIMIT)?;
        let v: Value = serde_json::from_slice(&reply).unwrap_or_default();
        Ok(v["stop"].as_str().map(str::to_string))
    }
}

/// Joins the run at `rendezvous` as `role`: reports now (retrying for the client's
/// connect timeout), then every [`HEARTBEAT`] from a thread of its own. When the run
/// stops, or the rendezvous is silent for [`SILENCE_LIMIT`], the process gets SIGTERM
/// and stops the way it stops on Ctrl-C. Once per process.
pub fn join(rendezvous: &str, role: &str, cfg: &ClientConfig) -> Result<(), StreamError> {
    if MEMBER.get().is_some() {
        return Ok(());
    }
    let m = Membership {
        rendezvous: rendezvous.to_string(),
        cfg: cfg.clone(),
        client: Mutex::new(ActionClient::new(rendezvous, cfg)?),
        report: Mutex::new(Report {
            role: role.to_string(),
            state: "running".into(),
            host: host_toward(rendezvous),
            pid: std::process::id(),
            ..Default::default()
        }),
    };
    if let Some(reason) = m.send()? {
        return Err(StreamError::Other(format!(
            "the run at {rendezvous} is stopping ({reason})"
        )));
    }
    let _ = MEMBER.set(m);
    std::thread::Builder::new()
        .name("rendezvous".into())
        .spawn(heartbeat)
        .map_err(|e| StreamError::Other(format!("cannot start the heartbeat thread: {e}")))?;
    Ok(())
}

fn heartbeat() {
    let m = MEMBER.get().expect("joined");
    let mut last_ok = Instant::now();
    let mut told = false;
    loop {
        std::thread::sleep(HEARTBEAT);
        match m.send() {
            Ok(stop) => {
                last_ok = Instant::now();
                if let Some(reason) = stop.filter(|_| !told) {
                    told = true;
                    eprintln!("stopping: the run is ending ({reason})");
                    terminate();
                }
            }
            Err(e) if last_ok.elapsed() > SILENCE_LIMIT && !told => {
                told = true;
                eprintln!(
                    "error: no answer from the run's rendezvous {} for {} s ({e}); stopping",
                    m.rendezvous,
                    SILENCE_LIMIT.as_secs()
                );
                terminate();
            }
            Err(_) => {}
        }
    }
}

fn terminate() {
    // SAFETY: kill(2) on our own pid: the stage's SIGTERM handling does the rest.
    unsafe {
        libc::kill(std::process::id() as i32, libc::SIGTERM);
    }
}

/// Says where this process serves (no-op outside a run).
pub fn register(url: &str) {
    if let Some(m) = MEMBER.get() {
        m.report.lock().expect("not poisoned").url = Some(url.to_string());
        if let Err(e) = m.send() {
            eprintln!("warning: cannot tell the rendezvous where this stage serves yet: {e}");
        }
    }
}

/// The last report: done (with the summaries) or failed (with why). No-op outside a run.
pub fn leave(result: Result<&[Value], &str>) {
    let Some(m) = MEMBER.get() else { return };
    {
        let mut r = m.report.lock().expect("not poisoned");
        match result {
            Ok(s) => {
                r.state = "done".into();
                r.summaries = s.to_vec();
            }
            Err(e) => {
                r.state = "failed".into();
                r.message = Some(e.to_string());
            }
        }
    }
    // Best effort, briefly: the orchestrator also sees the process end.
    for _ in 0..3 {
        if m.send().is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `@ROLE` becomes the URL that role serves (asking this process's rendezvous); any
/// other spec is returned as it is.
pub fn resolve(spec: &str) -> Result<String, StreamError> {
    let Some(role) = spec.strip_prefix('@') else {
        return Ok(spec.to_string());
    };
    let m = MEMBER.get().ok_or_else(|| {
        StreamError::Other(format!(
            "{spec}: a role names an upstream only inside a run (give --rendezvous URL and --role NAME)"
        ))
    })?;
    Client::new(&m.rendezvous, &m.cfg)?.lookup(role)
}

/// The rendezvous this process joined, if any.
pub fn joined() -> Option<&'static str> {
    MEMBER.get().map(|m| m.rendezvous.as_str())
}

/// This host as the run sees it: its name, and the address its traffic to the
/// rendezvous leaves from (hosts may share a name: containers, network namespaces).
fn host_toward(rendezvous: &str) -> String {
    let ip = flight::FlightUrl::parse(rendezvous)
        .ok()
        .and_then(|u| local_ip_toward(&format!("{}:{}", u.host, u.port)));
    match ip {
        Some(ip) => format!("{} ({ip})", hostname()),
        None => hostname(),
    }
}

/// The machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The address of this host that its traffic to `peer` (`HOST:PORT`) leaves from: the
/// one to advertise where a server binds every interface (no packet is sent).
pub fn local_ip_toward(peer: &str) -> Option<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    let addr = peer.to_socket_addrs().ok()?.next()?;
    let any = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let s = std::net::UdpSocket::bind(any).ok()?;
    s.connect(addr).ok()?;
    Some(s.local_addr().ok()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_reports_lookups_and_stop() {
        let reg = Registry::default();
        let call = |k: &str, v: Value| -> Value {
            serde_json::from_slice(&reg.call(k, v.to_string().as_bytes()).unwrap()).unwrap()
        };
        assert_eq!(
            call(LOOKUP, serde_json::json!({"role": "tokenizer"}))["url"],
            Value::Null
        );
        let r = serde_json::json!({"role": "tokenizer", "state": "running", "pid": 7,
                                   "url": "grpc://h:1/tokens"});
        assert_eq!(call(REPORT, r)["stop"], Value::Null);
        // a heartbeat without the URL keeps it
        call(
            REPORT,
            serde_json::json!({"role": "tokenizer", "state": "running", "pid": 7}),
        );
        assert_eq!(
            call(LOOKUP, serde_json::json!({"role": "tokenizer"}))["url"],
            "grpc://h:1/tokens"
        );
        reg.stop("a stage failed");
        let r = call(
            REPORT,
            serde_json::json!({"role": "shuffler", "state": "running"}),
        );
        assert_eq!(r["stop"], "a stage failed");
        let l = reg.listing();
        assert_eq!(l.members.len(), 2);
        assert_eq!(l.stop.as_deref(), Some("a stage failed"));
        assert!(reg.call("nonsense", b"{}").is_err());
        // a host is named with its address toward the rendezvous
        assert!(host_toward("grpc+tls://127.0.0.1:5").ends_with("(127.0.0.1)"));
        assert!(reg.call(REPORT, b"{\"role\": \"\"}").is_err());
    }
}
