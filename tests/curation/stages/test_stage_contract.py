"""One contract, every model-backed stage of the pipeline, every mode its config documents.

A mode is each value of each Literal-typed setting of the stage's Config (e.g. text.engine)."""

from __future__ import annotations

import importlib
import pickle
import typing

import numpy as np
import pytest

from curation.pipeline import STAGES
from curation.stages.base import ClipBatch, StageResult
from curation.testing.synthetic import moving_square, rendered_text


def _stage_classes():
    for path, _ in STAGES:
        module, name = path.rsplit(".", 1)
        yield getattr(importlib.import_module(module), name)


def _modes(cls):
    yield "default", {}
    for field, info in cls.Config.model_fields.items():
        if typing.get_origin(info.annotation) is typing.Literal:
            for value in typing.get_args(info.annotation):
                if value != info.default:
                    yield f"{field}={value}", {field: value}


CASES = [pytest.param(cls, overrides, id=f"{cls.__name__}-{label}") for cls in _stage_classes() for label, overrides in _modes(cls)]


def _batch():
    text = np.stack([next(rendered_text(1, h=144, w=256))] * 3)
    moving = np.stack(list(moving_square(3, h=120, w=200)))
    return ClipBatch(
        ["text", "moving", "empty", "wrong_dtype", "text_again"],
        [text, moving, np.zeros((0, 0, 0, 3), np.uint8), moving.astype(np.float32), text.copy()],
    )


@pytest.fixture(scope="module")
def base_configs(tmp_path_factory):
    """Stages whose default checkpoints are not on this machine run on tiny random-weight stand-ins,
    loaded through the same path as real weights."""
    from curation.testing.tiny_captioners import write_tiny_captioners
    from curation.testing.tiny_clip import write_tiny_clip_assets

    return {"Captioning": write_tiny_captioners(tmp_path_factory.mktemp("tiny_caps"), max_new_tokens=6),
            "ClipScore": write_tiny_clip_assets(tmp_path_factory.mktemp("tiny_clip"))}


@pytest.fixture(scope="module")
def stages(base_configs):
    cache = {}

    def get(cls, overrides):
        key = (cls, tuple(sorted(overrides.items())))
        if key not in cache:
            try:
                config = cls.Config(**{**base_configs.get(cls.__name__, {}), **overrides})
            except ValueError as e:  # a mode this machine cannot run (clip precision fp16 without a GPU)
                pytest.skip(str(e))
            stage = cls(config)
            pickle.loads(pickle.dumps(stage))  # cheap to ship to workers: nothing loaded yet
            stage.ensure_setup()
            cache[key] = stage
        return cache[key]

    return get


@pytest.mark.parametrize("cls, overrides", CASES)
def test_stage_contract(cls, overrides, stages):
    stage = stages(cls, overrides)
    batch = _batch()
    result = stage(batch)
    assert isinstance(result, StageResult)
    assert set(result.scores) == set(cls.columns)
    assert all(len(v) == len(batch) for v in result.scores.values())
    assert len(result.reasons) == len(batch)
    # bad clips come back as reasons naming the stage, good clips without
    assert result.reasons[2] and result.reasons[2].startswith(cls.name)
    assert result.reasons[3] and result.reasons[3].startswith(cls.name)
    assert result.reasons[0] is None and result.reasons[1] is None
    # deterministic: the same clip twice in a batch, and the same batch twice
    again = stage(_batch())
    for col in cls.columns:
        assert result.scores[col][0] == result.scores[col][4] == again.scores[col][0]
        assert result.scores[col][1] == again.scores[col][1]
