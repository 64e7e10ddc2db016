//! `activation-producer bench`: forward throughput to `stop_at_layer` on a random
//! GPT-2-shaped checkpoint that the bench writes itself (GPT-2 small by default), or on
//! any checkpoint given with `--model` (`benches/make_random_lm.py` writes random
//! Gemma 2 / Qwen3-shaped ones).

use anyhow::{bail, Context, Result};
use kernels::Device;
use lm::{Capture, HookPoint, HookedTransformer, TokenBatch, Workspace};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use sae::io::{write_safetensors, OutTensor};
use schemas::Dtype;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 12)]
    pub n_layers: usize,
    #[arg(long, default_value_t = 768)]
    pub d_model: usize,
    #[arg(long, default_value_t = 12)]
    pub n_heads: usize,
    #[arg(long, default_value_t = 3072)]
    pub d_mlp: usize,
    #[arg(long, default_value_t = 50257)]
    pub d_vocab: usize,
    #[arg(long, default_value_t = 1024)]
    pub n_ctx: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 128)]
    pub context_size: usize,
    #[arg(long, default_value_t = 6)]
    pub stop_at_layer: usize,
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Keep the random checkpoint in this directory (to time other implementations on it).
    #[arg(long, conflicts_with = "model")]
    pub model_out: Option<PathBuf>,
    /// Time this checkpoint (any supported family) instead of a random GPT-2; the
    /// --n-layers … --n-ctx shape flags are then ignored.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Writes a GPT-2 checkpoint with N(0, 0.02) weights (LayerNorm weights around 1).
pub fn write_random_gpt2(dir: &Path, a: &BenchArgs) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = json!({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
        "n_layer": a.n_layers, "n_embd": a.d_model, "n_head": a.n_heads, "n_inner": a.d_mlp,
        "vocab_size": a.d_vocab, "n_positions": a.n_ctx, "n_ctx": a.n_ctx, "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": true, "bos_token_id": a.d_vocab - 1, "eos_token_id": a.d_vocab - 1,
    });
    sae::io::atomic_write(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    let normal = Normal::new(0.0f32, 0.02).unwrap();
    let (d, m) = (a.d_model, a.d_mlp);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("wte.weight".into(), vec![a.d_vocab, d]),
        ("wpe.weight".into(), vec![a.n_ctx, d]),
        ("ln_f.weight".into(), vec![d]),
        ("ln_f.bias".into(), vec![d]),
    ];
    for l in 0..a.n_layers {
        for (n, s) in [
            ("ln_1.weight", vec![d]),
            ("ln_1.bias", vec![d]),
            ("attn.c_attn.weight", vec![d, 3 * d]),
            ("attn.c_attn.bias", vec![3 * d]),
            ("attn.c_proj.weight", vec![d, d]),
            ("attn.c_proj.bias", vec![d]),
            ("ln_2.weight", vec![d]),
            ("ln_2.bias", vec![d]),
            ("mlp.c_fc.weight", vec![d, m]),
            ("mlp.c_fc.bias", vec![m]),
            ("mlp.c_proj.weight", vec![m, d]),
            ("mlp.c_proj.bias", vec![d]),
        ] {
            shapes.push((format!("h.{l}.{n}"), s));
        }
    }
    let tensors: Vec<OutTensor> = shapes
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let base = if name.contains("ln_") && name.ends_with("weight") {
                1.0
            } else {
                0.0
            };
            OutTensor {
                name,
                shape: shape.clone(),
                values: (0..n).map(|_| base + normal.sample(&mut rng)).collect(),
                dtype: Dtype::F32,
            }
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors, true)?;
    Ok(())
}

pub fn run(a: &BenchArgs) -> Result<Value> {
    let tmp;
    let (dir, write_s) = match (&a.model, &a.model_out) {
        (Some(d), _) => (d.clone(), None),
        (None, out) => {
            let dir = match out {
                Some(d) => d.clone(),
                None => {
                    tmp = tempfile::tempdir()?;
                    tmp.path().to_path_buf()
                }
            };
            let t = Instant::now();
            write_random_gpt2(&dir, a)?;
            (dir, Some(t.elapsed().as_secs_f64()))
        }
    };
    let t = Instant::now();
    let model = HookedTransformer::load(&dir, &Device::Cpu)?;
    let load_s = t.elapsed().as_secs_f64();
    let c = model.cfg();
    if a.stop_at_layer == 0 || a.stop_at_layer > c.n_layers {
        bail!("--stop-at-layer must be in 1..={}", c.n_layers);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed + 1);
    let ids: Vec<i64> = (0..a.batch * a.context_size)
        .map(|_| rng.random_range(0..c.d_vocab as i64))
        .collect();
    let batch = TokenBatch::new(&ids, a.batch, a.context_size, model.cfg())?;
    // What SAELens captures when training on the last block that runs.
    let hook = HookPoint::block(a.stop_at_layer - 1, lm::HookKind::ResidPost);
    let mut cap = Capture::new(vec![hook]);
    let mut ws = Workspace::new();
    for _ in 0..a.warmup {
        model.run(&mut ws, &batch, Some(a.stop_at_layer), &mut cap)?;
    }
    let mut times = Vec::new();
    for _ in 0..a.iters.max(1) {
        let t = Instant::now();
        model.run(&mut ws, &batch, Some(a.stop_at_layer), &mut cap)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens = (a.batch * a.context_size) as f64;
    Ok(json!({
        "model": match &a.model {
            Some(d) => format!("{} ({}), {} layers x {}, {} heads / {} kv of {}, d_mlp {}, vocab {}", d.display(), c.model_type, c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_head, c.d_mlp, c.d_vocab),
            None => format!("random GPT-2, {} layers x {}, {} heads, d_mlp {}, vocab {}", a.n_layers, a.d_model, a.n_heads, a.d_mlp, a.d_vocab),
        },
        "n_params": model.n_params(),
        "batch": [a.batch, a.context_size],
        "stop_at_layer": a.stop_at_layer,
        "hook": hook.to_string(),
        "threads": kernels::num_threads(),
        "iters": times.len(),
        "seconds_per_batch_median": median,
        "seconds_per_batch_all": times,
        "tokens_per_second": tokens / median,
        "workspace_mib": ws.bytes() as f64 / (1 << 20) as f64,
        "weights_mib": (4 * model.n_params()) as f64 / (1 << 20) as f64,
        "peak_rss_mib": pipeline::sys::peak_rss_mib(),
        "checkpoint_write_seconds": write_s,
        "load_seconds": load_s,
        "checkpoint": a.model.as_ref().or(a.model_out.as_ref()).map(|p| p.display().to_string()),
    }))
}
