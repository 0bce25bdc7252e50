"""The bad-media corpus through the whole pipeline: every file lands in the ledger with the right kind
of outcome, every usable clip has a clip file that decodes (codecs mp4 cannot hold come out re-encoded), a
file that blocks forever is ended by the time limit, and the run finishes."""

from __future__ import annotations

import time

import av

from curation.ledger import Ledger
from curation.pipeline import run_curation
from tests.curation.conftest import make_config
from tests.curation.media_corpus import EXPECTED, REENCODED, TIMEOUT, USABLE, corpus_input, write_bad_media_corpus


def test_every_bad_file_is_accounted_for_and_the_run_finishes(tmp_path, local_ray):
    corpus = write_bad_media_corpus(tmp_path / "corpus")
    config = make_config(tmp_path, [corpus_input(n, p) for n, p in corpus.items()], text={"enabled": False},
                         decode={"probe_timeout_s": 5, "timeout_s": 20})
    t0 = time.monotonic()
    summary = run_curation(config, progress=False)
    assert time.monotonic() - t0 < 240
    videos, clips = Ledger(summary.run_dir).read()
    by_source = videos.set_index("source")
    assert len(videos) == len(corpus)
    for name, path in corpus.items():
        row = by_source.loc[str(path.absolute())]
        expected = EXPECTED[name]
        if expected == USABLE:
            # decodable; a damaged file may be left too short for a clip, which is a clip-level reason
            assert row["status"] in ("ok", "no_clips"), f"{name}: {row['status']} {row['reason']}"
            usable = clips[(clips["video_id"] == row["video_id"]) & (clips["status"] == "ok")]
            assert usable["motion_score"].notna().all(), name
            if row["num_frames"] >= 48:
                assert len(usable) >= 1, f"{name}: {row['num_frames']} frames but no clip"
            for clip in usable.itertuples():
                with av.open(clip.clip_path) as f:  # clips.mode copy, as the recipes
                    stream = f.streams.video[0]
                    assert clip.clip_path.endswith(".mp4") and stream.frames > 0, name
                    if name in REENCODED:  # mp4 cannot hold the codec, or the copy wrote no frame
                        assert stream.codec_context.name == "h264", f"{name}: {stream.codec_context.name}"
        elif expected == TIMEOUT:
            assert row["status"] == "failed" and "timeout" in row["reason"], f"{name}: {row['reason']}"
        else:
            assert row["status"] == "failed" and row["reason"].startswith(expected), f"{name}: {row['reason']}"
    rotated = by_source.loc[str(corpus["rotated"].absolute())]
    assert (rotated["width"], rotated["height"]) == (144, 256)
    assert by_source.loc[str(corpus["corrupt_packets"].absolute()), "num_corrupt"] > 0
    funnel = {s["step"]: s["count"] for s in summary.funnel}
    assert funnel["input videos"] == len(corpus)
