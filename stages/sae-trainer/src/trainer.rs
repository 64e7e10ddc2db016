//! SAELens's `SAETrainer`: one training step (dead-latent tracking, the sparsity
//! coefficient warm-up, gradient clipping, Adam on the LR schedule), SAELens's log
//! metrics, the feature-density window, finetuning, and checkpoints that a run resumes
//! from bit for bit.

use crate::schedule::{CoefficientSchedule, LrSchedule};
use anyhow::{bail, Context, Result};
use kernels::{ops, Device, Tensor};
use sae::io::{self, OutTensor};
use sae::optim::{clip_grad_norm, Adam};
use sae::{Params, Sae, StepInput, StepOutput};
use schemas::tensors::{B_DEC, W_DEC};
use schemas::{Dtype, FinetuningMethod, SaeConfig, TrainConfig};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::Path;

/// File names inside a checkpoint directory (besides the SAE's own).
pub use schemas::files::{TRAINER_STATE_JSON, TRAINER_STATE_TENSORS};

/// Counters and scalars of a run (a checkpoint's `trainer_state.json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub n_training_steps: u64,
    pub n_training_tokens: u64,
    /// Tokens in the current feature-density window.
    pub n_frac_active_tokens: u64,
    pub started_fine_tuning: bool,
    /// `expected_average_only_in` factor the inputs are multiplied by, once estimated.
    pub scaling_factor: Option<f64>,
    /// Batches drawn from the data so far (training and norm estimation).
    pub batches_consumed: u64,
    pub adam_step: u64,
    /// Adam steps of the finetuning scale (torch counts per parameter).
    pub finetune_scale_steps: u64,
    pub topk_threshold: f64,
}

/// Everything a step reports.
pub struct StepRecord {
    pub out: StepOutput,
    pub grad_norm: f32,
    /// Whether the step's decoder and backward ran over all latents or the active ones.
    pub path: sae::StepPath,
    /// The feature-density metrics of the window that ended before this step.
    pub sparsity_log: Option<Map<String, Value>>,
}

pub struct Trainer {
    pub cfg: TrainConfig,
    pub sae: Sae,
    pub adam: Adam,
    pub counters: Counters,
    lr: LrSchedule,
    coefficient: Option<CoefficientSchedule>,
    grads: Params,
    act_freq_scores: Vec<f32>,
    n_forward_passes_since_fired: Vec<f32>,
    /// During finetuning: the per-latent decoder scale and the decoder it scales.
    finetune: Option<Finetune>,
}

/// SAELens 5 finetunes a per-latent scale `s` of the decoder input. The SAE computes
/// `(f * s) @ W_dec = f @ (s W_dec)`, so the trainer keeps `s` and the base decoder
/// `W_base`, hands the SAE `W_dec = s W_base`, and maps gradients back:
/// `d s_j = <dW_dec[j], W_base[j]>`, `d W_base = s dW_dec`.
struct Finetune {
    method: FinetuningMethod,
    scale: Tensor,
    w_base: Tensor,
    adam_scale: (Tensor, Tensor),
}

impl Trainer {
    pub fn new(cfg: TrainConfig, sae: Sae) -> Trainer {
        let m = sae.cfg().d_sae;
        let coefficient = sae
            .sparsity_coefficient()
            .map(|(_, v, w)| CoefficientSchedule {
                final_value: v,
                warm_up: w,
            });
        Trainer {
            lr: LrSchedule::new(&cfg),
            adam: Adam::new(&sae.params, cfg.lr, cfg.adam_beta1, cfg.adam_beta2),
            grads: sae.zero_grads(),
            counters: Counters::default(),
            coefficient,
            act_freq_scores: vec![0.0; m],
            n_forward_passes_since_fired: vec![0.0; m],
            finetune: None,
            cfg,
            sae,
        }
    }

    fn device(&self) -> Device {
        self.sae.device().clone()
    }

    /// Latents that have not fired for more than `dead_feature_window` steps.
    pub fn dead_mask(&self) -> Vec<f32> {
        let w = self.cfg.dead_feature_window as f32;
        self.n_forward_passes_since_fired
            .iter()
            .map(|&n| (n > w) as u8 as f32)
            .collect()
    }

    fn feature_sparsity(&self) -> Vec<f32> {
        let n = self.counters.n_frac_active_tokens as f32;
        self.act_freq_scores.iter().map(|a| a / n).collect()
    }

