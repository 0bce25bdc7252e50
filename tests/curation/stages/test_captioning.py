"""Caption stage: the three captioners on tiny random-weight models, loaded through the same paths as real
checkpoints; CoCa's decoder against a step-by-step reference and against open_clip's own generate."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

from common.checkpoints import MissingCheckpoint
from common.config import ConfigError, validate
from common.torch_compat import ensure_torchvision_importable

ensure_torchvision_importable()

import torch  # noqa: E402

from curation.models import captioners as cap  # noqa: E402
from curation.stages.captioning import CaptionConfig, Captioning, caption_entries  # noqa: E402
from curation.stages.base import ClipBatch  # noqa: E402
from curation.testing.synthetic import moving_square, rendered_text  # noqa: E402
from curation.testing.tiny_captioners import write_tiny_captioners  # noqa: E402



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"image": {...}, "video": {...}, "summary": {...}} pointing at the tiny models, short captions."""
    return write_tiny_captioners(tmp_path_factory.mktemp("tiny_captioners"), max_new_tokens=6)


def _config(tiny, **changes) -> CaptionConfig:
    tree = {k: dict(v) for k, v in tiny.items()}
    for key, value in changes.items():
        if key in tree:
            tree[key].update(value)
        else:
            tree[key] = value
    return CaptionConfig.model_validate(tree)


@pytest.fixture(scope="module")
def stage(tiny):
    s = Captioning(_config(tiny))
    s.ensure_setup()
    return s


def _frames(seed: int, k: int = 3, h: int = 60, w: int = 80) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (k, h, w, 3), dtype=np.uint8)


def _batch() -> ClipBatch:
    text = np.stack([next(rendered_text(1, h=144, w=256))] * 3)
    moving = np.stack(list(moving_square(3, h=120, w=200)))
    return ClipBatch(["text", "moving", "noise", "text_again"], [text, moving, _frames(1), text.copy()])


class Stub:
    """A captioner stand-in: fixed texts by input position, optionally failing on some inputs."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def caption(self, items):
        self.calls.append(list(items))
        return [self.fn(x) for x in items]


# ------------------------------------------------------------------------------------ real loading


def test_every_captioner_loads_through_the_real_path_and_writes_text(stage):
    assert isinstance(stage._captioners["image"], cap.CocaCaptioner)
    assert isinstance(stage._captioners["video"], cap.VlmCaptioner)
    assert isinstance(stage._captioners["summary"], cap.LmCaptioner)
    result = stage(_batch())
    assert result.reasons == [None] * 4
    for captions in result.scores["captions"]:
        assert [c["source"] for c in captions] == ["image", "video", "summary"]
        assert [c["weight"] for c in captions] == [0.5, 0.25, 0.25]
        assert all(isinstance(c["text"], str) and c["text"] == c["text"].strip() and c["text"] for c in captions)


def test_captions_are_deterministic_and_depend_on_the_frames(stage):
    first, again = stage(_batch()), stage(_batch())
    assert first.scores == again.scores
    caps = first.scores["captions"]
    assert caps[0] == caps[3]  # the same clip twice in one batch
    by_source = [{c["source"]: c["text"] for c in clip} for clip in caps]
    assert len({c["image"] for c in by_source[:3]}) == 3  # three different frames, three CoCa captions
    assert len({c["video"] for c in by_source[:3]}) == 3
    # the clip's caption does not depend on its neighbours in the batch
    alone = stage(ClipBatch(["moving"], [_batch().key_frames[1]]))
    assert alone.scores["captions"][0][0] == caps[1][0]


def test_video_frames_as_video_goes_through_the_video_processor(tiny):
    s = Captioning(_config(tiny, video={"frames_as": "video"}))
    s.ensure_setup()
    vlm = s._captioners["video"]
    assert "<video>" in vlm.render(3) and "<image>" not in vlm.render(3)
    a, b = (s._captioners["video"].caption([list(_frames(seed))]) for seed in (5, 5))
    assert a == b and a[0]


# ------------------------------------------------------------------------------------ CoCa decoder


def _reference_greedy(model, pixels, max_new_tokens, min_new_tokens):
    """Step by step, one image at a time, re-encoding the image at every step through CoCa.forward."""
    out = []
    for i in range(len(pixels)):
        seq = torch.tensor([[cap.COCA_SOT]])
        for step in range(max_new_tokens):
            logits = model(pixels[i:i + 1], seq, output_labels=False)["logits"][0, -1].clone()
            if step < min_new_tokens:
                logits[cap.COCA_EOT] = -float("inf")
            tok = int(logits.argmax())
            if tok == cap.COCA_EOT:
                break
            seq = torch.cat([seq, torch.tensor([[tok]])], dim=1)
        out.append(seq[0, 1:].tolist())
    return out


@pytest.fixture
def open_clip_generate(monkeypatch):
    """open_clip's own CoCa.generate, with the transformers names its failed import left undefined."""
    import open_clip.coca_model as cm
    import transformers

    for name in ("LogitsProcessorList", "TopKLogitsWarper", "RepetitionPenaltyLogitsProcessor",
                 "MinLengthLogitsProcessor", "MaxLengthCriteria", "StoppingCriteriaList"):
        monkeypatch.setattr(cm, name, getattr(transformers, name), raising=False)
    monkeypatch.setattr(cm, "_has_transformers", True)
    monkeypatch.setitem(cm.GENERATION_TYPES, "top_k", transformers.TopKLogitsWarper)

    def generate(model, pixels, max_new_tokens, min_new_tokens, repetition_penalty=1.0):
        out = model.generate(pixels, generation_type="top_k", top_k=1, seq_len=max_new_tokens + 2,
                             min_seq_len=min_new_tokens + 1, repetition_penalty=repetition_penalty)
        return [[t for t in row if t not in (cap.COCA_SOT, cap.COCA_EOT)] for row in out.tolist()]

    return generate


