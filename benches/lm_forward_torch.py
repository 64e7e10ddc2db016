"""PyTorch side of `activation-producer bench`: the same random GPT-2 checkpoint, the same
batch shape, forward to stop_at_layer, on the CPU with the same thread count.

Times (1) TransformerLens 3.9's `run_with_cache(..., stop_at_layer, names_filter)`, which
is what SAELens runs to get training activations (model loaded without processing), and
(2) plain transformers `GPT2Model` truncated to the same number of blocks. For other
families (the random Gemma 2 / Qwen3 checkpoints of `benches/make_random_lm.py`, which
TransformerLens knows only by hub name) it times (2) alone: the model's decoder
truncated to `stop_at_layer` layers.

    activation-producer bench --model-out /tmp/gpt2-small-random
    /tmp/slenv/bin/python benches/lm_forward_torch.py /tmp/gpt2-small-random --threads 2
"""

import argparse
import json
import time

import torch
from transformer_lens import HookedTransformer
from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict
from transformers import AutoModelForCausalLM, GPT2LMHeadModel


def median_time(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--stop-at-layer", type=int, default=6)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    hf = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    tokens = torch.randint(0, hf.config.vocab_size, (a.batch, a.context_size))
    hook = f"blocks.{a.stop_at_layer - 1}.hook_resid_post"
    n_tok = a.batch * a.context_size
    out = {"threads": a.threads, "batch": [a.batch, a.context_size], "stop_at_layer": a.stop_at_layer,
           "torch": torch.__version__}

    if not isinstance(hf, GPT2LMHeadModel):
        body = hf.model
        body.layers = body.layers[: a.stop_at_layer]
        body.config.num_hidden_layers = a.stop_at_layer

        def run_body():
            with torch.no_grad():
                body(tokens)

        med, times = median_time(run_body, a.iters, a.warmup)
        out["model_type"] = hf.config.model_type
        out["transformers_decoder_truncated"] = {"seconds_per_batch_median": med, "all": times,
                                                 "tokens_per_second": n_tok / med}
        print(json.dumps(out))
        return

    cfg = get_pretrained_model_config(a.model, fold_ln=False, device="cpu", dtype=torch.float32)
    sd = get_pretrained_state_dict(a.model, cfg, hf_model=hf, dtype=torch.float32)
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(sd, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False, refactor_factored_attn_matrices=False)
    tl.eval()

    def run_tl():
        with torch.no_grad():
            tl.run_with_cache(tokens, stop_at_layer=a.stop_at_layer, names_filter=[hook])

    med, times = median_time(run_tl, a.iters, a.warmup)
    out["transformer_lens_run_with_cache"] = {"seconds_per_batch_median": med, "all": times,
                                              "tokens_per_second": n_tok / med}

    body = hf.transformer
    body.h = body.h[: a.stop_at_layer]

    def run_hf():
        with torch.no_grad():
            body(tokens)

    med, times = median_time(run_hf, a.iters, a.warmup)
    out["transformers_gpt2model_truncated"] = {"seconds_per_batch_median": med, "all": times,
                                               "tokens_per_second": n_tok / med}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
