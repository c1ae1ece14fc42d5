"""An opt-in disk cache of GGUF sources as Hugging Face folders: `VPTQ_GGUF_CACHE=DIR`.

transformers reads a GGUF file's metadata three times (config, tokenizer, weights) in pure Python;
SmolLM2's 49k-token vocabulary makes that most of a load's time (seconds per read on one core).
The cached folder (the dequantized weights as fp32 safetensors, so exactly the values a load from
the file gives; config; the tokenizer with the file's chat template) is read with no parse. It is
opt-in because it costs 4 bytes a parameter of disk (540 MB for SmolLM2-135M). An entry is keyed by
the file's resolved path, size and modification time (a replaced file gets a new entry) and the
transformers version (whose conversion it holds) and is
written to a temporary folder renamed into place, so a crash or a second process writing the same
entry never leaves a half-written one. A cache that cannot be written is skipped with a warning: it
never fails a load.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

ENV = "VPTQ_GGUF_CACHE"
_FORMAT = "1"  # bump when what an entry holds changes
_DONE = "vptq-gguf-cache.done"  # written last: an entry without it is ignored


def _entry(gguf: Path) -> Path | None:
    root = os.environ.get(ENV, "").strip()
    if not root:
        return None
    import transformers  # its GGUF conversion (name maps, dequantization) is what an entry froze

    st = gguf.stat()
    key = f"{_FORMAT}|{transformers.__version__}|{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    key = hashlib.sha256(key.encode()).hexdigest()[:32]
    return Path(root).expanduser() / f"{gguf.stem}-{key}"


def lookup(gguf: Path) -> Path | None:
    """The cached folder of this GGUF file, or None (cache off, or no complete entry)."""
    entry = _entry(gguf)
    return entry if entry is not None and (entry / _DONE).is_file() else None


def store(gguf: Path, model, tokenizer) -> Path | None:
    """Write model (fp32, as loaded from gguf) and its tokenizer as gguf's entry; the entry, or None."""
    entry = _entry(gguf)
    if entry is None or (entry / _DONE).is_file():
        return entry
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
        # save_model, not save_pretrained: transformers refuses to save a model it loaded from a GGUF
        from safetensors.torch import save_model

        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(f"{gguf.resolve()}\n")
        try:
            os.rename(tmp, entry)
        except OSError:  # another process put the same entry in place first: keep theirs
            if not (entry / _DONE).is_file():
                raise
        return entry
    except (OSError, ValueError, RuntimeError) as e:
        warnings.warn(f"{ENV}: could not cache {gguf.name} in {entry.parent} ({e}); loading from the file each time",
                      stacklevel=2)
        return None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
