"""Decoding: mgqa's GQA decode kernel and generation loop against PyTorch's and Hugging Face's.

Sections (``--sections``, all by default), each printed as a table and written into ``--out``:

- ``check``: the decode kernel against the float32 reference (bf16 and fp16, D=64 and 128, one and
  four queries, per-sequence lengths); greedy tokens of the graph-captured ``generate`` against
  the uncached path (float32) and against Hugging Face ``LlamaForCausalLM`` with the same weights.
- ``attention``: one query per sequence against a KV cache, at the issue's shapes: mgqa's kernel,
  SDPA flash, SDPA cuDNN and FlexAttention (compiled), all ``enable_gqa=True``. Effective bandwidth =
  bytes of K and V read / time, beside the card's device-to-device copy bandwidth (read + write).
- ``generation``: tokens/s of a ~1B Llama-like model (dim 2048, depth 16, 16 query / 4 KV heads,
  SwiGLU 8192, vocabulary 32000; random weights), greedy, prompt 512, 256 new tokens, batch 1 and
  16: mgqa (CUDA graph; CUDA graph + compiled step) against HF with the same weights (dynamic
  cache, eager; static cache, which HF's ``generate`` compiles with ``torch.compile``).
- ``kv``: the same family with 32 query heads (D=64) at kv_heads 1..32: tokens/s and KV-cache bytes
  per token (the GQA paper's Fig. 6).

    python bench/decode.py --out bench/results/decode_h100.json
    python bench/decode.py --sections attention,check --quick
    python bench/decode.py --smoke --out /tmp/decode_smoke.json   # CPU, tiny, Triton's interpreter

A peer that refuses a shape, or is not installed, is recorded with the reason and the run goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

SECTIONS = ("check", "attention", "generation", "kv")
ATTENTION_SHAPES = [  # (label, B, H, Hkv, D, context)
    ("B32 H32/8 8k", 32, 32, 8, 128, 8192),
    ("B8 H32/4 32k", 8, 32, 4, 128, 32768),
    ("B1 H32/8 128k", 1, 32, 8, 128, 131072),
    ("MQA B64 4k", 64, 32, 1, 128, 4096),
    # Lengths spread over 512..8k in an 8k cache: mgqa reads each sequence's own keys; the peers,
    # without per-sequence lengths, read the padded cache. GB/s counts the valid K/V bytes.
    ("ragged B32 H32/8 8k", 32, 32, 8, 128, 8192),
]
LONG_CONTEXT = ("B8 H32/4 32k", "B1 H32/8 128k")
SMOKE_SHAPES = [("smoke B2 H8/2 80", 2, 8, 2, 64, 80), ("smoke MQA B3 96", 3, 8, 1, 32, 96),
                ("ragged smoke B3 H8/2 64", 3, 8, 2, 64, 64)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="generation: 64 new tokens, no compiled mgqa step; kv: 3 values")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton's interpreter), for CI")
    parser.add_argument("--batches", default="1,16", help="generation batch sizes")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated per sequence")
    parser.add_argument("--kv-heads", default="1,2,4,8,16,32", help="kv section: KV head counts (divisors of 32)")
    parser.add_argument("--splits", default="", help="attention: also time mgqa with these fixed split counts")
    parser.add_argument("--configs", default="",
                        help="attention: also time mgqa with these launch settings, BLOCK_N:stages:warps,... e.g. 128:2:4")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls per row (median)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        parser.error(f"--sections {args.sections!r}: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    args.sections = sections
    args.batches = _int_list(parser, "batches", args.batches)
    args.kv_heads = _int_list(parser, "kv-heads", args.kv_heads)
    if any(32 % k for k in args.kv_heads):
        parser.error(f"--kv-heads: {[k for k in args.kv_heads if 32 % k]} do not divide 32 query heads")
    args.splits = _int_list(parser, "splits", args.splits) if args.splits else []
    configs = []
    for text in filter(None, (part.strip() for part in args.configs.split(","))):
        values = text.split(":")
        if len(values) != 3 or not all(v.isdigit() and int(v) > 0 for v in values) or int(values[0]) & (int(values[0]) - 1):
            parser.error(f"--configs {text!r}: expected BLOCK_N:stages:warps, positive integers, BLOCK_N a power of two")
        configs.append(tuple(int(v) for v in values))
    args.configs = configs
    for name in ("prompt", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def _int_list(parser: argparse.ArgumentParser, name: str, text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--{name} {text!r}: expected comma-separated integers")
    if not values or min(values) < 1:
        parser.error(f"--{name} {text!r}: expected positive integers")
    return values


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


# ---------------------------------------------------------------------------------------------- timing

def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call_ms(fn: Callable[[], Any], device, min_calls: int = 2) -> float:
    """Median milliseconds per call: CUDA events on a GPU (triton's do_bench), the wall clock on CPU."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(min_calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device) -> Optional[float]:
    """Device-to-device copy of 2 GiB, (read + write) bytes / time: the card's practical ceiling.

    Imports what it needs itself, so that other benchmarks can call it (bench/kernel_bandwidth.py)."""
    if device.type != "cuda":
        return None
    import torch  # noqa: PLC0415
    import triton.testing  # noqa: PLC0415

    src = torch.empty(1 << 31, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    del src, dst
    return 2 * (1 << 31) / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------- attention

def _peers(device) -> dict[str, Callable]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def run(q, k, v, lengths):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return run

    flex_compiled = {}

    def flex(q, k, v, lengths):
        from torch.nn.attention.flex_attention import flex_attention

        if "fn" not in flex_compiled:
            flex_compiled["fn"] = torch.compile(flex_attention, dynamic=False)
        return flex_compiled["fn"](q, k, v, enable_gqa=True)

    def mgqa(q, k, v, lengths, splits=None, launch=None):
        if launch is None:
            return decode_kernels.decode_attention(q, k, v, lengths, splits=splits)
        block_n, stages, warps = launch  # a candidate tile config: the default plan with its tiles replaced
        plan = decode_kernels.decode_plan_for(q, k, splits)
        plan = dataclasses.replace(plan, tiles=dataclasses.replace(plan.tiles, block_n=block_n, num_stages=stages,
                                                                   num_warps=warps))
        return decode_kernels.decode_attention(q, k, v, lengths, plan=plan)

    impls: dict[str, Callable] = {"mgqa": mgqa}
    if device.type == "cuda":
        impls.update(sdpa_flash=sdpa(SDPBackend.FLASH_ATTENTION), sdpa_cudnn=sdpa(SDPBackend.CUDNN_ATTENTION), flex=flex)
    return impls


def _config_name(config: tuple[int, int, int]) -> str:
    return "mgqa_n{}s{}w{}".format(*config)


def attention_section(args, device, dtype) -> dict:
    shapes = SMOKE_SHAPES if args.smoke else ATTENTION_SHAPES
    impls = _peers(device)
    copy_gbs = copy_bandwidth_gbs(device)
    rows = []
    for label, batch, heads, kv_heads, head_dim, context in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype, generator=gen)
        k = torch.randn(batch, kv_heads, context, head_dim, device=device, dtype=dtype, generator=gen)
        v = torch.randn(batch, kv_heads, context, head_dim, device=device, dtype=dtype, generator=gen)
        lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
        ragged = label.startswith("ragged")
        if ragged:
            lengths = torch.linspace(context // 16, context, batch, device=device).round().to(torch.int32)
        kv_bytes = 2 * int(lengths.sum()) * kv_heads * head_dim * k.element_size()
        expected = reference_decode_attention(q, k, v, lengths).float()  # float32 math
        row = {"shape": label, "B": batch, "H": heads, "Hkv": kv_heads, "D": head_dim, "context": context,
               "kv_bytes": kv_bytes, "mean_length": float(lengths.float().mean()), "results": {}}
        variants = [(name, fn, {}) for name, fn in impls.items()]
        variants += [(f"mgqa_splits{s}", impls["mgqa"], {"splits": s}) for s in args.splits]
        variants += [(_config_name(c), impls["mgqa"], {"launch": c}) for c in args.configs]
        if device.type != "cuda":
            for name in ("sdpa_flash", "sdpa_cudnn", "flex"):
                row["results"][name] = {"skipped": "needs a CUDA GPU"}
        for name, fn, extra in variants:
            try:
                out = fn(q, k, v, lengths, **extra)
                # Peers attend over the whole padded cache: no reference to compare with on ragged rows.
                err = None if ragged and not name.startswith("mgqa") else \
                    ((out.float() - expected).norm() / expected.norm()).item()
                ms = time_call_ms(lambda: fn(q, k, v, lengths, **extra), device)
                row["results"][name] = {"ms": ms, "gbs": kv_bytes / (ms * 1e-3) / 1e9, "rel_err": err}
            except Exception as err:  # a peer refusing a shape is a result, not a crash
                row["results"][name] = {"skipped": _error(err)}
        peers = [r["gbs"] for n, r in row["results"].items() if not n.startswith("mgqa") and "gbs" in r]
        mine = row["results"]["mgqa"].get("gbs")
        row["vs_best_peer"] = mine / max(peers) if peers and mine else None
        row["of_copy_bandwidth"] = mine / copy_gbs if copy_gbs and mine and not ragged else None
        rows.append(row)
        del q, k, v
    names = list(impls) + [f"mgqa_splits{s}" for s in args.splits] + [_config_name(c) for c in args.configs]
    print(f"\nDecode attention, {dtype_name(dtype)}, one query per sequence; GB/s = K+V bytes / time"
          + (f"; copy bandwidth {copy_gbs:.0f} GB/s" if copy_gbs else ""))
    print(f"{'shape':24s}" + "".join(f"{n:>14s}" for n in names) + f"{'x best peer':>12s}{'of copy':>9s}")
    for row in rows:
        cells = "".join(f"{row['results'][n]['gbs']:14.0f}" if "gbs" in row["results"].get(n, {}) else f"{'-':>14s}"
                        for n in names)
        ratio = f"{row['vs_best_peer']:12.2f}" if row["vs_best_peer"] else f"{'-':>12s}"
        copy = f"{row['of_copy_bandwidth']:9.0%}" if row["of_copy_bandwidth"] else f"{'-':>9s}"
        print(f"{row['shape']:24s}{cells}{ratio}{copy}")
    for row in rows:
        for name, r in row["results"].items():
            if "skipped" in r:
                print(f"  {row['shape']}: {name} skipped ({r['skipped']})")
    targets = {
        "x1.1 best peer at every shape": all((r["vs_best_peer"] or 0) >= 1.1 for r in rows
                                              if not r["shape"].startswith("ragged")) if copy_gbs else None,
        "85% of copy bandwidth at long context": all((r["of_copy_bandwidth"] or 0) >= 0.85 for r in rows
                                                     if r["shape"] in LONG_CONTEXT) if copy_gbs else None,
    }
    return {"copy_bandwidth_gbs": copy_gbs, "rows": rows, "targets": targets}


# ---------------------------------------------------------------------------------------------- models

def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def time_generate(fn: Callable[[], torch.Tensor], device, repeats: int) -> tuple[float, torch.Tensor]:
    """(median seconds of ``repeats`` calls after one warm-up call, the last call's tokens)."""
    out = fn()  # warm-up: compiles kernels, tunes, captures
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def generation_rows(model, hf, batches, prompt_len, new_tokens, device, impls, repeats) -> list[dict]:
    rows = []
    for batch in batches:
        gen = torch.Generator(device=device).manual_seed(batch)
        prompt = torch.randint(0, model.config.num_tokens, (batch, prompt_len), device=device, generator=gen)
        runs = {
            "mgqa": lambda: model.generate(prompt, new_tokens, temperature=0.0),
            "mgqa_compiled": lambda: model.generate(prompt, new_tokens, temperature=0.0, compile_step=True),
            "mgqa_eager": lambda: model.generate(prompt, new_tokens, temperature=0.0, cuda_graph=False),
            "hf_dynamic": lambda: hf_generate(hf, prompt, new_tokens, static=False),
            "hf_static_compile": lambda: hf_generate(hf, prompt, new_tokens, static=True),
        }
        row = {"batch": batch, "prompt": prompt_len, "new_tokens": new_tokens, "results": {}}
        tokens = {}
        for name in impls:
            if name.startswith("hf") and isinstance(hf, str):
                row["results"][name] = {"skipped": hf}
                continue
            if name in ("mgqa_compiled", "hf_static_compile") and device.type != "cuda":
                row["results"][name] = {"skipped": "needs a CUDA GPU"}
                continue
            try:
                seconds, tokens[name] = time_generate(runs[name], device, repeats)
                row["results"][name] = {"s": seconds, "tokens_per_s": batch * new_tokens / seconds}
            except Exception as err:
                row["results"][name] = {"skipped": _error(err)}
                traceback.print_exc()
        if "mgqa" in tokens:
            for name, out in tokens.items():
                row["results"][name]["same_tokens_as_mgqa"] = float((out == tokens["mgqa"]).float().mean())
        mine = row["results"].get("mgqa", {}).get("tokens_per_s")
        for peer in ("hf_dynamic", "hf_static_compile"):
            theirs = row["results"].get(peer, {}).get("tokens_per_s")
            best = max(row["results"].get(n, {}).get("tokens_per_s", 0) for n in ("mgqa", "mgqa_compiled"))
            row[f"x_{peer}"] = best / theirs if theirs and mine else None
        rows.append(row)
    return rows


def print_generation(rows, title) -> None:
    names = list(rows[0]["results"]) if rows else []
    print(f"\n{title}: tokens/s")
    print(f"{'batch':>6s}" + "".join(f"{n:>19s}" for n in names) + f"{'x hf eager':>11s}{'x hf static':>12s}")
    for row in rows:
        cells = "".join(f"{row['results'][n]['tokens_per_s']:19.0f}" if "tokens_per_s" in row["results"][n]
                        else f"{'-':>19s}" for n in names)
        ratios = "".join(f"{row[k]:11.2f}" if row[k] else f"{'-':>11s}" for k in ("x_hf_dynamic", "x_hf_static_compile"))
        print(f"{row['batch']:6d}{cells}{ratios}")
        for name, r in row["results"].items():
            if "skipped" in r:
                print(f"  batch {row['batch']}: {name} skipped ({r['skipped']})")


def generation_section(args, device, dtype) -> dict:
    shape = MODEL_SMOKE if args.smoke else MODEL_1B
    prompt_len, new_tokens = (8, 4) if args.smoke else (args.prompt, 64 if args.quick else args.new_tokens)
    batches = [2] if args.smoke else args.batches
    model = build_mgqa(shape, prompt_len + new_tokens, device, dtype)
    hf = hf_or_reason(model, dtype)
    impls = ["mgqa", "hf_dynamic", "hf_static_compile"]
    if device.type == "cuda":
        impls.insert(1, "mgqa_eager")  # on CPU "mgqa" is the eager step already
    if device.type == "cuda" and not args.quick:
        impls.insert(1, "mgqa_compiled")
    rows = generation_rows(model, hf, batches, prompt_len, new_tokens, device, impls, 1 if args.smoke else args.repeats)
    params = model.num_parameters()
    print_generation(rows, f"Generation, {params / 1e9:.2f}B parameters, {dtype_name(dtype)}, greedy, prompt {prompt_len}, "
                           f"{new_tokens} new tokens")
    targets = {"x3 hf eager": all((r["x_hf_dynamic"] or 0) >= 3 for r in rows) if device.type == "cuda" else None,
               "x1.2 hf static+compile": all((r["x_hf_static_compile"] or 0) >= 1.2 for r in rows)
               if device.type == "cuda" else None}
    return {"model": {**shape, "parameters": params}, "rows": rows, "targets": targets}


def kv_section(args, device, dtype) -> dict:
    base = dict(MODEL_SMOKE, heads=4) if args.smoke else dict(MODEL_1B, heads=32)
    kv_list = [1, 4] if args.smoke else ([1, 4, 32] if args.quick else args.kv_heads)
    prompt_len, new_tokens = (8, 4) if args.smoke else (args.prompt, 64 if args.quick else args.new_tokens)
    batch = 2 if args.smoke else max(args.batches)
    rows = []
    for kv_heads in kv_list:
        if base["heads"] % kv_heads:
            continue
        model = build_mgqa(dict(base, kv_heads=kv_heads), prompt_len + new_tokens, device, dtype)
        gen = torch.Generator(device=device).manual_seed(0)
        prompt = torch.randint(0, base["num_tokens"], (batch, prompt_len), device=device, generator=gen)
        row = {"kv_heads": kv_heads, "kv_bytes_per_token": model.kv_cache_bytes_per_token(dtype),
               "parameters": model.num_parameters()}
        try:
            seconds, _ = time_generate(lambda: model.generate(prompt, new_tokens, temperature=0.0), device,
                                       1 if args.smoke else args.repeats)
            row["tokens_per_s"] = batch * new_tokens / seconds
        except Exception as err:
            row["skipped"] = _error(err)
        rows.append(row)
        del model
    print(f"\nAcross kv_heads ({base['heads']} query heads, batch {batch}, prompt {prompt_len}, {new_tokens} new tokens)")
    print(f"{'kv_heads':>9s}{'KV bytes/token':>16s}{'tokens/s':>10s}{'params (M)':>12s}")
    for row in rows:
        tps = f"{row['tokens_per_s']:10.0f}" if "tokens_per_s" in row else f"{'-':>10s}"
        print(f"{row['kv_heads']:9d}{row['kv_bytes_per_token']:16d}{tps}{row['parameters'] / 1e6:12.0f}")
    return {"batch": batch, "prompt": prompt_len, "new_tokens": new_tokens, "rows": rows}


# ---------------------------------------------------------------------------------------------- check

def check_section(args, device) -> dict:
    """Correctness before any timing: the kernel against the reference, and greedy parity."""
    results = {"kernel": [], "greedy": {}}
    dtypes = [torch.float32, torch.float16] if device.type != "cuda" else [torch.bfloat16, torch.float16]
    cases = [(3, 8, 2, 1, 64, 70), (2, 8, 8, 4, 32, 40)] if args.smoke else \
        [(4, 32, 8, 1, 128, 3000), (2, 32, 4, 4, 128, 9000), (3, 32, 1, 1, 64, 2000), (2, 16, 16, 2, 64, 777)]
    for dtype, (batch, heads, kv_heads, n_q, head_dim, capacity) in itertools.product(dtypes, cases):
        gen = torch.Generator(device=device).manual_seed(capacity)
        q = torch.randn(batch, heads, n_q, head_dim, device=device, generator=gen).to(dtype)
        k = torch.randn(batch, kv_heads, capacity, head_dim, device=device, generator=gen).to(dtype)
        v = torch.randn(batch, kv_heads, capacity, head_dim, device=device, generator=gen).to(dtype)
        lengths = torch.randint(n_q, capacity + 1, (batch,), device=device, generator=gen, dtype=torch.int32)
        oracle = reference_decode_attention(q, k, v, lengths, upcast=torch.float64 if device.type == "cpu"
                                            else torch.float32).double()
        same = reference_decode_attention(q, k, v, lengths, upcast=dtype).double()
        out = decode_kernels.decode_attention(q, k, v, lengths).double()
        err, torch_err = [((x - oracle).norm() / oracle.norm()).item() for x in (out, same)]
        ok = err <= 4 * torch_err + (1e-2 if dtype == torch.bfloat16 else 2e-3)
        results["kernel"].append({"dtype": dtype_name(dtype), "shape": [batch, heads, kv_heads, n_q, head_dim, capacity],
                                  "rel_err": err, "torch_same_dtype_rel_err": torch_err, "ok": ok})
    shape = dict(MODEL_SMOKE) if args.smoke else dict(dim=256, depth=2, heads=8, kv_heads=2, ff_mult=4.0, num_tokens=1000)
    model = build_mgqa(shape, 64, device, torch.float32)
    prompts = [torch.randint(0, shape["num_tokens"], (n,), device=device) for n in (7, 19, 3)]
    steps = 8 if args.smoke else 24
    fast = model.generate(prompts, steps, temperature=0.0)
    slow = model.generate(prompts, steps, temperature=0.0, use_cache=False)
    results["greedy"]["graph_vs_uncached_fp32_ragged"] = bool(torch.equal(fast, slow))
    hf = hf_or_reason(model, torch.float32)
    if isinstance(hf, str):
        results["greedy"]["mgqa_vs_hf_fp32"] = hf
    else:
        prompt = torch.randint(0, shape["num_tokens"], (2, 9), device=device)
        mine = model.generate(prompt, steps, temperature=0.0)
        results["greedy"]["mgqa_vs_hf_fp32"] = bool(torch.equal(mine, hf_generate(hf, prompt, steps, static=False)))
    bad = [c for c in results["kernel"] if not c["ok"]]
    print(f"\nCheck: decode kernel {len(results['kernel']) - len(bad)}/{len(results['kernel'])} cases within tolerance"
          f" (max rel err {max(c['rel_err'] for c in results['kernel']):.2e}); greedy {results['greedy']}")
    for case in bad:
        print(f"  FAILED {case}")
    results["ok"] = not bad and all(v is True for v in results["greedy"].values() if not isinstance(v, str))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    # Imported after the arguments are checked (a usage error costs no torch import); triton after
    # TRITON_INTERPRET is set for a CPU smoke run.
    global torch, F, triton, decode_kernels, reference_decode_attention
    global MODEL_1B, MODEL_SMOKE, build_mgqa, hf_generate, hf_or_reason
    import torch
    import torch.nn.functional as F
    from llama_peer import MODEL_1B, MODEL_SMOKE, build_mgqa, hf_generate, hf_or_reason  # bench/ is on sys.path

    if args.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton
    import triton.testing

    from mgqa.kernels import decode as decode_kernels
    from mgqa.ops.reference import reference_decode_attention

    if not args.smoke and not torch.cuda.is_available():
        print("bench/decode.py needs a CUDA GPU (or --smoke for the tiny CPU run)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke and not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                    "torch": torch.__version__, "triton": triton.__version__, "dtype": dtype_name(dtype),
                    "smoke": args.smoke, "quick": args.quick}
    print(f"{report['device']}, torch {report['torch']}, triton {report['triton']}")
    failed = False
    for section in SECTIONS:
        if section not in args.sections:
            continue
        if section == "check":
            report["check"] = check_section(args, device)
            failed |= not report["check"]["ok"]
        elif section == "attention":
            report["attention"] = attention_section(args, device, dtype)
        elif section == "generation":
            report["generation"] = generation_section(args, device, dtype)
        else:
            report["kv"] = kv_section(args, device, dtype)
        if args.out is not None:  # after every section, so that a later failure keeps the earlier ones
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
    if args.out is not None:
        print(f"\nwrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
