//! SAEs spliced into the forward pass, and zero ablation (SAELens's
//! `HookedSAETransformer` / `run_with_hooks`), on the tiny GPT-2.

mod common;

use common::*;
use kernels::{ops, Device, Tensor};
use lm::hooks::Both;
use lm::{
    Capture, HookPoint, HookedTransformer, Intervention, Interventions, NoHooks, TokenBatch,
    Workspace,
};
use sae::Sae;

fn setup() -> (HookedTransformer, TokenBatch) {
    let fx = fixtures();
    let model = load(&fx.join("tiny-gpt2"));
    let tokens = pipeline::read_tokens(&fx.join("acts/tokens.npy")).unwrap();
    let batch = TokenBatch::new(&tokens.ids[..2 * 128], 2, 128, model.cfg()).unwrap();
    (model, batch)
}

fn sae128() -> Sae {
    let dir = fixtures().join("saes_inference/standard");
    sae::io::load(&dir, &Device::Cpu).unwrap()
}

fn capture(model: &HookedTransformer, batch: &TokenBatch, hook: HookPoint) -> Tensor {
    let mut cap = Capture::new(vec![hook]);
    model
        .run(&mut Workspace::new(), batch, None, &mut cap)
        .unwrap();
    cap.take().pop().unwrap().unwrap()
}

#[test]
fn spliced_activation_is_the_reconstruction_and_changes_the_logits() {
    let (model, batch) = setup();
    let hook = HookPoint::parse("blocks.1.hook_resid_pre", model.cfg()).unwrap();
    let clean = capture(&model, &batch, hook);
    let sae = sae128();
    let (_, recon) = sae.forward(&clean).unwrap();

    let mut splice = Interventions::new();
    splice
        .add(
            model.cfg(),
            hook,
            None,
            Intervention::Sae {
                sae: &sae,
                use_error_term: false,
            },
        )
        .unwrap();
    let mut cap = Capture::new(vec![hook]);
    let mut ws = Workspace::new();
    model
        .run(&mut ws, &batch, None, &mut Both(&mut splice, &mut cap))
        .unwrap();
    assert_eq!(
        cap.get(&hook).unwrap().to_vec(),
        recon.to_vec(),
        "the hook carries sae(x)"
    );
    let spliced = ws.logits.take().unwrap().to_vec();
    model.run(&mut ws, &batch, None, &mut NoHooks).unwrap();
    let plain = ws.logits.take().unwrap().to_vec();
    assert!(
        max_abs_diff(&spliced, &plain, "logits") > 1e-3,
        "the splice reached the logits"
    );
}

#[test]
fn error_term_gives_back_the_clean_model() {
    let (model, batch) = setup();
    let hook = HookPoint::parse("blocks.1.hook_resid_pre", model.cfg()).unwrap();
    let sae = sae128();
    let mut splice = Interventions::new();
    splice
        .add(
            model.cfg(),
            hook,
            None,
            Intervention::Sae {
                sae: &sae,
                use_error_term: true,
            },
        )
        .unwrap();
    let mut ws = Workspace::new();
    model.run(&mut ws, &batch, None, &mut splice).unwrap();
    let with = ws.logits.take().unwrap().to_vec();
    model.run(&mut ws, &batch, None, &mut NoHooks).unwrap();
    let clean = ws.logits.take().unwrap().to_vec();
    // sae(x) + (x - sae(x)) rounds back to x within a few ulps of |x| ~ 1.
    let diff = max_abs_diff(&with, &clean, "logits");
    assert!(diff <= 1e-5, "error term: logits differ by {diff}");
}

#[test]
fn zero_ablation_flows_on_through_the_block() {
    let (model, batch) = setup();
    let names = [
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_attn_out",
        "blocks.1.hook_mlp_out",
        "blocks.1.hook_resid_post",
    ];
    let hooks = model.hooks(&names).unwrap();
    let mut ablate = Interventions::new();
    ablate
        .add(model.cfg(), hooks[0], None, Intervention::ZeroAblate)
        .unwrap();
    let mut cap = Capture::new(hooks.clone());
    model
        .run(
            &mut Workspace::new(),
            &batch,
            None,
            &mut Both(&mut ablate, &mut cap),
        )
        .unwrap();
    let get = |i: usize| cap.get(&hooks[i]).unwrap().to_vec();
    assert!(get(0).iter().all(|&v| v == 0.0));
    // resid_post = (0 + attn_out) + mlp_out, exactly.
    let want: Vec<f32> = get(1)
        .iter()
        .zip(get(2))
        .map(|(a, m)| (0.0 + a) + m)
        .collect();
    assert_eq!(get(3), want);
}

