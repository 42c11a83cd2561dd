"""Launchers: carry out an ``AttentionPlan`` (plan.py) on checked tensors.

Nothing here chooses; what varies between calls is in the plan. This module asks the device and
Triton what the plan needs (``device_props``, ``gluon_reason``, ``layout_ok``), keeps the plans and
the persistent kernels' schedules per launch shape, and launches.
"""

from __future__ import annotations

import importlib
import math
from typing import Optional

import torch
import triton

from mgqa.kernels import plan as plans
from mgqa.kernels.checks import INTERPRET
from mgqa.kernels.plan import AttentionPlan, DeviceProps, KernelOptions, PassPlan
from mgqa.kernels.tl_dkdv import _attn_bwd_dkdv, _attn_bwd_dkdv_tuned
from mgqa.kernels.tl_dq import _attn_bwd_dq, _attn_bwd_dq_tuned
from mgqa.kernels.tl_fwd import _attn_fwd, _attn_fwd_tuned

GLUON_MIN_TRITON = (3, 6)  # the Gluon API the kernels are written against
CACHE_LIMIT = 256  # plans and schedules kept per process; the oldest goes first (evaluation at many lengths)
_devices: dict = {}
_plans: dict = {}
_schedules: dict = {}
_gluon: dict = {}


def device_props(device: torch.device) -> DeviceProps:
    """The plan's view of ``device``, asked of the driver once (the queries cost microseconds)."""
    if INTERPRET or device.type != "cuda":
        return DeviceProps(interpreter=True)
    props = _devices.get(device)
    if props is None:
        cuda = torch.cuda.get_device_properties(device)
        props = _devices[device] = DeviceProps(tuple(torch.cuda.get_device_capability(device)),
                                               cuda.multi_processor_count, getattr(cuda, "L2_cache_size", 0))
    return props


def gluon_version_reason(version: str) -> Optional[str]:
    """None if Triton ``version`` (e.g. "3.6.0", "3.7.0+git1a2b") has the Gluon API the kernels use,
    else why not."""
    major, minor = (version.split(".") + ["0"])[:2]
    if (int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)) >= GLUON_MIN_TRITON:
        return None
    return f"triton {version} older than {'.'.join(map(str, GLUON_MIN_TRITON))} (the Gluon API the kernels use)"


def gluon_module(name: str):
    """mgqa.kernels.<name> (a Gluon kernel module), or a string saying why it cannot be imported."""
    if name not in _gluon:
        reason = gluon_version_reason(triton.__version__)
        if reason is not None:
            _gluon[name] = reason
        else:
            try:
                _gluon[name] = importlib.import_module(f"mgqa.kernels.{name}")
            except Exception as err:  # a Triton build without Gluon's Hopper API
                _gluon[name] = f"Gluon unavailable in triton {triton.__version__} ({type(err).__name__}: {err})"
    return _gluon[name]


def gluon_reason() -> Optional[str]:
    """None if the Gluon kernel modules import here, else why not."""
    for name in ("gluon_fwd", "gluon_dq", "gluon_dkdv"):
        module = gluon_module(name)
        if isinstance(module, str):
            return module
    return None


def layout_ok(*tensors: torch.Tensor) -> bool:
    """Tensor descriptors' rules: unit last stride, 16-byte aligned base and other strides."""
    for t in tensors:
        elem = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(t.stride(i) == 0 or (t.stride(i) * elem) % 16
                                                          for i in range(3)):
            return False
    return True


def _cached(cache: dict, key, build):
    if key not in cache:
        if len(cache) >= CACHE_LIMIT:
            cache.pop(next(iter(cache)))
        cache[key] = build()
    return cache[key]


def cached_plan(key, build):
    """The plan cached under ``key``, made by ``build`` on first use."""
    return _cached(_plans, key, build)


def plan_for(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float, options: KernelOptions,
             *tensors: torch.Tensor) -> AttentionPlan:
    """The plan of a call on these tensors (``tensors``: every input the kernels read by descriptor)."""
    batch, heads, n_q, head_dim = q.shape
    device = device_props(q.device)
    aligned = not device.interpreter and layout_ok(q, k, *tensors)
    key = (batch, heads, k.shape[1], n_q, k.shape[2], head_dim, q.dtype, causal, scale > 0, q.device, options,
           aligned)
    return _cached(_plans, key, lambda: plans.plan_attention(
        batch, heads, k.shape[1], n_q, k.shape[2], head_dim, str(q.dtype).removeprefix("torch."), causal, scale,
        device, options, aligned, None if device.interpreter or not options.gluon else gluon_reason()))


