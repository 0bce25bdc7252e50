"""`lvd curate`: inputs -> Ray Data pipeline -> ledger datasets -> decisions -> funnel.

    listing tasks ─► RUN/inputs/ ─► plan task (DuckDB: dedupe, minus the committed video ids)
      ─► Ray Data, blocks of many videos ─► VideoActor pool (isolated decode: cuts, flow, key frames, clips)
      ─► one actor pool per model stage (text area, captions, CLIP) ─► writer tasks: RUN/ledger/
      ─► decision tasks (curation/post/decisions.py): RUN/decisions/, funnel.json

The driver plans and counts: no video or clip row passes through it, so its memory and time do not grow
with the dataset. Without an address a local Ray starts and stops inside the run; with one, the same
pipeline runs on that cluster (inputs and the output folder must then be reachable from every node).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from common.checkpoints import CheckpointSpec, MissingCheckpoint, is_random_stand_in, missing_message, resolve
from common.local_ray import local_ray
from common.verbosity import PlainFormatter, native_logs_to
from curation.config import CurationConfig
from curation.post.decisions import decide
from curation.inputs import Item, check_paths, deferred, list_task, missing_inputs_error, unmatched
from curation.ledger import Ledger
from curation.tasks import call_task

# Model-backed stages, in pipeline order: (import path, config section).
# The caption stage runs before the CLIP stage, which scores text-image similarity against the captions.
STAGES = (("curation.stages.text_area.TextArea", "text"), ("curation.stages.captioning.Captioning", "caption"),
          ("curation.stages.clip_score.ClipScore", "clip"))


@dataclass
class Summary:
    run_dir: Path
    funnel: list[dict]
    num_processed: int   # videos processed by this invocation (0 when everything was already done)
    reasons: dict[str, int] = field(default_factory=dict)  # why videos failed and clips were not kept, by code
    stand_ins: list[str] = field(default_factory=list)  # checkpoints that were tiny random-weight stand-ins
    num_done_before: int = 0  # input videos already in the ledger from an earlier invocation
    num_ignored: int = 0      # files in the input folders that are not videos (by extension)
    changes: list[str] = field(default_factory=list)  # what a re-decision changed


def model_checkpoints(config: CurationConfig) -> list[CheckpointSpec]:
    """Every checkpoint the enabled model stages of `config` load, in pipeline order."""
    specs: list[CheckpointSpec] = []
    for _, section in STAGES:
        stage_cfg = getattr(config, section)
        if stage_cfg.enabled and hasattr(stage_cfg, "checkpoints"):
            specs.extend(stage_cfg.checkpoints())
    return specs


def check_models(config: CurationConfig, recipe: str = "the recipe") -> dict[str, Path]:
    """Resolves every checkpoint before any video is decoded; raises one MissingCheckpoint naming all that
    are missing (`recipe`: the path its fix names). Returns role -> local path."""
    found: dict[str, Path] = {}
    problems: list[MissingCheckpoint] = []
    for spec in model_checkpoints(config):
        try:
            found[spec.role] = resolve(spec)
        except MissingCheckpoint as e:
            problems.append(e)
    if problems:
        raise MissingCheckpoint(missing_message(problems, recipe))
    return found


def random_stand_ins(found: dict[str, Path]) -> list[str]:
    """Roles whose checkpoint is a tiny random-weight stand-in (`make demo`, tests)."""
    return [role for role, path in found.items() if is_random_stand_in(path)]


def _write_models_used(run_dir: Path, config: CurationConfig, found: dict[str, Path]) -> None:
    """models.json: which weights scored this run (the report flags random stand-ins)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    models = [{"role": s.role, "source": s.source, "path": str(found[s.role]),
               "random_stand_in": is_random_stand_in(found[s.role])} for s in model_checkpoints(config)]
    (run_dir / "models.json").write_text(json.dumps(models, indent=2))


