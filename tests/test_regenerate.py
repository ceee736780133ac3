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
