"""Config values that made the trainer silently train on nothing real (session 45, area R8)."""

from __future__ import annotations

import math

import pytest

from synpref.training.batching import step_order
from synpref.training.reward_config import RewardConfig


@pytest.mark.parametrize("window", [0, -1, -32])
def test_group_window_below_one_is_refused(window: int) -> None:
    with pytest.raises(ValueError, match="group_window"):
        RewardConfig(group_by_length=True, group_window=window)


def test_step_order_refuses_a_negative_window_instead_of_an_uninitialised_order() -> None:
    # The old code returned np.empty's contents: indices that are no pairs (or pair 0 again and again).
    with pytest.raises(ValueError, match="group_window"):
        step_order(4096, 0, 0, 256, list(range(4096)), -1)


def test_step_order_grouped_is_a_permutation_of_its_pairs() -> None:
    order = step_order(64, 3, 0, 8, [i % 5 for i in range(64)], 2)
    assert sorted(order.rows.ravel().tolist()) == list(range(64))


@pytest.mark.parametrize("epochs", [0.0, -1.0, math.nan, math.inf])
def test_num_epochs_that_trains_nothing_real_is_refused(epochs: float) -> None:
    # 0 or negative trained one step and saved it as final; NaN / inf failed only after the data was encoded.
    with pytest.raises(ValueError, match="num_epochs"):
        RewardConfig(num_epochs=epochs)
    with pytest.raises(ValueError, match="num_epochs"):
        RewardConfig.from_dict({"num_epochs": epochs, "max_steps": 0})


def test_num_epochs_is_ignored_when_max_steps_is_set() -> None:
    assert RewardConfig(num_epochs=0.0, max_steps=5).max_steps == 5
    assert RewardConfig(num_epochs=0.25).num_epochs == 0.25


@pytest.mark.parametrize("length", [0, -8])
def test_max_length_below_one_is_refused(length: int) -> None:
    with pytest.raises(ValueError, match="max_length"):
        RewardConfig(max_length=length)
