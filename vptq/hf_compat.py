"""A narrow fix for transformers' VPTQ integration (docs/transformers-vptq.md).

transformers 5.17-5.24 `replace_with_vptq_linear` loops over `model.named_modules()` and calls
`model._modules[module_name].requires_grad_(False)`; `_modules` holds only the direct children,
so the first nested linear raises `KeyError: 'model.layers.0.self_attn.q_proj'`. Its
shared_layer_config lookup also takes the second name component (`rsplit(".")[1]`) instead of
the last one. `patch_transformers()` replaces that one function with a corrected copy (same
keywords to `vptq.VQuantLinear`, same meta-device construction), so
`AutoModelForCausalLM.from_pretrained(artifact_dir)` builds the model. transformers also
refuses to load VPTQ without CUDA (`validate_environment`); our VQuantLinear runs on CPU, and
`allow_cpu=True` lifts that check as well. Nothing else in transformers is touched, and the
patch is idempotent.
"""

from __future__ import annotations

_PATCHED_MARK = "_vptq_service_patched"
ORIGINAL: dict = {}  # transformers' own functions, kept when patched (the bug's reproduction uses it)


def replace_with_vptq_linear(model, modules_to_not_convert: list[str] | None = None, quantization_config=None):
    """transformers' replace_with_vptq_linear with nested names handled (set_submodule)."""
    import torch
    from torch import nn
    from transformers.quantizers.quantizers_utils import should_convert_module

    from .layers import VQuantLinear
    from .targets import rewrite_for_checkpoint

    shared = quantization_config.shared_layer_config or {}
    layers = quantization_config.config_for_layers or {}
    rewrite_for_checkpoint(model, layers)  # the blocks the driver rewrote (experts, Conv1D): vptq.as_linear
    replaced = False
    for name, module in list(model.named_modules()):  # a list: the loop replaces modules
        if not isinstance(module, nn.Linear) or not should_convert_module(name, modules_to_not_convert):
            continue
        params = layers.get(name) or shared.get(name.rsplit(".", 1)[-1])
        if params is None:  # not quantized in this checkpoint: keep the nn.Linear
            continue
        with torch.device("meta"):
            new = VQuantLinear(
                module.in_features, module.out_features,
                vector_lens=params["vector_lens"], num_centroids=params["num_centroids"],
                num_res_centroids=params["num_res_centroids"], group_num=params["group_num"],
                group_size=params["group_size"], outlier_size=params["outlier_size"],
                indices_as_float=params.get("indices_as_float", False),
                enable_norm=params.get("enable_norm", False), enable_perm=params.get("enable_perm", False),
                is_indice_packed=True, enable_proxy_error=False, bias=module.bias is not None,
            )
        new.requires_grad_(False)
        model.set_submodule(name, new)
        replaced = True
    if not replaced:
        from transformers.utils import logging

        logging.get_logger(__name__).warning("vptq: no linear of the model is named in the quantization_config")
    _init_around_quantized(model)
    return model


def _init_around_quantized(model) -> None:
    """transformers initialises every module the checkpoint did not mark as loaded; some models' own
    `_init_weights` reach into a child linear's `.weight` from its parent (GPT-BigCode's MLP rescales
    `c_proj.weight`), which a VQuantLinear does not have: its tensors come from the checkpoint, so that
    step is skipped for parents of quantized linears only (any other AttributeError still raises)."""
    from transformers import PreTrainedModel

    from .layers import VQuantLinear

    for m in model.modules():
        if not isinstance(m, PreTrainedModel) or getattr(m._init_weights, _PATCHED_MARK, False):
            continue
        own = m._init_weights

        def init(module, own=own):
            try:
                own(module)
            except AttributeError:
                if not any(isinstance(c, VQuantLinear) for c in module.children()):
                    raise

        setattr(init, _PATCHED_MARK, True)
        m._init_weights = init


def patch_transformers(allow_cpu: bool = False) -> None:
    """Make transformers' VPTQ loading use the corrected replace_with_vptq_linear.

    Call before `AutoModelForCausalLM.from_pretrained(artifact_dir)`. `allow_cpu=True` also lets
    the VPTQ quantizer load without CUDA (transformers insists on a GPU; our layer does not).
    """
    import transformers.integrations as integrations
    import transformers.integrations.vptq as upstream
    from transformers.quantizers import quantizer_vptq

    ORIGINAL.setdefault("replace_with_vptq_linear", upstream.replace_with_vptq_linear)
    integrations.replace_with_vptq_linear = replace_with_vptq_linear  # what the quantizer imports at call time
    upstream.replace_with_vptq_linear = replace_with_vptq_linear
    quantizer = quantizer_vptq.VptqHfQuantizer
    if allow_cpu and not getattr(quantizer.validate_environment, _PATCHED_MARK, False):
        original = quantizer.validate_environment

        def validate_environment(self, *args, **kwargs):
            import torch

            if torch.cuda.is_available():
                return original(self, *args, **kwargs)
            from transformers.utils import is_accelerate_available, is_vptq_available

            if not is_accelerate_available():
                raise ImportError("Using `vptq` quantization requires Accelerate: `pip install accelerate`")
            if not is_vptq_available():
                raise ImportError("Using `vptq` quantization requires VPTQ>=0.0.4")

        setattr(validate_environment, _PATCHED_MARK, True)
        quantizer.validate_environment = validate_environment
