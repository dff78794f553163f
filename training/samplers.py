"""Samplers of an exported pipeline, and the defaults its folder records for requests that name none.

- ``ddim``: DDIM with eta 0 (deterministic), the scheduler the export saves in ``scheduler/``.
- ``dpm++``: DPM-Solver++ 2M (multistep, second order), which usually matches DDIM's quality in about
  half the steps.

Both are built from the training noise schedule's config (betas, prediction type, zero terminal SNR),
so the model is sampled on the schedule it was trained on. A zero-terminal-SNR schedule is sampled
with trailing timestep spacing, so the first step is t = T-1, the pure noise the model learnt to start
from (Lin et al. 2023, section 3.3); any other with leading spacing and steps offset 1, as Stable
Diffusion is sampled.

``training/pyfunc_model.py`` carries its own copy of `build_scheduler`: MLflow copies that file into
the model, which cannot import this project. tests/training/test_samplers.py keeps the two equal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

SAMPLERS = ("ddim", "dpm++")
"""Sampler names accepted by `build_scheduler`, the pyfunc's `sampler` param and the CLI."""

DEFAULTS_FILE = "sampler_defaults.json"
"""Written into the exported pipeline folder, beside ``model_index.json``."""


def build_scheduler(name: str, config: Mapping) -> SchedulerMixin:
    """The `name` sampler over the noise schedule of `config`: the training DDPMScheduler's config or
    the config a pipeline folder saved (either gives the same sampler)."""
    # diffusers (and torch) imported here: the CLI reads SAMPLERS to build its parser.
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    # Named, not inherited: from_config gives a key the source config left at its default the new
    # class's default instead (DPM-Solver's is linspace), so the spacing would depend on the source.
    spacing = "trailing" if config.get("rescale_betas_zero_snr") else "leading"
    if name == "ddim":
        # set_alpha_to_one=False: the last step lands on alphas_cumprod[0] of the trained schedule,
        # not on a clean image the model never saw; steps_offset=1 as Stable Diffusion samples.
        return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                         timestep_spacing=spacing)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                       steps_offset=1, timestep_spacing=spacing)
    raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")


@dataclass(frozen=True, kw_only=True)
class SamplerDefaults:
    """What a request that names no sampler, steps or guidance gets from an exported pipeline."""

    sampler: str = "ddim"
    """One of SAMPLERS."""
    steps: int = 25
    """Denoising steps."""
    guidance: float = 5.0
    """Classifier-free guidance scale; 1 turns guidance off."""

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler defaults: `sampler` must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampler defaults: `steps` must be an integer >= 1, got {self.steps!r}")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) or self.guidance < 1.0:
            raise ValueError(f"sampler defaults: `guidance` must be a number >= 1, got {self.guidance!r}")
        object.__setattr__(self, "guidance", float(self.guidance))


def write_defaults(pipeline_dir: str | Path, defaults: SamplerDefaults) -> Path:
    """Record `defaults` in the pipeline folder (temp name then rename: never a half-written file)."""
    path = Path(pipeline_dir) / DEFAULTS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(asdict(defaults), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_defaults(pipeline_dir: str | Path) -> SamplerDefaults:
    """The folder's recorded defaults; SamplerDefaults() for a folder exported before they were recorded."""
    path = Path(pipeline_dir) / DEFAULTS_FILE
    if not path.is_file():
        return SamplerDefaults()
    recorded = json.loads(path.read_text())
    return SamplerDefaults(**{k: v for k, v in recorded.items() if k in SamplerDefaults.__dataclass_fields__})
