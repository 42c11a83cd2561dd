"""Training throughput end to end: mgqa against Hugging Face Llama with the same weights, and train.py.

    python bench/train_throughput.py                              # both shapes, every variant, raw loop
    python bench/train_throughput.py --shapes 1b --train-py       # also the same shape through train.py
    python bench/train_throughput.py --shapes 125m --impls mgqa_compiled_sdpa,hf_compiled --steps 10

One process, one GPU. Every variant runs the same optimizer step on the same random tokens: bf16
autocast over float32 weights (as Lightning's `bf16-mixed`), next-token cross-entropy, gradient
clipping at 1.0, fused AdamW. As in train.py, the clipping factor is applied inside the fused
AdamW kernel (`grad_scale`, after one norm over the gradients); `--clip separate` runs
`clip_grad_norm_` before the step instead. Variants (`--impls`):

- `mgqa_{eager,compiled}_{triton,sdpa}`: `MGQATransformer` with that attention backend, eager or with
  its blocks compiled (`MGQATransformer.compile_blocks`, what `compile=true` does in train.py), loss
  by the chunked `MGQATransformer.loss`;
- `mgqa_compiled_sdpa_full_loss`: the compiled model with the batch's full float32 logits and
  `F.cross_entropy` (what the chunked loss replaces);
- `hf_eager`, `hf_compiled`: `transformers.LlamaForCausalLM` (`attn_implementation="sdpa"`) holding
  the mgqa model's weights (q/k/v from the fused qkv rows, gate/up from `w_in`), whole model
  compiled for the latter; its fp32 logits are checked against mgqa's first.

MFU = tokens/s x (6 x non-embedding parameters + 6 x layers x heads x head_dim x seq) / the card's
dense bf16 peak (Lightning's table: 989 TFLOP/s for an H100 SXM). `--train-py` also runs
`python train.py` at each shape (Lightning, the real data path, compile on) with each of
`--train-backends` and
reads `train/tokens_per_s`, `train/mfu` and `train/peak_memory_gib` from its `metrics.csv`.

`--compile-mode` is `torch.compile`'s mode for the compiled mgqa variants and the train.py runs
(train.py's `compile_mode`); HF compiled keeps the default.

`--inductor SETTINGS` (repeatable) compares Inductor settings in one process: each occurrence,
`default` or comma-separated `KEY=VALUE` of `torch._inductor.config` (dotted keys, e.g.
`triton.persistent_reductions=False`), runs every compiled variant once more with those settings,
its row labelled with them. `--rounds N` repeats the whole list N times in the same order, so
variants alternate rather than run back to back. The train.py runs keep the default settings.

Prints a Markdown table and writes JSON (`--out`). Run from the repository root (mgqa installed, or
`PYTHONPATH=.`).
"""

from __future__ import annotations

import argparse
import ast
import csv
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from mgqa.convert.hf_export import to_hf_llama
from mgqa.lit.module import COMPILE_MODES
from mgqa.lit.step_verdict import clipping_scale
from mgqa.model import MGQATransformer, ModelConfig

ROOT = Path(__file__).resolve().parents[1]

