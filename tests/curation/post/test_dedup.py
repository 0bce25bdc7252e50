import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from common.config import ConfigError, validate
from curation.post.dedup import DedupConfig, apply_dedup, clip_vectors, near_components

D = 8


def _unit(angle: float, d: int = D) -> list[float]:
    """A unit vector in the plane of the first two axes: cos(angle between _unit(a), _unit(b)) = cos(a - b)."""
    v = np.zeros(d, dtype=np.float32)
    v[0], v[1] = math.cos(angle), math.sin(angle)
    return v.tolist()


def _emb(vec, k: int = 3) -> list[list[float]]:
    return [list(vec) for _ in range(k)]


def _clips(n, *, hashes=None, embeddings=None, duration=None, keep=None, aesthetic=None):
    df = pd.DataFrame({
        "clip_id": [f"c{i}" for i in range(n)],
        "duration_s": np.asarray(duration if duration is not None else [5.0] * n, dtype=float),
        "content_hash": hashes if hashes is not None else [None] * n,
        "clip_embedding": embeddings if embeddings is not None else [None] * n,
        "keep": keep if keep is not None else [True] * n,
    })
    df["decision"] = np.where(df["keep"], "", "motion_score 0 < min 0.01")
    if aesthetic is not None:
        df["aesthetic"] = np.asarray(aesthetic, dtype=float)
    return df


def _cfg(**kw) -> DedupConfig:
    return DedupConfig(**kw)


# --- exact -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule, fields, survivor_a, survivor_b", [
    # group a = c0, c1, c2; group b = c3, c4
    ("longest", {"duration": [3.0, 9.0, 4.0, 2.0, 2.0]}, "c1", "c3"),  # tie in b -> smallest clip_id
    ("aesthetic", {"aesthetic": [6.0, 4.0, 6.5, 5.0, 5.5]}, "c2", "c4"),
    ("aesthetic", {"aesthetic": [6.0, 6.0, np.nan, 5.0, 5.0]}, "c0", "c3"),  # ties -> clip_id; NaN last
    ("first", {"duration": [1.0, 9.0, 9.0, 9.0, 1.0]}, "c0", "c3"),
])
def test_exact_duplicates_collapse_to_one_survivor_chosen_by_the_keep_rule(rule, fields, survivor_a, survivor_b):
    clips = _clips(6, hashes=["a", "a", "a", "b", "b", "z"], **{k: v + [1.0] for k, v in fields.items()})
    out, funnel = apply_dedup(clips, _cfg(near=False, keep=rule))
    kept = out.loc[out["keep"], "clip_id"].tolist()
    assert kept == sorted([survivor_a, survivor_b, "c5"])
    for i, group_survivor in [(0, survivor_a), (1, survivor_a), (2, survivor_a), (3, survivor_b), (4, survivor_b)]:
        row = out.iloc[i]
        if row["clip_id"] == group_survivor:
            assert row["decision"] == "" and row["dup_of"] is None and np.isnan(row["dup_similarity"])
        else:
            assert row["decision"] == f"duplicate: exact of {group_survivor}"
            assert row["dup_of"] == group_survivor and row["dup_similarity"] == 1.0
    assert [(s.name, s.count) for s in funnel] == [("dedup exact", 3)]


def test_aesthetic_rule_without_the_column_names_the_fix():
    clips = _clips(2, hashes=["a", "a"])
    with pytest.raises(ValueError, match="enable the aesthetic stage.*or set dedup.keep to longest or first"):
        apply_dedup(clips, _cfg(keep="aesthetic"))


def test_thresholds_must_run_first():
    clips = _clips(2).drop(columns=["keep"])
    with pytest.raises(ValueError, match="apply_thresholds"):
        apply_dedup(clips, _cfg())


# --- near ------------------------------------------------------------------------------------------

