"""Submit to Kubernetes as a KubeRay RayJob: the operator starts a Ray cluster from the manifest, runs the
lvd command as the job's entry point and tears the cluster down afterwards.

The recipe travels in a ConfigMap mounted at /lvd/recipe/ in every pod (owned by the RayJob, so it goes
when the RayJob goes); lvd itself comes from the image. Inputs and outputs must be reachable from the pods:
object storage (s3://, gs://) or PersistentVolumeClaims mounted with --volume CLAIM:PATH.

The manifest turns on Ray token authentication (`authOptions: {mode: token}`, KubeRay >= 1.5.1, Ray >= 2.52):
the operator generates the token and hands it to every Ray container. The head's dashboard (the Jobs API)
is set to listen on the pod network (`dashboard-host: 0.0.0.0`) explicitly rather than by the operator's
default: the operator and the submitter Job reach it through the head Service, so loopback would break
the job, and saying it here keeps it visible that the token is what guards it (`--ray-auth none` leaves
it open to every pod that can reach the Service; use it only with a NetworkPolicy or an older operator).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
from typing import Literal, TextIO

import pydantic
import yaml

from common.config import Config, ConfigError
from jobs.backends import Backend, JobError, JobState, JobStatus
from jobs.records import JobRecord, utc_now
from jobs.submit import JobSpec

RECIPE_DIR = "/lvd/recipe"
RECIPE_KEY = "recipe.yaml"
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?")
_CLAIM = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")

_STATES = {"PENDING": JobState.PENDING, "RUNNING": JobState.RUNNING, "SUCCEEDED": JobState.SUCCEEDED,
           "FAILED": JobState.FAILED, "STOPPED": JobState.STOPPED}


class KubeRayOptions(Config):
    """`lvd submit --backend kuberay` settings."""

    image: str | None = None          # an image with lvd installed (required)
    namespace: str | None = None      # default: kubectl's current namespace
    context: str | None = None        # kubectl context
    nodes: int = 1                    # Ray worker pods
    gpus_per_node: int = 0            # nvidia.com/gpu per worker pod
    cpus_per_node: int = 4
    mem: str = "16Gi"                 # per worker pod
    head_cpus: int = 2
    head_mem: str = "8Gi"
    volumes: list[str] = []           # CLAIM:MOUNT_PATH, mounted in every pod
    service_account: str | None = None
    ttl_s: int = 3600                 # seconds a finished RayJob stays for `lvd jobs status/logs`
    auth: Literal["token", "none"] = "token"

    @pydantic.field_validator("mem", "head_mem")
    @classmethod
    def _quantity(cls, v: str) -> str:
        if not _QUANTITY.fullmatch(v):
            raise ValueError(f"{v!r} is not a Kubernetes quantity; write e.g. 16Gi")
        return v

    @pydantic.field_validator("nodes", "cpus_per_node", "head_cpus")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be at least 1, got {v}")
        return v

    @pydantic.field_validator("volumes")
    @classmethod
    def _volumes(cls, v: list[str]) -> list[str]:
        for item in v:
            claim, sep, path = item.partition(":")
            if not sep or not _CLAIM.fullmatch(claim) or not path.startswith("/"):
                raise ValueError(f"volume {item!r} must be CLAIM:/mount/path, e.g. --volume datasets:/data")
        return v


def _ray_version() -> str:
    return importlib.metadata.version("ray")


class RayJobManifest:
    """The RayJob (and the recipe's ConfigMap) for one JobSpec."""

    def __init__(self, spec: JobSpec, options: KubeRayOptions):
        if not options.image:
            raise ConfigError("--backend kuberay needs --image: an image with this lvd installed "
                              "(e.g. built from this repository on top of rayproject/ray:" + _ray_version() + ")")
        if spec.output_is_relative():
            raise ConfigError(f"output {spec.output!r} is relative: a pod's working directory disappears with it; "
                              "write to a mounted volume (--volume CLAIM:/data, --set output=/data/runs/x) "
                              "or a URL (s3://bucket/runs/x)")
        if spec.launch == "ray" and spec.has_option("--address"):
            raise ConfigError("remove --address from the lvd command: the RayJob joins the cluster it runs on "
                              "(lvd adds --address auto)")
        self.spec = spec
        self.options = options

    @property
    def configmap_name(self) -> str:
        return f"{self.spec.name}-recipe"

    def entrypoint(self) -> str:
        spec = self.spec
        argv = spec.with_recipe(f"{RECIPE_DIR}/{RECIPE_KEY}") if spec.recipe else spec.argv
        extra = ["--address", "auto"] if spec.launch == "ray" else []
        return shlex.join(["lvd", *argv, *extra])

    def _labels(self) -> dict[str, str]:
        return {"app.kubernetes.io/managed-by": "lvd", "lvd.job": self.spec.name, "lvd.command": self.spec.command}

    def _metadata(self, name: str) -> dict:
        meta = {"name": name, "labels": self._labels()}
        if self.options.namespace:
            meta["namespace"] = self.options.namespace
        return meta

    def _volumes(self) -> tuple[list[dict], list[dict]]:
        volumes, mounts = [], []
        if self.spec.recipe:
            volumes.append({"name": "lvd-recipe", "configMap": {"name": self.configmap_name}})
            mounts.append({"name": "lvd-recipe", "mountPath": RECIPE_DIR, "readOnly": True})
        for i, item in enumerate(self.options.volumes):
            claim, _, path = item.partition(":")
            volumes.append({"name": f"data-{i}", "persistentVolumeClaim": {"claimName": claim}})
            mounts.append({"name": f"data-{i}", "mountPath": path})
        return volumes, mounts

    def _pod(self, container: str, cpus: int, mem: str, gpus: int, ports: list[dict] | None = None) -> dict:
        resources = {"cpu": str(cpus), "memory": mem}
        limits = {**resources, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
        env = [{"name": "PYTHONUNBUFFERED", "value": "1"}] + [{"name": k, "value": v} for k, v in self.spec.env.items()]
        volumes, mounts = self._volumes()
        c = {"name": container, "image": self.options.image, "env": env,
             "resources": {"requests": dict(resources), "limits": limits}}
        if ports:
            c["ports"] = ports
        if mounts:
            c["volumeMounts"] = mounts
        pod: dict = {"containers": [c]}
        if volumes:
            pod["volumes"] = volumes
        if self.options.service_account:
            pod["serviceAccountName"] = self.options.service_account
        return {"metadata": {"labels": {"lvd.job": self.spec.name}}, "spec": pod}

    def rayjob(self) -> dict:
        o, spec = self.options, self.spec
        head_ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                      {"containerPort": 10001, "name": "client"}]
        cluster: dict = {
            "rayVersion": _ray_version(),
            # Work goes to the workers; the head runs Ray's control plane and the lvd driver.
            # dashboard-host: the operator and the submitter reach the Jobs API through the head Service (see
            # the module docstring); the token guards it
            "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                              "template": self._pod("ray-head", o.head_cpus, o.head_mem, 0, head_ports)},
            "workerGroupSpecs": [{
                "groupName": "workers", "replicas": o.nodes, "minReplicas": o.nodes, "maxReplicas": o.nodes,
                "rayStartParams": {"num-gpus": str(o.gpus_per_node)} if o.gpus_per_node else {},
                "template": self._pod("ray-worker", o.cpus_per_node, o.mem, o.gpus_per_node),
            }],
        }
        if o.auth == "token":
            cluster["authOptions"] = {"mode": "token"}
        job_spec: dict = {
            "entrypoint": self.entrypoint(),
            "submissionMode": "K8sJobMode",  # the submitter Job (named after the RayJob) streams the logs
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": o.ttl_s,
            "backoffLimit": 0,
            "rayClusterSpec": cluster,
        }
        if spec.launch != "ray" and o.gpus_per_node:
            # A model job's driver does the GPU work itself, so it must run on a GPU worker, not the head.
            job_spec["entrypointNumGpus"] = o.gpus_per_node
        return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": self._metadata(spec.name), "spec": job_spec}

    def configmap(self, owner_uid: str | None = None) -> dict | None:
        if not self.spec.recipe:
            return None
        meta = self._metadata(self.configmap_name)
        if owner_uid:
            meta["ownerReferences"] = [{"apiVersion": "ray.io/v1", "kind": "RayJob", "name": self.spec.name,
                                        "uid": owner_uid}]
        recipe_path = self.spec.recipe_path
        try:
            text = recipe_path.read_text()
        except OSError as e:
            raise ConfigError(f"recipe {recipe_path}: {e.strerror}") from None
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {RECIPE_KEY: text}}

    def text(self) -> str:
        docs = [d for d in (self.configmap(), self.rayjob()) if d is not None]
        name = self.spec.name
        head = (f"# lvd job {name}: {self.spec.display()}\n"
                "# Written by `lvd submit --backend kuberay --dry-run`. `kubectl apply -f THIS_FILE` starts the same "
                "job, with two differences:\n"
                "# `lvd submit` makes the ConfigMap owned by the RayJob (an ownerReference needs the RayJob's uid, "
                "known once it exists),\n"
                f"# so deleting the job deletes it; here delete both yourself: `kubectl delete -f THIS_FILE` (or "
                f"`kubectl delete rayjob,configmap -l lvd.job={name}`).\n"
                "# And `lvd jobs` does not list a job applied this way (use kubectl get rayjob).\n")
        return head + yaml.safe_dump_all(docs, sort_keys=False, width=120)


