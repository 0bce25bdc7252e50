"""The three captioners of the caption stage: CoCa on an image, a vision-language model on a clip's key
frames, and a language model that merges their captions. Each wraps one model loaded from a local path (the
stage resolves recipes' hf-hub: references through the Hugging Face cache first; nothing here downloads).

Decoding is deterministic: greedy, or beam search with `num_beams` > 1; no sampling.

CoCa (open_clip): open_clip 3.3's `CoCa.generate` cannot run against transformers 5 (its import of
`BeamSearchScorer` fails, so `open_clip.coca_model._has_transformers` is False and generate asserts). The
decoder here drives CoCa's public pieces instead: the image is encoded once (`CoCa._encode_image`), then
each step runs `CoCa.forward(text=tokens, image_latent=..., image_embs=...)` and takes the logits of the
last position. The semantics follow open_clip's `generate`: the sequence starts with the tokenizer's
start-of-text token (49406); end-of-text (49407) is suppressed until `min_new_tokens` tokens were generated
(open_clip's `min_seq_len` = min_new_tokens + 1, which counts the start token) and the caption ends after
`max_new_tokens` (open_clip's `seq_len` = max_new_tokens + 2: start and end tokens); a repetition penalty,
when set, is Hugging Face's (divide positive logits, multiply negative ones, of every token already in the
sequence). Greedy decoding equals open_clip's `generate(generation_type="top_k", top_k=1)` token for token
(the tests check it, with open_clip's missing transformers imports patched in). Beam search is a plain beam
search (no beam groups, length penalty 1: a finished caption scores its summed log-probabilities divided by
its length counting the end token); open_clip's default, a diverse group beam search over raw logits, is not
reproduced.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curation.models.open_clip_loading import load_open_clip

log = logging.getLogger(__name__)

COCA_SOT = 49406  # open_clip's SimpleTokenizer: <start_of_text>
COCA_EOT = 49407  # <end_of_text>

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def clean_caption(text: str) -> str:
    """Whitespace (newlines included) collapsed to single spaces, ends stripped."""
    return " ".join(text.split())


def _quiet_transformers() -> None:
    """No per-load "Loading weights" bars from every caption actor: the pipeline has its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _to_pil(frame: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(frame))


# --------------------------------------------------------------------------------------------- CoCa


