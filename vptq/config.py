"""QuantConfig: every knob of VPTQ for one run, plus honest bit accounting.

Bits are counted "all-in": packed indices (with their padding), every codebook of every
layer, the permutation, the normalization scale/bias. `layer_bits` is checked in the tests
against the bytes actually written by `vptq.io.save_quantized`.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args

# sequential: each block's Hessians on the quantized blocks before it; true-sequential: also each group of a
# block's linears on the quantized groups before it (vptq.callorder); original: all from the FP model
HessianMode = Literal["sequential", "true-sequential", "original"]
KmeansSample = Literal["uniform", "weighted"]
# the fields one linear may set for itself (QuantConfig.layers): its codebook shapes and its own
# optimisation knobs; everything else (norm, fine-tuning, Hessian mode, seed) is the whole job's
LAYER_FIELDS = ("vector_len", "num_centroids", "num_res_centroids", "outlier_percent", "outlier_vector_len",
                "outlier_centroids", "group_num", "refine_iters", "kmeans_iters", "kmeans_sample", "damp")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclass(frozen=True)
class QuantConfig:
    vector_len: int = 4  # v: elements per vector, along the output dimension
    num_centroids: int = 256  # k: main codebook size (power of two)
    num_res_centroids: int = 0  # k_res: residual codebook size, 0 = no residual
    outlier_percent: float = 0.0  # share of input channels (highest H[j,j]) with own codebook
    outlier_vector_len: int = 4
    outlier_centroids: int = 256
    group_num: int = 1  # G: column groups, one codebook each
    # a layer whose proxy loss (its share of output energy lost) exceeds this, with most of the error on its
    # highest-H[j,j] input channels, is quantized again with rescue_outlier_percent outlier columns, the lower
    # loss kept and reported (0 = off; vptq/rescue.py)
    rescue_loss: float = 0.0
    rescue_outlier_percent: float = 1.0
    enable_norm: bool = True  # per-input-channel min/max normalization
    enable_perm: bool = True  # act-order: most sensitive input channels first
    weighted_kmeans: bool = True  # k-means weighted by H[j,j]; False = plain k-means
    error_feedback: bool = True  # channel-independent 2nd-order optimization (column loop)
    refine_iters: int = 2  # rounds of (closed-form codebook update, column loop); 0 = off
    kmeans_iters: int = 40
    kmeans_max_samples: int = 131072  # about this many vectors fit a codebook
    # how a layer with more vectors than that picks them: "weighted" (half by H[j,j], the heaviest always;
    # vptq.kmeans.weighted_subsample) or "uniform". Weighted since 2026-12-06: a uniform sample left out the few
    # massive-activation channels of Qwen2.5's down_proj (2-bit one-shot 315.84 -> 95.24 on test); chosen on
    # SmolLM2's selection text by a rule written before its seeds 1-2 finished (mean 62.21 vs 61.54, within
    # 2 %; worst seed 62.78 vs 66.44): bench/RESULTS.md, "The k-means sample keeps the heavy vectors"
    kmeans_sample: KmeansSample = "weighted"
    block_size: int = 128  # lazy-batch width of the column loop
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    finetune_steps: int = 0  # per-block recovery of codebooks + norms (0 = off)
    finetune_lr: float = 1e-4
    e2e_steps: int = 0  # end-to-end KL fine-tuning steps after all blocks (0 = off)
    e2e_lr: float = 1e-4
    e2e_batch: int = 1  # calibration windows per end-to-end step
    # discrete step of the end-to-end stage: after every K steps, re-assign vectors to their
    # nearest centroid where that lowers the layer's Hessian-weighted error (0 = off)
    e2e_reassign_every: int = 0
    hessians: HessianMode = "sequential"
    seed: int = 0
    # globs over the paths of linears inside a decoder block (or their last component) that are
    # quantized; "*" = every nn.Linear of the blocks but MoE routers (vptq/targets.py)
    targets: tuple[str, ...] = ("*",)
    # per-layer settings over the fields above: (glob, ((field, value), ...)) in order, a later match
    # winning; the glob is matched like `targets` (the path inside a block, or its last component) and
    # also against "<block index>.<path>" (e.g. "0.*" = every linear of block 0); LAYER_FIELDS only.
    # Given as {glob: {field: value}} in JSON and --config files, `--layer GLOB:FIELD=VALUE` on the CLI.
    layers: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):  # one glob
            object.__setattr__(self, "targets", (self.targets,))
        elif not isinstance(self.targets, tuple):  # a list from JSON or --targets
            object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "layers", _layer_rules(self.layers))
        self.validate()

    @property
    def index_bits(self) -> int:
        return int(math.log2(self.num_centroids))

    @property
    def res_bits(self) -> int:
        return int(math.log2(self.num_res_centroids)) if self.num_res_centroids else 0

    def validate(self) -> None:
        if self.vector_len < 1 or self.vector_len > 64:
            raise ConfigError(f"vector_len={self.vector_len}: use 1..64")
        for name in ("num_centroids", "outlier_centroids"):
            k = getattr(self, name)
            if not _is_pow2(k) or k > 65536:
                raise ConfigError(f"{name}={k}: must be a power of two <= 65536")
        if self.num_res_centroids and (
            not _is_pow2(self.num_res_centroids) or self.num_res_centroids > self.num_centroids
        ):
            raise ConfigError(
                f"num_res_centroids={self.num_res_centroids}: use 0 or a power of two "
                f"<= num_centroids ({self.num_centroids}), as the VPTQ loaders require"
            )
        if not 0.0 <= self.outlier_percent < 50.0:
            raise ConfigError(f"outlier_percent={self.outlier_percent}: use 0 <= x < 50")
        if not 0.0 <= self.rescue_loss or not 0.0 < self.rescue_outlier_percent < 50.0:
            raise ConfigError(f"rescue_loss={self.rescue_loss}, rescue_outlier_percent={self.rescue_outlier_percent}: "
                              f"use rescue_loss >= 0 (0 = off) and 0 < rescue_outlier_percent < 50")
        if self.group_num < 1:
            raise ConfigError(f"group_num={self.group_num}: must be >= 1")
        for name, kind in (("kmeans_sample", KmeansSample), ("hessians", HessianMode)):
            allowed = get_args(kind)  # the Literal is the one list of the values
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}: use {' or '.join(map(repr, allowed))}")
        for name in ("finetune_steps", "e2e_steps", "e2e_batch", "e2e_reassign_every"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be an integer")
        if self.finetune_steps < 0 or self.e2e_steps < 0 or self.e2e_batch < 1:
            raise ConfigError("finetune_steps and e2e_steps must be >= 0 and e2e_batch >= 1")
        if self.e2e_reassign_every < 0:
            raise ConfigError(f"e2e_reassign_every={self.e2e_reassign_every}: use 0 (off) or a positive step count")
        for name in ("finetune_lr", "e2e_lr"):
            if not isinstance(getattr(self, name), (int, float)) or isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}: the learning rate must be a positive number")
        if not (self.finetune_lr > 0 and self.e2e_lr > 0 and math.isfinite(self.finetune_lr)
                and math.isfinite(self.e2e_lr)):
            raise ConfigError(f"learning rates must be positive numbers (finetune_lr={self.finetune_lr}, "
                              f"e2e_lr={self.e2e_lr})")
        if self.refine_iters < 0:
            raise ConfigError(f"refine_iters={self.refine_iters}: must be >= 0")
        if self.kmeans_iters < 0 or self.block_size < 1 or self.damp <= 0:
            raise ConfigError("kmeans_iters >= 0, block_size >= 1 and damp > 0 are required")
        if not self.targets or not all(isinstance(p, str) and p.strip() for p in self.targets):
            raise ConfigError(f"targets={list(self.targets)!r}: give one or more globs, e.g. ['*'] or ['self_attn.*']")
        for glob, fields in self.layers:
            try:
                replace(self, layers=(), **dict(fields))
            except ConfigError as e:
                raise ConfigError(f"layers[{glob!r}]: {e}") from None

    def for_layer(self, name: str, block: int | None = None) -> QuantConfig:
        """The config of the linear at `name` (its path inside a block) of block `block`: the
        `layers` rules that match it applied in order, and no rules left (a layer's own config)."""
        if not self.layers:
            return self
        own: dict[str, Any] = {}
        for glob, fields in self.layers:
            if layer_rule_matches(glob, name, block):
                own.update(fields)
        return replace(self, layers=(), **own)

    def with_(self, **kw) -> QuantConfig:
        return replace(self, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["layers"] = {glob: dict(fields) for glob, fields in self.layers}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown QuantConfig field(s): {sorted(unknown)}")
        d = dict(d)
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        return cls(**d)


def field_value(key: str, val: Any) -> Any:
    """A JSON/TOML value of QuantConfig field `key` as that field's type (an int where a float is due is
    taken; a bool is no int); ConfigError "KEY = VALUE is not a TYPE" otherwise. The one type rule of
    --config files and of `layers` rules."""
    typ = type(QuantConfig.__dataclass_fields__[key].default)
    if typ is float and isinstance(val, int) and not isinstance(val, bool):
        return float(val)
    if not isinstance(val, typ) or (typ is int and isinstance(val, bool)):
        raise ConfigError(f"{key} = {val!r} is not a {typ.__name__}")
    return val


def layer_rule_matches(glob: str, name: str, block: int | None = None) -> bool:
    """Whether a `layers` rule's glob names the linear at `name` (its path inside a block) of block
    `block`: the path, its last component, or "<block>.<path>"."""
    paths = [name, name.rsplit(".", 1)[-1]] + ([f"{block}.{name}"] if block is not None else [])
    return any(fnmatch.fnmatchcase(p, glob) for p in paths)


def _layer_rules(rules) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    """QuantConfig.layers from {glob: {field: value}} (JSON) or (glob, fields) pairs; ConfigError names
    what is wrong. Hashable (the config is frozen and hashed)."""
    if isinstance(rules, dict):
        rules = list(rules.items())
    out = []
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise ConfigError(f"layers: {rule!r} is not a (glob, fields) pair; give {{glob: {{field: value}}}}")
        glob, fields = rule
        try:
            fields = dict(fields) if isinstance(fields, (dict, tuple, list)) else fields
        except (TypeError, ValueError):  # a list that is not (field, value) pairs
            fields = None
        if not isinstance(glob, str) or not glob.strip() or not isinstance(fields, dict) or not fields:
            raise ConfigError(f"layers: {glob!r}: give a glob and at least one field, e.g. "
                              f"{{'self_attn.k_proj': {{'num_res_centroids': 32}}}}")
        bad = sorted(set(fields) - set(LAYER_FIELDS))
        if bad:
            raise ConfigError(f"layers[{glob!r}]: {bad} cannot be set per layer; use one of {list(LAYER_FIELDS)}")
        try:
            fields = {key: field_value(key, val) for key, val in fields.items()}
        except ConfigError as e:
            raise ConfigError(f"layers[{glob!r}]: {e}") from None
        out.append((glob, tuple(fields.items())))
    return tuple(out)


# Presets chosen for small models (hidden 576): codebooks must stay small because each
# linear stores its own (a 4096x6 fp16 codebook alone is ~1.2 bpw on a 576x576 layer).
# Measured on SmolLM2-135M (bench/RESULTS.md, runs q*-orig-nonorm-s400-n256 on an H100):
# - v5-k1024 beats v4-k256 and v6-k2048 at ~2 bits all-in; 4 bits uses its 0.17 bpw of headroom
#   on a larger main codebook (v4-k1024 + residual k64: 18.61, v4-k256 + k256: 19.06).
# - no per-channel norm: on this model it hurts one-shot (2 bit 44.73 with, 40.21 without) and
#   after fine-tuning (3 bit 21.14 with, 20.24 without), and costs 0.045 bpw of scale/bias.
# - every Hessian from the original model (the authors' setting; shareable between jobs):
#   2 bit 32.97 sequential -> 32.16 original.
# - 400 end-to-end KL steps over 256 calibration windows (calib_windows): with 64 windows the
#   stage re-reads the same 32K tokens; 4 bit 19.52 (64) -> 19.09 (256). lr 5e-4 at 3/4 bits
#   (sweep of {1e-4, 3e-4, 5e-4, 1e-3}); 2 bits keeps 1e-4 (5e-4 not measured there).
# - rescue_loss 0.1: a layer losing more than 10 % of its output energy is quantized again with 1 % outlier
#   columns. On SmolLM2 no layer comes near (2-bit one-shot: median 0.026, max 0.060); Qwen2.5-0.5B's block-3
#   down_proj lost 0.24 and took the model to 2864; with outlier columns 0.0014 (bench/results/layer_probe_*).
#   A one-shot job looks from 0.005 on (ONESHOT_DEFAULTS below).
_FT = dict(enable_norm=False, hessians="original", e2e_steps=400, e2e_lr=1e-4, e2e_batch=1, rescue_loss=0.1)
_FT_HI = dict(_FT, e2e_lr=5e-4)
PRESETS: dict[int, QuantConfig] = {
    # bpw all-in on SmolLM2 as measured with a stored permutation; 0.022 less since the quantizer folds
    # it into the codes' column order (2 bits: 2.173, `make demo` 2026-12-03)
    2: QuantConfig(vector_len=5, num_centroids=1024, **_FT),  # 2.195
    3: QuantConfig(vector_len=5, num_centroids=1024, num_res_centroids=32, **_FT_HI),  # 3.206
    4: QuantConfig(vector_len=4, num_centroids=1024, num_res_centroids=64, **_FT_HI),  # 4.160
}
# calibration windows (x 512 tokens) when the request does not say: the end-to-end stage wants
# many distinct windows; Hessians alone are well estimated from 64 (and 4x cheaper to collect)
FINETUNE_WINDOWS, ONESHOT_WINDOWS = 256, 64


# set by a request's own fields (its seed, its Hessian mode), never through its config overrides
REQUEST_FIELDS = ("seed", "hessians")


def calib_windows(e2e_steps: int) -> int:
    """Default calibration windows of a job with this many end-to-end fine-tuning steps."""
    return FINETUNE_WINDOWS if e2e_steps > 0 else ONESHOT_WINDOWS


# What a one-shot job (no end-to-end fine-tuning) runs where its request does not say; the fine-tuned presets keep
# their own values (their end-to-end stage was measured with them). Each chosen on validation text for one-shot runs
# (bench/RESULTS.md):
# - hessians "sequential": each block's Hessians on the quantized blocks before it ("Within-block ... Hessians"):
#   over seeds 0-2, SmolLM2 2-bit one-shot selection ppl 62.21 original -> 58.86 (true-sequential 58.43, within the
#   seeds' spread), Qwen2.5-0.5B 4-bit one-shot worst seed 116.10 -> 40.00 (true-sequential 41.37, and dearer).
# - rescue_loss 0.005: the second look of vptq/rescue.py at any layer losing more than 0.5 % whose error sits on
#   its heaviest channels, not only above 10 % (a 2-bit figure; at 4 bits Qwen's block-3 down_proj lost 2-4 %, 370x
#   GPTQ's, and never reached it): Qwen2.5-0.5B 4-bit one-shot selection 37.84 [35.75, 40.00] -> 36.00 [35.98,
#   36.02] ("Qwen2.5-0.5B one-shot at the sequential default, and a lower rescue threshold").
ONESHOT_DEFAULTS: dict[str, Any] = {"hessians": "sequential", "rescue_loss": 0.005}


def oneshot_defaults(cfg: QuantConfig, given: set[str]) -> QuantConfig:
    """cfg with ONESHOT_DEFAULTS in the fields the request did not give, when it is one-shot (e2e_steps 0)."""
    if cfg.e2e_steps > 0:
        return cfg
    return cfg.with_(**{k: v for k, v in ONESHOT_DEFAULTS.items() if k not in given})


def preset(bits: int) -> QuantConfig:
    if bits not in PRESETS:
        *rest, last = sorted(PRESETS)
        raise ConfigError(f"--bits {bits}: choose {', '.join(map(str, rest))} or {last}")
    return PRESETS[bits]


def resolve(bits: int, overrides: dict | None = None, *, seed: int | None = None, hessians: str | None = None,
            nsamples: int | None = None) -> tuple[QuantConfig, int]:
    """The one rule for what a request leaves out: (its QuantConfig, its calibration windows).

    The config is the preset of `bits` with the overrides over it, then the request's seed and Hessian
    mode when given; a one-shot request gets ONESHOT_DEFAULTS where it gave nothing (oneshot_defaults); the
    windows default by the resolved config's e2e_steps (calib_windows). ConfigError names the field and the fix."""
    fields = set(QuantConfig.__dataclass_fields__) - set(REQUEST_FIELDS)
    unknown = set(overrides or {}) - fields
    if unknown:
        raise ConfigError(f"unknown QuantConfig field(s) {sorted(unknown)}: use one of {sorted(fields)}")
    own = {k: v for k, v in (("seed", seed), ("hessians", hessians)) if v is not None}
    cfg = oneshot_defaults(preset(bits).with_(**(overrides or {}), **own), set(overrides or {}) | set(own))
    if nsamples is None:
        nsamples = calib_windows(cfg.e2e_steps)
    if nsamples < 1:
        raise ConfigError(f"--nsamples {nsamples}: use at least 1 calibration window")
    return cfg, nsamples


# ----------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class LayerLayout:
    """How the input channels of one (M x N) linear split into outliers and groups."""

    out_features: int
    in_features: int
    outlier_size: int
    group_num: int
    group_size: int

    @classmethod
    def for_shape(cls, cfg: QuantConfig, out_features: int, in_features: int) -> LayerLayout:
        n = in_features
        outlier = math.ceil(cfg.outlier_percent / 100.0 * n) if cfg.outlier_percent > 0 else 0
        g = cfg.group_num
        if g > n - outlier:
            raise ConfigError(f"group_num={g} is larger than the {n} input channels")
        # grow the outlier block until the rest divides evenly into groups (as the authors do)
        while (n - outlier) % g:
            outlier += 1
        return cls(out_features, in_features, outlier, g, (n - outlier) // g)


def layer_bits(cfg: QuantConfig, out_features: int, in_features: int) -> dict[str, int]:
    """Every stored bit of one quantized linear, by component (no bias: ours have none)."""
    lay = LayerLayout.for_shape(cfg, out_features, in_features)
    v, m = cfg.vector_len, out_features
    rows = math.ceil(m / v)
    width = cfg.index_bits + cfg.res_bits
    words = math.ceil(lay.group_size * width / 32)
    bits = {
        "indices": 32 * lay.group_num * rows * words,
        "centroids": 16 * lay.group_num * cfg.num_centroids * v,
        "res_centroids": 16 * lay.group_num * cfg.num_res_centroids * v,
        "outlier_indices": 0,
        "outlier_centroids": 0,
        # one group, no outliers: the permutation is folded into the codes' column order (quantizer.py)
        "perm": 16 * in_features if cfg.enable_perm and (lay.outlier_size or lay.group_num > 1) else 0,
        "norm": 2 * 16 * in_features if cfg.enable_norm else 0,
    }
    if lay.outlier_size:
        v0 = cfg.outlier_vector_len
        bits["outlier_indices"] = 16 * math.ceil(m / v0) * lay.outlier_size
        bits["outlier_centroids"] = 16 * cfg.outlier_centroids * v0
    return bits


def layer_bpw(cfg: QuantConfig, out_features: int, in_features: int) -> float:
    return sum(layer_bits(cfg, out_features, in_features).values()) / (out_features * in_features)
