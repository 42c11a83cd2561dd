"""The timing scripts in bench/ refuse bad arguments with a usage error that names the bad value,
and say so plainly when there is no CUDA GPU to time, before any work starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script,args,expected", [
    ("bench/attention.py", ["--impls", "mgqa,bogus"], "unknown implementation(s) ['bogus']"),
    ("bench/attention.py", ["--only", "^128,32,8192,True"],
     "--only '^128,32,8192,True' matches none of the 48 shapes, written 'D,Hkv,N,causal' with causal 0 or 1"),
    ("bench/attention.py", ["--lengths", "4096,8k"], "--lengths '4096,8k': expected comma-separated integers"),
    ("bench/attention.py", ["--warm-timeout", "0"], "--warm-timeout must be positive, got 0.0"),
    ("bench/attention_kernels.py", ["--impls", "sdpa_flash,nope"], "unknown implementation(s) ['nope']"),
    ("bench/attention_kernels.py", ["--shapes", "128,3,4096,1"], "shape '128,3,4096,1': Hkv must divide 32"),
    ("bench/attention_kernels.py", ["--shapes", "128,8,4096"], "shape '128,8,4096' is not 'D,Hkv,N,causal'"),
    ("bench/attention_kernels.py", ["--calls", "0"], "--calls must be at least 1, got 0"),
    ("bench/host_overhead.py", ["--profile", "mgqa_typo"], "unknown implementation(s) ['mgqa_typo']"),
    ("bench/host_parts.py", ["--lengths", "4096,4k"], "--lengths '4096,4k': expected comma-separated integers"),
    ("bench/reduce_throughput.py", ["--variants", "tl_atomic,red_v8"], "unknown variant(s) ['red_v8']"),
    ("bench/launch_model.py", ["--kv-heads", "1,3"], "--kv-heads '1,3': [3] do not divide 32"),
    ("bench/launch_model.py", ["--lengths", "4096,-1"], "--lengths '4096,-1': expected positive integers"),
    ("bench/launch_model.py", ["--l2-mb", "0"], "--l2-mb must be positive, got 0.0"),
    ("bench/launch_model.py", ["--sms", "0"], "--sms must be at least 1, got 0"),
    ("bench/forward_walk_model.py", ["--kv-heads", "3"], "--kv-heads '3': [3] do not divide 32"),
    ("bench/forward_walk_model.py", ["--lengths", "4096,x"], "--lengths '4096,x': expected comma-separated integers"),
    ("bench/forward_walk_model.py", ["--setup", "-1"], "--setup must be at least 0, got -1.0"),
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


def test_launch_model_shows_why_the_launcher_splits_causal_mqa_further(tmp_path):
    """The CPU model of the causal dK/dV launch (bench/NOTES.md, v19): MQA at 4k with 4 group splits
    ends far past the ideal (2-chunk sections of 64 programs, fewer than run at once), with the 8 the
    launcher picks it does not; on a 60 MB L2, Hkv=16's ragged sections (7 of 9 chunks and 1 of 1)
    overrun where the even ones (8 of 8) do not."""
    pytest.importorskip("mgqa.kernels.attention_bwd_ws", reason="Gluon unavailable in this Triton")
    out = tmp_path / "model.json"
    proc = run("bench/launch_model.py", "--kv-heads", "1,16", "--lengths", "4096", "--l2-mb", "60", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = {(row["Hkv"], row["splits"]): row for row in json.loads(out.read_text())["rows"]}
    assert rows[(1, 4)]["overrun_even"] > 0.15 and rows[(1, 8)]["overrun_even"] < 0.02
    assert [splits for (kv, splits), row in rows.items() if kv == 1 and row["picked"]] == [8]
    hkv16 = rows[(16, 1)]
    assert hkv16["picked"] and hkv16["section_chunks_even"] == 8 and hkv16["section_chunks_ragged"] == 9
    assert hkv16["overrun_ragged"] > 0.05 and hkv16["overrun_even"] < 0.01
    assert "<- launcher" in proc.stdout


def test_forward_walk_model_shows_the_strided_walk_unbalancing_causal_mha(tmp_path):
    """The CPU model of the persistent forward's walks (bench/NOTES.md, v20): under a causal mask the
    strided walk ends 12% past the ideal for MHA at 4k (each head's tiles run longest first, so the
    walk hands some programs mostly long ones) and 3% for Hkv=8; the first-free lists end where the
    one-program-per-tile launch does; the snake order evens MHA out but not GQA."""
    pytest.importorskip("mgqa.kernels.attention_fwd_ws", reason="Gluon unavailable in this Triton")
    out = tmp_path / "walks.json"
    proc = run("bench/forward_walk_model.py", "--kv-heads", "8,32", "--lengths", "4096,8192", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = {(row["Hkv"], row["N"]): row for row in json.loads(out.read_text())["rows"]}
    assert rows[(32, 4096)]["strided_overrun"] == pytest.approx(0.120, abs=0.005)
    assert rows[(8, 4096)]["strided_overrun"] == pytest.approx(0.031, abs=0.005)
    for row in rows.values():
        assert row["first_free_overrun"] == pytest.approx(row["per_tile_overrun"])
        assert row["first_free_overrun"] < 0.04
    assert rows[(8, 8192)]["snake_overrun"] > 0.3
    assert "first_free" in proc.stdout


def _warm_group(task):
    """Stand-in for bench/attention.py's warm-up worker: the D=128 group never finishes, the D=32
    group's worker dies, the D=64 group reports one implementation that failed."""
    (head_dim, kv_heads, n, causal), *_ = task[0]
    if head_dim == 128:
        time.sleep(120)
    if head_dim == 32:
        os._exit(3)
    return [f"mgqa at {head_dim},{kv_heads},{n},{int(causal)}: RuntimeError"]


def test_warm_up_reports_each_group_and_leaves_a_stuck_one_to_the_timing_run(capsys):
    """A group still compiling at the time limit is named and abandoned (its worker killed) instead of
    holding the benchmark; a finished group is printed with what failed in it."""
    from bench.attention import warm_up

    start = time.time()
    warm_up([(64, 8, 1024, True), (64, 8, 4096, True), (128, 8, 1024, True)], ["mgqa"], "bfloat16", 2, 20.0,
            worker=_warm_group)
    assert time.time() - start < 60
    captured = capsys.readouterr()
    assert "warmed D=64 Hkv=8 causal=True" in captured.out
    assert "failed there: mgqa at 64,8,1024,1: RuntimeError" in captured.out
    assert "still compiling after 20 s, left to the timing run: D=128 Hkv=8 causal=True" in captured.err


def test_warm_up_survives_a_worker_that_dies(capsys):
    from bench.attention import warm_up

    warm_up([(32, 8, 1024, True)], ["mgqa"], "bfloat16", 1, 60.0, worker=_warm_group)
    assert "warm-up of D=32 Hkv=8 causal=True failed: BrokenProcessPool" in capsys.readouterr().err
