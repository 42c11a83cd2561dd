"""What ``generate.py`` does: sample continuations of prompts from a trained checkpoint, streamed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional, TextIO

import torch
from omegaconf import DictConfig

from mgqa.lit.trained import load_trained
from mgqa.model import ConfigError


def read_prompts(cfg: DictConfig) -> list[str]:
    """``prompt_file`` (one prompt per non-empty line; ``\\n`` escapes a newline) or ``prompt``."""
    if cfg.get("prompt_file"):
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt_file {str(path)!r} does not exist (cwd: {Path.cwd()})")
        prompts = [line.replace("\\n", "\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"prompt_file {path} holds no prompts (one per line)")
        return prompts
    prompt = cfg.get("prompt")
    if prompt is None or str(prompt) == "":
        raise ConfigError("prompt is empty: give prompt=\"...\" or prompt_file=<file>")
    return [str(prompt)]


def check_sampling(cfg: DictConfig) -> None:
    """Refuse sampling options that cannot work, naming them, before the checkpoint loads."""
    if not isinstance(cfg.max_new_tokens, int) or cfg.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {cfg.max_new_tokens!r}")
    if not cfg.temperature >= 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {cfg.temperature!r}")
    if cfg.top_k is not None and (not isinstance(cfg.top_k, int) or cfg.top_k < 1):
        raise ConfigError(f"top_k must be a positive integer or null, got {cfg.top_k!r}")
    if cfg.top_p is not None and not 0.0 < cfg.top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1] or null, got {cfg.top_p!r}")
    if not isinstance(cfg.num_samples, int) or cfg.num_samples < 1:
        raise ConfigError(f"num_samples must be a positive integer, got {cfg.num_samples!r}")
    if not isinstance(cfg.compile_step, bool):
        raise ConfigError(f"compile_step must be true or false, got {cfg.compile_step!r}")


def generate(cfg: DictConfig, stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None) -> list[dict[str, Any]]:
    """Print each completion (one prompt: token by token as it is sampled); return them as records."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    check_sampling(cfg)
    prompts = read_prompts(cfg)
    trained = load_trained(cfg.get("ckpt_path"), cfg.get("run_name"), cfg.output_root, cfg.device, cfg.get("attn_backend"))
    model, tokenizer = trained.model, trained.tokenizer
    print(f"checkpoint: {trained.path} (step {trained.step}, {trained.model.config.kv_heads} KV heads)", file=stderr)
    prompts = [p for p in prompts for _ in range(cfg.num_samples)]
    encoded = [tokenizer.encode(p) for p in prompts]
    if any(len(ids) == 0 for ids in encoded):
        raise ConfigError("a prompt encodes to no tokens")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    eos = tokenizer.eot_id if cfg.stop_at_eot else None
    options = dict(temperature=float(cfg.temperature), top_k=cfg.top_k, top_p=cfg.top_p, eos_token=eos, generator=generator,
                   compile_step=cfg.compile_step)
    # One batch; prompts of different lengths each decode from their own length (no padding).
    batch = [torch.tensor(ids, dtype=torch.long, device=device) for ids in encoded]
    completions = _sample(model, tokenizer, batch, cfg.max_new_tokens, options, stdout if len(prompts) == 1 else None, prompts[0])
    records = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    if len(prompts) > 1:
        for i, record in enumerate(records):
            print(f"--- {i + 1}/{len(records)} " + "-" * 40, file=stdout)
            print(record["prompt"] + record["completion"], file=stdout)
    if cfg.get("out"):
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"checkpoint": str(trained.path), "step": trained.step, **{k: cfg[k] for k in ("temperature", "top_k", "top_p", "seed")}}
        out.write_text(json.dumps({**meta, "samples": records}, indent=2) + "\n")
        print(f"wrote {out}", file=stderr)
    return records


def _sample(model: Any, tokenizer: Any, batch: list[torch.Tensor], max_new_tokens: int, options: dict, stream: Optional[TextIO], prompt: str) -> list[str]:
    """Completions of the prompts ``batch`` (1-d token tensors); with ``stream``, the text is written as it is sampled."""
    steps = []
    shown = ""
    if stream is not None:
        stream.write(prompt)
        stream.flush()
    for token in model.generate_stream(batch, max_new_tokens, **options):
        steps.append(token)
        if stream is not None:
            # Decode all tokens so far: a character may span several tokens (bytes of UTF-8).
            text = _decode(tokenizer, torch.stack(steps, dim=1)[0].tolist(), options["eos_token"])
            if not text.endswith("\ufffd"):
                stream.write(text[len(shown) :])
                stream.flush()
                shown = text
    if not steps:
        return [""] * len(batch)
    tokens = torch.stack(steps, dim=1).tolist()  # (B, steps)
    completions = [_decode(tokenizer, row, options["eos_token"]) for row in tokens]
    if stream is not None:
        stream.write(completions[0][len(shown) :] + "\n")
        stream.flush()
    return completions


def _decode(tokenizer: Any, tokens: list[int], eos: Optional[int]) -> str:
    if eos is not None and eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    return tokenizer.decode(tokens)
