"""Per-layer allocation of the active budget: uniform (the paper's) and ERK (Evci et al. 2020)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroSample

from pyro_ssvi import SparseSubspaceGuide
from pyro_ssvi.allocation import active_counts, erk_counts, erk_densities, whole_counts


class ConvNet(PyroModule):
    """A small convolution, a large one and a head: ERK gives the small sites more."""

    def __init__(self):
        super().__init__()
        self.c1 = PyroModule[torch.nn.Conv2d](3, 4, 3, padding=1)
        self.c1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([4, 3, 3, 3]).to_event(4))
        self.c2 = PyroModule[torch.nn.Conv2d](4, 32, 3, padding=1)
        self.c2.weight = PyroSample(dist.Normal(0.0, 1.0).expand([32, 4, 3, 3]).to_event(4))
        self.fc = PyroModule[torch.nn.Linear](32, 10)
        self.fc.weight = PyroSample(dist.Normal(0.0, 1.0).expand([10, 32]).to_event(2))

    def forward(self, x, y=None):
        logits = self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((-1, -2)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


SHAPES = {"c1.weight": torch.Size([4, 3, 3, 3]), "c2.weight": torch.Size([32, 4, 3, 3]), "fc.weight": torch.Size([10, 32])}


def guide_of(**kwargs):
    guide = SparseSubspaceGuide(ConvNet(), **kwargs)
    guide(torch.randn(2, 3, 6, 6), torch.tensor([0, 1]))
    return guide


def test_erk_follows_the_formula_on_a_written_out_case():
    # raw ratios (sum of dims / product of dims): c1 13/108, c2 42/1152, fc 42/320; numel 108, 1152, 320 (1580 in all)
    # budget 0.1 * 1580 = 158 = eps * (13 + 42 + 42) -> eps = 158 / 97; no site exceeds 1
    eps = 158 / 97
    rho = erk_densities(SHAPES, 0.1)
    assert rho == pytest.approx({"c1.weight": eps * 13 / 108, "c2.weight": eps * 42 / 1152, "fc.weight": eps * 42 / 320})
    # targets 21.18, 68.41, 68.41: floors 21, 68, 68 (157); the one short goes to the largest remainder, c2 on the tie
    assert erk_counts(SHAPES, 0.1) == {"c1.weight": 21, "c2.weight": 69, "fc.weight": 68}


def test_sites_that_would_exceed_density_1_are_made_dense_and_the_rest_rescaled():
    # at 0.5 (budget 790), eps = 790 / 97 puts fc at 1.07: dense (320 off the budget); eps' = 470 / 55 then puts c1
    # at 1.03: dense too (108 more); eps'' = 362 / 42 for c2 alone
    rho = erk_densities(SHAPES, 0.5)
    assert rho["fc.weight"] == 1.0 and rho["c1.weight"] == 1.0
    assert rho["c2.weight"] == pytest.approx((790 - 320 - 108) / 42 * 42 / 1152)
    counts = erk_counts(SHAPES, 0.5)
    assert counts == {"c1.weight": 108, "c2.weight": 790 - 320 - 108, "fc.weight": 320}


@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("allocation", ["uniform", "erk"])
def test_every_count_is_whole_in_range_and_the_erk_total_is_exact(density, allocation):
    counts = active_counts(SHAPES, density, allocation)
    for name, k in counts.items():
        assert 1 <= k <= SHAPES[name].numel()
    if allocation == "erk":
        assert sum(counts.values()) == round(density * 1580)
    else:
        assert counts == {n: round(density * s.numel()) for n, s in SHAPES.items()}


def test_whole_counts_give_the_remainder_to_the_largest_fractions_and_respect_limits():
    assert whole_counts({"a": 1.4, "b": 2.6, "c": 3.0}, {"a": 5, "b": 5, "c": 5}) == {"a": 1, "b": 3, "c": 3}
    assert whole_counts({"a": 0.2, "b": 0.3}, {"a": 1, "b": 1}) == {"a": 1, "b": 1}  # at least 1 each
    assert whole_counts({"a": 2.5, "b": 2.5}, {"a": 2, "b": 9}) == {"a": 2, "b": 3}  # a is full: b takes the rest


def test_the_guide_takes_the_erk_counts_and_keeps_dense_sites_off_the_budget():
    guide = guide_of(density=0.1, allocation="erk")
    assert {n: guide.site_info(n).k for n in SHAPES} == erk_counts(SHAPES, 0.1)
    assert guide.active_params == round(0.1 * 1580)
    uniform = guide_of(density=0.1)
    assert {n: uniform.site_info(n).k for n in SHAPES} == {"c1.weight": 11, "c2.weight": 115, "fc.weight": 32}
    pyro.clear_param_store()
    kept = guide_of(density=0.1, allocation="erk", dense_sites=("c1.weight",))
    rest = {n: s for n, s in SHAPES.items() if n != "c1.weight"}
    assert kept.site_info("c1.weight").k == 108
    assert {n: kept.site_info(n).k for n in rest} == erk_counts(rest, 0.1)
    assert sum(kept.site_info(n).k for n in rest) == round(0.1 * sum(s.numel() for s in rest.values()))


def test_a_mapping_density_sets_each_site_and_refuses_another_allocation():
    guide = guide_of(density={"c2.weight": 0.25})
    assert guide.site_info("c2.weight").k == round(0.25 * 1152) and guide.site_info("c1.weight").k == 108
    with pytest.raises(ValueError, match="allocation='erk'.*mapping density"):
        SparseSubspaceGuide(ConvNet(), density={"c2.weight": 0.25}, allocation="erk")
    with pytest.raises(ValueError, match="allocation: expected one of"):
        SparseSubspaceGuide(ConvNet(), density=0.1, allocation="global")


def test_the_allocation_is_saved_and_a_state_of_another_is_refused_untouched():
    erk = guide_of(density=0.1, allocation="erk")
    state = erk.state_dict()
    assert state["_extra_state"]["allocation"] == "erk"
    pyro.clear_param_store()
    again = guide_of(density=0.1, allocation="erk")
    again.load_state_dict(state)
    assert torch.equal(again.active_index("fc.weight"), erk.active_index("fc.weight"))
    pyro.clear_param_store()
    uniform = guide_of(density=0.1)
    before = {k: v.clone() for k, v in uniform.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match="allocation='erk'.*allocation='uniform'"):
        uniform.load_state_dict(state)
    assert all(torch.equal(v, uniform.state_dict()[k]) for k, v in before.items())
    legacy = dict(uniform.state_dict())
    legacy["_extra_state"] = {"kernel_decisions": {}}  # written before allocations existed: uniform
    uniform.load_state_dict(legacy)
    assert math.isclose(uniform.active_params, 158, abs_tol=0)
