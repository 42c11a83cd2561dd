"""The timing scripts in bench/ refuse bad arguments with a usage error that names the bad value,
and say so plainly when there is no CUDA GPU to time, before any work starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script,args,expected", [
    ("bench/attention.py", ["--impls", "mgqa,bogus"], "unknown implementation(s) ['bogus']"),
    ("bench/attention_kernels.py", ["--impls", "sdpa_flash,nope"], "unknown implementation(s) ['nope']"),
    ("bench/attention_kernels.py", ["--shapes", "128,3,4096,1"], "shape '128,3,4096,1': Hkv must divide 32"),
    ("bench/attention_kernels.py", ["--shapes", "128,8,4096"], "shape '128,8,4096' is not 'D,Hkv,N,causal'"),
    ("bench/attention_kernels.py", ["--calls", "0"], "--calls must be at least 1, got 0"),
    ("bench/host_overhead.py", ["--profile", "mgqa_typo"], "unknown implementation(s) ['mgqa_typo']"),
    ("bench/host_parts.py", ["--lengths", "4096,4k"], "--lengths '4096,4k': expected comma-separated integers"),
    ("bench/reduce_throughput.py", ["--variants", "tl_atomic,red_v8"], "unknown variant(s) ['red_v8']"),
])
def test_bad_arguments_name_the_value(script, args, expected):
    proc = run(script, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
@pytest.mark.parametrize("script", ["bench/attention.py", "bench/attention_kernels.py", "bench/host_overhead.py",
                                    "bench/host_parts.py", "bench/reduce_throughput.py"])
def test_without_a_gpu_the_scripts_say_so(script):
    proc = run(script)
    assert proc.returncode == 2
    assert f"{script} needs a CUDA GPU" in proc.stderr
