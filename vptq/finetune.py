"""Recovery fine-tuning (paper 1.10): train the continuous parts of a quantized model
(codebooks, per-channel scale/bias, RMSNorm weights) against the original; indices stay fixed.

Block-wise: after a block is quantized, its output on the quantized model's own inputs is pulled
towards the original model's block output (MSE). End-to-end: the whole student's next-token
distribution is pulled towards the teacher's (KL(teacher || student)) on calibration windows.
Gradients flow through the dequantization (a gather); no dense copy of a weight is kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .as_linear import as_linears
from .config import QuantConfig
from .kmeans import nearest
from .layers import VQuantLinear
from .packing import from_int16, pack_indices
from .quantizer import dequantize, to_vectors

TEACHER_CACHE_BYTES = 4 << 30  # CPU memory allowed for the teacher's cached log-probs
REASSIGN_WINDOWS = 4  # calibration windows whose activations give the discrete step's Hessians


def e2e_batch(cfg: QuantConfig, windows: int) -> int:
    """Calibration windows per end-to-end step: the config's, at most all of them."""
    return max(1, min(cfg.e2e_batch, windows))


def teacher_cache_bytes(steps: int, batch: int, windows: int, seqlen: int, vocab: int) -> int:
    """Bytes of the teacher's log-probs (fp16) kept on the CPU for the end-to-end stage, 0 when they
    are not kept. Each window is drawn ~steps*batch/windows times: when that is > 1 and the cache fits
    TEACHER_CACHE_BYTES (64 x 512 tokens x 49k vocab = 3.2 GB), they are computed once, which removes
    the teacher forward from every step (a quarter of a step's work). vptq.plan uses the same rule."""
    size = windows * seqlen * vocab * 2
    return size if steps * batch > windows and size <= TEACHER_CACHE_BYTES else 0


def trainable(block: nn.Module, norms: bool = True) -> list[nn.Parameter]:
    """The parameters fine-tuning trains: codebooks, scale/bias and (if `norms`) full-precision norm weights."""
    params = []
    for mod in block.modules():
        if isinstance(mod, VQuantLinear):
            for p in (mod.centroids.weight, getattr(mod.res_centroids, "weight", None),
                      getattr(mod.outlier_centroids, "weight", None),
                      getattr(mod, "weight_scale", None), getattr(mod, "weight_bias", None)):
                if p is not None:
                    params.append(p)
        elif (norms and "norm" in type(mod).__name__.lower() and getattr(mod, "weight", None) is not None
              and mod.weight.dtype in (torch.float32, torch.float64)):
            # a half-precision norm stays frozen: Adam on fp16 weights divides by eps = 1e-8, which
            # fp16 rounds to 0 (NaN at the first step), and lr-sized updates of ~1.0 weights round away
            params.append(mod.weight)
    return params


def _cosine_lr(lr: float, step: int, steps: int) -> float:
    """CosineAnnealingLR(T_max=steps, eta_min=0) in closed form: no scheduler state to checkpoint."""
    return lr * (1 + math.cos(math.pi * step / max(steps, 1))) / 2


