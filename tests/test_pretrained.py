"""Starting a sparse posterior from given values: the magnitude subspace (and MOPED scales)."""

import io

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from pyro.infer.autoguide.initialization import init_to_value
from pyro.nn import PyroModule, PyroSample

from conftest import BNN
from pyro_ssvi import BayesianClassifier, SparseSubspaceGuide, bayesianize, pretrained_values


def values_with_ties(seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(100, 64, generator=g)
    w1.view(-1)[:10] = 5.0  # ten tied largest magnitudes (with signs mixed below)
    w1.view(-1)[5:10] = -5.0
    w2 = torch.randn(10, 100, generator=g)
    return {"fc1.weight": w1, "fc2.weight": w2}


def top_k_positions(w, k):
    """The k largest |w| by flat position, ties to the lower position (a reference written out)."""
    flat = w.reshape(-1).abs().tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    return sorted(order[:k])


def magnitude_guide(values, density=0.1, **kwargs):
    pyro.clear_param_store()  # guides of one class share names in Pyro's param store
    model = BNN()
    guide = SparseSubspaceGuide(model, density=density, init_loc_fn=init_to_value(values=values), init_subspace="magnitude", **kwargs)
    guide(torch.randn(3, 64), torch.zeros(3, dtype=torch.long))
    return model, guide


def test_the_active_set_is_the_top_k_magnitudes_and_the_means_the_values():
    values = values_with_ties()
    _, guide = magnitude_guide(values, density={"fc1.weight": 0.1, "fc2.weight": 0.05})
    for name, w in values.items():
        k = guide.site_info(name).k
        assert guide.active_index(name).tolist() == top_k_positions(w, k)
        median = guide.median()[name]
        mask = guide.active_mask(name)
        assert torch.equal(median[mask], w[mask]) and torch.equal(median[~mask], torch.zeros_like(w[~mask]))
    # ties at the boundary go to the lower positions: with k = 5 of the 10 tied entries, the first five
    _, few = magnitude_guide(values, density={"fc1.weight": 5 / 6400})
    assert few.active_index("fc1.weight").tolist() == [0, 1, 2, 3, 4]


def test_a_random_subspace_is_still_the_default():
    values = values_with_ties()
    model = BNN()
    guide = SparseSubspaceGuide(model, density=0.1, init_loc_fn=init_to_value(values=values))
    guide(torch.randn(3, 64), torch.zeros(3, dtype=torch.long))
    assert guide.init_subspace == "random"
    assert guide.active_index("fc1.weight").tolist() != top_k_positions(values["fc1.weight"], 640)


def test_a_checkpoint_round_trip_keeps_the_magnitude_subspace():
    values = values_with_ties()
    _, guide = magnitude_guide(values)
    buf = io.BytesIO()
    torch.save(guide.state_dict(), buf)
    buf.seek(0)
    pyro.clear_param_store()
    fresh = SparseSubspaceGuide(BNN(), density=0.1)  # a random start, overwritten by the checkpoint
    fresh(torch.randn(3, 64), torch.zeros(3, dtype=torch.long))
    fresh.load_state_dict(torch.load(buf))
    for name in values:
        assert torch.equal(fresh.active_index(name), guide.active_index(name))
        assert torch.equal(fresh.median()[name], guide.median()[name])


def test_moped_scales_are_relative_to_the_magnitude():
    values = values_with_ties()
    _, guide = magnitude_guide(values, relative_init_scale=0.1)
    for name in values:
        torch.testing.assert_close(guide.scale(name), (0.1 * guide.loc(name).abs()).clamp_min(1e-8), rtol=1e-5, atol=0)


def test_a_guide_list_with_a_magnitude_part():
    class Hier(PyroModule):
        def __init__(self):
            super().__init__()
            self.w = PyroSample(dist.Normal(0.0, 1.0).expand([20]).to_event(1))

        def forward(self, x):
            tau = pyro.sample("tau", dist.HalfNormal(1.0))
            mean = x @ self.w
            with pyro.plate("data", x.shape[0]):
                pyro.sample("y", dist.Normal(mean, tau), obs=torch.zeros(x.shape[0]))

    w = torch.linspace(-1, 1, 20)
    model = Hier()
    guide = AutoGuideList(model)
    guide.append(AutoNormal(pyro.poutine.block(model, hide=["w"])))
    sparse = SparseSubspaceGuide(pyro.poutine.block(model, expose=["w"]), density=0.2,
                                 init_loc_fn=init_to_value(values={"w": w}), init_subspace="magnitude")
    guide.append(sparse)
    guide(torch.randn(4, 20))
    assert sparse.active_index("w").tolist() == top_k_positions(w, 4) == [0, 1, 18, 19]


def test_a_torchvision_network_starts_on_its_largest_weights():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    original = {f"net.{n}": p.detach().clone() for n, p in net.named_parameters() if n.endswith("weight") and p.dim() > 1}
    model = BayesianClassifier(bayesianize(net, prior=dist.Normal(0.0, 1.0)))
    guide = SparseSubspaceGuide(model, density=0.05, init_loc_fn=init_to_value(values=pretrained_values(model)),
                                init_subspace="magnitude", sparse_kernels=False)
    model.eval()
    guide(torch.randn(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    assert set(guide.site_names) == set(original)
    for name in ("net.conv1.weight", "net.layer4.1.conv2.weight", "net.fc.weight"):
        w, index = original[name], guide.active_index(name)
        assert torch.equal(index, torch.argsort(w.reshape(-1).abs(), descending=True, stable=True)[: index.numel()].sort().values.to(index))
        assert torch.equal(guide.loc(name), w.reshape(-1)[index.long()])


@pytest.mark.parametrize("kwargs, message", [({"init_subspace": "largest"}, "init_subspace"),
                                             ({"relative_init_scale": -1.0}, "relative_init_scale")])
def test_bad_start_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseSubspaceGuide(BNN(), density=0.1, **kwargs)
