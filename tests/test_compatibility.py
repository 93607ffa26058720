"""What SSVI composes with: ELBO x prior x guide x particles x local reparameterisation.

Every combination either trains (a few steps with two subspace updates that really swap
entries) or raises a ``ValueError`` naming what is wrong, at construction or on the first
step. The README's compatibility table is rendered from :func:`expected`;
``python tests/test_compatibility.py`` prints it, and a test checks the README holds it.
"""

import pathlib
import re
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from pyro.nn import PyroModule, PyroSample

from pyro_ssvi import SSVI, SparseSubspaceGuide

ELBOS = {
    "Trace_ELBO": lambda **kw: pyro.infer.Trace_ELBO(**kw),
    "TraceMeanField_ELBO": lambda **kw: pyro.infer.TraceMeanField_ELBO(**kw),
    "TraceGraph_ELBO": lambda **kw: pyro.infer.TraceGraph_ELBO(**kw),
    "RenyiELBO": lambda **kw: pyro.infer.RenyiELBO(alpha=0.5, **kw),
    "TraceTailAdaptive_ELBO": lambda **kw: pyro.infer.TraceTailAdaptive_ELBO(**kw),
    "JitTrace_ELBO": lambda **kw: pyro.infer.JitTrace_ELBO(**kw),
    "JitTraceMeanField_ELBO": lambda **kw: pyro.infer.JitTraceMeanField_ELBO(**kw),
}
PRIORS = ("Normal", "Laplace", "StudentT", "scale mixture", "hierarchical")
GUIDES = ("sparse alone", "in AutoGuideList")
PARTICLES = ("1", "3 vectorised")
LRT = (False, True)
WEIGHTS = ("fc1.weight", "fc2.weight")


def expected(elbo, prior, guide, particles, lrt):
    """``None`` if the combination trains, else a regex the ``ValueError`` it raises matches."""
    if elbo.startswith("Jit"):
        return rf"loss: SSVI cannot train with {elbo}: the JIT compiles the loss once"
    if elbo == "TraceTailAdaptive_ELBO" and particles == "1":
        return r"loss: TraceTailAdaptive_ELBO needs num_particles > 1 and vectorize_particles=True"
    return None


def scalar_prior(prior):
    return {
        "Normal": dist.Normal(0.0, 1.0),
        "Laplace": dist.Laplace(0.0, 1.0),
        "StudentT": dist.StudentT(3.0, 0.0, 1.0),
        "scale mixture": dist.MixtureSameFamily(
            dist.Categorical(torch.tensor([0.5, 0.5])), dist.Normal(torch.zeros(2), torch.tensor([0.1, 1.0]))
        ),
    }[prior]


