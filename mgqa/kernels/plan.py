"""The attention plan: which kernel runs each pass of one call, with which tiles, splits and order.

``plan_attention`` is the only place that chooses. It is a pure function of the call's shapes, dtype,
the device's properties and the options: no tensors, no CUDA queries, no environment. Launchers
(``launch.py``) carry a plan out; benchmarks compare plans; tests check the rules on CPU.

Each pass (forward, dQ, dK/dV) gets a ``PassPlan``:

- ``kernel``: ``"tl"`` (plain Triton: any CUDA GPU and Triton's interpreter), ``"gluon"`` (Gluon,
  warp-specialised for sm_90: one producer warp feeds two consumer warpgroups through tensor-memory
  copies) or ``"gluon_persistent"`` (the same, one program per SM walking a list of tiles);
- ``tiles``: block sizes, warps and pipeline stages (``None``: Triton's autotuner picks among
  ``tl_configs``);
- ``walk``: the launch order's sections (``Walk``), ``splits`` (dK/dV programs sharing one key tile's
  query group), ``first_free`` (the persistent forward's host-made tile lists), ``programs``.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass
from typing import Optional

__all__ = ["AttentionPlan", "DecodePlan", "DeviceProps", "KernelOptions", "PassPlan", "Tiles", "Walk", "plan_attention",
           "plan_decode"]

# Gluon kernels: tile shapes they are written for. A program of the forward and dQ kernels covers
# 2 x BLOCK_M query rows (one BLOCK_M per consumer warpgroup); one of dK/dV covers 2 x BLOCK_N keys.
GLUON_HEAD_DIMS = (128,)
GLUON_FWD_BLOCK_M, GLUON_FWD_BLOCK_N, GLUON_FWD_STAGES = 64, 128, 3  # 3 x 64 KB of K/V + 32 KB of Q
GLUON_DQ_BLOCK_M, GLUON_DQ_BLOCK_N, GLUON_DQ_STAGES = 64, 64, 4  # 4 x 32 KB of K/V + 64 KB of Q, dO
GLUON_DKDV_BLOCK_M, GLUON_DKDV_BLOCK_N = 64, 64
# dK/dV per key tile: (Q/dO buffers, lse/delta loaded one step ahead) per causal flag. Under a causal
# mask the look-ahead costs more registers than it saves.
GLUON_DKDV_STAGES = {False: (4, True), True: (3, False)}
# Persistent dK/dV: (Q/dO buffers, look-ahead, K/V buffer sets); a second K/V set loads the next
# tile's K/V while the consumers finish the current one, where shared memory has room.
GLUON_DKDV_PERSISTENT_STAGES = {False: (4, True, 1), True: (3, False, 2)}

# The Gluon forward's per-program set-up outweighs its faster tiles on short sequences.
GLUON_FWD_MIN_KEYS = 1024
# Programs per SM the Gluon dK/dV launch needs; it splits the query group (float32 partials, summed
# in a fixed order afterwards) up to GLUON_DKDV_MAX_SPLITS ways to get them, and under a causal mask
# up to CAUSAL_PROGRAMS_FACTOR times that, so that each section holds more programs than run at once
# and the longest programs do not finish alone. 8 bounds the partials to 8 x (B, Hkv, Nk, D).
GLUON_DKDV_MIN_PROGRAMS_PER_SM = 2
GLUON_DKDV_MAX_SPLITS = 8
CAUSAL_PROGRAMS_FACTOR = 2
# The tl dK/dV kernel's split rule: up to 8 splits while there are fewer than 2 programs per SM.
TL_DKDV_MAX_SPLITS = 8

# Sections of the causal launch order: programs that run at once share what fits in this share of L2,
# and a section spans at least SECTION_WAVES x SMs programs.
SECTION_L2_SHARE = 0.65
SECTION_WAVES = 4
# Cost model of the host-made persistent schedules: a tile's set-up, in its loop's steps.
FWD_TILE_SETUP_BLOCKS = 1
DKDV_TILE_SETUP_STEPS = 2
INTERPRETER_SECTION_CHUNKS = 3  # small test shapes: several chunks per section and a ragged last one

# tl kernels: (BLOCK_M, BLOCK_N, warps, stages, register cap) candidates on a GPU, fastest first on an
# H100 (docs/kernels.md); without autotuning the first that fits runs.
TL_FWD_CONFIGS = ((128, 64, 8, 3, None),  # non-causal
                  (128, 64, 4, 2, None),  # causal 4k: one warpgroup per program, two programs per SM
                  (128, 64, 8, 5, None),  # causal 8k
                  (128, 128, 8, 2, 128),  # head_dim 64: registers capped so two programs share an SM
                  (64, 64, 4, 3, None), (64, 32, 4, 2, None))
# dQ: a wide query tile stays resident while key tiles stream past it.
TL_DQ_CONFIGS = ((128, 64, 8, 4, None), (128, 64, 8, 3, None), (64, 64, 4, 2, None), (128, 128, 8, 2, None),
                 (128, 32, 4, 3, None), (64, 32, 4, 2, None))
# dK/dV: a key tile stays resident while query tiles stream past it; 64 x 64 with 4 warps (several
# programs per SM) leads.
TL_DKDV_CONFIGS = ((64, 64, 4, 2, None), (64, 64, 4, 3, None), (32, 64, 4, 3, None), (64, 128, 8, 2, None),
                   (32, 128, 4, 3, None), (32, 64, 4, 2, None))
TL_INTERPRETER_CONFIG = (16, 16, 4, 1, None)  # many small tiles exercise the masks and loops on CPU
TL_TILE_BYTES = 200 * 1024  # Q tile plus pipelined K/V tiles: above this, a config fails or spills


@dataclass(frozen=True)
class DeviceProps:
    """What the plan needs of a device. ``interpreter``: Triton's CPU interpreter (TRITON_INTERPRET=1)."""

    capability: tuple[int, int] = (0, 0)
    sms: int = 1
    l2_bytes: int = 0
    interpreter: bool = False


