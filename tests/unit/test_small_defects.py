"""Issue 14 item 8: Literal config fields are checked, and synpref_model.json is JSON."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from synpref.shared.config import ConfigError, load_settings
from synpref.training.reward_config import RewardConfig, literal_choices


def test_every_enum_like_reward_config_field_is_a_literal_and_is_checked():
    choices = literal_choices(RewardConfig)
    assert set(choices) == {"truncation", "lr_scheduler", "precision", "distributed", "packing"}
    assert "fp64" in choices["precision"]
    defaults = {f.name: f.default for f in dataclasses.fields(RewardConfig)}
    for name, allowed in choices.items():
        assert defaults[name] in allowed
        for value in allowed:
            assert getattr(RewardConfig.from_dict({name: value}), name) == value
        with pytest.raises(ValueError, match=f"{name} must be one of"):
            RewardConfig.from_dict({name: "no-such-choice"})


def test_a_literal_added_to_reward_config_is_checked_without_another_list():
    @dataclasses.dataclass
    class Extended(RewardConfig):
        optimizer: typing.Literal["adamw", "sgd"] = "adamw"

    Extended(optimizer="sgd")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        Extended(optimizer="lion")


def test_controller_source_format_is_checked_by_the_settings():
    assert load_settings(controller={"source_format": "llmbar"}).controller.source_format == "llmbar"
    with pytest.raises(ConfigError, match="source_format"):
        load_settings(controller={"source_format": "csv"})


def test_model_metrics_write_null_for_nan_so_the_file_is_json():
    from synpref.services.controller.models import _jsonable

    about = {"metrics": _jsonable({"valid_accuracy": float("nan"), "scale": 3.0, "curve": [1], "picked_step": 5})}
    text = json.dumps(about, allow_nan=False)
    assert json.loads(text)["metrics"] == {"valid_accuracy": None, "scale": 3.0, "picked_step": 5}
