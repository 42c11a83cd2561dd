"""The GPU benchmarks refuse bad arguments with a usage line, and say plainly that they need a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script,args,expected", [
    ("train_throughput.py", ["--shapes", "1b,7b"], "unknown shape '7b'"),
    ("train_throughput.py", ["--impls", "mgqa_compiled_sdpa,hf_turbo"], "unknown implementation 'hf_turbo'"),
    ("train_throughput.py", ["--compile-mode", "fastest"], "argument --compile-mode: invalid choice: 'fastest'"),
    ("kernel_bandwidth.py", ["--shape", "7b"], "unknown shape '7b'"),
    ("kernel_bandwidth.py", ["--impl", "hf_compiled"], "unknown or uncompiled implementation 'hf_compiled'"),
    ("kernel_bandwidth.py", ["--steps", "0"], "--steps (0) and --top (25) must be at least 1"),
    ("kernel_bandwidth.py", ["--inductor", "triton.persistent_reductions=maybe"],
     "--inductor: triton.persistent_reductions=maybe: expected True/False or 1/0"),
    ("inductor_code.py", ["--shape", "7b"], "unknown shape '7b'"),
    ("inductor_code.py", ["--seq", "-256"], "--seq must be positive, got -256"),
])
def test_bad_arguments_are_usage_errors(script, args, expected):
    proc = run(script, *args)
    assert proc.returncode == 2
    assert expected in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
@pytest.mark.parametrize("script,args", [
    ("train_throughput.py", ["--shapes", "125m"]),
    ("kernel_bandwidth.py", ["--shape", "125m"]),
])
def test_without_a_gpu_it_says_so(script, args):
    proc = run(script, *args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: bench/{script} needs a CUDA GPU"
