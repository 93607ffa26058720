"""Sparse kernels for sparse linear sites: exactness against the dense path, choice, overrides."""

import copy
import io

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroSample

from conftest import assert_same, assert_sparse_matches_dense, close, elbo_pass, kernel_twins
from pyro_ssvi import SSVI, LocalReparameterizationMessenger, SparseSubspaceGuide
from pyro_ssvi.handlers import subspace_prior
from pyro_ssvi.kernels import LinearPattern, SparseWeight, measure, sparse_linear

class Regression(PyroModule):
    def __init__(self, d_in=12, d_out=9, bias=True):
        super().__init__()
        self.fc = PyroModule[torch.nn.Linear](d_in, d_out, bias=bias)
        self.fc.weight = PyroSample(dist.Normal(0.0, 1.0).expand([d_out, d_in]).to_event(2))
        self.out = None

    def forward(self, x, y=None):
        out = self.fc(x)
        self.out = out  # the test reads the pre-activation of the last pass
        if y is not None:
            pyro.sample("y", dist.Normal(out, 1.0).to_event(out.dim()), obs=y)
        return out


def pair(density=0.3, bias=True, d_in=12, d_out=9):
    """The same model and guide state twice: one guide on sparse kernels, one dense."""
    model = Regression(d_in, d_out, bias)
    return (model, *kernel_twins(model, torch.zeros(2, d_in), density))


def loss_and_grads(model, guide, x, y, elbo, lrt, seed):
    """Loss, model output and gradients (loc, scale, bias, input) of one ELBO pass with fixed noise."""
    wrt = [guide.loc("fc.weight"), guide.unconstrained_scale("fc.weight"), x]
    if model.fc.bias is not None:
        wrt.append(model.fc.bias)
    return elbo_pass(model, guide, x, y, elbo, lrt, seed, wrt)


