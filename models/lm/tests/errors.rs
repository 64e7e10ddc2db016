//! Bad input gets an error that names what is wrong and what was expected.

mod common;

use common::*;
use kernels::Device;
use lm::{HookPoint, HookedTransformer, Intervention, Interventions, TokenBatch};
use std::path::Path;

fn err_of<T>(r: lm::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_hook_lists_the_valid_ones() {
    let model = load(&fixtures().join("tiny-gpt2"));
    let e = err_of(HookPoint::parse("blocks.0.hook_resid_mdi", model.cfg()));
    assert!(e.contains("unknown hook 'blocks.0.hook_resid_mdi'"), "{e}");
    assert!(
        e.contains("hook_pos_embed")
            && e.contains("blocks.1.mlp.hook_post")
            && e.contains("ln_final.hook_normalized"),
        "{e}"
    );
    // GPT-2 has no rotary or gated-MLP hooks.
    assert!(
        !e.contains("hook_rot_q") && !e.contains("hook_pre_linear"),
        "{e}"
    );
    // A parallel GPT-NeoX block has no resid_mid; a rotary model no hook_pos_embed.
    let neox = load(&fixtures().join("lm/neox-parallel-bf16"));
    let e = err_of(HookPoint::parse("blocks.0.hook_resid_mid", neox.cfg()));
    assert!(
        e.contains("valid hooks are: hook_embed, blocks.0.hook_resid_pre"),
        "{e}"
    );
    assert!(err_of(HookPoint::parse("hook_pos_embed", neox.cfg())).contains("unknown hook"));
    // Every listed name parses back to itself.
    for name in lm::hooks::valid_names(neox.cfg()) {
        assert_eq!(
            HookPoint::parse(&name, neox.cfg()).unwrap().to_string(),
            name
        );
    }
}

#[test]
fn layer_and_head_out_of_range() {
    let model = load(&fixtures().join("tiny-gpt2"));
    let e = err_of(HookPoint::parse("blocks.2.hook_resid_pre", model.cfg()));
    assert!(
        e.contains("layer 2 is out of range") && e.contains("2 layers"),
        "{e}"
    );
    let z = HookPoint::parse("blocks.0.attn.hook_z", model.cfg()).unwrap();
    let e = err_of(Interventions::new().add(model.cfg(), z, Some(4), Intervention::ZeroAblate));
    assert!(
        e.contains("hook_head_index 4") && e.contains("4 heads"),
        "{e}"
    );
    let resid = HookPoint::parse("blocks.0.hook_resid_pre", model.cfg()).unwrap();
    let e = err_of(Interventions::new().add(model.cfg(), resid, Some(0), Intervention::ZeroAblate));
    assert!(e.contains("no head dimension"), "{e}");
    // GQA: k has 2 heads, q has 4.
    let gqa = load(&fixtures().join("lm/swiglu-gqa"));
    let k = HookPoint::parse("blocks.0.attn.hook_k", gqa.cfg()).unwrap();
    assert!(Interventions::new()
        .add(gqa.cfg(), k, Some(1), Intervention::ZeroAblate)
        .is_ok());
    let e = err_of(Interventions::new().add(gqa.cfg(), k, Some(2), Intervention::ZeroAblate));
    assert!(e.contains("2 heads"), "{e}");
}

#[test]
fn tokens_out_of_vocab_and_context_too_long() {
    let model = load(&fixtures().join("tiny-gpt2"));
    let mut ids = vec![1i64; 2 * 8];
    ids[11] = 4096;
    let e = err_of(TokenBatch::new(&ids, 2, 8, model.cfg()));
    assert!(
        e.contains("token id 4096 at sequence 1, position 3") && e.contains("4096 ids"),
        "{e}"
    );
    ids[11] = -1;
    assert!(err_of(TokenBatch::new(&ids, 2, 8, model.cfg())).contains("token id -1"));
    let long = vec![0i64; 257];
    let e = err_of(TokenBatch::new(&long, 1, 257, model.cfg()));
    assert!(
        e.contains("257 positions is longer than the model's 256"),
        "{e}"
    );
    assert!(TokenBatch::new(&long[..256], 1, 256, model.cfg()).is_ok());
}

/// Copies the tiny GPT-2 into a temporary directory, letting `edit` change its
/// config and tensor list.
fn edited_gpt2(
    edit_cfg: impl Fn(&mut serde_json::Value),
    keep: impl Fn(&str) -> bool,
) -> tempfile::TempDir {
    let src = fixtures().join("tiny-gpt2");
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit_cfg(&mut cfg);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st.tensors().into_iter().filter(|(n, _)| keep(n)).collect();
    safetensors::serialize_to_file(kept, None, &tmp.path().join("model.safetensors")).unwrap();
    tmp
}

fn load_err(dir: &Path) -> String {
    err_of(HookedTransformer::load(dir, &Device::Cpu))
}

#[test]
fn missing_weight_names_it() {
    let tmp = edited_gpt2(|_| {}, |n| n != "transformer.h.1.mlp.c_fc.bias");
    let e = load_err(tmp.path());
    assert!(
        e.contains("weight 'transformer.h.1.mlp.c_fc.bias' is missing"),
        "{e}"
    );
    let empty = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("tiny-gpt2/config.json"),
        empty.path().join("config.json"),
    )
    .unwrap();
    assert!(load_err(empty.path()).contains("no model.safetensors"));
}

#[test]
fn shape_mismatch_names_the_weight_and_both_shapes() {
    let tmp = edited_gpt2(|c| c["vocab_size"] = 4000.into(), |_| true);
    let e = load_err(tmp.path());
    assert!(
        e.contains("'transformer.wte.weight' has shape [4096, 128], expected [4000, 128]"),
        "{e}"
    );
}

#[test]
fn unsupported_configs_are_refused() {
    let tmp = edited_gpt2(|c| c["model_type"] = "bert".into(), |_| true);
    let e = load_err(tmp.path());
    assert!(
        e.contains("model_type 'bert' is not supported") && e.contains("gpt_neox"),
        "{e}"
    );
    let tmp = edited_gpt2(|c| c["activation_function"] = "quick_gelu".into(), |_| true);
    assert!(load_err(tmp.path()).contains("'activation_function' = 'quick_gelu' is not supported"));
    let tmp = edited_gpt2(
        |c| {
            c.as_object_mut().unwrap().remove("n_embd");
        },
        |_| true,
    );
    assert!(load_err(tmp.path()).contains("field 'n_embd' is missing"));

    let dir = fixtures().join("lm/swiglu-gqa");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["rope_parameters"]["rope_type"] = "llama3".into();
    let e = err_of(lm::LmConfig::from_json(&cfg, &dir.join("config.json")));
    assert!(e.contains("rope_type 'llama3' is not supported"), "{e}");
}

#[test]
fn a_cuda_device_is_refused_before_anything_is_read() {
    // The transformer has no CUDA form yet; the message says so and names the device
    // (no device is touched: the check comes first).
    let e = err_of(HookedTransformer::load(
        &fixtures().join("tiny-gpt2"),
        &Device::Cuda(1),
    ));
    assert!(e.contains("CPU only") && e.contains("cuda:1"), "{e}");
}