def test_near_duplicates_link_just_above_the_threshold_and_not_just_below():
    thr = 0.95
    above, below = math.acos(thr + 2e-4), math.acos(thr - 2e-4)
    embeddings = [_emb(_unit(0.0)), _emb(_unit(above)),            # pair 1: cosine 0.9502
                  _emb(_unit(2.0)), _emb(_unit(2.0 + below))]      # pair 2: cosine 0.9498
    clips = _clips(4, embeddings=embeddings, duration=[2.0, 3.0, 2.0, 3.0])
    out, funnel = apply_dedup(clips, _cfg(exact=False, near_threshold=thr))
    assert out["keep"].tolist() == [False, True, True, True]
    assert out["dup_of"].tolist() == ["c1", None, None, None]
    assert out["dup_similarity"][0] == pytest.approx(thr + 2e-4, abs=1e-6)
    assert out["decision"][0] == "duplicate: near c1 cosine 0.950"
    assert [(s.name, s.count) for s in funnel] == [("dedup near", 3)]
    # threshold 1.0 links only identical vectors
    same = _clips(3, embeddings=[_emb(_unit(0.3)), _emb(_unit(0.3)), _emb(_unit(0.31))])
    out, _ = apply_dedup(same, _cfg(exact=False, near_threshold=1.0, keep="first"))
    assert out["keep"].tolist() == [True, False, True]


def test_clip_vector_is_the_renormalised_mean_of_the_frame_embeddings():
    frames = [_unit(0.0), _unit(math.pi / 2), _unit(0.0)]  # mean (2, 1) / 3 -> (2, 1) / sqrt(5)
    rows, vecs = clip_vectors([frames, None, [], [[0.0] * D] * 3, [[float("nan")] * D] * 3, _unit(0.0)])
    assert rows.tolist() == [0, 5]  # missing, empty, zero and NaN embeddings are skipped; a D vector is K=1
    assert vecs[0][:2] == pytest.approx([2 / math.sqrt(5), 1 / math.sqrt(5)], abs=1e-6)
    # per-frame cosines to e1 are 1, 0, 1, but the clip vector's cosine is 2 / sqrt(5) = 0.894
    clips = _clips(2, embeddings=[frames, _emb(_unit(0.0))])
    assert apply_dedup(clips, _cfg(exact=False, near_threshold=0.89))[0]["keep"].sum() == 1
    assert apply_dedup(clips, _cfg(exact=False, near_threshold=0.90))[0]["keep"].sum() == 2


def test_mixed_embedding_sizes_are_an_error_naming_the_fix():
    clips = _clips(2, embeddings=[_emb(_unit(0.0, 8)), _emb(_unit(0.0, 4))])
    with pytest.raises(ValueError, match="different CLIP models.*one model"):
        apply_dedup(clips, _cfg())


def test_linking_is_transitive_one_survivor_per_chain():
    # A ~ B (0.96) and B ~ C (0.96) but A !~ C (cos 2t = 0.8432): one component, one survivor
    t = math.acos(0.96)
    embeddings = [_emb(_unit(0.0)), _emb(_unit(t)), _emb(_unit(2 * t))]
    out, _ = apply_dedup(_clips(3, embeddings=embeddings), _cfg(exact=False, keep="first"))
    assert out["keep"].tolist() == [True, False, False]
    assert out["dup_of"].tolist() == [None, "c0", "c0"]
    # dup_similarity is the cosine to the survivor, which may lie below the threshold
    assert out["dup_similarity"][1:].tolist() == pytest.approx([0.96, 2 * 0.96**2 - 1], abs=1e-6)
    assert out["decision"][2] == "duplicate: near c0 cosine 0.843"
    out, _ = apply_dedup(_clips(3, embeddings=embeddings, duration=[1, 9, 1]), _cfg(exact=False))
    assert out["keep"].tolist() == [False, True, False] and out["dup_of"].tolist() == ["c1", None, "c1"]


