"""Every token-option combination of SAELens's packing on a small set of token lists.

Run with SAELens 6.54.12 installed:  python tests/tokenizer/make_pack_combos.py
Writes tests/fixtures/pretok/pack_combos.json: the documents and, for each combination
of begin_batch / begin_sequence / separator token (none, 100 = the "bos", 7 = a token
that also occurs in the data), disable_concat_sequences and context_size, the windows
that sae_lens.tokenization_and_batching.concat_and_batch_sequences yields.
"""
import itertools
import json
import random
from pathlib import Path

import sae_lens
import torch
from sae_lens.tokenization_and_batching import concat_and_batch_sequences

rng = random.Random(0)
docs = []
for i in range(14):
    n = [0, 1, 3, 9, 17, 40][i % 6] + rng.randrange(3)
    d = [rng.randrange(1, 50) for _ in range(n)]
    if i % 4 == 1 and d:
        d[0] = 100  # starts with the "bos"
    if i % 5 == 2 and d:
        d[0] = 7  # starts with the other special token
    docs.append(d)

CAP = 1000  # far more windows than the documents can fill
cases = []
options = [None, 100, 7]
for bb, bs, sep, disable, ctx in itertools.product(
    options, options, options, [False, True], [1, 2, 5, 16]
):
    windows = itertools.islice(concat_and_batch_sequences(
        (torch.tensor(d, dtype=torch.long) for d in docs),
        context_size=ctx,
        begin_batch_token_id=bb,
        begin_sequence_token_id=bs,
        sequence_separator_token_id=sep,
        disable_concat_sequences=disable,
    ), CAP + 1)
    windows = [w.tolist() for w in windows]
    if len(windows) > CAP:
        # SAELens never finishes here (a prefix that cannot fit repeats forever).
        windows = "endless"
    cases.append(
        {
            "begin_batch_token": bb,
            "begin_sequence_token": bs,
            "sequence_separator_token": sep,
            "disable_concat_sequences": disable,
            "context_size": ctx,
            "windows": windows,
        }
    )

out = Path(__file__).resolve().parents[1] / "fixtures/pretok/pack_combos.json"
out.write_text(
    json.dumps(
        {"sae_lens_version": sae_lens.__version__, "documents": docs, "cases": cases},
        separators=(",", ":"),
    )
)
print(out, len(cases), "cases", sum(len(c["windows"]) for c in cases), "windows")
