"""Plate-local latents in SparseSubspaceGuide (per-task weights inside a non-subsampled pyro.plate).

The site's coordinate set is its whole ``plate batch + event`` shape; the guide's distribution keeps
the plate's batch shape so that Pyro's ELBOs scale and sum one term per batch element. Every
exactness check compares with a value computed here by hand (loops over tasks, closed-form KL),
or with the same model written with the plate dim moved into the event shape.
"""

import math
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from pyro.infer.autoguide.initialization import init_to_value

from pyro_ssvi import SSVI, DataGradientMessenger, SparseNormal, SparseSubspaceGuide, SubspacePrior, subspace_prior
from pyro_ssvi.distributions import batch_sum, kl_divergence

T, H, D, N, G = 3, 2, 4, 5, 2
E = H * D  # coordinates of one task's weight
# a prior with a mean and scale per coordinate: expanded over the plate, its parameters are not viewable
PRIOR_LOC = torch.linspace(-0.5, 0.5, E).reshape(H, D)
PRIOR_SCALE = torch.linspace(0.5, 2.0, E).reshape(H, D)
DENSITIES = pytest.mark.parametrize("density", [1.0, 0.5])


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(T, N, D, generator=g), torch.randn(T, N, H, generator=g)


def nested_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(T, N, D, generator=g), torch.randn(G, T, N, generator=g)


def mean_of(w, b, x):
    return torch.einsum("...thd,tnd->...tnh", w, x) + b[..., None, :]


def task_model(x, y=None):
    """Per-task weights ``w`` (batch (T,), event (H, D)) and a shared bias ``b``."""
    tasks = pyro.plate("tasks", T)
    with tasks:
        w = pyro.sample("w", dist.Normal(PRIOR_LOC, PRIOR_SCALE).to_event(2))
    b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    with tasks:
        return pyro.sample("y", dist.Normal(mean_of(w, b, x), 1.0).to_event(2), obs=y)


def global_model(x, y=None):
    """``task_model`` with the plate dim moved into ``w``'s event shape."""
    w = pyro.sample("w", dist.Normal(PRIOR_LOC.expand(T, H, D), PRIOR_SCALE.expand(T, H, D)).to_event(3))
    b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    with pyro.plate("tasks", T):
        return pyro.sample("y", dist.Normal(mean_of(w, b, x), 1.0).to_event(2), obs=y)


def nested_model(x, y=None):
    """Weights local to two plates: batch (G, T), event (D,)."""
    groups, tasks = pyro.plate("groups", G, dim=-2), pyro.plate("tasks", T, dim=-1)
    with groups, tasks:
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
    with groups, tasks:
        return pyro.sample("y", dist.Normal(torch.einsum("...gtd,tnd->...gtn", w, x), 1.0).to_event(1), obs=y)


MODELS = pytest.mark.parametrize("model, make_data, batch", [(task_model, data, (T,)), (nested_model, nested_data, (G, T))],
                                 ids=["tasks", "groups x tasks"])


def empty_last_task_guide(model=task_model, density=0.5, **kwargs):
    """A guide whose active set of ``w`` lies in tasks 0 and 1: task 2 has no active coordinate."""
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(T, H, D, generator=g)
    w0[:2] += 3.0 * w0[:2].sign()
    w0[2] *= 0.01
    guide = SparseSubspaceGuide(model, density={"w": density}, init_subspace="magnitude",
                                init_loc_fn=init_to_value(values={"w": w0}), init_scale=0.3, **kwargs)
    guide(*data())
    return guide


def shapes(d):
    return {k: tuple(v.shape) for k, v in d.items()}