def run_curation(config: CurationConfig, address: str | None = None, progress: bool = True, verbose: bool = False,
                 decoder: type | None = None, found: dict[str, Path] | None = None) -> Summary:
    """Lists the inputs, curates the videos not yet in the ledger, and decides the whole run.
    `decoder` replaces the decode actor (benchmarks fabricate rows with it); `found` is check_models' result
    when the caller checked the weights already."""
    check_paths(config.inputs, config.output, config.inputs_missing, local=address is None)
    found = check_models(config) if found is None else found
    stand_ins = random_stand_ins(found)
    _write_models_used(Path(config.output), config, found)
    if stand_ins:
        print(f"note: tiny random-weight models stand in for {', '.join(stand_ins)} (no real weights here): "
              "their scores and captions mean nothing", file=sys.stderr)
    run_dir = Path(config.output)
    ledger = Ledger(run_dir)
    ledger.recover()
    num_buckets = ledger.num_buckets(config.ledger.num_buckets)
    with ray_session(config, address, run_dir, verbose) as started:
        _check_gpus(config, _cluster_gpus(), autoscaling_possible=not started)
        num_ignored = _list_inputs(config, run_dir, num_buckets)
        if config.inputs_missing == "error":
            missing_inputs_error(call_task(unmatched, str(run_dir / "inputs"), deferred(config.inputs, address is None)))
        num_decoders = _num_decoders(config)
        plan = call_task(_plan, str(run_dir), num_decoders)
        if plan["todo"]:
            _run_pipeline(config, run_dir, plan, min(plan["todo"], num_decoders), num_buckets, progress, decoder)
        summary = finalize(config, ledger, processed=plan["todo"])
    shutil.rmtree(run_dir / ".todo", ignore_errors=True)
    summary.stand_ins = stand_ins
    summary.num_done_before = plan["done"]
    summary.num_ignored = num_ignored
    return summary


def finalize(config: CurationConfig, ledger: Ledger, processed: int = 0) -> Summary:
    """Decides the run from the stored scores (thresholds, dedup): no frame is decoded here."""
    decided = decide(config, ledger)
    return Summary(ledger.run_dir, decided.funnel, processed, decided.reasons, changes=decided.changes)


class ray_session:
    """Ray for one command: the embedded local Ray (started and stopped here) or the cluster at `address`;
    an already initialised Ray is used as is. Ray's own log lines go to RUN/logs/ray.log unless verbose."""

    def __init__(self, config: CurationConfig, address: str | None, run_dir: Path, verbose: bool = False) -> None:
        self.config, self.address, self.run_dir, self.verbose = config, address, run_dir, verbose
        self.started = False
        self.stack = ExitStack()  # shuts down the Ray this run started
        self.handler: logging.Handler | None = None
        self.saved: list[tuple[logging.Handler, int]] = []
        self.native: Any = None

    def __enter__(self) -> bool:
        import ray

        if not self.verbose:  # console handlers quiet down to errors; everything goes to the run's log
            import ray.data  # noqa: F401 - configures Ray Data's loggers, which are adjusted here

            (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
            self.handler = logging.FileHandler(self.run_dir / "logs" / "ray.log")
            self.handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            for name in ("ray", "ray.data"):
                logger = logging.getLogger(name)
                for h in logger.handlers:
                    if not isinstance(h, logging.FileHandler):
                        self.saved.append((h, h.level))
                        h.setLevel(logging.ERROR)
                logger.addHandler(self.handler)
        if not self.verbose:  # Ray's C++ core writes to stderr directly, past Python's logging
            self.native = native_logs_to(self.run_dir / "logs" / "ray.log")
            self.native.__enter__()
        try:
            if not ray.is_initialized():
                level = logging.INFO if self.verbose else logging.WARNING
                if self.address:
                    ray.init(address=self.address, logging_level=level, log_to_driver=self.verbose)
                    self.stack.callback(ray.shutdown)
                else:
                    self.stack.enter_context(local_ray(num_cpus=self.config.ray.num_cpus, include_dashboard=False,
                                                       logging_level=level, log_to_driver=self.verbose))
                self.started = True
        except BaseException:  # `with` calls no __exit__ when __enter__ fails: give stderr and the loggers back
            self.__exit__(*sys.exc_info())
            raise
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # one bar of ours, counted in videos, is what people read
        ctx.verbose_stats_logs = False
        ctx.print_on_execution_start = False
        return self.started

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()
        if self.native is not None:
            self.native.__exit__(*exc)
        if self.handler is not None:
            for h, level in self.saved:
                h.setLevel(level)
            for name in ("ray", "ray.data"):
                logging.getLogger(name).removeHandler(self.handler)
            self.handler.close()


def _cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0.0)


def _list_inputs(config: CurationConfig, run_dir: Path, num_buckets: int) -> int:
    """Expands the inputs into RUN/inputs/ with listing tasks, breadth first: a task walks a bounded number
    of folders and hands the rest back as new tasks. Returns the number of non-video files ignored."""
    import ray

    out = run_dir / "inputs"
    shutil.rmtree(out, ignore_errors=True)  # re-listed on every invocation: the inputs may have grown
    out.mkdir(parents=True)
    task = ray.remote(num_cpus=0.5, max_retries=3)(list_task)
    names = [Item("name", n) for n in config.inputs]
    running = [task.remote(names[i:i + 64], config.extensions, str(out), num_buckets) for i in range(0, len(names), 64)]
    ignored = 0
    while running:
        ready, running = ray.wait(running, num_returns=1)
        pending, _, n_ignored = ray.get(ready[0])
        ignored += n_ignored
        running += [task.remote([item], config.extensions, str(out), num_buckets) for item in pending]
    return ignored


