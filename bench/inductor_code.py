"""Inductor's generated code for one decoder block on an H100, written on any machine: no GPU needed.

    python bench/inductor_code.py --shape 125m
    python bench/inductor_code.py --shape 1b --batch 1 --inductor triton.persistent_reductions=False
    python bench/inductor_code.py --shape 125m --attention triton --seq 256 --batch 1

One block of `bench/train_throughput.py`'s shape runs forward and backward on the CPU, under bf16
autocast, through Inductor's own passes before lowering (decompositions, joint-graph passes, the
min-cut partition into a forward and a backward graph). Each of the two graphs is then lowered
again for CUDA, on fake tensors, with the device's queries answered as an H100's (sm_90, 132 SMs):
Inductor makes the fusions, layouts and kernel choices it makes on the card. Nothing is compiled
for or run on a GPU.

Writes `OUT/fw.py` and `OUT/bw.py` (Inductor's wrapper with every kernel's Triton source) and prints
each kernel with the model's operations it fuses: what to read before writing a kernel that must
beat compile's. Two things differ from the card: attention is an extern call to the CPU's SDPA kernel
(on the card, cuDNN's), or with `--attention triton` to mgqa's custom ops, which then run in Triton's
interpreter during the capture (slow: `--seq 256 --batch 1` takes about half a minute on two cores);
and the projections' float32 weight-gradient product (`mgqa.ops.linear`) is put back as CUDA's
`mm(..., out_dtype=float32)`. On a GPU, `bench/kernel_bandwidth.py --code-dir` writes the kernels
that ran, with their times.

It answers Inductor's device queries by replacing private torch functions for the length of the
run; a torch release that moves them fails with the name of what is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# The card the code is generated for.
H100 = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132, total_memory=80 * 2**30,
    max_threads_per_multi_processor=2048, max_threads_per_block=1024, regs_per_multiprocessor=65536,
    warp_size=32, shared_memory_per_block_optin=232448, L2_cache_size=50 * 2**20, gcnArchName="",
)
# The model's operations a kernel fuses, in Inductor's comment over it.
_SOURCE_NODES = re.compile(r"# Topologically Sorted Source Nodes: \[([^\]]*)\]")


class _Generated(Exception):
    """Carries a graph's generated module out of Inductor, which would load and run it next."""


@contextlib.contextmanager
def _patched(target: Any, name: str, value: Any) -> Iterator[None]:
    if not hasattr(target, name):
        raise RuntimeError(f"torch {torch.__version__}: {getattr(target, '__name__', target)}.{name} is missing")
    old = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, old)


