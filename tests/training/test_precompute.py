"""Precomputed latents and text states: what lands in the shards is what the VAE and the text tower make of the
loader's decoded clip, and training reads those shards (latents batches, no VAE or text work) as it reads
decoded ones."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from common.config import validate
from tests.training.train_helpers import make_shards, shard_data, stage_tree

pytestmark = pytest.mark.timeout(400)
RES = [(32, 48), (48, 32)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.training.conftest import build_tiny
    from training.model.export import save_pretrained
    from training.precompute import PrecomputeConfig, precompute

    root = tmp_path_factory.mktemp("precompute")
    shards = make_shards(root)
    model = build_tiny(seed=1)
    save_pretrained(model, root / "model")
    config = PrecomputeConfig(shards=str(shards), output=str(root / "latents"), model=str(root / "model"),
                              num_frames=4, fps=4.0, resolutions=RES, batch_size=4)
    summary = precompute(config)
    return root, shards, model, summary


def _first_batch_by_key(loader_config):
    from shards.loader import ShardLoader

    return {b["key"][0]: b for b in ShardLoader(loader_config)}


def test_precomputed_latents_are_the_vae_of_the_decoded_clip(setup):
    from shards.config import LoaderConfig
    from shards.manifest import Manifest

    root, shards, model, summary = setup
    out = Manifest.load(str(root / "latents"))
    assert summary.num_encoded == summary.num_samples == len(out.samples) == 9
    assert {tuple(s) for s in out.samples["latents_shape"]} == {(4, 4, 8, 12), (4, 4, 12, 8)}
    assert {tuple(s) for s in out.samples["text_shape"]} == {(16, 32)}  # context length x tower width

    common = dict(batch_size=1, num_frames=[4], fps=4.0, resolutions=RES, num_workers=0, shuffle=False, epochs=1,
                  remainder="uneven")
    decoded = _first_batch_by_key(LoaderConfig(shards=str(shards), clip_start="start", latents="ignore", **common))
    stored = _first_batch_by_key(LoaderConfig(shards=str(root / "latents"), latents="require", **common))
    assert decoded.keys() == stored.keys()
    for key, batch in stored.items():
        assert batch["kind"] == "latents"
        with torch.no_grad():
            want = model.encode_frames(decoded[key]["frames_BTCHW"].float() / 127.5 - 1.0)
            captions = [c["text"] for c in batch["meta"][0]["captions"]]
            states = model.text_encoder.tower(model.text_encoder.tokenize(captions))[1]
        torch.testing.assert_close(batch["latents_BTCHW"], want, rtol=1e-4, atol=1e-5)
        # one of the clip's captions, as the tower's token states (the projection trains, so it is not applied)
        assert any(torch.allclose(batch["text_BLD"][0], s, atol=1e-5) for s in states)


def test_training_reads_precomputed_shards(setup, tmp_path):
    from training.loop import Trainer
    from training.stage_config import TrainConfig

    root, *_ = setup
    out = tmp_path / "stage"
    data = shard_data(root / "latents", batch_size=2, image_ratio=0.0)
    config = validate(TrainConfig, stage_tree(out, data, steps=2, init_from=str(root / "model"),
                                              checkpoint={"every": 10}))
    summary = Trainer(config).run()
    assert summary.steps == 2 and summary.final_loss is not None and math.isfinite(summary.final_loss)
    assert summary.data_wait_fraction < 0.5


@pytest.mark.slow
def test_precompute_on_ray_tasks_gives_the_same_shards(setup, tmp_path, monkeypatch):
    """workers=2: one Ray task per source shard, two at a time; the latents and text states are those of the
    in-process run."""
    from safetensors.torch import load

    from shards.manifest import Manifest
    from shards.reader import SampleReader
    from training.precompute import PrecomputeConfig, precompute

    root, shards, _, _ = setup
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    summary = precompute(PrecomputeConfig(shards=str(shards), output=str(tmp_path / "ray"), model=str(root / "model"),
                                          num_frames=4, fps=4.0, resolutions=RES, batch_size=4, workers=2))
    assert summary.num_encoded == 9

    def tensors(folder):
        m = Manifest.load(str(folder))
        reader = SampleReader(m.root)
        return {rec["key"]: {ext: load(bytes(v)) for ext, v in reader.read(rec).items() if ext.endswith("safetensors")}
                for rec in m.samples.to_dict("records")}

    a, b = tensors(tmp_path / "ray"), tensors(root / "latents")
    assert a.keys() == b.keys()
    for key in a:
        assert set(a[key]) == set(b[key]) == {"latents.safetensors", "text.safetensors"}
        for ext in a[key]:
            for name in a[key][ext]:
                torch.testing.assert_close(a[key][ext][name], b[key][ext][name], rtol=1e-4, atol=1e-5)


@pytest.fixture
def corrupt_latents(setup, tmp_path):
    """A copy of the precomputed shards with a flipped byte in sample 4's latents (still a valid tensor)."""
    import shutil

    import numpy as np

    from shards.manifest import Manifest

    root, *_ = setup
    shards = tmp_path / "shards"
    shutil.copytree(root / "latents", shards)
    manifest = Manifest.load(str(shards))
    offset, size, _ = (int(a[0]) for a in manifest.member_ranges(np.array([4]), "latents.safetensors"))
    rec = manifest.samples.iloc[4]
    with open(shards / rec["shard"], "r+b") as f:
        f.seek(int(rec["offset"]) + offset + size - 3)  # in the tensor data, not its header
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    return shards


