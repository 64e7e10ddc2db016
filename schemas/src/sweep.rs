//! The run file of `pipeline run`: SAELens's `LanguageModelSAERunnerConfig` under its own
//! field names (flat, as the seed's SAELens 5 wrote it; SAELens 6's `runner_cfg.json`,
//! with its nested `sae:` and `logger:`, is read too), plus three sections of ours:
//!
//! * `sweep:` a grid (`field: [values…]`, every combination one SAE) and `saes:` a list
//!   of explicit overrides, each one SAE; the points are the grid's and the list's;
//! * `pipeline:` where the stages run (producers, trainer processes, threads, a cache);
//!
//! Fields that shape the activation stream ([`STREAM_FIELDS`]) are the same for every
//! point, since every SAE of a sweep trains on one stream. Fields SAELens has that mean
//! nothing here ([`NO_MEANING`]) are accepted with one notice each; unknown fields are
//! errors naming the field and the nearest known name.

use crate::seqpos::SeqposSlice;
use crate::train_cfg::TrainConfig;
use crate::CfgError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The runner's own fields (what feeds the SAEs; the training fields are in
/// [`TrainConfig`]). SAELens's names and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunnerConfig {
    pub model_class_name: String,
    pub store_batch_size_prompts: usize,
    /// A Python slice as a list: `[stop]`, `[start, stop]` or `[start, stop, step]`.
    pub seqpos_slice: Vec<Option<i64>>,
    /// `true` (the tokenizer's special tokens), `false`, or a list of token ids.
    pub exclude_special_tokens: ExcludeSpecialTokens,
    pub disable_concat_sequences: bool,
    /// `bos`, `eos`, `sep`, a token id, or null.
    pub sequence_separator_token: Option<SpecialToken>,
    /// Accepted as SAELens has it; the tokenizer detects a tokenized dataset itself.
    pub is_dataset_tokenized: bool,
    pub streaming: bool,
    pub activations_mixing_fraction: f64,
    pub use_cached_activations: bool,
    pub cached_activations_path: Option<String>,
    /// The language model's device (default: `device`).
    pub llm_device: Option<String>,
    pub n_eval_batches: usize,
    /// Default: `store_batch_size_prompts`.
    pub eval_batch_size_prompts: Option<usize>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            model_class_name: "HookedTransformer".into(),
            store_batch_size_prompts: 32,
            seqpos_slice: vec![None],
            exclude_special_tokens: ExcludeSpecialTokens::Flag(false),
            disable_concat_sequences: false,
            sequence_separator_token: Some(SpecialToken::Name("bos".into())),
            is_dataset_tokenized: true,
            streaming: true,
            activations_mixing_fraction: 0.5,
            use_cached_activations: false,
            cached_activations_path: None,
            llm_device: None,
            n_eval_batches: 10,
            eval_batch_size_prompts: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ExcludeSpecialTokens {
    Flag(bool),
    Ids(Vec<u32>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SpecialToken {
    Id(u32),
    Name(String),
}

impl SpecialToken {
    /// As the tokenizer's `--sequence-separator-token` takes it.
    pub fn to_arg(token: &Option<SpecialToken>) -> String {
        match token {
            None => "none".into(),
            Some(SpecialToken::Id(i)) => i.to_string(),
            Some(SpecialToken::Name(n)) => n.clone(),
        }
    }
}

/// `pipeline:`: where the stages run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Activation-producer processes (each takes every N-th LM batch).
    pub producers: usize,
    /// Trainer processes; the points are dealt out to them in turn. Default: one per SAE
    /// up to the machine's cores (small SAEs train faster side by side in processes
    /// than one after another on shared threads).
    pub trainers: Option<usize>,
    pub threads: StageThreads,
    /// Also write the activation stream here (relative to the run directory), to replay
    /// it later with `use_cached_activations`.
    pub cache: Option<String>,
    /// Size of the cache's shard files (default 256MiB); a resumed run continues the
    /// cache after its last whole shard.
    pub shard_bytes: Option<String>,
    /// The shuffler's hard cap on its buffer (`4GiB`, `512MiB`, bytes).
    pub max_buffer_bytes: Option<String>,
    /// Bytes of batches each serving stage holds for its consumers (default 32MiB):
    /// how far a stage may run ahead of the next.
    pub window_bytes: Option<String>,
    /// The rendezvous port on a cluster (the first host of a Slurm job listens there);
    /// default: any free port, announced in the run directory's `rendezvous.json`.
    pub rendezvous_port: Option<u16>,
    /// Resources of each role's component in a Slurm heterogeneous job.
    pub slurm: SlurmConfig,
    /// The container image of a Kubernetes JobSet (`pipeline plan --k8s`).
    pub k8s_image: Option<String>,
    /// The feature browser of every SAE, made after the evals.
    pub features: FeaturesConfig,
}

/// `pipeline.features:`: each SAE's feature browser (`saes/<point>/features.html`), made
/// after the evals by one pass of the model over the start of the dataset for all SAEs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeaturesConfig {
    /// `false`: no feature pages.
    pub enabled: bool,
    /// Sequences of `context_size` tokens read.
    pub n_sequences: usize,
    /// Top activating contexts kept per latent.
    pub top_k: usize,
}