@dataclass(frozen=True)
class KernelOptions:
    """Choices a user may make per call (``triton_attention(..., options=)``) or per process
    (``mgqa.kernels.configure``).

    autotune: the tl kernels time their candidate tile configs on a shape's first call (Triton's
      autotuner; each candidate compiles once); off, the plan's first fitting config runs.
    gluon: the warp-specialised Gluon kernels where they apply (sm_90, head_dim 128, fp16/bf16); off,
      the plain-Triton kernels run everywhere.
    tma: tensor-descriptor loads (Hopper's copy engine) where the layout allows; the Gluon kernels
      need them.
    """

    autotune: bool = True
    gluon: bool = True
    tma: bool = True


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    maxnreg: Optional[int] = None
    prefetch: bool = False  # Gluon dK/dV: lse/delta loaded one step ahead
    kv_sets: int = 1  # persistent Gluon dK/dV: K/V buffer sets


@dataclass(frozen=True)
class Walk:
    """The launch order's sections (the kernels' SECTION_PROGRAMS and SECTION_CHUNKS): a section spans
    enough chunks for ``programs`` programs, at most ``chunks``; ``Walk()`` is the plain grid order."""

    programs: int = 1
    chunks: int = 1


@dataclass(frozen=True)
class PassPlan:
    kernel: str  # "tl", "gluon" or "gluon_persistent"
    tiles: Optional[Tiles]  # None: autotuned among tl_configs
    walk: Walk = Walk()
    tma: bool = False
    splits: int = 1  # dK/dV: programs per key tile, each over 1/splits of the query group
    one_loop: bool = False  # tl dK/dV: one masked query loop per head, flattened with the head loop
    first_free: bool = False  # persistent forward: tiles handed to the program that frees up first
    programs: int = 0  # persistent kernels: programs launched (one per SM, at most one per tile)
    reason: str = ""  # why this kernel and not the faster one, where it is not the Gluon kernel

    def describe(self) -> str:
        parts = [self.kernel]
        if self.tiles is not None:
            parts.append(f"{self.tiles.block_m}x{self.tiles.block_n}")
        elif self.kernel == "tl":
            parts.append("autotuned")
        if self.splits > 1:
            parts.append(f"{self.splits} splits")
        if self.walk != Walk():
            parts.append(f"sections {self.walk.chunks}")
        if self.first_free:
            parts.append("first-free")
        if self.reason:
            parts.append(f"({self.reason})")
        return " ".join(parts)


