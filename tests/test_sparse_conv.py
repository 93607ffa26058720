"""Sparse convolutions (im2col + the CSR kernel) for sparse 4-d sites: exactness against the dense
path (outputs and gradients, relative 1e-5, before and after subspace updates, weights and LRT,
the data-gradient probe), the measured choice and its place in the guide's state, the fallbacks."""

import re

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroSample

from conftest import assert_same, assert_sparse_matches_dense, close, elbo_pass, kernel_twins
from pyro_ssvi import SSVI, LocalReparameterizationMessenger, SparseSubspaceGuide
from pyro_ssvi.handlers import subspace_prior
from pyro_ssvi.kernels import ConvCall, LinearPattern, SparseWeight, measure_conv2d, sparse_conv2d

def random_pattern(shape, density=0.25, sort=True, policy="sparse", seed=0):
    g = torch.Generator().manual_seed(seed)
    numel = torch.Size(shape).numel()
    index = torch.randperm(numel, generator=g)[: max(1, int(density * numel))]
    return LinearPattern(index.sort().values if sort else index, shape, policy=policy)


GEOMETRIES = [  # (out, in, kernel, input size, stride, padding, dilation)
    (8, 3, (3, 3), 9, 1, 1, 1),
    (16, 8, (3, 3), 10, 2, 1, 1),
    (6, 4, (1, 1), 7, 2, 0, 1),
    (5, 4, (3, 3), 11, 1, 2, 2),
    (7, 5, (3, 2), 8, (2, 1), (1, 0), 1),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g[:2])) + f"-k{g[2][0]}{g[2][1]}-s{g[4]}")
