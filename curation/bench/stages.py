"""`lvd bench stages`: clips/s of each model stage (text, caption, clip), batched vs one clip per call.

Each chosen stage runs in this process as one actor of its Ray pool runs it, without Ray (so this also
runs on a GPU machine where Ray is not installed):

- its weights load once (`setup()`), reported as load time and not timed;
- synthetic clips stand in for real ones: three key frames each (first, middle, last frame of a bright
  square crossing a textured background, different for every clip), 16:9 with the long side at the
  recipe's decode.key_frame_max_side, JPEG-encoded as they travel between the pipeline's actors. The CLIP
  stage gets three captions per clip when the recipe's caption stage is on, as in the pipeline;
- at each batch size, one warm-up batch (lazy initialisation, kernel choice, allocator: not timed), then
  whole batches covering at least --clips clips, timed from the JPEG decode to the stage's result.

Torch runs with the threads a Ray actor of the stage gets: OMP_NUM_THREADS when it is set, else
floor(num_cpus) and at least 1 (what Ray sets for an actor), or --threads. A pool of N actors then scores
about N times the printed clips/s while there are cores (num_cpus each) or GPU shares (num_gpus each)
for all of them; the ratio column says what batching (the stage's batch_size) buys over one clip per call.

--device cpu / cuda sets every chosen stage's num_gpus to 0 / 1 (cpu,cuda runs both and prints the GPU's
speed-up); without it each stage runs where its recipe puts it. The stages' only_if rules are not applied
here: every clip is scored. Random-weight stand-ins (--tiny) time the code path, not a real model's cost.

    lvd bench stages --tiny                                    # demo recipe, tiny stand-ins, this CPU
    lvd bench stages --recipe recipes/curation/default.yaml --stages clip --batch-sizes 1,16,64 --device cpu,cuda
"""

from __future__ import annotations

import gc
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily: `lvd --help` stays fast, and nothing here imports Ray
    from curation.config import CurationConfig
    from curation.stages.base import StageConfig

DEFAULT_RECIPE = "recipes/curation/demo.yaml"
DEVICES = ("cpu", "cuda")
KEY_FRAMES = 3  # first, middle, last


@dataclass
class StageRow:
    """One stage on one device at one batch size."""

    stage: str            # recipe section: text, caption, clip
    device: str           # where the stage actually ran: cpu or cuda
    threads: int          # torch intra-op threads during the run
    batch_size: int
    clips: int            # clips timed (whole batches)
    seconds: float        # wall time of the timed batches
    load_s: float         # setup() of the stage on this device (once, shared by its batch sizes)
    base_batch_size: int  # the batch size `ratio` compares with (the smallest asked; 1 by default)
    ratio: float = 1.0    # clips_per_s / clips_per_s at base_batch_size, same stage and device
    failed: int = 0       # clips the stage gave a reason for instead of a score
    gpu_peak_mb: float | None = None      # peak CUDA memory allocated (weights included) while timing
    shares: dict[str, float] = field(default_factory=dict)  # share of the time per part (caption: image/video/summary)

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds

    @property
    def ms_per_clip(self) -> float:
        return 1000.0 * self.seconds / self.clips


@dataclass
class StagesBench:
    machine: str
    setting: str
    rows: list[StageRow]
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [self.machine, self.setting, ""]
        header = (f"{'stage':<8} {'device':<6} {'threads':>7} {'batch':>5} {'clips':>5} {'clips/s':>9} {'ms/clip':>9} "
                  f"{'vs batch':>12} {'load s':>7} {'GPU MB':>7}  time in")
        out.append(header)
        for r in self.rows:
            shares = " ".join(f"{k} {v:.0%}" for k, v in r.shares.items())
            gpu = f"{r.gpu_peak_mb:7.0f}" if r.gpu_peak_mb is not None else f"{'-':>7}"
            failed = f"  ({r.failed} clips failed)" if r.failed else ""
            out.append(f"{r.stage:<8} {r.device:<6} {r.threads:>7} {r.batch_size:>5} {r.clips:>5} {r.clips_per_s:9.2f} "
                       f"{r.ms_per_clip:9.1f} {f'{r.ratio:.2f}x vs {r.base_batch_size}':>12} {r.load_s:7.1f} {gpu}  "
                       f"{shares}{failed}")
        out += device_ratios(self.rows)
        out.append("")
        out += self.notes
        out.append("an actor pool of N actors scores about N x clips/s while there are cores (num_cpus each) or GPU "
                   "shares (num_gpus each) for all of them; set num_actors and batch_size per stage in the recipe")
        return out