class CocaCaptioner:
    """open_clip CoCa on one RGB frame per clip.

    `checkpoint` is a local path: a weights file (`model` names its open_clip architecture, e.g.
    coca_ViT-L-14), a folder in open_clip's hub layout with open_clip_config.json (its architecture comes
    from that file and `model` is ignored), or a folder holding only weights such as a snapshot of
    laion/CoCa-ViT-L-14-laion2B-s13B-b90k (open_clip_pytorch_model.bin; `model` names the architecture).
    Weights load with safetensors or torch.load(weights_only=True)."""

    def __init__(self, checkpoint: Path, model: str, *, device: str = "cpu", dtype: str = "fp32",
                 max_new_tokens: int = 28, min_new_tokens: int = 4, num_beams: int = 1,
                 repetition_penalty: float = 1.0) -> None:
        precision = "fp32" if dtype == "fp32" else "pure_bf16"
        loaded = load_open_clip(Path(checkpoint), model, "caption.image.checkpoint", str(checkpoint),
                                "caption.image.model", device=device, precision=precision)
        self.model, self.preprocess, self.tokenizer = loaded.model, loaded.preprocess, loaded.tokenizer
        arch = loaded.model_cfg
        if "multimodal_cfg" not in arch:
            raise ValueError(f"{checkpoint} is an open_clip model without a text decoder (no multimodal_cfg): "
                             "captioning needs a CoCa checkpoint")
        self.model.eval()
        self.device = torch.device(device)
        self.dtype = TORCH_DTYPES[dtype]
        if max_new_tokens + 2 > self.model.context_length:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) + start and end tokens exceeds the model's "
                             f"context of {self.model.context_length} tokens; lower caption.image.max_new_tokens")
        self.settings = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                             num_beams=num_beams, repetition_penalty=repetition_penalty)

    def pixels(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """open_clip's own inference preprocessing of RGB uint8 frames, as one batch on the model's device."""
        batch = torch.stack([self.preprocess(_to_pil(f)) for f in frames])
        return batch.to(self.device, self.dtype)

    def tokens(self, frames: Sequence[np.ndarray]) -> list[list[int]]:
        """The generated token ids of each frame's caption, start and end tokens excluded."""
        return coca_generate(self.model, self.pixels(frames), **self.settings)

    def decode(self, ids: Sequence[int]) -> str:
        return clean_caption(self.tokenizer.decode([int(t) for t in ids if t not in (COCA_SOT, COCA_EOT)]))

    def caption(self, frames: Sequence[np.ndarray]) -> list[str]:
        return [self.decode(ids) for ids in self.tokens(frames)]


def _process_logits(logits: torch.Tensor, seqs: torch.Tensor, step: int, min_new_tokens: int,
                     repetition_penalty: float, eot: int) -> torch.Tensor:
    """open_clip's processors, in its order: min length (no end token yet), then repetition penalty."""
    if step < min_new_tokens:
        logits[:, eot] = -math.inf
    if repetition_penalty != 1.0:
        seen = torch.gather(logits, 1, seqs)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        logits = logits.scatter(1, seqs, seen)
    return logits


def _coca_next_logits(model: Any, seqs: torch.Tensor, image_latent: torch.Tensor,
                      image_embs: torch.Tensor) -> torch.Tensor:
    out = model(None, seqs, image_latent=image_latent, image_embs=image_embs, output_labels=False)
    return out["logits"][:, -1].float()


@torch.inference_mode()
def coca_generate(model: Any, pixels: torch.Tensor, *, max_new_tokens: int = 28, min_new_tokens: int = 4,
                  num_beams: int = 1, repetition_penalty: float = 1.0, sot: int = COCA_SOT,
                  eot: int = COCA_EOT) -> list[list[int]]:
    """Captions (token ids without start/end tokens) of a batch of preprocessed images, one per image."""
    image_latent, image_embs = model._encode_image(pixels)
    if num_beams > 1:
        return _coca_beam(model, image_latent, image_embs, num_beams=num_beams, max_new_tokens=max_new_tokens,
                          min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty, sot=sot, eot=eot)
    n = pixels.shape[0]
    seqs = torch.full((n, 1), sot, dtype=torch.long, device=pixels.device)
    active = torch.arange(n, device=pixels.device)  # rows still generating; finished ones leave the batch
    out: list[list[int]] = [[] for _ in range(n)]
    for step in range(max_new_tokens):
        logits = _coca_next_logits(model, seqs, image_latent[active], image_embs[active])
        logits = _process_logits(logits, seqs, step, min_new_tokens, repetition_penalty, eot)
        nxt = logits.argmax(dim=-1)
        for row, tok in zip(active.tolist(), nxt.tolist(), strict=True):
            if tok != eot:
                out[row].append(tok)
        going = nxt != eot
        if not bool(going.any()):
            break
        seqs = torch.cat([seqs[going], nxt[going, None]], dim=1)
        active = active[going]
    return out


def _coca_beam(model: Any, image_latent: torch.Tensor, image_embs: torch.Tensor, *, num_beams: int,
               max_new_tokens: int, min_new_tokens: int, repetition_penalty: float, sot: int,
               eot: int) -> list[list[int]]:
    """Plain beam search over log-probabilities, each image on its own (beams batched)."""
    results = []
    for i in range(image_embs.shape[0]):
        lat = image_latent[i:i + 1].expand(num_beams, *image_latent.shape[1:])
        embs = image_embs[i:i + 1].expand(num_beams, *image_embs.shape[1:])
        seqs = torch.full((num_beams, 1), sot, dtype=torch.long, device=image_embs.device)
        scores = torch.full((num_beams,), -math.inf, device=image_embs.device)
        scores[0] = 0.0  # every beam starts identical: expand only the first at step 0
        finished: list[tuple[float, list[int]]] = []
        for step in range(max_new_tokens):
            logits = _coca_next_logits(model, seqs, lat[: len(seqs)], embs[: len(seqs)])
            logp = torch.log_softmax(logits, dim=-1)
            logp = _process_logits(logp, seqs, step, min_new_tokens, repetition_penalty, eot)
            vocab = logp.shape[-1]
            cand = (scores[:, None] + logp).flatten()
            top_scores, top_idx = cand.topk(min(2 * num_beams, cand.numel()))
            keep_seqs, keep_scores = [], []
            for rank, (score, idx) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
                if score == -math.inf:
                    break
                beam, tok = divmod(idx, vocab)
                if tok == eot:
                    if rank < num_beams:  # as Hugging Face: an end token only counts among the top beams
                        finished.append((score / (step + 1), seqs[beam, 1:].tolist()))
                    continue
                keep_seqs.append(torch.cat([seqs[beam], seqs.new_tensor([tok])]))
                keep_scores.append(score)
                if len(keep_seqs) == num_beams:
                    break
            if not keep_seqs:
                break
            seqs, scores = torch.stack(keep_seqs), torch.tensor(keep_scores, device=seqs.device)
            if len(finished) >= num_beams:
                worst = sorted(s for s, _ in finished)[-num_beams]
                if scores.max().item() / (step + 1) <= worst:  # no running beam can still win
                    break
        else:  # ran out of length: running beams count as they are
            finished.extend((s / max_new_tokens, seq[1:].tolist()) for s, seq in zip(scores.tolist(), seqs))
        if not finished:
            finished.extend((s, seq[1:].tolist()) for s, seq in zip(scores.tolist(), seqs))
        results.append(max(finished, key=lambda f: f[0])[1])
    return results


# ---------------------------------------------------------------------------------- transformers


def _generation_kwargs(max_new_tokens: int, min_new_tokens: int, num_beams: int,
                       repetition_penalty: float, pad_token_id: int | None) -> dict[str, Any]:
    # Set explicitly, so that a model's own generation_config (e.g. sampling with temperature 0.7) does
    # not leak in: decoding here is always deterministic.
    return dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                do_sample=False, repetition_penalty=repetition_penalty, pad_token_id=pad_token_id)