# --- shapes, as AutoNormal's --------------------------------------------------------------------
@DENSITIES
@MODELS
def test_samples_log_prob_median_quantiles_have_autonormal_shapes(density, model, make_data, batch):
    x, y = make_data()
    guide, auto = SparseSubspaceGuide(model, density=density), AutoNormal(model)
    sample, auto_sample = guide(x, y), auto(x, y)
    assert shapes(sample) == shapes(auto_sample)
    numel = math.prod(batch) * (D if model is nested_model else E)
    info = guide.site_info("w")
    assert tuple(info.shape) == tuple(auto_sample["w"].shape) and info.numel == numel
    assert info.k == round(density * numel)
    assert int((sample["w"] != 0).sum()) == info.k
    # log q: one value per batch element, as AutoNormal's Gaussian site
    trace, auto_trace = poutine.trace(guide).get_trace(x, y), poutine.trace(auto).get_trace(x, y)
    trace.compute_log_prob()
    auto_trace.compute_log_prob()
    assert trace.nodes["w"]["log_prob"].shape == auto_trace.nodes["w_unconstrained"]["log_prob"].shape == batch
    assert [f.name for f in trace.nodes["w"]["cond_indep_stack"]] == [f.name for f in auto_trace.nodes["w"]["cond_indep_stack"]]
    assert shapes(guide.median()) == shapes(auto.median())
    q, auto_q = guide.quantiles([0.1, 0.5, 0.9]), auto.quantiles([0.1, 0.5, 0.9])
    assert shapes(q) == shapes(auto_q)
    assert (q["w"][0] <= q["w"][1]).all() and (q["w"][1] <= q["w"][2]).all()
    torch.testing.assert_close(q["w"][1], guide.median()["w"])
    if density < 1:  # inactive coordinates are point masses at 0
        assert (q["w"][:, ~guide.active_mask("w")] == 0).all()
        assert (q["w"][0, guide.active_mask("w")] < q["w"][2, guide.active_mask("w")]).all()


@DENSITIES
@MODELS
@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_predictive_has_autonormal_shapes(density, model, make_data, batch, parallel):
    x, _ = make_data()
    guide, auto = SparseSubspaceGuide(model, density=density), AutoNormal(model)
    guide(x), auto(x)
    ours = Predictive(model, guide=guide, num_samples=6, parallel=parallel)(x)
    theirs = Predictive(model, guide=auto, num_samples=6, parallel=parallel)(x)
    assert shapes(ours) == shapes(theirs)
    k = guide.site_info("w").k
    assert ((ours["w"].reshape(6, -1) != 0).sum(-1) == k).all()
    assert ours["w"].reshape(6, -1).shape[1] == guide.site_info("w").numel


def test_vectorised_particles_expand_the_plate_local_site():
    x, y = data()
    guide = SparseSubspaceGuide(task_model, density=0.5)
    guide(x, y)
    q = guide.get_posterior("w").expand((4, T))
    assert q.batch_shape == (4, T) and q.event_shape == (H, D) and q.rsample().shape == (4, T, H, D)
    with pytest.raises(ValueError, match="must end with the site's plate batch shape"):
        guide.get_posterior("w").expand((4, 1))
    for elbo in (Trace_ELBO, TraceMeanField_ELBO):
        loss = elbo(num_particles=3, vectorize_particles=True, max_plate_nesting=1).differentiable_loss(
            subspace_prior(task_model, guide), guide, x, y)
        assert torch.isfinite(loss)


