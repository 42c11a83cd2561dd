"""The launchers carry a Gluon plan out to the Gluon kernels' parameters, checked on CPU: each kernel
is replaced by a stub that binds the launch's arguments to the kernel's signature (Gluon has no
interpreter, so this is what a machine without a GPU can check), and the constexprs the plan names
reach the kernel."""

from __future__ import annotations

import inspect

import pytest
import torch

from mgqa.kernels import launch
from mgqa.kernels import plan as plans

gluon = {name: pytest.importorskip(f"mgqa.kernels.{name}", reason="Gluon unavailable in this Triton")
         for name in ("gluon_fwd", "gluon_dq", "gluon_dkdv", "gluon_dkdv_persistent")}
H100 = plans.DeviceProps((9, 0), 132, 50 * 2**20)
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")


class _Binding:
    """Stands in for a Gluon kernel: records (name, grid, bound arguments) of each launch."""

    def __init__(self, kernel, calls: list):
        self.fn, self.calls = kernel.fn, calls

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            signature = inspect.signature(self.fn)
            bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
            missing = [name for name, p in signature.parameters.items()
                       if name not in bound.arguments and p.default is inspect.Parameter.empty]
            assert not missing, f"{self.fn.__name__}: no argument for {missing}"
            self.calls.append((self.fn.__name__, grid, bound.arguments))
        return run


@pytest.fixture
def calls(monkeypatch):
    recorded: list = []
    for module in gluon.values():
        for name, obj in vars(module).items():
            if name.startswith("_attn") and hasattr(obj, "fn"):
                monkeypatch.setattr(module, name, _Binding(obj, recorded))
    monkeypatch.setattr(launch, "_gluon", {name: module for name, module in gluon.items()})
    return recorded


@pytest.mark.parametrize("batch,heads,kv_heads,n,causal,expected", [
    (2, 16, 4, 4096, True, ("_attn_fwd_ws_persistent", "_attn_bwd_dq_ws", "_attn_bwd_dkdv_ws")),
    (2, 16, 4, 4096, False, ("_attn_fwd_ws_persistent", "_attn_bwd_dq_ws", "_attn_bwd_dkdv_ws")),
    (4, 16, 16, 2048, True, ("_attn_fwd_ws_persistent", "_attn_bwd_dq_ws", "_attn_bwd_dkdv_ws_persistent")),
    (4, 16, 16, 2048, False, ("_attn_fwd_ws_persistent", "_attn_bwd_dq_ws", "_attn_bwd_dkdv_ws_persistent")),
])
def test_a_gluon_plan_reaches_every_kernel_parameter(calls, batch, heads, kv_heads, n, causal, expected):
    plan = plans.plan_attention(batch, heads, kv_heads, n, n, 128, "bfloat16", causal, 0.088, H100)
    q = torch.zeros(batch, heads, n, 128, dtype=torch.bfloat16)
    k = torch.zeros(batch, kv_heads, n, 128, dtype=torch.bfloat16)
    out, lse = launch.forward(q, k, k, causal, 0.088, plan)
    launch.backward(q, q, k, k, out, lse, causal, 0.088, plan)
    assert tuple(name for name, _, _ in calls) == expected
    (_, fwd_grid, fwd), (_, _, dq), (_, dkdv_grid, dkdv) = calls
    assert fwd_grid == (plan.forward.programs,) and fwd["SCHEDULED"] == causal == plan.forward.first_free
    assert fwd["STAGES"] == plan.forward.tiles.num_stages and dq["STAGES"] == plan.dq.tiles.num_stages
    assert (dkdv["SECTION_CHUNKS"] if "SECTION_CHUNKS" in dkdv else 1) in (plan.dkdv.walk.chunks, 1)
    assert (dkdv["STAGES"], dkdv["PREFETCH"]) == (plan.dkdv.tiles.num_stages, plan.dkdv.tiles.prefetch)
    if plan.dkdv.kernel == "gluon_persistent":
        assert dkdv_grid == (plan.dkdv.programs,) and dkdv["KV_SETS"] == plan.dkdv.tiles.kv_sets
        assert dkdv["Schedule"].shape[0] == plan.dkdv.programs
    else:
        assert dkdv["SPLITS"] == plan.dkdv.splits > 1 and dkdv["SECTION_CHUNKS"] == plan.dkdv.walk.chunks
