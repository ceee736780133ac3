"""Greedy chain speculative decoding is lossless, and its acceptance counters are exact."""

import pytest
import torch

from torchspec.eval.speculative import HFTarget, SpecStats, greedy_generate, speculative_generate


@pytest.fixture(scope="module")
def target(tiny_target_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_target_dir), dtype=torch.float32).eval()
    return HFTarget(model, aux_layers=[0, 1, 2])


class OracleProposer:
    """Proposes the target's own greedy continuation (computed with a separate, cache-free forward)."""

    def __init__(self, model, wrong: bool = False):
        self.model, self.wrong, self.calls = model, wrong, []

    def reset(self):
        pass

    @torch.inference_mode()
    def propose(self, tokens, aux, k):
        self.calls.append((len(tokens), aux.shape[0]))
        self.last = (list(tokens), aux.clone())
        seq = list(tokens)
        for _ in range(k):
            seq.append(int(self.model(torch.tensor([seq])).logits[0, -1].argmax()))
        drafts = seq[len(tokens):]
        if self.wrong:  # a token the target never picks next: tau must be exactly 1
            vocab = self.model.config.vocab_size
            drafts = [(d + 1) % vocab for d in drafts]
        return drafts


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, 500, (n,), generator=g).tolist() for n in (5, 11, 17)]


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("wrong", [False, True])
def test_lossless_and_exact_tau(target, k, wrong):
    proposer = OracleProposer(target.model, wrong=wrong)
    total = SpecStats(k)
    for prompt in _prompts():
        ref = greedy_generate(target, prompt, max_new_tokens=13)
        out = speculative_generate(target, proposer, prompt, num_draft_steps=k, max_new_tokens=13)
        assert out.tokens == ref
        total = total.merge(out.stats)
    # aux rows handed to the proposer always cover exactly the kept target positions
    assert all(n_aux == n_tok - 1 for n_tok, n_aux in proposer.calls)
    if wrong:
        assert total.tau == 1.0 and total.num_accepted_tokens == 0
        assert total.acceptance_rate_per_pos == [0.0] * k
    else:
        assert total.tau == k + 1
        assert total.acceptance_rate_per_pos == [1.0] * k
    # every verification drafts k tokens: with 13 tokens, 1 from the prefill, ceil(12 / tau) drafts a prompt
    per_prompt = -(-12 // (1 if wrong else k + 1))
    assert total.num_drafts == 3 * per_prompt and total.num_draft_tokens == 3 * per_prompt * k


def test_target_cache_rollback_matches_full_forward(target):
    """After verification + crop, the target's aux features equal a cache-free forward's."""
    prompt = _prompts()[1]
    proposer = OracleProposer(target.model, wrong=True)  # reject everything: crop after every round
    out = speculative_generate(target, proposer, prompt, num_draft_steps=3, max_new_tokens=6)
    assert out.stats.num_drafts == 5
    tokens, aux = proposer.last  # what the proposer saw at the last round: 4 rollbacks behind it
    assert tokens == prompt + out.tokens[:5] and aux.shape[0] == len(prompt) + 4
    full = HFTarget(target.model, aux_layers=[0, 1, 2])
    full.reset()
    _, aux_full = full.forward(tokens[:-1])
    full.close()
    torch.testing.assert_close(aux, aux_full, rtol=1e-5, atol=1e-5)


def test_eos_stops_and_counts(target):
    prompt = _prompts()[0]
    ref = greedy_generate(target, prompt, max_new_tokens=12)
    eos = ref[4]
    first = ref.index(eos)
    out = speculative_generate(target, OracleProposer(target.model), prompt, 3, 12, eos_token_id=eos)
    assert out.tokens == ref[:first + 1]
    assert greedy_generate(target, prompt, 12, eos_token_id=eos) == ref[:first + 1]


# ---- the real EAGLE-3 draft through its serving API ----------------------------------------------


@pytest.fixture(scope="module")
def draft(target):
    from torchspec.models.draft import DraftConfig, LlamaForCausalLMEagle3

    torch.manual_seed(1)
    cfg = DraftConfig.from_target(target.model.config, draft_vocab_size=200)
    d = LlamaForCausalLMEagle3(cfg).eval()
    d.load_embeddings(target.model.get_input_embeddings().weight)
    # a non-trivial vocab map: draft id i -> target id 2*i (even ids < 400), so d2t[i] = i
    d2t = torch.arange(200)
    t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    t2d[2 * torch.arange(200)] = True
    d.set_vocab_map(d2t, t2d)
    with torch.no_grad():  # sharper logits so draft argmaxes are far from ties
        d.lm_head.weight.mul_(20)
    return d


class Recording:
    def __init__(self, inner):
        self.inner, self.drafts = inner, []

    def reset(self):
        self.inner.reset()

    def propose(self, tokens, aux, k):
        d = self.inner.propose(tokens, aux, k)
        self.drafts.append(d)
        return d


@pytest.mark.parametrize("k", [1, 3, 5])
def test_eagle3_proposer_lossless_and_cache_equals_recompute(target, draft, k):
    from torchspec.eval.speculative import Eagle3Proposer

    class Recompute(Eagle3Proposer):  # no cache reuse: every round re-feeds all rows from scratch
        def propose(self, tokens, aux, k):
            self.reset()
            return super().propose(tokens, aux, k)

    for prompt in _prompts():
        ref = greedy_generate(target, prompt, max_new_tokens=15)
        cached, fresh = Recording(Eagle3Proposer(draft)), Recording(Recompute(draft))
        out = speculative_generate(target, cached, prompt, num_draft_steps=k, max_new_tokens=15)
        out2 = speculative_generate(target, fresh, prompt, num_draft_steps=k, max_new_tokens=15)
        assert out.tokens == ref and out2.tokens == ref
        assert cached.drafts == fresh.drafts
        assert all(t % 2 == 0 for d in cached.drafts for t in d)  # drafts are target ids via d2t
        assert out.stats.num_drafts == len(cached.drafts)


class OracleDraft(torch.nn.Module):
    """A stand-in draft behind the real Eagle3Proposer: its 'cache' records the tokens fed at each position,
    and it predicts the target's greedy next token given [x_0] + those tokens (cache-free target forward).
    It is a perfect draft only if the proposer feeds the right token at the right position and rolls its
    cache back correctly; `wrong` shifts every prediction by one id (a never-accepted draft)."""

    class Cache:
        def __init__(self):
            self.tokens = []

        @property
        def length(self):
            return len(self.tokens)

        def crop(self, n):
            del self.tokens[n:]

    def __init__(self, model, first_token, wrong=False):
        super().__init__()
        self.model, self.first, self.wrong = model, first_token, wrong
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab = model.config.vocab_size
        self.widths = set()

    def new_kv_cache(self):
        return self.Cache()

    def to_target_ids(self, ids):
        return ids

    @torch.no_grad()
    def forward_step(self, input_ids, hidden, position_ids, kv):
        n = input_ids.shape[1]
        assert position_ids[0].tolist() == list(range(kv.length, kv.length + n))  # vLLM's slot = position
        assert hidden.shape[:2] == (1, n)
        self.widths.add(hidden.shape[-1])
        kv.tokens += input_ids[0].tolist()
        logits = torch.zeros(1, n, self.vocab)
        for i in range(n):
            ctx = [self.first] + kv.tokens[: kv.length - n + i + 1]
            nxt = int(self.model(torch.tensor([ctx])).logits[0, -1].argmax())
            logits[0, i, (nxt + 1) % self.vocab if self.wrong else nxt] = 1.0
        return torch.zeros(1, n, 8), logits


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("wrong", [False, True])
def test_eagle3_proposer_with_oracle_draft_gives_exact_tau(target, k, wrong):
    from torchspec.eval.speculative import Eagle3Proposer

    prompt = _prompts()[0]
    draft = OracleDraft(target.model, prompt[0], wrong=wrong)
    out = speculative_generate(target, Eagle3Proposer(draft), prompt, num_draft_steps=k, max_new_tokens=10)
    assert out.tokens == greedy_generate(target, prompt, max_new_tokens=10)
    assert out.stats.tau == (1.0 if wrong else k + 1)
    assert draft.widths == ({3 * 64} if k == 1 else {3 * 64, 8})  # aux features first, own hidden after
