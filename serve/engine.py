"""The decoding engine behind `vptq serve`: one thread owns the model and decodes every running
sequence as one batch (continuous batching).

Each step: drop the sequences that finished or whose client went away, admit waiting ones (their
prompts prefilled together, left-padded), then one forward pass of one token for every running
sequence. The running sequences share one KV cache, left-padded to a common length with an attention
mask (the layout of Hugging Face's batched generation, positions counted per sequence); a sequence
joining is prefilled on its own cache and concatenated along the batch, one leaving is cut out of it.
So a new request starts at the next step, never waiting for the batch to drain. Sliding-window layers
(Mistral, Gemma 2/3), which keep only the last window, are replaced by plain layers that keep every token
(the window is applied in the attention mask as well: same logits); linear-attention and state-space layers
(Qwen3-Next/3.5, Falcon-H1) have per-sequence states with no length, stacked along the batch after each
sequence's own prefill: both decode in one batch (cache_kind). Caches that cannot be merged at all (chunked
attention, whose chunks start at absolute positions) are kept one per sequence instead ("lanes"): each step
decodes every lane in turn, so a joining request still starts at the next step, at the cost of one forward
pass per sequence. Before the first pass (Engine.decide) the engine checks on the model itself that it reads no
later token (an encoder is refused), where its positions start (0, or padding_idx + 1 for RoBERTa-style
embeddings: first_position) and that joining sequences keeps each one's logits (else lanes).

Requests reach the engine through a bounded queue (`submit` raises QueueFull beyond `max_queue`
waiting); events go back to each request's asyncio queue on its own event loop: ("text", str) as
text becomes printable (held back while it could be the start of a stop string), then ("done",
finish_reason) or ("error", message). A failure of a forward pass fails the sequences of that pass
only; the engine keeps serving.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vptq.errors import first_line

from .graph import GraphStep, compile_wanted, settings

log = logging.getLogger("vptq.serve")


class QueueFull(Exception):
    """More requests are waiting than the engine admits (HTTP 429)."""


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(eq=False)
class Sequence:
    """One request's generation; the engine thread alone mutates the decoding fields."""

    prompt_ids: list[int]
    sampling: Sampling
    emit: Callable[[tuple], None]  # thread-safe: hands an event to the request's event loop
    out_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded output, stop string excluded
    sent: int = 0  # characters of text already emitted
    finish: str | None = None
    cancelled: bool = False  # set by the request's side: client disconnected
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled = True


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _has_keys(layer) -> bool:
    return isinstance(getattr(layer, "keys", None), torch.Tensor)


def _state_dicts(layer) -> list[dict]:
    """The per-row state dicts of a linear-attention / state-space cache layer (conv windows, recurrent states:
    {state index: (rows, ...)}); none for an attention layer."""
    return [d for d in (getattr(layer, n, None) for n in ("conv_states", "recurrent_states")) if isinstance(d, dict)]


def _set_length(layer, n: int) -> None:
    """A recurrent layer counts the tokens it has seen (the model reads its cache position from it when such a
    layer comes first): the batch's padded width, as its attention layers hold."""
    count = getattr(layer, "cumulative_length_linear", None)
    if isinstance(count, torch.Tensor) and count.dim() == 0:
        count.fill_(n)


