//! Flags every stage shares (clap), so reaching, serving and caching a stream are spelled
//! the same in each binary: [`ClientArgs`] for upstreams, [`ServeArgs`] for the stream a
//! stage serves, and the small helpers they need.

use crate::flight::{read_token, ClientConfig, ServerConfig, DEFAULT_MAX_MESSAGE};
use anyhow::{bail, Result};
use schemas::streams::Mode;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// How to reach Flight servers.
#[derive(clap::Args, Clone, Debug)]
pub struct ClientArgs {
    /// CA certificate (PEM) to verify a `grpc+tls://` server with.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Name to verify in the server's certificate (default: the URL's host).
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// File holding the shared token the servers require.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Keep retrying a refused connection this long (seconds).
    #[arg(long, default_value_t = 30.0)]
    pub connect_timeout: f64,
    /// Largest Flight message (one record batch) accepted, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE)]
    pub max_message_bytes: usize,
    /// After a broken connection, reconnect and continue from the last position.
    #[arg(long)]
    pub reconnect: bool,
    /// Batches received ahead of the reader, at most this many bytes.
    #[arg(long, value_parser = parse_bytes, default_value = "64MiB")]
    pub queue_bytes: usize,
    /// The run's rendezvous (`grpc[+tls]://HOST:PORT`): this stage reports there, says
    /// where it serves, and finds upstreams named `@ROLE` there.
    #[arg(long, requires = "role", value_name = "URL")]
    pub rendezvous: Option<String>,
    /// This stage's name in the run (`tokenizer`, `producer-0`, `shuffler`, `trainer-1`).
    #[arg(long, requires = "rendezvous")]
    pub role: Option<String>,
}

impl ClientArgs {
    pub fn config(&self) -> Result<ClientConfig> {
        if !(self.connect_timeout.is_finite() && self.connect_timeout >= 0.0) {
            anyhow::bail!(
                "--connect-timeout must be a number of seconds, not {}",
                self.connect_timeout
            );
        }
        let cfg = ClientConfig {
            tls_ca: self.tls_ca.clone(),
            tls_domain: self.tls_domain.clone(),
            token: self.token_file.as_deref().map(read_token).transpose()?,
            connect_timeout: Duration::from_secs_f64(self.connect_timeout),
            max_message_bytes: self.max_message_bytes,
            reconnect: self.reconnect,
            queue_bytes: self.queue_bytes,
        };
        if let (Some(r), Some(role)) = (&self.rendezvous, &self.role) {
            crate::rendezvous::join(r, role, &cfg)
                .map_err(|e| anyhow::anyhow!("--rendezvous {r}: {e}"))?;
        }
        Ok(cfg)
    }
}

/// Reads a size such as `4096`, `64KiB`, `16MiB`, `1GiB` (also KB/MB/GB, powers of 1000).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("'{s}': expected a size such as 4096, 64KiB or 16MiB"))?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => {
            return Err(format!(
                "'{s}': unknown unit '{u}' (B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Flags that the process's interrupt handlers set (SIGINT, SIGTERM).
pub fn interrupt_flag() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(flag)
}

/// A progress bar on stderr, hidden when stderr is not a terminal.
pub fn progress(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {what}: {{pos}} batches, {{msg}} [{{elapsed_precise}}]"
        ))
        .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A progress bar of `len` steps with rate and ETA on stderr, hidden when stderr is not
/// a terminal.
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{wide_bar}} {{pos}}/{{len}} {{per_sec}} ETA {{eta}}"
        ))
        .expect("valid template"),
    );
    bar
}

/// How a stage serves its output stream over Flight.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// Serve the output stream on HOST:PORT (port 0: a free port; the first line on
    /// stdout is `{"listening": .., "stream": ..}`). Loopback unless TLS + token.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// The consumers of the served stream, as names (`t0,t1`) or a count (`2` = `0,1`);
    /// each receives every batch.
    #[arg(long, default_value = "1")]
    pub consumers: String,
    /// The most bytes of batches the server holds (the slowest consumer sets the pace).
    #[arg(long, value_parser = parse_bytes, default_value = "256MiB")]
    pub window_bytes: usize,
    /// Serve with TLS: the certificate (PEM).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// Serve with TLS: the certificate's private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Serve with TLS under a certificate this stage issues itself at start, for the
    /// address it advertises, signed by the run's CA: that CA's key (PEM, made by
    /// `pipeline plan`/`run`).
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    pub tls_ca_key: Option<PathBuf>,
    /// The host to put in the served URL and the certificate (default: the --listen
    /// host; for 0.0.0.0, this host's address toward the rendezvous).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Allow a non-loopback --listen address without TLS and a token.
    #[arg(long)]
    pub insecure: bool,
}