@pytest.mark.parametrize("lrt", [False, True], ids=["weights", "lrt"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead", [(), (2, 3)], ids=["2d", "leading-dims"])
@pytest.mark.parametrize("elbo", ["Trace_ELBO", "TraceMeanField_ELBO"])
def test_sparse_path_matches_dense(lrt, bias, lead, elbo, monkeypatch):
    model, g_sparse, g_dense = pair(bias=bias)
    x = torch.randn(*lead, 5, 12, requires_grad=True)
    y = torch.randn(*lead, 5, 9)
    elbo = getattr(pyro.infer, elbo)()
    handlers = {g: LocalReparameterizationMessenger() if lrt else None for g in (g_sparse, g_dense)}
    assert_sparse_matches_dense(monkeypatch, lambda seed: loss_and_grads(model, g_dense, x, y, elbo, handlers[g_dense], seed),
                                lambda seed: loss_and_grads(model, g_sparse, x, y, elbo, handlers[g_sparse], seed))
    if lrt:
        assert handlers[g_sparse].eligible == {"fc.weight": True}
    sample = pyro.poutine.trace(g_sparse).get_trace(x)
    assert isinstance(sample.nodes["fc.weight"]["value"], SparseWeight)


@pytest.mark.parametrize("elbo", ["TraceGraph_ELBO", "RenyiELBO"])
def test_other_elbos_match_dense(elbo):
    """ELBOs without ``differentiable_loss``: compare the gradients ``loss_and_grads`` leaves."""
    model, g_sparse, g_dense = pair()
    x, y = torch.randn(5, 12), torch.randn(5, 9)
    elbo = getattr(pyro.infer, elbo)()
    results = []
    for guide in (g_sparse, g_dense):
        params = [guide.loc("fc.weight"), guide.unconstrained_scale("fc.weight"), model.fc.bias]
        for p in params:
            p.grad = None
        pyro.set_rng_seed(0)
        loss = elbo.loss_and_grads(subspace_prior(model, guide), guide, x, y)
        results.append([torch.tensor(loss), model.out.detach()] + [p.grad.clone() for p in params])
    assert_same(*results)


@pytest.mark.parametrize("sort", [False, True], ids=["slots-as-written", "slots-sorted"])
@pytest.mark.parametrize("lrt", [False, True], ids=["weights", "lrt"])
def test_after_subspace_update(lrt, sort):
    """A changed active set rebuilds the CSR structure, and the sparse path stays exact, whether the
    slots keep the order the update wrote (values permuted for the kernels) or are re-sorted as SSVI does."""
    model, g_sparse, g_dense = pair()
    x, y = torch.randn(5, 12, requires_grad=True), torch.randn(5, 9)
    elbo = pyro.infer.Trace_ELBO()
    before = g_sparse.kernel_pattern("fc.weight")
    assert g_sparse.kernel_pattern("fc.weight") is before  # cached while the set is unchanged
    inactive = (~g_sparse.active_mask("fc.weight").reshape(-1)).nonzero().squeeze(1)[:4]
    for g in (g_sparse, g_dense):
        g.replace_entries("fc.weight", torch.tensor([0, 3, 5, 7]), inactive, torch.full((4,), 0.5), torch.zeros(4), sort=sort)
    after = g_sparse.kernel_pattern("fc.weight")
    assert after is not before and after.built_from(g_sparse.active_index("fc.weight"))
    assert after.sorted == sort
    handlers = {g: LocalReparameterizationMessenger() if lrt else None for g in (g_sparse, g_dense)}
    for seed in range(2):
        assert_same(loss_and_grads(model, g_sparse, x, y, elbo, handlers[g_sparse], seed),
                    loss_and_grads(model, g_dense, x, y, elbo, handlers[g_dense], seed))


def test_density_one_runs_dense():
    model, g_sparse, g_dense = pair(density=1.0)
    assert g_sparse.kernel_pattern("fc.weight") is None
    sample = pyro.poutine.trace(g_sparse).get_trace(torch.zeros(2, 12)).nodes["fc.weight"]["value"]
    assert type(sample) is torch.Tensor
    x, y = torch.randn(5, 12, requires_grad=True), torch.randn(5, 9)
    elbo = pyro.infer.Trace_ELBO()
    assert_same(loss_and_grads(model, g_sparse, x, y, elbo, None, 0), loss_and_grads(model, g_dense, x, y, elbo, None, 0))


@pytest.mark.parametrize("lrt", [False, True], ids=["weights", "lrt"])
def test_ssvi_with_gradient_addition_matches_dense(lrt):
    """Update steps get the dense data gradient (the probe densifies), so SSVI picks the same entries."""
    x, y = torch.randn(16, 12), torch.randn(16, 9)
    results = {}
    builds = []
    real_init = LinearPattern.__init__

    def counting_init(self, *args, **kwargs):
        builds.append(svi.step_count)
        real_init(self, *args, **kwargs)

    for kernels in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        model = Regression()
        guide = SparseSubspaceGuide(model, density=0.3, sparse_kernels=kernels, init_scale=0.1)
        svi = SSVI(model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO(), total_steps=40, update_every=3,
                   addition="gradient", local_reparameterization=lrt)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(LinearPattern, "__init__", counting_init)
            for _ in range(7):  # updates on steps 3 and 6
                svi.step(x, y)
        assert len(svi.history) == 2 and all(h["swapped"]["fc.weight"] > 0 for h in svi.history)
        results[kernels] = guide
    # the CSR structure is built at the first step, then rebuilt only by the updates (during steps 3 and 6)
    assert builds == [0, 2, 5]
    s, d = results[True], results[False]
    assert torch.equal(s.active_index("fc.weight"), d.active_index("fc.weight"))
    assert close(s.loc("fc.weight").detach(), d.loc("fc.weight").detach())


def test_auto_choice_is_measured_once_per_site_and_followed_by_other_call_shapes():
    model, g_auto, g_dense = pair()
    g_auto = SparseSubspaceGuide(model, density=0.3)  # the default: "auto"
    g_auto(torch.zeros(2, 12))
    g_auto.load_state_dict(g_dense.state_dict())
    x, y = torch.randn(5, 12, requires_grad=True), torch.randn(5, 9)
    elbo = pyro.infer.Trace_ELBO()
    assert_same(loss_and_grads(model, g_auto, x, y, elbo, None, 0), loss_and_grads(model, g_dense, x, y, elbo, None, 0))
    with torch.no_grad():
        g_auto.kernel_pattern("fc.weight")  # unchanged: the same pattern holds the decisions
        pyro.poutine.replay(model, pyro.poutine.trace(g_auto).get_trace(x))(torch.randn(7, 12))
    report = {r["rows"]: r for r in g_auto.kernel_report()["fc.weight"]}
    assert sorted(report) == [5, 7]
    assert report[5]["sparse"] == (report[5]["sparse_s"] < 0.9 * report[5]["dense_s"])  # the site's one measurement
    assert report[7]["follows"] == {"rows": 5} and report[7]["sparse"] == report[5]["sparse"] and report[7]["dense_s"] is None


def test_a_new_call_shape_follows_the_nearest_measured_one_without_timing(monkeypatch):
    """Rules, not timing, for every shape after the site's measurement: the nearest measured shape in work
    (a table loaded from an older run can hold several); the measured dtype and device only."""
    from pyro_ssvi import kernels

    pattern = LinearPattern(torch.arange(0, 40, 3), (5, 8))
    pattern.decisions.update({(8, torch.float32, torch.device("cpu"), False, True): {"sparse": True, "dense_s": 1.0, "sparse_s": 0.5},
                              (512, torch.float32, torch.device("cpu"), False, True): {"sparse": False, "dense_s": 1.0, "sparse_s": 2.0}})
    monkeypatch.setattr(kernels, "measure", lambda *a, **k: pytest.fail("measured a shape that has a rule"))
    v = torch.randn(14, requires_grad=True)
    assert pattern.use_sparse(torch.randn(30, 8), v) is True  # log-distance 1.3 to 8, 2.8 to 512
    assert pattern.use_sparse(torch.randn(100, 8), v) is False
    with torch.no_grad():
        assert pattern.use_sparse(torch.randn(64, 8), v) is True  # equidistant: the smaller one
    measured = []
    monkeypatch.setattr(kernels, "measure", lambda *a, **k: measured.append(1) or {"sparse": True, "dense_s": 1.0, "sparse_s": 0.1})
    assert pattern.use_sparse(torch.randn(30, 8, dtype=torch.float64), v.double()) is True and measured == [1]  # another dtype


def test_measure_prefers_the_faster_path(monkeypatch):
    """The choice follows the timings: the sparse kernel only below SPARSE_MARGIN of the dense time."""
    pattern = LinearPattern(torch.arange(0, 40, 3), (5, 8))
    x, v = torch.randn(4, 8), torch.randn(14)
    for sparse_seconds, expected in ((0.5, True), (0.89, True), (0.91, False), (2.0, False)):
        cost = {"dense": 1.0, "sparse": sparse_seconds}
        monkeypatch.setattr("pyro_ssvi.kernels._elapsed", lambda fn, device: (fn(), cost[fn.__name__])[1])
        result = measure(pattern, x, v)
        assert result["sparse"] is expected and result["sparse_s"] == sparse_seconds


def test_kernel_overrides_and_errors():
    model = Regression()
    with pytest.raises(ValueError, match="sparse_kernels"):
        SparseSubspaceGuide(model, sparse_kernels="fast")
    with pytest.raises(ValueError, match="sparse_kernels: unknown site names"):
        SparseSubspaceGuide(model, density=0.3, sparse_kernels={"fc.wieght": True})(torch.zeros(2, 12))
    off = SparseSubspaceGuide(model, density=0.3, sparse_kernels={"fc.weight": False})
    off(torch.zeros(2, 12))
    assert off.kernel_pattern("fc.weight") is None
    assert type(pyro.poutine.trace(off).get_trace(torch.zeros(2, 12)).nodes["fc.weight"]["value"]) is torch.Tensor
    forced = SparseSubspaceGuide(model, density=0.3, sparse_kernels=True)
    forced(torch.zeros(2, 12))
    assert forced.kernel_pattern("fc.weight").policy == "sparse"
    w = pyro.poutine.trace(forced).get_trace(torch.zeros(2, 12)).nodes["fc.weight"]["value"]
    with pytest.raises(RuntimeError, match="in_features"):
        F.linear(torch.zeros(3, 11), w)


def test_sparse_weight_behaves_as_its_dense_tensor():
    pattern = LinearPattern(torch.tensor([7, 1, 12, 4]), (3, 5), policy="sparse")
    active = torch.randn(4, requires_grad=True)
    w = SparseWeight(active, pattern)
    dense = pattern.dense(active)
    assert w.shape == (3, 5) and w.dim() == 2 and w.requires_grad
    for op in (lambda t: t.sum(0), lambda t: t * 2 + 1, lambda t: t[1], lambda t: t.t() @ torch.ones(3), torch.relu):
        assert torch.equal(op(w), op(dense))
    assert torch.equal(w.reshape(-1)[[7, 1, 12, 4]], active)
    assert torch.equal(w.as_subclass(torch.Tensor), dense)  # what Pyro's ProvenanceTensor calls
    # log densities read the stored values only while they are the weight's values at the active set
    from pyro_ssvi import SparseNormal

    q = SparseNormal(torch.zeros(4), torch.ones(4), pattern.source, (3, 5), pattern=pattern)
    shift = torch.full((3, 5), 0.5)
    for value in (w, w + shift):
        assert torch.allclose(q.log_prob(value), q.log_prob(value.materialize().detach()))
    assert isinstance(w + shift, SparseWeight) and (w + shift).active_at(pattern.index) is None
    (w * w).sum().backward()
    assert torch.allclose(active.grad, 2 * active)
    x = torch.randn(2, 4, 5)
    assert close(F.linear(x, w, torch.ones(3)), F.linear(x, dense, torch.ones(3)))
    assert close(sparse_linear(x[0, 0], active, pattern), F.linear(x[0, 0], dense))  # 1-d input


def test_predictive_returns_dense_samples():
    model, g_sparse, _ = pair()
    pred = pyro.infer.Predictive(model, guide=g_sparse, num_samples=3, return_sites=["fc.weight", "_RETURN"])
    out = pred(torch.randn(4, 12))
    assert type(out["fc.weight"]) is torch.Tensor and out["fc.weight"].shape == (3, 9, 12)
    off = (~g_sparse.active_mask("fc.weight")).expand(3, 9, 12)
    assert (out["fc.weight"][off] == 0).all()


def test_a_guide_with_patterns_copies_and_pickles():
    """deepcopy and torch.save of a guide that has built its CSR structures (SWA, checkpoints)."""
    model, g_sparse, g_dense = pair()
    x, y = torch.randn(5, 12, requires_grad=True), torch.randn(5, 9)
    elbo = pyro.infer.Trace_ELBO()
    loss_and_grads(model, g_sparse, x, y, elbo, None, 0)  # builds the structures
    copied = copy.deepcopy(g_sparse)
    buffer = io.BytesIO()
    torch.save(g_sparse, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for guide in (copied, loaded):
        assert_same(loss_and_grads(model, guide, x, y, elbo, None, 1), loss_and_grads(model, g_dense, x, y, elbo, None, 1))


@pytest.mark.parametrize("module", ["pyro_ssvi.kernels", "pyro_ssvi.distributions", "pyro_ssvi.subspace"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("family", ["Normal", "Laplace", "StudentT", "Cauchy", "mixture", "per-coordinate"])
def test_restricted_prior_log_prob_matches_dense(family):
    """SubspacePrior.log_prob at the active coordinates equals the dense log density summed over them."""
    from pyro_ssvi.distributions import SubspacePrior, restrict

    shape = torch.Size([6, 7])
    base = {
        "Normal": dist.Normal(0.5, 2.0),
        "Laplace": dist.Laplace(0.0, 0.3),
        "StudentT": dist.StudentT(3.0, 0.1, 1.5),
        "Cauchy": dist.Cauchy(0.0, 1.0),
        "mixture": dist.MixtureSameFamily(dist.Categorical(torch.tensor([0.3, 0.7])), dist.Normal(torch.zeros(2), torch.tensor([0.1, 1.0]))),
        "per-coordinate": dist.Normal(torch.randn(shape), torch.rand(shape) + 0.5),
    }[family]
    prior = (base if family == "per-coordinate" else base.expand(shape)).to_event(2)
    index = torch.randperm(42)[:11].int()
    value = torch.randn(3, *shape)  # with a leading (particle) dim
    expected = prior.base_dist.log_prob(value).reshape(3, -1)[:, index.long()].sum(-1)
    assert torch.allclose(SubspacePrior(prior, index).log_prob(value), expected, rtol=1e-6, atol=1e-6)
    # the families Pyro users write are evaluated at the active coordinates only; others fall back to dense
    assert (restrict(prior.base_dist, index, shape) is None) == (family == "mixture")


@pytest.mark.parametrize("policy", ["sparse", "dense"])
@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
def test_linear_t_is_the_transposed_linear_with_the_same_gradients(policy, shifted):
    """``SparseWeight.linear_t`` (LRT's ``(out, rows)`` product): output and gradients of ``F.linear(x, W)^T``."""
    torch.manual_seed(0)
    index = torch.randperm(9 * 12)[:30].sort().values
    pattern = LinearPattern(index, (9, 12), policy="sparse")
    if policy == "dense":
        pattern.use_sparse = lambda x2d, values: False
    values = torch.randn(30, requires_grad=True)
    shift = torch.randn(9, 12, requires_grad=True) if shifted else None
    x = torch.randn(7, 12, requires_grad=True)
    w = SparseWeight(values, pattern, shift)
    yt = w.linear_t(x)
    dense = pattern.dense(values) + (shift if shifted else 0.0)
    ref = F.linear(x, dense).t()
    assert yt.shape == (9, 7) and yt.is_contiguous() and yt._base is None
    assert close(yt, ref)
    g = torch.randn(9, 7)
    wrt = [values, x] + ([shift] if shifted else [])
    for a, b in zip(torch.autograd.grad(yt, wrt, g), torch.autograd.grad(ref, wrt, g)):
        assert close(a, b)
