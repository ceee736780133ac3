"""Draft vocabulary: d2t/t2d from a known frequency table, from masked tokens, saved and reused."""

import torch

from torchspec.data import DataError, Sample, build_vocab_map, token_frequencies, vocab_map_from_frequencies


def test_known_frequency_table():
    freq = torch.tensor([5, 0, 7, 7, 1, 9, 0, 3])
    d2t, t2d = vocab_map_from_frequencies(freq, 4)
    # Top 4 by count: 5 (9), 2 (7), 3 (7), 0 (5) -> draft ids in target order [0, 2, 3, 5].
    assert d2t.dtype == torch.long and t2d.dtype == torch.bool
    assert d2t.tolist() == [0, 1, 1, 2]
    assert t2d.tolist() == [True, False, True, True, False, True, False, False]
    assert (torch.arange(4) + d2t).tolist() == t2d.nonzero().flatten().tolist()


def test_ties_go_to_lower_ids():
    d2t, t2d = vocab_map_from_frequencies(torch.tensor([2, 4, 4, 4, 0]), 2)
    assert (torch.arange(2) + d2t).tolist() == [1, 2]
    d2t, _ = vocab_map_from_frequencies(torch.zeros(6, dtype=torch.long), 3)  # unseen: lowest ids
    assert d2t.tolist() == [0, 0, 0]


def test_no_pruning_when_draft_vocab_covers_target():
    freq = torch.tensor([3, 0, 1])
    for size in (3, 10, None):
        d2t, t2d = vocab_map_from_frequencies(freq, size)
        assert d2t.tolist() == [0, 0, 0] and t2d.tolist() == [True, True, True]


def test_frequencies_count_only_masked_tokens(tmp_path):
    samples = [Sample("a-0", torch.tensor([1, 2, 2, 3]), torch.tensor([0, 1, 1, 1], dtype=torch.uint8)),
               Sample("a-1", torch.tensor([3, 4, 1]), torch.tensor([1, 0, 1], dtype=torch.uint8))]
    assert token_frequencies(samples, 6).tolist() == [0, 1, 2, 2, 0, 0]
    path = tmp_path / "vocab_map.pt"
    d2t, t2d = build_vocab_map(samples, 6, 2, path)
    assert (torch.arange(2) + d2t).tolist() == [2, 3]
    saved = torch.load(path)
    assert torch.equal(saved["d2t"], d2t) and torch.equal(saved["t2d"], t2d)
    # Reused from the file while the sizes match; recomputed when they change.
    assert torch.equal(build_vocab_map([], 6, 2, path)[0], d2t)
    assert build_vocab_map(samples, 6, 3, path)[0].shape == (3,)


def test_token_outside_target_vocab():
    s = Sample("a-0", torch.tensor([1, 9]), torch.tensor([1, 1], dtype=torch.uint8))
    try:
        token_frequencies([s], 5)
    except DataError as e:
        assert "token id 9 is outside the target's vocabulary of 5" in str(e)
    else:
        raise AssertionError("no error")
