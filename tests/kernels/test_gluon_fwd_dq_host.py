"""Launch options of the Gluon forward and dQ kernels that do not go together are refused before
anything runs, with an error naming them."""

import pytest
import torch

fwd_ws = pytest.importorskip("mgqa.kernels.attention_fwd_ws", reason="Gluon unavailable in this Triton")
dq_ws = pytest.importorskip("mgqa.kernels.attention_dq_ws", reason="Gluon unavailable in this Triton")


def _inputs():
    q = torch.zeros(1, 2, 128, 128, dtype=torch.bfloat16)
    k = torch.zeros(1, 1, 128, 128, dtype=torch.bfloat16)
    return q, k, k.clone()


def test_persistent_forward_refuses_turns():
    q, k, v = _inputs()
    out, lse = torch.full_like(q, 7.0), torch.full(q.shape[:3], 7.0)
    with pytest.raises(ValueError, match="pingpong=True"):
        fwd_ws.launch(q, k, v, out, lse, True, 1.0, persistent=True, pingpong=True)
    assert torch.all(out == 7.0) and torch.all(lse == 7.0)  # nothing written


def test_first_free_lists_are_the_persistent_forwards_only():
    q, k, v = _inputs()
    out, lse = torch.full_like(q, 7.0), torch.full(q.shape[:3], 7.0)
    with pytest.raises(ValueError, match="first_free=True"):
        fwd_ws.launch(q, k, v, out, lse, True, 1.0, persistent=False, first_free=True)
    assert torch.all(out == 7.0) and torch.all(lse == 7.0)


def test_dq_kernel_takes_turns_only_with_overlap():
    q, k, v = _inputs()
    dq, delta = torch.full_like(q, 7.0), torch.full(q.shape[:3], 7.0)
    with pytest.raises(ValueError, match="overlap=True"):
        dq_ws.launch(q, k, v, q, q, torch.zeros(q.shape[:3]), delta, dq, True, 1.0, 1.0, overlap=False,
                     pingpong=True)
    assert torch.all(dq == 7.0) and torch.all(delta == 7.0)
