"""A lone sequence's decode steps as one CUDA graph replay (`vptq serve --device cuda`, batch 1).

At one running sequence a decode step is a few hundred small kernel launches (each quantized linear's gemv,
norms, attention), and the host's launch time is most of the step. Here that sequence's keys and values move
into a transformers StaticCache (fixed addresses; the position is a tensor), the one-token forward pass is
captured once in a CUDA graph and each step replays it. When a second sequence joins, or the sequence would
outgrow the static cache, its keys and values go back to a dynamic cache and the engine decodes eagerly
(serve/engine.py). Without a GPU (the tests) the same static-cache step runs eagerly: `capture=False`.

Models whose cache layers are full-attention ones take it, and sliding-window or chunked-attention models
(Mistral, Gemma 2/3, Llama 4) whose caches the engine keeps whole (serve/engine.py, cache_kind "plain"): their
static cache then has full-length layers too, the window or the chunks being applied in the attention mask (a
sliding layer's static form keeps a rolling window that a copied-in prefix would not fill as its own updates do).
A capture that fails turns the graph off for the server's life (logged once); the eager path serves on.
"""

from __future__ import annotations

import logging
import os

import torch

from vptq.errors import first_line

log = logging.getLogger("vptq.serve")

GRAPHS_ENV, TOKENS_ENV, COMPILE_ENV = "VPTQ_SERVE_GRAPHS", "VPTQ_SERVE_GRAPH_TOKENS", "VPTQ_SERVE_COMPILE"
DEFAULT_TOKENS = 4096


def settings() -> tuple[bool, int]:
    """(graphs wanted on CUDA, the static cache's length) from VPTQ_SERVE_GRAPHS (1/0) and
    VPTQ_SERVE_GRAPH_TOKENS; a bad value is refused by name (vptq.config.ConfigError: a usage error)."""
    from vptq.config import ConfigError

    on = os.environ.get(GRAPHS_ENV, "1").strip() or "1"
    if on not in ("0", "1"):
        raise ConfigError(f"{GRAPHS_ENV}: {on!r} is not 1 (on) or 0 (off)")
    tokens = os.environ.get(TOKENS_ENV, "").strip() or str(DEFAULT_TOKENS)
    if not tokens.isdigit() or int(tokens) < 2:
        raise ConfigError(f"{TOKENS_ENV}: {tokens!r} is not a number of tokens (2 or more)")
    return on == "1", int(tokens)


def compile_wanted() -> bool:
    """VPTQ_SERVE_COMPILE=1: the lone sequence's step goes through torch.compile (vptq.compiled) before it is
    captured (on CPU: instead of the eager step). Off by default: the compile takes up to a minute before the
    port opens, and inductor needs a C compiler (and on CUDA triton) on the machine."""
    from vptq.config import ConfigError

    on = os.environ.get(COMPILE_ENV, "0").strip() or "0"
    if on not in ("0", "1"):
        raise ConfigError(f"{COMPILE_ENV}: {on!r} is not 1 (on) or 0 (off)")
    return on == "1"


