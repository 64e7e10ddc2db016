"""`pipeline run` against SAELens's LanguageModelSAETrainingRunner, end to end, same machine.

Not part of `cargo test`. Run it by hand after `cargo build --workspace --bins` (or a
release build) with SAELens installed:

    python3 -m venv /tmp/slenv && /tmp/slenv/bin/pip install sae-lens==6.54.12
    HF_HUB_OFFLINE=1 /tmp/slenv/bin/python benches/saelens_runner.py $CARGO_TARGET_DIR/debug

Both train the SAEs of `examples/sweep.yaml` (TopK, d_sae 1024, k ∈ {16, 32} × two hooks,
245,760 tokens each, batch 1024, context 128) on the example GPT-2 and corpus, evals off
(`n_eval_batches: 0`): one SAE, then the 4-SAE sweep. SAELens 6.54.12 has no multi-SAE
runner, so its sweep is its runner once per SAE (it re-runs the model each time); ours is
one `pipeline run` (one LM pass feeds every SAE). One JSON line per measurement:
tokens/s = SAE training tokens (summed over SAEs) / wall seconds of the whole command
(model load and tokenizing included), and peak memory (SAELens: its process; ours: the
sum over the stage processes of each one's peak).
"""

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"
HOOKS = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
KS = [16, 32]
TOKENS = 245_760


def ours(bindir: Path, points: list[tuple[int, str]], tmp: Path) -> dict:
    text = (EX / "sweep.yaml").read_text()
    text = text.replace("n_eval_batches: 4", "n_eval_batches: 0")
    head = text[: text.index("\nsweep:") + 1]
    saes = "".join(f"  - {{k: {k}, hook_name: {h}}}\n" for k, h in points)
    cfg = tmp / f"ours-{len(points)}.yaml"
    cfg.write_text(f"{head}saes:\n{saes}")
    # relative paths in the file are relative to it: point them at examples/
    cfg.write_text(cfg.read_text().replace("model_name: model", f"model_name: {EX / 'model'}")
                   .replace("dataset_path: corpus.jsonl", f"dataset_path: {EX / 'corpus.jsonl'}"))
    run_dir = tmp / f"ours-run-{len(points)}"
    t0 = time.perf_counter()
    subprocess.run([str(bindir / "pipeline"), "run", str(cfg), "--output", str(run_dir),
                    "--overwrite", "--progress-every", "1000"], check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"tool": "saestream", "saes": len(points), "wall_seconds": wall,
            "tokens_per_second": TOKENS * len(points) / wall,
            "peak_rss_mib": summary["peak_rss_mib"],
            "explained_variance": [p["explained_variance"] for p in summary["points"]]}


def saelens(points: list[tuple[int, str]], tmp: Path) -> dict:
    import torch
    from datasets import load_dataset
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, TopKTrainingSAEConfig
    from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner
    sys.path.insert(0, str(ROOT / "tests" / "saelens"))
    from local_model import load_local_model

    t0 = time.perf_counter()
    for k, hook in points:
        # What SAELens does per SAE: load the model, stream and tokenize the dataset,
        # fill its buffer, train.
        model = load_local_model(EX / "model")
        dataset = load_dataset("json", data_files=str(EX / "corpus.jsonl"), split="train")
        cfg = LanguageModelSAERunnerConfig(
            sae=TopKTrainingSAEConfig(
                d_in=128, d_sae=1024, k=k, apply_b_dec_to_input=False,
                normalize_activations="expected_average_only_in"),
            model_name="example", hook_name=hook, dataset_path=str(EX / "corpus.jsonl"),
            is_dataset_tokenized=False, streaming=False, context_size=128,
            store_batch_size_prompts=16, training_tokens=TOKENS, train_batch_size_tokens=1024,
            n_batches_in_buffer=16, n_batches_for_norm_estimate=10, lr=1e-3,
            lr_warm_up_steps=10, lr_decay_steps=40, lr_scheduler_name="cosineannealing",
            feature_sampling_window=50, dead_feature_window=50, seed=42, n_eval_batches=0,
            logger=LoggingConfig(log_to_wandb=False), device="cpu",
            output_path=str(tmp / f"saelens-{k}-{hook}"), checkpoint_path=None, verbose=False)
        runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)
        runner.run()
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tool": "saelens", "saes": len(points), "wall_seconds": wall,
            "tokens_per_second": TOKENS * len(points) / wall, "peak_rss_mib": peak,
            "torch_threads": torch.get_num_threads()}


def main(bindir: Path) -> int:
    one = [(KS[1], HOOKS[0])]
    sweep = [(k, h) for k in KS for h in HOOKS]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for pts in (one, sweep):
            print(json.dumps(ours(bindir, pts, tmp)), flush=True)
        # SAELens in child processes, so each measurement's peak memory is its own
        for n in (1, 4):
            out = subprocess.run([sys.executable, __file__, "--saelens", str(n)], check=True,
                                 capture_output=True, text=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--saelens":
        n = int(sys.argv[2])
        pts = [(KS[1], HOOKS[0])] if n == 1 else [(k, h) for k in KS for h in HOOKS]
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(saelens(pts, Path(d))))
        sys.exit(0)
    sys.exit(main(Path(sys.argv[1])))