impl Default for FeaturesConfig {
    fn default() -> Self {
        FeaturesConfig {
            enabled: true,
            n_sequences: 1024,
            top_k: 10,
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            producers: 1,
            trainers: None,
            threads: StageThreads::default(),
            cache: None,
            shard_bytes: None,
            max_buffer_bytes: None,
            window_bytes: None,
            rendezvous_port: None,
            slurm: SlurmConfig::default(),
            k8s_image: None,
            features: FeaturesConfig::default(),
        }
    }
}

/// `pipeline.slurm:`: the job's settings and each role's resources (per task).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmConfig {
    pub partition: Option<String>,
    /// Wall time (`HH:MM:SS`, `D-HH:MM:SS`).
    pub time: Option<String>,
    pub account: Option<String>,
    pub job_name: Option<String>,
    /// Lines put as they are after the `#SBATCH` header (module loads, `#SBATCH --qos=..`).
    pub extra: Vec<String>,
    pub tokenizer: SlurmResources,
    pub producer: SlurmResources,
    pub shuffler: SlurmResources,
    pub trainer: SlurmResources,
}

/// One role's resources per task; unset ones are left to the cluster's defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmResources {
    pub cpus: Option<u32>,
    /// GPUs per task (`--gpus-per-task`).
    pub gpus: Option<u32>,
    /// Memory per node (`--mem`: `64G`).
    pub mem: Option<String>,
    /// This role's partition, if not the job's.
    pub partition: Option<String>,
}

/// Threads per stage process (default: each stage's own rule).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StageThreads {
    pub tokenizer: Option<usize>,
    pub producer: Option<usize>,
    pub shuffler: Option<usize>,
    pub trainer: Option<usize>,
}

/// One SAE of the sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// Readable and unique within the sweep (`topk-k32-b1.resid_pre`).
    pub name: String,
    /// What this point sets beyond the shared fields.
    pub overrides: Map<String, Value>,
    pub train: TrainConfig,
}

/// A parsed, checked run file.
#[derive(Clone, Debug, PartialEq)]
pub struct Sweep {
    /// The shared training fields, as written (before the points' overrides).
    pub base: Map<String, Value>,
    pub runner: RunnerConfig,
    pub pipeline: PipelineConfig,
    pub points: Vec<Point>,
    /// One line per accepted field that means nothing here.
    pub notices: Vec<String>,
}

/// Fields that shape the activation stream: one value for the whole sweep.
pub const STREAM_FIELDS: &[&str] = &[
    "model_name",
    "model_class_name",
    "dataset_path",
    "context_size",
    "prepend_bos",
    "hook_head_index",
    "store_batch_size_prompts",
    "seqpos_slice",
    "exclude_special_tokens",
    "disable_concat_sequences",
    "sequence_separator_token",
    "is_dataset_tokenized",
    "streaming",
    "activations_mixing_fraction",
    "use_cached_activations",
    "cached_activations_path",
    "llm_device",
    "train_batch_size_tokens",
    "n_batches_in_buffer",
    "shuffle",
    "seed",
    "n_eval_batches",
    "eval_batch_size_prompts",
];

