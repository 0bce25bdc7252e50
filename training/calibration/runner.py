"""Training the arms: each arm is the proxy stage recipe with its own subset and output folder, evaluated on
the held-out clips (the stage's `eval` section, training/evaluation.py).

Arms run one after another in this process, or in parallel on a Ray cluster (`--address`): one arm per task
with `runner.num_cpus` / `runner.num_gpus`, or with `runner.num_workers` > 1 one Ray Train worker group of
that many ranks per arm; `lvd submit -- calibrate ...` runs the same driver as
a cluster job. An arm is finished when arms/<arm>/done.json exists (written after its model and eval.json);
a re-run skips finished arms and resumes an interrupted one from its last checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.config import ConfigError, apply_overrides, read_yaml, validate
from training.calibration.arms import HELDOUT, Arm, plan, write_plan
from training.calibration.config import CalibrateConfig, RunnerConfig
from training.stage_config import TrainConfig

DONE = "done.json"

Say = Callable[[str], None]


def proxy_tree(config: CalibrateConfig) -> dict[str, Any]:
    """The proxy recipe with the calibration's overrides: what every arm shares."""
    return apply_overrides(read_yaml(config.train), config.train_set)


def arm_config(config: CalibrateConfig, arm: Arm, proxy: dict[str, Any]) -> TrainConfig:
    """The arm's stage: the proxy recipe on the arm's subset, evaluated on the held-out set, in arms/<arm>/train."""
    out = Path(config.output).resolve()
    folder = arm.folder(out)
    tree = apply_overrides(proxy, [])
    data = tree.setdefault("data", {})
    if data.get("source", "shards") != "shards":
        raise ConfigError(f"the proxy recipe {config.train} trains on data.source={data.get('source')}; calibration "
                          "arms are subsets of shards: use a recipe with data.source=shards")
    loader = data.setdefault("shards", {}) or {}
    data["shards"] = {**loader, "shards": config.shard_folder, "query": None, "subset": str(folder / "subset.parquet")}
    tree["eval"] = {**(tree.get("eval") or {}), "query": None, "subset": str(out / HELDOUT),
                    "sigmas": list(config.heldout.sigmas), "seed": config.heldout.seed}
    tree["output"] = str(folder / "train")
    tree["name"] = f"{config.name}-{arm.name}"
    return validate(TrainConfig, tree, source=f"proxy recipe {config.train} (arm {arm.name})")


def metrics_json(config: CalibrateConfig) -> dict[str, Any]:
    """The optional metrics' settings, as a Ray task takes them."""
    return {name: getattr(config, name).model_dump(mode="json") for name in ("clip", "fvd")
            if getattr(config, name) is not None}


def is_done(folder: Path) -> bool:
    return (folder / DONE).is_file()


def train_stage(train: TrainConfig, runner: RunnerConfig) -> dict[str, Any]:
    """The arm's proxy run: one rank in this process, or a Ray Train worker group of runner.num_workers ranks
    on the Ray this process is connected to. Returns what its summary.json says."""
    from training.launch import run_local, run_ray

    if runner.num_workers == 1:
        run_local(train)
    else:
        per_worker = {"CPU": runner.num_cpus, **({"GPU": runner.num_gpus} if runner.num_gpus else {})}
        result = run_ray(train, runner.num_workers, use_gpu=runner.num_gpus > 0, resources_per_worker=per_worker)
        if getattr(result, "error", None) is not None:
            raise RuntimeError(f"the worker group of {train.name} failed: {result.error}")
    return json.loads((Path(train.output) / "summary.json").read_text())


