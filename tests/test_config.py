from __future__ import annotations

import pytest

from aurora_fx.config import AromaConfig, AuroraConfig, LoraConfig
from aurora_fx.registry import config_from_dict, make_config


def test_defaults_follow_methods_md():
    assert (AuroraConfig().rank, AuroraConfig().alpha, AuroraConfig().scale) == (2, 4.0, 2.0)
    assert (AuroraConfig().grid_size, AuroraConfig().spline_order, AuroraConfig().grid_range) == (5, 3, (-1.0, 1.0))
    assert AuroraConfig().dropout == 0.0  # the 3-seed recipe study's decision (README, docs/methods.md §2)
    assert (LoraConfig().rank, LoraConfig().alpha, LoraConfig().dropout) == (8, 16.0, 0.0)
    assert (AromaConfig().rank, AromaConfig().alpha, AromaConfig().dropout) == (1, 4.0, 0.1)


@pytest.mark.parametrize("cfg", [AuroraConfig(), LoraConfig(rank=3), AromaConfig(rank=2)])
def test_configs_round_trip_through_dicts(cfg):
    assert config_from_dict(cfg.to_dict()) == cfg


def test_make_config_uses_the_method_defaults_for_unset_fields():
    assert make_config("lora", rank=4) == LoraConfig(rank=4, alpha=16.0)
    assert make_config("AURORA") == AuroraConfig()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rank": 0}, "rank must be a positive integer, got 0"),
    ({"rank": 2.5}, "rank must be a positive integer"),
    ({"alpha": 0}, "alpha must be a finite number > 0, got 0"),
    ({"dropout": 1.0}, r"dropout must be a probability in \[0, 1\), got 1.0"),
    ({"grid_size": 0}, "grid_size must be an integer >= 1"),
    ({"grid_range": (1.0, -1.0)}, "grid_range must be"),
])
def test_invalid_values_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AuroraConfig(**kwargs)


def test_configs_are_frozen():
    with pytest.raises(AttributeError):
        AuroraConfig().rank = 3  # type: ignore[misc]


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown method 'dora'; choose one of \['aroma', 'aurora', 'lora'\]"):
        make_config("dora")
