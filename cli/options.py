"""The options of a compression request, declared once for `vptq compress`, `vptq submit` and
`vptq plan` (each a typing.Annotated alias: one flag, one type, one help), and the one way they
become a request: `overrides_from` (--config, --set, --finetune-steps -> QuantConfig overrides) and
`request_command` (a command taking the request's options, declared once in `_request`, which turns
them into flows.request.build_spec's JobSpec; it resolves the config by vptq.config.resolve).

Defaults are JobSpec's (flows/spec.py), so a command line and a stored spec cannot disagree.
It imports nothing of cli/.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Optional, get_args

import typer
from vptq_service.flows.spec import HessianMode as HessianModes
from vptq_service.flows.spec import JobSpec

# the choices of --hessians: JobSpec's (vptq.config.HessianMode), as the Enum that typer takes
HessianMode = StrEnum("HessianMode", {v.replace("-", "_"): v for v in get_args(HessianModes)})


# the request's defaults, as JobSpec declares them (the commands' signatures read them from here)
DEFAULT = SimpleNamespace(**{k: f.default for k, f in JobSpec.model_fields.items() if not f.is_required()})

Source = Annotated[str, typer.Argument(help="HF model folder, a .gguf file, 'smollm2', s3://bucket/prefix "
                                            "or hf://org/name.")]
Bits = Annotated[int, typer.Option("--bits", help="Bits per weight preset: 2, 3 or 4.")]
Name = Annotated[Optional[str], typer.Option("--name", help="Registry name of the result, published as "
                                                            "NAME:VERSION (default: SOURCE-Bbit).")]
Version = Annotated[Optional[str], typer.Option("--version", help="Registry version (default: the next vN).")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="TOML or JSON file of QuantConfig fields "
                                                                     "(see `vptq config show`); --set wins over it.")]
Set = Annotated[list[str], typer.Option("--set", help="Override a QuantConfig field, e.g. --set e2e_steps=0.")]
Calib = Annotated[Optional[Path], typer.Option("--calib", help="Calibration text (default: the calibration mix of "
                                                                 "docs/calibration-mix.md).")]
Nsamples = Annotated[Optional[int], typer.Option("--nsamples", help="Calibration windows, drawn from the text with "
                                                                    "--seed (default: 256 with fine-tuning, 64 without).")]
Seqlen = Annotated[int, typer.Option("--seqlen", help="Tokens per calibration window.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for windows and codebooks.")]
Device = Annotated[str, typer.Option("--device", help="Compute device: cpu, cuda or cuda:N.")]
Hessians = Annotated[Optional[HessianMode], typer.Option(
    "--hessians", help="original (the fine-tuned presets'): from the FP model, one shared pass reused by later "
    "jobs on the same model and data; sequential (a one-shot job's default): from the quantized prefix; "
    "true-sequential: also a block's later linears from its quantized earlier ones (o_proj after q/k/v, "
    "down_proj after gate/up).")]
Runner = Annotated[str, typer.Option("--runner", help="Where a block's linears are quantized: local (this "
                                                      "process), dask or ray (worker processes, one GPU each).")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Worker processes of --runner dask|ray "
                                                                  "(default: the number of GPUs, else 2).")]
FinetuneSteps = Annotated[Optional[int], typer.Option(
    "--finetune-steps", help="End-to-end KL fine-tuning steps after quantization (0 = off; default: the preset's, "
    "400).")]
EvalText = Annotated[Optional[Path], typer.Option("--eval-text", help="Held-out text for perplexity before/after "
                                                                      "(default: the calibration text).")]
EvalWindows = Annotated[int, typer.Option("--eval-windows", help="Perplexity windows before/after (0 = none).")]
EvalSeqlen = Annotated[int, typer.Option("--eval-seqlen", help="Tokens per perplexity window.")]
MaxPplRatio = Annotated[Optional[float], typer.Option(
    "--max-ppl-ratio", help="Publish the version as rejected when perplexity after > R x before.")]
Targets = Annotated[Optional[list[str]], typer.Option(
    "--targets", help="Glob over the paths of linears inside a decoder block to quantize (repeatable), e.g. "
    "'self_attn.*' or 'mlp.down_proj' (default: every nn.Linear of the blocks but MoE routers).")]
Layers = Annotated[Optional[list[str]], typer.Option(
    "--layer", help="Per-layer settings GLOB:FIELD=VALUE[,FIELD=VALUE] (repeatable, a later one wins), the glob "
    "over a linear's path inside a block or '<block>.<path>', e.g. '*.k_proj:num_res_centroids=32' or "
    "'0.*:num_centroids=2048'; fields: codebook shapes, refine_iters, kmeans_iters, damp.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


def default_name(source: str, bits: int) -> str:
    """Registry name when --name is not given: the source's last path part, e.g. smollm2-2bit."""
    import re

    stem = source.rstrip("/").split("/")[-1].split("@")[0]
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._") or "model"
    return f"{stem[:100]}-{bits}bit"


