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

    /tmp/slenv/bin/python tests/lm/make_lm_fixtures.py ../shared/fixtures
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformer_lens import HookedTransformer
from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict
from transformers import (
    AutoModelForCausalLM,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "lm"
HOOK_SUFFIXES = [
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_attn_scores",
    "attn.hook_pattern", "mlp.hook_pre", "mlp.hook_post", "ln1.hook_normalized",
    "ln2.hook_normalized", "mlp.hook_pre_linear", "attn.hook_rot_q", "attn.hook_rot_k",
]


def perturb_norms(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or ".ln" in name:
                p.add_(0.1 * torch.randn_like(p))


def reference(path: Path, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    cfg = get_pretrained_model_config(str(path), fold_ln=False, device="cpu", dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
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


def main(shared: Path) -> None:
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
        perturb_norms(model)
        path = OUT / name
        dtype = save_kwargs.pop("dtype", None)
        if dtype is not None:
            model = model.to(dtype)
        model.save_pretrained(path, safe_serialization=True, **save_kwargs)
        ref = reference(path, tokens)
        save_file(ref, path / "reference.safetensors")
        info["models"][name] = {
            "config": json.loads((path / "config.json").read_text()),
            "files": sorted(p.name for p in path.iterdir()),
            "tl_vs_hf_logits_max_abs": (ref["logits"] - ref["hf_logits"]).abs().max().item(),
            "hooks": sorted(k for k in ref if k.startswith(("blocks", "hook", "ln_final"))),
        }
        print(name, info["models"][name]["files"], info["models"][name]["tl_vs_hf_logits_max_abs"])

    # GPT-2: every hook of the shared fixture model on its first two token rows
    import numpy as np
    gpt2 = shared / "models" / "tiny-gpt2"
    rows = torch.from_numpy(np.load(shared / "pretok" / "tokens.npy")[:2, :16])
    ref = reference(gpt2, rows)
    (OUT / "gpt2-all-hooks").mkdir(exist_ok=True)
    save_file(ref, OUT / "gpt2-all-hooks" / "reference.safetensors")
    info["models"]["gpt2-all-hooks"] = {"model": "shared fixtures models/tiny-gpt2", "tokens": "pretok/tokens.npy[:2, :16]",
                                         "tl_vs_hf_logits_max_abs": (ref["logits"] - ref["hf_logits"]).abs().max().item()}
    info["provenance"] = "tests/lm/make_lm_fixtures.py; transformer_lens 3.9.0, transformers 5.24.0, torch 2.15.0 (CPU, float32)"
    (OUT / "info.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
