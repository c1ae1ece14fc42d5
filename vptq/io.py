"""Save/load quantized models in the published VPTQ checkpoint format (vptq-method.md 3).

config.json = the model config + `quantization_config` (quant_method "vptq",
config_for_layers with exactly the key set both VPTQ loaders accept); weights in
model.safetensors (or shards model-0000i-of-0000n.safetensors + model.safetensors.index.json
above `max_shard_bytes`); tokenizer files and generation_config.json; our own run report in
vptq_report.json. `load_quantized` checks the folder against its quantization_config (key set,
shapes and dtypes from the safetensors headers, index ranges) before any weight is used and
raises CheckpointError naming the layer. Writing goes to a temporary
folder that is renamed into place at the end, so a crash leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ConfigError
from .errors import SourceError
from .layers import VQuantLinear, share_inputs
from .targets import rewrite_for_checkpoint
from .transformers_env import prepare_transformers

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
REPORT = "vptq_report.json"
MAX_SHARD_BYTES = 4 * 1024**3
# the constructor keywords a config_for_layers entry may carry (the published class's signature)
LAYER_KEYS = ("in_features", "out_features", "vector_lens", "num_centroids", "num_res_centroids", "group_num",
              "group_size", "outlier_size", "indices_as_float", "enable_norm", "enable_perm", "is_indice_packed",
              "bias", "vector_quant_dim")
REQUIRED_KEYS = ("vector_lens", "num_centroids", "num_res_centroids", "group_num", "group_size", "outlier_size")


class CheckpointError(SourceError):
    """A quantized folder that cannot be loaded: missing/foreign quantization_config, or tensors
    that disagree with it. The message names the file or layer."""


def quantization_config(model: nn.Module) -> dict:
    layers = {n: m.layer_config() for n, m in model.named_modules() if isinstance(m, VQuantLinear)}
    return {
        "quant_method": "vptq",
        "config_for_layers": layers,
        "shared_layer_config": {},
        "modules_to_not_convert": None,
    }


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to write, each stored once: a tied copy (lm_head.weight of a tied model, BioGPT's
    output_projection, RoBERTa's decoder bias) is dropped, as transformers' save_pretrained drops it, and
    tied again on load (safetensors refuses two names for one storage)."""
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied to embed_tokens: stored once
    targets = tied_keys(model)  # the names the loader ties again: of two sharing one storage, these go
    kept: dict[tuple, str] = {}  # a storage (and view) -> the name kept for it
    for k in list(sd):
        v = sd[k]
        if v.device.type == "meta" or v.numel() == 0:
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        other = kept.setdefault(key, k)
        if other == k:
            continue
        if other in targets and k not in targets:  # keep the tie's source
            sd.pop(other)
            kept[key] = k
        else:
            sd.pop(k)
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def _is_checkpoint(folder: Path) -> bool:
    """An earlier output of ours (config.json with a VPTQ quantization_config), or an empty folder."""
    if not any(folder.iterdir()):
        return True
    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return qc.get("quant_method") == "vptq"


def check_out(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse an --out that cannot be written or would clobber something; cheap, run it first.

    --overwrite replaces only an earlier VPTQ checkpoint (or an empty folder): never a file,
    nor a folder of something else (say `--out .`).
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"--out {out} already exists: choose another --out or pass --overwrite")
        if out.is_symlink() or not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a folder: choose another --out")
        if not _is_checkpoint(out):
            raise ConfigError(f"--out {out} is not a VPTQ checkpoint folder, so --overwrite will not "
                                  f"replace it: choose another --out")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is not a folder: choose another --out")
    try:  # a real probe: os.access says yes to root even on read-only mounts
        shutil.rmtree(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError:
        raise ConfigError(f"--out {out}: cannot create a folder in {parent}: choose another --out") from None
    return out


def _plain_modes(folder: Path) -> None:
    """mkdtemp makes a 0700 folder: give it (and its files) the modes of an ordinary mkdir/open."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


def write_weights(sd: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """model.safetensors, or HF-style shards + index when the tensors exceed max_shard_bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
        total += n
    if len(shards) == 1:
        save_file(shards[0], folder / WEIGHTS, metadata={"format": "pt"})
        return [WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (folder / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                    "weight_map": weight_map}, indent=2))
    return names


