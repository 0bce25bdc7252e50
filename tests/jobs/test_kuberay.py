"""The KubeRay backend: the RayJob manifest (valid YAML with the fields KubeRay requires, the recipe shipped in
a ConfigMap, resources, GPUs, token auth) and the kubectl calls for submit, status, logs and cancel (checked
against a recording stand-in for kubectl; no Kubernetes cluster is needed)."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml

from jobs.backends import JobState
from jobs.backends.kuberay import KubeRayBackend, KubeRayOptions, RayJobManifest
from jobs.cli import main
from jobs.records import JobStore
from jobs.submit import prepare
from tests.jobs.stubs import calls, make_stubs, stub_env

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("LVD_HOME", str(tmp_path / "lvd_home"))
    proj = tmp_path / "project"
    (proj / "recipes").mkdir(parents=True)
    (proj / "recipes" / "cur.yaml").write_text("# my recipe\ninputs: [s3://bucket/raw/]\noutput: /data/runs/cur1\n")
    monkeypatch.chdir(proj)
    return proj


def _dry_run(capsys, *args: str) -> list[dict]:
    assert main(["submit", "--backend", "kuberay", "--dry-run", *args]) == 0
    return list(yaml.safe_load_all(capsys.readouterr().out))


def _assert_rayjob_shape(job: dict) -> None:
    """What the RayJob CRD (ray.io/v1) requires and KubeRay's validation checks."""
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert DNS_LABEL.fullmatch(job["metadata"]["name"]) and len(job["metadata"]["name"]) <= 47
    spec = job["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        # rayStartParams is map[string]string: a number here is rejected by the API server
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers)
    for worker in cluster["workerGroupSpecs"]:
        assert worker["groupName"] and worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
    ports = {p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265, 10001} <= ports


def test_dry_run_is_applicable_with_kubectl_and_says_how_it_differs(project, capsys):
    """What --dry-run prints goes to `kubectl apply -f` as it is: plain manifests (the ConfigMap without the
    ownerReference only a real submit can give it), and the header says what differs and how to clean up."""
    assert main(["submit", "--backend", "kuberay", "--dry-run", "--image", "lvd:1", "--",
                 "curate", "recipes/cur.yaml"]) == 0
    out = capsys.readouterr().out
    configmap, job = yaml.safe_load_all(out)
    assert "ownerReferences" not in configmap["metadata"]
    assert configmap["metadata"]["labels"]["lvd.job"] == job["metadata"]["labels"]["lvd.job"]
    head = [line for line in out.splitlines() if line.startswith("#")]
    assert any("kubectl apply -f THIS_FILE" in line for line in head)
    assert any("kubectl delete -f THIS_FILE" in line and f"lvd.job={job['metadata']['name']}" in line for line in head)


def test_curation_rayjob_ships_the_recipe_and_joins_its_cluster(project, capsys):
    docs = _dry_run(capsys, "--image", "registry.example/lvd:0.1", "--nodes", "4", "--cpus-per-node", "8",
                    "--mem", "32Gi", "--volume", "datasets:/data", "--env", "HF_HUB_OFFLINE=1", "--",
                    "curate", "recipes/cur.yaml", "--set", "output=/data/runs/it's here")
    configmap, job = docs
    _assert_rayjob_shape(job)
    name = job["metadata"]["name"]
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["name"] == f"{name}-recipe"
    assert configmap["data"]["recipe.yaml"] == (project / "recipes" / "cur.yaml").read_text()
    assert shlex.split(job["spec"]["entrypoint"]) == [
        "lvd", "curate", "/lvd/recipe/recipe.yaml", "--set", "output=/data/runs/it's here", "--address", "auto"]
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"} and cluster["rayVersion"].startswith("2.")
    # the Jobs API listens on the pod network on purpose (the operator reaches it through the head Service)
    assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0", "dashboard-host": "0.0.0.0"}
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4
    worker = workers["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"] == {"cpu": "8", "memory": "32Gi"}
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in worker["containers"][0]["env"]
    for group in (cluster["headGroupSpec"], workers):
        pod = group["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/lvd/recipe"]]["configMap"]["name"] == f"{name}-recipe"
        assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "datasets"
    assert job["spec"]["shutdownAfterJobFinishes"] is True and "entrypointNumGpus" not in job["spec"]


