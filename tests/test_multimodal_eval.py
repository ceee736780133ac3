"""tau evaluation with image prompts on a tiny VLM target (issue 15): prompts carry their images, the target's
prefill gets the processed pixel inputs and the placeholders expanded exactly as the hf engine expands them for
training, speculative decoding stays lossless, and the target's greedy continuation equals a direct transformers
generate of the same processed inputs."""

import inspect
import json

import pytest
import torch

from torchspec.data.errors import DataError
from torchspec.data.formats import load_conversations
from torchspec.data.sample import Sample
from torchspec.data.templates import get_template
from torchspec.eval.__main__ import main
from torchspec.eval.prompts import select_prompts
from torchspec.eval.speculative import HFTarget, Prompt, greedy_generate, speculative_generate
from torchspec.inference.hf import HFEngine, load_target
from torchspec.inference.vlm import vision_inputs
from torchspec.transfer.local import LocalStore

LAYERS = [0, 1, 2]
NEW = 12


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, tiny_tokenizer):
    from torchspec.utils.tiny import make_tiny_vlm

    d = tmp_path_factory.mktemp("vlm_eval")
    model, _, _ = make_tiny_vlm(d, tokenizer=tiny_tokenizer)
    with torch.no_grad():   # sharp next-token distributions: greedy choices far from float ties
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("eval_imgs")
    g = torch.Generator().manual_seed(3)
    for name, (w, h) in {"wide.png": (90, 40), "small.png": (28, 28)}.items():
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()).save(d / name)
    img = lambda n: {"type": "image_url", "image_url": {"url": n}}  # noqa: E731
    txt = lambda t: {"type": "text", "text": t}                        # noqa: E731
    records = [
        {"messages": [{"role": "user", "content": [img("wide.png"), txt("What is in the picture?")]}]},
        {"messages": [{"role": "user", "content": "No image: say hi."}, {"role": "assistant", "content": "Hi."}]},
        {"messages": [{"role": "user", "content": [txt("Compare"), img("small.png"), txt("and"), img("wide.png")]},
                      {"role": "assistant", "content": "The second is wider."}]},
    ]
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d / "prompts.jsonl"


@pytest.fixture(scope="module")
def tok(vlm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(vlm_dir))


@pytest.fixture(scope="module")
def prompts(prompt_file, tok):
    convs = load_conversations([prompt_file], "messages")
    got, sel = select_prompts(convs, tok, get_template("qwen", tok), max_seq_length=512)
    assert sel.num_used == 3
    return got


@pytest.fixture(scope="module")
def target(vlm_dir):
    model = load_target(vlm_dir, torch.float32, "cpu")
    return HFTarget(model, LAYERS, vision_inputs(model, vlm_dir))


def test_prompts_carry_their_images_in_order(prompts, prompt_file, tok):
    base = prompt_file.parent
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert [p.images for p in prompts] == [(str(base / "wide.png"),), (),
                                           (str(base / "small.png"), str(base / "wide.png"))]
    assert [p.count(pad) for p in prompts] == [1, 0, 2]   # one placeholder per image before expansion
    assert isinstance(prompts[1], list) and prompts[1] == list(prompts[1])   # a text prompt is its id list


def _reference_inputs(prompt, tok, vlm_dir):
    """The prompt's processed inputs built independently: the processor's own rule on the decoded text."""
    from PIL import Image
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(str(vlm_dir))
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    if not prompt.images:
        return torch.tensor([list(prompt)]), {}
    pix = proc(images=[Image.open(p).convert("RGB") for p in prompt.images], return_tensors="pt")
    counts = (pix["image_grid_thw"].prod(-1) // proc.merge_size ** 2).tolist()
    ids = []
    it = iter(counts)
    for t in prompt:
        ids += [t] * (next(it) if t == pad else 1)
    ids = torch.tensor([ids])
    extra = {"pixel_values": pix["pixel_values"], "image_grid_thw": pix["image_grid_thw"]}
    return ids, extra


def test_greedy_equals_a_direct_transformers_generate_of_the_same_processed_inputs(target, prompts, tok, vlm_dir):
    from transformers import AutoModelForImageTextToText

    ref = AutoModelForImageTextToText.from_pretrained(str(vlm_dir), dtype=torch.float32).eval()
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    # image, text, two images, then the first again: a prompt never inherits the previous one's image positions
    for prompt in prompts + prompts[:1]:
        ids, extra = _reference_inputs(prompt, tok, vlm_dir)
        if prompt.images and "mm_token_type_ids" in inspect.signature(ref.model.forward).parameters:
            extra["mm_token_type_ids"] = (ids == pad).to(torch.int32)
        with torch.no_grad():
            want = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                min_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0,
                                **extra)[0, ids.shape[1]:].tolist()
        # what the target runs is the expanded sequence
        assert target.prefill_inputs(prompt)[0] == ids[0].tolist()
        assert greedy_generate(target, prompt, NEW) == want


class Recording:
    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def reset(self):
        self.inner.reset()

    def propose(self, tokens, aux, k):
        self.calls.append((list(tokens), aux.clone()))
        return self.inner.propose(tokens, aux, k)


