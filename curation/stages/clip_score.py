"""CLIP scores of a clip's first, middle and last frame: embeddings, aesthetics, text-image similarity.

As in Stable Video Diffusion's curation, each clip is described by CLIP image embeddings of three key
frames, from which two scores are read:

- aesthetic: a LAION aesthetic head (see curation/models/aesthetic.py) on each frame's L2-normalised image
  embedding, combined over the frames by `reduce` (mean, or min: the worst frame);
- caption_similarity: for each caption an earlier stage wrote (`captions`: text, weight, source), the
  mean over the key frames of the cosine between the normalised image and text embeddings; the clip's
  value is the weight-averaged mean over its captions (None for a clip without captions). The text
  tower reads at most its context length of tokens (77 for CLIP ViT-L/14); longer captions are cut.

The embeddings themselves are kept (`clip_embedding`, K x D float32, unit norm) for deduplication and
clustering later, with `clip_model` naming the model they came from: embeddings (and thresholds on
these scores) of different models do not compare.

Frames go through open_clip's own evaluation transform (PIL: bicubic resize of the short side to the
model's size, centre crop, normalisation), all frames of a batch through the image tower in one call
and all captions through the text tower in one call, under torch.inference_mode. Identical frames and
captions of a batch are embedded once, so identical clips get identical scores, and a batch scored
again gives the same numbers. The same clip in a batch of other clips can differ in the last bits
(~1e-7): CPU matmul kernels round a row differently depending on where it falls in the batch.

The default head, the improved aesthetic predictor (sac+logos+ava1-l14-linearMSE), was fit on OpenAI's
CLIP ViT-L/14 embeddings, so the default CLIP is that model (open_clip's ViT-L-14 `openai` weights,
QuickGELU): a LAION-2B ViT-L/14 has the same 768 dimensions but another embedding space, and the head's
scores on it mean little.

Cost: on the shared dev CPU (2 AVX2 cores) a random-weight ViT-B/32 scored ~4 clips/s at batch 16 (three
432 x 768 key frames and one caption per clip: 0.25 s preprocessing, 3 s image tower, 0.7 s text tower
per batch). ViT-L/14's image tower needs ~18x the FLOPs of ViT-B/32's (~80 vs 4.4 GFLOPs per frame), so
on such a CPU expect ~0.2 clips/s: it is meant for a GPU (num_gpus: 1).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pydantic

from common.checkpoints import CheckpointSpec, MissingCheckpoint, is_hf, is_random_stand_in, resolve, split_hf
from curation.models.open_clip_loading import OPEN_CLIP_CONFIG, load_open_clip, open_clip_models
from curation.stages.base import ClipBatch, Stage, StageConfig, StageResult
from curation.stages.text_area import key_frames_problem

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "hf-hub:timm/vit_large_patch14_clip_224.openai/open_clip_pytorch_model.bin"
DEFAULT_HEAD = "hf-hub:camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"


class ClipScoreConfig(StageConfig):
    """Which CLIP and aesthetic head, how frames combine, and at what precision."""

    model: str = "ViT-L-14-quickgelu"
    """open_clip architecture name (see open_clip.list_models()), used when `checkpoint` is a single weights
    file; a folder checkpoint carries its own architecture in open_clip_config.json and ignores this. It
    must be the architecture the weights were trained with (OpenAI's CLIPs use the -quickgelu variants)."""
    checkpoint: str = DEFAULT_CHECKPOINT
    """The CLIP weights, never downloaded during a run: a local file (.safetensors, .bin, .pt, .pth: an
    open_clip state dict for `model`), a local folder in open_clip's hub layout (open_clip_config.json and
    open_clip_model.safetensors or open_clip_pytorch_model.bin), or hf-hub:org/repo (such a folder) /
    hf-hub:org/repo/file (a single file) in the Hugging Face cache. The default is OpenAI's ViT-L/14 as
    open_clip publishes it, the model the default aesthetic head was trained on. For LAION-2B's ViT-L/14
    write hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K (and a head trained on it, or null). Architectures
    that build a tower or tokenizer from a Hugging Face/timm name (SigLIP, XLM-R text) fetch those parts
    through transformers/timm: run with HF_HUB_OFFLINE=1 (a warning says so otherwise)."""
    aesthetic_head: str | None = DEFAULT_HEAD
    """A LAION-style aesthetic head (a file, local or hf-hub:org/repo/file): the improved aesthetic predictor
    MLP or a single linear layer, as a .safetensors or a weights-only .pth state dict. Its input size must
    be the CLIP's embedding size. The default, sac+logos+ava1-l14-linearMSE, takes OpenAI ViT-L/14
    embeddings. null: no aesthetic score (the columns stay empty)."""
    reduce: Literal["mean", "min"] = "mean"
    """How the key frames' aesthetic scores combine into `aesthetic`: mean, or min (a clip is only as
    good as its worst key frame)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype of the two towers (the aesthetic head and the similarities are always computed in
    fp32). On a GPU bf16/fp16 roughly halve the time; scores move by ~1e-2. On the CPU only fp32 and bf16
    are offered (fp16 needs num_gpus > 0), and bf16 pays only on CPUs with bf16 units (AVX512-BF16, AMX):
    on an AVX2-only CPU it was 7.5x slower than fp32 (ViT-B/32, 48 frames: 25 s vs 3.4 s)."""

    @pydantic.field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        known = open_clip_models()
        if known is not None and v not in known:
            import difflib

            close = difflib.get_close_matches(v, sorted(known), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()"
            raise ValueError(f"model {v!r} is not an open_clip architecture; {hint} (e.g. ViT-L-14-quickgelu for "
                             "OpenAI's ViT-L/14, ViT-L-14 for LAION's)")
        return v

    @pydantic.field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("checkpoint is empty; give a local file or folder, or hf-hub:org/repo")
        if is_hf(v):
            split_hf(v)  # raises with the accepted forms
        return v

    @pydantic.field_validator("aesthetic_head")
    @classmethod
    def _head(cls, v: str | None) -> str | None:
        if v is not None and is_hf(v) and split_hf(v)[1] is None:
            raise ValueError(f"aesthetic_head {v!r} names a whole repository; name the head file in it: "
                             "hf-hub:org/repo/path/to/head.pth (or .safetensors)")
        return v

    @pydantic.model_validator(mode="after")
    def _precision_fits_device(self) -> ClipScoreConfig:
        if self.precision == "fp16" and self.num_gpus <= 0:
            raise ValueError("precision fp16 needs a GPU (num_gpus > 0): CPUs have no fast fp16 matmuls and "
                             "autocast does not offer it there; set clip.precision: bf16 or fp32, or give the "
                             "stage a GPU with clip.num_gpus: 1")
        return self

    def checkpoints(self) -> list[CheckpointSpec]:
        specs = [CheckpointSpec("clip.checkpoint", self.checkpoint,
                                note=f"open_clip CLIP: a hub folder ({OPEN_CLIP_CONFIG} + weights) or weights of "
                                     f"architecture {self.model}")]
        if self.aesthetic_head is not None:
            specs.append(CheckpointSpec("clip.aesthetic_head", self.aesthetic_head,
                                        note="LAION aesthetic head on the CLIP image embedding"))
        return specs


@dataclass
class _Loaded:
    model: Any          # open_clip CLIP, eval mode, on `device`
    preprocess: Any     # PIL image -> 3 x S x S tensor
    tokenizer: Any      # list[str] -> T x context_length token ids
    head: Any           # aesthetic head on `device`, or None
    device: Any         # torch.device
    autocast_dtype: Any  # torch dtype or None (fp32)
    identity: str       # what `clip_model` records
    embed_dim: int


class ClipScore(Stage):
    """CLIP image embeddings, aesthetic score and caption similarity of the first, middle and last frame."""

    name = "clip"
    Config = ClipScoreConfig
    columns = ("clip_embedding", "clip_model", "aesthetic", "aesthetic_frames", "caption_similarity",
               "caption_similarities")

    def __init__(self, config: ClipScoreConfig | None = None) -> None:
        super().__init__(config)
        self.config: ClipScoreConfig
        self._loaded: _Loaded | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A copy shipped to a worker loads its own weights there; a loaded model is never pickled.
        state = dict(self.__dict__)
        state["_loaded"], state["_ready"] = None, False
        return state

    def setup(self) -> None:
        self._loaded = load(self.config)

    # ---- scoring ------------------------------------------------------------------------------------

    def __call__(self, batch: ClipBatch) -> StageResult:
        self.ensure_setup()
        m = self._loaded
        assert m is not None
        n = len(batch)
        reasons: list[str | None] = [None] * n
        captions: dict[int, list[tuple[str | None, float]]] = {}
        for i, key_frames in enumerate(batch.key_frames):
            problem = key_frames_problem(key_frames)
            if problem is None:
                try:
                    captions[i] = parse_captions(batch.context[i].get("captions") if i < len(batch.context) else None)
                except ValueError as e:
                    problem = str(e)
            if problem:
                reasons[i] = f"{self.name}: {problem}"
                captions.pop(i, None)
        good = sorted(captions)

        out: dict[str, list[Any]] = {c: [None] * n for c in self.columns}
        if not good:
            return StageResult(out, reasons)

        # Identical frames (a static shot, the same clip twice) and identical captions are embedded once: CPU
        # matmul kernels may round a row differently by its position in the batch, and this way identical
        # inputs always get identical scores.
        frame_rows: dict[bytes, int] = {}
        unique_frames: list[np.ndarray] = []
        rows: dict[int, list[int]] = {}
        for i in good:
            rows[i] = []
            for frame in batch.key_frames[i]:
                key = _digest(frame)
                if key not in frame_rows:
                    frame_rows[key] = len(unique_frames)
                    unique_frames.append(frame)
                rows[i].append(frame_rows[key])
        image = self.embed_images(unique_frames)
        aesthetic = self._aesthetic(image) if m.head is not None else None
        text_rows: dict[str, int] = {}
        for i in good:
            for text, _ in captions[i]:
                if text is not None:
                    text_rows.setdefault(text, len(text_rows))
        text = self.embed_texts(list(text_rows)) if text_rows else None

        for i in good:
            emb = image[rows[i]]
            out["clip_embedding"][i] = emb.tolist()
            out["clip_model"][i] = m.identity
            if aesthetic is not None:
                frames = aesthetic[rows[i]]
                out["aesthetic_frames"][i] = [float(v) for v in frames]
                out["aesthetic"][i] = float(np.mean(frames) if self.config.reduce == "mean" else np.min(frames))
            if captions[i]:
                # cosines of the unit vectors in float64, averaged over the key frames
                emb64 = emb.astype(np.float64)
                sims = [None if t is None else float(np.mean(emb64 @ text[text_rows[t]].astype(np.float64)))
                        for t, _ in captions[i]]
                out["caption_similarities"][i] = sims
                out["caption_similarity"][i] = weighted_mean(sims, [w for _, w in captions[i]])
        return StageResult(out, reasons)

    def _autocast(self):
        import torch

        m = self._loaded
        if m.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(m.device.type, dtype=m.autocast_dtype)

    def embed_images(self, frames: list[np.ndarray]) -> np.ndarray:
        """L2-normalised float32 image embeddings of `frames` (H x W x 3 uint8 each), in order (N x D)."""
        import torch
        from PIL import Image

        m = self._loaded
        pixels = torch.stack([m.preprocess(Image.fromarray(np.ascontiguousarray(f))) for f in frames])
        with torch.inference_mode(), self._autocast():
            feats = m.model.encode_image(pixels.to(m.device))
        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy().astype(np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 text embeddings of `texts`, in order (N x D)."""
        import torch

        m = self._loaded
        tokens = m.tokenizer(texts)
        with torch.inference_mode(), self._autocast():
            feats = m.model.encode_text(tokens.to(m.device))
        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy().astype(np.float32)

    def _aesthetic(self, image: np.ndarray) -> np.ndarray:
        """The head's score of each (already unit-norm) embedding, in fp32."""
        import torch

        m = self._loaded
        with torch.inference_mode():
            scores = m.head(torch.from_numpy(image).to(m.device, torch.float32))
        return scores.reshape(-1).float().cpu().numpy()


def _digest(frame: np.ndarray) -> bytes:
    h = hashlib.blake2b(str(frame.shape).encode(), digest_size=16)
    h.update(np.ascontiguousarray(frame).data)
    return h.digest()


def parse_captions(value: Any) -> list[tuple[str | None, float]]:
    """(text, weight) of each caption in a clip's `captions` (a list of {"text", "weight", "source"});
    empty when there are none. An empty text gives (None, weight): it has no similarity. A missing weight
    counts 1. Raises ValueError for entries that are not captions."""
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"captions are a {type(value).__name__}, expected a list of {{text, weight, source}}")
    out = []
    for j, c in enumerate(value):
        if not isinstance(c, dict):
            raise ValueError(f"captions[{j}] is a {type(c).__name__}, expected {{text, weight, source}}")
        text, weight = c.get("text"), c.get("weight")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"captions[{j}].text is a {type(text).__name__}, expected a string")
        weight = 1.0 if weight is None else weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"captions[{j}].weight {weight!r} is not a finite number >= 0")
        out.append((text if text and text.strip() else None, float(weight)))
    return out