def device_ratios(rows: list[StageRow]) -> list[str]:
    """cuda / cpu clips/s of each stage at each batch size measured on both."""
    rate = {(r.stage, r.device, r.batch_size): r.clips_per_s for r in rows}
    out = []
    for r in rows:
        if r.device == "cuda" and (r.stage, "cpu", r.batch_size) in rate:
            out.append(f"{r.stage} at batch {r.batch_size}: cuda / cpu = "
                       f"{r.clips_per_s / rate[(r.stage, 'cpu', r.batch_size)]:.2f}x")
    return ["", *out] if out else []


# ---- inputs -----------------------------------------------------------------------------------------------

def parse_list(text: str | None, what: str) -> list[str] | None:
    """"a, b,a" -> ["a", "b"] (order kept, repeats dropped); None or "" -> None."""
    if text is None or not text.strip():
        return None
    seen: list[str] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            from common.config import ConfigError

            raise ConfigError(f"{what} {text!r} has an empty item; write a comma-separated list such as clip,caption")
        if item not in seen:
            seen.append(item)
    return seen


def parse_batch_sizes(text: str | None) -> list[int] | None:
    from common.config import ConfigError

    items = parse_list(text, "--batch-sizes")
    if items is None:
        return None
    try:
        sizes = sorted({int(v) for v in items})
    except ValueError:
        raise ConfigError(f"--batch-sizes {text!r} is not a list of whole numbers; write e.g. 1,16") from None
    if sizes[0] < 1:
        raise ConfigError(f"--batch-sizes {text!r}: batch sizes must be at least 1; write e.g. 1,16")
    return sizes


def load_config(recipe: str | Path = DEFAULT_RECIPE, overrides: list[str] | None = None,
                tiny_root: str | Path | None = None) -> CurationConfig:
    """The recipe with its `--set` overrides. With `tiny_root`, the tiny random-weight stand-ins are built
    there (once) and the recipe's clip and caption sections (those it has) point at them; the overrides
    still win (e.g. --set caption.image.max_new_tokens=4)."""
    from common.config import apply_overrides, read_yaml, validate
    from curation.config import CurationConfig

    tree = read_yaml(recipe)
    if tiny_root is not None:
        from curation.testing.tiny_models import as_overrides, build_all

        present = apply_overrides(tree, overrides or [])
        sections = {k: v for k, v in build_all(tiny_root).items() if k in present}
        tree = apply_overrides(tree, as_overrides(sections))
    tree = apply_overrides(tree, overrides or [])
    return validate(CurationConfig, tree, source=f"recipe {recipe}")


def stage_paths() -> dict[str, str]:
    """Recipe section -> import path of the stage class, in pipeline order."""
    from curation.pipeline import STAGES

    return {section: path for path, section in STAGES}


def select_stages(config: CurationConfig, names: list[str] | None) -> list[str]:
    """The recipe sections to bench: `names` in the order given, or every enabled model stage."""
    from common.config import ConfigError

    known = stage_paths()
    if names is None:
        chosen = [s for s in known if getattr(config, s).enabled]
        if not chosen:
            raise ConfigError(f"no model stage ({', '.join(known)}) is enabled in the recipe; use a recipe that has "
                              "them (e.g. recipes/curation/demo.yaml with --tiny) or --set clip.enabled=true")
        return chosen
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown stage {', '.join(map(repr, unknown))}; the model stages are "
                          f"{', '.join(known)} (e.g. --stages clip,caption)")
    disabled = [n for n in names if not getattr(config, n).enabled]
    if disabled:
        raise ConfigError(f"stage {', '.join(disabled)} is disabled in the recipe ({disabled[0]}.enabled is false); "
                          f"enable it with --set {disabled[0]}.enabled=true (its checkpoints must be here, or use "
                          f"--tiny), or leave it out of --stages")
    return list(names)


def stage_config(config: CurationConfig, section: str, device: str | None) -> StageConfig:
    """The section's settings with num_gpus set for `device` (None: as the recipe has it), validated again
    (e.g. clip.precision fp16 needs a GPU)."""
    from common.config import ConfigError, validate

    cfg = getattr(config, section)
    if device is None:
        return cfg
    if device not in DEVICES:
        raise ConfigError(f"--device {device!r} is not one of {', '.join(DEVICES)}; write e.g. --device cpu,cuda")
    tree = {**cfg.model_dump(), "num_gpus": 1.0 if device == "cuda" else 0.0}
    return validate(type(cfg), tree, source=f"{section} with --device {device}")


