import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroSample

from conftest import BNN
from pyro_ssvi import SSVI, NonFiniteLossError, SparseSubspaceGuide, SubspacePrior, reset_optimizer_state, subspace_prior


def make_svi(model=None, optim=None, loss=None, density=0.1, **kwargs):
    pyro.clear_param_store()
    model = model or BNN()
    guide = SparseSubspaceGuide(model, density=density)
    kwargs.setdefault("total_steps", 100)
    kwargs.setdefault("update_every", 10)
    svi = SSVI(model, guide, optim or pyro.optim.Adam({"lr": 1e-2}), loss or pyro.infer.TraceMeanField_ELBO(), **kwargs)
    return model, guide, svi


def test_active_counts_never_change_and_history_is_recorded(digits):
    Xtr, ytr, _, _ = digits
    model, guide, svi = make_svi(total_steps=60, update_every=10, removal_fraction=0.5)
    for _ in range(60):
        svi.step(Xtr[:64], ytr[:64])
        for name in guide.site_names:
            assert guide.active_index(name).unique().numel() == guide.site_info(name).k
    assert [h["step"] for h in svi.history] == [10, 20, 30, 40]  # T_end = 45
    first = svi.history[0]
    assert first["fraction"] == pytest.approx(0.25 * (1 + math.cos(math.pi * 10 / 45)))
    assert 0 < first["swapped"]["fc1.weight"] <= math.floor(first["fraction"] * 640)
    assert 0.0 <= first["abs_mean_overlap"]["fc1.weight"] <= 1.0
    assert svi.step_count == 60 and int(guide.ssvi_step) == 60 and guide.step == 60


def _adam_state(optim, param):
    return next(o.state[param] for o in optim.optim_objs.values() if param in o.state)


#: the optimisers a user may step SSVI with: pyro.optim's one per parameter, and torch.optim's Adam over
#: every parameter in its single-tensor, multi-tensor (foreach) and fused implementations
OPTIMS = ["pyro", "torch", "foreach", "fused"]


def make_optim(kind, params, lr=1e-2):
    if kind == "pyro":
        return pyro.optim.Adam({"lr": lr})
    kwargs = {"torch": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kind]
    return torch.optim.Adam(params, lr=lr, **kwargs)


def optimizer_state(optim, param):
    return _adam_state(optim, param) if isinstance(optim, pyro.optim.PyroOptim) else optim.state[param]


@pytest.mark.parametrize("optim_kind", OPTIMS)
def test_new_entries_start_fresh_and_their_optimiser_state_is_reset(digits, optim_kind):
    Xtr, ytr, _, _ = digits
    pyro.clear_param_store()
    model = BNN()
    guide = SparseSubspaceGuide(model, density=0.1)
    guide(Xtr[:8], ytr[:8])
    optim = make_optim(optim_kind, guide.parameters())
    svi = SSVI(model, guide, optim, pyro.infer.Trace_ELBO(), total_steps=100, update_every=10, new_scale=0.05, addition="random")
    for _ in range(9):
        svi.step(Xtr[:64], ytr[:64])
    before = {n: guide.active_index(n).clone() for n in guide.site_names}
    svi.step(Xtr[:64], ytr[:64])  # step 10: update
    for name in guide.site_names:
        loc, rho = guide.loc(name), guide.unconstrained_scale(name)
        # the new entries (slots are reordered by position after an update, so look them up by index)
        changed = (~torch.isin(guide.active_index(name), before[name])).nonzero().squeeze(-1)
        assert changed.numel() == svi.history[-1]["swapped"][name] > 0
        assert (loc[changed] == 0).all()
        torch.testing.assert_close(guide.scale(name)[changed], torch.full((changed.numel(),), 0.05))
        unchanged = torch.ones_like(loc, dtype=torch.bool)
        unchanged[changed] = False
        for param in (loc, rho):
            state = optimizer_state(optim, param)
            for key in ("exp_avg", "exp_avg_sq"):
                assert (state[key][changed] == 0).all()
                assert (state[key][unchanged] != 0).any()


