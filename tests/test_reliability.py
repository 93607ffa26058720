"""Nothing lost, every mistake named (library side): non-finite steps, data errors, all-or-nothing
checkpoint loading, kernel choices that are part of the saved state."""

import io

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from pyro.nn import PyroModule, PyroSample

from conftest import BNN
from pyro_ssvi import SSVI, NonFiniteLossError, SparseSubspaceGuide, kernels


def small_bnn():
    return BNN(d_in=6, hidden=8, d_out=3)


def data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def make(optim_kind, elbo, lrt=False, **guide_kwargs):
    model = small_bnn()
    guide = SparseSubspaceGuide(model, density=0.5, **guide_kwargs)
    x, y = data()
    if optim_kind == "pyro":
        optim = pyro.optim.Adam({"lr": 1e-2})
    else:
        guide(x, y)
        params = list(guide.parameters()) + list(model.parameters())
        optim = torch.optim.SGD(params, lr=0.1, momentum=0.9) if optim_kind == "sgd" else torch.optim.Adam(params, lr=1e-2)
    svi = SSVI(model, guide, optim, elbo, total_steps=10, update_every=2, local_reparameterization=lrt)
    return model, guide, svi, x, y


def tensors(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# non-finite gradients never reach the parameters ------------------------------------------
@pytest.mark.parametrize("optim_kind", ["pyro", "sgd", "adam"])
@pytest.mark.parametrize("elbo", [TraceMeanField_ELBO, Trace_ELBO], ids=["meanfield", "trace"])
@pytest.mark.parametrize("lrt", [False, True], ids=["weights", "lrt"])
def test_a_finite_loss_with_a_non_finite_gradient_changes_nothing(optim_kind, elbo, lrt):
    # a scale of 1e-20 underflows in the gradient of log sigma while the loss stays finite
    model, guide, svi, x, y = make(optim_kind, elbo(), lrt=lrt, init_scale=1e-20)
    svi.setup(x, y)  # set up, so there is a state to compare
    before = tensors(guide), tensors(model)
    for attempt in range(2):  # the first error left nothing behind: the second step fails alike
        with pytest.raises(NonFiniteLossError, match=r"step 1: .*gradient.*fc[12]\.weight .*no parameter was changed"):
            svi.step(x, y)
        assert same(tensors(guide), before[0]) and same(tensors(model), before[1])
        assert all(p.grad is None for p in guide.parameters())
    assert svi.step_count == 0


def test_a_non_finite_loss_changes_nothing_and_names_the_step():
    model, guide, svi, x, y = make("adam", Trace_ELBO())
    svi.step(x, y)
    before = tensors(guide)
    pyro.enable_validation(False)  # let the NaN input reach the loss (with validation, Pyro stops it earlier)
    try:
        with pytest.warns(UserWarning, match="NaN"), pytest.raises(NonFiniteLossError, match="step 2: the loss is nan"):
            svi.step(x * float("nan"), y)
    finally:
        pyro.enable_validation(True)
    assert same(tensors(guide), before)


def test_non_finite_input_is_not_called_a_learning_rate_problem():
    model, guide, svi, x, y = make("pyro", TraceMeanField_ELBO())
    with pytest.raises(NonFiniteLossError) as info:
        svi.step(x * float("nan"), y)
    text = str(info.value)
    assert "every guide parameter and gradient is finite" in text and "learning rate" not in text


# data errors are named as data errors ------------------------------------------------------
@pytest.mark.parametrize("bad", [7, -1])
@pytest.mark.parametrize("elbo", [TraceMeanField_ELBO, Trace_ELBO], ids=["meanfield", "trace"])
def test_a_label_out_of_range_is_pyros_own_support_error_at_the_site(bad, elbo):
    model, guide, svi, x, y = make("pyro", elbo())
    y = y.clone()
    y[3] = bad
    with pytest.raises(ValueError, match=r"(?s)site 'obs'.*within the support") as info:
        svi.step(x, y)
    assert not isinstance(info.value, NonFiniteLossError)


class CountModel(PyroModule):
    def __init__(self):
        super().__init__()
        self.w = PyroSample(dist.Normal(0.0, 1.0).expand([4]).to_event(1))

    def forward(self, x, y=None):
        rate = (x @ self.w).exp()
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("counts", dist.Poisson(rate), obs=y)


def test_a_negative_count_is_a_data_error_naming_the_site():
    model = CountModel()
    guide = SparseSubspaceGuide(model, density=0.5)
    svi = SSVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO(), total_steps=5)
    x, y = torch.randn(5, 4), torch.tensor([0.0, 1.0, -1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match=r"(?s)site 'counts'.*within the support") as info:
        svi.step(x, y)
    assert not isinstance(info.value, NonFiniteLossError)


# load_state_dict is all or nothing ---------------------------------------------------------
def set_up_guide(density=0.5, seed=0):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = small_bnn()
    guide = SparseSubspaceGuide(model, density=density)
    guide(*data())
    return guide


def corrupted(change):
    source = set_up_guide(seed=1)
    source.ssvi_step.fill_(7)
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in source.state_dict().items()}
    change(state)
    return state


