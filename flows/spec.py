"""JobSpec: the validated request of one compression job (the edge's pydantic model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class JobSpec(BaseModel):
    """What `vptq submit` asks for; stored in the job row and converted once into a QuantConfig."""

    model_config = ConfigDict(extra="forbid")

    source: str  # model folder, .gguf file, `smollm2`, s3://bucket/prefix or hf://org/name
    name: str  # registry name of the result
    version: str | None = None  # default: the next vN of name
    bits: Literal[2, 3, 4] = 2
    calib: str | None = None  # calibration text (default: wikitext-2 valid)
    nsamples: int | None = Field(None, ge=1)  # default: the preset's (vptq.config.calib_windows)
    seqlen: int = Field(512, ge=16)
    seed: int = 0
    hessians: Literal["sequential", "original"] | None = None  # default: the preset's
    overrides: dict[str, Any] = Field(default_factory=dict)  # QuantConfig fields over the preset
    device: str = "cpu"
    eval_text: str | None = None  # held-out text (default: the calibration text)
    eval_windows: int = Field(4, ge=0)  # 0 = no evaluation
    eval_seqlen: int = Field(512, ge=2)
    max_ppl_ratio: float | None = Field(None, gt=0)  # gate: reject when after > ratio * before
    runner: Literal["local", "dask", "ray"] = "local"  # where a block's linears are quantized
    workers: int | None = Field(None, ge=1)  # runner worker processes (default: GPUs, else 2)

    @model_validator(mode="after")
    def _preset_defaults(self) -> JobSpec:
        """Fill what the request left to the preset, so a stored spec (and the job key) is explicit."""
        from vptq.config import calib_windows, preset

        p = preset(self.bits)
        if self.hessians is None:
            self.hessians = p.hessians
        if self.nsamples is None:
            steps = self.overrides.get("e2e_steps", p.e2e_steps)  # validated later by quant_config
            self.nsamples = calib_windows(steps if isinstance(steps, int) else 0)
        return self

    def normalized(self) -> JobSpec:
        """Local paths made absolute, so the same request from another folder is the same job."""
        def absolute(p: str | None) -> str | None:
            if p is None or p.lower() == "smollm2" or "://" in p:
                return p
            return str(Path(p).expanduser().absolute())

        return self.model_copy(update={"source": absolute(self.source), "calib": absolute(self.calib),
                                       "eval_text": absolute(self.eval_text)})

    def quant_config(self):
        """The preset of `bits` with seed, Hessian mode and overrides applied (ConfigError if invalid)."""
        from vptq.config import ConfigError, QuantConfig, preset

        fields = set(QuantConfig.__dataclass_fields__) - {"seed", "hessians"}
        unknown = set(self.overrides) - fields
        if unknown:
            raise ConfigError(f"unknown QuantConfig field(s) {sorted(unknown)}: use one of {sorted(fields)}")
        return preset(self.bits).with_(seed=self.seed, hessians=self.hessians, **self.overrides)

    def key(self) -> str:
        """Identity of the job: the same request resumes the same job. The runner is not part of it:
        every runner gives the same bytes, so a job may be resumed on another one."""
        from vptq_service.tasks.workspace import digest

        return digest("job", self.model_dump(exclude={"runner", "workers"}))[:24]