VOCAB = 32000
SHAPES = {
    # ~1B Llama-like: 16 query / 4 KV heads of 128, SwiGLU width 5464.
    "1b": dict(dim=2048, depth=16, heads=16, kv_heads=4, seq=4096, batch=4),
    # conf/model/gqa_125m.yaml: 12 / 4 heads of 64.
    "125m": dict(dim=768, depth=12, heads=12, kv_heads=4, seq=2048, batch=8),
}
IMPLS = (
    "mgqa_eager_triton",
    "mgqa_eager_sdpa",
    "mgqa_compiled_triton",
    "mgqa_compiled_sdpa",
    "mgqa_compiled_sdpa_full_loss",
    "hf_eager",
    "hf_compiled",
)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def inductor_settings(text: str) -> dict[str, Any]:
    """`default`, or comma-separated `KEY=VALUE` of `torch._inductor.config` -> a patch for `config.patch`.

    A key must name one of its settings; the value is read as a Python literal (a bare word stays
    a string) and must have the setting's type: a boolean setting takes True/False or 1/0."""
    if text.strip() == "default":
        return {}
    import torch._inductor.config as inductor_config  # noqa: PLC0415

    known = inductor_config.get_config_copy()
    patch: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise ValueError(f"{item.strip()!r}: expected KEY=VALUE")
        if key not in known:
            raise ValueError(f"{key!r} is not a setting of torch._inductor.config")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        default = known[key]
        if isinstance(default, bool):
            if value not in (True, False) or isinstance(value, float):
                raise ValueError(f"{key}={raw}: expected True/False or 1/0")
            value = bool(value)
        elif isinstance(default, int) and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ValueError(f"{key}={raw}: expected an integer")
        patch[key] = value
    return patch


def sdpa_choice() -> str:
    """Which kernel PyTorch's SDPA dispatches a causal GQA call to on this card."""
    q = torch.randn(1, 16, 1024, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4, 1024, 128, device="cuda", dtype=torch.bfloat16)
    try:
        choice = torch._fused_sdp_choice(q, k, k, is_causal=True, enable_gqa=True)
        return str(torch.nn.attention.SDPBackend(choice).name)
    except Exception as err:  # a private API: report rather than fail
        return f"unknown ({type(err).__name__})"


def model_config(shape: dict[str, int], backend: str) -> ModelConfig:
    return ModelConfig(
        dim=shape["dim"],
        depth=shape["depth"],
        heads=shape["heads"],
        kv_heads=shape["kv_heads"],
        num_tokens=VOCAB,
        max_seq_len=shape["seq"],
        pos_emb="rotary",
        norm="rmsnorm",
        ff="swiglu",
        bias=False,
        attn_backend=backend,
    )


def logits_parity(shape: dict[str, int]) -> float:
    """Max |mgqa - HF| of float32 logits for a 2-layer model of the shape's widths (TF32 off)."""
    small = {**shape, "depth": 2}
    torch.manual_seed(0)
    model = MGQATransformer.from_config(model_config(small, "sdpa")).cuda().eval()
    hf = to_hf_llama(model).eval()
    tokens = torch.randint(0, VOCAB, (2, 256), device="cuda")
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        diff = (model(tokens) - hf(input_ids=tokens).logits).abs().max().item()
    torch.backends.cuda.matmul.allow_tf32 = previous
    return diff


def build(impl: str, shape: dict[str, int], compile_mode: str = "default") -> tuple[torch.nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor], MGQATransformer]:
    """The module to optimize, its loss function, and the mgqa model it was built from (for FLOPs)."""
    backend = "triton" if impl.endswith("triton") else "sdpa"
    torch.manual_seed(0)
    model = MGQATransformer.from_config(model_config(shape, backend)).cuda()
    if impl.startswith("hf"):
        hf = to_hf_llama(model).train()
        runner = torch.compile(hf) if impl == "hf_compiled" else hf

        def hf_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            logits = runner(input_ids=inputs).logits  # (B, N, V)
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

        return hf, hf_loss, model
    if "_compiled_" in impl:
        model.compile_blocks(mode=compile_mode)
    if impl.endswith("full_loss"):
        def full_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())

        return model, full_loss, model
    return model, model.loss, model