@contextlib.contextmanager
def h100_answers() -> Iterator[None]:
    """Within: Inductor lowers for an H100 on a machine without one, and hands back the generated
    module (as `_Generated`) instead of compiling its kernels and loading it."""
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler.compiler import make_backend  # noqa: PLC0415

    device_interface = importlib.import_module("torch._dynamo.device_interface").CudaInterface
    backend = make_backend(GPUTarget("cuda", 90, 32))

    def generated(key: str, path: str, *args: Any, **kwargs: Any) -> None:
        raise _Generated(Path(path).read_text())

    def not_compiled(self: Any, kernel_name: str, *args: Any, **kwargs: Any) -> Any:
        return types.SimpleNamespace(name=kernel_name)

    def checked_without_copy(inp: Any, src: Any, view_ops: Any) -> Any:
        # The pass checks a scatter's shapes by copying fake CUDA tensors, which needs a CUDA build.
        try:
            return scatter(inp, src, view_ops)
        except RuntimeError:
            return inp

    reinplace = importlib.import_module("torch._inductor.fx_passes.reinplace")
    scatter = reinplace._inplace_generalized_scatter
    triton_utils = importlib.import_module("torch.utils._triton")
    patches = [
        (torch.cuda, "get_device_properties", lambda *a, **k: H100),
        (torch.cuda, "get_device_capability", lambda *a, **k: (9, 0)),
        (torch.cuda, "is_available", lambda: True),
        (torch.cuda, "device_count", lambda: 1),
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "get_rng_state", lambda *a, **k: torch.zeros(16, dtype=torch.uint8)),
        (torch.cuda, "set_rng_state", lambda *a, **k: None),
        (torch.cuda, "_exchange_device", lambda index: 0),
        (torch.cuda, "_maybe_exchange_device", lambda index: 0),
        (device_interface, "get_device_properties", staticmethod(lambda *a, **k: H100)),
        (device_interface, "get_compute_capability", staticmethod(lambda *a, **k: 90)),
        (device_interface, "is_available", staticmethod(lambda: True)),
        (device_interface, "current_device", staticmethod(lambda: 0)),
        (device_interface.Worker, "get_device_properties", staticmethod(lambda *a, **k: H100)),
        (device_interface.Worker, "current_device", staticmethod(lambda: 0)),
        (triton_utils, "triton_backend", lambda: backend),
        (triton_utils, "triton_hash_with_backend", lambda: "H100"),
        (reinplace, "_inplace_generalized_scatter", checked_without_copy),
        (importlib.import_module("torch._inductor.async_compile").AsyncCompile, "triton", not_compiled),
        (importlib.import_module("torch._inductor.codecache").PyCodeCache, "load_by_key_path", staticmethod(generated)),
    ]
    # Modules that imported these functions by name hold their own references.
    for module in [m for name, m in list(sys.modules.items()) if name.startswith("torch._inductor") and m is not None]:
        for name, value in (("has_triton", lambda *a, **k: True), ("triton_backend", lambda: backend),
                            ("triton_hash_with_backend", lambda: "H100")):
            if hasattr(module, name):
                patches.append((module, name, value))
    with contextlib.ExitStack() as stack:
        for target, name, value in patches:
            stack.enter_context(_patched(target, name, value))
        yield


def capture_block(shape: dict[str, int], batch: int,
                  attention: str = "sdpa") -> dict[str, tuple[torch.fx.GraphModule, list[Any]]]:
    """The forward and backward graphs Inductor would lower for one block of ``shape`` with the
    ``attention`` backend, captured on the CPU under bf16 autocast (run there as they are; mgqa's
    Triton kernels need ``TRITON_INTERPRET=1`` set before they are imported)."""
    from functorch.compile import make_boxed_func  # noqa: PLC0415
    from torch._inductor.compile_fx import compile_fx  # noqa: PLC0415

    from mgqa.model import MGQATransformer, ModelConfig  # noqa: PLC0415
    from mgqa.ops import projection  # noqa: PLC0415

    config = ModelConfig(dim=shape["dim"], depth=1, heads=shape["heads"], kv_heads=shape["kv_heads"], num_tokens=256,
                         max_seq_len=shape["seq"], pos_emb="rotary", norm="rmsnorm", ff="swiglu", bias=False,
                         attn_backend=attention)
    model = MGQATransformer.from_config(config)
    block = model.attn_layers.blocks[0]
    graphs: dict[str, tuple[torch.fx.GraphModule, list[Any]]] = {}

    def keep(gm: torch.fx.GraphModule, inputs: list[Any], **kwargs: Any) -> Any:
        graphs["bw" if kwargs.get("is_backward") else "fw"] = (gm, list(inputs))
        return make_boxed_func(gm.forward)

    compiled = torch.compile(lambda x, cos, sin: block(x, rope=(cos, sin)), fullgraph=True,
                             backend=lambda gm, inputs: compile_fx(gm, inputs, inner_compile=keep))
    x = torch.randn(batch, shape["seq"], shape["dim"], requires_grad=True)
    cos, sin = model.rotary(torch.arange(shape["seq"]))
    # On CUDA the weight gradient is one product with a float32 output, which has no CPU kernel:
    # a stand-in op marks it, put back as aten.mm.dtype before lowering.
    with _patched(projection, "_wide_mm", lambda a, b: torch.ops.mgqa_bench.wide_mm(a, b)), \
            torch.autocast("cpu", torch.bfloat16):
        out = compiled(x, cos, sin)
    out.float().sum().backward()
    for gm, _ in graphs.values():
        for node in gm.graph.nodes:
            if node.target is torch.ops.mgqa_bench.wide_mm.default:
                node.target, node.args = torch.ops.aten.mm.dtype, (*node.args, torch.float32)
        gm.recompile()
    return graphs


