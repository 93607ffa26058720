"""The compiled direct sparse convolution (pyro_ssvi.direct_conv) against F.conv2d and its autograd, in float64.

Every ResNet-18 layer shape (at a small width), strides 1 and 2, padding, dilation, 1x1 shortcuts, batch 1,
channel counts that divide nothing, storage orders that are not row-major; the value gradient is formed for the
active entries only (no dense weight or weight gradient). The im2col path (``PYRO_SSVI_DIRECT_CONV=0``, or no
numba) is checked on the same cases, and a trained CNN gives the same losses on both paths.
"""

import pyro
import pytest
import torch
import torch.nn.functional as F

from pyro_ssvi import direct_conv
from pyro_ssvi.kernels import LinearPattern, sparse_conv2d

pytestmark = pytest.mark.skipif(direct_conv.numba is None, reason="numba is not installed (the im2col path runs)")


def resnet18_layers(width=4, size=16):
    """``(out, in, k, stride, padding, input size)`` of every convolution of ``pyro_ssvi.resnet``'s ResNet-18."""
    layers = [(width, 3, 3, 1, 1, size)]
    cin, s = width, size
    for stage, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append((cout, cin, 3, stride, 1, s))
            if stride != 1 or cin != cout:
                layers.append((cout, cin, 1, stride, 0, s))  # the shortcut
            s = (s + 2 - 3) // stride + 1
            layers.append((cout, cout, 3, 1, 1, s))
            cin = cout
    return layers


CASES = [(*layer, 1, 2) for layer in resnet18_layers()] + [
    (5, 7, 3, 1, 0, 6, 1, 1),     # batch 1, odd channel counts, no padding
    (3, 5, 3, 2, 2, 9, 2, 3),     # dilation 2, padding 2, stride 2
    (6, 4, 1, 2, 0, 7, 1, 2),     # a 1x1 shortcut on an odd input size
]


def pattern_for(out, cin, k, density, sort, seed):
    g = torch.Generator().manual_seed(seed)
    numel = out * cin * k * k
    index = torch.randperm(numel, generator=g)[: max(1, round(density * numel))]
    return LinearPattern(index.sort().values if sort else index, (out, cin, k, k), policy="sparse")


def check(case, sort, dtype=torch.float64, density=0.2, rtol=1e-10, atol=1e-10):
    out, cin, k, stride, padding, size, dilation, batch = case
    pattern = pattern_for(out, cin, k, density, sort, seed=out * 7 + cin)
    torch.manual_seed(1)
    values = torch.randn(pattern.num_active, dtype=dtype, requires_grad=True)
    x = torch.randn(batch, cin, size, size, dtype=dtype, requires_grad=True)
    y = sparse_conv2d(x, values, pattern, None, stride, padding, dilation)
    ref = F.conv2d(x, pattern.dense(values), None, stride, padding, dilation)
    assert y.shape == ref.shape and y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=rtol, atol=atol)
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(y, (x, values), g), torch.autograd.grad(ref, (x, values), g)):
        torch.testing.assert_close(a, r, rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-k{c[2]}-s{c[3]}-p{c[4]}-n{c[5]}-d{c[6]}-b{c[7]}")
@pytest.mark.parametrize("sort", [True, False], ids=["row-major", "storage-order"])
@pytest.mark.parametrize("path", ["direct", "im2col"])
def test_every_resnet18_layer_and_edge_geometry_matches_f_conv2d_in_float64(case, sort, path, monkeypatch):
    monkeypatch.setenv("PYRO_SSVI_DIRECT_CONV", "1" if path == "direct" else "0")
    calls = []
    real = direct_conv.conv2d
    monkeypatch.setattr(direct_conv, "conv2d", lambda *a: calls.append(1) or real(*a))
    check(case, sort)
    assert bool(calls) == (path == "direct")  # the path under test really ran


@pytest.mark.parametrize("density", [0.02, 0.5, 1.0])
def test_densities_from_one_entry_to_all_match_and_float32_is_close(density):
    check((8, 6, 3, 1, 1, 8, 1, 2), sort=True, density=density)
    check((8, 6, 3, 2, 1, 9, 1, 2), sort=False, dtype=torch.float32, density=density, rtol=1e-5, atol=1e-5)


def test_only_active_entries_get_a_gradient_and_no_dense_weight_is_formed(monkeypatch):
    pattern = pattern_for(8, 4, 3, 0.1, True, seed=0)
    values = torch.randn(pattern.num_active, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)

    def no_dense(*args, **kwargs):
        raise AssertionError("a dense weight was formed")

    monkeypatch.setattr(LinearPattern, "dense", no_dense)
    monkeypatch.setattr(F, "conv2d", no_dense)
    monkeypatch.setattr(F, "unfold", no_dense)  # no im2col either
    y = sparse_conv2d(x, values, pattern, None, 1, 1, 1)
    y.square().sum().backward()
    assert values.grad.shape == (pattern.num_active,) and x.grad.shape == x.shape


def test_the_direct_path_follows_the_thread_count_and_gives_the_same_values():
    pattern = pattern_for(16, 8, 3, 0.2, True, seed=3)
    values = torch.randn(pattern.num_active, dtype=torch.float64)
    x = torch.randn(4, 8, 10, 10, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(sparse_conv2d(x, values, pattern, None, 1, 1, 1))
            assert direct_conv.numba.get_num_threads() == min(n, direct_conv.numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])  # each output plane is summed by one thread in one order


def test_a_trained_cnn_gives_the_same_losses_on_the_direct_and_the_im2col_path(monkeypatch):
    from test_sparse_conv import CONV_SITES, fresh_cnn_and_guide  # the suite's small CNN

    from pyro_ssvi import SSVI

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 5, generator=g)
    losses = {}
    for path in ("1", "0"):
        monkeypatch.setenv("PYRO_SSVI_DIRECT_CONV", path)
        model, guide = fresh_cnn_and_guide(True, seed=0)
        guide(x, y)
        assert all(guide.sparse_index(s) is not None for s in CONV_SITES)
        svi = SSVI(model, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO(), total_steps=8, update_every=3,
                   local_reparameterization=True)
        losses[path] = [svi.step(x, y) for _ in range(8)]
    assert losses["1"] == pytest.approx(losses["0"], rel=1e-5)