def _allocator(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _descriptors(p: PassPlan) -> None:
    # In-kernel descriptors take a little global scratch memory from PyTorch's allocator. Triton keeps
    # the allocator per thread and autograd runs the backward on its own thread: set it every launch.
    if p.tma:
        triton.set_allocator(_allocator)


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _meta(q: torch.Tensor, k: torch.Tensor, causal: bool) -> dict:
    head_dim = q.shape[-1]
    return dict(N_BUCKET=min(triton.next_power_of_2(max(k.shape[2], 1)), 16384), GROUP=q.shape[1] // k.shape[1],
                HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), CAUSAL=causal,
                INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _tl_launch(plain, tuned, p: PassPlan, block: str, rows: int, blocks_of: int, *args, **meta) -> None:
    """A tl kernel on a 1-D grid of ``blocks_of`` x cdiv(rows, tiles[block]) programs, with the plan's
    tiles, or autotuned where the plan leaves them open."""
    if p.tiles is None:
        tuned[lambda cfg: (blocks_of * triton.cdiv(rows, cfg[block]),)](*args, **meta)
        return
    t = p.tiles
    extra = {} if t.maxnreg is None else {"maxnreg": t.maxnreg}
    size = t.block_m if block == "BLOCK_M" else t.block_n
    plain[(blocks_of * triton.cdiv(rows, size),)](*args, BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps,
                                                  num_stages=t.num_stages, **extra, **meta)


def _schedule(kind: str, args: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(schedule, rounds) int32 tensors of a persistent launch: program p takes ``schedule[p, :rounds[p]]``."""
    def build():
        lists, entries = (plans.forward_schedule if kind == "fwd" else plans.dkdv_schedule)(*args)
        table = torch.zeros((len(lists), max(1, max(len(x) for x in lists))), dtype=torch.int32)
        for program, positions in enumerate(lists):
            table[program, :len(positions)] = torch.tensor([entries[i] for i in positions], dtype=torch.int32)
        rounds = torch.tensor([len(x) for x in lists], dtype=torch.int32)
        return table.to(device), rounds.to(device)

    return _cached(_schedules, (kind, args, device), build)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
            plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, H, Nq, D) in q's dtype, contiguous, and lse (B, H, Nq) float32: log2-sum-exp of the scaled
    scores, +inf for rows that see no key. Inputs checked, last dimension contiguous."""
    batch, heads, n_q, head_dim = q.shape
    out = torch.empty((batch, heads, n_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    p = plan.forward
    _descriptors(p)
    qk_scale = scale * math.log2(math.e)
    if p.kernel == "gluon_persistent":
        if p.first_free:
            schedule, rounds = _schedule("fwd", (batch, heads, k.shape[1], n_q, k.shape[2], causal, p.programs,
                                                 p.walk), q.device)
        else:
            schedule = rounds = _placeholder(q.device)
        gluon_module("gluon_fwd").launch(q, k, v, out, lse, causal, qk_scale, p, schedule, rounds)
        return out, lse
    _tl_launch(_attn_fwd, _attn_fwd_tuned, p, "BLOCK_M", n_q, batch * heads,
               q, k, v, out, lse, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
               n_q, k.shape[2], heads, qk_scale, USE_TMA=p.tma, SECTION_PROGRAMS=p.walk.programs,
               SECTION_CHUNKS=p.walk.chunks, **_meta(q, k, causal))
    return out, lse


def _placeholder(device: torch.device) -> torch.Tensor:
    return _cached(_schedules, ("placeholder", device), lambda: torch.zeros(1, dtype=torch.int32, device=device))


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, causal: bool, scale: float,
             plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (B, H, Nq, D), dk and dv (B, Hkv, Nk, D), contiguous, in the inputs' dtype; deterministic.
    The dQ kernel runs first and writes each row's delta (sum_d O dO) for the dK/dV kernel, which sums
    over each KV head's query group in the kernel."""
    batch, heads, n_q, head_dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    dq = torch.empty((batch, heads, n_q, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, kv_heads, n_k, head_dim), dtype=k.dtype, device=k.device)
    dv = torch.empty((batch, kv_heads, n_k, head_dim), dtype=v.dtype, device=v.device)
    if n_q == 0 or n_k == 0 or batch == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    meta = _meta(q, k, causal)
    qk_scale = scale * math.log2(math.e)
    delta = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)

    p = plan.dq
    _descriptors(p)
    if p.kernel == "gluon":
        gluon_module("gluon_dq").launch(q, k, v, grad_out, out, lse, delta, dq, causal, qk_scale, scale, p)
    else:
        _tl_launch(_attn_bwd_dq, _attn_bwd_dq_tuned, p, "BLOCK_M", n_q, batch * heads,
                   q, k, v, grad_out, out, lse, delta, dq,
                   *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out), *_strides3(out),
                   *_strides3(dq), n_q, n_k, heads, qk_scale, scale, USE_TMA=p.tma,
                   SECTION_PROGRAMS=p.walk.programs, SECTION_CHUNKS=p.walk.chunks, **meta)

    p = plan.dkdv
    _descriptors(p)
    if p.kernel == "gluon_persistent":
        schedule, rounds = _schedule("dkdv", (batch, kv_heads, n_q, n_k, heads // kv_heads, causal, p.programs,
                                              p.walk), q.device)
        gluon_module("gluon_dkdv").launch(q, k, v, grad_out, lse, delta, dk, dv, causal, qk_scale, scale, p,
                                          schedule, rounds)
        return dq, dk, dv
    if p.kernel == "gluon":
        gluon_module("gluon_dkdv").launch(q, k, v, grad_out, lse, delta, dk, dv, causal, qk_scale, scale, p)
        return dq, dk, dv
    if p.splits == 1:
        dk_part, dv_part, split_stride = dk, dv, 0
    else:  # float32 partials, summed below in a fixed order: deterministic
        dk_part = torch.empty((p.splits, batch, kv_heads, n_k, head_dim), dtype=torch.float32, device=q.device)
        dv_part = torch.empty_like(dk_part)
        split_stride = dk_part.stride(0)
    _tl_launch(_attn_bwd_dkdv, _attn_bwd_dkdv_tuned, p, "BLOCK_N", n_k, batch * kv_heads * p.splits,
               q, k, v, grad_out, lse, delta, dk_part, dv_part,
               *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out), split_stride,
               *(dk_part.stride(i) for i in range(-4, -1)), n_q, n_k, kv_heads, qk_scale, scale, SPLITS=p.splits,
               USE_TMA=p.tma, ONE_LOOP=p.one_loop, FLATTEN=p.one_loop, SECTION_PROGRAMS=p.walk.programs,
               SECTION_CHUNKS=p.walk.chunks, **meta)
    if p.splits > 1:
        dk.copy_(dk_part.sum(0))
        dv.copy_(dv_part.sum(0))
    return dq, dk, dv
