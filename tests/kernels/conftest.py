"""Kernel tests run the Triton interpreter on machines without CUDA (set before triton is imported).
With CUDA, the tl kernels run the plan's first fitting tile config instead of autotuning each new
shape (every candidate would compile and be timed), so that the GPU tests fit in minutes."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    import mgqa.kernels

    mgqa.kernels.configure(autotune=False)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped elsewhere")


@pytest.fixture
def nan_poison():
    """Every uninitialised tensor (torch.empty, hence every kernel output before the kernel writes
    it) starts as NaN: an element a kernel forgets to write fails the test. warn_only: on CUDA,
    cuBLAS matmuls (the reference) would otherwise refuse to run without CUBLAS_WORKSPACE_CONFIG."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill
