"""The fused local-reparameterisation output (``pyro_ssvi.lrt.pre_activation``): its distribution,
its gradients against the unfused formula given the same noise, and what it keeps for backward."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroSample

from pyro_ssvi import LocalReparameterizationMessenger, SparseSubspaceGuide
from pyro_ssvi import lrt as lrt_module
from pyro_ssvi.lrt import _Squares, pre_activation

EPS = 1e-8


def unfused(mean, var, noise, eps=EPS):
    return mean + (var + eps).sqrt() * noise


def recorded_noise(monkeypatch):
    """Patch the noise draw to keep a copy of every draw (the fused path overwrites its buffer)."""
    draws, real = [], lrt_module.draw_noise

    def draw(*args, **kwargs):
        out = real(*args, **kwargs)
        draws.append(out.clone())
        return out

    monkeypatch.setattr(lrt_module, "draw_noise", draw)
    return draws


# --- (a) distribution ---------------------------------------------------------------
CHANNELS_LAST = (0, 2, 3, 1)


@pytest.mark.parametrize("shape, mean_shape, order", [
    ((4, 3), (4, 3), None), ((4, 3), (4, 3), (1, 0)), ((5, 4, 3), (1, 4, 3), None), ((2, 3, 4, 4), (2, 3, 4, 4), None),
    ((2, 3, 4, 4), (2, 3, 4, 4), CHANNELS_LAST),
], ids=["in-place", "transposed", "broadcast", "conv-shaped", "channels-last"])
def test_samples_have_the_analytic_mean_and_variance(shape, mean_shape, order):
    torch.manual_seed(0)
    n = 4000
    mean, var = torch.randn(mean_shape), torch.rand(mean_shape) + 0.1
    ys = torch.stack([pre_activation(mean.clone(), var.clone(), shape, EPS, order) for _ in range(n)])
    target_var = (var + EPS).expand(shape)
    # mean: SE sqrt(var / n); sample variance of n Gaussians: SE sqrt(2 / (n - 1)) var; 5 SE
    assert ((ys.mean(0) - mean).abs() < 5 * (target_var / n).sqrt()).all()
    assert ((ys.var(0) - target_var).abs() < 5 * math.sqrt(2 / (n - 1)) * target_var).all()


class Layers(PyroModule):
    """A linear layer (the transposed in-place path) or a 2-d convolution (eps inside the convolution)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.layer = PyroModule[torch.nn.Linear](6, 5)
            shape = [5, 6]
        else:
            self.layer = PyroModule[torch.nn.Conv2d](2, 3, 3, padding=1, bias=False)
            shape = [3, 2, 3, 3]
        self.layer.weight = PyroSample(dist.Normal(0.0, 1.0).expand(shape).to_event(len(shape)))

    def forward(self, x):
        return self.layer(x)


def analytic(model, guide, x):
    """``f(x, mu) (+ b)`` and ``f(x^2, sigma^2) + eps`` from the guide's moments."""
    name = "layer.weight"
    post = guide.get_posterior(name)
    mu, s2 = post.scatter(post.loc), post.scatter(post.scale**2)
    if model.kind == "linear":
        return F.linear(x, mu, model.layer.bias), F.linear(x * x, s2) + EPS
    return F.conv2d(x, mu, padding=1), F.conv2d(x * x, s2, padding=1) + EPS


def lrt_pass(model, guide, x, handler):
    with handler:
        tr = pyro.poutine.trace(guide).get_trace(x)
        return pyro.poutine.replay(model, tr)(x)


