"""Tokens/s of the data pipeline (stream + tokenize + pack + shuffle + collate) on this machine's CPU,
next to the rate at which one H100 consumes tokens when training the same config.

    python bench/data.py                                   # the default config (conf/train.yaml)
    python bench/data.py model.dim=768 model.depth=12 model.heads=12 model.kv_heads=4 model.max_seq_len=1024
    python bench/data.py model=gqa_125m                    # the GPU preset (2048-token windows)
    python bench/data.py --h100-step-ms 41.5 ...           # use a step time measured on an H100
    python bench/data.py model=gqa_125m --h100-json bench/results/scaling.json   # bench/scaling.py's 1-GPU row

For each tokenizer (byte, the shipped BPE) and 0, 1, 2 dataloader workers, it times one full epoch of
the embedded corpus through the training DataLoader (after a first epoch that starts the workers),
and reports the set-up (token-counting pass) separately. The H100 rate is ``batch tokens / step time``
when a measured step time is given; otherwise it is estimated from the model's training FLOPs per token
at an assumed model-FLOPs utilisation of the H100's dense bf16 peak (both printed).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mgqa.lit.config import register_configs
from mgqa.lit.datamodule import TextDataModule
from mgqa.lit.run import resolve_model_config

ROOT = Path(__file__).resolve().parents[1]
H100_BF16_DENSE_FLOPS = 989e12  # H100 SXM, dense bf16 tensor-core peak
TOKENIZERS = {"byte": "byte", "bpe-2k": "data/tokenizers/shakespeare-bpe-2k.json"}


def train_flops_per_token(model_cfg, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token: 6 x matmul parameters + causal attention scores."""
    d, depth = model_cfg.dim, model_cfg.depth
    head_dim = model_cfg.head_dim or d // model_cfg.heads
    q, kv = model_cfg.heads * head_dim, model_cfg.kv_heads * head_dim
    hidden = model_cfg.ff_mult * d
    ff = 3 * d * int(hidden * 2 / 3) if model_cfg.ff == "swiglu" else 2 * d * hidden
    per_layer = d * q + 2 * d * kv + q * d + ff
    matmul_params = depth * per_layer + d * model_cfg.num_tokens  # + the output projection
    attention = depth * 2 * 2 * seq_len * q / 2  # QK^T and PV, causal half, per token
    return 6 * matmul_params + 3 * attention


def time_pipeline(cfg, tokenizer: str, workers: int, shuffle_buffer: int) -> dict:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.pop("_target_")
    data.update(tokenizer=tokenizer, num_workers=workers, shuffle_buffer=shuffle_buffer)
    start = time.perf_counter()
    dm = TextDataModule(**data)
    dm.setup()
    setup_s = time.perf_counter() - start
    loader = dm.train_dataloader()
    for _ in loader:  # the first epoch starts the workers
        pass
    start = time.perf_counter()
    tokens = sum(x.numel() for x, _ in loader)
    elapsed = time.perf_counter() - start
    del loader
    return {"tokenizer": tokenizer, "workers": workers, "setup_s": setup_s, "tokens": tokens, "tokens_per_s": tokens / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml (model and data)")
    parser.add_argument("--h100-step-ms", type=float, default=None, help="a measured H100 optimizer-step time")
    parser.add_argument("--h100-json", default=None, help="bench/scaling.py output: its 1-GPU row of --h100-model")
    parser.add_argument("--h100-model", default="gqa_125m", help="the model preset of the --h100-json row")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation for the estimate")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_pipeline.json"))
    args = parser.parse_args()

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=args.overrides)
    seq_len, batch = cfg.data.seq_len, cfg.data.batch_size
    measured = None
    if args.h100_json:
        rows = json.loads(Path(args.h100_json).read_text())["results"]
        match = [r for r in rows if r.get("gpus") == 1 and r.get("model") == args.h100_model]
        if not match:
            raise SystemExit(f"{args.h100_json} has no 1-GPU row for model {args.h100_model!r}")
        measured = match[0]["tokens_per_s_per_gpu"]
    rows = []
    print_header()
    for name, spec in TOKENIZERS.items():
        cfg_tok = compose_tokenizer(cfg, spec)
        model_cfg = resolve_model_config(cfg_tok)
        for workers in args.workers:
            row = time_pipeline(cfg, spec, workers, shuffle_buffer=cfg.data.shuffle_buffer)
            row["tokenizer"] = name
            flops = train_flops_per_token(model_cfg, seq_len)
            if measured is not None:
                row["h100_tokens_per_s"] = measured
                row["h100_source"] = f"measured: {args.h100_json}, {args.h100_model} on 1 GPU"
            elif args.h100_step_ms:
                row["h100_tokens_per_s"] = batch * seq_len / (args.h100_step_ms / 1e3)
                row["h100_source"] = f"measured step {args.h100_step_ms} ms x {batch}x{seq_len} tokens"
            else:
                row["h100_tokens_per_s"] = args.mfu * H100_BF16_DENSE_FLOPS / flops
                row["h100_source"] = f"estimate: {args.mfu:.0%} of {H100_BF16_DENSE_FLOPS / 1e12:.0f} TFLOP/s / {flops / 1e6:.1f} MFLOP per token"
            row["headroom"] = row["tokens_per_s"] / row["h100_tokens_per_s"]
            rows.append(row)
            print_row(row)

    meta = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "overrides": args.overrides,
        "seq_len": seq_len,
        "batch_size": batch,
        "corpus": cfg.data.files,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\n{rows[0]['h100_source']} (byte); wrote {out}")


def compose_tokenizer(cfg, spec: str):
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.data.tokenizer = spec
    return cfg


def print_header() -> None:
    print(f"{'tokenizer':<10} {'workers':>7} {'setup s':>8} {'pipeline tok/s':>15} {'H100 train tok/s':>17} {'pipeline/H100':>14}")


def print_row(row: dict) -> None:
    print(
        f"{row['tokenizer']:<10} {row['workers']:>7} {row['setup_s']:>8.2f} {row['tokens_per_s']:>15,.0f} "
        f"{row['h100_tokens_per_s']:>17,.0f} {row['headroom']:>13.2f}x"
    )


if __name__ == "__main__":
    main()
