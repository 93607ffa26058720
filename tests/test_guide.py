import io

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoGuide
from pyro.nn import PyroModule, PyroSample

from conftest import BNN
from pyro_ssvi import SSVI, SparseSubspaceGuide


def x_y(n=8):
    return torch.randn(n, 64), torch.randint(0, 10, (n,))


def setup_guide(model=None, **kwargs):
    pyro.clear_param_store()  # two guides of one class share names in Pyro's global param store
    model = model or BNN()
    guide = SparseSubspaceGuide(model, **kwargs)
    guide(*x_y())
    return model, guide


def test_is_an_autoguide_with_compact_storage():
    model, guide = setup_guide(density=0.1)
    assert isinstance(guide, AutoGuide)
    assert guide.site_names == ("fc1.weight", "fc2.weight")
    assert guide.active_index("fc1.weight").shape == (640,)
    assert guide.loc("fc2.weight").shape == (100,)
    assert guide.unconstrained_scale("fc2.weight").shape == (100,)
    # nothing of dense size: every stored tensor has k entries (or is the step counter); beside them, the
    # allocation and the measured kernel choices (extra state, none measured yet)
    state = guide.state_dict()
    assert state["_extra_state"] == {"allocation": "uniform", "kernel_decisions": {}}
    sizes = sorted(t.numel() for t in state.values() if torch.is_tensor(t))
    assert sizes == [1, 100, 100, 100, 100, 640, 640, 640, 640]  # indices, births, loc, rho per site
    assert guide.prototype_trace is None
    assert guide.active_params == 740 and guide.dense_params == 7400
    assert "fc1.weight" in guide.summary_table()
    assert guide.summary()["fc2.weight"] == {"active": 100, "numel": 1000, "density": 0.1, "shape": (10, 100), "dense": None}


def test_initial_active_sets_are_random_per_site():
    _, g1 = setup_guide(density=0.1)
    pyro.set_rng_seed(1)
    _, g2 = setup_guide(density=0.1)
    i1, i2 = g1.active_index("fc1.weight"), g2.active_index("fc1.weight")
    assert i1.unique().numel() == 640 and not torch.equal(i1, i2)


def test_samples_median_quantiles_and_mask():
    model, guide = setup_guide(density=0.25)
    mask = guide.active_mask("fc1.weight")
    assert mask.shape == (100, 64) and mask.sum() == 1600
    sample = guide(*x_y())["fc1.weight"]
    assert (sample[~mask] == 0).all()
    med = guide.median()["fc1.weight"]
    assert (med[~mask] == 0).all() and torch.equal(med[mask], guide.loc("fc1.weight")[guide.active_index("fc1.weight").argsort()])
    q = guide.quantiles([0.1, 0.5, 0.9])["fc2.weight"]
    assert q.shape == (3, 10, 100)
    m2 = guide.active_mask("fc2.weight")
    assert (q[:, ~m2] == 0).all()
    torch.testing.assert_close(q[1], guide.median()["fc2.weight"])
    assert (q[0][m2] < q[1][m2]).all() and (q[2][m2] > q[1][m2]).all()


def test_density_mapping_and_dense_sites():
    _, guide = setup_guide(density={"fc1.weight": 0.05}, dense_sites=())
    assert guide.site_info("fc1.weight").k == 320 and guide.site_info("fc2.weight").k == 1000
    _, guide = setup_guide(density=0.1, dense_sites=["fc1.weight"])
    assert guide.site_info("fc1.weight").k == 6400
    assert guide.sparse_site_names() == ("fc2.weight",)


