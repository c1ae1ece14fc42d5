"""Model references for the CLI: a local SOURCE, or a registry artifact NAME[:VERSION].

`local_model(ref)` returns a path (or 'smollm2') that vptq.source.resolve understands; an
artifact is pulled (every sha256 verified) into VPTQ_HOME/cache/artifacts/NAME/VERSION once and
reused afterwards. Shared by `vptq generate`, `vptq chat` and (later) `vptq eval`.
"""

from __future__ import annotations

from pathlib import Path


def cache_dir() -> Path:
    from vptq_service.store.db import vptq_home

    return vptq_home() / "cache" / "artifacts"


def local_model(ref: str) -> str:
    """An existing file/folder or 'smollm2' as is; else NAME[:VERSION] pulled from the registry.

    SourceError (usage) when ref is neither; StoreError when the registry cannot supply it.
    """
    from vptq.source import SourceError

    if ref.strip().lower() == "smollm2" or Path(ref).expanduser().exists():
        return ref
    from vptq_service.store.errors import StoreError
    from vptq_service.store.registry import parse_ref

    try:
        parse_ref(ref)
    except StoreError:
        raise SourceError(f"model {ref!r} does not exist: give a model folder, a .gguf file, 'smollm2', "
                          "or a published artifact NAME[:VERSION]") from None
    if "/" in ref or ref.endswith(".gguf"):  # looks like a path that is not there
        raise SourceError(f"model source {ref!r} does not exist")
    from vptq_service.store.registry import Registry

    registry = Registry.open()
    m = registry.resolve(ref)  # newest accepted version when none is given
    dest = cache_dir() / m.name / m.version
    registry.pull(f"{m.name}:{m.version}", dest)  # a verified earlier pull is reused as is
    return str(dest)
