"""Token generation: prompts of different lengths in one batch, a KV cache allocated once, and on
CUDA a decode step (model forward and sampling) captured in a CUDA graph and replayed per token.

``stream_tokens`` is what ``MGQATransformer.generate_stream`` and ``generate`` run. The cached and
uncached paths compute the same function: greedy decoding gives the same tokens either way. Once a
sequence reaches ``max_seq_len`` both slide a window over its last ``max_seq_len`` tokens.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from mgqa.model.sampling import check_sampling, sample_next
from mgqa.model.static_cache import StaticKVCache

Prompt = Union[torch.Tensor, Sequence[Union[torch.Tensor, Sequence[int]]]]


def prepare_prompt(prompt: Prompt, max_len: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """A (B, N) or (N,) tensor, or a list of 1-d token sequences of any lengths -> right-padded
    tokens (B, W) on ``device`` and each sequence's length; each keeps its last ``max_len`` tokens."""
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() == 1:
            prompt = prompt.unsqueeze(0)
        if prompt.dim() != 2:
            raise ValueError(f"prompt must be (batch, seq_len) or (seq_len,), got shape {tuple(prompt.shape)}")
        if prompt.shape[1] and not (prompt.dtype.is_floating_point or prompt.dtype == torch.bool):
            tokens = prompt[:, -max_len:].to(device=device, dtype=torch.long)
            return tokens, [tokens.shape[1]] * tokens.shape[0]
        rows = list(prompt)
    elif isinstance(prompt, (list, tuple)) and prompt:
        rows = [torch.as_tensor(row) for row in prompt]
        for i, row in enumerate(rows):
            if row.dim() != 1:
                raise ValueError(f"prompt[{i}] must be a 1-d token sequence, got shape {tuple(row.shape)}")
    else:
        raise ValueError(f"prompt must be a token tensor or a non-empty list of token sequences, got {prompt!r}")
    for i, row in enumerate(rows):
        if row.numel() == 0:
            raise ValueError("prompt must hold at least one token" + (f" (sequence {i} is empty)" if len(rows) > 1 else ""))
        if row.dtype.is_floating_point or row.dtype == torch.bool:
            raise ValueError(f"prompt tokens must be integers, got {row.dtype}")
    rows = [row[-max_len:] for row in rows]
    lengths = [len(row) for row in rows]
    tokens = torch.zeros(len(rows), max(lengths), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row.to(device)
    return tokens, lengths


class _History:
    """Every sequence's tokens so far (right-padded, B x capacity), their lengths on the host, and
    the same lengths on the device (so that appending a token never waits for the device)."""

    def __init__(self, tokens: torch.Tensor, lengths: list[int], new_tokens: int) -> None:
        batch, width = tokens.shape
        self.tokens = torch.zeros(batch, width + new_tokens, dtype=torch.long, device=tokens.device)
        self.tokens[:, :width] = tokens
        self.lengths = list(lengths)
        self._at = torch.tensor(lengths, device=tokens.device)  # (B,)
        self._rows = torch.arange(batch, device=tokens.device)

    def append(self, token: torch.Tensor) -> None:
        self.tokens[self._rows, self._at] = token
        self._at += 1
        self.lengths = [n + 1 for n in self.lengths]

    def window(self, max_len: int) -> tuple[torch.Tensor, list[int]]:
        """Each sequence's last ``max_len`` tokens, right-padded (B, W), and their lengths."""
        starts = [max(0, n - max_len) for n in self.lengths]
        sizes = [n - s for n, s in zip(self.lengths, starts)]
        if not any(starts) and len(set(sizes)) == 1:
            return self.tokens[:, : sizes[0]], sizes
        width = max(sizes)
        index = torch.tensor(starts, device=self.tokens.device)[:, None] + torch.arange(width, device=self.tokens.device)
        return self.tokens.gather(1, index.clamp_(max=self.tokens.shape[1] - 1)), sizes


def _last_logits(model: Any, tokens: torch.Tensor, lengths: list[int], cache: Optional[StaticKVCache]) -> torch.Tensor:
    """Logits (B, V) after each sequence's last token: the head runs on those rows only."""
    hidden = model.hidden_states(tokens, cache=cache)  # (B, W, dim)
    last = torch.tensor([n - 1 for n in lengths], device=tokens.device)  # (B,)
    return model.to_logits(hidden[torch.arange(len(lengths), device=tokens.device), last])  # (B, V)


class DecodeStep:
    """One token per sequence through a ``StaticKVCache`` and the sampler: ``step(token (B,)) ->
    next token (B,)``. With ``cuda_graph`` the step is captured once and replayed; eager otherwise.
    Both run the same kernels, so they give the same tokens. ``compile_step`` first passes the step
    through ``torch.compile`` (static shapes), which fuses its small element-wise kernels; a
    captured graph then replays the compiled kernels."""

    def __init__(self, model: Any, cache: StaticKVCache, sample: Callable[[torch.Tensor], torch.Tensor],
                 *, cuda_graph: bool, generator: Optional[torch.Generator], compile_step: bool = False) -> None:
        self.model, self.cache, self.sample = model, cache, sample
        # Held while the step is: the step is looked up by the generator's id, which a new
        # generator could otherwise reuse once this one is freed.
        self.generator = generator
        self.in_use = False  # a stream is decoding through this cache (another stream must not share it)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._run = torch.compile(self._step, dynamic=False) if compile_step else self._step
        if cuda_graph:
            self._capture(generator)

    def _step(self, token: torch.Tensor) -> torch.Tensor:
        hidden = self.model.hidden_states(token[:, None], cache=self.cache)  # (B, 1, dim)
        return self.sample(self.model.to_logits(hidden[:, -1]))  # (B,)

    def _capture(self, generator: Optional[torch.Generator]) -> None:
        cache = self.cache
        self.token = torch.zeros_like(cache.lengths, dtype=torch.long)  # (B,) static input
        lengths = cache.lengths.clone()
        rng = generator.get_state() if generator is not None else torch.cuda.get_rng_state(cache.lengths.device)
        # Warm up outside the graph (compiles and tunes kernels, sets up cuBLAS), then undo what it
        # did: lengths and the random state. Its cache writes sit at positions the next real step overwrites.
        side = torch.cuda.Stream(device=cache.lengths.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run(self.token)
        torch.cuda.current_stream().wait_stream(side)
        cache.lengths.copy_(lengths)
        self.graph = torch.cuda.CUDAGraph()
        if generator is not None:
            self.graph.register_generator_state(generator)
        with torch.cuda.graph(self.graph):
            self.next = self._run(self.token)
        cache.lengths.copy_(lengths)  # capture records the step without running it; be explicit
        if generator is not None:
            generator.set_state(rng)
        else:
            torch.cuda.set_rng_state(rng, cache.lengths.device)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self._run(token)
        self.token.copy_(token)
        self.graph.replay()
        return self.next.clone()


def decode_step(model: Any, batch: int, capacity: int, sample: Callable[[torch.Tensor], torch.Tensor],
                sampling: tuple, *, cuda_graph: bool, compile_step: bool) -> DecodeStep:
    """The decode step (and its cache) for these shapes and sampling settings.

    A captured or compiled step is kept on the model and reused by the next call with the same
    batch, capacity, sampling settings and weights, so that repeated calls skip the capture and the
    compile; ``release_decode_step`` frees it. An eager step is built per call.
    """
    weights = tuple(p.data_ptr() for p in model.parameters())
    key = (batch, capacity, model._cache_dtype(), *sampling[:3], id(sampling[3]), cuda_graph, compile_step, weights)
    held = model.__dict__.get("_decode_step")
    if held is not None and held[0] == key and not held[1].in_use:
        return held[1]
    release_decode_step(model)
    cache = model.new_static_cache(batch, capacity)
    step = DecodeStep(model, cache, sample, cuda_graph=cuda_graph, generator=sampling[3], compile_step=compile_step)
    if cuda_graph or compile_step:
        model.__dict__["_decode_step"] = (key, step)  # outside nn.Module's registries: not state, not a submodule
    return step


def release_decode_step(model: Any) -> None:
    """Drop the decode step and KV cache a model keeps between generate calls (frees their memory)."""
    model.__dict__.pop("_decode_step", None)


def use_cuda_graph(requested: Optional[bool], device: torch.device, use_cache: bool) -> bool:
    """``None``: on for cached generation on CUDA. ``True`` where it cannot run is an error."""
    if requested is None:
        return use_cache and device.type == "cuda"
    if requested and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device.type}; "
                         "pass cuda_graph=None (auto) or False")
    if requested and not use_cache:
        raise ValueError("cuda_graph=True replays cached decode steps; it needs use_cache=True")
    return bool(requested)