@pytest.fixture
def end_token_boost():
    """Makes CoCa prefer its end token whenever it may say it (a random model never does on its own)."""
    handles = []

    def boost(model):
        def hook(module, inputs, logits):
            logits = logits.clone()
            logits[..., cap.COCA_EOT] += 100.0
            return logits
        handles.append(model.text_decoder.register_forward_hook(hook))

    yield boost
    for h in handles:
        h.remove()


def test_coca_greedy_picks_the_argmax_token_at_every_step(stage, open_clip_generate, end_token_boost):
    coca = stage._captioners["image"]
    pixels = coca.pixels([_frames(s)[1] for s in (2, 3, 4)])
    ours = cap.coca_generate(coca.model, pixels, max_new_tokens=9, min_new_tokens=2)
    assert ours == _reference_greedy(coca.model, pixels, 9, 2)
    assert ours == open_clip_generate(coca.model, pixels, 9, 2)
    assert [len(t) for t in ours] == [9, 9, 9] and len({tuple(t) for t in ours}) == 3
    penalised = cap.coca_generate(coca.model, pixels, max_new_tokens=9, min_new_tokens=2, repetition_penalty=1.5)
    assert penalised == open_clip_generate(coca.model, pixels, 9, 2, repetition_penalty=1.5)
    assert penalised != ours
    # the end token: never before min_new_tokens, and it ends the caption (rows finish independently)
    end_token_boost(coca.model)
    ended = cap.coca_generate(coca.model, pixels, max_new_tokens=9, min_new_tokens=3)
    assert ended == open_clip_generate(coca.model, pixels, 9, 3) == _reference_greedy(coca.model, pixels, 9, 3)
    assert [len(t) for t in ended] == [3, 3, 3] and [t[:3] for t in ours] == ended


def _sequence_logprob(model, pixel, tokens):
    seq = torch.tensor([[cap.COCA_SOT, *tokens]])
    with torch.inference_mode():
        logits = model(pixel[None], seq, output_labels=False)["logits"][0, :-1].float()
    return float(torch.log_softmax(logits, -1).gather(1, seq[0, 1:, None]).sum())