@pytest.mark.parametrize("optim_kind", OPTIMS)
def test_updates_keep_slots_in_row_major_order_and_state_follows_its_entry(digits, optim_kind):
    """After an update the slots are sorted by flat position (the sparse kernels read the values
    without a permutation); every kept entry keeps its own mean, scale, birth and Adam moments."""
    Xtr, ytr, _, _ = digits
    pyro.clear_param_store()
    model = BNN()
    guide = SparseSubspaceGuide(model, density=0.1)
    guide(Xtr[:8], ytr[:8])
    optim = make_optim(optim_kind, guide.parameters())
    svi = SSVI(model, guide, optim, pyro.infer.TraceMeanField_ELBO(), total_steps=100, update_every=5, addition="random")
    for _ in range(12):  # two updates: the second one reorders slots whose state is not fresh
        svi.step(Xtr[:64], ytr[:64])
    assert [h["step"] for h in svi.history] == [5, 10]

    def per_entry(name):
        loc, rho = guide.loc(name), guide.unconstrained_scale(name)
        states = [optimizer_state(optim, p) for p in (loc, rho)]
        columns = [c.detach() for c in [loc, rho, guide.entry_births(name)] + [st[k] for st in states for k in ("exp_avg", "exp_avg_sq")]]
        return {int(i): tuple(float(c[j]) for c in columns) for j, i in enumerate(guide.active_index(name).tolist())}

    before = {name: per_entry(name) for name in guide.site_names}
    svi.updater.update(15, svi.sparse_sites(), {}, svi.optim)
    moved = 0
    for name in guide.site_names:
        index = guide.active_index(name)
        assert bool((index[1:] > index[:-1]).all()), f"{name}: slots not in row-major order"
        assert guide.kernel_pattern(name).sorted
        after = per_entry(name)
        kept = set(before[name]) & set(after)
        assert 0 < len(kept) < len(after)
        assert all(after[i] == before[name][i] for i in kept)
        old_slot = {i: j for j, i in enumerate(before[name])}  # the dict is in slot order
        moved += sum(old_slot[i] != j for j, i in enumerate(index.tolist()) if i in kept)
    assert moved > 0  # the update did reorder slots, so the test checks the permutation


def test_new_scale_mean_uses_the_sites_mean_rho(digits):
    Xtr, ytr, _, _ = digits
    model, guide, svi = make_svi(addition="random", update_every=5)
    for _ in range(4):
        svi.step(Xtr[:64], ytr[:64])
    rho_mean = {n: guide.unconstrained_scale(n).mean().item() for n in guide.site_names}
    before = {n: guide.active_index(n).clone() for n in guide.site_names}
    svi.updater.update(5, svi.sparse_sites(), {}, svi.optim)
    for name in guide.site_names:
        changed = ~torch.isin(guide.active_index(name), before[name])  # the new entries
        assert changed.any()
        torch.testing.assert_close(guide.unconstrained_scale(name)[changed], torch.full((int(changed.sum()),), rho_mean[name]))


def test_reset_optimizer_state_for_sgd_momentum():
    p = torch.nn.Parameter(torch.ones(5))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(5)
    opt.step()
    reset_optimizer_state(opt, [p], torch.tensor([1, 3]))
    buf = opt.state[p]["momentum_buffer"]
    assert buf.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_gradient_addition_gets_the_dense_gradient(digits):
    Xtr, ytr, _, _ = digits
    seen = {}

    def addition(grad, candidates):
        seen[grad.numel()] = grad
        return grad.abs()

    model, guide, svi = make_svi(addition=addition, update_every=3)
    for _ in range(3):
        svi.step(Xtr[:64], ytr[:64])
    assert set(seen) == {6400, 1000}
    for name, numel in (("fc1.weight", 6400), ("fc2.weight", 1000)):
        inactive = ~guide.active_mask(name).reshape(-1)
        # the dense gradient is informative off the active set, which is what addition needs
        assert (seen[numel][inactive] != 0).any()


def test_callable_removal_criterion(digits):
    Xtr, ytr, _, _ = digits
    calls = []

    def removal(loc, scale):
        calls.append(loc.shape)
        return -loc.abs()  # remove the largest: a deliberately odd rule

    model, guide, svi = make_svi(removal=removal, update_every=2)
    before = guide
    for _ in range(2):
        svi.step(Xtr[:64], ytr[:64])
    assert calls == [torch.Size([640]), torch.Size([100])]
    assert before is guide