    /// log10 feature densities over the current window (`sparsity.safetensors`).
    pub fn log_feature_sparsity(&self) -> Vec<f32> {
        self.feature_sparsity()
            .iter()
            .map(|s| (s + 1e-10).log10())
            .collect()
    }

    /// The window's density metrics (SAELens names).
    pub fn sparsity_log(&self) -> Map<String, Value> {
        let s = self.feature_sparsity();
        let logs = self.log_feature_sparsity();
        let mean = logs.iter().map(|&v| v as f64).sum::<f64>() / logs.len() as f64;
        let mut m = Map::new();
        m.insert("metrics/mean_log10_feature_sparsity".into(), json!(mean));
        m.insert(
            "sparsity/below_1e-5".into(),
            json!(s.iter().filter(|&&v| v < 1e-5).count()),
        );
        m.insert(
            "sparsity/below_1e-6".into(),
            json!(s.iter().filter(|&&v| v < 1e-6).count()),
        );
        m
    }

    /// The coefficient and learning rate the next step will use.
    pub fn next_coefficient(&self) -> f64 {
        self.coefficient
            .map_or(0.0, |c| c.at(self.counters.n_training_steps))
    }

    pub fn next_lr(&self) -> f64 {
        self.lr.lr_at(self.counters.n_training_steps)
    }

