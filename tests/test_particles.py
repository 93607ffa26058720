"""Vectorised particles and parallel Predictive: batched layers, exact equality with sequential passes."""

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from pyro.nn import PyroModule, PyroSample

from pyro_ssvi import SSVI, BatchedLayersMessenger, SparseSubspaceGuide, batched_layers, bayesianize, cifar_resnet18
from pyro_ssvi.batched import batched_conv, batched_linear
from pyro_ssvi.models import BayesianClassifier

P = 4


# --- the batched functions -------------------------------------------------------------
def test_batched_linear_applies_each_particle_to_its_slice():
    x, w, b = torch.randn(5, 3), torch.randn(P, 1, 2, 3), torch.randn(P, 1, 2)
    y = batched_linear(x, w, b)
    assert y.shape == (P, 5, 2)
    for p in range(P):
        torch.testing.assert_close(y[p], F.linear(x, w[p, 0], b[p, 0]))
    x2 = torch.randn(P, 5, 3)  # a later layer: the input already has the particle dim
    y2 = batched_linear(x2, w)
    for p in range(P):
        torch.testing.assert_close(y2[p], F.linear(x2[p], w[p, 0]))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("batched_input", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_batched_conv_applies_each_particle_to_its_slice(dim, batched_input, groups):
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dim]
    x = torch.randn(*((P,) if batched_input else ()), 3, 4, *([6] * dim))
    w = torch.randn(P, 1, 6, 4 // groups, *([3] * dim))
    b = torch.randn(P, 1, 6)
    y = batched_conv(conv, x, w, b, stride=2, padding=1, groups=groups)
    for p in range(P):
        xp = x[p] if batched_input else x
        torch.testing.assert_close(y[p], conv(xp, w[p, 0], b[p, 0], stride=2, padding=1, groups=groups))


def test_batched_input_with_a_shared_weight_and_pooling_fold_into_the_batch():
    x, w = torch.randn(P, 3, 2, 6, 6), torch.randn(5, 2, 3, 3)
    with BatchedLayersMessenger():
        y = torch.nn.functional.conv2d(x, w, padding=1)
        pooled = torch.nn.AvgPool2d(2)(y)
        maxed = torch.nn.MaxPool2d(2)(y)
        adaptive = torch.nn.AdaptiveAvgPool2d(1)(y)
    for p in range(P):
        ref = F.conv2d(x[p], w, padding=1)
        torch.testing.assert_close(y[p], ref)
        torch.testing.assert_close(pooled[p], F.avg_pool2d(ref, 2))
        torch.testing.assert_close(maxed[p], F.max_pool2d(ref, 2))
        torch.testing.assert_close(adaptive[p], F.adaptive_avg_pool2d(ref, 1))


def test_normalisation_after_a_batched_weight_names_the_module():
    model = cifar_resnet18(num_classes=10, width=4)
    guide = SparseSubspaceGuide(model, density=0.2, dense_sites=model.dense_sites)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    svi = SSVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO(num_particles=2, vectorize_particles=True), total_steps=4)
    with pytest.raises(ValueError, match=r"module 'net\.bn1' \((Pyro)?BatchNorm2d\).*sequential particles"):
        svi.step(x, y)


# --- exact equality with sequential particles given the same noise --------------------------
class NoiseTape:
    """Route the noise of guide samples and LRT through a tape.

    A vectorised pass records every draw, shape ``(P, ...)``; sequential pass ``p`` replays
    ``draw[p]`` in the same call order, so both see the same noise.
    """

    def __init__(self, monkeypatch):
        self.draws, self.mode, self.i = [], "record", 0
        real = torch.randn
        tape = self

        def randn(*shape, **kw):
            shape = torch.Size(shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)
            if tape.mode == "record":
                out = real(shape, **kw)
                tape.draws.append(out)
                return out
            out = tape.draws[tape.i].reshape(P, -1)[tape.mode].reshape(shape)
            tape.i += 1
            return out.to(**{k: v for k, v in kw.items() if k in ("dtype", "device")})

        monkeypatch.setattr(torch, "randn", randn)
        # AutoNormal draws through torch.distributions' _standard_normal
        monkeypatch.setattr(torch.distributions.normal, "_standard_normal", lambda shape, dtype, device: randn(shape, dtype=dtype, device=device))

    def replay(self, p):
        self.mode, self.i = p, 0


