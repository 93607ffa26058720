"""Deterministic sparse training on SSVI's schedule (RigL): exact zeros, the swap rule, state."""

import pytest
import torch

from pyro_ssvi import SwapSchedule
from pyro_ssvi.allocation import active_counts
from pyro_ssvi.masks import SparseMasks


def net_and_masks(density=0.2, allocation="uniform", every=3):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5))
    params = {"0.weight": net[0].weight, "3.weight": net[3].weight}
    masks = SparseMasks(params, density, SwapSchedule(30, every, 0.3, 0.75), allocation, generator=torch.Generator().manual_seed(1))
    return net, masks


def train(net, masks, steps=30):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(2)
    for t in range(1, steps + 1):
        x, y = torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        dense = masks.dense_gradients() if masks.schedule.is_update_step(t) else None
        masks.mask_gradients()
        opt.step()
        if dense is not None:
            masks.update(t, dense, opt)
        for name, p in masks.params.items():  # exact zeros outside the active set, at every step, in the momentum too
            assert torch.all(p[~masks.masks[name]] == 0), (t, name)
            assert torch.all(opt.state[p]["momentum_buffer"][~masks.masks[name]] == 0), (t, name)
    return opt


@pytest.mark.parametrize("allocation", ["uniform", "erk"])
def test_weights_outside_the_active_set_stay_exact_zeros_and_the_counts_never_change(allocation):
    net, masks = net_and_masks(allocation=allocation)
    counts = active_counts({n: p.shape for n, p in masks.params.items()}, 0.2, allocation)
    before = {n: m.clone() for n, m in masks.masks.items()}
    train(net, masks)
    assert {n: int(m.sum()) for n, m in masks.masks.items()} == counts
    assert [h["step"] for h in masks.history] == SwapSchedule(30, 3, 0.3, 0.75).update_steps()
    assert any(not torch.equal(before[n], masks.masks[n]) for n in before)  # the active sets moved
    assert net[0].bias.ne(0).all()  # unmasked parameters train as usual


def test_an_update_removes_the_smallest_magnitudes_and_adds_the_largest_gradients_at_zero():
    net, masks = net_and_masks()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    w = masks.params["3.weight"]
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) * masks.masks["3.weight"])
    opt.state[w]["momentum_buffer"] = torch.ones_like(w) * masks.masks["3.weight"]
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(4))
    mask = masks.masks["3.weight"].reshape(-1).clone()
    k = int(mask.sum())
    n = masks.schedule.num_swaps(k, 3)
    active = mask.nonzero().squeeze(1)
    removed = active[w.detach().reshape(-1)[active].abs().argsort()[:n]]
    candidates = (~mask).clone()
    candidates[removed] = True
    scores = torch.where(candidates, grad.reshape(-1).abs(), torch.tensor(-1.0))
    added = scores.argsort(descending=True)[:n]
    kept_values = w.detach().reshape(-1).clone()
    masks.update(3, {"0.weight": torch.zeros_like(masks.params["0.weight"]), "3.weight": grad}, opt)
    new = masks.masks["3.weight"].reshape(-1)
    expected = mask.clone()
    expected[removed] = False
    expected[added] = True
    assert torch.equal(new, expected) and int(new.sum()) == k
    arrived = added[~torch.isin(added, removed)]
    assert torch.all(w.detach().reshape(-1)[arrived] == 0) and torch.all(opt.state[w]["momentum_buffer"].reshape(-1)[arrived] == 0)
    stayed = new & mask
    assert torch.equal(w.detach().reshape(-1)[stayed], kept_values[stayed])  # kept entries keep their values


def test_masks_survive_a_checkpoint_and_a_state_of_another_density_is_refused():
    net, masks = net_and_masks()
    train(net, masks, steps=10)
    state = masks.state_dict()
    other_net, other = net_and_masks()
    other.load_state_dict(state)
    assert all(torch.equal(other.masks[n], masks.masks[n]) for n in masks.masks) and other.history == masks.history
    _, denser = net_and_masks(density=0.5)
    with pytest.raises(ValueError, match="another density"):
        denser.load_state_dict(state)
    _, erk = net_and_masks(allocation="erk")
    with pytest.raises(ValueError, match="allocation"):
        erk.load_state_dict(state)
    with pytest.raises(ValueError, match="density"):
        SparseMasks({"w": torch.nn.Parameter(torch.ones(3))}, 0.0, SwapSchedule(10))
    with pytest.raises(RuntimeError, match="no gradient"):
        masks.update(3, {"0.weight": None, "3.weight": None})
