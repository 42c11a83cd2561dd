"""Weights in and out: Hugging Face Llama import/export and MHA -> GQA key/value head conversion.

One file per direction with an explicit weight map (``hf_import``, ``hf_export``); ``kv_heads``
re-groups the K/V projections of an ``MGQATransformer`` state dict (Ainslie et al. 2023, section 2.1).
"""
