"""Triton kernels. Nothing here imports the model; ``mgqa.ops`` is the only caller."""