@pytest.mark.parametrize("case", CASES[:4] + CASES[-3:], ids=lambda c: f"{c[0]}x{c[1]}-k{c[2]}-s{c[3]}-p{c[4]}-d{c[6]}-b{c[7]}")
@pytest.mark.parametrize("used", ["both", "mean", "variance"])
def test_the_fused_moments_match_two_convolutions_and_their_gradients(case, used):
    out, cin, k, stride, padding, size, dilation, batch = case
    pattern = pattern_for(out, cin, k, 0.3, sort=False, seed=5)
    call = pattern.conv_call(torch.zeros(batch, cin, size, size), stride, padding, dilation)
    torch.manual_seed(2)
    mean = torch.randn(pattern.num_active, dtype=torch.float64, requires_grad=True)
    var = torch.rand(pattern.num_active, dtype=torch.float64, requires_grad=True)
    x = torch.randn(batch, cin, size, size, dtype=torch.float64, requires_grad=True)
    y_m, y_v = direct_conv.conv2d_moments(x, mean, var, pattern, call)
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    r_m, r_v = F.conv2d(x, pattern.dense(mean), **geometry), F.conv2d(x * x, pattern.dense(var), **geometry)
    torch.testing.assert_close(y_m, r_m, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y_v, r_v, rtol=1e-10, atol=1e-10)
    g_m, g_v = torch.randn_like(r_m), torch.randn_like(r_v)
    ours = {"both": (y_m * g_m).sum() + (y_v * g_v).sum(), "mean": (y_m * g_m).sum(), "variance": (y_v * g_v).sum()}[used]
    ref = {"both": (r_m * g_m).sum() + (r_v * g_v).sum(), "mean": (r_m * g_m).sum(), "variance": (r_v * g_v).sum()}[used]
    for a, r in zip(torch.autograd.grad(ours, (x, mean, var), allow_unused=True), torch.autograd.grad(ref, (x, mean, var), allow_unused=True)):
        if r is None:  # the unused moment's weights: no gradient, or zeros
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_local_reparameterisation_runs_both_products_in_one_pass_and_matches_the_two_pass_path(monkeypatch):
    from test_sparse_conv import CONV_SITES, fresh_cnn_and_guide

    from pyro_ssvi import SSVI

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 5, generator=g)
    fused = []
    real = direct_conv.conv2d_moments
    monkeypatch.setattr(direct_conv, "conv2d_moments", lambda *a: fused.append(1) or real(*a))
    losses = {}
    for path in ("1", "0"):
        monkeypatch.setenv("PYRO_SSVI_DIRECT_CONV", path)
        fused.clear()
        model, guide = fresh_cnn_and_guide(True, seed=0)
        svi = SSVI(model, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO(), total_steps=8, update_every=3,
                   local_reparameterization=True)
        losses[path] = [svi.step(x, y) for _ in range(8)]
        # every convolution of every step but the first (where local reparameterisation learns which sites it
        # applies to) and the update steps (gradient addition reads a dense gradient there)
        assert len(fused) == ((8 - 1 - len(svi.history)) * len(CONV_SITES) if path == "1" else 0) and len(svi.history) == 1
    assert losses["1"] == pytest.approx(losses["0"], rel=1e-5)