def _left_padding(tokenizer: Any) -> None:
    tokenizer.padding_side = "left"  # decoder-only generation continues after the prompt's last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


class VlmCaptioner:
    """A transformers vision-language model (AutoProcessor + AutoModelForImageTextToText) given a clip's key
    frames in one user message, with the recipe's prompt.

    frames_as "images": one image entry per key frame (any VLM whose processor takes several images);
    "video": the frames as one video (processors with a video processor, e.g. LLaVA-OneVision, Qwen2-VL)."""

    def __init__(self, path: Path, *, prompt: str, system: str | None = None, frames_as: str = "images",
                 device: str = "cpu", dtype: str = "fp32", max_new_tokens: int = 60, min_new_tokens: int = 0,
                 num_beams: int = 1, repetition_penalty: float = 1.0, trust_remote_code: bool = False) -> None:
        from common.torch_compat import ensure_torchvision_importable

        ensure_torchvision_importable()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        _quiet_transformers()

        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                       local_files_only=True)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"{path}: its processor ({type(self.processor).__name__}) has no tokenizer; "
                             "caption.video.model must be a vision-language model with a text processor")
        if frames_as == "video" and getattr(self.processor, "video_processor", None) is None:
            raise ValueError(f"{path}: {type(self.processor).__name__} has no video processor, so frames_as: "
                             "video cannot work; set caption.video.frames_as: images")
        if not getattr(self.processor, "chat_template", None):
            raise ValueError(f"{path}: the processor has no chat template, so there is no way to place the "
                             "frames in the prompt; use a chat (instruction-tuned) vision-language model")
        _left_padding(tokenizer)
        self.tokenizer = tokenizer
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=TORCH_DTYPES[dtype], trust_remote_code=trust_remote_code, local_files_only=True)
        self.model.to(device).eval()
        self.device, self.dtype = torch.device(device), TORCH_DTYPES[dtype]
        self.prompt, self.system, self.frames_as = prompt, system, frames_as
        self.generation = _generation_kwargs(max_new_tokens, min_new_tokens, num_beams, repetition_penalty,
                                             tokenizer.pad_token_id)

    def render(self, num_frames: int) -> str:
        """The chat text of one clip, with the processor's placeholder(s) for its frames."""
        media = [{"type": "video"}] if self.frames_as == "video" else [{"type": "image"}] * num_frames
        messages = [{"role": "system", "content": [{"type": "text", "text": self.system}]}] if self.system else []
        messages.append({"role": "user", "content": [*media, {"type": "text", "text": self.prompt}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.inference_mode()
    def caption(self, clips: Sequence[Sequence[np.ndarray]]) -> list[str]:
        """One caption per clip; each clip is its key frames (RGB uint8, H x W x 3)."""
        texts = [self.render(len(frames)) for frames in clips]
        pil = [[_to_pil(f) for f in frames] for frames in clips]
        media = {"videos": pil} if self.frames_as == "video" else {"images": pil}
        inputs = self.processor(text=texts, padding=True, return_tensors="pt", **media)
        inputs = inputs.to(self.device).to(self.dtype)  # the dtype applies to floating tensors only
        out = self.model.generate(**inputs, **self.generation)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [clean_caption(t) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


class LmCaptioner:
    """A transformers causal language model (AutoTokenizer + AutoModelForCausalLM) answering one prompt per
    clip; with `use_chat_template` and a tokenizer that has a chat template, the prompt is the user message
    (after the optional system message) and the answer starts at the assistant's turn."""

    def __init__(self, path: Path, *, system: str | None = None, use_chat_template: bool = True,
                 device: str = "cpu", dtype: str = "fp32", max_new_tokens: int = 60, min_new_tokens: int = 0,
                 num_beams: int = 1, repetition_penalty: float = 1.0, trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _quiet_transformers()

        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                       local_files_only=True)
        _left_padding(self.tokenizer)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=TORCH_DTYPES[dtype], trust_remote_code=trust_remote_code, local_files_only=True)
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.system = system
        self.chat = use_chat_template and bool(getattr(self.tokenizer, "chat_template", None))
        if use_chat_template and not self.chat:
            log.warning("caption: %s has no chat template; the summary prompt goes in as plain text", path)
        self.generation = _generation_kwargs(max_new_tokens, min_new_tokens, num_beams, repetition_penalty,
                                             self.tokenizer.pad_token_id)

    def render(self, prompt: str) -> str:
        """The exact text the model continues."""
        if not self.chat:
            return prompt
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": prompt})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.inference_mode()
    def caption(self, prompts: Sequence[str]) -> list[str]:
        texts = [self.render(p) for p in prompts]
        # A chat template writes its own special tokens (BOS included where the model uses one).
        inputs = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=not self.chat)
        inputs = inputs.to(self.device)
        out = self.model.generate(**inputs, **self.generation)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [clean_caption(t) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