def check_devices(devices: list[str] | None) -> None:
    from common.config import ConfigError

    if not devices:
        return
    bad = [d for d in devices if d not in DEVICES]
    if bad:
        raise ConfigError(f"--device {', '.join(bad)} is not one of {', '.join(DEVICES)}; write e.g. --device cpu,cuda")
    if "cuda" in devices:
        import torch

        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, no GPU visible"
            raise ConfigError(f"--device cuda: CUDA is not available here (torch {torch.__version__}, {build}); run "
                              "on a machine with an NVIDIA GPU and a CUDA build of torch (see requirements/), check "
                              "CUDA_VISIBLE_DEVICES and nvidia-smi, or use --device cpu")


def check_checkpoints(config: CurationConfig, sections: list[str]) -> None:
    """Resolves the chosen stages' checkpoints before anything loads; one MissingCheckpoint naming all."""
    from common.checkpoints import MissingCheckpoint, resolve

    problems = []
    for section in sections:
        cfg = getattr(config, section)
        for spec in (cfg.checkpoints() if hasattr(cfg, "checkpoints") else []):
            try:
                resolve(spec)
            except MissingCheckpoint as e:
                problems.append(str(e))
    if problems:
        raise MissingCheckpoint("the recipe names model weights this machine does not have (use --tiny for random-"
                                "weight stand-ins):\n  - " + "\n  - ".join(problems))