/// SAELens fields with no meaning here (W&B, torch.compile, devices of the Python
/// process, …): accepted, with a notice.
pub const NO_MEANING: &[(&str, &str)] = &[
    ("hook_eval", "deprecated in SAELens and unused"),
    ("hook_layer", "the layer is read from hook_name"),
    (
        "dataset_trust_remote_code",
        "datasets are read from local files",
    ),
    (
        "act_store_device",
        "the mixing buffer is the shuffler stage's, in its own memory",
    ),
    (
        "prefetch_llm_batches",
        "the language model always runs beside the trainers",
    ),
    (
        "autocast_lm",
        "the language model runs in its checkpoint's precision",
    ),
    ("compile_llm", "there is no torch.compile"),
    ("llm_compilation_mode", "there is no torch.compile"),
    ("compile_sae", "there is no torch.compile"),
    ("sae_compilation_mode", "there is no torch.compile"),
    ("log_to_wandb", "metrics go to metrics.jsonl per SAE"),
    (
        "log_activations_store_to_wandb",
        "metrics go to metrics.jsonl per SAE",
    ),
    (
        "log_optimizer_state_to_wandb",
        "metrics go to metrics.jsonl per SAE",
    ),
    (
        "log_weights_to_wandb",
        "metrics go to metrics.jsonl per SAE",
    ),
    ("wandb_project", "metrics go to metrics.jsonl per SAE"),
    ("wandb_id", "metrics go to metrics.jsonl per SAE"),
    ("wandb_entity", "metrics go to metrics.jsonl per SAE"),
    ("eval_every_n_wandb_logs", "evals run once, at the end"),
    (
        "save_final_checkpoint",
        "the final SAE is always saved in saes/<point>/",
    ),
    (
        "output_path",
        "the run directory is pipeline run's --output",
    ),
    ("verbose", "progress is always shown"),
    ("model_kwargs", "no model keyword arguments are taken"),
    (
        "model_from_pretrained_kwargs",
        "the checkpoint is loaded unprocessed, as SAELens loads it",
    ),
    ("sae_lens_version", "written by SAELens"),
    ("sae_lens_training_version", "written by SAELens"),
    ("use_chat_formatting", "chat templates are not applied"),
    ("tokens_per_buffer", "derived by SAELens"),
];

/// Options the seed had and SAELens removed: an error saying what to do instead.
const REMOVED: &[(&str, &str)] = &[
    (
        "resume",
        "the seed's `resume: true` is gone; run `pipeline run --resume RUN_DIR` to continue a run",
    ),
    (
        "resume_from_checkpoint",
        "run `pipeline run --resume RUN_DIR` to continue a run",
    ),
];

/// Our sections.
const SECTIONS: &[&str] = &["sweep", "saes", "pipeline"];

fn train_keys() -> Vec<String> {
    let mut keys: Vec<String> = match serde_json::to_value(TrainConfig::default()) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => unreachable!("TrainConfig serialises to a map"),
    };
    keys.push("wandb_log_frequency".into());
    keys
}

fn runner_keys() -> Vec<String> {
    match serde_json::to_value(RunnerConfig::default()) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => unreachable!("RunnerConfig serialises to a map"),
    }
}

/// Every name the top level accepts, for suggestions.
fn known_names() -> Vec<String> {
    let mut v = train_keys();
    v.extend(runner_keys());
    v.extend(NO_MEANING.iter().map(|(k, _)| k.to_string()));
    v.extend(SECTIONS.iter().map(|s| s.to_string()));
    v
}

/// Edit distance (insertions, deletions, substitutions).
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// " (did you mean `x`?)" for the nearest of `names` within a third of the length.
fn suggest(name: &str, names: &[String]) -> String {
    let best = names
        .iter()
        .map(|n| (distance(name, n), n))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((d, n)) if d <= (name.len() / 3).max(2) => format!(" (did you mean `{n}`?)"),
        _ => String::new(),
    }
}