def stream_tokens(
    model: Any,
    prompt: Prompt,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    *,
    eos_token: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
    cuda_graph: Optional[bool] = None,
    compile_step: bool = False,
) -> Iterator[torch.Tensor]:
    """An iterator over each step's new tokens (B,). Arguments as ``MGQATransformer.generate_stream``;
    they are checked here, before the first step. The model is in eval mode while the stream runs
    and back in its own mode when it ends."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    device = model.token_emb.weight.device
    tokens, lengths = prepare_prompt(prompt, model.config.max_seq_len, device)
    model._check_token_ids(tokens)  # once, here: the steps feed the model's own samples
    graph = use_cuda_graph(cuda_graph, device, use_cache)
    if compile_step and not use_cache:
        raise ValueError("compile_step=True compiles the cached decode step; it needs use_cache=True")
    return _stream(model, tokens, lengths, max_new_tokens, temperature, top_k, top_p, eos_token, generator,
                   use_cache, graph, compile_step)


@torch.no_grad()
def _stream(model: Any, tokens: torch.Tensor, lengths: list[int], max_new_tokens: int, temperature: float,
            top_k: Optional[int], top_p: Optional[float], eos_token: Optional[int],
            generator: Optional[torch.Generator], use_cache: bool, graph: bool,
            compile_step: bool) -> Iterator[torch.Tensor]:
    if max_new_tokens == 0:
        return
    max_len = model.config.max_seq_len
    device = tokens.device
    was_training = model.training
    model.eval()
    step: Optional[DecodeStep] = None
    try:
        history = _History(tokens, lengths, max_new_tokens)

        def sample(logits: torch.Tensor) -> torch.Tensor:
            return sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

        cache = None
        if use_cache:
            capacity = min(max_len, max(lengths) + max_new_tokens - 1)
            sampling = (temperature, top_k, top_p, generator)
            step = decode_step(model, len(lengths), capacity, sample, sampling, cuda_graph=graph,
                               compile_step=compile_step)
            cache = step.cache
            step.in_use = True
            cache.lengths.zero_()  # a kept step's cache still holds the last call's lengths: prefill from 0
            cache.prefill = True
            logits = _last_logits(model, tokens, lengths, cache)
            cache.prefill = False
            cache.lengths.copy_(torch.tensor(lengths, dtype=torch.int32))
        else:
            logits = _last_logits(model, tokens, lengths, None)
        token = sample(logits)
        finished = torch.zeros(len(lengths), dtype=torch.bool, device=device)
        for index in range(max_new_tokens):
            if eos_token is not None:
                token = torch.where(finished, torch.full_like(token, eos_token), token)
                finished |= token == eos_token
            yield token
            if index == max_new_tokens - 1 or (eos_token is not None and bool(finished.all())):
                return
            fits = cache is not None and max(history.lengths) < cache.capacity
            history.append(token)
            if fits:
                token = step(token)
            else:  # uncached, or a sequence reached max_seq_len: the window slides
                window, sizes = history.window(max_len)
                token = sample(_last_logits(model, window, sizes, None))
    finally:
        if step is not None:
            step.in_use = False
        model.train(was_training)
