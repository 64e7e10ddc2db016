"""A local HF checkpoint as SAELens runs it (TransformerLens `from_pretrained_no_processing`
semantics, no hub access): shared by the by-hand SAELens scripts."""

from pathlib import Path


def load_local_model(path: Path):
    import torch
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import (
        get_pretrained_model_config, get_pretrained_state_dict)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(path)
    cfg = get_pretrained_model_config(path, fold_ln=False, device="cpu", dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(path))
    model.load_and_process_state_dict(
        get_pretrained_state_dict(path, cfg, hf_model=hf, dtype=torch.float32),
        fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False)
    return model.eval()