def _fmt_eta(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Checkpoint:
    """Fine-tuning state in a folder: `finetune-<step>.safetensors` (trainable parameters, Adam
    state, RNG states, and the packed indices when the discrete step may change them) and
    `finetune.json` (step, signature, probe loss, the tensor file's name). Both written to a
    temporary sibling and renamed; the JSON goes last and names the tensor file, so a kill at any
    point leaves the previous complete checkpoint readable. Never pickle."""

    FORMAT = "vptq-finetune-checkpoint/1"

    def __init__(self, folder: Path, signature: str):
        self.folder, self.signature = Path(folder), signature
        self.meta_path = self.folder / "finetune.json"

    def load(self) -> tuple[dict, dict[str, torch.Tensor]] | None:
        if not self.meta_path.is_file():
            return None
        meta = json.loads(self.meta_path.read_text())
        if meta.get("format") != self.FORMAT or meta.get("signature") != self.signature:
            warnings.warn(f"{self.meta_path}: checkpoint of another fine-tuning run (signature differs); "
                          "starting from step 0", stacklevel=3)
            return None
        return meta, load_file(self.folder / meta["file"])

    def save(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"finetune-{meta['step']:06d}.safetensors"
        _atomic(self.folder / name, lambda tmp: save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp))
        meta = {"format": self.FORMAT, "signature": self.signature, "file": name} | meta
        _atomic(self.meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1, sort_keys=True)))
        for old in self.folder.glob("finetune-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _train(
    model: nn.Module, loss_on, n: int, batch: int, steps: int, lr: float, seed: int,
    cosine: bool = False, progress=None, checkpoint: _Checkpoint | None = None, checkpoint_every: int = 0,
    reassign=None, reassign_every: int = 0,
) -> dict:
    """The loop both modes share: Adam on loss_on(window indices) over the continuous parts of
    `model` (trained in fp32, stored back in the checkpoint dtype at the end). Returns the loss
    on a fixed probe batch before and after, and what the discrete step did.

    With `checkpoint`, the whole training state is saved every `checkpoint_every` steps and at
    the last one, and a run started on the same folder continues from the latest save: the
    result is bit-identical to an uninterrupted run (CPU). `reassign(model)` (the discrete step)
    runs after every `reassign_every` steps, never after the last one."""
    quant = [m for m in model.modules() if isinstance(m, VQuantLinear)]
    stored = {m: m.centroids.weight.dtype for m in quant}
    for m in quant:
        m.float()
    params = trainable(model)
    keep = {id(p) for p in params}
    names = {id(p): name for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    probe = torch.arange(min(n, batch))
    start, state, events = 0, None, []
    if checkpoint is not None:
        state = checkpoint.load()
    if state is not None:
        meta, t = state
        start, before, events = int(meta["step"]), float(meta["before"]), list(meta.get("reassign", []))
        with torch.no_grad():
            for p in params:
                p.copy_(t[f"param.{names[id(p)]}"])
                st = {k.rsplit(".", 1)[1]: v for k, v in t.items() if k.startswith(f"adam.{names[id(p)]}.")}
                if st:
                    opt.state[p] = st
            for name, buf in model.named_buffers():
                if f"buffer.{name}" in t:
                    buf.copy_(t[f"buffer.{name}"])
        gen.set_state(t["rng.sampler"])
        torch.set_rng_state(t["rng.torch"])
    else:
        with torch.no_grad():
            before = float(loss_on(probe))

    def save(step: int, loss: float) -> None:
        t = {"rng.sampler": gen.get_state(), "rng.torch": torch.get_rng_state()}
        for p in params:
            t[f"param.{names[id(p)]}"] = p.data
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v):
                    t[f"adam.{names[id(p)]}.{k}"] = v
        if reassign is not None:  # the discrete step rewrites the packed indices
            for m_name, m in model.named_modules():
                if isinstance(m, VQuantLinear):
                    t[f"buffer.{m_name + '.' if m_name else ''}indices"] = m.indices
        checkpoint.save({"step": step, "steps": steps, "before": before, "loss": loss, "reassign": events}, t)

    # the student learns the model's inference behaviour, so it runs as at inference (eval mode; gradients flow
    # all the same): training mode would turn on dropout, MoE router jitter, and training-only fused paths that
    # read a linear's weight directly (Falcon-H1's mixer), none of which the quantized model meets when it is used
    model.eval()
    t0 = time.perf_counter()
    for step in range(start, steps):
        if cosine:
            for g in opt.param_groups:
                g["lr"] = _cosine_lr(lr, step, steps)
        idx = torch.randperm(n, generator=gen)[:batch]
        opt.zero_grad(set_to_none=True)
        loss = loss_on(idx)
        loss.backward()
        opt.step()
        loss = float(loss.detach())
        done = step + 1
        if reassign is not None and reassign_every and done % reassign_every == 0 and done < steps:
            events.append({"step": done} | reassign(model))
        if checkpoint is not None and (done == steps or (checkpoint_every and done % checkpoint_every == 0)):
            save(done, loss)
        if progress:
            eta = (time.perf_counter() - t0) / (done - start) * (steps - done)
            progress(done, steps, f"loss {loss:.4f} eta {_fmt_eta(eta)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in quant:
        m.to(stored[m])  # back to the checkpoint dtype (fp16 centroids)
    with torch.no_grad():
        after = float(loss_on(probe))
    return {"before": before, "after": after, "resumed_from": start, "reassign": events,
            "seconds_per_step": round((time.perf_counter() - t0) / max(steps - start, 1), 3)}


def finetune_block(
    block: nn.Module, x: torch.Tensor, target: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor],
    cfg: QuantConfig, device: torch.device, batch: int,
) -> dict:
    """Adam on MSE(forward(x), target) for cfg.finetune_steps minibatches; returns losses.

    forward(x) runs `block` (vptq.driver.run_block with its position embeddings)."""

    def loss_on(idx):
        out = forward(x[idx].to(device))
        return nn.functional.mse_loss(out, target[idx].to(device))

    r = _train(block, loss_on, x.shape[0], batch, cfg.finetune_steps, cfg.finetune_lr, cfg.seed)
    return {"mse_before": r["before"], "mse_after": r["after"], "steps": cfg.finetune_steps}


