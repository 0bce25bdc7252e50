"""`lvd bench manifest` at a tiny size: its JSON, and that the measured rank read its own slice and no more."""

from __future__ import annotations

import json

import numpy as np

from jobs.cli import main
from shards.bench.manifest import QUERY, RANK, WORLD_SIZE, write_synthetic
from shards.manifest import Manifest


def test_bench_reports_the_named_keys_and_the_rank_reads_only_its_batches(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "manifest", "--rows", "20000", "--rows-per-file", "3000", "--json", str(out),
                 "--work-dir", str(tmp_path)]) == 0
    result = json.loads(out.read_text())
    assert {"rows", "query_s", "plan_s", "rank_peak_rss_mb"} <= set(result) and result["rows"] == 20000
    assert result["query_s"] > 0 and result["plan_s"] > 0 and 0 < result["rank_peak_rss_mb"] < 1024
    # the query is a proper subset, and the plan holds what it selects (8 samples a batch, remainder dropped)
    assert 0 < result["query_rows"] == result["plan_rows"] < 20000
    assert result["plan_batches"] * 8 <= result["plan_rows"] < (result["plan_batches"] + 3) * 8  # <= 3 buckets' rest
    # the rank read batches RANK, RANK + 8, ... of the epoch and nothing else
    m = result["plan_batches"] // WORLD_SIZE
    assert result["rank_batch_indices"] == [RANK + i * WORLD_SIZE for i in range(m)]
    assert result["rank_rows"] == 8 * m < result["plan_rows"] / (WORLD_SIZE - 1)
    assert "peak RSS" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("lvd-bench-manifest-")], "work folder removed"


def test_synthetic_manifest_has_the_writer_columns_and_member_ranges_inside_each_sample(tmp_path):
    write_synthetic(tmp_path, 2500, 1000)
    manifest = Manifest.load(str(tmp_path))
    assert manifest.num_samples == 2500 and len(manifest.shards) == 3
    t = manifest.table
    off, size, _ = manifest.member_ranges(np.arange(2500), "mp4")
    assert (off > 0).all() and (off + size <= t.column("size_bytes").to_numpy()).all()
    selected = manifest.select(QUERY)
    aesthetic = t.column("aesthetic").to_numpy(zero_copy_only=False)
    assert len(selected) and np.nanmin(aesthetic[selected]) >= np.nanpercentile(aesthetic, 20)