def save_quantized(model: nn.Module, out: str | Path, tokenizer=None, report: dict | None = None,
                   overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write the checkpoint to a temporary sibling folder, then rename it to `out`.

    A crash or Ctrl-C leaves nothing at `out` (the temporary folder is removed; only a hard kill
    can leave a hidden `.NAME.tmp-*` sibling behind). With `overwrite`, an existing `out` is
    swapped out only once the new checkpoint is complete, and deleted after the swap.
    """
    out = check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old: Path | None = None
    try:
        cfg = model.config.to_dict()
        cfg["quantization_config"] = quantization_config(model)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        write_weights(_state_dict(model), tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT).write_text(json.dumps(report, indent=2, default=str))
        _plain_modes(tmp)
        if out.exists():  # the new checkpoint is complete: now swap the old one out
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        try:
            if old is not None:
                os.replace(out, old)  # a rename onto the fresh empty folder
            os.replace(tmp, out)
        except BaseException:
            if old is not None and not out.exists() and any(old.iterdir()):
                os.replace(old, out)  # put the previous checkpoint back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def layer_kwargs(name: str, entry: dict, module: nn.Module | None = None) -> dict:
    """VQuantLinear keywords of one config entry; in/out features (and bias) default to the
    replaced nn.Linear's, as transformers' integration takes them."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"layer {name}: its quantization_config entry is not an object")
    missing = [k for k in REQUIRED_KEYS if k not in entry]
    kw = {k: entry[k] for k in LAYER_KEYS if k in entry}
    if isinstance(module, nn.Linear):
        for key, val in (("in_features", module.in_features), ("out_features", module.out_features)):
            if kw.setdefault(key, val) != val:
                raise CheckpointError(f"layer {name}: quantization_config says {key}={kw[key]}, the model's "
                                      f"linear has {val}")
        kw.setdefault("bias", module.bias is not None)
    missing += [k for k in ("in_features", "out_features") if k not in kw]
    if missing:
        raise CheckpointError(f"layer {name}: its quantization_config entry lacks {', '.join(missing)}")
    kw.setdefault("indices_as_float", False)
    return kw


def replace_linears(model: nn.Module, config_for_layers: dict[str, dict], dtype=torch.float16,
                    shared_layer_config: dict[str, dict] | None = None,
                    modules_to_not_convert: list[str] | None = None) -> dict[str, VQuantLinear]:
    """Swap each named linear for an (empty) VQuantLinear built from its config entry.

    What transformers' replace_with_vptq_linear means to do: the full module name in
    config_for_layers, else its last component in shared_layer_config (lm_head and
    modules_to_not_convert excepted). Returns {name: new module}.
    """
    rewrite_for_checkpoint(model, config_for_layers)
    modules = dict(model.named_modules())
    plan: dict[str, dict] = {}
    for name, entry in config_for_layers.items():
        if not isinstance(modules.get(name), (nn.Linear, VQuantLinear)):
            raise CheckpointError(f"layer {name}: named in config_for_layers, but the model has no linear "
                                  "of that name")
        plan[name] = entry
    if shared_layer_config:
        skip = modules_to_not_convert or ["lm_head"]
        for name, mod in modules.items():
            last = name.rsplit(".", 1)[-1]
            if (isinstance(mod, nn.Linear) and name not in plan and last in shared_layer_config
                    and not any(s == name or s in name.split(".") for s in skip)):
                plan[name] = shared_layer_config[last]
    out = {}
    for name, entry in plan.items():
        kw = layer_kwargs(name, entry, modules[name])
        try:
            mod = VQuantLinear(**kw, dtype=dtype)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"layer {name}: {str(e).removeprefix('VQuantLinear: ')}") from None
        if mod.has_res and mod.num_res_centroids[1] > mod.num_centroids[1]:
            raise CheckpointError(f"layer {name}: num_res_centroids {mod.num_res_centroids[1]} > num_centroids "
                                  f"{mod.num_centroids[1]}: the published unpacker would misread these indices")
        model.set_submodule(name, mod)
        out[name] = mod
    return out


