"""Submit to a running Ray cluster through the Ray Jobs API (the dashboard's job server, port 8265).

The current directory travels with the job as its runtime-env working_dir (minus caches, virtual envs and
the command's own output folder), so the recipe and any local code changes reach the cluster; the job's
entry point is the same `lvd ...` command, with `--address auto` for Ray pipelines so they join the
cluster the job runs on instead of starting a Ray of their own.

Token authentication (Ray >= 2.52; `ray start` turns it on when ~/.ray/auth_token exists, `ray.init()` by
default): lvd finds the token the way Ray does, RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then
~/.ray/auth_token, and sends it as a bearer header. The default file is sent only to a loopback address
(a cluster started on this machine) unless RAY_AUTH_MODE=token says it belongs to the remote cluster too:
a token is a credential, and a mistyped --address should not receive it. A token sent to another machine
over plain http (readable on the way) gets a one-line warning; https or a tunnel to loopback does not.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

from common.config import Config, ConfigError
from jobs.backends import Backend, JobError, JobState, JobStatus
from jobs.records import JobRecord, utc_now
from jobs.submit import JobSpec

# Never worth uploading: version control, environments, caches (Ray also honours .gitignore and .rayignore).
DEFAULT_EXCLUDES = [".git", ".venv", "venv", "__pycache__", ".pytest_cache", "*.egg-info", ".lvd"]
# Ray's job server answers 500 "No available agent" for a few seconds after a node starts.
AGENT_WAIT_S = 60.0
REQUEST_TIMEOUT_S = 15.0

_STATES = {"PENDING": JobState.PENDING, "RUNNING": JobState.RUNNING, "SUCCEEDED": JobState.SUCCEEDED,
           "FAILED": JobState.FAILED, "STOPPED": JobState.STOPPED}


class RayJobsOptions(Config):
    """`lvd submit --backend ray` settings."""

    address: str | None = None               # the dashboard: http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS)
    excludes: list[str] = []                 # more working-dir paths/globs not to upload
    entrypoint_num_cpus: float | None = None  # reserve these for the lvd process itself (places it on a fitting node)
    entrypoint_num_gpus: float | None = None


def dashboard_address(address: str | None) -> str:
    """The Jobs API base URL, from --address or the environment variables Ray's own CLI reads."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address or address == "auto":
        raise ConfigError("--backend ray needs --address: the cluster's dashboard, e.g. http://HEAD:8265 "
                          "(or set RAY_API_SERVER_ADDRESS)")
    if address.startswith("ray://"):
        raise ConfigError(f"{address} is a Ray Client address; jobs are submitted to the dashboard's job server, "
                          "e.g. --address http://HEAD:8265")
    if "://" not in address:
        address = f"http://{address}"
    if urlsplit(address).scheme not in ("http", "https"):
        raise ConfigError(f"--address {address}: use http://HEAD:8265 or https://...")
    return address.rstrip("/")


