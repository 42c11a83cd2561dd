"""The GQA paper's uptraining recipe in miniature (Ainslie et al. 2023, section 2.1, Fig. 4, Table 1).

    python bench/uptrain_repro.py --threads 1   # the committed run: CPU, about 15 minutes on a shared 2-core machine
    python bench/uptrain_repro.py --quick       # a smaller setting to check the script (a few minutes)

On the embedded Shakespeare corpus (bytes), through the real `train.py` path (`mgqa.lit.run.train`):
1. trains a multi-head (MHA) baseline for `--steps` steps;
2. converts it to GQA-{1, 2, 4} KV heads by `mean`, `first` and `random` (`init.from`, `init.kv_heads`,
   `init.method`) and uptrains with alpha in {0, 0.05, 0.1} (`experiment=uptrain init.alpha=...`;
   alpha = 0 evaluates the converted model untrained);
3. trains the same GQA sizes from scratch for (1 + max alpha) x `--steps`: the compute of the baseline
   plus the longest uptraining;
4. evaluates every model on the same held-out batches and measures greedy decode tokens/s with the
   KV cache (batch `--decode-batch`, on this machine's device).

The runs go to `--runs` (outputs/uptrain_repro/). Prints a Markdown table and writes JSON and a PNG
(validation loss against KV-cache bytes per token and against decode tokens/s) to `--out`
(bench/results/uptrain_repro[_quick]). docs/uptraining.md discusses the committed results.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from mgqa.convert.kv_heads import convert_kv_heads
from mgqa.lit.config import register_configs
from mgqa.lit.evaluate import evaluate_batches
from mgqa.lit.run import train
from mgqa.lit.trained import load_trained
from mgqa.model import MGQATransformer, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("mean", "first", "random")

SETTINGS = {
    "full": dict(dim=128, depth=2, heads=8, seq_len=64, batch=16, steps=600, val_batches=32),
    "quick": dict(dim=64, depth=2, heads=8, seq_len=64, batch=8, steps=60, val_batches=4),
}


def compose_train(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def common_overrides(s: dict) -> list[str]:
    return [
        "model=llama", f"model.dim={s['dim']}", f"model.depth={s['depth']}", f"model.heads={s['heads']}",
        f"model.max_seq_len={s['seq_len']}", f"data.batch_size={s['batch']}", "trainer.accelerator=auto",
        "trainer.enable_progress_bar=false", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=10",
        "callbacks.latest_checkpoint.every_n_train_steps=100000", "sample.max_new_tokens=0", "logger=csv",
    ]  # fmt: skip


def run(name: str, runs: Path, overrides: list[str]) -> tuple[Path, float]:
    """Train through mgqa.lit.run.train; returns the run's last checkpoint and the wall time."""
    run_dir = runs / name
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    train(compose_train(*overrides, f"run_dir={run_dir}", f"run_name={name}"))
    return run_dir / "checkpoints" / "last.ckpt", time.perf_counter() - start