    /// One training step on a (scaled) batch `[B, d_in]`.
    pub fn step(&mut self, x: &Tensor) -> Result<StepRecord> {
        let s = self.counters.n_training_steps;
        let window = self.cfg.feature_sampling_window;
        let sparsity_log = (s > 0 && s.is_multiple_of(window)).then(|| {
            let log = self.sparsity_log();
            self.act_freq_scores.iter_mut().for_each(|v| *v = 0.0);
            self.counters.n_frac_active_tokens = 0;
            log
        });
        if self.sae.cfg().normalize_sae_decoder {
            self.sae.set_decoder_norm_to_unit_norm();
        }
        let dev = self.device();
        let m = self.sae.cfg().d_sae;
        let dead = Tensor::from_vec(&dev, &[m], self.dead_mask())?;
        let coefficient = self.next_coefficient();
        let out = self.sae.training_forward(&StepInput {
            sae_in: x,
            coefficient,
            dead_neuron_mask: Some(&dead),
            noise_seed: self.cfg.seed ^ (s.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        })?;
        // Which latents fired in this batch.
        let mut fired = Tensor::zeros(&dev, &[m]);
        self.sae.last_acts().col_counts(&mut fired);
        for ((since, freq), n) in self
            .n_forward_passes_since_fired
            .iter_mut()
            .zip(self.act_freq_scores.iter_mut())
            .zip(fired.to_vec())
        {
            *since = if n > 0.0 { 0.0 } else { *since + 1.0 };
            *freq += n;
        }
        self.counters.n_frac_active_tokens += x.rows() as u64;

        let path = self.sae.last_path();
        self.grads.zero();
        self.sae.backward(&mut self.grads);
        let lr = self.next_lr();
        let grad_norm = self.apply_gradients(lr)?;
        self.counters.n_training_steps += 1;
        self.counters.n_training_tokens += x.rows() as u64;
        self.counters.adam_step = self.adam.step;
        self.counters.topk_threshold = self.sae.buffers.topk_threshold;
        self.begin_finetuning_if_needed()?;
        Ok(StepRecord {
            out,
            grad_norm,
            path,
            sparsity_log,
        })
    }

    /// Clipping and the optimiser step; during finetuning only the method's parameters
    /// (and the decoder scale) move.
    fn apply_gradients(&mut self, lr: f64) -> Result<f32> {
        self.adam.lr = lr;
        let Some(ft) = &mut self.finetune else {
            let norm = match self.cfg.max_grad_norm {
                Some(max) => clip_grad_norm(&mut self.grads, max as f32),
                None => global_norm(&self.grads),
            };
            self.adam.update(&mut self.sae.params, &self.grads);
            return Ok(norm);
        };
        let dev = self.sae.device().clone();
        let m = self.sae.cfg().d_sae;
        // gradient of the scale from the effective decoder's gradient
        let mut d_scale = Tensor::zeros(&dev, &[m]);
        ops::row_dots(self.grads.get(W_DEC), &ft.w_base, &mut d_scale);
        let train_w = ft.method == FinetuningMethod::Decoder;
        let train_b = matches!(
            ft.method,
            FinetuningMethod::Decoder | FinetuningMethod::UnrotatedDecoder
        );
        let mut trainable = Params::new();
        trainable.insert("scale", d_scale);
        if train_w {
            let mut dw = self.grads.get(W_DEC).clone();
            ops::row_affine(&mut dw, &ft.scale, &Tensor::zeros(&dev, &[m]));
            trainable.insert(W_DEC, dw);
        }
        if train_b {
            trainable.insert(B_DEC, self.grads.get(B_DEC).clone());
        }
        let norm = match self.cfg.max_grad_norm {
            Some(max) => clip_grad_norm(&mut trainable, max as f32),
            None => global_norm(&trainable),
        };
        // torch counts Adam steps per parameter: the scale starts its own count.
        self.adam.step += 1;
        self.counters.finetune_scale_steps += 1;
        let (lr, b1, b2, eps, step) = (
            self.adam.lr,
            self.adam.beta1,
            self.adam.beta2,
            self.adam.eps,
            self.adam.step,
        );
        let (ms, vs) = &mut ft.adam_scale;
        ops::adam(
            &mut ft.scale,
            trainable.get("scale"),
            ms,
            vs,
            lr,
            b1,
            b2,
            eps,
            self.counters.finetune_scale_steps,
        );
        if train_w {
            ops::adam(
                &mut ft.w_base,
                trainable.get(W_DEC),
                self.adam.m.get_mut(W_DEC),
                self.adam.v.get_mut(W_DEC),
                lr,
                b1,
                b2,
                eps,
                step,
            );
        }
        if train_b {
            ops::adam(
                self.sae.params.get_mut(B_DEC),
                trainable.get(B_DEC),
                self.adam.m.get_mut(B_DEC),
                self.adam.v.get_mut(B_DEC),
                lr,
                b1,
                b2,
                eps,
                step,
            );
        }
        let mut w = ft.w_base.clone();
        ops::row_affine(&mut w, &ft.scale, &Tensor::zeros(&dev, &[m]));
        *self.sae.params.get_mut(W_DEC) = w;
        Ok(norm)
    }

    /// SAELens 5 switches to finetuning once more than `training_tokens` have been seen.
    fn begin_finetuning_if_needed(&mut self) -> Result<()> {
        if self.counters.started_fine_tuning
            || self.counters.n_training_tokens <= self.cfg.training_tokens
        {
            return Ok(());
        }
        self.counters.started_fine_tuning = true;
        if let Some(method) = self.cfg.finetuning()? {
            let dev = self.device();
            let m = self.sae.cfg().d_sae;
            self.finetune = Some(Finetune {
                method,
                scale: Tensor::full(&dev, &[m], 1.0),
                w_base: self.sae.params.get(W_DEC).clone(),
                adam_scale: (Tensor::zeros(&dev, &[m]), Tensor::zeros(&dev, &[m])),
            });
        }
        Ok(())
    }

    /// SAELens 5's training log line for a step that has just run (its names; the
    /// coefficient and learning rate are those of the next step, and `l1_loss` is the
    /// raw L1 term divided by that coefficient, as SAELens 5 logs them).
    pub fn log_line(&self, x: &Tensor, rec: &StepRecord) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("step".into(), json!(self.counters.n_training_steps - 1));
        m.insert("losses/overall_loss".into(), json!(rec.out.loss));
        let coef = self.next_coefficient();
        for (name, v) in &rec.out.losses {
            if name == "l1_loss" {
                m.insert(
                    "losses/l1_loss".into(),
                    json!(if coef != 0.0 { v / coef } else { *v }),
                );
                m.insert("losses/raw_l1_loss".into(), json!(v));
            } else {
                m.insert(format!("losses/{name}"), json!(v));
            }
        }
        let (ev, legacy, legacy_std) = explained_variance(x, self.sae.last_sae_out());
        m.insert("metrics/explained_variance".into(), json!(ev));
        m.insert("metrics/explained_variance_legacy".into(), json!(legacy));
        m.insert(
            "metrics/explained_variance_legacy_std".into(),
            json!(legacy_std),
        );
        let mut l0 = Tensor::zeros(self.sae.device(), &[x.rows()]);
        self.sae.last_acts().row_counts(&mut l0);
        m.insert("metrics/l0".into(), json!(ops::sum(&l0) / x.rows() as f64));
        if matches!(
            self.sae.cfg().architecture,
            schemas::Architecture::BatchTopK | schemas::Architecture::MatryoshkaBatchTopK
        ) {
            m.insert(
                "metrics/topk_threshold".into(),
                json!(self.sae.buffers.topk_threshold),
            );
        }
        let since = &self.n_forward_passes_since_fired;
        m.insert(
            "sparsity/mean_passes_since_fired".into(),
            json!(since.iter().map(|&v| v as f64).sum::<f64>() / since.len() as f64),
        );
        m.insert(
            "sparsity/dead_features".into(),
            json!(self.dead_mask().iter().filter(|&&d| d > 0.0).count()),
        );
        m.insert(
            "details/current_learning_rate".into(),
            json!(self.next_lr()),
        );
        if self.coefficient.is_some() {
            m.insert("details/current_l1_coefficient".into(), json!(coef));
        }
        m.insert(
            "details/n_training_tokens".into(),
            json!(self.counters.n_training_tokens),
        );
        m.insert("details/grad_norm".into(), json!(rec.grad_norm));
        m.insert("details/step_path".into(), json!(rec.path.as_str()));
        m
    }

