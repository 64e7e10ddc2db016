//! `pipeline run`: a shortened example sweep end to end (the real stage binaries on
//! loopback), replayed from the cache it wrote, a failing stage stopping the rest, and bad
//! run files refused before any process starts.

#[path = "../../pipeline/tests/support/mod.rs"]
mod support;

use e2e::{examples, s};
use serde_json::Value;
use std::path::{Path, PathBuf};
use support::*;

/// The example sweep, shortened: 2 TopK SAEs (k 8 and 16) on one hook, 24 steps of 256
/// tokens, context 32, one eval batch.
fn sweep_yaml(model: &Path, dataset: &str, extra: &str) -> String {
    format!(
        "model_name: {}\n{dataset}\nhook_name: blocks.1.hook_resid_post\ncontext_size: 32\n\
store_batch_size_prompts: 8\narchitecture: topk\nk: 8\nd_sae: 256\n\
normalize_activations: expected_average_only_in\nn_batches_for_norm_estimate: 2\n\
training_tokens: 6144\ntrain_batch_size_tokens: 256\nn_batches_in_buffer: 4\nlr: 0.003\n\
log_frequency: 4\nfeature_sampling_window: 10\ndead_feature_window: 10\nseed: 7\n\
n_eval_batches: 1\neval_batch_size_prompts: 4\nsweep:\n  k: [8, 16]\n{extra}",
        model.display()
    )
}

