"""Writes tests/fixtures/lm/evals/: SAELens's own `run_evals` numbers for three SAEs
spliced into the tiny GPT-2, the reference for `lm::evals`.

The model is the shared fixture `tiny-gpt2`, loaded as `make_lm_fixtures.py` loads it
(what `from_pretrained_no_processing` does), with its tokenizer attached so that SAELens
picks the special tokens to exclude itself (`get_special_token_ids`). Tokens: the shared
`pretok/tokens.npy` (8 x 128, BOS 4095 at each row start and between documents).
`run_evals` runs with `get_eval_everything_config(batch_size_prompts=4,
n_eval_reconstruction_batches=2, n_eval_sparsity_variance_batches=2)` and an identity
`ActivationScaler`; the store hands out the rows in order and restarts at row 0 when
SAELens resets it.

SAEs (each saved with SAELens's `save_model` into `<name>/`, `hook_name` in metadata):
* `standard-resid`: the shared `saes_inference/standard` at `blocks.1.hook_resid_pre`;
* `topk-z`: the shared `saes_inference/topk` at `blocks.0.attn.hook_z` (all heads, d_in 128);
* `standard-z-head2`: a fresh `StandardSAE` (d_in 32, d_sae 48, seed 7, biases perturbed)
  at `blocks.1.attn.hook_z`, `hook_head_index` 2.

    /tmp/slenv/bin/python tests/lm/make_eval_fixture.py ../shared/fixtures
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from sae_lens import SAE
from sae_lens.evals import get_eval_everything_config, run_evals
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.util import get_special_token_ids
from transformer_lens import HookedTransformer
from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "lm" / "evals"


class Store:
    """The two things `run_evals` asks of an ActivationsStore."""

    def __init__(self, tokens: torch.Tensor, batch: int):
        self.tokens, self.pos = tokens, 0
        self.context_size, self.store_batch_size_prompts = tokens.shape[1], batch

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        out = self.tokens[self.pos:self.pos + n]
        self.pos += n
        return out

    def reset_input_dataset(self) -> None:
        self.pos = 0


def load_model(path: Path) -> HookedTransformer:
    cfg = get_pretrained_model_config(str(path), fold_ln=False, device="cpu", dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sd = get_pretrained_state_dict(str(path), cfg, hf_model=hf, dtype=torch.float32)
    tl = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(path))
    tl.load_and_process_state_dict(
        sd, fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    return tl.eval()


def main(shared: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    model = load_model(shared / "models" / "tiny-gpt2")
    tokens = torch.from_numpy(np.load(shared / "pretok" / "tokens.npy"))
    special = sorted(get_special_token_ids(model.tokenizer))

    saes = {}
    for name, src, hook in [("standard-resid", "standard", "blocks.1.hook_resid_pre"),
                            ("topk-z", "topk", "blocks.0.attn.hook_z")]:
        sae = SAE.load_from_disk(shared / "saes_inference" / src)
        sae.cfg.metadata.hook_name = hook
        saes[name] = sae
    torch.manual_seed(7)
    head = StandardSAE(StandardSAEConfig(d_in=32, d_sae=48))
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    head.cfg.metadata.hook_name = "blocks.1.attn.hook_z"
    head.cfg.metadata.hook_head_index = 2
    saes["standard-z-head2"] = head

    info = {"special_token_ids": special, "tokens": "shared pretok/tokens.npy (8 x 128)",
            "eval_config": {"batch_size_prompts": 4, "n_eval_reconstruction_batches": 2,
                            "n_eval_sparsity_variance_batches": 2},
            "provenance": "tests/lm/make_eval_fixture.py; sae_lens 6.54.12, transformer_lens 3.9.0, torch 2.15.0 (CPU, float32)",
            "saes": {}}
    for name, sae in saes.items():
        sae.save_model(OUT / name)
        metrics, feature_metrics = run_evals(
            sae, Store(tokens, 4), model, ActivationScaler(),
            get_eval_everything_config(batch_size_prompts=4, n_eval_reconstruction_batches=2,
                                       n_eval_sparsity_variance_batches=2),
            exclude_special_tokens=True,
        )
        # NaN (0/0 for a latent that never fired) is written as null: JSON has no NaN.
        nan_to_none = lambda v: [None if x != x else x for x in v]  # noqa: E731
        out = {"metrics": metrics,
               "feature_density": nan_to_none(feature_metrics["feature_density"]),
               "consistent_activation_heuristic": nan_to_none(feature_metrics["consistent_activation_heuristic"])}
        (OUT / name / "evals.json").write_text(json.dumps(out, indent=1))
        info["saes"][name] = {"hook_name": sae.cfg.metadata.hook_name,
                              "hook_head_index": sae.cfg.metadata.hook_head_index,
                              "architecture": sae.cfg.architecture()}
        print(name, json.dumps(metrics, indent=1))
    (OUT / "info.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