def _check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """The teacher must be the student's original: same vocabulary and every quantized linear
    present in the teacher as a linear of the same shape. One clear line when not."""
    sv, tv = student.get_output_embeddings(), teacher.get_output_embeddings()
    if sv is None or tv is None or tuple(sv.weight.shape) != tuple(tv.weight.shape):
        raise ValueError("fine-tuning: the teacher does not match the student's architecture: output head "
                         f"{None if tv is None else tuple(tv.weight.shape)} vs "
                         f"{None if sv is None else tuple(sv.weight.shape)}")
    tmods = dict(teacher.named_modules())
    for name, m in student.named_modules():
        if isinstance(m, VQuantLinear):
            w = getattr(tmods.get(name), "weight", None)
            if w is None or tuple(w.shape) != (m.out_features, m.in_features):
                raise ValueError(f"fine-tuning: the teacher does not match the student's architecture: {name} is "
                                 f"({m.out_features}, {m.in_features}) in the student, "
                                 f"{'missing' if w is None else tuple(w.shape)} in the teacher")


def _row_errors(q, main: torch.Tensor, res: torch.Tensor | None, w: torch.Tensor, h: torch.Tensor,
                v: int) -> torch.Tensor:
    """Hessian-weighted error of each vector-row (v output rows) of q with these codes."""
    q.indices, q.res_indices = main, res
    dw = dequantize(q) - w
    e = ((dw @ h) * dw).sum(1)  # per output row: tr(dW H dW^T) = sum of these
    rows = main.shape[1]
    return torch.nn.functional.pad(e, (0, rows * v - e.shape[0])).reshape(rows, v).sum(1)


@torch.no_grad()
def reassign_codes(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, device: torch.device,
                   n_windows: int = REASSIGN_WINDOWS) -> dict:
    """The discrete step: move each vector of every quantized linear to its nearest centroid
    under the current (fine-tuned) codebook, where that lowers the layer's Hessian-weighted error.

    Hessians: they are not kept after quantization (the pipeline keeps only block states), so
    H = E[x x^T] of every quantized linear's input is re-collected here by forward hooks on the
    student itself over `n_windows` calibration windows (the inputs the quantized model sees
    now, as "sequential" Hessians). The full H, not its diagonal, decides: a vector spans v
    output rows of one input column, so diagonal weighting would make "nearest" always win and
    undo the error feedback that chose the codes. tr(dW H dW^T) splits over output rows, so the
    choice is exact per vector-row: the new codes of a vector-row (all its groups) are kept only
    when that row's error goes down, and the layer's error never goes up. The candidate is the
    plain Euclidean nearest centroid of the original weight (normalized with the current
    scale/bias, permuted), main then residual; outlier codes are left as they are. Indices stay
    in the published packed layout (re-packed with pack_indices)."""
    quant = {name: m for name, m in student.named_modules() if isinstance(m, VQuantLinear)}
    tmods = dict(teacher.named_modules())
    hs = {name: torch.zeros(m.in_features, m.in_features, device=device) for name, m in quant.items()}
    counts = dict.fromkeys(quant, 0)

    def hook(name):
        def f(_mod, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            hs[name].addmm_(x.t(), x)
            counts[name] += x.shape[0]
        return f

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in quant.items()]
    try:
        for i in range(min(n_windows, windows.shape[0])):
            student(windows[i : i + 1].to(device))
    finally:
        for h in handles:
            h.remove()

    changed = total = 0
    err_before = err_after = 0.0
    for name, m in quant.items():
        h = hs.pop(name) / max(counts[name], 1)
        w = tmods[name].weight.detach().to(device).float()
        q = m.to_weights()
        v, rows = m.vector_lens[1], m.indices.shape[1]
        main, res = (c.clone() for c in m._codes()) if m.has_res else (m._codes()[0].clone(), None)
        target = w
        if m.enable_norm:
            target = (target - m.weight_bias.float()[None, :]) / m.weight_scale.float()[None, :].clamp_min(1e-8)
        if m.enable_perm:
            target = target[:, from_int16(m.perm).to(device)]
        new_main, new_res = main.clone(), None if res is None else res.clone()
        for g in range(m.group_num):
            s0 = m.outlier_size + g * m.group_size
            x = to_vectors(target[:, s0 : s0 + m.group_size], v)  # (S*R, v), column by column
            cb = q.centroids[g].float()
            idx = nearest(x, cb)
            new_main[g] = idx.reshape(m.group_size, rows).t()
            if res is not None:
                new_res[g] = nearest(x - cb[idx], q.res_centroids[g].float()).reshape(m.group_size, rows).t()

        old_e, new_e = _row_errors(q, main, res, w, h, v), _row_errors(q, new_main, new_res, w, h, v)
        take = (new_e < old_e)[None, :, None]
        fin_main = torch.where(take, new_main, main)
        codes = fin_main
        if res is not None:
            fin_res = torch.where(take, new_res, res)
            codes = codes | (fin_res << m.main_bits)
            changed += int(((fin_main != main) | (fin_res != res)).sum())
        else:
            changed += int((fin_main != main).sum())
        total += main.numel()
        m.indices.copy_(pack_indices(codes, m.code_bits))
        err_before += float(old_e.sum())
        err_after += float(torch.minimum(old_e, new_e).sum())
    return {"changed": changed / max(total, 1), "h_error_before": err_before, "h_error_after": err_after}


