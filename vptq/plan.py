"""Plan a compression job before running it: memory, disk, size and time (`vptq plan`).

Everything here models the pipeline *as implemented* (the `compress` flow: tasks/blocks.py
over vptq/driver.py, vptq/hessian.py, vptq/quantizer.py, vptq/finetune.py), with the constants
and rules of those modules imported, not copied (the block batch, the distance tile, the codebook
refinement's limit, the teacher cache); the model is read as the job streams it (vptq/stream.py):

* bits: exact, `layer_bits` of every target linear (the same sum the job reports);
* memory: one decoder block on the device at a time; the calibration activations
  (nsamples x seqlen x hidden, fp32) on the host; the Hessians of a block in fp64 accumulators
  (one per distinct linear input) plus one fp32 copy per linear; the largest linear's quantizer
  working set; then the end-to-end KL stage (teacher + student on the device, the teacher's
  cached log-probs <= 4 GB on the host);
* disk: the workspace the block tasks write (next-block inputs, block states, calibration ids,
  the checkpoint) plus the artifact store's copy; Hessians never touch the disk;
* time: a short probe on this machine (block 0's Hessian forward on a couple of windows, the VPTQ
  quantization of one or two real linears of block 0 with the job's config, one end-to-end
  fine-tuning step of a one-block model), extrapolated by tokens, weight counts and blocks.

torch (and transformers for loading) only: no prefect, no database. The caller passes VPTQ_HOME.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, LayerLayout, QuantConfig, calib_windows, layer_bits
from .driver import BATCH, quantized_chain
from .finetune import e2e_batch, teacher_cache_bytes
from .kmeans import tile_rows
from .preflight import blocks_run_alone
from .quantizer import refines_codebooks
from .stream import open_streamed
from .targets import final_norm

GiB = 1 << 30
RUNTIME_BYTES = 900 << 20  # Python + torch + transformers + prefect of a running job (measured RSS ~0.9 GiB)
IO_BYTES_PER_S = 300e6  # workspace/checkpoint writes and hashing, a conservative local-disk figure
PROBE_WINDOWS = 2
PROBE_BUDGET_S = 20.0  # a second linear is probed only while the probe stays under this


# ----------------------------------------------------------------------------- shapes

@dataclass
class Shapes:
    """What the estimates need to know about the model (no weights)."""

    blocks: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    params: int  # unique parameters (tied embeddings once)
    block_params: list[int]
    linears: list[list[tuple[str, int, int]]]  # per block: (name, out_features, in_features)
    shared_inputs: list[list[str]] = field(default_factory=list)  # groups of block-0 names sharing one input
    floating: dict = field(default_factory=dict)  # what stays floating point (vptq.targets.float_tensors)

    @property
    def target_weights(self) -> int:
        return sum(o * i for blk in self.linears for _, o, i in blk)

    @property
    def n_linears(self) -> int:
        return sum(len(b) for b in self.linears)


def shapes_of(model: nn.Module, cfg: QuantConfig) -> Shapes:
    """Shapes of a (possibly meta-device) model; target linears as vptq.driver picks them."""
    from .driver import decoder_layers
    from .targets import check_layouts, float_tensors

    found = check_layouts(model, cfg)  # refused here as the job refuses it (blocks, weights, targets, layouts)
    layers = decoder_layers(model)
    lins = [[(n, m.out_features, m.in_features) for n, m in blk.items()] for blk in found]
    c = model.config
    hidden = int(getattr(c, "hidden_size", 0) or lins[0][0][2])
    inter = getattr(c, "intermediate_size", 0)
    inter = max(inter) if isinstance(inter, (list, tuple)) else inter  # Gemma 3n: one per layer
    inter = int(inter or max(i for b in lins for _, _, i in b))
    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None \
        else int(getattr(c, "vocab_size", 0))
    return Shapes(blocks=len(layers), hidden=hidden, intermediate=inter,
                  heads=int(getattr(c, "num_attention_heads", 1) or 1), vocab=vocab,
                  params=sum(p.numel() for p in model.parameters()),
                  block_params=[sum(p.numel() for p in b.parameters()) for b in layers], linears=lins,
                  shared_inputs=_default_sharing(lins[0]), floating=float_tensors(model, cfg))


def _default_sharing(block0: list[tuple[str, int, int]]) -> list[list[str]]:
    """Llama-style: q/k/v share their input, gate/up share theirs; the probe measures the real groups."""
    groups: dict[str, list[str]] = {}
    for name, _, _ in block0:
        leaf = name.split(".")[-1]
        key = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}.get(leaf, name)
        groups.setdefault(name.rsplit(".", 1)[0] + ":" + key, []).append(name)
    return list(groups.values())


# ----------------------------------------------------------------------------- bits

def bits_estimate(shapes: Shapes, cfg: QuantConfig) -> dict:
    """Exact all-in bits of every target linear and the checkpoint's tensor bytes."""
    bits = sum(sum(layer_bits(cfg.for_layer(name, b), o, i).values())
               for b, blk in enumerate(shapes.linears) for name, o, i in blk)
    weights = shapes.target_weights
    fl = shapes.floating or {"params": shapes.params - weights, "bits": 32 * (shapes.params - weights), "groups": {}}
    other = math.ceil(fl["bits"] / 8)  # embeddings, head, norms, biases, routers: stored as loaded
    return {"bits": bits, "weights": weights, "bpw": bits / max(weights, 1),
            "bits_per_param": (bits + fl["bits"]) / max(weights + fl["params"], 1),
            "float_params": fl["params"], "float_tensors": fl["groups"],
            "quantized_bytes": math.ceil(bits / 8), "other_bytes": other,
            "output_bytes": math.ceil(bits / 8) + other}


