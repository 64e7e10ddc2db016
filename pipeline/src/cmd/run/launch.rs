//! What a stage process is (its role and arguments), and the flags that join it to a
//! run: the rendezvous, where it listens, and TLS. The local launcher and the cluster
//! ones (`pipeline stage` under Slurm or by hand) add them here, the same way.

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The kinds of stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Tokenizer,
    Producer,
    Shuffler,
    Trainer,
}

impl Role {
    pub const ALL: [Role; 4] = [
        Role::Tokenizer,
        Role::Producer,
        Role::Shuffler,
        Role::Trainer,
    ];

    /// The stage binary.
    pub fn bin(self) -> &'static str {
        match self {
            Role::Tokenizer => "tokenizer",
            Role::Producer => "activation-producer",
            Role::Shuffler => "shuffler",
            Role::Trainer => "sae-trainer",
        }
    }

    /// Serves a stream (every stage but the trainers).
    pub fn serves(self) -> bool {
        self != Role::Trainer
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Tokenizer => "tokenizer",
            Role::Producer => "producer",
            Role::Shuffler => "shuffler",
            Role::Trainer => "trainer",
        }
    }

    pub fn parse(s: &str) -> Result<Role> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| anyhow!("unknown role '{s}' (tokenizer, producer, shuffler, trainer)"))
    }
}

/// One stage process of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageSpec {
    /// Its name in the run: `tokenizer`, `producer-0`, `shuffler`, `trainer-1`.
    pub name: String,
    pub role: Role,
    /// Its arguments, upstreams named `@NAME`; without the flags of [`Net`].
    pub args: Vec<String>,
    /// The SAEs it trains (trainers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub points: Vec<String>,
}

impl StageSpec {
    pub fn new(name: &str, role: Role, args: Vec<String>) -> StageSpec {
        StageSpec {
            name: name.to_string(),
            role,
            args,
            points: Vec::new(),
        }
    }

    /// Its index among the stages of its role (`producer-1` → 1).
    pub fn index(&self) -> usize {
        self.name
            .rsplit_once('-')
            .and_then(|(_, i)| i.parse().ok())
            .unwrap_or(0)
    }
}

/// How the stages of a run reach each other.
pub struct Net {
    /// The rendezvous URL.
    pub rendezvous: String,
    /// What servers bind.
    pub listen: String,
    /// The run's TLS directory (CA, its key, token): every connection uses TLS and the
    /// token, and each server issues itself a certificate for the host it advertises.
    pub tls: Option<PathBuf>,
}

/// The TLS directory of a run.
pub fn tls_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("tls")
}

impl Net {
    /// The stage's full argument list.
    pub fn args(&self, spec: &StageSpec) -> Vec<String> {
        let mut a = spec.args.clone();
        a.extend([
            "--rendezvous".into(),
            self.rendezvous.clone(),
            "--role".into(),
            spec.name.clone(),
        ]);
        if spec.role.serves() {
            a.extend(["--listen".into(), self.listen.clone()]);
        }
        if let Some(dir) = &self.tls {
            let f = |n: &str| dir.join(n).display().to_string();
            a.extend([
                "--tls-ca".into(),
                f(pipeline::tls::CA_CERT),
                "--token-file".into(),
                f(pipeline::tls::TOKEN),
            ]);
            if spec.role.serves() {
                a.extend(["--tls-ca-key".into(), f(pipeline::tls::CA_KEY)]);
            }
        }
        a
    }
}

/// How the orchestrator itself reaches the rendezvous: with the run's CA and token
/// where the run has a TLS directory.
pub fn client_config(tls: Option<&Path>) -> Result<pipeline::flight::ClientConfig> {
    let mut c = pipeline::flight::ClientConfig::default();
    if let Some(dir) = tls {
        c.tls_ca = Some(dir.join(pipeline::tls::CA_CERT));
        c.token = Some(pipeline::flight::read_token(
            &dir.join(pipeline::tls::TOKEN),
        )?);
    }
    Ok(c)
}

/// The stages of a planned run, as `pipeline plan` writes them for cluster launchers.
pub const STAGES_FILE: &str = "stages.json";
/// Where a cluster run's rendezvous says it is.
pub const RENDEZVOUS_FILE: &str = "rendezvous.json";

pub fn read_specs(run_dir: &Path) -> Result<Vec<StageSpec>> {
    let f = run_dir.join(STAGES_FILE);
    let text = std::fs::read_to_string(&f).with_context(|| {
        format!(
            "cannot read {} (plan the run first: pipeline plan FILE --output {})",
            f.display(),
            run_dir.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a stage list", f.display()))
}

/// The stage of `role` with `index` (or the only one).
pub fn find_spec(specs: &[StageSpec], role: Role, index: usize) -> Result<&StageSpec> {
    let of_role: Vec<&StageSpec> = specs.iter().filter(|s| s.role == role).collect();
    if of_role.is_empty() {
        bail!("this run has no {} stage", role.name());
    }
    of_role
        .iter()
        .find(|s| s.index() == index)
        .copied()
        .ok_or_else(|| {
            anyhow!(
                "this run has {} {} stage(s) (indices 0..{}), not index {index}",
                of_role.len(),
                role.name(),
                of_role.len()
            )
        })
}
