"""`lvd sample`: a video from a prompt and image instructions (first and/or last frame), written as an mp4
and a contact sheet. With --clips N the video grows clip by clip: each clip's last frame becomes the next
clip's first-frame instruction, and --last-frame guides the final clip."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  lvd sample --preset tiny --random-init --first-frame a.png --last-frame b.png --prompt "a square moves right" --out runs/s/tiny.mp4
  lvd sample --model runs/train1/export --first-frame a.png --prompt "waves" --out runs/s/waves.mp4 --clips 3
  lvd sample --model /models/svd-img2vid --recipe recipes/model/svd.yaml \\
      --set model.text.pretrained=/models/open_clip_vit_h14.safetensors --first-frame a.png --prompt "..." --out x.mp4

Writes OUT (mp4, H.264), OUT_sheet.png (every frame, one row per clip) and OUT_run/ (resolved config,
package versions, git revision)."""


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 576x1024") from None
    return h, w


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample a video from a prompt and first/last-frame instructions",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model (one of --model or --random-init)")
    src.add_argument("--model", type=Path, default=None, metavar="DIR",
                     help="a diffusers-format folder (an lvd export, a training checkpoint holding one under "
                          "model/, or a Stable Video Diffusion folder with unet/ and vae/; the latter needs "
                          "--set model.text.pretrained=OPENCLIP_CHECKPOINT)")
    src.add_argument("--random-init", action="store_true",
                     help="build the --preset model with random weights (seeded by --seed); for smoke tests")
    src.add_argument("--preset", choices=("tiny", "svd"), default=None,
                     help="the sizes --random-init builds, and which recipes/model/PRESET.yaml is the default "
                          "recipe (default: the --recipe's preset, else the --model folder's, else svd with "
                          "--model and tiny with --random-init)")
    p.add_argument("--recipe", default=None,
                   help="YAML recipe with model/objective/conditioning/sampler sections (default: "
                        "recipes/model/PRESET.yaml, PRESET being --preset, else the --model folder's, else svd)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe setting, e.g. --set sampler.heun=true or "
                        "--set sampler.motion_bucket_id=200 (repeatable; values are YAML)")
    p.add_argument("--prompt", default="",
                   help="the text condition (default: empty, which is the unconditional text the model was "
                        "trained with for dropped captions)")
    p.add_argument("--first-frame", type=Path, default=None, metavar="IMG",
                   help="first-frame instruction (image file); without it the first clip starts from text only")
    p.add_argument("--last-frame", type=Path, default=None, metavar="IMG",
                   help="last-frame instruction for the final clip; it guides the first --tau of the steps")
    p.add_argument("--out", type=Path, required=True, metavar="OUT.mp4", help="the video to write")
    p.add_argument("--num-frames", type=int, default=None,
                   help="frames per clip (default: the model's unet.num_frames, e.g. tiny 4, SVD 14, SVD-XT 25)")
    p.add_argument("--clips", type=int, default=1, help="clips to generate autoregressively (default 1)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (sets sampler.num_steps)")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale at the last frame (sets sampler.cfg_scale; the first frame gets "
                        "sampler.cfg_min_scale and the scale rises linearly between, as in SVD)")
    p.add_argument("--tau", type=float, default=None,
                   help="fraction of the steps that see the last-frame instruction (sets sampler.tau)")
    p.add_argument("--fps", type=int, default=None,
                   help="frame rate of the mp4 and the fps micro-condition (sets sampler.fps)")
    p.add_argument("--size", type=_size, default=None, metavar="HxW",
                   help="frame size in pixels (default: the model's frame_size: tiny 32x32, SVD 576x1024)")
    p.add_argument("--seed", type=int, default=0, help="seed for the noise (and for --random-init weights)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from common.config import ConfigError

    if (args.model is None) == (not args.random_init):
        print("lvd sample: give exactly one of --model DIR or --random-init", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except ValueError as e:  # bad values found while loading (sizes, paths): report them like recipe errors
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None


def sample_config(args: argparse.Namespace):
    """The sampling config `lvd sample` would run with: the recipe (default: recipes/model/PRESET.yaml,
    the preset read from the model folder when it has one), --preset, the sampler flags, then --set.
    `lvd submit` validates a sample job with this before sending it."""
    from common.config import apply_overrides, read_yaml, validate
    from training.model.config import DiffusionConfig

    recipe = args.recipe or _default_recipe(args)
    tree = read_yaml(recipe)
    if args.preset:
        model = tree.get("model") or {}
        tree["model"] = {**({"preset": model} if isinstance(model, str) else model), "preset": args.preset}
    flags = {"num_steps": args.steps, "cfg_scale": args.cfg, "tau": args.tau, "fps": args.fps}
    overrides = [f"sampler.{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    return validate(DiffusionConfig, apply_overrides(tree, overrides), source=f"recipe {recipe}")


def _run(args: argparse.Namespace) -> int:
    import torch

    from training.sample.run import SampleRequest, load_model, run_sample

    config = sample_config(args)
    # An export knows its own model; a recipe's model section only applies when asked for.
    model_config_given = bool(args.recipe or args.preset) or any(o.startswith("model.") for o in args.overrides)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    request = SampleRequest(prompt=args.prompt, out=args.out, first_frame=args.first_frame,
                            last_frame=args.last_frame, num_frames=args.num_frames, num_clips=args.clips,
                            seed=args.seed, size=args.size, device=device)
    model = load_model(config, args.model, model_config_given, args.seed)
    result = run_sample(config, request, model)
    print(f"wrote {result.video} ({result.num_frames} frames), {result.contact_sheet}, {result.run_dir}/ "
          f"in {result.seconds:.1f}s")
    return 0


def _default_recipe(args: argparse.Namespace) -> Path:
    import json

    from training.model.export import MODEL_CONFIG, resolve_model_dir

    preset = args.preset
    if preset is None and args.model is not None:
        saved = resolve_model_dir(args.model) / MODEL_CONFIG
        preset = json.loads(saved.read_text()).get("preset", "svd") if saved.is_file() else "svd"
    return Path(__file__).resolve().parents[2] / "recipes" / "model" / f"{preset or 'tiny'}.yaml"