def test_removal_criterion_must_return_one_score_per_entry(digits):
    Xtr, ytr, _, _ = digits
    model, guide, svi = make_svi(removal=lambda loc, scale: loc[:3], update_every=1)
    with pytest.raises(ValueError, match="removal.*fc1.weight"):
        svi.step(Xtr[:64], ytr[:64])


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"update_every": 0}, "update_every"),
        ({"removal": "largest"}, "removal"),
        ({"addition": "dense"}, "addition"),
        ({"removal_fraction": 2.0}, "removal_fraction"),
        ({"total_steps": 0}, "total_steps"),
        ({"new_scale": -1.0}, "new_scale"),
    ],
)
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        make_svi(**kwargs)


def test_bad_guide_loss_and_optim():
    model = BNN()
    guide = SparseSubspaceGuide(model)
    with pytest.raises(ValueError, match="guide"):
        SSVI(model, pyro.infer.autoguide.AutoNormal(model), pyro.optim.Adam({}), pyro.infer.Trace_ELBO(), total_steps=5)
    with pytest.raises(ValueError, match="loss"):
        SSVI(model, guide, pyro.optim.Adam({}), lambda m, g: 0.0, total_steps=5)
    with pytest.raises(ValueError, match="optim"):
        SSVI(model, guide, "adam", pyro.infer.Trace_ELBO(), total_steps=5)


def test_non_finite_loss_names_step_and_sites(digits):
    Xtr, ytr, _, _ = digits
    model, guide, svi = make_svi()
    svi.step(Xtr[:32], ytr[:32])
    with torch.no_grad():
        guide.loc("fc2.weight")[3] = float("nan")
    before = guide.loc("fc1.weight").detach().clone()
    with pytest.raises(NonFiniteLossError, match=r"step 2: .*fc2\.weight \(loc\)") as err:
        svi.step(Xtr[:32], ytr[:32])
    assert "fc1.weight" not in str(err.value)
    assert torch.equal(before, guide.loc("fc1.weight"))  # the failed step changed nothing
    assert svi.step_count == 1


def test_non_finite_data_is_reported_too(digits):
    Xtr, ytr, _, _ = digits
    model, guide, svi = make_svi()
    X = Xtr[:32].clone()
    X[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="step 1"):
        svi.step(X, ytr[:32])


def test_evaluate_loss_does_not_change_parameters(digits):
    Xtr, ytr, _, _ = digits
    model, guide, svi = make_svi()
    svi.step(Xtr[:32], ytr[:32])
    before = {k: v.clone() for k, v in guide.state_dict().items() if torch.is_tensor(v)}
    loss = svi.evaluate_loss(Xtr[:32], ytr[:32])
    assert math.isfinite(loss)
    for k, v in before.items():
        assert torch.equal(guide.state_dict()[k], v)


class Regression(PyroModule):
    def __init__(self, prior, d=12):
        super().__init__()
        self.w = PyroSample(prior.expand([d]).to_event(1))

    def forward(self, x, y=None):
        mean = x @ self.w
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)


MIXTURE = dist.MixtureSameFamily(dist.Categorical(torch.tensor([0.7, 0.3])), dist.Normal(torch.zeros(2), torch.tensor([0.2, 2.0])))


@pytest.mark.parametrize(
    "prior",
    [dist.Normal(0.0, 0.7), dist.Laplace(0.1, 0.5), dist.StudentT(4.0, 0.0, 0.5), MIXTURE],
    ids=["normal", "laplace", "student-t", "scale-mixture"],
)
def test_trace_elbo_and_mean_field_elbo_agree_in_expectation(prior):
    torch.manual_seed(0)
    x, y = torch.randn(30, 12), torch.randn(30)
    model = Regression(prior)
    guide = SparseSubspaceGuide(model, density=0.25, init_scale=0.3, init_loc_fn=lambda site: torch.randn(12))
    guide(x, y)
    svi_mc = SSVI(model, guide, pyro.optim.Adam({}), pyro.infer.Trace_ELBO(), total_steps=1)
    svi_mf = SSVI(model, guide, pyro.optim.Adam({}), pyro.infer.TraceMeanField_ELBO(), total_steps=1)
    n = 2500
    mc = torch.tensor([svi_mc.evaluate_loss(x, y) for _ in range(n)])
    mf = torch.tensor([svi_mf.evaluate_loss(x, y) for _ in range(n)])
    se = (mc.var() / n + mf.var() / n).sqrt()
    assert abs(mc.mean() - mf.mean()) < 4 * se