def profile_steps(step: Callable[[], torch.Tensor], impl: str, out_dir: Path) -> None:
    """Three steps under the PyTorch profiler: the top GPU kernels printed, a Chrome trace written."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    out_dir.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    (out_dir / f"profile_{impl}.txt").write_text(table)
    prof.export_chrome_trace(str(out_dir / f"trace_{impl}.json"))
    print(f"--- profile of {impl}, 3 steps ---\n{table}", flush=True)


def time_impl(
    impl: str, shape: dict[str, int], steps: int, warmup: int, peak_flops: float | None, profile_dir: Path | None = None,
    clip: str = "kernel", compile_mode: str = "default",
) -> dict[str, Any]:
    module, loss_fn, reference = build(impl, shape, compile_mode)
    flops_per_token = reference.training_flops_per_token(shape["seq"])
    params = reference.num_parameters()
    if module is not reference:
        del reference
    weights = list(module.parameters())
    optimizer = torch.optim.AdamW(weights, lr=1e-4, weight_decay=0.1, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    tokens = torch.randint(0, VOCAB, (shape["batch"], shape["seq"] + 1), device="cuda", generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(inputs, targets)
        loss.backward()
        if clip == "kernel":  # what train.py does with a fused optimizer (mgqa.lit.module)
            norm = torch.nn.utils.get_total_norm([w.grad for w in weights], foreach=True)
            optimizer.grad_scale = clipping_scale(norm, 1.0)
            optimizer.found_inf = (~torch.isfinite(norm)).float()
        else:
            torch.nn.utils.clip_grad_norm_(weights, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first_step_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    step_s = begin.elapsed_time(end) / 1e3 / steps
    if profile_dir is not None:
        profile_steps(step, impl, profile_dir)
    tokens_per_s = shape["batch"] * shape["seq"] / step_s
    row = {
        "impl": impl,
        "tokens_per_s": tokens_per_s,
        "step_ms": step_s * 1e3,
        "mfu": tokens_per_s * flops_per_token / peak_flops if peak_flops else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "first_step_s": first_step_s,
        "final_loss": float(loss.detach()),
        "params": params,
    }
    del module, optimizer, loss_fn, weights
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


def loss_memory(vocab: int, rows: int = 16384, dim: int = 2048, repeats: int = 10) -> list[dict[str, Any]]:
    """Peak memory and time of the LM head + loss, forward and backward, chunked against full logits."""
    from mgqa.ops import linear_cross_entropy  # noqa: PLC0415

    hidden = torch.randn(rows, dim, device="cuda", requires_grad=True)
    weight = (torch.randn(vocab, dim, device="cuda") / dim**0.5).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    variants = {
        "chunked": lambda: linear_cross_entropy(hidden, weight, targets),
        "full_logits": lambda: F.cross_entropy(F.linear(hidden, weight).float(), targets),
    }
    rows_out = []
    for name, fn in variants.items():
        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fn()
            loss.backward()
            hidden.grad = weight.grad = None

        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(repeats):
            step()
        end.record()
        torch.cuda.synchronize()
        rows_out.append({
            "impl": f"loss_{name}", "vocab": vocab, "rows": rows, "dim": dim,
            "ms": begin.elapsed_time(end) / repeats, "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
        })
        print(f"[loss] {json.dumps(rows_out[-1])}", flush=True)
    del hidden, weight
    torch.cuda.empty_cache()
    return rows_out


def train_py(shape_name: str, shape: dict[str, int], backend: str, steps: int, out_root: Path,
             compile_mode: str = "default") -> dict[str, Any]:
    """One `python train.py` run at the shape (compile on); throughput read from its metrics.csv."""
    run_name = f"bench_{shape_name}_{backend}"
    overrides = [
        "model=llama",
        f"model.dim={shape['dim']}",
        f"model.depth={shape['depth']}",
        f"model.heads={shape['heads']}",
        f"model.kv_heads={shape['kv_heads']}",
        f"model.num_tokens={VOCAB}",
        f"model.max_seq_len={shape['seq']}",
        f"model.attn_backend={backend}",
        f"data.batch_size={shape['batch']}",
        "compile=true",
        f"compile_mode={compile_mode}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=5",
        "trainer.enable_progress_bar=false",
        "~callbacks.model_checkpoint",
        "~callbacks.latest_checkpoint",
        "~callbacks.signal_checkpoint",
        "sample.max_new_tokens=1",
        f"output_root={out_root}",
        f"run_name={run_name}",
    ]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    row: dict[str, Any] = {"impl": f"train.py_compiled_{backend}", "wall_s": wall_s, "returncode": proc.returncode}
    metrics = out_root / run_name / "metrics.csv"
    if proc.returncode != 0 or not metrics.is_file():
        row["error"] = (proc.stderr or proc.stdout)[-2000:]
        return row
    with open(metrics, newline="") as fh:
        rows = list(csv.DictReader(fh))

    def column(name: str) -> list[float]:
        return [float(r[name]) for r in rows if r.get(name)]

    tokens = column("train/tokens_per_s")
    row["tokens_per_s"] = statistics.median(tokens) if tokens else None
    mfu = column("train/mfu")
    row["mfu"] = statistics.median(mfu) if mfu else None
    memory = column("train/peak_memory_gib")
    row["peak_memory_gib"] = max(memory) if memory else None
    row["windows"] = len(tokens)
    return row


def run_variant(impl: str, shape_name: str, args: argparse.Namespace, peak: float | None,
                inductor_patch: dict[str, Any]) -> dict[str, Any]:
    """One timed variant under the given Inductor settings; a failure becomes a row naming it."""
    import torch._inductor.config as inductor_config  # noqa: PLC0415

    try:
        profile_dir = Path(args.profile_dir) / shape_name if impl in args.profile.split(",") else None
        torch._dynamo.reset()  # compile afresh: settings are part of what a compiled graph was built with
        with inductor_config.patch(inductor_patch):
            return time_impl(impl, SHAPES[shape_name], args.steps, args.warmup, peak, profile_dir, args.clip,
                             args.compile_mode)
    except Exception as err:  # one failing variant must not lose the others' numbers
        torch.cuda.empty_cache()
        return {"impl": impl, "error": f"{type(err).__name__}: {err}"[:2000]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1b,125m", help=f"comma-separated, of {list(SHAPES)}")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {list(IMPLS)}")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--train-py", action="store_true", help="also run train.py at each shape, both backends")
    parser.add_argument("--train-py-only", action="store_true", help="only the train.py runs")
    parser.add_argument("--train-steps", type=int, default=40, help="optimizer steps of each train.py run")
    parser.add_argument("--train-backends", default="auto,triton", help="model.attn_backend of the train.py runs")
    parser.add_argument("--clip", choices=("kernel", "separate"), default="kernel",
                        help="gradient clipping inside the fused AdamW kernel (as train.py) or by clip_grad_norm_ first")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="torch.compile's mode for the compiled mgqa variants and train.py (its compile_mode)")
    parser.add_argument("--inductor", action="append", default=None, metavar="SETTINGS",
                        help="repeatable: `default` or KEY=VALUE,... of torch._inductor.config; each runs the "
                             "compiled variants once more, labelled")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the variants, in order, this many times")
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    parser.add_argument("--loss-vocabs", default="", help="also time the LM head + loss alone at these vocabularies")
    parser.add_argument("--profile", default="", help="comma-separated variants to profile (3 steps) after timing")
    parser.add_argument("--profile-dir", default="bench/results/profiles", help="where profiles and traces go")
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    impls = [i for i in args.impls.split(",") if i]
    for name in shapes:
        if name not in SHAPES:
            parser.error(f"unknown shape {name!r}; choose from {list(SHAPES)}")
    for name in impls:
        if name not in IMPLS:
            parser.error(f"unknown implementation {name!r}; choose from {list(IMPLS)}")
    try:
        int_list(args.loss_vocabs)
    except ValueError:
        parser.error(f"--loss-vocabs {args.loss_vocabs!r}: expected comma-separated integers")
    if args.steps < 1 or args.warmup < 1:
        parser.error(f"--steps ({args.steps}) and --warmup ({args.warmup}) must be at least 1")
    if args.rounds < 1:
        parser.error(f"--rounds ({args.rounds}) must be at least 1")
    settings_list = args.inductor or ["default"]
    try:
        inductor_patches = [(text, inductor_settings(text)) for text in settings_list]
    except ValueError as err:
        parser.error(f"--inductor: {err}")
    if not torch.cuda.is_available():
        print("error: bench/train_throughput.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from lightning.fabric.utilities.throughput import get_available_flops  # noqa: PLC0415

    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda")
    peak = get_available_flops(device, torch.bfloat16)
    card = torch.cuda.get_device_name()
    results: dict[str, Any] = {"card": card, "torch": torch.__version__, "peak_bf16_flops": peak, "vocab": VOCAB,
                               "clip": args.clip, "compile_mode": args.compile_mode, "shapes": {}}
    results["sdpa_backend"] = sdpa_choice()
    print(f"SDPA's kernel for a causal GQA bf16 call at D=128: {results['sdpa_backend']}", flush=True)
    if args.loss_vocabs:
        results["loss"] = [row for vocab in int_list(args.loss_vocabs) for row in loss_memory(vocab)]
    for name in shapes:
        shape = SHAPES[name]
        entry: dict[str, Any] = {"shape": shape, "rows": []}
        results["shapes"][name] = entry
        if not args.train_py_only:
            if any(i.startswith("hf") for i in impls):
                entry["hf_logits_max_abs_diff_fp32"] = logits_parity(shape)
                print(f"[{name}] HF logits parity (fp32, 2 layers): max |diff| {entry['hf_logits_max_abs_diff_fp32']:.2e}", flush=True)
            for _ in range(args.rounds):
                for impl in impls:
                    # Inductor's settings reach only compiled variants; an eager one runs once a round.
                    patches = inductor_patches if "compiled" in impl else inductor_patches[:1]
                    for label, patch in patches:
                        row = run_variant(impl, name, args, peak, patch)
                        if args.inductor:
                            row["inductor"] = label
                        entry["rows"].append(row)
                        print(f"[{name}] {json.dumps(row)}", flush=True)
        if args.train_py or args.train_py_only:
            with tempfile.TemporaryDirectory() as tmp:
                for backend in [b for b in args.train_backends.split(",") if b]:
                    row = train_py(name, shape, backend, args.train_steps, Path(tmp), args.compile_mode)
                    entry["rows"].append(row)
                    print(f"[{name}] {json.dumps(row)}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\n{card}, torch {torch.__version__}, bf16 autocast, vocab {VOCAB}, compile mode {args.compile_mode}; MFU against {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
    for name, entry in results["shapes"].items():
        s = entry["shape"]
        print(f"\n### {name}: dim {s['dim']}, depth {s['depth']}, {s['heads']}/{s['kv_heads']} heads, seq {s['seq']}, batch {s['batch']}")
        hf_compiled = next((r.get("tokens_per_s") for r in entry["rows"] if r["impl"] == "hf_compiled"), None)
        print("| variant | tokens/s | MFU | peak GiB | first step s | x HF compiled |")
        print("|---|---|---|---|---|---|")
        for r in entry["rows"]:
            label = f"{r['impl']} [{r['inductor']}]" if "inductor" in r else r["impl"]
            if r.get("tokens_per_s") is None:
                print(f"| {label} | failed: {r.get('error', '')[:80]!r} | | | | |")
                continue
            ratio = f"{r['tokens_per_s'] / hf_compiled:.2f}" if hf_compiled else "-"
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
            mem = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else "-"
            first = f"{r['first_step_s']:.1f}" if "first_step_s" in r else "-"
            print(f"| {label} | {r['tokens_per_s']:,.0f} | {mfu} | {mem} | {first} | {ratio} |")
    if results.get("loss"):
        print("\n### LM head + loss alone: 16384 rows of 2048, forward and backward, bf16 autocast")
        print("| vocab | variant | ms | peak extra GiB |")
        print("|---|---|---|---|")
        for r in results["loss"]:
            print(f"| {r['vocab']} | {r['impl']} | {r['ms']:.2f} | {r['peak_extra_gib']:.2f} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