/// `field` is reported; `key` (its last part) is matched against `names`.
fn unknown(field: &str, key: &str, names: &[String], what: &str) -> CfgError {
    CfgError::new(field, format!("{what}{}", suggest(key, names)))
}

/// Checks one field's value alone against the struct `T`, so that a wrong type is
/// reported with the field's name.
fn check_field<T: serde::de::DeserializeOwned>(key: &str, v: &Value) -> Result<(), CfgError> {
    let mut m = Map::new();
    m.insert(key.to_string(), v.clone());
    serde_json::from_value::<T>(Value::Object(m))
        .map(|_| ())
        .map_err(|e| {
            let msg = e.to_string();
            // serde says "invalid type: string \"3e-4\", expected f64": keep what it found.
            CfgError::new(key, format!("{msg} (got {})", short(v)))
        })
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}…", &s[..60])
    } else {
        s
    }
}

fn as_map(v: Value, what: &str) -> Result<Map<String, Value>, CfgError> {
    match v {
        Value::Object(m) => Ok(m),
        Value::Null => Ok(Map::new()),
        other => Err(CfgError::new(
            what,
            format!("expected a mapping of fields, got {}", short(&other)),
        )),
    }
}

impl Sweep {
    /// Reads `sweep.yaml` (YAML; a syntax error names its line and column).
    pub fn from_yaml(text: &str) -> Result<Sweep, CfgError> {
        crate::yaml::check_duplicate_keys(text)?;
        let v: Value = serde_norway::from_str(text)
            .map_err(|e| CfgError::new("<yaml>", format!("not valid YAML: {e}")))?;
        Sweep::from_value(v)
    }