fn dataset_line() -> String {
    format!(
        "dataset_path: {}",
        examples().join("corpus.jsonl").display()
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn pipeline_run(args: &[&str]) -> std::process::Output {
    let mut a = vec!["run", "--progress-every", "1000"];
    a.extend(args);
    run(&a)
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The trained files of one SAE, byte for byte (not cfg.json: its metadata names the
/// dataset, which a replay does not read).
fn sae_files(dir: &Path) -> Vec<Vec<u8>> {
    [
        "sae_weights.safetensors",
        "sparsity.safetensors",
        "metrics.jsonl",
    ]
    .iter()
    .map(|f| std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{}/{f}: {e}", dir.display())))
    .collect()
}

#[test]
fn a_sweep_trains_evaluates_and_replays_from_its_cache() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let model = examples().join("model");
    let file = write(
        root,
        "sweep.yaml",
        &sweep_yaml(
            &model,
            &dataset_line(),
            "pipeline:\n  producers: 2\n  trainers: 2\n  cache: cache\n",
        ),
    );
    let run_dir = root.join("run");
    let o = pipeline_run(&[s(&file), "--output", s(&run_dir)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("best first by CE loss score"), "{out}");

    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    let rows = summary["points"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["point"].as_str().unwrap()).collect();
    assert_eq!(names, ["topk-k8", "topk-k16"]);
    for r in rows {
        assert_eq!(r["steps"], 24, "{r}");
        let ce = r["ce_loss_score"].as_f64().unwrap();
        assert!(ce.is_finite() && ce < 1.0, "{r}");
        let ev = r["explained_variance"].as_f64().unwrap();
        assert!(ev > 0.3, "the SAE learned little: {r}");
        assert!(r["dead_fraction"].as_f64().unwrap() <= 1.0, "{r}");
    }
    assert_eq!(rows[0]["l0"], 8.0);
    assert_eq!(rows[1]["l0"], 16.0);
    for n in &names {
        let dir = run_dir.join("saes").join(n);
        for f in [
            "cfg.json",
            "sae_weights.safetensors",
            "runner_cfg.json",
            "evals.json",
            "metrics.jsonl",
        ] {
            assert!(dir.join(f).is_file(), "{}/{f} missing", dir.display());
        }
        // runner_cfg.json is a run file again (what SAELens saves beside an SAE)
        let rc = std::fs::read_to_string(dir.join("runner_cfg.json")).unwrap();
        let again = schemas::sweep::Sweep::from_json(&rc).unwrap();
        assert_eq!(
            again.points[0].train.k,
            Some(if *n == "topk-k8" { 8.0 } else { 16.0 })
        );
    }
    for f in [
        "sweep.yaml",
        "plan.json",
        "logs/tokenizer.log",
        "logs/producer-1.log",
        "logs/shuffler.log",
        "logs/trainer-1.log",
    ] {
        assert!(run_dir.join(f).is_file(), "{f} missing");
    }
    let plan: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("plan.json")).unwrap()).unwrap();
    assert_eq!(
        plan["trainers"],
        serde_json::json!([["topk-k8"], ["topk-k16"]])
    );
    assert!(plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["name"].is_string()));

    // the run directory is not replaced unless asked
    let o = pipeline_run(&[s(&file), "--output", s(&run_dir)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--overwrite"), "{}", stderr(&o));

    // replayed from the cache: no tokenizer, no LM, the same SAEs
    let replay_file = write(
        root,
        "replay.yaml",
        &sweep_yaml(
            &model,
            &format!(
                "use_cached_activations: true\ncached_activations_path: {}",
                run_dir.join("cache").display()
            ),
            "",
        ),
    );
    let replay = root.join("replay");
    let o = pipeline_run(&[s(&replay_file), "--output", s(&replay)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!replay.join("logs/tokenizer.log").exists());
    for n in &names {
        assert!(
            sae_files(&run_dir.join("saes").join(n)) == sae_files(&replay.join("saes").join(n)),
            "{n}: the replayed SAE differs"
        );
    }
}

/// Processes whose command line mentions `needle` (the test's temporary directory).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(needle) && !c.contains("cargo") {
                found.push(c);
            }
        }
    }
    found
}

#[test]
fn a_failing_stage_stops_the_rest_with_its_status_and_log() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    // A model whose config and tokenizer are fine (the checks pass) but whose weights
    // are cut short: the producer fails when it loads them, after the tokenizer started.
    let model = root.join("broken-model");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(examples().join("model").join(f), model.join(f)).unwrap();
    }
    let w = std::fs::read(examples().join("model/model.safetensors")).unwrap();
    std::fs::write(model.join("model.safetensors"), &w[..w.len() / 3]).unwrap();
    let file = write(root, "sweep.yaml", &sweep_yaml(&model, &dataset_line(), ""));
    let run_dir = root.join("run");
    // issue 18: an earlier run there survives the failed --overwrite, moved aside
    std::fs::create_dir(&run_dir).unwrap();
    std::fs::write(run_dir.join("summary.json"), "earlier").unwrap();
    let o = pipeline_run(&[s(&file), "--output", s(&run_dir), "--overwrite"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    let aside: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("run.replaced-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        std::fs::read_to_string(aside[0].join("summary.json")).unwrap(),
        "earlier"
    );
    assert!(
        err.contains(&format!(
            "the earlier run in {} is kept, moved to {}",
            run_dir.display(),
            aside[0].display()
        )),
        "{err}"
    );
    assert!(
        err.contains("stage `producer-0` failed (exit status: 1)"),
        "{err}"
    );
    assert!(
        err.contains("logs/producer-0.log") && err.contains("error:"),
        "{err}"
    );
    let left = processes_mentioning(s(root));
    assert!(left.is_empty(), "stages left running: {left:?}");
}

#[test]
fn bad_run_files_are_refused_before_any_process_starts() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let model = examples().join("model");
    let good = sweep_yaml(&model, &dataset_line(), "");
    let cases: Vec<(String, &str)> = vec![
        ("model_name: [x\n".into(), "line 1 column"),
        (
            good.replace("lr: 0.003", "l1_coeficient: 5"),
            "did you mean `l1_coefficient`",
        ),
        (
            good.replace("d_sae: 256", "d_sae: 256\nexpansion_factor: 4"),
            "field `d_sae`",
        ),
        (
            good.replace("k: 8\n", "")
                .replace("sweep:\n  k: [8, 16]\n", ""),
            "field `k`",
        ),
        (
            good.replace("context_size: 32", "context_size: -5"),
            "field `context_size`",
        ),
        (good.replace("k: [8, 16]", "k: []"), "field `sweep.k`"),
        (
            good.replace("k: [8, 16]", "kay: [8, 16]"),
            "field `sweep.kay`",
        ),
        (
            good.clone() + "seqpos_slice: [40, null]\n",
            "field `seqpos_slice`",
        ),
        (good.replace("lr: 0.003", "lr: \"3e-4\""), "field `lr`"),
        (
            good.replace("blocks.1.hook_resid_post", "blocks.1.hook_nope"),
            "valid hooks are",
        ),
        (good.clone() + "resume: true\n", "--resume"),
        (
            good.replace("context_size: 32", "context_size: 4096"),
            "context_size 4096",
        ),
        (
            good.replace("corpus.jsonl", "no-such.jsonl"),
            "dataset_path",
        ),
    ];
    for (i, (text, expect)) in cases.iter().enumerate() {
        let file = write(root, &format!("bad{i}.yaml"), text);
        let run_dir = root.join(format!("run{i}"));
        let o = pipeline_run(&[s(&file), "--output", s(&run_dir)]);
        let err = stderr(&o);
        assert!(!o.status.success(), "case {i} ran");
        assert!(
            err.contains(expect),
            "case {i}: expected '{expect}' in: {err}"
        );
        assert!(!run_dir.exists(), "case {i}: the run directory was made");
    }
}