def test_state_dict_round_trip_includes_active_sets():
    model, guide = setup_guide(density=0.1)
    with torch.no_grad():
        guide.loc("fc1.weight").add_(1.0)
    guide.replace_entries("fc1.weight", torch.tensor([0, 1]), torch.tensor([6398, 6399]), 0.5, -3.0, step=7)
    buf = io.BytesIO()
    torch.save(guide.state_dict(), buf)
    pyro.clear_param_store()
    pyro.set_rng_seed(123)
    fresh = SparseSubspaceGuide(BNN(), density=0.1)
    with pytest.raises(RuntimeError, match="not set up"):
        fresh.load_state_dict(guide.state_dict())
    fresh(*x_y())
    assert not torch.equal(fresh.active_index("fc1.weight"), guide.active_index("fc1.weight"))
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    for name in guide.site_names:
        assert torch.equal(fresh.median()[name], guide.median()[name])
        assert torch.equal(fresh.active_mask(name), guide.active_mask(name))
        assert torch.equal(fresh.entry_births(name), guide.entry_births(name))
    assert fresh.entry_births("fc1.weight")[:2].tolist() == [7, 7] and fresh.entry_births("fc1.weight")[2:].eq(0).all()


def test_load_state_dict_rejects_out_of_range_indices():
    _, guide = setup_guide(density=0.1)
    state = guide.state_dict()
    state["indices.fc2.weight"] = state["indices.fc2.weight"].clone()
    state["indices.fc2.weight"][0] = 10**6
    with pytest.raises(ValueError, match="fc2.weight"):
        guide.load_state_dict(state)


def test_module_local_params_with_a_torch_optimizer(digits):
    Xtr, ytr, _, _ = digits
    with pyro.settings.context(module_local_params=True):
        model = BNN()
        guide = SparseSubspaceGuide(model, density=0.1)
        elbo = pyro.infer.TraceMeanField_ELBO()(model, guide)
        elbo(Xtr[:32], ytr[:32])
        assert len(pyro.get_param_store()) == 0
        optim = torch.optim.Adam(elbo.parameters(), lr=1e-2)
        svi = SSVI(model, guide, optim, elbo, total_steps=40, update_every=10)
        before = guide.loc("fc1.weight").detach().clone()
        losses = [svi.step(Xtr[:128], ytr[:128]) for _ in range(40)]
        assert len(svi.history) == 2  # steps 10, 20 (stop at 30)
        assert not torch.equal(before, guide.loc("fc1.weight"))
        assert losses[-1] < losses[0]
        with pytest.raises(ValueError, match="module_local_params"):
            SSVI(model, guide, pyro.optim.Adam({"lr": 0.1}), elbo, total_steps=5)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, "half", True])
def test_bad_density(density):
    with pytest.raises(ValueError, match="density"):
        SparseSubspaceGuide(BNN(), density=density)


def test_bad_init_scale_and_transform():
    with pytest.raises(ValueError, match="init_scale"):
        SparseSubspaceGuide(BNN(), init_scale=-1.0)
    with pytest.raises(ValueError, match="scale_transform"):
        SparseSubspaceGuide(BNN(), scale_transform="relu")


def test_unknown_site_names():
    with pytest.raises(ValueError, match="fc3.weight"):
        setup_guide(density={"fc3.weight": 0.1})
    with pytest.raises(ValueError, match="conv.weight"):
        setup_guide(dense_sites=["conv.weight"])


def test_model_without_latent_sites():
    def model(x):
        pyro.sample("obs", dist.Normal(0.0, 1.0), obs=x)

    with pytest.raises(ValueError, match="no latent sample site"):
        SparseSubspaceGuide(model)(torch.zeros(()))


def test_a_site_with_a_constrained_support_is_dense_and_stays_in_its_support():
    def model():
        pyro.sample("rate", dist.Gamma(2.0, 2.0).expand([5]).to_event(1))

    guide = SparseSubspaceGuide(model)
    assert (guide()["rate"] > 0).all()
    assert guide.summary()["rate"]["dense"] == "support IndependentConstraint(GreaterThanEq(lower_bound=0.0), 1) is not real"
    assert guide.sparse_site_names() == () and guide.active_params == 5


