use super::*;

const BASE: &str = "model_name: m\ndataset_path: d.jsonl\nhook_name: blocks.1.hook_resid_pre\ncontext_size: 64\ntraining_tokens: 16384\ntrain_batch_size_tokens: 512\narchitecture: topk\nk: 16\n";

fn refused(extra: &str) -> CfgError {
    Sweep::from_yaml(&format!("{BASE}{extra}")).expect_err(extra)
}

#[test]
fn defaults_and_one_point() {
    let s = Sweep::from_yaml(BASE).unwrap();
    assert_eq!(s.points.len(), 1);
    assert_eq!(s.points[0].name, "topk");
    assert_eq!(s.runner.store_batch_size_prompts, 32);
    assert_eq!(s.runner.n_eval_batches, 10);
    assert_eq!(s.eval_batch_size_prompts(), 32);
    assert_eq!(s.pipeline.producers, 1);
    assert_eq!(s.hooks(), vec!["blocks.1.hook_resid_pre".to_string()]);
    assert_eq!(s.points[0].train.lr, 3e-4);
    assert!(s.notices.is_empty());
}

#[test]
fn grid_and_list_make_named_points() {
    let s = Sweep::from_yaml(&format!(
        "{BASE}sweep:\n  k: [16, 32]\n  hook_name: [blocks.1.hook_resid_pre, blocks.3.hook_resid_pre]\nsaes:\n  - {{architecture: standard, l1_coefficient: 5}}\n"
    ))
    .unwrap();
    let names: Vec<&str> = s.points.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "topk-k16-b1.resid_pre-l1_1",
            "topk-k16-b3.resid_pre-l1_1",
            "topk-k32-b1.resid_pre-l1_1",
            "topk-k32-b3.resid_pre-l1_1",
            "standard-k16-b1.resid_pre-l1_5",
        ]
    );
    assert_eq!(s.points[3].train.k, Some(32.0));
    assert_eq!(
        s.points[3].train.hook_name.as_deref(),
        Some("blocks.3.hook_resid_pre")
    );
    assert_eq!(s.points[4].train.l1_coefficient, 5.0);
    assert_eq!(s.hooks().len(), 2);
}

#[test]
fn the_refused_configs_name_their_field() {
    let e = Sweep::from_yaml("model_name: m\n  hook_name: [x\n").unwrap_err();
    assert!(e.to_string().contains("line 2 column"), "{e}");
    let e = refused("l1_coeficient: 5\n");
    assert_eq!(e.field, "l1_coeficient");
    assert!(
        e.to_string().contains("did you mean `l1_coefficient`"),
        "{e}"
    );
    let e = refused("d_sae: 512\nexpansion_factor: 4\n");
    assert_eq!(e.field, "d_sae");
    let e = Sweep::from_yaml(&BASE.replace("k: 16\n", "")).unwrap_err();
    assert_eq!(e.field, "k");
    // (replaced, not appended: a key given twice is its own error, below)
    let e = Sweep::from_yaml(&BASE.replace("context_size: 64", "context_size: -5")).unwrap_err();
    assert_eq!(e.field, "context_size");
    assert!(e.message.contains("negative"), "{e}");
    let e = refused("context_size: 32\n");
    assert_eq!(e.field, "context_size");
    assert_eq!(e.message, "given twice, at line 4 and again at line 9");
    let e = refused("sweep:\n  k: []\n");
    assert_eq!(e.field, "sweep.k");
    assert!(e.message.contains("empty"), "{e}");
    let e = refused("sweep:\n  kk: [1, 2]\n");
    assert_eq!(e.field, "sweep.kk");
    assert!(
        e.message.contains("not a field") && e.message.contains("`k`"),
        "{e}"
    );
    let e = refused("seqpos_slice: [10, 5]\n");
    assert_eq!(e.field, "seqpos_slice");
    assert!(e.message.contains("selects no position"), "{e}");
    let e = refused("lr: \"3e-4\"\n");
    assert_eq!(e.field, "lr");
    assert!(e.message.contains("\"3e-4\""), "{e}");
    let e = refused("resume: true\n");
    assert_eq!(e.field, "resume");
    assert!(e.message.contains("--resume"), "{e}");
    let e = refused("saes: []\n");
    assert_eq!(e.field, "saes");
    let e = refused("sweep:\n  context_size: [64, 128]\n");
    assert_eq!(e.field, "sweep.context_size");
    assert!(e.message.contains("activation stream"), "{e}");
    let e = refused("saes:\n  - {seed: 3}\n");
    assert_eq!(e.field, "saes[0].seed");
    let e = refused("pipeline:\n  producer: 2\n");
    assert!(e.to_string().contains("pipeline.producers"), "{e}");
    let e = refused("pipeline:\n  trainers: 3\n");
    assert_eq!(e.field, "pipeline.trainers");
}