/// A cache written by SAELens's own CacheActivationsRunner (tests/fixtures) replays as
/// `cached_activations_path`: no tokenizer, no LM; the SAE trains on its rows.
#[test]
fn a_saelens_cache_replays() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let fx = e2e::fx();
    let file = write(
        root,
        "replay.yaml",
        &format!(
            "model_name: {}\nuse_cached_activations: true\ncached_activations_path: {}\n\
hook_name: blocks.1.hook_resid_pre\ncontext_size: 128\narchitecture: topk\nk: 8\nd_sae: 256\n\
training_tokens: 4096\ntrain_batch_size_tokens: 256\nn_batches_in_buffer: 4\nlr: 0.003\n\
log_frequency: 4\nseed: 7\n",
            fx.join("tiny-gpt2").display(),
            fx.join("saelens_cache/cache").display()
        ),
    );
    let run_dir = root.join("run");
    let o = pipeline_run(&[s(&file), "--output", s(&run_dir)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("no evals"), "{}", stderr(&o));
    assert!(!run_dir.join("logs/tokenizer.log").exists());
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["points"][0]["steps"], 16, "{summary}");
    assert!(run_dir.join("saes/topk/sae_weights.safetensors").is_file());
}

/// SAELens's `runner_cfg.json` (as SAELens 6.54.12 saves it beside an SAE; tests/fixtures)
/// is a run file: the same SAE config, trained here. Only its paths are pointed at this
/// checkout's example kit (SAELens resolves them against its working directory).
#[test]
fn a_saelens_runner_cfg_json_runs() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let text = std::fs::read_to_string(e2e::fx().join("sweep/runner_cfg.json")).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    v["model_name"] = examples().join("model").display().to_string().into();
    v["dataset_path"] = examples().join("corpus.jsonl").display().to_string().into();
    v["training_tokens"] = 4096.into();
    v["n_eval_batches"] = 1.into();
    let file = write(root, "runner_cfg.json", &v.to_string());
    let run_dir = root.join("run");
    let o = pipeline_run(&[s(&file), "--output", s(&run_dir)]);
    assert!(o.status.success(), "{}", stderr(&o));
    // one notice per field that means nothing here
    assert!(
        stderr(&o).contains("notice: `compile_llm` is accepted and ignored"),
        "{}",
        stderr(&o)
    );
    // the logger's run_name, as SAELens saved it
    let name = "topk-512-LR-0.001-Tokens-1.638e+04";
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("saes").join(name).join("cfg.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (cfg["d_sae"].as_u64(), cfg["k"].as_u64()),
        (Some(512), Some(16)),
        "{cfg}"
    );
    assert_eq!(cfg["metadata"]["context_size"], 64);
}
