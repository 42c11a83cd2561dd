"""bench/inductor_code.py: Inductor's H100 code for a block, generated on a machine without a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import inductor_code as ic  # noqa: E402

TINY = {"dim": 128, "heads": 4, "kv_heads": 2, "seq": 32}


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows the code generated where there is no GPU")
@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_a_block_lowers_for_an_h100_on_the_cpu(attention):
    graphs = ic.capture_block(TINY, batch=2, attention=attention)  # triton: in the interpreter (conftest)
    with ic.h100_answers():
        fw, bw = (ic.cuda_code(*graphs[name], name == "bw", {}) for name in ("fw", "bw"))
    assert not torch.cuda.is_available()  # the device answers are gone with the context
    for code in (fw, bw):
        assert "device_str='cuda'" in code and "cc=90" in code and "multi_processor_count=132" in code
        assert "empty_strided_cuda" in code and "empty_strided_cpu(" not in code
    forward = dict(ic.kernels(fw))
    # Inductor's fusions, as on the card: the attention norm's statistics with its scaling, and
    # SwiGLU's gate with its product.
    assert any("rsqrt" in name and "mean" in name for name in forward), forward
    assert any("silu" in name and "mul" in name for name in forward), forward
    assert all(nodes for nodes in forward.values())
    # The projections' weight gradients come out of the product in float32, as on CUDA.
    assert bw.count("extern_kernels.mm_dtype(") == 4 and "out_dtype=torch.float32" in bw
    assert ic.kernels(bw)
    if attention == "triton":  # mgqa's kernels stay extern calls through their custom ops
        assert "torch.ops.mgqa.gqa_attention_fwd.default(" in fw and "torch.ops.mgqa.gqa_attention_bwd.default(" in bw