class KubeRayBackend(Backend):
    name = "kuberay"

    def __init__(self, options: KubeRayOptions | None = None):
        self.options = options or KubeRayOptions()

    @staticmethod
    def _kubectl(info: dict[str, str], *args: str) -> list[str]:
        cmd = ["kubectl"]
        if info.get("context"):
            cmd += ["--context", info["context"]]
        if info.get("namespace"):
            cmd += ["--namespace", info["namespace"]]
        return [*cmd, *args]

    @staticmethod
    def _run(cmd: list[str], stdin: str | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
        if shutil.which("kubectl") is None:
            raise JobError("kubectl not found on PATH: install it and point it at the cluster, or use "
                           "`lvd submit --backend kuberay --dry-run ... > job.yaml` and apply that elsewhere")
        try:
            return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise JobError(f"{shlex.join(cmd)} did not answer within {timeout:.0f} s") from None

    def _info(self) -> dict[str, str]:
        return {k: v for k, v in (("namespace", self.options.namespace), ("context", self.options.context)) if v}

    def render(self, spec: JobSpec) -> str:
        return RayJobManifest(spec, self.options).text()

    def submit(self, spec: JobSpec) -> JobRecord:
        manifest = RayJobManifest(spec, self.options)
        configmap = manifest.configmap()  # reads the recipe before anything is created
        info = self._info()
        proc = self._run(self._kubectl(info, "create", "-f", "-", "-o", "jsonpath={.metadata.uid}"),
                         stdin=yaml.safe_dump(manifest.rayjob(), sort_keys=False))
        if proc.returncode != 0:
            raise JobError(f"kubectl could not create the RayJob: {proc.stderr.strip()}")
        uid = proc.stdout.strip()
        if configmap is not None:
            proc = self._run(self._kubectl(info, "create", "-f", "-"),
                             stdin=yaml.safe_dump(manifest.configmap(owner_uid=uid), sort_keys=False))
            if proc.returncode != 0:
                self._run(self._kubectl(info, "delete", "rayjob", spec.name, "--wait=false"))
                raise JobError(f"kubectl could not create the recipe ConfigMap ({proc.stderr.strip()}); "
                               f"the RayJob {spec.name} was deleted again")
        recipe = spec.recipe_path
        return JobRecord(name=spec.name, backend="kuberay", job_id=spec.name, command=list(spec.argv),
                         recipe=str(recipe) if recipe else None, output=spec.output_path, cwd=str(spec.cwd),
                         submitted_at=utc_now(), info={**info, "uid": uid, "image": self.options.image or ""})

    def status(self, record: JobRecord) -> JobStatus:
        proc = self._run(self._kubectl(record.info, "get", "rayjob", record.job_id, "-o", "json"))
        if proc.returncode != 0:
            if "NotFound" in proc.stderr or "not found" in proc.stderr:
                if record.cancelled_at:
                    return JobStatus(JobState.STOPPED, f"RayJob deleted by `lvd jobs cancel` at {record.cancelled_at}")
                return JobStatus(JobState.UNKNOWN, "the RayJob no longer exists (deleted, or its TTL passed)")
            raise JobError(f"kubectl get rayjob {record.job_id}: {proc.stderr.strip()}")
        status = json.loads(proc.stdout).get("status") or {}
        job, deployment = status.get("jobStatus") or "", status.get("jobDeploymentStatus") or ""
        detail = f"RayJob {deployment or 'New'}, Ray job {job or '-'}" + (f": {status['message']}" if status.get("message") else "")
        if deployment in ("Failed", "ValidationFailed"):
            return JobStatus(JobState.FAILED, detail)
        return JobStatus(_STATES.get(job, JobState.PENDING), detail)

    def logs(self, record: JobRecord, out: TextIO, follow: bool = False) -> None:
        # In K8sJobMode the submitter Job carries the RayJob's name and streams the driver's output.
        cmd = self._kubectl(record.info, "logs", f"job/{record.job_id}", *(["--follow"] if follow else []))
        if shutil.which("kubectl") is None:
            self._run(cmd)  # raises the "not found" error
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:
                out.write(line)
                out.flush()
            err = proc.stderr.read()
        if proc.returncode != 0:
            raise JobError(f"kubectl logs job/{record.job_id}: {err.strip()} (the submitter starts once the "
                           "Ray cluster is up; try again, or see `lvd jobs status`)")

    def cancel(self, record: JobRecord) -> None:
        proc = self._run(self._kubectl(record.info, "delete", "rayjob", record.job_id, "--wait=false"))
        if proc.returncode != 0:
            raise JobError(f"kubectl delete rayjob {record.job_id}: {proc.stderr.strip()}")