impl ServeArgs {
    /// The server to start, if `--listen` was given.
    pub fn server(
        &self,
        client: &ClientConfig,
        cancel: Arc<AtomicBool>,
    ) -> Result<Option<(ServerConfig, Vec<String>)>> {
        let Some(listen) = &self.listen else {
            return Ok(None);
        };
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            bail!("--tls-cert and --tls-key go together");
        }
        let advertise = self.advertise.clone().or_else(|| advertised_host(listen));
        let tls_pem = match (&self.tls_ca_key, &advertise) {
            (Some(key), Some(host)) => {
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                Some(crate::tls::issue(key, &[bare.to_string()])?)
            }
            (Some(_), None) => {
                bail!("--tls-ca-key: give --advertise HOST, the name the certificate is for")
            }
            _ => None,
        };
        Ok(Some((
            ServerConfig {
                listen: listen.clone(),
                tls_cert: self.tls_cert.clone(),
                tls_key: self.tls_key.clone(),
                tls_pem,
                token: client.token.clone(),
                insecure: self.insecure,
                max_message_bytes: client.max_message_bytes,
                advertise,
                cancel,
            },
            consumer_names(&self.consumers)?,
        )))
    }
}

/// The host a server on `listen` is reached at: the listen host itself, or for an
/// unspecified one (0.0.0.0, ::) this host's address toward the run's rendezvous.
fn advertised_host(listen: &str) -> Option<String> {
    let (host, _) = listen.rsplit_once(':')?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() => {
            let r = crate::flight::FlightUrl::parse(crate::rendezvous::joined()?).ok()?;
            let ip = crate::rendezvous::local_ip_toward(&format!("{}:{}", r.host, r.port))?;
            Some(if ip.is_ipv6() {
                format!("[{ip}]")
            } else {
                ip.to_string()
            })
        }
        _ => Some(host.to_string()),
    }
}

/// Compute stages that run side by side in a chain (the activation producer and the
/// SAE trainer; the tokenizer and the shuffler are light and take one thread each).
pub const COMPUTE_STAGES: usize = 2;

/// The threads a stage computes with. The rule: `--threads` if given; else a stage
/// that streams (reads or serves a Flight stream, so other stages run beside it) takes
/// its share of the cores, `cores / COMPUTE_STAGES` (at least 1); a stage working on
/// files alone takes every core. The stage's transport runtime gets `min(threads, 2)`
/// threads. So a producer and a trainer on a 2-core machine use one core each.
pub fn stage_threads(explicit: Option<usize>, streaming: bool) -> Result<usize> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let t = match explicit {
        Some(0) => bail!("--threads must be at least 1"),
        Some(t) => t,
        None if streaming => (cores / COMPUTE_STAGES).max(1),
        None => cores,
    };
    crate::flight::set_runtime_threads(t.min(2));
    Ok(t)
}

/// Consumer names from `a,b,c` or a count `n` (= `0..n`).
pub fn consumer_names(s: &str) -> Result<Vec<String>> {
    if let Ok(n) = s.parse::<usize>() {
        if n == 0 {
            bail!("--consumers: at least one");
        }
        return Ok((0..n).map(|i| i.to_string()).collect());
    }
    let names: Vec<String> = s.split(',').map(|x| x.trim().to_string()).collect();
    if names.iter().any(|n| n.is_empty()) {
        bail!("--consumers '{s}': names must not be empty");
    }
    Ok(names)
}

/// `broadcast` or `partition`.
pub fn parse_mode(s: &str) -> Result<Mode, String> {
    match s {
        "broadcast" => Ok(Mode::Broadcast),
        "partition" => Ok(Mode::Partition),
        _ => Err(format!("'{s}': expected broadcast or partition")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_bytes("4096"), Ok(4096));
        assert_eq!(super::parse_bytes("16MiB"), Ok(16 << 20));
        assert_eq!(super::parse_bytes("2GB"), Ok(2_000_000_000));
        assert!(super::parse_bytes("3 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
    }
}