def test_training_skips_a_corrupt_sample_and_the_metrics_line_counts_it(setup, corrupt_latents, tmp_path, capsys):
    """The loader's crc32 check skips the sample, and the log line and metrics.jsonl say so."""
    import json

    from training.loop import Trainer
    from training.stage_config import TrainConfig

    root, *_ = setup
    out = tmp_path / "stage"
    # 9 samples in batches of 2, padded: 5 steps read every sample once
    data = shard_data(corrupt_latents, batch_size=2, image_ratio=0.0, shuffle=False, max_corrupt_fraction=0.2)
    config = validate(TrainConfig, stage_tree(out, data, steps=5, init_from=str(root / "model"),
                                              checkpoint={"every": 10}))
    Trainer(config).run()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    counts = [json.loads(line)["num_corrupt"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(counts) == [0, 0, 0, 0, 1]
    assert sum("| corrupt 1 |" in line for line in lines) == 1 and sum("| corrupt 0 |" in line for line in lines) == 4


def test_a_run_past_the_corrupt_ceiling_stops_with_one_line(setup, corrupt_latents, tmp_path, capsys):
    from tests.training.train_helpers import write_recipe
    from training.run import main

    root, *_ = setup
    data = shard_data(corrupt_latents, batch_size=2, image_ratio=0.0, shuffle=False, max_corrupt_fraction=0.0)
    recipe = write_recipe(tmp_path / "stage.yaml", stage_tree(tmp_path / "stage", data, steps=5,
                                                              init_from=str(root / "model"), checkpoint={"every": 10}))
    assert main([str(recipe)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("training.run: 1 of the ") and "max_corrupt_fraction (0.0)" in err[-1]
    assert "lvd shards verify" in err[-1] and "Traceback" not in "\n".join(err)


def _precompute_config(root, shards, output, **kw):
    from training.precompute import PrecomputeConfig

    return PrecomputeConfig(shards=str(shards), output=str(output), model=str(root / "model"), num_frames=4, fps=4.0,
                            resolutions=RES, batch_size=4, **kw)


def test_precompute_writes_one_shard_per_source_shard_no_per_sample_files_and_resumes_per_shard(
        setup, tmp_path, monkeypatch):
    import os
    import tempfile

    import training.precompute as pre
    from shards.manifest import Manifest

    root, shards, _, _ = setup
    source = Manifest.load(str(shards))
    renamed: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(str(b)), real_replace(a, b))[1])
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    out = tmp_path / "out"
    first = pre.precompute(_precompute_config(root, shards, out))
    m = Manifest.load(str(out))
    n = len(source.shards)
    assert first.num_encoded == first.num_samples == len(source.samples) == 9 and len(m.shards) == n > 1
    # what became visible: each shard and its manifest file once, then the index; nothing per sample
    assert len(renamed) == 2 * n + 3 and all(Path(p).parent in (out, out / "manifest") for p in renamed)
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(
        [*m.shards["shard"], "shards.parquet", "info.json", "writer.json"])
    assert list((tmp_path / "tmp").iterdir()) == []
    # output shard g holds exactly the samples of source shard g
    for g, shard in enumerate(source.shards["shard"]):
        want = set(source.samples.loc[source.samples["shard"] == shard, "key"])
        assert set(m.samples.loc[m.samples["shard"] == m.shards["shard"].iloc[g], "key"]) == want

    # a run killed while writing shard 1: its tar was still a temporary file, its manifest file not written
    victim = m.shards["shard"].iloc[1]
    sha = dict(zip(m.shards["shard"], m.shards["sha256"]))
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    (out / victim).rename(out / f".{victim}.tmp")
    (out / "manifest" / victim.replace(".tar", ".parquet")).unlink()
    (out / "info.json").unlink()
    encoded: list[str] = []
    real_encode = pre.encode_batch
    monkeypatch.setattr(pre, "encode_batch", lambda c, b: (encoded.extend(b["key"]), real_encode(c, b))[1])
    again = pre.precompute(_precompute_config(root, shards, out))
    assert sorted(encoded) == sorted(source.samples.loc[source.samples["shard"] == source.shards["shard"].iloc[1], "key"])
    assert again.num_encoded == len(encoded) and again.num_samples == 9
    m2 = Manifest.load(str(out))
    assert dict(zip(m2.shards["shard"], m2.shards["sha256"])) == sha, "the same bytes as the uninterrupted run"
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar") if p.name != victim} == \
        {k: v for k, v in mtimes.items() if k != victim}, "finished shards were not rewritten"
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("key", ["../outside/x", "ABSOLUTE"])
def test_precompute_never_writes_outside_its_output_folder(setup, tmp_path, key):
    import json
    import shutil

    from shards.manifest import Manifest
    from curation.testing.fake_runs import repack_hostile
    from training.precompute import precompute

    root, shards, _, _ = setup
    outside = tmp_path / "outside"
    outside.mkdir()
    key = f"/../../../..{outside}/x" if key == "ABSOLUTE" else key
    hostile = tmp_path / "hostile"
    shutil.copytree(shards, hostile)
    victim = str(Manifest.load(str(hostile)).samples["key"].iloc[2])
    repack_hostile(hostile, keys={victim: key})
    out = tmp_path / "out"
    summary = precompute(_precompute_config(root, hostile, out))
    assert list(outside.iterdir()) == [] and not Path(f"{key}.latents.safetensors").exists()
    assert all(p.resolve().is_relative_to(out.resolve()) for p in out.rglob("*"))
    skipped = json.loads((out / "info.json").read_text())["skipped"]
    assert [s["key"] for s in skipped] == [key] and "refused" in skipped[0]["reason"]
    assert summary.num_encoded == summary.num_samples == 8