    /// Reads a SAELens `runner_cfg.json` (or any JSON of the run file's shape).
    pub fn from_json(text: &str) -> Result<Sweep, CfgError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| CfgError::new("<json>", format!("not valid JSON: {e}")))?;
        Sweep::from_value(v)
    }

    /// From the parsed document.
    pub fn from_value(v: Value) -> Result<Sweep, CfgError> {
        let mut top = as_map(v, "<top>")?;
        let mut notices = Vec::new();
        flatten_runner_cfg(&mut top, &mut notices)?;
        let train_names = train_keys();
        let runner_names = runner_keys();
        let names = known_names();
        let mut base = Map::new();
        let mut runner_map = Map::new();
        let (mut grid, mut saes, mut pipeline) = (None, None, None);
        for (k, v) in top {
            if let Some((_, why)) = REMOVED.iter().find(|(r, _)| *r == k) {
                if k == "resume_from_checkpoint" && v.is_null() {
                    continue;
                }
                return Err(CfgError::new(&k, *why));
            }
            if let Some((_, why)) = NO_MEANING.iter().find(|(n, _)| *n == k) {
                notices.push(format!("`{k}` is accepted and ignored: {why}"));
                continue;
            }
            match k.as_str() {
                "sweep" => grid = Some(v),
                "saes" => saes = Some(v),
                "pipeline" => pipeline = Some(v),
                _ if train_names.contains(&k) => {
                    check_field::<TrainConfig>(&k, &v)?;
                    base.insert(k, v);
                }
                _ if runner_names.contains(&k) => {
                    check_field::<RunnerConfig>(&k, &v)?;
                    runner_map.insert(k, v);
                }
                _ => return Err(unknown(&k, &k, &names, "not a field of the run file")),
            }
        }
        let runner: RunnerConfig = serde_json::from_value(Value::Object(runner_map))
            .map_err(|e| CfgError::new("<runner>", e.to_string()))?;
        let pipeline: PipelineConfig = match pipeline {
            None => PipelineConfig::default(),
            Some(p) => {
                let m = as_map(p, "pipeline")?;
                let pnames = match serde_json::to_value(PipelineConfig::default()) {
                    Ok(Value::Object(m)) => m.keys().cloned().collect::<Vec<_>>(),
                    _ => unreachable!(),
                };
                for (k, v) in &m {
                    if !pnames.contains(k) {
                        let field = format!("pipeline.{k}");
                        return Err(unknown(
                            &field,
                            &field,
                            &pnames
                                .iter()
                                .map(|n| format!("pipeline.{n}"))
                                .collect::<Vec<_>>(),
                            "not a field of the pipeline section",
                        ));
                    }
                    check_field::<PipelineConfig>(k, v)
                        .map_err(|e| CfgError::new(&format!("pipeline.{k}"), e.message))?;
                }
                serde_json::from_value(Value::Object(m))
                    .map_err(|e| CfgError::new("pipeline", e.to_string()))?
            }
        };
        let overrides = point_overrides(grid, saes, &train_names, &runner_names, &names)?;
        let mut points = Vec::new();
        for o in overrides {
            let mut m = base.clone();
            for (k, v) in &o {
                m.insert(k.clone(), v.clone());
            }
            let train: TrainConfig = serde_json::from_value(Value::Object(m))
                .map_err(|e| CfgError::new("<config>", e.to_string()))?;
            points.push((o, train));
        }
        let names = point_names(&points);
        let points: Vec<Point> = points
            .into_iter()
            .zip(names)
            .map(|((overrides, train), name)| Point {
                name,
                overrides,
                train,
            })
            .collect();
        let sweep = Sweep {
            base,
            runner,
            pipeline,
            points,
            notices,
        };
        sweep.validate()?;
        Ok(sweep)
    }

    /// SAELens's `__post_init__` checks and ours, for every point.
    fn validate(&self) -> Result<(), CfgError> {
        let r = &self.runner;
        for p in &self.points {
            p.train.validate().map_err(|e| in_point(p, e))?;
            if p.train.hook_name.is_none() {
                return Err(in_point(
                    p,
                    CfgError::new("hook_name", "every SAE needs a hook_name"),
                ));
            }
        }
        let first = &self.points[0].train;
        if first.model_name.is_none() {
            return Err(CfgError::new(
                "model_name",
                "name the language model (an HF checkpoint directory)",
            ));
        }
        if first.dataset_path.is_none() && !r.use_cached_activations {
            return Err(CfgError::new(
                "dataset_path",
                "name the dataset (or set use_cached_activations with cached_activations_path)",
            ));
        }
        if r.model_class_name != "HookedTransformer" {
            return Err(CfgError::new(
                "model_class_name",
                format!(
                    "only HookedTransformer models are run here, not '{}'",
                    r.model_class_name
                ),
            ));
        }
        if r.store_batch_size_prompts == 0 {
            return Err(CfgError::new(
                "store_batch_size_prompts",
                "must be at least 1",
            ));
        }
        if r.eval_batch_size_prompts == Some(0) {
            return Err(CfgError::new(
                "eval_batch_size_prompts",
                "must be at least 1",
            ));
        }
        if r.activations_mixing_fraction != 0.5 {
            return Err(CfgError::new(
                "activations_mixing_fraction",
                format!(
                    "the shuffler mixes SAELens's default 0.5 only, not {}",
                    r.activations_mixing_fraction
                ),
            ));
        }
        if r.use_cached_activations && r.cached_activations_path.is_none() {
            return Err(CfgError::new(
                "cached_activations_path",
                "use_cached_activations needs cached_activations_path (a shard directory or a SAELens cache)",
            ));
        }
        if let Some(SpecialToken::Name(n)) = &r.sequence_separator_token {
            if !["bos", "eos", "sep"].contains(&n.as_str()) {
                return Err(CfgError::new(
                    "sequence_separator_token",
                    format!("'{n}' is not bos, eos, sep, a token id or null"),
                ));
            }
        }
        let ctx = first.context_size as usize;
        let slice = self.seqpos_slice()?;
        if slice.positions(ctx).is_empty() {
            return Err(CfgError::new(
                "seqpos_slice",
                format!(
                    "{:?} selects no position of a {ctx}-token context",
                    r.seqpos_slice
                ),
            ));
        }
        let p = &self.pipeline;
        for (name, v) in [
            ("pipeline.producers", Some(p.producers)),
            ("pipeline.trainers", p.trainers),
        ] {
            if v == Some(0) {
                return Err(CfgError::new(name, "must be at least 1"));
            }
        }
        if let Some(t) = p.trainers.filter(|&t| t > self.points.len()) {
            return Err(CfgError::new(
                "pipeline.trainers",
                format!("{t} trainer processes for {} SAEs", self.points.len()),
            ));
        }
        for (name, t) in [
            ("pipeline.threads.tokenizer", p.threads.tokenizer),
            ("pipeline.threads.producer", p.threads.producer),
            ("pipeline.threads.shuffler", p.threads.shuffler),
            ("pipeline.threads.trainer", p.threads.trainer),
        ] {
            if t == Some(0) {
                return Err(CfgError::new(name, "must be at least 1"));
            }
        }
        if p.features.enabled {
            for (name, v) in [
                ("pipeline.features.n_sequences", p.features.n_sequences),
                ("pipeline.features.top_k", p.features.top_k),
            ] {
                if v == 0 {
                    return Err(CfgError::new(
                        name,
                        "must be at least 1 (enabled: false turns the feature pages off)",
                    ));
                }
            }
        }
        Ok(())
    }

    /// SAELens's `seqpos_slice`, checked.
    pub fn seqpos_slice(&self) -> Result<SeqposSlice, CfgError> {
        SeqposSlice::from_list(&self.runner.seqpos_slice)
    }

    /// The shared training config (every point agrees on the stream fields).
    pub fn stream(&self) -> &TrainConfig {
        &self.points[0].train
    }

    /// Every hook the points read, in first-seen order (one LM pass captures them all).
    pub fn hooks(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for p in &self.points {
            let h = p.train.hook_name.clone().expect("validated");
            if !v.contains(&h) {
                v.push(h);
            }
        }
        v
    }

    /// Prompts per eval batch (`eval_batch_size_prompts`, else `store_batch_size_prompts`).
    pub fn eval_batch_size_prompts(&self) -> usize {
        self.runner
            .eval_batch_size_prompts
            .unwrap_or(self.runner.store_batch_size_prompts)
    }

    /// The resolved run file, itself a run file that reads back as this sweep: the
    /// stream's and the runner's fields at the top, `pipeline:`, and every point in
    /// `saes:` with its whole training config and its name as `run_name`.
    pub fn resolved(&self) -> Value {
        let mut out = Map::new();
        let stream = serde_json::to_value(self.stream()).expect("serialises");
        for k in STREAM_FIELDS {
            if let Some(v) = stream.get(*k) {
                out.insert(k.to_string(), v.clone());
            }
        }
        if let Value::Object(r) = serde_json::to_value(&self.runner).expect("serialises") {
            out.extend(r);
        }
        out.insert(
            "pipeline".into(),
            serde_json::to_value(&self.pipeline).expect("serialises"),
        );
        let points: Vec<Value> = self
            .points
            .iter()
            .map(|p| {
                let mut m = match serde_json::to_value(&p.train).expect("serialises") {
                    Value::Object(m) => m,
                    _ => unreachable!("a config is a map"),
                };
                m.retain(|k, _| !STREAM_FIELDS.contains(&k.as_str()));
                m.insert("run_name".into(), p.name.clone().into());
                Value::Object(m)
            })
            .collect();
        out.insert("saes".into(), Value::Array(points));
        Value::Object(out)
    }

    /// What SAELens saves beside an SAE (`runner_cfg.json`): the runner's fields and the
    /// SAE's training config under `sae`, for this point trained on `d_in`-wide inputs.
    pub fn runner_cfg_json(&self, point: &Point, d_in: usize) -> Result<Value, CfgError> {
        let t = &point.train;
        let sae = t.sae_config(d_in)?;
        let mut m = Map::new();
        m.insert("sae".into(), sae.to_training_json());
        let tv = serde_json::to_value(t).expect("serialises");
        let rv = serde_json::to_value(&self.runner).expect("serialises");
        // The SAE's own fields live under `sae`; the rest at the top, as SAELens.
        let sae_keys: Vec<&str> = match &m["sae"] {
            Value::Object(s) => s.keys().map(|k| k.as_str()).collect(),
            _ => Vec::new(),
        };
        let sae_keys: Vec<String> = sae_keys.iter().map(|s| s.to_string()).collect();
        for (src, skip_sae) in [(tv, true), (rv, false)] {
            if let Value::Object(o) = src {
                for (k, v) in o {
                    let runner_level = ["dtype", "device"].contains(&k.as_str());
                    if skip_sae && sae_keys.contains(&k) && !runner_level {
                        continue;
                    }
                    if ["architecture", "log_frequency", "run_name"].contains(&k.as_str()) {
                        continue;
                    }
                    m.insert(k, v);
                }
            }
        }
        m.insert("lr_end".into(), t.lr_end().into());
        m.insert(
            "logger".into(),
            serde_json::json!({
                "log_to_wandb": false,
                "run_name": point.name,
                "wandb_log_frequency": t.log_frequency,
            }),
        );
        m.insert(
            "sae_lens_version".into(),
            crate::SAELENS_FORMAT_VERSION.into(),
        );
        m.insert(
            "sae_lens_training_version".into(),
            crate::SAELENS_FORMAT_VERSION.into(),
        );
        Ok(Value::Object(m))
    }
}