def test_subspace_prior_drops_exactly_the_inactive_coordinates():
    x, y = torch.randn(30, 12), torch.randn(30)
    prior = dist.Laplace(0.1, 0.5)
    model = Regression(prior)
    guide = SparseSubspaceGuide(model, density=0.25)
    guide(x, y)
    guide_tr = pyro.poutine.trace(guide).get_trace(x, y)
    sub = pyro.poutine.trace(pyro.poutine.replay(subspace_prior(model, guide), guide_tr)).get_trace(x, y)
    assert isinstance(sub.nodes["w"]["fn"], SubspacePrior)
    dense = pyro.poutine.trace(pyro.poutine.replay(model, guide_tr)).get_trace(x, y)
    inactive = (~guide.active_mask("w")).sum()
    offset = inactive * prior.log_prob(torch.tensor(0.0))
    diff = dense.nodes["w"]["fn"].log_prob(guide_tr.nodes["w"]["value"]) - sub.nodes["w"]["fn"].log_prob(guide_tr.nodes["w"]["value"])
    torch.testing.assert_close(diff, offset)


def test_dense_grad_hook_sees_and_replaces_the_gradient(digits):
    Xtr, ytr, _, _ = digits
    seen = []

    def hook(name, grad):
        seen.append((name, grad.shape))
        forced = torch.zeros_like(grad)
        forced[7] = 1.0  # make position 7 the best candidate everywhere
        return forced

    model, guide, svi = make_svi(update_every=2, dense_grad_hook=hook)
    for _ in range(2):
        svi.step(Xtr[:64], ytr[:64])
    assert seen == [("fc1.weight", (6400,)), ("fc2.weight", (1000,))]
    for name in guide.site_names:  # kept, re-added or added: position 7 is active after the update
        assert guide.active_mask(name).reshape(-1)[7]
    with pytest.raises(ValueError, match="dense_grad_hook"):
        make_svi(dense_grad_hook=3)


@pytest.mark.parametrize("cls, kwargs", [
    (torch.optim.Adam, {}), (torch.optim.Adam, {"weight_decay": 0.1}), (torch.optim.AdamW, {"weight_decay": 0.1}),
    (torch.optim.Adam, {"foreach": True}), (torch.optim.Adam, {"fused": True}), (torch.optim.AdamW, {"fused": True, "weight_decay": 0.1}),
])
def test_fresh_adam_correction_makes_a_refilled_slot_a_fresh_adam(cls, kwargs):
    from pyro_ssvi import fresh_adam_correction

    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    grads = torch.randn(40, 5, generator=g)
    p = torch.nn.Parameter(torch.randn(5, generator=g))
    opt = cls([p], lr=0.05, **kwargs)
    births = torch.zeros(5, dtype=torch.int32)
    for t in range(30):
        p.grad = grads[t].clone()
        opt.step()
    reset_optimizer_state(opt, [p], torch.tensor([1, 3]))
    births[[1, 3]] = 30
    start = p.detach().clone()
    fresh = torch.nn.Parameter(start[[1, 3]].clone())
    fresh_opt = cls([fresh], lr=0.05, **kwargs)
    plain = p.detach().clone()
    for t in range(30, 40):
        p.grad = grads[t].clone()
        opt.step()
        n = fresh_adam_correction(opt, [p], births)
        assert n == 2
        fresh.grad = grads[t][[1, 3]].clone()
        fresh_opt.step()
        torch.testing.assert_close(p.detach()[[1, 3]], fresh.detach(), rtol=1e-6, atol=1e-6)
    # untouched slots followed the shared optimiser, uncorrected
    assert not torch.equal(p.detach()[[0, 2, 4]], plain[[0, 2, 4]])


