import math

import pytest
import torch

from mgqa.lit.schedule import warmup_cosine


def lrs(total, warmup, ratio, steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=total, warmup_steps=warmup, min_lr_ratio=ratio)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_to_the_floor():
    values = lrs(total=110, warmup=10, ratio=0.1, steps=120)
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert values[110] == pytest.approx(0.1) and values[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_bad_schedule_arguments():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="min_lr_ratio must be in"):
        warmup_cosine(opt, total_steps=10, min_lr_ratio=2.0)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0, got -1"):
        warmup_cosine(opt, total_steps=10, warmup_steps=-1)
