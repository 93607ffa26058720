import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample

from pyro_ssvi import SSVI, LocalReparameterizationMessenger, SparseSubspaceGuide
from pyro_ssvi.lrt import weight_moments


def gaussian_init(site):
    return torch.randn(site["fn"].event_shape)


class LinearNet(PyroModule):
    def __init__(self, bias=True):
        super().__init__()
        self.fc = PyroModule[torch.nn.Linear](6, 5, bias=bias)
        self.fc.weight = PyroSample(dist.Normal(0.0, 1.0).expand([5, 6]).to_event(2))

    def forward(self, x):
        return self.fc(x)


class ConvNet(PyroModule):
    def __init__(self, dim=2):
        super().__init__()
        conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dim]
        self.conv = PyroModule[conv](2, 3, 3, stride=2, padding=1, bias=False)
        self.conv.weight = PyroSample(dist.Normal(0.0, 1.0).expand([3, 2] + [3] * dim).to_event(dim + 2))

    def forward(self, x):
        return self.conv(x)


def outputs(model, guide, x, n, lrt):
    handler = LocalReparameterizationMessenger() if lrt else None
    out = []
    with torch.no_grad():
        for i in range(n + 1):
            if handler is not None:
                with handler:
                    tr = pyro.poutine.trace(guide).get_trace(x)
                    y = pyro.poutine.replay(model, tr)(x)
            else:
                tr = pyro.poutine.trace(guide).get_trace(x)
                y = pyro.poutine.replay(model, tr)(x)
            if i > 0:  # the first pass of the handler only probes the model
                out.append(y)
    if handler is not None:
        assert all(handler.eligible.values()) and handler.eligible
    return torch.stack(out)


CASES = [
    ("sparse-linear-bias", lambda: LinearNet(True), (4, 6), "sparse"),
    ("sparse-linear-nobias", lambda: LinearNet(False), (4, 6), "sparse"),
    ("sparse-conv2d", lambda: ConvNet(2), (2, 2, 5, 5), "sparse"),
    ("sparse-conv1d", lambda: ConvNet(1), (2, 2, 7), "sparse"),
    ("sparse-conv3d", lambda: ConvNet(3), (2, 2, 4, 4, 4), "sparse"),
    ("dense-autonormal-linear", lambda: LinearNet(True), (4, 6), "autonormal"),
    ("dense-autonormal-conv2d", lambda: ConvNet(2), (2, 2, 5, 5), "autonormal"),
]


@pytest.mark.parametrize("name, make, shape, kind", CASES, ids=[c[0] for c in CASES])
def test_lrt_matches_weight_sampling_in_mean_and_variance(name, make, shape, kind):
    model = make()
    x = torch.randn(shape)
    if kind == "sparse":
        guide = SparseSubspaceGuide(model, density=0.5, init_loc_fn=gaussian_init, init_scale=0.5)
    else:
        guide = AutoNormal(model, init_loc_fn=gaussian_init, init_scale=0.5)
    guide(x)
    n = 4000
    a = outputs(model, guide, x, n, lrt=True)
    b = outputs(model, guide, x, n, lrt=False)
    # Both are exactly Gaussian per unit. Means: SE = sqrt((va + vb) / n). Variances: the sample
    # variance of n Gaussians has SE sqrt(2 / (n - 1)) var. 5 SE keeps the family-wise false
    # alarm rate below 1e-4 over the <= 60 units compared.
    va, vb = a.var(0), b.var(0)
    se_mean = ((va + vb) / n).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() < 5 * se_mean + 1e-6).all()
    se_var = math.sqrt(2 / (n - 1)) * (va + vb) / 2 * math.sqrt(2)
    assert ((va - vb).abs() < 5 * se_var + 1e-6).all()
    # and the LRT noise is independent across examples (weight sampling's is not)
    if shape[0] > 2:
        flat_a, flat_b = a.reshape(n, shape[0], -1)[..., 0], b.reshape(n, shape[0], -1)[..., 0]
        corr_a = torch.corrcoef(flat_a.T)[0, 1]
        corr_b = torch.corrcoef(flat_b.T)[0, 1]
        assert abs(corr_a) < 5 / math.sqrt(n) and abs(corr_b) > 0.1