    /// Writes a checkpoint directory: the SAE as SAELens saves it, its sparsity, and
    /// the trainer state (raw parameters, Adam moments, counters) for an exact resume.
    /// The directory appears complete or not at all.
    pub fn save_checkpoint(&self, dir: &Path, config_yaml: &str) -> Result<()> {
        let staged = pipeline::staging::Staged::dir(dir)?;
        let tmp = staged.tmp.clone();
        io::save_training(&self.sae, &tmp, false)?;
        io::save_sparsity(&tmp, &self.log_feature_sparsity(), false)?;
        let mut tensors: Vec<OutTensor> = Vec::new();
        let f32t = |name: String, t: &Tensor| (name, t.shape().to_vec(), t.to_vec());
        let mut named: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for (p, t) in self.sae.params.iter() {
            named.push(f32t(format!("param.{p}"), t));
            named.push(f32t(format!("adam_m.{p}"), self.adam.m.get(p)));
            named.push(f32t(format!("adam_v.{p}"), self.adam.v.get(p)));
        }
        if let Some(ft) = &self.finetune {
            named.push(f32t("finetune.scale".into(), &ft.scale));
            named.push(f32t("finetune.w_base".into(), &ft.w_base));
            named.push(f32t("finetune.adam_m".into(), &ft.adam_scale.0));
            named.push(f32t("finetune.adam_v".into(), &ft.adam_scale.1));
        }
        let m = self.act_freq_scores.len();
        named.push((
            "act_freq_scores".into(),
            vec![m],
            self.act_freq_scores.clone(),
        ));
        named.push((
            "n_forward_passes_since_fired".into(),
            vec![m],
            self.n_forward_passes_since_fired.clone(),
        ));
        for (name, shape, values) in &named {
            tensors.push(OutTensor {
                name,
                shape: shape.clone(),
                values: values.clone(),
                dtype: Dtype::F32,
            });
        }
        io::write_safetensors(&tmp.join(TRAINER_STATE_TENSORS), &tensors, false)?;
        let state = json!({
            "counters": self.counters,
            "config": config_yaml,
            "sae_config": self.sae.cfg().to_training_json(),
        });
        io::atomic_write(
            &tmp.join(TRAINER_STATE_JSON),
            serde_json::to_string_pretty(&state)?.as_bytes(),
        )?;
        staged
            .commit()
            .with_context(|| format!("moving the checkpoint into {}", dir.display()))?;
        Ok(())
    }

    /// The batches of data a checkpoint's run had used (where its data resumes).
    pub fn checkpoint_batches(dir: &Path) -> Result<u64> {
        let path = dir.join(TRAINER_STATE_JSON);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{} is not a checkpoint directory", dir.display()))?;
        let state: Value =
            serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
        state["counters"]["batches_consumed"]
            .as_u64()
            .with_context(|| format!("{}: no counters.batches_consumed", path.display()))
    }