def val_batches(s: dict, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` validation batches of the held-out works (the same for every model)."""
    from hydra.utils import instantiate  # noqa: PLC0415

    cfg = compose_train(*common_overrides(s))
    datamodule = instantiate(cfg.data)
    datamodule.build_datasets()
    batches = []
    for batch in datamodule.val_dataloader():
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


@torch.no_grad()
def decode_tokens_per_s(models: dict[int, MGQATransformer], batch: int, prompt_len: int, new_tokens: int, repeats: int = 5) -> dict[int, float]:
    """Greedy decoding with the KV cache: generated tokens (all sequences) per second of each model,
    best of ``repeats`` rounds that time every model in turn (so a busy moment hits them alike)."""
    device = next(next(iter(models.values())).parameters()).device
    prompt = torch.randint(0, 256, (batch, prompt_len), device=device)
    best = {k: math.inf for k in models}
    for model in models.values():
        model.generate(prompt, 4, temperature=0.0)  # warm-up
    for _ in range(repeats):
        for k, model in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(prompt, new_tokens, temperature=0.0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[k] = min(best[k], time.perf_counter() - start)
    return {k: batch * new_tokens / t for k, t in best.items()}


def record(label: str, kind: str, kv_heads: int, method: str | None, alpha: float | None, steps: int, model: MGQATransformer, batches, tokenizer, decode: dict[int, float]) -> dict:
    metrics = evaluate_batches(model, batches, tokenizer, progress=False)
    return {
        "label": label, "kind": kind, "kv_heads": kv_heads, "method": method, "alpha": alpha, "train_steps": steps,
        "val_loss": metrics["loss"], "val_bits_per_byte": metrics["bits_per_byte"],
        "kv_cache_bytes_per_token_bf16": model.kv_cache_bytes_per_token(torch.bfloat16),
        "decode_tokens_per_s": decode[kv_heads],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small setting (checks the script in minutes)")
    parser.add_argument("--kv-heads", default="1,2,4", help="GQA sizes to convert to (comma-separated)")
    parser.add_argument("--alphas", default="0,0.05,0.1", help="uptraining fractions of the baseline's steps")
    parser.add_argument("--steps", type=int, default=None, help="baseline steps (default: the setting's)")
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine: oversubscribed threads run many times slower)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default bench/results/uptrain_repro[_quick])")
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "uptrain_repro", help="where the training runs go")
    parser.add_argument("--replot", action="store_true", help="only redraw the table and PNG from --out's results.json")
    args = parser.parse_args()
    setting = "quick" if args.quick else "full"
    s = dict(SETTINGS[setting])
    if args.steps:
        s["steps"] = args.steps
    kv_list = [int(k) for k in args.kv_heads.split(",")]
    alphas = [float(a) for a in args.alphas.split(",")]
    for k in kv_list:
        if s["heads"] % k:
            parser.error(f"--kv-heads {k} must divide the {s['heads']} query heads")
    out = args.out or ROOT / "bench" / "results" / ("uptrain_repro_quick" if args.quick else "uptrain_repro")
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        saved = json.loads((out / "results.json").read_text())
        print(table(saved["rows"]))
        plot(saved["rows"], out / "loss_vs_cost.png", saved["device"])
        return
    runs = args.runs / setting
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    common = common_overrides(s)
    timings = {}
    print(f"[1/4] MHA baseline: {s['steps']} steps", flush=True)
    base_ckpt, timings["baseline"] = run("mha", runs, [*common, f"model.kv_heads={s['heads']}", f"trainer.max_steps={s['steps']}"])
    base = load_trained(str(base_ckpt), device="auto")
    batches = val_batches(s, s["val_batches"])
    probes = {}  # decode speed depends on the architecture only
    for k in sorted({s["heads"], *kv_list}):
        probe = MGQATransformer.from_config(ModelConfig.from_dict({**base.model.config.to_dict(), "kv_heads": k}))
        probes[k] = probe.to(next(base.model.parameters()).device).eval()
    decode = decode_tokens_per_s(probes, args.decode_batch, s["seq_len"] // 2, s["seq_len"] // 2)
    rows = [record("MHA baseline", "baseline", s["heads"], None, None, s["steps"], base.model, batches, base.tokenizer, decode)]
    print("[2/4] convert and uptrain", flush=True)
    for k in kv_list:
        for method in METHODS:
            for alpha in alphas:
                label = f"GQA-{k} {method} a={alpha:g}"
                if alpha == 0:
                    state, cfg = convert_kv_heads(base.model.state_dict(), base.model.config, k, method, torch.Generator().manual_seed(0))
                    model = MGQATransformer.from_config(cfg).to(next(base.model.parameters()).device)
                    model.load_state_dict(state)
                    steps = 0
                else:
                    name = f"gqa{k}_{method}_a{alpha:g}"
                    ckpt, timings[name] = run(name, runs, [*common, "experiment=uptrain", f"init.from={base_ckpt}", f"init.kv_heads={k}", f"init.method={method}", f"init.alpha={alpha}"])
                    model = load_trained(str(ckpt), device="auto").model
                    steps = max(1, round(alpha * s["steps"]))
                rows.append(record(label, "uptrained", k, method, alpha, steps, model, batches, base.tokenizer, decode))
                print(f"  {label}: val loss {rows[-1]['val_loss']:.4f}", flush=True)
    scratch_steps = round(s["steps"] * (1 + max(alphas)))
    print(f"[3/4] from scratch: {scratch_steps} steps each", flush=True)
    for k in kv_list:
        name = f"gqa{k}_scratch"
        ckpt, timings[name] = run(name, runs, [*common, f"model.kv_heads={k}", f"trainer.max_steps={scratch_steps}"])
        model = load_trained(str(ckpt), device="auto").model
        rows.append(record(f"GQA-{k} scratch", "scratch", k, None, None, scratch_steps, model, batches, base.tokenizer, decode))
        print(f"  GQA-{k} scratch: val loss {rows[-1]['val_loss']:.4f}", flush=True)
    print("[4/4] report", flush=True)
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    result = {"setting": setting, **s, "scratch_steps": scratch_steps, "alphas": alphas, "kv_heads": kv_list,
              "device": device, "threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
              "train_seconds": timings, "rows": rows}  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    plot(rows, out / "loss_vs_cost.png", device)
    print(f"wrote {out / 'results.json'} and {out / 'loss_vs_cost.png'}")


def table(rows: list[dict]) -> str:
    lines = ["| model | KV heads | method | alpha | train steps | val loss | bits/byte | KV bytes/token (bf16) | decode tok/s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['kv_heads']} | {r['method'] or '-'} | {'-' if r['alpha'] is None else r['alpha']} | "
            f"{r['train_steps']} | {r['val_loss']:.4f} | {r['val_bits_per_byte']:.4f} | {r['kv_cache_bytes_per_token_bf16']} | "
            f"{r['decode_tokens_per_s']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), sharey=True)
    styles = {"mean": ("o", "tab:blue"), "first": ("s", "tab:orange"), "random": ("^", "tab:red")}
    alphas = sorted({r["alpha"] for r in rows if r["kind"] == "uptrained"})
    for ax, key, xlabel in ((axes[0], "kv_cache_bytes_per_token_bf16", "KV-cache bytes per token (bf16)"),
                            (axes[1], "decode_tokens_per_s", f"decode tokens/s ({device})")):  # fmt: skip
        line = ":" if key.startswith("kv_cache") else ""  # measured speeds are not ordered like the sizes
        for method, (marker, color) in styles.items():
            for alpha in alphas:
                pts = sorted((r[key], r["val_loss"]) for r in rows if r["method"] == method and r["alpha"] == alpha)
                if pts:
                    fill = color if alpha == max(alphas) else "none"
                    ax.plot(*zip(*pts), marker=marker, color=color, markerfacecolor=fill, alpha=0.35 + 0.65 * alpha / max(max(alphas), 1e-9),
                            linestyle=line, label=f"uptrained {method}, alpha={alpha:g}")  # fmt: skip
        scratch = sorted((r[key], r["val_loss"]) for r in rows if r["kind"] == "scratch")
        ax.plot(*zip(*scratch), marker="D", color="tab:green", linestyle="-" if line else "none", label="from scratch (equal compute)")
        base = next(r for r in rows if r["kind"] == "baseline")
        ax.plot([base[key]], [base["val_loss"]], marker="*", markersize=14, color="black", linestyle="none", label="MHA baseline")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log", base=2)
    axes[0].set_ylabel("validation loss (nats/byte)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4)
    fig.suptitle("MHA -> GQA uptraining in miniature (embedded Shakespeare corpus)")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