# ---------------------------------------------------------------------------------- loading
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_quantization_config(folder: str | Path) -> tuple[dict, dict]:
    """(model config without quantization_config, quantization_config); CheckpointError when the
    folder is not a VPTQ checkpoint."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json, not a model folder")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    qc = raw.pop("quantization_config", None)
    if not qc:
        raise CheckpointError(f"{folder}: config.json has no quantization_config, so this is not a VPTQ "
                              "checkpoint (an original model loads as it is)")
    if not isinstance(qc, dict) or qc.get("quant_method") != "vptq":
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        raise CheckpointError(f"{folder}: quantization_config.quant_method is {method!r}, not 'vptq': "
                              "not a VPTQ checkpoint")
    layers, shared = qc.get("config_for_layers") or {}, qc.get("shared_layer_config") or {}
    if not isinstance(layers, dict) or not isinstance(shared, dict):
        raise CheckpointError(f"{folder}: quantization_config.config_for_layers and shared_layer_config "
                              "must be objects")
    if not layers and not shared:
        raise CheckpointError(f"{folder}: quantization_config names no quantized layer "
                              "(config_for_layers and shared_layer_config are empty)")
    if qc.get("enable_proxy_error"):
        raise CheckpointError(f"{folder}: quantization_config.enable_proxy_error is true; loaders need false")
    return raw, qc


def weight_files(folder: Path) -> list[Path]:
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map)") from None
    elif (folder / WEIGHTS).is_file():
        names = [WEIGHTS]
    else:
        raise CheckpointError(f"{folder}: no {WEIGHTS} (nor {WEIGHTS_INDEX})")
    files = [folder / n for n in names]
    for f in files:
        if "/" in str(Path(f).relative_to(folder)) or not f.is_file():
            raise CheckpointError(f"{folder}: weight file {f.name} is missing")
    return files


def tensor_headers(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype | None, Path]]:
    """{key: (shape, dtype, file)} from the safetensors headers; no tensor data is read."""
    out = {}
    for f in weight_files(folder):
        try:
            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype()), f)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return out


def _owner(key: str, layers: dict) -> str:
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in layers:
            return ".".join(parts[:i])
    return ""


def tied_keys(model: nn.Module) -> set[str]:
    """The state-dict keys the model ties to another tensor on load (lm_head.weight of a model with tied
    embeddings, BioGPT's output_projection.weight, RoBERTa's decoder bias): a checkpoint may omit them."""
    keys = set(getattr(model, "all_tied_weights_keys", None) or ())
    if getattr(model.config, "tie_word_embeddings", False):
        keys.add("lm_head.weight")
    return keys


def check_tensors(model: nn.Module, layers: dict[str, VQuantLinear], headers: dict, tied: set[str]) -> None:
    """Every state-dict key of the built model is in the files with the right shape (and, for
    index tensors, the right dtype), and nothing else is: else CheckpointError naming the layer.
    `tied`: keys the model ties on load (tied_keys), which the files need not hold."""
    problems: list[tuple[str, str]] = []
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if k not in tied}
    for key, (shape, dtype) in expected.items():
        layer = _owner(key, layers)
        if key not in headers:
            problems.append((layer, f"tensor {key} is missing from the checkpoint"))
            continue
        got_shape, got_dtype, _ = headers[key]
        if got_shape != shape:
            problems.append((layer, f"tensor {key} has shape {list(got_shape)}, the quantization_config "
                                    f"implies {list(shape)}"))
        elif layer and not dtype.is_floating_point and got_dtype != dtype:
            problems.append((layer, f"tensor {key} is {got_dtype}, the format stores {dtype}"))
        elif dtype.is_floating_point and (got_dtype is None or not got_dtype.is_floating_point):
            problems.append((layer, f"tensor {key} is {got_dtype}, expected a floating-point tensor"))
    for key in headers:
        if key not in expected and key not in tied:
            problems.append((_owner(key, layers), f"unexpected tensor {key} (not in the model the "
                                                  "quantization_config describes)"))
    if problems:
        layer, what = problems[0]
        n = len(problems) - 1
        more = f" (and {n} more problem{'s' if n > 1 else ''})" if n else ""
        raise CheckpointError(f"layer {layer}: {what}{more}" if layer else f"{what}{more}")


def check_index_ranges(layers: dict[str, VQuantLinear], headers: dict) -> None:
    """Outlier indices inside their codebook, perm a permutation (the packed main/residual codes
    are log2(k) bits wide, so they cannot leave their power-of-two codebooks)."""
    from .packing import from_int16

    def read(key: str) -> torch.Tensor:
        with safe_open(headers[key][2], framework="pt") as h:
            t = h.get_tensor(key)
        return from_int16(t.view(torch.int16) if t.dtype == torch.float16 else t)

    for name, mod in layers.items():
        if mod.has_outliers:
            k0 = mod.num_centroids[0]
            top = int(read(f"{name}.outlier_indices").max())
            if top >= k0:
                raise CheckpointError(f"layer {name}: outlier_indices reach {top}, beyond the outlier codebook "
                                      f"of {k0} centroids")
        if mod.enable_perm:
            perm = read(f"{name}.perm")
            if not torch.equal(perm.sort().values, torch.arange(mod.in_features)):
                raise CheckpointError(f"layer {name}: perm is not a permutation of 0..{mod.in_features - 1}")


def load_quantized(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load one of our (or a published) VPTQ checkpoints on CPU or CUDA, checking it first.

    Builds the model the way transformers' VPTQ integration means to (a VQuantLinear for each
    layer of config_for_layers / shared_layer_config), checks the safetensors headers and index
    ranges against it, then loads with strict keys (a tied lm_head excepted).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    prepare_transformers()
    folder = Path(folder)
    raw, qc = read_quantization_config(folder)
    headers = tensor_headers(folder)
    try:
        config = AutoConfig.for_model(**raw)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}/config.json: not a transformers model config ({str(e).splitlines()[0]})") from None
    cb_dtype = next((h[1] for k, h in headers.items() if k.endswith("centroids.weight")), torch.float16)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    tied = tied_keys(model)
    layers = replace_linears(model, qc.get("config_for_layers") or {}, cb_dtype, qc.get("shared_layer_config"),
                             qc.get("modules_to_not_convert"))
    check_tensors(model, layers, headers, tied)
    check_index_ranges(layers, headers)
    for f in sorted({h[2] for h in headers.values()}):
        sd = {k: v for k, v in load_file(f).items() if k not in tied}
        model.load_state_dict(sd, strict=False)  # key sets were checked above, over all shards
    if tied:
        model.tie_weights()
    if (folder / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)
        except (OSError, ValueError):
            pass  # the model's default generation config stays
    model.eval()
    share_inputs(model)
    return model.to(device)
