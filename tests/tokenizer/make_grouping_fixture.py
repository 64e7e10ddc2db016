"""SAELens's PretokenizeRunner with its default num_proc=4 and small map batches.

Run with SAELens 6.54.12 installed:  python tests/tokenizer/make_grouping_fixture.py
Packs the first 150 documents of tests/fixtures/pretok/corpus.jsonl with the fixture
tokenizer (tests/fixtures/tiny-gpt2), context_size 32, pretokenize_batch_size 10,
num_proc 4: `datasets.map` cuts the 150 documents into 4 contiguous shards (38, 38, 37,
37) and packs every batch of 10 documents of a shard on its own. Writes
tests/fixtures/pretok/tokens_np4_b10_c32.npy (int32 [n, 32]).
"""
import json
import tempfile
from pathlib import Path

import numpy as np
from sae_lens import PretokenizeRunner, PretokenizeRunnerConfig

fixtures = Path(__file__).resolve().parents[1] / "fixtures"
lines = (fixtures / "pretok/corpus.jsonl").read_text().splitlines()[:150]
with tempfile.TemporaryDirectory() as d:
    data = Path(d) / "first150.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = PretokenizeRunnerConfig(
        tokenizer_name=str(fixtures / "tiny-gpt2"),
        dataset_path="json",
        data_files=[str(data)],
        split="train",
        column_name="text",
        context_size=32,
        shuffle=False,
        pretokenize_batch_size=10,
        num_proc=4,
    )
    ds = PretokenizeRunner(cfg).run()
    tokens = np.array([row.tolist() for row in ds["input_ids"]], dtype=np.int32)
out = fixtures / "pretok/tokens_np4_b10_c32.npy"
np.save(out, tokens)
print(out, tokens.shape)
