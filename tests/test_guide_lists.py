"""SSVI with AutoGuideList: several sparse parts next to other autoguides, hierarchical priors."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta, AutoGuideList, AutoLowRankMultivariateNormal, AutoNormal
from pyro.nn import PyroModule, PyroSample
from torch.distributions import kl_divergence

from pyro_ssvi import SSVI, SparseNormal, SparseSubspaceGuide, SubspacePrior, subspace_prior
from pyro_ssvi.guide import sparse_parts


class Hier(PyroModule):
    """Per-layer scale tau and per-row scales lam: fc1.weight ~ Normal(0, tau * lam_row)."""

    def __init__(self):
        super().__init__()
        self.tau = PyroSample(dist.HalfCauchy(1.0))
        self.lam = PyroSample(dist.HalfCauchy(1.0).expand([8, 1]).to_event(2))
        self.fc1 = PyroModule[torch.nn.Linear](6, 8)
        self.fc1.weight = PyroSample(lambda m: dist.Normal(torch.zeros(8, 6), self.tau[..., None, None] * self.lam).to_event(2))
        self.fc2 = PyroModule[torch.nn.Linear](8, 3)
        self.fc2.weight = PyroSample(dist.Normal(0.0, 1.0).expand([3, 8]).to_event(2))
        self.fc2.bias = PyroSample(dist.Normal(0.0, 1.0).expand([3]).to_event(1))

    def forward(self, x, y=None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def data():
    return torch.randn(32, 6), torch.randint(0, 3, (32,))


def nested_guide(model, other=AutoNormal):
    """[other(tau, lam, fc2.bias), [sparse(fc1.weight), sparse(fc2.weight)]]"""
    guide = AutoGuideList(model)
    guide.append(other(pyro.poutine.block(model, hide=["fc1.weight", "fc2.weight"])))
    inner = AutoGuideList(pyro.poutine.block(model, expose=["fc1.weight", "fc2.weight"]))
    inner.append(SparseSubspaceGuide(pyro.poutine.block(model, expose=["fc1.weight"]), density=0.25))
    inner.append(SparseSubspaceGuide(pyro.poutine.block(model, expose=["fc2.weight"]), density=0.5))
    guide.append(inner)
    return guide


def test_sparse_parts_finds_nested_sparse_guides_in_order():
    model = Hier()
    guide = nested_guide(model)
    parts = sparse_parts(guide)
    assert len(parts) == 2 and all(isinstance(p, SparseSubspaceGuide) for p in parts)
    assert sparse_parts(AutoNormal(model)) == ()


@pytest.mark.parametrize("other", [AutoNormal, AutoDelta, AutoLowRankMultivariateNormal])
def test_every_sparse_part_gets_updates_next_to_other_autoguides(other):
    model = Hier()
    guide = nested_guide(model, other)
    x, y = data()
    svi = SSVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO(), total_steps=20, update_every=5, removal_fraction=0.5)
    svi.step(x, y)
    parts = sparse_parts(guide)
    before = [p.active_mask(p.sparse_site_names()[0]).clone() for p in parts]
    for _ in range(9):
        svi.step(x, y)
    assert [h["step"] for h in svi.history] == [5, 10]
    assert set(svi.history[0]["swapped"]) == {"fc1.weight", "fc2.weight"}
    for part, b in zip(parts, before):
        name = part.sparse_site_names()[0]
        assert (part.active_mask(name) != b).any(), f"{name}: the active set never changed"
        births = part.entry_births(name)
        assert set(births[births > 0].tolist()) <= {5, 10} and (births > 0).any() and int(part.ssvi_step) == 10
    assert svi.step_count == 10


def test_fresh_adam_step_on_refilled_slots_of_each_part():
    """A refilled slot's first step equals a fresh Adam's first step, lr * sign(g), in every sparse part."""
    model = Hier()
    guide = nested_guide(model)
    x, y = data()
    lr = 0.01
    svi = SSVI(model, guide, pyro.optim.Adam({"lr": lr}), TraceMeanField_ELBO(), total_steps=20, update_every=5, removal_fraction=0.5)
    for _ in range(5):
        svi.step(x, y)
    parts = sparse_parts(guide)
    names = [p.sparse_site_names()[0] for p in parts]
    young = [p.entry_births(n) == 5 for p, n in zip(parts, names)]
    assert all(m.any() for m in young)
    locs_before = [p.loc(n).detach().clone() for p, n in zip(parts, names)]
    svi.step(x, y)
    for p, n, m, b in zip(parts, names, young, locs_before):
        step = (p.loc(n).detach() - b)[m].abs()
        moved = step[step > 0]
        torch.testing.assert_close(moved, torch.full_like(moved, lr), rtol=1e-3, atol=1e-7)


def test_guide_list_without_a_sparse_part_is_refused():
    model = Hier()
    guide = AutoGuideList(model)
    guide.append(AutoNormal(model))
    with pytest.raises(ValueError, match=r"guide: the AutoGuideList holds no SparseSubspaceGuide \(parts: AutoNormal\)"):
        SSVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO(), total_steps=10)
    with pytest.raises(ValueError, match="guide: expected a SparseSubspaceGuide or an AutoGuideList holding one, got AutoNormal"):
        SSVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.01}), Trace_ELBO(), total_steps=10)


def test_sparse_guide_alone_keeps_the_scale_site_dense_and_trains():
    model = Hier()
    guide = SparseSubspaceGuide(model, density=0.5)
    x, y = data()
    guide(x, y)
    assert guide.summary()["tau"]["dense"].startswith("support") and "tau" not in guide.sparse_site_names()
    svi = SSVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO(), total_steps=8, update_every=2)
    assert all(math.isfinite(svi.step(x, y)) for _ in range(8)) and [h["step"] for h in svi.history] == [2, 4]
    assert all(set(h["scheduled"]) == set(guide.sparse_site_names()) for h in svi.history)  # updates touch sparse sites only


@pytest.mark.parametrize("elbo", ["JitTrace_ELBO", "JitTraceMeanField_ELBO"])
def test_jit_elbos_are_refused_at_construction_with_the_reason(elbo):
    model = Hier()
    guide = nested_guide(model)
    with pytest.raises(ValueError, match=rf"{elbo}: the JIT compiles the loss once.*use {elbo[3:]}\(\) instead"):
        SSVI(model, guide, pyro.optim.Adam({"lr": 0.01}), getattr(pyro.infer, elbo)(), total_steps=10)


def test_tail_adaptive_needs_vectorised_particles():
    model = Hier()
    with pytest.raises(ValueError, match="TraceTailAdaptive_ELBO needs num_particles > 1 and vectorize_particles=True"):
        SSVI(model, nested_guide(model), pyro.optim.Adam({"lr": 0.01}), pyro.infer.TraceTailAdaptive_ELBO(num_particles=4),
             total_steps=10)


def test_guide_list_checkpoint_round_trip():
    model = Hier()
    guide = nested_guide(model)
    x, y = data()
    svi = SSVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO(), total_steps=20, update_every=3)
    for _ in range(7):
        svi.step(x, y)
    state = guide.state_dict()
    pyro.clear_param_store()
    model2 = Hier()
    guide2 = nested_guide(model2)
    svi2 = SSVI(model2, guide2, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO(), total_steps=20, update_every=3)
    svi2.differentiable_loss(x, y)  # set up
    guide2.load_state_dict(state)
    assert svi2.step_count == 7
    for a, b in zip(sparse_parts(guide), sparse_parts(guide2)):
        for name in a.site_names:
            assert torch.equal(a.active_index(name), b.active_index(name))
            assert torch.equal(a.loc(name), b.loc(name))


# --- hierarchical priors: the restricted prior and its analytic KL ------------------------------
def test_hierarchical_prior_kl_is_analytic_over_active_coordinates():
    torch.manual_seed(0)
    shape, k = (4, 5), 7
    index = torch.randperm(20)[:k].sort().values
    q = SparseNormal(torch.randn(k), torch.rand(k) + 0.1, index, shape)
    tau, lam = torch.tensor(0.7), torch.rand(4, 1) + 0.2
    prior = dist.Normal(torch.zeros(shape), tau * lam).to_event(2)
    kl = kl_divergence(q, SubspacePrior(prior, index))
    scale = (tau * lam).expand(shape).reshape(-1)[index]
    expected = kl_divergence(torch.distributions.Normal(q.loc, q.scale), torch.distributions.Normal(0.0, scale)).sum()
    torch.testing.assert_close(kl, expected)
    # vectorised particles: a prior scale per particle, (P, 1) batch dims
    P = 3
    taus = torch.rand(P, 1) + 0.5
    prior_p = dist.Normal(torch.zeros(shape), taus[..., None, None] * lam).to_event(2)
    kl_p = kl_divergence(q.expand((P, 1)), SubspacePrior(dist.Normal(0.0, 1.0).expand(shape).to_event(2), index).expand((P, 1)))
    assert kl_p.shape == (P, 1)
    kl_p = kl_divergence(q.expand((P, 1)), SubspacePrior(prior_p, index))
    for i in range(P):
        s = (taus[i] * lam).expand(shape).reshape(-1)[index]
        ref = kl_divergence(torch.distributions.Normal(q.loc, q.scale), torch.distributions.Normal(0.0, s)).sum()
        torch.testing.assert_close(kl_p[i, 0], ref)


def test_hierarchical_prior_follows_the_scale_sample_each_step():
    """The restricted prior is rebuilt at every site with that pass's tau and lam."""
    model = Hier()
    guide = nested_guide(model)
    x, y = data()
    svi = SSVI(model, guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO(), total_steps=10)
    svi.differentiable_loss(x, y)
    guide_tr = pyro.poutine.trace(guide).get_trace(x, y)
    model_tr = pyro.poutine.trace(pyro.poutine.replay(subspace_prior(model, guide), guide_tr)).get_trace(x, y)
    fn = model_tr.nodes["fc1.weight"]["fn"]
    assert isinstance(fn, SubspacePrior)
    tau, lam = guide_tr.nodes["tau"]["value"], guide_tr.nodes["lam"]["value"]
    part = sparse_parts(guide)[0]
    torch.testing.assert_close(fn.base.base_dist.scale, (tau * lam).expand(8, 6))
    assert torch.equal(fn.index, part.active_index("fc1.weight"))
