"""Every recipe in recipes/model/ validates, and its model section is the preset it names."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_recipe
from training.model.config import DiffusionConfig
from training.model.presets import preset

REPO = Path(__file__).resolve().parents[3]
RECIPES = sorted((REPO / "recipes" / "model").glob("*.yaml"))


def test_there_are_model_recipes():
    assert {r.stem for r in RECIPES} >= {"tiny", "svd"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_model_recipe_validates_and_round_trips(recipe):
    config = load_recipe(DiffusionConfig, recipe)
    assert DiffusionConfig.model_validate(config.model_dump()) == config
    assert config.model == preset(config.model.preset)


def test_one_override_keeps_the_rest_of_the_preset():
    config = load_recipe(DiffusionConfig, REPO / "recipes/model/svd.yaml", ["model.text.pretrained=/ckpt/h14.bin"])
    assert config.model.text.pretrained == "/ckpt/h14.bin"
    assert config.model.unet == preset("svd").unet and config.model.text.width == 1024
