"""The model-and-objective recipe (recipes/model/*.yaml): which model, how it is trained, how it samples.

The training loop's stage recipes embed these sections; `lvd sample --recipe` reads them too.
"""

from __future__ import annotations

from common.config import Config
from training.model.conditioning import ConditioningConfig
from training.model.edm import ObjectiveConfig
from training.model.presets import ModelConfig
from training.model.sampler import SamplerConfig


class DiffusionConfig(Config):
    """Model sizes and preconditioning (a preset plus overrides), the training noise levels, conditioning randomisation, the sampler."""

    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    conditioning: ConditioningConfig = ConditioningConfig()
    sampler: SamplerConfig = SamplerConfig()
