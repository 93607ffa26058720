import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn
from pyro.poutine.util import site_is_subsample
from torch.utils.flop_counter import FlopCounterMode

from pyro_ssvi import SSVI, SparseSubspaceGuide
from pyro_ssvi.cost import dense_guide_bytes, flops_report, guide_state_bytes, layer_flops
from pyro_ssvi.handlers import KLScaleMessenger
from pyro_ssvi.models import BayesianClassifier, ResNet18, bayesianize, cifar_resnet18, recalibrate_batchnorm


def small_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def test_bayesianize_defaults():
    net = bayesianize(small_net())
    x = torch.randn(2, 3, 8, 8)
    tr = pyro.poutine.trace(net).get_trace(x)
    sites = [n for n, s in tr.nodes.items() if s["type"] == "sample"]
    assert sites == ["0.weight", "4.weight"] and net.bayesian_sites == ("0.weight", "4.weight")
    assert isinstance(tr.nodes["0.weight"]["fn"].base_dist, dist.Normal)
    assert tr.nodes["0.weight"]["fn"].event_shape == (4, 3, 3, 3)
    names = {n for n, _ in net.named_parameters()}
    assert {"0.bias", "1.weight", "1.bias", "4.bias"} == names  # biases and batch norm stay deterministic


def test_bayesianize_prior_callable_include_exclude():
    seen = []

    def prior(name, shape):
        seen.append((name, shape))
        return dist.Laplace(0.0, 0.1).expand(shape).to_event(len(shape))

    net = bayesianize(small_net(), prior=prior, exclude=["4.*"])
    assert seen == [("0.weight", (4, 3, 3, 3))]
    tr = pyro.poutine.trace(net).get_trace(torch.randn(1, 3, 8, 8))
    assert isinstance(tr.nodes["0.weight"]["fn"].base_dist, dist.Laplace)
    net = bayesianize(small_net(), include=["*.bias"])
    assert net.bayesian_sites == ("0.bias", "1.bias", "4.bias")


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"prior": "normal"}, "prior"),
        ({"prior": dist.MultivariateNormal(torch.zeros(2), torch.eye(2))}, "prior"),
        ({"include": [nn.Linear, "*.bias"]}, "include"),
        ({"exclude": "4.weight"}, "exclude"),
        ({"include": [nn.LSTM]}, "include"),
    ],
)
def test_bayesianize_errors(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        bayesianize(small_net(), **kwargs)


def test_cifar_resnet18_structure():
    model = cifar_resnet18(num_classes=100, width=8)
    assert isinstance(model, BayesianClassifier)
    net = model.net
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert model.dense_sites == ("net.conv1.weight",)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2,))
    tr = pyro.poutine.trace(model).get_trace(x, y)
    latent = [n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]
    assert len(latent) == 21  # 17 3x3 convs of the blocks + stem, 3 shortcuts, the linear layer
    assert tr.nodes["obs"]["fn"].logits.shape == (2, 100)
    assert tr.nodes["net.conv1.weight"]["fn"].base_dist.scale.max() == 0.005
    plain = ResNet18(10, 64)
    assert sum(p.numel() for p in plain.parameters()) == pytest.approx(11.17e6, rel=0.01)


def test_classifier_scales_the_likelihood_to_the_data_set():
    model = cifar_resnet18(width=4, num_data=1000)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    tr = pyro.poutine.trace(model).get_trace(x, y)
    assert tr.nodes["obs"]["scale"] == pytest.approx(250.0)


def test_resnet_guide_keeps_the_first_convolution_dense():
    model = cifar_resnet18(width=8)
    guide = SparseSubspaceGuide(model, density=0.1, dense_sites=model.dense_sites)
    guide(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))
    assert guide.site_info("net.conv1.weight").full
    assert guide.site_info("net.linear.weight").k == 64


def resnet_with_guide(batch):
    """A width-8 ResNet-18, its guide at density 0.1 (first convolution dense), and an input batch."""
    model = cifar_resnet18(width=8)
    guide = SparseSubspaceGuide(model, density=0.1, dense_sites=model.dense_sites)
    x = torch.randn(batch, 3, 32, 32)
    guide(x, torch.randint(0, 10, (batch,)))
    return model, guide, x


def test_layer_flops_match_flop_counter():
    model, guide, x = resnet_with_guide(4)
    total, per_site = layer_flops(model, guide, x)
    with FlopCounterMode(display=False) as fc:
        ResNet18(10, 8)(x)
    assert total == fc.get_total_flops()
    assert set(per_site) == set(guide.site_names)
    # the stem: 2 * (4 * 8 * 32 * 32 outputs) * (3 * 3 * 3 fan-in)
    assert per_site["net.conv1.weight"] == 2 * 4 * 8 * 32 * 32 * 27
    assert sum(per_site.values()) <= total