def test_a_non_factorised_prior_is_dense_and_a_mapping_cannot_make_it_sparse():
    def model():
        pyro.sample("w", dist.MultivariateNormal(torch.zeros(10), torch.eye(10)))

    guide = SparseSubspaceGuide(model, density=0.5)
    assert guide()["w"].shape == (10,) and guide.summary()["w"]["dense"] == "prior MultivariateNormal is not factorised over coordinates"
    with pytest.raises(ValueError, match=r"density: site 'w' cannot be sparse \(prior MultivariateNormal is not factorised.*density 1"):
        SparseSubspaceGuide(model, density={"w": 0.5})()


def test_site_with_batch_shape_asks_for_to_event():
    def model():
        pyro.sample("w", dist.Normal(torch.zeros(4), 1.0))

    with pytest.raises(ValueError, match="'w'.*to_event"):
        SparseSubspaceGuide(model, density=0.5)()


def test_scale_initialisation_and_exp_transform():
    _, guide = setup_guide(density=0.1, init_scale=0.05, scale_transform="exp")
    torch.testing.assert_close(guide.scale("fc2.weight"), torch.full((100,), 0.05))
    _, guide = setup_guide(density=0.1)
    s = guide.scale("fc1.weight")
    # |N(6e-4, 5e-4^2)|: mean of 640 draws within 5 standard errors
    assert abs(s.mean().item() - 6.4e-4) < 5 * 5e-4 / 640**0.5 + 1e-4


class ConvNet(PyroModule):
    def __init__(self):
        super().__init__()
        self.conv = PyroModule[torch.nn.Conv2d](1, 4, 3)
        self.conv.weight = PyroSample(dist.Normal(0.0, 1.0).expand([4, 1, 3, 3]).to_event(4))

    def forward(self, x):
        return self.conv(x).sum()


def test_nested_site_names_and_state_dict_keys():
    model = ConvNet()
    guide = SparseSubspaceGuide(model, density=0.5)
    guide(torch.randn(2, 1, 5, 5))
    keys = set(guide.state_dict())
    assert {"indices.conv.weight", "births.conv.weight", "locs.conv.weight", "unconstrained_scales.conv.weight", "ssvi_step",
            "_extra_state"} == keys
    assert guide.site_info("conv.weight").k == 18


def test_dense_sites_store_no_index():
    _, guide = setup_guide(density=1.0)
    from pyro_ssvi.cost import guide_state_bytes

    assert guide.state_dict()["indices.fc1.weight"].numel() == 0
    assert torch.equal(guide.active_index("fc1.weight"), torch.arange(6400))
    assert guide.active_mask("fc1.weight").all()
    assert guide_state_bytes(guide) == 7400 * 4 * 2 + 8  # loc and rho per weight, plus the step counter
    state = guide.state_dict()
    state["indices.fc1.weight"] = torch.arange(5)
    with pytest.raises(ValueError, match="indices.fc1.weight"):  # checked before anything is copied
        guide.load_state_dict(state)


def test_the_step_count_is_read_from_the_device_only_when_the_buffer_changed(monkeypatch):
    """guide.step after advance_step() answers from the host (no device read per training step), and
    follows writes, loads, copies and moves of the buffer."""
    import copy

    _, guide = setup_guide(density=0.5)
    reads = []
    real = torch.Tensor.__int__
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: (reads.append(t.shape), real(t))[1])
    assert guide.step == 0 and len(reads) == 1
    for n in range(1, 4):
        guide.advance_step()
        assert guide.step == n
    assert len(reads) == 1  # counted on the host
    state = copy.deepcopy(guide.state_dict())  # state_dict() tensors alias the buffers
    with torch.no_grad():
        guide.ssvi_step.fill_(10)
    assert guide.step == 10 and len(reads) == 2
    guide.load_state_dict(state)
    assert guide.step == 3
    copied = copy.deepcopy(guide)
    guide.advance_step()
    assert copied.step == 3 and guide.step == 4
    guide.to(torch.device("cpu"), torch.float64)
    assert guide.step == 4
    guide.ssvi_step = torch.tensor(7)  # a new buffer tensor (as a move to another device makes)
    assert guide.step == 7