# ----------------------------------------------------------------------------- memory

def _quantizer_bytes(cfg: QuantConfig, m: int, n: int) -> int:
    """Working set of quantize_linear on one (m x n) linear (fp32 unless noted)."""
    mn = m * n
    dense = 9 * mn * 4  # w0, w, q_km, wl, q, resid, err block, vectors, unperm/denorm copies
    hess = 7 * n * n * 4  # h clone, h_eval, scaled/permuted h, eye, Cholesky factor, inverse, U
    k = max(cfg.num_centroids, cfg.outlier_centroids)
    every = math.ceil(mn / cfg.vector_len)
    vectors = min(every, cfg.kmeans_max_samples)
    tile = min(tile_rows(k), vectors) * k * 4  # nearest(): distance tile
    # vptq.kmeans.weighted_subsample: fp64 scores, sorted copy, sort indices, cumsum, draws, probabilities
    sample = 6 * every * 8 if every > cfg.kmeans_max_samples and cfg.kmeans_sample == "weighted" else 0
    lay = LayerLayout.for_shape(cfg, m, n)
    t = lay.group_num * (cfg.num_centroids + cfg.num_res_centroids)
    refine = 0
    if refines_codebooks(cfg, lay):
        refine = 3 * t * t * 8 + t * n * 8 + 2 * mn * 8 + n * n * 8  # Gram, P^T H, W H (fp64)
    return dense + hess + tile + refine + sample