fn in_point(p: &Point, e: CfgError) -> CfgError {
    CfgError::new(&e.field, format!("{} (SAE '{}')", e.message, p.name))
}

/// SAELens 6's `runner_cfg.json` nests the SAE's fields under `sae` and the logging
/// ones under `logger`: lift them to the top, as the flat (seed) config has them.
fn flatten_runner_cfg(
    top: &mut Map<String, Value>,
    notices: &mut Vec<String>,
) -> Result<(), CfgError> {
    if let Some(Value::Object(sae)) = top.remove("sae") {
        for (k, v) in sae {
            if k == "metadata" {
                continue;
            }
            top.insert(k, v);
        }
    } else if let Some(v) = top.get("sae") {
        return Err(CfgError::new(
            "sae",
            format!(
                "expected the SAE's fields as a mapping (SAELens's runner_cfg.json), got {}",
                short(v)
            ),
        ));
    }
    if let Some(Value::Object(logger)) = top.remove("logger") {
        for (k, v) in logger {
            match k.as_str() {
                "run_name" => {
                    if !v.is_null() && !top.contains_key("run_name") {
                        top.insert(k, v);
                    }
                }
                "wandb_log_frequency" => {
                    top.entry("log_frequency").or_insert(v);
                }
                _ => {
                    if !v.is_null() && v != Value::Bool(false) {
                        notices.push(format!(
                            "`logger.{k}` is accepted and ignored: metrics go to metrics.jsonl per SAE"
                        ));
                    }
                }
            }
        }
    }
    // SAELens derives these; a saved runner_cfg.json carries them.
    if top.get("checkpoint_path").is_some_and(|v| v.is_null()) {
        top.remove("checkpoint_path");
    }
    Ok(())
}

