"""Triton kernels for grouped-query attention. Nothing here imports the model; ``mgqa.ops`` is the
only caller.

- ``plan.py``: ``plan_attention``, the one place that chooses each pass's kernel, tiles and order
  (pure; no GPU needed), and ``KernelOptions``;
- ``checks.py``: what the kernels accept; ``launch.py``: carries a plan out; ``ops.py``: the entry
  point ``triton_attention``, the custom ops and autograd;
- one kernel per file: ``tl_fwd``, ``tl_dq``, ``tl_dkdv`` (plain Triton, any CUDA GPU and the
  interpreter), ``gluon_fwd``, ``gluon_dq``, ``gluon_dkdv`` (warp-specialised, sm_90), ``decode``.
"""

from mgqa.kernels.checks import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, unsupported_reason
from mgqa.kernels.ops import configure, default_options, plan_for_inputs, run_checked, triton_attention
from mgqa.kernels.plan import AttentionPlan, DecodePlan, DeviceProps, KernelOptions, PassPlan, plan_attention, plan_decode

__all__ = ["SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "AttentionPlan", "DecodePlan", "DeviceProps", "KernelOptions", "PassPlan",
           "configure", "default_options", "plan_attention", "plan_decode", "plan_for_inputs", "run_checked", "triton_attention",
           "unsupported_reason"]
