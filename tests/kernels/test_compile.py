"""The kernels compile for Hopper (sm_90) with the real Triton compiler, on a machine without a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


def _has_nvidia_backend() -> bool:
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").is_file()


@pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton's NVIDIA backend (ptxas) is not installed")
@pytest.mark.timeout(480)
def test_kernels_compile_for_sm90_with_matrix_and_tma_instructions(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from a cache
    # 28 attention variants: about a minute on two cores
    proc = subprocess.run(
        [sys.executable, "-m", "mgqa.kernels.compile_check", "--arch", "90", "--ptx-dir", str(tmp_path / "ptx")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=450,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("fwd", "dq", "dkdv", "gluon_"))]
    assert len(rows) == 28, proc.stdout
    for row in rows:
        kernel, tma, shared, wgmma, tma_copies = row[0], row[1], int(row[3]), int(row[4]), int(row[5])
        assert wgmma > 0, f"{kernel} {tma}: no Hopper matrix instructions"
        assert (tma_copies > 0) == (tma == "tma=1"), f"{kernel} {tma}: TMA copies {tma_copies}"
        assert 0 < shared <= 227 * 1024, f"{kernel}: {shared} B of shared memory cannot launch on an H100"
    # The Gluon kernels the default plan runs, both masks: matmuls left asynchronous; the forward and
    # dQ kernels spill nothing.
    gluon = [row for row in rows if row[0].startswith("gluon_")]
    assert len(gluon) == 12
    for row in gluon:
        assert row[7] == "no", row
        assert row[0].startswith("gluon_dkdv") or row[6] == "0", row
    ptx = (tmp_path / "ptx" / "fwd_tma1_causal1.ptx").read_text()
    assert ".target sm_90" in ptx
    # Overlapped dQ: S_j and dP_j complete while block j-1's dQ matmul may still run (two left in flight).
    ptx = (tmp_path / "ptx" / "gluon_dq_tma1_causal1.ptx").read_text()
    assert "wgmma.wait_group.sync.aligned 2" in ptx


@pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton's NVIDIA backend (ptxas) is not installed")
@pytest.mark.timeout(300)
def test_decode_kernel_compiles_for_sm90_pipelined_without_spills(tmp_path):
    """The decode kernel's K/V loads become asynchronous copies (a software pipeline), its dots
    tensor-core mma; three programs of a 16-row tile (GQA groups up to 16 rows) fit an SM's 228 KB
    of shared memory, two of the larger tiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-m", "mgqa.kernels.compile_check", "--only", "dec", "--ptx-dir", str(tmp_path / "ptx")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("dec")]
    assert len(rows) == 7, proc.stdout
    for path in (tmp_path / "ptx").glob("dec_g*.ptx"):
        ptx = path.read_text()
        assert "mma.sync" in ptx and "cp.async.cg" in ptx, path.name
    for row in rows:
        if row[1] == "g=4" and row[2] == "nq=1":
            assert 0 < int(row[4]) + 1024 <= 228 * 1024 // 3, row
        elif row[1] != "combine":
            assert 0 < int(row[4]) + 1024 <= 228 * 1024 // 2, row
