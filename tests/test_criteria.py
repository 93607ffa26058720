import math

import pytest
import torch

from pyro_ssvi import criteria

NAMES = sorted(criteria.REMOVAL_CRITERIA)


def naive(name, mu, sigma, lam=1.0):
    """Textbook formulas in float64, fine where sigma is not tiny against |mu|."""
    n = torch.distributions.Normal(torch.zeros(()).double(), torch.ones(()).double())
    e_abs = sigma * math.sqrt(2 / math.pi) * torch.exp(-(mu**2) / (2 * sigma**2)) + mu * torch.erf(mu / (sigma * math.sqrt(2)))
    var_abs = mu**2 + sigma**2 - e_abs**2

    def mgf(t):
        return torch.exp(t**2 * sigma**2 / 2 + t * mu) * n.cdf(mu / sigma + t * sigma) + torch.exp(
            t**2 * sigma**2 / 2 - t * mu
        ) * n.cdf(-mu / sigma + t * sigma)

    return {
        "abs_mean": mu.abs(),
        "snr": mu.abs() / sigma,
        "abs_expectation": e_abs,
        "snr_abs": e_abs / var_abs.sqrt(),
        "exp_abs": torch.log(mgf(lam)),
        "snr_exp_abs": mgf(lam) / (mgf(2 * lam) - mgf(lam) ** 2).sqrt(),
    }[name]


@pytest.mark.parametrize("name", NAMES)
def test_matches_textbook_formula_where_it_is_well_conditioned(name):
    mu = torch.linspace(-3, 3, 25, dtype=torch.float64).repeat_interleave(5)
    sigma = torch.tensor([0.3, 0.5, 1.0, 1.5, 2.0], dtype=torch.float64).repeat(25)
    got = criteria.REMOVAL_CRITERIA[name](mu, sigma)
    torch.testing.assert_close(got, naive(name, mu, sigma), rtol=1e-9, atol=1e-12)


def test_folded_normal_moments_against_monte_carlo():
    torch.manual_seed(0)
    mu, sigma, n = torch.tensor([0.7]), torch.tensor([0.9]), 400_000
    x = (mu + sigma * torch.randn(n, dtype=torch.float64)).abs()
    e, sd = x.mean(), x.std()
    # standard error of E|theta|: sd / sqrt(n); tolerance 5 standard errors
    assert abs(criteria.abs_expectation(mu.double(), sigma.double()).item() - e.item()) < 5 * sd.item() / math.sqrt(n)
    ex = torch.exp(x)
    log_mgf = criteria.exp_abs(mu.double(), sigma.double()).item()
    assert abs(math.exp(log_mgf) - ex.mean().item()) < 5 * ex.std().item() / math.sqrt(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_finite_over_the_whole_range(name, dtype):
    mu = torch.tensor([0.0, 1e-8, -1e-3, 0.5, -3.0, 50.0, -999.0, 1e3], dtype=dtype)
    sigma = torch.logspace(-8, 3, 23, dtype=dtype)
    m, s = torch.meshgrid(mu, sigma, indexing="ij")
    out = criteria.REMOVAL_CRITERIA[name](m.reshape(-1), s.reshape(-1))
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), (name, m.reshape(-1)[~torch.isfinite(out)], s.reshape(-1)[~torch.isfinite(out)])


def test_limits_as_sigma_goes_to_zero():
    mu = torch.tensor([-2.0, 0.3, 1e3], dtype=torch.float64)
    tiny = torch.full_like(mu, 1e-8)
    torch.testing.assert_close(criteria.abs_expectation(mu, tiny), mu.abs(), rtol=1e-12, atol=0)
    # the SNRs grow without bound like 1/sigma: sd|theta| -> sigma, sd exp(|theta|) -> sigma exp(|mu|)
    torch.testing.assert_close(criteria.snr_abs(mu, tiny), mu.abs() / 1e-8, rtol=1e-6, atol=0)
    torch.testing.assert_close(criteria.snr_exp_abs(mu, tiny), torch.full_like(mu, 1e8), rtol=1e-4, atol=0)
    torch.testing.assert_close(criteria.exp_abs(mu, tiny), mu.abs(), rtol=1e-12, atol=1e-12)
    for name in ("snr", "snr_abs", "snr_exp_abs"):
        s = torch.logspace(-8, -1, 15, dtype=torch.float64)
        scores = criteria.REMOVAL_CRITERIA[name](torch.full_like(s, 0.5), s)
        assert (scores[:-1] > scores[1:]).all(), name  # smaller sigma -> larger SNR


def test_snr_exp_abs_is_continuous_at_the_series_switch():
    mu = torch.tensor([0.0, 0.4, 3.0], dtype=torch.float64)
    below = criteria.snr_exp_abs(mu, torch.full_like(mu, 0.999e-4))
    above = criteria.snr_exp_abs(mu, torch.full_like(mu, 1.001e-4))
    # the two branches differ by O(lam * sigma) = 1e-4 relative, plus the 0.2% change of sigma
    torch.testing.assert_close(below / above, torch.full_like(mu, 1.001 / 0.999), rtol=5e-4, atol=0)


def test_get_removal_and_addition():
    assert criteria.get_removal("snr") is criteria.snr
    fn = lambda loc, scale: loc  # noqa: E731
    assert criteria.get_removal(fn) is fn
    with pytest.raises(ValueError, match="removal"):
        criteria.get_removal("biggest")
    assert isinstance(criteria.get_addition("gradient"), criteria.GradientAddition)
    with pytest.raises(ValueError, match="addition"):
        criteria.get_addition("smallest")
    assert criteria.needs_gradient(criteria.get_addition("gradient"))
    assert not criteria.needs_gradient(criteria.get_addition("random"))


def test_addition_scores():
    grad = torch.tensor([0.5, -3.0, 0.1])
    cand = torch.tensor([True, True, False])
    assert torch.equal(criteria.GradientAddition()(grad, cand), grad.abs())
    g = torch.Generator(torch.get_default_device()).manual_seed(3)
    r = criteria.RandomAddition(g)(None, cand)
    assert r.shape == cand.shape and ((r >= 0) & (r < 1)).all()