class Net(PyroModule):
    """Two linear layers; the bias of the first is latent too (a dense site / an AutoNormal site).

    ``hierarchical``: a global scale ``tau ~ HalfCauchy(1)`` and per-row scales
    ``lam ~ HalfCauchy(1)``: ``fc1.weight ~ Normal(0, tau * lam_row)``, ``fc2.weight ~ Normal(0, tau)``.
    """

    def __init__(self, prior):
        super().__init__()
        self.fc1 = PyroModule[torch.nn.Linear](5, 6)
        self.fc2 = PyroModule[torch.nn.Linear](6, 3)
        self.fc1.bias = PyroSample(dist.Normal(0.0, 1.0).expand([6]).to_event(1))
        if prior == "hierarchical":
            self.tau = PyroSample(dist.HalfCauchy(1.0))
            self.lam = PyroSample(dist.HalfCauchy(1.0).expand([6, 1]).to_event(2))
            # written for Pyro's broadcasting: tau[..., None, None] keeps a particle dim of tau apart
            # from the weight's event dims under vectorised particles
            self.fc1.weight = PyroSample(lambda fc1: dist.Normal(torch.zeros(6, 5), self.tau[..., None, None] * self.lam).to_event(2))
            self.fc2.weight = PyroSample(lambda fc2: dist.Normal(torch.zeros(3, 6), self.tau[..., None, None]).to_event(2))
        else:
            base = scalar_prior(prior)
            self.fc1.weight = PyroSample(base.expand([6, 5]).to_event(2))
            self.fc2.weight = PyroSample(base.expand([3, 6]).to_event(2))

    def forward(self, x, y=None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def make_guide(model, guide):
    # sparse kernels forced on: the weights are sampled as SparseWeight tensors and F.linear runs the
    # CSR kernels in every combination ("auto" would measure these tiny layers and mostly pick dense)
    if guide == "sparse alone":
        return SparseSubspaceGuide(model, density=0.5, dense_sites=("fc1.bias",), sparse_kernels=True), None
    sparse = SparseSubspaceGuide(pyro.poutine.block(model, expose=list(WEIGHTS)), density=0.5, sparse_kernels=True)
    guide = AutoGuideList(model)
    guide.append(AutoNormal(pyro.poutine.block(model, hide=list(WEIGHTS))))  # bias (and tau, lam)
    guide.append(sparse)
    return guide, sparse


CASES = [
    pytest.param(e, p, g, n, lrt, id=f"{e}-{p.replace(' ', '_')}-{g.split()[-1]}-{n.split()[0]}-{'lrt' if lrt else 'nolrt'}")
    for e in ELBOS for p in PRIORS for g in GUIDES for n in PARTICLES for lrt in LRT
]


@pytest.mark.parametrize("elbo,prior,guide_kind,particles,lrt", CASES)
def test_combination(elbo, prior, guide_kind, particles, lrt):
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    model = Net(prior)
    guide, sparse = make_guide(model, guide_kind)
    kw = {} if particles == "1" else {"num_particles": 3, "vectorize_particles": True}
    error = expected(elbo, prior, guide_kind, particles, lrt)

    def build_and_train():
        svi = SSVI(model, guide, pyro.optim.Adam({"lr": 0.01}), ELBOS[elbo](**kw), total_steps=8, update_every=2,
                   removal_fraction=0.5, local_reparameterization=lrt)
        for _ in range(6):
            svi.step(x, y)
        return svi

    if error is not None:
        with pytest.raises(ValueError, match=error):
            build_and_train()
        return
    sparse = sparse or guide
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
        guide(x, y)  # set up, to record the initial active sets
        before = {name: sparse.active_mask(name).clone() for name in WEIGHTS}
        svi = build_and_train()
    assert [h["step"] for h in svi.history] == [2, 4]
    assert svi.replaced_fraction() > 0  # updates replaced entries, not only re-added the removed ones
    for name in WEIGHTS:
        after = sparse.active_mask(name)
        assert int(after.sum()) == sparse.site_info(name).k
        assert (after != before[name]).any(), f"{name}: the active set never changed"
    if lrt:  # local reparameterisation really in use for the sparse weights
        assert all(svi.lrt.eligible.get(name) for name in WEIGHTS), svi.lrt.eligible


# --- the README table ----------------------------------------------------------------------
def _cell(elbo, particles, prior):
    works = {g: all(expected(elbo, prior, g, particles, lrt) is None for lrt in LRT) for g in GUIDES}
    if all(works.values()):
        return "yes"
    if works["in AutoGuideList"]:
        return "in a guide list"
    return "no"


def render_table():
    """The README's compatibility table, from :func:`expected`."""
    lines = ["| ELBO | particles | " + " | ".join(PRIORS) + " |", "|---|---|" + "---|" * len(PRIORS)]
    for elbo in ELBOS:
        for particles in PARTICLES:
            cells = [_cell(elbo, particles, prior) for prior in PRIORS]
            lines.append(f"| `{elbo}` | {particles} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_readme_table_is_the_tested_matrix():
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(r"<!-- compatibility table -->\n(.*?)\n<!-- end compatibility table -->", readme, re.S)
    assert match, "README.md: compatibility table markers missing"
    assert match.group(1) == render_table(), "README table differs: run python tests/test_compatibility.py"


if __name__ == "__main__":
    print(render_table())
