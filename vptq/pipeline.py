"""The two end-to-end jobs as plain functions: compress a model, evaluate a model.

The CLI, the benchmark and (later) the Prefect tasks all call these, so one code path
produces every published figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, QuantConfig
from .evaluate import PerplexityResult, calibration_windows, perplexity, tokenize_text
from .io import save_quantized
from .sequential import ModelReport, Progress, QuantizeFn, quantize_model, vptq_linear
from .source import load_model, resolve

PACKAGE_CALIB = Path(__file__).parent / "data" / "wikitext2-valid.txt"


def default_calibration_text() -> Path:
    """../shared/data/wikitext-2/valid.txt when present (repo checkout), else the shipped copy."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        p = base.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
        if p.is_file():
            return p
    return PACKAGE_CALIB


def check_device(device: str) -> torch.device:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device {device}: use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible here; use --device cpu")
    return torch.device(device)


def read_text(path: str | Path, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file {str(path)!r} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ConfigError(f"{what} file {str(path)!r} is empty: give a text file with content")
    return text


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
    nsamples: int = 32,
    seqlen: int = 1024,
    device: str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    quantize_fn: QuantizeFn = vptq_linear,
    blocks: int | None = None,
):
    """Load, calibrate, quantize, save. Returns (CompressResult, model, tokenizer)."""
    t0 = time.perf_counter()
    dev = check_device(device)
    if out is not None and Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: choose another --out or pass --overwrite")
    if nsamples < 1 or seqlen < 16:
        raise ConfigError("--nsamples must be >= 1 and seqlen >= 16")
    src = resolve(source)
    if src.kind == "vptq":
        raise ConfigError(f"{source} is already VPTQ-quantized: compress the original model")
    text = read_text(calib or default_calibration_text(), "calibration")
    model, tok = load_model(src)
    ids = tokenize_text(tok, text)
    windows = calibration_windows(ids, nsamples, seqlen, cfg.seed)
    rep = quantize_model(model, windows, cfg, dev, quantize_fn, progress, blocks=blocks)
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
    dev = check_device(device)
    if windows < 1 or seqlen < 2:
        raise ConfigError("--windows must be >= 1 and --seqlen >= 2")
    body = read_text(text, "evaluation text")
    if model is None:
        model, tokenizer = load_model(resolve(source))
    model.to(dev)
    ids = tokenize_text(tokenizer, body)
    try:
        return perplexity(model, ids, windows, seqlen, dev, progress)
    except ValueError as e:
        raise ConfigError(str(e)) from e