# --- per-element log densities, entropy and KL, by hand ------------------------------------------
def test_distribution_terms_are_sums_per_batch_element():
    torch.manual_seed(0)
    index = torch.tensor([0, 2, 7, 8, 11])  # tasks 0, 0, 2, 2, 3 of shape (4, 3): task 1 has none
    k, shape = index.numel(), torch.Size([4, 3])
    loc, scale = torch.randn(k), torch.rand(k) + 0.2
    q = SparseNormal(loc, scale, index, shape, event_dim=1)
    assert q.batch_shape == (4,) and q.event_shape == (3,)
    value = q.rsample()
    assert value.shape == shape and int((value != 0).sum()) == k
    task = index // 3
    lq = torch.distributions.Normal(loc, scale).log_prob(value.reshape(-1)[index])
    expected = torch.stack([lq[task == t].sum() for t in range(4)])
    torch.testing.assert_close(q.log_prob(value), expected)
    assert q.log_prob(value)[1] == 0
    ent = torch.distributions.Normal(loc, scale).entropy()
    torch.testing.assert_close(q.entropy(), torch.stack([ent[task == t].sum() for t in range(4)]))
    # the prior: a mean and a scale per event coordinate, expanded over the plate
    m, s = torch.randn(3), torch.rand(3) + 0.5
    prior = dist.Normal(m, s).to_event(1).expand([4])
    pm, ps = m[index % 3], s[index % 3]
    kl = torch.log(ps / scale) + (scale**2 + (loc - pm) ** 2) / (2 * ps**2) - 0.5
    expected_kl = torch.stack([kl[task == t].sum() for t in range(4)])
    restricted = SubspacePrior(prior, index.int(), shape)
    for p in (prior, restricted):
        torch.testing.assert_close(kl_divergence(q, p), expected_kl)
    lp = torch.distributions.Normal(pm, ps).log_prob(value.reshape(-1)[index])
    torch.testing.assert_close(restricted.log_prob(value), torch.stack([lp[task == t].sum() for t in range(4)]))
    # a non-restrictable family is evaluated densely, with the same per-element sums
    mix = dist.MixtureSameFamily(dist.Categorical(torch.ones(2)), dist.Normal(torch.zeros(2), torch.tensor([0.5, 2.0])))
    mixed = SubspacePrior(mix.expand([4, 3]).to_event(1), index, shape)
    lm = mix.log_prob(value.reshape(-1)[index])
    torch.testing.assert_close(mixed.log_prob(value), torch.stack([lm[task == t].sum() for t in range(4)]))
    # vectorised particles: lead dims left of the plate's
    qp, pp = q.expand((2, 4)), restricted.expand((2, 4))
    assert kl_divergence(qp, pp).shape == (2, 4) and qp.log_prob(qp.rsample()).shape == (2, 4)
    torch.testing.assert_close(kl_divergence(qp, pp)[1], expected_kl)


def test_batch_sum_of_a_dense_site_and_a_global_site():
    values = torch.arange(6.0)
    torch.testing.assert_close(batch_sum(values, None, torch.Size([3])), torch.tensor([1.0, 5.0, 9.0]))
    assert batch_sum(values, None, torch.Size()) == 15.0
    q = SparseNormal(torch.zeros(6), torch.ones(6), None, (2, 3), event_dim=1)
    torch.testing.assert_close(q.entropy(), torch.full((2,), 3 * (0.5 + 0.5 * math.log(2 * math.pi))))


def test_a_subspace_prior_must_match_the_site_shape():
    prior = dist.Normal(0.0, 1.0).expand([4]).to_event(1)  # no plate dim
    with pytest.raises(ValueError, match=r"site shape \(3, 4\).*batch \(\), event \(4,\)"):
        SubspacePrior(prior, torch.tensor([1]), (3, 4))


def hand_terms(guide, trace, x, y):
    """``(log p(y | w, b), log p_S(w) per task, log q(w) per task, log p(b), log q(b))`` for the sample in
    ``trace``, computed coordinate by coordinate."""
    w, b = trace.nodes["w"]["value"], trace.nodes["b"]["value"]
    index = guide.active_index("w").long()
    flat = w.reshape(-1)[index]
    task = index // E
    lq = torch.distributions.Normal(guide.loc("w"), guide.scale("w")).log_prob(flat)
    lp = torch.distributions.Normal(PRIOR_LOC.reshape(-1)[index % E], PRIOR_SCALE.reshape(-1)[index % E]).log_prob(flat)
    lq_w = torch.stack([lq[task == t].sum() for t in range(T)])
    lp_w = torch.stack([lp[task == t].sum() for t in range(T)])
    lq_b = torch.distributions.Normal(guide.loc("b"), guide.scale("b")).log_prob(b).sum()
    lp_b = torch.distributions.Normal(0.0, 1.0).log_prob(b).sum()
    lik = torch.distributions.Normal(mean_of(w, b, x), 1.0).log_prob(y).sum()
    return lik, lp_w, lq_w, lp_b, lq_b


