"""The bad-media corpus through the whole pipeline: every file lands in the ledger with the right kind
of outcome, every usable clip has a clip file that decodes (codecs mp4 cannot hold come out re-encoded), a
file that blocks forever is ended by the time limit, and the run finishes."""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import time

import av

from curation.ledger import Ledger
from curation.pipeline import run_curation
from tests.curation.conftest import make_config
from tests.curation.video.media_corpus import (EXPECTED, REENCODED, TIMEOUT, TOO_SHORT, USABLE, corpus_input,
                                         write_bad_media_corpus)


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
            if name not in TOO_SHORT:
                assert row["status"] == "ok" and len(usable) >= 1, f"{name}: {row['num_frames']} frames but no clip"
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

    # the shard writer reads every usable clip's file, the re-encoded ones too
    from shards.config import ShardWriteConfig
    from shards.manifest import Manifest
    from shards.writer import write_shards

    written = write_shards(summary.run_dir, tmp_path / "shards", ShardWriteConfig(selection="all_usable"))
    assert not written.skipped
    samples = Manifest.load(str(tmp_path / "shards")).samples
    assert set(samples["clip_id"]) == set(clips.loc[clips["status"] == "ok", "clip_id"])
    reencoded = {by_source.loc[str(corpus[n].absolute()), "video_id"] for n in REENCODED if n in corpus}
    assert reencoded <= set(samples["video_id"])


def _feed_then_stall(fifo: str, num_frames: int) -> None:
    """Serves a y4m stream through a FIFO: a header and `num_frames` frames to each reader, then nothing more,
    as a network mount that stops answering would (the header declares no duration to bound the decode)."""
    w, h = 64, 64
    data = f"YUV4MPEG2 W{w} H{h} F24:1 Ip A1:1 C420jpeg\n".encode() + (b"FRAME\n" + bytes(w * h * 3 // 2)) * num_frames
    while True:
        fd = os.open(fifo, os.O_WRONLY)
        try:
            os.write(fd, data)
        except BrokenPipeError:
            pass
        poll = select.poll()
        poll.register(fd, select.POLLERR)
        poll.poll()  # until the reader goes: the next open (probe, then decode) gets a fresh stream
        os.close(fd)


def test_a_decode_that_stops_getting_frames_ends_at_the_stall_limit(tmp_path, local_ray):
    fifo = tmp_path / "stalls.y4m"
    os.mkfifo(fifo)
    feeder = mp.get_context("spawn").Process(target=_feed_then_stall, args=(str(fifo), 30), daemon=True)
    feeder.start()
    try:
        # without the stall limit only timeout_s (10 min) would end it: the header declares no duration
        config = make_config(tmp_path, [fifo], text={"enabled": False}, clips={"mode": "none"},
                             decode={"probe_timeout_s": 30, "timeout_s": 600, "stall_timeout_s": 2})
        t0 = time.monotonic()
        summary = run_curation(config, progress=False)
        assert time.monotonic() - t0 < 120
    finally:
        feeder.terminate()
        feeder.join(10)
    videos, _ = Ledger(summary.run_dir).read()
    assert videos[["status", "reason", "reason_code"]].values.tolist() == [
        ["failed", "decode_timeout: no progress (no new frame) for 2 s", "decode_timeout"]]
