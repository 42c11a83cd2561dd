"""bench/attention.py: it refuses bad arguments with a usage error that names the bad value, says so
plainly when there is no CUDA GPU to time, compares mgqa's kernel plans only through the public
``KernelOptions`` (never by patching module globals or importing private names), and its warm-up
survives a stuck or dying worker."""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "attention.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args,expected", [
    (["--impls", "mgqa,bogus"], "unknown implementation(s) ['bogus']"),
    (["--impls", "mgqa_atomic_dq"], "unknown implementation(s) ['mgqa_atomic_dq']"),
    (["--only", "^128,32,8192,True"],
     "--only '^128,32,8192,True' matches none of the 48 shapes, written 'D,Hkv,N,causal' with causal 0 or 1"),
    (["--lengths", "4096,8k"], "--lengths '4096,8k': expected comma-separated integers"),
    (["--lengths", "4096,-1"], "--lengths '4096,-1': expected positive integers"),
    (["--repeat", "0"], "--repeat must be at least 1, got 0"),
    (["--warm-timeout", "0"], "--warm-timeout must be positive, got 0.0"),
])
def test_bad_arguments_name_the_value(args, expected):
    proc = run(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_without_a_gpu_it_says_so():
    proc = run("--no-autotune", "--impls", "mgqa,mgqa_tl")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "bench/attention.py needs a CUDA GPU" in proc.stderr


def test_the_implementations_are_the_default_plan_the_fallback_and_the_peers():
    from mgqa.kernels import KernelOptions

    from bench.attention import IMPLS, kernel_options

    assert list(IMPLS) == ["mgqa", "mgqa_tl", "sdpa_flash", "sdpa_cudnn", "flex"]
    assert kernel_options("mgqa") == KernelOptions()
    assert kernel_options("mgqa_tl") == KernelOptions(gluon=False)
    assert kernel_options("mgqa", autotune=False) == KernelOptions(autotune=False)
    assert kernel_options("mgqa_tl", autotune=False) == KernelOptions(autotune=False, gluon=False)


def test_every_implementation_name_is_accepted():
    from bench.attention import IMPLS, parse_impls

    parser = argparse.ArgumentParser()
    assert parse_impls(parser, ",".join(IMPLS)) == list(IMPLS)
    assert parse_impls(parser, " mgqa_tl , flex ,") == ["mgqa_tl", "flex"]


def test_the_shape_lists():
    """--quick is 9 shapes; the full grid is D 128/64 x Hkv 8/1/32 x the lengths x causal or not,
    and --lengths replaces its N."""
    from bench.attention import shapes

    quick = list(shapes(True))
    assert len(quick) == 9 and (128, 8, 4096, True) in quick and (64, 8, 4096, True) in quick
    assert list(shapes(True, (2048,))) == quick  # --lengths does not apply to --quick
    full = list(shapes(False))
    assert len(full) == len(set(full)) == 48
    assert {s[0] for s in full} == {64, 128} and {s[1] for s in full} == {1, 8, 32}
    assert {s[2] for s in full} == {1024, 4096, 8192, 16384}
    assert {s[2] for s in shapes(False, (2048, 3000))} == {2048, 3000}
    assert len(list(shapes(False, (2048,)))) == 12


def _imports(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [(alias.name, alias.asname or alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [(alias.name, alias.asname or alias.name.split(".")[0])]


def test_it_uses_mgqa_only_through_public_names():
    """No private module or name of mgqa, no module globals set at run time: mgqa's variants are
    KernelOptions passed to triton_attention."""
    tree = ast.parse(SCRIPT.read_text())
    mgqa_imports = [(module, names) for module, names in _imports(tree) if module.split(".")[0] == "mgqa"]
    assert mgqa_imports, "bench/attention.py should call mgqa's kernels"
    for module, names in mgqa_imports:
        assert not any(part.startswith("_") for part in module.split(".")), module
        assert not any(name.startswith("_") or name == "*" for name, _ in names), (module, names)
    assert {"KernelOptions", "triton_attention", "plan_for_inputs"} <= {name for _, names in mgqa_imports
                                                                       for name, _ in names}
    bound = {local for _, names in mgqa_imports for _, local in names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            assert not node.attr.startswith("_"), f"{node.value.id}.{node.attr}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "setattr", "mgqa variants must not patch module globals"
        if isinstance(node, ast.Name):
            assert not node.id.startswith("MGQA_TRITON"), node.id
    assert "MGQA_TRITON_" not in SCRIPT.read_text()


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