#[test]
fn head_index_splices_one_head_and_rows_can_be_left_alone() {
    let (model, batch) = setup();
    let z = HookPoint::parse("blocks.1.attn.hook_z", model.cfg()).unwrap();
    let clean = capture(&model, &batch, z);
    let mut cfg = schemas::SaeConfig::new(schemas::Architecture::Standard, 32, 48);
    cfg.metadata
        .insert("hook_name".into(), "blocks.1.attn.hook_z".into());
    let sae = Sae::new(cfg, &Device::Cpu, 3).unwrap();
    let head = 2;
    let mut x = Tensor::zeros(&Device::Cpu, &[clean.rows(), 32]);
    ops::copy_cols(&clean, head * 32, &mut x);
    let (_, recon) = sae.forward(&x).unwrap();

    // Splice every row except those of the first sequence.
    let rows: Vec<bool> = (0..batch.rows()).map(|r| r >= 128).collect();
    let mut splice = Interventions::new();
    splice
        .add(
            model.cfg(),
            z,
            Some(head),
            Intervention::Sae {
                sae: &sae,
                use_error_term: false,
            },
        )
        .unwrap();
    splice.sae_rows = Some(rows.clone());
    let mut cap = Capture::new(vec![z]);
    model
        .run(
            &mut Workspace::new(),
            &batch,
            None,
            &mut Both(&mut splice, &mut cap),
        )
        .unwrap();
    let got = cap.get(&z).unwrap().to_vec();
    let (clean, recon) = (clean.to_vec(), recon.to_vec());
    for r in 0..batch.rows() {
        for c in 0..128 {
            let want = if rows[r] && (64..96).contains(&c) {
                recon[r * 32 + c - 64]
            } else {
                clean[r * 128 + c]
            };
            assert_eq!(got[r * 128 + c], want, "row {r}, column {c}");
        }
    }
    // An SAE of the wrong width is refused up front.
    let e = Interventions::new()
        .add(
            model.cfg(),
            z,
            None,
            Intervention::Sae {
                sae: &sae,
                use_error_term: false,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("d_in = 32") && e.contains("width 128"), "{e}");
}

#[test]
fn two_saes_at_two_hooks_in_one_pass() {
    let (model, batch) = setup();
    let hooks = model
        .hooks(&["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"])
        .unwrap();
    let sae = sae128();
    let topk = sae::io::load(&fixtures().join("saes_inference/topk"), &Device::Cpu).unwrap();
    let mut splice = Interventions::new();
    splice
        .add(
            model.cfg(),
            hooks[0],
            None,
            Intervention::Sae {
                sae: &sae,
                use_error_term: false,
            },
        )
        .unwrap();
    splice
        .add(
            model.cfg(),
            hooks[1],
            None,
            Intervention::Sae {
                sae: &topk,
                use_error_term: false,
            },
        )
        .unwrap();
    let mut before = Capture::new(hooks.clone());
    let mut after = Capture::new(hooks.clone());
    // Capture, splice, capture again at each hook: the second SAE reads the stream the
    // first one changed.
    let mut first = Both(&mut before, &mut splice);
    model
        .run(
            &mut Workspace::new(),
            &batch,
            None,
            &mut Both(&mut first, &mut after),
        )
        .unwrap();
    for (i, s) in [&sae, &topk].iter().enumerate() {
        let x = before.get(&hooks[i]).unwrap();
        let (_, recon) = s.forward(x).unwrap();
        assert_eq!(
            after.get(&hooks[i]).unwrap().to_vec(),
            recon.to_vec(),
            "hook {i}"
        );
    }
    let clean = capture(&model, &batch, hooks[1]);
    assert!(
        max_abs_diff(
            &before.get(&hooks[1]).unwrap().to_vec(),
            &clean.to_vec(),
            "x1"
        ) > 1e-3
    );
}
