"""Linear + cross-entropy in row chunks: the language-model loss without the batch's full logits.

``linear_cross_entropy(hidden, weight, targets)`` equals
``F.cross_entropy((hidden @ weight.T).float(), targets)`` (mean over targets != ``ignore_index``)
but holds the logits of one chunk of rows at a time. With gradients enabled it computes
the gradients of ``hidden`` and ``weight`` chunk by chunk in the forward pass (the logits are then
freed), so the backward pass only scales them: peak memory is one chunk's logits plus one
``weight``-sized gradient, instead of the batch's logits and their gradient (at 16k tokens and a
128k vocabulary: 8 GiB of float32 logits, twice over).

Under autocast the matrix products run in the autocast dtype, as ``nn.Linear`` would; the
log-softmax is float32 either way, and a float32 weight gets its gradient from the float32 sum of
the chunks' products as it is, without a round trip through the autocast dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

# Logits per chunk: 2**27 elements = 256 MiB in bf16, e.g. 4096 rows of a 32k vocabulary.
_CHUNK_ELEMENTS = 2**27


def _chunk_rows(rows: int, vocab: int) -> int:
    return max(1, min(rows, max(128, _CHUNK_ELEMENTS // vocab)))


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float32, or float64 for a float64 oracle


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sum of -log p(target) over the valid rows of ``logits`` (C, V)."""
    logits = logits.to(_accumulation_dtype(logits.dtype))
    lse = torch.logsumexp(logits, dim=-1)  # (C,)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)  # (C,)
    return ((lse - target_logit) * valid).sum()


def _chunk_loss_and_grad(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's loss sum and ``scale`` * d loss / d logits = softmax - onehot(target), 0 for
    ignored rows.

    logits: (C, V) in the compute dtype; the gradient comes back in it. ``scale`` is 1 / (number of
    valid targets), applied before the cast. One elementwise pass over the chunk once compiled,
    which it is on CUDA.
    """
    wide = logits.to(_accumulation_dtype(logits.dtype))
    lse = torch.logsumexp(wide, dim=-1)  # (C,)
    target_logit = wide.gather(1, targets[:, None]).squeeze(1)  # (C,)
    loss = ((lse - target_logit) * valid).sum()
    columns = torch.arange(wide.shape[1], device=wide.device)
    onehot = (columns[None, :] == targets[:, None]).to(wide.dtype)
    grad = (torch.exp(wide - lse[:, None]) - onehot) * (valid * scale)[:, None]
    return loss, grad.to(logits.dtype)


_compiled: dict[str, object] = {}


def _loss_and_grad_fn(device: torch.device):
    """The compiled chunk step on CUDA (fused by Inductor); plain PyTorch elsewhere."""
    if device.type != "cuda":
        return _chunk_loss_and_grad
    if "cuda" not in _compiled:
        # dynamic=None: the last, shorter chunk makes it dynamic in rows after one recompilation.
        _compiled["cuda"] = torch.compile(_chunk_loss_and_grad)
    return _compiled["cuda"]


# A matrix product with a wider output dtype (aten::addmm.dtype_out, CUDA only) is missing from older torch releases.
_ADDMM_OUT_DTYPE = "dtype_out" in torch.ops.aten.addmm.overloads()


def _accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` with ``out`` wider than ``a`` and ``b``.

    On CUDA a half-precision product is added straight into the float32 ``out`` by the matrix
    product's epilogue (``out_dtype``): a converted (V, D) copy per chunk would cost more memory
    traffic than the product itself at a 128k vocabulary. Elsewhere the product is converted, then
    added.
    """
    if _ADDMM_OUT_DTYPE and out.is_cuda and out.dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16):
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    else:
        out += (a @ b).to(out.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight_in, targets, valid, chunk_rows):  # noqa: ANN001 (autograd signature)
        # hidden (T, D) in the compute dtype; weight_in (V, D) in its own dtype, multiplied in the
        # compute dtype; targets (T,) with ignored rows set to 0.
        weight = weight_in.to(hidden.dtype)
        rows, acc = hidden.shape[0], _accumulation_dtype(hidden.dtype)
        count = valid.sum().clamp(min=1).to(acc)
        scale = 1.0 / count
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        step = _loss_and_grad_fn(hidden.device)
        for start in range(0, rows, chunk_rows):
            h = hidden[start : start + chunk_rows]  # (C, D)
            logits = h @ weight.T  # (C, V), compute dtype
            loss, grad = step(logits, targets[start : start + chunk_rows], valid[start : start + chunk_rows], scale)
            total += loss
            del logits
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_rows] = grad @ weight
            if grad_weight is not None:
                _accumulate(grad_weight, grad.T, h)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight_in.dtype) if grad_weight is not None else None)
        return total / count

    @staticmethod
    def backward(ctx, grad_output):  # noqa: ANN001
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None,
            grad_weight * grad_output.to(grad_weight.dtype) if grad_weight is not None else None,
            None,
            None,
            None,
        )


@torch.compiler.disable  # a Python loop over chunks: run it as written, whether or not the caller is compiled
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, one chunk of rows at a time.

    hidden: (T, D) or (B, N, D); weight: (V, D) (an ``nn.Linear``'s weight, no bias); targets: (T,)
    or (B, N) int64 in [0, V) or ``ignore_index``. Returns a float32 scalar (float64 for float64
    inputs); with gradients enabled it is differentiable in ``hidden`` and ``weight`` (not twice).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but targets has {targets.shape[0]}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be (vocab, {hidden.shape[1]}), got {tuple(weight.shape)}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    rows = chunk_rows or _chunk_rows(hidden.shape[0], weight.shape[0])
    with torch.autocast(device, enabled=False):
        hidden_c = hidden.to(dtype)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden_c, weight, safe_targets, valid, rows)
        weight_c = weight.to(dtype)
        acc = _accumulation_dtype(dtype)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden_c.shape[0], rows):
            logits = hidden_c[start : start + rows] @ weight_c.T  # (C, V)
            total += _chunk_loss(logits, safe_targets[start : start + rows], valid[start : start + rows])
        return total / valid.sum().clamp(min=1).to(acc)
