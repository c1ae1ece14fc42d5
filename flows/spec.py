"""JobSpec: the validated request of one compression job (the edge's pydantic model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from vptq.config import HessianMode  # the one list of the modes (a cheap import: no torch)

# Bounds of a request, checked before a job row exists: the seed feeds torch.Generator (and a
# BIGINT column), window counts and lengths become tensors and INTEGER columns; a number past
# these is a typo, not a job (65536 windows of 512 tokens already hold 33 M calibration tokens).
MAX_SEED = 2**63 - 1
MAX_WINDOWS = 65536
MAX_SEQLEN = 1 << 20
MAX_WORKERS = 1024

class JobSpec(BaseModel):
    """What `vptq compress`/`vptq submit` ask for. Left-out defaults are filled by the one rule,
    vptq.config.resolve, so a stored spec (and the job key) is explicit; `quant_config()` is the
    resolved QuantConfig, computed once per spec and stored in the job row (flows/request.py)."""

    model_config = ConfigDict(extra="forbid")

    source: str  # model folder, .gguf file, `smollm2`, s3://bucket/prefix or hf://org/name
    name: str  # registry name of the result
    version: str | None = None  # default: the next vN of name
    bits: int = 2  # a preset of vptq.config.PRESETS (checked by resolve)
    calib: str | None = None  # calibration text (default: wikitext-2 valid)
    nsamples: int | None = Field(None, le=MAX_WINDOWS)  # default: by the resolved e2e_steps (vptq.config.resolve)
    seqlen: int = Field(512, ge=16, le=MAX_SEQLEN)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    hessians: HessianMode | None = None  # default: the preset's
    overrides: dict[str, Any] = Field(default_factory=dict)  # QuantConfig fields over the preset
    device: str = "cpu"
    eval_text: str | None = None  # held-out text (default: the calibration text)
    eval_windows: int = Field(4, ge=0, le=MAX_WINDOWS)  # 0 = no evaluation
    eval_seqlen: int = Field(512, ge=2, le=MAX_SEQLEN)
    max_ppl_ratio: float | None = Field(None, gt=0)  # gate: reject when after > ratio * before
    runner: Literal["local", "dask", "ray"] = "local"  # where a block's linears are quantized
    workers: int | None = Field(None, ge=1, le=MAX_WORKERS)  # runner worker processes (default: GPUs, else 2)

    _config: Any = PrivateAttr(default=None)  # the resolved QuantConfig, once computed

    @model_validator(mode="after")
    def _preset_defaults(self) -> JobSpec:
        """Fill what the request left out (a stored spec has nothing left out: nothing is resolved)."""
        if self.hessians is None or self.nsamples is None:
            self._resolve()
        return self

    def _resolve(self):
        from vptq.config import resolve

        cfg, nsamples = resolve(self.bits, self.overrides, seed=self.seed, hessians=self.hessians,
                                nsamples=self.nsamples)
        self.hessians, self.nsamples, self._config = cfg.hessians, nsamples, cfg
        return cfg

    def normalized(self) -> JobSpec:
        """Local paths made absolute, so the same request from another folder is the same job."""
        def absolute(p: str | None) -> str | None:
            if p is None or p.lower() == "smollm2" or "://" in p:
                return p
            return str(Path(p).expanduser().absolute())

        return self.model_copy(update={"source": absolute(self.source), "calib": absolute(self.calib),
                                       "eval_text": absolute(self.eval_text)})

    def quant_config(self):
        """The resolved QuantConfig (vptq.config.resolve; ConfigError if the request is invalid)."""
        return self._config if self._config is not None else self._resolve()

    def key(self) -> str:
        """Identity of the job: the same request resumes the same job. The runner is not part of it:
        every runner gives the same bytes, so a job may be resumed on another one."""
        from vptq_service.tasks.workspace import digest

        return digest("job", self.model_dump(exclude={"runner", "workers"}))[:24]