def test_coca_beam_search_finds_likelier_captions_than_greedy(stage, end_token_boost):
    coca = stage._captioners["image"]
    pixels = coca.pixels([_frames(s)[1] for s in (2, 3)])
    greedy = cap.coca_generate(coca.model, pixels, max_new_tokens=5, min_new_tokens=0)
    beam = cap.coca_generate(coca.model, pixels, max_new_tokens=5, min_new_tokens=0, num_beams=4)
    assert beam == cap.coca_generate(coca.model, pixels, max_new_tokens=5, min_new_tokens=0, num_beams=4)
    assert beam != greedy
    for i in range(2):
        assert len(beam[i]) == 5
        ours, theirs = (_sequence_logprob(coca.model, pixels[i], t) for t in (beam[i], greedy[i]))
        assert ours >= theirs - 1e-4 and (beam[i] == greedy[i] or ours > theirs)
    end_token_boost(coca.model)  # finished hypotheses: the end token wins as soon as it is allowed
    ended = cap.coca_generate(coca.model, pixels, max_new_tokens=5, min_new_tokens=2, num_beams=4)
    assert [len(t) for t in ended] == [2, 2]


def test_coca_loads_from_a_weights_file_with_an_architecture_name(stage, tiny, tmp_path):
    """The layout of laion/CoCa-ViT-L-14-laion2B-s13B-b90k: weights only, architecture named in the recipe."""
    import open_clip

    folder = tiny["image"]["checkpoint"]
    arch = json.loads((Path(folder) / "open_clip_config.json").read_text())["model_cfg"]
    (tmp_path / "lvd_test_tiny_coca.json").write_text(json.dumps(arch))
    open_clip.add_model_config(tmp_path)
    weights = Path(folder) / "open_clip_model.safetensors"
    from_file = cap.CocaCaptioner(weights, "lvd_test_tiny_coca", max_new_tokens=6)
    frames = [_frames(7)[1]]
    assert from_file.caption(frames) == stage._captioners["image"].caption(frames)
    with pytest.raises(ValueError, match="no architecture named 'coca_nonexistent'"):
        cap.CocaCaptioner(weights, "coca_nonexistent")


# --------------------------------------------------------------------------------- weights, prompts


def test_weights_are_normalised_over_the_captions_produced(tiny):
    s = Captioning(_config(tiny, video={"enabled": False}),
                   captioners={"image": Stub(lambda f: "a dog"), "summary": Stub(lambda p: "a dog runs")})
    caps = s(ClipBatch(["a"], [_frames(0)])).scores["captions"][0]
    assert [(c["source"], c["weight"]) for c in caps] == [("image", 2 / 3), ("summary", 1 / 3)]
    # an empty caption is dropped and the others share its weight
    texts = {"image": "  ", "video": "waves on a beach", "summary": "a beach"}
    assert caption_entries(texts, {"image": 0.5, "video": 0.25, "summary": 0.25}) == [
        {"text": "waves on a beach", "weight": 0.5, "source": "video"},
        {"text": "a beach", "weight": 0.5, "source": "summary"}]
    assert caption_entries({"image": "", "video": None}, {"image": 0.5, "video": 0.25, "summary": 0.25}) == []


def test_every_caption_empty_gives_a_reason_and_no_summary_runs(tiny):
    summary = Stub(lambda p: "never")
    s = Captioning(_config(tiny), captioners={"image": Stub(lambda f: ""), "video": Stub(lambda c: " "),
                                              "summary": summary})
    result = s(ClipBatch(["a", "b"], [_frames(0), _frames(1)]))
    assert result.reasons == ["caption: empty captions"] * 2
    assert result.scores["captions"] == [None, None]
    assert summary.calls == []


def test_summary_prompt_receives_the_clips_other_captions(stage):
    lm = stage._captioners["summary"]
    seen = []
    original = lm.caption
    lm.caption = lambda prompts: seen.extend(prompts) or original(prompts)
    try:
        result = stage(_batch())
    finally:
        del lm.caption
    assert len(seen) == 4
    for prompt, captions in zip(seen, result.scores["captions"], strict=True):
        texts = {c["source"]: c["text"] for c in captions}
        assert prompt == stage.config.summary.render(texts["image"], texts["video"])
        assert f"Caption of its middle frame: {texts['image']}\n" in prompt
        assert f"Caption of the whole clip: {texts['video']}\n" in prompt
        rendered = lm.render(prompt)  # what the model reads: the tokenizer's chat template around it
        assert rendered.startswith("<|im_start|>system\nYou write short, factual captions")
        assert f"<|im_start|>user\n{prompt}<|im_end|>" in rendered and rendered.endswith("<|im_start|>assistant\n")


