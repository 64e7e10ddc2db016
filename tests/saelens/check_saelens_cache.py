"""The activation cache both ways with SAELens's CacheActivationsRunner format.

Not part of `cargo test`. Run it by hand after `cargo build --workspace --bins`:

    python3 -m venv /tmp/slenv && /tmp/slenv/bin/pip install sae-lens==6.54.12
    HF_HUB_OFFLINE=1 /tmp/slenv/bin/python tests/saelens/check_saelens_cache.py $CARGO_TARGET_DIR/debug

1. ours -> SAELens: `activation-producer run --format saelens` writes a cache of the fixture
   tiny GPT-2 at `blocks.1.hook_resid_pre`; HF `datasets.load_from_disk` opens it with the
   features SAELens requires (`Array2D((context_size, d_in), float32)`, `token_ids`), and,
   when `sae_lens` is installed, SAELens's `ActivationsStore` with
   `use_cached_activations=True` serves batches from it whose rows are rows of the cache.
2. SAELens -> ours: when `sae_lens` is installed, SAELens's own `CacheActivationsRunner`
   writes a cache of the same tokens, and `pipeline copy CACHE -` reads every row of it
   (the cargo test `saelens_s_own_cache_reads_as_its_activations` checks the values of the
   committed fixture cache, `tests/fixtures/saelens_cache/`, written the same way).

With only `datasets` installed (no torch), step 1's first half runs and the rest is skipped,
saying so.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from datasets import load_from_disk

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
HOOK = "blocks.1.hook_resid_pre"


def main(bindir: Path) -> int:
    tmp = Path(tempfile.mkdtemp())
    ours = tmp / "ours"
    tokens = FIXTURES / "saelens_cache" / "tokens.npy"
    subprocess.run(
        [str(bindir / "activation-producer"), "run", "--tokens", str(tokens), "--model",
         str(FIXTURES / "tiny-gpt2"), "--hooks", HOOK, "--store-batch-size-prompts", "4",
         "--output", str(ours), "--format", "saelens", "--shard-bytes", "700KiB"],
        check=True, stdout=subprocess.DEVNULL)
    ds = load_from_disk(str(ours))
    feat = ds.features[HOOK]
    assert type(feat).__name__ == "Array2D" and tuple(feat.shape) == (128, 128), feat
    assert feat.dtype == "float32", feat
    assert len(ds) == 32, len(ds)
    acts = np.asarray(ds.with_format("numpy")[HOOK])
    ref = np.load(FIXTURES / "saelens_cache" / "tl_acts_first8.npy")
    err = float(np.abs(acts[:8] - ref).max())
    assert err < 1e-5, err
    toks = np.asarray(ds.with_format("numpy")["token_ids"])
    assert (toks == np.load(tokens)).all()
    print(f"datasets.load_from_disk reads our cache: 32 rows, max |ours - TransformerLens| = {err:.2e}")

    try:
        import torch  # noqa: F401
        import sae_lens  # noqa: F401
    except ImportError:
        print("sae_lens (and torch) not installed: SAELens's own loading and writing skipped")
        return 0

    from sae_lens import (CacheActivationsRunner, CacheActivationsRunnerConfig,
                          StandardTrainingSAEConfig)
    from sae_lens.training.activations_store import ActivationsStore

    from local_model import load_local_model  # beside this script
    model = load_local_model(FIXTURES / "tiny-gpt2")

    # 1b. SAELens serves training batches from our cache
    cfg = dict(sae=StandardTrainingSAEConfig(d_in=128, d_sae=256),
               model_name="tiny-gpt2", hook_name=HOOK,
               dataset_path=str(FIXTURES / "pretok" / "saelens_dataset"), context_size=128,
               store_batch_size_prompts=4, train_batch_size_tokens=256, n_batches_in_buffer=2,
               training_tokens=4096, use_cached_activations=True,
               cached_activations_path=str(ours), device="cpu")
    dataset = load_from_disk(str(FIXTURES / "pretok" / "saelens_dataset"))
    store = ActivationsStore.from_config(model, _runner_cfg(cfg), override_dataset=dataset)
    batch = store.next_batch().reshape(-1, 128).numpy()
    flat = acts.reshape(-1, 128)
    hits = sum(bool((np.abs(flat - r).max(axis=1) == 0).any()) for r in batch)
    assert hits == len(batch), (hits, len(batch))
    print(f"SAELens's ActivationsStore serves {len(batch)} rows, each a row of our cache")

    # 2. SAELens's own runner writes a cache; we read every row
    theirs = tmp / "theirs"
    # The runner loads `model_name` from the hub; point it at the local model instead.
    import sae_lens.cache_activations_runner as car
    car.load_model = lambda *a, **k: model
    CacheActivationsRunner(CacheActivationsRunnerConfig(
        dataset_path=str(FIXTURES / "pretok" / "saelens_dataset"), model_name="tiny-gpt2",
        model_batch_size=4, hook_name=HOOK, d_in=128, training_tokens=32 * 128,
        context_size=128, new_cached_activations_path=str(theirs), shuffle=False,
        buffer_size_gb=0.001, device="cpu"), override_dataset=dataset).run()
    out = subprocess.run([str(bindir / "pipeline"), "copy", str(theirs), "-"], check=True,
                         capture_output=True, text=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    n = len(load_from_disk(str(theirs)))
    assert summary["rows"] == n * 128, (summary, n)
    print(f"we read SAELens's fresh cache: {summary['rows']} rows in {summary['batches']} batches")
    return 0


def _runner_cfg(kwargs):
    from sae_lens import LanguageModelSAERunnerConfig
    return LanguageModelSAERunnerConfig(**kwargs)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