@dataclass(frozen=True)
class AttentionPlan:
    forward: PassPlan
    dq: PassPlan
    dkdv: PassPlan

    def describe(self) -> str:
        return f"fwd {self.forward.describe()}; dq {self.dq.describe()}; dkdv {self.dkdv.describe()}"

    def replace(self, **passes) -> "AttentionPlan":
        """This plan with some passes changed field by field: ``plan.replace(dkdv=dict(splits=2))``."""
        return dataclasses.replace(self, **{name: dataclasses.replace(getattr(self, name), **fields)
                                            for name, fields in passes.items()})


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def tl_configs(kind: str, head_dim: int, elem_bytes: int, interpreter: bool) -> list[Tiles]:
    """The candidate tiles of a tl kernel (``kind``: "fwd", "dq", "dkdv") that fit this head_dim and
    element size, fastest first; the last candidate if none fits."""
    if interpreter:
        return [Tiles(*TL_INTERPRETER_CONFIG)]
    configs = {"fwd": TL_FWD_CONFIGS, "dq": TL_DQ_CONFIGS, "dkdv": TL_DKDV_CONFIGS}[kind]
    block_d = next_power_of_2(head_dim)
    kept = [Tiles(*c) for c in configs if tile_fits(*c[:2], c[3], c[4], block_d, elem_bytes)]
    return kept or [Tiles(*configs[-1])]


def tile_fits(block_m: int, block_n: int, stages: int, maxnreg: Optional[int], block_d: int, elem_bytes: int) -> bool:
    """Whether a tl tile config fits: the Q tile plus pipelined K/V tiles within TL_TILE_BYTES, small
    register tiles for fp32 and head_dim 256, and a register cap only for tiles it was sized for."""
    if (elem_bytes == 4 or block_d >= 256) and block_m * block_n > 64 * 64:
        return False
    if maxnreg is not None and block_m * block_n * block_d > 128 * 128 * 64:
        return False
    return (block_m + 2 * block_n * max(stages, 1)) * block_d * elem_bytes <= TL_TILE_BYTES


def gluon_unsupported(head_dim: int, dtype: str, device: DeviceProps, options: KernelOptions, layout_ok: bool,
                      gluon_reason: Optional[str]) -> Optional[str]:
    """None if the Gluon kernels can run this case, else why not (one short phrase)."""
    if not options.gluon:
        return "gluon off"
    if device.interpreter:
        return "interpreter"
    if gluon_reason:
        return gluon_reason
    if device.capability != (9, 0):
        return f"sm_{device.capability[0]}{device.capability[1]}"
    if head_dim not in GLUON_HEAD_DIMS:
        return f"head_dim {head_dim}"
    if dtype not in ("float16", "bfloat16"):
        return dtype
    if not (options.tma and layout_ok):
        return "no tensor descriptors" if not options.tma else "layout unfit for tensor descriptors"
    return None


def tma_usable(head_dim: int, device: DeviceProps, options: KernelOptions, layout_ok: bool) -> bool:
    """Tensor-descriptor loads: Hopper or newer, power-of-two head_dim, a fitting layout."""
    return (options.tma and layout_ok and not device.interpreter and device.capability[0] >= 9
            and head_dim & (head_dim - 1) == 0)