def test_a_missing_caption_reads_as_missing_in_the_summary_prompt(tiny):
    summary = Stub(lambda p: "summary")
    s = Captioning(_config(tiny, summary={"prompt": "I: {image_caption} | V: {video_caption} {{x}}", "missing": "n/a"}),
                   captioners={"image": Stub(lambda f: "a dog"), "video": Stub(lambda c: ""), "summary": summary})
    s(ClipBatch(["a"], [_frames(0)]))
    assert summary.calls == [["I: a dog | V: n/a {x}"]]


@pytest.mark.parametrize("prompt, match", [
    ("Summarise {image_caption} and {caption}", r"unknown placeholder\(s\) \{caption\}.*\{image_caption\} and \{video_caption\}"),
    ("Summarise {} and {video_caption}", r"unknown placeholder.*unnamed"),
    ("Summarise {image_caption and {video_caption}", r"not a valid template"),
    ("Summarise the captions", r"no placeholder"),
    ("Summarise {image_caption}", r"caption.summary.prompt lacks \{video_caption\}.*add the placeholder"),
])
def test_a_bad_summary_template_is_a_config_error_naming_the_fix(prompt, match):
    with pytest.raises(ConfigError, match=match):
        validate(CaptionConfig, {"summary": {"prompt": prompt}})


def test_config_errors_for_captioner_choices():
    with pytest.raises(ConfigError, match="all disabled; enable at least one"):
        validate(CaptionConfig, {name: {"enabled": False} for name in ("image", "video", "summary")})
    with pytest.raises(ConfigError, match="enable caption.image or caption.video"):
        validate(CaptionConfig, {"image": {"enabled": False}, "video": {"enabled": False}})
    with pytest.raises(ConfigError, match="weight.*must be > 0"):
        validate(CaptionConfig, {"video": {"weight": 0}})
    with pytest.raises(ConfigError, match="min_new_tokens.*exceeds max_new_tokens"):
        validate(CaptionConfig, {"summary": {"min_new_tokens": 9, "max_new_tokens": 8}})
    with pytest.raises(ConfigError, match="at most 74"):
        validate(CaptionConfig, {"image": {"max_new_tokens": 80}})
    # video disabled: a template without {video_caption} is fine; a disabled stage is never checked
    validate(CaptionConfig, {"video": {"enabled": False}, "summary": {"prompt": "Say: {image_caption}"}})
    validate(CaptionConfig, {"enabled": False, **{n: {"enabled": False} for n in ("image", "video", "summary")}})


def test_checkpoints_list_the_enabled_captioners():
    specs = CaptionConfig().checkpoints()
    assert [s.role for s in specs] == ["caption.image.checkpoint", "caption.video.model", "caption.summary.model"]
    assert specs[0].source == "hf-hub:laion/CoCa-ViT-L-14-laion2B-s13B-b90k"
    assert "config.json" in specs[1].expect and "config.json" in specs[2].expect
    no_video = CaptionConfig.model_validate({"video": {"enabled": False}}).checkpoints()
    assert [s.role for s in no_video] == ["caption.image.checkpoint", "caption.summary.model"]
    assert CaptionConfig(enabled=False).checkpoints() == []


# ------------------------------------------------------------------------------ setup, pickling, errors


def test_a_missing_model_folder_fails_setup_naming_the_path(tiny, tmp_path):
    missing = tmp_path / "no_such_vlm"
    s = Captioning(_config(tiny, video={"model": str(missing)}))
    with pytest.raises(MissingCheckpoint, match=f"caption.video.model: checkpoint {missing}"):
        s.ensure_setup()
    s = Captioning(_config(tiny, image={"checkpoint": "hf-hub:lvd-tests/no-such-coca"}))
    with pytest.raises(MissingCheckpoint, match="caption.image.checkpoint: the lvd-tests/no-such-coca repository"):
        s.ensure_setup()
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    s = Captioning(_config(tiny, summary={"model": str(incomplete)}))
    with pytest.raises(MissingCheckpoint, match="lacks config.json, tokenizer_config.json"):
        s.ensure_setup()
    s = Captioning(_config(tiny, image={"checkpoint": str(incomplete)}))  # e.g. a snapshot without its weights
    with pytest.raises(MissingCheckpoint, match=f"{incomplete} holds no open_clip weights"):
        s.ensure_setup()


