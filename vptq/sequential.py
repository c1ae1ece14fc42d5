"""quantize_model: every decoder block of an in-memory model, one vptq.driver.BlockStep after another.

Only one decoder block and one batch of its activations sit on the compute device at a time;
the model and the calibration activations stay on the CPU, so a model larger than the
device's memory can be quantized.

hessians="sequential": block l is calibrated on the outputs of the already-quantized blocks
before it (GPTQ-style). hessians="true-sequential": also, inside a block, each group of linears
(q/k/v; o; gate/up; down) on the block with the groups before it quantized (vptq.callorder).
hessians="original": every Hessian comes from the unquantized model (the authors' setting), so
every linear is independent of the others.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import QuantConfig
from .driver import BATCH, BlockInputs, BlockStep, QuantizeFn, block_kwargs, decoder_layers, layers_path, vptq_linear
from .finetune import finetune_model
from .preflight import blocks_run_alone, run_first_block
from .quantizer import LayerReport
from .targets import check_model, float_tensors

Progress = Callable[[int, int, str], None]


@dataclass
class ModelReport:
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    finetune: list[dict] = field(default_factory=list)
    e2e: dict = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return sum(r.bits for r in self.layers)

    @property
    def weights(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.layers)

    @property
    def bpw(self) -> float:
        return self.bits / max(self.weights, 1)

    # what stays floating point (vptq.targets.float_tensors): the whole model's figure below
    float_params: int = 0
    float_bits: int = 0

    @property
    def bits_per_param(self) -> float:
        """Bits per parameter of the whole model: quantized linears all-in plus every floating-point
        tensor (embeddings, head, norms, biases, routers) as stored."""
        return (self.bits + self.float_bits) / max(self.weights + self.float_params, 1)

    @property
    def warnings(self) -> list[str]:
        return [f"{r.name}: {w}" for r in self.layers for w in r.warnings]


def quantize_model(
    model: nn.Module,
    calib: torch.Tensor,
    cfg: QuantConfig,
    device: str | torch.device = "cpu",
    quantize_fn: QuantizeFn = vptq_linear,
    progress: Progress | None = None,
    batch: int = BATCH,
    blocks: int | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 10,
) -> ModelReport:
    """Quantize the target linears of every decoder block in place. calib: (n, seqlen) ids.

    `blocks` limits the run to the first blocks (tests, quick looks); the rest stay FP.
    `checkpoint_dir`: the end-to-end fine-tuning stage is checkpointed there every
    `checkpoint_every` steps, and a rerun resumes it (see finetune_model).
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    model.eval()
    check_model(model, cfg)  # an architecture that cannot be quantized whole is refused before any work
    layers = decoder_layers(model)
    with blocks_run_alone(model):  # and one whose blocks cannot be run one at a time (vptq.preflight)
        inputs = BlockInputs.first(model, calib, cfg)
        kws = block_kwargs(model, inputs.x.shape[1], device)  # what the model's forward gives each block
        run_first_block(layers[0], inputs.x, kws[0], device)
    n_blocks = len(layers) if blocks is None else min(blocks, len(layers))
    fl = float_tensors(model, cfg, n_blocks)
    report = ModelReport(float_params=fl["params"], float_bits=fl["bits"])
    # the end-to-end stage needs the original as teacher: keep a copy (CPU) before quantizing
    teacher = copy.deepcopy(model).cpu() if cfg.e2e_steps else None
    path = layers_path(model)
    for i in range(n_blocks):
        step = BlockStep(layers[i].to(device), i, cfg, device, inputs, kws[i], batch, path)
        report.layers.extend(step.quantize(
            quantize_fn, progress=(lambda name, i=i: progress(i, n_blocks, f"block {i} {name}")) if progress else None))
        ft = step.finetune()
        if ft is not None:
            report.finetune.append(ft)
        inputs = step.next_inputs()
        layers[i] = step.block.to("cpu") if device.type != "cpu" else step.block
        if progress:
            progress(i + 1, n_blocks, f"block {i} done")
    if teacher is not None:
        report.e2e = finetune_model(
            model, teacher, calib, cfg, device,
            (lambda d, t, info: progress(d, t, f"fine-tune {info}")) if progress else None,
            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every if checkpoint_dir else 0)
        model.cpu()
        del teacher
    report.seconds = time.perf_counter() - t0
    return report
