"""A real two-node Ray cluster on loopback for the job tests: `ray start --head --block` plus one
`ray start --block --address` worker, each in its own session, with its own temp dir, HOME and ports.

Stopped by signalling exactly these two processes (a blocking `ray start` takes down the Ray processes it
started); never `ray stop`, which would kill every Ray on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalRayCluster:
    address: str            # the dashboard / Jobs API, http://127.0.0.1:PORT
    gcs_address: str
    home: Path              # HOME of the cluster: holds .ray/auth_token
    temp_dir: Path
    logs: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()

    def stop(self) -> None:
        # A blocking `ray start` shuts its own processes down on SIGTERM; whatever of its session is left
        # after that (nothing, normally) is killed.
        for proc in reversed(self.procs):  # worker first, then the head
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def node_ids(self) -> set[str]:
        import requests

        r = requests.get(f"{self.address}/nodes?view=summary", headers={"Authorization": f"Bearer {self.token}"},
                         timeout=10)
        return {n["raylet"]["nodeId"] for n in r.json()["data"]["summary"]}

    def leftover_pids(self) -> list[int]:
        """Processes still running with this cluster's temp dir in their command line."""
        out = subprocess.run(["pgrep", "-f", str(self.temp_dir)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               # the jobs call `lvd` by name, as on a cluster whose nodes have lvd installed
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               RAY_DISABLE_DOCKER_CPU_WARNING="1")
    return env


def _wait(what: str, ready, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up; its log ({log}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def start_cluster(root: Path, head_cpus: int = 2, worker_cpus: int = 1, timeout_s: float = 120.0) -> LocalRayCluster:
    import requests

    home = root / "home"
    (home / ".ray").mkdir(parents=True, exist_ok=True)
    token_file = home / ".ray" / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    # Ray's socket paths must stay under 107 characters: a short temp dir, not pytest's long tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="lvdray", dir="/tmp"))
    env = _env(home)
    port, dashboard = free_port(), free_port()
    cluster = LocalRayCluster(address=f"http://127.0.0.1:{dashboard}", gcs_address=f"127.0.0.1:{port}",
                              home=home, temp_dir=temp_dir, logs=root)
    common = ["--block", "--temp-dir", str(temp_dir), "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
              "--object-store-memory", str(150 * 1024 * 1024)]
    head = [RAY, "start", "--head", "--port", str(port), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard), "--include-dashboard", "true", "--num-cpus", str(head_cpus),
            "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()), *common]
    worker = [RAY, "start", "--address", cluster.gcs_address, "--num-cpus", str(worker_cpus),
              "--dashboard-agent-listen-port", str(free_port()), *common]
    headers = {"Authorization": f"Bearer {cluster.token}"}

    def nodes_alive() -> int:
        try:
            r = requests.get(f"{cluster.address}/nodes?view=summary", headers=headers, timeout=5)
            return sum(1 for n in r.json()["data"]["summary"] if n["raylet"]["state"] == "ALIVE")
        except Exception:
            return 0

    def gcs_open() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    def launch(name: str, cmd: list[str]) -> tuple[subprocess.Popen, Path]:
        log = root / f"ray-{name}.log"
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        cluster.procs.append(proc)
        return proc, log

    try:
        # The worker can start as soon as the head's GCS listens; both then come up together.
        _wait("the Ray head's GCS", gcs_open, *launch("head", head), timeout_s)
        proc, log = launch("worker", worker)
        _wait("the two Ray nodes", lambda: nodes_alive() >= 2, proc, log, timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster
