//! `activation-producer features`: the feature browser of one or more SAEs. Tokens are
//! streamed once through the model (one pass for every SAE, stopped after the last
//! block any of them needs) and each SAE's latents are collected in bounded memory
//! (`report::features`); then each SAE's decoder rows go through the unembedding
//! (`W_dec @ W_U`) for the tokens each latent promotes and suppresses.

use crate::check_output;
use anyhow::{bail, Context, Result};
use kernels::{ops, Device, Tensor};
use lm::{Capture, HookKind, HookPoint, HookedTransformer, TokenBatch, Workspace};
use pipeline::cli::ClientArgs;
use pipeline::tokens::TokenStream;
use pipeline::OpenOptions;
use report::features::{Collector, PageInfo, Settings};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(clap::Args)]
#[command(
    after_help = "Memory: per latent kept, top-k × (before + after + 1) × 8 bytes of \
contexts + 256 bytes of histogram + 2 × n-logits × 8 bytes of logit effects (defaults: \
10 × 17 × 8 + 256 + 320 ≈ 1.9 kB, so 24,576 latents ≈ 47 MB per SAE); plus the model, \
the SAEs and one batch of latents [batch-size × context, d_sae] in f32. \
Time: one forward pass of the model to the deepest hook, one encode per SAE per batch, \
and one [latents, d_in] × [d_in, d_vocab] product per SAE at the end."
)]
pub struct FeaturesArgs {
    /// HF checkpoint directory, or a hub repo id (`org/name`, `@revision` optional) in the local HF cache.
    #[arg(long, value_parser = pipeline::hub::model_dir)]
    pub model: PathBuf,
    /// An SAE directory (SAELens's format; its metadata.hook_name is where it reads), or
    /// a pretrained SAE as RELEASE:SAE_ID.
    /// Repeat with --output for several SAEs on one pass of the model.
    #[arg(long, required = true)]
    pub sae: Vec<PathBuf>,
    /// The page of each --sae, in the same order (OUT.html; the data goes to OUT.json).
    #[arg(long, required = true)]
    pub output: Vec<PathBuf>,
    /// Tokens: a `tokens` stream URL, its shards, or a token file (.npy, .safetensors,
    /// .parquet/.arrow with `input_ids`).
    #[arg(long)]
    pub tokens: String,
    /// Stop after this many sequences (default: the whole source).
    #[arg(long)]
    pub max_sequences: Option<u64>,
    /// Latents to keep: a list of indices and ranges (`0-99,512,1000-1023`; default all).
    #[arg(long)]
    pub latents: Option<String>,
    /// Top activating contexts kept per latent (one per sequence, around its maximum).
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    /// Tokens shown before the maximum.
    #[arg(long, default_value_t = 12)]
    pub before: usize,
    /// Tokens shown after the maximum.
    #[arg(long, default_value_t = 4)]
    pub after: usize,
    /// Tokens promoted and suppressed shown per latent (W_dec @ W_U).
    #[arg(long, default_value_t = 10)]
    pub n_logits: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Token ids left out (not counted, not contexts' maxima), comma-separated, instead
    /// of the model's special tokens as SAELens's evals leave them out (empty: none).
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    pub ignore_tokens: Option<Vec<u32>>,
    /// tokenizer.json to show tokens as text (default: the model directory's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The consumer name to read a tokens stream as.
    #[arg(long)]
    pub consumer: Option<String>,
    #[arg(long)]
    pub overwrite: bool,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `0-99,512` → the indices, checked against `d_sae`.
pub fn parse_latents(spec: &str, d_sae: usize) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || anyhow::anyhow!("--latents: '{part}' is not an index or a range A-B");
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (
                a.trim().parse().map_err(|_| bad())?,
                b.trim().parse().map_err(|_| bad())?,
            ),
            None => {
                let i: usize = part.parse().map_err(|_| bad())?;
                (i, i)
            }
        };
        if a > b {
            bail!("--latents: the range '{part}' is empty (start after end)");
        }
        if b >= d_sae {
            bail!(
                "--latents: '{part}' goes past the SAE's last latent {} (d_sae {d_sae})",
                d_sae - 1
            );
        }
        out.extend(a..=b);
    }
    if out.is_empty() {
        bail!("--latents: '{spec}' names no latent");
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Hooks whose activations live in the residual stream's basis, where `W_U` applies.
fn in_residual_basis(h: &HookPoint) -> bool {
    matches!(
        h.kind,
        HookKind::ResidPre
            | HookKind::ResidMid
            | HookKind::ResidPost
            | HookKind::AttnOut
            | HookKind::MlpOut
            | HookKind::Embed
            | HookKind::PosEmbed
    )
}

struct One {
    dir: PathBuf,
    out: PathBuf,
    sae: sae::Sae,
    hook: HookPoint,
    head: Option<(usize, usize)>,
    collector: Collector,
}

/// Runs the pass and writes every page; returns the summary printed.
pub fn run(a: &FeaturesArgs) -> Result<Value> {
    if a.sae.len() != a.output.len() {
        bail!(
            "give one --output per --sae ({} --sae, {} --output)",
            a.sae.len(),
            a.output.len()
        );
    }
    if a.top_k == 0 || a.batch_size == 0 {
        bail!("--top-k and --batch-size must be at least 1");
    }
    for o in &a.output {
        check_output(o, a.overwrite)?;
        check_output(&o.with_extension("json"), a.overwrite)?;
    }
    let device = Device::parse(&a.device)?;
    let model = HookedTransformer::load(&a.model, &device)
        .with_context(|| format!("cannot load the model in {}", a.model.display()))?;
    let cfg = model.cfg();
    let settings = Settings {
        top_k: a.top_k,
        before: a.before,
        after: a.after,
    };
    let mut saes = Vec::new();
    for (dir, out) in a.sae.iter().zip(&a.output) {
        let sae = sae::pretrained::load(dir, model.device())
            .with_context(|| format!("cannot load the SAE in {}", dir.display()))?
            .inference_form()?;
        let meta = &sae.cfg().metadata;
        let name = meta
            .get("hook_name")
            .and_then(|h| h.as_str())
            .filter(|h| !h.is_empty())
            .with_context(|| format!("{}: cfg.json has no metadata.hook_name", dir.display()))?;
        let hook =
            HookPoint::parse(name, cfg).with_context(|| format!("the SAE in {}", dir.display()))?;
        let head = meta
            .get("hook_head_index")
            .and_then(|h| h.as_u64())
            .map(|h| (h as usize * cfg.d_head, cfg.d_head));
        let width = head.map_or(hook.width(cfg, 1), |(_, w)| w);
        if !hook.per_position() || width != sae.cfg().d_in {
            bail!(
                "{}: the SAE reads d_in {} at '{hook}', which has width {width} per token",
                dir.display(),
                sae.cfg().d_in
            );
        }
        let d_sae = sae.cfg().d_sae;
        let latents = match &a.latents {
            Some(s) => parse_latents(s, d_sae)?,
            None => (0..d_sae).collect(),
        };
        saes.push(One {
            dir: dir.clone(),
            out: out.clone(),
            collector: Collector::new(&latents, settings),
            sae,
            hook,
            head,
        });
    }
    let hooks: Vec<HookPoint> = saes.iter().map(|s| s.hook).collect();
    let stop = lm::hooks::stop_at_layer_for(&hooks, cfg.n_layers);
    let ignore = match &a.ignore_tokens {
        Some(ids) => ids.clone(),
        None => lm::special_token_ids(&a.model, cfg),
    };
    let mut tokens = TokenStream::open(
        &a.tokens,
        &OpenOptions {
            consumer: a.consumer.clone(),
            client: a.client.config()?,
            ..Default::default()
        },
    )?;
    let seq_len = tokens.seq_len();
    let bar = match a.max_sequences {
        Some(n) => pipeline::cli::progress_bar(n, "features: sequences"),
        None => pipeline::cli::progress("features"),
    };
    let mut ws = Workspace::new();
    let mut seen = 0u64;
    loop {
        let want = a
            .max_sequences
            .map_or(a.batch_size as u64, |m| (m - seen).min(a.batch_size as u64));
        if want == 0 {
            break;
        }
        let ids = tokens.next_seqs(want as usize)?;
        if ids.is_empty() {
            break;
        }
        let n = ids.len() / seq_len;
        let batch = TokenBatch::new(&ids, n, seq_len, cfg)
            .with_context(|| format!("tokens of {}", tokens.describe()))?;
        let mut cap = Capture::new(hooks.clone());
        model.run(&mut ws, &batch, stop, &mut cap)?;
        let acts = cap.take();
        let keep: Vec<bool> = batch.ids.iter().map(|t| !ignore.contains(t)).collect();
        for (one, act) in saes.iter_mut().zip(acts) {
            let act = act.with_context(|| format!("the pass did not reach '{}'", one.hook))?;
            let x = lm::splice::head_columns(&act, one.head);
            let f = one.sae.encode(&x)?.to_vec();
            if let Some(i) = f.iter().position(|v| !v.is_finite()) {
                bail!(
                    "{}: a latent is {} at token {} of sequence {} (hook '{}'): the SAE or the model holds non-finite values",
                    one.dir.display(),
                    f[i],
                    (i / one.sae.cfg().d_sae) % seq_len,
                    seen + (i / one.sae.cfg().d_sae / seq_len) as u64,
                    one.hook
                );
            }
            one.collector
                .add(seen, seq_len, &batch.ids, &keep, &f, one.sae.cfg().d_sae);
        }
        seen += n as u64;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    if seen == 0 {
        bail!("{}: no sequences to read", tokens.describe());
    }

    let (vocab, tok_note) = Vocab::open(a.tokenizer.as_deref(), &a.model);
    let mut pages = Vec::new();
    for one in &mut saes {
        let note = if in_residual_basis(&one.hook)
            && one.head.is_none()
            && one.sae.cfg().d_in == cfg.d_model
        {
            logit_effects(one, &model, a.n_logits)?;
            tok_note.clone()
        } else {
            Some(format!(
                "no logit effects: '{}' is not in the residual stream's basis, so W_dec @ W_U means nothing there{}",
                one.hook,
                tok_note.as_deref().map_or(String::new(), |n| format!("; {n}"))
            ))
        };
        let info = PageInfo {
            meta: json!({
                "sae": one.dir.display().to_string(),
                "model": a.model.display().to_string(),
                "hook_name": one.hook.to_string(),
                "d_sae": one.sae.cfg().d_sae,
                "tokens_source": a.tokens,
                "ignored_token_ids": ignore,
            }),
            logits_note: note,
        };
        let decode = |t: u32| vocab.decode(t);
        let html = report::features::render_html(&one.collector, &info, &decode);
        let data = report::features::to_json(&one.collector, &info, &decode);
        let json_path = one.out.with_extension("json");
        sae::io::atomic_write(&json_path, serde_json::to_string(&data)?.as_bytes())?;
        sae::io::atomic_write(&one.out, html.as_bytes())?;
        let live = one.collector.latents.iter().filter(|l| l.fired > 0).count();
        pages.push(json!({
            "sae": one.dir.display().to_string(),
            "output": one.out.display().to_string(),
            "json": json_path.display().to_string(),
            "latents": one.collector.latents.len(),
            "fired": live,
        }));
    }
    Ok(json!({
        "sequences": seen,
        "tokens": saes.first().map_or(0, |s| s.collector.tokens),
        "pages": pages,
    }))
}

/// Latents per product with the unembedding: bounds the `[n, d_vocab]` logits buffer.
const LOGIT_CHUNK: usize = 256;

/// `W_dec[latents] @ W_U^T`, each latent's most positive and most negative tokens.
fn logit_effects(one: &mut One, model: &HookedTransformer, n: usize) -> Result<()> {
    let w_dec = one.sae.params.get(schemas::tensors::W_DEC).to_vec();
    let d = one.sae.cfg().d_in;
    let w_u = model.unembedding();
    let dev = model.device().clone();
    for chunk in one.collector.latents.chunks_mut(LOGIT_CHUNK) {
        let rows: Vec<f32> = chunk
            .iter()
            .flat_map(|l| w_dec[l.index * d..(l.index + 1) * d].iter().copied())
            .collect();
        let a = Tensor::from_vec(&dev, &[chunk.len(), d], rows)?;
        let mut out = Tensor::zeros(&dev, &[chunk.len(), w_u.shape()[0]]);
        ops::matmul(&mut out, &a, false, w_u, true, 1.0, 0.0);
        let v = out.to_vec();
        let vocab = w_u.shape()[0];
        for (i, l) in chunk.iter_mut().enumerate() {
            let row = &v[i * vocab..(i + 1) * vocab];
            l.promoted = report::data::top_n(row, n)
                .into_iter()
                .map(|(t, x)| (t as u32, x))
                .collect();
            l.suppressed = report::data::bottom_n(row, n)
                .into_iter()
                .map(|(t, x)| (t as u32, x))
                .collect();
        }
    }
    Ok(())
}

/// Token ids as text through the model's tokenizer (each id decoded alone), or `#id`.
struct Vocab {
    tok: Option<tokenizers::Tokenizer>,
    cache: Mutex<HashMap<u32, String>>,
}

impl Vocab {
    /// The tokenizer, and a note for the page when there is none.
    fn open(explicit: Option<&Path>, model: &Path) -> (Vocab, Option<String>) {
        let path = explicit
            .map(PathBuf::from)
            .unwrap_or_else(|| model.join("tokenizer.json"));
        let path = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path
        };
        let (tok, note) = match tokenizers::Tokenizer::from_file(&path) {
            Ok(t) => (Some(t), None),
            Err(e) => {
                let note = format!(
                    "tokens shown as #id: cannot read the tokenizer {} ({e})",
                    path.display()
                );
                eprintln!("warning: {note}");
                (None, Some(note))
            }
        };
        (
            Vocab {
                tok,
                cache: Mutex::new(HashMap::new()),
            },
            note,
        )
    }

    fn decode(&self, id: u32) -> String {
        let mut c = self.cache.lock().expect("not poisoned");
        c.entry(id)
            .or_insert_with(|| match &self.tok {
                Some(t) => t.decode(&[id], false).unwrap_or_else(|_| format!("#{id}")),
                None => format!("#{id}"),
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latent_lists() {
        assert_eq!(parse_latents("0-3, 7,2", 10).unwrap(), vec![0, 1, 2, 3, 7]);
        assert!(parse_latents("5-2", 10)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(parse_latents("8-10", 10)
            .unwrap_err()
            .to_string()
            .contains("last latent 9"));
        assert!(parse_latents("x", 10)
            .unwrap_err()
            .to_string()
            .contains("'x'"));
        assert!(parse_latents(",", 10)
            .unwrap_err()
            .to_string()
            .contains("names no latent"));
    }
}
