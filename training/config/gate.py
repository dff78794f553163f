"""The `gate` section of a run config: when a registered version becomes the `champion`.

Not part of the config hash: the gate decides what happens to a trained model, not what is trained.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.config.checks import check_key


@dataclass(kw_only=True)
class GateConfig:
    metric: str = "shape_adherence"
    """Evaluation metric the candidate must beat the champion on (a key of the evaluation's metrics,
    higher is better)."""
    floor_metric: str = "colour_adherence"
    """A second metric that only has to clear `floor`: a candidate below it is never promoted."""
    floor: float = 0.5
    """Minimum of `floor_metric` for any promotion."""
    margin: float = 0.02
    """How much the candidate's `metric` must exceed the champion's, measured on the same evaluation
    set in the same gate run (and always strictly more)."""
    first_floor: float = 0.3
    """With no champion yet: the minimum of `metric` for the first version to become champion (chance
    is 1/6 for shapes)."""
    prompts: int = 12
    """Held-out prompts of the evaluation both models are scored on."""
    per_prompt: int = 4
    """Images per prompt."""
    seed: int = 0
    """Chooses the prompts and the noise: both models see exactly the same set."""
    steps: int = 20
    """Denoising steps per image, the same for both models."""

    def __post_init__(self) -> None:
        for key in ("metric", "floor_metric"):
            value = getattr(self, key)
            check_key(bool(value.strip()), f"gate.{key}", "a metric name such as shape_adherence", value)
        check_key(0.0 <= self.floor <= 1.0, "gate.floor", "in [0, 1]", self.floor)
        check_key(0.0 <= self.margin < 1.0, "gate.margin", "in [0, 1)", self.margin)
        check_key(0.0 <= self.first_floor <= 1.0, "gate.first_floor", "in [0, 1]", self.first_floor)
        check_key(self.prompts >= 1, "gate.prompts", ">= 1", self.prompts)
        check_key(self.per_prompt >= 1, "gate.per_prompt", ">= 1", self.per_prompt)
        check_key(self.steps >= 1, "gate.steps", ">= 1", self.steps)
