"""Stage recipes: the shipped ones chain correctly, bad values fail with the fix in the message, and the DeepSpeed
config and LR schedule say what the recipe says."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, load_recipe, validate
from tests.training.train_helpers import stage_tree, synthetic_data
from training.engine import WarmupDecay, deepspeed_config
from training.stage_config import TrainConfig

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "train"


def _config(**over) -> TrainConfig:
    data = over.pop("data", synthetic_data())
    return validate(TrainConfig, stage_tree(Path("/tmp/out"), data, **over))


@pytest.mark.parametrize("chain", [("tiny_stage1", "tiny_stage2", "tiny_stage3"),
                                   ("stage1_image", "stage2_video", "stage3_hq")])
def test_shipped_stages_chain_through_init_from(chain):
    """Each stage starts from the previous stage's output folder; stage I trains images only, spatial layers
    only; the noise moves up from stage to stage (SVD shifts P_mean towards more noise); stage III's subset
    is a stricter query."""
    stages = [load_recipe(TrainConfig, RECIPES / f"{name}.yaml") for name in chain]
    for before, after in zip(stages, stages[1:]):
        assert after.init_from == before.output
        assert after.objective.p_mean > before.objective.p_mean
    first, second, third = stages
    assert first.data.shards.image_ratio == 1.0 and first.trainable == "spatial"
    assert second.data.shards.image_ratio < 1.0 and second.trainable == "all"
    assert third.data.shards.query and third.data.shards.query != second.data.shards.query
    assert len({s.output for s in stages}) == 3


def test_real_scale_stages_use_svd_and_deepspeed_memory_savers():
    for name in ("stage1_image", "stage2_video", "stage3_hq"):
        c = load_recipe(TrainConfig, RECIPES / f"{name}.yaml")
        assert c.model.preset == "svd" and c.deepspeed.precision == "bf16" and c.deepspeed.gradient_checkpointing
    hq = load_recipe(TrainConfig, RECIPES / "stage3_hq.yaml")
    assert hq.deepspeed.zero_stage == 3 and (576, 1024) in [tuple(r) for r in hq.data.shards.resolutions]


@pytest.mark.parametrize("over, message", [
    ({"steps": 0}, "steps (0) must be at least 1"),
    ({"schedule": {"warmup_steps": 20}}, "warmup_steps (20) exceeds steps (8)"),
    ({"data": synthetic_data(height=30)}, "resolution 30x32 is not a multiple of 8"),
    ({"data": {"source": "shards", "shards": None}}, "data.shards is not set"),
    ({"data": {"source": "shards", "shards": {"shards": "/x", "remainder": "uneven"}}}, "would stall"),
    ({"optimizer": {"lr": -1}}, "optimizer.lr (-1.0) must be a positive number"),
    ({"ema": {"decay": 1.5}}, "ema.decay (1.5) must be in (0, 1)"),
    ({"deepspeed": {"zero_stage": 4}}, "zero_stage"),
])
def test_bad_values_name_the_key_and_the_fix(over, message):
    with pytest.raises(ConfigError, match=None) as e:
        _config(**over)
    assert message in str(e.value)


def test_deepspeed_config_follows_the_recipe():
    c = _config(deepspeed={"zero_stage": 3, "precision": "bf16", "gradient_accumulation_steps": 4,
                           "gradient_clipping": 0.5, "extra": {"zero_optimization": {"overlap_comm": True}}})
    ds = deepspeed_config(c, world_size=8, load_universal=True)
    assert ds["train_batch_size"] == 2 * 4 * 8  # micro batch x accumulation x ranks
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False,
                                       "overlap_comm": True}
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5 and ds["checkpoint"]["load_universal"]
    # torch.optim.AdamW unless fused is asked for: no op is compiled at start-up
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert deepspeed_config(_config(optimizer={"fused": True}), 1, False)["optimizer"]["params"]["torch_adam"] is False


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cosine = WarmupDecay(warmup_steps=4, total_steps=14, decay="cosine", min_lr_ratio=0.1)
    ramp = [cosine(k) for k in range(4)]
    assert ramp == [0.2, 0.4, 0.6, 0.8] and cosine(4) == 1.0
    assert cosine(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert cosine(14) == pytest.approx(0.1) and cosine(20) == pytest.approx(0.1)
    linear = WarmupDecay(0, 10, "linear", 0.0)
    assert [linear(k) for k in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert WarmupDecay(2, 10, "constant", 0.0)(7) == 1.0
