"""SAELens's own training step, timed: the reference for `sae-trainer bench` on a GPU.

One step is what SAELens's SAETrainer._train_step does: training_forward_pass (every
loss term), the firing bookkeeping, backward, clip_grad_norm_(1.0), Adam, zero_grad.
Random activations, SAELens's own initialisation; f32, no autocast, torch's default
(no TF32) matmuls unless --tf32.

    python benches/saelens_step.py --arch topk --d-in 768 --d-sae 24576 --k 32 --batch 4096 --device cuda

SAELens imports wandb (for logging, which a step never touches); where wandb is not
installed (the GPU machines), a stand-in module is put in its place. The other packages
it needs and those machines lack are carried as wheels: benches/saelens_wheels.sh.
"""

import argparse
import importlib.util
import json
import resource
import sys
import time
import types

import torch


def _stand_in_for_wandb() -> None:
    """An empty `wandb` whose every attribute is a do-nothing class."""

    class _Module(types.ModuleType):
        def __getattr__(self, name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {"__init__": lambda self, *a, **k: None})

    for name in ["wandb", "wandb.sdk", "wandb.sdk.wandb_run", "wandb.apis", "wandb.util"]:
        sys.modules[name] = _Module(name)


if importlib.util.find_spec("wandb") is None:
    _stand_in_for_wandb()

from sae_lens import (  # noqa: E402
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainStepInput  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", choices=["standard", "gated", "jumprelu", "topk"], default="topk")
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=24576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tf32", action="store_true")
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.manual_seed(0)
    if a.arch == "standard":
        cfg = StandardTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, l1_coefficient=5.0, device=a.device)
        sae = StandardTrainingSAE(cfg)
    elif a.arch == "gated":
        cfg = GatedTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, l1_coefficient=5.0, device=a.device)
        sae = GatedTrainingSAE(cfg)
    elif a.arch == "jumprelu":
        cfg = JumpReLUTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, l0_coefficient=5.0, device=a.device)
        sae = JumpReLUTrainingSAE(cfg)
    else:
        cfg = TopKTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, k=a.k, device=a.device)
        sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999))
    coefficients = {
        name: c.value if hasattr(c, "value") else c for name, c in sae.get_coefficients().items()
    }
    x = torch.randn(a.batch, a.d_in, device=a.device)
    dead = torch.zeros(a.d_sae, dtype=torch.bool, device=a.device)
    dead[::7] = True  # some dead latents, so AuxK runs for TopK
    since_fired = torch.zeros(a.d_sae, device=a.device)

    def step(i: int) -> float:
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients=coefficients,
                dead_neuron_mask=dead,
                n_training_steps=i,
                is_logging_step=False,
            )
        )
        with torch.no_grad():
            fired = out.feature_acts.bool().float().sum(-2).bool()
            since_fired.add_(1)
            since_fired[fired] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return out.loss.item()  # synchronises, as SAELens's logging does

    for i in range(a.warmup):
        step(i)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    times = []
    for i in range(a.steps):
        t = time.perf_counter()
        step(a.warmup + i)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    flops = (2 if a.arch == "topk" else 10) * a.d_in * a.d_sae * a.batch
    if a.arch == "topk":
        flops += 8 * a.k * a.d_in * a.batch
    print(
        json.dumps(
            {
                "impl": "saelens",
                "arch": a.arch,
                "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
                "d_in": a.d_in,
                "d_sae": a.d_sae,
                "k": a.k if a.arch == "topk" else None,
                "batch": a.batch,
                "tf32": a.tf32,
                "step_seconds_median": med,
                "tokens_per_second": a.batch / med,
                "needed_tflops_per_second": flops / med / 1e12,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
