"""Python side of `tokenizer bench`: HF `tokenizers` `encode_batch` over the same corpus
with the same tokenizer.json (tokenize only; SAELens's packing loop in Python is slower
still), with 1 and 2 threads (RAYON_RS_NUM_THREADS). For one thread, pin both sides to one core
(`taskset -c 0`): unpinned, HF's "1 thread" measured faster than one core can be.

    RAYON_RS_NUM_THREADS=1 taskset -c 0 python benches/tokenize_hf.py tests/fixtures/pretok/corpus.jsonl tests/fixtures/tiny-gpt2/tokenizer.json
    taskset -c 0 tokenizer bench --dataset tests/fixtures/pretok/corpus.jsonl --tokenizer tests/fixtures/tiny-gpt2 --threads 1
"""

import json
import os
import sys
import time

from tokenizers import Tokenizer


def main(corpus: str, tokenizer: str, repeats: int = 7) -> None:
    texts = [json.loads(line)["text"] for line in open(corpus)]
    tok = Tokenizer.from_file(tokenizer)
    times, n = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        enc = tok.encode_batch(texts)
        times.append(time.perf_counter() - t)
        n = sum(len(e.ids) for e in enc)
    med = sorted(times)[len(times) // 2]
    print(json.dumps({"threads": os.environ.get("RAYON_RS_NUM_THREADS", "all"), "document_tokens": n,
                      "seconds_median": med, "tokens_per_second": n / med}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