class GraphStep:
    """One sequence's static cache, its captured step and its length (tokens in the cache)."""

    def __init__(self, model, max_len: int, capture: bool = True, compile: bool = False, whole: bool = False):
        """whole: every layer full-length, also where the model has sliding-window layers (their window lives in
        the attention mask as well; the engine keeps such caches whole)."""
        self.model, self.max_len, self.capture, self.whole = model, max_len, capture, whole
        self.compile = compile  # through vptq.compiled.compile_step, once, on the first step (see _warm_up)
        self.run = self.eager_step
        self.device = next(model.parameters()).device
        self.cache = None
        self.graph = None
        self.ok = True  # False once a capture failed or the model's cache has sliding layers
        self.length = 0
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.first = 0  # the position id of the first token (the engine's first_position)
        self.logits = None

    def _new_cache(self):
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        if self.whole:
            cache.layers = [StaticLayer(max_cache_len=self.max_len) for _ in cache.layers]
        kinds = {type(layer).__name__ for layer in cache.layers}
        if kinds != {"StaticLayer"}:
            log.info("CUDA graphs off: the model's cache has %s layers", ", ".join(sorted(kinds - {"StaticLayer"})))
            self.ok = False
            return None
        return cache

    def fits(self, tokens: int) -> bool:
        """Room for a sequence of `tokens` tokens (or fewer) plus the step that follows."""
        return self.ok and tokens + 1 < self.max_len

    def load(self, cache, mask_row: torch.Tensor) -> bool:
        """Copy one sequence's keys/values in (a dynamic cache of batch 1; mask_row says which positions
        are its own: left padding stays out). False where the model cannot take the static cache."""
        if self.cache is None:
            self.cache = self._new_cache()
            if self.cache is None:
                return False
        self.cache.reset()  # in place (a batch dropped after a failed step may have left a sequence here)
        keep = mask_row.nonzero().squeeze(1).to(self.device)
        try:
            for i, layer in enumerate(cache.layers):  # in place: the captured graph keeps the addresses
                self.cache.update(layer.keys[:, :, keep], layer.values[:, :, keep], i)
        except Exception as e:  # a cache layout this copy does not know: the dynamic cache (still whole) serves on
            log.warning("CUDA graphs off: the static cache did not take the sequence (%s)", first_line(e))
            self.ok = False
            return False
        self.length = keep.numel()
        return True

    def unload(self):
        """(a dynamic cache holding the sequence's keys/values, its mask (1, length))."""
        from transformers import DynamicCache

        dyn = DynamicCache() if self.whole else DynamicCache(config=self.model.config)  # whole: plain layers
        for i, layer in enumerate(self.cache.layers):
            dyn.update(layer.keys[:, :, : self.length].clone(), layer.values[:, :, : self.length].clone(), i)
        mask = torch.ones((1, self.length), dtype=torch.long, device=self.device)
        self.clear()
        return dyn, mask

    def clear(self) -> None:
        """Forget the sequence (it finished): the next load starts from an empty cache."""
        if self.cache is not None:
            self.cache.reset()
        self.length = 0

    def eager_step(self):
        return self.model(input_ids=self.ids, cache_position=self.pos, position_ids=self.pos[None] + self.first,
                          cache=self.cache, use_cache=True).logits

    def _warm_up(self, steps: int) -> None:
        """Run the step `steps` times; the first compiles it where wanted. A compile that fails is logged once
        and the eager step serves on (graphs too): the server does not depend on inductor's toolchain."""
        if self.compile:
            self.compile = False
            from vptq.compiled import compile_step

            try:
                compiled = compile_step(self.eager_step)
                for _ in range(2):  # the compile, then a call on the compiled code
                    compiled()
                self.run = compiled
                log.info("decode step compiled (torch.compile)")
            except Exception as e:  # noqa: BLE001 - any failure of the toolchain: eager is always there
                log.warning("torch.compile of the decode step failed (%s); serving the eager step", first_line(e))
                torch._dynamo.reset()
        for _ in range(steps):
            self.run()

    def capture_graph(self) -> None:
        """Capture the step (its input tensors already set): warm-up steps on a side stream, then the graph."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as torch.cuda.graphs asks
            self._warm_up(2)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.run()
        self.graph = graph

    def step(self, token: int) -> torch.Tensor:
        """Logits (1, 1, vocab) of the next token after `token`, which goes in at position `length`."""
        self.ids.fill_(token)
        self.pos.fill_(self.length)
        warmed = False
        if self.capture and self.graph is None:
            warmed = True
            try:
                self.capture_graph()  # its warm-up steps write this same token at this same slot
            except Exception as e:  # an operation the capture refuses: this step eager, then the dynamic cache
                log.warning("CUDA graph capture failed (%s); decoding without graphs", first_line(e))
                self.capture, self.graph, self.ok = False, None, False
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
        elif self.compile:  # no capture (CPU): compiled on the first step, its warm-up as above
            warmed = True
            self._warm_up(0)
        if warmed:
            # a static layer writes at its own running count (cumulative_length), which the warm-up steps
            # advanced: back to the sequence's length (the slots they wrote are rewritten before any step reads them)
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(self.length)
        if self.graph is not None:
            self.graph.replay()
            out = self.logits
        else:
            out = self.run()
        self.length += 1
        return out