def test_flops_report_formula():
    model, guide, x = resnet_with_guide(2)
    total, per_site = layer_flops(model, guide, x)
    rep = flops_report(model, guide, x, local_reparameterization=True, update_every=100)
    f_b = sum(per_site.values())
    dens = {s: guide.summary()[s]["density"] for s in per_site}
    expect = 3 * (total - f_b + 2 * sum(dens[s] * f for s, f in per_site.items())) + sum((1 - dens[s]) * f for s, f in per_site.items()) / 100
    assert rep["train_flops_per_step"] == pytest.approx(expect)
    assert rep["dense_vi_train_flops_per_step"] == 3 * (total + f_b)
    assert rep["inference_flops"] == pytest.approx(total - f_b + sum(dens[s] * f for s, f in per_site.items()))
    assert rep["dense_inference_flops"] == total
    ws = flops_report(model, guide, x, local_reparameterization=False, gradient_addition=False)
    assert ws["dense_vi_train_flops_per_step"] == 3 * total
    assert ws["train_flops_per_step"] < 0.15 * ws["dense_vi_train_flops_per_step"]


def test_guide_bytes_count_optimiser_state():
    model = cifar_resnet18(width=4)
    guide = SparseSubspaceGuide(model, density=0.1)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    guide(x, y)
    k = guide.active_params
    assert guide_state_bytes(guide) == k * 4 * 2 + k * 4 * 2 + 8  # loc, rho (float32), index and birth (int32), step
    opt = torch.optim.Adam(guide.parameters(), lr=1e-3)
    svi = SSVI(model, guide, opt, pyro.infer.TraceMeanField_ELBO(), total_steps=1)
    svi.step(x, y)
    n_params = len(list(guide.parameters()))
    assert guide_state_bytes(guide, opt) == k * 4 * 2 + k * 4 * 2 + 8 + 2 * k * 4 * 2 + n_params * 4
    assert dense_guide_bytes(guide, opt) == guide.dense_params * 4 * 2 * 3


def test_kl_scale_messenger_scales_only_latent_sites():
    model = cifar_resnet18(width=4)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    with KLScaleMessenger(0.25):
        tr = pyro.poutine.trace(model).get_trace(x, y)
    assert tr.nodes["net.conv1.weight"]["scale"] == 0.25 and tr.nodes["obs"]["scale"] == 1.0
    guide = SparseSubspaceGuide(model, density=0.1)
    guide(x, y)
    elbo = pyro.infer.TraceMeanField_ELBO()
    # with a deterministic likelihood term the difference is exactly (1 - 0.25) * KL
    pyro.set_rng_seed(0)
    full = elbo.loss(model, guide, x, y)
    pyro.set_rng_seed(0)
    with KLScaleMessenger(0.25):
        quarter = elbo.loss(model, guide, x, y)
    pyro.set_rng_seed(0)
    with KLScaleMessenger(0.0):
        nokl = elbo.loss(model, guide, x, y)
    assert full - nokl == pytest.approx(4 * (quarter - nokl), rel=1e-4)


