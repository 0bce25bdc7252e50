"""Captions: three per clip, as in SVD's curation, each stored with the weight training draws it by.

Stable Video Diffusion captioned every clip three ways: an image captioner (CoCa) on the clip's middle
frame, a video captioner on the clip, and a language model that summarises the two. Training picks one
caption per sample at random, by weight (SVD: 0.5 image, 0.25 video, 0.25 summary).

- image: open_clip CoCa on the middle key frame. The decoder is ours (see `curation.models.captioners`): open_clip
  3.3's `CoCa.generate` does not run against transformers 5.
- video: a transformers vision-language model (AutoProcessor + AutoModelForImageTextToText) given the
  clip's K key frames (first, middle, last) in one chat message with the recipe's prompt, either as K images
  or as one K-frame video (`frames_as`; the video path needs a processor with a video processor, such as
  LLaVA-OneVision's or Qwen2-VL's).
- summary: a transformers causal LM (AutoTokenizer + AutoModelForCausalLM) prompted with the recipe's
  template, whose {image_caption} and {video_caption} receive the two captions of the clip (a caption that
  is missing, because its captioner is disabled, failed or said nothing, reads as `missing`). It runs only
  for clips that have at least one of the two.

The `captions` column is a list of {"text", "weight", "source"}: empty texts are dropped and the weights
are normalised over the captions a clip actually has (video disabled: image 2/3, summary 1/3). A captioner
that fails on a clip gives the clip a reason ("caption: image captioner failed: ...") while the captions
that were produced are kept; a clip with no caption at all gets "caption: empty captions".

Decoding is deterministic: greedy by default, beam search with num_beams > 1, never sampling. Models load
once per worker in setup(), from local folders or the Hugging Face cache (never downloaded); the device is
CUDA when num_gpus > 0 and CUDA is available, else the CPU (with a warning: real captioners are slow
there). Tiny random stand-ins (curation.testing.tiny_captioners) cost, per clip on a shared 2-core CPU at their
default lengths (28 / 60 / 60 tokens, which they always reach since they never choose to stop): CoCa
~0.34 s, the VLM ~0.16 s, the LM ~0.12 s in fp32; at 6 tokens each ~50 / 60 / 25 ms.
"""

from __future__ import annotations

import logging
import string
import time
from collections.abc import Callable
from typing import Any, Literal

import pydantic

from common.checkpoints import CheckpointSpec, is_random_stand_in, resolve
from common.config import Config
from curation.stages.base import ClipBatch, Stage, StageConfig, StageResult
from curation.stages.text_area import key_frames_problem

log = logging.getLogger(__name__)

SOURCES = ("image", "video", "summary")
SUMMARY_FIELDS = ("image_caption", "video_caption")

DEFAULT_SUMMARY_PROMPT = (
    "Two automatic captions describe the same video clip.\n"
    "Caption of its middle frame: {image_caption}\n"
    "Caption of the whole clip: {video_caption}\n"
    "Write one concise sentence that describes the clip, combining both captions. Keep what they agree on "
    "and drop details that are doubtful. Answer with the sentence only."
)


class GenerationSettings(Config):
    """Deterministic decoding: greedy (num_beams 1) or beam search; never sampling."""

    max_new_tokens: int = 60
    """Longest caption, in tokens of the model's tokenizer."""
    min_new_tokens: int = 0
    """The end token is suppressed until this many tokens were generated."""
    num_beams: int = 1
    """1 is greedy decoding; more keeps that many candidate captions (slower by about that factor)."""
    repetition_penalty: float = 1.0
    """Hugging Face's repetition penalty over every token already in the sequence; 1.0 is off, 1.1-1.3 curbs
    the loops greedy decoding falls into."""

    @pydantic.field_validator("max_new_tokens", "num_beams")
    @classmethod
    def _positive(cls, v: int, info: pydantic.ValidationInfo) -> int:
        if v < 1:
            raise ValueError(f"{info.field_name} ({v}) must be at least 1")
        return v

    @pydantic.field_validator("min_new_tokens")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"min_new_tokens ({v}) must be 0 or more")
        return v

    @pydantic.field_validator("repetition_penalty")
    @classmethod
    def _penalty(cls, v: float) -> float:
        if not 0.0 < v <= 10.0:
            raise ValueError(f"repetition_penalty ({v}) must lie in (0, 10]; 1.0 turns it off")
        return v

    @pydantic.model_validator(mode="after")
    def _lengths(self) -> GenerationSettings:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens "
                             f"({self.max_new_tokens}); lower min_new_tokens or raise max_new_tokens")
        return self

    def generation(self) -> dict[str, Any]:
        return dict(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                    num_beams=self.num_beams, repetition_penalty=self.repetition_penalty)