def _request(
    source: Source,
    bits: Bits = DEFAULT.bits,
    name: Name = None,
    version: Version = None,
    config: ConfigFile = None,
    set_: Set = [],  # noqa: B006 - typer reads the default, nothing mutates it
    calib: Calib = None,
    nsamples: Nsamples = None,
    seqlen: Seqlen = DEFAULT.seqlen,
    seed: Seed = DEFAULT.seed,
    device: Device = DEFAULT.device,
    hessians: Hessians = None,
    runner: Runner = DEFAULT.runner,
    workers: Workers = None,
    finetune_steps: FinetuneSteps = None,
    eval_text: EvalText = None,
    eval_windows: EvalWindows = DEFAULT.eval_windows,
    eval_seqlen: EvalSeqlen = DEFAULT.eval_seqlen,
    max_ppl_ratio: MaxPplRatio = None,
    targets: Targets = None,
    layer: Layers = None,
) -> JobSpec:
    """The request's options, declared once: `request_command` gives them to `compress` and `submit`."""
    from vptq_service.flows.request import build_spec

    # an empty --name is refused by build_spec, not replaced by the default
    return build_spec(source, name if name is not None else default_name(source, bits), bits, version, str(calib) if calib else None,
                      nsamples, seqlen, seed, hessians.value if hessians else None,
                      overrides_from(config, set_, finetune_steps, targets, layer), device, str(eval_text) if eval_text else None,
                      eval_windows, eval_seqlen, max_ppl_ratio, runner, workers)


REQUEST = inspect.signature(_request, eval_str=True).parameters


def request_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A command that takes the request's options (one declaration, `_request`) besides its own.

    The command is written as `fn(request, *own options*)`; Typer sees the request's options first,
    then fn's own, and fn gets `request`: a zero-argument function returning the validated JobSpec
    (called inside the command's error handler, so bad input still gives one line)."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "request"]

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        given = {n: kwargs.pop(n) for n in REQUEST}
        return fn(request=lambda: _request(**given), **kwargs)

    params = [*REQUEST.values(), *own]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def overrides_from(config: Path | None, items: list[str], finetune_steps: int | None = None,
                   targets: list[str] | None = None, layers: list[str] | None = None) -> dict[str, Any]:
    """QuantConfig overrides: the --config file's fields, --set FIELD=VALUE over them, then
    --finetune-steps (the end-to-end stage's e2e_steps), --targets (globs, vptq/targets.py) and the
    --layer rules (after the file's `layers`, so they win where both match)."""
    from vptq.config import ConfigError

    over = _config_file(config) if config is not None else {}
    over.update(_overrides(items))
    if finetune_steps is not None:
        if finetune_steps < 0:
            raise ConfigError(f"--finetune-steps {finetune_steps}: use 0 (off) or a positive number of steps")
        over["e2e_steps"] = finetune_steps
    if targets:
        over["targets"] = list(targets)
    if layers:
        over["layers"] = [*_rules(over.get("layers", {})), *(_layer_rule(item) for item in layers)]
    return over


def _rules(layers: dict | list) -> list:
    return list(layers.items()) if isinstance(layers, dict) else list(layers)


def _layer_rule(item: str) -> tuple[str, dict[str, Any]]:
    """One --layer GLOB:FIELD=VALUE[,FIELD=VALUE] as (glob, fields), values typed like --set's."""
    from vptq.config import LAYER_FIELDS, ConfigError

    glob, sep, assigns = item.rpartition(":")
    if not sep or not glob.strip() or not assigns.strip():
        raise ConfigError(f"--layer {item!r}: expected GLOB:FIELD=VALUE[,FIELD=VALUE], e.g. "
                          f"'*.k_proj:num_res_centroids=32'")
    fields = {}
    for a in assigns.split(","):
        if a.partition("=")[0].strip() not in LAYER_FIELDS:
            raise ConfigError(f"--layer {item!r}: {a.partition('=')[0]!r} cannot be set per layer; use one of "
                              f"{list(LAYER_FIELDS)}")
        fields.update(_overrides([a.strip()], flag="--layer"))
    return glob, fields


def _settable() -> set[str]:
    """QuantConfig fields a --config file or --set may give: not the request's own (seed, Hessian
    mode: their own options) nor `targets` and `layers` (not scalars: --targets, --layer, and a
    --config file's `layers` table)."""
    from vptq.config import REQUEST_FIELDS, QuantConfig

    return set(QuantConfig.__dataclass_fields__) - set(REQUEST_FIELDS) - {"targets", "layers"}


def _config_file(path: Path) -> dict[str, Any]:
    """A flat TOML or JSON mapping of QuantConfig fields; unknown keys and wrong types refused."""
    import tomllib

    from vptq.config import ConfigError, field_value

    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text(errors="replace")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise ConfigError(f"--config {path}: not valid {kind} ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of QuantConfig fields")
    fields = _settable() | {"layers"}  # {glob: {field: value}}, checked by QuantConfig
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    for key, val in data.items():
        if key == "layers":
            if not isinstance(val, dict):
                raise ConfigError(f"--config {path}: layers must be a table of {{glob: {{field: value}}}}")
            continue
        try:
            data[key] = field_value(key, val)
        except ConfigError as e:
            raise ConfigError(f"--config {path}: {e}") from None
    return dict(data)


def _overrides(items: list[str], flag: str = "--set") -> dict[str, Any]:
    from vptq.config import ConfigError, QuantConfig

    fields = _settable()
    out: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"{flag} {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        typ = type(getattr(QuantConfig(), key))
        try:
            if typ is bool:
                if val.lower() not in ("true", "false", "1", "0", "on", "off"):
                    raise ValueError(val)
                out[key] = val.lower() in ("true", "1", "on")
            else:
                out[key] = typ(val)
        except ValueError:
            raise ConfigError(f"{flag} {item!r}: {val!r} is not a valid {typ.__name__}") from None
    return out
