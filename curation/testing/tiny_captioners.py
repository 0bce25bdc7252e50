"""Tiny random-weight captioners for demos and tests, written in the on-disk format of the real ones.

- `write_tiny_coca`: open_clip's hub layout (open_clip_config.json + open_clip_model.safetensors), as
  `open_clip.push_to_hf_hub` writes it. The text side keeps CoCa's real tokenizer and vocabulary (49408
  tokens, start 49406, end 49407), so the folder loads with open_clip's SimpleTokenizer like a real one;
  the towers are one layer of width 8.
- `write_tiny_vlm`: a LLaVA-OneVision (the architecture of llava-hf/llava-onevision-qwen2-0.5b-ov-hf:
  SigLIP vision tower, Qwen2 language model) saved with save_pretrained, processor included (image and
  video processors at 32 x 32, a chat template that places <image> / <video> tokens).
- `write_tiny_lm`: a Llama causal LM with a ChatML chat template.

The transformers tokenizers are built offline with the `tokenizers` library: a word-level vocabulary of a
few caption-like sentences (so the random models emit words, not byte soup), saved as a
PreTrainedTokenizerFast. Each folder is marked with `mark_random`; every run that loads one says its
captions mean nothing. Weights are drawn from `seed`; the same seed writes the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.checkpoints import mark_random

SENTENCES = [
    "a dog runs across a green field in the sun",
    "a man rides a bike down a busy street at night",
    "waves crash on a sandy beach under a blue sky",
    "a red car drives through the snow on a mountain road",
    "two people walk together in a park with tall trees",
    "the camera pans slowly over a city skyline at sunset",
    "a cat sleeps on a grey sofa next to a window",
    "a woman cooks food in a small kitchen",
    "children play football on a grass pitch",
    "a bird flies over a lake with boats",
    "describe what happens in this video in one or two sentences",
    "two automatic captions describe the same video clip image caption from its middle frame",
    "write one concise sentence describing the clip combining both keep only details they agree on",
    "answer with the sentence only you write short factual captions for video clips none",
    ". , : ( ) ' !",
]

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'video' %}<video>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_BASE_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
_INIT_STD = 0.5  # random weights with some contrast: near-uniform logits would make bf16 decoding degenerate


def _tokenizer(extra_special: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=_BASE_SPECIAL + extra_special, show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    extra = {f"{name}_token": t for name, t in (("image", "<image>"), ("video", "<video>")) if t in extra_special}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", chat_template=CHATML, extra_special_tokens=extra)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Redraws every weight from `seed` (normal, std _INIT_STD; norms keep weight 1, biases 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            module = name.rsplit(".", 2)[-2].lower() if name.count(".") else ""
            if name.endswith("weight") and ("norm" in module or module.startswith("ln")):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * _INIT_STD)


def write_tiny_coca(folder: str | Path, seed: int = 0) -> Path:
    """A tiny CoCa in open_clip's hub layout; load it with caption.image.checkpoint: FOLDER."""
    from common.torch_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from open_clip.coca_model import CoCa
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from curation.models.open_clip_loading import save_open_clip_folder

    # coca_ViT-L-14's shape at width 8: CoCa needs text width == decoder width == embed_dim.
    model_cfg = {
        "embed_dim": 8,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 8, "head_width": 4, "patch_size": 8,
                       "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 8,
                       "output_tokens": True},
        "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 1,
                     "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 1,
                           "attn_pooler_heads": 2},
        "custom_text": True,
    }
    torch.manual_seed(seed)
    model = CoCa(**{k: v for k, v in model_cfg.items() if k != "custom_text"})
    _randomize(model, seed)
    preprocess_cfg = {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    folder = save_open_clip_folder(model, model_cfg, preprocess_cfg, Path(folder))
    mark_random(folder, "tiny CoCa (open_clip)")
    return folder


def write_tiny_vlm(folder: str | Path, seed: int = 0) -> Path:
    """A tiny LLaVA-OneVision + processor; load it with caption.video.model: FOLDER (either frames_as)."""
    from common.torch_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import (GenerationConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor, Qwen2Config, SiglipVisionConfig)

    folder = Path(folder)
    tokenizer = _tokenizer(["<image>", "<video>"])
    vocab = tokenizer.get_vocab()
    eos, pad = vocab["<|im_end|>"], vocab["<|endoftext|>"]
    side, patch = 32, 8
    pins = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=side, patch_size=patch)
    text = Qwen2Config(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                       bos_token_id=None, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=True)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                                  video_token_index=vocab["<video>"], vision_feature_select_strategy="full",
                                  vision_feature_layer=-1, image_grid_pinpoints=pins, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    _randomize(model, seed)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": side, "width": side}, image_grid_pinpoints=pins),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": side, "width": side}),
        tokenizer=tokenizer, num_image_tokens=(side // patch) ** 2, vision_feature_select_strategy="full",
        chat_template=CHATML)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    mark_random(folder, "tiny LLaVA-OneVision (transformers)")
    return folder


def write_tiny_lm(folder: str | Path, seed: int = 0) -> Path:
    """A tiny Llama causal LM + tokenizer with a chat template; load it with caption.summary.model: FOLDER."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = _tokenizer([])
    vocab = tokenizer.get_vocab()
    eos, pad = vocab["<|im_end|>"], vocab["<|endoftext|>"]
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         bos_token_id=None, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    _randomize(model, seed)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    mark_random(folder, "tiny Llama (transformers)")
    return folder


def write_tiny_captioners(folder: str | Path, seed: int = 0, max_new_tokens: int | None = None) -> dict[str, Any]:
    """All three under `folder` (coca/, vlm/, lm/); returns the `caption` recipe section that uses them.

    Random models never choose to stop, so every caption runs to max_new_tokens; a small value (e.g. 6)
    keeps demos and tests quick."""
    folder = Path(folder)
    section: dict[str, Any] = {"image": {"checkpoint": str(write_tiny_coca(folder / "coca", seed))},
                               "video": {"model": str(write_tiny_vlm(folder / "vlm", seed))},
                               "summary": {"model": str(write_tiny_lm(folder / "lm", seed))}}
    if max_new_tokens is not None:
        for sub in section.values():
            sub["max_new_tokens"] = max_new_tokens
    return section
