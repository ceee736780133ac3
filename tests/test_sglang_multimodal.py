"""The sgl engine with a Qwen-VL target and image samples (issue 15), run WITHOUT sglang against the stand-in of
tests/test_sglang_engine.py extended with SGLang v0.5.10.post1's image path as inference/sglang.py cites it:
- generate(input_ids=[...], image_data=[[img, ...], ...]): one list per request, [] for a text request;
- load_image (utils/common.py:809-846): file:// URIs, data: URIs, bare strings ending in an image extension are
  paths, anything else is decoded as base64;
- the tokenizer manager decodes the ids to text, finds each <|vision_start|><|image_pad|>+<|vision_end|>, runs
  the target's processor on text + images and takes its input_ids (each pad repeated t*h*w/merge^2 times);
  hidden-state rows are per token of that expanded sequence.
Left out: SGLang's own pre-resize of each image (qwen_vl.py resize_image), which with Qwen-VL's default bounds
rounds sizes as the processor does but resamples the pixels; the stand-in's pixels are the processor's alone.
What this cannot show: that a real SGLang build behaves as cited (not run here: no sglang, no GPU build)."""

import base64
import io
import os
import re
import sys
import types
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_sglang_engine import (MM_PROCESSORS, TOL, FakeEngine, FakeModality, FakeModelRunner,  # noqa: E402
                                FakeMultimodalDataItem, FakeMultimodalProcessorOutput, _CausalLM, _cfg,
                                _float_tolist_spy, _install_stand_in_rank, _put_spy, _sgl_engine_path,
                                _srt_modules)

from torchspec.data import build_dataset  # noqa: E402
from torchspec.data.errors import DataError  # noqa: E402
from torchspec.data.sample import Sample  # noqa: E402
from torchspec.inference import sglang as sgl_engine  # noqa: E402
from torchspec.inference.hf import HFEngine, load_target  # noqa: E402
from torchspec.inference.vlm import vision_inputs  # noqa: E402
from torchspec.transfer.local import LocalStore  # noqa: E402

VISION = re.compile(r"<\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif")


def assert_records_equal(samples, stored, store, want) -> None:
    """Each sample's stored record equals `want`'s (the expanded sequence for a sample with images)."""
    for s, st in zip(samples, stored):
        g, w = store.get(s.sample_id), want[s.sample_id]
        assert st.length == len(w["input_ids"]) and torch.equal(g["input_ids"], w["input_ids"])
        assert torch.equal(g["loss_mask"], w["loss_mask"])
        if s.images:
            assert len(g["input_ids"]) > len(s.input_ids)   # expanded
        torch.testing.assert_close(g["aux_hidden_states"], w["aux_hidden_states"], **TOL)
        torch.testing.assert_close(g["final_hidden_states"], w["final_hidden_states"], **TOL)


def _sglang_load_image(ref: str):
    from PIL import Image

    if ref.startswith("file://"):
        src = unquote(urlparse(ref).path)
    elif ref.startswith("data:") or not ref.lower().endswith(IMAGE_EXTENSIONS):
        src = io.BytesIO(base64.b64decode(ref.split(",", 1)[1] if ref.startswith("data:") else ref, validate=True))
    else:
        src = ref
    return Image.open(src).convert("RGB")


RESCALE = {"factor": 1}   # != 1: images resized before the processor (as SGLang's own resize could): other counts


