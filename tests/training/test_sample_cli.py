"""`lvd sample` end to end at tiny size: an mp4 with the right number of frames, a contact sheet, the run's
config; from a random model and from an export."""

from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image

from curation.synthetic import moving_square
from jobs.cli import main


@pytest.fixture
def instructions(tmp_path):
    frames = list(moving_square(8, h=48, w=64, speed=4))
    Image.fromarray(frames[0]).save(tmp_path / "first.png")
    Image.fromarray(frames[-1]).save(tmp_path / "last.png")
    return tmp_path / "first.png", tmp_path / "last.png"


def _num_frames(path) -> tuple[int, tuple[int, int]]:
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return len(frames), frames[0].shape[:2]


def test_sample_writes_mp4_contact_sheet_and_run_info(tmp_path, instructions, capsys):
    first, last = instructions
    out = tmp_path / "out" / "clip.mp4"
    rc = main(["sample", "--random-init", "--preset", "tiny", "--first-frame", str(first), "--last-frame", str(last),
               "--prompt", "a white square moves right", "--out", str(out), "--num-frames", "4", "--clips", "2",
               "--steps", "3", "--cfg", "2.0", "--tau", "0.5", "--seed", "1", "--set", "sampler.heun=true"])
    assert rc == 0
    assert _num_frames(out) == (4 + 3, (32, 32))  # the second clip drops its repeated first frame
    sheet = np.asarray(Image.open(tmp_path / "out" / "clip_sheet.png"))
    assert sheet.shape == (2 * 32 + 2, 4 * 32 + 3 * 2, 3)  # two rows of four frames, 2 px gaps
    config = (tmp_path / "out" / "clip_run" / "config.yaml").read_text()
    assert "heun: true" in config and "num_steps: 3" in config and "cfg_scale: 2.0" in config
    assert "wrote" in capsys.readouterr().out


def test_sample_from_an_export_folder(tmp_path, instructions, tiny_model):
    from training.export import save_pretrained

    save_pretrained(tiny_model, tmp_path / "export")
    out = tmp_path / "from_export.mp4"
    rc = main(["sample", "--model", str(tmp_path / "export"), "--first-frame", str(instructions[0]),
               "--out", str(out), "--steps", "2", "--size", "32x64"])
    assert rc == 0
    assert _num_frames(out) == (tiny_model.config.unet.num_frames, (32, 64))


def test_sample_rejects_bad_arguments_with_the_fix(tmp_path, instructions, capsys):
    out = tmp_path / "x.mp4"
    assert main(["sample", "--out", str(out)]) == 2
    assert "exactly one of --model DIR or --random-init" in capsys.readouterr().err
    assert main(["sample", "--random-init", "--out", str(out), "--size", "30x32"]) == 2
    assert "must be multiples of 8" in capsys.readouterr().err
    assert main(["sample", "--random-init", "--out", str(out), "--tau", "3"]) == 2
    assert "tau (3.0) is a fraction" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path), "--out", str(out)]) == 2
    assert "no diffusers-format model" in capsys.readouterr().err
    assert not out.exists()
