"""`lvd bench stages`: the model stages timed in-process on tiny random-weight models (rows, ratios, the
order asked for), clear errors for a bad choice, no Ray needed, and the command line."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError
from curation.bench.stages import bench_stages, load_config

REPO = Path(__file__).resolve().parents[3]
RECIPE = REPO / "recipes" / "curation" / "demo.yaml"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    from curation.testing.tiny_models import build_all

    root = tmp_path_factory.mktemp("tiny_models")
    build_all(root, max_new_tokens=4)
    return root


@pytest.fixture(scope="module")
def config(tiny_root):
    return load_config(RECIPE, ["decode.key_frame_max_side=128", "caption.image.max_new_tokens=5"], tiny_root=tiny_root)


def test_tiny_recipe_points_at_the_stand_ins_and_overrides_still_win(config, tiny_root):
    assert config.clip.checkpoint == str(tiny_root / "clip" / "clip")
    assert config.caption.video.model == str(tiny_root / "captioners" / "vlm")
    assert config.caption.image.max_new_tokens == 5   # --set beats the stand-ins' 8
    assert config.caption.video.max_new_tokens == 8
    assert config.caption.only_if  # the recipe's own settings are kept


def test_clip_stage_batched_vs_one_clip_per_call(config, monkeypatch):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads_before = torch.get_num_threads()
    said = []
    result = bench_stages(config, stages=["clip"], clips=4, batch_sizes=[4, 1], devices=["cpu"], progress=said.append)
    rows = result.rows
    assert [(r.stage, r.device, r.batch_size, r.clips) for r in rows] == [("clip", "cpu", 1, 4), ("clip", "cpu", 4, 4)]
    for r in rows:
        assert math.isfinite(r.clips_per_s) and r.clips_per_s > 0
        assert r.ms_per_clip == pytest.approx(1000.0 / r.clips_per_s)
        assert r.load_s > 0 and r.failed == 0 and r.gpu_peak_mb is None
        assert r.threads == 1  # a Ray actor with clip.num_cpus 1 runs torch on one thread
        assert r.base_batch_size == 1
    assert rows[0].ratio == 1.0
    assert rows[1].ratio == pytest.approx(rows[1].clips_per_s / rows[0].clips_per_s)
    assert torch.get_num_threads() == threads_before  # restored
    assert any("batch 4" in s for s in said)

    text = "\n".join(result.lines())
    assert text.startswith("machine: ") and "CPUs" in text and "torch " in text
    assert "3 key frames of 72 x 128" in text
    assert f"{rows[1].ratio:.2f}x vs 1" in text
    assert "clip.checkpoint, clip.aesthetic_head are tiny random-weight stand-ins" in text


def test_stages_come_back_in_the_order_asked(config):
    result = bench_stages(config, stages=["caption", "clip"], clips=2, batch_sizes=[2], devices=["cpu"])
    assert [(r.stage, r.batch_size, r.clips) for r in result.rows] == [("caption", 2, 2), ("clip", 2, 2)]
    caption = result.rows[0]
    assert set(caption.shares) == {"image", "video", "summary"} and 0 < sum(caption.shares.values()) <= 1.0


def test_unknown_or_disabled_stage_is_refused_before_any_work(config, tiny_root):
    said = []
    with pytest.raises(ConfigError, match=r"unknown stage 'ocr'; the model stages are text, caption, clip"):
        bench_stages(config, stages=["clip", "ocr"], progress=said.append)
    # with clip off, its aesthetic rule must go too (a rule on a score no stage makes is refused)
    disabled = load_config(RECIPE, ["clip.enabled=false", "thresholds={motion_score: {min: 0.002}}"],
                           tiny_root=tiny_root)
    with pytest.raises(ConfigError, match=r"stage clip is disabled in the recipe .*--set clip.enabled=true"):
        bench_stages(disabled, stages=["clip"], progress=said.append)
    with pytest.raises(ConfigError, match=r"--device 'tpu' is not one of cpu, cuda|--device tpu is not one of"):
        bench_stages(config, stages=["clip"], devices=["tpu"], progress=said.append)
    assert said == []  # nothing was generated or loaded


def test_cuda_without_a_gpu_names_the_fix(config):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=r"--device cuda: CUDA is not available here .* or use --device cpu"):
        bench_stages(config, stages=["clip"], devices=["cuda"])


def test_runs_where_ray_cannot_be_imported(tiny_root):
    code = (
        "import sys; sys.modules['ray'] = None\n"  # any `import ray` now fails
        "from curation.bench.stages import bench_stages, load_config\n"
        f"c = load_config({str(RECIPE)!r}, ['decode.key_frame_max_side=64'], tiny_root={str(tiny_root)!r})\n"
        "rows = bench_stages(c, stages=['clip'], clips=1, batch_sizes=[1]).rows\n"
        "assert len(rows) == 1 and rows[0].clips_per_s > 0\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_cli_help(capsys):
    from jobs.cli import main as lvd

    with pytest.raises(SystemExit) as e:
        lvd(["bench", "stages", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--recipe", "--set", "--stages", "--clips", "--batch-sizes", "--tiny", "--device", "--threads"):
        assert flag in out
    assert "one clip per call" in out
