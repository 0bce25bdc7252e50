"""Hostile shards: keys and tar member names the writer could not have written (`../`, absolute paths) are
refused wherever shards are read: verify fails, the loader never yields them, nothing is written outside an
output folder."""

from __future__ import annotations

import json

import pytest

from jobs.cli import main
from shards.loader import ShardLoader
from shards.manifest import Manifest
from curation.testing.fake_runs import repack_hostile
from tests.shards.conftest import loader_config

# name -> (keys, members) given the victim's key; each is one way an attacker names a file outside a folder
CASES = {
    "manifest key ../": lambda k, o: ({k: "../outside/x"}, {}),
    "manifest key absolute": lambda k, o: ({k: f"/../../../..{o}/x"}, {}),
    "tar member ../": lambda k, o: ({}, {k: {"mp4": f"../outside/{k}.mp4"}}),
    "tar member absolute": lambda k, o: ({}, {k: {"mp4": f"{o}/{k}.mp4"}}),
}


@pytest.fixture
def victim(shards_copy):
    return str(Manifest.load(str(shards_copy)).samples["key"].iloc[3])


def _hostile(shards_copy, victim, case, outside):
    keys, members = CASES[case](victim, outside)
    repack_hostile(shards_copy, keys, members)
    return keys.get(victim, victim)


def test_repacked_shards_are_valid_when_no_name_is_hostile(shards_copy, capsys):
    """The attack helper itself: a repack without hostile names verifies OK (so the refusals below are the
    names', not the repack's)."""
    repack_hostile(shards_copy)
    assert main(["shards", "verify", str(shards_copy)]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize("case", list(CASES))
def test_verify_refuses_hostile_names(case, shards_copy, victim, tmp_path, capsys):
    key = _hostile(shards_copy, victim, case, tmp_path / "outside")
    assert main(["shards", "verify", str(shards_copy)]) == 1
    out = capsys.readouterr().out
    refused = [line for line in out.splitlines() if line.startswith("  REFUSED")]
    why = "absolute path" if "absolute" in case else "climbs out of its folder"
    if case.startswith("manifest"):  # the manifest's key, and the four tar members named after it
        assert refused[0].startswith(f"  REFUSED {key}: key") and len(refused) == 5, out
    else:
        assert len(refused) == 1 and "member" in refused[0], out
    assert all(why in line for line in refused)
    assert f"FAILED: {len(refused)} names the writer could not have written" in out
    assert "BAD" not in out, "checksums all agree: only the name gives it away"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("output", ["raw", "tensors"])
def test_loader_never_yields_hostile_samples(case, output, shards_copy, victim, tmp_path):
    key = _hostile(shards_copy, victim, case, tmp_path / "outside")
    loader = ShardLoader(loader_config(shards_copy, epochs=1, remainder="uneven", output=output))
    batches = list(loader)
    got = [k for b in batches for k in b["key"]]
    assert len(got) == len(set(got)), "no sample repeated in place of the refused one"
    if case.startswith("manifest"):  # left out of the plan, counted
        assert key not in got and loader.num_refused == 1 and loader.num_corrupt == 0 and len(got) == 11
    elif output == "raw":  # the tar headers are parsed: the sample is skipped as corrupt, counted
        assert key not in got and loader.num_refused == 0 and loader.num_corrupt == 1 and len(got) == 11
        assert not any(name.startswith(("/", "..")) for b in batches for files in b["files"] for name in files)
    else:  # tensors read member data at the manifest's offsets: the tar's names never reach training
        assert victim in got and loader.num_corrupt == 0


@pytest.mark.parametrize("case", list(CASES))
def test_compacted_copy_writes_nothing_outside_its_folder(case, shards_copy, victim, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    key = _hostile(shards_copy, victim, case, outside)
    out = tmp_path / "out"
    assert main(["shards", "query", str(shards_copy), "true", "--compact", str(out)]) == 0
    assert list(outside.iterdir()) == []
    assert all(p.resolve().is_relative_to(out.resolve()) for p in out.rglob("*"))
    skipped = {s["key"]: s["reason"] for s in json.loads((out / "info.json").read_text())["skipped"]}
    assert list(skipped) == [key] and ("refused" in skipped[key] or "member" in skipped[key])
    assert main(["shards", "verify", str(out)]) == 0


def test_a_hostile_shard_name_is_refused_before_anything_is_opened(shards_copy, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(shards_copy / "shards.parquet")
    names = table.column("shard").to_pylist()
    names[1] = f"../{tmp_path.name}/outside.tar"
    pq.write_table(table.set_column(0, "shard", pa.array(names)), shards_copy / "shards.parquet")
    assert main(["shards", "verify", str(shards_copy)]) != 0
    err = capsys.readouterr().err
    assert "lists 1 shards lvd could not have written" in err and "climbs out of its folder" in err
    with pytest.raises(ValueError, match="do not read these shards"):
        ShardLoader(loader_config(shards_copy))