def hand_kl(guide):
    index = guide.active_index("w").long()
    m, s = PRIOR_LOC.reshape(-1)[index % E], PRIOR_SCALE.reshape(-1)[index % E]
    mu, sigma = guide.loc("w"), guide.scale("w")
    kl = torch.log(s / sigma) + (sigma**2 + (mu - m) ** 2) / (2 * s**2) - 0.5
    task = index // E
    return torch.stack([kl[task == t].sum() for t in range(T)])


@torch.no_grad()
def test_trace_elbo_is_the_sum_of_per_task_terms():
    x, y = data()
    guide = empty_last_task_guide()
    assert not (guide.active_index("w").long() // E == 2).any()
    model = subspace_prior(task_model, guide)
    pyro.set_rng_seed(3)
    loss = Trace_ELBO().loss(model, guide, x, y)
    pyro.set_rng_seed(3)
    guide_trace = poutine.trace(guide).get_trace(x, y)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    lik, lp_w, lq_w, lp_b, lq_b = hand_terms(guide, guide_trace, x, y)
    torch.testing.assert_close(guide_trace.nodes["w"]["log_prob"], lq_w)
    torch.testing.assert_close(model_trace.nodes["w"]["log_prob"], lp_w)
    assert lq_w[2] == 0 and lp_w[2] == 0  # no active coordinate in task 2
    expected = -(lik + lp_w.sum() + lp_b - lq_w.sum() - lq_b)
    assert loss == pytest.approx(float(expected), rel=1e-5)
    pyro.set_rng_seed(3)  # TraceGraph_ELBO: the same reparameterised estimate
    assert TraceGraph_ELBO().loss(model, guide, x, y) == pytest.approx(float(expected), rel=1e-5)


@torch.no_grad()
def test_trace_mean_field_elbo_uses_the_analytic_kl_per_task():
    x, y = data()
    guide = empty_last_task_guide()
    kl_w = hand_kl(guide)
    assert kl_w[2] == 0
    q = guide.get_posterior("w")
    prior = dist.Normal(PRIOR_LOC, PRIOR_SCALE).to_event(2).expand([T])
    torch.testing.assert_close(kl_divergence(q, prior), kl_w)
    torch.testing.assert_close(kl_divergence(q, SubspacePrior(prior, guide.active_index("w"), (T, H, D))), kl_w)
    b_q = torch.distributions.Normal(guide.loc("b"), guide.scale("b"))
    kl_b = torch.distributions.kl_divergence(b_q, torch.distributions.Normal(0.0, 1.0)).sum()
    for model in (task_model, subspace_prior(task_model, guide)):
        pyro.set_rng_seed(4)
        loss = TraceMeanField_ELBO().loss(model, guide, x, y)
        pyro.set_rng_seed(4)
        lik = hand_terms(guide, poutine.trace(guide).get_trace(x, y), x, y)[0]
        # a Monte Carlo KL would differ from the closed form by O(sqrt(k)) nats, far above this tolerance
        assert loss == pytest.approx(float(-lik + kl_w.sum() + kl_b), rel=1e-5)


@DENSITIES
@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO, TraceGraph_ELBO])
def test_elbos_equal_the_same_model_with_the_plate_in_the_event(density, elbo):
    x, y = data()
    local = SparseSubspaceGuide(task_model, density=density, init_scale=0.2)
    local(x, y)
    pyro.clear_param_store()
    whole = SparseSubspaceGuide(global_model, density=density)
    whole(x, y)
    whole.load_state_dict(local.state_dict())
    losses = []
    for model, guide in ((task_model, local), (global_model, whole)):
        pyro.set_rng_seed(5)
        losses.append(elbo().loss(subspace_prior(model, guide) if density < 1 else model, guide, x, y))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