@pytest.mark.parametrize("kind, shape", [("linear", (4, 6)), ("conv", (2, 2, 4, 4))])
def test_layer_outputs_have_the_analytic_moments(kind, shape):
    model = Layers(kind)
    x = torch.randn(shape)
    guide = SparseSubspaceGuide(model, density=0.5, init_scale=0.5, init_loc_fn=lambda site: torch.randn(site["fn"].event_shape))
    guide(x)
    handler = LocalReparameterizationMessenger()
    n = 3000
    with torch.no_grad():
        lrt_pass(model, guide, x, handler)  # the first pass only looks
        ys = torch.stack([lrt_pass(model, guide, x, handler) for _ in range(n)])
        mean, var = analytic(model, guide, x)
    assert handler.eligible == {"layer.weight": True}
    assert ((ys.mean(0) - mean).abs() < 5 * (var / n).sqrt() + 1e-6).all()
    assert ((ys.var(0) - var).abs() < 5 * math.sqrt(2 / (n - 1)) * var + 1e-6).all()


# --- (b) gradients against the unfused formula, same noise ------------------------------
def in_layout(t, order):
    """``t`` copied into the storage order ``order`` (how the handler hands its products over)."""
    if order is None:
        return t * 1.0
    inverse = [order.index(i) for i in range(len(order))]
    return (t * 1.0).permute(order).contiguous().permute(inverse)


@pytest.mark.parametrize("shape, mean_shape, var_shape, order", [
    ((4, 3), (4, 3), (4, 3), None), ((4, 3), (4, 3), (4, 3), (1, 0)), ((5, 4, 3), (1, 4, 3), (1, 4, 3), None),
    ((5, 4, 3), (5, 4, 3), (1, 4, 3), (0, 2, 1)), ((2, 3, 4, 4), (2, 3, 4, 4), (2, 3, 4, 4), None),
    ((2, 3, 4, 4), (2, 3, 4, 4), (2, 3, 4, 4), CHANNELS_LAST),
], ids=["in-place", "transposed", "broadcast", "broadcast-var", "conv-shaped", "channels-last-in-place"])
def test_gradients_match_the_unfused_formula(shape, mean_shape, var_shape, order):
    torch.manual_seed(1)
    mean0 = torch.randn(mean_shape, dtype=torch.float64, requires_grad=True)
    var0 = (torch.rand(var_shape, dtype=torch.float64) + 0.01).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64)
    torch.manual_seed(2)
    y = pre_activation(in_layout(mean0, order), in_layout(var0, order), shape, EPS, order)  # consumed: fresh copies
    grads = torch.autograd.grad(y, [mean0, var0], g)
    torch.manual_seed(2)
    noise = lrt_module.draw_noise(shape, order, torch.float64)
    noise = noise if order is None else noise.permute([order.index(i) for i in range(len(order))])
    y_ref = unfused(mean0, var0, noise)
    grads_ref = torch.autograd.grad(y_ref, [mean0, var0], g)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=0)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind, shape", [("linear", (4, 6)), ("conv", (2, 2, 4, 4))])
def test_gradients_reach_the_guide_as_through_the_unfused_formula(kind, shape, monkeypatch):
    torch.set_default_dtype(torch.float64)
    try:
        model = Layers(kind)
        x = torch.randn(shape, requires_grad=True)
        guide = SparseSubspaceGuide(model, density=0.5, init_scale=0.3)
        guide(x)
        handler = LocalReparameterizationMessenger()
        lrt_pass(model, guide, x, handler)
        draws = recorded_noise(monkeypatch)
        y = lrt_pass(model, guide, x, handler)
        g = torch.randn(y.shape)
        wrt = [guide.loc("layer.weight"), guide.unconstrained_scale("layer.weight"), x]
        if model.layer.bias is not None:
            wrt.append(model.layer.bias)
        grads = torch.autograd.grad(y, wrt, g)
        (noise,) = draws
        noise = noise.t() if kind == "linear" else noise  # linear: drawn as (out, rows); convolutions: as the output
        mean, var = analytic(model, guide, x)
        y_ref = mean + var.sqrt() * noise
        grads_ref = torch.autograd.grad(y_ref, wrt, g)
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, grads_ref):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


# --- (c) what backward keeps ------------------------------------------------------------
def saved_by_output(y):
    """The fused node under ``y`` (through a transpose) and the tensors it saved."""
    node = y.grad_fn
    while type(node).__name__ != "_PreActivationBackward":
        node = node.next_functions[0][0]
    return node, node.saved_tensors


