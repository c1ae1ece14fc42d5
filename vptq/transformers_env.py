"""The transformers this project runs on: its version floor and the environment every load sets first."""

from __future__ import annotations

import os

from .errors import DependencyError

# pyproject's floor (tests/test_gguf_cache.py keeps the two equal): 5.17 built a different Gemma-3 tokenizer from
# its GGUF (bench/results/gpu_20261206_h200/gemma_tokenizer_5.17_vs_5.25.txt) and lacks the `cache` output
# serve/engine.py reads; an environment that has an older one anyway (a GPU image, a manual downgrade) is refused
TRANSFORMERS_MIN = (5, 24)


def check_transformers() -> None:
    import re

    import transformers

    version = transformers.__version__
    if tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < TRANSFORMERS_MIN:
        floor = ".".join(map(str, TRANSFORMERS_MIN))
        raise DependencyError(f"transformers {version} is installed; vptq-service needs transformers>={floor},<6 "
                              f"(older ones read some GGUF tokenizers differently): pip install "
                              f"'transformers>={floor},<6'")


def prepare_transformers() -> None:
    """What every load does first: the version floor, then no hub kernels. With the `kernels` package installed
    (transformers' dependency), transformers on CUDA downloads some layers' code from the hub at the first forward
    (Gemma-3's rotary embedding): a run would fetch and execute remote code, and offline it died at the trust
    check (bench/results/gpu_20261206b_h100/gemma_failed_hub_kernels). An explicit USE_HUB_KERNELS is kept."""
    check_transformers()
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