/// The overrides of each point: the grid's combinations, then the list's entries; one
/// empty override when neither is given.
fn point_overrides(
    grid: Option<Value>,
    saes: Option<Value>,
    train_names: &[String],
    runner_names: &[String],
    names: &[String],
) -> Result<Vec<Map<String, Value>>, CfgError> {
    let check_key = |k: &str, v: &Value, field: &str| -> Result<(), CfgError> {
        if STREAM_FIELDS.contains(&k) {
            return Err(CfgError::new(
                field,
                format!("`{k}` shapes the activation stream every SAE of the sweep shares, so it cannot vary inside one sweep (run a second sweep)"),
            ));
        }
        if runner_names.iter().any(|n| n == k) {
            return Err(CfgError::new(
                field,
                format!("`{k}` is run-wide and cannot vary"),
            ));
        }
        if !train_names.iter().any(|n| n == k) {
            return Err(unknown(
                field,
                k,
                names,
                &format!("`{k}` is not a field of an SAE"),
            ));
        }
        check_field::<TrainConfig>(k, v).map_err(|e| CfgError::new(field, e.message))
    };
    let mut out: Vec<Map<String, Value>> = Vec::new();
    if let Some(g) = grid {
        let g = as_map(g, "sweep")?;
        if g.is_empty() {
            return Err(CfgError::new(
                "sweep",
                "an empty grid: give `field: [values…]`",
            ));
        }
        let mut combos = vec![Map::new()];
        for (k, vals) in g {
            let field = format!("sweep.{k}");
            let Value::Array(vals) = vals else {
                return Err(CfgError::new(
                    &field,
                    format!("expected a list of values, got {}", short(&vals)),
                ));
            };
            if vals.is_empty() {
                return Err(CfgError::new(
                    &field,
                    "an empty list: give at least one value",
                ));
            }
            for v in &vals {
                check_key(&k, v, &field)?;
            }
            let mut next = Vec::with_capacity(combos.len() * vals.len());
            for c in &combos {
                for v in &vals {
                    let mut c = c.clone();
                    c.insert(k.clone(), v.clone());
                    next.push(c);
                }
            }
            combos = next;
        }
        out.extend(combos);
    }
    if let Some(s) = saes {
        let Value::Array(list) = s else {
            return Err(CfgError::new(
                "saes",
                format!("expected a list of overrides, got {}", short(&s)),
            ));
        };
        if list.is_empty() {
            return Err(CfgError::new(
                "saes",
                "an empty list: give at least one SAE",
            ));
        }
        for (i, e) in list.into_iter().enumerate() {
            let m = as_map(e, &format!("saes[{i}]"))?;
            for (k, v) in &m {
                check_key(k, v, &format!("saes[{i}].{k}"))?;
            }
            out.push(m);
        }
    }
    if out.is_empty() {
        out.push(Map::new());
    }
    Ok(out)
}

