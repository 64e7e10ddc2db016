//! A Hugging Face hub look-alike on loopback, for tests of downloading (feature
//! `fake-hub`): it answers the requests `hf-hub` makes, as huggingface.co answers them.
//!
//! - `GET /{repo}/resolve/{rev}/{path}` (`/datasets/{repo}/...` for datasets): 206 with
//!   `etag`, `x-repo-commit` and `content-range`, the body from the asked `Range` start;
//!   404 with `x-error-code: EntryNotFound` (or `RevisionNotFound`, `RepositoryNotFound`).
//! - `GET /api/{models|datasets}/{repo}/revision/{rev}`: `{"sha", "siblings": [{"rfilename"}]}`.
//!
//! Every request path is logged, so tests can tell what went over the wire.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use crate::hub::RepoKind;

#[derive(Default)]
struct Repo {
    /// Branch or tag → commit.
    refs: BTreeMap<String, String>,
    /// Commit → path → bytes.
    commits: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
}

#[derive(Default)]
struct State {
    repos: BTreeMap<(&'static str, String), Repo>,
    log: Vec<String>,
}

/// The server; it stops when dropped (its thread ends with the test process).
pub struct FakeHub {
    state: Arc<Mutex<State>>,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
}

fn kind_key(kind: RepoKind) -> &'static str {
    match kind {
        RepoKind::Model => "models",
        RepoKind::Dataset => "datasets",
    }
}

impl FakeHub {
    /// Starts serving on a port the OS picks.
    pub fn start() -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &s);
                });
            }
        });
        FakeHub { state, endpoint }
    }

    /// Adds `files` to `repo_id` as commit `commit` and points each of `refs` at it.
    pub fn add(
        &self,
        kind: RepoKind,
        repo_id: &str,
        commit: &str,
        refs: &[&str],
        files: &[(&str, Vec<u8>)],
    ) {
        let mut st = self.state.lock().unwrap();
        let repo = st
            .repos
            .entry((kind_key(kind), repo_id.to_string()))
            .or_default();
        repo.commits.insert(
            commit.to_string(),
            files
                .iter()
                .map(|(p, b)| (p.to_string(), b.clone()))
                .collect(),
        );
        for r in refs {
            repo.refs.insert(r.to_string(), commit.to_string());
        }
    }

    /// The request paths served so far, in order.
    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }
}

fn respond(conn: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body);
}

fn not_found(conn: &mut TcpStream, code: &str) {
    respond(
        conn,
        "404 Not Found",
        &[("x-error-code", code.to_string())],
        code.as_bytes(),
    );
}

/// FNV-1a, enough to give each blob a distinct etag.
fn etag(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("{h:016x}{:08x}", bytes.len())
}

/// The commit `rev` names in a repo and its files, or the hub's error code.
fn lookup<'a>(
    st: &'a State,
    kind: &str,
    repo_id: &str,
    rev: String,
) -> Result<(String, &'a BTreeMap<String, Vec<u8>>), &'static str> {
    let repo = st
        .repos
        .iter()
        .find(|((k, r), _)| *k == kind && r == repo_id)
        .map(|(_, repo)| repo)
        .ok_or("RepositoryNotFound")?;
    let commit = repo.refs.get(&rev).cloned().unwrap_or(rev);
    let files = repo.commits.get(&commit).ok_or("RevisionNotFound")?;
    Ok((commit, files))
}

fn serve(mut conn: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut range_start = 0usize;
    let mut range_end = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                let spec = v.trim().trim_start_matches("bytes=");
                let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
                range_start = a.parse().unwrap_or(0);
                range_end = b.parse::<usize>().ok();
            }
        }
    }
    let path = path.split('?').next().unwrap_or("").to_string();
    let mut st = state.lock().unwrap();
    st.log.push(path.clone());
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // /api/{models|datasets}/{org}/{name}/revision/{rev}
    if parts.first() == Some(&"api") {
        let kind = parts.get(1).copied().unwrap_or("");
        let Some(rpos) = parts.iter().position(|p| *p == "revision") else {
            not_found(&mut conn, "RepositoryNotFound");
            return Ok(());
        };
        let repo_id = parts[2..rpos].join("/");
        let rev = parts[rpos + 1..].join("/").replace("%2F", "/");
        let (commit, files) = match lookup(&st, kind, &repo_id, rev) {
            Ok(found) => found,
            Err(code) => {
                not_found(&mut conn, code);
                return Ok(());
            }
        };
        let siblings: Vec<_> = files
            .keys()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let body = serde_json::json!({ "id": repo_id, "sha": commit, "siblings": siblings });
        respond(
            &mut conn,
            "200 OK",
            &[("content-type", "application/json".into())],
            body.to_string().as_bytes(),
        );
        return Ok(());
    }
    // [datasets/]{org}/{name}/resolve/{rev}/{file...}
    let (kind, rest) = match parts.first() {
        Some(&"datasets") => ("datasets", &parts[1..]),
        _ => ("models", &parts[..]),
    };
    let Some(rpos) = rest.iter().position(|p| *p == "resolve") else {
        not_found(&mut conn, "RepositoryNotFound");
        return Ok(());
    };
    let repo_id = rest[..rpos].join("/");
    let rev = rest.get(rpos + 1).unwrap_or(&"").replace("%2F", "/");
    let file = rest.get(rpos + 2..).unwrap_or(&[]).join("/");
    let (commit, files) = match lookup(&st, kind, &repo_id, rev) {
        Ok(found) => found,
        Err(code) => {
            not_found(&mut conn, code);
            return Ok(());
        }
    };
    let Some(bytes) = files.get(&file) else {
        not_found(&mut conn, "EntryNotFound");
        return Ok(());
    };
    let end = range_end
        .unwrap_or(usize::MAX)
        .min(bytes.len().saturating_sub(1));
    let body = if range_start < bytes.len() {
        bytes[range_start..=end].to_vec()
    } else {
        Vec::new()
    };
    let headers = [
        ("etag", format!("\"{}\"", etag(bytes))),
        ("x-repo-commit", commit.clone()),
        (
            "content-range",
            format!("bytes {range_start}-{end}/{}", bytes.len()),
        ),
    ];
    drop(st);
    respond(&mut conn, "206 Partial Content", &headers, &body);
    Ok(())
}
