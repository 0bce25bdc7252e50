"""Per-clip embeddings (the ledger's clip_embedding) as a binary shard member: written exactly, out of the json,
shapes in the manifest, verified, copied by compaction and precompute, read by the loader only when asked."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from curation.ledger import Ledger
from jobs.cli import main
from shards.config import ShardWriteConfig
from shards.loader import ShardLoader
from shards.manifest import Manifest, part_name
from shards.reader import SampleReader
from shards.source import EMBEDDING_FILE, embedding_array
from curation.testing.fake_runs import fake_run
from shards.writer import rewrite_shards, write_shards
from tests.shards.conftest import NUM_CLIPS, NUM_FRAMES, SHARD_BYTES, SIZES, loader_config

D = 768  # a real CLIP width: 3 x 768 float32 = 9 KB per clip


@pytest.fixture(scope="module")
def emb_run(tmp_path_factory):
    """The conftest's run (same clips, scores, captions) plus clip_embedding; clips 1, 5, 9, 13 have none."""
    run = tmp_path_factory.mktemp("emb") / "run"
    fake_run(run, num_clips=NUM_CLIPS, num_frames=NUM_FRAMES, fps=8.0, sizes=SIZES, captions=True, embedding_dim=D)
    return run


@pytest.fixture(scope="module")
def emb_shards(emb_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb_shards") / "kept"
    write_shards(emb_run, out, ShardWriteConfig(shard_max_bytes=SHARD_BYTES))
    return out


@pytest.fixture(scope="module")
def ledger_embeddings(emb_run) -> dict[str, np.ndarray | None]:
    """{clip_id: K x D float32 or None} of the kept clips, as the ledger holds them."""
    ledger = Ledger(emb_run).read()[1]
    return {row["clip_id"]: (np.stack(row["clip_embedding"]) if row["clip_embedding"] is not None else None)
            for row in ledger.to_dict("records") if row["keep"]}


def _member(manifest: Manifest, key: str, ext: str) -> tuple[int, int]:
    """(absolute offset in its shard, size) of a member of sample `key`."""
    rec = manifest.samples.set_index("key").loc[key]
    m = next(m for m in rec["members"] if m["ext"] == ext)
    return int(rec["offset"]) + int(m["offset"]), int(m["size"])


def test_writer_puts_exact_embeddings_into_a_member_not_the_json(emb_shards, shards_dir, ledger_embeddings):
    from safetensors.numpy import load

    manifest = Manifest.load(str(emb_shards))
    assert "clip_embedding" not in manifest.samples.columns  # arrays stay out of the manifest...
    plain = Manifest.load(str(shards_dir)).samples.set_index("key")
    reader, plain_reader = SampleReader(str(emb_shards)), SampleReader(str(shards_dir))
    with_emb = [k for k, v in ledger_embeddings.items() if v is not None]
    assert 0 < len(with_emb) < len(ledger_embeddings) == len(manifest.samples)
    for rec in manifest.samples.to_dict("records"):
        key, want = rec["key"], ledger_embeddings[rec["key"]]
        files = {ext: bytes(v) for ext, v in reader.read(rec, verify=True).items()}
        doc = json.loads(files["json"])
        assert "clip_embedding" not in doc
        # ...and the json is the one a run without embeddings writes, byte for byte
        assert files["json"] == bytes(plain_reader.read(plain.loc[key].to_dict() | {"key": key})["json"])
        if want is None:
            assert EMBEDDING_FILE not in files and rec["clip_embedding_shape"] is None
            assert EMBEDDING_FILE not in rec["files"]
            continue
        tensors = load(files[EMBEDDING_FILE])
        assert list(tensors) == ["clip_embedding"] and tensors["clip_embedding"].dtype == np.float32
        assert np.array_equal(tensors["clip_embedding"], want)
        assert list(rec["clip_embedding_shape"]) == [3, D]
        assert EMBEDDING_FILE in rec["files"]
    # the shape column selects without opening a tar
    got = manifest.samples["key"].iloc[manifest.select("clip_embedding_shape is not null")]
    assert sorted(got) == sorted(with_emb)


def test_embedded_shards_are_deterministic(emb_run, emb_shards, tmp_path):
    write_shards(emb_run, tmp_path / "again", ShardWriteConfig(shard_max_bytes=SHARD_BYTES))
    again, first = Manifest.load(str(tmp_path / "again")), Manifest.load(str(emb_shards))
    assert again.shards.to_dict("records") == first.shards.to_dict("records")


def test_bad_embedding_cell_skips_the_clip_with_a_reason(tmp_path):
    run = tmp_path / "run"
    clips = fake_run(run, num_clips=3, dropped_every=0, failed=0, embedding_dim=4, unembedded_every=0)
    [path] = Ledger(run).clip_files()  # the 3 clips of one video: one file
    table = pq.read_table(path)
    victim = clips.loc[1, "clip_id"]
    embeddings = table.column("clip_embedding").to_pylist()
    embeddings[table.column("clip_id").to_pylist().index(victim)] = [[0.1, 0.2, 0.3, 0.4], [0.5]]  # ragged: not K x D
    i = table.schema.get_field_index("clip_embedding")
    pq.write_table(table.set_column(i, "clip_embedding", pa.array(embeddings, table.schema.field(i).type)), path)
    summary = write_shards(run, tmp_path / "out")
    assert summary.num_samples == 2 and [s.key for s in summary.skipped] == [victim]
    assert summary.skipped[0].reason.startswith("embedding: clip_embedding is not a K x D array")


@pytest.mark.parametrize("value, want", [
    (None, None), (float("nan"), None), ([], None),
    ([[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]]),
    (np.array([np.array([1, 2], np.float32), np.array([3, 4], np.float32)], dtype=object), [[1.0, 2.0], [3.0, 4.0]]),
])
def test_embedding_cells(value, want):
    got = embedding_array(value, "clip_embedding")
    assert (got is None) if want is None else (got.dtype == np.float32 and got.tolist() == want)


def test_embedding_cell_of_the_wrong_rank_is_refused():
    with pytest.raises(ValueError, match=r"shape \[3\], not K x D"):
        embedding_array([1.0, 2.0, 3.0], "clip_embedding")


def test_verify_and_stats_see_the_member(emb_shards, ledger_embeddings, tmp_path, capsys):
    assert main(["shards", "stats", str(emb_shards)]) == 0
    n = sum(v is not None for v in ledger_embeddings.values())
    assert f"clip_embedding {n}" in capsys.readouterr().out
    copy = tmp_path / "copy"
    shutil.copytree(emb_shards, copy)
    manifest = Manifest.load(str(copy))
    victim = next(k for k, v in ledger_embeddings.items() if v is not None)
    shard = manifest.samples.set_index("key").loc[victim, "shard"]
    at, size = _member(manifest, victim, EMBEDDING_FILE)
    data = bytearray((copy / shard).read_bytes())
    data[at + size // 2] ^= 0x01  # inside the float data: the safetensors still parses
    (copy / shard).write_bytes(bytes(data))
    assert main(["shards", "verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"BAD {shard}: checksum" in out
    assert f"{victim}: crc32 mismatch" in out and "damaged members: emb.safetensors" in out
    assert out.count("crc32 mismatch") == 1


def _batches(config, manifest=None, plan=None):
    loader = ShardLoader(config, manifest=manifest, plan=plan)
    return list(loader), loader


@pytest.mark.parametrize("num_workers,planned", [(0, False), (2, False), (2, True)])
def test_loader_returns_the_exact_embeddings_and_a_mask(emb_shards, ledger_embeddings, num_workers, planned, tmp_path):
    config = loader_config(emb_shards, read_embeddings=True, epochs=1, remainder="uneven", image_ratio=0.5,
                           num_workers=num_workers)
    plan = None
    if planned:  # a plan written once: its embedding shapes come from plan.json
        from shards.plan_file import write_plan

        write_plan(Manifest.load(str(emb_shards)), config, tmp_path / "plan", epochs=1)
        plan = str(tmp_path / "plan")
    batches, loader = _batches(config, plan=plan)
    seen = set()
    assert {b["kind"] for b in batches} == {"video", "image"}
    for batch in batches:
        emb, mask = batch["clip_embedding"], batch["clip_embedding_mask"]
        assert emb.dtype == torch.float32 and emb.shape == (len(batch["key"]), 3, D)
        assert mask.dtype == torch.bool and mask.shape == (len(batch["key"]),)
        for i, key in enumerate(batch["key"]):
            want = ledger_embeddings[key]
            if want is None:
                assert not mask[i] and not emb[i].any()
            else:
                assert mask[i] and torch.equal(emb[i], torch.from_numpy(want))
            seen.add(key)
    assert seen == set(ledger_embeddings) and loader.num_corrupt == 0
    assert any(v is None for v in ledger_embeddings.values())


def test_without_the_flag_nothing_changes_and_the_member_is_not_read(emb_shards, shards_dir):
    kw = dict(epochs=1, remainder="uneven", image_ratio=0.5)
    plain, _ = _batches(loader_config(shards_dir, **kw))
    loader = ShardLoader(loader_config(emb_shards, **kw))
    manifest = loader.manifest
    emb_ranges = {}
    for key in manifest.samples["key"]:
        if EMBEDDING_FILE in manifest.samples.set_index("key").loc[key, "files"]:
            shard = manifest.samples.set_index("key").loc[key, "shard"]
            emb_ranges.setdefault(shard, []).append(_member(manifest, key, EMBEDDING_FILE))
    reads: list[tuple[str, int, int]] = []
    read_spans = loader.maker.reader.read_spans

    def spy(shard, spans, into=None):
        reads.extend((shard, o, n) for o, n in spans)
        return read_spans(shard, spans, into)

    loader.maker.reader.read_spans = spy
    got = list(loader)
    assert reads and not [(s, o, n) for s, o, n in reads for a, m in emb_ranges.get(s, ())
                          if o < a + m and a < o + n], "no read touches an emb.safetensors member"
    assert len(got) == len(plain)
    for a, b in zip(plain, got):
        assert a.keys() == b.keys() and "clip_embedding" not in b
        assert a["key"] == b["key"] and a["caption"] == b["caption"] and a["meta"] == b["meta"]
        frames = "latents_BTCHW" if a["kind"] == "latents" else "frames_BTCHW"
        assert torch.equal(a[frames], b[frames])
        assert a["scores"].keys() == b["scores"].keys()
        assert all(np.array_equal(a["scores"][c].numpy(), b["scores"][c].numpy(), equal_nan=True) for c in a["scores"])
    # the flag adds the embeddings and changes nothing else
    flagged, _ = _batches(loader_config(emb_shards, read_embeddings=True, **kw))
    for a, b in zip(got, flagged):
        assert set(b) - set(a) == {"clip_embedding", "clip_embedding_mask"}
        assert a["key"] == b["key"] and torch.equal(a["frames_BTCHW"], b["frames_BTCHW"])


@pytest.mark.parametrize("damage", ["header", "data"])
def test_a_corrupt_member_is_a_corrupt_sample(emb_shards, ledger_embeddings, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(emb_shards, copy)
    manifest = Manifest.load(str(copy))
    victim = [k for k, v in ledger_embeddings.items() if v is not None][2]
    shard = manifest.samples.set_index("key").loc[victim, "shard"]
    at, size = _member(manifest, victim, EMBEDDING_FILE)
    data = bytearray((copy / shard).read_bytes())
    if damage == "header":
        data[at + 7] = 0x7F  # the safetensors header length: now far past the member's end
    else:
        data[at + size - 3] ^= 0x10  # a float that still parses: only its crc32 tells
    (copy / shard).write_bytes(bytes(data))
    kw = dict(epochs=1, remainder="uneven", image_ratio=1.0, verify_samples=damage == "data")
    batches, loader = _batches(loader_config(copy, read_embeddings=True, **kw))
    assert loader.num_corrupt == 1
    keys = [k for b in batches for k in b["key"]]
    assert victim not in keys and set(keys) == set(ledger_embeddings) - {victim}
    for batch in batches:
        for i, key in enumerate(batch["key"]):
            want = ledger_embeddings[key]
            assert bool(batch["clip_embedding_mask"][i]) == (want is not None)
            if want is not None:
                assert torch.equal(batch["clip_embedding"][i], torch.from_numpy(want))
    _, unflagged = _batches(loader_config(copy, **kw))
    assert unflagged.num_corrupt == 0  # the member is not read without read_embeddings


def test_compaction_and_precompute_keep_the_member(emb_shards, ledger_embeddings, tmp_path, capsys):
    from safetensors.torch import save

    source = Manifest.load(str(emb_shards))
    query = "motion_score < 0.3"
    assert main(["shards", "query", str(emb_shards), query, "--compact", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    compact = Manifest.load(str(tmp_path / "c"))
    want_keys = set(source.samples["key"].iloc[source.select(query)])
    assert set(compact.samples["key"]) == want_keys
    assert {ledger_embeddings[k] is None for k in want_keys} == {True, False}, "the subset mixes both kinds"
    src, reader = SampleReader(str(emb_shards)), SampleReader(str(tmp_path / "c"))
    by_key = source.samples.set_index("key")
    for rec in compact.samples.to_dict("records"):
        shape = rec["clip_embedding_shape"]
        assert (None if shape is None else list(shape)) == (None if ledger_embeddings[rec["key"]] is None else [3, D])
        if shape is not None:
            a = bytes(reader.read(rec)[EMBEDDING_FILE])
            assert a == bytes(src.read(by_key.loc[rec["key"]].to_dict() | {"key": rec["key"]})[EMBEDDING_FILE])

    # precompute's path: every member copied, latents added; the loader then reads latents and embeddings
    def add_latents(key, members):
        return {"latents.safetensors": save({"latents": torch.full((2, 4, 4, 6), float(len(key)))})}

    rows = np.flatnonzero(source.samples["width"].to_numpy() > source.samples["height"].to_numpy())
    rewrite_shards(source, rows, tmp_path / "lat", ShardWriteConfig(shard_max_bytes="60KB"), add_latents)
    lat = Manifest.load(str(tmp_path / "lat"))
    assert lat.samples["latents_shape"].notna().all()
    batches, _ = _batches(loader_config(tmp_path / "lat", read_embeddings=True, epochs=1, remainder="uneven"))
    keys = []
    for batch in batches:
        assert batch["kind"] == "latents"
        for i, key in enumerate(batch["key"]):
            want = ledger_embeddings[key]
            assert bool(batch["clip_embedding_mask"][i]) == (want is not None)
            expected = torch.from_numpy(want) if want is not None else torch.zeros(3, D)
            assert torch.equal(batch["clip_embedding"][i], expected)
            keys.append(key)
    assert sorted(keys) == sorted(lat.samples["key"]) and len(keys) == len(rows)


def test_read_embeddings_on_shards_without_them_or_with_mixed_shapes_says_what_to_do(shards_dir, emb_shards, tmp_path):
    with pytest.raises(ValueError, match="no sample of the subset.*set read_embeddings=false"):
        ShardLoader(loader_config(shards_dir, read_embeddings=True))
    ShardLoader(loader_config(shards_dir, read_embeddings=True, output="raw"))  # raw reads every member anyway
    mixed = tmp_path / "mixed"
    shutil.copytree(emb_shards, mixed)
    samples = Manifest.load(str(mixed)).samples
    row = samples["clip_embedding_shape"].first_valid_index()
    part = mixed / part_name(samples.at[row, "shard"])  # one sample's shape as another CLIP model's
    table = pq.read_table(part)
    local = table.column("key").to_pylist().index(samples.at[row, "key"])
    shapes = table.column("clip_embedding_shape").to_pylist()
    shapes[local] = [3, 512]
    pq.write_table(table.set_column(table.schema.get_field_index("clip_embedding_shape"), "clip_embedding_shape",
                                    pa.array(shapes, pa.list_(pa.int64()))), part)
    with pytest.raises(ValueError, match=r"shapes \[\(3, 512\), \(3, 768\)\].*one model"):
        ShardLoader(loader_config(mixed, read_embeddings=True))
