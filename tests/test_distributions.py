import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import kl_divergence

from pyro_ssvi import SparseNormal, SubspacePrior
from pyro_ssvi.distributions import factorised_base


def make(shape=(6, 5), k=7, seed=0):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    numel = math.prod(shape)
    index = torch.randperm(numel, generator=g)[:k]
    loc = torch.randn(k, generator=g)
    scale = torch.rand(k, generator=g) + 0.2
    return SparseNormal(loc, scale, index, shape), index


def test_samples_are_exactly_zero_off_the_active_set():
    q, index = make()
    x = q.rsample((1000,))
    assert x.shape == (1000, 6, 5)
    flat = x.reshape(1000, -1)
    off = torch.ones(30, dtype=torch.bool)
    off[index] = False
    assert (flat[:, off] == 0).all()
    assert (flat[:, index] != 0).all()


def test_active_moments_match_loc_and_scale():
    q, index = make()
    n = 20000
    x = q.rsample((n,)).reshape(n, -1)[:, index]
    # tolerance: 5 standard errors of the mean / of the standard deviation
    assert ((x.mean(0) - q.loc).abs() < 5 * q.scale / math.sqrt(n)).all()
    assert ((x.std(0) - q.scale).abs() < 5 * q.scale / math.sqrt(2 * n)).all()


def test_log_prob_and_entropy_cover_active_coordinates_only():
    q, index = make()
    x = q.rsample((3,))
    ref = torch.distributions.Normal(q.loc, q.scale).log_prob(x.reshape(3, -1)[:, index]).sum(-1)
    torch.testing.assert_close(q.log_prob(x), ref)
    torch.testing.assert_close(q.entropy(), torch.distributions.Normal(q.loc, q.scale).entropy().sum())


def test_dense_fast_path_and_mean_variance():
    loc, scale = torch.randn(12), torch.rand(12) + 0.1
    q = SparseNormal(loc, scale, None, (3, 4))
    assert torch.equal(q.mean, loc.reshape(3, 4))
    torch.testing.assert_close(q.variance, (scale**2).reshape(3, 4))
    s, index = make(k=4)
    assert (s.mean.reshape(-1)[index] == s.loc).all() and s.mean.reshape(-1).count_nonzero() <= 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="index=None"):
        SparseNormal(torch.zeros(3), torch.ones(3), None, (2, 2))
    with pytest.raises(ValueError, match="index must have shape"):
        SparseNormal(torch.zeros(3), torch.ones(3), torch.arange(2), (2, 2))


def test_analytic_kl_over_active_coordinates():
    q, index = make()
    prior_loc = torch.randn(6, 5)
    prior = dist.Normal(prior_loc, 2.0).to_event(2)
    got = kl_divergence(q, prior)
    ref = kl_divergence(
        torch.distributions.Normal(q.loc, q.scale), torch.distributions.Normal(prior_loc.reshape(-1)[index], 2.0)
    ).sum()
    torch.testing.assert_close(got, ref)
    # the same through a SubspacePrior
    torch.testing.assert_close(kl_divergence(q, SubspacePrior(prior, index)), ref)


def test_analytic_kl_agrees_with_monte_carlo():
    torch.manual_seed(1)
    q, index = make()
    prior = SubspacePrior(dist.Normal(0.0, 1.5).expand([6, 5]).to_event(2), index)
    n = 50000
    x = q.rsample((n,))
    terms = q.log_prob(x) - prior.log_prob(x)
    assert abs(terms.mean() - kl_divergence(q, prior)) < 5 * terms.std() / math.sqrt(n)


def test_kl_is_not_implemented_for_non_normal_priors():
    q, index = make()
    with pytest.raises(NotImplementedError):
        kl_divergence(q, dist.Laplace(0.0, 1.0).expand([6, 5]).to_event(2))


def test_subspace_prior_log_prob_and_samples():
    base = dist.Laplace(0.0, 0.5).expand([6, 5]).to_event(2)
    index = torch.tensor([0, 7, 29])
    p = SubspacePrior(base, index)
    x = torch.randn(4, 6, 5)
    ref = dist.Laplace(0.0, 0.5).log_prob(x.reshape(4, -1)[:, index]).sum(-1)
    torch.testing.assert_close(p.log_prob(x), ref)
    s = p.sample((2,)).reshape(2, -1)
    keep = torch.zeros(30, dtype=torch.bool)
    keep[index] = True
    assert (s[:, ~keep] == 0).all()


def test_factorised_priors_are_recognised():
    shape = [4, 3]
    mix = dist.MixtureSameFamily(
        dist.Categorical(torch.tensor([0.5, 0.5])), dist.Normal(torch.zeros(2), torch.tensor([0.1, 1.0]))
    )
    for p in (
        dist.Normal(0.0, 1.0).expand(shape).to_event(2),
        dist.Laplace(0.0, 1.0).expand(shape).to_event(2),
        dist.StudentT(3.0, 0.0, 1.0).expand(shape).to_event(2),
        mix.expand(shape).to_event(2),
    ):
        assert factorised_base(p) is not None
    mvn = dist.MultivariateNormal(torch.zeros(3), torch.eye(3)).expand([4]).to_event(1)
    assert factorised_base(mvn) is None


def test_expand_for_vectorised_particles():
    q, _ = make()
    qe = q.expand((3,))
    assert qe.batch_shape == (3,) and qe.rsample().shape == (3, 6, 5)
    assert qe.log_prob(qe.rsample()).shape == (3,)
    assert pyro.distributions.TorchDistribution in type(q).__mro__
