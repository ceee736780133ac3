"""A VLM target in the hf engine: placeholder expansion, mask alignment, record shapes, rows equal to a direct
transformers forward of the same processed inputs, and a short CPU run on image conversations."""

import inspect
import json

import pytest
import torch

from torchspec.data import build_dataset
from torchspec.data.errors import DataError
from torchspec.inference.hf import HFEngine, load_target
from torchspec.inference.vlm import vision_inputs
from torchspec.transfer.local import LocalStore

LAYERS = [0, 1, 2]
SIZES = {"wide.png": (90, 40), "tall.png": (40, 70), "small.png": (28, 28)}


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, tiny_tokenizer):
    from torchspec.utils.tiny import make_tiny_vlm

    d = tmp_path_factory.mktemp("vlm")
    make_tiny_vlm(d, tokenizer=tiny_tokenizer)
    return d


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    for name, (w, h) in SIZES.items():
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()).save(d / name)

    def conv(images, q, a):
        parts = [{"type": "image_url", "image_url": {"url": n}} for n in images] + [{"type": "text", "text": q}]
        return {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": a}]}

    records = [conv(["wide.png"], "What is in the picture?", "A pattern of random pixels."),
               conv(["tall.png", "small.png"], "Compare them.", "The first is taller than the second."),
               {"messages": [{"role": "user", "content": "No image here: say hi."},
                             {"role": "assistant", "content": "Hi there."}]},
               conv(["small.png"], "Describe.", "Noise, mostly.")]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records * 3) + "\n")
    return d


def _dataset(vlm_dir, image_data, **kw):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(vlm_dir))
    return tok, build_dataset(image_data / "train.jsonl", tok, chat_template="qwen", max_seq_length=512,
                              prompt_key="messages", progress=False, **kw)


def _engine(vlm_dir, store, batch_size=3):
    model = load_target(vlm_dir, torch.float32, "cpu")
    return model, HFEngine(model, store, aux_layers=LAYERS, batch_size=batch_size,
                           vision=vision_inputs(model, vlm_dir))