def test_recalibrate_batchnorm_uses_the_posterior_mean():
    model = cifar_resnet18(width=4)
    guide = SparseSubspaceGuide(model, density=0.2, init_scale=0.1)
    x = torch.randn(16, 3, 32, 32)
    guide(x, torch.randint(0, 10, (16,)))
    n = recalibrate_batchnorm(model, guide, [x[:8], x[8:]])
    assert n == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    bn = model.net.bn1
    conv_out = torch.nn.functional.conv2d(x, guide.median()["net.conv1.weight"], padding=1)
    torch.testing.assert_close(bn.running_mean, conv_out.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and model.training


def test_priors_follow_the_model_to_its_device_and_dtype():
    """model.to(device) moves the priors too (a fixed PyroSample distribution would stay on the CPU)."""
    import pyro
    import pyro.distributions as dist

    from pyro_ssvi import cifar_resnet18
    from pyro_ssvi.models import BayesianClassifier, bayesianize

    model = cifar_resnet18(num_classes=10, width=4).to("meta")
    x, y = torch.empty(2, 3, 8, 8, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")
    with pyro.validation_enabled(False):  # validation reads values, which meta tensors have none of
        tr = pyro.poutine.trace(model).get_trace(x, y)
    weights = [n for n, site in tr.nodes.items() if site["type"] == "sample" and not site["is_observed"]]
    assert weights and all(tr.nodes[n]["value"].device.type == "meta" for n in weights)
    assert not any("anchor" in k for k in model.state_dict())  # checkpoints are unchanged
    prior = dist.MixtureSameFamily(dist.Categorical(torch.tensor([0.5, 0.5])), dist.StudentT(3.0, torch.zeros(2), torch.tensor([0.1, 1.0])))
    net = BayesianClassifier(bayesianize(torch.nn.Linear(3, 2), prior)).to(torch.float64)
    tr = pyro.poutine.trace(net).get_trace(torch.randn(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    assert tr.nodes["net.weight"]["value"].dtype == torch.float64


# pretrained values ------------------------------------------------------------------------------


def _latent_sites(model, *args):
    tr = pyro.poutine.trace(model).get_trace(*args)
    return [n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]


@pytest.fixture
def pretrained_resnet():
    """A torchvision ResNet-18 (random init: the point is the values), bayesianized, with a copy of its weights."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net = resnet18(weights=None, num_classes=10)
    original = {k: v.detach().clone() for k, v in net.named_parameters()}
    return bayesianize(net), original


def test_pretrained_values_are_the_replaced_weights(pretrained_resnet):
    import copy

    from pyro_ssvi import pretrained_values

    net, original = pretrained_resnet
    values = pretrained_values(net)
    assert list(values) == list(net.bayesian_sites) and len(values) == 21  # 20 convolutions and fc
    for name, value in values.items():
        assert torch.equal(value, original[name]) and value.dtype == original[name].dtype  # bit for bit
        assert not value.requires_grad
    assert not any("pretrained" in k for k in net.state_dict())  # checkpoints are not doubled
    assert not any("pretrained" in k for k, _ in net.named_parameters())  # no optimiser sees them
    x = torch.randn(2, 3, 32, 32)
    assert _latent_sites(copy.deepcopy(net), x) == list(values)  # the names are the sample sites'
    model = BayesianClassifier(net)
    prefixed = pretrained_values(model)
    assert list(prefixed) == [f"net.{n}" for n in values]
    assert all(prefixed[f"net.{n}"] is values[n] for n in values)  # the same stored tensors
    assert _latent_sites(model, x, torch.zeros(2, dtype=torch.long)) == list(prefixed)
    # a submodule reports its sites by its own paths (pass the model the guide traces)
    assert list(pretrained_values(model.net.layer1)) == [n[len("net.layer1."):] for n in prefixed if n.startswith("net.layer1.")]


def test_guide_starts_at_the_pretrained_weights(pretrained_resnet):
    from pyro.infer.autoguide.initialization import init_to_value

    from pyro_ssvi import pretrained_init, pretrained_values

    net, original = pretrained_resnet
    model = BayesianClassifier(net)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    for init in (init_to_value(values=pretrained_values(model)), pretrained_init(model)):
        pyro.clear_param_store()
        guide = SparseSubspaceGuide(model, density=1.0, init_loc_fn=init)
        guide(x, y)
        median = guide.median()
        assert set(median) == {f"net.{n}" for n in net.bayesian_sites}
        for name, value in median.items():
            assert torch.equal(value, original[name[len("net.") :]])


def test_pretrained_values_follow_dtype_device_copies_and_pickles():
    import copy
    import pickle

    from pyro_ssvi import pretrained_values

    torch.manual_seed(0)
    plain = small_net()
    w0, w4 = plain[0].weight.detach().clone(), plain[4].weight.detach().clone()
    model = BayesianClassifier(bayesianize(plain))
    model.to(torch.float64)
    values = pretrained_values(model)
    assert all(v.dtype == torch.float64 for v in values.values())
    assert torch.equal(values["net.0.weight"], w0.double()) and torch.equal(values["net.4.weight"], w4.double())
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        got = pretrained_values(clone)
        assert list(got) == ["net.0.weight", "net.4.weight"]
        assert all(torch.equal(got[k], values[k]) and got[k].data_ptr() != values[k].data_ptr() for k in got)
        out = clone(torch.randn(2, 3, 8, 8, dtype=torch.float64))  # still a working model
        assert out.shape == (2, 5)
    meta = copy.deepcopy(model).to("meta")
    assert all(v.device.type == "meta" for v in pretrained_values(meta).values())


def test_pretrained_values_are_a_copy_and_can_be_dropped():
    from pyro_ssvi import clear_pretrained_values, pretrained_init, pretrained_values

    plain = nn.Linear(3, 2)
    param = plain.weight
    original = param.detach().clone()
    net = bayesianize(plain)
    with torch.no_grad():
        param.add_(1.0)  # the old Parameter, still held by the caller, changes; the kept value does not
    assert torch.equal(pretrained_values(net)["weight"], original)
    assert clear_pretrained_values(net) == 1 and pretrained_values(net) == {}
    assert not hasattr(net, "_pretrained_weight")
    with pytest.raises(ValueError, match="net"):
        pretrained_init(net)
    assert pretrained_values(bayesianize(nn.Linear(3, 2), keep_values=False)) == {}
    with pytest.raises(ValueError, match="net"):
        pretrained_values("not a module")
    with pytest.raises(ValueError, match="fallback"):
        pretrained_init(bayesianize(nn.Linear(3, 2)), fallback=1.0)


def test_pretrained_init_falls_back_for_other_sites():
    from pyro.nn import PyroSample

    from pyro_ssvi import pretrained_init

    net = bayesianize(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), include=["0.weight"])
    net[1].weight = PyroSample(dist.Normal(0.0, 1.0).expand([2, 4]).to_event(2))  # a site bayesianize did not make
    model = BayesianClassifier(net)
    guide = SparseSubspaceGuide(model, density=1.0, init_loc_fn=pretrained_init(model))
    guide(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
    median = guide.median()
    assert torch.equal(median["net.0.weight"], net[0]._pretrained_weight)
    assert median["net.1.weight"].abs().max() < 0.1  # init_to_normal: N(0, 0.01^2)
