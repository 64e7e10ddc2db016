"""Random checkpoints shaped like public models, cut to a few layers, for
`activation-producer bench --model DIR` against `benches/lm_forward_torch.py` on the
same files. transformers' own random init (`torch.manual_seed(0)`), saved in float32.

    /tmp/slenv/bin/python benches/make_random_lm.py gemma-2-2b /tmp/gemma2-2b-4l --layers 4
    /tmp/slenv/bin/python benches/make_random_lm.py qwen3-0.6b /tmp/qwen3-06b-6l --layers 6
"""

import argparse

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

SHAPES = {
    # google/gemma-2-2b's config.json, but for the layer count
    "gemma-2-2b": lambda n: Gemma2ForCausalLM(Gemma2Config(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=n,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
        query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0)),
    # Qwen/Qwen3-0.6B's config.json, but for the layer count
    "qwen3-0.6b": lambda n: Qwen3ForCausalLM(Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=n,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True)),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args()
    torch.manual_seed(0)
    SHAPES[a.shape](a.layers).save_pretrained(a.out, safe_serialization=True)


if __name__ == "__main__":
    main()