class MLP(PyroModule):
    def __init__(self):
        super().__init__()
        self.fc1 = PyroModule[torch.nn.Linear](6, 8)
        self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([8, 6]).to_event(2))
        self.fc1.bias = PyroSample(dist.Normal(0.0, 1.0).expand([8]).to_event(1))
        self.fc2 = PyroModule[torch.nn.Linear](8, 3)
        self.fc2.weight = PyroSample(dist.Laplace(0.0, 1.0).expand([3, 8]).to_event(2))

    def forward(self, x, y=None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def cnn():
    net = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 6, 6)), torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2), torch.nn.Flatten(-3),
        torch.nn.Linear(36, 3),
    )
    return BayesianClassifier(bayesianize(net, dist.Normal(0.0, 1.0)))


def conv_nd(d):
    """A bayesianized conv{d}d net: 16 / 4x4 / ... inputs of one channel, conv 1-3, flatten, linear."""
    side = {1: 16, 3: 4}[d]
    conv = {1: torch.nn.Conv1d, 3: torch.nn.Conv3d}[d]
    net = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1,) + (side,) * d), conv(1, 3, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(-(d + 1)), torch.nn.Linear(3 * side**d, 3),
    )
    return BayesianClassifier(bayesianize(net, dist.Normal(0.0, 1.0)))


def build(arch, guide_kind):
    model = {"mlp": MLP, "cnn": cnn, "conv1d": lambda: conv_nd(1), "conv3d": lambda: conv_nd(3)}[arch]()
    if guide_kind == "sparse":  # sparse sites and (where the net has one) a dense site in one guide
        dense = {"mlp": {"fc1.bias": 1.0}, "cnn": {"net.1.weight": 1.0}}.get(arch, {})
        return model, SparseSubspaceGuide(model, density={n: 0.4 for n in sites(arch)} | dense)
    guide = AutoGuideList(model)  # sparse sites and an AutoNormal site under our handlers
    guide.append(AutoNormal(pyro.poutine.block(model, hide=list(sites(arch)))))
    guide.append(SparseSubspaceGuide(pyro.poutine.block(model, expose=list(sites(arch))), density=0.4))
    return model, guide


def sites(arch):
    return {"mlp": ("fc1.weight", "fc2.weight"), "cnn": ("net.3.weight", "net.7.weight")}.get(arch, ("net.1.weight", "net.4.weight"))


INPUTS = {"mlp": 6, "cnn": 36, "conv1d": 16, "conv3d": 64}