@pytest.mark.parametrize("sort", [True, False], ids=["row-major", "storage-order"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_sparse_conv2d_matches_the_dense_convolution(geometry, sort, bias):
    out, cin, kernel, size, stride, padding, dilation = geometry
    pattern = random_pattern((out, cin) + kernel, sort=sort)
    torch.manual_seed(1)
    values = torch.randn(pattern.num_active, requires_grad=True)
    x = torch.randn(3, cin, size, size, requires_grad=True)
    b = torch.randn(out, requires_grad=True) if bias else None
    y = sparse_conv2d(x, values, pattern, b, stride, padding, dilation)
    ref = F.conv2d(x, pattern.dense(values), b, stride, padding, dilation)
    assert y.shape == ref.shape and y.is_contiguous() and close(y, ref)
    g = torch.randn_like(ref)
    wrt = [x, values] + ([b] if bias else [])
    for a, r in zip(torch.autograd.grad(y, wrt, g), torch.autograd.grad(ref, wrt, g)):
        assert close(a, r)


@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
@pytest.mark.parametrize("style", ["positional", "keywords"])
def test_f_conv2d_on_a_sparse_weight_runs_the_kernel(shifted, style, monkeypatch):
    pattern = random_pattern((6, 4, 3, 3))
    torch.manual_seed(2)
    values = torch.randn(pattern.num_active, requires_grad=True)
    shift = torch.randn(6, 4, 3, 3, requires_grad=True) if shifted else None
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    bias = torch.randn(6)
    w = SparseWeight(values, pattern) if shift is None else SparseWeight(values, pattern) + shift
    assert isinstance(w, SparseWeight) and w.shape == (6, 4, 3, 3)
    real_dense = LinearPattern.dense
    monkeypatch.setattr(LinearPattern, "dense", lambda self, v: pytest.fail("dense weight materialised"))
    if style == "positional":
        y = F.conv2d(x, w, bias, 2, 1)
    else:
        y = F.conv2d(input=x, weight=w, bias=bias, stride=2, padding=1)
    monkeypatch.setattr(LinearPattern, "dense", real_dense)
    dense = real_dense(pattern, values) + (shift if shifted else 0.0)
    ref = F.conv2d(x, dense, bias, 2, 1)
    assert close(y, ref)
    g = torch.randn_like(ref)
    wrt = [x, values] + ([shift] if shifted else [])
    for a, r in zip(torch.autograd.grad(y, wrt, g), torch.autograd.grad(ref, wrt, g)):
        assert close(a, r)


@pytest.mark.parametrize("case", ["groups", "same-padding", "unbatched", "empty", "channels", "bias-shape", "padding-4"])
def test_calls_the_kernel_does_not_cover_run_dense_and_exact(case):
    """Grouped convolutions, string padding, unbatched and empty inputs get the dense tensor (same
    result); a channel mismatch, a bias of the wrong shape and a 4-element padding get PyTorch's own error."""
    pattern = random_pattern((6, 2, 3, 3) if case == "groups" else (6, 4, 3, 3))
    values = torch.randn(pattern.num_active)
    w, dense = SparseWeight(values, pattern), pattern.dense(values)
    x, kw = torch.randn(2, 4, 7, 7), {}
    if case == "groups":
        kw = {"groups": 2}
    elif case == "same-padding":
        kw = {"padding": "same"}
    elif case == "unbatched":
        x = torch.randn(4, 7, 7)
    elif case == "empty":
        x = torch.randn(0, 4, 7, 7)
    else:
        x, kw = {"channels": (torch.randn(2, 5, 7, 7), {}), "bias-shape": (x, {"bias": torch.randn(6, 1)}),
                 "padding-4": (x, {"padding": (1, 1, 1, 1)})}[case]
        with pytest.raises(RuntimeError) as dense_error:
            F.conv2d(x, dense, **kw)
        with pytest.raises(RuntimeError, match=re.escape(str(dense_error.value).splitlines()[0][:40])):
            F.conv2d(x, w, **kw)
        return
    assert torch.equal(F.conv2d(x, w, **kw), F.conv2d(x, dense, **kw))


def test_one_element_geometry_tuples_run_the_sparse_kernel(monkeypatch):
    """``stride=(2,)`` etc. mean ``(2, 2)`` to ``F.conv2d``, and to the sparse kernel alike."""
    pattern = random_pattern((6, 4, 3, 3))
    values = torch.randn(pattern.num_active, requires_grad=True)
    x = torch.randn(2, 4, 9, 9)
    ref = F.conv2d(x, pattern.dense(values), None, 2, 1, 2)
    monkeypatch.setattr(LinearPattern, "dense", lambda self, v: pytest.fail("dense weight materialised"))
    y = F.conv2d(x, SparseWeight(values, pattern), None, (2,), [1], (2,))
    assert close(y, ref)


def test_sparse_conv2d_rejects_what_it_does_not_cover():
    pattern = random_pattern((6, 4, 3, 3))
    values = torch.randn(pattern.num_active)
    with pytest.raises(RuntimeError, match="sparse_conv2d: expected an \\(N, 4, H, W\\) input"):
        sparse_conv2d(torch.randn(2, 3, 7, 7), values, pattern)
    with pytest.raises(RuntimeError, match="integer padding"):
        sparse_conv2d(torch.randn(2, 4, 7, 7), values, pattern, padding="same")


class CNN(PyroModule):
    """Two convolutions (one strided, one without bias) and a linear read-out, Normal priors."""

    def __init__(self):
        super().__init__()
        self.c1 = PyroModule[torch.nn.Conv2d](3, 8, 3, padding=1)
        self.c1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([8, 3, 3, 3]).to_event(4))
        self.c2 = PyroModule[torch.nn.Conv2d](8, 12, 3, stride=2, padding=1, bias=False)
        self.c2.weight = PyroSample(dist.Normal(0.0, 1.0).expand([12, 8, 3, 3]).to_event(4))
        self.fc = PyroModule[torch.nn.Linear](12 * 4 * 4, 5)
        self.out = None

    def forward(self, x, y=None):
        h = self.c2(torch.relu(self.c1(x)))
        out = self.fc(torch.relu(h).flatten(-3))  # particle dims stay in front
        self.out = out
        if y is not None:
            with pyro.plate("data", x.shape[0]):
                pyro.sample("y", dist.Normal(out, 1.0).to_event(1), obs=y)
        return out


CONV_SITES = ("c1.weight", "c2.weight")


def fresh_cnn_and_guide(kernels, seed):
    """A new CNN and guide (convolutions on sparse kernels or not) in a cleared parameter store, seeded alike."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = CNN()
    return model, SparseSubspaceGuide(model, density=0.3, sparse_kernels={s: kernels for s in CONV_SITES}, init_scale=0.1)


def pair(density=0.3):
    """The same CNN and guide state twice: convolutions on sparse kernels, and dense."""
    model = CNN()
    return (model, *kernel_twins(model, torch.zeros(2, 3, 8, 8), density, lambda on: {s: on for s in CONV_SITES}))


def loss_and_grads(model, guide, x, y, elbo, lrt, seed):
    wrt = [x, model.c1.bias] + [p for s in CONV_SITES for p in (guide.loc(s), guide.unconstrained_scale(s))]
    return elbo_pass(model, guide, x, y, elbo, lrt, seed, wrt)


@pytest.mark.parametrize("lrt", [False, True], ids=["weights", "lrt"])
@pytest.mark.parametrize("elbo", ["Trace_ELBO", "TraceMeanField_ELBO"])
def test_a_cnn_on_sparse_convolutions_matches_dense(lrt, elbo, monkeypatch):
    model, g_sparse, g_dense = pair()
    x, y = torch.randn(4, 3, 8, 8, requires_grad=True), torch.randn(4, 5)
    elbo = getattr(pyro.infer, elbo)()
    handlers = {g: LocalReparameterizationMessenger() if lrt else None for g in (g_sparse, g_dense)}
    assert_sparse_matches_dense(monkeypatch, lambda seed: loss_and_grads(model, g_dense, x, y, elbo, handlers[g_dense], seed),
                                lambda seed: loss_and_grads(model, g_sparse, x, y, elbo, handlers[g_sparse], seed))
    if lrt:
        assert all(handlers[g_sparse].eligible[s] for s in CONV_SITES)
    sample = pyro.poutine.trace(g_sparse).get_trace(x)
    assert all(isinstance(sample.nodes[s]["value"], SparseWeight) for s in CONV_SITES)


@pytest.mark.parametrize("sort", [False, True], ids=["slots-as-written", "slots-sorted"])
@pytest.mark.parametrize("lrt", [False, True], ids=["weights", "lrt"])
def test_after_a_subspace_update(lrt, sort):
    model, g_sparse, g_dense = pair()
    x, y = torch.randn(4, 3, 8, 8, requires_grad=True), torch.randn(4, 5)
    before = g_sparse.kernel_pattern("c2.weight")
    inactive = (~g_sparse.active_mask("c2.weight").reshape(-1)).nonzero().squeeze(1)[:5]
    for g in (g_sparse, g_dense):
        g.replace_entries("c2.weight", torch.tensor([0, 3, 5, 7, 11]), inactive, torch.full((5,), 0.5), torch.zeros(5), sort=sort)
    after = g_sparse.kernel_pattern("c2.weight")
    assert after is not before and after.built_from(g_sparse.active_index("c2.weight")) and after.sorted == sort
    elbo = pyro.infer.Trace_ELBO()
    handlers = {g: LocalReparameterizationMessenger() if lrt else None for g in (g_sparse, g_dense)}
    for seed in range(2):
        assert_same(loss_and_grads(model, g_sparse, x, y, elbo, handlers[g_sparse], seed),
                    loss_and_grads(model, g_dense, x, y, elbo, handlers[g_dense], seed))


@pytest.mark.parametrize("lrt", [False, True], ids=["weights", "lrt"])
def test_ssvi_with_gradient_addition_matches_dense(lrt):
    """Update steps see the dense data gradient through the probe (a shifted sparse weight), so SSVI
    on sparse convolutions picks the entries the dense path picks and ends at the same values."""
    x, y = torch.randn(6, 3, 8, 8), torch.randn(6, 5)
    guides = {}
    for kernels in (True, False):
        model, guide = fresh_cnn_and_guide(kernels, seed=3)
        svi = SSVI(model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO(), total_steps=40, update_every=3,
                   addition="gradient", local_reparameterization=lrt)
        for _ in range(7):  # updates on steps 3 and 6
            svi.step(x, y)
        assert len(svi.history) == 2 and all(h["swapped"]["c2.weight"] > 0 for h in svi.history)
        guides[kernels] = guide
    for s in CONV_SITES:
        assert torch.equal(guides[True].active_index(s), guides[False].active_index(s))
        assert close(guides[True].loc(s).detach(), guides[False].loc(s).detach())


def test_vectorised_particles_run_dense_convolutions():
    """Particle-batched weights have no sparse kernel: they are dense samples, with the same losses."""
    x, y = torch.randn(4, 3, 8, 8), torch.randn(4, 5)
    losses = {}
    for kernels in (True, False):
        model, guide = fresh_cnn_and_guide(kernels, seed=0)
        elbo = pyro.infer.Trace_ELBO(num_particles=3, vectorize_particles=True)
        svi = SSVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo, total_steps=10)
        pyro.set_rng_seed(0)
        losses[kernels] = torch.tensor([svi.step(x, y) for _ in range(2)])
    assert close(losses[True], losses[False])


def test_a_convolution_below_the_minimum_work_runs_dense_unmeasured(monkeypatch):
    """Below MIN_CONV_MACS multiply-adds the choice is dense without timing (so it cannot depend on load);
    at or above it the call is measured."""
    from pyro_ssvi import kernels

    pattern = random_pattern((6, 4, 3, 3), policy="auto")
    x, v = torch.randn(2, 4, 8, 8), torch.randn(pattern.num_active)
    call = ConvCall.of(x, 1, 1, 1)
    macs = pattern.conv_macs(call)
    assert macs == 2 * 8 * 8 * 6 * 4 * 9
    measured = []
    monkeypatch.setattr(kernels, "measure_conv2d", lambda *a, **k: measured.append(1) or {"sparse": True, "dense_s": 1.0, "sparse_s": 0.1})
    monkeypatch.setattr(kernels, "MIN_CONV_MACS", macs + 1)
    assert pattern.use_sparse(x, v, call) is False and not measured
    assert next(iter(pattern.decisions.values())) == {"sparse": False, "dense_s": None, "sparse_s": None, "below_min_work": True}
    pattern.decisions.clear()
    monkeypatch.setattr(kernels, "MIN_CONV_MACS", macs)
    assert pattern.use_sparse(x, v, call) is False and not measured  # no gradient: not a training call, not measured
    assert not pattern.decisions
    assert pattern.use_sparse(x, v.requires_grad_(), call) is True and measured == [1]  # the first training call


def test_every_convolution_call_shape_after_the_measured_one_follows_it(monkeypatch):
    """One measurement per site (its first training call); a later call shape, with or without gradients and
    larger or smaller, takes the measured choice without timing (``"follows"``), except below MIN_CONV_MACS."""
    from pyro_ssvi import kernels

    pattern = random_pattern((6, 4, 3, 3), policy="auto")
    v = torch.randn(pattern.num_active, requires_grad=True)
    calls = []
    monkeypatch.setattr(kernels, "measure_conv2d", lambda *a, **k: calls.append(1) or {"sparse": True, "dense_s": 1.0, "sparse_s": 0.1})
    x = torch.randn(4, 4, 8, 8)
    monkeypatch.setattr(kernels, "MIN_CONV_MACS", pattern.conv_macs(ConvCall.of(x[:2], 1, 1, 1)))
    assert pattern.use_sparse(x, v, ConvCall.of(x, 1, 1, 1)) is True and calls == [1]
    with torch.no_grad():
        assert pattern.use_sparse(torch.randn(16, 4, 8, 8), v, ConvCall.of(torch.randn(16, 4, 8, 8), 1, 1, 1)) is True
    assert pattern.use_sparse(x[:3], v, ConvCall.of(x[:3], 1, 1, 1)) is True
    assert pattern.use_sparse(x[:1], v, ConvCall.of(x[:1], 1, 1, 1)) is False  # below the minimum work
    assert calls == [1]
    follows = [d["follows"] for d in pattern.decisions.values() if "follows" in d]
    assert follows == [{"conv2d": {"input": [4, 4, 8, 8], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1]}}] * 2


def test_the_choice_is_measured_per_convolution_call_shape_and_saved(monkeypatch):
    from pyro_ssvi import kernels

    monkeypatch.setattr(kernels, "MIN_CONV_MACS", 0)  # this CNN's convolutions are far below it
    model = CNN()
    guide = SparseSubspaceGuide(model, density=0.3)  # the default: "auto"
    guide(torch.zeros(2, 3, 8, 8))
    x, y = torch.randn(4, 3, 8, 8), torch.randn(4, 5)
    pyro.infer.Trace_ELBO().differentiable_loss(subspace_prior(model, guide), guide, x, y).backward()
    table = guide.kernel_decisions()
    rows = {s: table[s] for s in CONV_SITES}
    assert rows["c1.weight"][0]["conv2d"] == {"input": [4, 3, 8, 8], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1]}
    assert rows["c2.weight"][0]["conv2d"]["stride"] == [2, 2]
    assert not rows["c1.weight"][0]["input_grad"] and rows["c2.weight"][0]["input_grad"]  # x has no gradient here
    for r in rows.values():
        assert len(r) == 1 and "rows" not in r[0]
        assert r[0]["sparse"] == (not r[0].get("early") and r[0]["sparse_s"] < 0.9 * r[0]["dense_s"])
    # the decisions are the guide's state: a fresh guide loads them and measures nothing
    fresh = SparseSubspaceGuide(model, density=0.3)
    fresh(torch.zeros(2, 3, 8, 8))
    fresh.load_state_dict(guide.state_dict())
    assert fresh.kernel_decisions() == table


@pytest.mark.parametrize("kind", ["conv2d", "linear"])
def test_a_sparse_path_slow_cold_and_warm_decides_for_dense_at_once(kind, monkeypatch):
    """The early rejection: a sparse pass over EARLY_REJECT dense ones in the warm-up and again in the
    first timed pass is the decision (two passes each); slow only when cold (a first call's one-time
    costs) does not decide."""
    from pyro_ssvi import kernels

    if kind == "conv2d":
        pattern = random_pattern((6, 4, 3, 3), policy="auto")
        x = torch.randn(2, 4, 8, 8)

        def measure(v):
            return measure_conv2d(pattern, x, v, ConvCall.of(x, 1, 1, 1))
    else:
        pattern = random_pattern((6, 8), policy="auto")
        x = torch.randn(3, 8)

        def measure(v):
            return kernels.measure(pattern, x, v)
    v = torch.randn(pattern.num_active)
    slow, fast = kernels.EARLY_REJECT + 0.5, kernels.EARLY_REJECT - 0.5
    full = 2 * (kernels.MEASURE_REPEATS + 1)
    for sparse_seconds, early, passes in (([slow, slow], True, 4), ([slow, fast], False, full), ([fast, slow], False, full)):
        calls = []

        def elapsed(fn, device):
            calls.append(fn.__name__)
            fn()
            if fn.__name__ == "dense":
                return 1.0
            n = calls.count("sparse")
            return sparse_seconds[n - 1] if n <= 2 else fast

        monkeypatch.setattr(kernels, "_elapsed", elapsed)
        result = measure(v)
        assert result["sparse"] is False and result.get("early", False) is early
        assert len(calls) == passes


def test_decision_rows_round_trip():
    from pyro_ssvi.kernels import KernelSelector

    row = {"conv2d": {"input": [4, 3, 8, 8], "stride": [2, 2], "padding": [1, 1], "dilation": [1, 1]}, "dtype": "torch.float32",
           "device": "cpu", "input_grad": True, "value_grad": False, "sparse": False, "dense_s": 1.0, "sparse_s": 2.0}
    selector = KernelSelector()
    selector.set_decision_table({"w": [row]}, ["w"])
    assert selector.decision_table() == {"w": [row]}
    assert ConvCall((4, 3, 8, 8), (2, 2), (1, 1), (1, 1)) in {key[0] for key in selector.decisions["w"]}
    with pytest.raises(ValueError, match="rows \\(or conv2d\\)"):
        selector.set_decision_table({"w": [{**row, "conv2d": {"input": [4]}}]}, ["w"])
