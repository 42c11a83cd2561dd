"""After training: generate, evaluate and export a checkpoint (CLI and in-process), and start a run
from it with converted K/V heads (init.from, experiment=uptrain)."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch._dynamo
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from mgqa.lit.evaluate import evaluate
from mgqa.lit.generate import generate
from mgqa.lit.init import apply_init
from mgqa.lit.run import train
from mgqa.lit.trained import load_trained
from mgqa.model import ConfigError
from tests.conftest import ROOT, TINY, compose

BPE = "data=shakespeare_bpe"


def compose_entry(name, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name=name, overrides=list(overrides))


def run_cli(script, *args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny GQA run on the embedded corpus with the BPE tokenizer: <root>/run."""
    root = tmp_path_factory.mktemp("runs")
    os.chdir(ROOT)
    train(compose(*TINY, BPE, "sample.max_new_tokens=0", f"run_dir={root / 'run'}"))
    return root


def test_checkpoint_carries_its_tokenizer_and_loads_anywhere(trained_run, tmp_path, monkeypatch):
    moved = tmp_path / "elsewhere.ckpt"
    shutil.copy(trained_run / "run" / "checkpoints" / "last.ckpt", moved)
    monkeypatch.chdir(tmp_path)  # the tokenizer path typed at launch no longer resolves
    loaded = load_trained(str(moved), device="cpu")
    assert loaded.step == 6 and loaded.model.config.kv_heads == 2
    text = "ROMEO. What light breaks?"
    shipped = torch.load(moved, weights_only=True)["hyper_parameters"]["tokenizer"]
    assert loaded.tokenizer.state()["sha256"] == shipped["sha256"]
    monkeypatch.chdir(ROOT)
    from mgqa.data import build_tokenizer

    assert loaded.tokenizer.encode(text) == build_tokenizer("data/tokenizers/shakespeare-bpe-2k.json").encode(text)


def test_generate_cli_streams_a_batch_from_a_prompt_file(trained_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO.\nJULIET. O Romeo\n")
    out = tmp_path / "samples.json"
    args = [f"output_root={trained_run}", "run_name=run", f"prompt_file={prompts}", "max_new_tokens=8", "temperature=0", f"out={out}"]
    result = run_cli("generate.py", *args)
    assert result.returncode == 0, result.stderr
    samples = json.loads(out.read_text())["samples"]
    assert [s["prompt"] for s in samples] == ["ROMEO.", "JULIET. O Romeo"]
    assert all(s["prompt"] + s["completion"] in result.stdout for s in samples)
    assert "best-step" in json.loads(out.read_text())["checkpoint"]  # run_name picks the best checkpoint
    missing = run_cli("generate.py", "prompt=hi")
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1].startswith("error: give ckpt_path")
    assert "Traceback" not in missing.stderr


