"""Subset queries over the manifest (fixed bounds, percentiles, subset files, compaction), verify and stats."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from jobs.cli import main
from shards.manifest import Manifest
from shards.query import QueryError, evaluate
from tests.shards.conftest import loader_config


@pytest.fixture(scope="module")
def manifest(shards_dir) -> Manifest:
    return Manifest.load(str(shards_dir))


def test_fixed_bounds_select_exactly_the_matching_samples(manifest):
    s = manifest.samples
    got = manifest.select("aesthetic >= 4.5 and motion_score between 0.05 and 0.4 and text_area < 0.07")
    want = np.flatnonzero((s["aesthetic"] >= 4.5) & s["motion_score"].between(0.05, 0.4) & (s["text_area"] < 0.07))
    assert 0 < len(want) < len(s), "the fake scores make this a proper subset"
    assert got.tolist() == want.tolist()


def test_percentile_is_svd_style_drop_bottom_over_the_whole_manifest(manifest):
    s = manifest.samples
    a = s["aesthetic"].dropna()
    got = manifest.select("aesthetic >= percentile(aesthetic, 25)")
    assert got.tolist() == np.flatnonzero(s["aesthetic"] >= np.percentile(a, 25)).tolist()
    # computed over the manifest, not over what other conditions leave
    combined = manifest.select("motion_score > 0.2 and aesthetic >= pct(aesthetic, 25)")
    assert set(combined) == set(got) & set(np.flatnonzero(s["motion_score"] > 0.2))
    # missing scores fail every comparison and are found with `is null`
    missing = manifest.select("aesthetic is null")
    assert len(missing) == s["aesthetic"].isna().sum() > 0 and not set(missing) & set(got)


def test_boolean_strings_lists_and_not(manifest):
    s = manifest.samples
    vid = s["video_id"].iloc[0]
    assert manifest.select(f"video_id == '{vid}'").tolist() == np.flatnonzero(s["video_id"] == vid).tolist()
    assert manifest.select(f"not video_id in ('{vid}')").tolist() == np.flatnonzero(s["video_id"] != vid).tolist()
    assert len(manifest.select("keep and pass_motion_score")) == len(s)
    assert len(manifest.select("motion_bucket not between 0 and 300")) == 0


@pytest.mark.parametrize("query, message", [
    ("aesthtic > 3", "did you mean aesthetic"),
    ("aesthetic > 'high'", "compares text with a number"),
    ("motion_score", "not true/false"),
    ("aesthetic > 3 motion_score < 1", "join conditions with and / or"),
    ("aesthetic >= percentile(aesthetic, 120)", r"must be in \[0, 100\]"),
    ("__import__('os')", "unknown column '__import__'"),  # nothing is evaluated as Python
    ("aesthetic > 3; 1", "cannot read the query"),
])
def test_bad_queries_say_what_is_wrong(query, message):
    frame = pd.DataFrame({"aesthetic": [1.0, 5.0], "motion_score": [0.1, 0.2]})
    with pytest.raises(QueryError, match=message):
        evaluate(query, frame)


def test_subset_file_and_compacted_copy_read_the_same_samples(shards_dir, tmp_path, capsys):
    from shards.loader import ShardLoader

    query = "motion_score < 0.3"
    subset = tmp_path / "stage.parquet"
    assert main(["shards", "query", str(shards_dir), query, "--out", str(subset), "--compact", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    manifest = Manifest.load(str(shards_dir))
    want = set(manifest.samples["key"].iloc[manifest.select(query)])
    assert f"{len(want)} of {len(manifest.samples)} samples" in out

    def keys(config):
        return {k for batch in ShardLoader(config) for k in batch["key"]}

    by_query = keys(loader_config(shards_dir, query=query, epochs=1, remainder="uneven", output="raw"))
    by_subset = keys(loader_config(shards_dir, subset=str(subset), epochs=1, remainder="uneven", output="raw"))
    compacted = keys(loader_config(tmp_path / "c", epochs=1, remainder="uneven", output="raw"))
    assert by_query == by_subset == compacted == want


def test_verify_finds_a_flipped_byte_and_names_the_sample(shards_copy, capsys):
    manifest = Manifest.load(str(shards_copy))
    victim = manifest.samples.iloc[4]
    path = shards_copy / victim["shard"]
    data = bytearray(path.read_bytes())
    at = int(victim["offset"]) + int(victim["size_bytes"]) // 2  # inside the sample's data
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    assert main(["shards", "verify", str(shards_copy), "--quick"]) == 0  # sizes alone cannot see it
    capsys.readouterr()
    assert main(["shards", "verify", str(shards_copy)]) == 1
    out = capsys.readouterr().out
    assert f"BAD {victim['shard']}: checksum" in out and f"{victim['key']}: crc32 mismatch" in out
    others = [s for s in manifest.shards["shard"] if s != victim["shard"]]
    assert not any(f"BAD {s}" in out for s in others)


def test_verify_finds_a_truncated_and_a_missing_shard(shards_copy, capsys):
    shards = sorted(shards_copy.glob("shard-*.tar"))
    with open(shards[1], "r+b") as f:
        f.truncate(shards[1].stat().st_size - 700)
    shards[2].unlink()
    assert main(["shards", "verify", str(shards_copy)]) == 1
    out = capsys.readouterr().out
    assert f"BAD {shards[1].name}: truncated" in out and f"BAD {shards[2].name}: missing" in out


def test_stats_prints_counts_and_score_distributions(shards_dir, capsys):
    manifest = Manifest.load(str(shards_dir))
    assert main(["shards", "stats", str(shards_dir), "--query", "motion_score < 0.3"]) == 0
    out = capsys.readouterr().out
    n = int((manifest.samples["motion_score"] < 0.3).sum())
    assert f"{len(manifest.samples)} samples" in out and f"selected: {n} samples" in out
    line = next(line for line in out.splitlines() if line.startswith("motion_score"))
    values = manifest.samples.loc[manifest.samples["motion_score"] < 0.3, "motion_score"]
    assert int(line.split()[1]) == n
    assert float(line.split()[6]) == pytest.approx(values.max(), rel=1e-3)


@pytest.mark.parametrize("query, message", [
    ("read_csv('/etc/passwd')", "unknown column 'read_csv'"),               # no functions but pct/percentile
    ("aesthetic > (select 1)", "expected a column, number or string"),      # no subqueries
    ("aesthetic > 1 union select 1", "join conditions with and / or"),
    ("video_id == 'a' or 1=1 --'", "cannot read the query"),
    ("aesthetic > 1e999", "out of range"),
    ("captions == 'x'", "holds lists or records"),
])
def test_queries_compile_to_sql_without_a_way_out(query, message):
    table = pa.table({"aesthetic": [1.0, 5.0], "video_id": ["a", "b"],
                      "captions": pa.array([[], []], pa.list_(pa.string()))})
    with pytest.raises(QueryError, match=message):
        evaluate(query, table)


def test_quotes_nan_and_missing_values_behave_as_in_the_grammar():
    table = pa.table({"video_id": ["it's", 'say "hi"', None], "score": pa.array([1.0, float("nan"), None])})
    assert evaluate('''video_id == "it's"''', table).tolist() == [True, False, False]
    assert evaluate("""video_id == 'say "hi"'""", table).tolist() == [False, True, False]
    assert evaluate("video_id != 'x'", table).tolist() == [True, True, False]   # missing fails != too
    assert evaluate("score >= 0 or score < 0", table).tolist() == [True, False, False]  # NaN is missing
    assert evaluate("score is null", table).tolist() == [False, True, True]
    assert evaluate("score not between 5 and 9", table).tolist() == [True, False, False]
    assert evaluate("score >= pct(score, 0)", table).tolist() == [True, False, False]