@torch.library.custom_op("mgqa_bench::wide_mm", mutates_args=())
def _wide_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a.float(), b.float())


@_wide_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)


def cuda_code(gm: torch.fx.GraphModule, inputs: list[Any], is_backward: bool, settings: dict[str, Any]) -> str:
    """The module Inductor generates for ``gm`` on an H100: its wrapper and every kernel's source."""
    import torch._inductor.config as inductor_config  # noqa: PLC0415
    from torch._inductor.compile_fx import compile_fx_inner  # noqa: PLC0415
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp  # noqa: PLC0415

    cuda = torch.device("cuda")
    for node in gm.graph.nodes:
        node.args = tuple(cuda if isinstance(a, torch.device) else a for a in node.args)
        node.kwargs = {k: cuda if isinstance(v, torch.device) else v for k, v in node.kwargs.items()}
    gm.recompile()
    mode = FakeTensorMode()
    with mode:
        fake = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=cuda) if isinstance(t, torch.Tensor) else t
                for t in inputs]
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake)
    try:
        with mode, inductor_config.patch(settings):
            compile_fx_inner(gm, fake, is_backward=is_backward)
    except Exception as err:  # the generated module travels out as the innermost cause
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, _Generated):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        return str(cause.args[0])
    raise RuntimeError("Inductor finished without generating a module")


def kernels(code: str) -> list[tuple[str, str]]:
    """(kernel name, the model's operations it fuses) for each Triton kernel of a generated module."""
    from kernel_bandwidth import kernel_sources  # noqa: PLC0415 (a sibling script: bench/ is on the path)

    return [(name, ", ".join(_SOURCE_NODES.findall(source))) for name, source in kernel_sources(code).items()]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="125m", help="1b or 125m (bench/train_throughput.py's shapes)")
    parser.add_argument("--batch", type=int, default=0, help="sequences (default: the shape's batch)")
    parser.add_argument("--seq", type=int, default=0, help="tokens a sequence (default: the shape's)")
    parser.add_argument("--attention", default="sdpa", choices=("sdpa", "triton"),
                        help="the block's attention backend (triton: mgqa's kernels, in Triton's interpreter here)")
    parser.add_argument("--out", default="", help="directory for fw.py and bw.py (default outputs/inductor_code/<shape>)")
    parser.add_argument("--inductor", default="default", metavar="SETTINGS",
                        help="KEY=VALUE,... of torch._inductor.config to lower under (default: its defaults)")
    args = parser.parse_args(argv)
    if args.attention == "triton":  # the capture runs on the CPU
        os.environ["TRITON_INTERPRET"] = "1"  # read as mgqa's kernels are first imported, below
    import train_throughput as tt  # noqa: PLC0415

    if args.shape not in tt.SHAPES:
        parser.error(f"unknown shape {args.shape!r}; choose from {list(tt.SHAPES)}")
    for name in ("batch", "seq"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    try:
        settings = tt.inductor_settings(args.inductor)
    except ValueError as err:
        parser.error(f"--inductor: {err}")
    shape = {**tt.SHAPES[args.shape], **({"seq": args.seq} if args.seq else {})}
    batch = args.batch or shape["batch"]
    out = Path(args.out or f"outputs/inductor_code/{args.shape}")
    print(f"one block of {args.shape} (batch {batch} x {shape['seq']}, {args.attention} attention), bf16 autocast, "
          "on the CPU ...", flush=True)
    graphs = capture_block(shape, batch, args.attention)
    out.mkdir(parents=True, exist_ok=True)
    with h100_answers():
        for name in ("fw", "bw"):
            gm, inputs = graphs[name]
            code = cuda_code(gm, inputs, name == "bw", settings)
            (out / f"{name}.py").write_text(code)
            found = kernels(code)
            print(f"\n{'forward' if name == 'fw' else 'backward'}: {len(found)} Triton kernels ({out / f'{name}.py'})")
            for kernel, nodes in found:
                print(f"  {kernel}\n      fuses: {nodes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