#[test]
fn numbers_in_yaml_are_numbers() {
    let s = Sweep::from_yaml(&format!("{BASE}lr: 3e-4\nl1_coefficient: 5\n")).unwrap();
    assert_eq!(s.points[0].train.lr, 3e-4);
}

#[test]
fn fields_without_meaning_get_one_notice_each() {
    let s = Sweep::from_yaml(&format!("{BASE}compile_llm: true\nwandb_project: p\n")).unwrap();
    assert_eq!(s.notices.len(), 2, "{:?}", s.notices);
    assert!(s.notices[0].contains("compile_llm"));
}

/// `runner_cfg.json` written by SAELens 6.54.12 (`LanguageModelSAERunnerConfig.to_dict()`,
/// see tests/fixtures/README.md) reads as the same run.
#[test]
fn saelens_runner_cfg_json_reads() {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/sweep/runner_cfg.json"
    );
    let s = Sweep::from_json(&std::fs::read_to_string(p).unwrap()).unwrap();
    let t = &s.points[0].train;
    assert_eq!(t.architecture, "topk");
    assert_eq!((t.d_in, t.d_sae, t.k), (Some(128), Some(512), Some(16.0)));
    assert_eq!(t.lr, 1e-3);
    assert_eq!(t.context_size, 64);
    assert_eq!(t.training_tokens, 16384);
    assert_eq!(t.hook_name.as_deref(), Some("blocks.1.hook_resid_pre"));
    assert_eq!(s.runner.store_batch_size_prompts, 8);
    assert_eq!(s.points[0].name, "topk-512-LR-0.001-Tokens-1.638e+04");
    assert!(s.notices.iter().any(|n| n.contains("compile_llm")));
    // and what we write for a point reads back as the same point
    let ours = s.runner_cfg_json(&s.points[0], 128).unwrap();
    let again = Sweep::from_value(ours).unwrap();
    assert_eq!(again.points[0].train.k, t.k);
    assert_eq!(again.points[0].train.lr, t.lr);
    assert_eq!(again.runner, s.runner);
}

#[test]
fn the_resolved_file_reads_back_as_the_same_sweep() {
    let s = Sweep::from_yaml(&format!(
        "{BASE}store_batch_size_prompts: 8\nsweep:\n  k: [16, 32]\nsaes:\n  - {{architecture: standard, l1_coefficient: 5}}\npipeline:\n  trainers: 2\n"
    ))
    .unwrap();
    let text = serde_norway::to_string(&s.resolved()).unwrap();
    let again = Sweep::from_yaml(&text).unwrap();
    assert_eq!(
        again.points,
        s.points
            .iter()
            .map(|p| {
                let mut p = p.clone();
                p.train.run_name = Some(p.name.clone());
                p.overrides = again
                    .points
                    .iter()
                    .find(|q| q.name == p.name)
                    .unwrap()
                    .overrides
                    .clone();
                p
            })
            .collect::<Vec<_>>()
    );
    assert_eq!(again.runner, s.runner);
    assert_eq!(again.pipeline, s.pipeline);
}