def section_sizes(chunk_bytes: int, device: DeviceProps, chunks: int = 0, programs_per_chunk: int = 0) -> Walk:
    """The causal launch order's sections: as many chunks per section as share SECTION_L2_SHARE of L2
    (``chunk_bytes``: what one chunk's programs read in common), evened out over the launch where its
    ``chunks`` and ``programs_per_chunk`` are known (64 chunks in 8 sections of 8, not 7 of 9 and a last
    of 1, whose long programs would start last and finish alone)."""
    if device.interpreter:
        return Walk(1 << 30, INTERPRETER_SECTION_CHUNKS)
    per_section = max(1, int(SECTION_L2_SHARE * device.l2_bytes) // max(chunk_bytes, 1))
    if chunks > 0 and programs_per_chunk > 0:
        section = max(min(cdiv(SECTION_WAVES * device.sms, programs_per_chunk), per_section), 1)
        per_section = cdiv(chunks, cdiv(chunks, section))
    return Walk(SECTION_WAVES * device.sms, per_section)


def gluon_dkdv_group_splits(batch: int, kv_heads: int, n_k: int, group: int, min_programs: int,
                            max_splits: int) -> int:
    """The fewest group splits (a power of two dividing ``group``, at most ``max_splits``) that give
    ``min_programs`` programs of the Gluon dK/dV kernel; 0 if none does."""
    splits = 1
    while batch * kv_heads * splits * cdiv(n_k, 2 * GLUON_DKDV_BLOCK_N) < min_programs:
        if splits * 2 > max_splits or group % (splits * 2):
            return 0
        splits *= 2
    return splits


def tl_dkdv_splits(batch: int, kv_heads: int, n_k: int, group: int, device: DeviceProps) -> int:
    """Programs sharing one key tile's query group in the tl dK/dV kernel, so that few KV heads still
    fill the GPU: doubled while there are fewer than 2 programs per SM of 128 keys."""
    if device.interpreter or group == 1:
        return 1
    programs = batch * kv_heads * cdiv(n_k, 128)
    splits = 1
    while programs * splits < 2 * device.sms and group % (splits * 2) == 0 and splits < TL_DKDV_MAX_SPLITS:
        splits *= 2
    return splits


def plan_attention(batch: int, heads: int, kv_heads: int, n_q: int, n_k: int, head_dim: int, dtype: str,
                   causal: bool, scale: float, device: DeviceProps, options: KernelOptions = KernelOptions(),
                   layout_ok: bool = True, gluon_reason: Optional[str] = None) -> AttentionPlan:
    """The plan of one attention call: q (batch, heads, n_q, head_dim), k/v (batch, kv_heads, n_k,
    head_dim) of ``dtype`` ("float16", "bfloat16", "float32"). ``layout_ok``: the tensors' strides and
    base addresses suit tensor descriptors (16-byte aligned); ``gluon_reason``: why Gluon cannot be
    imported here, if it cannot."""
    group = heads // kv_heads
    elem = 4 if dtype == "float32" else 2
    no_gluon = gluon_unsupported(head_dim, dtype, device, options, layout_ok, gluon_reason)
    tma = tma_usable(head_dim, device, options, layout_ok)
    return AttentionPlan(forward=_forward(batch, heads, n_q, n_k, head_dim, elem, causal, scale, device, options,
                                          tma, no_gluon),
                         dq=_dq(head_dim, elem, device, options, tma, no_gluon),
                         dkdv=_dkdv(batch, kv_heads, n_q, n_k, head_dim, group, elem, causal, device, options, tma,
                                    no_gluon))


def _tl(kind: str, head_dim: int, elem: int, device: DeviceProps, options: KernelOptions, tma: bool,
        reason: Optional[str], **fields) -> PassPlan:
    tiles = None if options.autotune and not device.interpreter else tl_configs(kind, head_dim, elem,
                                                                                 device.interpreter)[0]
    return PassPlan("tl", tiles, tma=tma, reason=reason or "", **fields)


def _forward(batch, heads, n_q, n_k, head_dim, elem, causal, scale, device, options, tma, no_gluon) -> PassPlan:
    reason = no_gluon
    if reason is None and not scale > 0:
        reason = f"scale {scale} (the Gluon softmax folds a positive scale into exp2)"
    if reason is None and n_k < GLUON_FWD_MIN_KEYS:
        reason = f"{n_k} keys < {GLUON_FWD_MIN_KEYS}"
    if reason is not None:
        return _tl("fwd", head_dim, elem, device, options, tma, reason)
    tiles = batch * heads * cdiv(n_q, 2 * GLUON_FWD_BLOCK_M)
    return PassPlan("gluon_persistent", Tiles(GLUON_FWD_BLOCK_M, GLUON_FWD_BLOCK_N, 4, GLUON_FWD_STAGES), tma=True,
                    first_free=causal, programs=min(tiles, device.sms))


def _dq(head_dim, elem, device, options, tma, no_gluon) -> PassPlan:
    if no_gluon is not None:
        return _tl("dq", head_dim, elem, device, options, tma, no_gluon)
    return PassPlan("gluon", Tiles(GLUON_DQ_BLOCK_M, GLUON_DQ_BLOCK_N, 4, GLUON_DQ_STAGES), tma=True)


def _dkdv(batch, kv_heads, n_q, n_k, head_dim, group, elem, causal, device, options, tma, no_gluon) -> PassPlan:
    reason = no_gluon
    if reason is None:
        splits = 0
        min_programs = GLUON_DKDV_MIN_PROGRAMS_PER_SM * device.sms
        if causal:
            splits = gluon_dkdv_group_splits(batch, kv_heads, n_k, group, CAUSAL_PROGRAMS_FACTOR * min_programs,
                                             GLUON_DKDV_MAX_SPLITS)
        if splits == 0:
            splits = gluon_dkdv_group_splits(batch, kv_heads, n_k, group, min_programs, GLUON_DKDV_MAX_SPLITS)
        if splits:
            chunks, per_chunk = batch * kv_heads * splits, cdiv(n_k, 2 * GLUON_DKDV_BLOCK_N)
            group_bytes = 2 * (group // splits) * n_q * head_dim * elem  # one chunk's Q and dO
            walk = section_sizes(group_bytes, device, chunks, per_chunk) if causal else Walk()
            if group == 1:  # MHA: each tile's program covers one head, so its set-up weighs most
                stages, prefetch, kv_sets = GLUON_DKDV_PERSISTENT_STAGES[bool(causal)]
                return PassPlan("gluon_persistent", Tiles(GLUON_DKDV_BLOCK_M, GLUON_DKDV_BLOCK_N, 4, stages,
                                                          prefetch=prefetch, kv_sets=kv_sets),
                                walk=walk, tma=True, programs=min(chunks * per_chunk, device.sms))
            stages, prefetch = GLUON_DKDV_STAGES[bool(causal)]
            return PassPlan("gluon", Tiles(GLUON_DKDV_BLOCK_M, GLUON_DKDV_BLOCK_N, 4, stages, prefetch=prefetch),
                            walk=walk, tma=True, splits=splits)
        programs = batch * kv_heads * cdiv(n_k, 2 * GLUON_DKDV_BLOCK_N)
        reason = (f"{programs} key-tile programs, < {GLUON_DKDV_MIN_PROGRAMS_PER_SM}/SM with up to "
                  f"{GLUON_DKDV_MAX_SPLITS} splits")
    splits = tl_dkdv_splits(batch, kv_heads, n_k, group, device)
    qdo_bytes = 2 * (group // splits) * n_q * head_dim * elem
    walk = section_sizes(qdo_bytes, device) if causal else Walk()
    return _tl("dkdv", head_dim, elem, device, options, tma, reason, walk=walk, splits=splits,
               one_loop=group == splits)


# Decode: a few query rows per sequence against a KV cache (decode.py). A program serves one KV head
# of one sequence and every query row of its group (H / Hkv heads x Nq positions), so each K/V tile
# is read once per group; the cache is split along its length over ``splits`` programs.
DECODE_MAX_QUERIES = 8  # query rows per sequence; more is a prefill and belongs to the training kernels
DECODE_MAX_ROWS = 64  # rows per program; larger groups take several row blocks
DECODE_MAX_SPLITS = 128
DECODE_INTERPRETER_SMS = 4  # the interpreter: a few splits, so that tests exercise the combine


@dataclass(frozen=True)
class DecodePlan:
    tiles: Tiles  # block_m: query rows per program; block_n: keys per K/V tile
    row_blocks: int  # programs per (sequence, KV head)
    splits: int  # programs per row block along the cache, combined in a fixed order

    def describe(self) -> str:
        return (f"decode {self.tiles.block_m}x{self.tiles.block_n} w{self.tiles.num_warps} s{self.tiles.num_stages}, "
                f"{self.row_blocks} row block{'s' * (self.row_blocks > 1)}, {self.splits} split{'s' * (self.splits > 1)}")


def decode_tiles(head_dim: int, rows: int, dtype: str, device: DeviceProps) -> Tiles:
    """Rows per program (the group's rows, padded to a power of two, at most DECODE_MAX_ROWS), keys per
    tile, warps and stages. Two K/V tiles in flight per program (three stages of 2 x 64 x 128 x 2 bytes,
    about 70 KB of shared memory) cover HBM latency with three programs per SM; the rows x D float32
    accumulator stays in registers."""
    block_m = min(max(16, next_power_of_2(rows)), DECODE_MAX_ROWS)
    if device.interpreter:
        return Tiles(block_m, 16, 4, 1)
    block_d = max(16, next_power_of_2(head_dim))
    block_n = 64 if block_d <= 128 and dtype != "float32" else 32
    return Tiles(block_m, block_n, 4 if block_m * block_d <= 32 * 128 else 8, 3)


def decode_splits(programs: int, capacity: int, sms: int, block_n: int) -> int:
    """Cache splits per (sequence, KV head, row block). Decode is bound by memory bandwidth: aim at three
    programs per SM (what the default tiles leave resident), so every SM has loads in flight, in about
    one wave (the count rounds up, so a few programs may start in a second); never below four key
    tiles per split (a shorter split costs more in its partial output and combine than it saves); one split when the programs already fill the GPU. The count
    depends on the cache's capacity, not the current lengths, so a captured decode step keeps its grid."""
    if programs <= 0 or capacity <= 0:
        return 1
    wanted = cdiv(3 * sms, programs)
    most = max(1, cdiv(capacity, 4 * block_n))
    return max(1, min(wanted, most, DECODE_MAX_SPLITS))


def plan_decode(batch: int, heads: int, kv_heads: int, n_q: int, capacity: int, head_dim: int, dtype: str,
                device: DeviceProps, splits: Optional[int] = None) -> DecodePlan:
    """The plan of one decode call: q (batch, heads, n_q, head_dim) against a (batch, kv_heads, capacity,
    head_dim) cache. ``splits`` overrides ``decode_splits``."""
    rows = heads // kv_heads * n_q
    tiles = decode_tiles(head_dim, rows, dtype, device)
    row_blocks = cdiv(rows, tiles.block_m)
    if splits is None:
        sms = DECODE_INTERPRETER_SMS if device.interpreter else device.sms
        splits = decode_splits(batch * kv_heads * row_blocks, capacity, sms, tiles.block_n)
    return DecodePlan(tiles, row_blocks, splits)


# Host-made schedules of the persistent Gluon kernels. The launch order is the kernels' own (sections
# of chunks, longest tiles first under a causal mask); the schedule hands each position of it to the
# program that frees up first, as the hardware does with one program per tile.

def first_free_schedule(costs: list[float], programs: int) -> list[list[int]]:
    """Positions 0..len(costs)-1, in order, each given to the program that frees up first (the
    lowest-numbered on a tie): every program's list is increasing."""
    free = [(0.0, program) for program in range(programs)]
    lists: list[list[int]] = [[] for _ in range(programs)]
    for position, cost in enumerate(costs):
        time, program = heapq.heappop(free)
        lists[program].append(position)
        heapq.heappush(free, (time + cost, program))
    return lists


def query_tile_order(n_tiles: int, n_q: int, heads: int, group: int, causal: bool, walk: Walk,
                     rows: int) -> list[tuple[int, int, int, int]]:
    """(batch, KV head, member, first row) of each launch-order position of ``rows``-row query tiles:
    the query-block kernels' order (tl_common._query_block_at) on the host."""
    num_m = cdiv(n_q, rows)
    per_kv = group * num_m
    n_chunks = n_tiles // per_kv
    kv_heads = heads // group
    section = max(min(cdiv(walk.programs, per_kv), walk.chunks), 1)
    order = []
    for pid in range(n_tiles):
        first = pid // (section * per_kv) * section
        within = pid - first * per_kv
        per_block = min(section, n_chunks - first) * group
        pid_m, rest = divmod(within, per_block)
        if causal:
            pid_m = num_m - 1 - pid_m
        pid_bkv = first + rest // group
        order.append((pid_bkv // kv_heads, pid_bkv % kv_heads, rest % group, pid_m * rows))
    return order


def key_tile_order(num_n: int, n_chunks: int, walk: Walk) -> list[tuple[int, int]]:
    """(chunk, key tile) of each launch-order position: the key-block kernels' order
    (tl_common._key_block_program with one split) on the host."""
    section = max(min(cdiv(walk.programs, num_n), walk.chunks), 1)
    order = []
    for tile in range(num_n * n_chunks):
        first = tile // (section * num_n) * section
        within = tile - first * num_n
        count = min(section, n_chunks - first)
        order.append((first + within % count, within // count))
    return order


def forward_tile_blocks(first_row: int, n_q: int, n_k: int, causal: bool) -> int:
    """Key blocks the Gluon forward's query tile from ``first_row`` streams."""
    hi = min(max(first_row + 2 * GLUON_FWD_BLOCK_M + n_k - n_q, 0), n_k) if causal else n_k
    return cdiv(hi, GLUON_FWD_BLOCK_N)


def dkdv_tile_steps(pid_n: int, n_q: int, n_k: int, causal: bool) -> int:
    """Query steps of one head for the Gluon dK/dV kernel's key tile ``pid_n``."""
    lo = max(pid_n * 2 * GLUON_DKDV_BLOCK_N - (n_k - n_q), 0) // GLUON_DKDV_BLOCK_M * GLUON_DKDV_BLOCK_M if causal else 0
    return cdiv(n_q - lo, GLUON_DKDV_BLOCK_M)


def forward_schedule(batch: int, heads: int, kv_heads: int, n_q: int, n_k: int, causal: bool, programs: int,
                     walk: Walk) -> tuple[list[list[int]], list[int]]:
    """(lists, entries) of the first-free persistent forward: program p takes launch-order positions
    ``entries[i]`` for i in ``lists[p]``."""
    n_tiles = batch * heads * cdiv(n_q, 2 * GLUON_FWD_BLOCK_M)
    order = query_tile_order(n_tiles, n_q, heads, heads // kv_heads, causal, walk, 2 * GLUON_FWD_BLOCK_M)
    costs = [forward_tile_blocks(row, n_q, n_k, causal) + FWD_TILE_SETUP_BLOCKS for _, _, _, row in order]
    return first_free_schedule(costs, programs), list(range(n_tiles))


def dkdv_schedule(batch: int, kv_heads: int, n_q: int, n_k: int, group: int, causal: bool, programs: int,
                  walk: Walk) -> tuple[list[list[int]], list[int]]:
    """(lists, entries) of the persistent dK/dV: program p takes tiles ``entries[i]`` (each
    ``chunk * num_n + key tile``) for i in ``lists[p]``."""
    num_n = cdiv(n_k, 2 * GLUON_DKDV_BLOCK_N)
    order = key_tile_order(num_n, batch * kv_heads, walk)
    costs = [group * dkdv_tile_steps(pid_n, n_q, n_k, causal) + DKDV_TILE_SETUP_STEPS for _, pid_n in order]
    return first_free_schedule(costs, programs), [chunk * num_n + pid_n for chunk, pid_n in order]