def weighted_mean(values: list[float | None], weights: list[float]) -> float | None:
    """sum(w v) / sum(w) over the values that exist; None when there are none or their weights sum to 0."""
    pairs = [(v, w) for v, w in zip(values, weights, strict=True) if v is not None]
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        return None
    return float(sum(v * w for v, w in pairs) / total)


# ---- loading ------------------------------------------------------------------------------------------

def load(config: ClipScoreConfig) -> _Loaded:
    """Resolves and loads the CLIP (and head) of `config`; MissingCheckpoint when a file is not here."""
    import torch

    specs = {s.role: s for s in config.checkpoints()}
    clip_path = resolve(specs["clip.checkpoint"])
    head_path = resolve(specs["clip.aesthetic_head"]) if config.aesthetic_head is not None else None
    for role, path in (("clip.checkpoint", clip_path), ("clip.aesthetic_head", head_path)):
        if path is not None and is_random_stand_in(path):
            log.warning("clip: %s is a tiny random-weight stand-in; its scores mean nothing", role)

    use_gpu = config.num_gpus > 0 and torch.cuda.is_available()
    if config.num_gpus > 0 and not use_gpu:
        log.warning("clip: num_gpus=%s but CUDA is not available; CLIP runs on the CPU", config.num_gpus)
    device = torch.device("cuda" if use_gpu else "cpu")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]
    if dtype is torch.float16 and not use_gpu:
        log.warning("clip: precision fp16 without a GPU; running in fp32")
        dtype = None

    loaded = load_open_clip(clip_path, config.model, "clip.checkpoint", config.checkpoint, "clip.model",
                            device=device)
    model, preprocess, tokenizer, identity = loaded.model, loaded.preprocess, loaded.tokenizer, loaded.identity
    embed_dim = _embed_dim(model, preprocess, device)
    head = None
    if head_path is not None:
        if head_path.is_dir():
            raise MissingCheckpoint(f"clip.aesthetic_head: {head_path} is a folder; point clip.aesthetic_head at the "
                                    "head file itself (.pth or .safetensors)")
        from curation.models.aesthetic import load_head

        head = load_head(head_path, embed_dim).to(device)
    return _Loaded(model, preprocess, tokenizer, head, device, dtype, identity, embed_dim)


def _embed_dim(model, preprocess, device) -> int:
    dim = getattr(getattr(model, "visual", None), "output_dim", None)
    if isinstance(dim, int):
        return dim
    import torch
    from PIL import Image

    with torch.inference_mode():
        probe = preprocess(Image.new("RGB", (64, 64)))[None].to(device)
        return int(model.encode_image(probe).shape[-1])
