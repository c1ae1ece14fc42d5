"""fetch_model: resolve a model source into a local path + sha256; inspect_model and check_blocks: fail fast on
bad input (a configuration that does not fit, an architecture whose blocks cannot be run one at a time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from vptq_service.tasks.workspace import digest, fp_block, load_fp_model, load_tensors, sha256_path, work_root


def no_retry_on_bad_input(task, task_run, state) -> bool:
    """Retry I/O errors only: a bad source or configuration fails at once."""
    from vptq.config import ConfigError
    from vptq.source import SourceError

    try:
        state.result()
    except (ConfigError, SourceError):
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return False


def source_keys(uri: str, keys: list[str]) -> list[str]:
    """The keys of an S3 model source that are files to fetch, every one checked before anything is
    written: folder markers (`prefix/` or `prefix/sub/`, the zero-byte objects S3 and MinIO consoles
    create for folders) are skipped; a key that would leave the destination folder (`..`, `.`,
    an empty part, an absolute path, a backslash) refuses the whole source (SourceError)."""
    from vptq.source import SourceError

    files = []
    for key in keys:
        if key == "" or key.endswith("/"):
            continue  # a folder marker, not a file
        parts = key.split("/")
        if key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
            raise SourceError(f"model source {uri!r} holds an unsafe key {key!r} (it would be written outside its "
                              "folder): remove or rename that object")
        files.append(key)
    return files


def _download_s3(uri: str) -> Path:
    """Copy every object under s3://bucket/prefix into VPTQ_HOME/work/models/<hash of uri>."""
    from vptq_service.store.artifacts import open_artifact_store

    from vptq.source import SourceError

    store = open_artifact_store(uri)
    keys = source_keys(uri, store.list_keys(""))  # all checked before the first folder is created
    if not keys:
        raise SourceError(f"model source {uri!r} holds no objects: give the prefix of a model folder")
    dest = work_root() / "models" / digest(uri)[:16]
    for key in keys:  # every run downloads afresh: the sha256 is taken of what was fetched
        (dest / key).parent.mkdir(parents=True, exist_ok=True)
        store.get_file(key, dest / key)
    return dest


def _download_hf(uri: str) -> Path:
    """hf://org/name[@revision] through huggingface_hub into VPTQ_HOME/work/models (weights + tokenizer)."""
    from vptq.source import SourceError

    repo_id, _, revision = uri.removeprefix("hf://").strip("/").partition("@")
    if repo_id.count("/") != 1:
        raise SourceError(f"model source {uri!r}: expected hf://ORG/NAME[@REVISION]")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    dest = work_root() / "models" / digest(uri)[:16]
    try:
        snapshot_download(repo_id, revision=revision or None, local_dir=dest,
                          allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
    except RepositoryNotFoundError:
        raise SourceError(f"model source {uri!r}: no such repository on the Hugging Face hub "
                          "(or it is private: set HF_TOKEN)") from None
    except (HfHubHTTPError, OSError) as e:  # offline, DNS, proxy: an I/O error, retried by the task
        raise OSError(f"cannot download {uri} from the Hugging Face hub ({type(e).__name__}); "
                      "check the network or set HF_ENDPOINT, or pass a local folder") from None
    return dest


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=no_retry_on_bad_input, cache_policy=NO_CACHE)
def fetch_model(source: str) -> dict[str, Any]:
    """Resolve SOURCE (folder, .gguf, `smollm2`, s3://, hf://) to a local path and its sha256."""
    from vptq.config import ConfigError
    from vptq.source import resolve

    if source.startswith("s3://"):
        local = str(_download_s3(source))
    elif source.startswith("hf://"):
        local = str(_download_hf(source))
    else:
        local = source
    src = resolve(local)
    if src.kind == "vptq":
        raise ConfigError(f"{source} is already VPTQ-quantized: compress the original model")
    return {"source": source, "path": src.uri, "kind": src.kind, "sha256": sha256_path(Path(src.uri))}


@task(cache_policy=NO_CACHE)
def inspect_model(path: str, config: dict[str, Any]) -> dict[str, Any]:
    """Load the model and check that the configuration fits every target linear."""
    from vptq.config import ConfigError, QuantConfig
    from vptq.targets import check_layouts, float_tensors

    cfg = QuantConfig.from_dict(config)
    model, _ = load_fp_model(path)
    try:  # no blocks, unsupported weights, a pattern matching nothing, a layout that does not fit
        linears = check_layouts(model, cfg)  # (a local source was checked from its config before the job row)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return {"blocks": len(linears), "architecture": type(model).__name__,
            "parameter_count": sum(p.numel() for p in model.parameters()),
            "linears": sum(len(lins) for lins in linears), "float": float_tensors(model, cfg)}


@task(cache_policy=NO_CACHE)
def check_blocks(path: str, calib_path: str, device: str = "cpu") -> None:
    """Block 0 run alone on the first calibration windows, as quantize_block will run it (a fresh copy read from
    the checkpoint): an architecture whose blocks cannot be run one at a time is refused (ConfigError) here,
    before the Hessian stage or any block (vptq.preflight)."""
    from vptq.preflight import check_blocks_run

    model, _ = load_fp_model(path)
    ids = load_tensors(Path(calib_path))["input_ids"]
    check_blocks_run(model, ids, device, block=lambda: fp_block(path, 0))