def actor_threads(cfg: StageConfig) -> int:
    """The torch threads a Ray actor of this stage runs with (Ray sets OMP_NUM_THREADS unless it is set)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, math.floor(cfg.num_cpus))


def synthetic_clips(n: int, max_side: int, seed: int = 0) -> list[list[bytes]]:
    """`n` clips' key frames (first, middle, last; 16:9, long side `max_side`) as JPEG, each clip different."""
    from curation.testing.synthetic import moving_square
    from curation.video.task import encode_jpeg

    w = max_side
    h = max(16, round(max_side * 9 / 16))
    h += h % 2
    length = 24
    clips = []
    for i in range(n):
        frames = list(moving_square(length, h=h, w=w, speed=3.0 + (i % 7), color_index=i, seed=seed + i))
        clips.append([encode_jpeg(frames[k]) for k in (0, length // 2, length - 1)])
    return clips


def contexts(n: int, with_captions: bool) -> list[dict[str, Any]]:
    """What the pipeline hands a stage besides the key frames: the clip record (and the caption stage's
    captions, which the CLIP stage scores against)."""
    colours = ("red", "green", "blue", "yellow", "purple", "cyan")
    out = []
    for i in range(n):
        ctx: dict[str, Any] = {"clip_id": f"bench_{i:05d}", "status": "ok", "duration_s": 1.0, "fps": 24.0,
                               "num_frames": 24, "motion_score": 0.01}
        if with_captions:
            colour = colours[i % len(colours)]
            ctx["captions"] = [
                {"text": f"a white square on a {colour} background, shot {i}", "weight": 0.5, "source": "image"},
                {"text": f"a bright square slides across a textured {colour} wall in clip {i}", "weight": 0.25,
                 "source": "video"},
                {"text": f"a white square moves over a {colour} textured background (clip {i})", "weight": 0.25,
                 "source": "summary"},
            ]
        out.append(ctx)
    return out


# ---- the bench --------------------------------------------------------------------------------------------

def machine_line() -> str:
    import torch

    cpus = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = f" ({line.split(':', 1)[1].strip()})"
                break
    except OSError:
        pass
    cpu = f"{cpus} CPUs{model}" + (f", {usable} usable" if usable != cpus else "")
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpu = f"CUDA {torch.version.cuda}: {', '.join(names)}"
    else:
        gpu = "no CUDA device"
    return f"machine: {cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads by default; {gpu}"


def bench_stages(config: CurationConfig, stages: list[str] | None = None, clips: int = 32,
                 batch_sizes: list[int] | None = None, devices: list[str] | None = None,
                 threads: int | None = None, progress=None) -> StagesBench:
    """Times each chosen stage (recipe section names; None: every enabled one) at each batch size (None: 1
    and the stage's batch_size) on each device (None: where the recipe puts it). `progress(str)` hears
    what is being done. Raises ConfigError for a bad choice and MissingCheckpoint before any weights load."""
    from common.config import ConfigError

    if clips < 1:
        raise ConfigError(f"--clips ({clips}) must be at least 1; use e.g. 32")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads ({threads}) must be at least 1, or left out for the threads of a Ray actor")
    if batch_sizes is not None:
        batch_sizes = sorted(set(batch_sizes))
        if not batch_sizes or batch_sizes[0] < 1:
            raise ConfigError(f"batch sizes {batch_sizes} must be whole numbers of at least 1; use e.g. 1,16")
    sections = select_stages(config, stages)
    check_devices(devices)
    plans = [(s, d, stage_config(config, s, d)) for s in sections for d in (devices or [None])]  # validates first
    check_checkpoints(config, sections)
    sizes_of = {s: batch_sizes or sorted({1, getattr(config, s).batch_size}) for s in sections}
    largest = max(max(v) for v in sizes_of.values())
    timed_max = max(_timed_clips(clips, bs) for v in sizes_of.values() for bs in v)
    say = progress or (lambda _msg: None)
    say(f"making {timed_max + largest} synthetic clips ({KEY_FRAMES} key frames each)...")
    pool = synthetic_clips(timed_max + largest, config.decode.key_frame_max_side)
    ctx = contexts(len(pool), with_captions=config.caption.enabled)
    h, w = _frame_shape(pool[0][0])

    rows: list[StageRow] = []
    notes: list[str] = []
    for section, device, cfg in plans:
        rows += _bench_one(section, device, cfg, pool, ctx, clips, sizes_of[section], threads, say, notes)
    stand_ins = _stand_ins(config, sections)
    if stand_ins:
        notes.append(f"note: {', '.join(stand_ins)} are tiny random-weight stand-ins: the numbers time the code "
                     "path, not a real model")
    setting = (f"clips: {KEY_FRAMES} key frames of {h} x {w} (JPEG, decoded inside the timing); at least {clips} clips "
               "timed per batch size, in whole batches, after one warm-up batch")
    return StagesBench(machine_line(), setting, rows, notes)


def _timed_clips(clips: int, batch_size: int) -> int:
    return max(1, math.ceil(clips / batch_size)) * batch_size


def _frame_shape(jpeg: bytes) -> tuple[int, int]:
    from curation.video.task import decode_jpegs

    return decode_jpegs([jpeg]).shape[1:3]


def _stand_ins(config: CurationConfig, sections: list[str]) -> list[str]:
    from common.checkpoints import is_random_stand_in, resolve

    out = []
    for section in sections:
        cfg = getattr(config, section)
        for spec in (cfg.checkpoints() if hasattr(cfg, "checkpoints") else []):
            if is_random_stand_in(resolve(spec)):
                out.append(spec.role)
    return out


def _bench_one(section: str, device: str | None, cfg: StageConfig, pool: list[list[bytes]],
               ctx: list[dict[str, Any]], clips: int, sizes: list[int], threads: int | None, say,
               notes: list[str]) -> list[StageRow]:
    import importlib

    import torch

    from curation.stages.base import ClipBatch
    from curation.video.task import decode_jpegs

    module, name = stage_paths()[section].rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    used = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    if device is None and cfg.num_gpus > 0 and used == "cpu":
        notes.append(f"note: {section}.num_gpus is {cfg.num_gpus:g} but CUDA is not available here: it ran on the CPU")
    n_threads = threads or actor_threads(cfg)
    before = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    stage = cls(cfg)
    rows: list[StageRow] = []
    try:
        say(f"{section} on {used}: loading...")
        t0 = time.perf_counter()
        stage.ensure_setup()
        load_s = time.perf_counter() - t0

        def run(start: int, stop: int) -> int:
            batch = ClipBatch([c["clip_id"] for c in ctx[start:stop]],
                              [decode_jpegs(j) for j in pool[start:stop]], ctx[start:stop])
            result = stage(batch)
            return sum(1 for r in result.reasons if r)

        timings = getattr(stage, "timings", None)
        for bs in sizes:
            timed = _timed_clips(clips, bs)
            say(f"{section} on {used}: batch {bs}, {timed} clips...")
            run(timed, timed + bs)  # warm-up, on clips the timed part does not use
            if used == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            if isinstance(timings, dict):
                timings.clear()
            failed = 0
            t0 = time.perf_counter()
            for start in range(0, timed, bs):
                failed += run(start, start + bs)
            if used == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            shares = {k: v / seconds for k, v in timings.items()} if isinstance(timings, dict) else {}
            gpu = torch.cuda.max_memory_allocated() / 2**20 if used == "cuda" else None
            rows.append(StageRow(section, used, n_threads, bs, timed, seconds, load_s, sizes[0], failed=failed,
                                 gpu_peak_mb=gpu, shares=shares))
    finally:
        torch.set_num_threads(before)
        del stage
        gc.collect()
        if used == "cuda":
            torch.cuda.empty_cache()
    base = rows[0].clips_per_s
    for r in rows:
        r.ratio = r.clips_per_s / base
    return rows