def finetune_model(
    student: nn.Module, teacher: nn.Module, windows: torch.Tensor, cfg: QuantConfig,
    device: torch.device, progress=None, checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
) -> dict:
    """Adam on KL(teacher || student) over next-token distributions, cfg.e2e_steps steps of
    cfg.e2e_batch calibration windows each; with cfg.e2e_reassign_every = K > 0, the discrete
    step (reassign_codes) after every K steps. Returns the loss on a fixed probe before and after.

    `checkpoint_dir`: the training state is saved there every `checkpoint_every` steps (0: only at
    the end) and a call on a folder that holds a checkpoint of the same run resumes from it,
    ending with the same tensors as an uninterrupted run. `progress(step, steps, info)` gets the
    loss and the ETA after every step."""
    t0 = time.perf_counter()
    if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every={checkpoint_every!r}: use 0 (only at the end) or a positive step count")
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"fine-tuning needs calibration windows (n, seqlen >= 2), got shape {tuple(windows.shape)}")
    cfg.validate()
    as_linears(teacher)  # experts one linear each, Conv1D as nn.Linear, as in the student (same values)
    _check_teacher(student, teacher)
    student.to(device)
    teacher.to(device).eval()
    n = windows.shape[0]
    batch = e2e_batch(cfg, n)

    @torch.no_grad()
    def teacher_logp(ids: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(teacher(ids.to(device)).logits.float(), -1)

    vocab = int(teacher.get_output_embeddings().weight.shape[0])
    cache = None
    if teacher_cache_bytes(cfg.e2e_steps, batch, n, windows.shape[1], vocab):
        cache = torch.empty(*windows.shape, vocab, dtype=torch.float16)
        for i in range(n):
            # clamp: a log-prob below fp16's range would become -inf and the KL nan
            cache[i] = teacher_logp(windows[i : i + 1])[0].clamp_min(-1e4).half().cpu()

    def kl(idx: torch.Tensor) -> torch.Tensor:
        t = cache[idx].to(device).float() if cache is not None else teacher_logp(windows[idx])
        s = torch.log_softmax(student(windows[idx].to(device)).logits.float(), -1)
        # mean over tokens of sum_v p_t (log p_t - log p_s)
        return nn.functional.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean")

    checkpoint = None
    if checkpoint_dir is not None:
        names = [(k, tuple(p.shape)) for k, p in student.named_parameters()]
        sig = hashlib.sha256(json.dumps(
            [{k: cfg.to_dict()[k] for k in ("e2e_steps", "e2e_lr", "e2e_batch", "e2e_reassign_every", "seed")},
             names, list(windows.shape), hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()],
            sort_keys=True).encode()).hexdigest()[:32]
        checkpoint = _Checkpoint(Path(checkpoint_dir), sig)
    k = cfg.e2e_reassign_every
    reassign = (lambda model: reassign_codes(model, teacher, windows, device)) if k else None
    r = _train(student, kl, n, batch, cfg.e2e_steps, cfg.e2e_lr, cfg.seed + 1, cosine=True, progress=progress,
               checkpoint=checkpoint, checkpoint_every=checkpoint_every, reassign=reassign, reassign_every=k)
    out = {"kl_before": r["before"], "kl_after": r["after"], "steps": cfg.e2e_steps,
           "seconds": round(time.perf_counter() - t0, 2), "seconds_per_step": r["seconds_per_step"]}
    if r["resumed_from"]:
        out["resumed_from"] = r["resumed_from"]
    if k:
        out["reassign"] = r["reassign"]
    return out