@pytest.mark.parametrize("order", [None, (1, 0)])
def test_backward_keeps_one_tensor(order):
    mean = torch.randn(4, 3, requires_grad=True)
    var = torch.rand(4, 3, requires_grad=True)
    y = pre_activation(in_layout(mean, order), in_layout(var, order), (4, 3), EPS, order)
    _, saved = saved_by_output(y)
    assert len(saved) == 1 and saved[0].shape == (4, 3)


def test_without_a_variance_gradient_nothing_is_kept():
    mean = torch.randn(4, 3, requires_grad=True)
    y = pre_activation(mean * 1.0, torch.rand(4, 3), (4, 3), EPS)
    _, saved = saved_by_output(y)
    assert len(saved) == 0


@pytest.mark.parametrize("kind, shape", [("linear", (4, 6)), ("conv", (2, 2, 4, 4))])
def test_layers_under_the_handler_use_the_fused_output(kind, shape):
    model = Layers(kind)
    x = torch.randn(shape)
    guide = SparseSubspaceGuide(model, density=0.5)
    guide(x)
    handler = LocalReparameterizationMessenger()
    lrt_pass(model, guide, x, handler)
    y = lrt_pass(model, guide, x, handler)
    node, saved = saved_by_output(y)
    assert len(saved) == 1
    if kind == "linear":  # computed as (out, rows), returned transposed: the sparse kernels' layout
        assert y.stride() == (1, y.shape[0])
    else:  # convolutions in PyTorch's default (NCHW) layout
        assert y.is_contiguous()
    # the output was formed in place over the mean: the node's output is the tensor it received
    assert node.next_functions[0][0] is not None


# --- one square per input ---------------------------------------------------------------
class Shared(PyroModule):
    """One input feeding two convolutions, as a ResNet downsampling block feeds conv1 and the shortcut."""

    def __init__(self):
        super().__init__()
        self.a = PyroModule[torch.nn.Conv2d](2, 3, 3, padding=1, bias=False)
        self.a.weight = PyroSample(dist.Normal(0.0, 1.0).expand([3, 2, 3, 3]).to_event(4))
        self.b = PyroModule[torch.nn.Conv2d](2, 3, 1, bias=False)
        self.b.weight = PyroSample(dist.Normal(0.0, 1.0).expand([3, 2, 1, 1]).to_event(4))

    def forward(self, x):
        h = torch.relu(x)
        return self.a(h) + self.b(h)


def test_an_input_shared_by_two_layers_is_squared_once_with_the_same_gradients(monkeypatch):
    model = Shared()
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    guide = SparseSubspaceGuide(model, density=0.5, init_scale=0.3)
    guide(x)
    handler = LocalReparameterizationMessenger()
    lrt_pass(model, guide, x, handler)
    wrt = [guide.loc("a.weight"), guide.unconstrained_scale("b.weight"), x]
    results = []
    real_apply = lrt_module._Square.apply
    for cached in (True, False):
        calls = []
        monkeypatch.setattr(lrt_module._Square, "apply", lambda t: calls.append(t) or real_apply(t))
        if not cached:
            monkeypatch.setattr(_Squares, "SIZE", 0)
        pyro.set_rng_seed(3)
        y = lrt_pass(model, guide, x, handler)
        results.append((len(calls), y.detach(), torch.autograd.grad(y.sum(), wrt)))
    (n_cached, y_c, g_c), (_, y_u, g_u) = results
    assert n_cached == 1
    torch.testing.assert_close(y_c, y_u, rtol=0, atol=0)
    for a, b in zip(g_c, g_u):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert handler._squares._entries == []  # cleared when the pass ends


def test_an_input_modified_in_place_is_squared_again():
    squares = _Squares()
    x = torch.randn(3)
    first = squares.square(x)
    x.mul_(2.0)
    torch.testing.assert_close(squares.square(x), x * x)
    assert squares.square(x) is not first
