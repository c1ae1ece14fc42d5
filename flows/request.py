"""The job request, shared by the CLI (`vptq compress`, `vptq submit`) and the scheduler.

- `build_spec(...)`: the validated JobSpec of a request; every cheap check runs here, before a job
  row exists or a model is loaded, and the QuantConfig is resolved here, once (vptq.config.resolve).
- `open_job(spec)`: the job of the request, found by its key with a database query
  (Repository.find_job), else a new row that stores the spec, the key and the resolved config
  (`config["quant"]`, which the `compress` flow reads back).
- `export_artifact(ref, out)`: a published artifact pulled (verified) into a folder, swapped in at
  the end.
Errors are ConfigError/SourceError (bad input) or StoreError, for the caller to map.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vptq_service.flows.spec import JobSpec


def build_spec(source: str, name: str, bits: int, version: str | None = None, calib: str | None = None,
               nsamples: int | None = None, seqlen: int = 512, seed: int = 0, hessians: str | None = None,
               overrides: dict[str, Any] | None = None, device: str = "cpu", eval_text: str | None = None,
               eval_windows: int = 4, eval_seqlen: int = 512, max_ppl_ratio: float | None = None,
               runner: str = "local", workers: int | None = None) -> JobSpec:
    """The validated JobSpec of a request, its QuantConfig resolved (ConfigError/SourceError if not valid)."""
    from pydantic import ValidationError
    from vptq_service.tasks.runner import check_runner

    from vptq.config import ConfigError
    from vptq.pipeline import check_device, check_request, default_calibration_text, read_text

    check_source_url(source)  # first: no later message may echo a secret
    check_runner(runner, workers)
    try:
        spec = JobSpec(source=source, name=name, version=version, bits=bits, calib=calib, nsamples=nsamples,
                       seqlen=seqlen, seed=seed, hessians=hessians, overrides=overrides or {}, device=device,
                       eval_text=eval_text, eval_windows=eval_windows, eval_seqlen=eval_seqlen,
                       max_ppl_ratio=max_ppl_ratio, runner=runner, workers=workers).normalized()
    except ValidationError as e:
        err = e.errors()[0]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):  # raised by the one rule (vptq.config.resolve): its own message
            raise cause from None
        raise ConfigError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    check_name(name, version)
    if max_ppl_ratio is not None and not eval_windows:
        raise ConfigError("--max-ppl-ratio needs an evaluation: give --eval-windows 1 or more")
    spec.quant_config()  # resolved now, once: an invalid config is refused before a job exists
    check_device(device)
    calib_path = spec.calib or str(default_calibration_text())
    check_text_size(calib_path, "calibration", "--calib")
    eval_text = None
    if spec.eval_text:
        check_text_size(spec.eval_text, "evaluation text", "--eval-text")
        eval_text = read_text(spec.eval_text, "evaluation text", "--eval-text")
    remote = spec.source.startswith(("s3://", "hf://"))  # their model is checked by fetch_model
    if remote and spec.calib:
        read_text(spec.calib, "calibration", "--calib")
    if spec.source.startswith("hf://"):
        repo_id = spec.source.removeprefix("hf://").strip("/").partition("@")[0]
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ConfigError(f"model source {source!r}: expected hf://ORG/NAME[@REVISION]")
    if remote:
        # no tokenizer before the fetch: bound the tokens by the bytes (a token holds at least one
        # byte; twice that, plus special tokens, leaves slack for byte-fallback tokenizers)
        calib_bytes = Path(calib_path).stat().st_size
        check_windows(spec, 2 * calib_bytes + 16, 2 * len(eval_text.encode()) + 16 if eval_text else None, exact=False)
    else:
        src, ids = check_request(spec.source, spec.calib, spec.nsamples, seqlen)
        eval_tokens = None
        if eval_text and spec.eval_windows:
            from vptq.evaluate import tokenize_text
            from vptq.pipeline import checked_load
            from vptq.source import load_tokenizer

            eval_tokens = tokenize_text(checked_load(load_tokenizer, src, "tokenizer"), eval_text).numel()
        check_windows(spec, ids.numel(), eval_tokens, exact=True)
        check_architecture(src, spec)
    return spec


def check_architecture(src, spec: JobSpec) -> None:
    """A local model whose architecture cannot be quantized whole (no decoder blocks, block weights
    outside nn.Linear, a --targets pattern matching nothing, a layout that does not fit) is refused
    from its config, on the meta device, before a job row exists (remote ones: by the flow's
    inspect_model after the fetch). Only model folders: their config.json reads in milliseconds, while
    a GGUF file's config is parsed from the whole file (13-30 s), so a GGUF source (an architecture
    transformers can read from GGUF) is checked by inspect_model too; an already-quantized folder is
    refused by fetch_model, with its own message."""
    from vptq.pipeline import checked_load
    from vptq.source import load_skeleton
    from vptq.targets import check_layouts

    if src.kind == "hf":
        check_layouts(checked_load(load_skeleton, src, "model config"), spec.quant_config())


def check_name(name: str, version: str | None) -> None:
    """--name NAME (no ':', not empty) and --version VERSION as the registry will take them: a bad one
    used to pass here and fail at publish, after the whole quantization."""
    from vptq_service.store.errors import StoreError
    from vptq_service.store.registry import parse_ref

    from vptq.config import ConfigError

    if ":" in name:
        n, _, v = name.partition(":")
        raise ConfigError(f"--name {name!r}: a name cannot hold ':'; give the version apart: --name {n} --version {v}")
    try:
        if parse_ref(name) != (name, None):
            raise StoreError("leading or trailing spaces")
        if version is not None and parse_ref(f"{name}:{version}") != (name, version):
            raise StoreError("leading or trailing spaces")
    except StoreError as e:
        raise ConfigError(f"--name {name!r} / --version {version!r}: {e}") from None


# calibration and evaluation texts are read whole and tokenized at once (wikitext-2 is 1.2 MiB):
# a bigger file is refused up front instead of failing with a MemoryError mid-job
MAX_TEXT_BYTES = 256 * 2**20


def check_text_size(path: str, what: str, option: str) -> None:
    """Refuse a text file too big to read and tokenize whole (one line, before any job row)."""
    from vptq.config import ConfigError

    try:
        size = Path(path).stat().st_size
    except OSError:
        return  # missing or unreadable: read_text says which
    if size > MAX_TEXT_BYTES:
        raise ConfigError(f"{what} file {path!r} is {size / 2**20:.0f} MiB, more than the {MAX_TEXT_BYTES >> 20} MiB "
                          f"read whole: give {option} an excerpt (windows are drawn from the whole text)")


def check_windows(spec: JobSpec, calib_tokens: int, eval_tokens: int | None, exact: bool) -> None:
    """Enough text for the windows asked for: --nsamples distinct calibration windows of --seqlen
    tokens and --eval-windows non-overlapping windows of --eval-seqlen, else one line now instead of
    a failure after the quantization. `exact` False: the counts are upper bounds (no tokenizer yet)."""
    from vptq.config import ConfigError

    about = "" if exact else "at most "
    starts = calib_tokens - spec.seqlen  # distinct window starts (vptq.evaluate.calibration_windows)
    if spec.nsamples > max(starts, 0):
        raise ConfigError(f"--nsamples {spec.nsamples}: the calibration text has {about}{calib_tokens} tokens, room "
                          f"for {max(starts, 0)} distinct windows of {spec.seqlen}: give a longer --calib text, "
                          "fewer --nsamples or a shorter --seqlen")
    if spec.eval_windows:
        tokens = calib_tokens if eval_tokens is None else eval_tokens
        room = tokens // spec.eval_seqlen  # vptq.evaluate.perplexity
        if spec.eval_windows > room:
            text = "--eval-text" if spec.eval_text else "evaluation text (the calibration text)"
            raise ConfigError(f"--eval-windows {spec.eval_windows}: the {text} has {about}{tokens} tokens, room for "
                              f"{room} windows of {spec.eval_seqlen}: give fewer --eval-windows or a shorter "
                              "--eval-seqlen")


def check_source_url(source: str) -> None:
    """Refuse credentials in a model source URL (s3://KEY:SECRET@bucket, https://user:token@host,
    ?X-Amz-Signature=...): the source is stored with the job and shown by `vptq jobs`, so a secret
    there would be kept for good. ConfigError (exit 2) naming the environment variables instead."""
    from urllib.parse import urlsplit

    from vptq_service.store.errors import mask_text

    from vptq.config import ConfigError

    if "://" not in source:
        return
    try:
        parts = urlsplit(source)
    except ValueError:
        raise ConfigError(f"model source {mask_text(source)!r} is not a URL: expected s3://BUCKET/PREFIX or "
                          "hf://ORG/NAME[@REVISION]") from None
    if "@" in parts.netloc or mask_text(source) != source:
        raise ConfigError(f"model source {mask_text(source)!r} carries credentials: remove them from the URL and set "
                          "them in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE for s3://, "
                          "HF_TOKEN for hf://); a source URL is stored with the job")
    if parts.scheme == "s3" and (parts.query or parts.fragment):
        raise ConfigError(f"model source {source!r}: no ?query or #fragment in an s3:// source; expected "
                          "s3://BUCKET/PREFIX")


def job_config(spec: JobSpec, key: str, **extra: Any) -> dict[str, Any]:
    """What a new job row stores: the spec, its key and the resolved QuantConfig (read by the flow)."""
    return {"spec": spec.model_dump(), "job_key": key, "quant": spec.quant_config().to_dict(), **extra}


def open_job(spec: JobSpec, refuse_existing_version: bool = True):
    """The job of this request: the unfinished (or finished) one with the same key, else a new row."""
    from vptq_service.store.repository import Repository
    from vptq_service.tasks.workspace import code_version

    from vptq.config import ConfigError

    key = spec.key()
    with Repository.session_scope() as repo:
        job = repo.find_job(key)
        if job is None:
            if refuse_existing_version and spec.version and repo.get_artifact(spec.name, spec.version):
                raise ConfigError(f"{spec.name}:{spec.version} already exists in the registry: choose another "
                                  "--version, or leave it out to publish the next free one")
            job = repo.create_job(spec.source, job_config(spec, key), code_version=code_version(), job_key=key)
        elif job.config["spec"].get("runner", "local") != spec.runner or job.config["spec"].get("workers") != spec.workers:
            # same job (the runner is not part of its identity): resume it on the runner asked for now
            job = repo.update_job(job.id, config_updates={"spec": spec.model_dump()})
    return job


def export_artifact(ref: str, out: Path, overwrite: bool = False) -> Path:
    """Pull ref (verified) into out; an existing checkpoint at out is swapped out only at the end."""
    import shutil
    import tempfile

    from vptq_service.store.registry import Registry

    from vptq.io import check_out

    out = check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    old = None
    try:
        Registry.open().pull(ref, stage / "ckpt")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old)
        os.replace(stage / "ckpt", out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)
    return out
