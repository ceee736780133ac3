"""Conversation data: formats, chat templates, tokenization + loss mask, cache, draft vocabulary."""

from torchspec.data.dataset import LazySamples, build_dataset, from_config, vocab_map_for
from torchspec.data.errors import DataError
from torchspec.data.sample import Sample, SampleTable
from torchspec.data.templates import TEMPLATE_NAMES, get_template
from torchspec.data.vocab import build_vocab_map, token_frequencies, vocab_map_from_frequencies

__all__ = [
    "DataError", "LazySamples", "Sample", "SampleTable", "TEMPLATE_NAMES", "build_dataset", "build_vocab_map",
    "from_config", "get_template", "token_frequencies", "vocab_map_for", "vocab_map_from_frequencies",
]