# --- training ------------------------------------------------------------------------------------
def test_data_gradient_covers_the_whole_site():
    x, y = data()
    guide = empty_last_task_guide()
    probe = DataGradientMessenger(["w"])
    pyro.set_rng_seed(6)
    Trace_ELBO().differentiable_loss(probe(subspace_prior(task_model, guide)), guide, x, y).backward()
    grad = probe.grads()["w"]
    pyro.set_rng_seed(6)
    trace = poutine.trace(guide).get_trace(x, y)
    w = trace.nodes["w"]["value"].detach().requires_grad_()
    nll = -torch.distributions.Normal(mean_of(w, trace.nodes["b"]["value"].detach(), x), 1.0).log_prob(y).sum()
    (expected,) = torch.autograd.grad(nll, w)
    assert grad.shape == (T * E,)
    torch.testing.assert_close(grad, expected.reshape(-1))
    assert (grad.reshape(T, E)[2] != 0).all()  # the empty task gets a gradient to be ranked by
    # vectorised particles: the per-particle gradients summed, one value per coordinate of the whole site
    pyro.set_rng_seed(6)
    Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1).differentiable_loss(
        probe(subspace_prior(task_model, guide)), guide, x, y).backward()
    assert probe.grads()["w"].shape == (T * E,)
    # without a restricted prior, the coordinate count given by name
    probe = DataGradientMessenger({"w": T * E})
    pyro.set_rng_seed(6)
    Trace_ELBO().differentiable_loss(probe(task_model), guide, x, y).backward()
    torch.testing.assert_close(probe.grads()["w"], expected.reshape(-1))


@pytest.mark.parametrize("elbo", [TraceMeanField_ELBO(), Trace_ELBO(num_particles=2, vectorize_particles=True)],
                         ids=["mean-field", "vectorised"])
def test_ssvi_updates_the_subspace_and_keeps_round_density_numel(elbo):
    x, y = data()
    guide = empty_last_task_guide(density=0.5)
    k = guide.site_info("w").k
    assert k == round(0.5 * T * E) == 12
    svi = SSVI(task_model, guide, pyro.optim.Adam({"lr": 0.05}), elbo, total_steps=40, update_every=5)
    seen = {tuple(guide.active_index("w").tolist())}
    losses = []
    for _ in range(40):
        losses.append(svi.step(x, y))
        index = guide.active_index("w")
        assert index.numel() == k and torch.unique(index).numel() == k
        assert 0 <= int(index.min()) and int(index.max()) < T * E
        seen.add(tuple(index.tolist()))
    assert [h["step"] for h in svi.history] == [5, 10, 15, 20, 25]
    assert sum(h["swapped"]["w"] for h in svi.history) > 0 and len(seen) > 1
    assert all(math.isfinite(v) for v in losses)
    assert guide.median()["w"].shape == (T, H, D)


def test_state_dict_round_trip():
    x, y = data()
    guide = SparseSubspaceGuide(task_model, density=0.5)
    svi = SSVI(task_model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO(), total_steps=20, update_every=5)
    for _ in range(12):
        svi.step(x, y)
    state = guide.state_dict()
    pyro.clear_param_store()
    pyro.set_rng_seed(9)  # another random initial subspace
    other = SparseSubspaceGuide(task_model, density=0.5)
    other(x, y)
    assert not torch.equal(other.active_index("w"), guide.active_index("w"))
    other.load_state_dict(state)
    assert torch.equal(other.active_index("w"), guide.active_index("w"))
    for name in ("w", "b"):
        assert torch.equal(other.median()[name], guide.median()[name])
    losses = []
    for g in (guide, other):
        pyro.set_rng_seed(10)
        losses.append(TraceMeanField_ELBO().loss(subspace_prior(task_model, g), g, x, y))
    assert losses[0] == losses[1]
    copy = pickle.loads(pickle.dumps(guide))
    assert torch.equal(copy.median()["w"], guide.median()["w"]) and copy(x, y)["w"].shape == (T, H, D)
    bad = dict(state)
    bad["indices.w"] = bad["indices.w"].clone()
    bad["indices.w"][0] = T * E  # out of the whole site's range
    with pytest.raises(ValueError, match=r"site 'w': active indices out of range \[0, 24\)"):
        other.load_state_dict(bad)


# --- what is refused -----------------------------------------------------------------------------
def subsampled_model(x, y=None):
    tasks = pyro.plate("tasks", T, subsample_size=2)
    with tasks as idx:
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([H, D]).to_event(2))
    b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    with tasks:
        return pyro.sample("y", dist.Normal(mean_of(w, b, x[idx]), 1.0).to_event(2), obs=None if y is None else y[idx])