def memory_estimate(shapes: Shapes, cfg: QuantConfig, nsamples: int, seqlen: int, device: str) -> dict:
    """Peak bytes on the compute device and on the host, with their parts."""
    f32 = 4
    h, inter, heads = shapes.hidden, shapes.intermediate, shapes.heads
    act = nsamples * seqlen * h * f32  # one copy of the calibration activations
    blk_params = max(shapes.block_params)
    # Hessians: fp64 accumulators (one per distinct input) + one fp32 copy per linear at exit
    ins = {n: i for n, _, i in shapes.linears[0]}
    groups = shapes.shared_inputs or [[n] for n in ins]
    hess64 = sum(8 * ins[g[0]] ** 2 for g in groups if g and g[0] in ins)
    hess32 = sum(4 * i * i for _, _, i in shapes.linears[0])
    hessian_bytes = hess64 + hess32
    fwd = BATCH * seqlen * (6 * h + 3 * inter) * f32 + BATCH * heads * seqlen * seqlen * f32
    quant = max(_quantizer_bytes(cfg.for_layer(name, b), o, i)
                for b, blk in enumerate(shapes.linears) for name, o, i in blk)
    block_phase = {"block_weights": blk_params * f32, "hessians": hessian_bytes,
                   "forward_activations": fwd, "quantizer": quant}
    block_device = blk_params * f32 + max(hess64 + fwd + hess32, hess32 + quant)

    model_fp = shapes.params * f32
    lin_dense = shapes.target_weights * f32
    student = model_fp - lin_dense + math.ceil(bits_estimate(shapes, cfg)["quantized_bytes"] * 2)  # centroids in fp32
    e2e_device = 0
    cache = 0
    e2e = {}
    if cfg.e2e_steps:
        b = e2e_batch(cfg, nsamples)
        tokens = b * seqlen
        per_block = (12 * h + 5 * inter + heads * seqlen) * f32  # saved for backward, per token
        train_act = tokens * (shapes.blocks * per_block + 5 * shapes.vocab * f32)
        trainable = 2 * shapes.blocks * 2 * h * f32 + bits_estimate(shapes, cfg)["quantized_bytes"] * 4
        e2e = {"teacher": model_fp, "student": student, "dense_weights_for_backward": lin_dense,
               "activations": train_act, "adam_and_grads": 3 * trainable}
        e2e_device = sum(e2e.values())
        cache = teacher_cache_bytes(cfg.e2e_steps, b, nsamples, seqlen, shapes.vocab)
    peak_device = max(block_device, e2e_device)

    ft = bool(cfg.finetune_steps)
    host_acts = (3 + 2 * ft) * act  # x, fp_out, next inputs (+ fp_x and the block target)
    host_block = RUNTIME_BYTES + model_fp + host_acts + (block_device if device == "cpu" else blk_params * f32)
    host_e2e = 0
    if cfg.e2e_steps:
        # assemble_model: the cached FP model, the quantized copy, the teacher copy, the log-prob cache
        host_e2e = RUNTIME_BYTES + 2 * model_fp + student + cache + (e2e_device - model_fp - student
                                                                      if device == "cpu" else 0)
    host_assemble = RUNTIME_BYTES + 2 * model_fp + student
    peak_host = max(host_block, host_e2e, host_assemble)
    return {"peak_device_bytes": int(peak_device), "peak_host_bytes": int(peak_host),
            "hessian_bytes": int(hessian_bytes), "activation_bytes": int(act),
            "block_phase": {k: int(v) for k, v in block_phase.items()},
            "block_phase_device_bytes": int(block_device),
            "e2e_phase": {k: int(v) for k, v in e2e.items()}, "e2e_phase_device_bytes": int(e2e_device),
            "teacher_cache_bytes": int(cache), "host_block_phase_bytes": int(host_block),
            "host_e2e_phase_bytes": int(host_e2e), "model_fp32_bytes": int(model_fp)}


def disk_estimate(shapes: Shapes, cfg: QuantConfig, nsamples: int, seqlen: int) -> dict:
    """Bytes the job writes under VPTQ_HOME: workspace (kept for resuming) + the store's copy."""
    b = bits_estimate(shapes, cfg)
    act = nsamples * seqlen * shapes.hidden * 4
    inputs = act * (2 if cfg.finetune_steps else 1)  # inputs_{i+1}: x (+ fp_x)
    states = 0
    for i, blk in enumerate(shapes.linears):
        qbits = sum(sum(layer_bits(cfg.for_layer(name, i), o, n).values()) for name, o, n in blk)
        other = shapes.block_params[i] - sum(o * n for _, o, n in blk)
        states += math.ceil(qbits / 8) + 4 * other + 8192  # + the block's json
    calib = nsamples * seqlen * 8
    workspace = calib + shapes.blocks * inputs + states + b["output_bytes"]
    return {"workspace_bytes": int(workspace), "store_bytes": int(b["output_bytes"]),
            "disk_bytes": int(workspace + b["output_bytes"]),
            "parts": {"calibration": calib, "block_inputs": shapes.blocks * inputs, "block_states": states,
                      "checkpoint": b["output_bytes"]}}


# ----------------------------------------------------------------------------- loading

@dataclass
class Parts:
    """The model's shapes (meta or real) plus real weights of what the probe runs."""

    model: nn.Module
    embed: nn.Module
    block0: nn.Module
    norm: nn.Module
    head: nn.Module
    full: bool  # the whole model was loaded (else: only embed, block 0, norm, head)
    load_seconds: float
    file_bytes: int


def _file_bytes(src) -> int:
    p = Path(src.uri)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.glob("*.safetensors")) or sum(f.stat().st_size for f in p.glob("*.bin"))


def _streamed(src) -> Parts | None:
    """An HF safetensors folder through vptq.stream, as the job streams it: the shell model with its
    blocks on the meta device, real weights for block 0 only (read from the shards)."""
    t0 = time.perf_counter()
    s = open_streamed(src.path)
    if s is None:
        return None
    return Parts(s.model, s.model.get_input_embeddings(), s.block(0), final_norm(s.model),
                 s.model.get_output_embeddings(), False, time.perf_counter() - t0, _file_bytes(src))


