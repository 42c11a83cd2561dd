"""bench/decode.py runs end to end in its tiny CPU mode (so the GPU script cannot rot), and refuses
bad arguments naming the value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/decode.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is the CPU stand-in of the GPU benchmark")
def test_smoke_run_checks_times_and_writes_every_section(tmp_path):
    out = tmp_path / "decode.json"
    proc = run("--smoke", "--out", str(out), "--splits", "3", "--configs", "32:2:4")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["check"]["ok"] and report["check"]["greedy"] == {
        "graph_vs_uncached_fp32_ragged": True, "mgqa_vs_hf_fp32": True}
    for row in report["attention"]["rows"]:
        for name in ("mgqa", "mgqa_splits3", "mgqa_n32s2w4"):
            assert row["results"][name]["ms"] > 0 and row["results"][name]["rel_err"] < 1e-5, name
        assert row["results"]["sdpa_cudnn"] == {"skipped": "needs a CUDA GPU"}
    for row in report["generation"]["rows"]:
        assert row["results"]["mgqa"]["tokens_per_s"] > 0 and row["results"]["hf_dynamic"]["tokens_per_s"] > 0
        assert row["results"]["hf_dynamic"]["same_tokens_as_mgqa"] == 1.0  # same weights, same greedy tokens
    kv = report["kv"]["rows"]
    assert [r["kv_bytes_per_token"] for r in kv] == [256, 1024] and all(r["tokens_per_s"] > 0 for r in kv)
    assert "Decode attention" in proc.stdout and "Across kv_heads" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--sections", "attention,bogus"], "--sections 'attention,bogus': unknown ['bogus']"),
    (["--kv-heads", "1,3"], "--kv-heads: [3] do not divide 32 query heads"),
    (["--batches", "1,x"], "--batches '1,x': expected comma-separated integers"),
    (["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--configs", "64:3"], "--configs '64:3': expected BLOCK_N:stages:warps"),
])
def test_bad_arguments_are_refused(args, message):
    proc = run(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_it_says_so():
    proc = run("--sections", "attention")
    assert proc.returncode == 2 and "needs a CUDA GPU (or --smoke" in proc.stderr


def test_the_benchmark_model_is_made_wholly_on_the_asked_device(monkeypatch):
    """Every parameter and buffer on the device asked for ("meta" stands in for CUDA): a Decoder made
    outside the device scope once left the blocks on the CPU and broke the GPU run."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from llama_peer import MODEL_SMOKE, build_mgqa

    model = build_mgqa(MODEL_SMOKE, 16, "meta", torch.bfloat16)
    tensors = [*model.parameters(), *model.buffers()]
    assert {t.device.type for t in tensors} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
