"""check_blocks_run: a model whose decoder blocks cannot be run one at a time is refused before any work.

The driver (vptq.driver) never runs the model whole: it captures what the model's forward hands each block
and runs each block alone on that. Some architectures do not survive being taken apart so: the model's loop
reads each block's output in a form of its own (CPM-Ant unpacks it as a pair, ProphetNet takes [0] of it,
while the capture hands back the hidden states alone). Such a model used to fail in block 0, after the job had
begun, with the library's own error and exit 1. Here the same first steps run once on the first batch of
calibration windows, before anything is quantized (`blocks_run_alone` around the driver's own first steps in
process, `check_blocks_run` for a job, whose blocks run in later tasks); a failure there is the architecture's, so
it becomes a ConfigError (exit 2) naming the model class and the original error. A failure in a later block, or while
quantizing, is not caught here and surfaces as it always did.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .config import ConfigError
from .driver import BATCH, block_dtype, block_kwargs, decoder_layers, embed, run_block
from .errors import SourceError, first_line
from .targets import unfused

# not the architecture's fault: the machine (memory, files) or an input already judged
PASS_THROUGH = (MemoryError, torch.OutOfMemoryError, OSError, ConfigError, SourceError)


@contextmanager
def blocks_run_alone(model: nn.Module) -> Iterator[None]:
    """Around a run's first steps (embedding, capturing the blocks' arguments, block 0 run alone), before
    anything is quantized: a failure there is the architecture's, a ConfigError in one line naming it."""
    try:
        yield
    except PASS_THROUGH:
        raise
    except Exception as e:  # noqa: BLE001 - nothing quantized yet: the blocks cannot be run one at a time
        raise ConfigError(f"{type(model).__name__} is not supported: its decoder blocks cannot be run one at a "
                          f"time on what its forward hands them ({first_line(e)}); nothing was quantized") from e


@torch.no_grad()
def run_first_block(block: nn.Module, x: torch.Tensor, kw: dict, device: torch.device) -> None:
    """Block 0 (experts as linears, as quantized) on its first windows x, on `device`; the block itself is left
    where and as it is."""
    b = unfused(block)
    if any(p.device != device for p in b.parameters()):
        b = copy.deepcopy(b).to(device)
    run_block(b, x[:BATCH].to(device, block_dtype(b)), kw)


@torch.no_grad()
def check_blocks_run(model: nn.Module, ids: torch.Tensor, device: str | torch.device = "cpu",
                     block: Callable[[], nn.Module] | None = None) -> None:
    """The first steps on their own, for a caller that does them later elsewhere (a job's block task): capture
    block 0's inputs and the blocks' kwargs for the first windows of `ids` (n, seqlen) and run block 0 on them
    as the driver will; ConfigError (one line) if that fails. `block()`: block 0 as the caller will quantize it
    (a fresh copy read from the checkpoint), called after the capture as the driver reads it; else the model's
    own block."""
    device = torch.device(device)
    with blocks_run_alone(model):
        x = embed(model, ids[:BATCH])
        pe = block_kwargs(model, x.shape[1], device)[0]
        run_first_block(decoder_layers(model)[0] if block is None else block(), x, pe, device)
