//! The run report: one page from a run directory's files (`pipeline report`, and
//! written by `pipeline run` at every log step and at the end). Every number on it
//! comes from a file of the run; a file that is not there (yet) is said so on the page.

use crate::charts::{self, ScatterPoint};
use crate::data::{pareto_best, Histogram};
use crate::html::{esc, missing, num_cell, page};
use anyhow::{bail, Result};
use schemas::files::{SPARSITY, SPARSITY_TENSOR};
use schemas::run_files::{
    CONFIGS, EVALS, FEATURES_HTML, METRICS, PLAN, PROGRESS, RESOLVED, SAES, SUMMARY,
};
use serde_json::Value;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// log10 feature density histogram: SAELens's log10(density + 1e-10) spans [-10, 0].
const DENSITY_RANGE: (f64, f64) = (-10.0, 0.0);
const DENSITY_BINS: usize = 40;
const SMALL: (u32, u32) = (290, 180);
const WIDE: (u32, u32) = (580, 360);

/// One sweep point as the run's files know it.
struct Point {
    name: String,
    dir: PathBuf,
    hook: Option<String>,
    steps: Option<u64>,
    /// Training log lines of `metrics.jsonl` (those with an explained variance).
    log: Vec<Value>,
    /// Sparsity lines (`metrics/mean_log10_feature_sparsity`).
    summary: Value,
    evals: Option<Value>,
    log10_density: Option<Vec<f32>>,
    config: Option<String>,
}

fn read_json(p: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

/// A `metrics.jsonl` being written may end in half a line: lines that do not parse are
/// skipped.
fn read_log(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v.get("metrics/explained_variance").is_some())
                .collect()
        })
        .unwrap_or_default()
}