class Classifier(PyroModule):
    def __init__(self):
        super().__init__()
        self.fc1 = PyroModule[torch.nn.Linear](10, 32)
        self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([32, 10]).to_event(2))
        self.fc2 = PyroModule[torch.nn.Linear](32, 3)
        self.fc2.weight = PyroSample(dist.Normal(0.0, 1.0).expand([3, 32]).to_event(2))

    def forward(self, x, y=None):
        logits = self.fc2(torch.tanh(self.fc1(x)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def grad_samples(model, guide, x, y, lrt, m):
    elbo = pyro.infer.TraceMeanField_ELBO()
    handler = LocalReparameterizationMessenger() if lrt else None
    grads = []
    for i in range(m + 1):
        guide.zero_grad()
        loc = guide.loc("fc1.weight")
        loc.grad = None
        if handler is not None:
            with handler:
                loss = elbo.differentiable_loss(model, guide, x, y)
        else:
            loss = elbo.differentiable_loss(model, guide, x, y)
        (g,) = torch.autograd.grad(loss, [loc])
        if i > 0:
            grads.append(g)
    return torch.stack(grads)


def test_lrt_lowers_gradient_variance():
    torch.manual_seed(0)
    x, y = torch.randn(256, 10), torch.randint(0, 3, (256,))
    model = Classifier()
    guide = SparseSubspaceGuide(model, density=0.5, init_loc_fn=gaussian_init, init_scale=0.3)
    guide(x, y)
    m = 200
    var_lrt = grad_samples(model, guide, x, y, True, m).var(0).sum()
    var_ws = grad_samples(model, guide, x, y, False, m).var(0).sum()
    # each total variance has a relative standard error of roughly sqrt(2 / m) = 10%
    assert var_lrt < 0.7 * var_ws, (var_lrt, var_ws)


class MatmulNet(PyroModule):
    """Uses its weight through torch.matmul, which local reparameterisation does not cover."""

    def __init__(self):
        super().__init__()
        self.w = PyroSample(dist.Normal(0.0, 1.0).expand([6, 5]).to_event(2))
        self.fc = PyroModule[torch.nn.Linear](5, 2)
        self.fc.weight = PyroSample(dist.Normal(0.0, 1.0).expand([2, 5]).to_event(2))

    def forward(self, x):
        return self.fc(torch.matmul(x, self.w))


class TwiceNet(PyroModule):
    """Feeds its weight to F.linear and to a penalty: not eligible either."""

    def __init__(self):
        super().__init__()
        self.fc = PyroModule[torch.nn.Linear](6, 2)
        self.fc.weight = PyroSample(dist.Normal(0.0, 1.0).expand([2, 6]).to_event(2))

    def forward(self, x):
        w = self.fc.weight
        return F.linear(x, w) + w.pow(2).sum()


@pytest.mark.parametrize("make, bad, good, func", [(MatmulNet, "w", "fc.weight", "matmul"), (TwiceNet, "fc.weight", None, "pow")])
def test_unsupported_uses_fall_back_with_a_warning_naming_the_site(make, bad, good, func):
    model = make()
    x = torch.randn(4, 6)
    guide = SparseSubspaceGuide(model, density=0.5, init_loc_fn=gaussian_init, init_scale=0.5)
    guide(x)
    handler = LocalReparameterizationMessenger()
    with pytest.warns(RuntimeWarning, match=f"site '{bad}' feeds {func}"):
        with handler:
            tr = pyro.poutine.trace(guide).get_trace(x)
            pyro.poutine.replay(model, tr)(x)
    assert handler.eligible[bad] is False
    if good is not None:
        assert handler.eligible[good] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):  # later passes: weight sampling for the bad site, silently
            with handler:
                tr = pyro.poutine.trace(guide).get_trace(x)
                out = pyro.poutine.replay(model, tr)(x)
    assert torch.isfinite(out).all()


def test_sparse_moments_are_weight_sized():
    model = ConvNet(2)
    guide = SparseSubspaceGuide(model, density=0.3)
    x = torch.randn(2, 2, 5, 5)
    guide(x)
    fn = guide.get_posterior("conv.weight")
    mean_w, var_w = weight_moments(fn, torch.empty(3, 2, 3, 3))
    assert mean_w.shape == var_w.shape == (3, 2, 3, 3)
    assert (var_w[~guide.active_mask("conv.weight")] == 0).all()


def test_ssvi_with_lrt_trains_updates_and_checkpoints_eligibility():
    torch.manual_seed(0)
    x, y = torch.randn(128, 10), torch.randint(0, 3, (128,))
    model = Classifier()
    guide = SparseSubspaceGuide(model, density=0.3)
    svi = SSVI(
        model, guide, pyro.optim.Adam({"lr": 0.02}), pyro.infer.TraceMeanField_ELBO(),
        total_steps=60, update_every=10, local_reparameterization=True,
    )
    losses = [svi.step(x, y) for _ in range(60)]
    assert losses[-1] < losses[0]
    assert len(svi.history) == 4 and svi.history[0]["swapped"]["fc1.weight"] > 0
    assert svi.state_dict()["lrt_eligible"] == {"fc1.weight": True, "fc2.weight": True}
    # interception only while the model runs: inside SSVI's context a layer call outside the model is plain
    w = torch.randn(3, 10)
    with svi.lrt:
        inside = torch.nn.functional.linear(x, w)
    assert torch.equal(inside, torch.nn.functional.linear(x, w))


def test_scope_to_intercepts_inside_the_model_only():
    x = torch.randn(4, 6)
    model = LinearNet(True)
    guide = SparseSubspaceGuide(model, density=0.5, init_loc_fn=gaussian_init, init_scale=0.5)
    guide(x)
    handler = LocalReparameterizationMessenger()
    scoped = handler.scope_to(model)
    seen = []
    base = torch.overrides._get_current_function_mode_stack()  # e.g. torch's default-device mode
    for _ in range(3):
        with handler:
            tr = pyro.poutine.trace(guide).get_trace(x)
            seen.append(torch.overrides._get_current_function_mode_stack() == base)
            out = pyro.poutine.replay(scoped, tr)(x)
    assert all(seen) and handler.eligible == {"fc.weight": True}
    # the last pass used LRT: the output is not F.linear of the sampled weight
    w = tr.nodes["fc.weight"]["value"]
    assert not torch.allclose(out, F.linear(x, w, model.fc.bias))


class ReusedNet(PyroModule):
    """One weight sample applied twice in one pass: y = w (w x)."""

    def __init__(self):
        super().__init__()
        self.fc = PyroModule[torch.nn.Linear](1, 1, bias=False)
        self.fc.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 1]).to_event(2))

    def forward(self, x):
        return self.fc(self.fc(x))


