"""What Pyro expects of every autoguide, for SparseSubspaceGuide at density 1 and below 1.

Written here after the contract of Pyro's own autoguide tests (median / quantiles, Predictive,
serialisation, JIT tracing of ``call()``, ``init_loc_fn`` variants, ``create_plates`` and
subsampling) and the refusals this guide documents (discrete, constrained sites, latents of subsampled plates).
"""

import copy
import io
import pickle
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive, Trace_ELBO
from pyro.infer.autoguide.initialization import init_to_feasible, init_to_mean, init_to_median, init_to_value

from conftest import BNN
from pyro_ssvi import SparseSubspaceGuide, batched_layers

DENSITIES = pytest.mark.parametrize("density", [1.0, 0.5])


def data(n=5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def built(density, **kwargs):
    model = BNN(d_in=6, hidden=4, d_out=3)
    guide = SparseSubspaceGuide(model, density=density, **kwargs)
    guide(*data())
    return model, guide


def same_medians(a, b):
    ma, mb = a.median(), b.median()
    return ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


@DENSITIES
def test_median_and_quantiles_have_the_sites_shapes_in_order(density):
    _, guide = built(density)
    median = guide.median()
    assert list(median) == ["fc1.weight", "fc2.weight"]
    assert median["fc1.weight"].shape == (4, 6) and median["fc2.weight"].shape == (3, 4)
    q = guide.quantiles([0.1, 0.5, 0.9])
    for name, value in q.items():
        assert value.shape == (3,) + median[name].shape
        assert (value[0] <= value[1]).all() and (value[1] <= value[2]).all()
        torch.testing.assert_close(value[1], median[name])
    if density < 1:  # inactive coordinates are point masses at zero: every quantile is 0 there
        inactive = ~guide.active_mask("fc1.weight")
        assert (q["fc1.weight"][:, inactive] == 0).all()


@DENSITIES
@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_predictive_draws_every_site(density, parallel):
    model, guide = built(density)
    x, _ = data(7)
    sites = ("fc1.weight", "obs", "_RETURN")
    pyro.set_rng_seed(1)
    samples = Predictive(model, guide=guide, num_samples=11, parallel=parallel, return_sites=sites)(x)
    if parallel:  # the plain model gives the draws of the model wrapped in batched layers
        pyro.set_rng_seed(1)
        wrapped = Predictive(batched_layers(model), guide=guide, num_samples=11, parallel=True, return_sites=sites)(x)
        assert all(torch.equal(samples[k], wrapped[k]) for k in sites)
    assert samples["obs"].shape == (11, 7) and samples["_RETURN"].shape == (11, 7, 3)
    assert samples["fc1.weight"].reshape(11, 4, 6).shape == (11, 4, 6)
    k = guide.site_info("fc1.weight").k
    assert ((samples["fc1.weight"].reshape(11, -1) != 0).sum(-1) == k).all()


@DENSITIES
@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy", "state_dict"])
def test_serialisation_round_trips(density, how):
    model, guide = built(density)
    with torch.no_grad():
        guide.loc("fc1.weight").add_(0.5)
    if how == "pickle":
        other = pickle.loads(pickle.dumps(guide))
    elif how == "torch.save":
        buf = io.BytesIO()
        torch.save(guide, buf)
        buf.seek(0)
        other = torch.load(buf, weights_only=False)
    elif how == "deepcopy":
        other = copy.deepcopy(guide)
    else:
        pyro.clear_param_store()
        _, other = built(density)
        other.load_state_dict(guide.state_dict())
    assert same_medians(guide, other)
    assert other(*data())["fc1.weight"].shape == (4, 6)


@DENSITIES
def test_call_traces_under_torch_jit(density):
    _, guide = built(density)
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's generic warnings
        traced = torch.jit.trace_module(guide, {"call": (x, y)}, check_trace=False)
    w1, w2 = traced.call(x, y)
    assert w1.shape == (4, 6) and w2.shape == (3, 4)
    assert int((w1 != 0).sum()) == guide.site_info("fc1.weight").k
    assert not guide.kernel_report() or all(r.get("forced") for rows in guide.kernel_report().values() for r in rows)


def jit_gradients(elbo, density, seeds):
    """Loss and the guide's gradients (one vector) of ``elbo`` at each seed, on the suite's small BNN (built from
    one seed, so that both ELBOs see the same guide)."""
    pyro.set_rng_seed(0)
    model = BNN(d_in=6, hidden=4, d_out=3)
    guide = SparseSubspaceGuide(model, density=density, init_scale=0.2)
    guide(*data())
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's generic warnings
        for seed in seeds:
            pyro.set_rng_seed(seed)
            loss = elbo.loss_and_grads(model, guide, *data())
            out.append((loss, torch.cat([p.grad.reshape(-1).clone() for _, p in sorted(guide.named_parameters())])))
            for p in guide.parameters():
                p.grad = None
    return out


@DENSITIES
def test_jit_trace_elbo_gives_the_loss_and_gradients_of_trace_elbo_under_the_same_noise(density):
    pyro.clear_param_store()
    eager = jit_gradients(Trace_ELBO(), density, range(4))
    pyro.clear_param_store()
    jit = jit_gradients(pyro.infer.JitTrace_ELBO(), density, range(4))
    for (la, ga), (lb, gb) in list(zip(eager, jit))[1:]:  # the first JIT call traces: its draws come in another order
        assert lb == pytest.approx(la, rel=1e-5) and torch.allclose(ga, gb, rtol=1e-4, atol=1e-5)


def test_jit_trace_mean_field_elbo_gradients_agree_with_the_eager_ones_in_expectation():
    """JitTraceMeanField_ELBO draws its noise in another order than the eager ELBO (AutoNormal's too), so its
    gradients are compared as means over 200 seeds: every coordinate within 4.5 standard errors of the difference
    (the largest of 36 |z| values of two unbiased estimators stays below 4.5 with probability > 0.9997), plus
    float32 rounding (1e-5) for coordinates whose gradient does not depend on the noise (a dead unit's scale)."""
    pyro.clear_param_store()
    eager = torch.stack([g for _, g in jit_gradients(pyro.infer.TraceMeanField_ELBO(), 0.5, range(200))])
    pyro.clear_param_store()
    jit = torch.stack([g for _, g in jit_gradients(pyro.infer.JitTraceMeanField_ELBO(), 0.5, range(200))[1:]])
    se = (eager.var(0) / len(eager) + jit.var(0) / len(jit)).sqrt()
    assert ((eager.mean(0) - jit.mean(0)).abs() <= 4.5 * se + 1e-5).all()


@DENSITIES
@pytest.mark.parametrize("init", [init_to_median, init_to_mean, init_to_feasible, "value"])
def test_init_loc_fn_variants(density, init):
    values = {"fc1.weight": torch.full((4, 6), 0.25), "fc2.weight": torch.full((3, 4), -0.5)}
    fn = init_to_value(values=values) if init == "value" else init
    _, guide = built(density, init_loc_fn=fn)
    if init == "value":
        for name, value in values.items():
            assert torch.equal(guide.loc(name), value.reshape(-1)[guide.active_index(name).long()])
    elif init is init_to_mean:  # a Normal(0, 1) prior's mean
        assert all((guide.loc(n) == 0).all() for n in guide.site_names)
    else:  # init_to_median: the median of a few prior draws; init_to_feasible: zeros in unconstrained space
        assert all(guide.loc(n).abs().max() < 2 for n in guide.site_names)


def test_create_plates_lets_the_guide_draw_the_subsample():
    full, batch = 20, 5
    x_all = torch.randn(full, 3)

    def model(subsample=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("data", full, subsample_size=batch, subsample=subsample) as idx:
            pyro.sample("obs", dist.Normal(x_all[idx] @ w, 1.0), obs=torch.zeros(len(idx)))

    chosen = torch.tensor([1, 4, 7, 11, 19])
    guide = SparseSubspaceGuide(model, density=2 / 3, create_plates=lambda subsample=None: pyro.plate("data", full, subsample=chosen))
    guide_trace = pyro.poutine.trace(guide).get_trace()
    model_trace = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace()
    assert torch.equal(model_trace.nodes["data"]["value"], chosen)
    loss = Trace_ELBO().differentiable_loss(model, guide)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("kernels", ["auto", True])
def test_a_plate_local_latent_is_fitted_over_its_whole_shape(kernels):
    def model():
        with pyro.plate("tasks", 3):
            return pyro.sample("w", dist.Normal(0.0, 1.0).expand([3, 4]).to_event(1))

    guide = SparseSubspaceGuide(model, density=0.5, sparse_kernels=kernels)
    sample = guide()["w"]
    info = guide.site_info("w")
    assert (tuple(info.shape), info.numel, info.k) == ((3, 4), 12, 6)
    # a 2-d plate-local site is 3 rows of a batch, not a matrix: it runs dense, a plain tensor
    assert type(sample) is torch.Tensor and sample.shape == (3, 4) and int((sample != 0).sum()) == 6
    assert guide.kernel_pattern("w") is None
    fn = pyro.poutine.trace(guide).get_trace().nodes["w"]["fn"]
    assert fn.batch_shape == (3,) and fn.event_shape == (4,)
    assert guide.median()["w"].shape == (3, 4) and guide.quantiles([0.5])["w"].shape == (1, 3, 4)


def test_a_latent_in_a_subsampled_plate_is_kept_dense_naming_the_plate():
    def model():
        with pyro.plate("tasks", 3, subsample_size=2):
            pyro.sample("w", dist.Normal(0.0, 1.0).expand([4]).to_event(1))

    guide = SparseSubspaceGuide(model, density=0.5)
    assert guide()["w"].shape == (2, 4)
    assert guide.summary()["w"] == {"active": 12, "numel": 12, "density": 1.0, "shape": (3, 4),
                                    "dense": "local to the subsampled pyro.plate('tasks')"}


def test_a_batch_shape_outside_plates_gets_the_event_dim_advice():
    def model():
        pyro.sample("w", dist.Normal(0.0, 1.0).expand([4]))

    with pytest.raises(ValueError, match=r"site 'w'.*outside any plate.*to_event\(1\)"):
        SparseSubspaceGuide(model, density=0.5)()


@pytest.mark.parametrize(
    "prior, message",
    [
        (dist.Bernoulli(0.5), r"^Continuous inference cannot handle discrete sample site 'z'\. .*enumerate.*TraceEnum_ELBO.*AutoGuideList"),
        (dist.ProjectedNormal(torch.ones(3)), r"^site 'z': support .* has no bijection from the reals.*ProjectedNormalReparam"),
    ],
    ids=["discrete", "sphere"],
)
def test_supports_without_a_bijection_are_refused_with_advice_that_works(prior, message):
    def model():
        pyro.sample("z", prior)

    with pytest.raises(ValueError, match=message):
        SparseSubspaceGuide(model, density=1.0, init_loc_fn=init_to_mean)()


def test_the_sphere_advice_works():
    from pyro.infer.reparam import ProjectedNormalReparam

    def model():
        pyro.sample("z", dist.ProjectedNormal(torch.tensor([1.0, 0.0, 0.0])))

    reparam = pyro.poutine.reparam(model, config={"z": ProjectedNormalReparam()})
    guide = SparseSubspaceGuide(reparam, density=1.0)
    assert torch.isfinite(Trace_ELBO().differentiable_loss(reparam, guide))


def test_plain_parallel_predictive_on_a_convolutional_network():
    import torch.nn.functional as F
    from pyro.nn import PyroModule, PyroSample

    class CNN(PyroModule):
        def __init__(self):
            super().__init__()
            self.conv = PyroModule[torch.nn.Conv2d](1, 3, 3, padding=1)
            self.conv.weight = PyroSample(dist.Normal(0.0, 1.0).expand([3, 1, 3, 3]).to_event(4))
            self.fc = PyroModule[torch.nn.Linear](3 * 4 * 4, 2)
            self.fc.weight = PyroSample(dist.Normal(0.0, 1.0).expand([2, 48]).to_event(2))

        def forward(self, x, y=None):
            logits = self.fc(F.relu(self.conv(x)).flatten(-3))
            with pyro.plate("data", x.shape[0]):
                return pyro.sample("obs", dist.Categorical(logits=logits), obs=y)

    model = CNN()
    guide = SparseSubspaceGuide(model, density=0.5)
    x = torch.randn(5, 1, 4, 4)
    guide(x, torch.zeros(5, dtype=torch.long))
    pyro.set_rng_seed(2)
    plain = Predictive(model, guide=guide, num_samples=6, parallel=True)(x)["obs"]
    pyro.set_rng_seed(2)
    wrapped = Predictive(batched_layers(model), guide=guide, num_samples=6, parallel=True)(x)["obs"]
    assert plain.shape == (6, 5) and torch.equal(plain, wrapped)
