"""VPTQ: vector post-training quantization of LLMs (pure torch; no Prefect or database here).

Public entry points, imported lazily so that `import vptq` stays cheap (torch and transformers
load on first use):

* `vptq.VQuantLinear`: the quantized linear, with the published constructor (what
  transformers' VPTQ integration calls as `from vptq import VQuantLinear`).
* `vptq.from_pretrained(path, device="cpu")`: load a quantized folder (config.json with a
  `quant_method: "vptq"` quantization_config + safetensors), checked before use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["VQuantLinear", "from_pretrained", "patch_transformers"]

if TYPE_CHECKING:  # pragma: no cover
    from .hf_compat import patch_transformers
    from .layers import VQuantLinear


def from_pretrained(path, device: Any = "cpu"):
    """A quantized model (transformers PreTrainedModel, eval mode) on `device`."""
    from .io import load_quantized

    return load_quantized(path, device)


def __getattr__(name: str):
    if name == "VQuantLinear":
        from .layers import VQuantLinear

        return VQuantLinear
    if name == "patch_transformers":
        from .hf_compat import patch_transformers

        return patch_transformers
    raise AttributeError(f"module 'vptq' has no attribute {name!r}")
