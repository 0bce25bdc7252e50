"""Fixtures for the model tests: one thread (the suite shares 2 cores), no Hub access, the tiny model."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions run faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_tiny(seed: int = 0, **overrides):
    from training.model.network import LatentVideoDiffusion
    from training.model.presets import preset

    torch.manual_seed(seed)
    return LatentVideoDiffusion.build(preset("tiny", **overrides))


@pytest.fixture
def tiny_model():
    return build_tiny()
