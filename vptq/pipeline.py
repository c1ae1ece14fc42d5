"""The two end-to-end jobs as plain functions: compress a model, evaluate a model.

The CLI, the benchmark and (later) the Prefect tasks all call these, so one code path
produces every published figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from .config import ConfigError, QuantConfig, calib_windows
from .driver import QuantizeFn, vptq_linear
from .evaluate import PerplexityResult, calibration_windows, perplexity, tokenize_text
from .io import check_out, save_quantized
from .sequential import ModelReport, Progress, quantize_model
from .source import ModelSource, SourceError, load_model, load_tokenizer, resolve

PACKAGE_CALIB = Path(__file__).parent / "data" / "wikitext2-valid.txt"  # the baselines.md protocol's calibration
CALIB_MIX = Path(__file__).parent / "data" / "calib-mix.txt"  # docs/calibration-mix.md
T = TypeVar("T")


def default_calibration_text() -> Path:
    """A job's calibration text when the request names none: the calibration mix (encyclopedic prose,
    code, technical prose; chosen over wikitext-2 valid alone on the domains' selection parts)."""
    return CALIB_MIX


def check_device(device: str) -> torch.device:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device {device}: use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible here; use --device cpu")
    return torch.device(device)


def read_text(path: str | Path, what: str, option: str = "the command") -> str:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a folder: give a UTF-8 text file to {option}")
    if not p.exists():
        raise ConfigError(f"{what} file {str(path)!r} does not exist: give an existing text file to {option}")
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ConfigError(f"cannot read {what} file {str(path)!r} ({e.strerror}): fix its permissions "
                          f"or give another file to {option}") from None
    if not text.strip():
        raise ConfigError(f"{what} file {str(path)!r} is empty: give a text file with content to {option}")
    return text


def check_request(source: str, calib: str | Path | None, nsamples: int, seqlen: int, verb: str = "compress"):
    """The cheap checks of a compression request, before any model is loaded: window counts, the
    source (and that it is not already quantized), the calibration text and its token count.
    Returns (resolved source, calibration token ids). Shared by compress(), plan() and the CLI's jobs;
    `verb` names the command in the message for an already quantized source."""
    if nsamples < 1:
        raise ConfigError(f"--nsamples {nsamples}: use at least 1 calibration window")
    if seqlen < 16:
        raise ConfigError(f"--seqlen {seqlen}: use at least 16 tokens per calibration window")
    src = resolve(source)
    if src.kind == "vptq":
        raise ConfigError(f"{source} is already VPTQ-quantized: {verb} the original model")
    text = read_text(calib or default_calibration_text(), "calibration", "--calib")
    ids = tokenize_text(checked_load(load_tokenizer, src, "tokenizer"), text)
    if ids.numel() < seqlen + 1:
        raise ConfigError(
            f"calibration text has {ids.numel()} tokens, windows of {seqlen} need at least {seqlen + 1}: "
            f"give a longer --calib text or a smaller --seqlen")
    return src, ids


def checked_load(fn: Callable[[ModelSource], T], src: ModelSource, what: str) -> T:
    """fn(src) -- a loader of a resolved source (load_model, load_tokenizer, ...) -- with its failure
    (a bad folder, missing or broken weights) as a one-line SourceError naming `what` and the source.
    The one place where a loader's exception becomes the user-facing error: every caller that loads
    from a user's source goes through it."""
    from safetensors import SafetensorError  # a truncated or corrupt weights file

    try:
        return fn(src)
    except SourceError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"cannot load the {what} from {src.uri}: {first}") from e


@dataclass
class CompressResult:
    out: Path
    report: ModelReport
    seconds: float
    config: QuantConfig
    calib_tokens: int

    def summary(self) -> dict:
        return {
            "out": str(self.out),
            "bpw": round(self.report.bpw, 4),
            "bits_per_param": round(self.report.bits_per_param, 4),  # whole model, fp tensors included
            "float_params": self.report.float_params,
            "seconds": round(self.seconds, 2),
            "layers": len(self.report.layers),
            "bits": self.report.bits,
            "weights": self.report.weights,
            "calib_tokens": self.calib_tokens,
            "config": self.config.to_dict(),
            "warnings": self.report.warnings,
        }


