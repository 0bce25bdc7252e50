"""`lvd curate`: inputs -> Ray Data pipeline -> ledger parts -> thresholds -> ledger and funnel.

    videos ─► VideoActor pool (isolated decode: cuts, flow, key frames, clip files)
           ─► one actor pool per model stage (text area, ...) ─► driver: ledger parts as videos finish

Without an address a local Ray starts and stops inside the run; with one, the same pipeline runs on
that cluster (inputs and the output folder must then be reachable from every node).
"""

from __future__ import annotations

import json
import logging
import sys
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common.checkpoints import CheckpointSpec, MissingCheckpoint, is_random_stand_in, resolve
from curation.config import CurationConfig
from curation.dedup import apply_dedup
from curation.inputs import InputVideo, discover
from curation.ledger import Ledger
from curation.thresholds import apply_thresholds
from curation.video_task import video_row

# Model-backed stages, in pipeline order: (import path, config section).
# The caption stage runs before the CLIP stage, which scores text-image similarity against the captions.
STAGES = (("curation.text_area.TextArea", "text"), ("curation.captioning.Captioning", "caption"),
          ("curation.clip_score.ClipScore", "clip"))


@dataclass
class Summary:
    run_dir: Path
    funnel: list[dict]
    num_processed: int   # videos processed by this invocation (0 when everything was already done)
    reasons: dict[str, int] = field(default_factory=dict)  # why videos failed and clips were not kept
    stand_ins: list[str] = field(default_factory=list)  # checkpoints that were tiny random-weight stand-ins


def model_checkpoints(config: CurationConfig) -> list[CheckpointSpec]:
    """Every checkpoint the enabled model stages of `config` load, in pipeline order."""
    specs: list[CheckpointSpec] = []
    for _, section in STAGES:
        stage_cfg = getattr(config, section)
        if stage_cfg.enabled and hasattr(stage_cfg, "checkpoints"):
            specs.extend(stage_cfg.checkpoints())
    return specs


def check_models(config: CurationConfig) -> dict[str, Path]:
    """Resolves every checkpoint before any video is decoded; raises one MissingCheckpoint naming all that
    are missing. Returns role -> local path."""
    found: dict[str, Path] = {}
    problems: list[str] = []
    for spec in model_checkpoints(config):
        try:
            found[spec.role] = resolve(spec)
        except MissingCheckpoint as e:
            problems.append(str(e))
    if problems:
        raise MissingCheckpoint("the recipe names model weights this machine does not have (nothing was decoded):\n  - "
                                + "\n  - ".join(problems))
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


def run_curation(config: CurationConfig, address: str | None = None, progress: bool = True) -> Summary:
    if not config.inputs:
        raise ValueError("no inputs: set inputs in the recipe or pass --set inputs=[path/to/videos]")
    found = check_models(config)
    stand_ins = random_stand_ins(found)
    _write_models_used(Path(config.output), config, found)
    if stand_ins:
        print(f"note: tiny random-weight models stand in for {', '.join(stand_ins)} (no real weights here): "
              "their scores and captions mean nothing", file=sys.stderr)
    run_dir = Path(config.output)
    ledger = Ledger(run_dir)
    videos = discover(config.inputs, config.extensions)
    done = ledger.finished_ids()
    for v in videos:  # inputs that will never reach a decoder are accounted for right away
        if v.skip_reason is not None and v.video_id not in done:
            ledger.write_part(v.video_id, {**video_row(v.source, v.video_id, None), "status": "skipped",
                                            "reason": v.skip_reason}, [])
    todo = [v for v in videos if v.skip_reason is None and v.video_id not in done]
    if todo:
        _run_ray(config, todo, ledger, address, progress)
    summary = finalize(config, ledger, [v.video_id for v in videos], processed=len(todo))
    summary.stand_ins = stand_ins
    return summary


def finalize(config: CurationConfig, ledger: Ledger, video_ids: list[str] | None, processed: int = 0) -> Summary:
    """Consolidates the parts of these videos and applies the thresholds: no frame is decoded here."""
    videos, clips = ledger.read_parts(video_ids)
    if video_ids is not None and len(videos) != len(set(video_ids)):
        missing = sorted(set(video_ids) - set(videos["video_id"]))
        raise RuntimeError(f"{len(missing)} videos have no ledger entry (e.g. {missing[:3]}); re-run to resume")
    clips, steps = apply_thresholds(clips, config.thresholds)
    clips, dedup_steps = apply_dedup(clips, config.dedup)
    steps += dedup_steps
    funnel = [
        {"step": "input videos", "count": len(videos)},
        {"step": "videos decoded", "count": int(videos["status"].isin(["ok", "no_clips"]).sum())},
        {"step": "clips", "count": len(clips)},
        *({"step": s.name, "count": s.count} for s in steps),
    ]
    ledger.write(videos, clips, funnel)
    reasons = Counter(f"video {reason_kind(r)}" for r in videos["reason"].dropna())
    reasons.update(f"clip {reason_kind(d)}" for d in clips.loc[~clips["keep"], "decision"])
    return Summary(ledger.run_dir, funnel, processed, dict(reasons.most_common()))


