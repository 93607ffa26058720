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


@pytest.mark.parametrize("overwrite", [False, True])
def test_select_swap_overwrites_scores_only_when_allowed(overwrite):
    """A user's score tensor is left alone unless the criterion declares its scores fresh."""
    index = torch.tensor([2, 5, 7, 9])
    add = torch.arange(12.0)
    before = add.clone()
    d = select_swap(index, torch.tensor([4.0, 1.0, 3.0, 0.5]), 2, 12, lambda cand: add, overwrite_scores=overwrite)
    assert set(d.added.tolist()) == {10, 11}  # the same decision either way
    assert torch.equal(add, before) != overwrite
    if overwrite:  # kept entries (2, 7) were masked in place
        assert add[2] == -float("inf") and add[7] == -float("inf")


@pytest.mark.parametrize("n", [1, 7, 500, 20000, 60000])
def test_top_n_selects_what_topk_selects(n):
    """The thresholded selection returns topk's set, with masked (-inf) entries and on large inputs."""
    from pyro_ssvi.subspace import top_n

    g = torch.Generator().manual_seed(n)
    scores = torch.randn(200_000, generator=g)
    scores[torch.randperm(200_000, generator=g)[:20_000]] = -float("inf")  # kept entries, masked
    state = torch.get_rng_state()
    chosen = top_n(scores, n)
    assert torch.equal(torch.get_rng_state(), state)  # its sample does not consume the global RNG
    assert chosen.numel() == n and set(chosen.tolist()) == set(torch.topk(scores, n).indices.tolist())


def test_top_n_falls_back_on_ties_and_small_inputs():
    from pyro_ssvi.subspace import top_n

    flat = torch.zeros(100_000)
    flat[:3] = 1.0
    assert set(top_n(flat, 3).tolist()) == {0, 1, 2}  # all-equal sample: the cut keeps everything, topk decides
    assert top_n(flat, 50_000).numel() == 50_000
    assert set(top_n(torch.tensor([0.5, 2.0, 1.0]), 2).tolist()) == {1, 2}