fn read_density(p: &Path) -> Option<Vec<f32>> {
    let bytes = std::fs::read(p).ok()?;
    let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let t = st.tensor(SPARSITY_TENSOR).ok()?;
    (t.dtype() == safetensors::Dtype::F32).then(|| {
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    })
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// The points: from `plan.json`, else the directories under `saes/`.
fn points(run_dir: &Path, plan: Option<&Value>, summary: Option<&Value>) -> Vec<Point> {
    let mut named: Vec<(String, Option<String>, Option<u64>)> = plan
        .and_then(|p| p["points"].as_array())
        .map(|ps| {
            ps.iter()
                .filter_map(|p| {
                    Some((
                        p["name"].as_str()?.to_string(),
                        p["hook_name"].as_str().map(String::from),
                        p["steps"].as_u64(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    if named.is_empty() {
        let mut dirs: Vec<String> = std::fs::read_dir(run_dir.join(SAES))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default();
        dirs.sort();
        named = dirs.into_iter().map(|d| (d, None, None)).collect();
    }
    named
        .into_iter()
        .map(|(name, hook, steps)| {
            let dir = run_dir.join(SAES).join(&name);
            let row = summary
                .and_then(|s| s["points"].as_array())
                .and_then(|ps| ps.iter().find(|p| p["point"] == name.as_str()))
                .cloned()
                .unwrap_or(Value::Null);
            Point {
                log: read_log(&dir.join(METRICS)),
                evals: read_json(&dir.join(EVALS)),
                log10_density: read_density(&dir.join(SPARSITY)),
                config: std::fs::read_to_string(run_dir.join(CONFIGS).join(format!("{name}.yaml")))
                    .ok(),
                summary: row,
                name,
                dir,
                hook,
                steps,
            }
        })
        .collect()
}

impl Point {
    fn last(&self, key: &str) -> Option<f64> {
        self.log.last().and_then(|l| f(&l[key]))
    }
    fn eval(&self, group: &str, key: &str) -> Option<f64> {
        self.evals
            .as_ref()
            .and_then(|e| f(&e["metrics"][group][key]))
    }
    /// The L0 and explained variance of the frontier: the evals' when they ran, else the
    /// last training step's.
    fn l0(&self) -> Option<f64> {
        self.eval("sparsity", "l0")
            .or_else(|| self.last("metrics/l0"))
    }
    fn ev(&self) -> Option<f64> {
        self.eval("reconstruction_quality", "explained_variance")
            .or_else(|| self.last("metrics/explained_variance"))
    }
    fn ce_score(&self) -> Option<f64> {
        self.eval("model_performance_preservation", "ce_loss_score")
    }
    fn series(&self, key: &str) -> Vec<(f64, f64)> {
        self.log
            .iter()
            .filter_map(|l| Some((f(&l["details/n_training_tokens"])?, f(&l[key])?)))
            .collect()
    }
}

/// The report page of `run_dir`. Errors only when the directory is not a run directory.
pub fn render(run_dir: &Path) -> Result<String> {
    if !run_dir.is_dir() {
        bail!("{}: no such run directory", run_dir.display());
    }
    let plan = read_json(&run_dir.join(PLAN));
    if plan.is_none() && !run_dir.join(SAES).is_dir() && !run_dir.join(RESOLVED).is_file() {
        bail!(
            "{}: not a run directory of `pipeline run` (no {PLAN}, {RESOLVED} or {SAES}/)",
            run_dir.display()
        );
    }
    let summary = read_json(&run_dir.join(SUMMARY));
    let progress = read_json(&run_dir.join(PROGRESS));
    let pts = points(run_dir, plan.as_ref(), summary.as_ref());
    let name = run_dir
        .file_name()
        .map_or("run".into(), |n| n.to_string_lossy().to_string());

    let mut b = String::new();
    let _ = write!(b, "<h1>Run report: {}</h1>", esc(&name));
    let status = match (&summary, &progress) {
        (Some(s), _) => format!(
            "finished: training {} s, evals {} s, {} SAEs",
            s["train_wall_seconds"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.1}")),
            s["eval_wall_seconds"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.1}")),
            pts.len()
        ),
        (None, Some(p)) => format!(
            "running ({} s in when last refreshed); this page is rewritten at every log step",
            p["elapsed_seconds"]
                .as_f64()
                .map_or("?".into(), |x| format!("{x:.0}"))
        ),
        (None, None) => "not finished: no summary.json yet".into(),
    };
    let _ = write!(
        b,
        "<p class=\"sub\">{} · {} · model {} · dataset {}</p>",
        esc(&run_dir.display().to_string()),
        esc(&status),
        esc(plan
            .as_ref()
            .and_then(|p| p["model"].as_str())
            .unwrap_or("?")),
        esc(plan
            .as_ref()
            .and_then(|p| p["dataset"].as_str())
            .unwrap_or("(replayed activations)")),
    );
    if plan.is_none() {
        b += &missing(&format!("no {PLAN}: points are read from {SAES}/"));
    }

    overview(&mut b, &pts);
    frontier(&mut b, &pts);
    eval_table(&mut b, &pts);
    stages(&mut b, summary.as_ref(), progress.as_ref());
    for p in &pts {
        point_section(&mut b, p);
    }
    Ok(page(&format!("{name} — saestream run report"), &b))
}

/// Which points are best: by CE loss score when every point has one, else by EV.
fn best_by(pts: &[Point]) -> (&'static str, Vec<Option<f64>>) {
    if !pts.is_empty() && pts.iter().all(|p| p.ce_score().is_some()) {
        ("CE loss score", pts.iter().map(|p| p.ce_score()).collect())
    } else {
        ("explained variance", pts.iter().map(|p| p.ev()).collect())
    }
}

fn overview(b: &mut String, pts: &[Point]) {
    b.push_str("<h2 id=\"sweep\">Sweep</h2>");
    if pts.is_empty() {
        b.push_str(&missing("no sweep points found"));
        return;
    }
    let (by, key) = best_by(pts);
    let best = key
        .iter()
        .enumerate()
        .filter_map(|(i, k)| Some((i, (*k)?)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|x| x.0);
    let _ = write!(
        b,
        "<p class=\"sub\">best by {by} highlighted; click a column to sort</p>\
<table class=\"sortable\"><thead><tr><th class=\"l\">point</th><th class=\"l\">hook</th>\
<th class=\"sort\">steps</th><th class=\"sort\">tokens</th><th class=\"sort\">overall loss</th>\
<th class=\"sort\">mse loss</th><th class=\"sort\">L0</th><th class=\"sort\">explained variance</th>\
<th class=\"sort\">dead latents</th><th class=\"sort\">CE loss score</th><th class=\"sort\">KL div score</th>\
<th class=\"sort\">tokens/s</th><th class=\"l\">latents</th></tr></thead><tbody>"
    );
    for (i, p) in pts.iter().enumerate() {
        let step = p.log.last().and_then(|l| l["step"].as_u64()).map(|s| s + 1);
        let feat = if p.dir.join(FEATURES_HTML).is_file() {
            format!(
                "<a href=\"{}/{}/{}\">feature browser</a>",
                SAES,
                esc(&p.name),
                FEATURES_HTML
            )
        } else {
            "-".into()
        };
        let _ = write!(
            b,
            "<tr{}><td class=\"l\"><a href=\"#p-{}\">{}</a></td><td class=\"l\">{}</td><td data-v=\"{}\">{}/{}</td>{}{}{}{}{}{}{}{}{}<td class=\"l\">{feat}</td></tr>",
            if Some(i) == best { " class=\"best\"" } else { "" },
            esc(&p.name),
            esc(&p.name),
            esc(p.hook.as_deref().unwrap_or("?")),
            step.unwrap_or(0),
            step.map_or("-".into(), |s| s.to_string()),
            p.steps.map_or("?".into(), |s| s.to_string()),
            num_cell(p.last("details/n_training_tokens"), 0),
            num_cell(p.last("losses/overall_loss"), 4),
            num_cell(p.last("losses/mse_loss"), 4),
            num_cell(p.l0(), 2),
            num_cell(p.ev(), 4),
            num_cell(p.last("sparsity/dead_features"), 0),
            num_cell(p.ce_score(), 4),
            num_cell(p.eval("model_behavior_preservation", "kl_div_score"), 4),
            num_cell(f(&p.summary["tokens_per_second"]), 0),
        );
    }
    b.push_str("</tbody></table>");
}

fn frontier(b: &mut String, pts: &[Point]) {
    b.push_str("<h2 id=\"frontier\">Sparsity–fidelity frontier</h2><p class=\"sub\">one point per SAE; filled: Pareto-best (no other SAE has a lower or equal L0 and a higher or equal score); evals' values where they ran, else the last training step's</p><div class=\"grid\">");
    for (title, y_desc, ys) in [
        (
            "L0 vs explained variance",
            "explained variance",
            pts.iter().map(|p| p.ev()).collect::<Vec<_>>(),
        ),
        (
            "L0 vs CE loss score",
            "CE loss score",
            pts.iter().map(|p| p.ce_score()).collect(),
        ),
    ] {
        let xy: Vec<(f64, f64)> = pts
            .iter()
            .zip(&ys)
            .map(|(p, y)| (p.l0().unwrap_or(f64::NAN), y.unwrap_or(f64::NAN)))
            .collect();
        let best = pareto_best(&xy);
        let sp: Vec<ScatterPoint> = pts
            .iter()
            .zip(xy.iter().zip(best))
            .map(|(p, (&(x, y), best))| ScatterPoint {
                label: p.name.clone(),
                x,
                y,
                best,
            })
            .collect();
        match charts::scatter(title, "L0", y_desc, &sp, WIDE) {
            Some(c) => b.push_str(&c.html()),
            None => b.push_str(&missing(&format!(
                "{title}: no SAE has both numbers yet{}",
                if y_desc == "CE loss score" {
                    " (the CE loss score comes from the evals, run at the end; none ran, or n_eval_batches is 0)"
                } else {
                    ""
                }
            ))),
        }
    }
    b.push_str("</div>");
}

/// SAELens's eval metrics, `group/metric` as in `evals.json`.
fn eval_table(b: &mut String, pts: &[Point]) {
    b.push_str("<h2 id=\"evals\">Evals</h2>");
    let with: Vec<&Point> = pts.iter().filter(|p| p.evals.is_some()).collect();
    if with.is_empty() {
        b.push_str(&missing(&format!(
            "no {EVALS} in any SAE directory: the evals run after training (none ran if n_eval_batches is 0 or the run replayed a cache without a dataset)"
        )));
        return;
    }
    let mut keys: Vec<(String, String)> = Vec::new();
    for p in &with {
        if let Some(groups) = p.evals.as_ref().and_then(|e| e["metrics"].as_object()) {
            for (g, m) in groups {
                for k in m.as_object().into_iter().flat_map(|o| o.keys()) {
                    if !keys.contains(&(g.clone(), k.clone())) {
                        keys.push((g.clone(), k.clone()));
                    }
                }
            }
        }
    }
    b.push_str("<div style=\"overflow:auto\"><table class=\"sortable\"><thead><tr><th class=\"l\">metric</th>");
    for p in &with {
        let _ = write!(b, "<th>{}</th>", esc(&p.name));
    }
    b.push_str("</tr></thead><tbody>");
    for (g, k) in &keys {
        let _ = write!(b, "<tr><td class=\"l\">{}/{}</td>", esc(g), esc(k));
        for p in &with {
            b.push_str(&num_cell(p.eval(g, k), 5));
        }
        b.push_str("</tr>");
    }
    b.push_str("</tbody></table></div>");
    if with.len() < pts.len() {
        let none: Vec<&str> = pts
            .iter()
            .filter(|p| p.evals.is_none())
            .map(|p| p.name.as_str())
            .collect();
        b.push_str(&missing(&format!("no {EVALS} for {}", none.join(", "))));
    }
}

fn stages(b: &mut String, summary: Option<&Value>, progress: Option<&Value>) {
    b.push_str("<h2 id=\"stages\">Stages</h2>");
    let Some(p) = progress else {
        b.push_str(&missing(&format!(
            "no {PROGRESS}: the stages' throughput is recorded while the run goes (local runs)"
        )));
        return;
    };
    if let Some(counts) = p["bottleneck_counts"].as_object().filter(|c| !c.is_empty()) {
        let total: u64 = counts.values().filter_map(|v| v.as_u64()).sum();
        let mut c: Vec<(&String, u64)> = counts
            .iter()
            .filter_map(|(k, v)| Some((k, v.as_u64()?)))
            .collect();
        c.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let _ = write!(
            b,
            "<p><b>Bounded by {}</b> (named the bottleneck in {} of {} samples{})</p>",
            esc(c[0].0),
            c[0].1,
            total,
            c[1..]
                .iter()
                .map(|(k, n)| format!("; {} in {n}", esc(k)))
                .collect::<String>()
        );
    }
    if let Some(t) = p["bottleneck_overall"].as_str().filter(|t| !t.is_empty()) {
        let _ = write!(
            b,
            "<p>Over the whole run, by each stage's mean tokens/s: {}</p>",
            esc(t)
        );
    }
    if let Some(t) = p["bottleneck"].as_str().filter(|t| !t.is_empty()) {
        let _ = write!(b, "<p class=\"sub\">last sample: {}</p>", esc(t));
    }
    let rss = |name: &str| -> Option<f64> {
        summary?["stages"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)
            .and_then(|s| s["peak_rss_mib"].as_f64())
    };
    b.push_str("<table><thead><tr><th class=\"l\">stage</th><th>tokens</th><th>seconds</th><th>mean tokens/s</th><th>tokens/s now</th><th>queue fill</th><th>peak RSS MiB</th></tr></thead><tbody>");
    for s in p["stages"].as_array().into_iter().flatten() {
        let name = s["name"].as_str().unwrap_or("?");
        let _ = write!(
            b,
            "<tr><td class=\"l\">{}</td>{}{}{}{}{}{}</tr>",
            esc(name),
            num_cell(f(&s["tokens"]), 0),
            num_cell(f(&s["seconds"]), 1),
            num_cell(f(&s["mean_tokens_per_second"]), 0),
            num_cell(f(&s["tokens_per_second"]), 0),
            num_cell(f(&s["queue_fill"]), 2),
            num_cell(rss(name), 1),
        );
    }
    b.push_str("</tbody></table>");
}

fn point_section(b: &mut String, p: &Point) {
    let _ = write!(
        b,
        "<h2 id=\"p-{}\">{}</h2><p class=\"sub\">{} · {}</p>",
        esc(&p.name),
        esc(&p.name),
        esc(p.hook.as_deref().unwrap_or("?")),
        esc(&p.dir.display().to_string())
    );
    if p.dir.join(FEATURES_HTML).is_file() {
        let _ = write!(
            b,
            "<p><a href=\"{SAES}/{}/{FEATURES_HTML}\">feature browser: top contexts of every latent</a></p>",
            esc(&p.name)
        );
    }
    b.push_str("<div class=\"grid\">");
    if p.log.is_empty() {
        b.push_str(&missing(&format!(
            "no training steps logged yet ({} has no log line)",
            p.dir.join(METRICS).display()
        )));
    } else {
        let other_losses: Vec<String> = p
            .log
            .last()
            .and_then(|l| l.as_object())
            .map(|o| {
                o.keys()
                    .filter(|k| {
                        k.starts_with("losses/")
                            && !["losses/overall_loss", "losses/mse_loss"].contains(&k.as_str())
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let mut charts: Vec<(String, charts::Series)> = Vec::new();
        for key in ["losses/overall_loss", "losses/mse_loss"] {
            charts.push((key.into(), vec![(key.into(), p.series(key))]));
        }
        charts.push((
            match other_losses.as_slice() {
                [one] => one.clone(),
                _ => "sparsity / auxiliary losses".into(),
            },
            other_losses
                .iter()
                .map(|k| (k.clone(), p.series(k)))
                .collect(),
        ));
        for key in [
            "metrics/l0",
            "metrics/explained_variance",
            "sparsity/dead_features",
            "details/current_learning_rate",
        ] {
            charts.push((key.into(), vec![(key.into(), p.series(key))]));
        }
        for (title, series) in &charts {
            match charts::lines(title, "training tokens", series, SMALL) {
                Some(c) => b.push_str(&c.html()),
                None => b.push_str(&missing(&format!("{title}: not in the log"))),
            }
        }
    }
    density(b, p);
    b.push_str("</div>");
    match &p.config {
        Some(c) => {
            let _ = write!(
                b,
                "<details><summary>resolved config ({CONFIGS}/{}.yaml)</summary><pre>{}</pre></details>",
                esc(&p.name),
                esc(c)
            );
        }
        None => b.push_str(&missing(&format!("no {CONFIGS}/{}.yaml", p.name))),
    }
}

/// SAELens's W&B density plot: log10 feature density of the last window.
fn density(b: &mut String, p: &Point) {
    match &p.log10_density {
        Some(d) => {
            let h = Histogram::new(
                d.iter().map(|&v| v as f64),
                DENSITY_RANGE.0,
                DENSITY_RANGE.1,
                DENSITY_BINS,
            );
            let dead = d.iter().filter(|&&v| v <= -9.99).count();
            let title = format!(
                "log10 feature density ({SPARSITY}): {} latents, {dead} never fired",
                d.len()
            );
            match charts::bars(&title, "log10 feature density", "latents", &h.bins(), SMALL) {
                Some(c) => b.push_str(&c.html()),
                None => b.push_str(&missing(&format!("{SPARSITY} holds no finite density"))),
            }
        }
        None => b.push_str(&missing(&format!(
            "no {SPARSITY} yet: the feature density histogram is drawn once the SAE is written"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_directory_with_only_a_plan_says_what_is_missing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join(PLAN),
            r#"{"model":"m","dataset":"d","points":[{"name":"a","hook_name":"blocks.0.hook_resid_post","steps":10}]}"#,
        )
        .unwrap();
        let html = render(d.path()).unwrap();
        assert!(html.contains("no training steps logged yet"));
        assert!(html.contains("no evals.json in any SAE directory"));
        assert!(html.contains("no sparsity.safetensors yet"));
        assert!(html.contains("no progress.json"));
        assert!(html.contains("not finished: no summary.json yet"));
        assert!(!html.contains("<figure"));
        let e = render(&d.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("no such run directory"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        let e = render(empty.path()).unwrap_err().to_string();
        assert!(e.contains("not a run directory"), "{e}");
    }

    #[test]
    fn curves_frontier_and_density_from_the_files() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path();
        std::fs::write(
            run.join(PLAN),
            r#"{"points":[{"name":"a","hook_name":"h","steps":3},{"name":"b","hook_name":"h","steps":3}]}"#,
        )
        .unwrap();
        for (name, l0, ev) in [("a", 10.0, 0.8), ("b", 20.0, 0.7)] {
            let dir = run.join(SAES).join(name);
            std::fs::create_dir_all(&dir).unwrap();
            let mut log = String::new();
            for s in 0..3 {
                log += &format!(
                    "{{\"step\":{s},\"losses/overall_loss\":{},\"losses/mse_loss\":1.0,\"losses/auxiliary_reconstruction_loss\":0.1,\"metrics/explained_variance\":{ev},\"metrics/l0\":{l0},\"sparsity/dead_features\":2,\"details/current_learning_rate\":0.001,\"details/n_training_tokens\":{}}}\n",
                    3.0 - s as f64,
                    (s + 1) * 100
                );
            }
            log += "{\"step\":3,\"metrics/mean_log10_feature_sparsity\":-2.0}\n{\"step\":4,\"los";
            std::fs::write(dir.join(METRICS), log).unwrap();
        }
        let dens: Vec<u8> = [-10.0f32, -2.0, -2.1, -0.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &dens).unwrap();
        safetensors::serialize_to_file(
            [(SPARSITY_TENSOR, view)],
            None,
            &run.join(SAES).join("a").join(SPARSITY),
        )
        .unwrap();
        let html = render(run).unwrap();
        // 7 curves per point, 2 frontier charts... less the CE frontier (no evals), + 1 density
        assert_eq!(html.matches("data-kind=\"line\"").count(), 14);
        assert!(html.contains("data-kind=\"line\" data-n=\"3\""));
        assert_eq!(
            html.matches("data-kind=\"scatter\" data-n=\"2\"").count(),
            1
        );
        assert!(html.contains("L0 vs CE loss score: no SAE has both numbers yet"));
        // -10, -2.1, -2.0 and -0.5 fall in 4 different bins of 0.25
        assert!(html.contains("data-kind=\"bars\" data-n=\"4\""));
        assert!(html.contains("4 latents, 1 never fired"));
        // b's density is missing, said so
        assert_eq!(html.matches("no sparsity.safetensors yet").count(), 1);
        // both points are Pareto-best (lower L0 vs higher EV): a is best by EV
        assert!(html.contains("<tr class=\"best\"><td class=\"l\"><a href=\"#p-a\">a</a>"));
    }
}