def reason_kind(reason: str) -> str:
    """A reason without its numbers: "motion_score 0.001 < min 0.002" -> "motion_score < min",
    "dropped: too_short: 1.2 s < ..." -> "dropped: too_short", "decode_timeout: ..." -> "decode_timeout",
    "duplicate: exact of c1" -> "duplicate: exact"."""
    if reason.startswith(("dropped: ", "failed: ")):
        status, rest = reason.split(": ", 1)
        return f"{status}: {rest.split(':', 1)[0]}"
    if reason.endswith(": missing score"):
        return reason
    if reason.startswith("duplicate: "):  # "duplicate: near c2 cosine 0.973" -> "duplicate: near"
        return " ".join(reason.split(" ")[:2])
    if ":" in reason.split(" ", 1)[0] or " " not in reason:
        return reason.split(":", 1)[0]
    return re.sub(r"\s+", " ", re.sub(r"(?<![\w%])-?[\d.]+(e-?\d+)?(?![\w%])", "", reason)).strip()


def _run_ray(config: CurationConfig, todo: list[InputVideo], ledger: Ledger, address: str | None, progress: bool) -> None:
    import ray

    from curation.ray_steps import StageActor, VideoActor

    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(address="local", num_cpus=config.ray.num_cpus, include_dashboard=False,
                     logging_level=logging.WARNING)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # one bar of ours, counted in videos, is what people read
        ctx.verbose_stats_logs = False
        _check_gpus(config, ray.cluster_resources().get("GPU", 0.0), autoscaling_possible=not started)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        stage_cpus = sum(getattr(config, section).num_actors * getattr(config, section).num_cpus
                         for _, section in STAGES if getattr(config, section).enabled)
        num_decoders = config.decode.num_workers or max(1, int((cpus - stage_cpus) / config.decode.num_cpus + 1e-9))
        ds = ray.data.from_items([{"video_id": v.video_id, "source": v.source} for v in todo],
                                 override_num_blocks=len(todo))
        ds = ds.flat_map(VideoActor, fn_constructor_kwargs={"config": config.model_dump(mode="json"),
                                                            "run_dir": str(Path(config.output).absolute())},
                         # a fixed pool: an autoscaling one starts with one actor and grows late
                         compute=ray.data.ActorPoolStrategy(size=min(num_decoders, len(todo))),
                         num_cpus=config.decode.num_cpus)
        for path, section in STAGES:
            stage_cfg = getattr(config, section)
            if not stage_cfg.enabled:
                continue
            ds = ds.map_batches(StageActor, fn_constructor_kwargs={"stage_path": path, "config": stage_cfg.model_dump(mode="json")},
                                batch_size=stage_cfg.batch_size, batch_format="pyarrow",
                                compute=ray.data.ActorPoolStrategy(size=stage_cfg.num_actors),
                                num_cpus=stage_cfg.num_cpus, num_gpus=stage_cfg.num_gpus)
        ds = ds.drop_columns(["key_frames", "clip_frames"])
        _collect(ds, ledger, len(todo), progress)
    finally:
        if started:
            ray.shutdown()


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


def _collect(ds, ledger: Ledger, num_videos: int, progress: bool) -> None:
    """Groups rows by video and writes a video's part once its video row and all its clips arrived."""
    from tqdm import tqdm

    open_videos: dict[str, dict] = {}
    bar = tqdm(total=num_videos, unit="video", desc="curate", disable=not progress, file=sys.stderr)
    for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
        for row in batch.to_dict("records"):
            entry = open_videos.setdefault(row["video_id"], {"video": None, "clips": {}})
            record = json.loads(row["record"])
            if row["row_type"] == "video":
                entry["video"] = record
            else:
                entry["clips"][row["clip_id"]] = _merge_stage_results(record, row)
            video = entry["video"]
            if video is not None and len(entry["clips"]) == (video.get("num_clips") or 0):
                clips = sorted(entry["clips"].values(), key=lambda c: c["clip_index"])
                ledger.write_part(row["video_id"], video, clips)
                del open_videos[row["video_id"]]
                bar.update(1)
                bar.set_postfix_str(f"clips={sum(1 for c in clips if c['status'] == 'ok')} ok")
    bar.close()
    if open_videos:
        raise RuntimeError(f"{len(open_videos)} videos did not come back complete from the pipeline "
                           f"(e.g. {next(iter(open_videos))}); re-run the same command to retry them")


def _merge_stage_results(record: dict, row: dict) -> dict:
    for key, value in row.items():
        if not key.startswith("stage_") or not isinstance(value, str) or not value:
            continue
        result = json.loads(value)
        reason = result.pop("reason", None)
        record.update(result)
        if reason and record["status"] == "ok":
            record.update(status="failed", reason=reason)
    return record


def print_funnel(summary: Summary, file=sys.stdout) -> None:
    width = max(len(s["step"]) for s in summary.funnel)
    print(f"\nfunnel ({summary.run_dir}; {summary.num_processed} videos processed by this run, "
          "the rest were already in the ledger):", file=file)
    for s in summary.funnel:
        print(f"  {s['step']:<{width}}  {s['count']:>7}", file=file)
    if summary.reasons:
        print("why videos failed and clips were not kept:", file=file)
        for kind, count in summary.reasons.items():
            print(f"  {count:>7}  {kind}", file=file)
    if summary.stand_ins:
        print(f"note: {', '.join(summary.stand_ins)} were tiny random-weight stand-ins: their scores and captions "
              "mean nothing", file=file)
    print(f"ledger: {summary.run_dir / 'ledger' / 'clips.parquet'} (+ videos.parquet)", file=file)
    print(f"clips:  {summary.run_dir / 'clips'}", file=file)
