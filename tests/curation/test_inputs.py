from pathlib import Path

import fsspec

from curation.inputs import VIDEO_EXTENSIONS, discover


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_files_folders_globs_lists_and_urls(tmp_path):
    a = _touch(tmp_path / "a.mp4")
    b = _touch(tmp_path / "deep" / "er" / "b ü.MOV")
    notes = _touch(tmp_path / "deep" / "notes.md")
    _touch(tmp_path / "deep" / ".hidden.mp4")
    c = _touch(tmp_path / "other" / "c.mkv")
    odd = _touch(tmp_path / "other" / "video.bin")
    lst = tmp_path / "list.txt"
    lst.write_text(f"# my videos\n{c}\nother/video.bin\n\nmissing.mp4\n")

    found = discover([str(a), str(tmp_path / "deep"), str(tmp_path / "oth*" / "*.mkv"), f"@{lst}", str(a)], VIDEO_EXTENSIONS)
    by_source = {v.source: v.skip_reason for v in found}
    assert list(by_source) == [str(a), str(notes), str(b), str(c), str(odd), str(tmp_path / "missing.mp4")]
    assert by_source[str(a)] is None and by_source[str(b)] is None and by_source[str(c)] is None
    assert by_source[str(notes)].startswith("not_a_video_extension: .md")
    assert by_source[str(odd)] is None  # named directly in a list: tried whatever its extension
    assert by_source[str(tmp_path / "missing.mp4")].startswith("not_found")
    assert len({v.video_id for v in found}) == len(found)


def test_fsspec_urls_are_listed_without_downloading():
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/raw/x.mp4", b"1")
    fs.pipe("/bucket/raw/sub/y.webm", b"2")
    fs.pipe("/bucket/raw/readme.txt", b"3")
    found = discover(["memory://bucket/raw", "memory://bucket/nope.mp4"], VIDEO_EXTENSIONS)
    got = {v.source: v.skip_reason for v in found}
    assert got["memory:///bucket/raw/x.mp4"] is None
    assert got["memory:///bucket/raw/sub/y.webm"] is None
    assert got["memory:///bucket/raw/readme.txt"].startswith("not_a_video_extension")
    assert got["memory://bucket/nope.mp4"].startswith("not_found")