@pytest.fixture
def float64():
    """float64 for exact comparisons: LRT's sqrt(var) has a large derivative at the small initial
    scales, which magnifies float32 summation-order differences between batched and per-particle kernels."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


EQUALITY_CASES = [
    (arch, guide_kind, elbo, lrt)
    for arch in ("mlp", "cnn") for guide_kind in ("sparse", "list") for elbo in (Trace_ELBO, TraceMeanField_ELBO) for lrt in (False, True)
] + [(arch, "sparse", Trace_ELBO, lrt) for arch in ("conv1d", "conv3d") for lrt in (False, True)]


@pytest.mark.parametrize("arch,guide_kind,elbo,lrt", EQUALITY_CASES)
def test_vectorised_loss_and_gradients_equal_the_mean_of_sequential_passes(monkeypatch, float64, arch, guide_kind, elbo, lrt):
    x = torch.randn(10, INPUTS[arch])
    y = torch.randint(0, 3, (10,))
    model, guide = build(arch, guide_kind)
    kw = dict(total_steps=10, local_reparameterization=lrt)
    vec = SSVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo(num_particles=P, vectorize_particles=True), **kw)
    seq = SSVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo(), **kw)
    vec.differentiable_loss(x, y), seq.differentiable_loss(x, y)  # LRT's first pass only looks
    params = [p for p in guide.parameters()]
    tape = NoiseTape(monkeypatch)
    loss_v = vec.differentiable_loss(x, y)
    grads_v = torch.autograd.grad(loss_v, params, allow_unused=True)
    loss_s, grads_s = 0.0, [0.0] * len(params)
    for p in range(P):
        tape.replay(p)
        loss_p = seq.differentiable_loss(x, y)
        assert tape.i == len(tape.draws), "a sequential pass drew noise in another order"
        loss_s = loss_s + loss_p.detach() / P
        for i, g in enumerate(torch.autograd.grad(loss_p, params, allow_unused=True)):
            grads_s[i] = grads_s[i] + (0.0 if g is None else g / P)
    if lrt:
        assert vec.lrt.eligible and all(vec.lrt.eligible.values())
    torch.testing.assert_close(loss_v.detach(), loss_s, rtol=1e-10, atol=1e-10)
    for gv, gs in zip(grads_v, grads_s):
        torch.testing.assert_close(gv if gv is not None else torch.zeros_like(gs), gs, rtol=1e-9, atol=1e-10)


def test_vectorised_training_swaps_and_records_the_data_gradient():
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    model = MLP()
    guide = SparseSubspaceGuide(model, density=0.3)
    svi = SSVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO(num_particles=P, vectorize_particles=True),
               total_steps=20, update_every=5)
    for _ in range(12):
        svi.step(x, y)
    assert len(svi.history) == 2 and svi.replaced_fraction() > 0.5
    assert all(guide.active_mask(n).sum() == guide.site_info(n).k for n in guide.sparse_site_names())


# --- parallel Predictive -------------------------------------------------------------------
def test_parallel_predictive_matches_sequential():
    torch.manual_seed(0)
    model = MLP()
    guide = SparseSubspaceGuide(model, density=0.25, init_scale=0.5, init_loc_fn=lambda site: torch.randn(site["fn"].event_shape))
    x = torch.randn(7, 6)
    guide(x, torch.zeros(7, dtype=torch.long))  # set up as training would
    S = 400
    par = Predictive(batched_layers(model), guide=guide, num_samples=S, parallel=True, return_sites=("fc1.weight", "_RETURN"))(x)
    seq = Predictive(model, guide=guide, num_samples=S, return_sites=("fc1.weight", "_RETURN"))(x)
    k = guide.site_info("fc1.weight").k
    w = par["fc1.weight"].reshape(S, -1)
    assert w.shape[1] == 48 and ((w != 0).sum(1) == k).all()  # exactly k non-zeros per draw
    assert ((w != 0) == guide.active_mask("fc1.weight").reshape(1, -1)).all()
    out_p, out_s = par["_RETURN"].reshape(S, 7, 3), seq["_RETURN"]
    assert out_s.shape == out_p.shape
    # means of two independent sets of S draws: difference within 5 standard errors
    se = torch.sqrt(out_p.var(0) / S + out_s.var(0) / S)
    assert ((out_p.mean(0) - out_s.mean(0)).abs() < 5 * se).all()
    # same spread: log variance ratio within 5 standard errors; se(log s^2) ~ sqrt((kurtosis - 1) / S)
    # by the delta method (the outputs are not Gaussian, so the kurtosis is estimated, not taken as 3)
    def log_var_se(out):
        c = out - out.mean(0)
        return torch.sqrt(((c**4).mean(0) / (c**2).mean(0) ** 2 - 1) / S)

    log_ratio = (out_p.var(0) / out_s.var(0)).log()
    assert (log_ratio.abs() < 5 * torch.sqrt(log_var_se(out_p) ** 2 + log_var_se(out_s) ** 2)).all()
