//! SAELens's learning-rate schedule (torch's `SequentialLR` of a linear warm-up, the
//! main schedule and a linear decay) and its sparsity-coefficient warm-up, as closed
//! forms of the step number so that a resumed run needs no scheduler state.

use schemas::{LrScheduler, TrainConfig};

/// The learning rate at each step.
#[derive(Clone, Debug)]
pub struct LrSchedule {
    lr: f64,
    lr_end: f64,
    main: LrScheduler,
    warm_up: u64,
    decay: u64,
    /// Steps of the main schedule (total minus warm-up and decay).
    main_steps: u64,
    cycles: u64,
}

impl LrSchedule {
    pub fn new(cfg: &TrainConfig) -> LrSchedule {
        let total = cfg.total_training_steps();
        LrSchedule {
            lr: cfg.lr,
            lr_end: cfg.lr_end(),
            main: cfg.lr_scheduler().expect("validated"),
            warm_up: cfg.lr_warm_up_steps,
            decay: cfg.lr_decay_steps,
            main_steps: total - cfg.lr_warm_up_steps - cfg.lr_decay_steps,
            cycles: cfg.n_restart_cycles.max(1),
        }
    }

    /// The learning rate used by step `s` (0-based), i.e. after `s` scheduler steps.
    pub fn lr_at(&self, s: u64) -> f64 {
        let lr = self.lr;
        if s < self.warm_up {
            // LinearLR(start = 1/W, end = 1, total_iters = W - 1)
            let start = 1.0 / self.warm_up as f64;
            let iters = self.warm_up - 1;
            return if iters == 0 {
                lr * start
            } else {
                lr * (start + (1.0 - start) * s.min(iters) as f64 / iters as f64)
            };
        }
        let e = s - self.warm_up;
        if e < self.main_steps || self.decay == 0 {
            let cosine = |t: f64, period: f64| {
                self.lr_end
                    + (lr - self.lr_end) * (1.0 + (std::f64::consts::PI * t / period).cos()) / 2.0
            };
            return match self.main {
                LrScheduler::Constant => lr,
                LrScheduler::CosineAnnealing => cosine(e as f64, self.main_steps as f64),
                LrScheduler::CosineAnnealingWarmRestarts => {
                    let period = (self.main_steps / self.cycles).max(1);
                    cosine((e % period) as f64, period as f64)
                }
            };
        }
        // LinearLR(start = lr_end / lr, end = 0, total_iters = decay); a constant
        // schedule decays from lr itself.
        let d = e - self.main_steps;
        let start = match self.main {
            LrScheduler::Constant => 1.0,
            _ => self.lr_end / lr,
        };
        lr * (start - start * d.min(self.decay) as f64 / self.decay as f64)
    }
}

/// SAELens's `CoefficientScheduler`: linear warm-up from 0 over `warm_up` steps.
#[derive(Clone, Copy, Debug)]
pub struct CoefficientSchedule {
    pub final_value: f64,
    pub warm_up: u64,
}

impl CoefficientSchedule {
    /// The coefficient used by step `s` (0-based).
    pub fn at(&self, s: u64) -> f64 {
        if self.warm_up == 0 {
            self.final_value
        } else {
            self.final_value * (s.min(self.warm_up) as f64 / self.warm_up as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Against the learning rates torch's schedulers gave SAELens 6.54.12
    /// (`tests/fixtures/lr_schedules.json`, made by `tests/saelens/make_lr_fixture.py`):
    /// 1e-12 relative (torch updates some of them recursively).
    #[test]
    fn matches_saelens_schedules() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/lr_schedules.json");
        let data: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for case in data["lr"].as_array().unwrap() {
            let cfg = TrainConfig {
                lr: case["lr"].as_f64().unwrap(),
                lr_end: Some(case["lr_end"].as_f64().unwrap()),
                lr_scheduler_name: case["scheduler_name"].as_str().unwrap().into(),
                lr_warm_up_steps: case["warm_up_steps"].as_u64().unwrap(),
                lr_decay_steps: case["decay_steps"].as_u64().unwrap(),
                n_restart_cycles: case["num_cycles"].as_u64().unwrap(),
                training_tokens: case["training_steps"].as_u64().unwrap() * 8,
                train_batch_size_tokens: 8,
                ..Default::default()
            };
            let s = LrSchedule::new(&cfg);
            for (i, want) in case["lrs"].as_array().unwrap().iter().enumerate() {
                let (got, want) = (s.lr_at(i as u64), want.as_f64().unwrap());
                assert!(
                    (got - want).abs() <= 1e-12 * want.abs().max(1e-12),
                    "{case}: step {i}: {got} vs {want}"
                );
            }
        }
        for case in data["coefficient"].as_array().unwrap() {
            let c = CoefficientSchedule {
                final_value: case["final"].as_f64().unwrap(),
                warm_up: case["warm_up_steps"].as_u64().unwrap(),
            };
            for (i, want) in case["values"].as_array().unwrap().iter().enumerate() {
                assert!((c.at(i as u64) - want.as_f64().unwrap()).abs() < 1e-15);
            }
        }
    }
}
