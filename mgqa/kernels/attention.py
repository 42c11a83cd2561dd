"""Grouped-query attention in Triton: launchers, the ``mgqa::`` custom ops, and autograd.

``triton_attention(q, k, v, causal=..., scale=...)`` is what ``mgqa.ops.attention`` calls for the
"triton" backend. q is (B, H, Nq, D), k and v are (B, Hkv, Nk, D) with H % Hkv == 0; query head h
reads KV head h // (H / Hkv) by index. Causal masks align bottom-right (query i at absolute
position Nk - Nq + i); rows that see no key output 0. Any strides are accepted as long as the last
dimension is contiguous (other layouts are copied once). fp16 and bf16 use the tensor cores with
fp32 accumulation; fp32 inputs run with IEEE fp32 dots (exact but slow, meant for tests).

The forward and backward are ``torch.library.custom_op``s with fake registrations, so the op
traces under ``torch.compile(fullgraph=True)``; eager calls run the same launchers through a plain
``torch.autograd.Function``, which costs the host far less per call.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Optional

import torch
import triton

from mgqa.kernels.attention_bwd import _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dkdv_dq, _attn_bwd_dq
from mgqa.kernels.attention_fwd import INTERPRET, _attn_fwd

__all__ = ["SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES", "triton_attention", "unsupported_reason"]

SUPPORTED_HEAD_DIMS = (32, 64, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """None if the kernels can run these inputs, else a short reason a user can act on."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            return f"{name} has {t.dim()} dims (expected 4: batch, heads, seq, head_dim)"
    if not q.is_cuda and not INTERPRET:
        return f"inputs are on {q.device.type}"
    if k.device != q.device or v.device != q.device:
        return f"q, k, v on different devices ({q.device}, {k.device}, {v.device})"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} not in (float16, bfloat16, float32)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
    head_dim = q.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} not in {SUPPORTED_HEAD_DIMS}"
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        return f"head_dim differs: q {head_dim}, k {k.shape[-1]}, v {v.shape[-1]}"
    if k.shape != v.shape:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape"
    if q.shape[0] != k.shape[0]:
        return f"batch differs: q {q.shape[0]}, k {k.shape[0]}"
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        return f"query heads ({q.shape[1]}) not a multiple of KV heads ({k.shape[1]})"
    return None


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        raise ValueError(f"triton attention: {reason}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels address rows by stride but read each row as one contiguous vector.
    return t if t.stride(-1) == 1 else t.contiguous()


def _common_meta(q: torch.Tensor, k: torch.Tensor, causal: bool) -> dict:
    head_dim = q.shape[-1]
    return dict(
        N_BUCKET=min(triton.next_power_of_2(max(k.shape[2], 1)), 16384),
        GROUP=q.shape[1] // k.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        CAUSAL=causal,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _env_choice(variable: str, default: str, choices: tuple[str, ...]) -> str:
    """A kernel setting read from the environment at import; any value outside ``choices`` fails
    there, naming the value and the choices."""
    value = os.environ.get(variable, default)
    if value not in choices:
        expected = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
        raise ValueError(f"{variable}={value!r}: expected {expected}")
    return value


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of every kernel output; tests swap it for a NaN-filled one to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


# Tensor descriptors (Hopper's bulk tensor copies) for the forward's K/V tiles. Off under the
# interpreter and where the layout breaks the copy engine's rules (16-byte aligned rows and base,
# head_dim a power of two). A module flag so benchmarks can compare both paths.
USE_TMA = os.environ.get("MGQA_TRITON_TMA", "1") != "0"


_DEVICE_INFO: dict = {}  # device -> (compute capability, SM count, L2 bytes), asked of the driver once


def _device_info(device) -> tuple[tuple[int, int], int, int]:
    """(capability, SMs, L2 bytes) of a CUDA device; the driver queries cost microseconds per launch."""
    info = _DEVICE_INFO.get(device)
    if info is None:
        props = torch.cuda.get_device_properties(device)
        info = _DEVICE_INFO[device] = (tuple(torch.cuda.get_device_capability(device)), props.multi_processor_count,
                                       getattr(props, "L2_cache_size", 0))
    return info


def _tma_ok(*tensors: torch.Tensor) -> bool:
    q = tensors[0]
    if not USE_TMA or INTERPRET or not q.is_cuda or _device_info(q.device)[0][0] < 9:
        return False
    head_dim, elem = q.shape[-1], q.element_size()
    if head_dim & (head_dim - 1):
        return False
    for t in tensors:
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(t.stride(i) == 0 or (t.stride(i) * elem) % 16
                                                          for i in range(3)):
            return False
    # In-kernel descriptors need a little global scratch memory, taken from PyTorch's allocator.
    # Triton keeps the allocator per thread (a ContextVar) and autograd runs the backward on its own
    # thread, so set it on every launch rather than once.
    triton.set_allocator(_scratch_alloc)
    return True


def _scratch_alloc(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


# Backward flavour. Deterministic (default): a separate dQ kernel, bit-identical results run to run,
# 7 matmuls. MGQA_TRITON_DETERMINISTIC=0: dQ accumulated with fp32 atomics inside the dK/dV kernel
# (the Gluon one where it applies, else the tl one), 5 matmuls, dQ's rounding varies run to run.
# torch.use_deterministic_algorithms(True) forces the deterministic path either way.
DETERMINISTIC = os.environ.get("MGQA_TRITON_DETERMINISTIC", "1") != "0"
# Forward softmax variant (see attention_fwd._fwd_step): 0 scale then max, 1 scale folded into
# exp2's FMA, 2 folded + lazy rescaling. Variants 1-2 assume a positive scale.
FWD_SOFTMAX = int(os.environ.get("MGQA_TRITON_FWD_SOFTMAX", "0"))

# dK/dV kernel, programs that own one query head (MHA, or a group split down to one head each): one
# query loop with the causal mask on every block, flattened with the head loop, instead of a masked
# and an unmasked loop. "auto": there only; "1": every shape; "0": never.
DKDV_ONE_LOOP = _env_choice("MGQA_TRITON_DKDV_ONE_LOOP", "auto", ("auto", "0", "1"))

FORCE_DKDV_SPLITS: Optional[int] = None  # tests pin the split count; must divide the group

# Launch order under a causal mask. "sections": the dK/dV kernel's programs go
# in sections of a few KV heads' work (sized to share L2), the longest programs (first key blocks)
# of the whole section first, so the launch ends on short programs. "grid": one KV head's programs
# after another (each head's longest first), which can leave a few long programs running alone.
CAUSAL_ORDER = _env_choice("MGQA_TRITON_CAUSAL_ORDER", "sections", ("sections", "grid"))
# Forward kernel. "auto": on sm_90, the warp-specialised Gluon kernel (attention_fwd_ws; head_dim 128,
# fp16/bf16) where it applies, as its persistent variant (one program per SM walking the query
# tiles), the tl kernel elsewhere; "tiles": the Gluon kernel with one program
# per query tile; "tl": always the tl kernel.
FWD_IMPL = _env_choice("MGQA_TRITON_FWD_IMPL", "auto", ("auto", "tiles", "tl"))
# dK/dV kernel of the deterministic backward, likewise: "auto" takes the warp-specialised Gluon kernel
# (attention_bwd_ws) where it applies, as its persistent variant (one program per SM walking a list of
# key tiles) where each tile's program would cover one query head (MHA), since there the per-tile
# set-up it hides is largest, else one program per key tile; "tiles": one
# program per key tile always; "persistent": the persistent variant wherever the Gluon kernel runs
# (it does not split the query group); "tl": always the tl kernel.
BWD_IMPL = _env_choice("MGQA_TRITON_BWD_IMPL", "auto", ("auto", "tiles", "persistent", "tl"))
# dQ kernel of the deterministic backward, likewise: "auto" takes the warp-specialised Gluon dQ kernel
# (attention_dq_ws, which also writes delta) where it applies; "tl": always the tl kernel.
DQ_IMPL = _env_choice("MGQA_TRITON_DQ_IMPL", "auto", ("auto", "tl"))
_gluon_modules: dict = {}  # module name -> the module once imported, or why it cannot be
# Below this many keys the tl forward runs: the Gluon forward's per-program set-up, paid once per SM
# by the persistent kernel, outweighs its faster tiles only on short sequences; lengths below 1k keys
# were not measured (bench/NOTES.md). Tests lower both.
WS_MIN_KEYS = 1024
WS_MIN_KEYS_CAUSAL = 1024
# Below this many programs per SM the Gluon dK/dV kernel splits the query group over more programs
# (float32 partials, summed afterwards), at most WS_BWD_MAX_SPLITS ways; where that is not enough the
# tl kernel, which splits the group too, runs instead. Tests set the minimum to 0. 8 bounds the
# float32 partials to 8 x (B, Hkv, Nk, D) each for dK and dV.
WS_BWD_MIN_PROGRAMS_PER_SM = 2
WS_BWD_MAX_SPLITS = 8
# Under a causal mask the split goes further where the group allows: to this many times the minimum
# above. The launch order there runs each section from its longest key tiles to its shortest; with
# few, large chunks a section holds fewer programs than run at once, and the long programs of the
# last sections finish alone; without the mask the programs cost the same and the extra splits only
# add partials, so the factor applies under a causal mask only (bench/NOTES.md).
WS_BWD_CAUSAL_PROGRAMS_FACTOR = 2


GLUON_MIN_TRITON = (3, 6)  # the Gluon API these kernels are written against (run on 3.6, compiled on 3.8)


def _triton_version() -> tuple[int, int]:
    major, minor = (triton.__version__.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _gluon_module(name: str):
    """mgqa.kernels.<name> (a Gluon kernel module), or a string saying why it cannot be imported."""
    if name not in _gluon_modules and _triton_version() < GLUON_MIN_TRITON:
        _gluon_modules[name] = (f"triton {triton.__version__} is older than the Gluon API these kernels use "
                                f"({'.'.join(map(str, GLUON_MIN_TRITON))})")
    if name not in _gluon_modules:
        try:
            _gluon_modules[name] = importlib.import_module(f"mgqa.kernels.{name}")
        except Exception as err:  # an older Triton without Gluon's Hopper API
            _gluon_modules[name] = f"Gluon unavailable in triton {triton.__version__} ({type(err).__name__}: {err})"
    return _gluon_modules[name]


def _gluon_reason(setting: str, value: str, name: str, *tensors: torch.Tensor, **case):
    """(module, None) if the Gluon kernel module ``name`` runs these tensors, else (None, reason).
    ``case`` goes to the module's own ``unsupported_reason`` (e.g. the forward's scale)."""
    q = tensors[0]
    if value != "auto":
        return None, f"{setting}={value}"
    if INTERPRET or not q.is_cuda:
        return None, "not on a CUDA device (Gluon has no interpreter)"
    module = _gluon_module(name)
    if isinstance(module, str):
        return None, module
    if not _tma_ok(*tensors):
        return None, "tensor descriptors off (MGQA_TRITON_TMA=0) or layout unfit (16-byte aligned base and strides needed)"
    reason = module.unsupported_reason(q.shape[-1], str(q.dtype).removeprefix("torch."),
                                       _device_info(q.device)[0], **case)
    return (None, reason) if reason else (module, None)


def ws_forward_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> Optional[str]:
    """None if the forward runs the warp-specialised Gluon kernel for these inputs, else why not."""
    _, reason = _gluon_reason("MGQA_TRITON_FWD_IMPL", "tl" if FWD_IMPL == "tl" else "auto", "attention_fwd_ws", q, k,
                              v, scale=scale)
    min_keys = WS_MIN_KEYS_CAUSAL if causal else WS_MIN_KEYS
    if reason is None and k.shape[2] < min_keys:
        reason = f"{k.shape[2]} keys (the tl kernel is faster below {min_keys}{' with a causal mask' if causal else ''})"
    return reason


def ws_dq_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor) -> Optional[str]:
    """None if the deterministic backward's dQ runs the warp-specialised Gluon kernel, else why not."""
    return _gluon_reason("MGQA_TRITON_DQ_IMPL", DQ_IMPL, "attention_dq_ws", q, k, v, grad_out)[1]


def ws_backward_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                       causal: bool = False) -> Optional[str]:
    """None if the deterministic backward's dK/dV runs the warp-specialised Gluon kernel, else why not."""
    return _ws_backward_plan(q, k, v, grad_out, causal)[1]


def ws_dkdv_splits(module, batch: int, kv_heads: int, n_k: int, group: int, sms: int, causal: bool,
                   max_splits: int) -> int:
    """Group splits of the Gluon dK/dV kernel (``module``: attention_bwd_ws) for a launch on ``sms`` SMs:
    the fewest that give WS_BWD_MIN_PROGRAMS_PER_SM programs per SM, under a causal mask
    WS_BWD_CAUSAL_PROGRAMS_FACTOR times that where the group allows; 0 if none does."""
    splits = 0
    if causal:
        splits = module.group_splits(batch, kv_heads, n_k, group,
                                     WS_BWD_CAUSAL_PROGRAMS_FACTOR * WS_BWD_MIN_PROGRAMS_PER_SM * sms, max_splits)
    if splits == 0:
        splits = module.group_splits(batch, kv_heads, n_k, group, WS_BWD_MIN_PROGRAMS_PER_SM * sms, max_splits)
    return splits


def _ws_backward_plan(q, k, v, grad_out, causal: bool = False) -> tuple[int, Optional[str]]:
    """(group splits, None) if the deterministic backward's dK/dV runs the Gluon kernel, else (0, why not).
    Under a causal mask it splits to WS_BWD_CAUSAL_PROGRAMS_FACTOR times the programs where the
    group allows that, else as it would without the mask."""
    module, reason = _gluon_reason("MGQA_TRITON_BWD_IMPL", "tl" if BWD_IMPL == "tl" else "auto",
                                   "attention_bwd_ws", q, k, v, grad_out)
    if reason is not None:
        return 0, reason
    # With few programs the tl kernel's split over the group fills the GPU better, unless the Gluon
    # kernel may split the group too (WS_BWD_MAX_SPLITS; not the persistent variant).
    sms = _device_info(q.device)[1]
    batch, kv_heads, n_k = q.shape[0], k.shape[1], k.shape[2]
    max_splits = 1 if BWD_IMPL == "persistent" else WS_BWD_MAX_SPLITS
    splits = ws_dkdv_splits(module, batch, kv_heads, n_k, q.shape[1] // kv_heads, sms, causal, max_splits)
    if splits == 0:
        programs = batch * kv_heads * triton.cdiv(n_k, 2 * module.BLOCK_N)
        return 0, (f"{programs} key-block programs (fewer than {WS_BWD_MIN_PROGRAMS_PER_SM} per SM"
                   f"{f' with up to {max_splits} group splits' if max_splits > 1 else ''})")
    return splits, None


# Which kernels take the sectioned order (tl: "fwd", "dq", "dkdv"; Gluon: "ws_fwd", "ws_dq"; the Gluon
# dK/dV kernel always does); the others keep the grid order.
SECTION_KERNELS: tuple[str, ...] = ("dkdv",)
FORCE_SECTION_CHUNKS: Optional[int] = None  # tests pin the chunks per section
_SECTION_L2_SHARE = 0.65  # of the L2 cache, for the data a section's programs share
_SECTION_WAVES = 4  # programs per section: at least this many times the SM count, where L2 allows
EVEN_SECTIONS = True  # _sections: the same number of chunks in every section, where it knows the launch
# The persistent Gluon dK/dV kernel writes dK/dV by the copy engine, through the tile's K/V buffers,
# instead of from registers, so the stores leave the consumers' registers free sooner.
WS_DKDV_TMA_STORE = True
# The Gluon dQ kernel issues each key block's dQ matmul together with the next block's S and dP, and
# computes dS under it, so the tensor cores stay busy through the softmax work. Opt-in, measured
# level or slower (bench/NOTES.md): the Gluon forward's and dQ kernel's two consumer warpgroups taking turns to issue
# their matmuls (FlashAttention-3's ping-pong schedule; the dQ kernel's needs the overlap, the
# forward's applies to one program per query tile, MGQA_TRITON_FWD_IMPL=tiles).
WS_DQ_OVERLAP = True
WS_FWD_PINGPONG = False
WS_DQ_PINGPONG = False
# Under a causal mask the persistent forward's programs take the query tiles from host-made
# first-free lists (attention_fwd_ws.forward_schedule) instead of positions p, p + P, ... (without a
# mask every tile costs the same and the two assignments are equal): in the launch model
# (bench/forward_walk_model.py) the strided walk leaves programs idle at the end because causal tiles
# cost unequal work, while handing each tile to the program that frees up first keeps them finishing
# together (measurements: bench/NOTES.md).
WS_FWD_FIRST_FREE = True


def _sections(kernel: str, causal: bool, chunk_bytes: int, device: torch.device, chunks: int = 0,
              programs_per_chunk: int = 0) -> dict:
    """SECTION_PROGRAMS and SECTION_CHUNKS for one launch (attention_common._query_block_program).

    ``chunk_bytes``: what the programs of one chunk share through L2 (one KV head's K/V for the
    query-block kernels; one group split's Q/dO for the dK/dV kernel). Without a causal mask every
    program does the same work and the plain order stays. Given the launch's ``chunks`` and
    ``programs_per_chunk``, the sections are evened out (64 chunks in 8 sections of 8, not 7 of 9
    and a last of 1, whose long programs would start last and finish alone).
    """
    if not causal or CAUSAL_ORDER == "grid" or kernel not in SECTION_KERNELS:
        return dict(SECTION_PROGRAMS=1, SECTION_CHUNKS=1)
    if FORCE_SECTION_CHUNKS is not None:
        return dict(SECTION_PROGRAMS=1 << 30, SECTION_CHUNKS=FORCE_SECTION_CHUNKS)
    if INTERPRET or not torch.cuda.is_available():
        return dict(SECTION_PROGRAMS=1 << 30, SECTION_CHUNKS=3)  # small shapes: several chunks, a ragged last
    _, sms, l2_bytes = _device_info(device)
    return section_sizes(chunk_bytes, sms, l2_bytes, chunks, programs_per_chunk, EVEN_SECTIONS)


def section_sizes(chunk_bytes: int, sms: int, l2_bytes: int, chunks: int = 0, programs_per_chunk: int = 0,
                  even: bool = True) -> dict:
    """``_sections``' SECTION_PROGRAMS and SECTION_CHUNKS for a causal launch on a device with ``sms``
    SMs and ``l2_bytes`` of L2: as many chunks per section as fit in its share of L2, evened out over
    the launch where its ``chunks`` and ``programs_per_chunk`` are given (and ``even``)."""
    per_section = max(1, int(_SECTION_L2_SHARE * l2_bytes) // max(chunk_bytes, 1))
    if chunks > 0 and programs_per_chunk > 0 and even:
        # The kernels' section: enough chunks for SECTION_PROGRAMS, at most SECTION_CHUNKS.
        section = max(min(triton.cdiv(_SECTION_WAVES * sms, programs_per_chunk), per_section), 1)
        per_section = triton.cdiv(chunks, triton.cdiv(chunks, section))
    return dict(SECTION_PROGRAMS=_SECTION_WAVES * sms, SECTION_CHUNKS=per_section)


def _dkdv_splits(batch: int, kv_heads: int, n_k: int, group: int, device: torch.device) -> int:
    """How many programs share one KV tile's group, so that few KV heads still fill the GPU.

    Each split writes an fp32 partial that is summed afterwards (deterministic, no atomics); the
    partials are (splits, B, Hkv, Nk, D), far below a (B, H, Nk, D) temporary since splits << group.
    """
    if FORCE_DKDV_SPLITS is not None:
        return FORCE_DKDV_SPLITS
    if INTERPRET or group == 1:
        return 1
    sms = _device_info(device)[1]
    programs = batch * kv_heads * triton.cdiv(n_k, 128)
    splits = 1
    while programs * splits < 2 * sms and group % (splits * 2) == 0 and splits < 8:
        splits *= 2
    return splits


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    q: (B, H, Nq, D), k and v: (B, Hkv, Nk, D), same dtype/device. Returns out (B, H, Nq, D),
    contiguous, in q's dtype, and lse (B, H, Nq) float32, log2-sum-exp of the scaled scores
    (+inf for rows that see no key).
    """
    _check(q, k, v)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    out = _empty((batch, heads, n_q, head_dim), q.dtype, q.device)
    lse = _empty((batch, heads, n_q), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    if ws_forward_reason(q, k, v, causal, scale) is None:
        kv_bytes = 2 * n_k * head_dim * q.element_size()
        _gluon_module("attention_fwd_ws").launch(q, k, v, out, lse, causal, scale * math.log2(math.e),
                                                 _sections("ws_fwd", causal, kv_bytes, q.device),
                                                 pingpong=WS_FWD_PINGPONG and FWD_IMPL == "tiles",
                                                 persistent=FWD_IMPL == "auto",
                                                 first_free=WS_FWD_FIRST_FREE and causal and FWD_IMPL == "auto")
        return out, lse
    meta = _common_meta(q, k, causal)

    def grid(cfg):
        return (batch * heads * triton.cdiv(n_q, cfg["BLOCK_M"]),)

    use_tma = _tma_ok(q, k, v)
    softmax = FWD_SOFTMAX if scale > 0 else 0
    kv_bytes = 2 * n_k * head_dim * q.element_size()
    _attn_fwd[grid](
        q, k, v, out, lse, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
        n_q, n_k, heads, scale * math.log2(math.e), USE_TMA=use_tma, SOFTMAX=softmax,
        **_sections("fwd", causal, kv_bytes, q.device), **meta,
    )
    return out, lse


def attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels: returns dq (B, H, Nq, D), dk and dv (B, Hkv, Nk, D), contiguous,
    each in its input's dtype. dK/dV are summed over each KV head's query group inside the kernel.
    dQ comes from a separate kernel, run first, which also computes each row's delta (deterministic),
    or, with ``DETERMINISTIC`` off, from fp32 atomics in the dK/dV kernel after a delta kernel."""
    _check(q, k, v)
    q, k, v, out, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    batch, heads, n_q, head_dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    dq = _empty((batch, heads, n_q, head_dim), q.dtype, q.device)
    dk = _empty((batch, kv_heads, n_k, head_dim), k.dtype, k.device)
    dv = _empty((batch, kv_heads, n_k, head_dim), v.dtype, v.device)
    if n_q == 0 or n_k == 0 or batch == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    meta = _common_meta(q, k, causal)
    qk_scale = scale * math.log2(math.e)

    delta = _empty((batch, heads, n_q), torch.float32, q.device)
    atomic_dq = not (DETERMINISTIC or torch.are_deterministic_algorithms_enabled())
    if atomic_dq:
        delta_block = 16 if INTERPRET else 64
        _attn_bwd_delta[(batch * heads, triton.cdiv(n_q, delta_block))](
            out, grad_out, delta, *_strides3(out), *_strides3(grad_out), n_q, heads,
            HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=delta_block,
        )
    elif ws_dq_reason(q, k, v, grad_out) is None:
        _gluon_module("attention_dq_ws").launch(q, k, v, grad_out, out, lse, delta, dq, causal, qk_scale, scale,
                                                _sections("ws_dq", causal, 2 * n_k * head_dim * q.element_size(),
                                                          q.device),
                                                overlap=WS_DQ_OVERLAP or WS_DQ_PINGPONG, pingpong=WS_DQ_PINGPONG)
    else:
        # The dQ kernel runs first: each of its programs owns a block of query rows, so it also
        # computes those rows' delta (sum_d O dO) for the dK/dV kernel, instead of a separate pass.
        def grid_q(cfg):
            return (batch * heads * triton.cdiv(n_q, cfg["BLOCK_M"]),)

        _attn_bwd_dq[grid_q](
            q, k, v, grad_out, out, lse, delta, dq,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out), *_strides3(out), *_strides3(dq),
            n_q, n_k, heads, qk_scale, scale, USE_TMA=_tma_ok(q, k, v),
            **_sections("dq", causal, 2 * n_k * head_dim * q.element_size(), q.device), **meta,
        )

    ws_splits = _ws_backward_plan(q, k, v, grad_out, causal)[0]
    if ws_splits:
        group_bytes = 2 * meta["GROUP"] // ws_splits * n_q * head_dim * q.element_size()  # one chunk's Q/dO
        ws = _gluon_module("attention_bwd_ws")
        # With atomics, the Gluon kernel adds dS K into a float32 buffer whose rows are padded to its
        # query step, so that the last step's rows need no mask.
        dq_acc = torch.zeros((batch, heads, triton.cdiv(n_q, ws.BLOCK_M) * ws.BLOCK_M, head_dim),
                             dtype=torch.float32, device=q.device) if atomic_dq else None
        persistent = not atomic_dq and (BWD_IMPL == "persistent" or (BWD_IMPL == "auto" and meta["GROUP"] == 1))
        ws.launch(q, k, v, grad_out, lse, delta, dk, dv, causal, qk_scale, scale,
                  _sections("dkdv", causal, group_bytes, q.device, batch * kv_heads * ws_splits,
                            triton.cdiv(n_k, 2 * ws.BLOCK_N)),
                  persistent=persistent, splits=ws_splits, dq_acc=dq_acc, tma_store=WS_DKDV_TMA_STORE)
        if atomic_dq:
            torch.mul(dq_acc[:, :, :n_q], scale, out=dq)
        return dq, dk, dv

    def grid_kv(cfg):
        return (batch * kv_heads * splits * triton.cdiv(n_k, cfg["BLOCK_N"]),)

    use_tma = _tma_ok(q, k, v, grad_out)
    splits = _dkdv_splits(batch, kv_heads, n_k, meta["GROUP"], q.device)
    if splits == 1:
        dk_part, dv_part, split_stride = dk, dv, 0
    else:
        dk_part = torch.empty((splits, batch, kv_heads, n_k, head_dim), dtype=torch.float32, device=q.device)
        dv_part = torch.empty_like(dk_part)
        split_stride = dk_part.stride(0)
    qdo_bytes = 2 * (meta["GROUP"] // splits) * n_q * head_dim * q.element_size()
    one_loop = not atomic_dq and (DKDV_ONE_LOOP == "1" or (DKDV_ONE_LOOP == "auto" and meta["GROUP"] == splits))
    # fp32 sum of dS K over key blocks (unscaled), zeroed because the kernel only adds into it.
    dq_acc = torch.zeros((batch, heads, n_q, head_dim), dtype=torch.float32, device=q.device) if atomic_dq else dq
    kernel = _attn_bwd_dkdv_dq if atomic_dq else _attn_bwd_dkdv
    kernel[grid_kv](
        q, k, v, grad_out, lse, delta, dk_part, dv_part, dq_acc,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out), split_stride,
        *(dk_part.stride(i) for i in range(-4, -1)), *_strides3(dq_acc),
        n_q, n_k, kv_heads, qk_scale, scale, SPLITS=splits, USE_TMA=use_tma, ATOMIC_DQ=atomic_dq,
        ONE_LOOP=one_loop, FLATTEN=one_loop, **_sections("dkdv", causal, qdo_bytes, q.device), **meta,
    )
    if splits > 1:
        dk.copy_(dk_part.sum(0))
        dv.copy_(dv_part.sum(0))
    if atomic_dq:
        torch.mul(dq_acc, scale, out=dq)
    return dq, dk, dv


@torch.library.custom_op("mgqa::gqa_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> tuple[
    torch.Tensor, torch.Tensor
]:
    return attention_forward(q, k, v, causal, scale)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, causal, scale):
    batch, heads, n_q, head_dim = q.shape
    out = q.new_empty((batch, heads, n_q, head_dim))
    lse = q.new_empty((batch, heads, n_q), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("mgqa::gqa_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(grad_out, q, k, v, out, lse, causal, scale)


@_bwd_op.register_fake
def _bwd_fake(grad_out, q, k, v, out, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal = causal
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _refuse_double_backward() -> None:
    if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients are not differentiable
        raise RuntimeError("triton attention: gradients of gradients (create_graph=True) are not supported; "
                           "use backend='sdpa' or 'reference' for double backward")


def _backward(ctx, grad_out, _grad_lse):
    _refuse_double_backward()
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same kernels as the custom ops, for eager mode: a custom op's dispatch costs about 0.6 ms
    of host time per forward+backward (bench/host_overhead.py), which at short sequences is longer
    than the kernels themselves and leaves the GPU waiting."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        out, lse = attention_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward()
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def triton_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: Optional[float] = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v with grouped KV heads; differentiable in q, k and v.

    q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D), H % Hkv == 0, D in (32, 64, 96, 128, 256),
    fp16/bf16 (fp32 accepted, slow). ``scale`` defaults to 1/sqrt(D). Returns (B, H, Nq, D) in
    q's dtype. Raises ValueError naming the offending value for inputs the kernels cannot run.
    """
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if torch.compiler.is_compiling():  # traced: the custom op, which torch.compile sees through
        return _fwd_op(q, k, v, bool(causal), scale)[0]
    return _EagerAttention.apply(q, k, v, bool(causal), scale)