class Batch:
    """The running sequences' shared KV cache (transformers DynamicCache layers) and mask (B, L); or, while
    one sequence runs alone on CUDA, `static`: the GraphStep holding its keys/values (cache and mask None)."""

    def __init__(self):
        self.seqs: list[Sequence] = []
        self.cache = None
        self.mask: torch.Tensor | None = None
        self.static: GraphStep | None = None

    def to_static(self, graph: GraphStep) -> bool:
        """Move the lone sequence's keys/values into graph's static cache (False: it does not fit there).
        Its mask's width bounds its length (a lone row's unused columns are cut: they are equal), so a
        sequence that stays eager costs no device read a step."""
        if not graph.fits(self.mask.shape[1]) or not graph.load(self.cache, self.mask[0]):
            return False
        self.static, self.cache, self.mask = graph, None, None
        return True

    def to_dynamic(self) -> None:
        if self.static is not None:
            self.cache, self.mask = self.static.unload()
            self.static = None

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seqs: list[Sequence], cache, mask: torch.Tensor) -> None:
        self.to_dynamic()
        if self.cache is None:
            self.seqs, self.cache, self.mask = list(seqs), cache, mask
            return
        la, lb = self.mask.shape[1], mask.shape[1]
        n = max(la, lb)
        for a, b in zip(self.cache.layers, cache.layers, strict=True):
            if _has_keys(a):
                a.keys = torch.cat([_pad_left(a.keys, n - la, 2), _pad_left(b.keys, n - lb, 2)], 0)
                a.values = torch.cat([_pad_left(a.values, n - la, 2), _pad_left(b.values, n - lb, 2)], 0)
            for states, more in zip(_state_dicts(a), _state_dicts(b), strict=True):  # one state per row: no padding
                for i in states:
                    if states[i] is not None:  # None: a state the layer has not (LFM3's convolutions: no recurrence)
                        states[i] = torch.cat([states[i], more[i]], 0)
            _set_length(a, n)
        self.mask = torch.cat([_pad_left(self.mask, n - la, 1), _pad_left(mask, n - lb, 1)], 0)
        self.seqs += seqs

    def keep(self, keep: list[int]) -> None:
        """Keep only these rows; columns no row uses any more (left padding) are cut."""
        if len(keep) == len(self.seqs):
            return
        if not keep:
            if self.static is not None:
                self.static.clear()
            self.seqs, self.cache, self.mask, self.static = [], None, None, None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[idx]
        used = mask.any(0).nonzero()
        start = int(used[0]) if used.numel() else 0
        for layer in self.cache.layers:
            if _has_keys(layer):
                layer.keys = layer.keys[idx][:, :, start:]
                layer.values = layer.values[idx][:, :, start:]
            for states in _state_dicts(layer):
                for i in states:
                    if states[i] is not None:
                        states[i] = states[i][idx.to(states[i].device)]
            _set_length(layer, mask.shape[1] - start)
        self.mask = mask[:, start:]
        self.seqs = [self.seqs[i] for i in keep]


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    """Next token from one row of logits: greedy at temperature 0, else temperature + nucleus."""
    if s.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / s.temperature, -1)
    if s.top_p < 1.0:
        p, order = torch.sort(probs, descending=True)
        drop = p.cumsum(-1) - p >= s.top_p  # keep the smallest prefix whose mass reaches top_p
        p[drop] = 0
        return int(order[torch.multinomial(p, 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))


def layer_kinds(cache) -> set[type]:
    """The classes of a cache's layers (the attribute _prefill reads); none for no cache or one without layers."""
    return {type(layer) for layer in getattr(cache, "layers", None) or ()}


def cache_kind(model, device) -> str:
    """How Batch can hold the model's KV caches, from the layers of one token's forward:

    - "merge": transformers' plain DynamicLayers only (keys and values that grow by one token a step), which
      Batch pads and concatenates across sequences;
    - "plain": sliding-window layers (DynamicSlidingWindowLayer, Mistral, Gemma 2/3) or chunked attention (Llama
      4) beside plain ones. They drop keys older than the window or the chunk, so they cannot be padded to a common
      length, but transformers applies the window and the chunks in the attention mask as well (its chunks start
      at each row's first unpadded token): a cache of plain layers that keeps every token gives the same logits
      (tests/test_serve.py) and merges, for the memory of the tokens beyond the window. Also BERT-style decoders
      (Megatron-BERT, RemBERT, RoC-BERT), which build an encoder-decoder cache whose cross-attention half stays
      empty without an encoder: given a plain cache they keep their keys and values in it;
    - "states": linear-attention or state-space layers (Qwen3-Next/3.5's gated delta-net, Falcon-H1's and
      Nemotron-H's Mamba-2) beside plain attention layers and layers with no cache (DummyLayer: Nemotron-H's MLP
      blocks): a recurrent state and a short convolution window per sequence, with no
      length to pad; each sequence is prefilled alone (no padding runs through a recurrence) and its states are
      stacked along the batch, its attention layers padded as "merge" pads them;
    - "recurrent": state-space layers only (Mamba, Falcon-Mamba): as "states", with no attention mask passed
      (nothing is padded, and their decode step misreads one: other logits than their own forward);
    - "lanes": anything else (DeepSeek-V4's compressed cache, recurrent layers beside sliding windows): one cache
      per sequence."""
    from transformers import DynamicCache
    from transformers.cache_utils import (
        DummyLayer,
        DynamicLayer,
        DynamicSlidingWindowLayer,
        EncoderDecoderCache,
        LinearAttentionAndFullAttentionLayer,
        LinearAttentionLayer,
    )

    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        if isinstance(out.cache, EncoderDecoderCache) and not out.cache.cross_attention_cache.get_seq_length():
            try:  # as "plain" prefills
                given = model(input_ids=ids, use_cache=True, cache=DynamicCache()).cache
            except Exception:  # noqa: BLE001 - a model that takes only its own cache: lanes (below)
                given = None
            if layer_kinds(given) == {DynamicLayer}:
                return "plain"
    kinds = layer_kinds(out.cache)
    if kinds == {DynamicLayer}:
        return "merge"
    recurrent = {LinearAttentionLayer, LinearAttentionAndFullAttentionLayer}
    if kinds & recurrent and kinds <= recurrent | {DynamicLayer, DummyLayer}:
        return "states" if kinds & {DynamicLayer, LinearAttentionAndFullAttentionLayer} else "recurrent"
    # a window or chunks relative to each row's start (the mask's left padding), which a whole cache keeps right
    text = model.config.get_text_config()
    types = set(getattr(text, "layer_types", None) or ())
    relative = types <= {"full_attention", "sliding_attention", "chunked_attention"}
    return "plain" if relative and kinds and kinds <= {DynamicLayer, DynamicSlidingWindowLayer} else "lanes"


def first_position(model, device) -> int:
    """The position id the model gives a sequence's first token when none is passed, which the engine then passes
    itself (left padding needs explicit positions): 0 for most, padding_idx + 1 for RoBERTa-style embeddings
    (CamemBERT, XLM-RoBERTa). Found on the model itself: its own uncached forward on five tokens against forwards
    given the positions from each candidate. SourceError where its logits at a token change with a later token (an
    encoder, e.g. a BERT-style checkpoint without is_decoder: it cannot generate text token by token) or where no
    candidate gives its own logits."""
    from vptq.errors import SourceError

    name = type(model).__name__
    vocab = int(model.get_input_embeddings().num_embeddings)
    ids = torch.tensor([[t % vocab for t in (11, 12, 13, 14, 15)]], device=device)
    later = ids.clone()
    later[0, -1] = 16 % vocab
    with torch.no_grad():
        own, moved = (model(input_ids=x).logits.float() for x in (ids, later))
        if not _close(moved[:, :-1], own[:, :-1], model):
            raise SourceError(f"{name} reads later tokens (its logits at a token change with the tokens after it): "
                              "it is an encoder and cannot generate text token by token. A BERT-style checkpoint "
                              "decodes only as a decoder: set is_decoder=true in its config.json")
        pad = getattr(model.config.get_text_config(), "pad_token_id", None)
        for start in dict.fromkeys([0] + ([int(pad) + 1] if isinstance(pad, int) else [])):
            pos = torch.arange(start, start + ids.shape[1], device=device)[None]
            try:
                if _close(model(input_ids=ids, position_ids=pos).logits.float(), own, model):
                    return start
            except Exception:  # noqa: BLE001 - positions the model refuses are not its own
                continue
    raise SourceError(f"{name} numbers positions in a way the server cannot pass for left-padded sequences "
                      "(neither from 0 nor from its padding id + 1)")


def _close(got: torch.Tensor, want: torch.Tensor, model) -> bool:
    """Equal up to rounding: within a few units of the weights' precision (fp32 1e-7, fp16 1e-3, bf16 8e-3) of the
    logits' size, at least 1e-4 of it; a different computation moves logits by about their own size."""
    dtype = next(model.parameters()).dtype
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 1e-3
    scale = float(want.abs().max()) + 1e-6
    return float((got - want).abs().max()) <= max(1e-4, 4 * eps) * scale


class Engine:
    """The model, its tokenizer and the scheduler thread (start() / stop())."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 64, graphs: bool | None = None):
        """graphs: a lone sequence decodes through serve/graph.py's static cache (captured in a CUDA graph
        on a GPU, eager elsewhere); default: on CUDA unless VPTQ_SERVE_GRAPHS=0 (serve/graph.py settings)."""
        self.model, self.tok = model, tokenizer
        self.device = next(model.parameters()).device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        wanted, tokens = settings()
        compiled = compile_wanted()
        if graphs is None:  # on CPU the static cache serves only a compiled step (eager, it gains nothing)
            graphs = wanted and (self.device.type == "cuda" or compiled)
        self.graph = (GraphStep(model, min(self.context, tokens), capture=self.device.type == "cuda", compile=compiled)
                      if graphs else None)
        eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        self.tok_lock = threading.Lock()  # a fast tokenizer is not safe to share between threads
        self.waiting: deque[Sequence] = deque()
        self.batch = Batch()
        self.lanes: list[Batch] = []  # one sequence each, when the model's caches cannot be merged
        self.caches: str | None = None  # cache_kind's answer, "lanes" where _merge_holds says no: decided once
        self.first = 0  # the position id of a sequence's first token (first_position): decided with the caches
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.cancelled = 0  # sequences dropped because their client went away
        self.on_decode: Callable[[int], None] | None = None  # metrics hook: rows of each decode pass

    # ------------------------------------------------------------------ the request side
    def encode(self, text: str) -> list[int]:
        with self.tok_lock:
            return self.tok(text, add_special_tokens=True).input_ids

    def chat_ids(self, messages: list[dict]) -> list[int]:
        from vptq.generate import chat_ids

        with self.tok_lock:
            return chat_ids(self.tok, messages)[0].tolist()

    def submit(self, seq: Sequence) -> None:
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            if seq.sampling.temperature > 0:
                seq.generator = torch.Generator(device="cpu")
                seq.generator.manual_seed(seq.sampling.seed if seq.sampling.seed is not None
                                          else int.from_bytes(os.urandom(8), "little") >> 1)
            self.waiting.append(seq)
            self.cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.batch) + len(self.lanes)

    # ------------------------------------------------------------------ the engine thread
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="vptq-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and not self.batch.seqs and not self.lanes:
                    self.cond.wait(timeout=1.0)
                if self.stopping:
                    break
            try:
                self.step()
            except Exception as e:  # the pass failed: its sequences fail, the engine goes on
                log.error("decode step failed: %s: %s", type(e).__name__, e)
                for s in self.batch.seqs:
                    self._finish(s, None, f"internal error while decoding: {type(e).__name__}")
                self.batch = Batch()
        for s in list(self.waiting) + self.batch.seqs + [s for lane in self.lanes for s in lane.seqs]:
            self._finish(s, None, "the server is shutting down")

    def decide(self) -> None:
        """Once, before the first pass (load_engine calls it before the port opens): the position of a sequence's
        first token (first_position, which refuses a model that reads later tokens) and how sequences keep their
        caches (cache_kind; the module doc)."""
        if self.caches is None:
            self.first = first_position(self.model, self.device)
            self.context -= self.first  # positions first .. first + context - 1 exist
            if self.graph is not None:
                self.graph.first, self.graph.max_len = self.first, min(self.graph.max_len, self.context)
            self.caches = cache_kind(self.model, self.device)
            if self.caches != "lanes" and not self._merge_holds():
                self.caches = "lanes"
            if self.caches in ("lanes", "states", "recurrent"):
                self.graph = None  # the static cache holds keys/values of attention layers only
            elif self.caches == "plain" and self.graph is not None:
                self.graph.whole = True  # full-length static layers: the window applied in the mask
            said = {"plain": "sliding-window caches of %s are kept whole (the window is applied in the attention "
                             "mask), so sequences decode in one batch",
                    "states": "recurrent states of %s are stacked along the batch (each sequence prefilled alone)",
                    "lanes": "caches of %s cannot be merged across sequences: one forward pass per running sequence"}
            said["recurrent"] = said["states"]
            if self.caches in said:
                log.info(said[self.caches], type(self.model).__name__)

    @torch.no_grad()
    def step(self) -> None:
        self.decide()
        if self.caches == "lanes":
            return self._step_lanes()
        self.cancelled += sum(1 for s in self.batch.seqs if s.cancelled and not s.finish)
        self.batch.keep([i for i, s in enumerate(self.batch.seqs) if not (s.cancelled or s.finish)])
        new = self._admit(len(self.batch))
        # recurrent states: each sequence prefilled alone (left padding would run through the recurrence)
        for group in ([[s] for s in new] if self.caches in ("states", "recurrent") else [new] if new else []):
            try:
                self._prefill(group)
            except Exception as e:
                log.error("prefill failed: %s: %s", type(e).__name__, e)
                for s in group:
                    self._finish(s, None, f"internal error in prefill: {type(e).__name__}")
        if any(not (s.finish or s.cancelled) for s in self.batch.seqs):
            self._decode()  # the new sequences too: the token their prefill sampled goes in

    def _admit(self, running: int) -> list[Sequence]:
        """Waiting sequences (cancelled ones dropped) up to max_batch running."""
        new = []
        with self.cond:
            while self.waiting and running + len(new) < self.max_batch:
                s = self.waiting.popleft()
                if not s.cancelled:
                    new.append(s)
        return new

    def _step_lanes(self) -> None:
        """step() for caches that cannot be merged: each running sequence on its own cache; a failure fails
        only the sequence whose pass it was."""
        self.cancelled += sum(1 for lane in self.lanes for s in lane.seqs if s.cancelled and not s.finish)
        self.lanes = [lane for lane in self.lanes if not (lane.seqs[0].cancelled or lane.seqs[0].finish)]
        for s in self._admit(len(self.lanes)):
            lane = Batch()
            try:
                self._prefill([s], lane)
                self.lanes.append(lane)
            except Exception as e:
                log.error("prefill failed: %s: %s", type(e).__name__, e)
                self._finish(s, None, f"internal error in prefill: {type(e).__name__}")
        for lane in self.lanes:
            s = lane.seqs[0]
            if s.finish or s.cancelled:
                continue
            try:
                self._decode(lane)
            except Exception as e:
                log.error("decode step failed: %s: %s", type(e).__name__, e)
                self._finish(s, None, f"internal error while decoding: {type(e).__name__}")

    def _prefill(self, seqs: list[Sequence], batch: Batch | None = None) -> None:
        logits = self._prefill_into(self.batch if batch is None else batch, seqs, [s.prompt_ids for s in seqs])
        for i, s in enumerate(seqs):
            self._append(s, sample(logits[i], s.sampling, s.generator))

    def _prefill_into(self, batch: Batch, seqs: list, prompts: list[list[int]]) -> torch.Tensor:
        """Prefill prompts (left-padded together), add them to batch; their last logits (rows, vocab) on the CPU
        (sampling runs there: the per-request generators live there)."""
        n = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), n), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), n), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, n - len(p):] = torch.tensor(p)
            mask[i, n - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(1) - 1).clamp_min(0) + self.first
        out = self.model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **self._mask(mask),
                         **self._new_cache())
        batch.add(seqs, out.cache, mask)
        return out.logits[:, -1].float().cpu()

    def _mask(self, mask: torch.Tensor) -> dict:
        """The forward's attention mask argument: none in lanes, whose one sequence is never padded, nor for
        state-space stacks, which pad nothing (Mamba's decode step misread the mask passed with it and decoded other
        logits than its own forward: tests/test_serve.py)."""
        return {} if self.caches in ("lanes", "recurrent") else {"attention_mask": mask}

    def _new_cache(self) -> dict:
        """The forward's cache argument for a new sequence: a config-less DynamicCache (plain layers only) where
        sliding-window or chunked caches are kept whole, or in place of a BERT-style decoder's encoder-decoder cache
        (cache_kind "plain"), else none (the model builds its own)."""
        if self.caches != "plain":
            return {}
        from transformers import DynamicCache

        return {"cache": DynamicCache()}

    def prepare_graph(self) -> None:
        """Capture the lone-sequence step now (before the port opens), on a two-token dummy sequence."""
        self.decide()
        if self.graph is None or not self.graph.ok:
            return
        with torch.no_grad():
            ids = torch.full((1, 2), self.pad, dtype=torch.long, device=self.device)
            out = self.model(input_ids=ids, use_cache=True, **self._new_cache())
            if self.graph.fits(2) and self.graph.load(out.cache, torch.ones(2, dtype=torch.long)):
                self.graph.step(self.pad)
                self.graph.unload()

    def _decode(self, lane: Batch | None = None) -> None:
        b = self.batch if lane is None else lane
        last = [s.out_ids[-1] if s.out_ids else self.pad for s in b.seqs]
        if b.static is not None and not b.static.fits(b.static.length):
            b.to_dynamic()  # the static cache is full: eager from here
        elif self.graph is not None and len(b) == 1 and b.static is None:
            b.to_static(self.graph)
        if b.static is not None:
            logits = b.static.step(last[0])[:, -1].float().cpu()
        else:
            logits = self._decode_step(b, last)
        if self.on_decode:
            self.on_decode(len(b))
        for i, s in enumerate(b.seqs):
            if not (s.finish or s.cancelled):
                self._append(s, sample(logits[i], s.sampling, s.generator))

    def _decode_step(self, b: Batch, last: list[int]) -> torch.Tensor:
        """One token for every row of b's dynamic cache: the logits (rows, vocab) on the CPU."""
        pos = b.mask.sum(1, keepdim=True) + self.first
        mask = torch.cat([b.mask, b.mask.new_ones((len(b.mask), 1))], 1)
        out = self.model(input_ids=torch.tensor([[t] for t in last], device=self.device), position_ids=pos,
                         cache=b.cache, use_cache=True, **self._mask(mask))
        b.cache, b.mask = out.cache, mask
        return out.logits[:, -1].float().cpu()

    def _merge_holds(self) -> bool:
        """Whether joining sequences in one batch gives this model's logits of each sequence alone: two short
        sequences, alone and then B joining A after A's first step, two steps together, on the engine's own prefill,
        merge and decode (a wrong merge moves logits by about their own size; rounding between batch sizes is far
        below the bound).
        An error counts as no."""

        def alone(prompt: list[int], n: int) -> list[torch.Tensor]:
            batch = Batch()
            out = [self._prefill_into(batch, [None], [prompt])[0]]
            out += [self._decode_step(batch, [t])[0] for t in steps[:n]]
            return out

        try:
            vocab = int(self.model.get_input_embeddings().num_embeddings)  # token ids it can embed
            a, b = [t % vocab for t in (11, 12, 13)], [t % vocab for t in (21, 22, 23, 24, 25)]
            steps = [t % vocab for t in (31, 32, 33)]
            with torch.no_grad():
                ra, rb = alone(a, 3), alone(b, 2)
                batch = Batch()
                got = [(self._prefill_into(batch, [None], [a])[0], ra[0]), (self._decode_step(batch, [steps[0]])[0], ra[1])]
                got.append((self._prefill_into(batch, [None], [b])[0], rb[0]))
                for k in (1, 2):
                    rows = self._decode_step(batch, [steps[k], steps[k - 1]])
                    got += [(rows[0], ra[k + 1]), (rows[1], rb[k])]
        except Exception as e:  # noqa: BLE001 - any failure of the merge: the lanes serve
            log.warning("joining sequences failed on %s (%s)", type(self.model).__name__, first_line(e))
            return False
        mine, own = torch.stack([x for x, _ in got]), torch.stack([y for _, y in got])
        if not _close(mine, own, self.model):  # rounding between batch sizes stays within _close's bound
            log.warning("joining sequences changed %s's logits by %.3g (of %.3g)", type(self.model).__name__,
                        float((mine - own).abs().max()), float(own.abs().max()))
            return False
        return True

    def _append(self, s: Sequence, tok: int) -> None:
        if s.first_token_at is None:
            s.first_token_at = time.perf_counter()
        if tok in self.eos:
            return self._finish(s, "stop")
        s.out_ids.append(tok)
        with self.tok_lock:
            full = self.tok.decode(s.out_ids, skip_special_tokens=True)
        hold = 0
        for stop in s.sampling.stop:
            at = full.find(stop)
            if at >= 0:
                s.text = full[:at]
                return self._finish(s, "stop")
            # a suffix of the text that may begin a stop string is held back
            hold = max(hold, max((k for k in range(1, len(stop)) if full.endswith(stop[:k])), default=0))
        s.text = full
        end = len(full) - hold
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next token
            end = min(end, len(full) - 1)
        if end > s.sent:
            s.emit(("text", full[s.sent:end]))
            s.sent = end
        if len(s.out_ids) >= s.sampling.max_tokens:
            self._finish(s, "length")

    def _finish(self, s: Sequence, reason: str | None, error: str | None = None) -> None:
        if s.finish:
            return
        s.finish = reason or "error"
        if error is None and len(s.text) > s.sent:
            s.emit(("text", s.text[s.sent:]))
            s.sent = len(s.text)
        s.emit(("error", error) if error else ("done", reason))