def test_generate_streams_one_prompt_and_is_reproducible_by_seed(trained_run, capsys):
    overrides = (f"ckpt_path={trained_run / 'run'}", "prompt=ROMEO.", "max_new_tokens=12", "temperature=1.0", "top_p=0.9")
    first = generate(compose_entry("generate", *overrides, "seed=1"))
    streamed = capsys.readouterr().out
    assert streamed == "ROMEO." + first[0]["completion"] + "\n"
    assert generate(compose_entry("generate", *overrides, "seed=1")) == first
    others = [generate(compose_entry("generate", *overrides, f"seed={s}"))[0]["completion"] for s in (2, 3)]
    assert any(o != first[0]["completion"] for o in others)
    with pytest.raises(ConfigError, match="top_p must be in"):
        generate(compose_entry("generate", *overrides, "top_p=2.0"))
    with pytest.raises(ConfigError, match="compile_step must be true or false, got 'yes please'"):
        generate(compose_entry("generate", *overrides, "compile_step='yes please'"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        generate(compose_entry("generate", "ckpt_path=/no/such.ckpt"))


def test_generate_compile_step_compiles_the_step_and_keeps_greedy_text(trained_run, eager_compile):
    overrides = (f"ckpt_path={trained_run / 'run'}", "prompt=ROMEO.", "max_new_tokens=10", "temperature=0")
    plain = generate(compose_entry("generate", *overrides))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    assert generate(compose_entry("generate", *overrides, "compile_step=true")) == plain
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


def test_evaluate_reproduces_the_training_validation_loss(trained_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    last = trained_run / "run" / "checkpoints" / "last.ckpt"
    # The training validated 2 batches of 4 windows of the held-out works, as this does.
    evaluate(compose_entry("evaluate", f"ckpt_path={last}", BPE, "data.batch_size=4", "max_batches=2", f"out={out}"))
    metrics = json.loads(out.read_text())
    rows = (trained_run / "run" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    final = [r.split(",") for r in rows[1:] if r.split(",")[header.index("val/loss")]][-1]
    assert metrics["loss"] == pytest.approx(float(final[header.index("val/loss")]), rel=1e-4)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert metrics["bits_per_byte"] == pytest.approx(metrics["loss"] * metrics["tokens"] / math.log(2) / metrics["bytes"])
    assert metrics["bytes"] > 2 * metrics["tokens"]  # BPE tokens span several bytes
    assert f"loss {metrics['loss']:.4f}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="split='test' is unknown"):
        evaluate(compose_entry("evaluate", f"ckpt_path={last}", "split=test"))


def test_export_cli_writes_a_llama_directory(trained_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    result = run_cli("export.py", f"output_root={trained_run}", "run_name=run", f"out_dir={out}")
    assert result.returncode == 0, result.stderr
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ours = load_trained(str(trained_run / "run"), device="cpu")
    assert hf.config.num_key_value_heads == 2
    tokens = torch.randint(0, 2048, (1, 32))
    with torch.no_grad():
        assert (hf(tokens).logits - ours.model(tokens)).abs().max() <= 1e-4
    text = "KING. Now is the winter"
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == ours.tokenizer.encode(text)
    # ... and comes back through train.py's init.from, with the exported tokenizer as the run's.
    cfg = compose(*TINY, f"init.from={out}", f"data.tokenizer={out}", "init.kv_heads=1", "init.method=first")
    source = apply_init(cfg)
    assert (cfg.model.kv_heads, cfg.model.dim, cfg.model.num_tokens) == (1, 64, 2048)
    model = type(ours.model).from_config(source.config)
    source.load_into(model)
    torch.testing.assert_close(model.token_emb.weight, ours.model.token_emb.weight)


def test_uptrain_from_a_checkpoint_with_fewer_kv_heads(trained_run, tmp_path):
    source = trained_run / "run" / "checkpoints" / "last.ckpt"
    run_dir = tmp_path / "up"
    cfg = compose(*TINY, BPE, "experiment=uptrain", f"init.from={source}", "init.kv_heads=1", "init.alpha=0.5",
                  "model.dim=32", "sample.max_new_tokens=0", f"run_dir={run_dir}")  # fmt: skip
    train(cfg)
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    train_steps = [int(r.split(",")[header.index("step")]) for r in rows[1:] if r.split(",")[header.index("train/loss")]]
    assert train_steps == [0, 1, 2]  # alpha 0.5 of 6 source steps, counted from 0: a fresh run
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["model"]
    assert saved["kv_heads"] == 1 and saved["dim"] == 64  # the source's architecture, not the composed model.dim
    with pytest.raises(ConfigError, match=r"init.kv_heads=3 .*valid values"):
        apply_init(compose(*TINY, BPE, f"init.from={source}", "init.kv_heads=3"))
    with pytest.raises(ConfigError, match="this run uses 'byte'; set data.tokenizer=shakespeare-bpe-2k.json"):
        apply_init(compose(*TINY, f"init.from={source}"))
    with pytest.raises(ConfigError, match="init.alpha is set but init.from is not"):
        apply_init(compose(*TINY, "experiment=uptrain"))
    with pytest.raises(ConfigError, match="init.alpha must be > 0"):
        apply_init(compose(*TINY, BPE, f"init.from={source}", "init.alpha=0"))


@pytest.mark.gpu
def test_a_cpu_trained_checkpoint_generates_on_the_gpu(trained_run):
    loaded = load_trained(str(trained_run / "run"), device="cuda")
    assert next(loaded.model.parameters()).is_cuda
    prompt = torch.tensor([loaded.tokenizer.encode("ROMEO.")], device="cuda")
    cpu = load_trained(str(trained_run / "run"), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(prompt).cpu(), cpu.model(prompt.cpu()), rtol=1e-3, atol=1e-3)
    assert loaded.model.generate(prompt, 8, temperature=0.0).shape == (1, 8)
