"""Writes tests/fixtures/lm/: small random HF checkpoints of the model families the hooked
transformer supports, and TransformerLens's activations on them, for parity tests.

For each model: an HF model is built from a small config with `torch.manual_seed`, its
layer-norm weights and biases perturbed (so that they matter), saved with
`save_pretrained` (safetensors; one of them sharded, one in bfloat16), reloaded in float32,
converted by TransformerLens 3.9's own functions (`get_pretrained_model_config` on the
local directory, `get_pretrained_state_dict`, then `load_and_process_state_dict` with
every processing flag off, which is what `from_pretrained_no_processing` does), and run
with `run_with_cache` on fixed tokens. `reference.safetensors` holds the tokens, every
cached hook listed below in TransformerLens's shape, TL's logits, and HF's logits.

    /tmp/slenv/bin/python tests/lm/make_lm_fixtures.py ../shared/fixtures [MODEL ...]

With MODEL names (of `new_families`), only those are written and info.json keeps the rest;
with `hf_hooks`, only the `hf_hooks.safetensors` files (HF module outputs, by forward hooks).
TransformerLens knows Gemma only by hub name, so for Gemma its config is built here from
the same settings its `convert_hf_model_config` gives google/gemma-2-* and gemma-3-*.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformer_lens import HookedTransformer
from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict
from transformer_lens.config.hooked_transformer_config import HookedTransformerConfig
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
)

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "lm"
HOOK_SUFFIXES = [
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_attn_scores",
    "attn.hook_pattern", "mlp.hook_pre", "mlp.hook_post", "ln1.hook_normalized",
    "ln2.hook_normalized", "mlp.hook_pre_linear", "attn.hook_rot_q", "attn.hook_rot_k",
    "ln1_post.hook_normalized", "ln2_post.hook_normalized", "attn.q_norm.hook_normalized",
    "attn.k_norm.hook_normalized",
]


def perturb_norms(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or ".ln" in name:
                p.add_(0.1 * torch.randn_like(p))


def reference(path: Path, tokens: torch.Tensor, cfg=None, hf_class=AutoModelForCausalLM) -> dict[str, torch.Tensor]:
    """`cfg`: a TransformerLens config built by hand, for the families TL only knows by
    hub name (Gemma); otherwise TL reads the directory's config.json itself."""
    if cfg is None:
        cfg = get_pretrained_model_config(str(path), fold_ln=False, device="cpu", dtype=torch.float32)
    hf = hf_class.from_pretrained(path, dtype=torch.float32).eval()
    sd = get_pretrained_state_dict(str(path), cfg, hf_model=hf, dtype=torch.float32)
    cfg.tokenizer_name = None  # no tokenizer files here; the tokens are given
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(
        sd, fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    tl.eval()
    with torch.no_grad():
        logits, cache = tl.run_with_cache(tokens)
        hf_logits = hf(tokens).logits
    out = {"tokens": tokens.to(torch.int64), "logits": logits, "hf_logits": hf_logits}
    for name in ["hook_embed", "hook_pos_embed", "ln_final.hook_normalized"]:
        if name in cache:
            out[name] = cache[name]
    for layer in range(cfg.n_layers):
        for s in HOOK_SUFFIXES:
            name = f"blocks.{layer}.{s}"
            if name in cache:
                out[name] = cache[name]
    return {k: v.clone().contiguous() for k, v in out.items()}


def gemma_tl_config(hf_cfg, architecture: str) -> HookedTransformerConfig:
    """TransformerLens's Gemma 2/3 settings (its `convert_hf_model_config` entries for
    google/gemma-2-* and google/gemma-3-*) with this small model's sizes."""
    t = getattr(hf_cfg, "text_config", hf_cfg)
    types = ["local" if lt == "sliding_attention" else "global" for lt in t.layer_types]
    rope = t.rope_parameters
    per_type = "full_attention" in rope
    glob = rope["full_attention"] if per_type else rope
    d = dict(
        d_model=t.hidden_size, d_head=t.head_dim, n_heads=t.num_attention_heads,
        n_key_value_heads=t.num_key_value_heads, d_mlp=t.intermediate_size,
        n_layers=t.num_hidden_layers, n_ctx=t.max_position_embeddings, eps=t.rms_norm_eps,
        d_vocab=t.vocab_size, act_fn=t.hidden_activation, normalization_type="RMS",
        positional_embedding_type="rotary", rotary_base=glob["rope_theta"],
        use_attn_scale=True, attn_scale=float(t.query_pre_attn_scalar) ** 0.5,
        window_size=t.sliding_window, use_local_attn=True, attn_types=types,
        gated_mlp=True, final_rms=True, use_normalization_before_and_after=True,
        original_architecture=architecture, device="cpu", dtype=torch.float32,
    )
    if t.attn_logit_softcapping:
        d["attn_scores_soft_cap"] = t.attn_logit_softcapping
    if t.final_logit_softcapping:
        d["output_logits_soft_cap"] = t.final_logit_softcapping
    if architecture != "Gemma2ForCausalLM":
        d["use_qk_norm"] = True
        d["rotary_base_local"] = rope["sliding_attention"]["rope_theta"]
        if glob.get("rope_type") == "linear":
            d["rotary_scaling_factor"] = glob["factor"]
    return HookedTransformerConfig(**d)


def new_families() -> dict:
    """Gemma 2, Gemma 3 (text and multimodal) and Qwen3 with every feature switched on:
    sliding windows shorter than the 12-token context, soft-capping that bites
    (init scale 0.2, small caps), grouped-query attention, head_dim != d_model / n_heads,
    query_pre_attn_scalar != head_dim, per-layer RoPE bases and linear scaling."""
    models = {}
    torch.manual_seed(5)
    g2 = Gemma2Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
        rms_norm_eps=1e-6, query_pre_attn_scalar=24, sliding_window=4, attn_logit_softcapping=2.0,
        final_logit_softcapping=1.5, initializer_range=0.2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    models["gemma2-softcap-window"] = (Gemma2ForCausalLM(g2), {}, "Gemma2ForCausalLM", Gemma2ForCausalLM)

    text = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
        rms_norm_eps=1e-6, query_pre_attn_scalar=24, sliding_window=5, initializer_range=0.2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    torch.manual_seed(6)
    models["gemma3-text-bf16"] = (Gemma3ForCausalLM(Gemma3TextConfig(**text)), dict(dtype=torch.bfloat16),
                                  "Gemma3ForCausalLM", Gemma3ForCausalLM)
    torch.manual_seed(7)
    mm = Gemma3Config(
        text_config=Gemma3TextConfig(**text),
        vision_config=SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=300, eoi_token_index=301, image_token_index=302,
    )
    models["gemma3-multimodal"] = (Gemma3ForConditionalGeneration(mm), {}, "Gemma3ForConditionalGeneration",
                                   Gemma3ForConditionalGeneration)

    torch.manual_seed(8)
    q3 = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=96, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        hidden_act="silu", tie_word_embeddings=True, attention_bias=False,
    ))
    models["qwen3-qknorm-bf16"] = (q3, dict(dtype=torch.bfloat16), None, AutoModelForCausalLM)
    return models