def _plan(run_dir: str, num_decoders: int) -> dict[str, Any]:
    """In a task: the listed inputs without duplicates, minus the videos the ledger already holds (a
    pushdown read of the video_id column), sorted by bucket (a writer batch then spans few buckets, so
    files stay large), written to RUN/.todo/ in chunk files. Returns the counts, the block size and the
    chunk files with their row counts."""
    import duckdb

    ledger = Ledger(run_dir)
    inputs = sorted(str(p) for p in Path(run_dir, "inputs").glob("part-*.parquet"))
    todo = Path(run_dir, ".todo")
    shutil.rmtree(todo, ignore_errors=True)
    todo.mkdir()
    plan: dict[str, Any] = {"inputs": 0, "todo": 0, "done": 0, "per_block": 1, "chunks": []}
    if not inputs:
        return plan
    done = [str(p) for p in ledger.video_files()]
    with duckdb.connect() as db:
        db.execute("SET threads TO 2")
        committed = f"SELECT video_id FROM read_parquet({done!r})" if done else "SELECT NULL::VARCHAR AS video_id WHERE false"
        db.execute(f"CREATE TEMP TABLE pending AS SELECT video_id, source, source_raw, bucket, skip_reason FROM "
                   f"(SELECT *, row_number() OVER (PARTITION BY video_id ORDER BY filename) AS n FROM "
                   f"read_parquet({inputs!r}, filename=true)) WHERE n = 1")
        total = db.execute("SELECT count(*) FROM pending").fetchone()[0]
        count = db.execute(f"SELECT count(*) FROM pending ANTI JOIN ({committed}) c USING (video_id)").fetchone()[0]
        # blocks of many videos (not one per video), enough of them to keep every decoder busy to the end
        per_block = max(1, min(BLOCK_MAX_VIDEOS, math.ceil(count / (8 * max(1, num_decoders)))))
        per_chunk = per_block * BLOCKS_PER_CHUNK
        if count:
            db.execute(f"COPY (SELECT *, (row_number() OVER (ORDER BY bucket, video_id) - 1) // {per_chunk} AS chunk "
                       f"FROM pending ANTI JOIN ({committed}) c USING (video_id)) TO '{todo}' "
                       "(FORMAT parquet, PARTITION_BY (chunk))")
    chunks = sorted(todo.glob("chunk=*/*.parquet"), key=lambda p: int(p.parent.name.split("=")[1]))
    plan.update(inputs=int(total), todo=int(count), done=int(total) - int(count), per_block=per_block,
                chunks=[(str(p), pq.ParquetFile(p).metadata.num_rows) for p in chunks])
    return plan


BLOCK_MAX_VIDEOS = 256   # videos per Ray Data block at most (a block goes to one decode actor)
BLOCKS_PER_CHUNK = 64    # blocks one chunk file of RUN/.todo holds


def _chunk_blocks(path: str, per_block: int) -> list:
    """In a task: one chunk file of the plan, sorted, split into blocks (one return value each)."""
    table = pq.read_table(path).sort_by([("bucket", "ascending"), ("video_id", "ascending")])
    blocks = [table.slice(i, per_block) for i in range(0, table.num_rows, per_block)]
    return blocks if len(blocks) > 1 else blocks[0]


def _input_dataset(plan: dict[str, Any]):
    """The plan's chunks as a Ray dataset of blocks made by tasks (the driver holds only their refs)."""
    import ray

    task = ray.remote(num_cpus=0.5, max_retries=3)(_chunk_blocks)
    refs = []
    for path, rows in plan["chunks"]:
        n = math.ceil(rows / plan["per_block"])
        out = task.options(num_returns=n).remote(path, plan["per_block"])
        refs.extend(out if n > 1 else [out])
    return ray.data.from_arrow_refs(refs)


