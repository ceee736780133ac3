import os

import pytest
import torch

# Two cores here: keep torch from oversubscribing when several test processes run.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cpu_only(monkeypatch):
    """Run a CPU-topology test as on a machine without GPUs, also on one that has some: the placement
    sees 0 GPUs, and processes the test starts see none (CUDA_VISIBLE_DEVICES="")."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from torchspec.utils.tiny import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=512)


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory, tiny_tokenizer):
    """A random tiny Qwen3 target (4 layers, H=64) with the shared tiny tokenizer."""
    from torchspec.utils.tiny import make_tiny_target

    d = tmp_path_factory.mktemp("target")
    make_tiny_target(d, arch="qwen3", tokenizer=tiny_tokenizer)
    return d
