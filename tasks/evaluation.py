"""evaluate_model: perplexity of the original or the quantized model on held-out text."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE


@task(cache_policy=NO_CACHE)
def evaluate_model(path: str, text: str, windows: int, seqlen: int, device: str = "cpu") -> dict[str, Any]:
    """Perplexity of the model at `path` (a source or a VPTQ checkpoint) on `windows` x `seqlen` tokens."""
    from vptq.pipeline import evaluate

    r = evaluate(path, text, windows, seqlen, device)
    return {"perplexity": r.perplexity, "windows": r.windows, "seqlen": r.seqlen, "dataset": text}
