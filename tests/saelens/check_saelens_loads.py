"""Does SAELens itself load the SAE directories this project writes, and compute what
`sae-trainer encode` computes with them?

Not part of `cargo test` (it needs PyTorch and SAELens). Run it by hand:

    python3 -m venv /tmp/slenv && /tmp/slenv/bin/pip install sae-lens==6.54.12
    cargo build -p sae-trainer
    cargo run -p sae --example export_saes -- /tmp/exported
    /tmp/slenv/bin/python tests/saelens/check_saelens_loads.py /tmp/exported \
        $CARGO_TARGET_DIR/debug/sae-trainer

For every exported directory it loads the SAE with SAELens (`SAE.load_from_disk` for
inference saves, `TrainingSAE.load_from_disk` for training saves), runs SAELens's
`encode` and `decode` on rows of the fixture activations, runs `sae-trainer encode` on the
same rows, and compares (1e-5 of the largest magnitude). Weights stored as f16/bf16 are
checked to load in that dtype, then compared with SAELens computing in f32
(`load_from_disk(dtype="float32")`), as we do: SAELens's own bf16 arithmetic differs
from f32 by far more than any file-format question. BatchTopK-family training saves
are only loaded: SAELens's training encode selects over the batch, ours converts them to
their JumpReLU inference form first.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae_lens import SAE
from sae_lens.saes.sae import TrainingSAE

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def main(exported: Path, binary: str) -> int:
    inputs = load_file(FIXTURES / "saes" / "inputs.safetensors")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for d in sorted(p for p in exported.iterdir() if p.is_dir()):
            cfg = json.loads((d / "cfg.json").read_text())
            training = d.name.endswith(".training")
            cls = TrainingSAE if training else SAE
            try:
                sae = cls.load_from_disk(str(d))
                half = cfg["dtype"] in ("float16", "bfloat16")
                if half:
                    stored = sae.W_enc.dtype
                    if str(stored) != f"torch.{cfg['dtype']}":
                        raise ValueError(f"weights loaded as {stored}, cfg says {cfg['dtype']}")
                    sae = cls.load_from_disk(str(d), dtype="float32")
            except Exception as e:  # noqa: BLE001
                print(f"FAIL {d.name}: SAELens cannot load it: {e!r}")
                failures += 1
                continue
            arch = cfg["architecture"]
            if training and arch in ("batchtopk", "matryoshka_batchtopk"):
                print(f"ok   {d.name}: loaded as {type(sae).__name__}")
                continue
            raw = cfg.get("normalize_activations") in ("constant_norm_rescale", "layer_norm")
            x = (inputs["batches_raw"] if raw else inputs["batches"])[0].float()
            with torch.no_grad():
                acts = sae.encode(x.to(sae.dtype))
                out = sae.decode(acts)
            xin = Path(tmp) / "x.safetensors"
            save_file({"x": x.contiguous()}, xin)
            ours = Path(tmp) / "out.safetensors"
            run = subprocess.run(
                [binary, "encode", "--sae", str(d), "--input", f"{xin}:x", "--output", str(ours), "--overwrite"],
                capture_output=True,
                text=True,
            )
            if run.returncode != 0:
                print(f"FAIL {d.name}: sae-trainer encode: {run.stderr.strip()}")
                failures += 1
                continue
            got = load_file(ours)
            tol = 1e-5
            worst = 0.0
            for name, theirs in (("feature_acts", acts), ("sae_out", out)):
                theirs = theirs.float()
                err = (got[name] - theirs).abs().max().item() / max(theirs.abs().max().item(), 1e-12)
                worst = max(worst, err)
            ok = worst <= tol
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {d.name}: {type(sae).__name__}, max error {worst:.1e} (tolerance {tol:.0e})")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
