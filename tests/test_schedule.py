import math

import pytest
import torch

from pyro_ssvi import SwapSchedule, select_swap


def test_cosine_fraction_and_update_steps():
    s = SwapSchedule(total_steps=1000, update_every=100, removal_fraction=0.3, stop_updates_at=0.75)
    assert s.end_step == 750
    assert s.update_steps() == [100, 200, 300, 400, 500, 600, 700]
    assert [t for t in range(1, 1001) if s.is_update_step(t)] == s.update_steps()
    assert s.fraction(0) == pytest.approx(0.3)
    assert s.fraction(375) == pytest.approx(0.15)
    assert s.fraction(750) == pytest.approx(0.0, abs=1e-12)
    assert s.num_swaps(640, 100) == math.floor(0.15 * (1 + math.cos(math.pi * 100 / 750)) * 640)


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 10, "update_every": 0}, "update_every"),
        ({"total_steps": 10, "removal_fraction": 1.5}, "removal_fraction"),
        ({"total_steps": 10, "stop_updates_at": -0.1}, "stop_updates_at"),
        ({"total_steps": 10.5}, "total_steps"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        SwapSchedule(**kwargs)


def test_select_swap_removes_lowest_and_adds_best_candidates():
    index = torch.tensor([2, 5, 7, 9])
    scores = torch.tensor([4.0, 1.0, 3.0, 0.5])  # removes 9 (slot 3) and 5 (slot 1)
    add = torch.zeros(12)
    add[[0, 11]] = torch.tensor([2.0, 1.0])
    d = select_swap(index, scores, 2, 12, lambda cand: add)
    assert set(d.removed.tolist()) == {5, 9}
    assert set(d.added.tolist()) == {0, 11}
    assert sorted(d.positions.tolist()) == [1, 3]
    new = index.clone()
    new[d.positions] = d.new_index
    assert sorted(new.tolist()) == [0, 2, 7, 11]


def test_select_swap_keeps_slot_of_readded_entry_and_never_adds_kept_ones():
    index = torch.tensor([2, 5, 7, 9])
    scores = torch.tensor([4.0, 1.0, 3.0, 0.5])
    add = torch.zeros(12)
    add[2] = 100.0  # a kept entry: not a candidate
    add[9] = 50.0  # removed, then re-added: keeps its slot
    add[4] = 10.0
    d = select_swap(index, scores, 2, 12, lambda cand: add)
    assert set(d.added.tolist()) == {9, 4}
    assert d.positions.tolist() == [1] and d.new_index.tolist() == [4]


def test_select_swap_zero_and_bad_n():
    index = torch.tensor([1, 2])
    d = select_swap(index, torch.ones(2), 0, 5, lambda c: torch.zeros(5))
    assert d.positions.numel() == 0
    with pytest.raises(ValueError, match="n:"):
        select_swap(index, torch.ones(2), 3, 5, lambda c: torch.zeros(5))
