"""Writes examples/data/tiny-gpt2.blocks.1.hook_resid_pre.safetensors: real residual-stream
activations for the offline training example.

The fixture model (tests' shared fixtures: `models/tiny-gpt2`, a random 2-layer GPT-2)
is run by HF transformers on the first 160 rows of SAELens's pretokenization of the
fixture corpus (`pretok/tokens_all.npy`, context 128). `hidden_states[1]` is the
residual stream after block 0, which is TransformerLens's `blocks.1.hook_resid_pre`
(the fixture README: TransformerLens without processing equals HF here). Stored as
float16, `[20480, 128]`.

    /tmp/slenv/bin/python examples/data/make_tiny_acts.py ../shared/fixtures
"""

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel

fixtures = Path(sys.argv[1])
model = GPT2LMHeadModel.from_pretrained(fixtures / "models" / "tiny-gpt2").eval()
tokens = torch.from_numpy(np.load(fixtures / "pretok" / "tokens_all.npy")[:160])
with torch.no_grad():
    hidden = model(tokens, output_hidden_states=True).hidden_states[1]
acts = hidden.reshape(-1, hidden.shape[-1]).to(torch.float16).contiguous()
out = Path(__file__).with_name("tiny-gpt2.blocks.1.hook_resid_pre.safetensors")
save_file({"blocks.1.hook_resid_pre": acts}, out)
print(out, tuple(acts.shape))