def _random_clips(n: int, seed: int) -> pd.DataFrame:
    """Clustered random clips: several components of various sizes at threshold 0.9, plus some rows without
    a hash/embedding, some exact duplicates and some already dropped."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n // 5, 16))
    vec = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.normal(size=(n, 16))
    embeddings = [(v + 0.05 * rng.normal(size=(3, 16))).astype(np.float32).tolist() for v in vec]
    for i in rng.choice(n, n // 20, replace=False):
        embeddings[i] = None
    hashes = [f"h{h}" if h < n // 2 else None for h in rng.integers(0, n, n)]
    keep = rng.random(n) > 0.1
    return _clips(n, hashes=hashes, embeddings=embeddings, duration=rng.integers(1, 5, n).astype(float),
                  keep=keep.tolist())


def test_block_size_does_not_change_the_result():
    clips = _random_clips(300, seed=0)
    reference, ref_funnel = apply_dedup(clips, _cfg(near_threshold=0.9, block_size=4096))
    near = reference["decision"].str.startswith("duplicate: near")
    assert near.sum() > 20 and reference["decision"].str.startswith("duplicate: exact").sum() > 5
    assert reference.loc[near, "dup_of"].value_counts().max() >= 3  # some groups have several members
    for block in (2, 7, 64, 299):
        out, funnel = apply_dedup(clips, _cfg(near_threshold=0.9, block_size=block))
        pd.testing.assert_frame_equal(out, reference)
        assert funnel == ref_funnel
    rows, vecs = clip_vectors(clips["clip_embedding"])
    labels = near_components(vecs, 0.9, 4096)
    _, first_member = np.unique(labels, return_index=True)
    assert labels.max() + 1 < len(labels) and np.all(np.diff(first_member) > 0)  # numbered by first member
    for block in (3, 5, 128):
        assert np.array_equal(near_components(vecs, 0.9, block), labels)


def test_collapsing_known_components_inside_a_tile_does_not_change_the_labels(monkeypatch):
    import curation.post.dedup as dedup

    # three random-walk chains of 80 (neighbours ~0.95, far members well below 0.9: a max over a collapsed
    # component finds links that a min or any single member would miss) spread over every tile, plus 60
    # loose singletons
    rng = np.random.default_rng(4)
    chains = []
    for _ in range(3):
        x = rng.normal(size=16)
        walk = [x / np.linalg.norm(x)]
        for _ in range(79):
            x = walk[-1] + 0.075 * rng.normal(size=16)
            walk.append(x / np.linalg.norm(x))
        chains.append(np.array(walk))
    vec = np.concatenate(chains + [rng.normal(size=(60, 16))])[rng.permutation(300)]
    vec = (vec / np.linalg.norm(vec, axis=1, keepdims=True)).astype(np.float32)
    monkeypatch.setattr(dedup, "COLLAPSE_MIN", 10**9)
    plain = near_components(vec, 0.9, 32)
    assert plain.max() + 1 == 63 and sorted(np.bincount(plain))[-3:] == [80, 80, 80]
    collapsed = []
    original = dedup._collapse

    def spy(v, parent, span):
        nodes, sorted_runs = original(v, parent, span)
        collapsed.append(nodes is not None)
        return nodes, sorted_runs

    monkeypatch.setattr(dedup, "COLLAPSE_MIN", 4)
    monkeypatch.setattr(dedup, "_collapse", spy)
    assert np.array_equal(near_components(vec, 0.9, 32), plain)
    assert sum(collapsed) > 10  # the collapse path did run


def test_result_does_not_depend_on_row_order():
    clips = _random_clips(200, seed=1)
    reference, ref_funnel = apply_dedup(clips, _cfg(near_threshold=0.9, block_size=32))
    reference = reference.set_index("clip_id").sort_index()
    rng = np.random.default_rng(2)
    for _ in range(5):
        shuffled = clips.iloc[rng.permutation(len(clips))].reset_index(drop=True)
        out, funnel = apply_dedup(shuffled, _cfg(near_threshold=0.9, block_size=32))
        pd.testing.assert_frame_equal(out.set_index("clip_id").sort_index(), reference)
        assert funnel == ref_funnel


# --- rows left alone -------------------------------------------------------------------------------

def test_already_dropped_clips_are_untouched_and_never_survivors():
    e = _emb(_unit(0.0))
    clips = _clips(4, hashes=["a", "a", "a", None], embeddings=[e, e, e, e], duration=[1.0, 2.0, 9.0, 9.0],
                   keep=[True, True, False, False])
    out, funnel = apply_dedup(clips, _cfg())
    assert out["keep"].tolist() == [False, True, False, False]
    assert out["decision"].tolist() == ["duplicate: exact of c1", "", "motion_score 0 < min 0.01",
                                        "motion_score 0 < min 0.01"]
    assert out["dup_of"].tolist() == ["c1", None, None, None]
    assert [(s.name, s.count) for s in funnel] == [("dedup exact", 1), ("dedup near", 1)]


def test_rows_without_hash_or_embedding_are_kept_and_untouched():
    e = _emb(_unit(0.0))
    clips = _clips(6, hashes=["a", "a", None, "", None, None],
                   embeddings=[None, None, e, e, None, float("nan")])
    out, funnel = apply_dedup(clips, _cfg())
    # c0/c1 share a hash; c2/c3 share an embedding; c4, c5 have neither and are never grouped
    assert out["keep"].tolist() == [True, False, True, False, True, True]
    assert out["decision"].tolist() == ["", "duplicate: exact of c0", "", "duplicate: near c2 cosine 1.000", "", ""]
    assert [(s.name, s.count) for s in funnel] == [("dedup exact", 5), ("dedup near", 4)]


def test_exact_runs_before_near_and_options_can_be_switched_off():
    e0, e1 = _emb(_unit(0.0)), _emb(_unit(0.01))  # cosine 0.99995
    clips = _clips(4, hashes=["a", "a", "b", None], embeddings=[e0, e0, e1, None], duration=[1, 2, 3, 4])
    out, funnel = apply_dedup(clips, _cfg())
    assert out["decision"].tolist()[:3] == ["duplicate: exact of c1", "duplicate: near c2 cosine 1.000", ""]
    assert [(s.name, s.count) for s in funnel] == [("dedup exact", 3), ("dedup near", 2)]
    out, funnel = apply_dedup(clips, _cfg(exact=False))
    assert out["keep"].tolist() == [False, False, True, True] and [s.name for s in funnel] == ["dedup near"]
    out, funnel = apply_dedup(clips, _cfg(exact=False, near=False))
    assert out["keep"].all() and funnel == [] and out["dup_of"].isna().all()


def test_rerunning_on_its_own_output_changes_nothing_and_survives_parquet():
    clips = _random_clips(120, seed=3)
    once, funnel = apply_dedup(clips, _cfg(near_threshold=0.9))
    table = pa.Table.from_pandas(once, preserve_index=False)
    assert table.schema.field("clip_embedding").type == pa.list_(pa.list_(pa.float64()))
    again, funnel2 = apply_dedup(table.to_pandas(), _cfg(near_threshold=0.9))  # embeddings as numpy arrays
    pd.testing.assert_frame_equal(again.drop(columns="clip_embedding"), once.drop(columns="clip_embedding"))
    assert funnel2[-1] == funnel[-1]


# --- config ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tree, fix", [
    ({"near_threshold": 0.0}, r"must lie in \(0, 1\].*dedup.near=false"),
    ({"near_threshold": 1.5}, r"must lie in \(0, 1\]"),
    ({"block_size": 0}, "at least 1"),
    ({"keep": "best"}, "longest"),
    ({"treshold": 0.9}, "did you mean near_threshold"),
])
def test_config_errors_name_the_fix(tree, fix):
    with pytest.raises(ConfigError, match=fix):
        validate(DedupConfig, tree, source="dedup")
