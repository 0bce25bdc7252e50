"""What a local run exposes to the network: nothing. The listening sockets of an embedded `lvd curate` (the
driver and every Ray process it starts: GCS, raylet and object manager, workers, agents) and of a local
`lvd train` (torch.distributed, gloo, DeepSpeed), polled with psutil while each runs, all bind loopback."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from curation.testing.synthetic import hard_cuts, moving_square, write_video
from tests.curation.conftest import make_config
from tests.training.train_helpers import stage_tree, synthetic_data, write_recipe

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def _listening_while_running(cmd: list[str]) -> tuple[dict[tuple[str, int], str], str]:
    """Runs `cmd` (a new session, so its whole tree is found and nothing else), polling every listening TCP
    socket and bound UDP socket of the tree until it exits: {(address, port): process}, and the output."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    root = psutil.Process(proc.pid)
    seen: dict[tuple[str, int], str] = {}
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in family:
            try:
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN or (c.type == 2 and c.laddr):  # 2: SOCK_DGRAM
                        seen[(c.laddr.ip, c.laddr.port)] = p.name()
            except psutil.Error:  # gone between listing and asking
                pass
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    return seen, out


def _not_loopback(seen: dict[tuple[str, int], str]) -> dict[tuple[str, int], str]:
    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip.split("%")[0])
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket on loopback
        return (mapped or address).is_loopback

    return {key: name for key, name in seen.items() if not loopback(key[0])}


def test_embedded_curation_listens_on_loopback_only(tmp_path):
    videos = tmp_path / "videos"
    write_video(videos / "cut.mp4", hard_cuts([30], 60, speed=2), 24)
    write_video(videos / "square.mp4", moving_square(48, speed=3), 24)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_config(tmp_path, [videos], text={"enabled": False}).model_dump(mode="json")))
    seen, out = _listening_while_running([sys.executable, "-m", "jobs.cli", "curate", str(recipe), "--no-progress",
                                          "--set", "ray.num_cpus=2"])
    assert "funnel" in out.lower(), out[-2000:]
    names = set(seen.values())
    assert {"gcs_server", "raylet"} <= names, seen  # Ray's servers were up while polled: the check means something
    assert _not_loopback(seen) == {}


def test_local_training_listens_on_loopback_only(tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", stage_tree(
        tmp_path / "out", synthetic_data(num_samples=2, batch_size=2), steps=4, deepspeed={"zero_stage": 2},
        checkpoint={"every": 2}, logging={"every": 1, "report_to": []}))
    seen, out = _listening_while_running([sys.executable, "-m", "jobs.cli", "train", str(recipe)])
    assert "steps 0->4 on 1 rank(s)" in out, out[-2000:]
    assert _not_loopback(seen) == {}