class _Captioner(GenerationSettings):
    enabled: bool = True
    weight: float = 0.25
    """Relative chance that training draws this caption; normalised over the captions a clip has."""

    @pydantic.field_validator("weight")
    @classmethod
    def _weight(cls, v: float) -> float:
        if not 0.0 < v < float("inf"):
            raise ValueError(f"weight ({v}) must be > 0; disable the captioner (enabled: false) instead of "
                             "giving it weight 0")
        return v


class ImageCaptionConfig(_Captioner):
    """open_clip CoCa on the middle key frame. CoCa takes no prompt."""

    weight: float = 0.5
    model: str = "coca_ViT-L-14"
    """open_clip architecture of `checkpoint`; ignored when `checkpoint` is a folder with
    open_clip_config.json (open_clip's hub layout), whose config names the architecture."""
    checkpoint: str = "hf-hub:laion/CoCa-ViT-L-14-laion2B-s13B-b90k"
    """A weights file, a folder (open_clip hub layout, or one holding open_clip_pytorch_model.bin), or
    hf-hub:org/repo in the Hugging Face cache. laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k writes
    COCO-style sentences ("a man riding a bike down a street") where the default writes alt-text-like ones."""
    max_new_tokens: int = 28
    """open_clip's default caption length (its seq_len 30 counts the start and end tokens); at most 74."""
    min_new_tokens: int = 4
    """open_clip's default (its min_seq_len 5 counts the start token)."""

    @pydantic.field_validator("max_new_tokens")
    @classmethod
    def _context(cls, v: int) -> int:
        if v > 74:
            raise ValueError(f"max_new_tokens ({v}) exceeds CoCa's 76-token context minus the start and end "
                             "tokens; use at most 74")
        return v


class VideoCaptionConfig(_Captioner):
    """A transformers vision-language model on the clip's key frames."""

    model: str = "hf-hub:llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
    """A folder saved with save_pretrained (model + processor with a chat template) or hf-hub:org/repo."""
    prompt: str = "Describe what happens in this video in one or two sentences."
    """The user message after the frames."""
    system: str | None = None
    """An optional system message (only for models whose chat template takes one)."""
    num_frames: int = 8
    """Frames of the clip the model sees, evenly spaced from its first to its last frame. They come from
    the one decode (decode.key_frames: sampled, so at most decode.key_frame_fps per second of clip: a
    short clip gives fewer) or from the targeted second pass (exact). 3 reuses the first/middle/last key
    frames and sends nothing extra through the pipeline."""
    frames_as: Literal["images", "video"] = "images"
    """images: the frames as images of one message (any multi-image VLM). video: as one video, through
    the processor's video processor (LLaVA-OneVision, Qwen2-VL, ...; setup fails with a clear error when
    the processor has none)."""
    trust_remote_code: bool = False
    """Allows a model folder to run its own Python code at load time. A risk: only for models whose code
    you have read, since it executes with the pipeline's permissions."""

    @pydantic.field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt is empty; write the instruction the model answers, e.g. 'Describe what "
                             "happens in this video in one or two sentences.'")
        return v

    @pydantic.field_validator("num_frames")
    @classmethod
    def _num_frames(cls, v: int) -> int:
        if not 3 <= v <= 32:
            raise ValueError(f"num_frames ({v}) must lie in [3, 32]: 3 reuses the first/middle/last key frames; "
                             "8 is typical for small video-language models")
        return v