def write_model(name, model, save_kwargs, tokens, info, tl_arch=None, hf_class=AutoModelForCausalLM):
    perturb_norms(model)
    path = OUT / name
    dtype = save_kwargs.pop("dtype", None)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    cfg = None
    if tl_arch is not None:
        cfg = gemma_tl_config(hf_class.config_class.from_pretrained(path), tl_arch)
    ref = reference(path, tokens, cfg, hf_class)
    save_file(ref, path / "reference.safetensors")
    info["models"][name] = {
        "config": json.loads((path / "config.json").read_text()),
        "files": sorted(p.name for p in path.iterdir()),
        "tl_vs_hf_logits_max_abs": (ref["logits"] - ref["hf_logits"]).abs().max().item(),
        "hooks": sorted(k for k in ref if k.startswith(("blocks", "hook", "ln_final"))),
    }
    print(name, info["models"][name]["files"], info["models"][name]["tl_vs_hf_logits_max_abs"])


# Hugging Face module paths and whether their output or input is taken, per family
# (the layer index goes between prefix and module): what `hf_hooks.safetensors`
# records, straight from the HF model's forward hooks.
HF_MODULES = {
    "gpt2": ("transformer.h.", ["", ".input", ".attn", ".attn.c_proj.input", ".mlp", ".mlp.c_proj.input"]),
    "gpt_neox": ("gpt_neox.layers.", ["", ".input", ".attention", ".attention.dense.input", ".mlp",
                                      ".mlp.dense_4h_to_h.input"]),
    "llama": ("model.layers.", ["", ".input", ".self_attn", ".self_attn.o_proj.input", ".mlp",
                                ".mlp.down_proj.input"]),
    "gemma": ("model.layers.", ["", ".input", ".post_attention_layernorm", ".self_attn.o_proj.input",
                                ".post_feedforward_layernorm", ".mlp.down_proj.input"]),
}


