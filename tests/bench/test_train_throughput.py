"""bench/train_throughput.py refuses bad arguments, and says plainly that it needs a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/train_throughput.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,expected", [
    (["--shapes", "1b,7b"], "unknown shape '7b'"),
    (["--impls", "mgqa_compiled_sdpa,hf_turbo"], "unknown implementation 'hf_turbo'"),
])
def test_bad_arguments_are_usage_errors(args, expected):
    proc = run(*args)
    assert proc.returncode == 2
    assert expected in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_without_a_gpu_it_says_so():
    proc = run("--shapes", "125m")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: bench/train_throughput.py needs a CUDA GPU"