def compress(
    source: str,
    cfg: QuantConfig,
    out: str | Path | None,
    calib: str | Path | None = None,
    nsamples: int | None = None,
    seqlen: int = 512,
    device: str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    quantize_fn: QuantizeFn = vptq_linear,
    blocks: int | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 10,
):
    """Load, calibrate, quantize, save. Returns (CompressResult, model, tokenizer).

    checkpoint_dir: where the fine-tuning stage keeps its checkpoint (every `checkpoint_every` steps); calling
    again with the same arguments after a crash resumes the fine-tuning from it (the one-shot
    quantization before it is recomputed: it is deterministic)."""
    t0 = time.perf_counter()
    if nsamples is None:  # a job's default, by one rule (vptq.config.resolve)
        nsamples = calib_windows(cfg.e2e_steps)
    # every cheap check first: a bad argument fails in seconds, not after loading the model
    dev = check_device(device)
    if out is not None:
        check_out(out, overwrite)
    src, ids = check_request(source, calib, nsamples, seqlen)
    model, tok = checked_load(load_model, src, "model")
    windows = calibration_windows(ids, nsamples, seqlen, cfg.seed)
    rep = quantize_model(model, windows, cfg, dev, quantize_fn, progress, blocks=blocks,
                         checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
    result = CompressResult(Path(out) if out else Path(), rep, 0.0, cfg, int(ids.numel()))
    if out is not None:
        result.seconds = time.perf_counter() - t0
        summary = result.summary() | {"source": src.uri, "nsamples": nsamples, "seqlen": seqlen,
                                      "layer_reports": [r.__dict__ for r in rep.layers]}
        save_quantized(model, out, tok, summary, overwrite=overwrite)
    result.seconds = time.perf_counter() - t0
    return result, model, tok


def evaluate(
    source: str, text: str | Path, windows: int = 10, seqlen: int = 2048, device: str = "cpu",
    progress: Callable[[int, int], None] | None = None, model=None, tokenizer=None,
) -> PerplexityResult:
    """Perplexity of an original or quantized model on the baselines.md protocol."""
    return evaluate_texts(source, [text], windows, seqlen, device, progress, model, tokenizer)[0]


def evaluate_texts(
    source: str, texts: Sequence[str | Path], windows: int = 10, seqlen: int = 2048, device: str = "cpu",
    progress: Callable[[int, int], None] | None = None, model=None, tokenizer=None,
) -> list[PerplexityResult]:
    """evaluate() on each text, the model loaded once: every text is read and tokenized (and a short
    one refused) before the model loads."""
    dev = check_device(device)
    if windows < 1:
        raise ConfigError(f"--windows {windows}: use at least 1 window")
    if seqlen < 2:
        raise ConfigError(f"--seqlen {seqlen}: use at least 2 tokens per window")
    bodies = [read_text(t, "evaluation text", "--text") for t in texts]
    src = None
    if model is None:
        src = resolve(source)
        tokenizer = checked_load(load_tokenizer, src, "tokenizer")
    all_ids = [tokenize_text(tokenizer, b) for b in bodies]
    for t, ids in zip(texts, all_ids, strict=True):
        if ids.numel() < windows * seqlen:  # checked before loading the model
            named = f" {t}" if len(texts) > 1 else ""
            raise ConfigError(
                f"evaluation text{named} has {ids.numel()} tokens, {windows} windows of {seqlen} need "
                f"{windows * seqlen}: use fewer --windows, a shorter --seqlen or a longer --text")
    if src is not None:
        model, _ = checked_load(load_model, src, "model")
    model.to(dev)
    try:
        return [perplexity(model, ids, windows, seqlen, dev, progress) for ids in all_ids]
    except ValueError as e:
        raise ConfigError(str(e)) from e