class SummaryCaptionConfig(_Captioner):
    """A transformers causal LM that merges the image and video captions."""

    model: str = "hf-hub:Qwen/Qwen2.5-1.5B-Instruct"
    """A folder saved with save_pretrained (model + tokenizer) or hf-hub:org/repo."""
    prompt: str = DEFAULT_SUMMARY_PROMPT
    """Template of the user message: {image_caption} and {video_caption} receive the clip's captions
    (each must appear while its captioner is enabled); write literal braces as {{ and }}."""
    system: str | None = "You write short, factual captions for video clips."
    missing: str = "(none)"
    """What a placeholder reads when the clip lacks that caption."""
    use_chat_template: bool = True
    """Wrap the prompt in the tokenizer's chat template when it has one (instruction-tuned models)."""
    trust_remote_code: bool = False
    """As for the video model: lets the folder run its own code; a risk."""

    @pydantic.field_validator("prompt")
    @classmethod
    def _template(cls, v: str) -> str:
        template_fields(v)
        return v

    def render(self, image_caption: str | None, video_caption: str | None) -> str:
        """The prompt of one clip (before any chat template)."""
        return self.prompt.format(image_caption=image_caption or self.missing,
                                  video_caption=video_caption or self.missing)


def template_fields(template: str) -> set[str]:
    """The placeholders of a summary prompt; ValueError when it is malformed or names others."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"prompt is not a valid template ({e}); placeholders are {{image_caption}} and "
                         "{video_caption}, literal braces are written {{ and }}") from None
    fields = {name for _, name, _, _ in parsed if name is not None}
    unknown = sorted(fields - set(SUMMARY_FIELDS))
    if unknown:
        shown = ", ".join("{" + f + "}" if f else "{} (an unnamed placeholder)" for f in unknown)
        raise ValueError(f"prompt has unknown placeholder(s) {shown}; the only ones are {{image_caption}} and "
                         "{video_caption} (write literal braces as {{ and }})")
    if not fields:
        raise ValueError("prompt has no placeholder; it must hold {image_caption} and/or {video_caption}, "
                         "where the clip's captions go")
    return fields


class CaptionConfig(StageConfig):
    """Which captioners run, with which models and prompts, and the weights training draws captions by."""

    dtype: Literal["fp32", "bf16"] = "fp32"
    """Weights and activations of all three models. bf16 halves memory and is much faster on GPUs; on CPUs
    it is only worth it where bf16 matrix units exist. Captions differ slightly between the two."""
    image: ImageCaptionConfig = ImageCaptionConfig()
    video: VideoCaptionConfig = VideoCaptionConfig()
    summary: SummaryCaptionConfig = SummaryCaptionConfig()

    @pydantic.model_validator(mode="after")
    def _captioners(self) -> CaptionConfig:
        if not self.enabled:
            return self
        if not (self.image.enabled or self.video.enabled or self.summary.enabled):
            raise ValueError("caption is enabled but image, video and summary are all disabled; enable at least "
                             "one (caption.image.enabled: true) or disable the stage (caption.enabled: false)")
        if self.summary.enabled:
            if not (self.image.enabled or self.video.enabled):
                raise ValueError("caption.summary summarises the image and video captions, but both are "
                                 "disabled; enable caption.image or caption.video, or disable caption.summary")
            fields = template_fields(self.summary.prompt)
            lacking = [f"{{{source}_caption}}" for source in ("image", "video")
                       if getattr(self, source).enabled and f"{source}_caption" not in fields]
            if lacking:
                raise ValueError(f"caption.summary.prompt lacks {' and '.join(lacking)}, so the summary would "
                                 "not see that caption; add the placeholder, or disable that captioner")
        return self

    def enabled_sources(self) -> list[str]:
        return [s for s in SOURCES if getattr(self, s).enabled]

    def checkpoints(self) -> list[CheckpointSpec]:
        if not self.enabled:
            return []
        specs = []
        if self.image.enabled:
            specs.append(CheckpointSpec("caption.image.checkpoint", self.image.checkpoint, note=(
                f"open_clip {self.image.model} CoCa weights: a file, a folder with open_clip_config.json and "
                "weights, or a folder holding open_clip_pytorch_model.bin")))
        if self.video.enabled:
            specs.append(CheckpointSpec("caption.video.model", self.video.model,
                                        ("config.json", "tokenizer_config.json"),
                                        "a transformers vision-language model with its processor"))
        if self.summary.enabled:
            specs.append(CheckpointSpec("caption.summary.model", self.summary.model,
                                        ("config.json", "tokenizer_config.json"),
                                        "a transformers causal language model with its tokenizer"))
        return specs


def caption_entries(texts: dict[str, str | None], weights: dict[str, float]) -> list[dict[str, Any]]:
    """The `captions` value of a clip: its non-empty texts in source order, weights normalised over them."""
    kept = [(s, texts[s].strip()) for s in SOURCES if texts.get(s) and texts[s].strip()]
    total = sum(weights[s] for s, _ in kept)
    return [{"text": t, "weight": weights[s] / total, "source": s} for s, t in kept]


def _device(config: CaptionConfig) -> str:
    import torch

    if config.num_gpus > 0 and torch.cuda.is_available():
        return "cuda"
    if config.num_gpus > 0:
        log.warning("caption: num_gpus is %s but CUDA is not available here; the captioners run on the CPU, "
                    "slowly", config.num_gpus)
    else:
        log.warning("caption: num_gpus is 0, so the captioners run on the CPU, where real models are slow; "
                    "give the stage a GPU with caption.num_gpus: 1")
    return "cpu"


class Captioning(Stage):
    """Image, video and summary captions of each clip, with the weights training samples them by."""

    name = "caption"
    Config = CaptionConfig
    columns = ("captions",)
    uses_clip_frames = True  # the video captioner's evenly spaced frames (caption.video.num_frames)

    def __init__(self, config: CaptionConfig | None = None, captioners: dict[str, Any] | None = None) -> None:
        """`captioners` ({"image"|"video"|"summary": object with .caption(list)}) replaces the models that
        setup() would load (tests hand in stubs)."""
        super().__init__(config)
        self.config: CaptionConfig
        self._given = dict(captioners or {})
        self._captioners: dict[str, Any] = dict(self._given)
        self.timings: dict[str, float] = {}  # seconds spent in each captioner, summed over calls

    def __getstate__(self) -> dict[str, Any]:
        # A copy shipped to a worker loads its own models there; a loaded model is never pickled.
        state = dict(self.__dict__)
        state["_captioners"], state["_ready"] = dict(self._given), False
        return state

    def setup(self) -> None:
        from curation.models import captioners as cap

        cfg = self.config
        self._captioners = dict(self._given)
        todo = [s for s in cfg.enabled_sources() if s not in self._captioners]
        if not todo:
            return
        paths = {}
        for spec in cfg.checkpoints():  # all resolved before any loads: a missing one fails fast
            source = spec.role.split(".")[1]
            if source in todo:
                paths[source] = resolve(spec)
                if is_random_stand_in(paths[source]):
                    log.warning("%s: %s is a tiny random-weight stand-in; its captions mean nothing",
                                self.name, spec.role)
        device = _device(cfg)
        for source in todo:
            if source != "image" and getattr(cfg, source).trust_remote_code:
                log.warning("%s: caption.%s.trust_remote_code is on: %s may run its own code", self.name,
                            source, paths[source])
        if "image" in todo:
            self._captioners["image"] = cap.CocaCaptioner(
                paths["image"], cfg.image.model, device=device, dtype=cfg.dtype, **cfg.image.generation())
        if "video" in todo:
            v = cfg.video
            self._captioners["video"] = cap.VlmCaptioner(
                paths["video"], prompt=v.prompt, system=v.system, frames_as=v.frames_as, device=device,
                dtype=cfg.dtype, trust_remote_code=v.trust_remote_code, **v.generation())
        if "summary" in todo:
            s = cfg.summary
            self._captioners["summary"] = cap.LmCaptioner(
                paths["summary"], system=s.system, use_chat_template=s.use_chat_template, device=device,
                dtype=cfg.dtype, trust_remote_code=s.trust_remote_code, **s.generation())

    def __call__(self, batch: ClipBatch) -> StageResult:
        self.ensure_setup()
        cfg = self.config
        n = len(batch)
        reasons: list[str | None] = [None] * n
        ok: list[int] = []
        for i, key_frames in enumerate(batch.key_frames):
            problem = key_frames_problem(key_frames)
            if problem:
                reasons[i] = f"{self.name}: {problem}"
            else:
                ok.append(i)
        texts: dict[int, dict[str, str | None]] = {i: {} for i in ok}

        def record(source: str, items: dict[int, Any], fn: Callable[[list[Any]], list[str]]) -> None:
            produced, failures = self._run(source, items, fn)
            for i, text in produced.items():
                texts[i][source] = " ".join(text.split())  # "" when the model said nothing
            for i, why in failures.items():
                reasons[i] = reasons[i] or f"{self.name}: {source} captioner failed: {why}"

        if cfg.image.enabled:
            record("image", {i: batch.key_frames[i][len(batch.key_frames[i]) // 2] for i in ok},
                   self._captioners["image"].caption)
        if cfg.video.enabled:
            record("video", {i: list(_video_frames(batch, i)) for i in ok}, self._captioners["video"].caption)
        if cfg.summary.enabled:
            prompts = {i: cfg.summary.render(texts[i].get("image"), texts[i].get("video"))
                       for i in ok if texts[i].get("image") or texts[i].get("video")}
            record("summary", prompts, self._captioners["summary"].caption)

        weights = {s: getattr(cfg, s).weight for s in SOURCES}
        captions: list[list[dict[str, Any]] | None] = [None] * n
        for i in ok:
            entries = caption_entries(texts[i], weights)
            if entries:
                captions[i] = entries
            elif reasons[i] is None:
                reasons[i] = f"{self.name}: empty captions"
        return StageResult({"captions": captions}, reasons)

    def _run(self, source: str, items: dict[int, Any], fn: Callable[[list[Any]], list[str]]
             ) -> tuple[dict[int, str], dict[int, str]]:
        """Captions of all items in one call; when that fails, item by item so only the culprit fails."""
        if not items:
            return {}, {}
        keys = list(items)
        start = time.perf_counter()
        try:
            return self._call(fn, [items[k] for k in keys], keys), {}
        except Exception:  # noqa: BLE001 - isolated below, item by item
            log.debug("%s: %s captioner failed on a batch of %d; retrying one by one", self.name, source,
                      len(keys), exc_info=True)
            produced, failures = {}, {}
            for k in keys:
                try:
                    produced.update(self._call(fn, [items[k]], [k]))
                except Exception as e:  # noqa: BLE001 - a clip a model cannot take is a reason, not a crash
                    failures[k] = f"{type(e).__name__}: {e}"[:300]
            return produced, failures
        finally:
            self.timings[source] = self.timings.get(source, 0.0) + time.perf_counter() - start

    @staticmethod
    def _call(fn: Callable[[list[Any]], list[str]], inputs: list[Any], keys: list[int]) -> dict[int, str]:
        out = fn(inputs)
        if len(out) != len(keys) or not all(isinstance(t, str) for t in out):
            raise RuntimeError(f"the captioner returned {len(out)} values for {len(keys)} inputs, not one text each")
        return dict(zip(keys, out, strict=True))


def _video_frames(batch: ClipBatch, i: int) -> Any:
    """The clip's evenly spaced frames (caption.video.num_frames) when the pipeline sent them, else its
    first/middle/last key frames."""
    frames = batch.clip_frames[i] if batch.clip_frames else None
    return frames if frames is not None and key_frames_problem(frames) is None else batch.key_frames[i]
