"""`python -m torchspec.eval` end to end on a tiny target: a trained draft beats an untrained one."""

import json
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from eval_tiny_draft import trained_setup  # noqa: E402

from torchspec.eval.__main__ import main  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    paths = trained_setup(tmp_path_factory.getbasetemp(), tiny_tokenizer)
    data = tmp_path_factory.mktemp("evaldata") / "heldout.jsonl"
    questions = ["def parse(self, text):", "import os\nclass Config:", "for i in range(10):",
                 "return self._cache[key]", "with open(path) as f:", "raise ValueError(msg)"]
    with open(data, "w") as f:
        for q in questions:
            f.write(json.dumps({"conversations": [{"role": "user", "content": q},
                                                  {"role": "assistant", "content": "x = 1"}]}) + "\n")
    return paths, data


def _run(paths, data, draft, tmp_path, *extra):
    out = tmp_path / f"{draft}.json"
    rc = main(["--target", str(paths["target"]), "--draft", str(paths[draft]), "--data", str(data),
               "--max-new-tokens", "32", "-k", "3", "--ignore-eos", "--output", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


@pytest.mark.slow  # trains the tiny draft (once per session, shared with tests/test_vllm_eagle3.py)
def test_trained_beats_untrained_and_is_lossless(setup, tmp_path, capsys):
    paths, data = setup
    trained = _run(paths, data, "trained", tmp_path, "--speedup")
    untrained = _run(paths, data, "untrained", tmp_path)
    printed = capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(str(paths["target"]))
    assert "tau (mean acceptance length)" in printed and "ESTIMATED speedup" in printed
    for r in (trained, untrained):
        assert r["num_prompts"] == 6 and r["tokens_generated"] == 6 * 32
        assert r["greedy_match_rate"] == 1.0 and r["identical_outputs"] == 6
        assert len(r["prompt_token_ids"]) == 6 and all(len(o) == 32 for o in r["outputs"])  # --output's ids
        assert "def parse(self, text):" in tokenizer.decode(r["prompt_token_ids"][0])
        assert r["num_draft_tokens"] == 3 * r["num_drafts"]
        assert r["tau"] == pytest.approx(1 + r["num_accepted_tokens"] / r["num_drafts"])
        rates = r["acceptance_rate_per_pos"]
        assert all(a >= b for a, b in zip(rates, rates[1:]))  # chain: position i+1 needs position i
    print(f"\ntau trained {trained['tau']:.3f} vs untrained {untrained['tau']:.3f}")
    assert trained["tau"] > untrained["tau"] + 0.3
    c = trained["forward_costs"]
    assert c["target_decode_s"] > 0 and c["draft_step_s"] > 0
    expected = trained["tau"] * c["target_decode_s"] / (c["target_verify_s"] + 3 * c["draft_step_s"])
    assert trained["estimated_speedup"] == pytest.approx(expected)


@pytest.mark.slow
def test_user_errors_are_one_line(setup, tmp_path, capsys):
    paths, data = setup
    assert main(["--target", str(paths["target"]), "--draft", str(tmp_path), "--data", str(data)]) == 2
    assert "not an exported draft dir" in capsys.readouterr().err
    run_dir = tmp_path / "run"  # a run's output_dir is accepted: its export/ is used
    (run_dir / "export").mkdir(parents=True)
    for f in paths["trained"].iterdir():
        (run_dir / "export" / f.name).write_bytes(f.read_bytes())
    assert main(["--target", str(paths["target"]), "--draft", str(run_dir), "--data", str(data),
                 "--max-new-tokens", "4", "--num-prompts", "1", "--no-greedy-check"]) == 0
    assert "prompts 1, tokens generated 4" in capsys.readouterr().out
    assert main(["--target", str(paths["target"]), "--draft", str(paths["trained"]),
                 "--data", str(tmp_path / "missing.jsonl")]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --data") and "missing.jsonl" in errors[0]
    assert main(["--target", str(paths["target"]), "--draft", str(paths["trained"]), "--data", str(data),
                 "--temperature", "0.7"]) == 2
    assert "only greedy" in capsys.readouterr().err


def test_prompt_is_the_sample_cut_before_its_first_supervised_token():
    import torch

    from torchspec.data.sample import Sample
    from torchspec.eval.acceptance import prompt_of, prompts_from_samples

    ids = torch.arange(10, 20)
    mask = torch.tensor([0, 0, 0, 1, 1, 0, 0, 1, 1, 1], dtype=torch.uint8)
    assert prompt_of(ids, mask) == [10, 11, 12]
    assert prompt_of(ids, torch.zeros(10, dtype=torch.uint8)) is None  # nothing to answer
    assert prompt_of(ids, torch.ones(10, dtype=torch.uint8)) is None    # no prompt before the answer
    samples = [Sample("a", ids, torch.zeros(10, dtype=torch.uint8)), Sample("b", ids, mask), Sample("c", ids, mask)]
    assert prompts_from_samples(samples) == [[10, 11, 12]] * 2
    assert prompts_from_samples(samples, limit=1) == [[10, 11, 12]]
