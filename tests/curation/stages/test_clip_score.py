"""ClipScore: embeddings, aesthetic heads, caption similarity, loading (local folder, single file, hf-hub
cache), errors and pickling, all on tiny random-weight models written once per module and loaded
through the same path a user's checkpoint takes.

Random weights carry no meaning, so values are checked against hand computations: open_clip's own
preprocess and towers, the head's layers in numpy, cosines and weighted means by hand."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest

from common.checkpoints import MissingCheckpoint
from curation.testing import synthetic
from curation.stages.clip_score import ClipScore, ClipScoreConfig, parse_captions, weighted_mean
from curation.stages.base import ClipBatch
from curation.testing.tiny_clip import (TINY_EMBED_DIM, TINY_MODEL_CFG, write_tiny_aesthetic_head, write_tiny_clip_assets,
                                write_tiny_open_clip)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_clip")
    keys = write_tiny_clip_assets(root)
    keys["linear_head"] = str(write_tiny_aesthetic_head(root / "heads" / "linear.safetensors", TINY_EMBED_DIM,
                                                        "linear", seed=1))
    keys["wide_head"] = str(write_tiny_aesthetic_head(root / "heads" / "wide.safetensors", 48, "mlp"))
    return keys


@pytest.fixture(scope="module")
def stage(assets):
    s = ClipScore(ClipScoreConfig(checkpoint=assets["checkpoint"], aesthetic_head=assets["aesthetic_head"]))
    s.ensure_setup()
    return s


@pytest.fixture(scope="module")
def reference(assets):
    """The tiny CLIP as open_clip itself loads it: model, eval preprocess, tokenizer."""
    from common.torch_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import open_clip

    name = f"local-dir:{assets['checkpoint']}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def _clips():
    moving = np.stack(list(synthetic.moving_square(9, h=72, w=128)))[[0, 4, 8]]  # three different frames
    text = np.stack([next(synthetic.rendered_text(1, h=72, w=128))] * 3)
    static = np.stack([next(synthetic.static_frame(1, h=90, w=96))] * 3)  # another size
    return moving, text, static


def _by_hand(reference, frames):
    import torch
    from PIL import Image

    model, preprocess, _ = reference
    with torch.inference_mode():
        feats = model.encode_image(torch.stack([preprocess(Image.fromarray(f)) for f in frames]))
    return torch.nn.functional.normalize(feats, dim=-1).numpy()


def _text_by_hand(reference, texts):
    import torch

    model, _, tokenizer = reference
    with torch.inference_mode():
        feats = model.encode_text(tokenizer(texts))
    return torch.nn.functional.normalize(feats, dim=-1).numpy()


# ---- embeddings -------------------------------------------------------------------------------------

def test_embeddings_are_unit_norm_deterministic_and_match_open_clip(stage, reference):
    moving, text, static = _clips()
    result = stage(ClipBatch(["moving", "text", "static", "moving_again"], [moving, text, static, moving.copy()]))
    assert result.reasons == [None] * 4
    emb = [np.asarray(e, np.float32) for e in result.scores["clip_embedding"]]
    assert [e.shape for e in emb] == [(3, TINY_EMBED_DIM)] * 4
    for e in emb:
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    # the same clip gives exactly the same embedding, in the batch and when scored again alone
    assert result.scores["clip_embedding"][0] == result.scores["clip_embedding"][3]
    again = stage(ClipBatch(["moving"], [moving]))
    np.testing.assert_allclose(again.scores["clip_embedding"][0], emb[0], atol=1e-6)
    assert stage(ClipBatch(["moving"], [moving])).scores == again.scores
    # different frames, different embeddings (within a clip and across clips); identical frames, identical rows
    assert np.abs(emb[0][0] - emb[0][1]).max() > 1e-3 and np.abs(emb[0][0] - emb[1][0]).max() > 1e-3
    assert emb[1][0].tolist() == emb[1][1].tolist() == emb[1][2].tolist()
    # open_clip's own preprocess + image tower, by hand
    for e, frames in zip(emb, (moving, text, static), strict=False):
        np.testing.assert_allclose(e, _by_hand(reference, frames), atol=1e-5)
    assert set(result.scores["clip_model"]) == {stage.config.checkpoint}


def test_bad_key_frames_are_reasons_and_the_rest_is_scored(stage):
    moving, text, _ = _clips()
    batch = ClipBatch(["ok", "none", "float", "no_k", "ok2"],
                      [moving, None, moving.astype(np.float32), moving[0], text])
    result = stage(batch)
    assert result.reasons == [None, "clip: key frames missing", "clip: key frames are float32, expected uint8 RGB",
                              "clip: key frames have shape (72, 128, 3), expected K x H x W x 3", None]
    for col in ClipScore.columns:
        assert [v is None for v in result.scores[col]][1:4] == [True] * 3
    assert result.scores["aesthetic"][0] is not None and result.scores["aesthetic"][4] is not None


# ---- aesthetic heads ---------------------------------------------------------------------------------

def _head_by_hand(path, emb):
    from safetensors.numpy import load_file

    w = {k: v.astype(np.float64) for k, v in load_file(path).items()}
    x = np.asarray(emb, np.float64)
    if "weight" in w:
        return (x @ w["weight"].T + w["bias"])[:, 0]
    for i in (0, 2, 4, 6, 7):  # no activations in the published MLP
        x = x @ w[f"layers.{i}.weight"].T + w[f"layers.{i}.bias"]
    return x[:, 0]


@pytest.mark.parametrize("head, reduce", [("aesthetic_head", "mean"), ("aesthetic_head", "min"),
                                          ("linear_head", "mean"), ("linear_head", "min")])
def test_aesthetic_is_the_head_on_the_normalised_embedding(assets, stage, head, reduce):
    s = stage if (head, reduce) == ("aesthetic_head", "mean") else ClipScore(
        ClipScoreConfig(checkpoint=assets["checkpoint"], aesthetic_head=assets[head], reduce=reduce))
    moving, _, _ = _clips()
    result = s(ClipBatch(["m"], [moving]))
    expected = _head_by_hand(assets[head], result.scores["clip_embedding"][0])
    np.testing.assert_allclose(result.scores["aesthetic_frames"][0], expected, rtol=1e-5, atol=1e-5)
    assert np.ptp(expected) > 1e-4  # the frames differ, so mean and min differ
    combine = np.mean if reduce == "mean" else np.min
    assert result.scores["aesthetic"][0] == pytest.approx(combine(expected), abs=1e-5)


def test_without_a_head_the_aesthetic_columns_are_empty(assets):
    s = ClipScore(ClipScoreConfig(checkpoint=assets["checkpoint"], aesthetic_head=None))
    assert [c.role for c in s.config.checkpoints()] == ["clip.checkpoint"]
    result = s(ClipBatch(["m"], [_clips()[0]]))
    assert result.reasons == [None] and result.scores["aesthetic"] == [None] == result.scores["aesthetic_frames"]
    assert result.scores["clip_embedding"][0] is not None


def test_head_for_another_embedding_size_is_a_clear_error(assets):
    s = ClipScore(ClipScoreConfig(checkpoint=assets["checkpoint"], aesthetic_head=assets["wide_head"]))
    with pytest.raises(ValueError, match=r"takes 48-dimensional embeddings but the CLIP model gives 32.*"
                                         r"clip\.aesthetic_head: null"):
        s.ensure_setup()


def test_head_in_an_unknown_format_is_a_clear_error(assets, tmp_path):
    import torch

    path = tmp_path / "odd.pth"
    torch.save({"fc.weight": torch.zeros(1, 32), "fc.bias": torch.zeros(1)}, path)
    s = ClipScore(ClipScoreConfig(checkpoint=assets["checkpoint"], aesthetic_head=str(path)))
    with pytest.raises(ValueError, match=r"keys \['fc.bias', 'fc.weight'\].*match neither known format"):
        s.ensure_setup()
    # a .pth in the published layout loads (weights_only) and scores like the same weights as safetensors
    from safetensors.torch import load_file

    pth = tmp_path / "head.pth"
    torch.save(dict(load_file(assets["aesthetic_head"])), pth)
    frames = _clips()[0]
    from_pth = ClipScore(ClipScoreConfig(checkpoint=assets["checkpoint"], aesthetic_head=str(pth)))
    from_st = ClipScore(ClipScoreConfig(checkpoint=assets["checkpoint"], aesthetic_head=assets["aesthetic_head"]))
    assert from_pth(ClipBatch(["m"], [frames])).scores == from_st(ClipBatch(["m"], [frames])).scores


# ---- caption similarity ------------------------------------------------------------------------------

CAPTIONS = [{"text": "a red square moves to the right", "weight": 2.0, "source": "video"},
            {"text": "breaking news", "weight": 1.0, "source": "frame"},
            {"text": "a grey wall", "weight": 0.5, "source": "frame"}]


def test_caption_similarity_is_the_weighted_mean_of_per_caption_cosines(stage, reference):
    moving, text, _ = _clips()
    result = stage(ClipBatch(["m", "t"], [moving, text], [{"captions": CAPTIONS}, {"captions": CAPTIONS[1:2]}]))
    img = np.asarray(result.scores["clip_embedding"][0], np.float64)
    txt = _text_by_hand(reference, [c["text"] for c in CAPTIONS]).astype(np.float64)
    per_caption = (img @ txt.T).mean(axis=0)  # mean over the three key frames
    np.testing.assert_allclose(result.scores["caption_similarities"][0], per_caption, atol=1e-5)
    expected = (2.0 * per_caption[0] + 1.0 * per_caption[1] + 0.5 * per_caption[2]) / 3.5
    assert result.scores["caption_similarity"][0] == pytest.approx(expected, abs=1e-5)
    assert len(set(np.round(per_caption, 6))) == 3  # the captions are told apart
    # one caption: its own cosine; a caption shared by two clips of a batch is embedded once and agrees
    t_img = np.asarray(result.scores["clip_embedding"][1], np.float64)
    assert result.scores["caption_similarity"][1] == pytest.approx(float((t_img @ txt[1]).mean()), abs=1e-5)

    # the weights matter, as the formula says
    reweighted = [{**c, "weight": w} for c, w in zip(CAPTIONS, (0.0, 1.0, 3.0), strict=True)]
    other = stage(ClipBatch(["m"], [moving], [{"captions": reweighted}]))
    # (another batch: the same numbers up to float32 rounding)
    np.testing.assert_allclose(other.scores["caption_similarities"][0], per_caption, atol=1e-6)
    assert other.scores["caption_similarity"][0] == pytest.approx((per_caption[1] + 3 * per_caption[2]) / 4, abs=1e-5)
    assert abs(other.scores["caption_similarity"][0] - result.scores["caption_similarity"][0]) > 1e-4


def test_no_captions_is_none_not_a_failure(stage):
    moving = _clips()[0]
    result = stage(ClipBatch(["none", "empty", "absent"], [moving] * 3, [{"captions": None}, {"captions": []}, {}]))
    assert result.reasons == [None] * 3
    assert result.scores["caption_similarity"] == [None] * 3 == result.scores["caption_similarities"]
    assert all(e is not None for e in result.scores["clip_embedding"])


def test_caption_edge_cases(stage):
    moving = _clips()[0]
    blank = [{"text": "  ", "weight": 1.0, "source": "x"}, {"text": "a square", "source": "y"}]  # weight missing: 1
    result = stage(ClipBatch(["blank", "bad"], [moving, moving],
                             [{"captions": blank}, {"captions": [{"text": "ok", "weight": -1, "source": "x"}]}]))
    sims = result.scores["caption_similarities"][0]
    assert sims[0] is None and result.scores["caption_similarity"][0] == pytest.approx(sims[1])
    assert result.reasons == [None, "clip: captions[0].weight -1 is not a finite number >= 0"]
    assert parse_captions([{"text": "x", "weight": None}]) == [("x", 1.0)]
    with pytest.raises(ValueError, match=r"captions\[0\] is a str"):
        parse_captions(["x"])
    assert weighted_mean([None, 0.5], [1.0, 1.0]) == 0.5 and weighted_mean([0.5], [0.0]) is None


# ---- loading -----------------------------------------------------------------------------------------

def test_single_file_checkpoint_loads_with_its_architecture(assets, stage, tmp_path):
    from common.torch_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import open_clip

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "lvd-tiny-clip.json").write_text(json.dumps(TINY_MODEL_CFG))
    wide = json.loads(json.dumps(TINY_MODEL_CFG))
    wide["vision_cfg"]["width"] = 64
    (configs / "lvd-tiny-clip-wide.json").write_text(json.dumps(wide))
    open_clip.add_model_config(configs)

    weights = f"{assets['checkpoint']}/open_clip_model.safetensors"
    single = ClipScore(ClipScoreConfig(model="lvd-tiny-clip", checkpoint=weights, aesthetic_head=None))
    frames = _clips()[0]
    result = single(ClipBatch(["m"], [frames]))
    assert result.scores["clip_embedding"] == stage(ClipBatch(["m"], [frames])).scores["clip_embedding"]
    assert result.scores["clip_model"] == [f"lvd-tiny-clip:{weights}"]

    wrong = ClipScore(ClipScoreConfig(model="lvd-tiny-clip-wide", checkpoint=weights, aesthetic_head=None))
    with pytest.raises(ValueError, match=r"does not load into architecture lvd-tiny-clip-wide.*set clip\.model"):
        wrong.ensure_setup()


def test_missing_checkpoints_raise_at_setup_naming_the_path(assets, tmp_path):
    absent = tmp_path / "no_such_clip"
    s = ClipScore(ClipScoreConfig(checkpoint=str(absent)))  # constructing loads nothing
    with pytest.raises(MissingCheckpoint, match=re.escape(str(absent))):
        s.ensure_setup()
    no_weights = tmp_path / "config_only"
    no_weights.mkdir()
    shutil.copy(f"{assets['checkpoint']}/open_clip_config.json", no_weights)
    with pytest.raises(MissingCheckpoint, match=r"config_only has open_clip_config.json but no weights "
                                                r"\(open_clip_model.safetensors or"):
        ClipScore(ClipScoreConfig(checkpoint=str(no_weights), aesthetic_head=None)).ensure_setup()
    no_config = tmp_path / "weights_only"
    no_config.mkdir()
    with pytest.raises(MissingCheckpoint, match=r"clip.checkpoint: .*weights_only holds no open_clip weights"):
        ClipScore(ClipScoreConfig(checkpoint=str(no_config), aesthetic_head=None)).ensure_setup()
    head = tmp_path / "no_head.pth"
    with pytest.raises(MissingCheckpoint, match=r"clip.aesthetic_head: checkpoint .*no_head.pth not found"):
        ClipScore(ClipScoreConfig(checkpoint=assets["checkpoint"], aesthetic_head=str(head))).ensure_setup()


def _fake_hf_cache(root, repo, files):
    """A Hugging Face cache holding `files` ({name: source path}) as the main revision of `repo`."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / rev
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, snapshot / name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    return snapshot