@pytest.fixture(scope="module")
def draft(target):
    from torchspec.models.draft import DraftConfig, LlamaForCausalLMEagle3

    torch.manual_seed(1)
    d = LlamaForCausalLMEagle3(DraftConfig.from_target(target.model.config)).eval()
    d.load_embeddings(target.model.get_input_embeddings().weight)
    return d


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_is_lossless_and_the_draft_sees_the_training_records_rows(target, draft, prompts, vlm_dir,
                                                                              tmp_path, k):
    from torchspec.eval.speculative import Eagle3Proposer

    store = LocalStore(root=tmp_path / "store")
    engine = HFEngine(target.model, store, aux_layers=LAYERS, vision=target.vision)
    for i, prompt in enumerate(prompts):
        rec_proposer = Recording(Eagle3Proposer(draft))
        out = speculative_generate(target, rec_proposer, prompt, num_draft_steps=k, max_new_tokens=NEW)
        assert out.tokens == greedy_generate(target, prompt, NEW)
        assert out.stats.num_drafts > 0 and out.stats.tau == 1 + out.stats.num_accepted_tokens / out.stats.num_drafts
        # the first round: tokens = expanded prompt + the first token; aux rows = the hf engine's training record
        ids = torch.tensor(list(prompt))
        engine.generate([Sample(f"p{i}", ids, torch.zeros_like(ids, dtype=torch.uint8), images=prompt.images)])
        rec = store.get(f"p{i}")
        tokens, aux = rec_proposer.calls[0]
        assert tokens[:-1] == rec["input_ids"].tolist()
        torch.testing.assert_close(aux, rec["aux_hidden_states"], rtol=1e-4, atol=1e-4)
    engine.close()


def test_an_oracle_draft_is_fully_accepted_on_image_prompts(target, prompts):
    """Verification with the image prompt's rotary offsets in the cache: drafts equal to the target's own
    greedy tokens are all accepted (tau = k + 1), so every verify forward agrees with plain decoding."""

    class Oracle:
        def __init__(self, prompt):
            self.prompt, self.ref = prompt, None

        def reset(self):
            pass

        def propose(self, tokens, aux, k):
            n = len(tokens) - len(self.expanded)
            return self.ref[n:n + k]

    k = 3
    for prompt in (prompts[0], prompts[2]):
        o = Oracle(prompt)
        o.ref = greedy_generate(target, prompt, NEW + k)
        o.expanded = target.prefill_inputs(prompt)[0]
        out = speculative_generate(target, o, prompt, num_draft_steps=k, max_new_tokens=NEW)
        assert out.tokens == o.ref[:NEW]
        assert out.stats.tau == k + 1


def test_a_text_target_refuses_image_prompts(tiny_target_dir, prompts):
    model = load_target(tiny_target_dir, torch.float32, "cpu")
    t = HFTarget(model, LAYERS)
    with pytest.raises(DataError, match=r"has 1 image\(s\), but the target \(qwen3\) is not a vision-language"):
        greedy_generate(t, Prompt(prompts[0], prompts[0].images), 2)


@pytest.fixture(scope="module")
def exported(target, draft, tmp_path_factory):
    from torchspec.export import export_draft

    return export_draft(draft, tmp_path_factory.mktemp("draft"), target_config=target.model.config,
                        aux_layer_ids=LAYERS)


def test_cli_reports_tau_on_an_image_prompt_file(vlm_dir, exported, prompt_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["--target", str(vlm_dir), "--draft", str(exported), "--data", str(prompt_file), "--chat-template",
               "qwen", "--prompt-key", "messages", "-k", "2", "--max-new-tokens", str(NEW), "--ignore-eos",
               "--output", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    r = json.loads(out.read_text())
    assert r["num_prompts"] == 3 and r["tokens_generated"] == 3 * NEW
    assert r["greedy_match_rate"] == 1.0 and r["identical_outputs"] == 3
    assert r["tau"] == pytest.approx(1 + r["num_accepted_tokens"] / r["num_drafts"]) and r["num_drafts"] > 0
    assert "tau (mean acceptance length)" in printed


def test_cli_image_prompts_with_a_text_target_is_one_error_line(tiny_target_dir, prompt_file, tmp_path, capsys,
                                                                 tiny_tokenizer):
    from torchspec.export import export_draft
    from torchspec.models.draft import DraftConfig, LlamaForCausalLMEagle3
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(str(tiny_target_dir))
    d = export_draft(LlamaForCausalLMEagle3(DraftConfig.from_target(conf)), tmp_path / "d", target_config=conf,
                     aux_layer_ids=LAYERS)
    rc = main(["--target", str(tiny_target_dir), "--draft", str(d), "--data", str(prompt_file),
               "--chat-template", "qwen", "--prompt-key", "messages", "--max-new-tokens", "2"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(err) == 1
    assert err[0] == (f"error: --data {prompt_file}: 2 prompt(s) have images, but --target {tiny_target_dir} is "
                      "not a vision-language model")


def test_a_text_prompt_after_an_image_prompt_does_not_inherit_its_rotary_offsets(target, prompts):
    """transformers' Qwen-VL keeps the last image prefill's rotary offset for cached steps; a new prompt's
    cached decode step must equal a cache-free forward of the same tokens."""
    text = list(prompts[1])
    nxt = greedy_generate(target, text, 1)[0]
    target.reset()
    _, aux_full = target.forward(text + [nxt])
    greedy_generate(target, prompts[2], 2)   # an image prompt: its offset is kept by the model
    target.reset()
    target.forward(text, num_logits=1)
    _, aux_step = target.forward([nxt])
    torch.testing.assert_close(aux_step[0], aux_full[-1], rtol=1e-5, atol=1e-5)
