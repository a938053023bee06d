"""Golden values for train/schedule.hpp: the learning rates transformers' linear and constant
schedules with warm-up give an AdamW at each step, and torch.nn.utils.clip_grad_norm_ on a few
gradients (the total norm it returns and the clipped gradients)."""
import json

import torch
from safetensors.torch import save_file
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup


def _lrs(make_schedule, base_lr, steps):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=base_lr)
    schedule = make_schedule(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])  # the rate this step's update uses
        optimizer.step()
        schedule.step()
    return lrs


def make(out_dir, shared_data):
    cases = []
    for warmup, total in ((0, 10), (3, 10), (4, 7), (10, 10), (5, 20)):
        cases.append({"kind": "linear", "warmup": warmup, "total": total, "base_lr": 3e-3,
                      "lrs": _lrs(lambda o: get_linear_schedule_with_warmup(o, warmup, total), 3e-3, total + 2)})
        cases.append({"kind": "constant", "warmup": warmup, "total": total, "base_lr": 3e-3,
                      "lrs": _lrs(lambda o: get_constant_schedule_with_warmup(o, warmup), 3e-3, total + 2)})
    (out_dir / "schedule.json").write_text(json.dumps(cases))

    torch.manual_seed(0)
    tensors, norms = {}, {}
    for name, max_norm, scale in (("small", 1.0, 0.01), ("large", 1.0, 10.0), ("half", 0.5, 1.0)):
        grads = [torch.randn(3, 4, dtype=torch.float64) * scale, torch.randn(5, dtype=torch.float64) * scale]
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        norms[name] = {"max_norm": max_norm, "total_norm": float(torch.nn.utils.clip_grad_norm_(params, max_norm))}
        for i, (p, g) in enumerate(zip(params, grads)):
            tensors[f"{name}.grad.{i}"] = g
            tensors[f"{name}.clipped.{i}"] = p.grad
    save_file(tensors, str(out_dir / "clip.safetensors"))
    (out_dir / "clip.json").write_text(json.dumps(norms))
