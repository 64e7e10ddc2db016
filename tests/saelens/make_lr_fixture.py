"""Writes tests/fixtures/lr_schedules.json: the learning rate SAELens 6.54.12 uses at every
step (torch 2.15 schedulers, as built by `sae_lens.training.optim.get_lr_scheduler`) for a
few schedules, and the coefficient its `CoefficientScheduler` gives.

    /tmp/slenv/bin/python tests/saelens/make_lr_fixture.py
"""

import json
from pathlib import Path

import sae_lens
import torch
from sae_lens.training.optim import CoefficientScheduler, get_lr_scheduler

CASES = [
    dict(scheduler_name="constant", lr=3e-4, warm_up_steps=0, decay_steps=0, lr_end=3e-5, num_cycles=1, training_steps=20),
    dict(scheduler_name="constant", lr=1e-3, warm_up_steps=3, decay_steps=7, lr_end=1e-4, num_cycles=1, training_steps=30),
    dict(scheduler_name="cosineannealing", lr=2e-3, warm_up_steps=5, decay_steps=10, lr_end=2e-4, num_cycles=1, training_steps=60),
    dict(scheduler_name="cosineannealing", lr=4e-4, warm_up_steps=0, decay_steps=0, lr_end=0.0, num_cycles=1, training_steps=25),
    dict(scheduler_name="cosineannealingwarmrestarts", lr=1e-3, warm_up_steps=4, decay_steps=0, lr_end=1e-5, num_cycles=3, training_steps=40),
    dict(scheduler_name="cosineannealingwarmrestarts", lr=5e-4, warm_up_steps=1, decay_steps=6, lr_end=5e-5, num_cycles=2, training_steps=33),
]


def lrs(case):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=case["lr"])
    sched = get_lr_scheduler(optimizer=opt, **case)
    out = []
    for _ in range(case["training_steps"]):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def coefficients(final, warm, steps):
    s = CoefficientScheduler(warm_up_steps=warm, final_value=final)
    out = []
    for _ in range(steps):
        out.append(s.value)
        s.step()
    return out


data = {
    "provenance": f"sae_lens {sae_lens.__version__}, torch {torch.__version__}: lr used at each step (before scheduler.step()); tests/saelens/make_lr_fixture.py",
    "lr": [dict(case, lrs=lrs(case)) for case in CASES],
    "coefficient": [
        dict(final=2.0, warm_up_steps=3, steps=6, values=coefficients(2.0, 3, 6)),
        dict(final=0.5, warm_up_steps=0, steps=3, values=coefficients(0.5, 0, 3)),
        dict(final=1.0, warm_up_steps=7, steps=10, values=coefficients(1.0, 7, 10)),
    ],
}
out = Path(__file__).resolve().parents[1] / "fixtures" / "lr_schedules.json"
out.write_text(json.dumps(data, indent=1))
print(out)
