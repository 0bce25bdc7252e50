"""Every recipe in the repo loads and validates."""

from pathlib import Path

import pytest

from common.config import load_recipe

REPO = Path(__file__).resolve().parents[1]


def _config_for(folder: str):
    if folder == "curation":
        from curation.config import CurationConfig

        return CurationConfig
    if folder == "model":
        from training.model.config import DiffusionConfig

        return DiffusionConfig
    if folder == "train":
        from training.stage_config import TrainConfig

        return TrainConfig
    if folder == "calibrate":
        from training.calibration.config import CalibrateConfig

        return CalibrateConfig
    raise AssertionError(f"recipes/{folder}/ has no config class registered in this test; add it")


RECIPES = sorted(REPO.glob("recipes/*/*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(r.relative_to(REPO)) for r in RECIPES])
def test_recipe_validates(recipe):
    config = load_recipe(_config_for(recipe.parent.name), recipe)
    assert config.model_dump()  # the round trip works too