    /// Rebuilds a trainer from a checkpoint written by [`Trainer::save_checkpoint`].
    pub fn load_checkpoint(dir: &Path, device: &Device) -> Result<(Trainer, String)> {
        let json_path = dir.join(TRAINER_STATE_JSON);
        let text = std::fs::read_to_string(&json_path)
            .with_context(|| format!("{} is not a checkpoint directory", dir.display()))?;
        let state: Value =
            serde_json::from_str(&text).with_context(|| format!("{}", json_path.display()))?;
        let counters: Counters = serde_json::from_value(state["counters"].clone())
            .context("trainer_state.json: counters")?;
        let yaml = state["config"]
            .as_str()
            .context("trainer_state.json: config")?
            .to_string();
        let cfg = TrainConfig::from_yaml(&yaml)
            .map_err(|e| anyhow::anyhow!("{}: config: {e}", json_path.display()))?;
        let sae_cfg = SaeConfig::from_json(&state["sae_config"])
            .map_err(|e| anyhow::anyhow!("{}: sae_config: {e}", json_path.display()))?;
        let tensors_path = dir.join(TRAINER_STATE_TENSORS);
        let tensors = io::read_safetensors(&tensors_path)?;
        for (name, t) in &tensors {
            io::check_finite_weights(&tensors_path, name, t)?;
        }
        let get = |name: &str| -> Result<Tensor> {
            let (_, t) = tensors
                .iter()
                .find(|(n, _)| n == name)
                .with_context(|| format!("{}: no tensor {name}", dir.display()))?;
            Ok(Tensor::from_vec(device, &t.shape, t.values.clone())?)
        };
        let mut params = Params::new();
        for (name, _) in sae::param_shapes(&sae_cfg) {
            params.insert(name, get(&format!("param.{name}"))?);
        }
        let buffers = sae::Buffers {
            topk_threshold: counters.topk_threshold,
        };
        let sae = Sae::from_parts(sae_cfg, params, buffers, device)?;
        let mut t = Trainer::new(cfg, sae);
        for (name, _) in sae::param_shapes(t.sae.cfg()) {
            *t.adam.m.get_mut(name) = get(&format!("adam_m.{name}"))?;
            *t.adam.v.get_mut(name) = get(&format!("adam_v.{name}"))?;
        }
        t.adam.step = counters.adam_step;
        t.act_freq_scores = get("act_freq_scores")?.to_vec();
        t.n_forward_passes_since_fired = get("n_forward_passes_since_fired")?.to_vec();
        if counters.started_fine_tuning {
            if let Some(method) = t.cfg.finetuning()? {
                t.finetune = Some(Finetune {
                    method,
                    scale: get("finetune.scale")?,
                    w_base: get("finetune.w_base")?,
                    adam_scale: (get("finetune.adam_m")?, get("finetune.adam_v")?),
                });
            }
        }
        if t.act_freq_scores.len() != t.sae.cfg().d_sae {
            bail!("{}: counters do not match d_sae", dir.display());
        }
        t.counters = counters;
        Ok((t, yaml))
    }
}

/// Global L2 norm of a gradient set (what clipping would report).
fn global_norm(g: &Params) -> f32 {
    g.iter()
        .map(|(_, t)| ops::sum_squares(t))
        .sum::<f64>()
        .sqrt() as f32
}

/// SAELens's explained variance of a batch: `1 - mean ||x - x_hat||^2 / mean ||x - mean||^2`,
/// and the legacy per-token mean and (unbiased) standard deviation of
/// `1 - ||x - x_hat||^2 / ||x - mean||^2`.
pub fn explained_variance(x: &Tensor, out: &Tensor) -> (f64, f64, f64) {
    let dev = x.device();
    let n = x.rows();
    let mut diff = out.clone();
    ops::axpy(&mut diff, -1.0, x);
    let mut err = Tensor::zeros(&dev, &[n]);
    ops::row_dots(&diff, &diff, &mut err);
    let mut mean = Tensor::zeros(&dev, &[x.cols()]);
    ops::col_sums(x, &mut mean, 1.0 / n as f32, 0.0);
    let mut centred = x.clone();
    ops::add_row_vec(&mut centred, &mean, -1.0);
    let mut var = Tensor::zeros(&dev, &[n]);
    ops::row_dots(&centred, &centred, &mut var);
    let (e, v) = (err.to_vec(), var.to_vec());
    let ev =
        1.0 - e.iter().map(|&a| a as f64).sum::<f64>() / v.iter().map(|&a| a as f64).sum::<f64>();
    let per: Vec<f64> = e
        .iter()
        .zip(&v)
        .map(|(&a, &b)| 1.0 - a as f64 / b as f64)
        .collect();
    let m = per.iter().sum::<f64>() / n as f64;
    let sd = (per.iter().map(|p| (p - m).powi(2)).sum::<f64>() / (n as f64 - 1.0).max(1.0)).sqrt();
    (ev, m, sd)
}