def test_model_rayjob_puts_gpus_on_the_workers_and_the_driver_on_a_gpu(project, capsys):
    (job,) = _dry_run(capsys, "--image", "lvd:1", "--gpus-per-node", "2", "--ray-auth", "none", "--",
                      "sample", "--random-init", "--out", "/data/s.mp4", "--prompt", "a square")
    _assert_rayjob_shape(job)
    cluster = job["spec"]["rayClusterSpec"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert workers["rayStartParams"] == {"num-gpus": "2"}
    assert job["spec"]["entrypointNumGpus"] == 2 and "authOptions" not in cluster
    assert shlex.split(job["spec"]["entrypoint"]) == ["lvd", "sample", "--random-init", "--out", "/data/s.mp4",
                                                      "--prompt", "a square"]
    assert "volumes" not in cluster["headGroupSpec"]["template"]["spec"]  # no recipe given: nothing to ship


def test_a_newline_in_a_value_cannot_escape_the_manifest_comment(project, capsys):
    assert main(["submit", "--backend", "kuberay", "--dry-run", "--image", "lvd:1", "--", "curate", "recipes/cur.yaml",
                 "--set", 'output="/data/x\nkind: Secret"']) == 0  # YAML folds it; the argument keeps the newline
    text = capsys.readouterr().out
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    assert first == 5 and lines[first] == "apiVersion: v1"
    docs = list(yaml.safe_load_all(text))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    assert shlex.split(docs[1]["spec"]["entrypoint"])[4] == 'output="/data/x\nkind: Secret"'


@pytest.mark.parametrize("args, message", [
    ([], "needs --image"),
    (["--image", "x", "--mem", "lots"], "not a Kubernetes quantity"),
    (["--image", "x", "--volume", "data"], "CLAIM:/mount/path"),
    (["--image", "x", "--time", "01:00:00"], "--time applies to --backend slurm, not kuberay"),
])
def test_bad_kuberay_settings_are_named(project, capsys, args, message):
    assert main(["submit", "--backend", "kuberay", "--dry-run", *args, "--", "curate", "recipes/cur.yaml"]) == 2
    assert message in capsys.readouterr().err


def test_a_relative_output_is_refused(project):
    spec = prepare(["curate", "recipes/cur.yaml", "--set", "output=runs/x"])
    with pytest.raises(ValueError, match="relative"):
        RayJobManifest(spec, KubeRayOptions(image="x"))


def test_missing_kubectl_is_a_clear_error(project, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["submit", "--backend", "kuberay", "--image", "x", "--", "curate", "recipes/cur.yaml"]) == 2
    err = capsys.readouterr().err
    assert "kubectl not found on PATH" in err and "--dry-run" in err
    assert JobStore().all() == []


def test_submit_status_logs_cancel_through_kubectl(project, tmp_path, monkeypatch, capsys):
    stubs = make_stubs(tmp_path / "bin", ["kubectl"])
    log = tmp_path / "calls.jsonl"
    status = {"status": {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}}
    answers = {"kubectl --context c1 --namespace ml create -f - -o": ("1234-uid", 0),
               "kubectl --context c1 --namespace ml get rayjob": (json.dumps(status), 0),
               "kubectl --context c1 --namespace ml logs": ("driver says hi\n", 0)}
    for key, value in stub_env(stubs, log, answers).items():
        monkeypatch.setenv(key, value)
    assert main(["submit", "--backend", "kuberay", "--image", "lvd:1", "--namespace", "ml", "--context", "c1",
                 "--name", "cur-1", "--", "curate", "recipes/cur.yaml"]) == 0
    create_job, create_cm = calls(log)
    assert create_job["cmd"] == ["kubectl", "--context", "c1", "--namespace", "ml", "create", "-f", "-",
                                 "-o", "jsonpath={.metadata.uid}"]
    assert yaml.safe_load(create_job["stdin"])["kind"] == "RayJob"
    configmap = yaml.safe_load(create_cm["stdin"])
    # the recipe's ConfigMap is owned by the RayJob, so deleting the job deletes it
    assert configmap["metadata"]["ownerReferences"] == [
        {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": "cur-1", "uid": "1234-uid"}]
    record = JobStore().find("cur-1")
    assert record.backend == "kuberay" and record.info["namespace"] == "ml" and record.output == "/data/runs/cur1"

    capsys.readouterr()
    assert main(["jobs", "status", "cur-1"]) == 0
    assert "RUNNING (RayJob Running, Ray job RUNNING)" in capsys.readouterr().out
    assert main(["jobs", "logs", "cur-1", "--follow"]) == 0
    assert capsys.readouterr().out == "driver says hi\n"
    assert calls(log)[-1]["cmd"][-3:] == ["logs", "job/cur-1", "--follow"]
    assert main(["jobs", "cancel", "cur-1"]) == 0
    assert calls(log)[-1]["cmd"][-4:] == ["delete", "rayjob", "cur-1", "--wait=false"]

    # deleted by the cancel: the record says so
    gone = 'Error from server (NotFound): rayjobs.ray.io "cur-1" not found\n'
    monkeypatch.setenv("STUB_ANSWERS", json.dumps({"kubectl": (gone, 1)}))
    status = KubeRayBackend().status(JobStore().find("cur-1"))
    assert status.state is JobState.STOPPED and "lvd jobs cancel" in status.detail

    failed = {"status": {"jobStatus": "", "jobDeploymentStatus": "Failed", "message": "image pull failed"}}
    monkeypatch.setenv("STUB_ANSWERS", json.dumps({"kubectl": (json.dumps(failed), 0)}))
    status = KubeRayBackend().status(JobStore().find("cur-1"))
    assert status.state is JobState.FAILED and "image pull failed" in status.detail
