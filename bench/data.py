"""Tokens/s of the data pipeline (stream + tokenize + pack + shuffle + collate) on this machine's CPU,
next to the rate at which one H100 consumes tokens when training the same config.

    python bench/data.py                                   # the default config (conf/train.yaml)
    python bench/data.py model.dim=768 model.depth=12 model.heads=12 model.kv_heads=4 model.max_seq_len=1024
    python bench/data.py model=gqa_125m                    # the GPU preset (2048-token windows)
    python bench/data.py --h100-step-ms 41.5 ...           # use a step time measured on an H100
    python bench/data.py model=gqa_125m --h100-json bench/results/scaling.json   # bench/scaling.py's 1-GPU row

For each tokenizer (byte, the shipped BPE) and 0, 1, 2 dataloader workers, it times one full epoch of
the embedded corpus through the training DataLoader (after a first epoch that starts the workers),
and reports the set-up (token-counting pass) separately.

    python bench/data.py --prepared                        # the prepared path (data=tokens) instead

``--prepared`` times ``python -m mgqa.data.prepare`` on the embedded corpus (tokens/s at 1 and 2
processes, byte and BPE), the memory-mapped loader on a synthetic shard set (tokens/s per worker
process) and a resume at 0, 10M and 1B tokens into an epoch (a sparse synthetic set of 1.2B tokens:
no disk space used). Results: ``bench/results/data_prepared.json``. The H100 rate is ``batch tokens / step time``
when a measured step time is given; otherwise it is estimated from the model's training FLOPs per token
at an assumed model-FLOPs utilisation of the H100's dense bf16 peak (both printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
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
    parser.add_argument("--prepared", action="store_true", help="time the prepared path (data=tokens) instead")
    parser.add_argument("--out", default=None, help="result JSON (default: bench/results/data_pipeline.json, "
                        "or data_prepared.json with --prepared)")  # fmt: skip
    args = parser.parse_args()
    if args.prepared:
        run_prepared(args.overrides, args.workers, Path(args.out or ROOT / "bench" / "results" / "data_prepared.json"))
        return
    args.out = args.out or str(ROOT / "bench" / "results" / "data_pipeline.json")

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


# -- the prepared path ------------------------------------------------------------------------
PREPARE_COPIES = 4  # the embedded corpus, read this many times over
PREPARE_BATCH_DOCS = 8  # its documents are whole plays (~120 kB): 8 per task keep both processes busy
RESUME_POSITIONS = {"0": 0, "10M": 10_000_000, "1B": 1_000_000_000}


def time_prepare(tmp: Path, tokenizer: str, num_proc: int) -> dict:
    """Tokens/s of ``mgqa.data.prepare`` over ``PREPARE_COPIES`` copies of the embedded corpus, as
    prepare reports it: from its first tokenized batch to the last shard written."""
    from mgqa.data.prepare import compose_config, prepare  # noqa: PLC0415

    out = tmp / f"prepare-{Path(tokenizer).stem}-{num_proc}"
    corpus = ",".join(['"data/shakespeare/*.txt"'] * PREPARE_COPIES)  # long enough to hide process start-up
    cfg = compose_config([f"data.files=[{corpus}]", f"data.tokenizer={tokenizer}", f"out={out}", f"num_proc={num_proc}",
                          f"batch_docs={PREPARE_BATCH_DOCS}"])  # fmt: skip
    lines: list[str] = []
    start = time.perf_counter()
    prepare(cfg, print_fn=lines.append, progress=False)
    elapsed = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = sum(split["tokens"] for split in manifest["splits"].values())
    rate = float(lines[-1].rsplit("; ", 1)[1].split("M tokens/s")[0]) * 1e6
    return {"tokenizer": tokenizer, "num_proc": num_proc, "tokens": tokens, "wall_s": elapsed, "tokens_per_s": rate}


def time_tokenizer(tokenizer: str) -> float:
    """Tokens/s of the tokenizer's own batch call over the embedded corpus (the ceiling for prepare
    in one process), in batches of ``PREPARE_BATCH_DOCS`` documents as prepare sends them."""
    from mgqa.data import build_tokenizer  # noqa: PLC0415

    tok = build_tokenizer(tokenizer)
    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "data" / "shakespeare").glob("*.txt"))] * PREPARE_COPIES
    start = time.perf_counter()
    step = PREPARE_BATCH_DOCS
    tokens = sum(t.numel() for i in range(0, len(texts), step) for t in tok.encode_batch(texts[i : i + step]))
    return tokens / (time.perf_counter() - start)


def synthetic_shards(directory: Path, tokens_per_shard: int, count: int, sparse: bool) -> list:
    """``count`` uint16 shards: random tokens, or sparse files (zeros that take no disk space)."""
    from mgqa.data.shards import Shard  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards = []
    for k in range(count):
        path = directory / f"train_{k:05d}.bin"
        if sparse:
            with open(path, "wb") as f:
                f.truncate(2 * tokens_per_shard)
        else:
            rng.integers(0, 50_000, tokens_per_shard, dtype=np.uint16).tofile(path)
        shards.append(Shard(path, tokens_per_shard, 0, "uint16"))
    return shards


def time_loader(shards, seq_len: int, batch: int, workers: int, seconds: float = 3.0) -> dict:
    """Tokens/s through the training StatefulDataLoader (after its first batch: workers started)."""
    from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: PLC0415

    from mgqa.data.tokens import TokenWindows  # noqa: PLC0415

    dataset = TokenWindows(shards, seq_len, batch, seed=0, num_workers=workers)
    loader = StatefulDataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    it = iter(loader)
    next(it)
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            x, _ = next(it)
        except StopIteration:  # the next epoch (persistent workers stay up)
            it = iter(loader)
            continue
        tokens += x.numel()
    rate = tokens / (time.perf_counter() - start)
    del it, loader
    return {"workers": workers, "tokens_per_s": rate, "tokens_per_s_per_worker": rate / max(1, workers)}


def time_resume(shards, seq_len: int, batch: int, position: int, workers: int) -> dict:
    """Seconds from a saved position ``position`` tokens into an epoch to the next batch, through a
    new StatefulDataLoader (worker start-up included when ``workers`` > 0)."""
    from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: PLC0415

    from mgqa.data.tokens import TokenWindows  # noqa: PLC0415

    def build():
        dataset = TokenWindows(shards, seq_len, batch, seed=0, num_workers=workers)
        return StatefulDataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)

    saved = build().state_dict()
    per_reader = position // (seq_len * batch) // max(1, workers)  # each reader's batches so far
    if workers == 0:
        saved["dataset_state"] = {"epoch": 0, "yielded": per_reader}
    else:
        for w in range(workers):
            saved["_snapshot"]["_worker_snapshots"][f"worker_{w}"]["dataset_state"] = {"epoch": 0, "yielded": per_reader}
    start = time.perf_counter()
    loader = build()
    loader.load_state_dict(saved)
    next(iter(loader))
    return {"position_tokens": position, "workers": workers, "resume_s": time.perf_counter() - start}


def run_prepared(overrides: list[str], workers: list[int], out: Path) -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    seq_len, batch = cfg.data.seq_len, cfg.data.batch_size
    result: dict = {"meta": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                             "torch": torch.__version__, "load_average": os.getloadavg(), "overrides": overrides, "seq_len": seq_len, "batch_size": batch}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mgqa-bench-data-") as tmp_name:
        tmp = Path(tmp_name)
        print(f"{'prepare':<10} {'tokenizer':<42} {'processes':>9} {'tokens':>11} {'tok/s':>12} {'tokenizer alone':>16}")
        result["prepare"] = []
        for tokenizer in TOKENIZERS.values():
            alone = time_tokenizer(tokenizer)
            for num_proc in (1, 2):
                row = time_prepare(tmp, tokenizer, num_proc) | {"tokenizer_alone_tokens_per_s": alone}
                result["prepare"].append(row)
                print(f"{'':<10} {tokenizer:<42} {num_proc:>9} {row['tokens']:>11,} {row['tokens_per_s']:>12,.0f} {alone:>16,.0f}")
        shards = synthetic_shards(tmp / "dense", 8_000_000, 8, sparse=False)
        print(f"\n{'loader':<10} {'seq_len':>7} {'workers':>7} {'tok/s':>14} {'tok/s/worker':>14}   (batch {batch}; workers 0 = read in the training process)")
        result["loader"] = []
        for window in sorted({seq_len, 2048}):
            for w in workers:
                row = time_loader(shards, window, batch, w) | {"seq_len": window}
                result["loader"].append(row)
                print(f"{'':<10} {window:>7} {w:>7} {row['tokens_per_s']:>14,.0f} {row['tokens_per_s_per_worker']:>14,.0f}")
        sparse = synthetic_shards(tmp / "sparse", 100_000_000, 12, sparse=True)
        print(f"\n{'resume at':<10} {'workers':>7} {'seconds':>8}   (1.2B-token sparse shard set, {seq_len}-token windows)")
        result["resume"] = []
        for w in sorted({0, max(workers)}):
            for label, position in RESUME_POSITIONS.items():
                row = time_resume(sparse, seq_len, batch, position, w)
                result["resume"].append(row | {"position": label})
                print(f"{label:<10} {w:>7} {row['resume_s']:>8.3f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


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