def test_hf_hub_references_resolve_from_the_cache(assets, stage, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    clip_dir = assets["checkpoint"]
    _fake_hf_cache(cache, "lvd-test/tiny-clip", {n: f"{clip_dir}/{n}" for n in
                                                  ("open_clip_config.json", "open_clip_model.safetensors")})
    _fake_hf_cache(cache, "lvd-test/tiny-head", {"head.safetensors": assets["aesthetic_head"]})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    s = ClipScore(ClipScoreConfig(checkpoint="hf-hub:lvd-test/tiny-clip",
                                  aesthetic_head="hf-hub:lvd-test/tiny-head/head.safetensors"))
    frames = _clips()[0]
    result = s(ClipBatch(["m"], [frames]))
    local = stage(ClipBatch(["m"], [frames]))
    assert result.scores["clip_embedding"] == local.scores["clip_embedding"]
    assert result.scores["aesthetic"] == local.scores["aesthetic"]
    assert result.scores["clip_model"] == ["hf-hub:lvd-test/tiny-clip"]

    with pytest.raises(MissingCheckpoint, match=r"clip.checkpoint: the lvd-test/elsewhere repository is not in the "
                                                r"Hugging Face cache"):
        ClipScore(ClipScoreConfig(checkpoint="hf-hub:lvd-test/elsewhere", aesthetic_head=None)).ensure_setup()


def test_pickles_before_and_after_setup_without_the_model(assets, stage):
    fresh = ClipScore(ClipScoreConfig(checkpoint=assets["checkpoint"], aesthetic_head=assets["aesthetic_head"]))
    blob = pickle.dumps(fresh)
    assert len(blob) < 5_000  # configuration only
    copy = pickle.loads(blob)
    assert copy.config == fresh.config and copy._loaded is None
    shipped = pickle.loads(pickle.dumps(stage))  # a loaded stage ships without its weights too
    assert shipped._loaded is None and not shipped._ready
    frames = _clips()[0]
    assert shipped(ClipBatch(["m"], [frames])).scores == stage(ClipBatch(["m"], [frames])).scores


def test_tiny_builders_mark_random_and_are_reproducible(tmp_path):
    from safetensors.numpy import load_file

    a = write_tiny_open_clip(tmp_path / "a", seed=3)
    b = write_tiny_open_clip(tmp_path / "b", seed=3)
    assert (a / "LVD_RANDOM_WEIGHTS").is_file()
    wa, wb = load_file(a / "open_clip_model.safetensors"), load_file(b / "open_clip_model.safetensors")
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    head = write_tiny_aesthetic_head(tmp_path / "h" / "x.safetensors", 16, "linear")
    assert set(load_file(head)) == {"weight", "bias"} and (head.parent / "LVD_RANDOM_WEIGHTS").is_file()


# ---- configuration ------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"precision": "fp16"}, "precision fp16 needs a GPU (num_gpus > 0)"),
    ({"model": "ViT-L-15"}, "model 'ViT-L-15' is not an open_clip architecture; did you mean"),
    ({"aesthetic_head": "hf-hub:org/repo"}, "names a whole repository; name the head file in it"),
    ({"checkpoint": "hf-hub:justorg"}, "is not a Hugging Face reference"),
    ({"reduce": "max"}, "reduce"),
])
def test_config_errors_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ClipScoreConfig(**overrides)


def test_defaults_name_their_checkpoints():
    config = ClipScoreConfig(precision="fp16", num_gpus=1)  # fp16 is fine with a GPU
    specs = {s.role: s.source for s in config.checkpoints()}
    assert specs == {"clip.checkpoint": "hf-hub:timm/vit_large_patch14_clip_224.openai/open_clip_pytorch_model.bin",
                     "clip.aesthetic_head": "hf-hub:camenduru/improved-aesthetic-predictor/"
                                            "sac+logos+ava1-l14-linearMSE.pth"}
    assert config.model == "ViT-L-14-quickgelu"
