"""Eval during training: held-out hidden states made once by the run's engines, exact pooled eval
loss/acc_k, tau on held-out prompts, best tracking, eval/ lines in metrics.jsonl."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_helpers import tiny_run_config, write_conversations  # noqa: E402

from torchspec.eval.during_training import BEST_FILE, CHECKPOINT_EVAL_FILE, TrainingEvaluator  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_target_dir):
    from transformers import AutoModelForCausalLM

    from torchspec.data.dataset import load_tokenizer
    from torchspec.inference.hf import HFEngine
    from torchspec.models.draft import DraftConfig, build_draft
    from torchspec.models.target_head import TargetHead
    from torchspec.pipeline.launcher_local import InlineEngines
    from torchspec.training.trainer import Trainer, seed_everything
    from torchspec.transfer.local import LocalStore

    tmp = tmp_path_factory.mktemp("evaltrain")
    cfg = tiny_run_config(tmp, tiny_target_dir)
    cfg.dataset.eval_data_path = str(write_conversations(tmp / "eval.jsonl", 5))
    cfg.dataset.eval_interval = 2
    cfg.dataset.eval_tau_prompts = 2
    cfg.dataset.eval_max_new_tokens = 12
    aux = [0, 1, 2]
    tok = load_tokenizer(cfg)
    evaluator = TrainingEvaluator.from_config(cfg, aux, tok)

    store = LocalStore()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_target_dir), dtype=torch.float32).eval()
    engines = InlineEngines(HFEngine(model, store, aux_layers=aux, batch_size=2))
    evaluator.prepare(engines, store)
    assert store.bytes_used() == 0  # taken out of the store: the training pool never sees them

    head = TargetHead.from_pretrained(tiny_target_dir, "lm_head.weight", "model.embed_tokens.weight")
    seed_everything(0)
    draft = build_draft(DraftConfig.from_target(model.config), head)
    trainer = Trainer(cfg, draft, head, "cpu", total_steps=10)
    return cfg, evaluator, trainer, model, aux


def test_records_are_the_engine_hidden_states(run):
    cfg, ev, trainer, model, aux = run
    assert len(ev.records) == 5 and [len(r["input_ids"]) for r in ev.records] == [len(s) for s in ev.samples]
    r, s = ev.records[3], ev.samples[3]
    assert torch.equal(r["input_ids"], s.input_ids)
    with torch.no_grad():
        out = model.model(input_ids=s.input_ids[None], output_hidden_states=True)
    want = torch.cat([out.hidden_states[k + 1][0] for k in aux], dim=-1)
    torch.testing.assert_close(r["aux_hidden_states"], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r["final_hidden_states"], out.last_hidden_state[0], rtol=1e-4, atol=1e-5)
    assert len(ev.tau_prompts) == 2 and all(len(p) < len(s) for p, s in zip(ev.tau_prompts, ev.samples))


def test_pooled_metrics_equal_one_big_batch(run):
    cfg, ev, trainer, _, _ = run
    from torchspec.transfer.batch import collate

    pooled = ev.eval_metrics(trainer)  # micro-batches of 2 (3 batches, the last one of 1)
    big = trainer.eval_step(collate(ev.records, pack=False))
    assert pooled["num_samples"] == 5
    for k in ("loss", "acc_0", "acc_1", "loss_0", "loss_1"):
        assert pooled[k] == pytest.approx(big[k], rel=1e-5, abs=1e-6), k


def test_evaluate_tau_best_and_logging(run, tmp_path):
    from torchspec.eval.report import write_report
    from torchspec.training.metrics import MetricsLogger

    cfg, ev, trainer, _, _ = run
    assert not ev.due(1) and ev.due(2) and ev.due(4)
    logger = MetricsLogger(cfg.output_dir, cfg.logging, total_steps=10, progress=False)
    m1 = ev.evaluate(trainer, 2)
    assert 1.0 <= m1["tau"] <= 1 + cfg.dataset.eval_num_draft_steps and m1["score"] == m1["tau"]
    assert len([k for k in m1 if k.startswith("accept_rate_")]) == cfg.dataset.eval_num_draft_steps
    logger.log_eval(2, m1)
    best = json.loads((Path(cfg.output_dir) / BEST_FILE).read_text())
    assert best["step"] == 2 and best["metric"] == "eval/tau" and best["score"] == m1["tau"]

    # a worse score later does not replace the best; a checkpoint at the best step is named in it
    ev.best["score"] = m1["tau"] + 10
    ev._write_best()
    m2 = ev.evaluate(trainer, 4)
    logger.log_eval(4, m2)
    logger.close()
    assert json.loads((Path(cfg.output_dir) / BEST_FILE).read_text())["step"] == 2
    ckpt = Path(cfg.output_dir) / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    ev.note_checkpoint(4, ckpt)
    info = json.loads((ckpt / CHECKPOINT_EVAL_FILE).read_text())
    assert info["eval_step"] == 4 and info["is_best_so_far"] is False and info["metrics"]["tau"] == m2["tau"]

    lines = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [2, 4]
    assert lines[0]["eval/tau"] == m1["tau"] and "eval/acc_0" in lines[0] and "eval/loss" in lines[1]
    md = write_report(cfg.output_dir).read_text()
    assert "tau.png" in md and "last eval (step 4)" in md


def test_best_persists_across_restart(run):
    cfg, ev, *_ = run
    again = TrainingEvaluator([], interval=2, micro_batch_size=2, output_dir=cfg.output_dir)
    assert again.best == json.loads((Path(cfg.output_dir) / BEST_FILE).read_text())


def test_no_eval_path_means_no_evaluator(run):
    cfg = run[0]
    from dataclasses import replace

    no_eval = replace(cfg, dataset=replace(cfg.dataset, eval_data_path=None))
    assert TrainingEvaluator.from_config(no_eval, [0, 1, 2]) is None
