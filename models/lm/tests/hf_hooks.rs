//! Hugging Face hook names (`lm::hooks::HF_HOOKS`): each one, for each family, carries
//! what the HF model's own module carries there. The references are the HF modules'
//! outputs (or inputs) captured by forward hooks in transformers 5.24
//! (`tests/lm/make_lm_fixtures.py`, `hf_hooks.safetensors`). Tolerance 1e-4 absolute,
//! as for the TransformerLens parity.

mod common;

use common::*;
use lm::hooks::{HfFamily, HF_HOOKS};
use lm::{Capture, HookPoint, Intervention, Interventions, Workspace};

const TOL: f32 = 1e-4;

/// (reference directory under lm/, model directory, family, module prefix the HF model uses)
const MODELS: [(&str, &str, HfFamily, &str); 6] = [
    (
        "gpt2-all-hooks",
        "tiny-gpt2",
        HfFamily::Gpt2,
        "transformer.h.",
    ),
    (
        "neox-sequential",
        "lm/neox-sequential",
        HfFamily::GptNeox,
        "gpt_neox.layers.",
    ),
    (
        "swiglu-gqa",
        "lm/swiglu-gqa",
        HfFamily::Llama,
        "model.layers.",
    ),
    (
        "qwen3-qknorm-bf16",
        "lm/qwen3-qknorm-bf16",
        HfFamily::Llama,
        "model.layers.",
    ),
    (
        "gemma2-softcap-window",
        "lm/gemma2-softcap-window",
        HfFamily::Gemma,
        "model.layers.",
    ),
    (
        "gemma3-multimodal",
        "lm/gemma3-multimodal",
        HfFamily::Gemma,
        "model.language_model.layers.",
    ),
];

#[test]
fn every_hf_hook_name_carries_what_the_hf_module_carries() {
    let mut checked = 0;
    for (ref_dir, model_dir, family, prefix) in MODELS {
        let fx = fixtures();
        let model = load(&fx.join(model_dir));
        let r = reference(&fx.join("lm").join(ref_dir).join("reference.safetensors"));
        let hf = reference(&fx.join("lm").join(ref_dir).join("hf_hooks.safetensors"));
        let (shape, ids) = &r["tokens"];
        let batch = batch(&model, ids, shape);
        let rows: Vec<_> = HF_HOOKS.iter().filter(|(f, ..)| *f == family).collect();
        assert_eq!(rows.len(), 6, "{ref_dir}: six HF names per layer");
        for layer in 0..model.cfg().n_layers {
            for (_, module, kind) in &rows {
                let name = format!("{prefix}{layer}{module}");
                let hook = HookPoint::parse(&name, model.cfg()).unwrap();
                assert_eq!(hook, HookPoint::block(layer, *kind), "{name}");
                // `.output` is the same module output.
                if !module.ends_with(".input") {
                    let out = HookPoint::parse(&format!("{name}.output"), model.cfg()).unwrap();
                    assert_eq!(out, hook, "{name}.output");
                }
                let mut cap = Capture::new(vec![hook]);
                model
                    .run(&mut Workspace::new(), &batch, None, &mut cap)
                    .unwrap();
                let (_, want) = hf
                    .get(&name)
                    .unwrap_or_else(|| panic!("{ref_dir}: no HF capture of {name}"));
                let diff = max_abs_diff(&cap.get(&hook).unwrap().to_vec(), want, &name);
                assert!(
                    diff <= TOL,
                    "{ref_dir}: {name} (= {hook}): max |diff| {diff}"
                );
                checked += 1;
            }
        }
    }
    // 6 names × (2 + 2 + 2 + 2 + 3 + 3) layers
    assert_eq!(checked, 6 * 14);
}

#[test]
fn gemma3_multimodal_accepts_both_layer_prefixes() {
    let model = load(&fixtures().join("lm/gemma3-multimodal"));
    for p in [
        "model.layers.",
        "model.language_model.layers.",
        "language_model.model.layers.",
    ] {
        let h = HookPoint::parse(&format!("{p}2"), model.cfg()).unwrap();
        assert_eq!(h.to_string(), "blocks.2.hook_resid_post", "{p}");
    }
}

#[test]
fn hf_names_without_a_transformer_lens_hook_are_refused_by_name() {
    let gemma = load(&fixtures().join("lm/gemma2-softcap-window"));
    let e = HookPoint::parse("model.layers.1.self_attn", gemma.cfg())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'model.layers.1.self_attn'")
            && e.contains("before its post-norm")
            && e.contains("model.layers.1.post_attention_layernorm = blocks.1.hook_attn_out"),
        "{e}"
    );
    let e = HookPoint::parse("model.layers.7", gemma.cfg())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer 7 is out of range") && e.contains("3 layers"),
        "{e}"
    );
    let gpt2 = load(&fixtures().join("tiny-gpt2"));
    let e = HookPoint::parse("transformer.h.0.ln_1", gpt2.cfg())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no TransformerLens hook")
            && e.contains("transformer.h.0.attn = blocks.0.hook_attn_out"),
        "{e}"
    );
    // Another family's spelling is not this model's hook.
    assert!(HookPoint::parse("model.layers.0", gpt2.cfg()).is_err());
}

#[test]
fn an_sae_spliced_by_its_hf_hook_name_equals_the_transformer_lens_name() {
    // The 128-wide standard SAE of the shared fixtures at GPT-2's layer-1 residual
    // stream, named once the TransformerLens way and once the HF way.
    let fx = fixtures();
    let model = load(&fx.join("tiny-gpt2"));
    let sae = sae::io::load(&fx.join("saes_inference/standard"), &kernels::Device::Cpu).unwrap();
    let tokens = pipeline::read_tokens(&fx.join("acts/tokens.npy")).unwrap();
    let batch = lm::TokenBatch::new(&tokens.ids[..2 * 128], 2, 128, model.cfg()).unwrap();
    let run = |name: &str| {
        let hook = HookPoint::parse(name, model.cfg()).unwrap();
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
        let mut ws = Workspace::new();
        model.run(&mut ws, &batch, None, &mut splice).unwrap();
        ws.logits.unwrap().to_vec()
    };
    let tl = run("blocks.0.hook_resid_post");
    assert_eq!(run("transformer.h.0"), tl);
    assert_eq!(
        run("transformer.h.1.input"),
        tl,
        "layer 1's input is layer 0's output"
    );
}