def test_records_are_the_expanded_sequence_and_equal_a_direct_forward(vlm_dir, image_data, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText
    from PIL import Image

    tok, ds = _dataset(vlm_dir, image_data)
    samples = list(ds)[:4]
    store = LocalStore(root=tmp_path / "store")
    model, engine = _engine(vlm_dir, store)
    stored = engine.generate(samples)

    proc = AutoImageProcessor.from_pretrained(str(vlm_dir))
    ref = AutoModelForImageTextToText.from_pretrained(str(vlm_dir), dtype=torch.float32).eval()
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    H = ref.config.text_config.hidden_size
    from torchspec.data.formats import load_conversations
    from torchspec.data.templates import get_template

    convs = load_conversations([image_data / "train.jsonl"], "messages")[:4]
    for s, st, conv in zip(samples, stored, convs):
        rec = store.get(s.sample_id)
        n_img = len(s.images)
        # the reference: the processor's own rule applied to the TEXT (each pad repeated t*h*w/merge^2 times)
        text, _ = get_template("qwen", tok).render_conversation(conv.messages)
        extra = {}
        if n_img:
            pix = proc(images=[Image.open(p).convert("RGB") for p in s.images], return_tensors="pt")
            counts = (pix["image_grid_thw"].prod(-1) // proc.merge_size ** 2).tolist()
            pieces = text.split("<|image_pad|>")
            text = pieces[0] + "".join("<|image_pad|>" * c + p for c, p in zip(counts, pieces[1:]))
            extra = {"pixel_values": pix["pixel_values"], "image_grid_thw": pix["image_grid_thw"]}
        want_ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
        if n_img and "mm_token_type_ids" in inspect.signature(ref.model.forward).parameters:
            extra["mm_token_type_ids"] = (want_ids == pad).to(torch.int32)[None]
        assert torch.equal(rec["input_ids"], want_ids)                      # placeholder expansion
        assert st.length == len(want_ids)
        assert int((rec["input_ids"] == pad).sum()) == (sum(counts) if n_img else 0)
        if n_img:
            assert len(want_ids) > len(s.input_ids)
        # mask alignment: the same supervised tokens, no image token supervised
        assert torch.equal(rec["input_ids"][rec["loss_mask"].bool()], s.input_ids[s.loss_mask.bool()])
        assert not rec["loss_mask"][rec["input_ids"] == pad].any()
        assert rec["aux_hidden_states"].shape == (len(want_ids), 3 * H)
        assert rec["final_hidden_states"].shape == (len(want_ids), H)
        with torch.no_grad():
            out = ref.model(input_ids=want_ids[None], output_hidden_states=True, **extra)
        torch.testing.assert_close(rec["aux_hidden_states"], torch.cat([out.hidden_states[k + 1][0] for k in LAYERS], -1),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rec["final_hidden_states"], out.last_hidden_state[0], rtol=1e-5, atol=1e-5)
    engine.close()


def test_batching_does_not_change_records(vlm_dir, image_data, tmp_path):
    _, ds = _dataset(vlm_dir, image_data)
    samples = list(ds)[:4]
    one, three = LocalStore(root=tmp_path / "a"), LocalStore(root=tmp_path / "b")
    _engine(vlm_dir, one, batch_size=1)[1].generate(samples)
    _engine(vlm_dir, three, batch_size=4)[1].generate(samples)
    for s in samples:
        a, b = one.get(s.sample_id), three.get(s.sample_id)
        assert torch.equal(a["input_ids"], b["input_ids"])
        torch.testing.assert_close(a["aux_hidden_states"], b["aux_hidden_states"], rtol=1e-4, atol=1e-4)


def test_truncation_keeps_only_the_images_whose_placeholder_survived(vlm_dir, image_data, tmp_path):
    tok, ds = _dataset(vlm_dir, image_data)
    two = ds[1]
    assert len(two.images) == 2
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    first, second = (two.input_ids == pad).nonzero().flatten().tolist()
    cut = type(two)(two.sample_id, two.input_ids[:second], two.loss_mask[:second], images=two.images)
    store = LocalStore(root=tmp_path / "s")
    _engine(vlm_dir, store)[1].generate([cut])
    rec = store.get(two.sample_id)
    assert int((rec["input_ids"] == pad).sum()) > 1 and rec["input_ids"].numel() > second


def test_text_target_refuses_image_samples(tiny_target_dir, vlm_dir, image_data, tmp_path):
    _, ds = _dataset(vlm_dir, image_data)
    model = load_target(tiny_target_dir, torch.float32, "cpu")
    engine = HFEngine(model, LocalStore(root=tmp_path / "s"), aux_layers=LAYERS)
    with pytest.raises(DataError, match=r"sample \S+ has 1 image\(s\), but the target \(qwen3\) is not a "
                                        r"vision-language model"):
        engine.generate([ds[0]])


def test_end_to_end_cpu_run_on_image_conversations_trains_and_exports(vlm_dir, image_data, tmp_path):
    from torchspec.config.schema import Config
    from torchspec.pipeline.runner import run_training

    cfg = Config()
    cfg.model.target_model_path = str(vlm_dir)
    cfg.dataset.train_data_path = str(image_data / "train.jsonl")
    cfg.dataset.prompt_key = "messages"
    cfg.dataset.chat_template = "qwen"
    cfg.dataset.num_proc = 1
    t = cfg.training
    t.micro_batch_size, t.num_epochs, t.ttt_length, t.max_seq_length = 2, 2, 2, 512
    t.learning_rate, t.warmup_ratio, t.save_interval = 3e-3, 0.0, 1000
    cfg.inference.colocate = True
    cfg.inference.inference_batch_size = 2
    cfg.output_dir = str(tmp_path / "out")
    cfg.cache_dir = str(tmp_path / "cache")
    result = run_training(cfg, progress=False)
    assert result.global_step == 12 and not result.interrupted
    losses = [loss for _, loss in result.losses]
    assert all(x > 0 for x in losses) and sum(losses[6:]) < sum(losses[:6])
    export = tmp_path / "out" / "export"
    conf = json.loads((export / "config.json").read_text())
    assert conf["architectures"] == ["LlamaForCausalLMEagle3"] and conf["hidden_size"] == 64
    assert conf["vocab_size"] == 516   # the target's text vocabulary (tokenizer + 4 vision tokens)
    from torchspec.export import aux_layer_ids_of, load_exported
    draft, _ = load_exported(export)
    assert draft.fc.weight.shape == (64, 3 * 64) and conf["rope_scaling"] is None   # the draft's RoPE is 1-D
    assert aux_layer_ids_of(conf) == [0, 1, 2]


@pytest.mark.parametrize("module, cls, name", [("torchspec.inference.vllm", "VLLMEngine", "vllm")])
def test_vllm_engine_refuses_image_samples_instead_of_dropping_the_images(module, cls, name):   # sgl: sends them
    import importlib

    from torchspec.data.sample import Sample

    engine = object.__new__(getattr(importlib.import_module(module), cls))   # no server: refused before any call
    s = Sample("s0", torch.tensor([1, 2, 3]), torch.tensor([0, 1, 1], dtype=torch.uint8), images=("/x.png",))
    with pytest.raises(DataError, match=f"sample s0 has 1 image\\(s\\); the {name} engine does not send images yet"):
        engine.generate([s])
