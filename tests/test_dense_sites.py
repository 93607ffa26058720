"""Sites that cannot be sparse, kept dense inside SparseSubspaceGuide with AutoNormal's parametrisation.

Constrained supports (a noise scale, a hierarchical prior's scale, a simplex), priors that couple coordinates
(MultivariateNormal) and latents of subsampled plates: their ELBO terms match AutoNormal's under the same
parameters and noise, the conjugate posteriors come out where the exact variational optimum lies, and they
survive checkpoints, Predictive, SSVI's updates and the cost counters beside sparse weights.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample

from pyro_ssvi import SSVI, SparseSubspaceGuide
from pyro_ssvi.cost import flops_report
from pyro_ssvi.dense_site import is_weight, why_dense


# --- Pyro's Bayesian regression tutorial, with its noise scale ----------------------------------
class Regression(PyroModule):
    """``PyroModule[nn.Linear]`` with Normal priors on weight and bias, ``sigma ~ Uniform(0, 10)``."""

    def __init__(self, d):
        super().__init__()
        self.linear = PyroModule[torch.nn.Linear](d, 1)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, d]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([1]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


N, D, SIGMA = 400, 20, 0.5
SUPPORT = [0, 3, 7, 12, 16]


def regression_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    w = torch.zeros(D)
    w[SUPPORT] = torch.tensor([2.0, -1.5, 1.0, -1.0, 1.5])  # a quarter of the weights: density 0.5 can hold them
    return x, x @ w + 0.3 + SIGMA * torch.randn(N, generator=g)


def residual_scale(x, y, columns):
    """The noise scale the posterior concentrates on when only ``columns`` (and the bias) are free: the RMS residual
    of least squares on them."""
    design = torch.cat([x[:, columns], torch.ones(len(x), 1)], 1).double()
    coef = torch.linalg.lstsq(design, y.double().unsqueeze(1)).solution
    return float((y.double() - (design @ coef).squeeze(1)).pow(2).mean().sqrt())


@pytest.mark.parametrize("density", [1.0, 0.5])
@pytest.mark.parametrize("method", ["SVI", "SSVI"])
def test_the_tutorial_model_trains_with_only_the_guide_swapped_and_recovers_the_noise_scale(method, density):
    pyro.set_rng_seed(0)
    x, y = regression_data()
    model = Regression(D)
    guide = SparseSubspaceGuide(model, density=density)  # the one line that differs from the tutorial
    optim = pyro.optim.ClippedAdam({"lr": 0.03, "lrd": 0.999})
    steps = 1500
    if method == "SVI":
        svi = SVI(model, guide, optim, Trace_ELBO())
    else:
        svi = SSVI(model, guide, optim, Trace_ELBO(), total_steps=steps, update_every=50)
    for _ in range(steps):
        svi.step(x, y)
    assert guide.summary()["sigma"]["dense"].startswith("support Interval")
    active = guide.active_mask("linear.weight").reshape(-1).nonzero().squeeze(1)
    target = residual_scale(x, y, active) if method == "SVI" else SIGMA  # SSVI's updates find the true support
    if method == "SSVI" or density == 1.0:
        assert set(active.tolist()) >= set(SUPPORT)
    low, med, high = guide.quantiles([0.05, 0.5, 0.95])["sigma"].tolist()
    spread = (high - low) / (2 * 1.645)  # the posterior sd of sigma, read off its 90% interval
    # the posterior sd of a noise scale is about sigma / sqrt(2 N); the truth lies within 4 of them of the median
    assert spread == pytest.approx(target / math.sqrt(2 * N), rel=0.35)
    assert abs(med - target) < 4 * spread, (med, target, spread)
    samples = Predictive(model, guide=guide, num_samples=20)(x)  # the tutorial's scoring
    assert samples["obs"].shape == (20, N) and (samples["sigma"] > 0).all()


# --- the same ELBO terms as AutoNormal ------------------------------------------------------------
def constrained_model():
    pyro.sample("rate", dist.Gamma(2.0, 3.0))
    pyro.sample("probs", dist.Dirichlet(torch.ones(4)))
    pyro.sample("w", dist.MultivariateNormal(torch.zeros(3), torch.eye(3) + 0.5))
    pyro.sample("u", dist.Uniform(-1.0, 2.0).expand([2]).to_event(1))
    with pyro.plate("groups", 5):
        pyro.sample("scales", dist.HalfNormal(1.0))


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
def test_every_kind_of_dense_site_scores_exactly_as_autonormal_under_the_same_parameters(elbo):
    ours, theirs = SparseSubspaceGuide(constrained_model, density=0.5), AutoNormal(constrained_model)
    ours(), theirs()
    assert all(v["dense"] for v in ours.summary().values())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in ("rate", "probs", "w", "u", "scales"):
            loc = torch.randn(ours.loc(name).shape, generator=g)
            scale = torch.rand(ours.loc(name).shape, generator=g) + 0.2
            ours.loc(name).copy_(loc)
            ours.unconstrained_scale(name).copy_(scale.expm1().log())  # softplus^-1
            getattr(theirs.locs, name).copy_(loc)
            setattr(theirs.scales, name, scale)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        a = elbo().differentiable_loss(constrained_model, ours)
        pyro.set_rng_seed(seed)
        b = elbo().differentiable_loss(constrained_model, theirs)
        assert torch.allclose(a, b, rtol=1e-6), (seed, a, b)
    median, theirs_median = ours.median(), theirs.median()
    for name in median:
        assert torch.allclose(median[name], theirs_median[name], rtol=1e-6)
    q, tq = ours.quantiles([0.1, 0.9]), theirs.quantiles([0.1, 0.9])
    assert all(torch.allclose(q[n], tq[n], rtol=1e-6) for n in q)


def test_dense_sites_stay_in_their_supports_and_median_and_quantiles_have_constrained_values():
    guide = SparseSubspaceGuide(constrained_model)
    sample = guide()
    assert sample["rate"] > 0 and torch.allclose(sample["probs"].sum(), torch.tensor(1.0)) and (sample["probs"] > 0).all()
    assert ((sample["u"] > -1) & (sample["u"] < 2)).all() and sample["scales"].shape == (5,)
    assert guide.loc("probs").shape == (3,)  # the simplex's unconstrained coordinates (stick-breaking)
    q = guide.quantiles([0.25, 0.5, 0.75])
    assert q["probs"].shape == (3, 4) and q["w"].shape == (3, 3) and q["scales"].shape == (3, 5)
    assert torch.equal(q["rate"][1], guide.median()["rate"])
    assert torch.allclose(guide.median()["probs"], torch.full((4,), 0.25))  # AutoNormal's start: init_to_feasible


# --- conjugate models: the dense site lands on the exact variational optimum --------------------------
def poisson_model(counts):
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    with pyro.plate("data", len(counts)):
        pyro.sample("obs", dist.Poisson(rate), obs=counts)


def precision_model(y):
    precision = pyro.sample("precision", dist.Gamma(3.0, 2.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(0.0, precision.rsqrt()), obs=y)


def conjugate_case(case):
    g = torch.Generator().manual_seed(2)
    if case == "poisson":
        counts = torch.poisson(torch.full((200,), 4.0), generator=g)
        return poisson_model, (counts,), "rate", 2.0 + counts.sum(), 1.0 + len(counts)
    y = 0.7 * torch.randn(200, generator=g)
    return precision_model, (y,), "precision", torch.tensor(3.0 + len(y) / 2), 2.0 + y.pow(2).sum() / 2


@pytest.mark.parametrize("guide_class", [SparseSubspaceGuide, AutoNormal], ids=["ours", "AutoNormal"])
@pytest.mark.parametrize("case", ["poisson", "precision"])
def test_a_conjugate_constrained_site_converges_to_the_variational_optimum_of_the_analytic_posterior(case, guide_class):
    r"""The posterior is Gamma(a, b). A LogNormal q = exp N(m, s^2) maximises the ELBO at E_q[theta] = a / b (the
    posterior mean, exactly) and s^2 = 1 / a (d/dm and d/ds of a m - b exp(m + s^2/2) + log s)."""
    model, args, name, a, b = conjugate_case(case)
    pyro.set_rng_seed(0)
    guide = guide_class(model)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.02, "lrd": 0.998}),
              Trace_ELBO(num_particles=32, vectorize_particles=True))
    for _ in range(2000):
        svi.step(*args)
    if guide_class is AutoNormal:
        m, s = guide.locs.rate if case == "poisson" else guide.locs.precision, getattr(guide.scales, name)
    else:
        m, s = guide.loc(name), guide.scale(name)
    m, s = m.detach(), s.detach()
    mean, sd = float(torch.exp(m + s**2 / 2)), float(a.sqrt() / b)
    # SGD noise: 32 particles per step, the step size decayed to 0.02 * 0.998^2000 = 4e-4
    assert abs(mean - float(a / b)) < 0.1 * sd, (mean, float(a / b), sd)
    assert float(s) == pytest.approx(float(a.rsqrt()), rel=0.1)


# --- a hierarchical BNN with a HalfNormal scale, no guide list -----------------------------------------
class Hierarchical(PyroModule):
    def __init__(self):
        super().__init__()
        self.tau = PyroSample(dist.HalfNormal(1.0))
        self.fc1 = PyroModule[torch.nn.Linear](5, 8)
        self.fc1.weight = PyroSample(lambda m: dist.Normal(0.0, self.tau).expand([8, 5]).to_event(2))
        self.fc2 = PyroModule[torch.nn.Linear](8, 3)
        self.fc2.weight = PyroSample(lambda m: dist.Normal(0.0, self.tau).expand([3, 8]).to_event(2))

    def forward(self, x, y=None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


@pytest.mark.parametrize("lrt", [False, True], ids=["weights", "lrt"])
@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
def test_a_hierarchical_bnn_trains_with_the_sparse_guide_alone(elbo, lrt):
    pyro.set_rng_seed(0)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    model = Hierarchical()
    guide = SparseSubspaceGuide(model, density=0.5)
    svi = SSVI(model, guide, pyro.optim.Adam({"lr": 0.02}), elbo(), total_steps=20, update_every=4,
               local_reparameterization=lrt)
    losses = [svi.step(x, y) for _ in range(20)]
    assert all(math.isfinite(v) for v in losses) and len(svi.history) >= 2
    assert guide.sparse_site_names() == ("fc1.weight", "fc2.weight") and guide.summary()["tau"]["dense"]
    assert all(set(h["scheduled"]) == {"fc1.weight", "fc2.weight"} for h in svi.history)  # tau is never updated
    assert guide.loc("tau").grad is not None or guide.loc("tau").requires_grad
    if lrt:
        assert svi.lrt.eligible.get("fc1.weight") and not svi.lrt.eligible.get("tau")


# --- checkpoints, the cost counters, the init rule --------------------------------------------------
def test_a_checkpoint_round_trip_with_sparse_and_dense_sites_is_exact():
    x, y = regression_data()
    model = Regression(D)
    guide = SparseSubspaceGuide(model, density=0.5)
    svi = SSVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO(), total_steps=10, update_every=3)
    for _ in range(5):
        svi.step(x, y)
    state = guide.state_dict()
    assert {"locs.sigma", "unconstrained_scales.sigma", "indices.linear.weight"} <= set(state)
    assert "indices.sigma" not in state and "births.sigma" not in state
    fresh = SparseSubspaceGuide(Regression(D), density=0.5)
    fresh.setup(x, y)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.median().values(), guide.median().values()))
    pyro.set_rng_seed(3)
    a = Trace_ELBO().loss(model, guide, x, y)
    pyro.set_rng_seed(3)
    assert Trace_ELBO().loss(model, fresh, x, y) == a
    bad = dict(state)
    bad["locs.sigma"] = torch.tensor(float("nan"))
    with pytest.raises(ValueError, match=r"site 'sigma': locs holds non-finite values"):
        fresh.load_state_dict(bad)


def test_the_cost_counters_count_dense_sites_as_dense():
    class MVNLayer(PyroModule):
        def __init__(self):
            super().__init__()
            self.fc1 = PyroModule[torch.nn.Linear](4, 6, bias=False)
            self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([6, 4]).to_event(2))
            self.fc2 = PyroModule[torch.nn.Linear](6, 2, bias=False)
            self.fc2.weight = PyroSample(dist.MultivariateNormal(torch.zeros(6), torch.eye(6)).expand([2]).to_event(1))

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    model, x = MVNLayer(), torch.randn(3, 4)
    guide = SparseSubspaceGuide(model, density=0.25)
    guide(x)
    assert guide.site_info("fc1.weight").k == 6 and guide.site_info("fc2.weight").k == 12
    assert guide.active_params == 18 and guide.dense_params == 36
    report = flops_report(model, guide, x)
    assert report["per_site"]["fc2.weight"]["density"] == 1.0 and report["per_site"]["fc1.weight"]["density"] == 0.25
    assert "fc2.weight" in guide.summary_table() and "not factorised" in guide.summary_table()


def test_the_init_rule_weights_start_as_the_recipe_and_other_sites_as_autonormal():
    def model():
        pyro.sample("w", dist.Normal(0.0, 1.0).expand([50]).to_event(1))
        pyro.sample("z", dist.Normal(3.0, 1.0))  # a scalar latent: not a weight
        pyro.sample("s", dist.LogNormal(0.0, 1.0))

    trace = pyro.poutine.trace(model).get_trace()
    assert [is_weight(trace.nodes[n]) for n in ("w", "z", "s")] == [True, False, False]
    assert why_dense(trace.nodes["z"]) is None  # z can be sparse; it only starts as AutoNormal starts it
    pyro.set_rng_seed(0)
    guide = SparseSubspaceGuide(model, density=1.0)
    guide()
    assert 0 < float(guide.loc("w").detach().abs().max()) < 0.05 and float(guide.scale("w").detach().max()) < 0.01  # N(0, 0.01^2), 6e-4
    assert float(guide.loc("z").detach()) == 0.0 and torch.allclose(guide.scale("z").detach(), torch.tensor(0.1))  # init_to_feasible, 0.1
    assert float(guide.loc("s").detach()) == 0.0 and torch.allclose(guide.scale("s").detach(), torch.tensor(0.1))
    guide = SparseSubspaceGuide(model, density=1.0, dense_init_scale=0.5, init_loc_fn=lambda site: site["fn"].mean.detach())
    guide()
    assert float(guide.loc("z").detach()) == 3.0 and torch.allclose(guide.scale("s").detach(), torch.tensor(0.5))
    with pytest.raises(ValueError, match="dense_init_scale: expected a positive float, got 0"):
        SparseSubspaceGuide(model, dense_init_scale=0)


def test_a_dense_site_has_no_active_set_to_update():
    guide = SparseSubspaceGuide(constrained_model, density=0.5)
    guide()
    with pytest.raises(ValueError, match=r"site 'rate' is dense \(support .* is not real\): it has no active set"):
        guide.replace_entries("rate", torch.tensor([0]), torch.tensor([0]), 0.0, -3.0)
    assert guide.sparse_index("rate") is None and guide.active_mask("probs").all()
