import contextlib
import importlib.util
import os

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroSample


def pytest_configure(config):
    """``PYRO_SSVI_TEST_DEVICE=cuda pytest`` runs the suite with tensors created on that device by default.

    Under pytest-xdist (the suite runs on 2 worker processes, see setup.cfg) each worker keeps to one
    torch thread, so that the workers do not oversubscribe the cores; ``PYRO_SSVI_TEST_THREADS=N`` sets
    another count (``-m determinism`` under 2 threads, for instance: results must not depend on it).
    """
    threads = os.environ.get("PYRO_SSVI_TEST_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    device = os.environ.get("PYRO_SSVI_TEST_DEVICE")
    if device:
        torch.set_default_device(device)
        # exactness tests compare kernels: no TF32 rounding in cuDNN convolutions or matmuls
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


class BNN(PyroModule):
    """The model of the README's usage example."""

    def __init__(self, d_in=64, hidden=100, d_out=10, prior_scale=1.0):
        super().__init__()
        self.fc1 = PyroModule[torch.nn.Linear](d_in, hidden)
        self.fc1.weight = PyroSample(dist.Normal(0.0, prior_scale).expand([hidden, d_in]).to_event(2))
        self.fc2 = PyroModule[torch.nn.Linear](hidden, d_out)
        self.fc2.weight = PyroSample(dist.Normal(0.0, prior_scale).expand([d_out, hidden]).to_event(2))

    def forward(self, x, y=None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


@pytest.fixture
def bnn():
    return BNN()


@pytest.fixture(scope="session")
def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    perm = torch.randperm(len(X), generator=g)
    X, y = X[perm], y[perm]
    return X[:1400], y[:1400], X[1400:], y[1400:]


def load_script(path, name):
    """Import a script (an example or a benchmark, not a package module) as the module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# exactness of the sparse kernels -----------------------------------------------------------
#: float32 sums in another order: a few ulps of the largest term, far below this
KERNEL_RTOL = 1e-5


def close(a, b, rtol=KERNEL_RTOL):
    """``|a - b| <= rtol * max |b|`` elementwise-max: the sparse and dense paths agree to float rounding."""
    return (a - b).abs().max() <= rtol * b.abs().max().clamp_min(1e-30)


def kernel_twins(model, x, density, kernels=lambda on: on):
    """``(sparse, dense)``: two guides of ``model`` with one state, set up on ``x``; their ``sparse_kernels``
    are ``kernels(True)`` and ``kernels(False)`` (by default ``True`` and ``False`` themselves)."""
    from pyro_ssvi import SparseSubspaceGuide

    guides = {}
    for on in (True, False):
        pyro.set_rng_seed(1)
        guides[on] = SparseSubspaceGuide(model, density=density, sparse_kernels=kernels(on), init_scale=0.1)
        guides[on](x)
    guides[True].load_state_dict(guides[False].state_dict())
    return guides[True], guides[False]


def elbo_pass(model, guide, x, y, elbo, lrt, seed, wrt):
    """``[loss, model.out, *gradients of the loss in wrt]`` of one ELBO pass with the noise of ``seed``
    (priors restricted to the guide's active sets; under the LRT messenger ``lrt`` when it is not ``None``)."""
    from pyro_ssvi.handlers import subspace_prior

    pyro.set_rng_seed(seed)
    with lrt if lrt is not None else contextlib.nullcontext():
        loss = elbo.differentiable_loss(subspace_prior(model, guide), guide, x, y)
    return [loss.detach(), model.out.detach(), *torch.autograd.grad(loss, wrt)]


def assert_same(sparse, dense):
    for s, d in zip(sparse, dense):
        assert close(s, d), (s, d)


def assert_sparse_matches_dense(monkeypatch, dense_pass, sparse_pass, seeds=3):
    """For each seed, ``sparse_pass(seed)`` (run with ``LinearPattern.dense`` forbidden, so no dense weight
    is formed) gives what ``dense_pass(seed)`` gives (lists of tensors, :func:`assert_same`). The first LRT
    pass only checks how a weight is used, hence several seeds."""
    from pyro_ssvi.kernels import LinearPattern

    for seed in range(seeds):
        dense = dense_pass(seed)
        with monkeypatch.context() as m:
            m.setattr(LinearPattern, "dense", lambda self, v: pytest.fail("dense weight materialised"))
            sparse = sparse_pass(seed)
        assert_same(sparse, dense)
