"""Text generation helpers for `vptq generate` / `vptq chat`: pure torch + transformers.

Greedy decoding; tokens are handed to a callback as soon as they decode to printable text
(transformers' TextStreamer logic, without a thread). No Prefect, database or CLI here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

# used when a tokenizer ships no chat template (ChatML, the format of SmolLM2's own template)
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class GenerationResult:
    text: str
    tokens: int  # new tokens generated
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"seconds": round(self.seconds, 4), "tokens_per_s": round(self.tokens_per_s, 3)}


def load_for_generation(source: str, device: str | torch.device = "cpu"):
    """(model, tokenizer) of an original model (HF folder, .gguf, 'smollm2') or a quantized folder."""
    from .source import load_model, resolve

    model, tok = load_model(resolve(str(source)))
    return model.to(device).eval(), tok


def _streamer(tokenizer, on_text: Callable[[str], None]):
    from transformers import TextStreamer

    class _Callback(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return _Callback(tokenizer, skip_prompt=True, skip_special_tokens=True)


@torch.no_grad()
def generate_ids(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int = 64,
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
    """Greedy continuation of input_ids (1, T); on_text receives the text as it is produced."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                         streamer=_streamer(tokenizer, on_text) if on_text else None)
    seconds = time.perf_counter() - t0
    new = out[0, input_ids.shape[1]:]
    return GenerationResult(tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), seconds)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64,
                  on_text: Callable[[str], None] | None = None) -> GenerationResult:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    return generate_ids(model, tokenizer, ids, max_new_tokens, on_text)


def chat_ids(tokenizer, messages: list[dict], max_tokens: int | None = None) -> torch.Tensor:
    """The conversation through the tokenizer's chat template (ChatML when it has none), oldest
    turns dropped (a system message is kept) until it fits in max_tokens."""
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    msgs = list(messages)
    while True:
        enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True, chat_template=template)
        ids = enc["input_ids"]
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if max_tokens is None or ids.shape[1] <= max_tokens or len(msgs) - first <= 1:
            return ids[:, -max_tokens:] if max_tokens is not None else ids
        del msgs[first]


def chat_turn(model, tokenizer, messages: list[dict], max_new_tokens: int = 256,
              on_text: Callable[[str], None] | None = None) -> GenerationResult:
    """One assistant reply to the conversation so far (the caller appends it to messages)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    ids = chat_ids(tokenizer, messages, None if limit is None else max(1, limit - max_new_tokens))
    return generate_ids(model, tokenizer, ids, max_new_tokens, on_text)