@pytest.mark.parametrize("kind", ["foreach", "fused"])
def test_ssvi_trains_alike_under_every_implementation_of_torch_adam(digits, kind):
    """The multi-tensor and fused Adams (one kernel over every parameter: the README's fast settings) give
    the single-tensor Adam's run to float rounding: the same subspace updates (optimiser resets and the
    fresh-Adam correction included), losses and parameters."""
    Xtr, ytr, _, _ = digits

    def run(kind):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        model = BNN()
        guide = SparseSubspaceGuide(model, density=0.1)
        guide(Xtr[:8], ytr[:8])
        optim = make_optim(kind, guide.parameters())
        svi = SSVI(model, guide, optim, pyro.infer.TraceMeanField_ELBO(), total_steps=40, update_every=5)
        losses = [svi.step(Xtr[:64], ytr[:64]) for _ in range(17)]
        return losses, {n: (guide.active_index(n).clone(), guide.loc(n).detach().clone(), guide.scale(n).detach().clone())
                        for n in guide.site_names}, svi

    ref_losses, ref, _ = run("torch")
    losses, got, svi = run(kind)
    assert [h["step"] for h in svi.history] == [5, 10, 15]
    assert all(sum(h["swapped"].values()) > 0 for h in svi.history)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for name, (index, loc, scale) in ref.items():
        assert torch.equal(got[name][0], index), name
        torch.testing.assert_close(got[name][1], loc, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got[name][2], scale, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("t", [30, 20000])  # within Adam's bias-correction horizon, and past it (~13.8k steps)
def test_fresh_adam_correction_formula_and_settled_slots_untouched(t):
    """Young slots get lr * m * (c(t) - c(age)) exactly as written in the docstring (float64 reference);
    slots born at set-up, or longer ago than the horizon, are left bit for bit as Adam put them."""
    from pyro_ssvi import fresh_adam_correction

    g = torch.Generator(torch.get_default_device()).manual_seed(1)
    lr, eps, b1, b2 = 0.01, 1e-8, 0.9, 0.999
    p = torch.nn.Parameter(torch.randn(6, generator=g))
    opt = torch.optim.Adam([p], lr=lr, eps=eps)
    p.grad = torch.randn(6, generator=g)
    opt.step()
    state = opt.state[p]
    state["step"].fill_(t)  # as after t steps (the moments are whatever they are)
    births = torch.tensor([0, t - 1, t - 5, t - 20, max(t - 14000, 0), t - 3], dtype=torch.int32)
    young = torch.tensor([False, True, True, True, False, True])
    after_adam = p.detach().clone()
    n = fresh_adam_correction(opt, [p], births)
    assert n == int(young.sum())
    assert torch.equal(p.detach()[~young], after_adam[~young])
    m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()

    def update(age):
        return lr * m / (1 - b1**age) / ((v / (1 - b2**age)).sqrt() + eps)

    ages = (t - births).double()
    expected = after_adam.double() + update(torch.tensor(float(t))) - update(ages)
    torch.testing.assert_close(p.detach().double()[young], expected[young], rtol=1e-6, atol=1e-7)


def _first_step_over_lr(t, b1=0.9, b2=0.999):
    """Adam's first step / lr for zeroed moments under a shared step count t (eps ignored)."""
    return ((1 - b1) / (1 - b1**t)) / math.sqrt((1 - b2) / (1 - b2**t))


@pytest.mark.parametrize("mode", ["fresh", "zero"])
def test_first_step_of_a_refilled_slot_under_adam(digits, mode):
    """Fresh Adam's first step is lr * g / (|g| + eps) = lr. With zeroed moments and the shared
    step count t it is lr (1 - b1) / (1 - b1^t) / sqrt((1 - b2) / (1 - b2^t)): 0.51 lr at t = 21,
    1.98 lr at t = 501, 3.2 lr for large t."""
    Xtr, ytr, _, _ = digits
    lr = 1e-2
    model, guide, svi = make_svi(optim=pyro.optim.Adam({"lr": lr}), update_every=20, total_steps=200, optimizer_reset=mode)
    for _ in range(20):
        svi.step(Xtr[:256], ytr[:256])
    name = "fc1.weight"
    refilled = guide.entry_births(name) == 20
    assert refilled.sum() == svi.history[-1]["swapped"][name] > 0
    before = guide.loc(name).detach().clone()
    svi.step(Xtr[:256], ytr[:256])
    step = (guide.loc(name).detach() - before).abs()[refilled] / lr
    moved = step[step > 0]
    assert moved.numel() > 0.9 * refilled.sum()
    expected = 1.0 if mode == "fresh" else _first_step_over_lr(21)
    assert moved.median().item() == pytest.approx(expected, rel=0.01)


def test_optimizer_reset_is_checked():
    with pytest.raises(ValueError, match="optimizer_reset"):
        make_svi(optimizer_reset="keep")