def _is_loopback(address: str) -> bool:
    host = urlsplit(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_token(address: str) -> tuple[str | None, str]:
    """(token, where it came from) for a cluster at `address`; (None, reason) when lvd sends none."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise JobError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({e.strerror}); point it at the token file") from None
        if not token:
            raise JobError(f"RAY_AUTH_TOKEN_PATH={path} is empty; point it at the cluster's token file")
        return token, f"RAY_AUTH_TOKEN_PATH={path}"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and (mode == "token" or _is_loopback(address)):
        token = default.read_text().strip()
        return (token, str(default)) if token else (None, f"{default} is empty")
    return None, "no token configured"


def auth_headers(address: str) -> dict[str, str]:
    token, source = auth_token(address)
    if not token:
        return {}
    if urlsplit(address).scheme != "https" and not _is_loopback(address):
        _warn_clear_text(address, source)
    return {"Authorization": f"Bearer {token}"}


@functools.cache  # once per address and process (`lvd jobs list --refresh` asks one cluster many times)
def _warn_clear_text(address: str, source: str) -> None:
    print(f"warning: sending the Ray auth token ({source}) to {address} over plain http: anyone on the network "
          "path can read it and run code on the cluster. Use an https:// address (TLS in front of the dashboard) "
          "or an SSH tunnel (ssh -L 8265:127.0.0.1:8265 HEAD, then --address http://127.0.0.1:8265)",
          file=sys.stderr)


def _auth_help(address: str, status: int) -> str:
    _, source = auth_token(address)
    if status == 401:
        return (f"the Ray cluster at {address} requires an authentication token and lvd sent none ({source}). "
                "Set RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on the head node prints it), "
                "or RAY_AUTH_TOKEN_PATH to a file holding it, or RAY_AUTH_MODE=token to send ~/.ray/auth_token")
    return (f"the Ray cluster at {address} rejected the token lvd sent (from {source}); "
            "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to this cluster's token")


def _check_reachable(address: str, headers: dict[str, str]) -> None:
    """A quick GET with a time limit: the Jobs SDK's own requests have none and hang on a filtered port."""
    import requests

    try:
        r = requests.get(f"{address}/api/version", headers=headers, timeout=REQUEST_TIMEOUT_S)
    except requests.exceptions.RequestException as e:
        if isinstance(e, requests.exceptions.Timeout):
            reason = f"no answer within {REQUEST_TIMEOUT_S:.0f} s"
        else:
            reason = "connection refused" if "refused" in str(e).lower() else e.__class__.__name__
        raise JobError(f"cannot reach the Ray job server at {address} ({reason}); check the "
                       "cluster is up and that this is its dashboard address (http://HEAD:8265, not the GCS "
                       "port 6379 nor a ray:// client address)") from None
    if r.status_code in (401, 403):
        raise JobError(_auth_help(address, r.status_code))
    if r.status_code != 200:
        raise JobError(f"{address}/api/version answered HTTP {r.status_code}; is this a Ray dashboard with the "
                       "job server (ray[default])?")


class RayJobsBackend(Backend):
    name = "ray"

    def __init__(self, options: RayJobsOptions | None = None):
        self.options = options or RayJobsOptions()

    def _client(self, address: str):
        from ray.job_submission import JobSubmissionClient

        # The SDK logs every upload and websocket event at INFO; lvd says what matters itself.
        for name in ("ray.dashboard", "ray._private.runtime_env"):
            logging.getLogger(name).setLevel(logging.WARNING)

        headers = auth_headers(address)
        _check_reachable(address, headers)
        try:
            return JobSubmissionClient(address, headers=headers)
        except Exception as e:  # the SDK raises plain ConnectionError/RuntimeError/AuthenticationError
            raise JobError(f"Ray job server at {address}: {e}") from None

    def request(self, spec: JobSpec) -> dict:
        """The submit_job arguments (what --dry-run prints)."""
        if spec.output_is_relative():
            raise ConfigError(f"output {spec.output!r} is relative: on a Ray cluster the job runs in a temporary "
                              "copy of the working directory, which is deleted; write to a shared absolute path "
                              "or a URL, e.g. --set output=/shared/runs/x or s3://bucket/runs/x")
        extra: tuple[str, ...] = ()
        if spec.launch == "ray":
            if spec.has_option("--address"):
                raise ConfigError("remove --address from the lvd command: on a Ray cluster the job joins the "
                                  "cluster it runs on (lvd adds --address auto)")
            extra = ("--address", "auto")
        excludes = [*DEFAULT_EXCLUDES, *self.options.excludes]
        out = spec.output_path
        if out and "://" not in out and Path(out).is_relative_to(spec.cwd):
            excludes.append("/" + str(Path(out).relative_to(spec.cwd)))  # never upload earlier results
        request = {
            "submission_id": spec.name,
            "entrypoint": spec.entrypoint(*extra),
            "runtime_env": {"working_dir": str(spec.cwd), "excludes": excludes,
                            "env_vars": {"PYTHONUNBUFFERED": "1", **spec.env}},
            "metadata": {"lvd_name": spec.name, "lvd_command": spec.command},
        }
        for key in ("entrypoint_num_cpus", "entrypoint_num_gpus"):
            if getattr(self.options, key) is not None:
                request[key] = getattr(self.options, key)
        return request

    def render(self, spec: JobSpec) -> str:
        address = dashboard_address(self.options.address)
        return json.dumps({"address": address, **self.request(spec)}, indent=2)

    def submit(self, spec: JobSpec) -> JobRecord:
        address = dashboard_address(self.options.address)
        request = self.request(spec)
        recipe = spec.recipe_path
        if recipe is not None and not recipe.is_relative_to(spec.cwd):
            print(f"note: the recipe {recipe} is outside the working directory that travels with the job; "
                  "the cluster must see it at that path (shared filesystem)", file=sys.stderr)
        client = self._client(address)
        print(f"uploading {spec.cwd} as the job's working directory", file=sys.stderr)
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                job_id = client.submit_job(**request)
                break
            except (RuntimeError, ValueError) as e:  # ValueError: e.g. a working directory over Ray's size limit
                if "No available agent" in str(e) and time.monotonic() < deadline:
                    time.sleep(1.0)  # a node that just started; its job agent comes up within seconds
                    continue
                raise JobError(f"the Ray cluster at {address} refused the job: {e}") from None
        return JobRecord(name=spec.name, backend="ray", job_id=job_id, command=list(spec.argv),
                         recipe=str(recipe) if recipe else None, output=spec.output_path, cwd=str(spec.cwd),
                         submitted_at=utc_now(), info={"address": address, "entrypoint": request["entrypoint"]})

    def status(self, record: JobRecord) -> JobStatus:
        client = self._client(record.info["address"])
        try:
            info = client.get_job_info(record.job_id)
        except RuntimeError as e:
            raise JobError(f"job {record.job_id} on {record.info['address']}: {e}") from None
        raw = str(getattr(info.status, "value", info.status))
        detail = f"Ray {raw}" + (f": {info.message}" if info.message else "")
        return JobStatus(_STATES.get(raw, JobState.UNKNOWN), detail)

    def logs(self, record: JobRecord, out: TextIO, follow: bool = False) -> None:
        client = self._client(record.info["address"])
        try:
            if not follow:
                out.write(client.get_job_logs(record.job_id))
                out.flush()
                return

            async def tail() -> None:
                async for chunk in client.tail_job_logs(record.job_id):
                    out.write(chunk)
                    out.flush()

            asyncio.run(tail())
        except RuntimeError as e:
            raise JobError(f"logs of job {record.job_id} on {record.info['address']}: {e}") from None

    def cancel(self, record: JobRecord) -> None:
        client = self._client(record.info["address"])
        try:
            client.stop_job(record.job_id)
        except RuntimeError as e:
            raise JobError(f"cannot stop job {record.job_id} on {record.info['address']}: {e}") from None
