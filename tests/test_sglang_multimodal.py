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
import re
import sys
import types
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_sglang_engine import TOL, FakeEngine, FakeModelRunner, _cfg, _srt_modules  # noqa: E402

from torchspec.data import build_dataset  # noqa: E402
from torchspec.data.errors import DataError  # noqa: E402
from torchspec.data.sample import Sample  # noqa: E402
from torchspec.inference import sglang as sgl_engine  # noqa: E402
from torchspec.inference.hf import HFEngine, load_target  # noqa: E402
from torchspec.inference.vlm import vision_inputs  # noqa: E402
from torchspec.transfer.local import LocalStore  # noqa: E402

VISION = re.compile(r"<\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif")


def _sglang_load_image(ref: str):
    from PIL import Image

    if ref.startswith("file://"):
        src = unquote(urlparse(ref).path)
    elif ref.startswith("data:") or not ref.lower().endswith(IMAGE_EXTENSIONS):
        src = io.BytesIO(base64.b64decode(ref.split(",", 1)[1] if ref.startswith("data:") else ref, validate=True))
    else:
        src = ref
    return Image.open(src).convert("RGB")


class FakeVLMEngine(FakeEngine):
    rescale = 1   # != 1: images resized before the processor (as SGLang's own resize could): other token counts

    def _load(self, path):
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.proc = AutoImageProcessor.from_pretrained(path)
        self.pad = self.tok.convert_tokens_to_ids("<|image_pad|>")
        self.extra = {}
        return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()

    def _text_base(self):
        return self.hf.model.language_model

    def _run_base(self, ids):
        ids_t = torch.tensor([ids])
        extra = dict(self.extra.get(tuple(ids), {}))
        if extra:
            extra["mm_token_type_ids"] = (ids_t == self.pad).to(torch.int32)
        self.hf.model(input_ids=ids_t, use_cache=False, **extra)

    def _tokenize_request(self, ids, images):
        if not images:
            return ids
        text = self.tok.decode(ids)
        parts = VISION.split(text)
        assert len(parts) - 1 == len(images), (len(parts) - 1, len(images))
        pil = [_sglang_load_image(r) for r in images]
        pil = [im.resize((im.width * self.rescale, im.height * self.rescale)) for im in pil]
        pix = self.proc(images=pil, return_tensors="pt")
        counts = (pix["image_grid_thw"].prod(-1) // self.proc.merge_size ** 2).tolist()
        text = parts[0] + "".join("<|vision_start|>" + "<|image_pad|>" * c + "<|vision_end|>" + p
                                  for c, p in zip(counts, parts[1:]))
        new = self.tok(text, add_special_tokens=False)["input_ids"]
        self.extra[tuple(new)] = {"pixel_values": pix["pixel_values"], "image_grid_thw": pix["image_grid_thw"]}
        return new


@pytest.fixture
def fake_sglang_vlm(monkeypatch):
    module = types.ModuleType("sglang")
    module.Engine = FakeVLMEngine
    monkeypatch.setitem(sys.modules, "sglang", module)
    for name, sub in _srt_modules().items():
        monkeypatch.setitem(sys.modules, name, sub)
    FakeEngine.instances = []
    FakeModelRunner.instances = []
    FakeVLMEngine.rescale = 1
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
                                                                             tmp_path):
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
    for s, st in zip(samples, stored):
        g, w = store.get(s.sample_id), want[s.sample_id]
        assert st.length == len(w["input_ids"]) and torch.equal(g["input_ids"], w["input_ids"])
        assert torch.equal(g["loss_mask"], w["loss_mask"])
        if s.images:
            assert len(g["input_ids"]) > len(s.input_ids)   # expanded
        torch.testing.assert_close(g["aux_hidden_states"], w["aux_hidden_states"], **TOL)
        torch.testing.assert_close(g["final_hidden_states"], w["final_hidden_states"], **TOL)
    engine.close()


def test_text_only_batch_sends_no_image_data(fake_sglang_vlm, vlm_dir, samples, tmp_path):
    engine, _ = _sgl(vlm_dir, tmp_path)
    engine.generate([samples[1]])
    assert FakeEngine.instances[-1].calls[0]["image_data"] is None
    engine.close()


def test_a_different_image_token_count_is_an_error_not_a_misaligned_record(fake_sglang_vlm, vlm_dir, samples,
                                                                          tmp_path):
    FakeVLMEngine.rescale = 2   # e.g. SGLang resizing within other bounds than the processor's
    engine, _ = _sgl(vlm_dir, tmp_path)
    with pytest.raises(RuntimeError, match=rf"sample {samples[0].sample_id}: SGLang returned hidden states of shape "
                                           r"\(\d+, 256\), expected \(\d+, 256\) = \(prompt tokens, image placeholders"):
        engine.generate([samples[0]])
    engine.close()


@pytest.mark.parametrize("tp_size", [1, 2])   # the in-process ModelRunner path and the sgl.Engine path
def test_a_text_target_refuses_image_samples(fake_sglang_vlm, tiny_target_dir, tmp_path, monkeypatch, tp_size):
    monkeypatch.setattr(sys.modules["sglang"], "Engine", FakeEngine)
    if tp_size > 1:   # the sgl.Engine path, as image targets and engines spanning nodes run it
        monkeypatch.setattr(sgl_engine, "uses_model_runner", lambda cfg, vision=None: False)
    from torchspec.inference.factory import build_engine

    engine = build_engine(_cfg(tiny_target_dir, tp_size=tp_size), LocalStore(root=tmp_path / "s"), "cpu")
    s = Sample("s0", torch.tensor([1, 2, 3]), torch.tensor([0, 1, 1], dtype=torch.uint8), images=("/x.png",))
    with pytest.raises(DataError, match=r"sample s0 has 1 image\(s\), but the target \(qwen3\) is not a "
                                        r"vision-language model"):
        engine.generate([s])
    assert (FakeModelRunner.instances[-1].forwards if tp_size == 1 else FakeEngine.instances[-1].calls) == []
    engine.close()