def _expand_request(tok, image_processor, ids, images):
    """The qwen_vl processor's work on one request, as cited: (the expanded ids, pixel_values, image_grid_thw)."""
    text = tok.decode(ids)
    parts = VISION.split(text)
    assert len(parts) - 1 == len(images), (len(parts) - 1, len(images))
    pil = [_sglang_load_image(r) for r in images]
    pil = [im.resize((im.width * RESCALE["factor"], im.height * RESCALE["factor"])) for im in pil]
    pix = image_processor(images=pil, return_tensors="pt")
    counts = (pix["image_grid_thw"].prod(-1) // image_processor.merge_size ** 2).tolist()
    text = parts[0] + "".join("<|vision_start|>" + "<|image_pad|>" * c + "<|vision_end|>" + p
                              for c, p in zip(counts, parts[1:]))
    return tok(text, add_special_tokens=False)["input_ids"], pix["pixel_values"], pix["image_grid_thw"]


class _VLMNumbers:
    """transformers' numbers of the tiny Qwen-VL target (a text target: the parent's), for the stand-ins."""

    def _load(self, path):
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        from torchspec.inference.vlm import is_vlm_dir

        self.vlm = is_vlm_dir(path)
        if not self.vlm:
            return super()._load(path)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.proc = AutoImageProcessor.from_pretrained(path)
        self.pad = self.tok.convert_tokens_to_ids("<|image_pad|>")
        self.extra = {}
        return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()

    def _text_base(self):
        return self.hf.model.language_model if self.vlm else super()._text_base()

    def _run_base(self, ids):
        if not self.vlm:
            return super()._run_base(ids)
        ids_t = torch.tensor([ids])
        extra = dict(self.extra.get(tuple(ids), {}))
        if extra:
            extra["mm_token_type_ids"] = (ids_t == self.pad).to(torch.int32)
        self.hf.model(input_ids=ids_t, use_cache=False, **extra)


class FakeVLMEngine(_VLMNumbers, FakeEngine):
    def _tokenize_request(self, ids, images):
        if not images:
            return ids
        new, pixels, grid = _expand_request(self.tok, self.proc, ids, images)
        self.extra[tuple(new)] = {"pixel_values": pixels, "image_grid_thw": grid}
        return new


class FakeQwenVLImageProcessor:
    """sglang.srt.multimodal.processors.qwen_vl.QwenVLImageProcessor(hf_config, server_args, _processor,
    transport_mode): process_mm_data_async(image_data, input_text=<ids>, request_obj) decodes the ids, expands
    each <|vision_start|><|image_pad|>+<|vision_end|> by the HF processor's count and returns a
    MultimodalProcessorOutput: the expanded input_ids, one MultimodalDataItem per image (feature = its
    pixel_values rows, model_specific_data image_grid_thw, offsets = its token run), im_token_id. The real one
    also returns M-RoPE positions; this one leaves them to compute_mrope_positions (as the scheduler does when
    they are missing), which the transformers numbers below do not need: it returns none."""
    instances: list = []

    def __init__(self, hf_config, server_args, _processor, transport_mode, *args, **kwargs):
        assert transport_mode == "default", transport_mode   # in-process: no CUDA IPC handles
        self.hf_config, self.server_args, self._processor = hf_config, server_args, _processor
        self.requests = []
        FakeQwenVLImageProcessor.instances.append(self)

    async def process_mm_data_async(self, image_data, input_text, request_obj, *args, **kwargs):
        assert isinstance(input_text, list) and request_obj.video_data is None and request_obj.audio_data is None
        self.requests.append(list(image_data))
        ids, pixels, grid = _expand_request(self._processor.tokenizer, self._processor.image_processor,
                                            input_text, image_data)
        pad = self.hf_config.image_token_id
        t = torch.tensor(ids)
        starts = [i for i in range(len(ids)) if ids[i] == pad and (i == 0 or ids[i - 1] != pad)]
        rows = grid.prod(-1).tolist()
        items, at = [], 0
        for k, start in enumerate(starts):
            n = int(rows[k] // self._processor.image_processor.merge_size ** 2)
            assert torch.all(t[start:start + n] == pad)
            items.append(FakeMultimodalDataItem(FakeModality.IMAGE, offsets=[(start, start + n - 1)],
                                                feature=pixels[at:at + rows[k]],
                                                model_specific_data={"image_grid_thw": grid[k:k + 1]}))
            at += rows[k]
        return FakeMultimodalProcessorOutput(mm_items=items, input_ids=ids, im_token_id=pad)

    def compute_mrope_positions(self, input_ids, mm_items):
        return None, None


class _QwenVLLike(_CausalLM):
    """SGLang's Qwen2VLForConditionalGeneration shape: model.layers.<k>, logits_processor, and pad_input_ids
    (mm_utils MultiModalityDataPaddingPatternMultimodalTokens: each item's offsets get its pad_value)."""

    def pad_input_ids(self, input_ids, mm_inputs):
        t = torch.as_tensor(input_ids)
        for item in mm_inputs.mm_items:
            for first, last in item.offsets:
                t[first:last + 1] = item.pad_value
        return t.tolist()


class FakeVLMModelRunner(_VLMNumbers, FakeModelRunner):
    """ModelRunner of a Qwen-VL target: its forward finds each image's tokens by their pad value
    (general_mm_embed_routine over forward_batch.mm_inputs) and embeds the items' pixel_values there; here:
    transformers' numbers for the ids with the image token back in place and the items' pixels."""

    def _build_model(self):
        return (_QwenVLLike(self._text_base(), self.hf.lm_head) if self.vlm else super()._build_model()).eval()

    def _embed_routine(self, prompts, mm_inputs):
        if not self.vlm:
            return super()._embed_routine(prompts, mm_inputs)
        out = []
        for ids, mm in zip(prompts, mm_inputs or [None] * len(prompts)):
            if mm is not None:
                pads = {item.pad_value for item in mm.mm_items}
                assert not any(t == mm.im_token_id for t in ids), "image tokens left without their pad value"
                ids = [mm.im_token_id if t in pads else t for t in ids]
                self.extra[tuple(ids)] = {
                    "pixel_values": torch.cat([item.feature for item in mm.mm_items]),
                    "image_grid_thw": torch.cat([item.model_specific_data["image_grid_thw"] for item in mm.mm_items])}
            out.append(ids)
        return out


@pytest.fixture
def fake_sglang_vlm(monkeypatch):
    module = types.ModuleType("sglang")
    module.Engine = FakeVLMEngine
    monkeypatch.setitem(sys.modules, "sglang", module)
    for name, sub in _srt_modules().items():
        monkeypatch.setitem(sys.modules, name, sub)
    sys.modules["sglang.srt.model_executor.model_runner"].ModelRunner = FakeVLMModelRunner
    monkeypatch.setitem(MM_PROCESSORS, "Qwen2VLForConditionalGeneration", FakeQwenVLImageProcessor)
    monkeypatch.setitem(MM_PROCESSORS, "Qwen2_5_VLForConditionalGeneration", FakeQwenVLImageProcessor)
    monkeypatch.setitem(MM_PROCESSORS, "Qwen3VLForConditionalGeneration", FakeQwenVLImageProcessor)
    FakeEngine.instances = []
    FakeModelRunner.instances = []
    FakeQwenVLImageProcessor.instances = []
    RESCALE["factor"] = 1
    yield module
    sgl_engine._captured.clear()


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, tiny_tokenizer):
    from torchspec.utils.tiny import make_tiny_vlm

    d = tmp_path_factory.mktemp("sgl_vlm")
    make_tiny_vlm(d, tokenizer=tiny_tokenizer)
    return d


@pytest.fixture(scope="module")
def samples(vlm_dir, tmp_path_factory):
    import json

    from PIL import Image
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("sgl_imgs")
    g = torch.Generator().manual_seed(5)
    arr = lambda w, h: torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()  # noqa: E731
    Image.fromarray(arr(90, 40)).save(d / "wide.png")
    Image.fromarray(arr(40, 70)).save(d / "tall photo.dat", format="PNG")   # no image extension, a space
    buf = io.BytesIO()
    Image.fromarray(arr(28, 28)).save(buf, format="PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def conv(images, q, a):
        parts = [{"type": "image_url", "image_url": {"url": n}} for n in images] + [{"type": "text", "text": q}]
        return {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": a}]}

    records = [conv(["wide.png"], "What is in the picture?", "Random pixels."),
               {"messages": [{"role": "user", "content": "No image: say hi."},
                             {"role": "assistant", "content": "Hi there."}]},
               conv(["tall photo.dat", data_uri], "Compare them.", "The first is taller."),
               conv([data_uri], "Describe.", "Noise.")]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = AutoTokenizer.from_pretrained(str(vlm_dir))
    ds = build_dataset(d / "train.jsonl", tok, chat_template="qwen", max_seq_length=512, prompt_key="messages",
                       progress=False)
    return list(ds)


def _hf_records(vlm_dir, tmp_path, samples):
    store = LocalStore(root=tmp_path / "hf")
    model = load_target(vlm_dir, torch.float32, "cpu")
    HFEngine(model, store, aux_layers=[0, 1, 2], batch_size=4, vision=vision_inputs(model, vlm_dir)).generate(samples)
    return {s.sample_id: store.get(s.sample_id) for s in samples}


def _sgl(vlm_dir, tmp_path):
    from torchspec.inference.factory import build_engine

    store = LocalStore(root=tmp_path / "sgl")
    return build_engine(_cfg(vlm_dir), store, "cpu"), store


def test_image_samples_send_image_data_and_records_are_the_expanded_sequence(fake_sglang_vlm, vlm_dir, samples,
                                                                             tmp_path, monkeypatch):
    """The sgl.Engine path (engines spanning nodes)."""
    _sgl_engine_path(monkeypatch)
    want = _hf_records(vlm_dir, tmp_path, samples)
    engine, store = _sgl(vlm_dir, tmp_path)
    stored = engine.generate(samples)
    fake = FakeEngine.instances[-1]
    # one request per sample: the ids as tokenized (one pad per image), the images as file:// / data: URIs
    call = fake.calls[0]
    assert len(fake.calls) == 1 and call["n"] == 4
    images = call["image_data"]
    assert [len(i) for i in images] == [1, 0, 2, 1]
    assert images[0][0].startswith("file://") and images[2][0].startswith("file://")
    assert "%20" in images[2][0] and images[2][1].startswith("data:image/png;base64,")
    assert_records_equal(samples, stored, store, want)
    engine.close()


def test_text_only_batch_sends_no_image_data(fake_sglang_vlm, vlm_dir, samples, tmp_path, monkeypatch):
    _sgl_engine_path(monkeypatch)
    engine, _ = _sgl(vlm_dir, tmp_path)
    engine.generate([samples[1]])
    assert FakeEngine.instances[-1].calls[0]["image_data"] is None
    engine.close()


def test_a_different_image_token_count_is_an_error_not_a_misaligned_record(fake_sglang_vlm, vlm_dir, samples,
                                                                          tmp_path, monkeypatch):
    _sgl_engine_path(monkeypatch)
    RESCALE["factor"] = 2   # e.g. SGLang resizing within other bounds than the processor's
    engine, _ = _sgl(vlm_dir, tmp_path)
    with pytest.raises(RuntimeError, match=rf"sample {samples[0].sample_id}: SGLang returned hidden states of shape "
                                           r"\(\d+, 256\), expected \(\d+, 256\) = \(prompt tokens, image placeholders"):
        engine.generate([samples[0]])
    engine.close()


@pytest.mark.parametrize("tp_size", [1, 2])   # the in-process ModelRunner path and the sgl.Engine path
def test_a_text_target_refuses_image_samples(fake_sglang_vlm, tiny_target_dir, tmp_path, monkeypatch, tp_size):
    monkeypatch.setattr(sys.modules["sglang"], "Engine", FakeEngine)
    if tp_size > 1:   # the sgl.Engine path, as engines spanning nodes run it
        monkeypatch.setattr(sgl_engine, "uses_model_runner", lambda cfg, vision=None: False)
    from torchspec.inference.factory import build_engine

    engine = build_engine(_cfg(tiny_target_dir, tp_size=tp_size), LocalStore(root=tmp_path / "s"), "cpu")
    s = Sample("s0", torch.tensor([1, 2, 3]), torch.tensor([0, 1, 1], dtype=torch.uint8), images=("/x.png",))
    with pytest.raises(DataError, match=r"sample s0 has 1 image\(s\), but the target \(qwen3\) is not a "
                                        r"vision-language model"):
        engine.generate([s])
    assert (FakeModelRunner.instances[-1].forwards if tp_size == 1 else FakeEngine.instances[-1].calls) == []
    engine.close()


# -- image targets through SGLang's ModelRunner in the engine's process (one node, tp_size 1) ---------------

def test_image_samples_through_the_model_runner_equal_the_hf_records_without_float_lists(fake_sglang_vlm, vlm_dir,
                                                                                          samples, tmp_path,
                                                                                          monkeypatch, caplog):
    """SGLang's multimodal processor expands the placeholders, the request carries its MultimodalInputs, one
    extend forward: the records are the hf engine's (expanded sequence, same states), put as tensors; no float
    list is built, sgl.Engine never starts, and the float-list warning does not fire."""
    want = _hf_records(vlm_dir, tmp_path, samples)
    store = LocalStore(root=tmp_path / "mr")
    puts = _put_spy(store)
    from torchspec.inference.factory import build_engine

    with caplog.at_level("WARNING", logger="torchspec.inference.sglang"):
        engine = build_engine(_cfg(vlm_dir), store, "cpu")
    assert "Python float lists" not in caplog.text and engine.runner is not None and engine.llm is None
    lists = _float_tolist_spy(monkeypatch)
    stored = engine.generate(samples)
    runner, proc = FakeModelRunner.instances[-1], FakeQwenVLImageProcessor.instances[-1]
    assert isinstance(runner, FakeVLMModelRunner) and FakeEngine.instances == []
    assert [len(i) for i in proc.requests] == [1, 2, 1]   # the image samples' requests, images as URIs
    assert all(u.startswith(("file://", "data:image/png;base64,")) for r in proc.requests for u in r)
    assert runner.forwards == [[len(w["input_ids"]) for w in want.values()]]   # one forward, expanded lengths
    assert lists == [] and len(puts) == len(samples)
    assert all(isinstance(t, torch.Tensor) and t.dtype == engine.dtype for _, a, f in puts for t in (a, f))
    assert_records_equal(samples, stored, store, want)
    engine.close()


def test_model_runner_image_expansion_that_differs_from_the_record_is_an_error(fake_sglang_vlm, vlm_dir, samples,
                                                                               tmp_path):
    RESCALE["factor"] = 2   # SGLang's processor counting an image's tokens differently from the target's
    engine, _ = _sgl(vlm_dir, tmp_path)
    with pytest.raises(RuntimeError, match=rf"sample {samples[0].sample_id}: SGLang's multimodal processor expanded "
                                           r"the image placeholders to \d+ tokens, the target's image processor"):
        engine.generate([samples[0]])
    engine.close()


# -- image targets at tp_size > 1: one process per TP rank, the image inputs made once and sent to every rank --------

def _install_vlm_stand_in_rank() -> None:
    """sglang_runner.rank_process_setup: the stand-in with the Qwen-VL ModelRunner and processor, in a TP rank."""
    _install_stand_in_rank()
    sys.modules["sglang.srt.model_executor.model_runner"].ModelRunner = FakeVLMModelRunner
    for arch in ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                 "Qwen3VLForConditionalGeneration"):
        MM_PROCESSORS[arch] = FakeQwenVLImageProcessor


def test_image_samples_at_tp_2_equal_the_hf_records_without_float_lists(fake_sglang_vlm, vlm_dir, samples, tmp_path,
                                                                        monkeypatch, caplog):
    """tp_size 2: SGLang's processor runs once per image request in the engine process (as the tokenizer manager
    does) and the same requests -- expanded ids and MultimodalInputs, pad values included -- go to both rank
    processes (as rank 0's scheduler broadcasts them); the stand-in ranks check through torch.distributed that
    their batches (ids with pad values) are equal. Records = the hf engine's, put by rank 0 as tensors; no float
    list in any process; sgl.Engine never starts; no warning."""
    from torchspec.inference import sglang_runner

    log = tmp_path / "ranks.log"
    monkeypatch.setenv("STANDIN_TP_LOG", str(log))
    monkeypatch.setattr(sglang_runner, "rank_process_setup", _install_vlm_stand_in_rank)
    want = _hf_records(vlm_dir, tmp_path, samples)
    store = LocalStore(root=tmp_path / "tp")
    engine_lists = _float_tolist_spy(monkeypatch)
    with caplog.at_level("WARNING", logger="torchspec.inference.sglang"):
        engine = sgl_engine.build_engine(_cfg(vlm_dir, tp_size=2), store, "cpu")
    group = engine.runner
    try:
        assert isinstance(group, sglang_runner.SGLangTPGroup) and engine.llm is None
        stored = engine.generate(samples[:3])
        stored += engine.generate(samples[3:])   # a second batch: the ranks loop
    finally:
        engine.close()
    assert "Python float lists" not in caplog.text and FakeEngine.instances == []
    assert [p.exitcode for p in group.procs] == [0, 0]
    assert FakeModelRunner.instances == []   # no model in the engine process: only the processor
    proc = FakeQwenVLImageProcessor.instances[0]   # the engine's: each image request once
    assert [len(i) for i in proc.requests] == [1, 2, 1]
    lines = [ln.split() for ln in log.read_text().splitlines()]
    runners = {int(pid): int(rank) for kind, pid, rank, gpu in (ln for ln in lines if ln[0] == "runner")}
    assert sorted(runners.values()) == [0, 1] and os.getpid() not in runners
    rank0 = next(pid for pid, rank in runners.items() if rank == 0)
    puts = [ln for ln in lines if ln[0] == "put"]
    assert [ln[2] for ln in puts] == [s.sample_id for s in samples] and {int(ln[1]) for ln in puts} == {rank0}
    assert [ln for ln in lines if ln[0] == "tolist"] == [] and engine_lists == []
    assert_records_equal(samples, stored, store, want)


def test_tp_2_image_expansion_that_differs_from_the_record_is_an_error_before_any_rank_runs(
        fake_sglang_vlm, vlm_dir, samples, tmp_path, monkeypatch):
    from torchspec.inference import sglang_runner

    monkeypatch.setattr(sglang_runner, "rank_process_setup", _install_vlm_stand_in_rank)
    RESCALE["factor"] = 2   # in the engine process: SGLang's processor counting an image's tokens differently
    engine = sgl_engine.build_engine(_cfg(vlm_dir, tp_size=2), LocalStore(root=tmp_path / "s"), "cpu")
    try:
        with pytest.raises(RuntimeError, match=rf"sample {samples[0].sample_id}: SGLang's multimodal processor "
                                               r"expanded the image placeholders to \d+ tokens"):
            engine.generate([samples[0]])
        text = [s for s in samples if not s.images]
        assert [st.sample_id for st in engine.generate(text)] == [s.sample_id for s in text]   # the group lives on
    finally:
        engine.close()