def hf_module_outputs(path: Path, tokens: torch.Tensor, family: str, hf_class=AutoModelForCausalLM,
                      prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Every HF_MODULES entry of every layer, captured by forward hooks on the HF model
    itself, flattened to [batch*pos, width]."""
    hf = hf_class.from_pretrained(path, dtype=torch.float32).eval()
    default_prefix, modules = HF_MODULES[family]
    prefix = prefix or default_prefix
    out, handles = {}, []
    n_layers = getattr(getattr(hf.config, "text_config", hf.config), "num_hidden_layers", None) or hf.config.n_layer
    for layer in range(n_layers):
        for m in modules:
            name = f"{prefix}{layer}{m}"
            want_input = m.endswith(".input")
            module = hf.get_submodule(name.removesuffix(".input").removesuffix(".output"))

            def grab(mod, args, output, name=name, want_input=want_input):
                t = args[0] if want_input else (output[0] if isinstance(output, tuple) else output)
                out[name] = t.detach().reshape(-1, t.shape[-1]).clone().contiguous()
            handles.append(module.register_forward_hook(grab))
    with torch.no_grad():
        hf(tokens)
    for h in handles:
        h.remove()
    return out


HF_HOOK_MODELS = {
    # directory under lm/, model directory, family, HF class, module prefix
    "gpt2-all-hooks": ("../../tiny-gpt2", "gpt2", GPT2LMHeadModel, None),
    "neox-sequential": (None, "gpt_neox", AutoModelForCausalLM, None),
    "swiglu-gqa": (None, "llama", AutoModelForCausalLM, None),
    "qwen3-qknorm-bf16": (None, "llama", AutoModelForCausalLM, None),
    "gemma2-softcap-window": (None, "gemma", Gemma2ForCausalLM, None),
    "gemma3-multimodal": (None, "gemma", Gemma3ForConditionalGeneration, "model.language_model.layers."),
}


def write_hf_hooks() -> None:
    """`hf_hooks.safetensors` beside each listed model's reference: the tokens of its
    reference and the HF module outputs on them."""
    for name, (model_dir, family, cls, prefix) in HF_HOOK_MODELS.items():
        ref_dir = OUT / name
        tokens = safe_open_tokens(ref_dir / "reference.safetensors")
        model_path = (ref_dir / model_dir).resolve() if model_dir else ref_dir
        outs = hf_module_outputs(model_path, tokens, family, cls, prefix)
        save_file(outs, ref_dir / "hf_hooks.safetensors")
        print(name, len(outs), "HF module outputs")


def safe_open_tokens(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file
    return load_file(path)["tokens"]


def main(shared: Path, only: list[str]) -> None:
    """`only`: write just these models (and keep the others' entries in info.json)."""
    if only == ["hf_hooks"]:
        write_hf_hooks()
        return
    if only:
        torch.manual_seed(0)
        tokens = torch.randint(0, 256, (2, 12))
        info = json.loads((OUT / "info.json").read_text())
        for name, (model, kw, arch, cls) in new_families().items():
            if name in only:
                write_model(name, model, kw, tokens, info, arch, cls)
        (OUT / "info.json").write_text(json.dumps(info, indent=1))
        return

    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (2, 12))
    models = {}

    torch.manual_seed(1)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, rotary_pct=0.25, rotary_emb_base=10000,
        layer_norm_eps=1e-5, hidden_act="gelu", use_parallel_residual=True, tie_word_embeddings=False,
    ))
    models["neox-parallel-bf16"] = (neox, dict(dtype=torch.bfloat16))

    torch.manual_seed(2)
    neox_seq = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, rotary_pct=0.5, rotary_emb_base=10000,
        layer_norm_eps=1e-5, hidden_act="gelu", use_parallel_residual=False, tie_word_embeddings=False,
    ))
    models["neox-sequential"] = (neox_seq, {})

    torch.manual_seed(3)
    rope = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
    ))
    models["swiglu-gqa"] = (rope, {})

    torch.manual_seed(4)
    qwen = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=True,
    ))
    models["qwen2-tied-sharded"] = (qwen, dict(max_shard_size="150KB"))

    info = {"tokens": tokens.tolist(), "models": {}}
    for name, (model, save_kwargs) in models.items():
        write_model(name, model, save_kwargs, tokens, info)
    for name, (model, kw, arch, cls) in new_families().items():
        write_model(name, model, kw, tokens, info, arch, cls)

    # GPT-2: every hook of the shared fixture model on its first two token rows
    import numpy as np
    gpt2 = shared / "models" / "tiny-gpt2"
    rows = torch.from_numpy(np.load(shared / "pretok" / "tokens.npy")[:2, :16])
    ref = reference(gpt2, rows)
    (OUT / "gpt2-all-hooks").mkdir(exist_ok=True)
    save_file(ref, OUT / "gpt2-all-hooks" / "reference.safetensors")
    info["models"]["gpt2-all-hooks"] = {"model": "shared fixtures models/tiny-gpt2", "tokens": "pretok/tokens.npy[:2, :16]",
                                         "tl_vs_hf_logits_max_abs": (ref["logits"] - ref["hf_logits"]).abs().max().item()}
    write_hf_hooks()
    info["provenance"] = "tests/lm/make_lm_fixtures.py; transformer_lens 3.9.0, transformers 5.24.0, torch 2.15.0 (CPU, float32)"
    (OUT / "info.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
