"""`lvd sample` end to end at tiny size: an mp4 with the right number of frames, a contact sheet, the run's
config; from a random model and from an export."""

from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image

from curation.testing.synthetic import moving_square
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


def test_contact_sheet_enlarges_frames_and_labels_them():
    """Frames of distinct solid colours: each appears whole-number enlarged (32 -> 128 px, nearest), in
    order, one row per clip, with its label drawn just above it and the title lines at the top."""
    from training.sample.media import SHEET_LABEL_PX, write_contact_sheet

    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30], [30, 200, 200], [200, 30, 200]],
                       np.uint8)
    frames = np.broadcast_to(colours[:, None, None, :], (6, 32, 48, 3)).copy()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        sheet = np.asarray(Image.open(write_contact_sheet(Path(tmp) / "s.png", frames, columns=3,
                                                          title=["prompt: a square", "seed 7"])))
    boxes = []
    for colour in colours:
        ys, xs = np.nonzero((sheet == colour).all(-1))
        boxes.append((ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1))
    assert [(h, w) for _, _, h, w in boxes] == [(128, 192)] * 6  # 4x, the short side reaches 128 px
    assert [y for y, *_ in boxes] == [boxes[0][0]] * 3 + [boxes[3][0]] * 3 and boxes[3][0] > boxes[0][0] + 128
    assert [x for _, x, *_ in boxes[:3]] == sorted(x for _, x, *_ in boxes[:3])
    for y, x, _, w in boxes:  # "frame i" drawn in the strip above the frame
        assert (sheet[y - SHEET_LABEL_PX - 4:y, x:x + w] < 128).any()
    assert (sheet[: boxes[0][0] - SHEET_LABEL_PX - 4] < 128).any()  # the title


def test_sample_writes_mp4_contact_sheet_and_run_info(tmp_path, instructions, capsys):
    first, last = instructions
    out = tmp_path / "out" / "clip.mp4"
    rc = main(["sample", "--random-init", "--preset", "tiny", "--first-frame", str(first), "--last-frame", str(last),
               "--prompt", "a white square moves right", "--out", str(out), "--num-frames", "4", "--clips", "2",
               "--steps", "3", "--cfg", "2.0", "--tau", "0.5", "--seed", "1", "--set", "sampler.heun=true"])
    assert rc == 0
    assert _num_frames(out) == (4 + 3, (32, 32))  # the second clip drops its repeated first frame
    sheet = np.asarray(Image.open(tmp_path / "out" / "clip_sheet.png"))
    assert sheet.shape[1] >= 4 * 128  # four 32 px frames a row, enlarged to 128 px
    config = (tmp_path / "out" / "clip_run" / "config.yaml").read_text()
    assert "heun: true" in config and "num_steps: 3" in config and "cfg_scale: 2.0" in config
    captured = capsys.readouterr()
    assert "wrote" in captured.out
    # the step bar, as diffusers pipelines show: 2 clips x 3 steps
    assert "sample: 100%" in captured.err and "6/6" in captured.err


def test_sample_from_an_export_folder(tmp_path, instructions, tiny_model):
    from training.model.export import save_pretrained

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
    assert main(["sample", "--model", str(tmp_path / "runs" / "stage3"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'runs' / 'stage3'} does not exist" in err and "lvd train" in err
    assert not out.exists()