def train_arm(config_json: dict[str, Any], folder: str, metrics: dict[str, Any] | None = None,
              runner_json: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trains one arm (in this process, a Ray task, or a worker group started from here), measures its metrics,
    writes its done.json."""
    train = TrainConfig.model_validate(config_json)
    t0 = time.perf_counter()
    summary = train_stage(train, RunnerConfig.model_validate(runner_json or {}))
    out = Path(train.output)
    record = {"eval": json.loads((out / "eval.json").read_text()), "steps": summary["steps"],
              "final_loss": summary["final_loss"], "samples": summary["samples"], "seconds": time.perf_counter() - t0,
              "model": summary["export"], "clip_similarity": None, "fvd": None}
    metrics = metrics or {}
    if "clip" in metrics:
        from training.calibration.clip_similarity import ClipSimilarityConfig, clip_similarity

        record["clip_similarity"] = clip_similarity(out / "model", ClipSimilarityConfig.model_validate(metrics["clip"]),
                                                    train.sampler)
    if "fvd" in metrics:
        from training.calibration.fvd import FvdConfig, fvd

        record["fvd"] = fvd(out / "model", FvdConfig.model_validate(metrics["fvd"]), train.sampler, train.data.shards,
                            train.eval.subset)
    tmp = Path(folder) / (DONE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(Path(folder) / DONE)
    return record


def write_run_shards(config: CalibrateConfig, say: Say, address: str | None = None) -> None:
    """`run`: the curation run's usable clips -> OUTPUT/shards, as `lvd shards write RUN OUT --all-usable` (one
    task per ledger file on the Ray cluster at `address`, else in this process); resumes a killed write and
    rewrites nothing when the shards are complete."""
    from contextlib import nullcontext

    from common.local_ray import ray_connected
    from shards.writer import write_shards

    writer = config.shard_write_config()
    try:
        with ray_connected(address) if address is not None else nullcontext():
            summary = write_shards(config.run, config.shard_folder, writer)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"run {config.run}: {e}") from None
    say(f"shards of {config.run}: {summary.lines()[0]}")


def prepare(config: CalibrateConfig) -> tuple[list[tuple[Arm, TrainConfig]], int]:
    """Plans the arms, writes their subsets, validates every arm's stage recipe (before any training)."""
    from shards.manifest import Manifest

    try:
        manifest = Manifest.load(config.shard_folder)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"shards: {e}") from None
    heldout, arms = plan(config, manifest)
    proxy = proxy_tree(config)
    configs = [(arm, arm_config(config, arm, proxy)) for arm, _ in arms]
    done = {arm.name for arm, _ in arms if is_done(arm.folder(config.output))}
    write_plan(config, manifest, heldout, arms, done, proxy)
    return configs, len(heldout)


def check_address(config: CalibrateConfig, address: str | None) -> None:
    if address is None and config.runner.num_workers > 1:
        raise ConfigError(f"runner.num_workers={config.runner.num_workers} runs each arm as a Ray Train worker "
                          "group: give --address (a Ray cluster), or set runner.num_workers=1")


def run_arms(config: CalibrateConfig, arms: list[tuple[Arm, TrainConfig]], say: Say, address: str | None = None,
             max_arms: int | None = None) -> list[str]:
    """Trains the unfinished arms (at most `max_arms` of them); returns the names trained now."""
    todo = [(arm, c) for arm, c in arms if not is_done(arm.folder(config.output))]
    skipped = len(arms) - len(todo)
    if skipped:
        say(f"{skipped} arm(s) already finished, not retrained")
    if max_arms is not None:
        todo = todo[:max_arms]
    if not todo:
        return []
    check_address(config, address)
    if address is None:
        for i, (arm, c) in enumerate(todo, 1):
            say(f"arm {i}/{len(todo)}: {arm.name} ({arm.num_samples} clips: {arm.rule})")
            record = train_arm(c.model_dump(mode="json"), str(arm.folder(config.output)), metrics_json(config))
            say(f"arm {arm.name}: held-out loss {record['eval']['eval_loss']:.4f} in {record['seconds']:.0f}s")
        return [arm.name for arm, _ in todo]
    return _run_ray(config, todo, say, address)


def _run_ray(config: CalibrateConfig, todo: list[tuple[Arm, TrainConfig]], say: Say, address: str) -> list[str]:
    """One Ray task per arm, as many at once as the cluster fits; the output folder must be shared storage.
    With runner.num_workers > 1 the task (0 CPUs: a driver only) starts the arm's Ray Train worker group, whose
    ranks take the runner's resources each; groups beyond the cluster's capacity wait for it."""
    import ray

    from common.local_ray import ray_connected

    with ray_connected(address):
        runner = config.runner
        group = runner.num_workers > 1
        task = ray.remote(train_arm).options(num_cpus=0 if group else runner.num_cpus,
                                             num_gpus=0 if group else runner.num_gpus, max_retries=0)
        pending = {task.remote(c.model_dump(mode="json"), str(arm.folder(config.output)), metrics_json(config),
                               runner.model_dump(mode="json")): arm for arm, c in todo}
        say(f"{len(pending)} arm(s) submitted to Ray at {address}")
        trained, failed = [], []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            arm = pending.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - one arm failing leaves the others running; re-run resumes it
                failed.append(arm.name)
                say(f"arm {arm.name} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                continue
            trained.append(arm.name)
            say(f"arm {arm.name}: held-out loss {record['eval']['eval_loss']:.4f} in {record['seconds']:.0f}s")
        if failed:
            raise RuntimeError(f"arms {failed} failed; re-run the same command to retry them (finished arms are kept)")
        return trained