def _num_decoders(config: CurationConfig) -> int:
    """Decode actors: as configured, else as many as fit beside the model stages' actors."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    stage_cpus = sum(getattr(config, section).num_actors * getattr(config, section).num_cpus
                     for _, section in STAGES if getattr(config, section).enabled)
    return config.decode.num_workers or max(1, int((cpus - stage_cpus) / config.decode.num_cpus + 1e-9))


def _run_pipeline(config: CurationConfig, run_dir: Path, plan: dict[str, Any], num_decoders: int, num_buckets: int,
                  progress: bool, decoder: type | None) -> None:
    import ray

    from curation.ray_steps import StageActor, VideoActor, write_ledger

    todo = plan["todo"]
    per_file = max(1, min(config.ledger.videos_per_file, math.ceil(todo / (4 * num_decoders))))
    ds = _input_dataset(plan)
    ds = ds.map_batches(decoder or VideoActor, batch_size=1, batch_format="pyarrow", zero_copy_batch=True,
                        fn_constructor_kwargs={"config": config.model_dump(mode="json"),
                                               "run_dir": str(run_dir.absolute())},
                        # a fixed pool: an autoscaling one starts with one actor and grows late
                        compute=ray.data.ActorPoolStrategy(size=num_decoders), num_cpus=config.decode.num_cpus)
    for path, section in STAGES:
        stage_cfg = getattr(config, section)
        if not stage_cfg.enabled:
            continue
        ds = ds.map_batches(StageActor, fn_constructor_kwargs={"stage_path": path, "config": stage_cfg.model_dump(mode="json")},
                            batch_size=max(1, stage_cfg.batch_size // 4), batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=stage_cfg.num_actors),
                            num_cpus=stage_cfg.num_cpus, num_gpus=stage_cfg.num_gpus)
    ds = ds.map_batches(write_ledger, batch_size=per_file, batch_format="pyarrow", num_cpus=0,
                        fn_kwargs={"run_dir": str(run_dir.absolute()), "num_buckets": num_buckets})
    _follow(ds, todo, progress)


def _follow(ds, num_videos: int, progress: bool) -> None:
    """Runs the pipeline; the bar moves as writer tasks commit videos (one small row of counts each)."""
    from tqdm import tqdm

    committed = clips_ok = 0
    bar = tqdm(total=num_videos, unit="video", desc="curate", disable=not progress, file=sys.stderr)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for videos, ok in zip(batch.column("videos").to_pylist(), batch.column("clips_ok").to_pylist()):
            committed += videos
            clips_ok += ok
            bar.update(videos)
            bar.set_postfix_str(f"clips={clips_ok} ok")
    bar.close()
    if committed < num_videos:
        raise RuntimeError(f"{num_videos - committed} of {num_videos} videos were not committed to the ledger; "
                           "re-run the same command to retry them")


def _check_gpus(config: CurationConfig, cluster_gpus: float, autoscaling_possible: bool) -> None:
    """A stage asking for GPUs the cluster does not have would wait forever for its actors: the embedded Ray
    refuses early; on a cluster (which may autoscale GPU nodes in) it is a warning."""
    for _, section in STAGES:
        stage_cfg = getattr(config, section)
        if not stage_cfg.enabled or stage_cfg.num_gpus <= cluster_gpus:
            continue
        problem = (f"{section}.num_gpus is {stage_cfg.num_gpus:g} but the Ray cluster has {cluster_gpus:g} GPUs, so "
                   "its actors cannot start")
        if autoscaling_possible:
            print(f"warning: {problem} until GPU nodes join (an autoscaling cluster adds them on demand)",
                  file=sys.stderr)
            continue
        raise ValueError(f"{problem}; set {section}.num_gpus: 0 to run it on CPUs (slow for real models) or run "
                         "on a cluster with GPUs (--address)")


def print_funnel(summary: Summary, file=None) -> None:
    file = file or sys.stdout
    width = max(len(s["step"]) for s in summary.funnel)
    print(f"\nfunnel ({summary.run_dir}; {summary.num_processed} videos processed, "
          f"{summary.num_done_before} already in the ledger):", file=file)
    for s in summary.funnel:
        # which near-duplicate search ran, or why a step did nothing
        note = f"  ({s['off']})" if s.get("off") else f"  ({s['path']})" if s.get("path") else ""
        print(f"  {s['step']:<{width}}  {s['count']:>7}{note}", file=file)
    if summary.num_ignored:
        print(f"{summary.num_ignored} other files in the input folders were ignored (not a video extension; see "
              "`extensions` in the recipe)", file=file)
    if summary.changes:
        print("what the new decisions changed:", file=file)
        for line in summary.changes:
            print(f"  {line}", file=file)
    if summary.reasons:
        print("why videos failed and clips were not kept (reason codes):", file=file)
        for kind, count in summary.reasons.items():
            print(f"  {count:>7}  {kind}", file=file)
    if summary.stand_ins:
        print(f"note: {', '.join(summary.stand_ins)} were tiny random-weight stand-ins: their scores and captions "
              "mean nothing", file=file)
    print(f"ledger:    {summary.run_dir / 'ledger'} (videos/, clips/: parquet, partitioned by bucket)", file=file)
    print(f"decisions: {summary.run_dir / 'decisions'} (keep, reason_code per clip)", file=file)
    print(f"clips:     {summary.run_dir / 'clips'}", file=file)