def _other_density_for_fc2(state):
    other = set_up_guide(density={"fc1.weight": 0.5, "fc2.weight": 0.25}).state_dict()
    for part in ("locs", "unconstrained_scales", "indices", "births"):
        state[f"{part}.fc2.weight"] = other[f"{part}.fc2.weight"]


def _out_of_range(state):
    state["indices.fc1.weight"][0] = 10**6


def _repeated(state):
    index = state["indices.fc1.weight"]
    index[1] = index[0]


def _non_finite(state):
    state["locs.fc2.weight"][0] = float("nan")


def _missing(state):
    del state["births.fc2.weight"]


def _negative_birth(state):
    state["births.fc1.weight"][0] = -3


@pytest.mark.parametrize(
    "change, message",
    [
        (_other_density_for_fc2, "fc2.weight.*another density"),
        (_out_of_range, "site 'fc1.weight'.*out of range"),
        (_repeated, "site 'fc1.weight'.*repeat"),
        (_non_finite, "site 'fc2.weight'.*non-finite"),
        (_missing, "missing keys.*births.fc2.weight"),
        (_negative_birth, "site 'fc1.weight'.*negative birth"),
    ],
    ids=["size", "range", "duplicates", "nan", "missing", "births"],
)
def test_a_bad_state_dict_leaves_the_guide_exactly_as_it_was(change, message):
    state = corrupted(change)
    guide = set_up_guide()
    before = tensors(guide)
    with pytest.raises(ValueError, match=message):
        guide.load_state_dict(state)
    assert same(tensors(guide), before) and int(guide.ssvi_step) == 0


def test_a_sparse_part_of_a_guide_list_checks_its_state_before_copying():
    def build():
        pyro.clear_param_store()
        model = small_bnn()
        guide = AutoGuideList(model)
        guide.append(AutoNormal(pyro.poutine.block(model, hide=["fc1.weight"])))
        guide.append(SparseSubspaceGuide(pyro.poutine.block(model, expose=["fc1.weight"]), density=0.5))
        guide(*data())
        return guide

    state = dict(build().state_dict())
    state["1.indices.fc1.weight"] = state["1.indices.fc1.weight"].clone()
    state["1.indices.fc1.weight"][0] = -1
    guide = build()
    before = tensors(guide[1])
    with pytest.raises(ValueError, match="site 'fc1.weight'.*out of range"):
        guide.load_state_dict(state)
    assert same(tensors(guide[1]), before)


