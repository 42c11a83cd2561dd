"""DDP scaling of mgqa models on 1, 2, 4... GPUs: tokens/s per GPU and scaling efficiency.

    python bench/scaling.py                          # conf/model/gqa_125m.yaml and gqa_350m.yaml on 1, 2, 4 GPUs
    python bench/scaling.py --gpus 1,2,4,8 --models gqa_125m --batch 8 --steps 30

Each GPU count is one group of processes (NCCL, one process per GPU) that trains every model in turn
with PyTorch's DistributedDataParallel, bf16 autocast over fp32 weights (as Lightning's `bf16-mixed`),
fused AdamW, random tokens of `--seq` (2048) positions and `--batch` sequences per GPU (weak scaling:
the global batch grows with the GPU count). Tokens/s per GPU is measured over `--steps` optimizer steps
after `--warmup`; scaling efficiency is tokens/s per GPU at N GPUs over that at 1 GPU.

Needs only torch, PyYAML and mgqa's model (run from the repository root with PYTHONPATH=.); the model
sizes come from conf/model/<name>.yaml. Prints a Markdown table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml

from mgqa.model import MGQATransformer, ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def model_config(name: str, backend: str) -> ModelConfig:
    values = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    values.pop("defaults", None)
    values["attn_backend"] = backend
    return ModelConfig.from_dict(values)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, world: int, port: int, args: argparse.Namespace, results: "mp.Queue") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    for name in args.models:
        cfg = model_config(name, args.backend)
        torch.manual_seed(0)
        model = MGQATransformer.from_config(cfg).cuda()
        params = model.num_parameters()
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank], gradient_as_bucket_view=True)
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-4, fused=True)
        gen = torch.Generator(device="cuda").manual_seed(rank)
        tokens = torch.randint(0, cfg.num_tokens, (args.batch, args.seq + 1), device="cuda", generator=gen)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = ddp(inputs)  # (B, N, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        elapsed = torch.tensor(time.perf_counter() - start, device="cuda")
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        if rank == 0:
            per_gpu = args.batch * args.seq * args.steps / elapsed.item()
            results.put({
                "model": name, "gpus": world, "params": params, "tokens_per_s_per_gpu": per_gpu,
                "tokens_per_s": per_gpu * world, "step_ms": 1e3 * elapsed.item() / args.steps,
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            })
        del ddp, model, optimizer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gqa_125m,gqa_350m", help="conf/model presets, comma-separated")
    parser.add_argument("--gpus", default="1,2,4", help="GPU counts, comma-separated")
    parser.add_argument("--batch", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--backend", default="sdpa", help="model attn_backend (auto | sdpa | triton)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scaling.json"))
    args = parser.parse_args()
    args.models = args.models.split(",")
    gpu_counts = [int(n) for n in args.gpus.split(",") if int(n) <= torch.cuda.device_count()]
    if not gpu_counts:
        raise SystemExit(f"no usable GPU count in --gpus {args.gpus} ({torch.cuda.device_count()} GPUs here)")

    ctx = mp.get_context("spawn")
    rows = []
    for world in gpu_counts:
        results = ctx.SimpleQueue()
        mp.start_processes(worker, args=(world, free_port(), args, results), nprocs=world, start_method="spawn")
        while not results.empty():
            rows.append(results.get())
    base = {r["model"]: r["tokens_per_s_per_gpu"] for r in rows if r["gpus"] == 1}
    for r in rows:
        r["scaling_efficiency"] = r["tokens_per_s_per_gpu"] / base[r["model"]] if r["model"] in base else None

    print(f"| model | params | GPUs | tokens/s per GPU | tokens/s total | step (ms) | efficiency | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        eff = "-" if r["scaling_efficiency"] is None else f"{100 * r['scaling_efficiency']:.1f}%"
        print(f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['gpus']} | {r['tokens_per_s_per_gpu']:,.0f} | "
              f"{r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {eff} | {r['peak_mem_gib']:.1f} |")
    report = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "host": platform.node(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "precision": "bf16 autocast, fp32 weights, fused AdamW, DDP (NCCL)",
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