def load_parts(src) -> Parts:
    """What the probe runs, streamed where the source allows (see _streamed), else the whole model."""
    from .driver import decoder_layers

    if src.kind == "hf":
        try:
            parts = _streamed(src)
        except Exception:  # noqa: BLE001 - an unusual architecture: load it whole instead
            parts = None
        if parts is not None:
            return parts
    from .source import load_model

    t0 = time.perf_counter()
    model, _ = load_model(src)
    try:
        layers = decoder_layers(model)
    except ValueError as e:
        raise ConfigError(f"{src.uri}: {e}") from None
    return Parts(model, model.get_input_embeddings(), layers[0], final_norm(model), model.get_output_embeddings(),
                 True, time.perf_counter() - t0, _file_bytes(src))


# ----------------------------------------------------------------------------- probe

def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev):
    _sync(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    return out, time.perf_counter() - t0


def _input_groups(calls: list[tuple[str, torch.Tensor]], lins: dict[str, nn.Linear]) -> list[list[str]]:
    """Which linears see the same input tensor (they share one Hessian accumulator), from a traced
    forward (vptq.callorder.trace_calls)."""
    seen: dict[str, torch.Tensor] = {}
    for n, x in calls:
        seen.setdefault(n, x)
    groups: list[list[str]] = []
    for n in lins:
        g = next((g for g in groups if n in seen and seen.get(g[0]) is seen[n]), None)
        if g is None:
            groups.append([n])
        else:
            g.append(n)
    return groups


def probe(parts: Parts, shapes: Shapes, cfg: QuantConfig, windows: torch.Tensor, dev: torch.device,
          log=None) -> dict:
    """Time block 0's Hessian forward, one or two real linears' VPTQ and one fine-tuning step."""
    from .as_linear import as_linears
    from .callorder import call_groups, trace_calls
    from .driver import block_kwargs, embed, forward_all, run_block, target_linears
    from .hessian import collect_hessians
    from .quantizer import quantize_linear

    t_start = time.perf_counter()
    say = log or (lambda _msg: None)
    nwin = windows.shape[0]
    with blocks_run_alone(parts.model):  # refused as a job would be, before anything is quantized
        x = embed(parts.model, windows)  # as the model's forward hands block 0 its inputs (scaled, ...)
        pe = block_kwargs(parts.model, x.shape[1], dev)[0]
        # copied after that forward, which may set the blocks' state per call (BigBird: full attention on short windows)
        block = copy.deepcopy(parts.block0).to(dev).eval()
        as_linears(block)  # as the job quantizes it: experts one linear each, Conv1D as nn.Linear
        lins = target_linears(block, cfg)
        calls = trace_calls(lambda: run_block(block, x[:1].to(dev), pe), lins)
    shapes.shared_inputs = _input_groups(calls, lins)
    # true-sequential Hessians: one block pass per group of linears (vptq.callorder), else one
    passes = len(call_groups(calls, lins)) if cfg.hessians == "true-sequential" else 1
    say("timing block 0's forward passes")
    _, t_fwd = _timed(lambda: forward_all(block, x, pe, dev, BATCH), dev)
    _, t_fwd2 = _timed(lambda: forward_all(block, x, pe, dev, BATCH), dev)
    t_fwd = min(t_fwd, t_fwd2)
    with collect_hessians(lins) as hs:
        _, t_hess = _timed(lambda: forward_all(block, x, pe, dev, BATCH), dev)
    names = list(lins)
    first = names[0]
    biggest = max(names, key=lambda n: lins[n].weight.numel())
    picks = [first] + ([biggest] if lins[biggest].weight.numel() != lins[first].weight.numel() else [])
    # warm-up (first-call costs of the linear-algebra and k-means paths) on a small slice
    w_small, h_small = lins[first].weight[: 4 * cfg.vector_len, :64], hs[first][:64, :64].to(dev)
    quantize_linear(w_small, h_small, cfg.with_(kmeans_iters=2, group_num=1, outlier_percent=0.0), "warm-up")
    probed, qmods = [], {}
    for name in picks:
        if probed and time.perf_counter() - t_start > PROBE_BUDGET_S:
            break
        say(f"quantizing block 0's {name} ({lins[name].out_features} x {lins[name].in_features})")
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        (q, rep), secs = _timed(lambda name=name: quantize_linear(lins[name].weight, hs[name].to(dev),
                                                                  cfg.for_layer(name, 0), name), dev)
        probed.append({"name": name, "shape": [lins[name].out_features, lins[name].in_features],
                       "weights": lins[name].weight.numel(), "seconds": round(secs, 3),
                       "proxy_loss": rep.proxy_loss, "bpw": rep.bpw,
                       "device_peak_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None})
        qmods[name] = q
    out = {"windows": nwin, "seqlen": int(windows.shape[1]), "forward_seconds": t_fwd,
           "hessian_forward_seconds": t_hess, "hessian_passes": passes, "linears": probed}
    if cfg.e2e_steps:
        say("timing one end-to-end fine-tuning step")
        out["e2e"] = _e2e_probe(parts, block, lins, hs, qmods, cfg, windows, pe, dev)
    out["seconds"] = round(time.perf_counter() - t_start, 2)
    return out


def _e2e_probe(parts: Parts, block, lins, hs, qmods, cfg: QuantConfig, windows, pe, dev) -> dict:
    """One KL step of a one-block student (all its linears VQuantLinear) and of the head alone."""
    from .driver import embed, run_block
    from .finetune import trainable
    from .layers import VQuantLinear
    from .quantizer import quantize_linear

    fast = cfg.with_(kmeans_iters=2, refine_iters=0, error_feedback=False)  # same layout, cheap codes
    for name, lin in lins.items():
        q = qmods.get(name) or quantize_linear(lin.weight, hs[name].to(dev), fast.for_layer(name, 0), name)[0]
        block.set_submodule(name, VQuantLinear.from_weights(q).to(dev).float())
    norm, head = copy.deepcopy(parts.norm).to(dev), parts.head.to(dev)
    b = e2e_batch(cfg, windows.shape[0])
    ids = windows[:b].to(dev)

    def logits(with_block: bool):
        hid = embed(parts.model, ids).to(dev)
        if with_block:
            hid = run_block(block, hid, pe)
        return head(norm(hid)).float()

    with torch.no_grad():
        teacher = torch.log_softmax(logits(False), -1)  # stands in for the cached teacher log-probs
        _, t_head_fwd = _timed(lambda: logits(False), dev)
    for p in [*parts.embed.parameters(), *head.parameters()]:
        p.requires_grad_(False)
    params = trainable(block) + list(norm.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.e2e_lr)

    def step(with_block: bool):
        opt.zero_grad(set_to_none=True)
        s = torch.log_softmax(logits(with_block), -1)
        loss = nn.functional.kl_div(s.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
        loss.backward()
        opt.step()

    step(True)  # warm-up
    t_full = min(_timed(lambda: step(True), dev)[1] for _ in range(2))
    t_head = min(_timed(lambda: step(False), dev)[1] for _ in range(2))
    for p in params:
        p.requires_grad_(False)
    return {"batch": b, "step_one_block_seconds": t_full, "step_head_seconds": t_head,
            "head_forward_seconds": t_head_fwd}


# ----------------------------------------------------------------------------- time

def time_estimate(shapes: Shapes, cfg: QuantConfig, nsamples: int, seqlen: int, pr: dict, load_seconds: float,
                  file_bytes: int, disk: dict) -> dict:
    """Seconds per block and in total, extrapolated from the probe."""
    per_win_fwd = pr["forward_seconds"] / pr["windows"]
    per_win_hess = pr["hessian_forward_seconds"] / pr["windows"]
    if seqlen != pr["seqlen"]:  # (the probe runs at the job's seqlen; kept for callers that do not)
        per_win_fwd *= seqlen / pr["seqlen"]
        per_win_hess *= seqlen / pr["seqlen"]
    # The quantizer walks the N input columns one by one (column loop, twice or more) and its
    # codebook refinement walks the M/v vector rows with a (T x N) update each: the time is
    # ~ N * (a + b * M). Two probed linears with different M give a and b; else t ~ N * M.
    pts = [(p["shape"][0], p["shape"][1], p["seconds"]) for p in pr["linears"]]
    if len(pts) >= 2 and pts[1][0] != pts[0][0]:
        (m0, n0, s0), (m1, n1, s1) = pts[0], pts[1]
        slope = max((s1 / n1 - s0 / n0) / (m1 - m0), 0.0)
        icpt = max(s0 / n0 - slope * m0, 0.0)
        if slope == 0.0 and icpt == 0.0:
            slope = max(s0 / (n0 * m0), s1 / (n1 * m1))
    else:
        m0, n0, s0 = pts[0]
        slope, icpt = s0 / (m0 * n0), 0.0

    def lin_time(m: int, n: int) -> float:
        return n * (icpt + slope * m)

    b0_params = shapes.block_params[0]
    blocks = []
    for i, blk in enumerate(shapes.linears):
        scale = shapes.block_params[i] / b0_params
        quant = sum(lin_time(o, n) for _, o, n in blk)
        hess = nsamples * per_win_hess * scale * pr["hessian_passes"]
        fwd = nsamples * per_win_fwd * scale
        nxt = fwd if quantized_chain(cfg) else 0.0  # else the next inputs are the Hessian pass's outputs
        ft = 0.0
        if cfg.finetune_steps:  # target forward + steps x (fwd + bwd ~ 3 fwd) of BATCH windows
            ft = fwd + cfg.finetune_steps * 3 * BATCH * per_win_fwd * scale
        io = (disk["parts"]["block_inputs"] / shapes.blocks + disk["parts"]["block_states"] / shapes.blocks) \
            / IO_BYTES_PER_S * 2  # written, then read by the next block
        blocks.append({"hessians": hess, "quantize": quant, "forward": nxt, "finetune_block": ft, "io": io})
    per_block = [sum(b.values()) for b in blocks]
    e2e = 0.0
    e2e_parts: dict = {}
    if cfg.e2e_steps and "e2e" in pr:
        p = pr["e2e"]
        blk_step = max(p["step_one_block_seconds"] - p["step_head_seconds"], 0.0)
        step = p["step_head_seconds"] + sum(blk_step * bp / b0_params for bp in shapes.block_params)
        teacher_win = p["head_forward_seconds"] / p["batch"] + per_win_fwd * sum(
            bp / b0_params for bp in shapes.block_params)
        b = p["batch"]
        cached = teacher_cache_bytes(cfg.e2e_steps, b, nsamples, seqlen, shapes.vocab) > 0
        teacher = nsamples * teacher_win if cached else cfg.e2e_steps * b * teacher_win
        probe_loss = 2 * b * teacher_win  # loss on a fixed batch before and after
        e2e_parts = {"step_seconds": step, "steps": cfg.e2e_steps, "teacher_seconds": teacher,
                     "teacher_cached": cached}
        e2e = cfg.e2e_steps * step + teacher + probe_loss
    overhead = {"load_model": load_seconds, "hash_model": 2 * file_bytes / IO_BYTES_PER_S,
                "save_checkpoint": 2 * disk["parts"]["checkpoint"] / IO_BYTES_PER_S}
    total = sum(per_block) + e2e + sum(overhead.values())
    return {"seconds_per_block": sum(per_block) / len(per_block), "seconds_total": total,
            "seconds_quantize_linears": sum(b["quantize"] for b in blocks),
            "seconds_hessians": sum(b["hessians"] for b in blocks),
            "seconds_forward": sum(b["forward"] for b in blocks),
            "seconds_finetune_block": sum(b["finetune_block"] for b in blocks),
            "seconds_e2e": e2e, "e2e": e2e_parts, "overhead": overhead,
            "linear_model": {"seconds_per_column": icpt, "seconds_per_weight": slope}}


# ----------------------------------------------------------------------------- machine

def machine_free(home: Path, dev: torch.device) -> dict:
    """Available host memory, free device memory, free disk at VPTQ_HOME."""
    try:
        import psutil

        host = int(psutil.virtual_memory().available)
    except ImportError:  # /proc/meminfo on Linux
        host = 0
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                host = int(line.split()[1]) * 1024
    p = Path(home)
    while not p.exists() and p != p.parent:
        p = p.parent
    disk = int(shutil.disk_usage(p).free)
    device = host
    if dev.type == "cuda":
        device = int(torch.cuda.mem_get_info(dev)[0])
    try:
        load = round(os.getloadavg()[0], 2)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    except (OSError, AttributeError):
        load, cores = None, os.cpu_count()
    return {"host_available_bytes": host, "device_free_bytes": device, "disk_free_bytes": disk, "home": str(home),
            "load_average": load, "cpu_cores": cores, "torch_threads": torch.get_num_threads()}


def verdict(device: str, mem: dict, disk: dict, free: dict) -> tuple[bool, list[str]]:
    def g(x: int) -> str:
        return f"{x / GiB:.2f} GiB"

    checks = [("host memory", mem["peak_host_bytes"], free["host_available_bytes"], "available")]
    if device != "cpu":
        checks.append(("device memory", mem["peak_device_bytes"], free["device_free_bytes"], "free"))
    checks.append(("disk at VPTQ_HOME", disk["disk_bytes"], free["disk_free_bytes"], "free"))
    reasons, fits = [], True
    for what, need, have, word in checks:
        ok = need <= have
        fits &= ok
        reasons.append(f"{what}: needs {g(need)}, {g(have)} {word}" + ("" if ok else " -- does NOT fit"))
    return fits, reasons


# ----------------------------------------------------------------------------- entry point

def plan(source: str, cfg: QuantConfig, nsamples: int | None = None, seqlen: int = 512, device: str = "cpu",
         home: str | Path = ".", calib: str | Path | None = None, log=None) -> dict:
    """The whole plan as one JSON-able dict (see the module docstring for what is modelled)."""
    from .evaluate import calibration_windows
    from .pipeline import check_device, check_request, checked_load

    t0 = time.perf_counter()
    if nsamples is None:  # a job's default, by one rule (vptq.config.resolve)
        nsamples = calib_windows(cfg.e2e_steps)
    dev = check_device(device)
    say = log or (lambda _msg: None)
    src, ids = check_request(source, calib, nsamples, seqlen, verb="plan")
    say("loading the model (only block 0 and the embeddings where the format allows)")
    parts = checked_load(load_parts, src, "model")
    shapes = shapes_of(parts.model, cfg)
    windows = calibration_windows(ids, min(PROBE_WINDOWS, nsamples), seqlen, cfg.seed)
    pr = probe(parts, shapes, cfg, windows, dev, say)
    bits = bits_estimate(shapes, cfg)
    mem = memory_estimate(shapes, cfg, nsamples, seqlen, dev.type)
    disk = disk_estimate(shapes, cfg, nsamples, seqlen)
    load_s = parts.load_seconds if parts.full else parts.file_bytes / IO_BYTES_PER_S + parts.load_seconds
    tm = time_estimate(shapes, cfg, nsamples, seqlen, pr, load_s, parts.file_bytes, disk)
    free = machine_free(Path(home), dev)
    fits, reasons = verdict(dev.type, mem, disk, free)
    notes = []
    if free["load_average"] is not None and free["load_average"] > 0.5 * (free["cpu_cores"] or 1):
        notes.append(f"the machine was busy during the probe (load {free['load_average']} on {free['cpu_cores']} "
                     "cores): the times are those of an equally busy machine")
    if cfg.rescue_loss and not cfg.outlier_percent:
        notes.append(f"bpw counts no outlier columns: a layer that loses more than rescue_loss={cfg.rescue_loss:g} of "
                     f"its output energy, mostly on a few input channels, is quantized again with "
                     f"{cfg.rescue_outlier_percent:g} % of them (a little more bpw and twice the time for that layer)")
    return {
        "source": src.uri, "device": dev.type, "nsamples": nsamples, "seqlen": seqlen,
        "config": cfg.to_dict(),
        "bpw": bits["bpw"], "bits": bits["bits"], "weights": bits["weights"],
        "bits_per_param": bits["bits_per_param"], "float_params": bits["float_params"],
        "float_tensors": bits["float_tensors"],
        "output_bytes": bits["output_bytes"], "quantized_bytes": bits["quantized_bytes"],
        "peak_device_bytes": mem["peak_device_bytes"], "peak_host_bytes": mem["peak_host_bytes"],
        "workspace_bytes": disk["workspace_bytes"], "disk_bytes": disk["disk_bytes"],
        "hessian_bytes": mem["hessian_bytes"], "hessians_on_disk": False,
        "seconds_per_block": tm["seconds_per_block"], "seconds_total": tm["seconds_total"],
        "blocks": shapes.blocks, "linears": shapes.n_linears,
        "fits": fits, "reasons": reasons, "notes": notes,
        "free": free, "memory": mem, "disk": disk, "time": tm,
        "probe": pr | {"model_loaded": "whole" if parts.full else "block 0 + embeddings + head",
                       "load_seconds": round(parts.load_seconds, 2)},
        "plan_seconds": round(time.perf_counter() - t0, 2),
    }
