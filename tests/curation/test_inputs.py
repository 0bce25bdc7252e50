import os
from pathlib import Path

import fsspec
import pyarrow.parquet as pq

import curation.inputs as inputs
from curation.inputs import VIDEO_EXTENSIONS, Item, discover, expand, list_task, source_path


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_files_folders_globs_lists_and_urls(tmp_path):
    a = _touch(tmp_path / "a.mp4")
    b = _touch(tmp_path / "deep" / "er" / "b ü.MOV")
    _touch(tmp_path / "deep" / "notes.md")
    _touch(tmp_path / "deep" / "LICENSE")
    _touch(tmp_path / "deep" / ".hidden.mp4")
    c = _touch(tmp_path / "other" / "c.mkv")
    odd = _touch(tmp_path / "other" / "video.bin")
    lst = tmp_path / "list.txt"
    lst.write_text(f"# my videos\n{c}\nother/video.bin\n\nmissing.mp4\n")

    found, ignored = discover([str(a), str(tmp_path / "deep"), str(tmp_path / "oth*" / "*.mkv"), f"@{lst}", str(a)],
                              VIDEO_EXTENSIONS)
    by_source = dict(found)
    assert list(by_source) == [str(a), str(b), str(c), str(odd), str(tmp_path / "missing.mp4")]
    assert all(reason is None for reason in by_source.values())  # existence is the decode actor's check
    assert ignored == 2  # notes.md and LICENSE: counted, never input videos (the hidden file is not counted)


def test_fsspec_urls_are_listed_without_downloading():
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/raw/x.mp4", b"1")
    fs.pipe("/bucket/raw/sub/y.webm", b"2")
    fs.pipe("/bucket/raw/readme.txt", b"3")
    found, ignored = discover(["memory://bucket/raw", "memory://bucket/nope.mp4"], VIDEO_EXTENSIONS)
    got = dict(found)
    assert got["memory:///bucket/raw/x.mp4"] is None
    assert got["memory:///bucket/raw/sub/y.webm"] is None
    assert "memory:///bucket/raw/readme.txt" not in got and ignored == 1
    assert got["memory://bucket/nope.mp4"].startswith("not_found")


def test_a_listing_task_walks_a_bounded_number_of_folders_and_hands_back_the_rest(tmp_path, monkeypatch):
    for i in range(7):
        _touch(tmp_path / f"d{i}" / f"v{i}.mp4")
    monkeypatch.setattr(inputs, "MAX_DIRS_PER_TASK", 3)
    first = expand([Item("name", str(tmp_path))], VIDEO_EXTENSIONS)
    assert len(first.sources) == 2 and len(first.pending) == 5  # root + 2 folders walked, 5 left
    pending, n_found, _ = list_task(first.pending, VIDEO_EXTENSIONS, str(tmp_path), 8)
    assert n_found == 3 and len(pending) == 2
    part = pq.read_table(next(tmp_path.glob("part-*.parquet")))
    assert part.column_names == ["video_id", "source", "source_raw", "bucket", "skip_reason"]
    assert all(0 <= b < 8 for b in part.column("bucket").to_pylist())
    found, _ = discover([str(tmp_path)], VIDEO_EXTENSIONS)
    assert sorted(Path(s).name for s, _ in found) == [f"v{i}.mp4" for i in range(7)]


def test_a_path_that_is_not_utf8_is_listed_losslessly(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9-\xff.mp4"
    with open(raw, "wb") as f:
        f.write(b"x")
    list_task([Item("name", str(tmp_path))], VIDEO_EXTENSIONS, str(tmp_path), 4)
    row = pq.read_table(next(tmp_path.glob("part-*.parquet"))).to_pylist()[0]
    assert row["source_raw"] == raw and "\\xff" in row["source"]  # shown escaped, stored as bytes
    assert os.fsencode(source_path(row["source"], row["source_raw"])) == raw