def test_frames_as_video_without_a_video_processor_is_a_clear_error(tiny, monkeypatch):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny["video"]["model"])
    processor.video_processor = None  # as an images-only processor (e.g. LLaVA 1.5's) has none
    monkeypatch.setattr(AutoProcessor, "from_pretrained", lambda *a, **k: processor)
    with pytest.raises(ValueError, match="has no video processor, so frames_as: video cannot work; set "
                                         "caption.video.frames_as: images"):
        cap.VlmCaptioner(tiny["video"]["model"], prompt="p", frames_as="video")


def test_the_stage_pickles_without_its_models(tiny, stage):
    fresh = Captioning(_config(tiny))
    copy = pickle.loads(pickle.dumps(fresh))
    assert copy.config == fresh.config and copy._captioners == {}
    shipped = pickle.loads(pickle.dumps(stage))  # after setup: the models stay behind
    assert shipped._captioners == {} and not shipped._ready
    assert len(pickle.dumps(stage)) < 20_000


def test_bad_key_frames_and_a_failing_captioner_give_per_clip_reasons(tiny):
    def video(clip):
        if clip[0].shape[0] == 13:
            raise RuntimeError("processor cannot take 13 rows")
        return "a clip"

    s = Captioning(_config(tiny), captioners={"image": Stub(lambda f: "a frame"), "video": Stub(video),
                                              "summary": Stub(lambda p: "both")})
    frames = [_frames(0), np.zeros((0, 0, 0, 3), np.uint8), _frames(1).astype(np.float32), None,
              _frames(2, h=13), _frames(3)[..., :2]]
    result = s(ClipBatch(list("abcdef"), frames))
    assert result.reasons[0] is None
    assert result.reasons[1] == "caption: key frames empty (shape (0, 0, 0, 3))"
    assert result.reasons[2] == "caption: key frames are float32, expected uint8 RGB"
    assert result.reasons[3] == "caption: key frames missing"
    assert result.reasons[4] == "caption: video captioner failed: RuntimeError: processor cannot take 13 rows"
    assert result.reasons[5].startswith("caption: key frames have shape (3, 60, 80, 2)")
    caps = result.scores["captions"]
    assert [c["source"] for c in caps[0]] == ["image", "video", "summary"]
    assert caps[1] is caps[2] is caps[3] is caps[5] is None
    # the failed clip keeps what the other captioners wrote, summary included
    assert [(c["source"], c["weight"]) for c in caps[4]] == [("image", 2 / 3), ("summary", 1 / 3)]


def test_setup_warns_that_stand_ins_mean_nothing(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="curation.stages.captioning"):
        Captioning(_config(tiny, video={"enabled": False}, summary={"enabled": False})).ensure_setup()
    assert "caption.image.checkpoint is a tiny random-weight stand-in" in caplog.text
    assert "caption.video.model" not in caplog.text


def test_the_video_captioner_sees_the_clip_frames_when_the_pipeline_sends_them(tiny):
    video = Stub(lambda frames: f"{len(frames)} frames")
    s = Captioning(_config(tiny), captioners={"image": Stub(lambda f: "a frame"), "video": video,
                                              "summary": Stub(lambda p: "both")})
    spread = np.stack(list(moving_square(8, h=60, w=80)))
    result = s(ClipBatch(["a", "b", "c"], [_frames(0), _frames(1), _frames(2)], clip_frames=[spread, None, spread[:, :, :, :2]]))
    texts = [{c["source"]: c["text"] for c in caps}["video"] for caps in result.scores["captions"]]
    # 8 evenly spaced frames when sent; the 3 key frames when not, or when the sent ones are unusable
    assert texts == ["8 frames", "3 frames", "3 frames"]
    assert s(ClipBatch(["a"], [_frames(0)])).scores["captions"][0][1]["text"] == "3 frames"


def test_num_frames_range_names_the_fix(tiny):
    with pytest.raises(ValueError, match=r"num_frames \(2\) must lie in \[3, 32\]"):
        _config(tiny, video={"num_frames": 2})
