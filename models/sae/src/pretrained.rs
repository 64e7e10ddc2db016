//! SAELens's pretrained SAEs by name: `RELEASE:SAE_ID` (as in
//! `SAE.from_pretrained(release, sae_id)`) looked up in SAELens's registry,
//! `pretrained_saes.yaml`, and read from the local Hugging Face cache.
//!
//! The registry is the file named by `$SAESTREAM_PRETRAINED_SAES`, else the one of the
//! `sae_lens` package that `python3` imports. A release maps to a hub repo and each
//! SAE id to a folder in it holding `cfg.json` + `sae_weights.safetensors`. As SAELens
//! does, the release's `config_overrides` (and the SAE's `neuronpedia` id) replace
//! fields of `cfg.json`, and an SAE saved with `normalize_activations:
//! expected_average_only_in` gets the registry's `norm_scaling_factor` folded into its
//! weights. Releases whose files need one of SAELens's format conversions
//! (`conversion_func`) are refused by name.

use crate::{io, Result, Sae, SaeError};
use kernels::Device;
use schemas::hub;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The environment variable naming a `pretrained_saes.yaml`.
pub const REGISTRY_ENV: &str = "SAESTREAM_PRETRAINED_SAES";

/// One registry entry, resolved to its cached files.
#[derive(Clone, Debug)]
pub struct Pretrained {
    pub release: String,
    pub sae_id: String,
    pub repo_id: String,
    /// The SAE's folder in the cached snapshot.
    pub dir: PathBuf,
    pub config_overrides: Map<String, Value>,
    pub norm_scaling_factor: Option<f64>,
}

fn err(m: String) -> SaeError {
    SaeError::Unsupported(m)
}

/// `RELEASE:SAE_ID` split at its first `:`, when `spec` is not an existing path.
pub fn parse_spec(spec: &str) -> Option<(&str, &str)> {
    if Path::new(spec).exists() {
        return None;
    }
    spec.split_once(':')
        .filter(|(r, i)| !r.is_empty() && !i.is_empty() && !r.contains('/'))
}

/// The registry file: `$SAESTREAM_PRETRAINED_SAES`, else the installed `sae_lens`'s.
pub fn registry_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(REGISTRY_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    // find_spec locates the package without importing it (no torch start-up).
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import importlib.util as u; s = u.find_spec('sae_lens'); print(s.submodule_search_locations[0] if s else '')",
        ])
        .output();
    let dir = out
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|d| !d.is_empty());
    match dir {
        Some(d) => Ok(Path::new(&d).join("pretrained_saes.yaml")),
        None => Err(err(format!(
            "pretrained SAEs are looked up in SAELens's pretrained_saes.yaml: set {REGISTRY_ENV} to that file, or install sae_lens where python3 finds it"
        ))),
    }
}

/// Looks `release:sae_id` up in the registry at `registry` and finds its files through
/// `hub` (its cache, else downloaded into it).
pub fn resolve(registry: &Path, hub: &hub::Hub, release: &str, sae_id: &str) -> Result<Pretrained> {
    let text = std::fs::read_to_string(registry).map_err(|e| SaeError::io(registry, e))?;
    let reg: Value = serde_norway::from_str(&text).map_err(|e| {
        err(format!(
            "{}: not a SAELens registry: {e}",
            registry.display()
        ))
    })?;
    let Some(rel) = reg.get(release) else {
        let mut names: Vec<&str> = reg
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        names.sort_unstable();
        let near: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| n.contains(release) || release.contains(*n))
            .take(5)
            .collect();
        return Err(err(format!(
            "release '{release}' is not in {} ({} releases{})",
            registry.display(),
            names.len(),
            if near.is_empty() {
                String::new()
            } else {
                format!("; similar: {}", near.join(", "))
            }
        )));
    };
    let field = |k: &str| rel.get(k).and_then(Value::as_str);
    if let Some(conv) = field("conversion_func").filter(|c| *c != "sae_lens") {
        return Err(err(format!(
            "release '{release}' is stored in another format and needs SAELens's conversion '{conv}', which saestream does not have; convert it with SAELens (SAE.from_pretrained(...).save_model(DIR)) and give DIR"
        )));
    }
    let repo_id = field("repo_id").ok_or_else(|| {
        err(format!(
            "release '{release}' has no repo_id in {}",
            registry.display()
        ))
    })?;
    let saes = rel.get("saes").and_then(Value::as_array).ok_or_else(|| {
        err(format!(
            "release '{release}' has no 'saes' list in {}",
            registry.display()
        ))
    })?;
    let id_of = |s: &Value| match s.get("id") {
        Some(Value::String(v)) => Some(v.clone()),
        Some(v @ Value::Number(_)) => Some(v.to_string()),
        _ => None,
    };
    let Some(entry) = saes.iter().find(|s| id_of(s).as_deref() == Some(sae_id)) else {
        let ids: Vec<String> = saes.iter().filter_map(id_of).take(5).collect();
        return Err(err(format!(
            "release '{release}' has no SAE id '{sae_id}' ({} ids, e.g. {})",
            saes.len(),
            ids.join(", ")
        )));
    };
    let folder = match entry.get("path") {
        Some(Value::String(p)) => p.clone(),
        Some(v @ Value::Number(_)) => v.to_string(),
        _ => return Err(err(format!("release '{release}', SAE '{sae_id}': no path"))),
    };
    let cfg = format!("{folder}/{}", schemas::files::SAE_CFG);
    let weights = format!("{folder}/{}", schemas::files::SAE_WEIGHTS);
    let sparsity = format!("{folder}/{}", schemas::files::SPARSITY);
    let want = hub::Want::Files {
        required: &[&cfg, &weights],
        optional: &[&sparsity],
    };
    let snap = hub
        .resolve(repo_id, hub::RepoKind::Model, None, want)
        .map_err(|e| err(format!("{release}:{sae_id}: {e}")))?;
    let mut config_overrides = rel
        .get("config_overrides")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if let Some(np) = entry.get("neuronpedia").filter(|v| v.is_string()) {
        config_overrides.insert("neuronpedia_id".into(), np.clone());
    }
    Ok(Pretrained {
        release: release.into(),
        sae_id: sae_id.into(),
        repo_id: repo_id.into(),
        dir: snap.join(folder),
        config_overrides,
        norm_scaling_factor: entry.get("norm_scaling_factor").and_then(Value::as_f64),
    })
}

impl Pretrained {
    /// Loads the SAE as SAELens's `from_pretrained` does: overrides, then the norm
    /// scaling factor folded in for `expected_average_only_in` SAEs.
    pub fn load(&self, device: &Device) -> Result<Sae> {
        let mut sae = io::load_with_overrides(&self.dir, device, &self.config_overrides)?;
        if sae.cfg().normalize_activations == schemas::NormalizeActivations::ExpectedAverageOnlyIn {
            match self.norm_scaling_factor {
                Some(f) => sae.fold_activation_norm_scaling_factor(f),
                None => eprintln!(
                    "warning: {}:{} normalizes activations (expected_average_only_in) but the registry has no norm_scaling_factor for it; not folded",
                    self.release, self.sae_id
                ),
            }
        }
        Ok(sae)
    }
}

/// An SAE from a directory or a `RELEASE:SAE_ID`: what every `--sae` accepts.
pub fn load(spec: &Path, device: &Device) -> Result<Sae> {
    let s = spec.to_string_lossy();
    match parse_spec(&s) {
        None => io::load(spec, device),
        Some((release, id)) => {
            resolve(&registry_path()?, &hub::Hub::from_env(), release, id)?.load(device)
        }
    }
}
