"""sample_calibration: seeded token windows saved as safetensors in the workspace, with their hash."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from vptq_service.tasks.workspace import save_tensors, tensor_hash, work_root


@task(cache_policy=NO_CACHE)
def sample_calibration(path: str, text: str | None, nsamples: int, seqlen: int, seed: int) -> dict[str, Any]:
    """Tokenize the calibration text, draw nsamples x seqlen windows, store them by hash."""
    from vptq.config import ConfigError
    from vptq.evaluate import calibration_windows, tokenize_text
    from vptq.pipeline import checked_load, default_calibration_text, read_text
    from vptq.source import load_tokenizer, resolve

    text_path = str(text or default_calibration_text())
    tok = checked_load(load_tokenizer, resolve(path), "tokenizer")
    ids = tokenize_text(tok, read_text(text_path, "calibration", "--calib"))
    if ids.numel() < seqlen + 1:
        raise ConfigError(f"calibration text has {ids.numel()} tokens, windows of {seqlen} need at least "
                          f"{seqlen + 1}: give a longer --calib text or a smaller --seqlen")
    windows = calibration_windows(ids, nsamples, seqlen, seed)  # (nsamples, seqlen)
    h = tensor_hash(windows)
    out = work_root() / "calibration" / f"{h[:32]}.safetensors"
    if not out.exists():
        save_tensors({"input_ids": windows}, out)
    return {"source": text_path, "path": str(out), "hash": h, "nsamples": nsamples, "seqlen": seqlen,
            "seed": seed, "tokens": int(ids.numel())}