@pytest.mark.determinism
def test_a_checkpoint_without_kernel_choices_still_loads():
    state = set_up_guide(seed=1).state_dict()
    del state["_extra_state"]  # as written before kernel choices were saved
    guide = set_up_guide()
    guide.load_state_dict(state)
    assert torch.equal(guide.active_index("fc1.weight"), state["indices.fc1.weight"])


# kernel choices are part of the saved state -----------------------------------------------
def run(steps, start=None, measure=None, monkeypatch=None, then=0):
    """SSVI with a torch optimiser on module-local parameters, optionally resumed from ``start``:
    ``steps`` steps, a checkpoint, then ``then`` more steps; returns the guide and the checkpoint."""
    with pyro.settings.context(module_local_params=True):
        pyro.set_rng_seed(0)
        model = BNN()  # 64-100-10: sparse kernels and the dense product round differently
        guide = SparseSubspaceGuide(model, density=0.1)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
        guide(x, y)
        optim = torch.optim.Adam(list(guide.parameters()) + list(model.parameters()), lr=1e-2)
        svi = SSVI(model, guide, optim, TraceMeanField_ELBO(), total_steps=8, update_every=3, local_reparameterization=True)
        if start is not None:
            if measure is not None:
                monkeypatch.setattr(kernels, "measure", measure)
            model.load_state_dict(start["model"])
            guide.load_state_dict(start["guide"])
            optim.load_state_dict(start["optim"])
            svi.load_state_dict(start["svi"])
            torch.set_rng_state(start["rng"])
        for _ in range(steps):
            svi.step(x, y)
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "guide": guide.state_dict(), "optim": optim.state_dict(),
                    "svi": svi.state_dict(), "rng": torch.get_rng_state()}, buf)
        buf.seek(0)
        for _ in range(then):
            svi.step(x, y)
        return guide, torch.load(buf, weights_only=False)


@pytest.mark.determinism
def test_a_resumed_run_takes_the_measured_kernel_paths_whatever_it_would_measure_now(monkeypatch):
    uninterrupted, checkpoint = run(3, then=3)  # a checkpoint after step 3, and the run going on to step 6
    table = checkpoint["guide"]["_extra_state"]["kernel_decisions"]
    assert table and all(rows for rows in table.values())  # both sites measured at least one call shape

    def opposite(pattern, x2d, values, repeats=None):  # what a loaded machine might measure
        saved = {row["sparse"] for rows in table.values() for row in rows if row["rows"] == x2d.shape[0]}
        return {"sparse": not saved.pop() if len(saved) == 1 else True, "dense_s": 1.0, "sparse_s": 1.0}

    resumed, _ = run(3, start=checkpoint, measure=opposite, monkeypatch=monkeypatch)
    assert same(tensors(resumed), tensors(uninterrupted))
    assert resumed.kernel_decisions() == uninterrupted.kernel_decisions()

    # without the saved choices the opposite measurement would change the rounding: the check above has teeth
    checkpoint["guide"]["_extra_state"] = {"kernel_decisions": {}}
    differing, _ = run(3, start=checkpoint, measure=opposite, monkeypatch=monkeypatch)
    assert not same(tensors(differing), tensors(uninterrupted))


def test_kernel_decisions_can_be_fixed_by_hand_and_bad_tables_are_refused():
    guide = set_up_guide()
    row = {"rows": 12, "dtype": "torch.float32", "device": "cpu", "input_grad": True, "value_grad": True, "sparse": True}
    guide.set_kernel_decisions({"fc1.weight": [row]})
    assert guide.kernel_decisions() == {"fc1.weight": [row]}
    assert guide.state_dict()["_extra_state"] == {"allocation": "uniform", "kernel_decisions": {"fc1.weight": [row]}}
    with pytest.raises(ValueError, match="unknown site names.*nope"):
        guide.set_kernel_decisions({"nope": [row]})
    with pytest.raises(ValueError, match="site 'fc1.weight'.*sparse"):
        guide.set_kernel_decisions({"fc1.weight": [{"rows": 3}]})