/// `architecture` then each field that varies between points, abbreviated:
/// `topk-k32-l1_5-b1.resid_pre`. A `run_name` given for a point is its name. Unique
/// (a repeat gets `-2`, `-3`, …).
fn point_names(points: &[(Map<String, Value>, TrainConfig)]) -> Vec<String> {
    let mut varying: Vec<String> = Vec::new();
    for (o, _) in points {
        for k in o.keys() {
            if k != "architecture" && k != "run_name" && !varying.contains(k) {
                varying.push(k.clone());
            }
        }
    }
    let mut names: Vec<String> = Vec::new();
    for (o, t) in points {
        let mut name = match &t.run_name {
            Some(r) if o.contains_key("run_name") || points.len() == 1 => r.clone(),
            _ => {
                let mut parts = vec![t.architecture.clone()];
                for k in &varying {
                    let v = serde_json::to_value(t)
                        .ok()
                        .and_then(|m| m.get(k).cloned())
                        .unwrap_or(Value::Null);
                    parts.push(part(k, &v));
                }
                parts.join("-")
            }
        };
        name = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._+-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let base = name.clone();
        let mut i = 2;
        while names.contains(&name) {
            name = format!("{base}-{i}");
            i += 1;
        }
        names.push(name);
    }
    names
}

fn part(key: &str, v: &Value) -> String {
    let abbrev = match key {
        "l1_coefficient" => "l1",
        "l0_coefficient" => "l0",
        "expansion_factor" => "x",
        "d_sae" => "d",
        "training_tokens" => "t",
        "lr" => "lr",
        "k" => "k",
        "hook_name" => "",
        other => other,
    };
    let val = match v {
        Value::String(s) if key == "hook_name" => short_hook(s),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            Some(f) => format!("{f}"),
            None => n.to_string(),
        },
        other => other.to_string(),
    };
    let joiner = if abbrev.ends_with(|c: char| c.is_ascii_digit()) {
        "_"
    } else {
        ""
    };
    format!("{abbrev}{joiner}{val}")
}

/// `blocks.1.hook_resid_pre` → `b1.resid_pre`.
fn short_hook(h: &str) -> String {
    let h = h
        .strip_prefix("blocks.")
        .map_or(h.to_string(), |r| format!("b{r}"));
    h.replace("hook_", "")
}

#[cfg(test)]
mod tests;