def test_a_reused_weight_falls_back_to_weight_sampling():
    model = ReusedNet()
    x = torch.ones(1, 1)
    guide = SparseSubspaceGuide(model, density=1.0, init_loc_fn=lambda s: torch.full((1, 1), 0.5), init_scale=1.0)
    guide(x)
    handler = LocalReparameterizationMessenger()
    n = 4000
    ys = []
    with pytest.warns(RuntimeWarning, match="site 'fc.weight' is the weight of more than one linear call"):
        with torch.no_grad():
            for _ in range(n):
                with handler:
                    tr = pyro.poutine.trace(guide).get_trace(x)
                    ys.append(pyro.poutine.replay(model, tr)(x))
    assert handler.eligible == {"fc.weight": False}
    ys = torch.cat(ys).reshape(-1)
    # weight sampling: E[w^2] = mu^2 + sigma^2 = 1.25 (per-call LRT noise would give mu^2 = 0.25);
    # Var(w^2) = 4 mu^2 sigma^2 + 2 sigma^4 = 3, so 5 SE = 5 sqrt(3 / n)
    assert abs(ys.mean().item() - 1.25) < 5 * math.sqrt(3.0 / n)


def test_handler_is_reentrant_and_a_failed_enter_leaves_nothing_installed(monkeypatch):
    from pyro.poutine.messenger import Messenger
    from pyro.poutine.runtime import _PYRO_STACK

    x = torch.randn(4, 6)
    model = LinearNet(True)
    guide = SparseSubspaceGuide(model, density=0.5, init_loc_fn=gaussian_init, init_scale=0.5)
    guide(x)
    handler = LocalReparameterizationMessenger()
    modes = torch.overrides._get_current_function_mode_stack
    base = modes()  # e.g. torch's default-device mode
    for _ in range(2):
        with handler:
            with handler:  # entered twice: one frame, one mode
                assert _PYRO_STACK.count(handler) == 1 and len(modes()) == len(base) + 1
                tr = pyro.poutine.trace(guide).get_trace(x)
                out = pyro.poutine.replay(model, tr)(x)
            assert handler in _PYRO_STACK and len(modes()) == len(base) + 1
        assert handler not in _PYRO_STACK and modes() == base
    assert handler.eligible == {"fc.weight": True}
    assert not torch.allclose(out, F.linear(x, tr.nodes["fc.weight"]["value"], model.fc.bias))

    def refuse(self):
        raise RuntimeError("no room on the stack")

    monkeypatch.setattr(Messenger, "__enter__", refuse)
    with pytest.raises(RuntimeError, match="no room"):
        with handler:
            pass
    assert handler not in _PYRO_STACK and modes() == base and not handler.active
    monkeypatch.undo()
    with handler:  # usable again
        assert _PYRO_STACK.count(handler) == 1
    assert modes() == base


def test_a_pass_leaves_no_reference_cycle_holding_its_samples():
    """Samples are freed when the pass ends, not at the next garbage collection (memory growth)."""
    import gc
    import weakref

    model = LinearNet()
    guide = SparseSubspaceGuide(model, density=0.5)
    x = torch.randn(3, 6)
    guide(x)
    lrt = LocalReparameterizationMessenger()
    gc.collect()
    gc.disable()
    try:
        refs = []
        for _ in range(3):  # the first pass probes, the next ones use local reparameterisation
            with lrt:
                tr = pyro.poutine.trace(guide).get_trace(x)
                pyro.poutine.replay(model, tr)(x)
            refs.append(weakref.ref(tr.nodes["fc.weight"]["value"]))
            del tr
        assert lrt.eligible == {"fc.weight": True}
        assert all(r() is None for r in refs)
    finally:
        gc.enable()