def test_a_latent_in_a_subsampled_plate_is_dense_and_uses_the_minibatch_rows_as_autonormal_does():
    x, y = data()
    rows = torch.tensor([0, 2])
    guide = SparseSubspaceGuide(subsampled_model, density=0.5,
                                create_plates=lambda x, y=None: pyro.plate("tasks", T, subsample=rows))
    guide.setup(x, y)
    assert guide.summary()["w"]["dense"] == "local to the subsampled pyro.plate('tasks')"
    assert guide.summary()["b"]["dense"] is None and guide.site_info("b").k == 1  # the global weight stays sparse
    assert guide.loc("w").shape == (T, H, D)  # the whole plate, as AutoNormal's locs
    trace = pyro.poutine.trace(guide).get_trace(x, y)
    assert torch.equal(trace.nodes["w_unconstrained"]["fn"].base_dist.loc, guide.loc("w")[rows])
    assert trace.nodes["w"]["value"].shape == (2, H, D)
    loss = Trace_ELBO().differentiable_loss(subsampled_model, guide, x, y)
    loss.backward()
    grad = guide.loc("w").grad
    assert grad[rows].abs().sum() > 0 and torch.equal(grad[1], torch.zeros(H, D))  # row 1 is not in the minibatch


def test_a_guide_list_with_autonormal_for_the_subsampled_latent_trains():
    x, y = data()
    guide = AutoGuideList(subsampled_model)
    guide.append(AutoNormal(poutine.block(subsampled_model, expose=["w"])))
    guide.append(SparseSubspaceGuide(poutine.block(subsampled_model, hide=["w"]), density=0.5))
    svi = SSVI(subsampled_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO(), total_steps=10, update_every=2,
               addition="random")
    losses = [svi.step(x, y) for _ in range(10)]
    assert all(math.isfinite(v) for v in losses)
    assert guide[0].locs.w.shape == (T, H, D)  # AutoNormal holds the whole plate, indexed by the subsample
    assert guide[1].site_info("b").k == 1 and len(svi.history) > 0


def test_a_subsampled_plate_from_create_plates_is_refused_at_the_call():
    x, y = data()
    guide = SparseSubspaceGuide(task_model, density=0.5,
                                create_plates=lambda x, y=None: pyro.plate("tasks", T, subsample_size=2))
    with pytest.raises(ValueError, match=r"site 'w'.*pyro\.plate\('tasks'\), which this call subsamples \(subsample_size 2 "
                                         r"of 3\) but the guide's set-up call did not.*guide\.setup"):
        guide(x, y)


def test_a_batch_dim_that_is_no_plate_dim_gets_the_event_dim_advice():
    def model():
        with pyro.plate("tasks", 3, dim=-2):
            pyro.sample("w", dist.Normal(0.0, 1.0).expand([4]))  # batch (3, 4): dim -1 is not a plate's

    with pytest.raises(ValueError, match=r"site 'w'.*batch shape \(3, 4\).*pyro\.plate\('tasks'\) at dim -2.*dim -1 "
                                         r"\(size 4\) is no plate's dim.*to_event"):
        SparseSubspaceGuide(model, density=0.5)()


def test_a_size_one_plate_batch_dim_broadcasts():
    def model():
        with pyro.plate("tasks", T, dim=-2):
            return pyro.sample("w", dist.Normal(0.0, 1.0).expand([H, D]).to_event(2))  # batch (T, 1)

    guide, auto = SparseSubspaceGuide(model, density=0.5), AutoNormal(model)
    assert shapes(guide()) == shapes(auto()) == {"w": (T, 1, H, D)}
    assert guide.site_info("w").k == round(0.5 * T * E)
    trace = poutine.trace(guide).get_trace()
    trace.compute_log_prob()
    assert trace.nodes["w"]["log_prob"].shape == (T, 1)
    assert math.isfinite(TraceMeanField_ELBO().loss(subspace_prior(model, guide), guide))
